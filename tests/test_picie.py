"""PiCIE (Ahmad's notes, §5.5): k-means, the cluster loss (eq 5.21) against a loop in float64, the
within- and cross-view losses (eqs 5.23-5.24, corrected), invariance and equivariance, and bad
input."""
import math

import pytest
import torch
import torch.nn as nn

from diffnotes.segmentation.picie import (GeometricTransform, cluster_loss, cross_view_loss,
                                          equivariance_error, kmeans, overclustering_loss,
                                          photometric_jitter, picie_loss, random_geometric,
                                          within_view_loss)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(shape, k, seed):
    return torch.randint(0, k, shape, generator=torch.Generator().manual_seed(seed))


def _loop_cluster_loss(z, y, mu):
    B, C, H, W = z.shape
    K = mu.shape[0]
    cos_d = lambda u, v: 1 - sum(a * b for a, b in zip(u, v)) / (  # noqa: E731
        math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))
    total = 0.0
    for b in range(B):
        for h in range(H):
            for w in range(W):
                u = [float(z[b, c, h, w]) for c in range(C)]
                d = [cos_d(u, mu[k].tolist()) for k in range(K)]
                total += -(-d[int(y[b, h, w])] - math.log(sum(math.exp(-v) for v in d)))  # eq 5.21
    return total / (B * H * W)


def test_kmeans_recovers_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, -5.0, 0]],
                           dtype=torch.float64)
    truth = torch.arange(4).repeat_interleave(30)
    x = centers[truth] + 0.3 * torch.randn(120, 3, generator=g, dtype=torch.float64)
    for metric in ("euclidean", "cosine"):
        labels, mu = kmeans(x, 4, torch.Generator().manual_seed(1), metric=metric)
        # a bijection between found and true clusters
        pairs = {(int(a), int(b)) for a, b in zip(labels, truth)}
        assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4
        assert mu.shape == (4, 3)


def test_kmeans_matches_sklearn_inertia():
    from sklearn.cluster import KMeans

    x = _rand(300, 4, seed=2)
    labels, mu = kmeans(x, 5, torch.Generator().manual_seed(0), metric="euclidean", n_iter=100)
    ours = float(((x - mu[labels]) ** 2).sum())
    sk = KMeans(5, n_init=10, random_state=0).fit(x.numpy()).inertia_
    assert ours <= sk * 1.05            # a local optimum as good as sklearn's best of 10, ±5%
    # and a fixed point of Lloyd's iteration: every point is at its nearest centroid
    assert torch.equal(torch.cdist(x, mu).argmin(1), labels)


def test_cluster_loss_matches_loop():
    z, mu, y = _rand(2, 4, 3, 3, seed=3), _rand(5, 4, seed=4), _labels((2, 3, 3), 5, 5)
    assert abs(float(cluster_loss(z, y, mu)) - _loop_cluster_loss(z, y, mu)) < 1e-13


def test_within_and_cross_view_definitions():
    z1, z2 = _rand(2, 4, 3, 3, seed=6), _rand(2, 4, 3, 3, seed=7)
    mu1, mu2 = _rand(3, 4, seed=8), _rand(3, 4, seed=9)
    y1, y2 = _labels((2, 3, 3), 3, 10), _labels((2, 3, 3), 3, 11)
    L = lambda z, y, mu: _loop_cluster_loss(z, y, mu)  # noqa: E731
    within = L(z1, y1, mu1) + L(z2, y2, mu2)      # paper eq 4 (seed eq 5.23, corrected)
    cross = L(z1, y2, mu2) + L(z2, y1, mu1)       # eq 5.24
    assert float(within_view_loss(z1, z2, y1, y2, mu1, mu2)) == pytest.approx(within, abs=1e-12)
    assert float(cross_view_loss(z1, z2, y1, y2, mu1, mu2)) == pytest.approx(cross, abs=1e-12)
    assert float(picie_loss(z1, z2, y1, y2, mu1, mu2)) == pytest.approx(within + cross, abs=1e-12)
    # the printed eq 5.23 of Ahmad's notes, L(z1,y1,mu1) + L(z2,y1,mu1), is a different number
    seed_form = L(z1, y1, mu1) + L(z2, y1, mu1)
    assert abs(seed_form - within) > 1e-3
    # swapping the views swaps nothing in the totals
    assert float(cross_view_loss(z2, z1, y2, y1, mu2, mu1)) == pytest.approx(cross, abs=1e-12)
    # over-clustering (eq 5.26) is the weighted sum over clusterings
    mu3 = _rand(6, 4, seed=12)
    y3a, y3b = _labels((2, 3, 3), 6, 13), _labels((2, 3, 3), 6, 14)
    got = overclustering_loss(z1, z2, [(y1, y2, mu1, mu2), (y3a, y3b, mu3, mu3)], [0.5, 2.0])
    want = 0.5 * picie_loss(z1, z2, y1, y2, mu1, mu2) + 2.0 * picie_loss(z1, z2, y3a, y3b, mu3, mu3)
    assert float(got) == pytest.approx(float(want), abs=1e-12)


