"""SDEdit: edit an image by noising it part of the way and denoising it under a prompt.

Meng et al. 2022 (SDEdit), as written in the controlled-generation blog, §4.1.1: the guide
x⁽ᵍ⁾ (here the VAE latent of the input image) is noised to an intermediate level t₀,

    x_{t₀} = √ᾱ_{t₀} x⁽ᵍ⁾ + √(1 − ᾱ_{t₀}) ε     (the blog's VP initialisation; Ho et al. eq 4)

with :func:`diffnotes.ddpm.q_sample`, and the reverse process is run from t₀ to 0 — here the
library's deterministic DDIM step (:func:`diffnotes.ddim.ddim_step`, Ahmad's notes eq 1.21; DDIM
eq 12) under the prompt with classifier-free guidance. Small t₀ stays faithful to the input,
large t₀ gives the model freedom (realism); t₀ = strength·T.

The masked variant (the blog's "masked SDEdit", the second §4.1.1; SDEdit's Algorithm 3)
regenerates only the region Ω = ``mask``: after every step, the latent outside Ω is replaced by
the original forward-noised to that step's level, with a fresh noise draw per step as in the
SDEdit paper (the blog uses one symbol ε for both branches):

    x_{t'} ← Ω ⊙ x_{t'} + (1 − Ω) ⊙ (√ᾱ_{t'} x⁽ᵍ⁾ + √(1 − ᾱ_{t'}) ε'),

so at the end (ᾱ = 1) the latent outside Ω is the input's latent exactly.

The core, :func:`sdedit_sample`, takes any ``eps_model(x, t)`` and any tensor x₀: the VAE latent
of :func:`sdedit`, or pixels (the pixel-space shapes model of the restoration chapter). Its
optional ``data_step`` hook, applied after every denoising step, turns it into CCDF
(:func:`diffnotes.restoration.conditional.ccdf`; Zhu's slides, *Come-Closer-Diffuse-Faster*).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..ddim import ddim_step
from ..ddpm import _check_alphas_cumprod, predict_x0, q_sample
from ..utils import (batch_timesteps, check_callable, check_decreasing, check_finite,
                     check_range, check_same_shape, check_tensor)
from .common import (blend_known, edit_outputs, encode_prompts, pipe_alphas_cumprod,
                     pipe_eps_model, pipe_timesteps)

__all__ = ["sdedit", "sdedit_sample", "strength_timestep", "sdedit_timesteps", "latent_mask",
           "blend_known", "to_pil_list"]


def strength_timestep(strength, T: int, name: str = "strength") -> int:
    """The 0-based time-step index t₀ of a noise strength s ∈ (0, 1]: t₀ = ⌈s·T⌉ − 1.

    SDEdit's t₀ = s·T in the 1-based time of the papers (t = 1 … T), i.e. index ⌈s·T⌉ − 1 into
    ``alphas_cumprod``: s = 1 is the last index T − 1 (pure noise for SD's schedule), s = 0.5 with
    T = 1000 is index 499, and any s ≤ 1/T is index 0 (the least noise the schedule has).
    """
    s = check_range(strength, name, 0.0, 1.0, lo_open=True)
    return min(max(math.ceil(s * T - 1e-9) - 1, 0), T - 1)


def sdedit_timesteps(pipe, strength, num_inference_steps: int = 50) -> list[int]:
    """The DDIM time steps SDEdit runs: t₀ = :func:`strength_timestep`, then the pipeline's
    grid for ``num_inference_steps`` steps (:func:`diffnotes.editing.common.pipe_timesteps`)
    below t₀ — high to low. Strength 1 with a grid that starts at T − 1 runs the whole grid."""
    T = len(pipe_alphas_cumprod(pipe))
    t0 = strength_timestep(strength, T)
    return [t0] + [t for t in pipe_timesteps(pipe, num_inference_steps) if t < t0]


def latent_mask(pipe, mask, latents: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A binary (1, 1, h, w) mask on ``latents``' grid (1 = editable) from ``mask``.

    ``mask``: a tensor or array with values in [0, 1] (bool allowed), shaped (h, w), (1, h, w)
    or (1, 1, h, w) at the latent resolution, or (H, W), (1, H, W), (1, 1, H, W) at the image
    resolution H = h·vae_scale_factor. It is binarised at 0.5; an image-resolution mask is then
    max-pooled to the latent grid (a latent pixel is editable if any of its image pixels is).
    Raises ``ValueError`` naming ``name`` for a wrong shape or value range.
    """
    h, w = latents.shape[-2:]
    f = int(getattr(pipe, "vae_scale_factor", 8))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    check_tensor(mask, name)
    m = mask
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2 or tuple(m.shape) not in ((h, w), (h * f, w * f)):
        raise ValueError(f"{name} must have shape (h, w) = {(h, w)} (latent resolution) or "
                         f"(H, W) = {(h * f, w * f)} (image resolution), optionally with leading "
                         f"1-sized batch/channel axes, got shape {tuple(mask.shape)}")
    m = m.to(torch.float64)
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise ValueError(f"{name} must hold values in [0, 1] (1 = edit), got values in "
                         f"[{float(m.min()):g}, {float(m.max()):g}]")
    m = (m >= 0.5).to(torch.float64)[None, None]
    if m.shape[-2:] != (h, w):
        m = torch.nn.functional.max_pool2d(m, kernel_size=f)
    return m.to(device=latents.device, dtype=latents.dtype)


def to_pil_list(images: torch.Tensor) -> list:
    """(B, 3, H, W) images in [0, 1] (what :func:`~diffnotes.editing.inversion.decode_latents`
    returns) as a list of PIL images."""
    from ..utils import to_pil
    return [to_pil(2 * x - 1) for x in images]


def _randn(shape, generator, like: torch.Tensor) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=dev).to(like.device)


