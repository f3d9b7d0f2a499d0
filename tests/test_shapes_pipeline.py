"""Tests of the shipped tiny text-to-image pipeline (diffnotes/weights/shapes) and its loader.

Nothing here contacts a model hub (HF_HUB_OFFLINE=1 from conftest; the Stable Diffusion paths are
exercised with ``from_pretrained`` monkeypatched or in offline mode).
"""
import json
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffnotes.models import load as L  # noqa: E402
from diffnotes.models import shapes as M  # noqa: E402

pytestmark = pytest.mark.skipif(not (L.SHAPES_DIR / "model_index.json").exists(),
                                reason="shipped shapes weights missing")


@pytest.fixture(scope="module")
def pipe():
    return L.load_pipeline("shapes")


def test_loads_with_diffusers_from_pretrained():
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel
    p = StableDiffusionPipeline.from_pretrained(str(L.SHAPES_DIR), safety_checker=None,
                                                requires_safety_checker=False, local_files_only=True)
    assert isinstance(p.vae, AutoencoderKL) and isinstance(p.unet, UNet2DConditionModel)
    assert isinstance(p.text_encoder, CLIPTextModel) and isinstance(p.scheduler, DDIMScheduler)
    assert p.scheduler.config.beta_schedule == "scaled_linear"
    assert p.vae_scale_factor == 4 and p.vae.config.latent_channels == 4
    # 64×64×3 image ↔ 16×16×4 latent
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = p.vae.encode(x).latent_dist.mean
        assert z.shape == (1, 4, 16, 16)
        assert p.vae.decode(z).sample.shape == (1, 3, 64, 64)
    assert p.vae.config.scaling_factor != 1.0  # set from the latents' std after training


def test_cross_attention_at_16_and_8(pipe):
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
            if encoder_hidden_states is not None:
                seen.append((hidden_states.shape[1], encoder_hidden_states.shape[1]))
            return self.inner(attn, hidden_states, encoder_hidden_states, **kw)

    unet = pipe.unet
    old = unet.attn_processors
    unet.set_attn_processor({k: Spy(v) for k, v in old.items()})
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, M.MAX_LENGTH, unet.config.cross_attention_dim))
    finally:
        unet.set_attn_processor(old)
    assert {q for q, _ in seen} == {256, 64}
    assert all(k == M.MAX_LENGTH for _, k in seen)


def test_tokenizer_adds_start_end_and_pads(pipe):
    tok = pipe.tokenizer
    assert tok.model_max_length == M.MAX_LENGTH
    vocab = M.vocabulary()
    ids = tok("A small red circle on the left", padding="max_length",
              max_length=tok.model_max_length, truncation=True).input_ids
    words = ["a", "small", "red", "circle", "on", "the", "left"]
    expected = ([vocab.index("<|startoftext|>")] + [vocab.index(w) for w in words]
                + [vocab.index("<|endoftext|>")] * (M.MAX_LENGTH - len(words) - 1))
    assert ids == expected
    # unknown words map to the unk token; held-out words are in the vocabulary
    ids = tok("a zebra heart purple").input_ids
    assert ids[2] == tok.unk_token_id == vocab.index("<|unk|>")
    assert ids[3] == vocab.index("heart") != tok.unk_token_id
    assert ids[4] == vocab.index("purple") != tok.unk_token_id
    # the empty prompt (classifier-free guidance) is <start> <end> <pad>...
    empty = tok("", padding="max_length", max_length=M.MAX_LENGTH).input_ids
    assert empty[0] == tok.bos_token_id and set(empty[1:]) == {tok.eos_token_id}


def test_long_prompt_truncates_with_warning(pipe):
    records = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = H(level=logging.WARNING)
    logging.getLogger("diffusers").addHandler(h)
    try:
        prompt = " and ".join(["a small red circle on the left"] * 6)  # 47 words
        emb, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    finally:
        logging.getLogger("diffusers").removeHandler(h)
    assert emb.shape == (1, M.MAX_LENGTH, pipe.text_encoder.config.hidden_size)
    assert any("truncated" in r for r in records), records


