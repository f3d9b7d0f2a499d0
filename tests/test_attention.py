"""Attention recording (diffnotes.attention): exactness, online aggregation, memory, words.

Fixtures are a random-init tiny ``UNet2DConditionModel`` in float64 and a
CLIP BPE tokenizer built offline from a vocabulary and merges written here.
"""
import json
import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

from diffnotes.attention import (AttentionStore, overlay, prompt_words,  # noqa: E402
                                 tokenize_prompt, upsample, word_token_indices)

M_TOK = 10  # key tokens in the fake text embeddings


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    u = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8).double().eval()
    return u


def _inputs(seed, B=2, H=16, W=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, H, W, generator=g, dtype=torch.float64)
    ctx = torch.randn(B, M_TOK, 32, generator=g, dtype=torch.float64)
    return x, ctx


# ---------------------------------------------------------------------------- exactness
def test_recording_processor_equals_attnprocessor(unet):
    x, ctx = _inputs(0)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with torch.no_grad():
        y_default = unet(x, 500, ctx).sample
        unet.set_attn_processor(AttnProcessor())
        y_ref = unet(x, 500, ctx).sample
        unet.set_attn_processor({k: c() for k, c in before.items()})
        with AttentionStore(kinds=("cross", "self")).attach(unet) as store:
            y_rec = unet(x, 500, ctx).sample
    assert torch.equal(y_rec, y_ref)                     # same calls, same order: bit for bit
    assert torch.allclose(y_rec, y_default, atol=1e-12)  # the SDPA default, to fp64 tolerance
    assert len(store.layers()) == 8                       # 4 self + 4 cross layers
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before  # detached


def test_rows_are_distributions_and_shapes(unet):
    x, ctx = _inputs(1)
    with torch.no_grad(), AttentionStore(kinds=("cross", "self")).attach(unet) as store:
        unet(x, 300, ctx)
    assert store.resolutions("cross") == [16, 8]
    for info in store.layers():
        m = store.layer_map(info.name)
        keys = M_TOK if info.kind == "cross" else info.height * info.width
        assert m.shape == (2, info.height, info.width, keys)
        assert (m >= 0).all()
        assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-12)
    assert store.maps().shape == (2, 16, 16, M_TOK)           # 8×8 layer upsampled and averaged
    assert store.maps(res=8).shape == (2, 8, 8, M_TOK)
    assert store.maps("self", res=8).shape == (2, 8, 8, 64)


def test_self_attention_above_self_max_res_is_not_recorded(unet):
    x, ctx = _inputs(5)
    with torch.no_grad():
        y_default = unet(x, 300, ctx).sample
        with AttentionStore(kinds=("cross", "self"), self_max_res=8).attach(unet) as store:
            y = unet(x, 300, ctx).sample
    assert [i.res for i in store.layers("self")] == [8]        # the 16×16 ones ran untouched
    assert len(store.layers("cross")) == 4
    assert torch.allclose(y, y_default, atol=1e-12)


def _hand_probs(attn, hidden, ctx):
    """softmax(Q K^T / sqrt(d)) per head (Ahmad's notes, eq 1.47), averaged over heads."""
    q, k = attn.to_q(hidden), attn.to_k(ctx)
    B, N, _ = q.shape
    h = attn.heads
    d = q.shape[-1] // h
    q = q.reshape(B, N, h, d).permute(0, 2, 1, 3)
    k = k.reshape(B, ctx.shape[1], h, d).permute(0, 2, 1, 3)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return p, p.mean(1)


def test_store_layout_is_row_major_on_a_non_square_latent(unet):
    # latent 8×12: the down-block layer works on an 8×12 grid, N = 96 queries
    x, ctx = _inputs(2, B=1, H=8, W=12)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    seen = {}
    hook = attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad(), AttentionStore().attach(unet) as store:
            unet(x, 100, ctx)
    finally:
        hook.remove()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    info = store.info[name]
    assert (info.height, info.width) == (8, 12)
    _, hand = _hand_probs(attn, seen["h"], ctx)
    m = store.layer_map(name)
    for i, j in [(0, 0), (0, 11), (3, 7), (7, 0), (7, 11)]:
        assert torch.allclose(m[0, i, j], hand[0, i * 12 + j], atol=1e-12)