def sdedit_sample(eps_model, x0: torch.Tensor, timesteps, alphas_cumprod: torch.Tensor, *,
                  mask: torch.Tensor | None = None, eta: float = 0.0,
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                  data_step: Callable | None = None, clip_sample: bool = False,
                  return_trajectory: bool = False, callback: Callable[[dict], None] | None = None):
    """SDEdit's core on any tensor (latents or pixels): forward-noise the guide x₀ to
    t₀ = ``timesteps[0]``, x_{t₀} = √ᾱ_{t₀} x₀ + √(1−ᾱ_{t₀}) ε (the controlled-generation blog,
    §4.1.1, VP initialisation; Ho et al. 2020, eq 4; :func:`diffnotes.ddpm.q_sample`), then run the
    generalized DDIM step (Ahmad's notes, eq 1.21; DDIM eq 12; η = ``eta``, η = 0 deterministic,
    η = 1 the DDPM posterior variance) along ``timesteps`` to a clean sample (ᾱ = 1 after the last).

    After each step i (its target level t' = ``timesteps[i+1]``, or clean after the last):

    1. with ``mask`` Ω (1 = regenerate, broadcast against x₀): x ← Ω ⊙ x + (1 − Ω) ⊙ known, known
       = x₀ forward-noised to t' with a fresh ε' (SDEdit's Algorithm 3; x₀ itself at the end);
    2. with ``data_step``: x ← ``data_step(x, i, t_prev)`` with t_prev = t' (``None`` for the
       clean end): CCDF's data-consistency mapping (Chung et al. 2022, Algorithm 1).

    ``generator`` draws, in this order: the initial ε (unless ``noise`` is given), then per step
    the DDIM noise (when η > 0), then the mask's ε' (when a mask is given and t' is not the
    end); ``data_step`` may draw from it too. ``callback`` as in
    :func:`diffnotes.ddim.ddim_sample`. ``clip_sample`` clips x̂₀ to [−1, 1] in each step.
    Returns x₀ of the edit, or ``(x, [x_{t₀}, …, x])`` with ``return_trajectory=True``.
    Raises ``ValueError``/``TypeError`` naming a bad argument.
    """
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    x0 = check_tensor(x0, "x0")
    ac = _check_alphas_cumprod(alphas_cumprod)
    ts = check_decreasing(timesteps, len(ac))
    eta = check_finite(eta, "eta")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if data_step is not None:
        check_callable(data_step, "data_step", "data_step(x, i, t_prev)")
    if noise is None:
        noise = _randn(x0.shape, generator, x0)
    check_same_shape(x0, check_tensor(noise, "noise"), "x0", "noise")
    acl = ac.tolist()
    x = q_sample(x0, ts[0], ac, noise)                                   # x_{t₀}, blog §4.1.1
    traj = [x]
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else None
        a_prev = acl[t_prev] if t_prev is not None else 1.0
        with torch.no_grad():
            eps = eps_model(x, batch_timesteps(t, x))
        if callback is not None:
            x0_hat = predict_x0(x, eps, acl[t])
            callback(dict(i=i, t=t, x=x, x0_hat=x0_hat.clamp(-1, 1) if clip_sample else x0_hat,
                          eps=eps))
        z = _randn(x.shape, generator, x) if eta > 0 else None
        x = ddim_step(x, eps, acl[t], a_prev, eta, z, clip_sample=clip_sample)   # eq 1.21
        if mask is not None:                                              # SDEdit Algorithm 3
            known = (q_sample(x0, t_prev, ac, _randn(x0.shape, generator, x0))
                     if t_prev is not None else x0)
            x = blend_known(x, known, mask)
        if data_step is not None:                                         # CCDF, Algorithm 1
            x = data_step(x, i, t_prev)
        if return_trajectory:
            traj.append(x)
    return (x, traj) if return_trajectory else x


