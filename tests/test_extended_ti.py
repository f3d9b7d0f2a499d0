"""P+ / Extended Textual Inversion (Ahmad's notes, §4.4.2, eq 4.4): per-layer conditioning
through the attention controller, its exact no-op, mixing, and where the gradients go."""
import numpy as np
import pytest
import torch

from diffnotes.attention import attention_layers
from diffnotes.models.load import load_pipeline
from diffnotes.personalization import extended as X
from diffnotes.personalization.common import concept_images


@pytest.fixture(scope="module")
def pipe():
    p = load_pipeline("shapes")
    p.set_progress_bar_config(disable=True)
    return p


def _inputs(pipe, prompts, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = X._encode(pipe, prompts)
    z = torch.randn(len(prompts), 4, 16, 16, generator=g)
    t = torch.tensor([900, 250][:len(prompts)])
    return z, t, c


def test_layer_count_is_counted(pipe):
    assert len(X.cross_layers(pipe.unet)) == len(attention_layers(pipe.unet, "cross")) == 7
    coarse, fine = X.coarse_fine_split(pipe.unet)
    assert sorted(coarse + fine) == list(range(7)) and coarse and fine


def test_equal_per_layer_conditioning_is_plain_conditioning_bitwise(pipe):
    z, t, c = _inputs(pipe, ["a red circle", "a blue star"])
    names = X.cross_layers(pipe.unet)
    with torch.no_grad():
        ref = pipe.unet(z, t, encoder_hidden_states=c).sample
        out = X.per_layer_unet(pipe.unet, z, t, {n: c for n in names}, c)
        # the UNet's own encoder_hidden_states are then irrelevant
        out2 = X.per_layer_unet(pipe.unet, z, t, {n: c for n in names}, torch.zeros_like(c))
    assert torch.equal(ref, out) and torch.equal(ref, out2)


def test_per_layer_conditioning_changes_output_and_is_used(pipe):
    z, t, c = _inputs(pipe, ["a red circle"])
    c2 = X._encode(pipe, ["a green square"])
    names = X.cross_layers(pipe.unet)
    with torch.no_grad():
        ref = pipe.unet(z, t, encoder_hidden_states=c).sample
        out = X.per_layer_unet(pipe.unet, z, t, {names[-1]: c2}, c)
    assert not torch.allclose(ref, out)


def test_plus_tokens_equal_reproduce_plain_ti(pipe):
    # P+ whose per-layer tokens all hold one embedding = plain TI with that embedding
    p = load_pipeline("shapes")
    n = len(X.cross_layers(p.unet))
    from diffnotes.personalization.common import add_placeholder
    ids = add_placeholder(p, "<q>", "star", num_vectors=n)
    toks = p.tokenizer.convert_ids_to_tokens(ids)
    plus = X.PlusEmbedding("<q>", toks, ids, None, X.cross_layers(p.unet), [], 0.0)
    cond = X.layer_conditioning(p, [[q] for q in plus.layer_prompts("a <q> on the left")])
    plain = X._encode(p, ["a <q> on the left"])
    z, t, _ = _inputs(p, ["x"])
    with torch.no_grad():
        a = p.unet(z, t, encoder_hidden_states=plain).sample
        b = X.per_layer_unet(p.unet, z, t, cond, plain)
    assert torch.equal(a, b)


def test_mixing_ends_are_a_and_b(pipe):
    names = X.cross_layers(pipe.unet)
    n = len(names)
    A = ["a red square"] * n
    B = ["a green circle"] * n
    assert X.mix_plus(A, B, n) == A and X.mix_plus(A, B, 0) == B
    z, t, _ = _inputs(pipe, ["x"])
    ca, cb = X._encode(pipe, ["a red square"]), X._encode(pipe, ["a green circle"])
    with torch.no_grad():
        ref_a = pipe.unet(z, t, encoder_hidden_states=ca).sample
        ref_b = pipe.unet(z, t, encoder_hidden_states=cb).sample
        for k, ref in ((n, ref_a), (0, ref_b)):
            cond = X.layer_conditioning(pipe, X.mix_plus(A, B, k))
            assert torch.equal(X.per_layer_unet(pipe.unet, z, t, cond, ca), ref)
    with pytest.raises(ValueError, match="k"):
        X.mix_plus(A, B, n + 1)


def test_gradients_reach_only_the_per_layer_rows():
    p = load_pipeline("shapes")
    cs = concept_images("heart", n=2, seed=0)
    plus = X.extended_textual_inversion(p, cs, placeholder="<heart>", initializer="star",
                                        steps=2, lr=1e-2, batch_size=2, progress=False)
    table = p.text_encoder.get_input_embeddings().weight
    n = len(plus.layers)
    assert len(plus.token_ids) == n == plus.embeddings.shape[0]
    # the per-layer rows moved away from the shared initialisation, and differ from each other
    init = table[p.tokenizer.convert_tokens_to_ids("star")]
    assert all(not torch.equal(plus.embeddings[i], init) for i in range(n))
    assert len({tuple(e.tolist()) for e in plus.embeddings}) == n
    # one backward pass: gradient on the new rows only, none on the UNet
    table.requires_grad_(True)
    names = plus.layers
    cond = X.layer_conditioning(p, [[q] for q in plus.layer_prompts("a <heart>")], grad=True)
    z, t, _ = _inputs(p, ["x"])
    out = X.per_layer_unet(p.unet, z, t, cond, cond[names[0]])
    out.square().mean().backward()
    rows = set(torch.nonzero(table.grad.abs().sum(1) > 0).flatten().tolist())
    # every one of the n per-layer rows gets a gradient (each through its own layer) ...
    assert set(plus.token_ids) <= rows
    # ... and the only other rows with one are the prompt's own frozen tokens (start, "a",
    # end), which the training step restores (test_other_rows_and_weights_unchanged_bitwise)
    prompt_ids = set(p.tokenizer("a <heart>").input_ids)
    assert rows - set(plus.token_ids) <= prompt_ids
    assert all(q.grad is None for q in p.unet.parameters())


def test_other_rows_and_weights_unchanged_bitwise():
    p = load_pipeline("shapes")
    before_unet = {k: v.clone() for k, v in p.unet.state_dict().items()}
    before = p.text_encoder.get_input_embeddings().weight.detach().clone()
    cs = concept_images("heart", n=2, seed=1)
    plus = X.extended_textual_inversion(p, cs, steps=2, lr=1e-2, progress=False)
    after = p.text_encoder.get_input_embeddings().weight
    assert torch.equal(after[:len(before)], before)
    assert all(torch.equal(v, before_unet[k]) for k, v in p.unet.state_dict().items())
    assert not torch.equal(plus.embeddings[0], after[p.tokenizer.convert_tokens_to_ids("star")])


def test_runs_on_sd15_layout_tiny():
    p = load_pipeline("sd-1.5-layout-tiny")
    assert len(X.cross_layers(p.unet)) == 16
    coarse, fine = X.coarse_fine_split(p.unet)
    assert len(coarse) == 6 and len(fine) == 10      # 5² and 10² layers | 20² and 40²
    rng = np.random.default_rng(0)
    ims = rng.random((1, 320, 320, 3)).astype(np.float32)     # 40×40 latents
    plus = X.extended_textual_inversion(p, ims, placeholder="<tiny>", initializer=None,
                                        captions=["a photo of <tiny>"], steps=1, batch_size=1,
                                        progress=False)
    assert plus.embeddings.shape == (16, p.text_encoder.config.hidden_size)


def test_bad_input(pipe):
    with pytest.raises(ValueError, match="layer_prompts"):
        X.layer_conditioning(pipe, ["a red circle"])
    with pytest.raises(ValueError, match="layer_cond"):
        X.PerLayerConditioning(pipe.unet, {"nope": torch.zeros(1, 32, 64)})
    with pytest.raises(ValueError, match="captions"):
        X.extended_textual_inversion(pipe, np.zeros((2, 64, 64, 3)), captions=["a <x>"])
    with pytest.raises(ValueError, match="images"):
        X.extended_textual_inversion(pipe, np.zeros((64, 64, 3)))
