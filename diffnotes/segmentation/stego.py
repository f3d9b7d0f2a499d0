"""STEGO: distilling feature correspondences into a segmentation head (Hamilton et al., ICLR
2022), Ahmad's notes, §5.6.

A frozen backbone gives dense features ``f``; a small head maps them to low-dimensional codes
``s``. The loss asks the codes' correspondence tensor ``S`` (cosines between every pair of
positions of two images) to be large where the features' correspondence tensor ``F`` is large,
and small where it is below a shift ``b`` (eq 5.28). Image pairs are an image with itself, with
one of its K nearest neighbours in global feature space, and with a random other image, each
with its own shift. Clustering the codes (a cluster probe) gives the segmentation.

Which tensor is centred and which is clamped (paper eq 4 and the official code,
``ContrastiveCorrelationLoss.helper``): the *feature* correspondence F is spatially centred
(its mean over the second image's positions (i, j) is subtracted), and the *code*
correspondence S is zero-clamped (max(S, 0)); F is a fixed target (computed without gradient).
The official code also adds the global mean of F back after centring (``F~ - mean(F~) +
mean(F)``, the means over the whole batch: a constant per batch, so a batch-dependent change of
the shift b) and optionally clamps S from above at 0.8 (``stabalize`` in its config). Both are
options here, off by default (switched on by ``add_mean=True`` and ``stabilize=True`` in
:func:`stego_loss` and :func:`train_stego`); with both off the loss is bitwise the one without the options.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffnotes.utils import check_finite, check_tensor

__all__ = ["correspondence", "stego_loss", "stego_objective", "knn_pairs", "SegmentationHead",
           "train_stego", "fit_cluster_probe", "sample_points",
           "ClusterProbe", "pool_features"]

_EPS = 1e-10


def correspondence(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Cosine correspondence tensor of two feature maps, Ahmad's notes, §5.6 (F) and eq 5.27 (S).

    ``out[b, h, w, i, j] = sum_c f[b,c,h,w] g[b,c,i,j] / (|f[b,:,h,w]| |g[b,:,i,j]|)``.

    Args:
        f: (B, C, H, W); g: (B, C, I, J).
    Returns:
        (B, H, W, I, J).
    Raises:
        ValueError if an argument is not 4-D or the batch or channel sizes differ.
    """
    check_tensor(f, "f", 4)
    check_tensor(g, "g", 4)
    if f.shape[:2] != g.shape[:2]:
        raise ValueError(f"f and g must share batch and channel sizes (B, C), got f of shape "
                         f"{tuple(f.shape)} and g of shape {tuple(g.shape)}")
    fn = F.normalize(f, dim=1, eps=_EPS)
    gn = F.normalize(g, dim=1, eps=_EPS)
    return torch.einsum("bchw,bcij->bhwij", fn, gn)  # F_hwij / S_hwij (eq 5.27)


def _check_maps(feats_a, feats_b, codes_a, codes_b):
    for name, x in (("feats_a", feats_a), ("feats_b", feats_b), ("codes_a", codes_a),
                    ("codes_b", codes_b)):
        check_tensor(x, name, 4)
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same number of channels, got "
                         f"{tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    if codes_a.shape[1] != codes_b.shape[1]:
        raise ValueError(f"codes_a and codes_b must have the same number of channels, got "
                         f"{tuple(codes_a.shape)} and {tuple(codes_b.shape)}")
    for fa, ca, nf, nc in ((feats_a, codes_a, "feats_a", "codes_a"),
                           (feats_b, codes_b, "feats_b", "codes_b")):
        if fa.shape[0] != ca.shape[0] or fa.shape[2:] != ca.shape[2:]:
            raise ValueError(f"{nc} must have the batch size and spatial size of {nf}, got "
                             f"{nf} of shape {tuple(fa.shape)} and {nc} of shape "
                             f"{tuple(ca.shape)}")
    if feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(f"feats_a and feats_b must have the same batch size, got "
                         f"{tuple(feats_a.shape)} and {tuple(feats_b.shape)}")


