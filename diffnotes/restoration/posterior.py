"""Restoration as posterior sampling: ILVR, RePaint, DPS, ADIR and sketch guidance.

Zhu's slides, *Sampling from the Posterior*: the conditional score splits by Bayes' rule,
∇ log p_t(x | y) = ∇ log p_t(x) + ∇ log p_t(y | x) (Zhu's slides, "Controllable Generation";
Song et al. 2021, eq 14). The unconditional model supplies the first term; the methods differ in
how they stand in for the second, which no model knows:

- :func:`ilvr` (Choi et al. 2021, Algorithm 1): replace the low-pass band φ_N(x) of each proposal
  by the band of the forward-noised reference (a projection, no gradient);
- :func:`repaint` (Lugmayr et al. 2022, Algorithm 1): replace the known region by the
  forward-noised measurement, and resample (jump back and forth) so that the two regions agree;
- :func:`dps` (Chung et al. 2023, Algorithm 1/2): a gradient step on ‖y − A x̂_0(x_t)‖ through
  the network's Tweedie estimate;
- :func:`adir` (Abu-Hussein et al. 2022, Algorithm 1): classifier-guidance-style mean shift with
  the gradient of a Λ-weighted loss between A μ̂ and the noised measurement y_t;
- :func:`sketch_guidance` (Voynov et al. 2022): the gradient of an edge predictor's loss on the
  UNet's own features (the predictor is in :mod:`.sketch`).

Every solver has the signature of the restoration package (``eps_model``, ``operator``, ``y``,
``sigma_y``, ``alphas_cumprod``, ``timesteps``, ``x_T``, ``generator``, ``progress``,
``callback``, hyperparameters). The stochastic steps are DDPM's ancestral steps on a (possibly
strided) grid of time steps: q(x_prev | x_t, x̂_0) with β = 1 − ᾱ_t/ᾱ_prev (Ho et al. 2020, eqs
6–7), which on the full grid is :func:`diffnotes.ddpm.ddpm_step`.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..ddpm import predict_x0
from ..utils import (batch_timesteps, check_callable, check_decreasing, check_finite,
                     check_int, check_positive, check_range, check_tensor)

__all__ = ["ilvr", "repaint", "dps", "adir", "sketch_guidance", "repaint_schedule",
           "default_timesteps", "poisson_weights", "EVAL_CONFIGS"]


# ---------------------------------------------------------------------------------- helpers
def default_timesteps(T: int, n: int) -> list[int]:
    """n evenly spaced steps of a length-T schedule, high noise first: T−T/n, …, 0 (diffusers'
    "leading" spacing, as ``DDPMScheduler.set_timesteps`` and ``RePaintScheduler`` use)."""
    n = check_int(n, "n", min=1)
    if n > T:
        raise ValueError(f"n must be at most T = {T}, got {n}")
    return list(range(0, T, T // n))[:n][::-1]


def _check_ac(alphas_cumprod) -> torch.Tensor:
    ac = check_tensor(alphas_cumprod, "alphas_cumprod", ndim=1).detach().double().cpu()
    if not bool(((ac > 0) & (ac < 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1); got values in "
                         f"[{float(ac.min())}, {float(ac.max())}]")
    return ac


def _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps, x_T, generator,
           n_default):
    """Validate the common arguments once; return (ac, timesteps, x_T, sigma_y)."""
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    if operator is not None and not hasattr(operator, "A"):
        raise TypeError(f"operator must have A(x) (an Operator from "
                        f"diffnotes.restoration.operators), got {type(operator).__name__}")
    y = check_tensor(y, "y")
    sigma_y = check_positive(sigma_y, "sigma_y", allow_zero=True)
    ac = _check_ac(alphas_cumprod)
    T = len(ac)
    ts = default_timesteps(T, n_default) if timesteps is None else \
        check_decreasing(timesteps, T, "timesteps")
    if x_T is None:
        shape = (y.shape[0], *operator.x_shape) if operator is not None else tuple(y.shape)
        x_T = torch.randn(shape, generator=generator, dtype=y.dtype,
                          device=generator.device if generator is not None else y.device)
        x_T = x_T.to(y.device)
    x_T = check_tensor(x_T, "x_T")
    if x_T.shape[0] != y.shape[0]:
        raise ValueError(f"x_T must have one row per measurement ({y.shape[0]}), got shape "
                         f"{tuple(x_T.shape)}")
    return ac, ts, x_T, sigma_y


def _randn(like: torch.Tensor, generator) -> torch.Tensor:
    """A standard normal like ``like``, drawn as :func:`diffnotes.ddpm.ddpm_step` draws it."""
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype,
                    device=generator.device if generator is not None else like.device)
    return z.to(like.device)


def _alphas(ac: torch.Tensor, ts: list[int], i: int) -> tuple[float, float]:
    """ᾱ at step i of the grid and at the next step (1 after the last: no noise left)."""
    a = float(ac[ts[i]])
    a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
    return a, a_prev


def _posterior(x_t, x0_hat, a: float, a_prev: float):
    """Mean and variance of q(x_prev | x_t, x̂_0) with β = 1 − ᾱ_t/ᾱ_prev (Ho et al. 2020, eqs 6–7;
    Zhu's slides, *DPS*, Algorithm 2 line 6)."""
    beta = 1 - a / a_prev
    mean = (a_prev ** 0.5 * beta / (1 - a)) * x0_hat + \
        ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * x_t          # μ̃(x_t, x̂_0), eq 7
    var = (1 - a_prev) / (1 - a) * beta                              # β̃, eq 7
    return mean, var


def _clip(x0, clip_x0):
    return x0 if clip_x0 is None else x0.clamp(-clip_x0, clip_x0)


def _ancestral(x_t, eps, a, a_prev, generator, clip_x0=None):
    """One ancestral DDPM step from ε̂; returns (x_prev, x̂_0, z) with z the noise used (None at
    the last step). ``clip_x0`` = c clamps x̂_0 to [−c, c] first (DDPM's ``clip_sample``)."""
    x0 = _clip(predict_x0(x_t, eps, a), clip_x0)                     # Tweedie / eq 1.6
    mean, var = _posterior(x_t, x0, a, a_prev)
    if var <= 0:
        return mean, x0, None
    z = _randn(x_t, generator)
    return mean + var ** 0.5 * z, x0, z


def _bar(ts, progress, desc):
    return tqdm(ts, disable=not progress, desc=desc, leave=False)


def _check_mask(mask, x_shape, y):
    """A boolean known-region mask broadcastable to (B, *x_shape) (True = known)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = known), got dtype {mask.dtype}")
    full = (y.shape[0], *x_shape)
    try:
        torch.broadcast_shapes(mask.shape, full)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the images' "
                         f"shape {full}") from None
    if mask.ndim > len(full):
        raise ValueError(f"mask of shape {tuple(mask.shape)} has more dimensions than the images "
                         f"{full}")
    return mask


def _known_projector(operator, y, mask):
    """(P, x_known, blend): P projects onto the measured part, x_known is the measured image and
    blend(k, u) = P k + (I − P) u (for a mask m ⊙ k + (1 − m) ⊙ u, exact where m = 1).

    With a ``mask`` (RePaint's m) P = m ⊙ · and x_known = y (y has the image's shape); otherwise
    P = A⁺A (the orthogonal projector onto A's row space: ILVR's φ_N for average pooling, m ⊙ for
    inpainting) and x_known = A⁺ y.
    """
    if mask is not None:
        m = mask.to(y.dtype)
        return (lambda v: m * v), m * y, (lambda k, u: torch.where(mask, k, u))
    if operator is None:
        raise ValueError("operator is required when no mask is given")
    P = lambda v: operator.A_pinv(operator.A(v))  # noqa: E731
    return P, operator.A_pinv(y), (lambda k, u: P(k) + u - P(u))


# ---------------------------------------------------------------------------------- ILVR
def ilvr(eps_model: Callable, operator, y: torch.Tensor, sigma_y: float = 0.0, *,
         alphas_cumprod, timesteps=None, x_T=None, generator=None, progress: bool = True,
         callback: Callable | None = None, scale: float = 1.0, t_stop: int = 0,
         low_pass: Callable | None = None, clip_x0: float | None = None) -> torch.Tensor:
    """Iterative latent variable refinement (Choi et al. 2021, Algorithm 1 and eq 8; Zhu's slides,
    *ILVR*, Algorithm 1 line 9 and its relaxed form):

        x'_{t−1} ~ p_θ(x'_{t−1} | x_t),   y_{t−1} ~ q(y_{t−1} | y),
        x_{t−1} = x'_{t−1} + a (φ_N(y_{t−1}) − φ_N(x'_{t−1})).

    φ_N (``low_pass``) defaults to ``A⁺A`` of ``operator``: for the super-resolution operator
    (average pooling) it is "downsample then upsample", the paper's filter. ``y`` is the
    measurement (A applied to the reference); the reference's band is φ_N(A⁺y). ``scale`` is a
    (a = 1 is the paper's sampler, a = 0 the unconditional one); ``t_stop`` is the conditioning
    range: the refinement is applied while the grid's time step t ≥ t_stop (the paper conditions
    from T down to a chosen step and lets the model finish alone). ``sigma_y`` is accepted for the
    common signature and not used: the measurement is treated as noise-free. The callback gets
    ``dict(i, t, x, x0_hat, eps, noise, y_prev, x_prev)``.
    """
    ac, ts, x, sigma_y = _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps, x_T,
                                generator, 100)
    scale = check_finite(scale, "scale")
    t_stop = check_int(t_stop, "t_stop", min=0)
    if low_pass is None:
        phi, ref, _ = _known_projector(operator, y, None)
    else:
        check_callable(low_pass, "low_pass", "low_pass(x)")
        phi, ref = low_pass, operator.A_pinv(y)
    for i, t in enumerate(_bar(ts, progress, "ILVR")):
        a, a_prev = _alphas(ac, ts, i)
        with torch.no_grad():
            eps = eps_model(x, batch_timesteps(t, x))
            x_prop, x0, z = _ancestral(x, eps, a, a_prev, generator, clip_x0)   # line 7: proposal
            y_prev = None
            if t >= t_stop:
                n = _randn(ref, generator) if a_prev < 1 else torch.zeros_like(ref)
                y_prev = a_prev ** 0.5 * ref + (1 - a_prev) ** 0.5 * n  # line 8: q(y_{t-1} | y)
                x_new = x_prop + scale * (phi(y_prev) - phi(x_prop))    # line 9 (relaxed form)
            else:
                x_new = x_prop
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=x0, eps=eps, noise=z, y_prev=y_prev, x_prev=x_new))
        x = x_new
    return x


# ---------------------------------------------------------------------------------- RePaint
def repaint_schedule(n_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """RePaint's resampling schedule (Lugmayr et al. 2022, §4.2 and its official
    ``get_schedule_jump``; diffusers' ``RePaintScheduler.set_timesteps``) as positions
    k = n_steps−1 … 0 on the grid of n_steps time steps: going down by one is a denoising step
    (one model call), going up by one a forward-noising step. Every ``jump_length`` positions
    (k = 0, j, 2j, … < n_steps − j) the sampler jumps back up ``jump_length`` positions,
    ``jump_n_sample − 1`` times. Model calls: n_steps + (r − 1) · j · ⌈(n_steps − j)/j⌉.
    """
    n_steps = check_int(n_steps, "n_steps", min=1)
    jump_length = check_int(jump_length, "jump_length", min=1)
    jump_n_sample = check_int(jump_n_sample, "jump_n_sample", min=1)
    if jump_n_sample > 1 and jump_length >= n_steps:
        raise ValueError(f"jump_length must be smaller than the number of steps ({n_steps}), "
                         f"got {jump_length}")
    jumps = {j: jump_n_sample - 1 for j in range(0, n_steps - jump_length, jump_length)}
    t, out = n_steps, []
    while t >= 1:
        t -= 1
        out.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                out.append(t)
    return out


def repaint(eps_model: Callable, operator, y: torch.Tensor, sigma_y: float = 0.0, *,
            alphas_cumprod, timesteps=None, x_T=None, generator=None, progress: bool = True,
            callback: Callable | None = None, mask: torch.Tensor | None = None,
            jump_length: int = 10, jump_n_sample: int = 10,
            clip_x0: float | None = None) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1 and eqs 8–9; Zhu's slides, *RePaint*, Algorithm 1):

        x^known_{t−1} = √ᾱ_{t−1} y + √(1−ᾱ_{t−1}) ε          (the slide prints √α_t y + (1−ᾱ_t) ε)
        x^unknown_{t−1} ~ p_θ(x_{t−1} | x_t)
        x_{t−1} = m ⊙ x^known_{t−1} + (1 − m) ⊙ x^unknown_{t−1},

    then, on the jump schedule (:func:`repaint_schedule`: jump length j = 10 and r = 10 resamplings
    by default, the paper's), x_t ~ q(x_t | x_{t−1}) = N(√(ᾱ_t/ᾱ_{t−1}) x_{t−1}, (1−ᾱ_t/ᾱ_{t−1}) I)
    jumps back so that the model harmonises the two regions. The known region m is ``mask``
    (bool, True = known; ``y`` then has the image's shape), else the operator's row space: with
    P = A⁺A, x_{t−1} = P x^known_{t−1} + (I − P) x^unknown_{t−1}, x^known = q-sample of A⁺y, which
    is the paper's rule for inpainting (P = diag(m)) and carries it to any linear operator.
    ``sigma_y`` is not used (the known region is pasted as if noise-free). The callback gets ``dict(i, t, x, x0_hat, eps, noise, known, x_prev)`` at each model call.
    """
    ac, ts, x, sigma_y = _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps, x_T,
                                generator, 250)
    if mask is not None:
        shape = tuple(operator.x_shape) if operator is not None else tuple(x.shape[1:])
        _check_mask(mask, shape, y)
        if tuple(y.shape[1:]) != shape:
            raise ValueError(f"with a mask, y must have the image's shape {shape}, got "
                             f"{tuple(y.shape[1:])}")
    n = len(ts)
    jump_length = check_int(jump_length, "jump_length", min=1)
    if jump_n_sample > 1 and jump_length >= n:
        raise ValueError(f"jump_length must be smaller than the number of steps ({n}), got "
                         f"{jump_length}")
    schedule = repaint_schedule(n, jump_length, jump_n_sample)
    _, known0, blend = _known_projector(operator, y, mask)
    # grid position p = n − 1 − k: level p holds x at ts[p]; level n is the clean image
    level = lambda p: float(ac[ts[p]]) if p < n else 1.0           # noqa: E731
    k_last = n                                                       # start above position n − 1
    calls = 0
    for k in _bar(schedule, progress, "RePaint"):
        if k < k_last:                                               # denoise: ts[p] → next level
            p = n - 1 - k
            t = ts[p]
            a, a_prev = level(p), level(p + 1)
            with torch.no_grad():
                eps = eps_model(x, batch_timesteps(t, x))
                x_unk, x0, z = _ancestral(x, eps, a, a_prev, generator, clip_x0)  # line 7
                if a_prev < 1:
                    e = _randn(known0, generator)
                    known = a_prev ** 0.5 * known0 + (1 - a_prev) ** 0.5 * e  # line 5 (corrected)
                else:
                    known = known0
                x_new = blend(known, x_unk)                           # line 8
            if callback is not None:
                callback(dict(i=calls, t=t, x=x, x0_hat=x0, eps=eps, noise=z, known=known,
                              x_prev=x_new))
            calls += 1
            x = x_new
        else:                                                        # jump back: q(x_t | x_{t-1})
            p = n - 1 - k                                            # from level p + 1 to p
            r = level(p) / level(p + 1)
            x = r ** 0.5 * x + (1 - r) ** 0.5 * _randn(x, generator)  # line 10
        k_last = k
    return x


