"""Self-attention guidance (diffnotes.guidance.self_attention_guidance / sag_sample): exact no-op,
the mask and blur against hand computations and scipy, the corrected eq 5.55, the layer rule on
both layouts, and agreement with diffusers' StableDiffusionSAGPipeline in float64."""
import math
import warnings

import numpy as np
import pytest
import torch

from diffnotes.attention import attention_layers
from diffnotes.ddim import ddim_step
from diffnotes.editing.common import pipe_alphas_cumprod
from diffnotes.guidance import (gaussian_blur_2d, sag_combine, sag_degrade, sag_layer, sag_mask,
                                sag_sample, self_attention_guidance)
from pipeline_helpers import noise_latents, plain_sample


# ----------------------------------------------------------------------------- the blur
def test_blur_matches_scipy_and_keeps_constants():
    from scipy import ndimage
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    ours = gaussian_blur_2d(x, 9, 1.0)
    # torch's "reflect" padding is scipy's "mirror"; sigma 1 with truncate 4 is a 9-tap kernel
    ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1.0, 1.0), mode="mirror", truncate=4.0)
    assert np.abs(ours.numpy() - ref).max() < 1e-12
    c = torch.full((1, 2, 12, 12), 0.37, dtype=torch.float64)
    assert (gaussian_blur_2d(c, 9, 2.5) - c).abs().max() < 1e-14


def test_blur_bad_input():
    x = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_blur_2d(x, 8)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur_2d(x, 9, 0.0)
    with pytest.raises(ValueError, match="x"):
        gaussian_blur_2d(torch.zeros(16, 16))


# ----------------------------------------------------------------------------- the mask
def _patch_attention(h=4, w=4, patch=((1, 1), (1, 2), (2, 1), (2, 2)), heads=2):
    """Every query attends only to the tokens of ``patch`` (uniformly)."""
    N = h * w
    A = torch.zeros(1, heads, N, N, dtype=torch.float64)
    cols = [i * w + j for i, j in patch]
    A[..., cols] = 1.0 / len(cols)
    return A


def test_mask_is_the_attended_patch_by_hand():
    # column sums: each of the 4 patch tokens receives N/4 = 4 > 1, the others 0, so the mask
    # is the 2×2 patch; on an 8×8 latent each token becomes a 2×2 block (nearest upsampling)
    m = sag_mask(_patch_attention(), (8, 8))
    want = torch.zeros(8, 8, dtype=torch.float64)
    want[2:6, 2:6] = 1
    assert m.shape == (1, 1, 8, 8) and torch.equal(m[0, 0], want)


def test_mask_hand_computed_column_sums():
    # 2 heads, 4 tokens on a 2×2 grid; head-mean column sums computed by hand below
    h1 = torch.tensor([[.7, .1, .1, .1], [.7, .1, .1, .1], [.1, .1, .7, .1], [.4, .2, .2, .2]])
    h2 = torch.tensor([[.1, .1, .1, .7], [.1, .1, .1, .7], [.1, .1, .7, .1], [.4, .2, .2, .2]])
    A = torch.stack([h1, h2])[None].double()
    # column sums of h1: [1.9, .5, 1.1, .5]; of h2: [.7, .5, 1.1, 1.7]; means: [1.3, .5, 1.1, 1.1]
    m = sag_mask(A, (2, 2))
    assert m[0, 0].tolist() == [[1.0, 0.0], [1.0, 1.0]]
    # a higher threshold keeps only the first token
    assert sag_mask(A, (2, 2), threshold=1.2)[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_uniform_attention_masks_nothing():
    N = 16
    A = torch.full((2, N, N), 1.0 / N, dtype=torch.float64)
    assert sag_mask(A, (16, 16)).abs().sum() == 0


def test_mask_bad_input():
    with pytest.raises(ValueError, match="self-attention"):
        sag_mask(torch.rand(1, 16, 8), (4, 4))
    with pytest.raises(ValueError, match="tile"):
        sag_mask(torch.rand(1, 15, 15), (16, 16))


# ----------------------------------------------------------------------------- degrade, combine
def test_degrade_mask_zero_and_one():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    a = 0.3
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    zero = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    assert (sag_degrade(x0, eps, zero, a) - x_t).abs().max() < 1e-14
    full = sag_degrade(x0, eps, zero + 1, a, sigma=1.5)
    want = math.sqrt(a) * gaussian_blur_2d(x0, 9, 1.5) + math.sqrt(1 - a) * eps
    assert (full - want).abs().max() < 1e-14


def test_combine_is_the_corrected_eq_5_55():
    g = torch.Generator().manual_seed(2)
    e, e_deg = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    for s in (0.0, 0.75, 3.0):
        # corrected form: ε(x̂) + (1 + s)(ε − ε(x̂)) = ε + s (ε − ε(x̂))
        assert (sag_combine(e, e, e_deg, s) - (e_deg + (1 + s) * (e - e_deg))).abs().max() < 1e-14
        assert torch.equal(sag_combine(e, e, e, s), e)   # no degradation, no guidance
    assert torch.equal(sag_combine(e, e, e_deg, 0.0), e)
    assert (sag_combine(e, e, e_deg, -1.0) - e_deg).abs().max() < 1e-15


def test_printed_eq_5_55_is_not_a_no_op():
    """Ahmad's notes print ε̃ = ε(x_t) + (1 + s)(ε(x_t) − ε(x̂_t)): at s = 0 that is 2ε − ε(x̂_t),
    not ε; the corrected form (and diffusers) gives ε."""
    g = torch.Generator().manual_seed(3)
    e, e_deg = torch.randn(2, 10, generator=g, dtype=torch.float64)
    printed = e + (1 + 0.0) * (e - e_deg)
    assert (printed - (2 * e - e_deg)).abs().max() < 1e-15
    assert (printed - e).abs().max() > 0.1
    assert torch.equal(sag_combine(e[None], e[None], e_deg[None], 0.0), e[None])


def test_wrapper_on_a_toy_model_by_hand():
    """The wrapper on ε(x, t) = 0.5 x with a fixed attention map: one call, by hand."""
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    A = _patch_attention(4, 4)[:, 0]                      # (1, 16, 16)

    def eps(x, t):
        return 0.5 * x
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64)
    guided = self_attention_guidance(eps, lambda: A, ac, 0.75)
    t = 500
    a = float(ac[t])
    x0 = (x - math.sqrt(1 - a) * 0.5 * x) / math.sqrt(a)
    m = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    m[..., 2:6, 2:6] = 1
    xd = math.sqrt(a) * (m * gaussian_blur_2d(x0) + (1 - m) * x0) + math.sqrt(1 - a) * 0.5 * x
    want = 0.5 * x + 0.75 * (0.5 * x - 0.5 * xd)
    assert (guided(x, torch.tensor([t])) - want).abs().max() < 1e-13
    with pytest.raises(ValueError, match="attention"):
        self_attention_guidance(eps, lambda: A.expand(2, -1, -1), ac, 0.75)(x, t)


