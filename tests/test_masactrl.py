"""MasaCtrl (diffnotes.editing.masactrl): mutual self-attention, with and without masks.

Exact properties in float64 on the shapes pipeline and on the SD-1.5-layout tiny pipeline:
control off (start step or start layer past the end) = plain DDIM sampling of the target
(<= 1e-10); source == target with the control on = plain sampling (the source row reads its own
K and V); the target rows of a controlled layer equal a hand computation of
softmax(Q_t K_s^T/sqrt d) V_s; the printed masked equations (Ahmad's notes, eqs 3.8-3.10)
collapse to the unmasked result while the corrected ones do not; bad input.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffnotes.attention import AttentionStore, BatchLayout, attention_layers  # noqa: E402
from diffnotes.editing.common import encode_prompts  # noqa: E402
from diffnotes.editing.masactrl import (MasaCtrlController, default_start_layer,  # noqa: E402
                                        kv_injection, mask_logit_bias, masked_mutual_attention,
                                        masked_mutual_attention_blend, mutual_self_attention,
                                        printed_masked_attention)

from pipeline_helpers import noise_latents, plain_sample  # noqa: E402

STEPS = 3
SRC, TGT = "a red circle", "a blue circle"


_xT = noise_latents


def _plain(pipe, prompt, xT, steps=STEPS, gs=7.5):
    return plain_sample(pipe, prompt, xT, steps, gs)[0]


def _masa(pipe, src, tgt, xT, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "latent")
    return mutual_self_attention(pipe, src, tgt, latents=xT, **kw)


# ---------------------------------------------------------------------------- exact no-ops
def test_start_step_past_the_end_is_plain_sampling(pipe):
    xT = _xT(pipe)
    x = _masa(pipe, SRC, TGT, xT, start_step=STEPS, start_layer=0)
    assert (x[1] - _plain(pipe, TGT, xT)).abs().max() <= 1e-10
    assert (x[0] - _plain(pipe, SRC, xT)).abs().max() <= 1e-10
    count = len(attention_layers(pipe.unet, "self"))
    x = _masa(pipe, SRC, TGT, xT, start_step=0, start_layer=count)       # no layer
    assert (x[1] - _plain(pipe, TGT, xT)).abs().max() <= 1e-10


def test_same_prompt_with_control_on_is_plain_sampling(pipe):
    xT = _xT(pipe, 1)
    x = _masa(pipe, SRC, SRC, xT, start_step=0, start_layer=0)
    assert torch.equal(x[0], x[1])                          # bitwise within the batch
    assert (x[1] - _plain(pipe, SRC, xT)).abs().max() <= 1e-10


def test_control_on_changes_the_target_only(pipe):
    xT = _xT(pipe, 2)
    x = _masa(pipe, SRC, TGT, xT, start_step=0, start_layer=0)
    assert (x[0] - _plain(pipe, SRC, xT)).abs().max() <= 1e-10     # the source is untouched
    assert (x[1] - _plain(pipe, TGT, xT)).abs().max() > 1e-4


# ---------------------------------------------------------------------------- the injection
def _capture(pipe, ctrl, layer_name, x, c, t):
    """Run one UNet call with ``ctrl``; return (input, output) of the attention module."""
    mod = pipe.unet.get_submodule(layer_name)
    got = {}
    h1 = mod.register_forward_pre_hook(
        lambda m, args, kw: got.__setitem__("in", (args[0] if args else kw["hidden_states"])),
        with_kwargs=True)
    h2 = mod.register_forward_hook(lambda m, a, out: got.__setitem__("out", out))
    try:
        with AttentionStore(kinds=("self",), self_max_res=1, controller=ctrl,
                            layout=ctrl.layout).attach(pipe.unet):
            with torch.no_grad():
                pipe.unet(x, t, encoder_hidden_states=c)
    finally:
        h1.remove()
        h2.remove()
    return mod, got["in"], got["out"]


def _hand(mod, h_q, h_kv, bias=None):
    """to_out(softmax(Q K^T scale + bias) V) of one row, Q from h_q, K and V from h_kv."""
    q = mod.head_to_batch_dim(mod.to_q(h_q[None]))
    k = mod.head_to_batch_dim(mod.to_k(h_kv[None]))
    v = mod.head_to_batch_dim(mod.to_v(h_kv[None]))
    s = q @ k.transpose(-1, -2) * mod.scale
    if bias is not None:
        s = s + bias
    out = mod.batch_to_head_dim(torch.softmax(s, -1) @ v)
    return mod.to_out[1](mod.to_out[0](out))[0]


def test_target_rows_read_the_source_keys_and_values(pipe):
    """A controlled layer: each target row equals softmax(Q_t K_s^T/sqrt d) V_s computed by hand
    from the layer's inputs (the source row of the same guidance half); the source rows and an
    uncontrolled layer keep plain self-attention."""
    names = attention_layers(pipe.unet, "self")
    L = len(names) - 1
    ctrl = MasaCtrlController(BatchLayout(2, True), start_step=0, start_layer=L)
    x = _xT(pipe, 3, n=4)
    c = encode_prompts(pipe, ["", "", SRC, TGT])
    t = torch.tensor([500] * 4)
    with torch.no_grad():
        mod, h, out = _capture(pipe, ctrl, names[L], x, c, t)
        for s_row, t_row in ((0, 1), (2, 3)):
            assert (out[t_row] - _hand(mod, h[t_row], h[s_row])).abs().max() <= 1e-10
            assert (out[s_row] - _hand(mod, h[s_row], h[s_row])).abs().max() <= 1e-10
            assert (out[t_row] - _hand(mod, h[t_row], h[t_row])).abs().max() > 1e-6
        mod, h, out = _capture(pipe, ctrl, names[0], x, c, t)       # index 0 < L: plain
        assert (out[1] - _hand(mod, h[1], h[1])).abs().max() <= 1e-10


def test_masked_layer_matches_the_corrected_equations(pipe):
    """With given masks, a controlled layer's target rows equal the corrected masked mutual
    attention computed by hand (foreground queries read only foreground keys)."""
    names = attention_layers(pipe.unet, "self")
    L = len(names) - 1
    u = pipe.unet.config
    hw = (u.sample_size, u.sample_size)
    ms = torch.zeros(hw, dtype=torch.float64)
    ms[: hw[0] // 2, : hw[1] // 2] = 1
    mt = torch.zeros(hw, dtype=torch.float64)
    mt[hw[0] // 4:, hw[1] // 4:] = 1
    ctrl = MasaCtrlController(BatchLayout(2, True), 0, L, masks=(ms, mt))
    x = _xT(pipe, 4, n=4)
    c = encode_prompts(pipe, ["", "", SRC, TGT])
    with torch.no_grad():
        mod, h, out = _capture(pipe, ctrl, names[L], x, c, torch.tensor([300] * 4))
        n = h.shape[1]
        side = int(round(n ** 0.5))
        from diffnotes.editing.masactrl import resize_mask
        bias = mask_logit_bias(resize_mask(ms, (side, side)), resize_mask(mt, (side, side)))
        for s_row, t_row in ((0, 1), (2, 3)):
            assert (out[t_row] - _hand(mod, h[t_row], h[s_row], bias)).abs().max() <= 1e-10
            assert (out[t_row] - _hand(mod, h[t_row], h[s_row])).abs().max() > 1e-8


# ---------------------------------------------------------------------------- the equations
def _qkv(seed=0, n=16, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def test_printed_masked_equations_collapse_and_corrected_do_not():
    """The erratum: Ahmad's notes' eqs 3.8-3.10 as printed equal unmasked KV injection exactly;
    the corrected equations differ, give zero weight across the mask boundary, and their
    one-softmax form (logit bias) equals the two-softmax blend (MasaCtrl's code)."""
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(5)
    ms = (torch.rand(16, generator=g) > 0.5).double()
    mt = (torch.rand(16, generator=g) > 0.5).double()
    plain = kv_injection(q, k, v)
    printed = printed_masked_attention(q, k, v, mt)
    assert (printed - plain).abs().max() <= 1e-12                   # collapses
    fixed = masked_mutual_attention(q, k, v, ms, mt)
    assert torch.allclose(fixed, masked_mutual_attention_blend(q, k, v, ms, mt), atol=1e-12)
    assert (fixed - plain).abs().max() > 0.1
    s = q @ k.transpose(-1, -2) * 8 ** -0.5 + mask_logit_bias(ms, mt)
    p = torch.softmax(s, -1)
    fg_q, bg_k = mt.bool(), ~ms.bool()
    assert float(p[:, fg_q][:, :, bg_k].abs().max()) == 0.0        # fg queries: no bg key
    assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)))


