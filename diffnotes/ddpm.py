"""DDPM: the forward kernel, the true posterior, the ε-loss and ancestral sampling.

Ahmad's notes, §1.1 (eqs 1.1–1.8, Algorithms 1–2); Ho et al. 2020; Zhu's slides on DDPM.
``t`` is a 0-based index into the schedule (diffusers' convention): ``alphas_cumprod[t]`` is the notes' ᾱ_{t+1}, and "ᾱ_{t−1}" at
``t = 0`` is 1 (no noise left).

Algorithms 1–2 of Ahmad's notes print α_t where ᾱ_t is meant (√α_t x_0 + √(1−α_t) ε in training and
(1−α_t)/√(1−α_t) in sampling); eq 1.7 prints 1/√ᾱ_t where 1/√α_t is meant. The code uses the
corrected forms; ``book/errata.md`` shows the checks.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .schedules import alphas_cumprod as _cumprod
from .utils import (batch_timesteps, check_positive, check_same_shape, check_tensor,
                    check_timestep, gather)

__all__ = ["q_sample", "predict_x0", "posterior_mean_variance", "ddpm_loss", "ddpm_step",
           "ddpm_sample"]

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_betas(betas) -> torch.Tensor:
    betas = check_tensor(betas, "betas", ndim=1)
    _cumprod(betas)  # validates 0 < β < 1
    return betas


def _check_alphas_cumprod(ac) -> torch.Tensor:
    ac = check_tensor(ac, "alphas_cumprod", ndim=1)
    if not bool(((ac > 0) & (ac < 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1); got values in "
                         f"[{float(ac.min())}, {float(ac.max())}]")
    return ac


def q_sample(x0: torch.Tensor, t, alphas_cumprod: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε — a draw from q(x_t | x_0) (Ahmad's notes, eqs 1.2–1.3; Ho et al. 2020, eq 4).

    ``t`` is an int or a (B,) integer tensor (one index per batch row); ``noise`` has x0's shape.
    """
    check_tensor(x0, "x0")
    check_tensor(noise, "noise")
    check_same_shape(x0, noise, "x0", "noise")
    ac = _check_alphas_cumprod(alphas_cumprod)
    t = check_timestep(t, len(ac))
    if isinstance(t, torch.Tensor) and t.ndim == 1 and t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must be a scalar or hold one index per batch row ({x0.shape[0]}), "
                         f"got shape {tuple(t.shape)}")
    a = gather(ac, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise  # eq 1.2


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t: eq 1.2 solved for x_0 (Ahmad's notes, eq 1.6)."""
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device)
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def posterior_mean_variance(x0: torch.Tensor, x_t: torch.Tensor, t, betas: torch.Tensor):
    """Mean and variance of q(x_{t−1} | x_t, x_0) (Ho et al. 2020, eqs 6–7; Zhu's slides,
    "DDPM: Reverse Diffusion Process"; Ahmad's notes, eq 1.5).

    μ̃ = √ᾱ_{t−1} β_t / (1−ᾱ_t) · x_0 + √α_t (1−ᾱ_{t−1}) / (1−ᾱ_t) · x_t,
    β̃_t = (1−ᾱ_{t−1}) / (1−ᾱ_t) · β_t,  with ᾱ_{t−1} = 1 at t = 0 (so β̃ = 0 there).

    Returns ``(mean, variance)``; the variance broadcasts against ``x_t``.
    """
    check_tensor(x0, "x0")
    check_tensor(x_t, "x_t")
    check_same_shape(x0, x_t, "x0", "x_t")
    betas = _check_betas(betas)
    t = check_timestep(t, len(betas))
    ac = _cumprod(betas)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    b, a, a_prev = gather(betas, t, x_t), gather(ac, t, x_t), gather(ac_prev, t, x_t)
    mean = (a_prev.sqrt() * b / (1 - a)) * x0 + ((1 - b).sqrt() * (1 - a_prev) / (1 - a)) * x_t
    var = (1 - a_prev) / (1 - a) * b
    return mean, var


def ddpm_loss(eps_model: EpsModel, x0: torch.Tensor, alphas_cumprod: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """L_simple = E_{t, ε} ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² (Ahmad's notes, eq 1.8 and Algorithm 1; Ho et al. 2020, eq 14).

    One uniformly drawn ``t`` and one ε per batch row; returns the mean over rows and elements.
    """
    check_tensor(x0, "x0")
    ac = _check_alphas_cumprod(alphas_cumprod)
    t = torch.randint(0, len(ac), (x0.shape[0],), generator=generator, device="cpu").to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
    x_t = q_sample(x0, t, ac, noise)
    return torch.mean((noise - eps_model(x_t, t)) ** 2)


def ddpm_step(eps_model: EpsModel, x_t: torch.Tensor, t: int, betas: torch.Tensor,
              generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
              variance: str = "small", eps: torch.Tensor | None = None,
              clip_sample: bool = False, clip_sample_range: float = 1.0) -> torch.Tensor:
    """One ancestral step x_t → x_{t−1} (Ahmad's notes, Algorithm 2, with ᾱ where the notes print α;
    Ho et al. 2020, Algorithm 2 and eq 11):

    x_{t−1} = (x_t − β_t/√(1−ᾱ_t) · ε_θ(x_t, t)) / √α_t + σ_t z,   z = 0 at the last step (t = 0).

    ``variance="small"`` takes σ_t² = β̃_t (diffusers' ``"fixed_small"``), ``"large"`` σ_t² = β_t.
    The noise is ``noise`` if given, else drawn from ``generator`` exactly as diffusers'
    ``DDPMScheduler.step`` draws it, so the two agree step for step. ``eps_model`` receives ``t``
    as a (B,) long tensor; ``eps``, if given, is its output already computed (not called again).

    ``clip_sample=True`` clips the predicted x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t (eq 1.6) to
    [−r, r], r = ``clip_sample_range``, and takes the mean of the true posterior at it,
    μ̃ = √ᾱ_{t−1} β_t/(1−ᾱ_t) · x̂_0 + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) · x_t (Ho et al. 2020, eq 7),
    as DDPM's original code and diffusers' ``DDPMScheduler(clip_sample=True)`` do. Without
    clipping that mean equals Algorithm 2's; off (the default) computes exactly what it did before.
    """
    check_tensor(x_t, "x_t")
    betas = _check_betas(betas)
    if not isinstance(clip_sample, bool):
        raise TypeError(f"clip_sample must be a bool, got {type(clip_sample).__name__}")
    r = check_positive(clip_sample_range, "clip_sample_range")
    t = check_timestep(t, len(betas))
    if isinstance(t, torch.Tensor):
        t = int(t)
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    ac = _cumprod(betas)
    b, a = betas[t].item(), ac[t].item()
    a_prev = ac[t - 1].item() if t > 0 else 1.0
    if eps is None:
        eps = eps_model(x_t, batch_timesteps(t, x_t))
    check_same_shape(x_t, eps, "x_t", "eps_model(x_t, t)")
    if clip_sample:
        x0 = predict_x0(x_t, eps, a).clamp(-r, r)                         # eq 1.6, clipped
        mean = (a_prev ** 0.5 * b / (1 - a)) * x0 \
            + ((1 - b) ** 0.5 * (1 - a_prev) / (1 - a)) * x_t             # Ho et al. eq 7
    else:
        mean = (x_t - b / (1 - a) ** 0.5 * eps) / (1 - b) ** 0.5  # Algorithm 2, line 4
    if t == 0:
        return mean
    var = (1 - a_prev) / (1 - a) * b if variance == "small" else b
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype,
                            device=generator.device if generator is not None else x_t.device)
        noise = noise.to(x_t.device)
    check_same_shape(x_t, noise, "x_t", "noise")
    return mean + var ** 0.5 * noise


def ddpm_sample(eps_model: EpsModel, x_T: torch.Tensor, betas: torch.Tensor,
                generator: torch.Generator | None = None, variance: str = "small",
                progress: bool = True, return_trajectory: bool = False,
                callback: Callable[[dict], None] | None = None, clip_sample: bool = False,
                clip_sample_range: float = 1.0):
    """Ancestral sampling through all T steps, t = T−1 … 0 (Ahmad's notes, Algorithm 2; Ho et al. 2020, Algorithm 2).

    ``eps_model(x, t)`` is any callable; it receives ``t`` as a (B,) long tensor (one index per
    row of x). ``callback``, if given, is called once per step, before the step, with
    ``dict(i=, t=, x=, x0_hat=, eps=)``: the step's index i, its time step t (an int), the
    current x_t, the predicted x̂_0 (eq 1.6) and ε_θ(x_t, t), as in k-diffusion's samplers; it
    only looks (the samples are the same with and without it).
    ``clip_sample``/``clip_sample_range``: see :func:`ddpm_step` (the callback's ``x0_hat`` is
    then the clipped one).
    Returns x_0, or ``(x_0, [x_T, …, x_0])`` with ``return_trajectory=True``.
    """
    betas = _check_betas(betas)
    check_tensor(x_T, "x_T")
    ac = _cumprod(betas)
    x, traj = x_T, [x_T]
    steps = range(len(betas) - 1, -1, -1)
    for i, t in enumerate(tqdm(steps, disable=not progress, desc="DDPM", leave=False)):
        with torch.no_grad():
            eps = eps_model(x, batch_timesteps(t, x))
            if callback is not None:
                x0_hat = predict_x0(x, eps, ac[t].item())
                if clip_sample:
                    x0_hat = x0_hat.clamp(-clip_sample_range, clip_sample_range)
                callback(dict(i=i, t=t, x=x, x0_hat=x0_hat, eps=eps))
            x = ddpm_step(eps_model, x, t, betas, generator=generator, variance=variance, eps=eps,
                          clip_sample=clip_sample, clip_sample_range=clip_sample_range)
        if return_trajectory:
            traj.append(x)
    return (x, traj) if return_trajectory else x
