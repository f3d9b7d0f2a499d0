"""diffnotes.representation.mutual_information (eqs 6.1–6.6) and diffnotes.representation.infogan."""
import math

import numpy as np
import pytest
import torch

from diffnotes.representation import mutual_information as MI


def _joint(seed=0, shape=(4, 6)):
    rng = np.random.default_rng(seed)
    p = rng.random(shape) ** 2
    return p / p.sum()


def test_mutual_information_table():
    P = _joint()
    px, py = P.sum(1), P.sum(0)
    brute = sum(P[i, j] * math.log(P[i, j] / (px[i] * py[j])) for i in range(4) for j in range(6))
    assert abs(MI.mutual_information(P) - brute) < 1e-12
    assert abs(MI.mutual_information(P) - (MI.entropy(px) - MI.conditional_entropy(P))) < 1e-12  # eq 6.2
    assert abs(MI.mutual_information(np.outer(px, py))) < 1e-12                                  # independent
    assert abs(MI.mutual_information(np.diag([0.25] * 4)) - math.log(4)) < 1e-12


def test_bound_tight_at_true_posterior_and_below_otherwise():
    P = _joint(1)                                    # rows c, columns x
    post = P / P.sum(0, keepdims=True)               # P(c | x)
    I = MI.mutual_information(P)
    assert abs(MI.table_mi_lower_bound(P, post) - I) < 1e-12
    rng = np.random.default_rng(2)
    for _ in range(5):
        Q = rng.random(P.shape)
        Q = Q / Q.sum(0, keepdims=True)
        gap = I - MI.table_mi_lower_bound(P, Q)
        kl = sum(P[:, j].sum() * (post[:, j] * np.log(post[:, j] / Q[:, j])).sum() for j in range(P.shape[1]))
        assert gap > 0 and abs(gap - kl) < 1e-12     # the gap is E_x KL(P(c|x) ‖ Q(c|x))
    # eq 6.6's first line as printed (c' ~ P(c), independent of x) is never positive
    pc = P.sum(1)
    printed = MI.entropy(pc) + sum(P[:, j].sum() * (pc * np.log(post[:, j])).sum() for j in range(P.shape[1]))
    assert printed <= 1e-12 < I


def test_sample_bound_matches_table_bound():
    P = _joint(3, (3, 4))
    post = torch.tensor(P / P.sum(0, keepdims=True))
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(torch.tensor(P.reshape(-1)), 200000, replacement=True, generator=g)
    c, x = idx // 4, idx % 4
    est = MI.mi_lower_bound(torch.log(post[c, x]), MI.entropy(P.sum(1)))
    assert abs(float(est) - MI.mutual_information(P)) < 0.01


def test_info_losses():
    logits = torch.randn(5, 3)
    c = torch.tensor([0, 2, 1, 1, 0])
    ref = -torch.log_softmax(logits, 1)[torch.arange(5), c].mean()
    assert torch.allclose(MI.categorical_info_loss(logits, c), ref)
    mean, log_std, cc = torch.randn(4, 2), torch.randn(4, 2) * 0.1, torch.randn(4, 2)
    ref = -torch.distributions.Normal(mean, log_std.exp()).log_prob(cc).sum(1).mean()
    assert torch.allclose(MI.gaussian_info_loss(mean, log_std, cc), ref, atol=1e-6)


def test_best_matching_accuracy():
    from diffnotes.representation.infogan import best_matching_accuracy
    true = np.array([0, 0, 1, 1, 2, 2, 3])
    perm = np.array([2, 0, 3, 1])
    assert best_matching_accuracy(perm[true], true)["accuracy"] == 1.0
    pred = perm[true].copy()
    pred[0] = perm[1]
    assert abs(best_matching_accuracy(pred, true)["accuracy"] - 6 / 7) < 1e-12


def test_infogan_shapes_and_round_trip(tmp_path):
    torch.set_num_threads(1)
    from diffnotes.representation import infogan as IG
    IG.train(steps=3, batch_size=8, n_data=32, out_dir=tmp_path, log_every=1)
    G, D = IG.load_infogan(tmp_path / "infogan.safetensors")
    z, c, cc = IG.sample_codes(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = G(z, c, cc)
        d, qc, qm = D(x)
    assert x.shape == (4, 1, IG.RESOLUTION, IG.RESOLUTION) and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert d.shape == (4,) and qc.shape == (4, IG.N_CAT) and qm.shape == (4, IG.N_CONT)
    it = IG.info_terms(qc, qm, c, cc)
    assert abs(it["bound_cat"] - (math.log(IG.N_CAT) - float(it["loss_cat"]))) < 1e-9
    assert (tmp_path / "TRAINING.json").exists()


def test_bad_input():
    with pytest.raises(ValueError, match="joint"):
        MI.mutual_information(np.ones((2, 2)))
    with pytest.raises(ValueError, match="q_c_given_x"):
        MI.table_mi_lower_bound(_joint(), np.ones((2, 2)))
    with pytest.raises(ValueError, match="log_q"):
        MI.mi_lower_bound(torch.zeros(2, 2), 1.0)