def test_kv_injection_with_equal_features_is_self_attention():
    q, k, v = _qkv(1)
    assert torch.equal(kv_injection(q, k, v), torch.softmax(q @ k.transpose(-1, -2)
                                                            * 8 ** -0.5, -1) @ v)
    # the output does not depend on the target's own values: only V_ref enters
    out = kv_injection(q, k, v)
    p = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, -1)
    assert bool((p >= 0).all()) and torch.allclose(p @ v, out)


def test_layer_rule_gives_stable_diffusions_ten():
    assert default_start_layer(16) == 10 and default_start_layer(7) == 5
    assert default_start_layer(1) == 0


def test_default_layers_on_the_sd_layout():
    from diffnotes.models.load import load_pipeline
    p = load_pipeline("sd-1.5-layout-tiny")
    names = attention_layers(p.unet, "self")
    chosen = names[default_start_layer(len(names)):]
    assert len(names) == 16 and len(chosen) == 6
    assert all(n.startswith(("up_blocks.2", "up_blocks.3")) for n in chosen)


# ---------------------------------------------------------------------------- masks, real images
@pytest.mark.slow
def test_automatic_masks_come_from_cross_attention(pipe):
    xT = _xT(pipe, 6)
    x_auto = _masa(pipe, SRC, TGT, xT, start_step=0, start_layer=0, masks=("circle", "circle"))
    x_plain = _masa(pipe, SRC, TGT, xT, start_step=0, start_layer=0)
    assert (x_auto[1] - x_plain[1]).abs().max() > 1e-6
    assert (x_auto[0] - x_plain[0]).abs().max() <= 1e-10           # the source is unmasked


