"""Tests of the shipped digits models (diffnotes.models.digits). No training here."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from diffnotes.ddpm import q_sample
from diffnotes.models import digits as D


# ---------------------------------------------------------------------------- data, schedule
def test_data_split_shapes_range_and_disjointness():
    xtr, ytr = D.load_digits_data("train")
    xte, yte = D.load_digits_data("test")
    xall, yall = D.load_digits_data("all")
    S = D.IMAGE_SIZE
    assert xtr.shape[1:] == (1, S, S) and xtr.dtype == torch.float32 and ytr.dtype == torch.long
    assert len(xtr) + len(xte) == len(xall) == 1797
    assert float(xall.min()) >= -1 and float(xall.max()) <= 1
    # background is -1, strokes reach (close to) +1
    assert float(xall.min()) == -1.0 and float(xall.max()) > 0.9
    # the split is a partition of the full set: no test image appears in train
    flat_tr = {tuple(v.tolist()) for v in xtr.flatten(1)[:, ::3]}
    overlap = sum(tuple(v.tolist()) in flat_tr for v in xte.flatten(1)[:, ::3])
    assert overlap <= 2   # a couple of genuine duplicate digits exist in the data set
    # stratified: every class present in the test split in roughly its share
    counts = torch.bincount(yte, minlength=10)
    assert int(counts.min()) >= 30
    # fixed: the same call gives the same split
    assert torch.equal(D.load_digits_data("test")[1], yte)
    with pytest.raises(ValueError, match="split"):
        D.load_digits_data("validation")


def test_schedule_is_ddpm_linear_like_diffusers():
    from diffusers import DDPMScheduler

    betas, ac = D.schedule()
    sch = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    assert betas.dtype == ac.dtype == torch.float64 and ac.shape == (1000,)
    assert torch.allclose(ac.float(), sch.alphas_cumprod, atol=1e-6)


# ---------------------------------------------------------------------------- the UNet
def test_shipped_unet_loads_through_from_pretrained(digits_unet):
    from diffusers import UNet2DModel

    assert isinstance(digits_unet, UNet2DModel)
    assert digits_unet.config.num_class_embeds == D.NUM_CLASSES + 1 == 11
    assert digits_unet.config.sample_size == D.IMAGE_SIZE
    files = {p.name for p in D.UNET_DIR.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= files
    total = sum(p.stat().st_size for p in D.WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total < 5 * 2 ** 20, f"shipped digits weights take {total / 2**20:.2f} MiB"
    # a fresh model is NOT the shipped one (the weights were really loaded)
    fresh = D.build_unet()
    w_fresh = dict(fresh.named_parameters())
    assert any(not torch.equal(p, w_fresh[n]) for n, p in digits_unet.named_parameters())


def test_heldout_eps_loss_far_below_predicting_zero(digits_unet):
    x, y = D.load_digits_data("test")
    _, ac = D.schedule()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    t = 500
    x_t = q_sample(x, t, ac, noise)
    with torch.no_grad():
        eps = D.digits_eps_model(digits_unet, y)(x_t, t)
    loss = torch.mean((noise - eps) ** 2).item()
    zero_loss = torch.mean(noise ** 2).item()        # the loss of ε̂ = 0, ≈ 1
    assert 0.95 < zero_loss < 1.05
    assert loss < 0.1 * zero_loss, f"held-out eps loss {loss:.3f} vs zero predictor {zero_loss:.3f}"
    # the label helps: the conditional model predicts ε at least as well as the null class
    with torch.no_grad():
        eps_u = D.digits_eps_model(digits_unet, None)(x_t, t)
    loss_u = torch.mean((noise - eps_u) ** 2).item()
    assert loss <= loss_u + 1e-3


def test_cond_uncond_is_one_batched_pass_equal_to_two_passes(digits_unet):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, D.IMAGE_SIZE, D.IMAGE_SIZE, generator=g)
    y = torch.tensor([0, 3, 3, 7, 9])
    t = torch.tensor([10, 200, 500, 800, 999])
    calls = []
    hook = digits_unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            eps_u, eps_c = D.digits_cond_uncond(digits_unet)(x, t, y)
    finally:
        hook.remove()
    assert calls == [10]                      # one forward call on 2B rows
    with torch.no_grad():
        ref_u = D.digits_eps_model(digits_unet)(x, t)
        ref_c = D.digits_eps_model(digits_unet, y)(x, t)
    assert torch.allclose(eps_u, ref_u, atol=1e-5) and torch.allclose(eps_c, ref_c, atol=1e-5)
    assert not torch.allclose(eps_u, eps_c, atol=1e-3)    # the label changes the prediction
    # an int label broadcasts like a full tensor of it
    with torch.no_grad():
        a = D.digits_eps_model(digits_unet, 3)(x, 500)
        b = D.digits_eps_model(digits_unet, torch.full((5,), 3))(x, torch.full((5,), 500))
    assert torch.allclose(a, b, atol=1e-6)
    # float64 input gives float64 output
    with torch.no_grad():
        assert D.digits_eps_model(digits_unet, 3)(x.double(), 500).dtype == torch.float64


def test_seeded_samples_are_deterministic_and_seed_dependent(digits_unet):
    y = torch.arange(4)
    s1 = D.sample_digits(digits_unet, y, 2.0, num_steps=10, generator=torch.Generator().manual_seed(0))
    s2 = D.sample_digits(digits_unet, y, 2.0, num_steps=10, generator=torch.Generator().manual_seed(0))
    s3 = D.sample_digits(digits_unet, y, 2.0, num_steps=10, generator=torch.Generator().manual_seed(1))
    assert s1.shape == (4, 1, D.IMAGE_SIZE, D.IMAGE_SIZE)
    assert torch.equal(s1, s2)
    assert (s1 - s3).abs().max() > 0.1


def test_unconditional_samples_with_y_none(digits_unet):
    """``y=None`` (the null class) gives one unconditional sample, or one per row of x_T; it
    equals plain DDIM on ε_θ(x_t, t, ∅) (guidance needs a class, so the scale does not matter)."""
    from diffnotes.ddim import ddim_sample
    from diffnotes.schedules import make_timesteps
    one = D.sample_digits(digits_unet, None, num_steps=5, generator=torch.Generator().manual_seed(0))
    assert one.shape == (1, 1, D.IMAGE_SIZE, D.IMAGE_SIZE)
    x_T = torch.randn(3, 1, D.IMAGE_SIZE, D.IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    got = D.sample_digits(digits_unet, None, 3.0, num_steps=5, x_T=x_T)
    want = ddim_sample(D.digits_eps_model(digits_unet, None), x_T, make_timesteps(5, D.T),
                       D.schedule()[1]).clamp(-1, 1)
    assert torch.equal(got, want)


def test_cfg_sampling_calls_the_library_cfg(digits_unet, monkeypatch):
    """One implementation of eq 1.44: sample_digits combines ε_u and ε_c with guidance.cfg."""
    import diffnotes.guidance as G
    calls = []
    monkeypatch.setattr(D, "cfg", lambda u, c, s: calls.append(s) or G.cfg(u, c, s))
    D.sample_digits(digits_unet, torch.arange(2), 2.5, num_steps=3,
                    generator=torch.Generator().manual_seed(0))
    assert calls == [2.5] * 3


def test_guided_samples_are_the_requested_digits(digits_unet, digits_clf):
    y = torch.arange(10).repeat(2)
    x = D.sample_digits(digits_unet, y, 3.0, num_steps=20, generator=torch.Generator().manual_seed(0))
    acc = D.classifier_accuracy(digits_clf, x, y)
    assert acc >= 0.8, f"classifier agrees with the requested class on {acc:.0%} of CFG samples"


@pytest.mark.parametrize("bad", [11, -1, 2.0, "3", True, torch.tensor([1.0, 2.0]),
                                 torch.tensor([[1, 2]]), torch.tensor([0, 12])])
def test_eps_model_rejects_bad_y(digits_unet, bad):
    with pytest.raises(ValueError, match=r"\by\b"):
        D.digits_eps_model(digits_unet, bad)
    x = torch.zeros(2, 1, D.IMAGE_SIZE, D.IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"\by\b"):
        D.digits_cond_uncond(digits_unet)(x, 10, bad)


def test_eps_model_rejects_bad_batch_x_and_t(digits_unet):
    x = torch.zeros(2, 1, D.IMAGE_SIZE, D.IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"\by\b"):
        D.digits_eps_model(digits_unet, torch.tensor([1, 2, 3]))(x, 10)   # 3 labels, 2 rows
    with pytest.raises(ValueError, match=r"\bx\b"):
        D.digits_eps_model(digits_unet, 1)(torch.zeros(2, 1, D.IMAGE_SIZE, D.IMAGE_SIZE + 1), 10)
    with pytest.raises(ValueError, match=r"\bt\b"):
        D.digits_eps_model(digits_unet, 1)(x, 1000)
    with pytest.raises(ValueError, match=r"\by\b"):
        D.digits_cond_uncond(digits_unet)(x, 10, None)


# ---------------------------------------------------------------------------- the classifier
def test_classifier_clean_accuracy_and_noise_conditioning(digits_clf):
    x, y = D.load_digits_data("test")
    acc0 = D.classifier_accuracy(digits_clf, x, y, t=0)
    assert acc0 >= 0.9, f"clean test accuracy {acc0:.3f}"
    accs = [D.classifier_accuracy(digits_clf, x, y, t=t, generator=torch.Generator().manual_seed(0))
            for t in (300, 600, 999)]
    # information about the class is destroyed as t grows: accuracy falls toward chance (0.1)
    assert acc0 >= accs[0] - 0.02 and accs[0] > accs[2]
    assert accs[2] < 0.25, f"accuracy at t=999 is {accs[2]:.3f}, chance is 0.1"
    logits = digits_clf(x[:4], 0)
    assert logits.shape == (4, D.NUM_CLASSES)


def test_classifier_input_gradient_flows_and_bad_input_raises(digits_clf):
    x, y = D.load_digits_data("test")
    x = x[:3].clone().requires_grad_(True)
    logp = torch.log_softmax(digits_clf(x, torch.tensor([100, 100, 100])), -1)
    logp[torch.arange(3), y[:3]].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\bx\b"):
        digits_clf(torch.zeros(2, 1, D.IMAGE_SIZE + 1, D.IMAGE_SIZE), 0)
    with pytest.raises(ValueError, match=r"\bt\b"):
        digits_clf(torch.zeros(2, 1, D.IMAGE_SIZE, D.IMAGE_SIZE), -1)


def test_upsample_keeps_range_and_reproduces_the_mean():
    x, _ = D.load_digits_data("test")
    up = D.upsample(x[:8], 32)
    assert up.shape == (8, 1, 32, 32)
    assert float(up.min()) >= -1 and float(up.max()) <= 1
    # an integer-factor bilinear enlargement (align_corners=False) preserves the mean
    assert torch.allclose(up.mean((1, 2, 3)), x[:8].mean((1, 2, 3)), atol=1e-5)
    with pytest.raises(ValueError, match="size"):
        D.upsample(x[:2], 0)
