"""PACL (Ahmad's notes, §5.4): the notes' worked example, a direct loop implementation of eqs
5.14-5.18 in float64, invariances, and bad input."""
import math

import pytest
import torch

from diffnotes.segmentation.pacl import (pacl_logits, pacl_loss, pacl_segment,
                                         patch_text_similarity, patch_weights)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loop_logits(P, Q, tau):
    """eqs 5.14-5.17 written with Python loops over images, texts, patches and coordinates."""
    B, T, D = P.shape
    out = [[0.0] * Q.shape[0] for _ in range(B)]
    norm = lambda v: math.sqrt(sum(float(c) ** 2 for c in v))  # noqa: E731
    for i in range(B):
        for j in range(Q.shape[0]):
            s = [sum(float(P[i, t, d]) * float(Q[j, d]) for d in range(D))
                 / (norm(P[i, t]) * norm(Q[j])) for t in range(T)]            # eq 5.14
            z = sum(math.exp(v) for v in s)
            a = [math.exp(v) / z for v in s]                                  # eq 5.15
            v = [sum(a[t] * float(P[i, t, d]) for t in range(T)) for d in range(D)]  # eq 5.16
            out[i][j] = (sum(v[d] * float(Q[j, d]) for d in range(D))
                         / (norm(v) * norm(Q[j]))) / tau                      # eq 5.17
    return torch.tensor(out, dtype=torch.float64)


def test_seed_worked_example_weights():
    # Ahmad's notes, §5.4: cosines 0.1, 0.4, 0.8, 0.9 (sky, tree, person, dog) -> 0.152 .. 0.338
    s = torch.tensor([0.1, 0.4, 0.8, 0.9], dtype=torch.float64)
    patches = torch.stack([s, (1 - s ** 2).sqrt()], dim=-1)[None]   # unit vectors at cosine s
    text = torch.tensor([[2.0, 0.0]], dtype=torch.float64)           # length does not matter
    sim = patch_text_similarity(patches, text)
    assert torch.allclose(sim[0, 0], s, atol=1e-15)
    a = patch_weights(patches, text)[0, 0]
    assert torch.allclose(a.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert [round(v, 3) for v in a.tolist()] == [0.152, 0.205, 0.306, 0.338]
    # and the weights are exactly exp(s) / sum exp(s)
    assert torch.allclose(a, s.exp() / s.exp().sum(), atol=1e-15)


def test_logits_match_loop():
    P, Q = _rand(3, 5, 4, seed=1), _rand(4, 4, seed=2)
    for tau in (1.0, 0.07):
        got = pacl_logits(P, Q, temperature=tau)
        want = _loop_logits(P, Q, tau)
        assert got.shape == (3, 4)
        assert (got - want).abs().max() < 1e-12


def test_loss_matches_loop():
    P, Q, tau = _rand(4, 6, 3, seed=3), _rand(4, 3, seed=4), 0.5
    L = _loop_logits(P, Q, tau)
    want = sum(-L[i, i] + math.log(sum(math.exp(L[i, j]) for j in range(4)))
               for i in range(4)) / 4                                           # eq 5.18
    assert abs(float(pacl_loss(P, Q, tau)) - want) < 1e-12
    want_t = sum(-L[j, j] + math.log(sum(math.exp(L[i, j]) for i in range(4)))
                 for j in range(4)) / 4
    assert abs(float(pacl_loss(P, Q, tau, symmetric=True)) - 0.5 * (want + want_t)) < 1e-12


def test_pooling_depends_on_the_text():
    # the pooled vector of eq 5.16 is text specific: with one patch aligned to each text the
    # diagonal logits exceed what a text-independent (uniform) pooling would give
    P = torch.eye(3, dtype=torch.float64)[None] * 3.0
    Q = torch.eye(3, dtype=torch.float64)
    L = pacl_logits(P, Q)[0]     # one image, three texts
    uniform = 1 / math.sqrt(3)   # cos(mean of the patches, e_j): text-independent pooling
    assert torch.all(L > uniform + 0.05)
    assert torch.allclose(L, L[0].expand(3))


def test_invariances():
    P, Q = _rand(2, 7, 5, seed=5), _rand(3, 5, seed=6)
    L = pacl_logits(P, Q)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(pacl_logits(P[:, perm], Q), L, atol=1e-13)       # patch order
    assert torch.allclose(pacl_logits(P * 4.2, Q * 0.3), L, atol=1e-13)   # positive scales
    assert torch.allclose(pacl_logits(P, Q, temperature=0.25), 4 * L, atol=1e-12)


def test_learnable_temperature_gets_a_gradient():
    P, Q = _rand(3, 4, 2, seed=7), _rand(3, 2, seed=8)
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    P.requires_grad_(True)
    pacl_loss(P, Q, tau).backward()
    assert tau.grad is not None and float(tau.grad) != 0
    assert P.grad is not None and P.grad.abs().sum() > 0


def test_segment_recovers_planted_labels():
    K, D = 4, 6
    classes = _rand(K, D, seed=9)
    truth = torch.randint(0, K, (2, 10), generator=torch.Generator().manual_seed(1))
    patches = classes[truth] * 2.0 + 0.01 * _rand(2, 10, D, seed=10)
    labels, prob = pacl_segment(patches, classes, return_scores=True)
    assert torch.equal(labels, truth)
    assert prob.shape == (2, K, 10)
    assert torch.allclose(prob.sum(1), torch.ones(2, 10, dtype=torch.float64))


@pytest.mark.parametrize("call, match", [
    (lambda: patch_text_similarity(torch.zeros(3, 4), torch.zeros(2, 4)), "patch_emb"),
    (lambda: patch_text_similarity(torch.zeros(1, 3, 4), torch.zeros(2, 2, 4)), "text_emb"),
    (lambda: pacl_logits(torch.zeros(1, 3, 4), torch.zeros(2, 5)), "D"),
    (lambda: pacl_logits(torch.ones(1, 3, 4), torch.ones(2, 4), temperature=0.0), "temperature"),
    (lambda: pacl_logits(torch.ones(1, 3, 4), torch.ones(2, 4), temperature=-1), "temperature"),
    (lambda: pacl_logits(torch.ones(1, 3, 4), torch.ones(2, 4), temperature=float("nan")),
     "temperature"),
    (lambda: pacl_loss(torch.ones(2, 3, 4), torch.ones(3, 4)), "text_emb"),
    (lambda: pacl_segment(torch.ones(2, 3, 4), torch.ones(3, 5)), "class_emb"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_tensor_raises_type_error():
    with pytest.raises(TypeError, match="patch_emb"):
        pacl_logits([[[1.0]]], torch.ones(1, 1))