def stego_loss(feats_a: torch.Tensor, feats_b: torch.Tensor, codes_a: torch.Tensor,
               codes_b: torch.Tensor, shift: float, spatial_centering: bool = True,
               zero_clamp: bool = True, add_mean: bool = False,
               stabilize: bool = False) -> torch.Tensor:
    """STEGO's correlation loss, Ahmad's notes, eq 5.28 with spatial centring and zero clamping.

    ``L = - mean_{b,h,w,i,j} (F~[b,h,w,i,j] - shift) * max(S[b,h,w,i,j], 0)`` where
    ``F = correspondence(feats_a, feats_b)``, ``S = correspondence(codes_a, codes_b)``,
    ``F~ = F - mean_{i,j} F`` when ``spatial_centering`` (else F), and ``max(S, 0)`` becomes S
    when ``zero_clamp`` is off. F is computed without gradient (a frozen target); gradients flow
    into the codes only. The official code's two extras: ``add_mean`` adds the batch mean of F
    back after the centring (``F~ - mean(F~) + mean(F)``, inside its ``pointwise`` branch, so
    only with ``spatial_centering``); ``stabilize`` clamps S from above at 0.8
    (``cd.clamp(min_val, .8)``). Ahmad's notes print eq 5.28 without the leading minus sign and the centring
    with '=' for '-': see the errata.

    Args:
        feats_a: (B, C, H, W) and feats_b: (B, C, I, J) backbone features of the two images.
        codes_a: (B, K, H, W) and codes_b: (B, K, I, J) head outputs at the same positions.
        shift: the constant b ("negative pressure"), a finite real number.
    Returns:
        scalar loss.
    Raises:
        ValueError on a wrong rank or inconsistent batch / channel / spatial sizes, or a
        non-finite shift.
    """
    _check_maps(feats_a, feats_b, codes_a, codes_b)
    b = check_finite(shift, "shift")
    with torch.no_grad():
        Fc = correspondence(feats_a, feats_b)
        if spatial_centering:
            old_mean = Fc.mean()
            Fc = Fc - Fc.mean(dim=(3, 4), keepdim=True)  # F^SC (STEGO eq 4; the notes' '=' is '-')
            if add_mean:
                Fc = Fc - Fc.mean() + old_mean           # the official code's global mean
    Sc = correspondence(codes_a, codes_b)  # eq 5.27
    if zero_clamp and stabilize:
        Sc = Sc.clamp(min=0, max=0.8)                    # the official code's ``stabalize``
    elif zero_clamp:
        Sc = Sc.clamp(min=0)
    elif stabilize:
        Sc = Sc.clamp(max=0.8)
    return -((Fc - b) * Sc).mean()  # eq 5.28 with the minus sign, averaged over (b,h,w,i,j)


def stego_objective(feats: torch.Tensor, codes: torch.Tensor, feats_knn: torch.Tensor,
                    codes_knn: torch.Tensor, feats_rand: torch.Tensor, codes_rand: torch.Tensor,
                    shifts=(0.18, 0.12, 0.46), weights=(0.67, 0.25, 0.63), **kw) -> torch.Tensor:
    """STEGO's full objective: self, K-nearest-neighbour and random pairs (paper eq 5).

    ``L = w_self L(x, x, b_self) + w_knn L(x, x_knn, b_knn) + w_rand L(x, x_rand, b_rand)``,
    each term :func:`stego_loss`. Defaults are the official code's ``train_config.yml`` values
    (ViT-S, directory data set). Extra keyword arguments go to :func:`stego_loss`.
    """
    if len(shifts) != 3 or len(weights) != 3:
        raise ValueError(f"shifts and weights must have 3 entries (self, knn, random), got "
                         f"{shifts!r} and {weights!r}")
    pairs = ((feats, codes), (feats_knn, codes_knn), (feats_rand, codes_rand))
    total = 0.0
    for (fb, cb), b, w in zip(pairs, shifts, weights):
        total = total + w * stego_loss(feats, fb, codes, cb, b, **kw)
    return total


def pool_features(feats: torch.Tensor) -> torch.Tensor:
    """Global average pooling of (N, C, H, W) maps to (N, C), the image descriptor for KNN."""
    check_tensor(feats, "feats", (2, 4))
    return feats.mean(dim=(2, 3)) if feats.ndim == 4 else feats


