"""Unsupervised keypoints from a text-to-image diffusion model: StableKeypoints (Hedlin et al.
2024, "Unsupervised Keypoints from Pretrained Diffusion Models"; Ahmad's notes, §5.10, which
cites the wrong reference for it).

A set of N token embeddings is optimised, the model frozen, so that each token's cross-attention
map (the softmax runs over the N tokens, so tokens compete for pixels; Ahmad's notes, eq 5.49)
is **localised**, close to a Gaussian at its own peak (eqs 5.50–5.52), and **equivariant**:
the map of a transformed image, transformed back, equals the map of the image (eq 5.53, where
the notes print ``M_e`` for ``M_n``). The loss is ``L_loc + lambda L_eq`` (eq 5.54).
The tokens whose maps are sharpest across the data set, spread apart by furthest-point
sampling, are the keypoints; a linear regressor from them to annotated keypoints measures how
much they know (the paper's evaluation).

Defaults follow the official code (``unsupervised_keypoints/main.py``): Adam lr 5e-3, the
sharpening weight 100 and the equivariance weight 1000 (lambda = 10), random affine
augmentation (rotation ±15°, scale 0.8–1.0, translation ±25 %), per-image top-k tokens with a
minimum peak distance of 10 % of the side, the first four cross-attention layers below the
full latent resolution (the code's ``layers=[0, 1, 2, 3]``), the lowest-noise time step of a
50-step grid for the optimisation. Scaled to the image: maps are compared at half the image
side (the code upsamples to a quarter of 512, 128 px; a quarter of 64 px would leave 16 map
pixels) with sigma = 2 px of a 128-px map scaled to the map's side (0.5 px at 32 px). Tokens
and steps are scaled to the CPU: 32 tokens (the code: hundreds) and ~100 steps of 4 images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffnotes.attention import attention_layers, layer_resolutions
from diffnotes.features import _parts, as_image_tensor
from diffnotes.recognition.correspondence import cross_attention_maps
from diffnotes.utils import check_int, check_positive, check_tensor, check_timestep

__all__ = ["OFFICIAL", "default_layers", "affine_theta", "random_affine", "invert_theta",
           "warp", "localization_loss", "equivariance_loss", "map_peaks", "token_maps",
           "select_top_tokens", "furthest_point_tokens", "optimize_keypoint_embedding",
           "find_keypoints", "fit_regressor", "apply_regressor", "StableKeypoints",
           "stable_keypoints"]

OFFICIAL = dict(lr=5e-3, sharpening_weight=100.0, equivariance_weight=1000.0, degrees=15.0,
                scale=(0.8, 1.0), translate=(0.25, 0.25), top_k=10, min_dist=0.1,
                candidates=25, sigma_128=2.0, map_128=128, ddim_steps=50)


def default_layers(unet) -> list[str]:
    """The first four cross-attention layers, in forward order, whose grid is below the full
    latent resolution (SD: ``down_blocks.1`` and ``down_blocks.2``; the code's layers 0–3)."""
    names = attention_layers(unet, "cross")
    res = layer_resolutions(unet, "cross")
    top = max(res)
    return [n for n, r in zip(names, res) if r < top][:4]


# ------------------------------------------------------------------ invertible transforms
def affine_theta(angle_deg, scale, tx, ty, dtype=torch.float64) -> torch.Tensor:
    """(B, 2, 3) ``theta`` for :func:`warp`: ``T(X)(p) = X(A p + b)`` in normalised [-1, 1]
    coordinates, with A a rotation by ``angle_deg`` divided by ``scale`` (the content grows by
    ``scale``), ``b = (tx, ty)`` (fractions of the half side)."""
    a = torch.as_tensor(angle_deg, dtype=dtype).reshape(-1) * math.pi / 180
    s = torch.as_tensor(scale, dtype=dtype).reshape(-1)
    tx = torch.as_tensor(tx, dtype=dtype).reshape(-1)
    ty = torch.as_tensor(ty, dtype=dtype).reshape(-1)
    c, sn = torch.cos(a) / s, torch.sin(a) / s
    return torch.stack([torch.stack([c, -sn, tx], -1), torch.stack([sn, c, ty], -1)], 1)


def random_affine(n: int, generator: torch.Generator, degrees: float = OFFICIAL["degrees"],
                  scale=OFFICIAL["scale"], translate=OFFICIAL["translate"],
                  dtype=torch.float64) -> torch.Tensor:
    """``n`` random ``theta`` (the code's RandomAffineWithInverse ranges)."""
    u = torch.rand(n, 4, generator=generator, dtype=dtype)
    ang = (2 * u[:, 0] - 1) * degrees
    sc = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    tx = (2 * u[:, 2] - 1) * translate[0] * 2       # a fraction of the side = 2× the half side
    ty = (2 * u[:, 3] - 1) * translate[1] * 2
    return affine_theta(ang, sc, tx, ty, dtype)


def invert_theta(theta: torch.Tensor) -> torch.Tensor:
    """``theta'`` with ``warp(warp(X, theta), theta') = X`` (where no content left the frame):
    ``A' = A^{-1}``, ``b' = -A^{-1} b``."""
    A, b = theta[:, :, :2], theta[:, :, 2:]
    Ai = torch.linalg.inv(A)
    return torch.cat([Ai, -Ai @ b], -1)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``T(X)``: bilinear resampling of x (B, C, H, W) at ``A p + b`` (zeros outside)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ------------------------------------------------------------------ losses
def map_peaks(maps: torch.Tensor) -> torch.Tensor:
    """``mu_n = argmax_{h,w} M_n[h, w]`` (Ahmad's notes, eq 5.50) as (…, 2) (x, y) pixel
    centres of the map's grid."""
    h, w = maps.shape[-2:]
    idx = maps.flatten(-2).argmax(-1)
    return torch.stack([idx % w + 0.5, idx // w + 0.5], -1).to(maps.dtype)


def localization_loss(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """``L_loc = E_n ||M_n - G_n||^2`` with ``G_n`` a unit-peak Gaussian of width ``sigma`` (map
    pixels) at the map's own peak (Ahmad's notes, eqs 5.50–5.52). ``maps`` (…, h, w); the
    squared error is averaged over pixels and maps (the code's ``F.mse_loss``)."""
    check_tensor(maps, "maps")
    h, w = maps.shape[-2:]
    mu = map_peaks(maps.detach())                                    # eq 5.50
    ys = torch.arange(h, dtype=maps.dtype, device=maps.device) + 0.5
    xs = torch.arange(w, dtype=maps.dtype, device=maps.device) + 0.5
    d2 = (ys[:, None] - mu[..., 1, None, None]) ** 2 + (xs[None, :] - mu[..., 0, None, None]) ** 2
    G = torch.exp(-d2 / (2 * sigma ** 2))                            # eq 5.51
    return ((maps - G) ** 2).mean()                                  # eq 5.52


def equivariance_loss(maps: torch.Tensor, maps_of_transformed: torch.Tensor,
                      theta: torch.Tensor) -> torch.Tensor:
    """``L_eq = E_n ||T^{-1}(M_n(e, T(X))) - M_n(e, X)||^2`` (Ahmad's notes, eq 5.53, with
    ``M_n`` for the printed ``M_e``): ``maps`` (B, N, h, w) of X, ``maps_of_transformed`` of
    ``warp(X, theta)``."""
    back = warp(maps_of_transformed, invert_theta(theta).to(maps.device))   # T^{-1}
    return ((back - maps) ** 2).mean()                               # eq 5.53


# ------------------------------------------------------------------ maps of the tokens
def _map_size(size) -> tuple[int, int]:
    return (max(1, size[0] // 2), max(1, size[1] // 2))


def token_maps(pipe, images, embedding: torch.Tensor, *, t: int, layers, map_size,
               generator=None) -> torch.Tensor:
    """The tokens' cross-attention maps (B, N, h, w) (Ahmad's notes, eq 5.49: head-averaged
    softmax over the N tokens, layers averaged after bilinear upsampling to ``map_size``)."""
    return cross_attention_maps(pipe, images, embedding, t, layers, map_size, generator)


def _entropy(maps: torch.Tensor) -> torch.Tensor:
    p = maps.flatten(-2)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def select_top_tokens(maps: torch.Tensor, k: int, min_dist: float = OFFICIAL["min_dist"]
                      ) -> torch.Tensor:
    """Per image, the ``k`` tokens with the sharpest maps (lowest spatial entropy), skipping a
    token whose peak lies within ``min_dist`` (fraction of the side) of one already taken (the
    code's ``find_top_k``). ``maps`` (N, h, w) → (≤k,) token indices."""
    h, w = maps.shape[-2:]
    order = torch.argsort(_entropy(maps))
    peaks = (map_peaks(maps) / torch.tensor([w, h], dtype=maps.dtype, device=maps.device)).cpu()
    chosen: list[int] = []
    for n in order.tolist():
        if all(float((peaks[n] - peaks[c]).norm()) >= min_dist for c in chosen):
            chosen.append(n)
        if len(chosen) == k:
            break
    return torch.tensor(chosen, dtype=torch.long)


def furthest_point_tokens(maps: torch.Tensor, k: int, candidates: int = OFFICIAL["candidates"]
                          ) -> torch.Tensor:
    """The keypoint tokens over a data set: the ``candidates`` tokens with the lowest mean
    entropy over the images ``maps`` (M, N, h, w), then furthest-point sampling down to ``k``,
    the distance between two tokens being the mean distance of their peaks over the images
    (starting from the sharpest)."""
    ent = _entropy(maps).mean(0)                                     # (N,)
    cand = torch.argsort(ent)[: max(k, min(candidates, maps.shape[1]))]
    pk = map_peaks(maps[:, cand])                                    # (M, c, 2)
    D = (pk[:, :, None] - pk[:, None]).norm(dim=-1).mean(0)          # (c, c)
    chosen = [0]
    dmin = D[0].clone()
    while len(chosen) < min(k, len(cand)):
        j = int(dmin.argmax())
        chosen.append(j)
        dmin = torch.minimum(dmin, D[j])
    return cand[torch.tensor(chosen)]


# ------------------------------------------------------------------ optimisation
def _setup(pipe, t, layers, size):
    _, unet, _, _, scheduler = _parts(pipe)
    T = len(scheduler.alphas_cumprod)
    if t is None:      # the lowest-noise time step of a 50-step grid (the code's noise_level=-1)
        t = int(getattr(scheduler.config, "steps_offset", 0) or 0)
    t = check_timestep(t, T, "t")
    layers = default_layers(unet) if layers is None else list(layers)
    known = set(attention_layers(unet, "cross"))
    bad = [n for n in layers if n not in known]
    if not layers or bad:
        raise ValueError(f"layers must name cross-attention layers of the UNet, unknown: {bad}")
    return t, layers


def optimize_keypoint_embedding(pipe, images, *, n_tokens: int = 32, steps: int = 100,
                                batch: int = 4, top_k: int = 10, lr: float = OFFICIAL["lr"],
                                lam: float | None = None, sigma: float | None = None,
                                t: int | None = None, layers=None,
                                min_dist: float = OFFICIAL["min_dist"],
                                generator: torch.Generator | None = None,
                                progress: bool = False, callback=None) -> torch.Tensor:
    """Optimise ``n_tokens`` token embeddings (1, N, D) for localised, equivariant attention:
    each step draws ``batch`` images and one random affine T each, and minimises
    ``L_loc + lam L_eq`` (Ahmad's notes, eq 5.54; the code weighs them 100 and 1000, lam = 10)
    over each image's ``top_k`` sharpest tokens (:func:`select_top_tokens`).
    ``callback(dict(i=, loss=, loc=, eq=))``. Returns the embedding (detached)."""
    x = as_image_tensor(images)
    size = tuple(x.shape[-2:])
    n_tokens = check_int(n_tokens, "n_tokens", 1)
    steps = check_int(steps, "steps", 0)
    batch = check_int(batch, "batch", 1)
    top_k = check_int(top_k, "top_k", 1)
    lr = check_positive(lr, "lr")
    lam = OFFICIAL["equivariance_weight"] / OFFICIAL["sharpening_weight"] if lam is None else \
        check_positive(lam, "lam", allow_zero=True)
    msize = _map_size(size)
    sigma = OFFICIAL["sigma_128"] * msize[1] / OFFICIAL["map_128"] if sigma is None else \
        check_positive(sigma, "sigma")
    t, layers = _setup(pipe, t, layers, size)
    _, unet, _, _, _ = _parts(pipe)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    e = torch.randn(1, n_tokens, unet.config.cross_attention_dim, generator=g,
                    dtype=torch.float64 if unet.dtype == torch.float64 else torch.float32
                    ).to(unet.device).requires_grad_(True)
    opt = torch.optim.Adam([e], lr=lr)
    req = [q.requires_grad for q in unet.parameters()]
    unet.requires_grad_(False)
    try:
        for i in tqdm(range(steps), disable=not progress, desc="StableKeypoints"):
            idx = torch.randint(x.shape[0], (batch,), generator=g)
            xb = x[idx].to(unet.dtype)
            theta = random_affine(batch, g, dtype=unet.dtype)
            both = torch.cat([xb, warp(xb, theta).clamp(0, 1)])
            m = token_maps(pipe, both, e, t=t, layers=layers, map_size=msize, generator=g)
            M, MT = m[:batch], m[batch:]
            sel = [select_top_tokens(M[b].detach(), top_k, min_dist) for b in range(batch)]
            loc = sum(localization_loss(M[b, s], sigma) for b, s in enumerate(sel)) / batch
            back = warp(MT, invert_theta(theta).to(MT.device))
            eq = sum(((back[b, s] - M[b, s]) ** 2).mean() for b, s in enumerate(sel)) / batch
            loss = loc + lam * eq                                   # eq 5.54
            opt.zero_grad()
            loss.backward()
            opt.step()
            if callback is not None:
                callback(dict(i=i, loss=loss.item(), loc=loc.item(), eq=eq.item()))
    finally:
        for q, r in zip(unet.parameters(), req):
            q.requires_grad_(r)
    return e.detach()


@torch.no_grad()
def find_keypoints(pipe, images, embedding: torch.Tensor, tokens: torch.Tensor, *,
                   t: int | None = None, layers=None, generator=None,
                   batch_size: int = 16) -> torch.Tensor:
    """The peaks (eq 5.50) of the chosen tokens' maps, as (B, K, 2) (x, y) in image pixels."""
    x = as_image_tensor(images)
    size = tuple(x.shape[-2:])
    t, layers = _setup(pipe, t, layers, size)
    msize = _map_size(size)
    unet = _parts(pipe)[1]
    out = []
    for i in range(0, x.shape[0], batch_size):
        m = token_maps(pipe, x[i:i + batch_size].to(unet.dtype), embedding, t=t, layers=layers,
                       map_size=msize,
                       generator=generator if generator is not None
                       else torch.Generator().manual_seed(i))
        pk = map_peaks(m[:, tokens]).cpu()
        out.append(pk * torch.tensor([size[1] / msize[1], size[0] / msize[0]], dtype=pk.dtype))
    return torch.cat(out).double()


def fit_regressor(found, true) -> torch.Tensor:
    """Least-squares linear map (with bias) from found keypoints (M, K, 2) to annotated ones
    (M, P, 2) (the paper's evaluation: a linear regressor fitted on the training images):
    returns W (2K + 1, 2P)."""
    X = torch.as_tensor(found, dtype=torch.float64).reshape(len(found), -1)
    Y = torch.as_tensor(true, dtype=torch.float64).reshape(len(true), -1)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"true must hold one row per found row ({X.shape[0]}), got {Y.shape[0]}")
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    return torch.linalg.lstsq(X1, Y, driver="gelsd").solution


def apply_regressor(W: torch.Tensor, found) -> torch.Tensor:
    """(M, K, 2) found keypoints → (M, P, 2) regressed ones."""
    X = torch.as_tensor(found, dtype=torch.float64).reshape(len(found), -1)
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    return (X1 @ W).reshape(len(X), -1, 2)


@dataclass
class StableKeypoints:
    """What :func:`stable_keypoints` found: the optimised ``embedding`` (1, N, D), the keypoint
    ``tokens`` (K,), the ``keypoints`` (B, K, 2) (x, y) of the given images, and the settings
    (``t``, ``layers``)."""
    embedding: torch.Tensor
    tokens: torch.Tensor
    keypoints: torch.Tensor
    t: int
    layers: list

    def find(self, pipe, images) -> torch.Tensor:
        """The same keypoints on other images: (B, K, 2)."""
        return find_keypoints(pipe, images, self.embedding, self.tokens, t=self.t,
                              layers=self.layers)


def stable_keypoints(pipe, images, n_keypoints: int, *, n_tokens: int = 32, steps: int = 100,
                     batch: int = 4, t: int | None = None, layers=None,
                     candidates: int = OFFICIAL["candidates"],
                     generator: torch.Generator | None = None, progress: bool = False,
                     **optimize_kwargs) -> StableKeypoints:
    """StableKeypoints (Hedlin et al. 2024; Ahmad's notes, §5.10, eqs 5.49–5.54): optimise token
    embeddings on the unlabeled ``images`` (:func:`optimize_keypoint_embedding`), choose
    ``n_keypoints`` tokens by sharpness and furthest-point sampling over the images
    (:func:`furthest_point_tokens`), and return their peaks on the images.

    Raises ValueError when ``n_keypoints < 1`` or exceeds ``n_tokens``."""
    n_keypoints = check_int(n_keypoints, "n_keypoints", 1)
    n_tokens = check_int(n_tokens, "n_tokens", 1)
    if n_keypoints > n_tokens:
        raise ValueError(f"n_keypoints must be <= n_tokens ({n_tokens}), got {n_keypoints}")
    x = as_image_tensor(images)
    size = tuple(x.shape[-2:])
    t_opt, layers = _setup(pipe, t, layers, size)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    e = optimize_keypoint_embedding(pipe, x, n_tokens=n_tokens, steps=steps, batch=batch,
                                    t=t_opt, layers=layers, generator=g, progress=progress,
                                    **optimize_kwargs)
    unet = _parts(pipe)[1]
    with torch.no_grad():
        maps = torch.cat([token_maps(pipe, x[i:i + 16].to(unet.dtype), e, t=t_opt, layers=layers,
                                     map_size=_map_size(size),
                                     generator=torch.Generator().manual_seed(i))
                          for i in range(0, x.shape[0], 16)])
    tokens = furthest_point_tokens(maps, n_keypoints, candidates)
    kp = find_keypoints(pipe, x, e, tokens, t=t_opt, layers=layers)
    return StableKeypoints(embedding=e, tokens=tokens, keypoints=kp, t=t_opt, layers=layers)
