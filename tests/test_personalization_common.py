"""The shared core of Part IV: concept images, new tokens, the diffusion loss, the training loop
and the measurement protocol's pieces."""
import numpy as np
import pytest
import torch

from diffnotes.data import shapes as S
from diffnotes.ddpm import q_sample
from diffnotes.personalization import common as C
from diffnotes.personalization import evaluate as E

INSTANCE = dict(shape="star", color="orange", size="large", background="stripes")


@pytest.fixture(scope="module")
def pipe():
    from diffnotes.models.load import load_pipeline
    p = load_pipeline("shapes")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("concept,kind,ph", [("heart", "shape", "<heart>"),
                                             ("purple", "color", "<purple>"),
                                             (INSTANCE, "instance", "sks")])
def test_concept_images_are_the_concept(concept, kind, ph):
    cs = C.concept_images(concept, n=6, seed=3)
    again = C.concept_images(concept, n=6, seed=3)
    assert np.array_equal(cs.images, again.images) and cs.captions == again.captions
    assert cs.kind == kind and cs.placeholder == ph and len(cs) == 6
    assert cs.images.shape == (6, 64, 64, 3) and cs.masks.shape == (6, 64, 64)
    assert all(ph in c.split() for c in cs.captions)
    assert all(ph not in c.split() and cs.class_word in c.split() for c in cs.class_captions)
    for o in cs.objects:
        if kind == "shape":
            assert o["shape"] == "heart" and o["color"] in S.TRAIN_COLORS
        elif kind == "color":
            assert o["color"] == "purple" and o["shape"] in S.TRAIN_SHAPES
        else:
            assert (o["shape"], o["color"], o["size"]) == ("star", "orange", "large")
    # inside each mask the pixels have the object's colour (no jitter in render_objects)
    for im, m, o in zip(cs.images, cs.masks, cs.objects):
        inner = im[m]
        assert np.abs(np.median(inner, 0) - np.asarray(S.COLORS[o["color"]])).max() < 0.02


def test_the_judges_see_the_concept_images_right():
    cs = C.concept_images("heart", n=8, seed=1)
    judged = E.judge_images(cs.images)
    assert [j["shape"] for j in judged] == ["heart"] * 8
    assert [j["color"] for j in judged] == [o["color"] for o in cs.objects]
    purple = E.judge_images(C.concept_images("purple", n=8, seed=1).images)
    assert all(j["color"] == "purple" for j in purple)


@pytest.mark.parametrize("bad,name", [("octagon", "concept"), (dict(shape="star"), "concept"),
                                      (dict(INSTANCE, texture=1), "concept"),
                                      (dict(INSTANCE, color="pink"), "color")])
def test_concept_images_bad_input(bad, name):
    with pytest.raises(ValueError, match=name):
        C.concept_images(bad)


def test_concept_images_bad_count():
    with pytest.raises(ValueError, match="n"):
        C.concept_images("heart", n=0)


def test_add_placeholder_new_rows_only(pipe):
    from diffnotes.models.load import load_pipeline
    p = load_pipeline("shapes")
    before = p.text_encoder.get_input_embeddings().weight.detach().clone()
    star = p.tokenizer.convert_tokens_to_ids("star")
    ids = C.add_placeholder(p, "<heart>", initializer="star", num_vectors=3)
    after = p.text_encoder.get_input_embeddings().weight.detach()
    assert after.shape[0] == before.shape[0] + 3 and ids == list(range(before.shape[0],
                                                                        before.shape[0] + 3))
    assert torch.equal(after[:before.shape[0]], before)
    assert all(torch.equal(after[i], before[star]) for i in ids)
    text = C.expand_placeholder("a red <heart> on the left", "<heart>", 3)
    assert text == "a red <heart> <heart>_1 <heart>_2 on the left"
    enc = p.tokenizer(text).input_ids
    assert enc[3:6] == ids
    assert C.expand_placeholder("a <heart>", "<heart>", 1) == "a <heart>"


def test_add_placeholder_without_initializer_is_the_mean():
    from diffnotes.models.load import load_pipeline
    p = load_pipeline("shapes")
    table = p.text_encoder.get_input_embeddings().weight.detach().clone()
    (i,) = C.add_placeholder(p, "<new>")
    assert torch.allclose(p.text_encoder.get_input_embeddings().weight[i], table.mean(0))


@pytest.mark.parametrize("placeholder,initializer,name", [
    ("heart", "star", "placeholder"), ("<a b>", "star", "placeholder"),
    ("<x>", "zebra", "initializer"), ("<x>", "red star", "initializer")])
def test_add_placeholder_bad_input(placeholder, initializer, name):
    from diffnotes.models.load import load_pipeline
    p = load_pipeline("shapes")
    with pytest.raises(ValueError, match=name):
        C.add_placeholder(p, placeholder, initializer)


def test_add_placeholder_on_the_sd_layout():
    from diffnotes.models.load import load_pipeline
    p = load_pipeline("sd-1.5-layout-tiny")
    (i,) = C.add_placeholder(p, "<heart>")
    assert p.tokenizer("a <heart>", add_special_tokens=False).input_ids[-1] == i
    assert p.text_encoder.get_input_embeddings().weight.shape[0] == len(p.tokenizer)


