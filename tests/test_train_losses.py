"""The losses of ``python -m diffnotes.models.train shapes``, checked by brute force (float64)."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from diffnotes.models.train import _probs3, attention_mask_loss, eps_loss


def _pair(B=3, C=4, H=6, W=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
            torch.randn(B, C, H, W, generator=g, dtype=torch.float64))


def test_unweighted_eps_loss_is_the_per_sample_mse():
    eps, noise = _pair()
    ab = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    want = F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))
    torch.testing.assert_close(eps_loss(eps, noise, ab), want)


def test_object_weight_matches_a_pixel_by_pixel_loop():
    eps, noise = _pair(B=2)
    cover = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    cover[0, 0, 2, 3] = 1                      # one object pixel: its 3×3 neighbourhood counts
    cover[1, 0, 0, 0] = 1                      # at the corner: a 2×2 neighbourhood
    lam = 3.0
    got = eps_loss(eps, noise, torch.tensor([0.5, 0.5], dtype=torch.float64), cover, lam)
    for b in range(2):
        num = den = 0.0
        for i in range(6):
            for j in range(6):
                near = any(cover[b, 0, y, x] > 0 for y in range(max(0, i - 1), min(6, i + 2))
                           for x in range(max(0, j - 1), min(6, j + 2)))
                w = 1 + lam * near
                num += w * ((eps[b, :, i, j] - noise[b, :, i, j]) ** 2).sum().item()
                den += w * eps.shape[1]
        assert got[b].item() == pytest.approx(num / den, rel=1e-12)


def test_object_weight_keeps_the_scale_and_moves_the_loss_to_objects():
    eps, noise = _pair(B=1)
    ab = torch.tensor([0.5], dtype=torch.float64)
    cover = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    cover[0, 0, 3, 3] = 1
    uniform = torch.ones_like(eps)                      # equal error everywhere: same loss
    assert eps_loss(uniform, 0 * uniform, ab, cover, 4.0).item() == pytest.approx(1.0)
    only_bg = eps.clone()
    only_bg[..., 2:5, 2:5] = noise[..., 2:5, 2:5]       # errors only away from the object
    assert eps_loss(only_bg, noise, ab, cover, 4.0) < eps_loss(only_bg, noise, ab, cover, 0.0)
    with pytest.raises(ValueError, match="cover must have shape"):
        eps_loss(eps, noise, ab, cover[:, :, :4], 4.0)


def test_min_snr_gamma_factor():
    eps, noise = _pair(B=2)
    # SNR = ᾱ/(1−ᾱ): 10 for ᾱ = 10/11 (weight γ/SNR = 0.5 at γ = 5), 1 for ᾱ = 1/2 (weight 1)
    ab = torch.tensor([10 / 11, 0.5], dtype=torch.float64)
    plain = eps_loss(eps, noise, ab)
    torch.testing.assert_close(eps_loss(eps, noise, ab, min_snr_gamma=5.0),
                               plain * torch.tensor([0.5, 1.0], dtype=torch.float64))


def test_attention_mask_loss_prefers_maps_inside_the_mask():
    B, HW, M, K = 1, 16, 5, 1
    mask = torch.zeros(B, K, HW, dtype=torch.float64)
    mask[0, 0, :4] = 1
    tok = torch.tensor([[2]])
    valid = torch.ones(B, K, dtype=torch.float64)

    def maps_with(pixels):
        p = torch.full((B, HW, M), 0.01, dtype=torch.float64)
        p[0, pixels, 2] = 0.96
        return [p]

    inside = attention_mask_loss(maps_with(slice(0, 4)), mask, mask, tok, valid)
    outside = attention_mask_loss(maps_with(slice(8, 12)), mask, mask, tok, valid)
    assert inside < outside
    assert attention_mask_loss(maps_with(slice(0, 4)), mask, mask, tok, 0 * valid).item() == 0.0


def test_object_count_probs_parser():
    assert _probs3("0.6,0.25,0.15") == (0.6, 0.25, 0.15)
    for bad in ("0.5,0.5", "a,b,c", "-1,1,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="object-count-probs"):
            _probs3(bad)


def _attention_mask_loss_loop(maps, masks16, masks8, token_idx, valid):
    """attention_mask_loss written out object by object and pixel by pixel (float64)."""
    layers = []
    for p in maps:
        B, n, _ = p.shape
        masks = masks16 if n == masks16.shape[-1] else masks8
        num = den = 0.0
        for b in range(B):
            for k in range(token_idx.shape[1]):
                if not valid[b, k]:
                    continue
                a = [float(p[b, i, token_idx[b, k]]) for i in range(n)]
                m = [float(masks[b, k, i]) for i in range(n)]
                inside = sum(ai * mi for ai, mi in zip(a, m)) / (sum(a) + 1e-6)
                bce = 0.0
                for ai, mi in zip(a, m):
                    ai = min(max(ai, 1e-6), 1 - 1e-6)
                    bce -= mi * math.log(ai) + (1 - mi) * math.log(1 - ai)
                num += (1 - inside) ** 2 + bce / n
                den += 1
        layers.append(num / den)
    return sum(layers) / len(layers)


def test_attention_mask_loss_matches_the_loop():
    g = torch.Generator().manual_seed(0)
    B, M, K = 2, 6, 3
    maps = [torch.softmax(torch.randn(B, n, M, generator=g, dtype=torch.float64), -1)
            for n in (16, 4)]
    m16 = torch.rand(B, K, 16, generator=g, dtype=torch.float64)
    m4 = torch.rand(B, K, 4, generator=g, dtype=torch.float64)
    tok = torch.randint(1, M, (B, K), generator=g)
    valid = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.float64)
    got = attention_mask_loss(maps, m16, m4, tok, valid)
    assert got.item() == pytest.approx(_attention_mask_loss_loop(maps, m16, m4, tok, valid),
                                       rel=1e-12)


def _brute_force_cross_attention(attn, hidden, context):
    """Head-averaged softmax(Q Kᵀ · d^−½) of one diffusers Attention module (eq 1.47)."""
    B, n, _ = hidden.shape
    q, k = attn.to_q(hidden), attn.to_k(context)
    d = q.shape[-1] // attn.heads
    q = q.view(B, n, attn.heads, d).transpose(1, 2)
    k = k.view(B, -1, attn.heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1).mean(1)


def test_training_attention_maps_come_from_the_library_recorder():
    """The attention/mask loss of a training step, on maps recorded by diffnotes.attention's
    processor (train.py has no recorder of its own): the maps equal the brute-force softmax
    of every cross-attention layer, carry gradients, and the UNet's output is unchanged."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffnotes.attention import AttentionCollector, RecordingAttnProcessor
    from diffnotes.models import shapes as S
    from diffnotes.models.train import _install_recorder

    torch.manual_seed(0)
    unet = S.make_unet().double()
    z = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    ctx = torch.randn(2, S.MAX_LENGTH, unet.config.cross_attention_dim, dtype=torch.float64)
    t = torch.tensor([10, 500])
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        ref = unet(z, t, ctx).sample

    inputs = {}

    def keep_inputs(name):
        def hook(_module, args, kwargs):
            inputs[name] = (args[0] if args else kwargs["hidden_states"],
                            kwargs["encoder_hidden_states"])
        return hook

    hooks = [m.register_forward_pre_hook(keep_inputs(name), with_kwargs=True)
             for name, m in unet.named_modules() if name.endswith("attn2")]
    collector = AttentionCollector()
    _install_recorder(unet, collector)
    assert all(isinstance(p, RecordingAttnProcessor) == k.endswith("attn2.processor")
               for k, p in unet.attn_processors.items())
    out = unet(z, t, ctx).sample
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert len(collector.maps) == len(inputs) > 0
    with torch.no_grad():
        for p, (name, (hidden, context)) in zip(collector.maps, inputs.items()):
            attn = unet.get_submodule(name)
            torch.testing.assert_close(p, _brute_force_cross_attention(attn, hidden, context),
                                       rtol=1e-10, atol=1e-12)
    assert {p.shape[1] for p in collector.maps} == {256, 64}
    K = 2
    m16, m8 = torch.rand(2, K, 256, dtype=torch.float64), torch.rand(2, K, 64, dtype=torch.float64)
    tok, valid = torch.tensor([[3, 5], [2, 4]]), torch.ones(2, K, dtype=torch.float64)
    loss = attention_mask_loss(collector.maps, m16, m8, tok, valid)
    assert loss.item() == pytest.approx(
        _attention_mask_loss_loop([p.detach() for p in collector.maps], m16, m8, tok, valid),
        rel=1e-10)
    loss.backward()                                   # the loss trains the attention weights
    assert unet.get_submodule(next(iter(inputs))).to_q.weight.grad.abs().sum() > 0


