"""STEGO (Ahmad's notes, §5.6): correspondence tensors and the correlation loss against direct loops
(float64), the centring / clamping switches, KNN pairs, the head and probe, and bad input."""
import itertools
import math

import pytest
import torch

from diffnotes.segmentation.stego import (ClusterProbe, SegmentationHead, correspondence,
                                          knn_pairs, stego_loss, stego_objective)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loop_corr(f, g):
    B, C, H, W = f.shape
    I, J = g.shape[2:]
    out = torch.zeros(B, H, W, I, J, dtype=torch.float64)
    for b, h, w, i, j in itertools.product(range(B), range(H), range(W), range(I), range(J)):
        u = [float(f[b, c, h, w]) for c in range(C)]
        v = [float(g[b, c, i, j]) for c in range(C)]
        out[b, h, w, i, j] = (sum(x * y for x, y in zip(u, v))
                              / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v))))
    return out


def _loop_loss(fa, fb, ca, cb, shift, centering, clamp):
    Fm, Sm = _loop_corr(fa, fb), _loop_corr(ca, cb)
    B, H, W, I, J = Fm.shape
    total = 0.0
    for b, h, w in itertools.product(range(B), range(H), range(W)):
        mean_ij = sum(float(Fm[b, h, w, i, j]) for i in range(I) for j in range(J)) / (I * J)
        for i, j in itertools.product(range(I), range(J)):
            Fv = float(Fm[b, h, w, i, j]) - (mean_ij if centering else 0.0)
            Sv = max(float(Sm[b, h, w, i, j]), 0.0) if clamp else float(Sm[b, h, w, i, j])
            total += (Fv - shift) * Sv
    return -total / (B * H * W * I * J)


def test_correspondence_matches_loop():
    f, g = _rand(2, 3, 3, 4, seed=1), _rand(2, 3, 2, 5, seed=2)
    got = correspondence(f, g)
    assert got.shape == (2, 3, 4, 2, 5)
    assert (got - _loop_corr(f, g)).abs().max() < 1e-13
    self_corr = correspondence(f, f).reshape(2, 12, 12)
    assert torch.allclose(self_corr.diagonal(dim1=1, dim2=2), torch.ones(2, 12, dtype=torch.float64))


@pytest.mark.parametrize("centering, clamp", list(itertools.product([True, False], repeat=2)))
def test_loss_matches_loop(centering, clamp):
    fa, fb = _rand(2, 5, 3, 3, seed=3), _rand(2, 5, 2, 4, seed=4)
    ca, cb = _rand(2, 3, 3, 3, seed=5), _rand(2, 3, 2, 4, seed=6)
    got = stego_loss(fa, fb, ca, cb, 0.3, spatial_centering=centering, zero_clamp=clamp)
    want = _loop_loss(fa, fb, ca, cb, 0.3, centering, clamp)
    assert abs(float(got) - want) < 1e-13


def test_switches_change_the_loss_and_act_where_documented():
    fa, ca, cb = _rand(1, 4, 3, 3, seed=7), _rand(1, 3, 3, 3, seed=8), _rand(1, 3, 3, 3, seed=9)
    losses = {(c, z): float(stego_loss(fa, fa, ca, cb, 0.1, c, z))
              for c in (True, False) for z in (True, False)}
    assert len({round(v, 12) for v in losses.values()}) == 4
    # clamping touches S only: with non-negative codes S >= 0, so the clamp changes nothing
    pa, pb = ca.abs(), cb.abs()
    assert float(stego_loss(fa, fa, pa, pb, 0.1, True, True)) == pytest.approx(
        float(stego_loss(fa, fa, pa, pb, 0.1, True, False)), abs=1e-15)
    # centring touches F only: with spatially constant, equal codes S == 1 everywhere, so the
    # centred loss is -(mean of a zero-mean F - b) = b, and the uncentred one is -(mean F - b)
    const = torch.ones(1, 3, 3, 3, dtype=torch.float64)
    assert float(stego_loss(fa, fa, const, const, 0.25)) == pytest.approx(0.25, abs=1e-14)
    Fm = correspondence(fa, fa)
    assert float(stego_loss(fa, fa, const, const, 0.25, spatial_centering=False)) == \
        pytest.approx(-(float(Fm.mean()) - 0.25), abs=1e-14)