def test_cross_attention_by_hand_equals_module(unet):
    """Y' = W_O softmax(Q K^T / sqrt d) V with the module's own projections (eqs 1.47-1.48)."""
    attn = unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 64, attn.query_dim, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 7, 32, generator=g, dtype=torch.float64)
    p, _ = _hand_probs(attn, hidden, ctx)
    v = attn.to_v(ctx)
    B, h = 2, attn.heads
    v = v.reshape(B, 7, h, -1).permute(0, 2, 1, 3)
    y = (p @ v).permute(0, 2, 1, 3).reshape(B, 64, -1)           # concatenate heads
    y = attn.to_out[1](attn.to_out[0](y))
    with torch.no_grad():
        y_mod = attn(hidden, encoder_hidden_states=ctx)
    assert torch.allclose(y, y_mod, atol=1e-12)
    # and the permutation property of cross-attention (Gormley & Chai's lecture, slides
    # "Cross Attention"): permuting the tokens leaves the output unchanged
    perm = torch.randperm(7, generator=g)
    with torch.no_grad():
        assert torch.allclose(attn(hidden, encoder_hidden_states=ctx[:, perm]), y_mod, atol=1e-12)


# ---------------------------------------------------------------------------- aggregation, memory
def _run(unet, store, n_steps, seed=10):
    with torch.no_grad():
        store.attach(unet)
        try:
            for s in range(n_steps):
                x, ctx = _inputs(seed + s)
                unet(x, 999 - 97 * s, ctx)
        finally:
            store.detach()


def test_online_mean_equals_mean_of_stored_steps(unet):
    store = AttentionStore(kinds=("cross", "self"), store_steps=True, step_max_res=16)
    _run(unet, store, 5)
    assert store.num_steps == 5 and store.stored_steps() == [0, 1, 2, 3, 4]
    assert store.timesteps == [999 - 97 * s for s in range(5)]
    for info in store.layers():
        online = store.layer_map(info.name)                         # running sum / count
        stored = torch.stack([store.step_maps[info.name][s] for s in range(5)]).mean(0)
        assert torch.allclose(online, stored.reshape(online.shape), atol=1e-13)
        assert torch.allclose(store.layer_map(info.name, steps=(0, 5)), online, atol=1e-13)
    part = store.maps(steps=(1, 3), res=16)
    by_hand = torch.stack([store.maps(steps=[s], res=16) for s in (1, 2)]).mean(0)
    assert torch.allclose(part, by_hand, atol=1e-13)


def test_memory_does_not_grow_with_steps(unet):
    sizes = {}
    for n in (2, 5):
        store = AttentionStore(kinds=("cross", "self"))
        _run(unet, store, n)
        sizes[n] = store.nbytes()
    assert sizes[2] == sizes[5] > 0
    # per-step storage only when asked, only at or below step_max_res, and it does grow
    grow = {}
    for n in (2, 5):
        store = AttentionStore(kinds=("cross",), store_steps=True, step_max_res=8)
        _run(unet, store, n)
        assert {i.res for i in store.layers() if i.name in store.step_maps} == {8}
        grow[n] = store.nbytes()
    one_map = 2 * 8 * 8 * M_TOK * 8                                  # B·h·w·M float64 bytes
    assert grow[5] - grow[2] == 3 * one_map


def test_rows_cond_keeps_the_second_half(unet):
    x, ctx = _inputs(4, B=4)
    with torch.no_grad():
        with AttentionStore(rows="all").attach(unet) as full:
            unet(x, 200, ctx)
        with AttentionStore(rows="cond").attach(unet) as cond:
            unet(x, 200, ctx)
        with AttentionStore(rows=[3]).attach(unet) as one:
            unet(x, 200, ctx)
    assert torch.equal(cond.maps(), full.maps()[2:])
    assert torch.equal(one.maps(), full.maps()[3:4])