# ---------------------------------------------------------------------------------- DPS
def dps(eps_model: Callable, operator, y: torch.Tensor, sigma_y: float = 0.0, *,
        alphas_cumprod, timesteps=None, x_T=None, generator=None, progress: bool = True,
        callback: Callable | None = None, zeta: float = 1.0, normalize: bool = True,
        loss: Callable | None = None, clip_x0: float | None = None) -> torch.Tensor:
    """Diffusion posterior sampling (Chung et al. 2023, Algorithm 1 and eq 16; Zhu's slides,
    *DPS*, Algorithm 2 "DPS – Gaussian"):

        ŝ = −ε_θ(x_i, i)/√(1−ᾱ_i),  x̂_0 = (x_i + (1−ᾱ_i) ŝ)/√ᾱ_i            (Tweedie; the slide
                                                                              prints √(1−ᾱ_i) ŝ)
        x'_{i−1} = √α_i(1−ᾱ_{i−1})/(1−ᾱ_i) x_i + √ᾱ_{i−1} β_i/(1−ᾱ_i) x̂_0 + σ̃_i z
        x_{i−1} = x'_{i−1} − ζ_i ∇_{x_i} ‖y − A(x̂_0)‖²,  ζ_i = ζ'/‖y − A(x̂_0)‖  (the paper's
                                                          normalisation, its Appendix C.2).

    The gradient goes through the network (autograd on ε_θ), DPS's defining cost. ``zeta`` is ζ'
    (the paper uses ζ' ∈ [0.1, 1], 1 for most tasks); ``normalize=False`` takes ζ_i = ζ' constant.
    The official code steps ζ'∇‖y − A x̂_0‖, half the paper's step: its ζ' is twice this one.
    ``loss(x0_hat) -> (B,)`` replaces ‖y − A x̂_0‖² (e.g. a Λ-weighted norm). The callback gets
    ``dict(i, t, x, x0_hat, eps, noise, grad, residual_norm, x_prev)``; ``grad`` is
    ∇_{x_i}‖y − A x̂_0‖² per sample.
    """
    ac, ts, x, sigma_y = _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps, x_T,
                                generator, len(alphas_cumprod))
    zeta = check_positive(zeta, "zeta", allow_zero=True)
    if loss is not None:
        check_callable(loss, "loss", "loss(x0_hat) -> (B,)")
    for i, t in enumerate(_bar(ts, progress, "DPS")):
        a, a_prev = _alphas(ac, ts, i)
        x = x.detach()
        need_grad = zeta > 0 or callback is not None
        with torch.enable_grad() if need_grad else torch.no_grad():
            if need_grad:
                x.requires_grad_(True)
            eps = eps_model(x, batch_timesteps(t, x))
            x0 = predict_x0(x, eps, a)                                # Tweedie, Algorithm 2 line 4
            sq = loss(x0) if loss is not None else \
                (y - operator.A(x0)).flatten(1).pow(2).sum(1)        # ‖y − A(x̂_0)‖² per sample
            grad = torch.autograd.grad(sq.sum(), x)[0] if need_grad else None
        x, eps, x0, sq = x.detach(), eps.detach(), x0.detach(), sq.detach()
        with torch.no_grad():
            mean, var = _posterior(x, _clip(x0, clip_x0), a, a_prev)  # line 6
            z = _randn(x, generator) if var > 0 else None
            x_new = mean + var ** 0.5 * z if z is not None else mean
            norm = sq.clamp_min(0).sqrt()
            if zeta > 0:
                step = zeta / norm.clamp_min(1e-12) if normalize else torch.full_like(norm, zeta)
                x_new = x_new - step.reshape(-1, *([1] * (x.ndim - 1))) * grad  # line 7
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=x0, eps=eps, noise=z, grad=grad,
                          residual_norm=norm, x_prev=x_new))
        x = x_new
    return x


