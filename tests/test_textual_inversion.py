"""Textual Inversion (Ahmad's notes §4.4.1; Gal et al. 2023): only the new rows change, the
diffusers file round trip, the variants (multi-vector, progressive, regularised, per-image)."""
import numpy as np
import pytest
import torch

from diffnotes.models.load import load_pipeline
from diffnotes.personalization.common import concept_images, diffusion_loss, encode_text
from diffnotes.personalization import textual_inversion as TI


def _pipe(name="shapes"):
    p = load_pipeline(name)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def heart():
    return concept_images("heart", n=3, seed=0)


def _snapshot(pipe):
    return {f"{m}.{k}": v.detach().clone()
            for m in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, m).state_dict().items()}


def _assert_only_rows_changed(pipe, before, new_ids):
    emb_key = [k for k in before if k.endswith("token_embedding.weight")]
    assert len(emb_key) == 1
    after = _snapshot(pipe)
    for k, v in before.items():
        if k == emb_key[0]:
            continue
        assert torch.equal(after[k], v), k
    old, new = before[emb_key[0]], after[emb_key[0]]
    keep = torch.ones(len(new), dtype=torch.bool)
    keep[new_ids] = False
    assert torch.equal(new[keep], old[keep])
    assert not torch.equal(new[new_ids], old[new_ids])


def test_templates_transcribed():
    assert len(TI.SINGLE_TEMPLATES) == 11 and len(set(TI.SINGLE_TEMPLATES)) == 11
    assert len(TI.DUAL_TEMPLATES) == 9 and len(set(TI.DUAL_TEMPLATES)) == 9
    assert all(t.count("{}") == 1 for t in TI.SINGLE_TEMPLATES)
    assert all(t.count("{}") == 2 for t in TI.DUAL_TEMPLATES)
    assert TI.SINGLE_TEMPLATES[0].format("<x>") == "a photo of a <x>"
    # the dual list is the single list's first nine with " with {}"
    assert [t.replace(" with {}", "") for t in TI.DUAL_TEMPLATES] == list(TI.SINGLE_TEMPLATES[:9])
    # on the shapes model: short templates whose every word is in its vocabulary
    pipe = _pipe()
    vocab = pipe.tokenizer.get_vocab()
    for dual in (False, True):
        tpl = TI.default_templates(pipe, dual=dual)
        assert tpl in (TI.SHAPES_TEMPLATES, TI.SHAPES_DUAL_TEMPLATES)
        assert all(w in vocab for t in tpl for w in t.replace("{}", " ").split())
    assert "rendering" not in vocab     # why the paper's templates do not fit there


def test_progressive_schedule():
    got = [TI.active_vectors(s, (2000, 4000)) for s in (0, 1999, 2000, 3999, 4000)]
    assert got == [1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="schedule"):
        TI.active_vectors(3, (4000, 2000))


def test_regularizer_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(8, generator=g, dtype=torch.float64)
    d = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    lam = 0.3
    assert TI.embedding_regularizer(e[None].clone(), e, lam).item() == 0.0
    r = TI.embedding_regularizer(d, e, lam)
    assert torch.allclose(r, lam * ((d - e) ** 2).sum())
    r.backward()
    assert torch.allclose(d.grad, 2 * lam * (d.detach() - e), atol=1e-12)


def test_adamw_with_masked_gradient_still_moves_frozen_rows():
    """Why the rows are restored and not only the gradient masked: AdamW's decoupled weight
    decay moves every row, gradient or not."""
    table = torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))
    before = table.detach().clone()
    opt = torch.optim.AdamW([table], lr=0.1, weight_decay=0.1)
    grad = torch.zeros_like(table)
    grad[4] = 1.0                       # only the "new" row has a gradient
    table.grad = grad
    opt.step()
    assert not torch.equal(table.detach()[:4], before[:4])


def test_only_new_rows_change(heart):
    pipe = _pipe()
    before_tokens = len(pipe.tokenizer)
    res = TI.textual_inversion(pipe, heart, placeholder="<heart>", initializer="star", steps=3,
                               lr=0.1, num_vectors=2, weight_decay=0.1, batch_size=2,
                               progress=False)
    assert len(pipe.tokenizer) == before_tokens + 2
    assert res.tokens == ["<heart>", "<heart>_1"]
    # the whole state, bitwise, against a fresh copy of the model with the same two new rows
    ref = _pipe()
    from diffnotes.personalization.common import add_placeholder
    ids = add_placeholder(ref, "<heart>", "star", 2)
    assert ids == res.token_ids
    before = _snapshot(ref)
    _assert_only_rows_changed(pipe, before, res.token_ids)
    # the initial rows were the initializer's embedding
    star = ref.tokenizer.convert_tokens_to_ids("star")
    w = ref.text_encoder.get_input_embeddings().weight
    assert torch.equal(res.initial, w[[star, star]])
    assert res.trained_parameters == 2 * w.shape[1]
    assert all(not p.requires_grad for p in pipe.text_encoder.parameters())


