"""Sketch-guided sampling (Voynov et al. 2022; Zhu's slides, *Sketch-Guided Text-to-Image Diffusion
Models*): the feature hooks on any UNet2DModel layout, the per-pixel predictor, the outline
ground truth, and scale 0 = unguided DDPM."""
import pytest
import torch
from diffusers import UNet2DModel

from diffnotes.ddpm import ddpm_step
from diffnotes.restoration.posterior import sketch_guidance
from diffnotes.restoration.sketch import (EdgePredictor, default_layers, edge_f1,
                                          edge_loss_and_eps, outlines, unet_features)
from diffnotes.schedules import alphas_cumprod

LAYOUTS = {
    "pixel_shapes": dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                         block_out_channels=(16, 32, 64), norm_num_groups=8, attention_head_dim=32,
                         down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "two_level_attn": dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=2,
                           block_out_channels=(8, 16), norm_num_groups=4,
                           down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "AttnUpBlock2D")),
}


@pytest.fixture(params=list(LAYOUTS))
def any_unet(request):
    torch.manual_seed(0)
    return UNet2DModel(**LAYOUTS[request.param]).eval()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(**{**LAYOUTS["two_level_attn"], "layers_per_block": 1}).eval()


def test_features_hook_any_layout_and_eps_unchanged(any_unet):
    unet = any_unet
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    layers = default_layers(unet)
    assert layers[0] == "down_blocks.0" and "mid_block" in layers
    feats, eps = unet_features(unet, x, 500, layers)
    assert len(feats) == len(layers) and all(f.shape[0] == 2 and f.ndim == 4 for f in feats)
    with torch.no_grad():
        ref = unet(x, torch.full((2,), 500)).sample
    torch.testing.assert_close(eps, ref, rtol=0, atol=0)
    pred = EdgePredictor.for_unet(unet)
    assert pred.in_channels == sum(f.shape[1] for f in feats)
    with torch.no_grad():
        e, _ = pred.predict(unet, x, 500)
    assert e.shape == (2, 1, 16, 16) and float(e.min()) >= 0 and float(e.max()) <= 1
    # the hooks are removed afterwards
    assert all(not m._forward_hooks for m in unet.modules())
    with pytest.raises(ValueError, match="layers"):
        unet_features(unet, x, 500, ["up_blocks.9"])


def test_predictor_is_per_pixel(unet):
    """A 1×1-convolution MLP: permuting the pixels of the feature maps permutes the output."""
    pred = EdgePredictor.for_unet(unet)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    feats, _ = unet_features(unet, x, 100, pred.layers)
    f = pred.mlp(torch.cat([torch.nn.functional.interpolate(v, size=(16, 16), mode="bilinear")
                            for v in feats] + [torch.zeros(1, 8, 16, 16)], 1))
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    inp = torch.cat([torch.nn.functional.interpolate(v, size=(16, 16), mode="bilinear")
                     for v in feats] + [torch.zeros(1, 8, 16, 16)], 1)
    shuffled = inp.flatten(2)[..., perm].reshape(inp.shape)
    torch.testing.assert_close(pred.mlp(shuffled).flatten(2), f.flatten(2)[..., perm])


def test_outlines_of_a_square_and_f1():
    m = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    m[0, 0, 2:7, 3:8] = True                                  # a 5×5 square
    e = outlines(m)
    assert int(e.sum()) == 16 and bool((e <= m.float()).all())
    assert float(edge_f1(e, e)) == 1.0
    assert float(edge_f1(e, torch.zeros_like(e))) == 0.0


def _short():
    b = torch.linspace(1e-3, 0.3, 10, dtype=torch.float64)
    return b, alphas_cumprod(b)


def test_scale_zero_is_unguided_ddpm(unet):
    b, ac = _short()
    pred = EdgePredictor.for_unet(unet)
    eps_model = lambda x, t: unet(x, t).sample  # noqa: E731
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    target = torch.zeros(2, 1, 16, 16)
    rec = []
    with torch.no_grad():
        x0 = sketch_guidance(eps_model, None, target, alphas_cumprod=ac,
                             timesteps=list(range(9, -1, -1)), x_T=x_T, predictor=pred, unet=unet,
                             scale=0.0, generator=torch.Generator().manual_seed(0), progress=False,
                             callback=rec.append)
        x = x_T
        for k, t in enumerate(range(9, -1, -1)):
            x = ddpm_step(eps_model, x, t, b.float(), noise=rec[k]["noise"])
    assert float((x0 - x).abs().max()) <= 1e-5


def test_guided_step_lowers_the_edge_loss(unet):
    """The update direction is −∇L: a small step along it decreases L (and 'scale' moves x)."""
    pred = EdgePredictor.for_unet(unet)
    target = outlines(torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    L, _ = edge_loss_and_eps(pred, unet, x, 700, target)
    g = torch.autograd.grad(L.sum(), x)[0]
    with torch.no_grad():
        L2, _ = edge_loss_and_eps(pred, unet, x - 1e-2 * g / g.norm(), 700, target)
    assert bool((L2 < L.detach()).all())
    b, ac = _short()
    kw = dict(alphas_cumprod=ac, timesteps=list(range(9, -1, -1)), x_T=x.detach(), predictor=pred,
              unet=unet, progress=False)
    a = sketch_guidance(lambda v, t: unet(v, t).sample, None, target, scale=0.0,
                        generator=torch.Generator().manual_seed(0), **kw)
    c = sketch_guidance(lambda v, t: unet(v, t).sample, None, target, scale=0.5,
                        generator=torch.Generator().manual_seed(0), **kw)
    assert float((a - c).abs().max()) > 1e-3


def test_bad_input():
    b, ac = _short()
    with pytest.raises(ValueError, match="predictor"):
        sketch_guidance(lambda x, t: x, None, torch.zeros(1, 1, 8, 8), alphas_cumprod=ac)