@pytest.mark.slow
def test_real_image_after_inversion(pipe):
    from diffnotes.editing.inversion import ddim_invert_image
    z0 = _xT(pipe, 7) * 0.5
    xT = ddim_invert_image(pipe, z0, SRC, STEPS)[-1]
    imgs = mutual_self_attention(pipe, SRC, TGT, latents=xT, num_inference_steps=STEPS,
                                 start_step=1, output_type="np")
    assert imgs.shape[0] == 2 and imgs.shape[-1] == 3


# ---------------------------------------------------------------------------- bad input
def test_bad_input(pipe):
    xT = _xT(pipe)
    count = len(attention_layers(pipe.unet, "self"))
    hw = xT.shape[-2:]
    for kw, name in [(dict(start_step=-1), "start_step"), (dict(start_step=STEPS + 1),
                                                           "start_step"),
                     (dict(start_layer=count + 1), "start_layer"),
                     (dict(start_layer=-2), "start_layer"),
                     (dict(masks=(torch.ones(3, 3), torch.ones(3, 3))), "masks"),
                     (dict(masks=(torch.ones(*hw), torch.full(tuple(hw), 0.5))), "masks"),
                     (dict(masks=("square", "circle")), "masks"),
                     (dict(masks="circle"), "masks"),
                     (dict(output_type="jpg"), "output_type")]:
        kw.setdefault("start_step", 0)
        with pytest.raises(ValueError, match=name):
            _masa(pipe, SRC, TGT, xT, **kw)
    with pytest.raises(ValueError, match="latents"):
        mutual_self_attention(pipe, SRC, TGT, latents=xT[:, :2], num_inference_steps=STEPS,
                              start_step=0)


def test_explorer_static_twin_and_bad_input():
    """The explorer's static twin has one frame per (start step, start layer); out-of-range
    values are refused."""
    from diffnotes.models.load import load_pipeline
    from diffnotes.widgets.masactrl import masactrl_explorer
    p = load_pipeline("shapes")
    xT = _xT(p).float()
    count = len(attention_layers(p.unet, "self"))
    ex = masactrl_explorer(p, SRC, TGT, xT, start_steps=(0, 1), start_layers=(count,),
                           num_inference_steps=1, live=False)
    assert len(ex.frames) == 2 and "<input" in ex.to_html()
    with pytest.raises(ValueError, match="start_steps"):
        masactrl_explorer(p, SRC, TGT, xT, start_steps=(2,), num_inference_steps=1, live=False)
    with pytest.raises(ValueError, match="start_layers"):
        masactrl_explorer(p, SRC, TGT, xT, start_steps=(0,), start_layers=(count + 1,),
                          num_inference_steps=1,
                          live=False)