def test_no_options_give_the_shipped_recipe():
    from dataclasses import asdict

    from diffnotes.models.train import SHIPPED, TrainConfig, build_parser, config_argv, \
        parse_config
    assert parse_config(["shapes"]) == SHIPPED == TrainConfig()
    assert config_argv(SHIPPED) == ["shapes"]
    cfg = parse_config(["shapes", "--object-weight", "0", "--object-count-probs", "0.6,0.25,0.15",
                        "--cpu"])
    assert (cfg.object_weight, cfg.object_count_probs, cfg.cpu) == (0.0, (0.6, 0.25, 0.15), True)
    assert parse_config(config_argv(cfg)) == cfg
    assert set(asdict(SHIPPED)) == {a.dest for a in build_parser()._actions} - {"help", "model"}
    with pytest.raises(ValueError, match="--cond-drop"):
        parse_config(["shapes", "--cond-drop", "1"])


def _explicit_options(command: str) -> dict:
    """The options a recorded command line gives explicitly, typed as TrainConfig's fields."""
    from diffnotes.models.train import parse_config
    words = command.split(" shapes ", 1)[1].split()
    out = {}
    for i, w in enumerate(words):
        if w.startswith("--"):
            name = w[2:].replace("-", "_")
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") \
                else None
            out[name] = getattr(parse_config(["shapes", w] + ([value] if value else [])), name)
    return out


