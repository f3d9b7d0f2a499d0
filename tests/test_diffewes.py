"""DiffewS (diffnotes.recognition.diffewes): KV-fusion self-attention (Ahmad's notes, eqs
5.69-5.70) by its exact identities, as an edit_qkv hook on both UNet layouts, mask injection,
the zero-initialised conv_in extension, the loss of eq 5.71 and the shipped weights."""
import json
import math

import pytest
import torch

from diffnotes.attention import AttentionStore
from diffnotes.recognition import diffewes as D


def _attn(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(0)
    x_q = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    x_s = torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
    W = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    return x_q, x_s, W


def test_support_equal_to_query_is_plain_self_attention(feats):
    """Derivation: with X_s = X_q, K_qs = [K; K] and V_qs = [V; V]. Row i's weights over the 2N
    keys are e^{s_ij} / (2 Σ_j e^{s_ij}), each value counted twice, so the output is
    Σ_j e^{s_ij} V_j / Σ_j e^{s_ij}: plain self-attention."""
    x_q, _, (wq, wk, wv) = feats
    plain = _attn(x_q @ wq, x_q @ wk, x_q @ wv)
    assert (D.kv_fusion_attention(x_q, x_q, wq, wk, wv) - plain).abs().max() < 1e-12
    # the same holds for any number of copies (the support rows of the K-shot hook)
    assert (D.kv_fusion_attention(x_q, [x_q] * 4, wq, wk, wv) - plain).abs().max() < 1e-12
    # the fused softmax itself is not the plain one: the weights are halved
    q, k = x_q @ wq, torch.cat([x_q @ wk] * 2, 1)
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(5), -1)
    w_plain = torch.softmax(q @ (x_q @ wk).transpose(1, 2) / math.sqrt(5), -1)
    assert (w[..., :9] - w_plain / 2).abs().max() < 1e-15


def test_fusion_is_eq_5_70_and_support_order_free(feats):
    x_q, x_s, (wq, wk, wv) = feats
    k = torch.cat([x_q @ wk, x_s @ wk], 1)
    v = torch.cat([x_q @ wv, x_s @ wv], 1)
    out = D.kv_fusion_attention(x_q, x_s, wq, wk, wv)
    assert out.shape == (2, 9, 5)
    assert (out - _attn(x_q @ wq, k, v)).abs().max() < 1e-14
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    assert (D.kv_fusion_attention(x_q, x_s[:, perm], wq, wk, wv) - out).abs().max() < 1e-13


def test_dominant_and_vanishing_support():
    """W = I, one query token q = (1, 0). A support token (100, 0) has logit 100/√2 against the
    query's own 1/√2: the output is the support's value up to e^{-70}. A support token
    (−100, 0) has logit −100/√2: the output is the query's own value (query-only attention)."""
    I = torch.eye(2, dtype=torch.float64)
    x_q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    big = torch.tensor([[[100.0, 0.0]]], dtype=torch.float64)
    assert (D.kv_fusion_attention(x_q, big, I, I, I) - big).abs().max() < 1e-25 * 1e3 + 1e-12
    assert (D.kv_fusion_attention(x_q, -big, I, I, I) - x_q).abs().max() < 1e-25 * 1e3 + 1e-12


def test_gradients_reach_weights_from_the_support(feats):
    x_q, x_s, (wq, wk, wv) = feats
    x_s = x_s.clone().requires_grad_(True)
    wk = wk.clone().requires_grad_(True)
    D.kv_fusion_attention(x_q, x_s, wq, wk, wv).sum().backward()
    assert x_s.grad.abs().sum() > 0 and wk.grad.abs().sum() > 0


def test_sizes_must_match(feats):
    x_q, x_s, (wq, wk, wv) = feats
    with pytest.raises(ValueError, match="x_s"):
        D.kv_fusion_attention(x_q, x_s[..., :5], wq, wk, wv)
    with pytest.raises(ValueError, match="x_s"):
        D.kv_fusion_attention(x_q, x_s[:1], wq, wk, wv)
    with pytest.raises(ValueError, match="w_k"):
        D.kv_fusion_attention(x_q, x_s, wq, wk[:5], wv)
    q = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match="support images"):
        D.segment(None, None, None, q, torch.rand(2, 1, 3, 32, 32), torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="support_masks"):
        D.segment(None, None, None, q, torch.rand(2, 1, 3, 64, 64), torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="z_s"):
        D.predict_mask_latents(None, torch.zeros(1, 4, 16, 16), torch.zeros(1, 1, 4, 8, 8),
                               torch.zeros(1, 1, 4, 8, 8), torch.zeros(1, 2, 3))


