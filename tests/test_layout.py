"""Layout control (diffnotes.editing.layout): LMD's layout format and box rounding, its attention
energy and sampler, and Dense Diffusion's attention modulation.

Exact properties (float64, on the shapes pipeline and on the SD-1.5-layout tiny pipeline):
Dense Diffusion with λ_t = 0 is plain sampling; LMD with guidance off and one box covering the
canvas is plain sampling of its phrase, and with no composition steps plain sampling of the
scene prompt; the attention-energy gradient against a finite difference. The worked numbers of
the study notes: the source's example layout parsed to its boxes, box → mask at 64² and 16²
(hand-computed with LMD's rounding), the energy's bounds, the modulation vector
[1, 2, 4] → [2.5, 3, 2.5]. Bad input raises ValueError naming the argument.
"""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffnotes.editing.common import encode_prompts  # noqa: E402
from diffnotes.editing.layout import (SOURCE_EXAMPLE, attention_energy,  # noqa: E402
                                      box_masks, box_to_grid, canvas_split_boxes,
                                      dense_condition_maps, dense_diffusion, dense_lambda,
                                      dense_modulation, format_layout, latent_compose,
                                      layout_prompt, lmd, lmd_guidance_layers, make_layout,
                                      parse_layout)

from pipeline_helpers import noise_latents, plain_sample  # noqa: E402

STEPS = 3


_xT = noise_latents


def _plain(pipe, prompt, xT, steps=STEPS, gs=7.5, cond=None):
    return plain_sample(pipe, prompt, xT, steps, gs, cond)


def _span(mask):
    ys, xs = np.nonzero(np.asarray(mask))
    return (int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1, int(mask.sum()))


# ---------------------------------------------------------------------------- the layout format
def test_source_example_parses_to_its_boxes():
    """Ahmad's notes, §3.3.2: the LLM's answer for "A realistic photo of a gray cat and an
    orange dog on the grass." gives three objects, [x, y, w, h] on the 512 canvas → fractions."""
    L = parse_layout(SOURCE_EXAMPLE)
    assert L.phrases == ["a gray cat", "an orange dog", "grass"]
    expect = [(50, 120, 180, 200), (300, 120, 180, 200), (0, 340, 512, 172)]
    for box, (x, y, w, h) in zip(L.boxes, expect):
        assert box == (x / 512, y / 512, (x + w) / 512, (y + h) / 512)
    assert L.background == "A realistic photo of a grassy outdoor scene."
    assert L.negative == ""                                   # "None" means no negative prompt
    assert L.caption.startswith("A realistic photo of a gray cat")
    assert L.box_prompt(0) == "A realistic photo of a grassy outdoor scene with a gray cat"


def test_lmd_one_line_format_and_round_trip():
    text = ("Caption: a red circle and a blue square\n"
            "Objects: [('a red circle', [20, 176, 160, 160]), ('a blue square', [332, 176, 160, 160])]\n"
            "Background prompt: \nNegative prompt: ")
    L = parse_layout(text)
    assert L.phrases == ["a red circle", "a blue square"] and L.background == ""
    assert parse_layout(format_layout(L)).boxes == L.boxes
    assert L.prompt() == "a red circle and a blue square"
    assert "a red circle and a blue square" in layout_prompt("a red circle and a blue square")


@pytest.mark.parametrize("text, where, why", [
    ("Caption: x\nObjects:\n- 'a cat': [1, 2, 3]\n", "line 3", "4 numbers"),
    ("Objects:\n- 'a cat': [400, 0, 200, 100]\n", "line 2", "leaves the 512×512 canvas"),
    ("Objects:\n- 'a cat': [0, 0, 0, 100]\n", "line 2", "must be positive"),
    ("Caption: x\nObjects: [('a cat', [1, 2, 3, 4])]\nthe cat is happy\n", "line 3",
     "does not parse"),
    ("Objects:\n- 'a cat': [1, 2, 3, 4]\nbanana\n", "line 3", "object line"),
    ("Objects: [('a cat', [1, 2, 3, 4]\n", "line 1", "not a Python literal"),
    ("Caption: x\nBackground prompt: y\n", "no object", "Objects:"),
])
def test_parse_errors_name_the_line_and_why(text, where, why):
    with pytest.raises(ValueError) as e:
        parse_layout(text)
    assert str(e.value).startswith("text")
    assert where in str(e.value) and why in str(e.value)


@pytest.mark.parametrize("box, why", [((-0.1, 0, 0.5, 1), "[0, 1]"), ((0, 0, 1.2, 1), "[0, 1]"),
                                      ((0.5, 0, 0.5, 1), "x0 < x1"), ((0.6, 0, 0.5, 1), "x0 < x1"),
                                      ((0, 0.5, 1, 0.2), "y0 < y1"), ((0, 0, 1), "4")])
