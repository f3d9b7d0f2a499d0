"""SpaText (diffnotes.editing.spatext): zero-initialised extra input channels carrying a
spatio-textual map (Ahmad's notes, §3.3.1, eq 3.11).

Exact properties (float64, on the shapes pipeline and on the SD-1.5-layout tiny pipeline): the
untrained model (zero weights on the new channels) is the base UNet, and its sampler is plain
sampling; the widened conv_in is one convolution over the concatenated channels. The map puts
each embedding only inside its mask (area-resized to the latent); no segments, zero map. The
source's 5% rule (a 204-px segment of 4096 dropped, a 205-px one kept) and the random choice of
K segments. The shipped weights put an object inside its segment more often than the base
model. Bad input raises ValueError naming the argument.
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffnotes.ddim import ddim_sample  # noqa: E402
from diffnotes.editing.common import (encode_prompts, pipe_alphas_cumprod,  # noqa: E402
                                      pipe_eps_model, pipe_timesteps)
from diffnotes.editing.spatext import (SpaTextConvIn, SpaTextModel, choose_segments,  # noqa: E402
                                       eligible_segments, load_spatext, mask_coverage,
                                       object_phrase, paint, phrase_embeddings, spatext,
                                       spatext_eps_model, spatio_textual_map)

from pipeline_helpers import noise_latents  # noqa: E402

STEPS = 2


def _sizes(pipe):
    s = pipe.unet.config.sample_size
    return s * pipe.vae_scale_factor, s


def _masks(pipe):
    """Two disjoint rectangles at image resolution."""
    H, _ = _sizes(pipe)
    a = np.zeros((H, H), bool)
    b = np.zeros((H, H), bool)
    a[H // 8: H // 2, H // 16: H // 3] = True
    b[H // 3: H - H // 8, H // 2 + 3: H - H // 10] = True
    return a, b


_xT = noise_latents


# ---------------------------------------------------------------------------- exact no-ops
def test_untrained_model_is_the_base_unet(pipe):
    H, h = _sizes(pipe)
    model = SpaTextModel.from_pipe(pipe)
    assert model.channels == pipe.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, h, h, generator=g, dtype=torch.float64)
    st = torch.randn(2, model.channels, h, h, generator=g, dtype=torch.float64) * 10
    c = encode_prompts(pipe, ["a red circle", "a blue square"])
    t = torch.tensor([900, 15])
    with torch.no_grad():
        a = model(x, t, c, st)
        b = pipe.unet(x, t, encoder_hidden_states=c).sample
    assert (a - b).abs().max().item() <= 1e-10
    assert pipe.unet.conv_in.in_channels == 4            # the pipeline's own UNet is untouched


def test_untrained_sampler_is_plain_sampling(pipe):
    a, b = _masks(pipe)
    segs = [("a red circle", a), ("a blue square", b)]
    prompt = "a red circle and a blue square"
    xT = _xT(pipe)
    model = SpaTextModel.from_pipe(pipe)
    z = spatext(pipe, prompt, segs, model=model, latents=xT, num_inference_steps=STEPS,
                output_type="latent")
    eps = pipe_eps_model(pipe, encode_prompts(pipe, prompt), encode_prompts(pipe, ""), 7.5)
    ref = ddim_sample(eps, xT, pipe_timesteps(pipe, STEPS), pipe_alphas_cumprod(pipe))
    assert (z - ref).abs().max().item() <= 1e-10


def test_untrained_whitened_model_is_the_base_unet():
    """With the fitted projection (as trained) the zero-initialised model is still the base."""
    from diffnotes.data.shapes import COLORS, SHAPES
    from diffnotes.models.load import load_pipeline
    p = load_pipeline("shapes").to(torch.float64)
    phrases = [object_phrase(c, s) for c in COLORS for s in SHAPES]
    model = SpaTextModel.from_pipe(p, phrases, 16)
    assert model.channels == 16
    a, b = _masks(p)
    st = spatio_textual_map(p, [("a red circle", a), ("a blue square", b)], model)
    x = _xT(p)
    c = encode_prompts(p, "a red circle")
    t = torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(model(x, t, c, st), p.unet(x, t, encoder_hidden_states=c).sample)
    # the whitening: unit variance per channel over the phrases, centred
    z = model.project(phrase_embeddings(p, phrases))
    assert torch.allclose(z.mean(0), torch.zeros(16, dtype=z.dtype), atol=1e-8)
    assert torch.allclose(z.var(0), torch.ones(16, dtype=z.dtype), atol=1e-8)


def test_widened_conv_is_one_convolution_over_the_concatenation():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Conv2d(4, 8, 3, padding=1).double()
    conv = SpaTextConvIn(base, 5)
    with torch.no_grad():
        conv.extra.weight.copy_(torch.randn(conv.extra.weight.shape, generator=g))
    x = torch.randn(2, 9, 7, 7, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, conv.widened_weight(), base.bias, padding=1)
    assert torch.allclose(conv(x), ref, atol=1e-12)
    assert conv.in_channels == 9


def test_guidance_scale_zero_ignores_the_segments(pipe):
    """The unconditional branch of CFG drops the global prompt AND the segments: with scale 0
    the guided ε is ε_θ([z; 0], t, ∅) whatever the map."""
    _, h = _sizes(pipe)
    model = SpaTextModel.from_pipe(pipe)
    with torch.no_grad():
        model.unet.conv_in.extra.weight.normal_(generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, h, h, generator=g, dtype=torch.float64)
    st = torch.randn(1, model.channels, h, h, generator=g, dtype=torch.float64)
    cond, null = encode_prompts(pipe, "a red circle"), encode_prompts(pipe, "")
    t = torch.tensor([400])
    with torch.no_grad():
        e0 = spatext_eps_model(model, cond, st, null, 0.0)(x, t)
        u = model(x, t, null, torch.zeros_like(st))
        e1 = spatext_eps_model(model, cond, st, null, 1.0)(x, t)
        c = model(x, t, cond, st)
    assert (e0 - u).abs().max().item() <= 1e-10
    assert (e1 - c).abs().max().item() <= 1e-10


# ---------------------------------------------------------------------------- the map
def test_map_puts_each_embedding_only_inside_its_mask(pipe):
    H, h = _sizes(pipe)
    a, b = _masks(pipe)
    model = SpaTextModel.from_pipe(pipe)
    st = spatio_textual_map(pipe, [("a red circle", a), ("a blue square", b)], model)[0]
    assert st.shape == (model.channels, h, h)
    e = phrase_embeddings(pipe, ["a red circle", "a blue square"])
    ca = mask_coverage(torch.from_numpy(a).double(), (h, h))
    cb = mask_coverage(torch.from_numpy(b).double(), (h, h))
    f = H // h
    # area resizing = average pooling by the VAE factor
    assert torch.equal(ca, F.avg_pool2d(torch.from_numpy(a).double()[None], f)[0])
    outside = (ca == 0) & (cb == 0)
    assert bool(outside.any()) and st[:, outside].abs().max().item() == 0.0
    for cov, k in ((ca, 0), (cb, 1)):
        inside = cov == 1
        assert bool(inside.any())
        assert torch.allclose(st[:, inside], e[k][:, None].expand(-1, int(inside.sum())),
                              atol=1e-12)
    border = (ca > 0) & (ca < 1)
    assert torch.allclose(st[:, border], e[0][:, None] * ca[border][None], atol=1e-12)


def test_dropped_segments_give_the_zero_map(pipe):
    _, h = _sizes(pipe)
    model = SpaTextModel.from_pipe(pipe)
    st = spatio_textual_map(pipe, [], model)
    assert st.shape == (1, model.channels, h, h) and not bool(st.any())
    # in training, a segment not kept contributes coverage 0
    e = torch.randn(2, 3, model.channels, dtype=torch.float64)
    cov = torch.rand(2, 3, h, h, dtype=torch.float64) * torch.zeros(2, 3, 1, 1, dtype=torch.float64)
    assert not bool(paint(e, cov).any())


def test_five_percent_rule_of_the_source():
    """The source's rule (Ahmad's notes, §3.3.1): on 64×64 (4096 px) a 204-px segment (4.98%) is dropped and a
    205-px one (5.005%) kept; the rule is area >= 5% of the image."""
    areas = torch.tensor([204.0, 205.0, 204.8, 4096.0])
    assert eligible_segments(areas, 4096, 0.05).tolist() == [False, True, True, True]


def test_choose_segments_draws_k_distinct_eligible_segments():
    eligible = torch.tensor([[True, True, True], [True, False, True], [False, False, False],
                             [False, True, False]]).repeat(200, 1)
    keep = choose_segments(eligible, torch.Generator().manual_seed(0))
    n = eligible.sum(1)
    k = keep.sum(1)
    assert bool((keep <= eligible).all())                      # only eligible ones
    assert bool(((k >= 1) | (n == 0)).all()) and bool((k <= n).all())
    assert bool((k[n == 0] == 0).all())
    # every count 1..n occurs, about uniformly (3 eligible: K = 1, 2, 3)
    counts = torch.bincount(k[n == 3], minlength=4)[1:].float() / (n == 3).sum()
    assert bool((counts > 0.2).all())
    again = choose_segments(eligible, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)                            # seeded


# ---------------------------------------------------------------------------- bad input
def test_bad_segments_raise_value_error(pipe):
    H, _ = _sizes(pipe)
    a, b = _masks(pipe)
    model = SpaTextModel.from_pipe(pipe)
    kw = dict(model=model, num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match=r"segments\[0\].*shape"):
        spatext(pipe, "a red circle", [("a red circle", np.zeros((H - 1, H), bool))], **kw)
    over = a.copy()
    over[H // 3: H // 2, H // 2 + 3: H // 2 + 8] = True
    with pytest.raises(ValueError, match="segments must not overlap"):
        spatext(pipe, "x", [("a red circle", over), ("a blue square", b)], **kw)
    with pytest.raises(ValueError, match=r"segments\[1\]"):
        spatext(pipe, "x", [("a red circle", a), ("a blue square", b * 0.5)], **kw)
    with pytest.raises(ValueError, match="segments"):
        spatext(pipe, "x", "a red circle", **kw)
    with pytest.raises(ValueError, match=r"segments\[0\]"):
        spatext(pipe, "x", [("", a)], **kw)
    with pytest.raises(ValueError, match="output_type"):
        spatext(pipe, "x", [], model=model, output_type="tensor")
    with pytest.raises(ValueError, match="num_inference_steps"):
        spatext(pipe, "x", [], model=model, num_inference_steps=0)


def test_unknown_phrase_words_raise_value_error():
    from diffnotes.models.load import load_pipeline
    p = load_pipeline("shapes")
    a = np.zeros((64, 64), bool)
    a[5:20, 5:20] = True
    with pytest.raises(ValueError, match=r"segments\[0\].*'zebra'"):
        spatext(p, "a red circle", [("a zebra", a)], model=SpaTextModel.from_pipe(p),
                num_inference_steps=1)


def test_shipped_weights_do_not_fit_another_pipeline():
    from diffnotes.models.load import load_pipeline
    with pytest.raises(ValueError, match="pipe does not match"):
        load_spatext(load_pipeline("sd-1.5-layout-tiny"))


# ---------------------------------------------------------------------------- shipped weights
@pytest.mark.slow
def test_shipped_model_follows_the_segments_better_than_the_base_model():
    """On generator layouts (one or two objects), the shipped SpaText model's objects overlap
    their requested segments (IoU, judged by diffnotes.models.eval_shapes.judge_scene) more than
    the base model's samples of the same prompt from the same latents."""
    from diffnotes.editing.spatext import _layouts, _plain, _score
    from diffnotes.models.eval_shapes import judge_scene, shape_judge
    from diffnotes.models.load import load_pipeline
    p = load_pipeline("shapes")
    model = load_spatext(p)
    clf = shape_judge()
    ours, base = [], []
    for i, lay in enumerate(_layouts(6, seed=99)):
        x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(i))
        segs = [(object_phrase(o["color"], o["shape"]), o["mask"]) for o in lay["objects"]]
        img = spatext(p, lay["prompt"], segs, model=model, latents=x, num_inference_steps=10,
                      output_type="np")
        ours += [r["iou"] for r in _score(judge_scene(img[0], clf), lay["objects"])]
        img = _plain(p, lay["prompt"], x, 10, 7.5)
        base += [r["iou"] for r in _score(judge_scene(img[0], clf), lay["objects"])]
    assert np.mean(ours) > np.mean(base) + 0.1, (np.mean(ours), np.mean(base))
