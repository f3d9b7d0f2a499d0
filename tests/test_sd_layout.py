"""The ``"sd-1.5-layout-tiny"`` pipeline (diffnotes.models.sd_tiny) and the simulation switch.

The tiny pipeline has Stable Diffusion 1.5's block layout at a width that runs on a CPU. These
tests check that layout against SD 1.5's shipped UNet config (``diffnotes/configs/sd15_unet.json``,
built on the meta device by ``diffnotes.models.sd_shapes``), that its text encoder and tokenizer
behave like SD's (77 positions), and then run the attention and feature functions of the library
on BOTH layouts — the shapes model (maps 16, 8) and the SD layout (maps 40, 20, 10, 5) — so that
no function can hard-code one model's resolutions, layer indices or token count.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffnotes.attention import (AttentionStore, generate_with_attention,  # noqa: E402
                                 tokenize_prompt, word_token_indices)
from diffnotes.features import diffusion_features, unet_block_outputs  # noqa: E402
from diffnotes.models import sd_shapes, sd_tiny  # noqa: E402
from diffnotes.models.load import load_pipeline  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "diffnotes" / "configs"
TINY = "sd-1.5-layout-tiny"
#: each layout's own attention-map sides (largest first) and default image side
LAYOUTS = {"shapes": dict(res=[16, 8], image=64, tokens=32),
           TINY: dict(res=[40, 20, 10, 5], image=320, tokens=77)}
PROMPT = {"shapes": "a red circle on the left", TINY: "a photo of a red circle and a zebra"}


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline(TINY)


@pytest.fixture(scope="module")
def pipes(tiny):
    return {"shapes": load_pipeline("shapes"), TINY: tiny}


def _sd15_config() -> dict:
    with open(CONFIGS / "sd15_unet.json") as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def _attn_signature(rows, sample_size):
    """(layer name, place, kind, level) per attention layer; level = log2(sample / side)."""
    return [(r["layer"], r["place"], r["kind"], int(np.log2(sample_size // r["res"][0])))
            for r in rows]


# ---------------------------------------------------------------------------- the layout
def test_unet_has_sd15_block_layout(tiny):
    sd, cfg = _sd15_config(), tiny.unet.config
    for key in ("down_block_types", "up_block_types", "layers_per_block", "in_channels",
                "out_channels", "act_fn", "flip_sin_to_cos", "freq_shift"):
        assert tuple(np.atleast_1d(cfg[key])) == tuple(np.atleast_1d(sd[key])), key
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert len(cfg.block_out_channels) == len(sd["block_out_channels"]) == 4
    assert cfg.cross_attention_dim == tiny.text_encoder.config.hidden_size
    assert cfg.sample_size == 40 and cfg.in_channels == 4
    # attention in the same places: same layer names, kinds and resolution levels, same order
    _, rows_sd = sd_shapes.shape_tables(sd_shapes.meta_unet("sd-1.5"))
    _, rows_tiny = sd_shapes.shape_tables(tiny.unet)
    assert _attn_signature(rows_tiny, 40) == _attn_signature(rows_sd, 64)
    cross = [r for r in rows_tiny if r["kind"] == "cross"]
    assert len(cross) == 16 and len(rows_tiny) == 32
    assert [sum(r["place"] == p for r in cross) for p in ("down", "mid", "up")] == [6, 1, 9]
    assert sorted({r["res"][0] for r in rows_tiny}, reverse=True) == [40, 20, 10, 5]
    assert all(r["key_tokens"] == 77 for r in cross)


def test_vae_text_encoder_tokenizer_scheduler(tiny):
    vae = tiny.vae.config
    assert len(vae.block_out_channels) == 4 and tiny.vae_scale_factor == 8
    assert vae.latent_channels == 4 == tiny.unet.config.in_channels
    assert tiny.tokenizer.model_max_length == 77
    assert tiny.text_encoder.config.max_position_embeddings == 77
    ids = tokenize_prompt("a cat", tiny.tokenizer)["input_ids"]
    emb = tiny.text_encoder(torch.cat([ids, ids]))[0]
    assert emb.shape == (2, 77, tiny.text_encoder.config.hidden_size)
    pe, ne = tiny.encode_prompt("a cat", "cpu", 1, True, "blurry")
    assert pe.shape == ne.shape == (1, 77, tiny.unet.config.cross_attention_dim)
    s = tiny.scheduler.config
    assert type(tiny.scheduler).__name__ == "DDIMScheduler"
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps) == (
        "scaled_linear", 0.00085, 0.012, 1000)
    assert type(load_pipeline(TINY, scheduler="ddpm").scheduler).__name__ == "DDPMScheduler"


def test_tokenizer_is_clip_like_and_covers_any_word(tiny):
    tok = tiny.tokenizer
    t = tokenize_prompt("A photo of an astronaut riding a zebra.", tok)
    assert t["tokens"][0] == "<|startoftext|>" and t["tokens"][t["length"] - 1] == "<|endoftext|>"
    assert set(t["tokens"][t["length"]:]) == {"<|endoftext|>"}            # padded with EOS
    assert "<|unk|>" not in t["tokens"]                                     # no unknown words
    prompt = "a photo of an astronaut riding a zebra"
    assert word_token_indices(prompt, "astronaut", tok) == [5]              # one token
    zebra = word_token_indices(prompt, "zebra", tok)                        # spelled in pieces
    assert len(zebra) > 1 and zebra == list(range(zebra[0], zebra[0] + len(zebra)))
    assert tok.decode(t["input_ids"][0], skip_special_tokens=True) == \
        "a photo of an astronaut riding a zebra."


def test_same_weights_every_call_and_global_rng_untouched(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_pipeline(TINY)
    assert torch.equal(torch.rand(3), expected)
    for a, b in ((tiny.unet, again.unet), (tiny.vae, again.vae),
                 (tiny.text_encoder, again.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_guided_generation_runs_is_deterministic_default_size(tiny):
    def run():
        return tiny("a photo of a cat", negative_prompt="blurry", num_inference_steps=3,
                    guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(0),
                    output_type="np").images
    a, b = run(), run()
    assert a.shape == (1, 320, 320, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert a.std() > 0.01                                                  # not a blank image
    img = tiny("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(1)).images[0]
    assert img.size == (320, 320)


# ---------------------------------------------------------------------------- the switch
def test_simulate_gpu_switch(monkeypatch):
    from diffnotes import utils
    monkeypatch.delenv("DIFFNOTES_SIMULATE_GPU", raising=False)
    assert not utils.simulating_gpu()
    assert utils.has_gpu() == torch.cuda.is_available()
    monkeypatch.setenv("DIFFNOTES_SIMULATE_GPU", "0")
    assert not utils.simulating_gpu()
    monkeypatch.setenv("DIFFNOTES_SIMULATE_GPU", "1")
    assert utils.simulating_gpu() and utils.has_gpu()
    if not torch.cuda.is_available():
        assert utils.pick_device().type == "cpu" and utils.pick_dtype() == torch.float32
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("sd-1.5", "sd-2.1-base"):
        pipe = load_pipeline(name, dtype=torch.float16)      # a Colab cell's arguments: ignored
        assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
        assert pipe.unet.config.sample_size == 40 and pipe.tokenizer.model_max_length == 77


def test_without_the_switch_sd_needs_weights(monkeypatch):
    from diffnotes.models.load import WeightsUnavailableError
    monkeypatch.delenv("DIFFNOTES_SIMULATE_GPU", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        load_pipeline("sd-1.5", device="cpu", dtype=torch.float32)
    except WeightsUnavailableError:
        pass
    else:  # pragma: no cover - only on a machine with the weights in its Hub cache
        pytest.skip("SD 1.5 weights are cached on this machine")


# ---------------------------------------------------------------------------- both layouts
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generate_with_attention_on_both_layouts(pipes, layout):
    pipe, spec = pipes[layout], LAYOUTS[layout]
    prompt = PROMPT[layout]
    img, store = generate_with_attention(pipe, prompt, num_inference_steps=2, guidance_scale=5.0,
                                         generator=torch.Generator().manual_seed(0),
                                         kinds=("cross", "self"), store_steps=True,
                                         step_max_res=spec["res"][0])
    assert img.size == (spec["image"], spec["image"])
    assert store.resolutions("cross") == spec["res"]
    cfg = pipe.unet.config
    L = cfg.layers_per_block                       # L blocks per level down, L + 1 up, 1 mid
    n_cross = (sum(t.startswith("CrossAttn") for t in cfg.down_block_types) * L + 1
               + sum(t.startswith("CrossAttn") for t in cfg.up_block_types) * (L + 1))
    assert len(store.layers("cross")) == n_cross == (16 if layout == TINY else 7)
    assert store.stored_steps() == [0, 1]
    for info in store.layers("cross"):
        assert info.keys == spec["tokens"]
    for r in spec["res"]:
        m = store.maps("cross", res=r)
        assert m.shape == (1, r, r, spec["tokens"])                        # cond rows only
        assert torch.allclose(m.sum(-1), torch.ones(1, r, r), atol=1e-4)   # rows are softmaxes
        if r <= store.self_max_res:
            s = store.maps("self", res=r)
            assert s.shape == (1, r, r, r * r)
    w = store.word_map("circle", prompt, pipe.tokenizer)
    assert w.shape == (spec["res"][0],) * 2 and float(w.min()) >= 0
    assert store.word_map("red", prompt, pipe.tokenizer, res=spec["res"][-1]).shape == \
        (spec["res"][-1],) * 2
    assert store.maps("cross", steps=[1]).shape == (1, *(spec["res"][0],) * 2, spec["tokens"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_attention_store_on_a_bare_unet_call(pipes, layout):
    pipe, spec = pipes[layout], LAYOUTS[layout]
    unet = pipe.unet
    S = unet.config.sample_size
    x = torch.randn(2, 4, S, S, generator=torch.Generator().manual_seed(0))
    ids = tokenize_prompt(PROMPT[layout], pipe.tokenizer)["input_ids"]
    ctx = pipe.text_encoder(ids)[0].expand(2, -1, -1)
    with torch.no_grad(), AttentionStore(kinds=("cross",), rows="cond").attach(unet) as store:
        unet(x, 500, ctx)
    assert store.resolutions("cross") == spec["res"]
    assert store.maps("cross").shape == (1, S, S, spec["tokens"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_diffusion_features_on_both_layouts(pipes, layout):
    pipe, spec = pipes[layout], LAYOUTS[layout]
    cfg = pipe.unet.config
    n, S = len(cfg.up_block_types), cfg.sample_size
    # every block's output at the layout's own resolution (one UNet call, all blocks hooked)
    ups = [f"up_blocks.{i}" for i in range(n)]
    z = torch.randn(1, 4, S, S, generator=torch.Generator().manual_seed(0))
    ctx = torch.zeros(1, spec["tokens"], cfg.cross_attention_dim)
    with torch.no_grad():
        outs = unet_block_outputs(pipe.unet, z, torch.tensor([10]), ctx, ["mid_block"] + ups)
    assert outs[0].shape[1:] == (cfg.block_out_channels[-1],) + (S // 2 ** (n - 1),) * 2
    for i, f in enumerate(outs[1:]):
        side = S // 2 ** max(n - 2 - i, 0)        # every up block but the last upsamples
        assert f.shape[1:] == (cfg.block_out_channels[::-1][i], side, side), (layout, i)
    # diffusion_features: VAE encode, noise, one UNet call; blocks resized and concatenated
    H = spec["image"]
    images = torch.rand(2, 3, H, H, generator=torch.Generator().manual_seed(0))
    blocks = ("mid_block", ups[-1])

    def feats(**kw):
        return diffusion_features(pipe, images, t=200, blocks=blocks, prompt=PROMPT[layout],
                                  generator=torch.Generator().manual_seed(1), **kw)
    f = feats()
    assert f.shape == (2, cfg.block_out_channels[-1] + cfg.block_out_channels[0], S, S)
    assert f.dtype == torch.float32 and torch.isfinite(f).all()
    assert torch.equal(f, feats())                                          # seeded noise
    assert feats(out_size=H // 4, batch_size=1).shape[-2:] == (H // 4, H // 4)