def test_bad_boxes_raise_naming_the_argument(box, why):
    with pytest.raises(ValueError, match=r"objects\[0\] box") as e:
        make_layout([("a red circle", box)])
    assert why in str(e.value)
    with pytest.raises(ValueError, match="layout"):
        box_masks([box], 16)


# ---------------------------------------------------------------------------- boxes on grids
def test_box_masks_against_the_hand_computed_table():
    """The study notes' table (LMD's rounding: round(x0·W), x1 = x0 + round(w·W), Python's
    round-half-to-even): at 64² the cat's x0 = round(6.25) = 6, w = round(22.5) = 22; the dog's
    x0 = round(37.5) = 38; the grass's y0 = round(42.5) = 42, h = round(21.5) = 22."""
    L = parse_layout(SOURCE_EXAMPLE)
    table = {64: [(6, 28, 15, 40, 550), (38, 60, 15, 40, 550), (0, 64, 42, 64, 1408)],
             16: [(2, 8, 4, 10, 36), (9, 15, 4, 10, 36), (0, 16, 11, 16, 80)]}
    for size, rows in table.items():
        m = box_masks(L, size)
        assert m.shape == (3, size, size) and m.dtype == torch.bool
        assert [_span(x) for x in m] == rows
    assert box_to_grid(L.boxes[0], (64, 64)) == (6, 15, 28, 40)
    # halves to even, the size rounded on its own: a shifted box keeps its size
    assert box_to_grid((0.5 / 16, 0, 2.5 / 16, 1), 16) == (0, 0, 2, 16)
    assert box_to_grid((1.5 / 16, 0, 3.5 / 16, 1), 16) == (2, 0, 4, 16)


def test_canvas_split_boxes():
    assert canvas_split_boxes(1) == [(0.0, 0.0, 1.0, 1.0)]
    assert canvas_split_boxes(2) == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    b = canvas_split_boxes(3, margin=0.05)
    assert len(b) == 3 and all(x0 < x1 for x0, _, x1, _ in b)
    assert all(b[k][2] <= b[k + 1][0] for k in range(2))            # side by side, no overlap
    with pytest.raises(ValueError, match="n_objects"):
        canvas_split_boxes(0)


# ---------------------------------------------------------------------------- LMD's energy
def test_energy_bounds():
    """E = −1 (fg_weight 1) when the attention is the box's indicator; +ω when it is 1 outside
    the box and 0 inside (the notes' bounds for maps in [0, 1])."""
    box = (0.25, 0.25, 0.75, 0.75)
    b = box_masks([box], 8).reshape(1, 64, 1).double()
    inside = torch.cat([b, torch.zeros_like(b)], -1)                # token 0 = the box
    assert float(attention_energy([inside], [box], [[0]], (8, 8))) == pytest.approx(-1.0)
    outside = torch.cat([1 - b, torch.zeros_like(b)], -1)
    assert float(attention_energy([outside], [box], [[0]], (8, 8), bg_weight=4.0)) == \
        pytest.approx(4.0)


def test_energy_gradient_matches_finite_difference(pipe):
    """∇_z E through the UNet's cross-attention (autograd, as lmd's guidance takes it) against
    a central finite difference along a random direction, float64."""
    from diffnotes.attention import AttentionCollector
    from diffnotes.editing.layout import _phrase_tokens
    prompt = "a red circle"
    cond = encode_prompts(pipe, prompt)
    x = _xT(pipe, 1)
    hw = tuple(x.shape[-2:])
    layers = lmd_guidance_layers(pipe.unet, hw)
    tokens = [_phrase_tokens(prompt, prompt, pipe.tokenizer, "phrase")]
    box = [(0.0, 0.1, 0.5, 0.9)]
    t = torch.tensor([700])

    def energy(z):
        with AttentionCollector(layers=layers).attach(pipe.unet) as col:
            pipe.unet(z, t, encoder_hidden_states=cond)
            return attention_energy(col.maps, box, tokens, hw)

    xg = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(energy(xg), xg)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (energy(x + h * d) - energy(x - h * d)) / (2 * h)
    assert float(g.abs().max()) > 0
    assert float((g * d).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_latent_compose_extremes():
    z, o = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8,
                                                                     dtype=torch.float64)
    assert torch.equal(latent_compose(z, o, torch.zeros(8, 8, dtype=torch.bool)), z)
    assert torch.equal(latent_compose(z, o, torch.ones(8, 8, dtype=torch.bool)), o)
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[:, :4] = True
    out = latent_compose(z, o, m)
    assert torch.equal(out[..., :4], o[..., :4]) and torch.equal(out[..., 4:], z[..., 4:])


