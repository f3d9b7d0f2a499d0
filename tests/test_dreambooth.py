"""DreamBooth (Ahmad's notes §4.3, eqs 4.1–4.2; Ruiz et al. 2023): λ = 0 is eq 4.1 bitwise, the
split loss equals the hand computation, the prior term vanishes on the frozen model's own
prediction, a frozen text encoder stays bitwise unchanged, class images come from the frozen
model."""
import numpy as np
import pytest
import torch

from diffnotes.models.load import load_pipeline
from diffnotes.personalization.common import concept_images, diffusion_loss, encode_text
from diffnotes.personalization import dreambooth as DB
from diffnotes.personalization.textual_inversion import prepare_images


def _pipe(name="shapes"):
    p = load_pipeline(name)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def heart():
    return concept_images("heart", n=3, seed=0)


@pytest.fixture(scope="module")
def batch(heart):
    pipe = _pipe()
    z = prepare_images(pipe, heart)
    g = torch.Generator().manual_seed(1)
    zc = torch.randn(2, *z.shape[1:], generator=g)
    draws = dict(t=torch.randint(0, 1000, (3,), generator=g), noise=torch.randn(z.shape, generator=g),
                 class_t=torch.randint(0, 1000, (2,), generator=g),
                 class_noise=torch.randn(zc.shape, generator=g))
    c = encode_text(pipe, ["a sks star"] * 3)
    cc = encode_text(pipe, ["a star"] * 2)
    return pipe, z, c, zc, cc, draws


def test_lambda_zero_is_eq_4_1(batch):
    pipe, z, c, zc, cc, d = batch
    ac = pipe.scheduler.alphas_cumprod
    with torch.no_grad():
        eq41 = diffusion_loss(pipe.unet, z, c, ac, t=d["t"], noise=d["noise"])
        eq42 = DB.dreambooth_loss(pipe.unet, z, c, zc, cc, ac, 0.0, **d)
        no_class = DB.dreambooth_loss(pipe.unet, z, c, None, None, ac, 0.0, t=d["t"],
                                      noise=d["noise"])
    assert torch.equal(eq42, eq41) and torch.equal(no_class, eq41)


def test_split_loss_is_hand_computation(batch):
    pipe, z, c, zc, cc, d = batch
    ac = pipe.scheduler.alphas_cumprod
    lam = 0.7
    with torch.no_grad():
        loss, a, b = DB.dreambooth_loss(pipe.unet, z, c, zc, cc, ac, lam, return_terms=True, **d)
        s = ac[d["t"]].sqrt().view(-1, 1, 1, 1)
        x = s * z + (1 - ac[d["t"]]).sqrt().view(-1, 1, 1, 1) * d["noise"]
        sc = ac[d["class_t"]].sqrt().view(-1, 1, 1, 1)
        xc = sc * zc + (1 - ac[d["class_t"]]).sqrt().view(-1, 1, 1, 1) * d["class_noise"]
        e = pipe.unet(x, d["t"], encoder_hidden_states=c).sample
        ec = pipe.unet(xc, d["class_t"], encoder_hidden_states=cc).sample
        hand = ((e - d["noise"]) ** 2).mean() + lam * ((ec - d["class_noise"]) ** 2).mean()
        combined = DB.prior_preservation_loss(e, d["noise"], ec, d["class_noise"], lam)
    assert torch.allclose(loss, hand, rtol=1e-5, atol=0)
    assert torch.allclose(combined, hand, rtol=1e-6, atol=0)
    assert torch.allclose(loss, a + lam * b, rtol=1e-6)
    # identical instance and class batches: (1 + λ) × the single term
    with torch.no_grad():
        same = DB.dreambooth_loss(pipe.unet, z, c, z, c, ac, lam, t=d["t"], noise=d["noise"],
                                  class_t=d["t"], class_noise=d["noise"])
        single = diffusion_loss(pipe.unet, z, c, ac, t=d["t"], noise=d["noise"])
    assert torch.allclose(same, (1 + lam) * single, rtol=1e-6)


