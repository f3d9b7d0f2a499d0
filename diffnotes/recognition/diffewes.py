"""DiffewS: few-shot segmentation with a text-to-image diffusion UNet (Ahmad's notes, §5.14,
eqs 5.69–5.71; Zhu et al., "Unleashing the Potential of the Diffusion Model in Few-shot Semantic
Segmentation", NeurIPS 2024).

A query image and K support images with their masks (of one class) go through the UNet as one
batch. Three changes turn the text-to-image UNet into a few-shot segmenter:

* **KV-fusion self-attention** (eqs 5.69–5.70): in every self-attention layer the query rows
  attend to the keys and values of the query *and* of its supports,
  X_q' = softmax(Q_q [K_q; K_s]^T / √d) [V_q; V_s]. It is an ``edit_qkv`` hook of the one
  attention controller (:class:`KVFusion`), not a new processor. Support rows keep plain
  self-attention: their own keys and values, repeated K + 1 times so that every row of the
  batch has the same number of keys — repeating every key the same number of times leaves a
  softmax-weighted average unchanged (each weight is divided by K + 1 and each value counted
  K + 1 times), which :func:`kv_fusion_attention` tests.
* **Mask injection** (:func:`inject_mask`): the support latent z_s and the latent of its mask
  z_{m_s} are concatenated along channels (the UNet's ``conv_in`` is widened from 4 to 8 input
  channels; the new weights start at zero, so the widened UNet first computes what the shipped
  one did), or the support latent is multiplied by the mask.
* **Mask prediction** (eq 5.71): the UNet's output for the query row is read as the latent of the
  query mask, v_θ(z_s, z_q, z_{m_s}) ≈ z_{m_q}, trained with ‖z_{m_q} − v_θ‖² at one fixed time
  step (no noise: the query latent goes in as it is). The mask is the VAE decoding of that
  latent, thresholded at mid-grey.

The shipped model (``diffnotes/weights/diffewes``) is the shapes UNet fine-tuned this way on the
five training shapes; "heart" (held out of every training set of the project) is the novel class
of the evaluation. Commands::

    python -m diffnotes.recognition.diffewes train      # writes the weights and TRAINING.json
    python -m diffnotes.recognition.diffewes evaluate   # writes results/diffewes.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import AttentionController, AttentionStore
from ..utils import check_choice, check_int, check_tensor

__all__ = ["kv_fusion_attention", "KVFusion", "inject_mask", "widen_conv_in", "fss_loss",
           "mask_latents", "predict_mask_latents", "segment", "load", "build_model",
           "prototype_baseline", "color_baseline", "all_objects_baseline", "episodes", "evaluate", "train",
           "WEIGHTS_DIR", "RESULTS_PATH", "T_FIX", "MODES"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "diffewes"
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "diffewes.json"
#: the one time step the segmenter runs at (the query latent is not noised).
T_FIX = 100
#: mask-injection modes (Ahmad's notes, §5.14): channel concatenation or multiplication.
MODES = ("concat", "multiply")
TRAIN_SEED, TEST_SEED = 2024, 77_000


# ----------------------------------------------------------------------------- eqs 5.69-5.70
def kv_fusion_attention(x_q: torch.Tensor, x_s, w_q: torch.Tensor, w_k: torch.Tensor,
                        w_v: torch.Tensor) -> torch.Tensor:
    """KV-fusion self-attention on token features (Ahmad's notes, eqs 5.69–5.70).

    ``x_q`` (B, N_q, C): query-image tokens; ``x_s`` (B, N_s, C) or a list of such tensors (one per
    support image, N_s may differ from N_q); ``w_q, w_k, w_v`` (C, d). Returns (B, N_q, d):
    softmax(Q_q K_qs^T / √d) V_qs with Q_q = X_q W_q, K_qs = [X_q W_k; X_s W_k],
    V_qs = [X_q W_v; X_s W_v].

    With the support equal to the query (x_s = x_q) it equals plain self-attention
    softmax(Q K^T/√d) V: every key appears twice, so each softmax weight is halved and each
    value counted twice. Raises ``ValueError`` when the feature sizes C of query and support (or
    of the weights) differ.
    """
    check_tensor(x_q, "x_q", ndim=3)
    sup = list(x_s) if isinstance(x_s, (list, tuple)) else [x_s]
    for j, s in enumerate(sup):
        check_tensor(s, f"x_s[{j}]", ndim=3)
        if s.shape[0] != x_q.shape[0] or s.shape[2] != x_q.shape[2]:
            raise ValueError(f"x_s[{j}] must have shape ({x_q.shape[0]}, N_s, {x_q.shape[2]}) "
                             f"like x_q {tuple(x_q.shape)} (batch and feature size), got "
                             f"{tuple(s.shape)}")
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        check_tensor(w, name, ndim=2)
        if w.shape[0] != x_q.shape[2]:
            raise ValueError(f"{name} must have shape ({x_q.shape[2]}, d), got {tuple(w.shape)}")
    q = x_q @ w_q                                               # Q_q = X_q W_q      (5.69)
    k = torch.cat([x_q @ w_k] + [s @ w_k for s in sup], 1)      # K_qs = [K_q; K_s]  (5.69)
    v = torch.cat([x_q @ w_v] + [s @ w_v for s in sup], 1)      # V_qs = [V_q; V_s]  (5.69)
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
    return a @ v                                                # eq 5.70


class KVFusion(AttentionController):
    """KV-fusion (Ahmad's notes, eqs 5.69–5.70) as an ``edit_qkv`` hook on every self-attention
    layer.

    Batch layout: rows ``0 … B−1`` are the queries, then ``B·K`` support rows, query b's supports
    at rows ``B + b·K … B + b·K + K − 1``. Query row b gets keys/values
    ``[K_q(b); K_s(b, 0); …; K_s(b, K−1)]``; support rows get their own keys/values repeated
    K + 1 times (the same number of keys; plain self-attention, see the module docstring).
    ``enabled = False`` switches the fusion off (the UNet is then the plain one, bitwise).
    Raises ``RuntimeError`` if the UNet batch does not hold B·(1 + K) rows.
    """

    kinds = ("self",)
    hooks = ("edit_qkv",)

    def __init__(self, n_query: int, n_shot: int):
        self.B = check_int(n_query, "n_query", min=1)
        self.K = check_int(n_shot, "n_shot", min=1)
        self.enabled = True

    def edit_qkv(self, q, k, v, info):
        if not self.enabled:
            return q, k, v
        B, K = self.B, self.K
        if q.shape[0] != B * (1 + K):
            raise RuntimeError(f"KVFusion expects {B * (1 + K)} rows ({B} queries, {K} supports "
                               f"each), got {q.shape[0]}")
        def fuse(x):                                   # (R, heads, N, d) -> (R, heads, (1+K)N, d)
            xq, xs = x[:B], x[B:].reshape(B, K, *x.shape[1:])
            fq = torch.cat([xq] + [xs[:, j] for j in range(K)], 2)       # [K_q; K_s]  (5.69)
            fs = torch.cat([x[B:]] * (K + 1), 2)                          # plain, repeated
            return torch.cat([fq, fs], 0)
        return q, fuse(k), fuse(v)


# ----------------------------------------------------------------------------- mask injection
def inject_mask(z: torch.Tensor, z_mask: torch.Tensor | None, mode: str = "concat",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet input of a support (Ahmad's notes, §5.14, "mask injection").

    ``mode="concat"``: [z_s, z_{m_s}] along channels (2C channels); ``z_mask=None`` gives the
    query's input [z_q, 0]. ``mode="multiply"``: z_s ⊙ m_s with ``mask`` the binary mask
    (B, 1, H, W) resized (area average) to the latent grid (C channels); ``mask=None`` leaves z.
    """
    check_choice(mode, "mode", MODES)
    check_tensor(z, "z", ndim=4)
    if mode == "concat":
        if z_mask is None:
            return torch.cat([z, torch.zeros_like(z)], 1)
        check_tensor(z_mask, "z_mask", ndim=4)
        if z_mask.shape != z.shape:
            raise ValueError(f"z_mask must have z's shape {tuple(z.shape)}, got "
                             f"{tuple(z_mask.shape)}")
        return torch.cat([z, z_mask], 1)
    if mask is None:
        return z
    m = F.adaptive_avg_pool2d(mask.to(z.dtype).reshape(z.shape[0], 1, *mask.shape[-2:]),
                              z.shape[-2:])
    return z * m


def widen_conv_in(unet, extra: int = 4):
    """A copy of ``unet`` whose ``conv_in`` takes ``extra`` more input channels, their weights
    zero: on inputs whose extra channels are anything, the copy computes exactly what ``unet``
    computes with the first channels (the zero-initialised extension of the notes)."""
    import copy

    new = copy.deepcopy(unet)
    old = unet.conv_in
    conv = torch.nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size,
                           old.stride, old.padding, dtype=old.weight.dtype,
                           device=old.weight.device)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :old.in_channels] = old.weight
        conv.bias.copy_(old.bias)
    new.conv_in = conv
    new.register_to_config(in_channels=old.in_channels + extra)
    return new