def test_loss_rewards_agreement():
    # codes that reproduce the features' geometry (S = F) must beat random codes; the notes'
    # eq 5.28 without the minus sign ranks them the other way round
    fa, fb = _rand(2, 6, 3, 3, seed=20), _rand(2, 6, 3, 3, seed=21)
    ra, rb = _rand(2, 6, 3, 3, seed=22), _rand(2, 6, 3, 3, seed=23)
    for centering, clamp in itertools.product([True, False], repeat=2):
        aligned = float(stego_loss(fa, fb, fa, fb, 0.0, centering, clamp))
        random = float(stego_loss(fa, fb, ra, rb, 0.0, centering, clamp))
        assert aligned < random
        assert -aligned > -random      # the printed (sign-flipped) loss prefers random codes


def test_gradient_reaches_codes_not_features():
    fa = _rand(1, 4, 2, 2, seed=10).requires_grad_(True)
    ca = _rand(1, 3, 2, 2, seed=11).requires_grad_(True)
    stego_loss(fa, fa, ca, ca, 0.2).backward()
    assert fa.grad is None
    assert ca.grad is not None and ca.grad.abs().sum() > 0


def test_objective_is_weighted_sum():
    f = [_rand(2, 4, 2, 2, seed=s) for s in (12, 13, 14)]
    c = [_rand(2, 3, 2, 2, seed=s) for s in (15, 16, 17)]
    got = stego_objective(f[0], c[0], f[1], c[1], f[2], c[2], shifts=(0.1, 0.2, 0.3),
                          weights=(1.0, 2.0, 3.0))
    want = sum(w * stego_loss(f[0], fb, c[0], cb, b)
               for fb, cb, b, w in zip(f, c, (0.1, 0.2, 0.3), (1.0, 2.0, 3.0)))
    assert float(got) == pytest.approx(float(want), abs=1e-13)


def test_knn_pairs_brute_force():
    d = _rand(9, 5, seed=18)
    nn = knn_pairs(d, 3)
    assert nn.shape == (9, 3)
    for n in range(9):
        sims = [(float(torch.dot(d[n], d[m]) / (d[n].norm() * d[m].norm())), m)
                for m in range(9) if m != n]
        assert nn[n].tolist() == [m for _, m in sorted(sims, reverse=True)[:3]]
    maps = d[:, :, None, None].expand(9, 5, 2, 3)      # maps are average-pooled first
    assert torch.equal(knn_pairs(maps, 3), nn)


