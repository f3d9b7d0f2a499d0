"""What every editing method needs from a pipeline: prompt embeddings, the guided ε-model, the
time steps and ᾱ of its scheduler, and the latent ↔ image maps of its autoencoder.

A pipeline's UNet becomes the library's ``eps_model(x, t)`` through
:func:`diffnotes.guidance.guided_eps_model` (one batched pass for the unconditional and the
conditional rows, combined by :func:`diffnotes.guidance.cfg`, Ahmad's notes eq 1.44), so the
samplers of :mod:`diffnotes.ddim` drive Stable Diffusion exactly as they drive the toy models.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..ddim import ddim_step
from ..ddpm import predict_x0
from ..guidance import guided_eps_model
from ..utils import batch_timesteps, check_int, check_tensor

__all__ = ["fraction_steps", "encode_prompts", "unet_model", "pipe_eps_model", "pipe_timesteps",
           "pipe_alphas_cumprod", "blend_known", "masked_ddim_sample", "edit_outputs"]


def fraction_steps(frac: float, num_steps: int) -> int:
    """The number of steps a fraction of the schedule covers, ⌊frac · N⌋, robust to rounding
    (0.7 · 10 = 7.000000000000001 gives 7): how every editing method turns "the first 80% of the
    steps" into a step count."""
    return int(math.floor(frac * num_steps + 1e-9))


def encode_prompts(pipe, prompts: str | Sequence[str]) -> torch.Tensor:
    """Text-encoder embeddings ``(B, L, D)`` of ``prompts`` (``""`` is the null text), padded to
    the tokenizer's ``model_max_length`` as the pipeline pads them, on the UNet's device/dtype."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    device = pipe.text_encoder.device
    with torch.no_grad():
        emb = pipe.text_encoder(tok.input_ids.to(device))[0]
    return emb.to(pipe.unet.device, pipe.unet.dtype)


def unet_model(pipe):
    """``model(x, t, c) -> ε``: the pipeline's UNet with text embeddings ``c`` (B, L, D)."""
    unet = pipe.unet

    def model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=c).sample
    return model


def pipe_eps_model(pipe, cond: torch.Tensor, null: torch.Tensor | None = None,
                   guidance_scale: float = 1.0):
    """The guided ``eps_model(x, t)`` of a pipeline: ε_u + s (ε_c − ε_u) with ``cond`` and
    ``null`` embeddings (batch 1 or B each). With ``guidance_scale == 1`` and no ``null`` it is
    the conditional model alone (one UNet pass per step)."""
    check_tensor(cond, "cond", ndim=3)
    model = unet_model(pipe)
    if null is None and guidance_scale == 1.0:
        def eps_model(x, t):
            c = cond.expand(x.shape[0], -1, -1) if cond.shape[0] == 1 else cond
            return model(x, t, c)
        return eps_model
    if null is None:
        null = encode_prompts(pipe, "")
    return guided_eps_model(model, cond, null, guidance_scale)


def pipe_timesteps(pipe, num_inference_steps: int) -> list[int]:
    """The pipeline scheduler's time steps for ``num_inference_steps`` steps, high to low (the
    ones ``pipe(...)`` would use), as a list of ints for :mod:`diffnotes.ddim`."""
    check_int(num_inference_steps, "num_inference_steps", min=1)
    pipe.scheduler.set_timesteps(num_inference_steps)
    return [int(t) for t in pipe.scheduler.timesteps]


def pipe_alphas_cumprod(pipe, dtype=torch.float64) -> torch.Tensor:
    """ᾱ_t of the pipeline's training schedule (index t = 0 … T−1), float64 by default."""
    return pipe.scheduler.alphas_cumprod.to(dtype)


def blend_known(x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Ω ⊙ x + (1 − Ω) ⊙ known: keep the model's latent inside the mask, the known one outside
    (masked SDEdit, SDEdit Algorithm 3; DiffEdit's ỹ_t = M y_t + (1 − M) x_t, Couairon et al.
    2023, §3.2). With a binary mask the result is ``x`` or ``known`` exactly, pixel by pixel."""
    return mask * x + (1 - mask) * known


def masked_ddim_sample(eps_model, x: torch.Tensor, timesteps: Sequence[int],
                       alphas_cumprod: torch.Tensor, mask: torch.Tensor, known, callback=None):
    """DDIM (η = 0, DDIM eq 12) from ``x`` along ``timesteps`` with a known region: after step
    i the latent outside ``mask`` (1 = generated) is replaced by ``known(i)``, the known latent
    at the level that step reached (x ← m·x + (1 − m)·known). Masked SDEdit (known = the
    forward-noised original) and DiffEdit (known = the DDIM-inverted latent) are this loop.
    ``callback`` as in :func:`diffnotes.ddim.ddim_sample`. Returns ``(x_0, [x, …, x_0])``."""
    acl, traj = alphas_cumprod.tolist(), [x]
    for i, t in enumerate(timesteps):
        a_prev = acl[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        with torch.no_grad():
            eps = eps_model(x, batch_timesteps(t, x))
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=predict_x0(x, eps, acl[t]), eps=eps))
        x = ddim_step(x, eps, acl[t], a_prev)
        x = blend_known(x, known(i), mask)
        traj.append(x)
    return x, traj


def edit_outputs(images, z, traj, return_latents: bool, return_trajectory: bool):
    """``images``, or ``(images, z)`` / ``(images, z, traj)`` as the edit functions return."""
    if return_trajectory:
        return images, z, traj
    return (images, z) if return_latents else images
