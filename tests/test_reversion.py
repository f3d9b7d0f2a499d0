"""ReVersion (Ahmad's notes, §4.4.4, eqs 4.8–4.13): importance sampling of t (the notes' test
vectors), the corrected steering loss, the negatives, only ⟨R⟩ trained."""
import math

import numpy as np
import pytest
import torch

from diffnotes.models.load import load_pipeline
from diffnotes.personalization import reversion as RV


def test_importance_weights_test_vectors():
    f = RV.importance_weights(1000, 0.5)
    assert abs(float(f.sum()) - 0.9995) < 1e-12                    # 1 − α/T
    assert abs(float(f[0]) - 0.0005) < 1e-15
    assert abs(float(f[500]) - 0.001) < 1e-15
    assert abs(float(f[999]) - 0.0014999975326) < 1e-12
    assert abs(float(f[999] / f[0]) - (1 + 0.5 * math.cos(math.pi / 1000)) / 0.5) < 1e-12
    assert abs(float(f[999] / f[0]) - 3.0) < 1e-4
    assert abs(float(RV.importance_weights(1000, 0.5, normalize=True).sum()) - 1) < 1e-12
    u = RV.importance_weights(1000, 0.0)
    assert torch.equal(u, torch.full((1000,), 1e-3, dtype=torch.float64))


def test_sampled_timesteps_skew_late():
    g = torch.Generator().manual_seed(0)
    t = RV.sample_timesteps(100_000, 1000, 0.5, g).double()
    assert float(t.mean()) > 550
    # closed form of the mean: Σ t f(t) / Σ f(t)
    f = RV.importance_weights(1000, 0.5, normalize=True)
    mean = float((torch.arange(1000, dtype=torch.float64) * f).sum())
    assert abs(float(t.mean()) - mean) < 3
    with pytest.raises(ValueError, match="alpha"):
        RV.importance_weights(1000, 1.5)


def test_steering_loss_closed_form_and_corrected_denominator():
    D, K, gamma = 6, 3, 0.07
    R = torch.zeros(D, dtype=torch.float64)
    R[0] = 2.0
    pos = R[None].clone()
    neg = torch.eye(D, dtype=torch.float64)[1:1 + K]               # orthogonal to R
    want = -math.log(math.exp(1 / gamma) / (math.exp(1 / gamma) + K))
    assert abs(float(RV.steering_loss(R, pos, neg, gamma)) - want) < 1e-6
    assert abs(float(RV.pre_loss(R, pos[0], neg, gamma)) - want) < 1e-6
    # two positives: the denominator holds both (the notes print only one, eq 4.10)
    p2 = torch.stack([R, torch.eye(D, dtype=torch.float64)[5]])
    e = [math.exp(1 / gamma), 1.0]
    want2 = -math.log(sum(e) / (sum(e) + K))
    assert abs(float(RV.steering_loss(R, p2, neg, gamma)) - want2) < 1e-9
    # the printed form (one P_i below, L positives above) is not a log-probability: with
    # three positives equal to R and one negative it is negative, the corrected one is not
    e1 = math.exp(1 / gamma)
    printed = -math.log(3 * e1 / (e1 + 1))
    corrected = float(RV.steering_loss(R, R[None].repeat(3, 1), neg[:1], gamma))
    assert printed < 0 < corrected
    assert abs(corrected - (-math.log(3 * e1 / (3 * e1 + 1)))) < 1e-12


def test_negatives_of_the_worked_example():
    assert RV.relation_negatives("A cat is sitting on a chair.", "<R>") == \
        ["cat", "sitting", "chair", "."]
    assert RV.relation_negatives("a red circle <R> a blue square", "<R>") == \
        ["red", "circle", "blue", "square"]


def test_only_relation_row_trained_and_gradient_only_to_R():
    p = load_pipeline("shapes")
    assert all(w in p.tokenizer.get_vocab() for w in RV.SHAPES_PREPOSITIONS)
    ims, caps, _ = RV.relation_exemplars(4)
    table0 = p.text_encoder.get_input_embeddings().weight.detach().clone()
    unet0 = {k: v.clone() for k, v in p.unet.state_dict().items()}
    rel = RV.reversion(p, (ims, caps), steps=2, batch_size=2, progress=False)
    table = p.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[:len(table0)], table0)
    assert all(torch.equal(v, unet0[k]) for k, v in p.unet.state_dict().items())
    assert not torch.equal(rel.embedding, table0.mean(0))
    # the steering loss's gradient reaches R only (positives and negatives are constants)
    R = table[rel.token_id].detach().clone().requires_grad_(True)
    P = table0[:3].clone().requires_grad_(True)
    N = table0[3:6].clone().requires_grad_(True)
    RV.steering_loss(R, P.detach(), N.detach()).backward()
    assert R.grad is not None and P.grad is None and N.grad is None


def test_runs_on_sd15_layout_tiny():
    p = load_pipeline("sd-1.5-layout-tiny")
    ims = np.random.default_rng(0).random((1, 320, 320, 3)).astype(np.float32)
    rel = RV.reversion(p, (ims, ["a cat <R> a dog"]), prepositions=("on", "under"), steps=1,
                       batch_size=1, progress=False)
    assert rel.embedding.shape == (p.text_encoder.config.hidden_size,)


def test_bad_input():
    p = load_pipeline("shapes")
    ims, caps, _ = RV.relation_exemplars(2)
    with pytest.raises(ValueError, match="prepositions"):
        RV.reversion(p, (ims, caps), prepositions=("beneath",), progress=False)
    with pytest.raises(ValueError, match="exemplars"):
        RV.reversion(p, (ims, ["a red circle a blue square"] * 2), progress=False)
    with pytest.raises(ValueError, match="temperature"):
        RV.steering_loss(torch.ones(3), torch.ones(1, 3), torch.ones(1, 3), 0.0)
