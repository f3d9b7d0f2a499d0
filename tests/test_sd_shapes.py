"""Stable Diffusion's UNet shape tables on the meta device (diffnotes.models.sd_shapes).

The hook-measured tables are checked against the shapes derived by hand from the config (down
level i works at sample_size / 2**i with block_out_channels[i] channels; the up path mirrors it)
and against the published parameter counts, and compared with Table 1 of Ahmad's notes (§1.5.1):
the rows that disagree are exactly the ones listed in book/errata.md.
"""
import pytest
import torch

pytest.importorskip("diffusers")
from diffnotes.models.sd_shapes import (NOTES_TABLE_1, compare_with_notes,  # noqa: E402
                                        load_unet_config, markdown_table, meta_unet,
                                        shape_tables, summarize)


@pytest.fixture(scope="module")
def tables():
    out = {}
    for name in ("sd-1.5", "sd-2.1-base"):
        unet = meta_unet(name)
        assert next(unet.parameters()).device.type == "meta"
        out[name] = (unet, *shape_tables(unet))
    return out


def test_parameter_counts_match_the_published_models(tables):
    # published UNet sizes: SD 1.5 859,520,964; SD 2.1-base 865,910,724 parameters
    assert sum(p.numel() for p in tables["sd-1.5"][0].parameters()) == 859_520_964
    assert sum(p.numel() for p in tables["sd-2.1-base"][0].parameters()) == 865_910_724


@pytest.mark.parametrize("name", ["sd-1.5", "sd-2.1-base"])
def test_attention_table_matches_config_arithmetic(tables, name):
    unet, feats, attn = tables[name]
    cfg = load_unet_config(name)
    ch, S = cfg["block_out_channels"], cfg["sample_size"]
    heads_cfg = cfg["attention_head_dim"]
    heads = heads_cfg if isinstance(heads_cfg, list) else [heads_cfg] * len(ch)
    expected = []                                          # (place, res, channels, heads, n)
    for i, t in enumerate(cfg["down_block_types"]):
        if t.startswith("CrossAttn"):
            expected.append(("down", S >> i, ch[i], heads[i], cfg["layers_per_block"]))
    expected.append(("mid", S >> (len(ch) - 1), ch[-1], heads[-1], 1))
    rch, rheads = ch[::-1], heads[::-1]
    for j, t in enumerate(cfg["up_block_types"]):
        if t.startswith("CrossAttn"):
            expected.append(("up", S >> (len(ch) - 1 - j), rch[j], rheads[j],
                             cfg["layers_per_block"] + 1))
    got = [(g["place"], g["res"][0], g["channels"], g["heads"], g["layers"])
           for g in summarize(attn)]
    assert got == expected
    assert len(attn) == 32                                  # 16 self + 16 cross (notes §0.2)
    for r in attn:
        n = r["res"][0] * r["res"][1]
        assert r["query_tokens"] == n
        assert r["heads"] * r["head_dim"] == r["channels"]
        if r["kind"] == "cross":
            assert r["key_tokens"] == 77 and r["key_dim"] == cfg["cross_attention_dim"]
            assert r["probs_shape"] == (r["heads"], n, 77)
        else:
            assert r["key_tokens"] == n and r["probs_shape"] == (r["heads"], n, n)
    if name == "sd-2.1-base":
        assert {r["head_dim"] for r in attn} == {64}


def test_feature_table_matches_the_seed_text(tables):
    _, feats, _ = tables["sd-1.5"]
    shapes = {f["stage"]: f["shape"] for f in feats}
    assert shapes["conv_in"] == (320, 64, 64)                 # f_1
    assert shapes["down_blocks.0"] == (320, 32, 32)           # f_2
    assert shapes["down_blocks.1"] == (640, 16, 16)           # f_3
    assert shapes["down_blocks.2"] == (1280, 8, 8)            # f_4
    assert shapes["down_blocks.3"] == (1280, 8, 8)            # f_5
    assert shapes["mid_block"] == (1280, 8, 8)                # f_6
    assert shapes["up_blocks.0"] == (1280, 16, 16)            # f_7
    assert shapes["up_blocks.1"] == (1280, 32, 32)            # not the printed 640×32×32
    assert shapes["up_blocks.2"] == (640, 64, 64)
    assert shapes["up_blocks.3"] == (320, 64, 64)             # f_9
    assert shapes["conv_out"] == (4, 64, 64)                  # eq 1.43: eps has z_t's shape


def test_seed_table_1_disagreements_are_the_channel_column(tables):
    for name in ("sd-1.5", "sd-2.1-base"):
        cmp = compare_with_notes(summarize(tables[name][2]))
        assert [r["label"] for r in cmp] == [r[0] for r in NOTES_TABLE_1]
        # per-head matrix shapes agree with the notes' table on every row
        assert all(r["self"] == r["notes_self"] and r["cross"] == r["notes_cross"] for r in cmp)
        wrong = {r["label"]: (r["notes_channels"], r["channels"]) for r in cmp if not r["agrees"]}
        assert wrong == {"After Down Layer 1": (320, 640), "Down Layer 2": (640, 1280),
                         "Up Layer 1": (640, 1280), "Up Layer 2": (320, 640)}


def test_tiny_shapes_unet_table_on_cpu():
    shapes = pytest.importorskip("diffnotes.models.shapes")
    torch.manual_seed(0)
    unet = shapes.make_unet()
    feats, attn = shape_tables(unet, seq_len=shapes.MAX_LENGTH)
    assert {r["res"] for r in attn} == {(16, 16), (8, 8)}
    assert all(r["key_tokens"] == shapes.MAX_LENGTH for r in attn if r["kind"] == "cross")
    assert feats[-1]["shape"] == (4, 16, 16)
    assert "| place |" in markdown_table(summarize(attn))


def test_bad_names():
    with pytest.raises(ValueError, match="sd-1.5"):
        load_unet_config("sd-3")
    with pytest.raises(TypeError, match="config"):
        meta_unet(42)


def test_eq_1_45_is_not_the_ddim_step():
    """Eq 1.45 of Ahmad's notes, z_{t-1} = z_t - alpha_t eps, keeps z_t's coefficient at 1; DDIM does not."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        clip_sample=False, set_alpha_to_one=False)
    sch.set_timesteps(50)
    t, t_prev = int(sch.timesteps[10]), int(sch.timesteps[11])
    ac = sch.alphas_cumprod.double()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zero = torch.zeros_like(z)
    out = sch.step(zero, t, z).prev_sample                   # eps = 0 isolates z_t's coefficient
    coef = float((out / z).mean())
    assert coef == pytest.approx(float((ac[t_prev] / ac[t]).sqrt()), rel=1e-6)
    assert abs(coef - 1.0) > 1e-3          # eq 1.45 gives exactly z_t here, for any alpha_t
