"""DiffSeg: unsupervised zero-shot segmentation from self-attention (Tian et al., CVPR 2024),
Ahmad's notes, §5.13 (eqs 5.63-5.68).

One UNet call on the image's latent gives a self-attention tensor per layer: row ``(i, j)`` is
a distribution over the key positions. DiffSeg

1. **aggregates** the layers (eqs 5.64-5.65): the key dimensions of every map are bilinearly
   upsampled to the finest grid and renormalised, the query dimensions tiled
   (:func:`aggregate_attention`), and the layers summed with weights ``R_k``
   (:func:`aggregation_weights`);
2. **merges** the maps of an anchor grid (:func:`anchor_grid`) iteratively: two maps whose
   symmetric KL (eq 5.66, :func:`sym_kl`) is below a threshold are averaged
   (:func:`merge_attention`), optionally followed by k-means on all maps seeded with the
   proposals (:func:`refine_kmeans`, on by default in the official code);
3. assigns every pixel to the proposal with the highest value there (eqs 5.67-5.68,
   :func:`label_map`; the notes call it NMS).

Where the official code (``google/diffseg``, ``segmentor.py``) and the notes differ, the
default follows the code and the notes' form is an option:

- weights: the code averages the layers of one resolution, then weights resolution ``r`` by
  ``r / sum of the distinct resolutions`` ([64, 32, 16, 8] / 120 on Stable Diffusion);
  ``weights="notes"`` gives every layer ``R_k`` proportional to its resolution (eq 5.65 read
  literally), which weights the single 8x8 layer of Stable Diffusion five times less;
- KL: the code's divergence is **half** the symmetric KL of eq 5.66; the threshold
  ``kl_threshold`` is read in the convention ``kl_convention`` ("code": half, the one the
  published thresholds 0.9/1.1 use; "paper": eq 5.66's sum);
- merging after the first iteration is greedy in index order, not score order;
- the label map is computed at the image's resolution (the code's 512x512), not at the
  attention grid.

Attention maps come from :class:`diffnotes.attention.AttentionCollector` (the project's one
recorder) on every self-attention layer of any UNet layout.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from diffnotes.attention import AttentionCollector, attention_layers, layer_resolutions
from diffnotes.utils import (batch_timesteps, check_choice, check_int, check_tensor,
                             check_timestep)

__all__ = ["aggregation_weights", "aggregate_attention", "anchor_grid", "sym_kl",
           "merge_attention", "refine_kmeans", "label_map", "diffseg", "self_attention_maps",
           "segment", "DEFAULTS"]

#: The official settings (``diffseg.ipynb``): timestep 300, 16x16 anchors, three merging
#: iterations with threshold 0.9 in the code's (half) KL convention, k-means refinement on.
DEFAULTS = dict(t=300, num_points=16, kl_threshold=(0.9, 0.9, 0.9), kl_convention="code",
                refine=True)

_KL_EPS = 1e-12


# ----------------------------------------------------------------------------- aggregation
def aggregation_weights(resolutions, scheme: str = "official") -> torch.Tensor:
    """The weight of every layer in the sum of eq 5.65, float64 (L,), summing to 1.

    Args:
        resolutions: the query-grid side of every layer (e.g. :func:`layer_resolutions`).
        scheme: "official": the code averages the layers of one resolution and weights
            resolution r by r / sum of the distinct resolutions, so a layer gets
            ``(r / sum_distinct) / n_r``; "notes": ``R_k`` proportional to the layer's
            resolution, ``r_k / sum_k r_k`` (Ahmad's notes, eq 5.65).
    """
    scheme = check_choice(scheme, "scheme", ("official", "notes"))
    res = [check_int(r, "resolutions", 1) for r in resolutions]
    if not res:
        raise ValueError("resolutions must name at least one layer, got an empty list")
    r = torch.tensor(res, dtype=torch.float64)
    if scheme == "notes":
        return r / r.sum()                                   # R_k ∝ resolution (eq 5.65)
    distinct = sorted(set(res))
    ratio = {d: d / sum(distinct) for d in distinct}         # get_weight_rato in the code
    count = {d: res.count(d) for d in distinct}              # weight_64 = sum of 5 layers / 5
    return torch.tensor([ratio[x] / count[x] for x in res], dtype=torch.float64)


def aggregate_attention(maps, resolutions=None, weights="official",
                        out_res: int | None = None) -> torch.Tensor:
    """The aggregated attention tensor A_f of eqs 5.64-5.65, flattened: (P, P) with P = R*R.

    Row ``i*R + j`` is the distribution over the R x R key grid of query pixel (i, j) of the
    finest grid R (default: the largest layer resolution). Each layer's map (h*w, h*w) has its
    key dimensions bilinearly upsampled to R x R and renormalised to sum 1 (eq 5.64, the code's
    ``UpSampling2D`` = half-pixel bilinear), its query dimensions tiled (``A~_k[i/δ_k, j/δ_k]``,
    nearest neighbour), and the layers are summed with :func:`aggregation_weights` (eq 5.65);
    every row then sums to 1 (renormalised once more against rounding).

    Args:
        maps: a list of L tensors (h_k*w_k, h_k*w_k), head-averaged self-attention of one image
            (square grids), or a dict name -> map.
        resolutions: the sides h_k (default: from the map sizes).
        weights: "official", "notes" or a length-L sequence / tensor of weights.
        out_res: R.
    Raises:
        ValueError on a map that is not square or a weight vector of the wrong length.
    """
    maps = list(maps.values()) if isinstance(maps, dict) else list(maps)
    if not maps:
        raise ValueError("maps must hold at least one attention map, got none")
    sides = []
    for k, m in enumerate(maps):
        check_tensor(m, f"maps[{k}]", 2)
        s = math.isqrt(m.shape[0])
        if m.shape[0] != m.shape[1] or s * s != m.shape[0]:
            raise ValueError(f"maps[{k}] must be a self-attention map (h*w, h*w) of a square grid, "
                             f"got shape {tuple(m.shape)}")
        sides.append(s)
    if resolutions is not None and list(resolutions) != sides:
        raise ValueError(f"resolutions must match the map sizes {sides}, got {list(resolutions)}")
    if isinstance(weights, str):
        w = aggregation_weights(sides, weights)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if len(w) != len(maps):
            raise ValueError(f"weights must have one entry per map ({len(maps)}), got {len(w)}")
    R = max(sides) if out_res is None else check_int(out_res, "out_res", 1)
    dtype = maps[0].dtype if maps[0].is_floating_point() else torch.float64
    out = torch.zeros(R, R, R * R, dtype=dtype, device=maps[0].device)
    for m, s, wk in zip(maps, sides, w.tolist()):
        a = m.to(dtype).reshape(s * s, 1, s, s)
        if s != R:
            a = F.interpolate(a, size=(R, R), mode="bilinear", align_corners=False)   # eq 5.64
        a = a.reshape(s * s, R * R)
        a = a / a.sum(1, keepdim=True).clamp_min(_KL_EPS)            # each map sums to one
        a = a.T.reshape(1, R * R, s, s)
        if s != R:
            a = F.interpolate(a, size=(R, R), mode="nearest")        # A~_k[i/δ_k, j/δ_k]
        out += wk * a.reshape(R * R, R, R).permute(1, 2, 0)           # eq 5.65
    out = out.reshape(R * R, R * R)
    return out / out.sum(1, keepdim=True)


def anchor_grid(num_points: int, size: int) -> torch.Tensor:
    """The M x M anchor grid of DiffSeg as flat indices into a size x size grid, (M*M,) long.

    The official ``generate_sampling_grid`` for size 64: ``segment_len = 63 // (M - 1)``, start
    ``(63 - segment_len (M - 1)) // 2``; M = 16 gives rows and columns 1, 5, ..., 61. Here 63
    is ``size - 1``; M = 1 gives the centre.
    """
    M = check_int(num_points, "num_points", 1)
    size = check_int(size, "size", 1)
    if M > size:
        raise ValueError(f"num_points must be at most size={size}, got {M}")
    if M == 1:
        c = torch.tensor([(size - 1) // 2])
    else:
        seg = (size - 1) // (M - 1)
        total = seg * (M - 1)
        start = (size - 1 - total) // 2
        c = torch.from_numpy(np.linspace(start, total + start, M).astype(int))
    ii, jj = torch.meshgrid(c, c, indexing="ij")
    return (ii * size + jj).reshape(-1).long()


def sym_kl(p: torch.Tensor, q: torch.Tensor, convention: str = "paper") -> torch.Tensor:
    """Symmetric KL divergence over the last dimension, broadcasting the others (eq 5.66).

    ``"paper"``: KL(p||q) + KL(q||p) (Ahmad's notes, eq 5.66; the paper's eq); ``"code"``: half
    of it, what the official ``DiffSeg.KL`` computes. p = [.5, .5], q = [.9, .1]: 0.878890
    ("paper"), 0.439445 ("code"). Zeros are floored at 1e-12 before the logarithm.
    """
    convention = check_choice(convention, "convention", ("paper", "code"))
    lp, lq = p.clamp_min(_KL_EPS).log(), q.clamp_min(_KL_EPS).log()
    d = ((p - q) * (lp - lq)).sum(-1)      # KL(p||q) + KL(q||p) = sum (p - q)(log p - log q)
    return d / 2 if convention == "code" else d


def _pairwise_sym_kl(P: torch.Tensor, Q: torch.Tensor, convention: str) -> torch.Tensor:
    """sym_kl of every row of P (N, D) against every row of Q (M, D) -> (N, M), as matmuls."""
    lp, lq = P.clamp_min(_KL_EPS).log(), Q.clamp_min(_KL_EPS).log()
    d = ((P * lp).sum(1)[:, None] + (Q * lq).sum(1)[None, :] - P @ lq.T - lp @ Q.T)
    return d / 2 if convention == "code" else d


def _thresholds(kl_threshold):
    ts = (kl_threshold,) if isinstance(kl_threshold, (int, float)) else tuple(kl_threshold)
    if not ts:
        raise ValueError("kl_threshold must be a positive number or a non-empty sequence of them, "
                         "got an empty sequence")
    for t in ts:
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)) \
                or not math.isfinite(float(t)) or float(t) <= 0:
            raise ValueError(f"kl_threshold must be a positive number or a sequence of positive "
                             f"numbers (one per merging iteration), got {kl_threshold!r}")
    return [float(t) for t in ts]


def merge_attention(A: torch.Tensor, anchors: torch.Tensor, kl_threshold=(0.9, 0.9, 0.9),
                    kl_convention: str = "code") -> torch.Tensor:
    """Iterative attention merging (Ahmad's notes, §5.13, "Iterative Attention Merging"; the
    official ``mask_merge``): the object proposals L_p, (K, P).

    Iteration 0: each anchor's map is replaced by the mean of *all* P maps within symmetric KL
    ``kl_threshold[0]`` of it (one proposal per anchor). Iterations n >= 1: in index order, a
    proposal not yet matched is averaged with every proposal within ``kl_threshold[n]`` of it
    (matched ones included, as in the code), and all of those are marked matched.

    Args:
        A: (P, P) aggregated attention (:func:`aggregate_attention`).
        anchors: (M,) flat indices of the anchor rows (:func:`anchor_grid`).
        kl_threshold: τ, a positive number or one per iteration (the code: 0.9 three times).
        kl_convention: "code" (τ compares half the symmetric KL, the published thresholds) or
            "paper" (τ compares eq 5.66's sum).
    Raises:
        ValueError if a threshold is not positive or an anchor index is out of range.
    """
    taus = _thresholds(kl_threshold)
    kl_convention = check_choice(kl_convention, "kl_convention", ("paper", "code"))
    check_tensor(A, "A", 2)
    check_tensor(anchors, "anchors", 1)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be square (P, P), got {tuple(A.shape)}")
    if len(anchors) == 0 or int(anchors.min()) < 0 or int(anchors.max()) >= A.shape[0]:
        raise ValueError(f"anchors must be non-empty indices in [0, {A.shape[0] - 1}]")
    anchors = anchors.to(A.device)
    close = (_pairwise_sym_kl(A[anchors], A, kl_convention) < taus[0]).to(A.dtype)  # eq 5.66
    props = (close @ A) / close.sum(1, keepdim=True)   # the anchor itself is always within τ
    for tau in taus[1:]:
        close = _pairwise_sym_kl(props, props, kl_convention) < tau
        matched = torch.zeros(len(props), dtype=torch.bool, device=props.device)
        new = []
        for i in range(len(props)):
            if matched[i]:
                continue
            matched |= close[i]
            matched[i] = True
            new.append(props[close[i]].mean(0))
        props = torch.stack(new)
    return props


def refine_kmeans(A: torch.Tensor, proposals: torch.Tensor, max_iter: int = 300) -> torch.Tensor:
    """The official optional refinement: k-means (Euclidean, Lloyd) on all P maps of A,
    initialised with the K proposals; returns the means of the non-empty clusters (K', P)."""
    check_tensor(A, "A", 2)
    check_tensor(proposals, "proposals", 2)
    mu = proposals.clone()
    labels = None
    for _ in range(check_int(max_iter, "max_iter", 1)):
        new = torch.cdist(A, mu).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        onehot = F.one_hot(labels, len(mu)).to(A.dtype)
        count = onehot.sum(0)
        mu = torch.where(count[:, None] > 0, (onehot.T @ A) / count.clamp_min(1)[:, None], mu)
    used = torch.unique(labels)
    return mu[used]


def label_map(proposals: torch.Tensor, out_size: int | None = None) -> torch.Tensor:
    """S[i, j] = argmax_k L_p[k, i, j] (eqs 5.67-5.68) after bilinear upsampling of the K
    proposals (K, R*R) to ``out_size`` (the code: x8 to 512, the image's resolution);
    (out_size, out_size) long. Ties go to the smallest k."""
    check_tensor(proposals, "proposals", 2)
    R = math.isqrt(proposals.shape[1])
    if R * R != proposals.shape[1]:
        raise ValueError(f"proposals must be (K, R*R) maps of a square grid, got "
                         f"{tuple(proposals.shape)}")
    m = proposals.reshape(1, -1, R, R)
    if out_size is not None and out_size != R:
        m = F.interpolate(m, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return m[0].argmax(0)


def diffseg(maps, num_points: int = 16, kl_threshold=(0.9, 0.9, 0.9),
            kl_convention: str = "code", refine: bool = True, weights="official",
            out_size: int | None = None, return_proposals: bool = False):
    """DiffSeg on one image's self-attention maps: aggregation, merging, label map.

    Args:
        maps: the layers' (h*w, h*w) head-averaged self-attention maps (list or dict), or an
            already aggregated (P, P) tensor in a one-element list.
        num_points: M of the M x M anchor grid (clipped to the grid side).
        kl_threshold, kl_convention: see :func:`merge_attention`.
        refine: the k-means refinement (:func:`refine_kmeans`).
        weights: see :func:`aggregate_attention`.
        out_size: side of the label map (default: the attention grid).
    Returns:
        (out_size, out_size) long labels 0..K-1, and the (K, P) proposals if asked.
    """
    taus = _thresholds(kl_threshold)
    A = aggregate_attention(maps, weights=weights)
    R = math.isqrt(A.shape[0])
    anchors = anchor_grid(min(check_int(num_points, "num_points", 1), R), R)
    props = merge_attention(A, anchors, taus, kl_convention)
    if refine:
        props = refine_kmeans(A, props)
    labels = label_map(props, out_size)
    # relabel 0..K-1 in order of first appearance of the surviving proposals
    _, labels = torch.unique(labels, return_inverse=True)
    return (labels, props) if return_proposals else labels


# ----------------------------------------------------------------------------- the model side
def _parts(pipe):
    get = (lambda k: pipe[k]) if isinstance(pipe, dict) else (lambda k: getattr(pipe, k))
    return get("vae"), get("unet"), get("text_encoder"), get("tokenizer"), get("scheduler")


@torch.no_grad()
def self_attention_maps(pipe, images, t: int = 300, prompt: str = "", noise: bool = False,
                        generator: torch.Generator | None = None):
    """Head-averaged self-attention maps of every self-attention layer for a batch of images.

    As the official code: the image's VAE latent (not noised, unless ``noise``), one UNet call
    with the timestep embedding of ``t`` and the unconditional (empty-prompt) context. Any
    UNet layout; recorded by :class:`diffnotes.attention.AttentionCollector`.

    Args:
        pipe: a pipeline or dict with ``vae, unet, text_encoder, tokenizer, scheduler``.
        images: (B, 3, H, W) in [0, 1] or (B, H, W, 3) NumPy in [0, 1].
        t: timestep index (0 <= t < T).
        noise: noise the latent to t (``q_sample``) instead of the clean latent.
    Returns:
        ``(maps, resolutions)``: a list of (B, h*w, h*w) tensors in forward order
        (:func:`diffnotes.attention.attention_layers`) and their sides.
    """
    from diffnotes.ddpm import q_sample
    from diffnotes.features import as_image_tensor

    vae, unet, text_encoder, tokenizer, scheduler = _parts(pipe)
    x = as_image_tensor(images)
    t = check_timestep(t, len(scheduler.alphas_cumprod), "t")
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    ctx = text_encoder(ids.to(text_encoder.device))[0]
    sf = getattr(vae.config, "scaling_factor", 1.0)
    z = vae.encode((x * 2 - 1).to(device=vae.device, dtype=vae.dtype)).latent_dist.mean * sf
    if noise:
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        z = q_sample(z, t, scheduler.alphas_cumprod, eps)
    names = attention_layers(unet, "self")
    col = AttentionCollector(kinds=("self",)).attach(unet)
    try:
        unet(z, batch_timesteps(t, z), encoder_hidden_states=ctx.expand(z.shape[0], -1, -1))
        got = col.by_name()
    finally:
        col.detach()
    maps = [got[n] for n in names]
    res = [math.isqrt(m.shape[1]) for m in maps]
    expected = layer_resolutions(unet, "self", latent_hw=z.shape[-2:])
    if res != expected:  # non-square latents are not supported
        raise ValueError(f"images must give a square latent grid; layer sides {res}")
    return maps, res


def segment(pipe, images, t: int = 300, num_points: int = 16, kl_threshold=(0.9, 0.9, 0.9),
            kl_convention: str = "code", refine: bool = True, weights="official",
            out_size: int | None = None, progress: bool = False):
    """DiffSeg end to end: :func:`self_attention_maps` then :func:`diffseg` per image.

    Returns a list of (out_size, out_size) label maps (out_size defaults to the image side)
    and the seconds per image.
    """
    from tqdm.auto import tqdm

    from diffnotes.features import as_image_tensor

    _thresholds(kl_threshold)
    x = as_image_tensor(images)
    out_size = x.shape[-1] if out_size is None else out_size
    t0 = time.perf_counter()
    out = []
    for i in tqdm(range(x.shape[0]), desc="DiffSeg", disable=not progress):
        maps, _ = self_attention_maps(pipe, x[i:i + 1], t=t)
        out.append(diffseg([m[0].double() for m in maps], num_points, kl_threshold,
                           kl_convention, refine, weights, out_size))
    return out, (time.perf_counter() - t0) / max(x.shape[0], 1)
