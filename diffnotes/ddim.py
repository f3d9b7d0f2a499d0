"""DDIM: the non-Markovian sampler, its ODE, and inversion.

Ahmad's notes, §1.2–1.3 (eqs 1.9–1.26); Song et al. 2021 (DDIM); Zhu's slides on DDIM.
``t`` is a 0-based index into ``alphas_cumprod``; time-step lists run from high noise to low; after the last step
ᾱ_prev = 1 (the sample is clean), as in diffusers' ``DDIMScheduler(set_alpha_to_one=True)``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .ddpm import _check_alphas_cumprod, predict_x0
from .utils import (batch_timesteps, check_decreasing, check_finite, check_positive,
                    check_same_shape, check_tensor)

__all__ = ["ddim_sigma", "ddim_step", "ddim_sample", "ddim_invert", "ode_coords",
           "from_ode_coords", "ode_sample"]

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _alpha(value, name: str) -> float:
    v = check_finite(value, name)
    if not 0 < v <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {v}")
    return v


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta: float):
    """σ_t(η) = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev) (DDIM eq 16; Zhu's slides, "DDIM: Sampling from Generalized Generative Processes").

    η = 1 gives σ_t² = β̃_t, the DDPM posterior variance (so the corrected eq 1.24 of Ahmad's notes has no
    square root); η = 0 gives the deterministic sampler.
    """
    a, ap = _alpha(alpha_bar_t, "alpha_bar_t"), _alpha(alpha_bar_prev, "alpha_bar_prev")
    eta = check_finite(eta, "eta")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if a == 1:
        return 0.0
    return eta * ((1 - ap) / (1 - a)) ** 0.5 * max(1 - a / ap, 0.0) ** 0.5


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t, alpha_bar_prev,
              eta: float = 0.0, noise: torch.Tensor | None = None, clip_sample: bool = False,
              clip_sample_range: float = 1.0) -> torch.Tensor:
    """One generalized step x_t → x_prev (Ahmad's notes, eq 1.21; DDIM eq 12):

    x_prev = √ᾱ_prev · x̂_0 + √(1 − ᾱ_prev − σ_t²) · ε + σ_t · noise,  x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t.

    With η = 0 it is eq 1.22. ``noise`` is required when σ_t > 0. ``clip_sample=True`` clips
    x̂_0 to [−r, r] (r = ``clip_sample_range``) and keeps ε in the "direction to x_t", as
    diffusers' ``DDIMScheduler(clip_sample=True)`` does (its ``use_clipped_model_output=False``).
    """
    check_tensor(x_t, "x_t")
    check_tensor(eps, "eps")
    check_same_shape(x_t, eps, "x_t", "eps")
    a, ap = _alpha(alpha_bar_t, "alpha_bar_t"), _alpha(alpha_bar_prev, "alpha_bar_prev")
    if not isinstance(clip_sample, bool):
        raise TypeError(f"clip_sample must be a bool, got {type(clip_sample).__name__}")
    r = check_positive(clip_sample_range, "clip_sample_range")
    sigma = ddim_sigma(a, ap, eta)
    x0 = predict_x0(x_t, eps, a)                                # "predicted x_0", eq 1.21
    if clip_sample:
        x0 = x0.clamp(-r, r)
    x_prev = ap ** 0.5 * x0 + max(1 - ap - sigma ** 2, 0.0) ** 0.5 * eps  # + "direction to x_t"
    if sigma > 0:
        if noise is None:
            raise ValueError(f"noise is required when eta > 0 (sigma_t = {sigma:.4g})")
        check_same_shape(x_t, noise, "x_t", "noise")
        x_prev = x_prev + sigma * noise                          # "random noise"
    return x_prev


def ddim_sample(eps_model: EpsModel, x_T: torch.Tensor, timesteps: Sequence[int],
                alphas_cumprod: torch.Tensor, eta: float = 0.0,
                generator: torch.Generator | None = None, progress: bool = False,
                return_trajectory: bool = False, callback: Callable[[dict], None] | None = None,
                clip_sample: bool = False, clip_sample_range: float = 1.0):
    """DDIM sampling along ``timesteps`` (decreasing), ending at ᾱ = 1 (Ahmad's notes, eq 1.21; DDIM eq 12).

    Noise for η > 0 is drawn from ``generator`` as diffusers' ``DDIMScheduler.step`` draws it.
    ``eps_model(x, t)`` is any callable; it receives ``t`` as a (B,) long tensor (one index per
    row of x). ``callback``, if given, is called once per step, before the step, with
    ``dict(i=, t=, x=, x0_hat=, eps=)``: the step's index i, its time step t (an int), the
    current x_t, the predicted x̂_0 (eq 1.6) and ε_θ(x_t, t), as in k-diffusion's samplers; it
    only looks (the result is the same with and without it).
    ``clip_sample``/``clip_sample_range``: see :func:`ddim_step` (the callback's ``x0_hat`` is
    then the clipped one).
    Returns x_0, or ``(x_0, [x_T, …, x_0])`` with ``return_trajectory=True``.
    """
    check_tensor(x_T, "x_T")
    ac = _check_alphas_cumprod(alphas_cumprod)
    ts = check_decreasing(timesteps, len(ac))
    eta = check_finite(eta, "eta")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    acl = ac.tolist()
    x, traj = x_T, [x_T]
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="DDIM", leave=False)):
        a_prev = acl[ts[i + 1]] if i + 1 < len(ts) else 1.0
        with torch.no_grad():
            eps = eps_model(x, batch_timesteps(t, x))
        if callback is not None:
            x0_hat = predict_x0(x, eps, acl[t])
            if clip_sample:
                x0_hat = x0_hat.clamp(-clip_sample_range, clip_sample_range)
            callback(dict(i=i, t=t, x=x, x0_hat=x0_hat, eps=eps))
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                device=generator.device if generator is not None else x.device)
            noise = noise.to(x.device)
        x = ddim_step(x, eps, acl[t], a_prev, eta, noise, clip_sample=clip_sample,
                      clip_sample_range=clip_sample_range)
        if return_trajectory:
            traj.append(x)
    return (x, traj) if return_trajectory else x


def ddim_invert(eps_model: EpsModel, x_0: torch.Tensor, timesteps: Sequence[int],
                alphas_cumprod: torch.Tensor, progress: bool = False,
                return_trajectory: bool = False, callback: Callable[[dict], None] | None = None):
    """Deterministic DDIM inversion x_0 → x_{timesteps[0]} (Ahmad's notes, §1.3, eq 1.26, sign corrected).

    The η = 0 step run backwards along ``reversed(timesteps)``: to go from level ᾱ_s up to ᾱ_t
    we use ε_θ(x_s, t) in place of the unknown ε_θ(x_t, t) — the usual approximation, exact in
    the limit of small steps. Returns x at the highest time step (or the trajectory too).

    ``eps_model(x, t)`` is any callable; it receives ``t`` as a (B,) long tensor (one index per
    row of x). ``callback``, if given, is called once per step (steps run from low noise up),
    before the step, with ``dict(i=, t=, x=, x0_hat=, eps=)``: the step's index i, the time step
    t (an int) the model is asked at, the current x (one level below t), the predicted x̂_0
    (eq 1.6 at x's level) and ε_θ(x, t); it only looks (the result is the same without it).
    """
    check_tensor(x_0, "x_0")
    ac = _check_alphas_cumprod(alphas_cumprod)
    ts = check_decreasing(timesteps, len(ac))
    acl = ac.tolist()
    x, a_from, traj = x_0, 1.0, [x_0]
    for i, t in enumerate(tqdm(ts[::-1], disable=not progress, desc="DDIM inversion",
                               leave=False)):
        with torch.no_grad():
            eps = eps_model(x, batch_timesteps(t, x))
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=predict_x0(x, eps, a_from), eps=eps))
        x = ddim_step(x, eps, a_from, acl[t])   # eq 1.22 with the roles of the levels swapped
        a_from = acl[t]
        if return_trajectory:
            traj.append(x)
    return (x, traj) if return_trajectory else x


def ode_coords(x_t: torch.Tensor, alpha_bar):
    """(u, τ) of Ahmad's notes, eq 1.25 (DDIM eq 14): u = x_t / √ᾱ_t and τ = √((1−ᾱ_t)/ᾱ_t)."""
    a = _alpha(alpha_bar, "alpha_bar")
    return x_t / a ** 0.5, ((1 - a) / a) ** 0.5


def from_ode_coords(u: torch.Tensor, tau: float):
    """The inverse of :func:`ode_coords`: x = u / √(1+τ²), ᾱ = 1/(1+τ²). Returns (x, ᾱ)."""
    tau = check_finite(tau, "tau")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    return u / (1 + tau ** 2) ** 0.5, 1 / (1 + tau ** 2)


def ode_sample(eps_model: EpsModel, x_T: torch.Tensor, timesteps: Sequence[int],
               alphas_cumprod: torch.Tensor, method: str = "euler", progress: bool = False,
               callback: Callable[[dict], None] | None = None):
    """Integrate du/dτ = ε_θ(u/√(1+τ²), t(τ)) from τ(timesteps[0]) down to τ = 0 (Ahmad's notes, eq 1.25; DDIM eq 14).

    ``"euler"``: u ← u + (τ_next − τ) ε — algebraically the η = 0 DDIM step (eq 1.22).
    ``"heun"``: the explicit trapezoidal rule, a second ε evaluation at the next grid point;
    the last step (to τ = 0, where the model has no time index) is an Euler step, as in Karras
    et al.'s Algorithm 1. Heun costs 2·len(timesteps) − 1 model calls.

    ``eps_model(x, t)`` is any callable; it receives ``t`` as a (B,) long tensor (one index per
    row of x). ``callback``, if given, is called once per step, before the step, with
    ``dict(i=, t=, x=, x0_hat=, eps=)``: the step's index i, its time step t (an int), the
    current x_t = u/√(1+τ²), the predicted x̂_0 (eq 1.6) and ε_θ(x_t, t) (for Heun, the first of
    the step's two evaluations); it only looks (the result is the same with and without it).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    check_tensor(x_T, "x_T")
    ac = _check_alphas_cumprod(alphas_cumprod)
    ts = check_decreasing(timesteps, len(ac))
    taus = [ode_coords(x_T, float(ac[t]))[1] for t in ts] + [0.0]
    u = ode_coords(x_T, float(ac[ts[0]]))[0]
    for i, t in enumerate(tqdm(ts, disable=not progress, desc=f"ODE ({method})", leave=False)):
        h = taus[i + 1] - taus[i]
        with torch.no_grad():
            x_t = from_ode_coords(u, taus[i])[0]
            d1 = eps_model(x_t, batch_timesteps(t, u))
            if callback is not None:
                callback(dict(i=i, t=t, x=x_t, x0_hat=predict_x0(x_t, d1, float(ac[t])), eps=d1))
            if method == "heun" and i + 1 < len(ts):
                u_pred = u + h * d1
                d2 = eps_model(from_ode_coords(u_pred, taus[i + 1])[0],
                               batch_timesteps(ts[i + 1], u))
                u = u + h * (d1 + d2) / 2
            else:
                u = u + h * d1                                   # du = dτ · ε, eq 1.25
    return from_ode_coords(u, 0.0)[0]