def sdedit(pipe, image, prompt: str, strength, mask=None, *, num_inference_steps: int = 50,
           guidance_scale: float = 7.5, generator: torch.Generator | None = None,
           return_latents: bool = False, return_trajectory: bool = False,
           callback: Callable[[dict], None] | None = None):
    """SDEdit (Meng et al. 2022; the controlled-generation blog, §4.1.1): noise the image's latent
    to t₀ = strength·T with :func:`diffnotes.ddpm.q_sample` (the blog's VP initialisation), then
    run DDIM (η = 0, :func:`diffnotes.ddim.ddim_step`, DDIM eq 12) from t₀ to a clean latent
    under ``prompt`` with classifier-free guidance ``guidance_scale``.

    Parameters
    ----------
    image : what :func:`diffnotes.editing.inversion.encode_image` accepts (it checks the size,
        rank and value range). One image.
    strength : the noise level s ∈ (0, 1]; t₀ = :func:`strength_timestep` (⌈s·T⌉ − 1, 0-based),
        and the steps are t₀ followed by the pipeline's ``num_inference_steps`` grid below t₀
        (:func:`sdedit_timesteps`).
    mask : None (edit everything) or the editable region Ω (see :func:`latent_mask`: latent or
        image resolution, values in [0, 1]). Outside Ω, after every step the latent is replaced
        by the original forward-noised to the new level (a fresh draw from ``generator`` each
        step), and at the end by the original latent itself.
    generator : the source of every noise draw, in this order: the initial ε (latent shape),
        then, with a mask, one ε' per step whose target level is not the clean end.
    return_latents / return_trajectory : also return the final latent / the latents
        [x_{t₀}, …, x_0] after each step's blend.
    callback : called once per step before the step with ``dict(i=, t=, x=, x0_hat=, eps=)``
        (as :func:`diffnotes.ddim.ddim_sample`'s).

    Returns ``images`` (a list of PIL images), or ``(images, latents)`` /
    ``(images, latents, trajectory)`` as requested.
    Raises ``ValueError`` naming ``strength`` outside (0, 1], a ``mask`` of the wrong shape or
    range, or a bad ``image``.
    """
    from .inversion import decode_latents, encode_image

    strength = check_range(strength, "strength", 0.0, 1.0, lo_open=True)
    ts = sdedit_timesteps(pipe, strength, num_inference_steps)
    z0 = encode_image(pipe, image)
    m = None if mask is None else latent_mask(pipe, mask, z0)
    ac = pipe_alphas_cumprod(pipe, dtype=torch.float64)
    eps_model = pipe_eps_model(pipe, encode_prompts(pipe, prompt), guidance_scale=guidance_scale)
    z, traj = sdedit_sample(eps_model, z0, ts, ac, mask=m, generator=generator,
                            return_trajectory=True, callback=callback)
    return edit_outputs(to_pil_list(decode_latents(pipe, z)), z, traj, return_latents,
                        return_trajectory)
