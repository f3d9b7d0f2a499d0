"""Plug-and-Play (diffnotes.editing.pnp): decoder-feature and self-attention injection.

Exact properties in float64 on the shapes pipeline and on the SD-1.5-layout tiny pipeline:
no injection steps = plain DDIM sampling of the target from x^G_T (<= 1e-10); self-injection
(target prompt = the guidance prompt, the guidance latent = the sample's own start) changes
nothing; the feature hook and the attention injection really replace the target's values
(checked against a hand computation on one layer); the layer rules give the official layers
on the SD layout; bad input.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffnotes.attention import AttentionStore, BatchLayout, attention_layers  # noqa: E402
from diffnotes.editing.common import encode_prompts  # noqa: E402
from diffnotes.editing.pnp import (PnPController, _feature_hook,  # noqa: E402
                                   decoder_resnets, default_attention_layer,
                                   default_feature_layer, injection_steps, plug_and_play)

from pipeline_helpers import noise_latents, plain_sample  # noqa: E402

STEPS = 3
SRC, TGT = "a red circle", "a blue square"


_xT = noise_latents


def _plain(pipe, prompt, xT, steps=STEPS, gs=7.5):
    return plain_sample(pipe, prompt, xT, steps, gs)[0]


def _pnp(pipe, xT, tgt, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "latent")
    return plug_and_play(pipe, xT, tgt, invert=False, **kw)


def test_no_injection_is_plain_sampling(pipe):
    xT = _xT(pipe)
    x = _pnp(pipe, xT, TGT, feature_steps=0, attention_steps=0)
    assert (x[1] - _plain(pipe, TGT, xT)).abs().max() <= 1e-10
    assert (x[0] - _plain(pipe, "", xT)).abs().max() <= 1e-10      # the guidance branch, ∅


def test_self_injection_changes_nothing(pipe):
    xT = _xT(pipe, 1)
    x = _pnp(pipe, xT, SRC, source_prompt=SRC, feature_steps=1, attention_steps=1,
             attention_layer=0)
    assert torch.equal(x[0], x[1])
    assert (x[1] - _plain(pipe, SRC, xT)).abs().max() <= 1e-10


def test_injection_on_changes_the_target(pipe):
    xT = _xT(pipe, 2)
    x = _pnp(pipe, xT, TGT, feature_steps=1, attention_steps=1)
    assert (x[1] - _plain(pipe, TGT, xT)).abs().max() > 1e-4
    assert (x[0] - _plain(pipe, "", xT)).abs().max() <= 1e-10


def _hand(mod, h_qk, h_v):
    q = mod.head_to_batch_dim(mod.to_q(h_qk[None]))
    k = mod.head_to_batch_dim(mod.to_k(h_qk[None]))
    v = mod.head_to_batch_dim(mod.to_v(h_v[None]))
    p = torch.softmax(q @ k.transpose(-1, -2) * mod.scale, -1)
    return mod.to_out[1](mod.to_out[0](mod.batch_to_head_dim(p @ v)))[0]


def test_hooks_inject_by_hand(pipe):
    """One UNet call: the feature layer's conv2 output (residual branch) of the target rows is
    the guidance rows'; an injected self-attention layer's target output is
    to_out(softmax(Q_G K_G^T/sqrt d) V_t) computed by hand; an earlier layer is untouched."""
    unet = pipe.unet
    names = attention_layers(unet, "self")
    A = default_attention_layer(len(names))
    ctrl = PnPController(BatchLayout(2, True), attention_steps=1, start_layer=A)
    conv2 = unet.get_submodule(default_feature_layer(unet)).conv2
    got = {}
    mods = {n: unet.get_submodule(n) for n in (names[-1], names[0])}
    hs = []
    for n, m in mods.items():
        hs.append(m.register_forward_pre_hook(
            lambda mm, a, kw, n=n: got.__setitem__(("in", n), a[0] if a else
                                                  kw["hidden_states"]), with_kwargs=True))
        hs.append(m.register_forward_hook(lambda mm, a, o, n=n: got.__setitem__(("out", n), o)))
    x = _xT(pipe, 3, n=4)
    c = encode_prompts(pipe, ["", "", "", TGT])
    try:
        with AttentionStore(kinds=("self",), self_max_res=1, controller=ctrl,
                            layout=ctrl.layout).attach(unet) as store:
            hook = _feature_hook(conv2, ctrl.pairs(), 1)(store)
            hs.append(hook)
            hs.append(conv2.register_forward_hook(lambda m, a, o: got.__setitem__("conv2", o)))
            with torch.no_grad():
                unet(x, torch.tensor([400] * 4), encoder_hidden_states=c)
    finally:
        for h in hs:
            h.remove()
    f = got["conv2"]
    assert torch.equal(f[1], f[0]) and torch.equal(f[3], f[2])
    with torch.no_grad():
        h, out = got[("in", names[-1])], got[("out", names[-1])]
        for g, t in ((0, 1), (2, 3)):
            assert (out[t] - _hand(mods[names[-1]], h[g], h[t])).abs().max() <= 1e-10
            assert (out[t] - _hand(mods[names[-1]], h[t], h[t])).abs().max() > 1e-8
        h, out = got[("in", names[0])], got[("out", names[0])]
        assert (out[3] - _hand(mods[names[0]], h[3], h[3])).abs().max() <= 1e-10


def test_layer_rules_on_the_sd_layout():
    from diffnotes.models.load import load_pipeline
    unet = load_pipeline("sd-1.5-layout-tiny").unet
    assert len(decoder_resnets(unet)) == 12
    assert default_feature_layer(unet) == "up_blocks.1.resnets.1"
    names = attention_layers(unet, "self")
    chosen = names[default_attention_layer(len(names)):]
    assert chosen == [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1"
                      for b, a in [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1),
                                   (3, 2)]]
    assert injection_steps(0.8, 50, "f") == 40 and injection_steps(0.5, 50, "a") == 25
    assert injection_steps(0.7, 10, "f") == 7


@pytest.mark.slow
def test_inverts_an_image(pipe):
    """From a clean latent: DDIM inversion under the guidance prompt, then the translation."""
    z0 = _xT(pipe, 5) * 0.5
    out = plug_and_play(pipe, z0, TGT, num_inference_steps=STEPS, output_type="np")
    assert out.shape[0] == 2 and out.shape[-1] == 3


def test_bad_input(pipe):
    xT = _xT(pipe)
    n_res = len(decoder_resnets(pipe.unet))
    count = len(attention_layers(pipe.unet, "self"))
    for kw, name in [(dict(feature_steps=1.5), "feature_steps"),
                     (dict(feature_steps=-0.1), "feature_steps"),
                     (dict(attention_steps=2), "attention_steps"),
                     (dict(feature_layer=n_res), "feature_layer"),
                     (dict(feature_layer="mid_block"), "feature_layer"),
                     (dict(attention_layer=count + 1), "attention_layer"),
                     (dict(output_type="jpg"), "output_type")]:
        with pytest.raises(ValueError, match=name):
            _pnp(pipe, xT, TGT, **kw)
    with pytest.raises(ValueError, match="image_or_latents"):
        _pnp(pipe, xT[:, :2], TGT)
