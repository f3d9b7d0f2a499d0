"""LoRA (diffnotes.personalization.lora): B = 0 is the identity (bitwise), the forward equals the
merged weight W0 + (α/r)BA, rank(ΔW) ≤ r, r(d_in + d_out) parameters per layer, only they train,
the diffusers state dict round-trips through save_lora_weights, scale 0 is the base model, and
everything runs on the SD 1.5 block layout."""
import numpy as np
import pytest
import torch

from diffnotes.models.load import load_pipeline
from diffnotes.personalization import lora as L
from diffnotes.personalization.common import concept_images, encode_text


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("sd-1.5-layout-tiny")


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    c = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    return x, c


def test_zero_B_is_identity_bitwise_and_param_count(tiny):
    unet = load_pipeline("sd-1.5-layout-tiny").unet
    x, c = _inputs(unet)
    with torch.no_grad():
        ref = unet(x, 10, encoder_hidden_states=c).sample
    layers = L.add_lora(unet, rank=2)
    with torch.no_grad():
        out = unet(x, 10, encoder_hidden_states=c).sample
    assert torch.equal(ref, out)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    expected = sum(2 * (m.base_layer.in_features + m.base_layer.out_features) for m in layers)
    assert sum(p.numel() for p in trainable) == expected
    assert all(not m.base_layer.weight.requires_grad for m in layers)
    names = list(L.lora_layers(unet))
    assert any(n.endswith("attn1.to_q") for n in names) and any(n.endswith("attn2.to_out.0") for n in names)


def test_forward_equals_merged_weight_and_rank_bound():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 9).double()
    lay = L.LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        lay.lora_B.weight.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    merged = x @ (base.weight + lay.delta()).T + base.bias
    assert (lay(x) - merged).abs().max() < 1e-12
    s = torch.linalg.svdvals(lay.delta())
    assert int((s > 1e-10 * s[0]).sum()) == 3 and s.shape[0] == 9
    lay.scale = 0.0
    assert torch.equal(lay(x), base(x))
    lay.scale = 0.5
    assert (lay(x) - (x @ (base.weight + 0.5 * lay.delta()).T + base.bias)).abs().max() < 1e-12


def test_rank_and_targets_are_checked(tiny):
    unet = load_pipeline("sd-1.5-layout-tiny").unet
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="rank"):
            L.add_lora(unet, rank=bad)
    with pytest.raises(ValueError, match="target_modules"):
        L.add_lora(unet, rank=2, target_modules=("no_such_layer",))
    cs = concept_images("heart", n=2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        L.lora(tiny, cs, cs.captions, rank=0)
    with pytest.raises(ValueError, match="images"):
        L.lora(tiny, np.zeros((0, 64, 64, 3), np.float32), "a x")


def test_train_save_load_roundtrip_on_sd15_layout(tmp_path):
    pipe = load_pipeline("sd-1.5-layout-tiny")
    cs = concept_images("heart", n=2, seed=0)
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    res = L.lora(pipe, cs, cs.captions, rank=2, steps=2, lr=1e-2, progress=False)
    assert len(res.losses) == 2 and np.isfinite(res.losses).all()
    deltas = L.merged_delta(pipe.unet)
    assert max(float(d.abs().max()) for d in deltas.values()) > 0          # B moved off zero
    for name, lay in L.lora_layers(pipe.unet).items():                     # only LoRA trained
        assert not lay.base_layer.weight.requires_grad
    f = L.save_lora(pipe, tmp_path)
    from safetensors.torch import load_file
    keys = list(load_file(str(f)))
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)
    fresh = load_pipeline("sd-1.5-layout-tiny")
    L.new_token(fresh, cs.placeholder, cs.class_word, seed=0)
    L.load_lora(fresh, tmp_path)
    x, _ = _inputs(pipe.unet)
    c = encode_text(pipe, ["a <heart>"] * 2)
    assert torch.equal(c, encode_text(fresh, ["a <heart>"] * 2))
    with torch.no_grad():
        a = pipe.unet(x, 10, encoder_hidden_states=c).sample
        b = fresh.unet(x, 10, encoder_hidden_states=c).sample
    assert torch.equal(a, b)
    L.set_lora_scale(fresh.unet, 0.0)
    base = load_pipeline("sd-1.5-layout-tiny")
    with torch.no_grad():
        assert torch.equal(fresh.unet(x, 10, encoder_hidden_states=c).sample,
                           base.unet(x, 10, encoder_hidden_states=c).sample)
    # every other text-encoder parameter untouched (the new row is the only addition)
    after = pipe.text_encoder.state_dict()
    for k, v in before.items():
        if "token_embedding" not in k:
            assert torch.equal(v, after[k])


def test_state_dict_matches_diffusers_converter():
    from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
    unet = load_pipeline("sd-1.5-layout-tiny").unet
    L.add_lora(unet, rank=2, target_modules=("to_k",))
    sd = L.lora_state_dict(unet)
    peft_sd = convert_unet_state_dict_to_peft(sd)
    assert convert_state_dict_to_diffusers(peft_sd).keys() == sd.keys()
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in peft_sd)
