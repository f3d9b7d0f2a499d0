"""Break-A-Scene: several concepts ("handles") learned from one image with masks (Ahmad's notes,
§4.4.3, eqs 4.5–4.7; Avrahami et al. 2023, "Break-A-Scene: Extracting Multiple Concepts from a
Single Image", eqs 1–3).

Given one image, ``N`` masks ``M_i`` and ``N`` new tokens ``v_i``, every step draws a subset
``s ⊆ {1..N}`` (its size uniform in 1..N, then a uniform subset: *union sampling*), writes the
prompt ``"a photo of [v_i] and [v_j]"`` (the official code's form) and minimises

    L_rec  = E ‖(ε − ε_θ(z_t, t, p_s)) ⊙ M_s‖²,  M_s = ∪_{i∈s} M_i        (eq 4.5)
    L_attn = E ‖CA_θ(v_i, z_t) − M_i‖²  (mean over the handles of s)       (eq 4.6)
    L      = L_rec + λ_attn L_attn,  λ_attn = 1e-2 (official)             (eq 4.7)

``L_rec`` is :func:`~diffnotes.personalization.common.diffusion_loss` with ``pixel_weight=M_s``
at the latent resolution, reduced as the official ``F.mse_loss(pred·M, target·M)``: the mean
over *all* pixels, so a mask covering a quarter of the image counts a quarter of them (ε = 1,
ε_θ = 0, 25 % mask → 0.25). ``CA_θ(v_i, z_t)`` is the cross-attention probability of ``v_i``'s
token, averaged over heads and over the encoder and decoder layers at the map resolution
(official: 16×16 on Stable Diffusion's 64×64 latent; here the UNet's second-coarsest
resolution, :func:`diffnotes.editing.binding.default_attention_res`: 16 on SD and on the shapes
UNet, 10 on the SD-1.5-layout tiny one), divided by its maximum, against the mask resized to
that grid. The maps come with their graph from :class:`diffnotes.attention.AttentionCollector`
(as Attend-and-Excite takes them).

Two phases (official ``train.py``): phase 1 trains the handles only (lr 5e-4, 400 steps),
phase 2 the handles and the UNet (lr 2e-6, 400 steps). On the shapes model the step counts are
scaled down and the learning rates up (:data:`SHAPES_DEFAULTS`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import AttentionCollector, layer_resolutions, attention_layers, \
    word_token_indices
from ..utils import check_int, check_positive, check_range
from .common import (ConceptSet, add_placeholder, diffusion_loss, encode_images, encode_text,
                     freeze, tensor_bytes, train_loop)

__all__ = ["union_mask", "sample_subset", "subset_prompt", "masked_loss", "attention_loss",
           "attention_layers_for_loss", "break_a_scene", "BreakAScene", "OFFICIAL",
           "SHAPES_DEFAULTS", "heart_purple_scene", "evaluate_scene", "EVAL_CONFIGS"]

#: the official google/break-a-scene train.py defaults
OFFICIAL = dict(phase1_steps=400, phase2_steps=400, phase1_lr=5e-4, phase2_lr=2e-6,
                lambda_attn=1e-2)
#: scaled for the shipped shapes model (≤ 60 s on 2 CPU cores)
SHAPES_DEFAULTS = dict(phase1_steps=60, phase2_steps=30, phase1_lr=2e-2, phase2_lr=1e-4,
                       lambda_attn=1e-2)


def union_mask(masks: torch.Tensor, subset: Sequence[int]) -> torch.Tensor:
    """M_s = ∪_{i∈s} M_i (Ahmad's notes, eq 4.5): the element-wise max of the masks ``(N, H,
    W)`` in ``subset``. Raises ``ValueError`` naming ``subset`` if empty or out of range."""
    subset = list(subset)
    if not subset or any(not 0 <= i < len(masks) for i in subset):
        raise ValueError(f"subset must be a non-empty list of mask indices in [0, {len(masks)}),"
                         f" got {subset}")
    return masks[subset].amax(0)


def sample_subset(n: int, generator: torch.Generator) -> list[int]:
    """Union sampling: a subset size uniform in 1..n, then a uniformly random subset of that
    size (sorted) — the official code's ``random.randrange(1, n + 1)`` + ``random.sample``."""
    k = int(torch.randint(1, n + 1, (1,), generator=generator))
    return sorted(torch.randperm(n, generator=generator)[:k].tolist())