def fss_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_fss = E ‖z_{m_q} − v_θ(z_s, z_q, z_{m_s})‖² (Ahmad's notes, eq 5.71), the mean over
    elements (zero iff the prediction equals the target)."""
    check_tensor(pred, "pred")
    check_tensor(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    return ((target - pred) ** 2).mean()                        # eq 5.71


# ----------------------------------------------------------------------------- the segmenter
def _vae_sf(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", 1.0))


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Latents (scaled as the UNet sees them) of images (B, 3, H, W) in [0, 1]."""
    x = (images * 2 - 1).to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mean * _vae_sf(vae)


@torch.no_grad()
def mask_latents(vae, masks: torch.Tensor) -> torch.Tensor:
    """z_m: the VAE latent of a binary mask (B, H, W) drawn as a grey image (−1 background,
    +1 object on all three channels), as the notes encode the masks."""
    m = masks.to(vae.dtype)[:, None].expand(-1, 3, -1, -1) * 2 - 1
    return vae.encode(m.to(vae.device)).latent_dist.mean * _vae_sf(vae)


@torch.no_grad()
def decode_masks(vae, z: torch.Tensor) -> torch.Tensor:
    """Binary masks (B, H, W) from mask latents: VAE decoding, channel mean > 0."""
    return vae.decode(z / _vae_sf(vae)).sample.mean(1) > 0


def predict_mask_latents(unet, z_q: torch.Tensor, z_s: torch.Tensor, z_ms: torch.Tensor,
                         context: torch.Tensor, t: int = T_FIX, fusion: bool = True,
                         mode: str = "concat", masks_s: torch.Tensor | None = None):
    """v_θ(z_s, z_q, z_{m_s}) (Ahmad's notes, eq 5.71): one UNet pass over [queries; supports]
    with :class:`KVFusion` attached. ``z_q`` (B, C, h, w); ``z_s``, ``z_ms`` (B, K, C, h, w);
    ``context`` (1, L, D) text embedding (the null prompt); ``masks_s`` (B, K, H, W) for
    ``mode="multiply"``. Returns the query rows' outputs (B, C, h, w)."""
    check_tensor(z_q, "z_q", ndim=4)
    check_tensor(z_s, "z_s", ndim=5)
    B, K = z_s.shape[:2]
    if z_s.shape[0] != z_q.shape[0] or z_s.shape[2:] != z_q.shape[1:]:
        raise ValueError(f"z_s must have shape ({z_q.shape[0]}, K, {', '.join(map(str, z_q.shape[1:]))}) "
                         f"(supports of the query's size), got {tuple(z_s.shape)}")
    flat_s = z_s.reshape(B * K, *z_s.shape[2:])
    if mode == "concat":
        xq = inject_mask(z_q, None, "concat")
        xs = inject_mask(flat_s, z_ms.reshape(B * K, *z_ms.shape[2:]), "concat")
    else:
        xq = z_q
        xs = inject_mask(flat_s, None, "multiply", None if masks_s is None else
                         masks_s.reshape(B * K, 1, *masks_s.shape[-2:]))
    x = torch.cat([xq, xs], 0)
    ctrl = KVFusion(B, K)
    ctrl.enabled = fusion
    store = AttentionStore(kinds=("self",), self_max_res=1, controller=ctrl)
    store.attach(unet)
    try:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        out = unet(x, tt, encoder_hidden_states=context.expand(x.shape[0], -1, -1)).sample
    finally:
        store.detach()
    return out[:B]


def _check_episode(query_images, support_images, support_masks):
    check_tensor(query_images, "query_images", ndim=4)
    check_tensor(support_images, "support_images", ndim=5)
    check_tensor(support_masks, "support_masks", ndim=4)
    B, K = support_images.shape[:2]
    if support_images.shape[0] != query_images.shape[0]:
        raise ValueError(f"support_images must have one row per query ({query_images.shape[0]}),"
                         f" got shape {tuple(support_images.shape)}")
    if tuple(support_images.shape[2:]) != tuple(query_images.shape[1:]):
        raise ValueError(f"support images must have the query images' size "
                         f"{tuple(query_images.shape[1:])}, got {tuple(support_images.shape[2:])}")
    if tuple(support_masks.shape) != (B, K, *query_images.shape[-2:]):
        raise ValueError(f"support_masks must have shape {(B, K, *query_images.shape[-2:])}, got "
                         f"{tuple(support_masks.shape)}")


@torch.no_grad()
def segment(unet, vae, context: torch.Tensor, query_images: torch.Tensor,
            support_images: torch.Tensor, support_masks: torch.Tensor, t: int = T_FIX,
            fusion: bool = True, mode: str = "concat") -> torch.Tensor:
    """Few-shot segmentation (Ahmad's notes, §5.14): masks (B, H, W) of the class shown by the
    supports in each query.

    ``query_images`` (B, 3, H, W) in [0, 1]; ``support_images`` (B, K, 3, H, W); ``support_masks``
    (B, K, H, W) bool. ``unet`` is the DiffewS model (:func:`load`), ``vae`` the shapes VAE,
    ``context`` the null-prompt embedding. Raises ``ValueError`` when support and query sizes
    differ."""
    _check_episode(query_images, support_images, support_masks)
    B, K = support_images.shape[:2]
    dt = unet.dtype
    z_q = encode_images(vae, query_images).to(dt)
    z_s = encode_images(vae, support_images.flatten(0, 1)).to(dt)
    z_ms = mask_latents(vae, support_masks.flatten(0, 1)).to(dt)
    z = predict_mask_latents(unet, z_q, z_s.reshape(B, K, *z_s.shape[1:]),
                             z_ms.reshape(B, K, *z_ms.shape[1:]), context.to(dt), t, fusion,
                             mode, support_masks)
    return decode_masks(vae, z.to(vae.dtype))


def build_model(shapes_unet):
    """The untrained DiffewS model: the shapes UNet with ``conv_in`` widened to 8 channels."""
    return widen_conv_in(shapes_unet, shapes_unet.config.in_channels)


def load(device=None, dtype=None):
    """The shipped DiffewS UNet (``diffnotes/weights/diffewes``, diffusers ``from_pretrained``)."""
    from diffusers import UNet2DConditionModel

    if not (WEIGHTS_DIR / "config.json").exists():
        raise FileNotFoundError(f"no DiffewS weights in {WEIGHTS_DIR}; train them with "
                                f"`python -m diffnotes.recognition.diffewes train`")
    unet = UNet2DConditionModel.from_pretrained(str(WEIGHTS_DIR))
    unet.eval()
    if device is not None or dtype is not None:
        unet.to(device=device, dtype=dtype)
    return unet


def null_context(pipe) -> torch.Tensor:
    """The empty prompt's text embedding (DiffewS conditions on no text)."""
    from ..editing.common import encode_prompts
    return encode_prompts(pipe, "")


# ----------------------------------------------------------------------------- data
def class_masks(scenes, shape: str) -> np.ndarray:
    """(N, H, W) bool: the union of the masks of the objects of ``shape`` in each scene."""
    out = np.zeros(scenes.masks.shape[:1] + scenes.masks.shape[2:], dtype=bool)
    for i, objs in enumerate(scenes.objects):
        for k, o in enumerate(objs):
            if o["shape"] == shape:
                out[i] |= scenes.masks[i, k]
    return out


def episodes(shape: str, n: int, n_shot: int, seed: int = TEST_SEED, query_min_objects: int = 2):
    """``n`` episodes of class ``shape``: (query images (n, 3, H, W), query masks (n, H, W),
    support images (n, K, 3, H, W), support masks (n, K, H, W)), drawn with ``seed`` from scenes
    that contain the shape (held-out shapes included). Queries hold ``query_min_objects``–3
    objects (by default at least one other object besides the class, so that "segment every
    object" is not the answer); supports 1–3. All scenes are distinct."""
    from ..data.shapes import generate_scenes

    def pick(count, min_objects, s):
        sc = generate_scenes(12 * count + 64, seed=s, include_held_out=True,
                             min_objects=min_objects)
        m = class_masks(sc, shape)
        idx = np.flatnonzero(m.reshape(len(m), -1).any(1))
        if len(idx) < count:
            raise ValueError(f"only {len(idx)} scenes with a {shape}; ask for fewer episodes")
        idx = np.random.default_rng(s).permutation(idx)[:count]
        return torch.from_numpy(sc.images[idx]).permute(0, 3, 1, 2), torch.from_numpy(m[idx])

    qi, qm = pick(n, query_min_objects, seed)
    si, sm = pick(n * n_shot, 1, seed + 1)
    return (qi, qm, si.reshape(n, n_shot, *si.shape[1:]), sm.reshape(n, n_shot, *sm.shape[1:]))


# ----------------------------------------------------------------------------- baselines
@torch.no_grad()
def prototype_baseline(pipe, query_images, support_images, support_masks, t: int = T_FIX,
                       block: str = "up_blocks.1") -> torch.Tensor:
    """Nearest prototype on diffusion features (the usual few-shot baseline): the shipped UNet's
    ``block`` output at time step ``t`` (:func:`diffnotes.features.diffusion_features`); the
    object and background prototypes are the masked means of the support features; a query
    pixel is object if its cosine similarity to the object prototype exceeds that to the
    background one (similarities upsampled bilinearly to the image)."""
    from ..features import diffusion_features

    _check_episode(query_images, support_images, support_masks)
    B, K = support_images.shape[:2]
    H, W = query_images.shape[-2:]
    g = torch.Generator().manual_seed(0)
    fq = diffusion_features(pipe, query_images, t=t, blocks=(block,), generator=g)
    fs = diffusion_features(pipe, support_images.flatten(0, 1), t=t, blocks=(block,), generator=g)
    fs = fs.reshape(B, K, *fs.shape[1:])
    m = F.interpolate(support_masks.flatten(0, 1)[:, None].float(), size=fs.shape[-2:],
                      mode="area").reshape(B, K, 1, *fs.shape[-2:])
    p_fg = (fs * m).sum((1, 3, 4)) / m.sum((1, 3, 4)).clamp_min(1e-6)         # (B, C)
    p_bg = (fs * (1 - m)).sum((1, 3, 4)) / (1 - m).sum((1, 3, 4)).clamp_min(1e-6)
    cos = lambda p: F.cosine_similarity(fq, p[:, :, None, None], dim=1)       # noqa: E731
    d = (cos(p_fg) - cos(p_bg))[:, None]
    return F.interpolate(d, size=(H, W), mode="bilinear", align_corners=False)[:, 0] > 0


@torch.no_grad()
def color_baseline(query_images, support_images, support_masks, tau: float = 0.2
                   ) -> torch.Tensor:
    """The support mask's colour threshold: query pixels within RGB distance ``tau`` of the mean
    colour of the support objects (the shapes' colours are drawn independently of their shape,
    so this baseline finds the class only when the colours happen to agree)."""
    _check_episode(query_images, support_images, support_masks)
    m = support_masks[:, :, None].float()
    c = (support_images * m).sum((1, 3, 4)) / m.sum((1, 3, 4)).clamp_min(1e-6)   # (B, 3)
    return (query_images - c[:, :, None, None]).norm(dim=1) < tau


def all_objects_baseline(query_images) -> torch.Tensor:
    """Every object of the query, whatever its class (the union of the project's segmenter
    :func:`diffnotes.models.eval_shapes.segment_objects`): what a class-agnostic model gets."""
    from ..models.eval_shapes import segment_objects

    out = torch.zeros(query_images.shape[0], *query_images.shape[-2:], dtype=torch.bool)
    for i, im in enumerate(query_images.permute(0, 2, 3, 1).double().numpy()):
        for m in segment_objects(im):
            out[i] |= torch.from_numpy(m)
    return out


def _iou_stats(pred: torch.Tensor, gt: torch.Tensor) -> tuple[int, int]:
    return int((pred & gt).sum()), int((pred | gt).sum())


# ----------------------------------------------------------------------------- evaluate
def evaluate(n: int = 20, shots: Sequence[int] = (1, 5), seed: int = TEST_SEED,
             batch: int = 10, out: Path | None = RESULTS_PATH, progress: bool = True) -> dict:
    """mIoU of DiffewS and of the baselines on ``n`` episodes per class (the five training shapes
    and the novel "heart"), for each number of shots. The IoU of a class is the sum over its
    episodes of |pred ∧ gt| over the sum of |pred ∨ gt| (the few-shot segmentation convention);
    "train mIoU" is the mean over the five training shapes. Writes JSON to ``out``."""
    from tqdm.auto import tqdm

    from ..data.shapes import SHAPES, TRAIN_SHAPES
    from ..models.load import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline("shapes")
    unet, vae, ctx = load(), pipe.vae, null_context(pipe)
    methods = ("diffewes", "diffewes_no_fusion", "prototype", "color", "all_objects")
    stats = {f"{m}@{k}": {} for m in methods for k in shots}
    secs = {f"{m}@{k}": 0.0 for m in methods for k in shots}
    for shape in tqdm(SHAPES, disable=not progress, desc="classes"):
        for k in shots:
            qi, qm, si, sm = episodes(shape, n, k, seed=seed + 7 * SHAPES.index(shape) + k)
            for m in methods:
                if m == "diffewes_no_fusion" and k != min(shots):
                    continue                     # the ablation is measured at the fewest shots
                inter = union = 0
                for a in range(0, n, batch):
                    sl = slice(a, a + batch)
                    t0 = time.perf_counter()
                    if m.startswith("diffewes"):
                        pred = segment(unet, vae, ctx, qi[sl], si[sl], sm[sl],
                                       fusion=(m == "diffewes"))
                    elif m == "prototype":
                        pred = prototype_baseline(pipe, qi[sl], si[sl], sm[sl])
                    elif m == "color":
                        pred = color_baseline(qi[sl], si[sl], sm[sl])
                    else:
                        pred = all_objects_baseline(qi[sl])
                    secs[f"{m}@{k}"] += time.perf_counter() - t0
                    i_, u_ = _iou_stats(pred, qm[sl])
                    inter, union = inter + i_, union + u_
                stats[f"{m}@{k}"][shape] = inter / max(union, 1)
    rows = {}
    for key, per in stats.items():
        if not per:
            continue
        rows[key] = dict(per_class=per, novel_iou=per["heart"],
                         train_miou=float(np.mean([per[s] for s in TRAIN_SHAPES])),
                         seconds_per_image=secs[key] / (n * len(SHAPES)))
    rec = dict(
        method="DiffewS (KV-fusion self-attention, mask concatenation, eq 5.71), shapes UNet "
               "fine-tuned on the five training shapes",
        novel_class="heart", train_classes=list(TRAIN_SHAPES), episodes_per_class=n,
        episodes="queries: scenes of 2-3 objects holding the class; supports: 1-3 objects; "
                 "test seeds disjoint from training",
        shots=list(shots), seed=seed, t=T_FIX,
        metric="per-class IoU = Σ|pred∧gt| / Σ|pred∨gt| over the episodes; train_miou = mean "
               "over the training shapes",
        baselines=dict(prototype="nearest prototype (object vs background) on the shipped UNet's "
                                 "up_blocks.1 features at t=100",
                       color="support objects' mean colour, RGB distance < 0.2",
                       all_objects="every object of the query (class-agnostic segmentation "
                                   "by diffnotes.models.eval_shapes.segment_objects)",
                       diffewes_no_fusion="the trained DiffewS UNet with KV fusion switched off "
                                          "(the query never sees the support)"),
        results=rows,
        command="python -m diffnotes.recognition.diffewes evaluate",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        threads=torch.get_num_threads())
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rec, indent=1))
    return rec