def test_photometrically_invariant_features_make_cross_equal_within():
    # features that ignore brightness and contrast (per-image standardised grey level + position)
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def f(img):
        grey = img.mean(1, keepdim=True)
        grey = (grey - grey.mean((2, 3), keepdim=True)) / grey.std(dim=(2, 3), keepdim=True)
        return torch.cat([grey, torch.ones_like(grey)], 1)

    x1 = x * 0.8
    x2 = (x - 0.5) * 0.6 + 0.45      # a different brightness / contrast, same geometry
    z1, z2 = f(x1), f(x2)
    assert torch.allclose(z1, z2, atol=1e-12)
    y1, mu1 = kmeans(z1, 3, torch.Generator().manual_seed(4))
    y2, mu2 = kmeans(z2, 3, torch.Generator().manual_seed(4))
    y1, y2 = y1.reshape(2, 6, 6), y2.reshape(2, 6, 6)
    assert torch.equal(y1, y2)
    w = within_view_loss(z1, z2, y1, y2, mu1, mu2)
    c = cross_view_loss(z1, z2, y1, y2, mu1, mu2)
    assert float(w) == pytest.approx(float(c), abs=1e-12)


@torch.no_grad()
def test_equivariance_error_zero_for_equivariant_maps():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    lin = nn.Conv2d(3, 5, 1).double()                        # pointwise and linear: commutes
    for _ in range(5):                                       # with crop, flip and resizing
        G = random_geometric(g, min_scale=0.5)
        assert float(equivariance_error(lin, x, G)) < 1e-25
    mlp = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Tanh(), nn.Conv2d(8, 4, 1)).double()
    flip = GeometricTransform(hflip=True)                    # pointwise: commutes with a flip
    assert float(equivariance_error(mlp, x, flip)) < 1e-25
    conv = nn.Conv2d(3, 4, 3, padding=1).double()            # a lopsided 3x3 kernel does not
    assert float(equivariance_error(conv, x, flip)) > 1e-4


def test_geometric_transform_on_labels_and_images():
    lab = torch.arange(16).reshape(1, 4, 4)
    G = GeometricTransform(top=0.5, left=0.0, height=0.5, width=0.5, hflip=True)
    assert G(lab).dtype == lab.dtype
    assert torch.equal(G(lab, size=(2, 2)), torch.tensor([[[9, 8], [13, 12]]]))
    img = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(G(img, size=(2, 2)), img[..., 2:, :2].flip(-1))


def test_photometric_jitter_keeps_geometry():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    x[:, :, 2:5, 3:6] = torch.tensor([0.9, 0.2, 0.1], dtype=torch.float64)[:, None, None]
    y = photometric_jitter(x, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    # pixels that were equal stay equal (a global colour change, no spatial mixing)
    inside = y[:, :, 2:5, 3:6].reshape(2, 3, -1)
    assert torch.allclose(inside, inside[..., :1].expand_as(inside))


@pytest.mark.parametrize("call, match", [
    (lambda: kmeans(torch.ones(5, 2), 6, torch.Generator()), "k"),
    (lambda: kmeans(torch.ones(5, 2, 3), 2, torch.Generator()), "x"),
    (lambda: kmeans(torch.ones(5, 2), 2, torch.Generator(), metric="l1"), "metric"),
    (lambda: cluster_loss(torch.ones(1, 3, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long),
                          torch.ones(4, 3)), "y"),
    (lambda: cluster_loss(torch.ones(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                          torch.ones(4, 5)), "mu"),
    (lambda: cluster_loss(torch.ones(1, 3, 2, 2), torch.full((1, 2, 2), 4), torch.ones(4, 3)), "y"),
    (lambda: cluster_loss(torch.ones(3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                          torch.ones(4, 3)), "z"),
    (lambda: within_view_loss(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2),
                              torch.zeros(1, 2, 2, dtype=torch.long),
                              torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(2, 3),
                              torch.ones(2, 4)), "mu2"),
    (lambda: photometric_jitter(torch.ones(1, 1, 4, 4), torch.Generator()), "x"),
    (lambda: random_geometric(torch.Generator(), min_scale=0.0), "min_scale"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_float_labels_raise_type_error():
    with pytest.raises(TypeError, match="y"):
        cluster_loss(torch.ones(1, 3, 2, 2), torch.zeros(1, 2, 2), torch.ones(4, 3))
