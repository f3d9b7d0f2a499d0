"""PiCIE: clustering with photometric invariance and geometric equivariance (Cho et al., CVPR
2021), Ahmad's notes, §5.5.

Each round: run k-means on the pixel features of two photometrically different views of the
same images (giving labels and centroids ``(y1, mu1)`` and ``(y2, mu2)``), then train the network
so that each view's pixels are classified by *both* clusterings (within-view and cross-view
cross-entropy, eqs 5.23-5.24). Classification is non-parametric: the logits are minus the
cosine distances to the centroids (eq 5.21). The geometric transform G is applied to the image
before the network in one view and to the feature map after the network in the other (eq 5.25),
so the two feature maps are only equal if the network commutes with G (equivariance).

Pixel features are channels first: ``(B, C, H, W)``; labels ``(B, H, W)``; centroids ``(K, C)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffnotes.utils import check_finite, check_tensor

__all__ = ["kmeans", "assign", "cluster_logits", "cluster_loss", "within_view_loss",
           "cross_view_loss", "picie_loss", "overclustering_loss", "GeometricTransform",
           "random_geometric", "photometric_jitter", "equivariance_error", "flatten_pixels",
           "train_picie"]

_EPS = 1e-12


# ----------------------------------------------------------------------------- k-means
def flatten_pixels(feats: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C), pixels in (b, h, w) order."""
    check_tensor(feats, "feats", 4)
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


