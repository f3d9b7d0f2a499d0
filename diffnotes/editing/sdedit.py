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
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..ddim import ddim_sample
from ..ddpm import q_sample
from ..utils import check_range, check_tensor
from .common import (blend_known, edit_outputs, encode_prompts, masked_ddim_sample,
                     pipe_alphas_cumprod, pipe_eps_model, pipe_timesteps)

__all__ = ["sdedit", "strength_timestep", "sdedit_timesteps", "latent_mask", "blend_known",
           "to_pil_list"]


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
    x = q_sample(z0, ts[0], ac, _randn(z0.shape, generator, z0))     # x_{t₀}, blog §4.1.1
    if m is None:
        out = ddim_sample(eps_model, x, ts, ac, return_trajectory=return_trajectory,
                          callback=callback)
        z, traj = out if return_trajectory else (out, None)
    else:
        def known(i):          # the original, forward-noised to the level step i reached
            return (q_sample(z0, ts[i + 1], ac, _randn(z0.shape, generator, z0))
                    if i + 1 < len(ts) else z0)
        z, traj = masked_ddim_sample(eps_model, x, ts, ac, m, known, callback)
    return edit_outputs(to_pil_list(decode_latents(pipe, z)), z, traj, return_latents,
                        return_trajectory)