def subset_prompt(placeholders: Sequence[str], subset: Sequence[int]) -> str:
    """``"a photo of " + " and ".join(tokens)`` (the official prompt)."""
    return "a photo of " + " and ".join(placeholders[i] for i in subset)


def masked_loss(eps: torch.Tensor, eps_pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """‖(ε − ε_θ) ⊙ M‖² averaged over all elements (eq 4.5 as the official code reduces it):
    ε = 1, ε_θ = 0 and a 25 % mask give 0.25. ``mask`` broadcasts to ``eps``."""
    return F.mse_loss(eps_pred * mask, eps * mask)


def attention_layers_for_loss(unet, res: int | None = None, latent_hw=None) -> list[str]:
    """The cross-attention layers whose maps enter L_attn: those of the encoder and decoder
    (not the middle block, as the official code's ``from_where=("up", "down")``) at resolution
    ``res`` (default :func:`diffnotes.editing.binding.default_attention_res`)."""
    from ..editing.binding import default_attention_res

    res = default_attention_res(unet, latent_hw) if res is None else res
    names = attention_layers(unet, "cross")
    rs = layer_resolutions(unet, "cross", latent_hw)
    out = [n for n, r in zip(names, rs) if r == res and not n.startswith("mid")]
    if not out:
        raise ValueError(f"res must be a cross-attention resolution of the UNet's encoder or "
                         f"decoder ({sorted(set(rs))}), got {res}")
    return out


def attention_loss(maps: torch.Tensor, token_idx: Sequence[Sequence[int]], masks: torch.Tensor
                   ) -> torch.Tensor:
    """L_attn (Ahmad's notes, eq 4.6; official ``train.py``): for each handle, its token's map
    ``maps[..., idx]`` (h, w) (mean over the handle's tokens) divided by its maximum, MSE against
    the mask ``masks[i]`` (h, w) in [0, 1], averaged over the handles. Zero when the normalised
    map equals a binary mask. ``maps`` (h, w, M)."""
    total = 0.0
    for idx, m in zip(token_idx, masks):
        a = maps[..., list(idx)].mean(-1)
        a = a / a.max()
        total = total + F.mse_loss(a, m.to(a.dtype))
    return total / len(token_idx)


@dataclass
class BreakAScene:
    """Learned handles: ``placeholders`` and their ``token_ids``, per-step ``losses`` (total,
    rec, attn), ``phase`` of each step, the seconds; the pipeline was tuned in place."""
    placeholders: list
    token_ids: list
    losses: list
    rec: list
    attn: list
    seconds: float
    trained_parameters: int
    file_bytes: int
    extra: dict = field(default_factory=dict)


def _check_scene(image, masks, placeholders):
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be one (H, W, 3) image in [0, 1], got shape {img.shape}")
    m = np.asarray(masks)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1:] != img.shape[:2] or len(m) == 0:
        raise ValueError(f"masks must be (N, H, W) with (H, W) = the image's {img.shape[:2]}, "
                         f"got shape {m.shape}")
    if isinstance(placeholders, str):
        placeholders = [placeholders]
    placeholders = list(placeholders)
    if len(placeholders) != len(m):
        raise ValueError(f"placeholders must give one token per mask ({len(m)}), got "
                         f"{placeholders!r}")
    if m.reshape(len(m), -1).sum(1).min() == 0:
        raise ValueError("masks: every mask must cover at least one pixel")
    return img, m.astype(np.float32), placeholders