def test_head_and_cluster_probe():
    head = SegmentationHead(6, 4).double()
    assert head(_rand(2, 6, 5, 5, seed=19)).shape == (2, 4, 5, 5)
    # two well separated directions: the probe's gradient descent finds them
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    truth = torch.randint(0, 2, (4, 6, 6), generator=g)
    codes = centers[truth].permute(0, 3, 1, 2) + 0.05 * torch.randn(4, 3, 6, 6, generator=g,
                                                                     dtype=torch.float64)
    probe = ClusterProbe(3, 2).double().init_from(codes, torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(probe.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        probe.loss(codes).backward()
        opt.step()
    labels = probe(codes)
    agree = (labels == truth).double().mean()
    assert max(agree, 1 - agree) == 1.0


@pytest.mark.parametrize("call, match", [
    (lambda: correspondence(torch.ones(2, 3, 4), torch.ones(2, 3, 4, 4)), "f"),
    (lambda: correspondence(torch.ones(2, 3, 4, 4), torch.ones(2, 5, 4, 4)), "f and g"),
    (lambda: stego_loss(torch.ones(1, 3, 2, 2), torch.ones(1, 4, 2, 2), torch.ones(1, 2, 2, 2),
                        torch.ones(1, 2, 2, 2), 0.1), "feats_a and feats_b"),
    (lambda: stego_loss(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2), torch.ones(1, 2, 3, 2),
                        torch.ones(1, 2, 2, 2), 0.1), "codes_a"),
    (lambda: stego_loss(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2), torch.ones(1, 2, 2, 2),
                        torch.ones(1, 3, 2, 2), 0.1), "codes_a and codes_b"),
    (lambda: stego_loss(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2), torch.ones(2, 2),
                        torch.ones(1, 2, 2, 2), 0.1), "codes_a"),
    (lambda: stego_loss(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2), torch.ones(1, 2, 2, 2),
                        torch.ones(1, 2, 2, 2), float("inf")), "shift"),
    (lambda: knn_pairs(torch.ones(4, 3), 4), "k"),
    (lambda: knn_pairs(torch.ones(4, 3, 2), 1), "feats"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------ the official code's two extras
def _loop_loss_extras(fa, fb, ca, cb, shift, add_mean, stabilize):
    """The official ``helper`` (pointwise, zero_clamp) with direct loops."""
    Fm, Sm = _loop_corr(fa, fb), _loop_corr(ca, cb)
    B, H, W, I, J = Fm.shape
    n = B * H * W * I * J
    old_mean = float(Fm.sum()) / n
    Fc = Fm.clone()
    for b, h, w in itertools.product(range(B), range(H), range(W)):
        Fc[b, h, w] = Fm[b, h, w] - float(Fm[b, h, w].sum()) / (I * J)
    if add_mean:
        Fc = Fc - float(Fc.sum()) / n + old_mean
    total = 0.0
    for b, h, w, i, j in itertools.product(range(B), range(H), range(W), range(I), range(J)):
        S = max(float(Sm[b, h, w, i, j]), 0.0)
        if stabilize:
            S = min(S, 0.8)
        total += (float(Fc[b, h, w, i, j]) - shift) * S
    return -total / n


@pytest.mark.parametrize("add_mean, stabilize", list(itertools.product([True, False], repeat=2)))
def test_official_extras_match_loop(add_mean, stabilize):
    fa, fb = _rand(2, 5, 3, 3, seed=3), _rand(2, 5, 2, 4, seed=4)
    ca = 0.2 * _rand(2, 3, 3, 3, seed=5) + 1.0     # codes with cosines above 0.8 occur
    cb = 0.2 * _rand(2, 3, 2, 4, seed=6) + 1.0
    assert float((correspondence(ca, cb) > 0.8).double().mean()) > 0.3
    got = stego_loss(fa, fb, ca, cb, 0.1, add_mean=add_mean, stabilize=stabilize)
    want = _loop_loss_extras(fa, fb, ca, cb, 0.1, add_mean, stabilize)
    assert abs(float(got) - want) < 1e-13


def test_extras_off_is_bitwise_default_and_add_mean_is_a_shift():
    fa, fb = _rand(2, 5, 3, 3, seed=7), _rand(2, 5, 3, 3, seed=8)
    ca, cb = _rand(2, 3, 3, 3, seed=9), _rand(2, 3, 3, 3, seed=10)
    base = stego_loss(fa, fb, ca, cb, 0.2)
    assert torch.equal(base, stego_loss(fa, fb, ca, cb, 0.2, add_mean=False, stabilize=False))
    # adding the batch mean of F back = lowering the shift by it
    m = float(correspondence(fa, fb).mean())
    assert float(stego_loss(fa, fb, ca, cb, 0.2, add_mean=True)) == pytest.approx(
        float(stego_loss(fa, fb, ca, cb, 0.2 - m)), abs=1e-14)
    # the upper clamp stops the gradient where S > 0.8: codes all within a small cone
    near = 1.0 + 0.05 * _rand(2, 3, 3, 3, seed=12)
    assert float(correspondence(near, near).min()) > 0.8
    grads = []
    for stab in (True, False):
        c = near.clone().requires_grad_()
        stego_loss(fa, fa, c, near, 0.0, stabilize=stab).backward()
        grads.append(c.grad.abs().max().item())
    assert grads[0] == 0.0 and grads[1] > 1e-6


def test_train_stego_extras_off_is_bitwise_default():
    from diffnotes.segmentation.stego import train_stego
    feats = _rand(6, 4, 4, 4, seed=11).float()
    h1, l1 = train_stego(feats, torch.Generator().manual_seed(0), dim=3, k=2, steps=3,
                         batch_size=4, n_points=8, progress=False)
    h2, l2 = train_stego(feats, torch.Generator().manual_seed(0), dim=3, k=2, steps=3,
                         batch_size=4, n_points=8, progress=False, add_mean=False,
                         stabilize=False)
    h3, l3 = train_stego(feats, torch.Generator().manual_seed(0), dim=3, k=2, steps=3,
                         batch_size=4, n_points=8, progress=False, add_mean=True,
                         stabilize=True)
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(h1.state_dict().values(), h2.state_dict().values()))
    assert l1[0] != l3[0]
