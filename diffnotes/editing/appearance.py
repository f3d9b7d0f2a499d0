"""Appearance transfer: Cross-Image Attention (Alaluf et al. 2023) and Eye-for-an-Eye (Go et al.).

Appearance transfer (Ahmad's notes, §3.6): from a *structure* image I_struct (the target I_T of
the notes) and an *appearance* image I_app (the reference I_R), make an image that keeps the
layout and shape of I_struct and takes the colour, texture and lighting of I_app.

Both methods invert the two images (DDIM inversion, Ahmad's notes eq 1.26, through
:func:`diffnotes.editing.inversion.ddim_invert_image`) and denoise them again in ONE batch with a
third row, the output, that starts from the structure's inverted latent. The output's decoder
self-attention is changed through the library's one attention controller
(:class:`diffnotes.attention.AttentionController`):

* :func:`cross_image_attention` (Ahmad's notes, §3.6.1 and eq 3.6; Alaluf et al. 2023): the
  output's queries meet the appearance row's keys and values,
  ``softmax(Q_out K_app^T / sqrt d) V_app``, the probabilities are sharpened by
  :func:`attention_contrast` (factor β), the ε of the output is pushed away from the ε without the
  swap (appearance guidance, :func:`swap_guidance`; the notes' eq 3.30 writes it on attention
  outputs, the paper's code on noise predictions), and the output latent is renormalised to the
  appearance latent's channel statistics by :func:`adain` (eq 3.31; "AdaLN" in the notes).
* :func:`eye_for_an_eye` (Ahmad's notes, §3.6.2, eqs 3.32-3.36; Go et al.): a hard dense
  correspondence q → p(q) = argmax_p cos(F_struct(q), F_app(p)) between diffusion features of the
  two images (:func:`feature_correspondence`, :mod:`diffnotes.features`), the appearance row's
  projected features gathered along it and blended into the output's inside the structure's mask
  (eq 3.34), ordinary self-attention on the blended features (eq 3.35), then AdaIN (eq 3.36).

Layers (the rule, stated on the UNet's list of self-attention layers,
:func:`diffnotes.attention.attention_layers`): the decoder's self-attention layers whose query
grid is at least ``min_res_fraction`` (default 1/2) of the latent's side. On Stable Diffusion
(latent 64) these are the 32×32 and 64×64 decoder layers, indices 10-15 of 16: the paper's
choice. On the shapes model (latent 16) they are its 4 decoder layers (8×8 and 16×16).
``layers=`` (indices into that list) overrides the rule.

Steps (fractions of the N denoising steps, half-open windows [a, b) on ⌊f N⌋): the paper's code
(100 steps) swaps at steps 10-90 at the 64×64 layers and 10-70 at the 32×32 layers, and applies
AdaIN at steps 20-100. Here ``steps=(0.1, 0.9)`` holds for the layers at the latent's full
resolution and ``low_res_steps=(0.1, 0.7)`` for the coarser selected layers, ``adain_steps=(0.2,
1.0)``.

What is simplified against the paper's code (documented, not hidden): DDIM inversion instead of
edit-friendly DDPM inversion (and no skipped first steps); AdaIN over the whole latent unless
masks are given (the code masks it with a self-segmentation from cross-attention); the code's
extra trick of injecting the *structure's* keys and values at every 5th step of the first 40 is
left out.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import (AttentionController, AttentionStore, BatchLayout, attention_layers,
                         layer_resolutions)
from ..ddim import ddim_step
from ..utils import batch_timesteps, check_int, check_range, check_tensor
from .common import (encode_prompts, fraction_steps, pipe_alphas_cumprod, pipe_eps_model,
                     pipe_timesteps)
from .inversion import _as_latents, decode_latents, ddim_invert_image

__all__ = ["adain", "attention_contrast", "swap_guidance", "swap_guidance_weights",
           "selected_layers", "CrossImageController", "cross_image_attention",
           "feature_correspondence", "warp", "image_correspondence", "EyeForAnEyeController",
           "eye_for_an_eye", "mask_to_grid"]


# ---------------------------------------------------------------------------- the small pieces
def _channel_stats(x: torch.Tensor, mask: torch.Tensor | None, unbiased: bool, eps: float):
    """Per-(row, channel) mean and std of ``x`` (B, C, H, W) over the pixels where ``mask``
    (B or 1, 1, H, W) is true."""
    B, C = x.shape[:2]
    flat = x.reshape(B, C, -1)
    if mask is None:
        w = torch.ones(1, 1, flat.shape[-1], dtype=x.dtype, device=x.device)
    else:
        w = mask.reshape(mask.shape[0], 1, -1).to(x.dtype)
    n = w.sum(-1, keepdim=True)
    mean = (flat * w).sum(-1, keepdim=True) / n
    dof = (n - 1) if unbiased else n
    var = (((flat - mean) ** 2) * w).sum(-1, keepdim=True) / dof
    return mean.reshape(B, C, 1, 1), (var + eps).sqrt().reshape(B, C, 1, 1)


def _check_mask(mask, like: torch.Tensor, name: str) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(np.asarray(mask)) if not isinstance(mask, torch.Tensor) else mask
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != tuple(like.shape[-2:]) \
            or m.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"{name} must be a binary mask of shape {tuple(like.shape[-2:])} "
                         f"(or (B, 1, H, W)), got shape {tuple(m.shape)}")
    m = m.to(like.device)
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{name} must be binary (0/1 or bool)")
        m = m.bool()
    if not bool(m.reshape(m.shape[0], -1).any(-1).all()):
        raise ValueError(f"{name} must select at least one pixel")
    return m


def adain(x: torch.Tensor, ref: torch.Tensor, *, mask=None, ref_mask=None, eps: float = 0.0,
          unbiased: bool = False) -> torch.Tensor:
    """Adaptive instance normalisation (Ahmad's notes, eq 3.31 and eq 3.36, printed "AdaLN";
    Huang & Belongie 2017, eq 8): per channel,

        AdaIN(x, ref) = σ(ref) (x − μ(x)) / σ(x) + μ(ref).

    ``x``, ``ref``: (B, C, H, W) (or (C, H, W)); μ, σ are each row's per-channel mean and
    standard deviation over the pixels. With ``mask`` (pixels of ``x``, (H, W) or (B, 1, H, W),
    binary) the statistics of ``x`` are taken inside it and only those pixels change (the paper's
    ``masked_adain``: ``x (1 − m) + AdaIN(x) m``); ``ref_mask`` restricts the reference's
    statistics. ``eps`` is added to the variances and ``unbiased`` picks the n − 1 convention;
    the defaults (0, population std) make the output's statistics equal the reference's exactly;
    the paper's code uses ``eps=1e-5, unbiased=True``. A constant channel of ``x`` (σ = 0) maps
    to μ(ref).

    Raises ``ValueError`` naming the argument for shapes that do not match (B and C equal, or
    ``ref`` with batch 1) or a bad mask.
    """
    check_tensor(x, "x", ndim=(3, 4))
    check_tensor(ref, "ref", ndim=(3, 4))
    squeeze = x.ndim == 3
    xx = x[None] if x.ndim == 3 else x
    rr = ref[None] if ref.ndim == 3 else ref
    if rr.shape[1] != xx.shape[1] or rr.shape[0] not in (1, xx.shape[0]):
        raise ValueError(f"x and ref must have the same channels (and batch, or ref batch 1), "
                         f"got shapes {tuple(x.shape)} and {tuple(ref.shape)}")
    eps = check_range(eps, "eps", 0, None)
    m = _check_mask(mask, xx, "mask")
    rm = _check_mask(ref_mask, rr, "ref_mask")
    mu_x, sd_x = _channel_stats(xx, m, unbiased, eps)
    mu_r, sd_r = _channel_stats(rr.to(xx.dtype), rm, unbiased, eps)
    safe = torch.where(sd_x > 0, sd_x, torch.ones_like(sd_x))
    z = torch.where(sd_x > 0, (xx - mu_x) / safe, torch.zeros_like(xx))
    out = z * sd_r + mu_r
    if m is not None:
        out = torch.where(m, out, xx)
    return out[0] if squeeze else out


def attention_contrast(probs: torch.Tensor, contrast: float, clip: bool = True) -> torch.Tensor:
    """The attention contrast of Cross-Image Attention (Alaluf et al. 2023, §4.2; the paper's
    ``enhance_tensor``; Ahmad's notes, §3.6.1, name it without a formula):

        A' = clip(β (A − Ā) + Ā, 0, 1),   Ā = the mean of A's row (over the keys).

    A softmax row sums to 1, so Ā = 1/N_k in every row: the contrast stretches each row about
    the uniform level, keeps its sum (before clipping) and is not renormalised after clipping (as
    in the paper's code). β = 1 returns ``probs`` itself (the identity, bitwise); β > 1 sharpens,
    0 < β < 1 flattens. Raises ``ValueError`` for β ≤ 0 (naming ``contrast``).
    """
    beta = check_range(contrast, "contrast", 0, None, lo_open=True)
    check_tensor(probs, "probs")
    if beta == 1.0:
        return probs
    mean = probs.mean(dim=-1, keepdim=True)
    out = (probs - mean) * beta + mean
    return out.clamp(0.0, 1.0) if clip else out


def swap_guidance_weights(scale: float, num_steps: int) -> np.ndarray:
    """The per-step weights w_i of appearance ("swap") guidance in the paper's code: linear from
    ``scale`` down to max(scale / 2, 1) over the ``num_steps`` steps."""
    s = check_range(scale, "swap_guidance_scale", 0, None)
    n = check_int(num_steps, "num_steps", min=1)
    return np.linspace(s, max(s / 2, 1.0), n)


def swap_guidance(eps_swap: torch.Tensor, eps_noswap: torch.Tensor, w: float) -> torch.Tensor:
    """ε = ε_noswap + w (ε_swap − ε_noswap) (Alaluf et al. 2023, §4.2, "appearance guidance"; the
    paper's code). Ahmad's notes, eq 3.30, print the same blend as (1 + w') A_cross − w' A_uncond
    on attention outputs (w = 1 + w'; the code applies it to noise predictions). w = 1 gives
    ``eps_swap`` up to rounding, w = 0 ``eps_noswap``."""
    return eps_noswap + w * (eps_swap - eps_noswap)


def _window(v, name: str) -> tuple[float, float]:
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise ValueError(f"{name} must be a (start, end) pair of fractions in [0, 1], got {v!r}")
    a, b = (check_range(x, name, 0, 1) for x in v)
    if a > b:
        raise ValueError(f"{name} must have start <= end, got {v!r}")
    return a, b


def _latent_side(pipe) -> int:
    s = pipe.unet.config.sample_size
    return int(s if isinstance(s, int) else max(s))


def selected_layers(unet, latent_side: int, min_res_fraction: float = 0.5,
                    layers: Sequence[int] | None = None) -> list[int]:
    """Indices (into :func:`diffnotes.attention.attention_layers` ``(unet, "self")``) of the
    self-attention layers the appearance methods edit: the decoder's (``up_blocks``) layers whose
    query grid side is ≥ ``min_res_fraction`` × the latent side (SD 1.5: indices 10-15, the
    32×32 and 64×64 decoder layers of the paper), or the given ``layers``. The grid side of a
    layer is the latent side divided by 2 per down block above it."""
    names = attention_layers(unet, "self")
    if layers is not None:
        out = sorted({check_int(i, "layers", min=0) for i in layers})
        if out and out[-1] >= len(names):
            raise ValueError(f"layers must be indices in [0, {len(names) - 1}] of the UNet's "
                             f"{len(names)} self-attention layers, got {list(layers)}")
        return out
    f = check_range(min_res_fraction, "min_res_fraction", 0, 1)
    sides = layer_resolutions(unet, "self", (latent_side, latent_side))
    return [i for i, n in enumerate(names) if n.startswith("up_blocks.")
            and sides[i] >= f * latent_side - 1e-9]


def _image_np(pipe, z: torch.Tensor) -> np.ndarray:
    return decode_latents(pipe, z).permute(0, 2, 3, 1).double().cpu().numpy()


def _outputs(pipe, z: torch.Tensor, output_type: str):
    """z (n, C, h, w) → a list of n PIL images / HWC float arrays / (1, C, h, w) latents."""
    if output_type == "latent":
        return [z[i:i + 1] for i in range(z.shape[0])]
    arr = _image_np(pipe, z)
    if output_type == "np":
        return list(arr)
    from PIL import Image
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


def _prepare(pipe, structure, appearance, structure_prompt, appearance_prompt,
             num_inference_steps, guidance_scale, output_type):
    if not isinstance(structure_prompt, str):
        raise TypeError(f"structure_prompt must be a str, got {type(structure_prompt).__name__}")
    if appearance_prompt is None:
        appearance_prompt = structure_prompt
    if not isinstance(appearance_prompt, str):
        raise TypeError(f"appearance_prompt must be a str or None, got "
                        f"{type(appearance_prompt).__name__}")
    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    gs = check_range(guidance_scale, "guidance_scale", 0, None)
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    zs, za = (_named_latents(pipe, im, name) for im, name in ((structure, "structure"),
                                                               (appearance, "appearance")))
    if zs.shape[0] != 1 or za.shape[0] != 1:
        raise ValueError(f"structure and appearance must each be one image (batch 1), got "
                         f"batches {zs.shape[0]} and {za.shape[0]}")
    if tuple(zs.shape) != tuple(za.shape):
        raise ValueError(f"structure and appearance must have the same shape, got latents "
                         f"{tuple(zs.shape)} and {tuple(za.shape)}")
    return appearance_prompt, N, gs, zs, za


def _named_latents(pipe, image, name):
    try:
        return _as_latents(pipe, image)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{name}: {e}") from None


def _invert(pipe, z0, prompt, N):
    return ddim_invert_image(pipe, z0, prompt, N, guidance_scale=1.0)[-1]


# ---------------------------------------------------------------------------- cross-image attention
class CrossImageController(AttentionController):
    """Cross-image attention on a batch of logical rows [appearance, structure, output(swap),
    output(no swap)] (the last only when ``swap_rows`` is 4), repeated for the unconditional and
    conditional halves under classifier-free guidance (``layout``).

    In the selected decoder self-attention layers (``layers``: indices into the UNet's
    self-attention list, compared with ``info.index``) and at the steps ``windows[side]`` (a
    [start, end) pair of step indices per query-grid side), the output(swap) row's keys and values
    are the appearance row's, its queries its own (``queries="output"``, the paper's code) or the
    structure row's (``queries="structure"``), and its probabilities pass through
    :func:`attention_contrast` with ``contrast``. ``calls`` counts the edited layer calls."""

    kinds = ("self",)
    APP, STRUCT, OUT, PLAIN = 0, 1, 2, 3

    def __init__(self, layout: BatchLayout, layers: Sequence[int], windows: dict,
                 contrast: float = 1.0, queries: str = "output", min_side: int = 1):
        self.layout, self.layers = layout, set(layers)
        self.windows, self.contrast, self.queries = dict(windows), contrast, queries
        self.min_side = min_side
        self.calls = 0

    def wants(self, kind, height, width):
        return kind == "self" and max(height, width) >= self.min_side

    def active(self, info) -> bool:
        if info.index not in self.layers:
            return False
        a, b = self.windows.get(info.res, (0, 0))
        return a <= info.step < b

    def _offsets(self):
        n = self.layout.n_prompts
        return (0, n) if self.layout.cfg else (0,)

    def edit_qkv(self, q, k, v, info):
        if not self.active(info):
            return q, k, v
        self.calls += 1
        for o in self._offsets():
            k[o + self.OUT] = k[o + self.APP]
            v[o + self.OUT] = v[o + self.APP]
            if self.queries == "structure":
                q[o + self.OUT] = q[o + self.STRUCT]
        return q, k, v

    def edit(self, probs, info):
        if self.contrast == 1.0 or not self.active(info):
            return probs
        for o in self._offsets():
            probs[o + self.OUT] = attention_contrast(probs[o + self.OUT], self.contrast)
        return probs


def _rule_windows(pipe, layer_idx, N, steps, low_res_steps) -> dict:
    """{grid side: (start, end) step indices} for the sides of the selected layers: the side
    equal to the latent's gets ``steps``, the coarser ones ``low_res_steps``."""
    L = _latent_side(pipe)
    sides = layer_resolutions(pipe.unet, "self", (L, L))
    out = {}
    for i in layer_idx:
        side = sides[i]
        w = steps if side >= L else low_res_steps
        out[side] = (fraction_steps(w[0], N), fraction_steps(w[1], N))
    return out


def _windows_and_masks(pipe, N, zs0, za0, steps, low_res_steps, adain_steps, min_res_fraction,
                       layers, structure_mask, appearance_mask):
    """What both appearance methods derive from their shared arguments: the edited layers, their
    step windows, the AdaIN window, and the two masks at the latent grid."""
    sw, lw, aw = (_window(steps, "steps"), _window(low_res_steps, "low_res_steps"),
                  _window(adain_steps, "adain_steps"))
    layer_idx = selected_layers(pipe.unet, _latent_side(pipe), min_res_fraction, layers)
    windows = _rule_windows(pipe, layer_idx, N, sw, lw)
    return (layer_idx, windows, aw, _latent_mask(structure_mask, zs0, "structure_mask"),
            _latent_mask(appearance_mask, za0, "appearance_mask"))


def cross_image_attention(pipe, structure, appearance, *, structure_prompt: str = "",
                          appearance_prompt: str | None = None, contrast: float = 1.67,
                          adain: bool = True, swap_guidance_scale: float = 3.5,
                          num_inference_steps: int = 20, guidance_scale: float = 1.0,
                          steps=(0.1, 0.9), low_res_steps=(0.1, 0.7), adain_steps=(0.2, 1.0),
                          min_res_fraction: float = 0.5, layers: Sequence[int] | None = None,
                          queries: str = "output", structure_mask=None, appearance_mask=None,
                          generator: torch.Generator | None = None, output_type: str = "pil",
                          return_all: bool = False):
    """Cross-Image Attention appearance transfer (Alaluf et al. 2023; Ahmad's notes, §3.6.1,
    eqs 3.6, 3.30, 3.31).

    1. Invert both images by DDIM (Ahmad's notes, eq 1.26) under their prompts at guidance 1:
       z_T^struct, z_T^app.
    2. Denoise the rows [appearance, structure, output] from [z_T^app, z_T^struct, z_T^struct]
       by DDIM (eq 1.22) in one batch. In the selected decoder self-attention layers (module
       doc) and steps the output row computes

           Δφ_out = softmax(Q_out K_app^T / √d) V_app            (Ahmad's notes, eq 3.6)

       with the contrast A → β (A − Ā) + Ā on its probabilities (:func:`attention_contrast`,
       β = ``contrast``), and its ε is ε_noswap + w_i (ε_swap − ε_noswap) over the swap window
       (:func:`swap_guidance`, w_0 = ``swap_guidance_scale``; 1 turns it off and saves a row).
    3. With ``adain``, after each step in ``adain_steps`` the output latent is set to
       AdaIN(z_out, z_app) (:func:`adain`, eq 3.31; inside ``structure_mask`` /
       ``appearance_mask`` when given, image-size or latent-size binary masks).

    ``structure``, ``appearance``: PIL images / arrays / tensors of the model's image size (see
    :func:`diffnotes.editing.inversion.encode_image`) or latents (1, C, h, w). ``queries``:
    "output" (the output row's own queries, the paper's code; equal to the structure's at the
    first step) or "structure" (the structure row's, Ahmad's notes' reading). ``steps``,
    ``low_res_steps``, ``adain_steps``: (start, end) fractions of the steps (module doc).
    ``generator`` is accepted for a uniform signature; the method is deterministic.

    Returns the output image (PIL / HWC float array for ``output_type="np"`` / latents
    (1, C, h, w) for "latent"); with ``return_all`` the list [output, structure reconstruction,
    appearance reconstruction].

    With structure = appearance, ``contrast=1`` and AdaIN off (or on: AdaIN(z, z) = z) the
    output is the plain DDIM reconstruction of the image (tests/test_appearance.py). After a
    run, ``cross_image_attention.last_calls`` is the number of layer calls the controller edited.
    Raises ``ValueError`` naming the argument for mismatched shapes, ``contrast`` ≤ 0, windows
    outside [0, 1], bad ``layers`` or ``queries``.
    """
    appearance_prompt, N, gs, zs0, za0 = _prepare(
        pipe, structure, appearance, structure_prompt, appearance_prompt, num_inference_steps,
        guidance_scale, output_type)
    beta = check_range(contrast, "contrast", 0, None, lo_open=True)
    w0 = check_range(swap_guidance_scale, "swap_guidance_scale", 0, None)
    if queries not in ("output", "structure"):
        raise ValueError(f"queries must be 'output' or 'structure', got {queries!r}")
    layer_idx, windows, aw, smask, amask = _windows_and_masks(
        pipe, N, zs0, za0, steps, low_res_steps, adain_steps, min_res_fraction, layers,
        structure_mask, appearance_mask)

    zT_s = _invert(pipe, zs0, structure_prompt, N)
    zT_a = zT_s if (appearance is structure and appearance_prompt == structure_prompt) else \
        _invert(pipe, za0, appearance_prompt, N)

    use_swap_rows = w0 != 1.0
    n_rows = 4 if use_swap_rows else 3
    prompts = [appearance_prompt, structure_prompt, structure_prompt, structure_prompt][:n_rows]
    uniq = list(dict.fromkeys(prompts))
    cond = encode_prompts(pipe, uniq)[[uniq.index(p) for p in prompts]]
    use_cfg = gs != 1.0
    null = encode_prompts(pipe, "") if use_cfg else None
    eps_model = pipe_eps_model(pipe, cond, null, gs if use_cfg else 1.0)
    ts = pipe_timesteps(pipe, N)
    acl = pipe_alphas_cumprod(pipe).tolist()
    weights = swap_guidance_weights(w0, N) if use_swap_rows else None
    swap_lo = min((a for a, b in windows.values() if b > a), default=N)
    swap_hi = max((b for a, b in windows.values() if b > a), default=0)
    a0, a1 = fraction_steps(aw[0], N), fraction_steps(aw[1], N)

    layout = BatchLayout(n_rows, use_cfg)
    ctrl = CrossImageController(layout, layer_idx, windows, beta, queries,
                                min_side=min(windows) if windows else 10**9)
    store = AttentionStore(kinds=("self",), self_max_res=1, controller=ctrl, layout=layout)
    x = torch.cat([zT_a, zT_s, zT_s]).to(pipe.unet.device, pipe.unet.dtype)
    store.attach(pipe.unet)
    try:
        for i, t in enumerate(ts):
            a_prev = acl[ts[i + 1]] if i + 1 < len(ts) else 1.0
            xin = torch.cat([x, x[2:3]]) if use_swap_rows else x
            with torch.no_grad():
                eps = eps_model(xin, batch_timesteps(t, xin))
            e_out = eps[2:3]
            if use_swap_rows and swap_lo <= i < swap_hi:
                e_out = swap_guidance(eps[2:3], eps[3:4], float(weights[i]))
            eps = torch.cat([eps[:2], e_out])
            x = ddim_step(x, eps, acl[t], a_prev)
            if adain and a0 <= i < a1:
                x = torch.cat([x[:2], _adain_latent(x[2:3], x[0:1], smask, amask)])
    finally:
        store.detach()
    cross_image_attention.last_calls = ctrl.calls
    outs = _outputs(pipe, x[[2, 1, 0]], output_type)
    return outs if return_all else outs[0]


def _adain_latent(z, ref, smask, amask):
    return adain(z, ref, mask=smask, ref_mask=amask)


def mask_to_grid(mask, side: int | tuple[int, int]) -> torch.Tensor:
    """A binary mask (H, W) resized to a grid ``side`` × ``side`` by area averaging, kept where at
    least half of a cell is inside: a (h, w) bool tensor."""
    m = torch.as_tensor(np.asarray(mask, dtype=np.float64)) if not isinstance(
        mask, torch.Tensor) else mask.double()
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {tuple(m.shape)}")
    size = (side, side) if isinstance(side, int) else tuple(side)
    if tuple(m.shape) == size:
        return m > 0.5
    return F.adaptive_avg_pool2d(m[None, None], size)[0, 0] >= 0.5


def _latent_mask(mask, z, name):
    if mask is None:
        return None
    m = mask_to_grid(mask, tuple(z.shape[-2:])).to(z.device)
    if not bool(m.any()):
        raise ValueError(f"{name} selects no latent pixel")
    return m[None, None]


# ---------------------------------------------------------------------------- Eye-for-an-Eye
def feature_correspondence(f_target: torch.Tensor, f_ref: torch.Tensor, target_mask=None,
                           ref_mask=None) -> torch.Tensor:
    """Dense nearest-neighbour correspondence by cosine similarity (Ahmad's notes, eq 3.32, over
    the half-open grid [0, h) × [0, w); masked matching, eq 3.33):

        p(q) = argmax_{p ∈ M_ref} cos(F_target(q), F_ref(p))   for every target pixel q.

    ``f_target``, ``f_ref``: (C, h, w) (or (1, C, h, w)) features on the same grid. ``ref_mask``
    (h, w) restricts the candidates p; ``target_mask`` marks the pixels that are matched, the
    others map to themselves (they are not transferred, eq 3.34). Returns a (h·w,) long tensor
    of row-major indices into the reference grid. Computed in float64; ties go to the lowest
    index. Raises ``ValueError`` for features of different shapes or bad masks.
    """
    ft = f_target[0] if f_target.ndim == 4 else f_target
    fr = f_ref[0] if f_ref.ndim == 4 else f_ref
    check_tensor(ft, "f_target", ndim=3)
    check_tensor(fr, "f_ref", ndim=3)
    if tuple(ft.shape) != tuple(fr.shape):
        raise ValueError(f"f_target and f_ref must have the same shape (C, h, w), got "
                         f"{tuple(ft.shape)} and {tuple(fr.shape)}")
    C, h, w = ft.shape
    a = F.normalize(ft.reshape(C, -1).double().T, dim=1)          # (N, C)
    b = F.normalize(fr.reshape(C, -1).double().T, dim=1)
    sim = a @ b.T                                                  # (N_target, N_ref)
    N = h * w
    if ref_mask is not None:
        rm = mask_to_grid(ref_mask, (h, w)).reshape(-1).to(sim.device)
        if not bool(rm.any()):
            raise ValueError("ref_mask selects no pixel of the feature grid")
        sim = sim.masked_fill(~rm[None, :], -math.inf)
    idx = sim.argmax(dim=1)
    if target_mask is not None:
        tm = mask_to_grid(target_mask, (h, w)).reshape(-1).to(idx.device)
        idx = torch.where(tm, idx, torch.arange(N, device=idx.device))
    return idx


def warp(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rearrange tokens along a correspondence: ``x[..., idx, :]`` for token-major ``x``
    (…, N, d) (the notes' F̃_ref of eq 3.34)."""
    return x.index_select(-2, idx.to(x.device))


def image_correspondence(pipe, target, ref, sides: Sequence[int], *, t: int = 261,
                         blocks: Sequence[str] | None = None, prompt: str = "",
                         target_mask=None, ref_mask=None, seed: int = 0) -> dict:
    """Correspondences {side: (side², ) index tensor} between two images from diffusion features
    (:func:`diffnotes.features.diffusion_features`: the images noised to step ``t`` with the
    SAME noise (``seed``) and the output of ``blocks``, default the second decoder block, the
    DIFT choice ``up_blocks.1`` at t = 261), resized to each grid ``side`` (area averaging
    down, bilinear up) and matched by :func:`feature_correspondence`. ``target``/``ref``:
    (3, H, W) or (1, 3, H, W) tensors / HWC arrays in [0, 1]."""
    from ..features import diffusion_features

    ims = [_as_image_batch(im) for im in (target, ref)]
    if blocks is None:
        n_up = len(pipe.unet.config.up_block_types)
        blocks = (f"up_blocks.{min(1, n_up - 1)}",)
    feats = [diffusion_features(pipe, im, t=t, blocks=tuple(blocks), prompt=prompt,
                                generator=torch.Generator().manual_seed(seed)) for im in ims]
    out = {}
    for s in sides:
        ft, fr = (_resize(f.double(), s) for f in feats)
        out[s] = feature_correspondence(ft, fr, target_mask, ref_mask)
    return out


def _resize(f: torch.Tensor, side: int) -> torch.Tensor:
    """Features (B, C, h, w) on a side × side grid: area averaging to a coarser grid, bilinear
    interpolation to a finer one (area "upsampling" would copy pixels and create exact ties)."""
    if side <= f.shape[-1]:
        return F.adaptive_avg_pool2d(f, (side, side))
    return F.interpolate(f, size=(side, side), mode="bilinear", align_corners=False)


def _as_image_batch(im) -> torch.Tensor:
    from .inversion import _image_tensor
    return _image_tensor(im).float()


class EyeForAnEyeController(AttentionController):
    """Eye-for-an-Eye's feature injection on rows [appearance, structure, output] (×2 under
    classifier-free guidance): in the selected layers and steps, the output row's projected
    features become ``M ⊙ warp(app) + (1 − M) ⊙ out`` (Ahmad's notes, eq 3.34) for the
    projections in ``inject`` ("qkv": Q', K', V' all from F'_out, eq 3.35; "kv": keys and
    values only), with ``corr[side]`` the correspondence and ``masks[side]`` the structure's
    mask on that grid (all ones without a mask). Because W_Q, W_K, W_V act token by token, the
    gather and a binary blend commute with them: blending the projections is blending the
    features F."""

    kinds = ("self",)
    APP, STRUCT, OUT = 0, 1, 2

    def __init__(self, layout, layers, windows, corr: dict, masks: dict, inject: str = "qkv",
                 min_side: int = 1):
        self.layout, self.layers, self.windows = layout, set(layers), dict(windows)
        self.corr, self.masks, self.inject, self.min_side = corr, masks, inject, min_side
        self.calls = 0

    def wants(self, kind, height, width):
        return kind == "self" and max(height, width) >= self.min_side

    def edit_qkv(self, q, k, v, info):
        if info.index not in self.layers:
            return q, k, v
        a, b = self.windows.get(info.res, (0, 0))
        if not a <= info.step < b or info.res not in self.corr:
            return q, k, v
        self.calls += 1
        idx = self.corr[info.res]
        m = self.masks[info.res].to(q.device, q.dtype)[None, :, None]     # (1, N, 1)
        n = self.layout.n_prompts
        for o in ((0, n) if self.layout.cfg else (0,)):
            for name, t in (("q", q), ("k", k), ("v", v)):
                if name in self.inject:
                    t[o + self.OUT] = m * warp(t[o + self.APP], idx) + (1 - m) * t[o + self.OUT]
        return q, k, v


def eye_for_an_eye(pipe, structure, appearance, *, structure_prompt: str = "",
                   appearance_prompt: str | None = None, structure_mask=None,
                   appearance_mask=None, adain: bool = True, inject: str = "qkv",
                   num_inference_steps: int = 20, guidance_scale: float = 1.0,
                   steps=(0.1, 0.9), low_res_steps=(0.1, 0.7), adain_steps=(0.2, 1.0),
                   min_res_fraction: float = 0.5, layers: Sequence[int] | None = None,
                   feature_t: int = 261, feature_blocks: Sequence[str] | None = None,
                   feature_seed: int = 0, generator: torch.Generator | None = None,
                   output_type: str = "pil", return_all: bool = False,
                   return_correspondence: bool = False):
    """Eye-for-an-Eye appearance transfer by semantic correspondence (Go et al.; Ahmad's notes,
    §3.6.2, eqs 3.32-3.36).

    1. Correspondence (eqs 3.32-3.33): diffusion features of both images
       (:func:`image_correspondence`, step ``feature_t``, ``feature_blocks``, the same noise
       ``feature_seed`` for both), nearest neighbours by cosine similarity on every selected
       layer's grid, candidates inside ``appearance_mask`` only.
    2. Invert both images by DDIM and denoise [appearance, structure, output] in one batch from
       [z_T^app, z_T^struct, z_T^struct]. In the selected decoder self-attention layers and
       steps (the rule and windows of :func:`cross_image_attention`; the notes and the paper's
       summary there give no layers or steps), the output's features become
       F'_out = F̃_app ⊙ M_struct + F_out ⊙ (1 − M_struct) (eq 3.34) and self-attention runs on
       Q', K', V' of F'_out (eq 3.35; ``inject="kv"`` keeps the output's own queries).
    3. With ``adain``: AdaIN of the output latent to the appearance latent (eq 3.36) at
       ``adain_steps``, inside the masks when given.

    Masks: binary (H, W) masks of the images (image or latent size; None = everything). Returns
    what :func:`cross_image_attention` returns; with ``return_correspondence`` also the dict
    {grid side: index tensor} as a second value. With structure = appearance and no masks the
    correspondence is the identity and the output is the plain reconstruction.
    Raises ``ValueError`` naming the argument for mismatched shapes, windows outside [0, 1],
    bad ``inject``, ``layers`` or masks.
    """
    appearance_prompt, N, gs, zs0, za0 = _prepare(
        pipe, structure, appearance, structure_prompt, appearance_prompt, num_inference_steps,
        guidance_scale, output_type)
    if inject not in ("qkv", "kv"):
        raise ValueError(f"inject must be 'qkv' or 'kv', got {inject!r}")
    layer_idx, windows, aw, smask, amask = _windows_and_masks(
        pipe, N, zs0, za0, steps, low_res_steps, adain_steps, min_res_fraction, layers,
        structure_mask, appearance_mask)
    # images for the features (decode latents given as input)
    ims = [_to_image(pipe, im, z) for im, z in ((structure, zs0), (appearance, za0))]
    sides = sorted(windows)
    corr = image_correspondence(pipe, ims[0], ims[1], sides, t=feature_t, blocks=feature_blocks,
                                prompt="", target_mask=structure_mask, ref_mask=appearance_mask,
                                seed=feature_seed)
    masks = {s: (mask_to_grid(structure_mask, s).reshape(-1).double() if structure_mask
                 is not None else torch.ones(s * s, dtype=torch.float64)) for s in sides}

    zT_s = _invert(pipe, zs0, structure_prompt, N)
    zT_a = zT_s if (appearance is structure and appearance_prompt == structure_prompt) else \
        _invert(pipe, za0, appearance_prompt, N)
    prompts = [appearance_prompt, structure_prompt, structure_prompt]
    uniq = list(dict.fromkeys(prompts))
    cond = encode_prompts(pipe, uniq)[[uniq.index(p) for p in prompts]]
    use_cfg = gs != 1.0
    null = encode_prompts(pipe, "") if use_cfg else None
    eps_model = pipe_eps_model(pipe, cond, null, gs if use_cfg else 1.0)
    ts = pipe_timesteps(pipe, N)
    acl = pipe_alphas_cumprod(pipe).tolist()
    a0, a1 = fraction_steps(aw[0], N), fraction_steps(aw[1], N)
    layout = BatchLayout(3, use_cfg)
    ctrl = EyeForAnEyeController(layout, layer_idx, windows, corr, masks, inject,
                                 min_side=min(windows) if windows else 10**9)
    store = AttentionStore(kinds=("self",), self_max_res=1, controller=ctrl, layout=layout)
    x = torch.cat([zT_a, zT_s, zT_s]).to(pipe.unet.device, pipe.unet.dtype)
    store.attach(pipe.unet)
    try:
        for i, t in enumerate(ts):
            a_prev = acl[ts[i + 1]] if i + 1 < len(ts) else 1.0
            with torch.no_grad():
                eps = eps_model(x, batch_timesteps(t, x))
            x = ddim_step(x, eps, acl[t], a_prev)
            if adain and a0 <= i < a1:
                x = torch.cat([x[:2], _adain_latent(x[2:3], x[0:1], smask, amask)])
    finally:
        store.detach()
    eye_for_an_eye.last_calls = ctrl.calls
    outs = _outputs(pipe, x[[2, 1, 0]], output_type)
    res = outs if return_all else outs[0]
    return (res, corr) if return_correspondence else res


def _to_image(pipe, im, z):
    c = pipe.unet.config.in_channels
    if isinstance(im, torch.Tensor) and im.ndim == 4 and im.shape[1] == c != 3:
        return decode_latents(pipe, z)
    return im
