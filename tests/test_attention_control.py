"""The controller's three hooks (diffnotes.attention.AttentionController): queries/keys/values,
logits, probabilities. Exact properties in float64 on the shapes pipeline and on the
SD-1.5-layout tiny pipeline: identity hooks are bitwise diffusers' AttnProcessor, the hooks see
the tensors the layer really uses (checked against a hand computation of the layer), logits
shifted by a per-row constant change nothing (softmax invariance), and ``attention_layers``
is the order of the forward pass.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffnotes.attention import (AttentionController, AttentionStore,  # noqa: E402
                                 attention_layers)
from diffnotes.editing.common import encode_prompts  # noqa: E402


def _run(pipe, ctrl, B=2, kinds=("cross", "self")):
    u = pipe.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn((B, u.in_channels, u.sample_size, u.sample_size), generator=g,
                    dtype=torch.float64)
    c = encode_prompts(pipe, ["a red circle", "a blue square"][:B] + ["a star"] * (B - 2))
    store = AttentionStore(kinds=kinds, self_max_res=10 ** 6, controller=ctrl)
    with store.attach(pipe.unet), torch.no_grad():
        return pipe.unet(x, torch.tensor([400] * B), encoder_hidden_states=c).sample


class Identity(AttentionController):
    def edit_qkv(self, q, k, v, info):
        return q, k, v

    def edit_scores(self, s, info):
        return s

    def edit(self, p, info):
        return p


def test_identity_hooks_are_bitwise_diffusers(pipe):
    from diffusers.models.attention_processor import AttnProcessor
    saved = dict(pipe.unet.attn_processors)
    try:
        pipe.unet.set_attn_processor(AttnProcessor())
        ref = _run(pipe, None, kinds=("cross",))
    finally:
        pipe.unet.set_attn_processor(saved)
    assert torch.equal(_run(pipe, Identity()), ref)


def test_score_shift_per_row_changes_nothing(pipe):
    """softmax(S + c·1ᵀ) = softmax(S): a per-query constant added to the logits leaves the
    output unchanged to rounding (float64), while a per-key term does not."""
    class Shift(AttentionController):
        def __init__(self, per_key):
            self.per_key = per_key

        def edit_scores(self, s, info):
            if self.per_key:
                return s + torch.linspace(0, 3, s.shape[-1], dtype=s.dtype)
            return s + torch.linspace(-5, 5, s.shape[-2], dtype=s.dtype)[:, None]

    ref = _run(pipe, None)
    assert (_run(pipe, Shift(False)) - ref).abs().max() < 1e-10
    assert (_run(pipe, Shift(True)) - ref).abs().max() > 1e-6


def test_hooks_see_what_the_layer_uses(pipe):
    """Recompute one self-attention layer by hand from the q, k, v the hook sees: the
    probabilities the ``edit`` hook receives equal softmax(q kᵀ · scale) to 1e-12."""
    seen = {}

    class Spy(AttentionController):
        kinds = ("self",)

        def edit_qkv(self, q, k, v, info):
            seen.setdefault(info.name, {})["qkv"] = (q.clone(), k.clone(), v.clone())
            return q, k, v

        def edit(self, p, info):
            seen[info.name]["p"] = p.clone()
            return p

    _run(pipe, Spy())
    names = attention_layers(pipe.unet, "self")
    assert set(seen) == set(names)
    for name in names:
        attn = pipe.unet.get_submodule(name)
        q, k, _ = seen[name]["qkv"]
        p = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
        assert (p - seen[name]["p"]).abs().max() < 1e-12


def test_reading_another_rows_keys_and_values(pipe):
    """edit_qkv that gives row 1 the keys and values of row 0 on every self-attention layer
    changes row 1 but not row 0, and with two equal rows it changes nothing."""
    class Borrow(AttentionController):
        kinds = ("self",)

        def edit_qkv(self, q, k, v, info):
            k, v = k.clone(), v.clone()
            k[1], v[1] = k[0], v[0]
            return q, k, v

    ref, out = _run(pipe, None), _run(pipe, Borrow())
    assert torch.equal(out[0], ref[0])
    assert (out[1] - ref[1]).abs().max() > 1e-6


def test_attention_layers_is_the_forward_order(pipe):
    order = []

    class Spy(AttentionController):
        def edit_scores(self, s, info):
            order.append((info.kind, info.name, info.index, info.count))
            return s

    _run(pipe, Spy())
    for kind in ("self", "cross"):
        calls = [(n, i, c) for k, n, i, c in order if k == kind]
        names = attention_layers(pipe.unet, kind)
        assert [n for n, _, _ in calls] == names
        assert [i for _, i, _ in calls] == list(range(len(names)))
        assert {c for _, _, c in calls} == {len(names)}
    if pipe.unet.config.sample_size == 40:                       # SD 1.5's block layout
        names = attention_layers(pipe.unet, "self")
        assert len(names) == 16 and names[6].startswith("mid_block")
        assert names[10].startswith("up_blocks.2")               # MasaCtrl's start layer


def test_bad_input(pipe):
    with pytest.raises(ValueError, match="kind"):
        attention_layers(pipe.unet, "both")
    with pytest.raises(TypeError, match="unet"):
        attention_layers(object())

    class Bad(AttentionController):
        def edit_scores(self, s, info):
            return s[..., :1]

    with pytest.raises(RuntimeError, match="edit_scores"):
        _run(pipe, Bad())


def test_layer_resolutions_are_the_grids_the_layers_see(pipe):
    """layer_resolutions (from block names and the config) equals the query grid each layer
    really has in a forward pass, in forward order; SD 1.5's layout gives its published sides."""
    from diffnotes.attention import attention_resolutions, layer_resolutions
    seen = {"self": [], "cross": []}

    class Spy(AttentionController):
        def edit_scores(self, s, info):
            seen[info.kind].append(info.res)
            return s

    _run(pipe, Spy())
    for kind in ("self", "cross"):
        assert layer_resolutions(pipe.unet, kind) == seen[kind]
        assert attention_resolutions(pipe.unet, kind) == sorted(set(seen[kind]), reverse=True)
    if pipe.unet.config.sample_size == 40:
        assert seen["self"] == [40, 40, 20, 20, 10, 10, 5, 10, 10, 10, 20, 20, 20, 40, 40, 40]
        assert layer_resolutions(pipe.unet, "cross", (64, 64))[6:10] == [8, 16, 16, 16]
