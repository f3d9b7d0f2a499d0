"""Inverting real images: the VAE maps, DDIM inversion, null-text and negative-prompt inversion,
and the two exactly invertible samplers EDICT and BDIA.

Editing a real image with a text-to-image model needs the noise (and, under guidance, the extra
parameters) from which the model's own sampler returns that image. The controlled-generation
blog, §3 ("Image Inversion"), and Zhu's slides, *Null-text Inversion for Editing Real Images
using Guided Diffusion Models*, describe the route this module implements:

- :func:`encode_image` / :func:`decode_latents`: z_0 = s·E(x) and x = D(z_0/s), s the VAE's
  ``scaling_factor`` (Ahmad's notes, §1.5, eqs 1.37 and 1.42);
- :func:`ddim_invert_image`: the η = 0 DDIM step run upwards (Ahmad's notes, eq 1.26; the
  blog's §3.1, Stage I), through :func:`diffnotes.ddim.ddim_invert`;
- :func:`null_text_inversion`: Mokady et al. 2023, Algorithm 1 (the slides' *Algorithm 1:
  Null-text inversion*; the blog's §3.1, Stage II): per-step unconditional embeddings that make
  guided sampling at w = 7.5 follow the w = 1 pivot;
- :func:`negative_prompt_inversion`: Miyake et al. 2023 (the blog's §3.2): the source prompt's
  embedding in place of every null embedding, no optimisation;
- :func:`sample_with_null_embeddings`: DDIM sampling with one null embedding per step, the
  sampler both of the above feed (and ``prompt_to_prompt(..., latents=x_T,
  null_embeddings=...)``);
- :func:`edict_invert` / :func:`edict_sample`: Wallace et al. 2023 (EDICT; only a heading in the
  blog, §3.3), two coupled sequences mixed with p = 0.93, exactly invertible;
- :func:`bdia_sample` / :func:`bdia_invert`: Zhang et al. 2024 (BDIA; only a heading in the
  blog, §3.4), bi-directional integration with weight γ; γ = 0 is DDIM.

EDICT and BDIA take any ``eps_model(x, t)`` (the analytic mixture of
:mod:`diffnotes.models.gmm`, or a pipeline through
:func:`diffnotes.editing.common.pipe_eps_model`), ``timesteps`` high to low and the schedule's
``alphas_cumprod``, like the samplers of :mod:`diffnotes.ddim`; every step is
:func:`diffnotes.ddim.ddim_step` (DDIM eq 12), run down or up with a given ε.
Time-step conventions are those of :mod:`diffnotes.ddim`: after the last step ᾱ = 1.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch

from ..ddim import ddim_invert, ddim_sample, ddim_step
from ..ddpm import _check_alphas_cumprod, predict_x0
from ..guidance import cfg
from ..utils import (batch_timesteps, check_callable, check_decreasing, check_finite, check_int,
                     check_range, check_same_shape, check_tensor)
from .common import encode_prompts, pipe_alphas_cumprod, pipe_eps_model, pipe_timesteps

__all__ = ["encode_image", "decode_latents", "psnr", "ddim_invert_image",
           "null_text_inversion", "negative_prompt_inversion", "null_embeddings_eps_model",
           "sample_with_null_embeddings", "edict_invert", "edict_sample", "bdia_sample",
           "bdia_invert"]

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------ VAE maps
def _image_side(pipe) -> tuple[int, int, int]:
    """(factor, H, W): the VAE's down-sampling factor and the image size the UNet expects."""
    f = int(getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1)))
    s = pipe.unet.config.sample_size
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return f, h * f, w * f