def test_store_bad_input(unet):
    with pytest.raises(ValueError, match="kinds"):
        AttentionStore(kinds=("crosss",))
    with pytest.raises(ValueError, match="rows"):
        AttentionStore(rows="second")
    with pytest.raises(TypeError, match="unet"):
        AttentionStore().attach(torch.nn.Linear(2, 2))
    store = AttentionStore()
    _run(unet, store, 2)
    with pytest.raises(ValueError, match="res=32"):
        store.maps(res=32)
    with pytest.raises(ValueError, match="store_steps=True"):
        store.maps(steps=(0, 1))
    with pytest.raises(KeyError, match="recorded layer"):
        store.layer_map("nope")
    with pytest.raises(ValueError, match="cond"):
        odd = AttentionStore(rows="cond")
        with torch.no_grad(), odd.attach(unet):
            unet(*_inputs(0, B=1)[:1], 10, _inputs(0, B=1)[1])


# ---------------------------------------------------------------------------- words and tokens
@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    """A real CLIP BPE tokenizer from a 60-odd-token vocabulary: "zebra", "cat", "dog", "red"
    are single tokens; any other word splits into several (e.g. "and" -> a, n, d</w>)."""
    from transformers import CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    vocab = {}
    for ch in "abcdefghijklmnopqrstuvwxyz,.!":
        for t in (ch, ch + "</w>"):
            vocab.setdefault(t, len(vocab))
    merges = ["a t</w>", "c at</w>", "d o", "do g</w>", "z e", "ze b", "zeb r", "zebr a</w>",
              "r e", "re d</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(t, len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16)


def test_word_indices_clip_bpe(clip_tokenizer):
    tok = clip_tokenizer
    p = "A red zebra and a dog!"
    ids = tok(p).input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == "<|startoftext|>" and toks[-1] == "<|endoftext|>"
    assert word_token_indices(p, "zebra", tok) == [3]
    idx_and = word_token_indices(p, "and", tok)              # split into three BPE tokens
    assert len(idx_and) == 3 and [toks[i] for i in idx_and] == ["a", "n", "d</w>"]
    assert [toks[i] for i in word_token_indices(p, "dog", tok)] == ["dog</w>"]  # "!" excluded
    assert word_token_indices(p, "a", tok) == [1, 7]          # both occurrences
    assert word_token_indices(p, "a", tok, occurrence=1) == [7]
    assert word_token_indices(p, "red zebra", tok) == [2, 3]
    assert word_token_indices(p, "ZEBRA", tok) == [3]


def test_missing_word_names_word_and_lists_prompt(clip_tokenizer):
    with pytest.raises(ValueError) as e:
        word_token_indices("a red zebra", "cat", clip_tokenizer)
    msg = str(e.value)
    assert "'cat'" in msg and "['a', 'red', 'zebra']" in msg


def test_truncation_warns_and_truncated_word_raises(clip_tokenizer):
    long = "a red zebra and a red dog and a red cat"                 # 17 tokens > 16
    with pytest.warns(UserWarning, match="truncated"):
        out = tokenize_prompt(long, clip_tokenizer)
    assert out["input_ids"].shape == (1, 16) and out["truncated"]
    assert word_token_indices(long, "zebra", clip_tokenizer) == [3]
    with pytest.raises(ValueError, match="'cat'.*truncation"):
        word_token_indices(long, "cat", clip_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = tokenize_prompt("a dog", clip_tokenizer)              # no warning; padded
    assert short["length"] == 4 and short["input_ids"].shape == (1, 16)


def test_word_level_tokenizer():
    shapes = pytest.importorskip("diffnotes.models.shapes")
    tok = shapes.make_tokenizer()
    p = "a small red circle on the left and a blue square"
    toks = tokenize_prompt(p, tok)["tokens"]
    for w in ("circle", "square", "blue"):
        (i,) = word_token_indices(p, w, tok)
        assert toks[i] == w
    assert prompt_words("A Red, circle!") == ["a", "red", "circle"]
    with pytest.raises(ValueError, match="star"):
        word_token_indices(p, "star", tok)


def test_text_encoder_causal_mask_and_padding():
    """A CLIP text encoder is causal and has no padding mask (Ahmad's notes, §1.5,
    "Presence of Causal Masks" and "Lack of Padding Mask"):
    changing word k leaves positions < k unchanged; padding positions are not zero and do
    depend on the prompt (erratum sd-zero-padding)."""
    shapes = pytest.importorskip("diffnotes.models.shapes")
    torch.manual_seed(0)
    tok = shapes.make_tokenizer()
    enc = shapes.make_text_encoder(tok).double().eval()

    def embed(p):
        ids = tokenize_prompt(p, tok)["input_ids"]
        with torch.no_grad():
            return enc(ids).last_hidden_state[0]

    a = embed("a red circle on the left")
    b = embed("a red square on the left")                 # word 3 ("circle") changed
    k = word_token_indices("a red circle on the left", "circle", tok)[0]
    assert torch.equal(a[:k], b[:k])                         # causal: earlier tokens untouched
    assert (a[k:] - b[k:]).abs().amax(-1).min() > 1e-6       # every later position changes
    n = tokenize_prompt("a red circle on the left", tok)["length"]
    assert n < shapes.MAX_LENGTH
    assert a[n:].abs().amax(-1).min() > 1e-3                 # padding embeddings are not zero


# ---------------------------------------------------------------------------- images
def test_upsample_and_overlay():
    m = torch.full((2, 3, 4, 4), 0.25, dtype=torch.float64)
    up = upsample(m, 16)
    assert up.shape == (2, 3, 16, 16) and torch.allclose(up, torch.full_like(up, 0.25))
    img = np.random.default_rng(0).random((16, 16, 3))
    assert np.allclose(overlay(img, torch.rand(4, 4), alpha=0.0), img)
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0
    out = overlay(img, heat, alpha=1.0, cmap="gray")                  # pure colormap
    assert out.shape == (16, 16, 3) and out[0, 0, 0] > out[-1, -1, 0]
    with pytest.raises(ValueError, match="heatmap"):
        overlay(img, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, heat, alpha=2)


# ---------------------------------------------------------------------------- a whole pipeline
def test_generate_with_attention_on_untrained_shapes_pipeline():
    shapes = pytest.importorskip("diffnotes.models.shapes")
    from diffusers import StableDiffusionPipeline

    from diffnotes.attention import generate_with_attention

    torch.manual_seed(0)
    c = shapes.make_components()
    pipe = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on the left"
    img, store = generate_with_attention(pipe, prompt, num_inference_steps=3, guidance_scale=3.0,
                                         generator=torch.Generator().manual_seed(0),
                                         store_steps=True)
    assert store.num_steps == 3 and store.stored_steps() == [0, 1, 2]
    m = store.word_map("circle", prompt, pipe.tokenizer)
    assert m.shape == (16, 16) and float(m.min()) >= 0
    assert store.maps().shape[0] == 1                                   # cond rows only
    assert all(type(p).__name__ != "RecordingAttnProcessor"
               for p in pipe.unet.attn_processors.values())


# ---------------------------------------------------------------------------- exercise checkers
def test_exercise_checkers_agree_with_diffusers():
    """The 'cross_attention' reference equals a diffusers Attention module carrying the same
    weights; 'token_map' agrees with the store's layout; wrong answers fail."""
    from diffusers.models.attention_processor import Attention

    from diffnotes.exercises import check

    def via_diffusers(f, c, w_q, w_k, w_v, w_o, heads):
        inner = w_q.shape[1]
        a = Attention(query_dim=f.shape[-1], cross_attention_dim=c.shape[-1], heads=heads,
                      dim_head=inner // heads).double()
        with torch.no_grad():
            a.to_q.weight.copy_(w_q.T)
            a.to_k.weight.copy_(w_k.T)
            a.to_v.weight.copy_(w_v.T)
            a.to_out[0].weight.copy_(w_o.T)
            a.to_out[0].bias.zero_()
            a.set_processor(AttnProcessor())
            return a(f, encoder_hidden_states=c)

    assert check("cross_attention", via_diffusers, verbose=False)
    no_scale = lambda f, c, w_q, w_k, w_v, w_o, heads: torch.softmax(  # noqa: E731
        (f @ w_q) @ (c @ w_k).transpose(-1, -2), -1) @ (c @ w_v) @ w_o
    assert not check("cross_attention", no_scale, verbose=False)

    def via_store_layout(probs, heads, height, width, token):
        bh, n, m = probs.shape
        p = probs.reshape(bh // heads, heads, n, m).mean(1)
        return p.reshape(-1, height, width, m)[..., token]                 # as AttentionStore
    assert check("token_map", via_store_layout, verbose=False)
    transposed = lambda probs, heads, height, width, token: via_store_layout(  # noqa: E731
        probs, heads, width, height, token).transpose(-1, -2)
    assert not check("token_map", transposed, verbose=False)