# ---------------------------------------------------------------------------------- ADIR
def poisson_weights(y: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """Λ for Poisson-like noise: [Λ]_ii = 1/(2 y_i), the same index i as the residual's entry
    (the slide's 1/2y_j has a stray j; DPS, Chung et al. 2023, eq 17). ``floor`` bounds y_i away
    from 0. With it ‖y − λ‖²_Λ is the second-order expansion of the Poisson negative
    log-likelihood around λ = y."""
    return 1.0 / (2 * y.clamp_min(floor))


def adir(eps_model: Callable, operator, y: torch.Tensor, sigma_y: float = 0.0, *,
         alphas_cumprod, timesteps=None, x_T=None, generator=None, progress: bool = True,
         callback: Callable | None = None, scale: float = 1.0, weights=None,
         clip_x0: float | None = None) -> torch.Tensor:
    """ADIR's guided sampler (Abu-Hussein et al. 2022, Algorithm 1; Zhu's slides, *ADIR*):

        μ̂ = (x_t − (1−α_t)/√(1−ᾱ_t) ε̂)/√α_t,            Σ̂ = β̃_t (fixed; the model has no Σ_θ)
        y_t = √ᾱ_t y + √(1−ᾱ_t) A ε̂                         (the measurement noised like x_t)
        g = −2 Aᵀ Λ (A μ̂ − y_t)  = ∇_x −‖A x − y_t‖²_Λ at x = μ̂
        x_{t−1} ~ N(μ̂ + s Σ̂ g, Σ̂).

    ``scale`` is s; ``weights`` is Λ: None (Λ = I, Gaussian noise), ``"poisson"``
    (:func:`poisson_weights`), or a tensor broadcastable to y (Λ = 0 is the unguided sampler).
    The adaptation stage (retrieve K images near y, fine-tune the model on them) is not here.
    The callback gets ``dict(i, t, x, x0_hat, eps, noise, mu, y_t, g, x_prev)``.
    """
    ac, ts, x, sigma_y = _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps, x_T,
                                generator, 100)
    scale = check_finite(scale, "scale")
    if weights is None:
        lam = torch.ones_like(y)
    elif isinstance(weights, str):
        if weights != "poisson":
            raise ValueError(f"weights must be None, 'poisson' or a tensor, got {weights!r}")
        lam = poisson_weights(y)
    else:
        lam = check_tensor(weights, "weights").to(y.dtype)
        if bool((lam < 0).any()):
            raise ValueError("weights (Λ) must be non-negative")
        lam = torch.broadcast_to(lam, y.shape)
    for i, t in enumerate(_bar(ts, progress, "ADIR")):
        a, a_prev = _alphas(ac, ts, i)
        with torch.no_grad():
            eps = eps_model(x, batch_timesteps(t, x))                # line 3
            x0 = _clip(predict_x0(x, eps, a), clip_x0)
            mu, var = _posterior(x, x0, a, a_prev)                   # line 4 (= μ̃(x_t, x̂_0))
            y_t = a ** 0.5 * y + (1 - a) ** 0.5 * operator.A(eps)    # line 5
            g = -2 * operator.A_T(lam * (operator.A(mu) - y_t))      # line 6
            z = _randn(x, generator) if var > 0 else None
            x_new = mu + scale * var * g                             # line 7
            if z is not None:
                x_new = x_new + var ** 0.5 * z
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=x0, eps=eps, noise=z, mu=mu, y_t=y_t, g=g,
                          x_prev=x_new))
        x = x_new
    return x