def test_lmd_noops_are_plain_sampling(pipe):
    """Guidance off and one box covering the canvas (box masks): the object's own run IS plain
    sampling of its phrase and its latent replaces the whole composite, so the result is plain
    sampling (≤ 1e-10). Guidance off and no composition steps (r = 0): plain sampling of the
    scene prompt, whatever the boxes."""
    xT = _xT(pipe)
    one = make_layout([("a red circle", (0, 0, 1, 1))])
    z = lmd(pipe, one, guidance=False, mask="box", latents=xT, num_inference_steps=STEPS,
            output_type="latent")
    assert float((z - _plain(pipe, "a red circle", xT)).abs().max()) <= 1e-10
    two = make_layout([("a red circle", (0, 0, 0.5, 1)), ("a blue square", (0.5, 0, 1, 1))])
    z = lmd(pipe, two, guidance=False, compose_ratio=0.0, latents=xT,
            num_inference_steps=STEPS, output_type="latent")
    ref = _plain(pipe, "a red circle and a blue square", xT)
    assert float((z - ref).abs().max()) <= 1e-10


@pytest.mark.slow
def test_lmd_guided_runs_with_masks_in_their_boxes(pipe):
    """With guidance the composition and the energy steps run (three guided steps for each
    object and for the scene); the returned masks lie in their boxes and are not empty; the
    result differs from plain sampling."""
    two = make_layout([("a red circle", (0, 0, 0.5, 1)), ("a blue square", (0.5, 0, 1, 1))])
    xT = _xT(pipe)
    z, det = lmd(pipe, two, latents=xT, num_inference_steps=4, guidance_steps=0.75, eta=20.0,
                 output_type="latent", return_details=True)
    assert z.shape == xT.shape and torch.isfinite(z).all()
    boxes = box_masks(two, tuple(xT.shape[-2:]))
    assert bool((det["masks"] <= boxes).all()) and bool(det["masks"].any(-1).any(-1).all())
    assert len(det["energies"]) == 3 and all(len(e) == 3 for e in det["energies"])
    assert not torch.allclose(z, _plain(pipe, two.prompt(), xT, steps=4))


def test_lmd_bad_input(pipe):
    two = make_layout([("a red circle", (0, 0, 0.5, 1)), ("a blue square", (0.5, 0, 1, 1))])
    with pytest.raises(ValueError, match="layout"):
        lmd(pipe, "a red circle", num_inference_steps=2)
    with pytest.raises(ValueError, match="mask"):
        lmd(pipe, two, mask="sam", num_inference_steps=2)
    with pytest.raises(ValueError, match="compose_ratio"):
        lmd(pipe, two, compose_ratio=1.5, num_inference_steps=2)


# ---------------------------------------------------------------------------- Dense Diffusion
def test_modulation_worked_vector():
    """s = [1, 2, 4], R = [1, 1, 0], λ(1 − S) = 0.5 → [2.5, 3, 2.5]; with 1: [4, 4, 1] (every
    positive pair lifted to the row max, the negative pushed to the row min)."""
    s = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    R = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    assert dense_modulation(s, R, 1.0, 0.5).tolist() == [[2.5, 3.0, 2.5]]
    assert dense_modulation(s, R, 0.5, 1.0).tolist() == [[2.5, 3.0, 2.5]]
    assert dense_modulation(s, R, 1.0, 1.0).tolist() == [[4.0, 4.0, 1.0]]
    assert torch.equal(dense_modulation(s, R, 1.0, 0.0), s)
    assert dense_lambda(1000, 1.0) == 1.0 and dense_lambda(500, 1.0) == 0.5 ** 5
    assert dense_lambda(0, 0.3) == 0.0


def test_condition_maps():
    """R_self = (Σ_n m_n m_nᵀ > 0): symmetric, unit diagonal on covered pixels; a token in no
    segment has a zero column of R_cross; 1 − S = 1 − area/HW inside a segment, 1 outside."""
    m = torch.zeros(2, 4, 4, dtype=torch.float64)
    m[0, :, :2] = 1
    m[1, :2, 2:] = 1
    seg = torch.tensor([-1, 0, 0, 1, -1])
    c, s, f = dense_condition_maps(m, seg, 4, 4)
    flat = m.reshape(2, -1)
    assert torch.equal(s, ((flat.T @ flat) > 0).double()) and torch.equal(s, s.T)
    covered = flat.sum(0) > 0
    assert bool((s.diagonal()[covered] == 1).all()) and bool((s.diagonal()[~covered] == 0).all())
    assert torch.equal(c[:, 0], torch.zeros(16, dtype=torch.float64))
    assert torch.equal(c[:, 1], flat[0]) and torch.equal(c[:, 3], flat[1])
    assert f[0, 0] == 1 - 8 / 16 and f[2, 0] == 1 - 4 / 16 and f[15, 0] == 1.0
    c2, _, _ = dense_condition_maps(m, seg, 2, 2)                 # masks resized per layer
    assert c2.shape == (4, 5) and c2[:, 1].tolist() == [1, 0, 1, 0]