def test_shipped_recipe_matches_the_shipped_training_record():
    """SHIPPED against diffnotes/weights/shapes/TRAINING.json: the UNet run's recorded settings
    and step count, and the autoencoder run's options (its command, under vae_record)."""
    import json
    from pathlib import Path

    from diffnotes.models.train import SHIPPED
    path = Path(__file__).resolve().parent.parent / "diffnotes/weights/shapes/TRAINING.json"
    if not path.exists():
        pytest.skip("shipped shapes weights missing")
    rec = json.loads(path.read_text())
    # stage (b) and the data: the settings the UNet run recorded (all of them, not only the
    # options its command gave)
    for k in ("batch_size", "n_scenes", "lr", "cond_drop", "attn_weight", "textured_fraction",
              "ema_decay", "min_snr_gamma", "object_weight", "seed", "kl_weight", "vae_lr",
              "vae_crop", "decoder_lr", "threads"):
        assert getattr(SHIPPED, k) == rec[k], k
    assert list(SHIPPED.object_count_probs) == rec["object_count_probs"]
    assert SHIPPED.object_weight == 4.0
    assert SHIPPED.steps == rec["unet_steps"]
    unet_run = _explicit_options(rec["command"])
    for k, v in unet_run.items():
        if k not in ("minutes", "vae_from", "decoder_steps", "checkpoint_dir", "out"):
            assert getattr(SHIPPED, k) == v, k
    # stages (a) and (a'): the autoencoder run's options and the steps it did
    vae_run = _explicit_options(rec["vae_record"]["command"])
    for k in ("vae_steps", "vae_fraction", "vae_batch_size", "decoder_steps", "decoder_fraction"):
        assert getattr(SHIPPED, k) == vae_run[k], k
    assert (SHIPPED.vae_steps, SHIPPED.decoder_steps) == (rec["vae_record"]["vae_steps"],
                                                          rec["vae_record"]["decoder_steps"])
    # one run in the budget of the two: 54 min + 5.2 min
    assert SHIPPED.minutes >= unet_run["minutes"] + rec["vae_record"]["vae_wall_time_s"] / 60
    assert SHIPPED.vae_from is None and SHIPPED.init_from is None    # all stages in one run
