"""Prompt-to-Prompt (diffnotes.editing.p2p) and the attention controller of diffnotes.attention.

Exact properties in float64 on the shapes pipeline and on the SD-1.5-layout tiny pipeline:
edit off = plain DDIM sampling (bitwise within the batch, <= 1e-10 against a separate run), the
controller really injects maps when on, local blending keeps the source outside the mask, the
refinement alignment against brute force, memory flat in the number of steps, and bad input.
"""
import itertools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffnotes.attention import AttentionController, AttentionStore  # noqa: E402
from diffnotes.editing.common import encode_prompts  # noqa: E402
from diffnotes.editing.p2p import (LocalBlend, Refine, Reweight, WordSwap,  # noqa: E402
                                   mapper_matrix, prompt_to_prompt, refine_mapper,
                                   token_alignment)

from pipeline_helpers import noise_latents, plain_sample  # noqa: E402

STEPS = 3
SRC, TGT, LONG = "a red circle", "a blue circle", "a large red circle"


_xT = noise_latents


def _plain(pipe, prompt, xT, steps=STEPS, gs=7.5):
    return plain_sample(pipe, prompt, xT, steps, gs)[0]


def _p2p(pipe, prompts, edit, xT, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return prompt_to_prompt(pipe, prompts, edit, latents=xT, output_type="latent", **kw)


# ---------------------------------------------------------------------------- the controller
def test_processor_without_controller_is_bitwise_diffusers(pipe):
    """No controller (or the base controller, which edits nothing): the UNet's output is
    bitwise that of diffusers' own AttnProcessor on every layer."""
    from diffusers.models.attention_processor import AttnProcessor
    unet = pipe.unet
    x = _xT(pipe).expand(2, -1, -1, -1)
    c = encode_prompts(pipe, [SRC, TGT])
    t = torch.tensor([500, 500])
    saved = dict(unet.attn_processors)
    try:
        unet.set_attn_processor(AttnProcessor())
        with torch.no_grad():
            ref = unet(x, t, encoder_hidden_states=c).sample
        for ctrl in (None, AttentionController()):
            with AttentionStore(kinds=("cross", "self"), self_max_res=10**6,
                                controller=ctrl).attach(unet):
                with torch.no_grad():
                    out = unet(x, t, encoder_hidden_states=c).sample
            assert torch.equal(out, ref)
    finally:
        unet.set_attn_processor(saved)


def test_controller_sees_every_row_and_layer(pipe):
    """The controller is called on every attention layer with all B rows and the layer's
    grid, and what it returns is what multiplies V (zeroing A zeroes the layer's A V)."""
    seen = []

    class Spy(AttentionController):
        def edit(self, probs, info):
            seen.append((info.kind, info.height * info.width, probs.shape, info.batch))
            return probs

    with AttentionStore(kinds=("cross",), controller=Spy()).attach(pipe.unet):
        with torch.no_grad():
            pipe.unet(_xT(pipe).expand(3, -1, -1, -1), torch.tensor([10] * 3),
                      encoder_hidden_states=encode_prompts(pipe, [SRC] * 3))
    assert len(seen) == len(pipe.unet.attn_processors)
    for kind, q, shape, B in seen:
        assert B == 3 and shape[0] == 3 and shape[2] == q


# ---------------------------------------------------------------------------- exact no-ops
def test_identical_prompts_give_the_plain_sample(pipe):
    xT = _xT(pipe)
    x, _ = _p2p(pipe, [SRC, SRC], WordSwap(), xT, cross_replace_steps=1.0,
                self_replace_steps=1.0)
    assert torch.equal(x[0], x[1])                         # bitwise within one batch
    assert (x[1] - _plain(pipe, SRC, xT)).abs().max() <= 1e-10


def test_edits_that_do_nothing_equal_plain_sampling_of_the_target(pipe):
    xT = _xT(pipe, 1)
    plain_src, plain_tgt = _plain(pipe, SRC, xT), _plain(pipe, TGT, xT)
    x, _ = _p2p(pipe, [SRC, SRC], Reweight("red", 1.0), xT, cross_replace_steps=1.0)
    assert (x[1] - plain_src).abs().max() <= 1e-10        # Reweight, c = 1
    m, a = refine_mapper(SRC, SRC, pipe.tokenizer)
    assert torch.equal(m, torch.arange(m.shape[0])) and bool((a == 1).all())
    x, _ = _p2p(pipe, [SRC, SRC], Refine(), xT, cross_replace_steps=1.0)
    assert (x[1] - plain_src).abs().max() <= 1e-10        # Refine, identity alignment
    x, _ = _p2p(pipe, [SRC, TGT], WordSwap(), xT, cross_replace_steps=0.0,
                self_replace_steps=0.0)
    assert (x[1] - plain_tgt).abs().max() <= 1e-10        # WordSwap, tau = 0, no self
    assert (x[0] - plain_src).abs().max() <= 1e-10


def test_word_swap_injects_the_source_maps(pipe):
    """tau = 1: the edited prompt's recorded cross-attention maps equal the source's, and the
    output moves away from plain sampling of the target; a per-word schedule frees a word."""
    xT = _xT(pipe, 2)
    x1, store = _p2p(pipe, [SRC, TGT], WordSwap(), xT, cross_replace_steps=1.0,
                     self_replace_steps=0.0)
    for info in store.layers("cross"):
        m = store.layer_map(info.name)
        assert torch.equal(m[0], m[1])
    x0, store0 = _p2p(pipe, [SRC, TGT], WordSwap(), xT, cross_replace_steps=0.0,
                      self_replace_steps=0.0)
    assert (x1[1] - x0[1]).abs().max() > 1e-4
    m0 = store0.maps("cross")
    assert (m0[0] - m0[1]).abs().max() > 0
    # per-word alpha: "blue" keeps its own maps, the other tokens take the source's
    xw, storew = _p2p(pipe, [SRC, TGT], WordSwap(word_steps={"blue": 0.0}), xT,
                      cross_replace_steps=1.0, self_replace_steps=0.0)
    from diffnotes.attention import word_token_indices
    j = word_token_indices(TGT, "blue", pipe.tokenizer)
    mw = storew.maps("cross")
    others = [k for k in range(mw.shape[-1]) if k not in j]
    assert torch.equal(mw[0][..., others], mw[1][..., others])
    assert (mw[0][..., j] - mw[1][..., j]).abs().max() > 0


def test_reweight_scales_the_chosen_maps(pipe):
    xT = _xT(pipe, 3)
    _, store = _p2p(pipe, [SRC, SRC], Reweight("red", 2.0), xT, cross_replace_steps=1.0,
                    self_replace_steps=0.0)
    from diffnotes.attention import word_token_indices
    j = word_token_indices(SRC, "red", pipe.tokenizer)
    info = store.layers("cross")[0]                       # first layer: the rows' inputs agree
    m = store.layer_map(info.name)
    assert torch.allclose(m[1][..., j], 2 * m[0][..., j], rtol=1e-12, atol=0)


def test_local_blend_keeps_the_source_outside_the_mask(pipe):
    xT = _xT(pipe, 4)
    # random-weight models have flat maps: take the first threshold giving a non-trivial mask
    for thr in (0.3, 0.9, 0.99, 0.999, 0.9999):
        x, store = _p2p(pipe, [SRC, TGT], WordSwap(), xT,
                        local_blend=LocalBlend(["red", "blue"], threshold=thr))
        mask = store.blend_mask[0, 0]
        if 0 < mask.sum() < mask.numel():
            break
    assert mask.shape == x.shape[-2:] and 0 < mask.sum() < mask.numel()
    out = mask == 0
    assert torch.equal(x[1][:, out], x[0][:, out])
    assert (x[1][:, ~out] - x[0][:, ~out]).abs().max() > 0


# ---------------------------------------------------------------------------- the mapper
def _brute_force_max_matches(x, y):
    best = 0
    for r in range(min(len(x), len(y)), 0, -1):
        for xi in itertools.combinations(range(len(x)), r):
            for yj in itertools.combinations(range(len(y)), r):
                if all(x[a] == y[b] for a, b in zip(xi, yj)):
                    return r
    return best


def test_refine_alignment_worked_example_and_brute_force():
    P = "a castle next to a river".split()
    Ps = "children drawing of a castle next to a river".split()
    assert token_alignment(P, Ps) == [None, None, None, 0, 1, 2, 3, 4, 5]  # eq 3.3's example
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        x = torch.randint(0, 3, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        y = torch.randint(0, 3, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        x, y = x.tolist(), y.tolist()
        A = token_alignment(x, y)
        pairs = [(i, j) for j, i in enumerate(A) if i is not None]
        assert all(x[i] == y[j] for i, j in pairs)                       # equal tokens
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(pairs, pairs[1:]))  # in order
        assert len(pairs) == _brute_force_max_matches(x, y)             # as many as possible
    # the mapper matrix form of Gormley & Chai's lecture: A M == gathering columns
    mapper = torch.tensor([0, 0, 1, 3, 2])
    alphas = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    A = torch.rand(7, 5, dtype=torch.float64, generator=g)
    assert torch.allclose(A @ mapper_matrix(mapper, alphas), A[:, mapper] * alphas)


def test_refine_mapper_on_the_tokenizer(pipe):
    m, a = refine_mapper(SRC, LONG, pipe.tokenizer)
    # <start> a large red circle <end>: "large" (position 2) is new, the rest aligned
    assert a[:6].tolist() == [1, 1, 0, 1, 1, 1]
    assert m[[0, 1, 3, 4, 5]].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------- memory
def test_memory_is_flat_in_the_number_of_steps(pipe):
    xT = _xT(pipe, 5)
    sizes = []
    for steps in (4, 12):
        lb = LocalBlend(["red", "blue"])
        _, store = _p2p(pipe, [SRC, TGT], WordSwap(), xT, num_inference_steps=steps,
                        local_blend=lb)
        sizes.append((store.nbytes(), sum(t.numel() * t.element_size()
                                          for t in lb.sums.values())))
    assert sizes[0] == sizes[1]


# ---------------------------------------------------------------------------- bad input
def test_bad_input(pipe):
    xT = _xT(pipe)
    with pytest.raises(ValueError, match="Refine"):
        _p2p(pipe, [SRC, LONG], WordSwap(), xT)
    with pytest.raises(ValueError, match="words.*square"):
        _p2p(pipe, [SRC, TGT], Reweight("square", 2.0), xT)
    for bad in (1.5, -0.1, {"default_": 2.0}, {"red": (0.5, 1.2)}):
        with pytest.raises(ValueError, match="cross_replace_steps"):
            _p2p(pipe, [SRC, TGT], WordSwap(), xT, cross_replace_steps=bad)
    with pytest.raises(ValueError, match="self_replace_steps"):
        _p2p(pipe, [SRC, TGT], WordSwap(), xT, self_replace_steps=2.0)
    with pytest.raises(ValueError, match="scale"):
        Reweight("red", 3.0)
    with pytest.raises(ValueError, match="prompts"):
        _p2p(pipe, [SRC], WordSwap(), xT)
    with pytest.raises(ValueError, match="null_embeddings"):
        _p2p(pipe, [SRC, TGT], WordSwap(), xT, null_embeddings=[encode_prompts(pipe, "")])


def test_null_embeddings_and_images(pipe):
    """Per-step null embeddings equal to the empty prompt's give the same latents; PIL output
    has the pipeline's image size."""
    xT = _xT(pipe, 6)
    null = encode_prompts(pipe, "")
    a, _ = _p2p(pipe, [SRC, TGT], WordSwap(), xT, num_inference_steps=2)
    b, _ = _p2p(pipe, [SRC, TGT], WordSwap(), xT, num_inference_steps=2,
                null_embeddings=[null] * 2)
    assert torch.equal(a, b)
    imgs, _ = prompt_to_prompt(pipe, [SRC, TGT], WordSwap(), num_inference_steps=1, latents=xT)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert len(imgs) == 2 and imgs[0].size == (side, side)