# ---------------------------------------------------------------------------------- sketch
def sketch_guidance(eps_model: Callable, operator, y: torch.Tensor, sigma_y: float = 0.0, *,
                    alphas_cumprod, timesteps=None, x_T=None, generator=None,
                    progress: bool = True, callback: Callable | None = None,
                    predictor=None, unet=None, scale: float = 1.0,
                    guide_until: float = 0.5) -> torch.Tensor:
    """Sketch-guided sampling (Voynov et al. 2022, §3.2 and eq 3; Zhu's slides, *Sketch-Guided
    Text-to-Image Diffusion Models*): with the latent edge predictor E on the UNet's features,

        L(x_t) = ‖E(features(x_t), t) − e‖²,   x̃_{t−1} = x_{t−1} − α ∇_{x_t} L,
        α = s · ‖x_t − x_{t−1}‖ / ‖∇_{x_t} L‖                  (the paper's normalisation),

    applied while t ≥ (1 − guide_until)·T (the paper guides the first half of the steps).
    ``y`` is the target edge map e (B, 1, H, W) in [0, 1]; ``operator`` is unused (None);
    ``predictor`` is a :class:`diffnotes.restoration.sketch.EdgePredictor` and ``unet`` the
    diffusers UNet2DModel whose features it reads (``eps_model`` must be that UNet's ε).
    ``scale`` = 0 is the unguided sampler. The callback gets
    ``dict(i, t, x, x0_hat, eps, noise, loss, x_prev)``.
    """
    from .sketch import edge_loss_and_eps

    if predictor is None or unet is None:
        raise ValueError("sketch_guidance needs predictor= (an EdgePredictor) and unet= (the "
                         "UNet2DModel it reads)")
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    y = check_tensor(y, "y", ndim=4)
    ac = _check_ac(alphas_cumprod)
    T = len(ac)
    ts = default_timesteps(T, 100) if timesteps is None else check_decreasing(timesteps, T)
    if x_T is None:
        shape = (y.shape[0], unet.config.in_channels, *y.shape[2:])
        x_T = torch.randn(shape, generator=generator, dtype=y.dtype)
    x = check_tensor(x_T, "x_T")
    scale = check_positive(scale, "scale", allow_zero=True)
    guide_until = check_range(guide_until, "guide_until", 0.0, 1.0)
    for i, t in enumerate(_bar(ts, progress, "Sketch")):
        a, a_prev = _alphas(ac, ts, i)
        guided = scale > 0 and t >= (1 - guide_until) * T
        x = x.detach()
        if guided:
            with torch.enable_grad():
                x.requires_grad_(True)
                L, eps = edge_loss_and_eps(predictor, unet, x, t, y)
                grad = torch.autograd.grad(L.sum(), x)[0]
            eps = eps.detach()
            x = x.detach()
        else:
            with torch.no_grad():
                eps = eps_model(x, batch_timesteps(t, x))
            L, grad = None, None
        with torch.no_grad():
            x_new, x0, z = _ancestral(x, eps, a, a_prev, generator)
            if guided:
                dims = tuple(range(1, x.ndim))
                gn = grad.pow(2).sum(dims, keepdim=True).sqrt().clamp_min(1e-12)
                dn = (x - x_new).pow(2).sum(dims, keepdim=True).sqrt()
                x_new = x_new - scale * dn / gn * grad                # eq 3, normalised α
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=x0, eps=eps, noise=z,
                          loss=None if L is None else L.detach(), x_prev=x_new))
        x = x_new
    return x