def test_diffusion_loss_is_eq_1_8(pipe):
    cs = C.concept_images("heart", n=3, seed=0)
    z = C.encode_images(pipe, cs)
    c = C.encode_text(pipe, cs.captions)
    ac = pipe.scheduler.alphas_cumprod
    t = torch.tensor([10, 500, 990])
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = C.diffusion_loss(pipe.unet, z, c, ac, t=t, noise=noise, reduction="none")
        eps = pipe.unet(q_sample(z, t, ac, noise), t, encoder_hidden_states=c).sample
        ones = C.diffusion_loss(pipe.unet, z, c, ac, t=t, noise=noise,
                                pixel_weight=torch.ones(3, 1, 16, 16), reduction="none")
    manual = ((eps - noise) ** 2).flatten(1).mean(1)
    assert torch.allclose(loss, manual, rtol=0, atol=1e-7)
    assert torch.equal(loss, ones)
    with pytest.raises(ValueError, match="pixel_weight"):
        C.diffusion_loss(pipe.unet, z, c, ac, pixel_weight=torch.ones(3, 1, 8, 8))
    with pytest.raises(ValueError, match="cond"):
        C.diffusion_loss(pipe.unet, z, c[:1], ac)


class _Zero(torch.nn.Module):
    """ε_θ ≡ 0 plus a perturbation outside a region, to test the masked loss."""
    def __init__(self, outside=None):
        super().__init__()
        self.outside = outside

    def forward(self, x, t, encoder_hidden_states=None):
        out = torch.zeros_like(x)
        if self.outside is not None:
            out = out + 7.0 * (~self.outside).to(x.dtype)
        return type("O", (), {"sample": out})()


def test_masked_loss_counts_a_quarter_of_the_pixels():
    """Break-A-Scene's test vector: ε = 1, ε_θ = 0, a mask of 25% of the pixels → 0.25; errors
    outside the mask do not count."""
    z = torch.zeros(2, 4, 16, 16)
    m = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    m[:, :, :8, :8] = True
    ac = torch.linspace(0.99, 0.01, 1000)
    noise = torch.ones_like(z)
    cond = torch.zeros(2, 3, 8)
    loss = C.diffusion_loss(_Zero(), z, cond, ac, noise=noise, pixel_weight=m.float(),
                            t=torch.tensor([3, 400]))
    assert loss.item() == 0.25
    perturbed = C.diffusion_loss(_Zero(outside=m.expand_as(z)), z, cond, ac, noise=noise,
                                 pixel_weight=m.float(), t=torch.tensor([3, 400]))
    assert torch.equal(loss, perturbed)


def test_train_loop_trains_only_its_parameters():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, generator=g, requires_grad=True), torch.randn(5, generator=g)
    target = torch.arange(5.0)
    b0 = b.clone()
    res = C.train_loop([a], lambda step: ((a - target) ** 2).sum() + (b * a).sum() * 0,
                       steps=300, lr=0.05, progress=False)
    assert torch.equal(b, b0)
    assert res.losses[-1] < 1e-3 < res.losses[0] and len(res.losses) == 300
    assert res.trained_parameters == 5
    with pytest.raises(ValueError, match="params"):
        C.train_loop([], lambda s: torch.zeros(()), steps=1, lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        C.train_loop([a], lambda s: a.sum(), steps=0, lr=0.1)


def test_concept_prompts_follow_the_protocol():
    cs = C.concept_images("heart", n=2)
    fid = E.concept_prompts(cs, "fidelity", "<heart>", n=40)
    assert [s["prompt"] for s in fid] == ["a <heart>"] * 40
    ed = E.concept_prompts(cs, "editability", "<heart>", n=40)
    assert all(s["expect"]["shape"] == "heart" and s["expect"]["color"] in S.TRAIN_COLORS
               for s in ed)
    assert {s["expect"]["position"] for s in ed} == set(S.POSITIONS)
    assert all(s["expect"]["color"] in s["prompt"] and "<heart>" in s["prompt"] for s in ed)
    purple = C.concept_images("purple", n=2)
    fp = E.concept_prompts(purple, "fidelity", "<purple>", n=10)
    assert {s["expect"]["shape"] for s in fp} == set(S.TRAIN_SHAPES)
    prior = E.concept_prompts(cs, "prior", "<heart>", n=40)
    assert not any("heart" in s["prompt"] or "purple" in s["prompt"] for s in prior)
    with pytest.raises(ValueError, match="row"):
        E.concept_prompts(cs, "speed", "<heart>")


def test_scores_count_every_requested_attribute():
    specs = [dict(prompt="p", expect=dict(shape="heart", color="red")),
             dict(prompt="p", expect=dict(shape="heart", color="blue"))]
    judged = [dict(shape="heart", color="red", area=5), dict(shape="heart", color="red", area=5)]
    s = E._score(specs, judged)
    assert s["shape"] == 1.0 and s["color"] == 0.5 and s["all"] == 0.5 and s["n"] == 2


def test_pipeline_sampler_is_seeded(pipe):
    sample = E.pipeline_sampler(pipe, num_inference_steps=2, batch_size=1)
    a, b = sample(["a red star", "a blue circle"], 5), sample(["a red star", "a blue circle"], 5)
    assert a.shape == (2, 64, 64, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, sample(["a red star", "a blue circle"], 6))
