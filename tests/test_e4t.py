"""E4T (diffnotes.personalization.e4t): ΔW = 0 is the identity (bitwise), W0's zeros stay zero,
E = 0 gives ⟨d⟩ = ⟨c⟩ and ⟨d⟩ − ⟨c⟩ = s·E(I) exactly, tuning runs on the SD 1.5 layout."""
import numpy as np
import pytest
import torch

from diffnotes.models.load import load_pipeline
from diffnotes.personalization import e4t as E
from diffnotes.personalization.common import concept_images


def test_zero_offsets_identity_bitwise():
    unet = load_pipeline("sd-1.5-layout-tiny").unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    c = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ref = unet(x, 5, encoder_hidden_states=c).sample
    offs = E.add_weight_offsets(unet)
    assert any(k.endswith("attn1.to_q") for k in offs) and any(k.endswith("attn2.to_v") for k in offs)
    with torch.no_grad():
        assert torch.equal(unet(x, 5, encoder_hidden_states=c).sample, ref)
        for w in offs.values():
            w.delta.normal_()
        assert not torch.equal(unet(x, 5, encoder_hidden_states=c).sample, ref)


def test_multiplicative_keeps_zeros():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    with torch.no_grad():
        base.weight[base.weight.abs() < 0.2] = 0
    lay = E.MultiplicativeLinear(base)
    with torch.no_grad():
        lay.delta.normal_()
    zero = base.weight == 0
    assert zero.any() and torch.all(lay.weight[zero] == 0)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert (lay(x) - (x @ (base.weight * (1 + lay.delta)).T + base.bias)).abs().max() < 1e-12


def test_embedding_offset_eq_415():
    pipe = load_pipeline("sd-1.5-layout-tiny")
    model = E._build(pipe, "a")
    x = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    feats = model.encoder.features(x)
    assert len(feats) == len(pipe.vae.encoder.down_blocks) + 2
    d, e = model.embedding(feats)
    assert torch.equal(e, torch.zeros_like(e)) and torch.equal(d, model.coarse.expand_as(d))
    with torch.no_grad():
        model.encoder.final.weight.normal_()
    d, e = model.embedding(feats)
    assert e.abs().max() > 0
    assert (d - model.coarse - E.SCALE * e).abs().max() < 1e-6


def test_tuning_runs_on_sd15_layout_and_checks_input():
    pipe = load_pipeline("sd-1.5-layout-tiny")
    cs = concept_images("heart", n=2, seed=0)
    model, res = E.e4t(pipe, cs, cs.captions, cs.placeholder, "a", steps=2, pretrained=None,
                       progress=False)
    assert len(res.losses) == 2 and np.isfinite(res.losses).all()
    tid = pipe.tokenizer.convert_tokens_to_ids(cs.placeholder)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid],
                       res.extra["embedding"])
    with pytest.raises(ValueError, match="prompt"):
        E.e4t(load_pipeline("sd-1.5-layout-tiny"), cs, "a star", cs.placeholder, "a", steps=1)
    with pytest.raises(ValueError, match="steps"):
        E.e4t(pipe, cs, cs.captions, "<h2>", "a", steps=0)