def _dist(x: torch.Tensor, mu: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return 1.0 - F.normalize(x, dim=1, eps=_EPS) @ F.normalize(mu, dim=1, eps=_EPS).T
    return torch.cdist(x, mu).square()


def assign(x: torch.Tensor, centroids: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Nearest centroid of each row of ``x`` (N, C): the k-means assignment step. -> (N,) long."""
    check_tensor(x, "x", 2)
    check_tensor(centroids, "centroids", 2)
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"x and centroids must have the same width C, got {tuple(x.shape)} "
                         f"and {tuple(centroids.shape)}")
    return _dist(x, centroids, metric).argmin(dim=1)


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, n_iter: int = 30,
           metric: str = "cosine"):
    """Lloyd's k-means with k-means++ seeding (Ahmad's notes, §5.5, the clustering step of PiCIE).

    Minimises ``sum_n d(x_n, mu_{y_n})``; ``metric="euclidean"`` uses squared distances (the
    objective in Ahmad's notes), ``"cosine"`` the cosine distance with unit-norm centroids (spherical
    k-means, PiCIE's default ``metric_train='cosine'``). An empty cluster is re-seeded with the
    point farthest from its centroid.

    Args:
        x: (N, C) points, or (B, C, H, W) pixel features (flattened with :func:`flatten_pixels`).
        k: number of clusters, 1 <= k <= N.
        generator: torch.Generator for the seeding.
    Returns:
        ``(labels (N,), centroids (k, C))``.
    Raises:
        ValueError on a wrong rank, k outside [1, N] or an unknown metric.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    check_tensor(x, "x", (2, 4))
    if x.ndim == 4:
        x = flatten_pixels(x)
    x = x.detach()
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (number of points), got {k!r}")
    xs = F.normalize(x, dim=1, eps=_EPS) if metric == "cosine" else x
    # k-means++ seeding
    idx = [int(torch.randint(n, (1,), generator=generator))]
    d2 = _dist(xs, xs[idx], metric).min(dim=1).values.clamp(min=0)
    for _ in range(1, k):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        j = int(torch.multinomial(p, 1, generator=generator))
        idx.append(j)
        d2 = torch.minimum(d2, _dist(xs, xs[j:j + 1], metric)[:, 0].clamp(min=0))
    mu = xs[idx].clone()
    labels = None
    for _ in range(n_iter):
        d = _dist(xs, mu, metric)
        new = d.argmin(dim=1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(mu).index_add_(0, labels, xs)
        counts = torch.bincount(labels, minlength=k).to(xs.dtype)
        for c in (counts == 0).nonzero().flatten().tolist():  # re-seed empty clusters
            far = int(d.min(dim=1).values.argmax())
            sums[c], counts[c] = xs[far], 1.0
            labels[far] = c
        mu = sums / counts[:, None]
        if metric == "cosine":
            mu = F.normalize(mu, dim=1, eps=_EPS)
    labels = _dist(xs, mu, metric).argmin(dim=1)
    return labels, mu


# ----------------------------------------------------------------------------- losses
def _check_feats_labels(z, y, mu, zn="z", yn="y", mun="mu"):
    check_tensor(z, zn, 4)
    check_tensor(y, yn, 3)
    check_tensor(mu, mun, 2)
    if y.shape != (z.shape[0],) + tuple(z.shape[2:]):
        raise ValueError(f"{yn} must have shape (B, H, W) = {(z.shape[0],) + tuple(z.shape[2:])} "
                         f"matching {zn} of shape {tuple(z.shape)}, got {tuple(y.shape)}")
    if mu.shape[1] != z.shape[1]:
        raise ValueError(f"{mun} must have C={z.shape[1]} columns like {zn} of shape "
                         f"{tuple(z.shape)}, got {tuple(mu.shape)}")
    if y.dtype.is_floating_point:
        raise TypeError(f"{yn} must hold integer cluster labels, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= mu.shape[0]):
        raise ValueError(f"{yn} must lie in [0, {mu.shape[0] - 1}] (K={mu.shape[0]} centroids), "
                         f"got values in [{int(y.min())}, {int(y.max())}]")


def cluster_logits(z: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Minus the cosine distance of every pixel to every centroid: (B, C, H, W), (K, C) ->
    (B, K, H, W), the logits of eq 5.21."""
    check_tensor(z, "z", 4)
    check_tensor(mu, "mu", 2)
    if mu.shape[1] != z.shape[1]:
        raise ValueError(f"mu must have C={z.shape[1]} columns, got {tuple(mu.shape)}")
    cos = torch.einsum("bchw,kc->bkhw", F.normalize(z, dim=1, eps=_EPS),
                       F.normalize(mu, dim=1, eps=_EPS))
    return cos - 1.0  # -d(z, mu_k), d = cosine distance


def cluster_loss(z: torch.Tensor, y: torch.Tensor, mu: torch.Tensor,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """PiCIE's non-parametric cluster loss, Ahmad's notes, eq 5.21, averaged over pixels.

    ``L(z_p, y_p, mu) = -log( exp(-d(z_p, mu_{y_p})) / sum_l exp(-d(z_p, mu_l)) )`` with d the
    cosine distance. ``weight`` (K,) optionally rescales classes (PiCIE's balanced loss uses
    inverse cluster sizes); the mean is then weighted as in ``torch.nn.CrossEntropyLoss``.

    Args:
        z: (B, C, H, W) features; y: (B, H, W) labels in [0, K); mu: (K, C) centroids.
    Returns:
        scalar.
    Raises:
        ValueError / TypeError on mismatched shapes or labels out of range.
    """
    _check_feats_labels(z, y, mu)
    return F.cross_entropy(cluster_logits(z, mu), y, weight=weight)  # eq 5.21


def within_view_loss(z1, z2, y1, y2, mu1, mu2, weights=(None, None)) -> torch.Tensor:
    """Within-view loss (PiCIE eq 4; Ahmad's notes, eq 5.23, corrected): each view is classified by its
    own clustering, ``L(z1, y1, mu1) + L(z2, y2, mu2)`` (each a pixel mean).

    Ahmad's notes print the second term as ``L(z2, y1, mu1)``, which is a cross-view term; see the
    errata.
    """
    _check_feats_labels(z1, y1, mu1, "z1", "y1", "mu1")
    _check_feats_labels(z2, y2, mu2, "z2", "y2", "mu2")
    return cluster_loss(z1, y1, mu1, weights[0]) + cluster_loss(z2, y2, mu2, weights[1])


def cross_view_loss(z1, z2, y1, y2, mu1, mu2, weights=(None, None)) -> torch.Tensor:
    """Cross-view loss, Ahmad's notes, eq 5.24: each view is classified by the *other* view's
    clustering, ``L(z1, y2, mu2) + L(z2, y1, mu1)`` (each a pixel mean). ``weights`` are the
    class weights of clusterings 1 and 2."""
    _check_feats_labels(z1, y2, mu2, "z1", "y2", "mu2")
    _check_feats_labels(z2, y1, mu1, "z2", "y1", "mu1")
    return cluster_loss(z1, y2, mu2, weights[1]) + cluster_loss(z2, y1, mu1, weights[0])


def picie_loss(z1, z2, y1, y2, mu1, mu2, weights=(None, None)) -> torch.Tensor:
    """``L_within + L_cross`` (Ahmad's notes, §5.5). z1 = f(G(P1(x))), z2 = G(f(P2(x))) (eq 5.25); y1,
    y2 are k-means labels of the two views mapped by the same G."""
    return (within_view_loss(z1, z2, y1, y2, mu1, mu2, weights)
            + cross_view_loss(z1, z2, y1, y2, mu1, mu2, weights))


def overclustering_loss(z1, z2, clusterings, lambdas) -> torch.Tensor:
    """Ahmad's notes, eq 5.26: ``sum_k lambda_k L_k`` over several clusterings of the same features,
    e.g. K = number of classes and an over-clustering K' > K.

    Args:
        z1, z2: (B, C, H, W) the two views' features.
        clusterings: sequence of tuples ``(y1, y2, mu1, mu2)``, one per K.
        lambdas: one finite weight per clustering.
    """
    clusterings, lambdas = list(clusterings), list(lambdas)
    if not clusterings or len(clusterings) != len(lambdas):
        raise ValueError(f"clusterings and lambdas must be non-empty and of equal length, got "
                         f"{len(clusterings)} and {len(lambdas)}")
    total = 0.0
    for (y1, y2, mu1, mu2), lam in zip(clusterings, lambdas):
        total = total + check_finite(lam, "lambdas") * picie_loss(z1, z2, y1, y2, mu1, mu2)
    return total


# ----------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class GeometricTransform:
    """A horizontal flip and/or a crop, in fractions of the input size, then a resize to
    ``size``. Applied alike to images (B, 3, H, W), feature maps (B, C, h, w) and label maps
    (B, H, W; nearest resampling), so ``G(f(x))`` and ``f(G(x))`` live on the same grid."""
    top: float = 0.0
    left: float = 0.0
    height: float = 1.0
    width: float = 1.0
    hflip: bool = False

    def __call__(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        check_tensor(x, "x", (3, 4))
        is_label = x.ndim == 3
        y = x[:, None].to(torch.float64 if not x.dtype.is_floating_point else x.dtype) \
            if is_label else x
        H, W = y.shape[-2:]
        t, l = round(self.top * H), round(self.left * W)
        h, w = max(1, round(self.height * H)), max(1, round(self.width * W))
        y = y[..., t:t + h, l:l + w]
        if self.hflip:
            y = y.flip(-1)
        size = size or (H, W)
        if tuple(y.shape[-2:]) != tuple(size):
            mode = "nearest" if is_label else "bilinear"
            kw = {} if is_label else {"align_corners": False}
            y = F.interpolate(y, size=size, mode=mode, **kw)
        return y[:, 0].round().to(x.dtype) if is_label else y


def random_geometric(generator: torch.Generator, min_scale: float = 0.5,
                     flip: bool = True) -> GeometricTransform:
    """A random crop (side fraction in [min_scale, 1]) and a coin-flip horizontal flip."""
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must lie in (0, 1], got {min_scale}")
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    s = min_scale + (1 - min_scale) * u[0]
    return GeometricTransform(top=(1 - s) * u[1], left=(1 - s) * u[2], height=s, width=s,
                              hflip=flip and u[3] < 0.5)


def photometric_jitter(x: torch.Tensor, generator: torch.Generator, brightness: float = 0.3,
                       contrast: float = 0.3, saturation: float = 0.3) -> torch.Tensor:
    """Random per-image brightness, contrast and saturation changes of images (B, 3, H, W) in
    [0, 1] (PiCIE's photometric transform P; the geometry is untouched). Returns the same shape,
    clipped to [0, 1]."""
    check_tensor(x, "x", 4)
    if x.shape[1] != 3:
        raise ValueError(f"x must have 3 colour channels, got shape {tuple(x.shape)}")
    B = x.shape[0]

    def factor(a):
        return (1 + a * (2 * torch.rand(B, 1, 1, 1, generator=generator, dtype=x.dtype) - 1))

    y = x * factor(brightness)
    m = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - m) * factor(contrast) + m
    g = y.mean(dim=1, keepdim=True)
    y = (y - g) * factor(saturation) + g
    return y.clamp(0, 1)


def equivariance_error(feature_fn, x: torch.Tensor, transform: GeometricTransform) -> torch.Tensor:
    """``mean |f(G(x)) - G(f(x))|^2``: zero exactly when f commutes with G on x (eq 5.25's
    requirement). The feature map of G(x) sets the output grid."""
    check_tensor(x, "x", 4)
    a = feature_fn(transform(x))
    b = transform(feature_fn(x), size=tuple(a.shape[-2:]))
    return (a - b).square().mean()


# ----------------------------------------------------------------------------- a small trainer
def _balance_weights(labels: torch.Tensor, k: int, dtype) -> torch.Tensor:
    """Inverse cluster frequencies, normalised to mean 1 (PiCIE's balanced cross-entropy)."""
    counts = torch.bincount(labels.flatten(), minlength=k).to(dtype)
    w = counts.sum() / (k * counts.clamp(min=1))
    return w / w.mean()


def train_picie(feats1: torch.Tensor, feats2: torch.Tensor, k: int, generator: torch.Generator,
                dim: int = 32, hidden: int = 64, rounds: int = 3, steps_per_round: int = 60,
                batch_size: int = 16, lr: float = 3e-3, overcluster: int | None = None,
                lambdas=(1.0, 1.0), min_scale: float = 0.6, balance: bool = True,
                progress: bool = True):
    """PiCIE on frozen backbone features: alternate k-means and training of a small conv head.

    ``feats1`` and ``feats2`` are the backbone features of two photometric views P1(x), P2(x)
    of the same N images. Each round clusters the head's outputs of both views (k-means,
    cosine; plus an over-clustering with ``overcluster`` > k clusters if given, eq 5.26), then
    takes ``steps_per_round`` Adam steps on ``L_within + L_cross`` with
    ``z1 = head(G(feats1))`` and ``z2 = G(head(feats2))`` for a random crop-and-flip G per
    batch (eq 5.25; G is applied to the frozen features, not the image, since the backbone is
    not trained here), the labels mapped by the same G.

    The head is a 3x3 conv, ReLU, 1x1 conv, so it is *not* equivariant to crops by
    construction (its border pixels see zero padding): the cross-view terms teach it.

    Returns:
        ``(head, losses)``.
    """
    from tqdm.auto import tqdm

    check_tensor(feats1, "feats1", 4)
    check_tensor(feats2, "feats2", 4)
    if feats1.shape != feats2.shape:
        raise ValueError(f"feats1 and feats2 must have the same shape, got {tuple(feats1.shape)} "
                         f"and {tuple(feats2.shape)}")
    n, c, h, w = feats1.shape
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = torch.nn.Sequential(torch.nn.Conv2d(c, hidden, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(hidden, dim, 1))
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    ks = [k] + ([overcluster] if overcluster else [])
    lam = list(lambdas)[:len(ks)]
    losses = []
    bar = tqdm(total=rounds * steps_per_round, desc="PiCIE", disable=not progress)
    for _ in range(rounds):
        with torch.no_grad():
            c1, c2 = head(feats1), head(feats2)
        clusterings = []
        for kk in ks:
            y1, mu1 = kmeans(c1, kk, generator)
            y2, mu2 = kmeans(c2, kk, generator)
            y1, y2 = y1.reshape(n, h, w), y2.reshape(n, h, w)
            wts = ((_balance_weights(y1, kk, c1.dtype), _balance_weights(y2, kk, c1.dtype))
                   if balance else (None, None))
            clusterings.append((y1, y2, mu1, mu2, wts))
        for _ in range(steps_per_round):
            idx = torch.randperm(n, generator=generator)[:batch_size]
            G = random_geometric(generator, min_scale=min_scale)
            z1 = head(G(feats1[idx]))                     # f(G(P1 x)), eq 5.25
            z2 = G(head(feats2[idx]), size=z1.shape[-2:])  # G(f(P2 x))
            loss = 0.0
            for (y1, y2, mu1, mu2, wts), lm in zip(clusterings, lam):
                g1, g2 = G(y1[idx], size=z1.shape[-2:]), G(y2[idx], size=z1.shape[-2:])
                loss = loss + lm * picie_loss(z1, z2, g1, g2, mu1, mu2, wts)  # eqs 5.23-5.26
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update()
    bar.close()
    return head, losses