# ---------------------------------------------------------------------------------- evaluation
EVAL_CONFIGS = {
    "ilvr": dict(fn=ilvr, kwargs=dict(scale=1.0, clip_x0=1.0), steps=50,
                 note="a = 1 (the paper's sampler), φ_N = A⁺A, conditioned at every step; 50 steps; "
                      "x̂_0 clipped to [-1, 1] as the official code (guided-diffusion's clip_denoised) does"),
    "repaint": dict(fn=repaint, kwargs=dict(jump_length=5, jump_n_sample=3, clip_x0=1.0), steps=50,
                    note="50-step grid, jump length 5, 3 resamplings, 140 model calls (the paper: "
                         "250 steps, j = r = 10, 2410 calls); the known region is A⁺A's range; "
                         "x̂_0 clipped to [-1, 1] as the official code does"),
    "dps": dict(fn=dps, kwargs=dict(zeta=1.0, clip_x0=1.0), steps=50,
                note="ζ' = 1 normalised by ‖y − A x̂_0‖ (the paper's), 50 steps instead of the "
                     "paper's 1000 (backpropagation through the UNet at every step); the sampler's "
                     "x̂_0 clipped to [-1, 1] as the official code does"),
    "adir": dict(fn=adir, kwargs=dict(scale=1.0, clip_x0=1.0), steps=50,
                 note="s = 1, Λ = I, Σ̂ = β̃_t (s Σ̂ must stay below 1/(2‖A‖²) or the step "
                      "diverges); no adaptation stage; 50 steps; x̂_0 clipped to [-1, 1]"),
}
