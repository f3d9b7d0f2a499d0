"""Conditional restoration: SDEdit and CCDF (start part-way, on an initial estimate) and SR3/Palette.

Zhu's slides, *Conditional models*. Two ways to put the measurement y into a diffusion model
other than guiding every step of a sampler that starts from noise:

- **Start from it.** SDEdit (Meng et al. 2022; the controlled-generation blog, §4.1.1) noises a
  guide to t₀ < T and denoises from there. Come-Closer-Diffuse-Faster (CCDF; Chung, Sim & Ye
  2022, Algorithm 1) does the same with an *initial estimate* x̂₀⁽⁰⁾ of the restoration (A⁺y, or
  any regressor's output) and applies a data-consistency mapping after every reverse step. The
  reverse diffusion with that non-expansive mapping is a stochastic contraction (their
  Theorem 1): the error ε₀ = ‖x̂₀⁽⁰⁾ − x‖ of the estimate enters the final error only through
  the factor √ᾱ_{t₀} of the forward noising, times a contraction, so a short run from a small t₀
  suffices (:func:`ccdf`, :func:`sdedit_restore` = CCDF without the data step).
- **Train on it.** SR3 (Saharia et al. 2021) and Palette (Saharia et al. 2022) feed the degraded
  image to the network, concatenated with x_t along the channels, and learn p(x | y) directly
  (:func:`sr3`; the model is in :mod:`.sr3`).

Every function has the restoration package's solver signature.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ddpm import q_sample
from ..editing.sdedit import sdedit_sample, strength_timestep
from ..utils import (check_callable, check_decreasing, check_finite, check_int, check_range,
                     check_tensor)
from .posterior import _check_ac, _randn, default_timesteps

__all__ = ["ccdf", "sdedit_restore", "sr3", "ccdf_timesteps", "data_consistency",
           "initial_estimate", "EVAL_CONFIGS"]


def ccdf_timesteps(T: int, t0: int, timesteps=None, num_steps: int = 100) -> list[int]:
    """The steps CCDF/SDEdit run: t₀, then those of the grid (``timesteps``, default ``num_steps``
    evenly spaced, :func:`~diffnotes.restoration.posterior.default_timesteps`) below t₀. With
    t₀ = T − 1 and a grid that starts there, the whole grid."""
    t0 = check_int(t0, "t0", min=0)
    if t0 >= T:
        raise ValueError(f"t0 must lie in [0, {T - 1}], got {t0}")
    grid = default_timesteps(T, num_steps) if timesteps is None else \
        check_decreasing(timesteps, T, "timesteps")
    return [t0] + [t for t in grid if t < t0]


def initial_estimate(operator, y: torch.Tensor, init=None) -> torch.Tensor:
    """CCDF's x̂₀⁽⁰⁾: ``init`` if it is a tensor, ``init(operator, y)`` if it is callable, else
    the pseudo-inverse A⁺y."""
    if init is None:
        return operator.A_pinv(y)
    if callable(init):
        init = init(operator, y)
    return check_tensor(init, "init")


def data_consistency(operator, y: torch.Tensor, alphas_cumprod: torch.Tensor, generator=None,
                     weight: float = 1.0) -> Callable:
    """CCDF's non-expansive data-consistency mapping (Chung et al. 2022, Algorithm 1, the step
    x_{i−1} = A x'_{i−1} + b; for SR and inpainting their ILVR/RePaint-style projection):

        x ← x + λ A⁺(A k_{t'} − A x),   k_{t'} = √ᾱ_{t'} A⁺y + √(1−ᾱ_{t'}) ε',

    i.e. the part of x in A's row space (P = A⁺A: "downsample then upsample" for average
    pooling, the known pixels for inpainting) is replaced by that of the measurement forward-
    noised to the level t' the step reached (a fresh ε' each step; at the clean end k = A⁺y, so
    A x = y exactly when λ = 1). Noising A⁺y in x-space puts exactly the noise P ε' on the
    measured part, the marginal of x_{t'} there. Returns ``step(x, i, t_prev)`` for
    :func:`diffnotes.editing.sdedit.sdedit_sample`'s ``data_step``.
    """
    lam = check_range(weight, "weight", 0.0, 1.0)
    ref = operator.A_pinv(y)
    ac = alphas_cumprod

    def step(x, i, t_prev):
        if t_prev is None:
            k = ref
        else:
            k = q_sample(ref, t_prev, ac, _randn(ref, generator))           # k_{t'}
        return x + lam * operator.A_pinv(operator.A(k) - operator.A(x))      # x + λ A⁺(A k − A x)

    return step


def _setup(eps_model, operator, y, sigma_y, alphas_cumprod, t0, strength):
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    if not hasattr(operator, "A") or not hasattr(operator, "A_pinv"):
        raise TypeError(f"operator must have A(x) and A_pinv(y) (an Operator from "
                        f"diffnotes.restoration.operators), got {type(operator).__name__}")
    y = check_tensor(y, "y")
    check_range(sigma_y, "sigma_y", 0.0, None)
    ac = _check_ac(alphas_cumprod).to(y.device)
    T = len(ac)
    if t0 is None:
        t0 = strength_timestep(strength, T)
    return y, ac, T, t0


def ccdf(eps_model: Callable, operator, y: torch.Tensor, sigma_y: float = 0.0, *,
         alphas_cumprod, timesteps=None, x_T=None, generator=None, progress: bool = False,
         callback: Callable | None = None, t0: int | None = None, strength: float = 0.3,
         init=None, eta: float = 1.0, weight: float = 1.0, data_step: bool = True,
         clip_sample: bool = False) -> torch.Tensor:
    """Come-Closer-Diffuse-Faster (Zhu's slides, *Come-Closer-Diffuse-Faster*; Chung, Sim & Ye
    2022, Algorithm 1 and eq 8):

        x_{t₀} = √ᾱ_{t₀} x̂₀⁽⁰⁾ + √(1−ᾱ_{t₀}) ε                          (forward diffusion, eq 8)
        x'_{t'} = reverse step from x_t                                 (DDIM/DDPM, η = ``eta``)
        x_{t'} = x'_{t'} + λ A⁺(A k_{t'} − A x'_{t'})                   (data consistency)

    along :func:`ccdf_timesteps` (t₀ and the grid below it: N' = t₀/T of the full sampler's
    steps). t₀ = ``t0``, or ⌈``strength``·T⌉ − 1 (default 0.3). ``init``: the initial estimate
    (a tensor, a callable ``init(operator, y)``, or None for A⁺y). ``x_T``, if given, is the ε of
    the forward diffusion (not a starting point: CCDF starts from the estimate). ``eta`` = 1:
    ancestral DDPM steps on the grid (the stochastic contraction of the paper), 0: DDIM.
    ``data_step=False`` leaves the mapping out: SDEdit (:func:`sdedit_restore`).
    ``weight`` λ ∈ [0, 1]; ``clip_sample`` clips x̂₀ to [−1, 1] in each step.

    Returns the restoration (B, *operator.x_shape). Raises ``ValueError``/``TypeError`` naming a
    bad argument.
    """
    y, ac, T, t0 = _setup(eps_model, operator, y, sigma_y, alphas_cumprod, t0, strength)
    ts = ccdf_timesteps(T, t0, timesteps)
    x_init = initial_estimate(operator, y, init)
    if x_T is not None:
        x_T = check_tensor(x_T, "x_T")
    eta = check_finite(eta, "eta")
    step = data_consistency(operator, y, ac, generator, weight) if data_step else None
    cb = callback
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(ts), desc="CCDF" if data_step else "SDEdit", leave=False)

        def cb(d):
            bar.update(1)
            if callback is not None:
                callback(d)
    out = sdedit_sample(eps_model, x_init, ts, ac, eta=eta, generator=generator, noise=x_T,
                        data_step=step, clip_sample=clip_sample, callback=cb)
    if progress:
        bar.close()
    return out


def sdedit_restore(eps_model: Callable, operator, y: torch.Tensor, sigma_y: float = 0.0, *,
                   alphas_cumprod, timesteps=None, x_T=None, generator=None,
                   progress: bool = False, callback: Callable | None = None,
                   t0: int | None = None, strength: float = 0.3, init=None, eta: float = 1.0,
                   clip_sample: bool = False) -> torch.Tensor:
    """SDEdit as a restoration method (Meng et al. 2022; Zhu's slides, *SDEdit*): the initial
    estimate (A⁺y) forward-noised to t₀ and denoised, with no data step — :func:`ccdf` with
    ``data_step=False``; the measurement enters only through the start."""
    return ccdf(eps_model, operator, y, sigma_y, alphas_cumprod=alphas_cumprod,
                timesteps=timesteps, x_T=x_T, generator=generator, progress=progress,
                callback=callback, t0=t0, strength=strength, init=init, eta=eta,
                data_step=False, clip_sample=clip_sample)


def sr3(eps_model: Callable | None, operator, y: torch.Tensor, sigma_y: float = 0.0, *,
        alphas_cumprod=None, timesteps=None, x_T=None, generator=None, progress: bool = False,
        callback: Callable | None = None, eta: float = 1.0, upsample: str = "bicubic",
        clip_sample: bool = True) -> torch.Tensor:
    """SR3 sampling (Zhu's slides, *Image Super-Resolution via Iterative Refinement*; Saharia
    et al. 2021, Algorithm 2): reverse diffusion of ε_θ(cat[x_t, up(y)], t) from x_T ~ N(0, I),
    here with the generalized DDIM step (Ahmad's notes, eq 1.21; η = 1: ancestral DDPM on the
    grid, the paper's sampler) and x̂₀ clipped to [−1, 1] (the paper's code does).

    ``eps_model``: a conditional ``f(x, t, cond)`` (:func:`diffnotes.restoration.sr3.sr3_eps_model`),
    or None for the shipped model. ``operator`` must be ×4 super-resolution on 32×32 images (the
    model's task; it is used only for its shapes: SR3 never applies A at sampling time).
    ``upsample``: how ``cond`` is made from y (``"bicubic"``, the training condition).
    ``timesteps`` default: 100 evenly spaced. ``alphas_cumprod`` default: the pixel model's.
    """
    from ..ddim import ddim_sample
    from ..models import pixel_shapes as P
    from . import sr3 as S

    if eps_model is None:
        eps_model = S.sr3_eps_model(S.load_sr3())
    check_callable(eps_model, "eps_model", "eps_model(x, t, cond)")
    y = check_tensor(y, "y", ndim=4)
    check_range(sigma_y, "sigma_y", 0.0, None)
    ac = _check_ac(P.alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
    shape = tuple(getattr(operator, "x_shape", ()))
    y_shape = tuple(getattr(operator, "y_shape", ()))
    if len(shape) != 3 or len(y_shape) != 3 or shape[-1] != y_shape[-1] * S.FACTOR:
        raise ValueError(f"operator must be ×{S.FACTOR} super-resolution (x_shape (3, 4h, 4w), "
                         f"y_shape (3, h, w)), got x_shape {shape}, y_shape {y_shape}")
    if tuple(y.shape[1:]) != y_shape:
        raise ValueError(f"y must have shape (B, *{y_shape}), got {tuple(y.shape)}")
    ts = default_timesteps(len(ac), 100) if timesteps is None else \
        check_decreasing(timesteps, len(ac), "timesteps")
    cond = S.condition(y, shape[-1], upsample)
    if x_T is None:
        x_T = _randn(torch.empty((y.shape[0], *shape), dtype=y.dtype, device=y.device), generator)
    x_T = check_tensor(x_T, "x_T")
    f = lambda x, t: eps_model(x, t, cond)  # noqa: E731
    return ddim_sample(f, x_T, ts, ac, eta=eta, generator=generator, progress=progress,
                       callback=callback, clip_sample=clip_sample)


def _sr3_model(eps_model, alphas_cumprod):
    """The evaluation harness's ``model=`` hook: the shipped SR3 network instead of the prior."""
    from . import sr3 as S
    return S.sr3_eps_model(S.load_sr3())


EVAL_CONFIGS = {
    "ccdf": dict(fn=ccdf, kwargs=dict(strength=0.3, eta=1.0), steps=100,
                 note="t₀ = 0.3 T on the 100-step grid (31 model calls), x̂₀⁽⁰⁾ = A⁺y, ancestral "
                      "steps, data consistency x + A⁺(A k_t − A x) after each (no x̂₀ clipping: "
                      "the mixture's data leave [-1, 1])"),
    "sdedit": dict(fn=sdedit_restore, kwargs=dict(strength=0.3, eta=1.0), steps=100,
                   note="CCDF without the data step (the measurement only enters through the "
                        "start A⁺y): the no-data-step baseline"),
    "sr3": dict(fn=sr3, kwargs=dict(eta=1.0), steps=100, tasks=("sr4",), model=_sr3_model,
                note="the shipped ×4 SR3 network (6 input channels: x_t and bicubic-upsampled "
                     "y), 100 ancestral steps, x̂₀ clipped; trained on noiseless pairs"),
}
