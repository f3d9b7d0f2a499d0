"""Break-A-Scene (Ahmad's notes, §4.4.3, eqs 4.5–4.7): the masked loss as the official code
reduces it, the attention loss, union sampling, the two phases."""
import numpy as np
import pytest
import torch

from diffnotes.models.load import load_pipeline
from diffnotes.personalization import break_a_scene as BS
from diffnotes.personalization.common import diffusion_loss


class _Zero(torch.nn.Module):
    """ε_θ ≡ 0 (or a given function of x), to test the loss's reduction."""

    def __init__(self, f=None):
        super().__init__()
        self.f = f

    def forward(self, x, t, encoder_hidden_states=None):
        out = torch.zeros_like(x) if self.f is None else self.f(x)
        return type("O", (), {"sample": out})()


def _quarter_mask(B=2, h=8, w=8):
    m = torch.zeros(B, 1, h, w)
    m[..., :h // 2, :w // 2] = 1
    return m


def test_quarter_mask_counts_a_quarter_of_the_pixels():
    # ε = 1, ε_θ = 0, mask covering 25 %: L_rec = 0.25 (the notes' test vector)
    z = torch.zeros(2, 4, 8, 8)
    ac = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    loss = diffusion_loss(_Zero(), z, torch.zeros(2, 3, 5), ac, t=torch.tensor([10, 500]),
                          noise=torch.ones_like(z), pixel_weight=_quarter_mask())
    assert float(loss) == 0.25
    assert float(BS.masked_loss(torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8),
                                _quarter_mask())) == 0.25


def test_full_mask_is_the_plain_loss_and_outside_is_ignored():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    ac = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    t = torch.tensor([10, 500])
    net = _Zero(lambda x: 0.3 * x)
    plain = diffusion_loss(net, z, torch.zeros(2, 3, 5), ac, t=t, noise=noise)
    full = diffusion_loss(net, z, torch.zeros(2, 3, 5), ac, t=t, noise=noise,
                          pixel_weight=torch.ones(2, 1, 8, 8))
    assert torch.equal(plain, full)
    m = _quarter_mask()
    out = lambda x: 0.3 * x                                           # noqa: E731
    a = BS.masked_loss(noise, out(z), m)
    pert = out(z) + 5.0 * (1 - m)                                     # change ε_θ outside M only
    assert torch.equal(a, BS.masked_loss(noise, pert, m))


def test_attention_loss_zero_on_mask_and_positive_otherwise():
    mask = torch.zeros(2, 4, 4)
    mask[0, :2, :2] = 1
    mask[1, 2:, 2:] = 1
    maps = torch.zeros(4, 4, 5)
    maps[..., 2] = 0.4 * mask[0]                                      # max-normalised = mask
    maps[..., 3] = 0.9 * mask[1]
    assert float(BS.attention_loss(maps, [[2], [3]], mask)) == 0.0
    maps[0, 3, 3] = 0.2
    assert float(BS.attention_loss(maps, [[2], [3]], mask)) > 0


def test_union_mask_and_subsets():
    g = torch.Generator().manual_seed(0)
    M = torch.rand(3, 6, 6, generator=g) > 0.5
    assert torch.equal(BS.union_mask(M.float(), [0, 2]), torch.maximum(M[0], M[2]).float())
    seen = {tuple(BS.sample_subset(3, g)) for _ in range(300)}
    assert seen == {(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)}
    assert BS.subset_prompt(["<a>", "<b>"], [0, 1]) == "a photo of <a> and <b>"
    with pytest.raises(ValueError, match="subset"):
        BS.union_mask(M.float(), [])


def test_phases_token_rows_then_unet():
    p = load_pipeline("shapes")
    img, masks, _ = BS.heart_purple_scene()
    table0 = p.text_encoder.get_input_embeddings().weight.detach().clone()
    unet0 = {k: v.clone() for k, v in p.unet.state_dict().items()}
    r = BS.break_a_scene(p, img, masks, ["<h>", "<p>"], ["star", "blue"], phase1_steps=2,
                         phase2_steps=0, progress=False)
    table = p.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[:len(table0)], table0)                  # phase 1: handles only
    assert not torch.equal(table[r.token_ids[0]], table0[p.tokenizer.convert_tokens_to_ids("star")])
    assert all(torch.equal(v, unet0[k]) for k, v in p.unet.state_dict().items())
    assert r.attn[0] > 0 and r.extra["attn_res"] == 16
    p2 = load_pipeline("shapes")
    BS.break_a_scene(p2, img, masks, ["<h>", "<p>"], phase1_steps=1, phase2_steps=1,
                     progress=False)
    assert any(not torch.equal(v, unet0[k]) for k, v in p2.unet.state_dict().items())
    t2 = p2.text_encoder.get_input_embeddings().weight
    assert torch.equal(t2[:len(table0)], table0)


def test_runs_on_sd15_layout_tiny():
    p = load_pipeline("sd-1.5-layout-tiny")
    img = np.random.default_rng(0).random((320, 320, 3)).astype(np.float32)
    m = np.zeros((2, 320, 320), bool)
    m[0, :, :160] = True
    m[1, :, 160:] = True
    r = BS.break_a_scene(p, img, m, ["<l>", "<r>"], phase1_steps=1, phase2_steps=1,
                         batch_size=1, progress=False)
    assert r.extra["attn_res"] == 10 and len(r.losses) == 2


def test_bad_input():
    p = load_pipeline("shapes")
    img, masks, _ = BS.heart_purple_scene()
    with pytest.raises(ValueError, match="masks"):
        BS.break_a_scene(p, img, masks[:, :32], ["<h>", "<p>"], progress=False)
    with pytest.raises(ValueError, match="placeholders"):
        BS.break_a_scene(p, img, masks, ["<h>"], progress=False)
    with pytest.raises(ValueError, match="placeholder"):
        BS.break_a_scene(p, img, masks, ["heart", "<p>"], progress=False)
    with pytest.raises(ValueError, match="image"):
        BS.break_a_scene(p, img[..., 0], masks, ["<h>", "<p>"], progress=False)