def test_prior_term_zero_on_frozen_prediction(batch):
    pipe, z, c, zc, cc, d = batch
    ac = pipe.scheduler.alphas_cumprod
    with torch.no_grad():
        xc = ac[d["class_t"]].sqrt().view(-1, 1, 1, 1) * zc + \
            (1 - ac[d["class_t"]]).sqrt().view(-1, 1, 1, 1) * d["class_noise"]
        own = pipe.unet(xc, d["class_t"], encoder_hidden_states=cc).sample
        _, _, prior = DB.dreambooth_loss(pipe.unet, z, c, zc, cc, ac, 1.0, class_target=own,
                                         return_terms=True, **d)
    assert prior.item() == 0.0


def test_frozen_text_encoder_and_full_unet_update(heart):
    pipe = _pipe()
    te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    vae = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    inst, cls, ph = DB.dreambooth_prompts(heart)
    assert inst[0] == "a sks star" and cls[0] == "a star" and ph == "sks star"
    n_tok = len(pipe.tokenizer)
    res = DB.dreambooth(pipe, heart, inst, cls, num_class_images=2, class_inference_steps=2,
                        steps=2, lr=1e-3, batch_size=2, progress=False)
    assert len(pipe.tokenizer) == n_tok           # [V] is an existing word, no new token
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, te[k]), k
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(v, vae[k]), k
    changed = [not torch.equal(v, unet[k]) for k, v in pipe.unet.state_dict().items()
               if v.dtype.is_floating_point]
    assert np.mean(changed) > 0.9                  # a full fine-tune: (almost) every tensor moves
    assert res.trained_parameters == sum(p.numel() for p in pipe.unet.parameters())
    assert len(res.extra["prior"]) == 2 and all(p > 0 for p in res.extra["prior"])
    # the class images are the frozen model's samples
    ref = DB.generate_class_images(_pipe(), ["a star"], 2, num_inference_steps=2, seed=1)
    assert np.array_equal(res.extra["class_images"], ref)


def test_train_text_encoder_moves_it(heart):
    pipe = _pipe()
    w0 = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    DB.dreambooth(pipe, heart, "a sks star", "a star", prior_loss_weight=0.0, steps=2,
                  lr=1e-3, batch_size=2, train_text_encoder=True, progress=False)
    w = pipe.text_encoder.get_input_embeddings().weight
    sks = pipe.tokenizer.convert_tokens_to_ids("sks")
    assert not torch.equal(w[sks], w0[sks])    # [V]'s row is trained only in this mode


def test_bad_input(heart):
    pipe = _pipe()
    with pytest.raises(ValueError, match="images"):
        DB.dreambooth(pipe, np.zeros((0, 64, 64, 3), np.float32), "a sks star", "a star",
                      progress=False)
    with pytest.raises(ValueError, match="images"):
        DB.dreambooth(pipe, np.zeros((2, 48, 48, 3), np.float32), "a sks star", "a star",
                      progress=False)
    with pytest.raises(ValueError, match="prior_loss_weight"):
        DB.dreambooth(pipe, heart, "a sks star", "a star", prior_loss_weight=-1, progress=False)
    with pytest.raises(ValueError, match="instance_prompt"):
        DB.dreambooth(pipe, heart, "a sks zebra", "a star", progress=False)
    with pytest.raises(ValueError, match="class_prompt"):
        DB.dreambooth(pipe, heart, "a sks star", ["a star", "a star"], progress=False)
    with pytest.raises(ValueError, match="num_class_images"):
        DB.dreambooth(pipe, heart, "a sks star", "a star", num_class_images=0, progress=False)


def test_runs_on_sd15_layout():
    pipe = _pipe("sd-1.5-layout-tiny")
    ims = np.random.default_rng(0).random((1, 320, 320, 3)).astype(np.float32)
    te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    res = DB.dreambooth(pipe, ims, "a photo of sks dog", "a photo of a dog",
                        num_class_images=1, class_inference_steps=1, steps=1, batch_size=1,
                        progress=False)
    assert np.isfinite(res.losses).all()
    assert all(torch.equal(v, te[k]) for k, v in pipe.text_encoder.state_dict().items())