# ----------------------------------------------------------------------------- train
def _encode_pool(pipe, n_scenes: int, seed: int, batch: int = 64):
    """Latents of training scenes and of every (scene, training shape) class mask."""
    from ..data.shapes import TRAIN_SHAPES, generate_scenes

    # 2-3 objects per scene: the query holds other shapes besides the support's class, so the
    # mask to predict depends on the support (with single-object queries "segment every
    # object" would be the answer, and the model could ignore the support)
    sc = generate_scenes(n_scenes, seed=seed, min_objects=2)  # held-out shapes never appear
    img = torch.from_numpy(sc.images).permute(0, 3, 1, 2)
    z = torch.cat([encode_images(pipe.vae, img[a:a + batch]) for a in range(0, n_scenes, batch)])
    pairs, masks = [], []
    for c, shape in enumerate(TRAIN_SHAPES):
        m = class_masks(sc, shape)
        for i in np.flatnonzero(m.reshape(n_scenes, -1).any(1)):
            pairs.append((int(i), c))
            masks.append(m[i])
    mt = torch.from_numpy(np.stack(masks))
    zm = torch.cat([mask_latents(pipe.vae, mt[a:a + batch]) for a in range(0, len(mt), batch)])
    return z, zm, pairs


def train(steps: int = 1500, batch: int = 6, lr: float = 3e-4, n_scenes: int = 1500,
          max_minutes: float = 19.0, threads: int = 1, seed: int = TRAIN_SEED,
          out: Path = WEIGHTS_DIR, progress: bool = True) -> dict:
    """Fine-tune the shapes UNet into DiffewS (eq 5.71): 1-shot episodes of the five training
    shapes, AdamW on every UNet weight (the model is 4.3 MB), at most ``max_minutes`` of wall
    time. Writes ``out`` (diffusers ``save_pretrained``) and ``out/TRAINING.json``."""
    from tqdm.auto import tqdm

    from ..models.load import load_pipeline

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    wall0, cpu0 = time.time(), time.process_time()
    pipe = load_pipeline("shapes")
    for p_ in pipe.vae.parameters():
        p_.requires_grad_(False)
    ctx = null_context(pipe).detach()
    z, zm, pairs = _encode_pool(pipe, n_scenes, seed)
    by_class: dict[int, list[int]] = {}
    for j, (_, c) in enumerate(pairs):
        by_class.setdefault(c, []).append(j)
    classes = sorted(by_class)
    unet = build_model(pipe.unet)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses, done = [], 0
    bar = tqdm(range(steps), disable=not progress, desc="DiffewS")
    t_start = time.time()
    budget = 60 * max_minutes - (t_start - wall0)             # seconds left for the steps
    for step in bar:
        frac = max(step / steps, (time.time() - t_start) / budget)   # of the run done
        if frac >= 1:
            break
        for g_ in opt.param_groups:                            # warm-up, then cosine decay
            g_["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        qs, ss = [], []
        for _ in range(batch):
            c = classes[rng.integers(len(classes))]
            while True:
                a, b = rng.choice(by_class[c], 2, replace=False)
                if pairs[a][0] != pairs[b][0]:
                    break
            qs.append(a)
            ss.append(b)
        qi = [pairs[a][0] for a in qs]
        si = [pairs[b][0] for b in ss]
        pred = predict_mask_latents(unet, z[qi], z[si][:, None], zm[ss][:, None], ctx)
        loss = fss_loss(pred, zm[qs])                          # eq 5.71
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if not progress:
                print(f"step {step} loss {np.mean(losses[-20:]):.4f} "
                      f"{time.time() - wall0:.0f}s", flush=True)
    unet.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out))
    rec = dict(command="python -m diffnotes.recognition.diffewes train", steps=done,
               planned_steps=steps, batch_episodes=batch, shots=1, lr=lr, optimizer="AdamW, "
               "50 warm-up steps, cosine decay over max(steps, wall-time budget)", n_scenes=n_scenes, scenes="2-3 objects (generate_scenes(min_objects=2))", seed=seed,
               n_class_masks=len(pairs), t=T_FIX, mode="concat", trained="every UNet weight "
               "(conv_in widened 4→8 channels, new weights zero-initialised)",
               start="diffnotes/weights/shapes/unet", held_out="heart (never in training)",
               loss_first_100=float(np.mean(losses[:100])), loss_last_100=float(np.mean(losses[-100:])),
               loss_every_20=[round(float(np.mean(losses[a:a + 20])), 4)
                              for a in range(0, len(losses), 20)],
               wall_seconds=round(time.time() - wall0, 1),
               cpu_seconds=round(time.process_time() - cpu0, 1), threads=threads,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               torch=torch.__version__)
    (out / "TRAINING.json").write_text(json.dumps(rec, indent=1))
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m diffnotes.recognition.diffewes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--steps", type=int, default=1500)
    tr.add_argument("--batch", type=int, default=6)
    tr.add_argument("--lr", type=float, default=3e-4)
    tr.add_argument("--n-scenes", type=int, default=1500)
    tr.add_argument("--max-minutes", type=float, default=19.0)
    tr.add_argument("--threads", type=int, default=1)
    tr.add_argument("--quiet", action="store_true")
    tr.add_argument("--out", default=str(WEIGHTS_DIR))
    ev = sub.add_parser("evaluate")
    ev.add_argument("--n", type=int, default=20)
    ev.add_argument("--out", default=str(RESULTS_PATH))
    a = ap.parse_args(argv)
    if a.cmd == "train":
        print(json.dumps(train(a.steps, a.batch, a.lr, a.n_scenes, a.max_minutes, a.threads,
                               out=Path(a.out), progress=not a.quiet), indent=1))
    else:
        torch.set_num_threads(1)
        rec = evaluate(n=a.n, out=Path(a.out))
        print(json.dumps({k: (v["novel_iou"], v["train_miou"]) for k, v in rec["results"].items()},
                         indent=1))


if __name__ == "__main__":
    main()