def knn_pairs(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Each image's K nearest neighbours by cosine of pooled features (STEGO's KNN pairs).

    STEGO pools the backbone features of every training image, computes all pairwise cosines
    and keeps the K most similar other images; during training the "positive" partner of an
    image is drawn at random among them.

    Args:
        feats: (N, C) descriptors or (N, C, H, W) maps (average-pooled first).
        k: number of neighbours, 1 <= k < N.
    Returns:
        (N, k) long indices, most similar first, never the image itself.
    Raises:
        ValueError on a wrong rank or k outside [1, N-1].
    """
    d = pool_features(feats)
    n = d.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an int in [1, {n - 1}] (N={n} images), got {k!r}")
    dn = F.normalize(d, dim=1, eps=_EPS)
    sim = dn @ dn.T
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).indices


class SegmentationHead(nn.Module):
    """STEGO's head: a linear 1x1 projection plus a 1x1 conv-ReLU-conv branch, summed.

    ``forward(feats (B, C, H, W)) -> codes (B, dim, H, W)``.
    """

    def __init__(self, in_channels: int, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_channels
        self.linear = nn.Conv2d(in_channels, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(),
                                       nn.Conv2d(hidden, dim, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        check_tensor(feats, "feats", 4)
        return self.linear(feats) + self.nonlinear(feats)


class ClusterProbe(nn.Module):
    """STEGO's cluster probe: K learnable centroids fitted by gradient descent (spherical
    k-means). ``loss(codes)`` = -mean over pixels of the cosine to the nearest centroid;
    ``forward(codes)`` returns (B, H, W) labels.
    """

    def __init__(self, dim: int, n_clusters: int, generator: torch.Generator | None = None):
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_clusters, dim, generator=generator))

    def init_from(self, codes: torch.Tensor, generator: torch.Generator) -> "ClusterProbe":
        """Seed the centroids with spherical k-means++ on ``codes`` (B, dim, H, W); gradient
        descent from random centroids can leave a centroid that never wins a pixel."""
        from diffnotes.segmentation.picie import kmeans

        _, mu = kmeans(codes.detach(), self.clusters.shape[0], generator, n_iter=0)
        with torch.no_grad():
            self.clusters.copy_(mu.to(self.clusters.dtype))
        return self

    def inner(self, codes: torch.Tensor) -> torch.Tensor:
        check_tensor(codes, "codes", 4)
        if codes.shape[1] != self.clusters.shape[1]:
            raise ValueError(f"codes must have {self.clusters.shape[1]} channels, got shape "
                             f"{tuple(codes.shape)}")
        return torch.einsum("bchw,kc->bkhw", F.normalize(codes, dim=1, eps=_EPS),
                            F.normalize(self.clusters, dim=1, eps=_EPS))

    def loss(self, codes: torch.Tensor) -> torch.Tensor:
        return -self.inner(codes).max(dim=1).values.mean()

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.inner(codes).argmax(dim=1)


# ----------------------------------------------------------------------------- a small trainer
def sample_points(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather positions ``idx`` (B, P) (flat indices into H*W) of maps (B, C, H, W) as
    (B, C, P, 1) maps: STEGO computes its loss on random samples of positions."""
    flat = x.flatten(2)
    return flat.gather(2, idx[:, None, :].expand(-1, x.shape[1], -1))[..., None]


def train_stego(feats: torch.Tensor, generator: torch.Generator, dim: int = 32, k: int = 5,
                steps: int = 300, batch_size: int = 16, lr: float = 3e-3, n_points: int = 64,
                shifts=(0.18, 0.12, 0.46), weights=(0.67, 0.25, 0.63), progress: bool = True,
                add_mean: bool = False, stabilize: bool = False):
    """Train a :class:`SegmentationHead` on frozen features with :func:`stego_objective`.

    Each step takes a batch of images, a partner for each among its ``k`` nearest neighbours
    (:func:`knn_pairs`) and a random other image, and evaluates the loss on ``n_points``
    random positions of each map (the official code samples 11 x 11 = 121 points).
    ``add_mean`` and ``stabilize`` switch on the official code's two extras (:func:`stego_loss`);
    off, the training is bitwise the one without these options.

    Args:
        feats: (N, C, H, W) frozen backbone features.
        generator: initial weights, batches and partners.
    Returns:
        ``(head, losses)``.
    """
    from tqdm.auto import tqdm

    check_tensor(feats, "feats", 4)
    n = feats.shape[0]
    if n < 3:
        raise ValueError(f"feats must hold at least 3 images, got shape {tuple(feats.shape)}")
    knn = knn_pairs(feats, min(k, n - 1))
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = SegmentationHead(feats.shape[1], dim)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc="STEGO", disable=not progress):
        idx = torch.randperm(n, generator=generator)[:batch_size]
        pick = torch.randint(knn.shape[1], (len(idx),), generator=generator)
        nn_idx = knn[idx, pick]
        rnd = (idx + torch.randint(1, n, (len(idx),), generator=generator)) % n  # never itself
        hw = feats.shape[2] * feats.shape[3]
        pts = [torch.rand(len(idx), hw, generator=generator).argsort(1)[:, :n_points]
               for _ in range(3)]
        f, fk, fr = (sample_points(feats[i], p) for i, p in zip((idx, nn_idx, rnd), pts))
        c, ck, cr = head(f), head(fk), head(fr)   # the head is pointwise (1x1 convs)
        extras = {}
        if add_mean:
            extras["add_mean"] = True
        if stabilize:
            extras["stabilize"] = True
        loss = stego_objective(f, c, fk, ck, fr, cr, shifts=shifts, weights=weights, **extras)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return head, losses


def fit_cluster_probe(codes: torch.Tensor, n_clusters: int, generator: torch.Generator,
                      steps: int = 100, lr: float = 0.05) -> ClusterProbe:
    """A :class:`ClusterProbe` seeded by k-means++ and trained by gradient descent on
    ``codes`` (detached), as STEGO trains its probe next to the head."""
    codes = codes.detach()
    probe = ClusterProbe(codes.shape[1], n_clusters).to(codes.dtype).init_from(codes, generator)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        probe.loss(codes).backward()
        opt.step()
    return probe
