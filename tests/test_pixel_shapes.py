"""The pixel-space shapes model (diffnotes.models.pixel_shapes): data, schedule, UNet, loading."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffnotes.data.shapes import generate_scenes
from diffnotes.models import pixel_shapes as P


def test_scenes_are_the_generators_renders_pooled():
    x, sc = P.scenes(6, seed=3)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    ref = generate_scenes(6, seed=3)
    img = torch.from_numpy(ref.images).permute(0, 3, 1, 2)
    torch.testing.assert_close(x, F.avg_pool2d(img, 2) * 2 - 1, rtol=0, atol=1e-6)
    assert sc.captions == ref.captions
    # masks and boxes at 32×32: each box is the bounding box of its mask, empty slots -1
    assert sc.masks32.shape == (6, 3, 32, 32)
    for i in range(6):
        for k in range(3):
            m = sc.masks32[i, k]
            if k < sc.n_objects[i]:
                ys, xs = np.nonzero(m)
                assert tuple(sc.boxes32[i, k]) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                # the 32² box is the 64² box halved (within a pixel)
                assert np.abs(sc.boxes32[i, k] - sc.boxes[i, k] / 2).max() <= 1
            else:
                assert not m.any() and (sc.boxes32[i, k] == -1).all()


def test_held_out_scenes_are_fixed_and_not_training_scenes():
    a, _ = P.scenes(4)
    b, _ = P.scenes(4, seed=P.TEST_SEED)
    assert torch.equal(a, b)
    train = P._training_data(8, seed=0)
    test = ((a + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    assert not any(torch.equal(t, s) for t in train for s in test)


def test_schedule_is_diffusers_ddpm_linear():
    s = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    torch.testing.assert_close(P.betas().float(), s.betas, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(P.alphas_cumprod().float(), s.alphas_cumprod, rtol=1e-5,
                               atol=1e-7)
    assert P.alphas_cumprod().dtype == torch.float64 and len(P.alphas_cumprod()) == P.T


def test_unet_is_small_and_eps_model_keeps_dtype():
    unet = P.build_unet()
    n = sum(p.numel() for p in unet.parameters())
    assert n * 4 <= 10e6                        # ≤ 10 MB as float32
    f = P.eps_model(unet)                        # float32 network, float64 input
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = f(x, 500)
        assert out.shape == x.shape and out.dtype == torch.float64
        assert torch.equal(out, unet(x.float(), torch.tensor([500])).sample.double())
        # conditioning by concatenation (SR3): a 6-channel UNet sees cat[x, cond]
        u6 = P.build_unet(in_channels=6)
        c = torch.randn(1, 3, 32, 32)
        assert torch.equal(P.eps_model(u6, cond=c)(x.float(), 7),
                           u6(torch.cat([x.float(), c], 1), torch.tensor([7])).sample)
    with pytest.raises(ValueError, match="t"):
        f(x, 1000)


def test_judges_on_real_pooled_scenes():
    """The judges' ceiling: on real held-out scenes pooled to 32² (and upsampled back for the
    judges) they find the objects and their colours."""
    x, sc = P.scenes(8, seed=5, textured=False)
    q = P.judged_quality(x)
    assert q["with_object"] == 1.0
    assert q["on_palette"] >= 0.8
    found = P.judge(x)
    largest = [objs[0]["color"] for objs in found]
    true = []
    for i in range(8):
        areas = sc.masks[i].reshape(3, -1).sum(1)
        true.append(sc.objects[i][int(np.argmax(areas))]["color"])
    assert np.mean([a == b for a, b in zip(largest, true)]) >= 0.8


@pytest.mark.skipif(not P.weights_available(), reason="weights not trained yet")
def test_shipped_weights_load_with_from_pretrained():
    unet = P.load()
    assert unet.config.in_channels == 3 and tuple(unet.config.block_out_channels) == \
        tuple(P.UNET_CONFIG["block_out_channels"])
    assert not any(p.requires_grad for p in unet.parameters())
    size = (P.WEIGHTS_DIR / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size <= 10e6
    log = json.loads((P.WEIGHTS_DIR / "TRAINING.json").read_text())
    for key in ("command", "wall_seconds", "cpu_seconds_rank0", "threads_per_process", "steps",
                "date", "settings"):
        assert key in log
    # the trained model denoises held-out scenes far better than predicting zero noise
    x, _ = P.scenes(8)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    from diffnotes.ddpm import q_sample
    xt = q_sample(x, 300, P.alphas_cumprod().float(), noise)
    with torch.no_grad():
        err = ((P.eps_model(unet)(xt, 300) - noise) ** 2).mean().item()
    assert err < 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="n"):
        P.scenes(0)
    with pytest.raises(ValueError, match="x"):
        P.to_images(torch.zeros(3, 32, 32))
    with pytest.raises(FileNotFoundError):
        P.load(path="/nonexistent/dir")


@pytest.mark.skipif(not P.weights_available(), reason="weights not trained yet")
def test_sr3_initialised_from_the_prior_is_the_prior():
    """Zero kernels for the condition channels: before training, the 6-channel SR3 network is
    exactly the unconditional pixel model, whatever the condition."""
    from diffnotes.restoration.sr3 import build_sr3_unet
    u6, u3 = build_sr3_unet(init_from_prior=True), P.load()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    c = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(P.eps_model(u6, cond=c)(x, 300), P.eps_model(u3)(x, 300),
                                   rtol=1e-5, atol=1e-6)