def test_unknown_model_name_raises_listing_known_names():
    with pytest.raises(ValueError, match="sd-1.5") as err:
        L.load_pipeline("sd-3")
    assert "shapes" in str(err.value) and "sd-2.1-base" in str(err.value)
    with pytest.raises(ValueError, match="scheduler"):
        L.load_pipeline("shapes", scheduler="euler")


@pytest.mark.parametrize("name", ["sd-1.5", "sd-2.1-base"])
def test_stable_diffusion_without_weights_gives_one_clear_error(monkeypatch, name):
    import diffusers
    from huggingface_hub.errors import LocalEntryNotFoundError
    tried = []

    def fake_from_pretrained(repo, **kwargs):
        tried.append(repo)
        raise LocalEntryNotFoundError("offline: cannot find the requested files in the cache")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", fake_from_pretrained)
    with pytest.raises(L.WeightsUnavailableError) as err:
        L.load_pipeline(name)
    msg = str(err.value)
    assert isinstance(err.value, OSError)
    assert f"'{name}'" in msg and "not available on this machine" in msg
    assert "GPU" in msg and "MODEL='shapes'" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert tried == list(L.KNOWN_MODELS[name])


def test_stable_diffusion_offline_mode_really_fails_cleanly():
    from huggingface_hub import constants
    if not constants.HF_HUB_OFFLINE:
        pytest.skip("hub not in offline mode in this process; would try the network")
    with pytest.raises(L.WeightsUnavailableError, match="not available on this machine"):
        L.load_pipeline("sd-1.5", device="cpu")