# ----------------------------------------------------------------------------- both layouts
def test_layer_rule_by_position(pipe):
    names = attention_layers(pipe.unet, "self")
    n_down = sum(n.startswith("down_blocks") for n in names)
    assert sag_layer(pipe.unet) == names[n_down]
    # the layer diffusers' StableDiffusionSAGPipeline hooks
    assert names[n_down] == "mid_block.attentions.0.transformer_blocks.0.attn1"


def test_scale_zero_is_the_unguided_sampler(pipe):
    xT = noise_latents(pipe, seed=0)
    ref = plain_sample(pipe, "a red circle", xT, steps=3, gs=7.5)
    ours = sag_sample(pipe, "a red circle", sag_scale=0.0, guidance_scale=7.5,
                      num_inference_steps=3, latents=xT, output_type="latent")
    assert (ours - ref).abs().max() <= 1e-10


def test_sag_runs_and_changes_the_sample(pipe):
    xT = noise_latents(pipe, seed=1)
    seen = []
    a = sag_sample(pipe, "a blue square", sag_scale=0.75, num_inference_steps=2, latents=xT,
                   output_type="latent", callback=seen.append)
    b = sag_sample(pipe, "a blue square", sag_scale=0.75, num_inference_steps=2, latents=xT,
                   output_type="latent")
    ref = plain_sample(pipe, "a blue square", xT, steps=2, gs=7.5)
    assert a.shape == xT.shape and torch.equal(a, b) and bool(torch.isfinite(a).all())
    assert len(seen) == 2 and seen[0]["mask"].shape == (1, 1, *xT.shape[-2:])
    assert (a - ref).abs().max() > 1e-6


def test_sag_sample_bad_input(pipe):
    with pytest.raises(TypeError, match="prompt"):
        sag_sample(pipe, 3)
    with pytest.raises(ValueError, match="latents"):
        sag_sample(pipe, ["a", "b"], latents=noise_latents(pipe, n=1), num_inference_steps=1)


# ----------------------------------------------------------------------------- the peer
def _peer(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import StableDiffusionSAGPipeline
        peer = StableDiffusionSAGPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    peer.set_progress_bar_config(disable=True)
    return peer


@pytest.mark.parametrize("gs", [7.5, 1.0])
def test_agrees_with_diffusers_sag_pipeline(pipe, gs):
    """Same latents, prompts, steps, scales (float64). The step-by-step latents
    agree to 1e-5: diffusers computes √ᾱ_t, the DDIM coefficients and the blur kernel in float32
    (rounding ~6e-8 relative), ours in float64; the plain CFG sampler differs from diffusers'
    StableDiffusionPipeline by the same order. The last step differs by design: diffusers'
    DDIMScheduler (set_alpha_to_one=False) ends at ᾱ_0, diffnotes.ddim at ᾱ = 1; the test
    checks diffusers' last latent is exactly our last step taken to ᾱ_0. Both layouts: on SD
    1.5's the peer hooks the same mid-block layer (test_layer_rule_by_position)."""
    peer = _peer(pipe)
    xT = noise_latents(pipe, seed=5)
    N = 3 if pipe.unet.config.sample_size <= 16 else 2     # the SD-layout UNet is slower
    prompt = "a red circle on the left"
    traj = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = peer(prompt, num_inference_steps=N, guidance_scale=gs, sag_scale=0.75,
                     latents=xT.clone(), output_type="latent",
                     callback=lambda i, t, l: traj.append(l.clone())).images
    steps = []
    sag_sample(pipe, prompt, sag_scale=0.75, guidance_scale=gs, num_inference_steps=N,
               latents=xT, output_type="latent", callback=steps.append)
    for i in range(1, N):
        assert (steps[i]["x"] - traj[i - 1]).abs().max() < 1e-5
    last = steps[-1]
    eps = sag_combine(last["eps"], last["eps_ref"], last["eps_degraded"], 0.75)
    ac = pipe_alphas_cumprod(pipe)
    to_a0 = ddim_step(last["x"], eps, float(ac[last["t"]]), float(ac[0]))
    assert (to_a0 - final).abs().max() < 1e-5
