"""DiffEdit: an automatic edit mask from two prompts, then masked DDIM from the inverted latent.

Couairon et al. 2023 (DiffEdit); Ahmad's notes §3.2.2 (eq 3.5 and its algorithm); the
controlled-generation blog, §4.3.

**Step 1, the mask.** Noise the image's latent x₀ to the encoding strength r (n independent
draws, :func:`diffnotes.ddpm.q_sample`), predict the noise under the source and the target
prompt (with classifier-free guidance), and average |ε_target − ε_source| (Ahmad's notes eq 3.5)
over the n draws and the latent channels. The paper then "removes extreme values", rescales to
[0, 1] and binarises at 0.5; as in diffusers' ``StableDiffusionDiffEditPipeline.generate_mask``
(the reference implementation) the extreme values are removed by clamping the map to
[0, ρ·mean] with ρ = ``threshold_ratio`` = 3, the rescaling divides by ρ·mean, and the
threshold is 0.5 — so a pixel is in the mask when its difference exceeds ρ/2 = 1.5 times the
mean difference. This is not the min–max rescaling that Ahmad's notes (§3.2.2, step 3) and the
blog (§4.3.2, "Normalize") describe: min–max thresholds at the midpoint between the smallest and
the largest difference (so one outlier pixel decides the mask); the clamp rule is relative to
the mean (``minmax_mask`` computes the notes' version for comparison).

**Step 2, the edit.** DDIM-encode x₀ (:func:`diffnotes.editing.inversion.ddim_invert_image`,
by default under the null text, the paper's "unconditional" encoding) up to the level r =
``inpaint_strength``, then run DDIM under the target prompt; after every step the latent outside
the mask is replaced by the encoded latent at the same level (Couairon et al. §3.2:
ỹ_t = M y_t + (1 − M) x_t), and after the last step by x₀ itself. With an all-zero mask the
result is therefore the input latent x₀ exactly (bitwise); with an all-one mask it is plain
DDIM from the encoded latent under the target prompt.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ddpm import q_sample
from ..utils import batch_timesteps, check_int, check_positive, check_range
from .common import (edit_outputs, encode_prompts, masked_ddim_sample, pipe_alphas_cumprod,
                     pipe_eps_model, pipe_timesteps)
from .sdedit import _randn, latent_mask, strength_timestep, to_pil_list

__all__ = ["diffedit_mask", "diffedit", "diffedit_map", "threshold_map", "minmax_mask"]


def threshold_map(diff_map: torch.Tensor, threshold_ratio: float = 3.0) -> torch.Tensor:
    """DiffEdit's binarisation as in diffusers' reference implementation: clamp the map to
    [0, ρ·mean], divide by ρ·mean, keep the pixels > 0.5 (a float 0/1 tensor of the map's
    shape). A map that is zero everywhere gives an empty mask."""
    cap = diff_map.mean() * threshold_ratio
    if float(cap) <= 0:
        return torch.zeros_like(diff_map)
    return (diff_map.clamp(0, cap) / cap > 0.5).to(diff_map.dtype)


def minmax_mask(diff_map: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The rule of Ahmad's notes (§3.2.2, steps 3–4) and the blog (§4.3.2): rescale the map to
    [0, 1] by min–max and keep the pixels > ``threshold``. A constant map gives an empty mask
    (the 0/0 is guarded). For comparison with :func:`threshold_map`."""
    lo, hi = diff_map.min(), diff_map.max()
    if float(hi - lo) <= 0:
        return torch.zeros_like(diff_map)
    return ((diff_map - lo) / (hi - lo) > threshold).to(diff_map.dtype)


def diffedit_map(pipe, image, source_prompt: str, target_prompt: str, num_maps: int = 10,
                 encode_strength=0.5, generator: torch.Generator | None = None, *,
                 guidance_scale: float = 7.5) -> torch.Tensor:
    """The averaged noise-difference map (h, w) of DiffEdit (before clamping and thresholding):
    mean over ``num_maps`` noisings at t = :func:`~diffnotes.editing.sdedit.strength_timestep`
    (``encode_strength``) and over the latent channels of |ε_θ(x_t, t, target) −
    ε_θ(x_t, t, source)| (Ahmad's notes eq 3.5), each ε guided by ``guidance_scale`` against the
    null text. The n noises are one draw of shape (n, C, h, w) from ``generator``."""
    from .inversion import encode_image

    n = check_int(num_maps, "num_maps", min=1)
    z0 = encode_image(pipe, image)
    if z0.shape[0] != 1:
        raise ValueError(f"image must be one image, got a batch of {z0.shape[0]}")
    ac = pipe_alphas_cumprod(pipe, dtype=torch.float64)
    t = strength_timestep(encode_strength, len(ac), "encode_strength")
    x = q_sample(z0.expand(n, -1, -1, -1), t, ac, _randn((n, *z0.shape[1:]), generator, z0))
    emb = encode_prompts(pipe, [source_prompt, target_prompt])
    cond = torch.cat([emb[:1].expand(n, -1, -1), emb[1:].expand(n, -1, -1)])
    eps_model = pipe_eps_model(pipe, cond, encode_prompts(pipe, ""), guidance_scale)
    xx = torch.cat([x, x])
    with torch.no_grad():
        eps = eps_model(xx, batch_timesteps(t, xx))
    return (eps[n:] - eps[:n]).abs().mean(dim=(0, 1))