def break_a_scene(pipe, image, masks, placeholders: Sequence[str], initializers=None, *,
                  phase1_steps: int = SHAPES_DEFAULTS["phase1_steps"],
                  phase2_steps: int = SHAPES_DEFAULTS["phase2_steps"],
                  phase1_lr: float = SHAPES_DEFAULTS["phase1_lr"],
                  phase2_lr: float = SHAPES_DEFAULTS["phase2_lr"],
                  lambda_attn: float = SHAPES_DEFAULTS["lambda_attn"], attn_res: int | None = None,
                  batch_size: int = 2, seed: int = 0, progress: bool = True) -> BreakAScene:
    """Learn one handle per mask from one image (Ahmad's notes, eqs 4.5–4.7; Break-A-Scene
    eqs 1–3, §3.2), tuning ``pipe`` in place.

    ``image`` (H, W, 3) in [0, 1]; ``masks`` (N, H, W) bool (one per concept); ``placeholders``
    N new tokens; ``initializers`` N known words (or None: mean embedding). Phase 1:
    ``phase1_steps`` steps on the handles' embedding rows only (the other rows are restored
    after every step), lr ``phase1_lr``. Phase 2: ``phase2_steps`` steps on the rows and every
    UNet weight, lr ``phase2_lr``. Each step: ``batch_size`` draws of union sampling
    (:func:`sample_subset`), L_rec (eq 4.5) + ``lambda_attn`` · L_attn (eq 4.6) on the maps at
    ``attn_res``. ``phase2_steps = 0`` is token optimisation alone; ``lambda_attn = 0`` drops the
    attention loss. Raises ``ValueError`` naming ``image``, ``masks`` (not matching the image),
    ``placeholders``, ``initializers``, the steps or the learning rates.
    """
    img, m, placeholders = _check_scene(image, masks, placeholders)
    phase1_steps = check_int(phase1_steps, "phase1_steps", min=0)
    phase2_steps = check_int(phase2_steps, "phase2_steps", min=0)
    if phase1_steps + phase2_steps == 0:
        raise ValueError("phase1_steps + phase2_steps must be >= 1, got 0")
    phase1_lr, phase2_lr = check_positive(phase1_lr, "phase1_lr"), check_positive(phase2_lr,
                                                                                  "phase2_lr")
    lambda_attn = check_range(lambda_attn, "lambda_attn", 0)
    batch_size = check_int(batch_size, "batch_size", min=1)
    N = len(m)
    if initializers is None:
        initializers = [None] * N
    if len(initializers) != N:
        raise ValueError(f"initializers must give one word (or None) per mask ({N}), got "
                         f"{initializers!r}")
    unet, enc, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    ids = [add_placeholder(pipe, p, i)[0] for p, i in zip(placeholders, initializers)]
    freeze(unet, enc)
    table = enc.get_input_embeddings().weight
    frozen = table.detach().clone()
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[ids] = False
    with torch.no_grad():
        z0 = encode_images(pipe, img[None])                              # (1, C, h, w)
    hw = z0.shape[-2:]
    mt = torch.from_numpy(m)[:, None]
    lat_masks = F.interpolate(mt, size=tuple(hw), mode="nearest")[:, 0]  # (N, h, w)
    layers = attention_layers_for_loss(unet, attn_res, tuple(hw))
    res = layer_resolutions(unet, "cross", tuple(hw))[attention_layers(unet, "cross").index(
        layers[0])]
    att_masks = F.interpolate(mt, size=(res, res), mode="nearest")[:, 0]
    ac = pipe.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(int(seed))
    rec_log, attn_log = [], []
    collector = AttentionCollector(kinds=("cross",), layers=layers)

    def loss_fn(step):
        subsets = [sample_subset(N, g) for _ in range(batch_size)]
        prompts = [subset_prompt(placeholders, s) for s in subsets]
        cond = encode_text(pipe, prompts, grad=True)
        w = torch.stack([union_mask(lat_masks, s) for s in subsets])[:, None]
        collector.clear()
        rec = diffusion_loss(unet, z0.expand(batch_size, -1, -1, -1), cond, ac, generator=g,
                             pixel_weight=w)                                    # eq 4.5
        att = torch.zeros((), dtype=rec.dtype)
        if lambda_attn > 0:
            maps = torch.stack(collector.maps).mean(0)                          # (B, h*w, M)
            maps = maps.reshape(batch_size, res, res, maps.shape[-1])
            for b, s in enumerate(subsets):
                idx = [word_token_indices(prompts[b], placeholders[i], tok) for i in s]
                att = att + attention_loss(maps[b], idx, att_masks[s])          # eq 4.6
            att = att / batch_size
        rec_log.append(float(rec.detach()))
        attn_log.append(float(att.detach()))
        return rec + lambda_attn * att                                          # eq 4.7

    def restore(step):
        with torch.no_grad():
            table[keep] = frozen[keep]

    t0 = time.perf_counter()
    losses, phases = [], []
    collector.attach(unet)
    try:
        if phase1_steps:
            table.requires_grad_(True)
            r = train_loop([table], loss_fn, phase1_steps, phase1_lr, after_step=restore,
                           desc="Break-A-Scene phase 1", progress=progress)
            losses += r.losses
            phases += [1] * phase1_steps
        if phase2_steps:
            table.requires_grad_(True)
            unet.requires_grad_(True)
            r = train_loop([table] + [p for p in unet.parameters()], loss_fn, phase2_steps,
                           phase2_lr, after_step=restore, desc="Break-A-Scene phase 2",
                           progress=progress)
            losses += r.losses
            phases += [2] * phase2_steps
    finally:
        collector.detach()
        freeze(unet, enc)
    n_unet = sum(p.numel() for p in unet.parameters()) if phase2_steps else 0
    state = {p: table[i].detach() for p, i in zip(placeholders, ids)}
    fb = tensor_bytes(state) + (tensor_bytes(unet.state_dict()) if phase2_steps else 0)
    return BreakAScene(placeholders=placeholders, token_ids=ids, losses=losses, rec=rec_log,
                       attn=attn_log, seconds=time.perf_counter() - t0,
                       trained_parameters=int(N * table.shape[1] + n_unet), file_bytes=int(fb),
                       extra=dict(phases=phases, layers=layers, attn_res=res))