def test_generates_64x64_deterministically(pipe):
    kw = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
    a = pipe("a large red circle in the center", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a large red circle in the center", generator=torch.Generator().manual_seed(0), **kw).images
    c = pipe("a large red circle in the center", generator=torch.Generator().manual_seed(1), **kw).images
    assert a.shape == (1, 64, 64, 3) and 0 <= a.min() and a.max() <= 1
    assert (a == b).all()
    assert not (a == c).all()


def test_ddpm_scheduler_option():
    from diffusers import DDPMScheduler
    p = L.load_pipeline("shapes", scheduler="ddpm")
    assert isinstance(p.scheduler, DDPMScheduler)
    assert p.scheduler.config.beta_schedule == "scaled_linear"
    assert p.scheduler.config.beta_start == 0.00085 and p.scheduler.config.beta_end == 0.012


def test_shipped_weights_are_what_the_training_command_builds_and_small(pipe):
    """Checked on the weights, not on numbers the record states: the shipped components have
    the architecture ``python -m diffnotes.models.train shapes`` builds (M.make_components), the
    files are safetensors and small, and the VAE's scaling factor is 1/std of its latents on
    scenes drawn as the training set was (the rule of stage (a))."""
    from diffnotes.models.train import SHIPPED, _make_dataset, encode_latents
    fresh = M.make_components()
    for comp in ("vae", "unet", "text_encoder"):        # the same parameters, of the same shapes
        shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
        assert shapes(getattr(pipe, comp)) == shapes(fresh[comp]), comp
    for comp in ("vae", "unet", "text_encoder"):
        assert list((L.SHAPES_DIR / comp).glob("*.safetensors")), comp
    assert (L.SHAPES_DIR / "tokenizer" / "tokenizer.json").exists()
    size = sum(f.stat().st_size for f in L.SHAPES_DIR.rglob("*") if f.is_file())
    assert size <= 25e6
    data = _make_dataset(200, SHIPPED.seed, SHIPPED.textured_fraction, SHIPPED.object_count_probs)
    z = encode_latents(pipe.vae, data["images"])
    assert 1 / float(z.std()) == pytest.approx(pipe.vae.config.scaling_factor, rel=0.03)


def test_training_record_adds_up():
    """The record's totals are the sums of its parts: the 60-minute / 2-core goal is judged on
    the wall time of both runs (the reused autoencoder stage included)."""
    rec = json.loads((L.SHAPES_DIR / "TRAINING.json").read_text())
    assert "-m diffnotes.models.train shapes" in rec["command"]
    parts = rec["wall_time_s"] + (rec["vae_record"]["vae_wall_time_s"]
                                  if rec.get("vae_from") and rec.get("vae_record") else 0.0)
    assert rec["total_wall_time_s"] == pytest.approx(parts, abs=0.15)
    assert parts <= 3600
    launcher = rec["command"].split(" -m ")[0]
    processes = int(launcher.split("--nproc_per_node")[1].split()[0]) if "nproc" in launcher else 1
    assert processes == rec["num_processes"] and processes * rec["threads"] <= 2
    assert rec["scaling_factor"] == L.load_pipeline("shapes").vae.config.scaling_factor


def _text_attention_probs(enc, ids):
    """What every layer of the text encoder's attention applies, captured inside its attention
    modules (eager attention, which returns the probabilities): the additive masks (layers, L, L),
    the probabilities (layers, heads, L, L), and the output they give."""
    masks, probs, hooks = [], [], []
    for m in enc.modules():
        if type(m).__name__ == "CLIPAttention":
            hooks.append(m.register_forward_pre_hook(
                lambda _m, _a, kw: masks.append(kw["attention_mask"][0, 0]), with_kwargs=True))
            hooks.append(m.register_forward_hook(lambda _m, _i, out: probs.append(out[1][0])))
    old = enc.config._attn_implementation
    enc.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            h = enc(ids)[0][0]
    finally:
        enc.set_attn_implementation(old)
        for hk in hooks:
            hk.remove()
    return torch.stack(masks), torch.stack(probs), h


def test_text_encoder_causal_mask_includes_the_diagonal(pipe):
    """Erratum shapes-causal-mask: e_i attends to e_1..e_i (itself included), not only e_1..e_{i-1}.

    Checked on the attention the model applies (its probabilities, layer by layer), not on the
    outputs: a token's output changes with its own input through the residual path whatever the
    mask, so an output test cannot tell the two masks apart."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    kw = dict(padding="max_length", max_length=M.MAX_LENGTH, truncation=True, return_tensors="pt")
    a = tok("a small red circle on the left", **kw).input_ids
    mask, p, h = _text_attention_probs(enc, a)
    L = M.MAX_LENGTH
    assert mask.shape == (enc.config.num_hidden_layers, L, L) and p.shape[-2:] == (L, L)
    with torch.no_grad():
        torch.testing.assert_close(h, enc(a)[0][0], rtol=1e-4, atol=1e-5)  # = the default path
    future = torch.ones(L, L, dtype=torch.bool).triu(1)          # key j > query i
    assert (mask[:, ~future] == 0).all()               # keys j <= i, the diagonal included: open
    assert (mask[:, future] < -1e4).all()              # later keys: closed
    assert p[..., future].abs().max() == 0             # no token attends to a later one
    assert p.diagonal(dim1=-2, dim2=-1).min() > 0      # every token attends to itself
    torch.testing.assert_close(p[..., 0, 0], torch.ones_like(p[..., 0, 0]))  # e_1 sees only e_1
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    # and so, in the outputs: changing token i leaves the earlier ones as they were
    b = tok("a small blue circle on the left", **kw).input_ids
    i = 3                                             # <start> a small [red|blue] ...
    assert (a != b).nonzero()[:, 1].tolist() == [i]
    with torch.no_grad():
        ha, hb = enc(a)[0][0], enc(b)[0][0]
    diff = (ha - hb).abs().amax(-1)
    assert diff[:i].max() < 1e-6                      # earlier tokens cannot see the change
    assert (diff[i + 1:] > 1e-3).all()                # later tokens, padding included, see it
    # padding positions are not zero vectors, and they differ from one another (positions)
    n_words = 7
    pads = ha[n_words + 2:]
    assert pads.norm(dim=-1).min() > 1e-2
    assert (pads[0] - pads[-1]).abs().max() > 1e-4


def test_diffusion_features_noise_with_the_library_q_sample(pipe, monkeypatch):
    """One implementation of the forward process: diffusion_features noises the latents with
    diffnotes.ddpm.q_sample (eq 1.2 in latent space) at the requested step."""
    from diffnotes import ddpm, features
    seen = []

    def spy(x0, t, ac, noise):
        seen.append((t, ac is pipe.scheduler.alphas_cumprod))
        return ddpm.q_sample(x0, t, ac, noise)

    monkeypatch.setattr(features, "q_sample", spy)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    f = features.diffusion_features(pipe, x, t=150, generator=torch.Generator().manual_seed(1))
    assert seen == [(150, True)] and f.ndim == 4 and f.shape[0] == 2