def _image_tensor(image, name: str = "image") -> torch.Tensor:
    """``image`` (PIL, numpy HWC/NHWC in [0, 1], tensor CHW/BCHW in [0, 1]) as a float64
    (B, 3, H, W) tensor, with rank, channel and value-range checks."""
    try:
        from PIL import Image
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    except ImportError:  # pragma: no cover - PIL ships with diffusers
        pass
    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(f"{name} as a numpy array must be HWC or NHWC with 3 channels last, "
                             f"got shape {image.shape}")
        if not np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_:
            raise ValueError(f"{name} must hold numbers in [0, 1], got dtype {image.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float64))
        x = x.permute(2, 0, 1)[None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"{name} as a tensor must be (3, H, W) or (B, 3, H, W), got shape "
                             f"{tuple(image.shape)}")
        if not image.dtype.is_floating_point:
            raise ValueError(f"{name} as a tensor must be floating point in [0, 1], got dtype "
                             f"{image.dtype}")
        x = image.detach().to("cpu", torch.float64)
        x = x[None] if x.ndim == 3 else x
    else:
        raise TypeError(f"{name} must be a PIL image, a numpy array (HWC in [0, 1]) or a tensor "
                        f"((B, 3, H, W) in [0, 1]), got {type(image).__name__}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite, got non-finite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{name} values must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                         + (" (divide uint8 images by 255)" if hi > 1.5 else "")
                         + (" (map [-1, 1] images with (x + 1) / 2)" if lo < -1e-6 else ""))
    return x.clamp(0, 1)


def encode_image(pipe, image, generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents z_0 = s · E(2x − 1) of an image (Ahmad's notes, eq 1.37), s = the VAE's
    ``scaling_factor``, on the UNet's device and dtype.

    ``image``: a PIL image, a numpy array HWC (or NHWC) in [0, 1], or a tensor (3, H, W) /
    (B, 3, H, W) in [0, 1], of the model's image size (the UNet's ``sample_size`` × the VAE's
    factor: 64 × 64 for the shapes model, 320 × 320 for ``"sd-1.5-layout-tiny"``, 512 × 512 for
    SD 1.5). The encoder's mean is used (deterministic) unless a ``generator`` is given; then z
    is a draw from the encoder's Gaussian. Returns (B, C, h, w).
    Raises ``ValueError`` naming ``image`` for a wrong rank, channel count, size or value range.
    """
    x = _image_tensor(image)
    f, H, W = _image_side(pipe)
    h, w = x.shape[-2:]
    if h % f or w % f:
        raise ValueError(f"image height and width must be multiples of the VAE factor {f}, got "
                         f"{h}×{w}")
    if (h, w) != (H, W):
        raise ValueError(f"image must be {H}×{W} (the UNet's sample size × the VAE factor {f}), "
                         f"got {h}×{w}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    vae = pipe.vae
    with torch.no_grad():
        dist = vae.encode((2 * x - 1).to(vae.device, vae.dtype)).latent_dist
        z = dist.mean if generator is None else dist.sample(generator=generator)
    z = z * vae.config.scaling_factor
    return z.to(pipe.unet.device, pipe.unet.dtype)


def decode_latents(pipe, z: torch.Tensor) -> torch.Tensor:
    """Images x = (D(z / s) + 1) / 2 in [0, 1] (Ahmad's notes, eq 1.42), (B, 3, H, W), float,
    on the latents' device (clamped to [0, 1])."""
    check_tensor(z, "z", ndim=4)
    c = pipe.vae.config.latent_channels
    if z.shape[1] != c:
        raise ValueError(f"z must have {c} latent channels (B, {c}, h, w), got shape "
                         f"{tuple(z.shape)}")
    vae = pipe.vae
    with torch.no_grad():
        x = vae.decode(z.detach().to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return ((x + 1) / 2).clamp(0, 1).to(z.device)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio 10 log10(range² / MSE) per image (dB), a (B,) tensor; images
    (B, …) in [0, ``data_range``] (inf where they are equal)."""
    check_tensor(x, "x")
    check_tensor(y, "y")
    check_same_shape(x, y, "x", "y")
    r = check_range(data_range, "data_range", 0, None, lo_open=True)
    mse = ((x.double() - y.double()) ** 2).reshape(x.shape[0], -1).mean(dim=1)
    return 10 * torch.log10(r ** 2 / mse)


# ------------------------------------------------------------------------ shared checks
def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    return prompt


def _as_latents(pipe, image, generator=None) -> torch.Tensor:
    """Latents of ``image``: a latent tensor (B, C, h, w) of the UNet's size passes through,
    anything else goes through :func:`encode_image`."""
    c = pipe.unet.config.in_channels
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == c != 3:
        return image.to(pipe.unet.device, pipe.unet.dtype)
    return encode_image(pipe, image, generator)


def _levels(ts: Sequence[int], acl: Sequence[float]) -> list[float]:
    """ᾱ of the states along ``ts`` (high noise first) and then 1 (the clean end)."""
    return [acl[t] for t in ts] + [1.0]


def _schedule(timesteps, alphas_cumprod):
    ac = _check_alphas_cumprod(alphas_cumprod)
    ts = check_decreasing(timesteps, len(ac))
    return ts, _levels(ts, ac.tolist())


# -------------------------------------------------------------------------- DDIM inversion
def ddim_invert_image(pipe, image, prompt: str, num_inference_steps: int = 50,
                      guidance_scale: float = 1.0, generator: torch.Generator | None = None
                      ) -> list[torch.Tensor]:
    """DDIM inversion of a real image under ``prompt`` (Ahmad's notes, eq 1.26; the
    controlled-generation blog, §3.1, Stage I), through :func:`diffnotes.ddim.ddim_invert`.

    ``image`` is anything :func:`encode_image` takes (or latents (B, C, h, w)). With
    ``guidance_scale = 1`` (the default, the "pivot" of null-text inversion) ε is the
    conditional prediction alone; otherwise classifier-free guidance against the null text.
    Returns the latent trajectory [z_0, z_{t_N}, …, z_{t_1}] from the clean latent up to the
    highest time step of ``pipe_timesteps(pipe, num_inference_steps)``; its last entry is the
    x_T to hand to a sampler (``latents=``).
    """
    _check_prompt(prompt)
    s = check_finite(guidance_scale, "guidance_scale")
    ts = pipe_timesteps(pipe, num_inference_steps)
    z0 = _as_latents(pipe, image, generator)
    cond = encode_prompts(pipe, prompt)
    eps_model = pipe_eps_model(pipe, cond, None, s)
    _, traj = ddim_invert(eps_model, z0, ts, pipe_alphas_cumprod(pipe), return_trajectory=True)
    return traj


# ------------------------------------------------------------ sampling with null embeddings
def _check_null_embeddings(null_embeddings, n: int, like: torch.Tensor) -> list[torch.Tensor]:
    if not isinstance(null_embeddings, (list, tuple)):
        raise TypeError(f"null_embeddings must be a list with one (1, L, D) tensor per step, got "
                        f"{type(null_embeddings).__name__}")
    if len(null_embeddings) != n:
        raise ValueError(f"null_embeddings must hold one embedding per step ({n}), got "
                         f"{len(null_embeddings)}")
    out = []
    for k, e in enumerate(null_embeddings):
        check_tensor(e, f"null_embeddings[{k}]", ndim=3)
        if tuple(e.shape[1:]) != tuple(like.shape[1:]) or e.shape[0] not in (1, like.shape[0]):
            raise ValueError(f"null_embeddings[{k}] must have shape (1, {like.shape[1]}, "
                             f"{like.shape[2]}) like the prompt's embedding, got "
                             f"{tuple(e.shape)}")
        out.append(e.to(like.device, like.dtype))
    return out


def null_embeddings_eps_model(pipe, cond: torch.Tensor, null_embeddings: Sequence[torch.Tensor],
                              guidance_scale: float, timesteps: Sequence[int]) -> EpsModel:
    """The guided ``eps_model(x, t)`` whose null embedding changes with the step: at
    ``timesteps[k]`` it is ε_θ(x, t, ∅_k) + w (ε_θ(x, t, c) − ε_θ(x, t, ∅_k)) (Ahmad's notes,
    eq 1.44, with Mokady et al.'s per-step ∅_t), through
    :func:`diffnotes.editing.common.pipe_eps_model`.

    ``cond`` (1 or B, L, D); ``null_embeddings`` one (1, L, D) tensor per entry of
    ``timesteps`` (high noise first, as :func:`null_text_inversion` returns them). Raises
    ``ValueError`` at call time for a time step not in ``timesteps``.
    """
    check_tensor(cond, "cond", ndim=3)
    ts = [int(t) for t in timesteps]
    nulls = _check_null_embeddings(null_embeddings, len(ts), cond)
    s = check_finite(guidance_scale, "guidance_scale")
    models = {t: pipe_eps_model(pipe, cond, n, s) for t, n in zip(ts, nulls)}

    def eps_model(x, t):
        t = batch_timesteps(t, x)
        key = int(t[0])
        if key not in models or bool((t != key).any()):
            raise ValueError(f"t must be one of the inversion's time steps {ts} (the same for "
                             f"every row), got {t.tolist()}")
        return models[key](x, t)
    return eps_model


def sample_with_null_embeddings(pipe, x_T: torch.Tensor, prompt: str,
                                null_embeddings: Sequence[torch.Tensor] | None = None,
                                guidance_scale: float = 7.5,
                                num_inference_steps: int | None = None,
                                return_trajectory: bool = False,
                                callback: Callable[[dict], None] | None = None):
    """DDIM sampling (η = 0, DDIM eq 12) from ``x_T`` under ``prompt`` with one null embedding
    per step: the reconstruction of :func:`null_text_inversion` and
    :func:`negative_prompt_inversion` (their ``(x_T, null_embeddings)`` go in unchanged).

    ``null_embeddings``: a list of (1, L, D) tensors, one per step of
    ``pipe_timesteps(pipe, len(null_embeddings))``; ``None`` uses the null text ``""`` at every
    step (plain guided DDIM; then ``num_inference_steps`` defaults to 50). Runs
    :func:`diffnotes.ddim.ddim_sample` (``return_trajectory`` and ``callback`` as there).
    Returns the latents z_0 (decode them with :func:`decode_latents`).
    """
    _check_prompt(prompt)
    check_tensor(x_T, "x_T", ndim=4)
    cond = encode_prompts(pipe, prompt)
    if null_embeddings is None:
        n = 50 if num_inference_steps is None else check_int(num_inference_steps,
                                                             "num_inference_steps", min=1)
        null_embeddings = [encode_prompts(pipe, "")] * n
    else:
        if not isinstance(null_embeddings, (list, tuple)):
            raise TypeError(f"null_embeddings must be a list with one (1, L, D) tensor per "
                            f"step, got {type(null_embeddings).__name__}")
        n = len(null_embeddings)
        if num_inference_steps is not None and check_int(
                num_inference_steps, "num_inference_steps", min=1) != n:
            raise ValueError(f"num_inference_steps must equal len(null_embeddings) = {n}, got "
                             f"{num_inference_steps}")
    ts = pipe_timesteps(pipe, n)
    eps_model = null_embeddings_eps_model(pipe, cond, null_embeddings, guidance_scale, ts)
    return ddim_sample(eps_model, x_T.to(pipe.unet.device, pipe.unet.dtype), ts,
                       pipe_alphas_cumprod(pipe), return_trajectory=return_trajectory,
                       callback=callback)


# -------------------------------------------------------------------- null-text inversion
@contextlib.contextmanager
def _frozen(module):
    """Parameters of ``module`` without gradients inside the block (flags restored after)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def null_text_inversion(pipe, image, prompt: str, num_inference_steps: int = 50,
                        guidance_scale: float = 7.5, num_inner_steps: int = 10,
                        early_stop_epsilon: float = 1e-5, generator: torch.Generator | None = None,
                        learning_rate: float = 1e-2, return_losses: bool = False):
    """Null-text inversion (Mokady et al. 2023, Algorithm 1; Zhu's slides, *Algorithm 1:
    Null-text inversion*; the controlled-generation blog, §3.1, Stage II).

    1. The pivot z*_T, …, z*_0: DDIM inversion of the image at guidance w = 1
       (:func:`ddim_invert_image`).
    2. z̄_T ← z*_T, ∅_T ← ψ(""). For each step t (high noise first), ``num_inner_steps`` Adam
       steps (learning rate ``learning_rate``·(1 − k/100) at step k, 1e-2 in the paper and its
       code) on
       ‖z*_{t−1} − z_{t−1}(z̄_t, ∅_t, C)‖² (mean square), z_{t−1} the guided DDIM step at
       ``guidance_scale``; the inner loop stops early once the loss falls below
       ``early_stop_epsilon + 2e-5·k`` (the paper's code). Then z̄_{t−1} ← z_{t−1}(z̄_t, ∅_t, C)
       and ∅_{t−1} ← ∅_t (warm start).

    The slides write z̄*_{t−1} in line 9; the target is the pivot z*_{t−1}. The blog's version
    adds smoothness and image losses and optimises every step against the pivot in parallel;
    this is the paper's sequential algorithm. The network's weights do not change (their
    ``requires_grad`` flags are restored). The paper's rate is tuned for 50 steps; with few,
    larger steps (10 on the shapes model) the per-step targets are farther apart and a rate of
    about 0.1 is needed to reach the autoencoder's ceiling in 10 inner steps.

    Returns ``(x_T, null_embeddings)``: the pivot's top latent and a list of one (1, L, D)
    embedding per step of ``pipe_timesteps(pipe, num_inference_steps)``, for
    :func:`sample_with_null_embeddings` and ``prompt_to_prompt(..., latents=x_T,
    null_embeddings=...)``; with ``return_losses`` also the list of each step's final loss.
    """
    _check_prompt(prompt)
    w = check_finite(guidance_scale, "guidance_scale")
    inner = check_int(num_inner_steps, "num_inner_steps", min=0)
    eps_stop = check_range(early_stop_epsilon, "early_stop_epsilon", 0, None)
    lr = check_range(learning_rate, "learning_rate", 0, None, lo_open=True)
    traj = ddim_invert_image(pipe, image, prompt, num_inference_steps, 1.0, generator)
    ts = pipe_timesteps(pipe, num_inference_steps)
    lv = _levels(ts, pipe_alphas_cumprod(pipe).tolist())
    pivot = traj[::-1]                                  # pivot[k] at level k, pivot[N] = z_0
    cond = encode_prompts(pipe, prompt)
    null = encode_prompts(pipe, "")
    unet = pipe.unet
    z, nulls, losses = pivot[0], [], []
    with _frozen(unet):
        for k, t in enumerate(ts):
            tb = batch_timesteps(t, z)
            c = cond.expand(z.shape[0], -1, -1)
            with torch.no_grad():
                eps_c = unet(z, tb, encoder_hidden_states=c).sample
            param = null.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([param], lr=lr * (1 - k / 100))
            loss_value = float("nan")
            for _ in range(inner):
                with torch.enable_grad():
                    eps_u = unet(z, tb, encoder_hidden_states=param.expand(z.shape[0], -1, -1)
                                 ).sample
                    z_prev = ddim_step(z, cfg(eps_u, eps_c, w), lv[k], lv[k + 1])
                    loss = torch.nn.functional.mse_loss(z_prev, pivot[k + 1])
                    (grad,) = torch.autograd.grad(loss, [param])
                param.grad = grad
                opt.step()
                loss_value = float(loss.detach())
                if loss_value < eps_stop + 2e-5 * k:
                    break
            null = param.detach()
            nulls.append(null)
            losses.append(loss_value)
            with torch.no_grad():    # the sampler's own guided step: reconstruction = z̄ chain
                z = ddim_step(z, pipe_eps_model(pipe, cond, null, w)(z, tb), lv[k], lv[k + 1])
    x_T = pivot[0]
    return (x_T, nulls, losses) if return_losses else (x_T, nulls)


def negative_prompt_inversion(pipe, image, prompt: str, num_inference_steps: int = 50,
                              generator: torch.Generator | None = None):
    """Negative-prompt inversion (Miyake et al. 2023; the controlled-generation blog, §3.2).

    The null embeddings that null-text inversion finds drift towards the prompt's; NPI sets
    ∅_t = C for every step, so that ε_u + w (ε_c − ε_u) = ε_θ(x_t, t, C) whatever w: sampling
    retraces the w = 1 DDIM inversion without any optimisation. Returns ``(x_T,
    null_embeddings)`` in the shape :func:`null_text_inversion` returns (x_T the top of the
    w = 1 inversion, the list holding the prompt's (1, L, D) embedding once per step), for the
    same sampler. For editing, the source prompt's embedding then acts as the negative prompt.
    """
    _check_prompt(prompt)
    traj = ddim_invert_image(pipe, image, prompt, num_inference_steps, 1.0, generator)
    cond = encode_prompts(pipe, prompt)
    return traj[-1], [cond] * (len(traj) - 1)


# ------------------------------------------------------------------------------------ EDICT
def _check_pair(latents, name: str):
    if isinstance(latents, torch.Tensor):
        return latents, latents
    if not isinstance(latents, (list, tuple)) or len(latents) != 2:
        raise TypeError(f"{name} must be a tensor or a pair (x, y) of tensors, got "
                        f"{type(latents).__name__}")
    x, y = latents
    check_tensor(x, f"{name}[0]")
    check_tensor(y, f"{name}[1]")
    check_same_shape(x, y, f"{name}[0]", f"{name}[1]")
    return x, y


def _check_p(p) -> float:
    return check_range(p, "p", 0, 1, lo_open=True, hi_open=False)


def edict_sample(eps_model: EpsModel, latents, timesteps: Sequence[int],
                 alphas_cumprod: torch.Tensor, p: float = 0.93,
                 return_trajectory: bool = False):
    """EDICT sampling (Wallace et al. 2023, §3, the denoising equations): two coupled sequences
    (x, y), each step an affine DDIM step of one from the other's ε and a mixing with ``p``:

        x_inter = a_t x_t + b_t ε(y_t, t),         y_inter = a_t y_t + b_t ε(x_inter, t),
        x_{t−1} = p x_inter + (1 − p) y_inter,     y_{t−1} = p y_inter + (1 − p) x_{t−1},

    where a_t x + b_t ε is the η = 0 DDIM step (DDIM eq 12; :func:`diffnotes.ddim.ddim_step`).
    ``latents``: the pair (x_T, y_T) that :func:`edict_invert` returns, or one tensor (x_T = y_T,
    generation from noise). Returns the pair (x_0, y_0) (and the list of pairs with
    ``return_trajectory``). Use float64 for exactness: the mixing divides by p on the way back.
    """
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    x, y = _check_pair(latents, "latents")
    p = _check_p(p)
    ts, lv = _schedule(timesteps, alphas_cumprod)
    traj = [(x, y)]
    with torch.no_grad():
        for k, t in enumerate(ts):
            tb = batch_timesteps(t, x)
            x_inter = ddim_step(x, eps_model(y, tb), lv[k], lv[k + 1])
            y_inter = ddim_step(y, eps_model(x_inter, tb), lv[k], lv[k + 1])
            x = p * x_inter + (1 - p) * y_inter
            y = p * y_inter + (1 - p) * x
            if return_trajectory:
                traj.append((x, y))
    return ((x, y), traj) if return_trajectory else (x, y)


def edict_invert(eps_model: EpsModel, x_0, timesteps: Sequence[int],
                 alphas_cumprod: torch.Tensor, p: float = 0.93,
                 return_trajectory: bool = False):
    """EDICT inversion (Wallace et al. 2023, §3, the inversion equations): each step of
    :func:`edict_sample` undone in reverse order,

        y_inter = (y_{t−1} − (1 − p) x_{t−1}) / p,    x_inter = (x_{t−1} − (1 − p) y_inter) / p,
        y_t = (y_inter − b_t ε(x_inter, t)) / a_t,     x_t = (x_inter − b_t ε(y_t, t)) / a_t,

    where (z − b_t ε)/a_t is the DDIM step from ᾱ_{t−1} back up to ᾱ_t with the same ε
    (:func:`diffnotes.ddim.ddim_step` with the levels swapped). Every ε is evaluated at the
    point the sampler evaluates it, so ``edict_sample(eps_model, edict_invert(eps_model, x_0,
    …), …)`` returns (x_0, x_0) exactly in exact arithmetic (≈ 1e-12 in float64), for any
    ε-model and any guidance. ``x_0``: one tensor (x_0 = y_0) or a pair. Returns the pair
    (x_T, y_T) (and the list of pairs, clean end first, with ``return_trajectory``).
    """
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    x, y = _check_pair(x_0, "x_0")
    p = _check_p(p)
    ts, lv = _schedule(timesteps, alphas_cumprod)
    traj = [(x, y)]
    with torch.no_grad():
        for k in range(len(ts) - 1, -1, -1):
            tb = batch_timesteps(ts[k], x)
            y_inter = (y - (1 - p) * x) / p
            x_inter = (x - (1 - p) * y_inter) / p
            y = ddim_step(y_inter, eps_model(x_inter, tb), lv[k + 1], lv[k])
            x = ddim_step(x_inter, eps_model(y, tb), lv[k + 1], lv[k])
            if return_trajectory:
                traj.append((x, y))
    return ((x, y), traj) if return_trajectory else (x, y)


# ------------------------------------------------------------------------------------- BDIA
def _check_gamma(gamma, allow_zero: bool) -> float:
    return check_range(gamma, "gamma", 0, 1, lo_open=not allow_zero)


def bdia_sample(eps_model: EpsModel, x_T: torch.Tensor, timesteps: Sequence[int],
                alphas_cumprod: torch.Tensor, gamma: float = 1.0,
                x_next: torch.Tensor | None = None, return_trajectory: bool = False,
                callback: Callable[[dict], None] | None = None):
    """BDIA-DDIM sampling (Zhang et al. 2024, bi-directional integration approximation; the
    controlled-generation blog names it in §3.4).

    With states z_k at levels ᾱ_k along ``timesteps`` (z_0 = ``x_T``; after the last step
    ᾱ = 1) and D_{k→j}(z_k) the η = 0 DDIM step (DDIM eq 12) from level k to level j with
    ε_k = ε(z_k, t_k), every step after the first is

        z_{k+1} = D_{k→k+1}(z_k) + γ (z_{k−1} − D_{k→k−1}(z_k)),

    the forward integral over [t_k, t_{k+1}] plus γ times the correction of the backward one
    over [t_{k−1}, t_k] (the paper writes it z_{i−1} = z_{i+1} − (1−γ)(z_{i+1} − z_i)
    − γ Δ(t_i→t_{i+1}|z_i) + Δ(t_i→t_{i−1}|z_i), as its official code does; the repository's
    README prints γ and 1 − γ the other way round). γ = 0 is DDIM (bitwise: the correction is
    multiplied by 0); γ = 1 is the time-symmetric rule. The first step is a DDIM step, unless
    ``x_next`` (the state at ``timesteps[1]``, as :func:`bdia_invert` returns it) is given: then
    sampling starts from the pair (``x_T``, ``x_next``) and retraces the inversion exactly.

    One ε evaluation per step. ``callback`` is called before each step with
    ``dict(i=, t=, x=, x0_hat=, eps=)`` as in :func:`diffnotes.ddim.ddim_sample`. Returns x_0
    (and the list of states with ``return_trajectory``).
    """
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    check_tensor(x_T, "x_T")
    g = _check_gamma(gamma, allow_zero=True)
    ts, lv = _schedule(timesteps, alphas_cumprod)
    states = [x_T]
    start = 0
    if x_next is not None:
        check_tensor(x_next, "x_next")
        check_same_shape(x_T, x_next, "x_T", "x_next")
        if len(ts) < 2:
            raise ValueError("x_next needs at least 2 timesteps (it is the state at "
                             "timesteps[1])")
        states.append(x_next)
        start = 1
    with torch.no_grad():
        for k in range(start, len(ts)):
            z = states[-1]
            eps = eps_model(z, batch_timesteps(ts[k], z))
            if callback is not None:
                callback(dict(i=k, t=ts[k], x=z, x0_hat=predict_x0(z, eps, lv[k]), eps=eps))
            z_new = ddim_step(z, eps, lv[k], lv[k + 1])                     # Δ(t_k → t_{k+1})
            if k > 0:
                z_new = z_new + g * (states[-2] - ddim_step(z, eps, lv[k], lv[k - 1]))
            states.append(z_new)
            if not return_trajectory and len(states) > 2:
                states = states[-2:]
    return (states[-1], states) if return_trajectory else states[-1]


def bdia_invert(eps_model: EpsModel, x_0: torch.Tensor, timesteps: Sequence[int],
                alphas_cumprod: torch.Tensor, gamma: float = 1.0,
                x_1: torch.Tensor | None = None, return_trajectory: bool = False):
    """BDIA inversion (Zhang et al. 2024): the update of :func:`bdia_sample` solved for the
    older state,

        z_{k−1} = D_{k→k−1}(z_k) + (z_{k+1} − D_{k→k+1}(z_k)) / γ,

    run from the clean end up. It needs the last two states: ``x_0`` and ``x_1``, the state at
    ``timesteps[-1]``; for a real image (no ``x_1``) it is one DDIM inversion step from x_0
    (Ahmad's notes, eq 1.26, the same step :func:`diffnotes.ddim.ddim_invert` takes first).
    Needs γ > 0; rounding errors grow like γ^(−steps), so keep γ ≥ 0.5 (γ = 1 is the stable,
    time-symmetric case).

    Returns ``(x_T, x_next)``: the states at ``timesteps[0]`` and ``timesteps[1]``;
    ``bdia_sample(eps_model, x_T, …, gamma, x_next=x_next)`` returns x_0 exactly in exact
    arithmetic (≈ 1e-12 in float64 at γ = 1). (With one time step, ``x_next`` is x_0.) With
    ``return_trajectory`` also the list of states, clean end first.
    """
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    check_tensor(x_0, "x_0")
    g = _check_gamma(gamma, allow_zero=False)
    ts, lv = _schedule(timesteps, alphas_cumprod)
    N = len(ts)
    with torch.no_grad():
        if x_1 is None:
            x_1 = ddim_step(x_0, eps_model(x_0, batch_timesteps(ts[-1], x_0)), 1.0, lv[N - 1])
        else:
            check_tensor(x_1, "x_1")
            check_same_shape(x_0, x_1, "x_0", "x_1")
        states = [x_0, x_1]                       # states[j]: level N − j
        for k in range(N - 1, 0, -1):             # from z_k (and z_{k+1}) to z_{k−1}
            z, z_after = states[-1], states[-2]
            eps = eps_model(z, batch_timesteps(ts[k], z))
            z_before = ddim_step(z, eps, lv[k], lv[k - 1]) + \
                (z_after - ddim_step(z, eps, lv[k], lv[k + 1])) / g
            states.append(z_before)
    x_T, x_next = states[-1], states[-2]
    return ((x_T, x_next), states) if return_trajectory else (x_T, x_next)