def test_loss_decreases_on_fixed_batch(heart):
    pipe = _pipe()
    res = TI.textual_inversion(pipe, heart, steps=1, lr=1e-9, progress=False)   # adds the token
    from diffnotes.personalization.textual_inversion import prepare_images
    z = prepare_images(pipe, heart)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(100, 900, (len(z),), generator=g)
    noise = torch.randn(z.shape, generator=g)
    ac = pipe.scheduler.alphas_cumprod
    table = pipe.text_encoder.get_input_embeddings().weight
    row = res.token_ids[0]

    def loss():
        return diffusion_loss(pipe.unet, z, encode_text(pipe, heart.captions, grad=True), ac,
                              t=t, noise=noise)
    start = float(loss())
    d = torch.nn.Parameter(table[row].detach().clone())
    opt = torch.optim.Adam([d], lr=0.05)
    for _ in range(15):
        with torch.no_grad():
            table[row] = d.detach()
        table.requires_grad_(True)
        lo = loss()
        lo.backward()
        d.grad = table.grad[row].clone()
        table.grad = None
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        table[row] = d.detach()
        end = float(loss())
    assert end < start


def test_diffusers_round_trip(heart, tmp_path):
    pipe = _pipe()
    res = TI.textual_inversion(pipe, heart, steps=2, lr=0.1, num_vectors=2, progress=False)
    path = tmp_path / "learned_embeds.safetensors"
    size = TI.save_textual_inversion(path, res)
    assert size == path.stat().st_size > 2 * 64 * 4
    fresh = _pipe()
    n0 = len(fresh.tokenizer)
    fresh.load_textual_inversion(str(path))         # diffusers' own loader
    assert len(fresh.tokenizer) == n0 + 2
    ids = fresh.tokenizer.convert_tokens_to_ids(res.tokens)
    assert ids == res.token_ids
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[ids], res.embeddings)
    kw = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np")
    prompt = "a <heart> <heart>_1"
    a = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    b = fresh(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    assert np.array_equal(a, b)


def test_progressive_rows_switch_on(heart):
    pipe = _pipe()
    res = TI.textual_inversion(pipe, heart, steps=3, lr=0.1, progressive=(2, 10),
                               batch_size=2, progress=False)
    assert res.tokens == ["<heart>", "<heart>_1", "<heart>_2"]
    moved = [(res.embeddings[k] != res.initial[k]).any().item() for k in range(3)]
    assert moved == [True, True, False]      # vector 2 from step 2; vector 3 never active


def test_regularised_and_per_image(heart):
    pipe = _pipe()
    res = TI.textual_inversion(pipe, heart, steps=2, lr=0.1, reg_weight=1.0, per_image=True,
                               batch_size=2, progress=False)
    assert res.image_tokens == ["<heart>_img0", "<heart>_img1", "<heart>_img2"]
    assert res.image_embeddings.shape == (3, 64)
    assert res.trained_parameters == 4 * 64
    with pytest.raises(ValueError, match="reg_word"):
        TI.textual_inversion(_pipe(), heart, steps=1, reg_weight=1.0, reg_word="zebra",
                             progress=False)


def test_bad_input(heart):
    pipe = _pipe()
    with pytest.raises(ValueError, match="images"):
        TI.textual_inversion(pipe, np.zeros((0, 64, 64, 3), np.float32), captions=[],
                             progress=False)
    with pytest.raises(ValueError, match="images"):
        TI.textual_inversion(pipe, np.zeros((2, 32, 32, 3), np.float32), progress=False)
    with pytest.raises(ValueError, match="images"):
        TI.textual_inversion(pipe, torch.zeros(2, 4, 64, 64), progress=False)
    with pytest.raises(ValueError, match="placeholder"):
        TI.textual_inversion(pipe, heart, placeholder="star", progress=False)
    with pytest.raises(ValueError, match="initializer"):
        TI.textual_inversion(pipe, heart, initializer="zebra", progress=False)
    with pytest.raises(ValueError, match="captions"):
        TI.textual_inversion(pipe, heart.images, captions=["a star"] * 3, progress=False)
    with pytest.raises(ValueError, match="steps"):
        TI.textual_inversion(pipe, heart, steps=0, progress=False)
    with pytest.raises(ValueError, match="progressive"):
        TI.textual_inversion(pipe, heart, progressive=(5, 2), progress=False)


def test_runs_on_sd15_layout():
    pipe = _pipe("sd-1.5-layout-tiny")
    ims = np.random.default_rng(0).random((2, 320, 320, 3)).astype(np.float32)
    before = _snapshot(pipe)
    res = TI.textual_inversion(pipe, ims, placeholder="<cat>", initializer="cat",
                               templates=TI.SINGLE_TEMPLATES[:3], steps=2, lr=0.1,
                               batch_size=1, progress=False)
    emb_key = [k for k in before if k.endswith("token_embedding.weight")][0]
    after = _snapshot(pipe)
    for k, v in before.items():
        if k != emb_key:
            assert torch.equal(after[k], v), k
    old = before[emb_key]
    assert torch.equal(after[emb_key][:len(old)], old)
    assert not torch.equal(res.embeddings, res.initial)


def test_array_images_with_default_templates(heart):
    pipe = _pipe()
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    res = TI.textual_inversion(pipe, heart.images, steps=2, lr=0.1, batch_size=2,
                               progress=False)          # no captions: the shapes templates
    w = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(w[:len(before)], before)
    assert not torch.equal(res.embeddings, res.initial)