# ---------------------------------------------------------------------------- shapes experiment
def heart_purple_scene(seed: int = 3):
    """One generated scene: an orange heart on the left and a purple square on the right,
    rendered by ``diffnotes.data.shapes.render_objects`` (exact masks). Returns ``(image (64, 64,
    3), masks (2, 64, 64), objects)``."""
    from ..data.shapes import render_objects

    objs = [dict(shape="heart", color="orange", size="large", position="left", cy=30.0),
            dict(shape="square", color="purple", size="large", position="right", cy=34.0)]
    img, masks = render_objects(objs, seed=seed)
    return img, masks, objs


def evaluate_scene(pipe, placeholders=("<heart>", "<purplesq>"), n: int = 40, seed: int = 0,
                   num_inference_steps: int = 20, guidance_scale: float = 4.0) -> dict:
    """Sample each handle alone (``"a photo of <heart>"``) and both together (``"a photo of
    <heart> and <purplesq>"``), ``n`` each, and judge the scenes
    (``diffnotes.models.eval_shapes.judge_scene``): for a handle, the fraction of samples with an
    object of its concept (a heart; a purple object); for the pair, the fraction with both.
    Returns ``{prompt: {...}, "images": {...}}``."""
    from ..models import eval_shapes as E

    clf = E.shape_judge()
    ph_h, ph_p = placeholders
    tests = {f"a photo of {ph_h}": ("heart",), f"a photo of {ph_p}": ("purple",),
             f"a photo of {ph_h} and {ph_p}": ("heart", "purple")}
    out, images = {}, {}
    for prompt, want in tests.items():
        g = torch.Generator().manual_seed(int(seed))
        ims = pipe([prompt] * n, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=g, output_type="np").images
        found = [E.judge_scene(im, clf) for im in ims]
        heart = [any(o["shape"] == "heart" for o in f) for f in found]
        purple = [any(o["color"] == "purple" for o in f) for f in found]
        purple_sq = [any(o["color"] == "purple" and o["shape"] == "square" for o in f)
                     for f in found]
        row = dict(heart=float(np.mean(heart)), purple=float(np.mean(purple)),
                   purple_square=float(np.mean(purple_sq)),
                   objects=float(np.mean([len(f) for f in found])), n=n)
        row["success"] = float(np.mean([all({"heart": h, "purple": p}[w] for w in want)
                                        for h, p in zip(heart, purple)]))
        out[prompt] = row
        images[prompt] = ims
    out["images"] = images
    return out


# ---------------------------------------------------------------------------- protocol
def _eval_bas(concept: ConceptSet, progress: bool = False):
    from .evaluate import new_placeholder, pipeline_sampler, protocol_pipeline, Tuned

    pipe = protocol_pipeline()
    ph = new_placeholder(concept, pipe)
    # Break-A-Scene learns from ONE image: the first of the concept's images and its mask
    res = break_a_scene(pipe, concept.images[0], concept.masks[:1], [ph], [concept.class_word],
                        seed=0, progress=progress, **SHAPES_DEFAULTS)
    return Tuned(sample=pipeline_sampler(pipe), placeholder=ph,
                 trained_parameters=res.trained_parameters, file_bytes=res.file_bytes,
                 train_seconds=res.seconds,
                 extra=dict(SHAPES_DEFAULTS, images_used=1,
                            final_rec=float(np.mean(res.rec[-10:])),
                            final_attn=float(np.mean(res.attn[-10:]))))


EVAL_CONFIGS = {"break_a_scene": _eval_bas}