def test_hook_with_support_equal_to_query_is_the_plain_unet(pipe):
    """On both layouts (float64): rows [x; x] with KV fusion. The support row is plain
    self-attention at every layer, so its features equal the query row's; the query row then
    attends to duplicated keys and values, which is plain self-attention again (above). So the
    query row's output is the plain UNet's, layer after layer."""
    unet = pipe.unet
    c = unet.config
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g,
                    dtype=torch.float64)
    ctx = torch.randn(1, 5, c.cross_attention_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        plain = unet(x, torch.tensor([300]), encoder_hidden_states=ctx).sample
        ctrl = D.KVFusion(1, 1)
        with AttentionStore(kinds=("self",), self_max_res=1, controller=ctrl).attach(unet):
            fused = unet(torch.cat([x, x]), torch.tensor([300, 300]),
                         encoder_hidden_states=ctx.expand(2, -1, -1)).sample
            ctrl.enabled = False
            off = unet(torch.cat([x, x]), torch.tensor([300, 300]),
                       encoder_hidden_states=ctx.expand(2, -1, -1)).sample
            with pytest.raises(RuntimeError, match="KVFusion"):
                ctrl.enabled = True
                unet(torch.cat([x, x, x]), torch.tensor([300] * 3),
                     encoder_hidden_states=ctx.expand(3, -1, -1))
    assert (fused[0] - plain[0]).abs().max() < 1e-10
    assert (fused[1] - plain[0]).abs().max() < 1e-10
    assert (off[0] - plain[0]).abs().max() < 1e-12
    # a different support changes the query row (the fusion does something)
    with torch.no_grad(), AttentionStore(kinds=("self",), self_max_res=1,
                                         controller=D.KVFusion(1, 1)).attach(unet):
        other = unet(torch.cat([x, x.flip(-1)]), torch.tensor([300, 300]),
                     encoder_hidden_states=ctx.expand(2, -1, -1)).sample
    assert (other[0] - plain[0]).abs().max() > 1e-6


def test_widened_conv_in_starts_as_the_shipped_unet(pipe):
    unet = pipe.unet
    wide = D.build_model(unet)
    c = unet.config
    assert wide.config.in_channels == 2 * c.in_channels
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g,
                    dtype=torch.float64)
    extra = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ctx = torch.zeros(1, 3, c.cross_attention_dim, dtype=torch.float64)
    with torch.no_grad():
        a = unet(x, 10, encoder_hidden_states=ctx).sample
        b = wide(torch.cat([x, extra], 1), 10, encoder_hidden_states=ctx).sample
    assert (a - b).abs().max() < 1e-12


def test_mask_injection_and_loss():
    g = torch.Generator().manual_seed(4)
    z, zm = torch.randn(2, 2, 4, 8, 8, generator=g, dtype=torch.float64)
    cat = D.inject_mask(z, zm, "concat")
    assert cat.shape == (2, 8, 8, 8) and torch.equal(cat[:, 4:], zm)
    assert torch.equal(D.inject_mask(z, None, "concat")[:, 4:], torch.zeros_like(z))
    ones, zeros = torch.ones(2, 1, 32, 32), torch.zeros(2, 1, 32, 32)
    assert torch.equal(D.inject_mask(z, None, "multiply", ones), z)
    assert D.inject_mask(z, None, "multiply", zeros).abs().sum() == 0
    half = zeros.clone()
    half[..., :16] = 1                                   # left half of the image
    mz = D.inject_mask(z, None, "multiply", half)
    assert torch.equal(mz[..., :4], z[..., :4]) and mz[..., 4:].abs().sum() == 0
    with pytest.raises(ValueError, match="mode"):
        D.inject_mask(z, zm, "add")
    with pytest.raises(ValueError, match="z_mask"):
        D.inject_mask(z, zm[:, :2], "concat")
    assert D.fss_loss(z, z) == 0 and D.fss_loss(z, zm) > 0
    assert abs(float(D.fss_loss(z, z + 0.5)) - 0.25) < 1e-15       # mean squared error


def test_shipped_weights():
    rec = json.loads((D.WEIGHTS_DIR / "TRAINING.json").read_text())
    size = sum(p.stat().st_size for p in D.WEIGHTS_DIR.iterdir())
    assert size <= 10 * 2 ** 20
    for key in ("command", "steps", "wall_seconds", "cpu_seconds", "threads", "date"):
        assert key in rec
    assert rec["wall_seconds"] <= 20 * 60
    unet = D.load()
    assert unet.config.in_channels == 8 and unet.config.out_channels == 4