def _segments(pipe, size=None):
    s = size or pipe.unet.config.sample_size
    a = torch.zeros(s, s, dtype=torch.bool)
    b = torch.zeros(s, s, dtype=torch.bool)
    a[:, : s // 2] = True
    b[:, s // 2:] = True
    return [("a red circle", a), ("a blue square", b)]


@pytest.mark.slow
def test_dense_lambda_zero_is_plain_sampling(pipe):
    """λ_t = 0 (w = 0, or a schedule that returns 0 with the controller attached): plain DDIM
    sampling of the prompt (≤ 1e-10); on, the output changes; one segment covering the image
    (S = 1, so (1 − S) = 0 and M ≡ 0) changes nothing either."""
    prompt = "a red circle and a blue square"
    xT = _xT(pipe)
    ref = _plain(pipe, prompt, xT)
    kw = dict(latents=xT, num_inference_steps=STEPS, output_type="latent",
              separate_embeddings=False)
    z0 = dense_diffusion(pipe, prompt, _segments(pipe), lam=0, lam_self=0, **kw)
    assert float((z0 - ref).abs().max()) <= 1e-10
    z1 = dense_diffusion(pipe, prompt, _segments(pipe), schedule=lambda t, i, n: 0.0, **kw)
    assert float((z1 - ref).abs().max()) <= 1e-10
    full = [("a red circle", torch.ones(8, 8, dtype=torch.bool))]
    z2 = dense_diffusion(pipe, prompt, full, schedule=lambda t, i, n: 1.0, **kw)
    assert float((z2 - ref).abs().max()) <= 1e-10
    on = dense_diffusion(pipe, prompt, _segments(pipe, 8), window=1.0, **kw)
    assert float((on - ref).abs().max()) > 1e-6


def test_dense_separate_embeddings_only_change_segment_tokens(pipe):
    """With separate embeddings and λ_t = 0 the result is plain sampling from the prompt's
    embeddings with each segment's tokens taken from its phrase encoded alone."""
    from diffnotes.attention import word_token_indices
    prompt = "a red circle and a blue square"
    xT = _xT(pipe)
    cond = encode_prompts(pipe, prompt).clone()
    for ph in ("a red circle", "a blue square"):
        idx = word_token_indices(prompt, ph, pipe.tokenizer)
        own = word_token_indices(ph, ph, pipe.tokenizer)
        cond[0, idx] = encode_prompts(pipe, ph)[0, own]
    z = dense_diffusion(pipe, prompt, _segments(pipe), lam=0, lam_self=0, latents=xT,
                        num_inference_steps=STEPS, output_type="latent")
    assert float((z - _plain(pipe, prompt, xT, cond=cond)).abs().max()) <= 1e-10


def test_dense_bad_input(pipe):
    prompt = "a red circle and a blue square"
    a, b = _segments(pipe, 8)
    over = b[1].clone()
    over[:, 3] = True
    with pytest.raises(ValueError, match=r"segments.*overlap"):
        dense_diffusion(pipe, prompt, [a, ("a blue square", over)], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"segments\[1\] mask must have the shape"):
        dense_diffusion(pipe, prompt, [a, ("a blue square", torch.ones(4, 4, dtype=torch.bool))],
                        num_inference_steps=2)
    with pytest.raises(ValueError, match=r"segments\[0\] mask must be 2-D"):
        dense_diffusion(pipe, prompt, [("a red circle", torch.ones(1, 8, 8))],
                        num_inference_steps=2)
    with pytest.raises(ValueError, match=r"segments\[0\] mask.*empty"):
        dense_diffusion(pipe, prompt, [("a red circle", torch.zeros(8, 8))],
                        num_inference_steps=2)
    with pytest.raises(ValueError, match=r"segments\[0\] phrase"):
        dense_diffusion(pipe, prompt, [("a green star", a[1])], num_inference_steps=2)
    with pytest.raises(ValueError, match="lam"):
        dense_diffusion(pipe, prompt, [a], lam=-1, num_inference_steps=2)
    with pytest.raises(ValueError, match="window"):
        dense_diffusion(pipe, prompt, [a], window=2, num_inference_steps=2)
    with pytest.raises(ValueError, match="segments"):
        dense_diffusion(pipe, prompt, [], num_inference_steps=2)
