"""Dense image features for the recognition chapters: diffusion features and a cheap baseline.

Diffusion features (the theme of the book's recognition part): encode the image with the VAE,
noise the latent to a moderate time step t (``z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps``,
Ahmad's notes, eq 1.38), run the UNet once and keep the output of one or more of its blocks
through forward hooks. A denoiser has to know what is where to remove the noise, so its decoder
activations carry object and part information at the latent's resolution.

Everything takes images as float tensors (B, 3, H, W) in [0, 1] or NumPy arrays (B, H, W, 3) in
[0, 1] (what :func:`diffnotes.data.shapes.generate_scenes` returns).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffnotes.ddpm import q_sample
from diffnotes.utils import batch_timesteps, check_tensor, check_timestep

__all__ = ["as_image_tensor", "diffusion_features", "unet_block_outputs", "random_conv_features",
           "pixel_features"]


def as_image_tensor(images, dtype=torch.float32) -> torch.Tensor:
    """(B, 3, H, W) tensor in [0, 1] from such a tensor or a NumPy (B, H, W, 3) array."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be a (B, H, W, 3) array, got shape {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(dtype)
    check_tensor(images, "images", 4)
    if images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    return images.to(dtype)


def _parts(pipe):
    get = (lambda k: pipe[k]) if isinstance(pipe, dict) else (lambda k: getattr(pipe, k))
    return get("vae"), get("unet"), get("text_encoder"), get("tokenizer"), get("scheduler")


class _Stop(Exception):
    pass


def unet_block_outputs(unet, z_t: torch.Tensor, t, encoder_hidden_states: torch.Tensor,
                       blocks=("up_blocks.0",), stop_early: bool = True) -> list[torch.Tensor]:
    """Run ``unet(z_t, t, encoder_hidden_states)`` once and return the outputs of the named
    submodules (e.g. ``"up_blocks.0"``, ``"mid_block"``) in the order given.

    With ``stop_early`` the forward pass is abandoned (by an exception caught here) as soon as
    every requested block has produced its output, which skips the rest of the decoder."""
    modules = dict(unet.named_modules())
    missing = [b for b in blocks if b not in modules]
    if missing:
        raise ValueError(f"blocks must name submodules of the UNet, unknown: {missing}; e.g. "
                         f"{[n for n in modules if n.count('.') == 1][:8]}")
    store: dict[str, torch.Tensor] = {}
    hooks = []
    for b in blocks:
        def hook(_m, _inp, out, b=b):
            store[b] = out[0] if isinstance(out, tuple) else out
            if stop_early and len(store) == len(set(blocks)):
                raise _Stop  # the rest of the UNet is not needed
        hooks.append(modules[b].register_forward_hook(hook))
    try:
        unet(z_t, t, encoder_hidden_states=encoder_hidden_states)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return [store[b] for b in blocks]


@torch.no_grad()
def diffusion_features(pipe, images, t: int = 200, blocks=("up_blocks.0",), prompt: str = "",
                       generator: torch.Generator | None = None, batch_size: int = 64,
                       out_size: int | None = None) -> torch.Tensor:
    """UNet decoder features of images noised to time step ``t`` (one UNet call per image).

    Args:
        pipe: a diffusers pipeline, or a dict, with ``vae, unet, text_encoder, tokenizer,
            scheduler`` (e.g. ``diffnotes.models.load.load_pipeline("shapes")``).
        images: (B, 3, H, W) in [0, 1] or (B, H, W, 3) NumPy in [0, 1].
        t: 0-based time step index (diffusers convention); moderate t (100-300) keeps the layout
            and asks the UNet for semantics.
        blocks: UNet submodules whose outputs are kept; several are resized to the largest and
            concatenated along channels.
        prompt: conditioning caption (default "", i.e. the unconditional branch).
        generator: for the noise (the same generator state gives the same features).
        out_size: resize the result to (out_size, out_size) if given.
    Returns:
        float32 (B, C, h, w) features.
    Raises:
        ValueError on a bad image shape, time step or block name.
    """
    vae, unet, text_encoder, tokenizer, scheduler = _parts(pipe)
    x = as_image_tensor(images)
    T = len(scheduler.alphas_cumprod)
    t = check_timestep(t, T, "t")
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    ctx = text_encoder(ids.to(text_encoder.device))[0]
    sf = getattr(vae.config, "scaling_factor", 1.0)
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = (x[i:i + batch_size] * 2 - 1).to(device=vae.device, dtype=vae.dtype)
        z0 = vae.encode(xb).latent_dist.mean * sf
        eps = torch.randn(z0.shape, generator=generator, dtype=z0.dtype,
                          device=generator.device if generator is not None else "cpu"
                          ).to(z0.device)
        zt = q_sample(z0, t, scheduler.alphas_cumprod, eps)  # forward process, in latent space
        feats = unet_block_outputs(unet, zt, batch_timesteps(t, zt),
                                   ctx.expand(zt.shape[0], -1, -1), blocks)
        size = max(f.shape[-1] for f in feats) if out_size is None else out_size
        feats = [f if f.shape[-1] == size else
                 F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
                 for f in feats]
        out.append(torch.cat(feats, dim=1).float())
    return torch.cat(out)


def pixel_features(images, patch: int = 4) -> torch.Tensor:
    """Mean colour of each ``patch`` x ``patch`` cell: (B, 3, H/patch, W/patch)."""
    x = as_image_tensor(images)
    return F.avg_pool2d(x, patch)


@torch.no_grad()
def random_conv_features(images, generator: torch.Generator, channels: int = 32,
                         patch: int = 4) -> torch.Tensor:
    """Fixed random features plus colour: a random 5x5 conv (He-scaled), ReLU, average-pooled to
    ``patch`` x ``patch`` cells, concatenated with the cells' mean colour.
    Returns (B, channels + 3, H/patch, W/patch)."""
    x = as_image_tensor(images)
    w = torch.randn(channels, 3, 5, 5, generator=generator) * (2 / 75) ** 0.5
    b = 0.1 * torch.randn(channels, generator=generator)
    h = F.relu(F.conv2d(x * 2 - 1, w, b, padding=2))
    return torch.cat([F.avg_pool2d(h, patch), F.avg_pool2d(x, patch)], dim=1)