def diffedit_mask(pipe, image, source_prompt: str, target_prompt: str, num_maps: int = 10,
                  encode_strength=0.5, threshold_ratio=3.0,
                  generator: torch.Generator | None = None, *, guidance_scale: float = 7.5,
                  return_map: bool = False):
    """DiffEdit's automatic mask (Couairon et al. 2023, §3.1; Ahmad's notes §3.2.2, eq 3.5).

    :func:`diffedit_map` (|ε_target − ε_source| averaged over ``num_maps`` noisings at
    ``encode_strength`` and the channels), then :func:`threshold_map`: clamped to
    [0, ``threshold_ratio``·mean], rescaled by that cap, binarised at 0.5 (the paper's
    "remove extreme values, rescale to [0, 1], threshold 0.5", as diffusers implements it).

    Returns the mask as a float (h, w) tensor of 0s and 1s at the latent resolution (what
    :func:`diffedit` and :func:`diffnotes.editing.sdedit.sdedit` accept), and the map too with
    ``return_map=True``. Equal prompts give an empty mask.
    Raises ``ValueError`` naming ``encode_strength`` outside (0, 1], ``num_maps`` < 1 or
    ``threshold_ratio`` ≤ 0.
    """
    check_range(encode_strength, "encode_strength", 0.0, 1.0, lo_open=True)
    check_int(num_maps, "num_maps", min=1)
    ratio = check_positive(threshold_ratio, "threshold_ratio")
    d = diffedit_map(pipe, image, source_prompt, target_prompt, num_maps, encode_strength,
                     generator, guidance_scale=guidance_scale)
    m = threshold_map(d, ratio)
    return (m, d) if return_map else m


def diffedit(pipe, image, mask, target_prompt: str, inpaint_strength=0.8, *,
             source_prompt: str = "", num_inference_steps: int = 50, guidance_scale: float = 7.5,
             generator: torch.Generator | None = None, return_latents: bool = False,
             return_trajectory: bool = False, callback: Callable[[dict], None] | None = None):
    """DiffEdit's edit (Couairon et al. 2023, §3.2; Ahmad's notes §3.2.2, steps 5–7; the blog,
    §4.3.3): DDIM-encode the image with :func:`diffnotes.editing.inversion.ddim_invert_image`
    (under ``source_prompt``, default the null text as in the paper, guidance 1) along the
    pipeline's ``num_inference_steps`` grid, start from the encoded latent after
    k = ⌊num_inference_steps · inpaint_strength⌋ steps (as diffusers counts them; at least 1),
    and run the k DDIM steps (:func:`diffnotes.ddim.ddim_step`, DDIM eq 12) back under
    ``target_prompt`` with guidance ``guidance_scale``. After each step the latent outside
    ``mask`` (1 = edit; :func:`~diffnotes.editing.sdedit.latent_mask`) is replaced by the
    encoded latent at the level just reached — after the last step, by the input latent z₀.

    Hence an all-zero mask returns z₀ = ``encode_image(pipe, image)`` exactly (the stored first
    entry of the inversion trajectory, not a DDIM reconstruction of it), and an all-one mask is
    ``ddim_sample`` from the encoded latent under the target prompt.
    ``generator`` is accepted for symmetry; nothing here is random (η = 0).

    Returns ``images`` (a list of PIL images), or ``(images, latents)`` /
    ``(images, latents, trajectory)`` as requested.
    """
    from .inversion import ddim_invert_image, decode_latents

    r = check_range(inpaint_strength, "inpaint_strength", 0.0, 1.0, lo_open=True)
    n = check_int(num_inference_steps, "num_inference_steps", min=1)
    k = max(int(n * r), 1)
    grid = pipe_timesteps(pipe, n)
    inv = ddim_invert_image(pipe, image, source_prompt, num_inference_steps=n,
                            guidance_scale=1.0)
    inv = list(inv)                                # [z_0, z at grid[-1], …, z at grid[0]]
    if len(inv) != n + 1:
        raise RuntimeError(f"ddim_invert_image returned {len(inv)} latents, expected {n + 1}")
    m = latent_mask(pipe, mask, inv[0])
    ts = grid[n - k:]                              # the k levels from the encoded latent down
    ac = pipe_alphas_cumprod(pipe, dtype=torch.float64)
    eps_model = pipe_eps_model(pipe, encode_prompts(pipe, target_prompt),
                               guidance_scale=guidance_scale)
    x, traj = masked_ddim_sample(eps_model, inv[k], ts, ac, m, lambda i: inv[k - 1 - i],
                                 callback)         # known: the encoded latent at the level reached
    return edit_outputs(to_pil_list(decode_latents(pipe, x)), x, traj, return_latents,
                        return_trajectory)
