"""Appearance transfer (diffnotes.editing.appearance): Cross-Image Attention and Eye-for-an-Eye.

Exact properties in float64 on the shapes pipeline and the SD-1.5-layout tiny pipeline:
structure = appearance (contrast 1) gives the plain DDIM reconstruction (<= 1e-10), the contrast
with β = 1 is the identity and keeps row sums, AdaIN of x to itself is x and its output has the
reference's channel statistics, the hooks really read the appearance row's keys and values (one
layer by hand), Eye-for-an-Eye's correspondence recovers a permutation and is the identity on
identical images, the layer rule gives SD's published layers, and bad input raises ValueError
naming the argument.
"""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffnotes.attention import AttentionStore, BatchLayout, attention_layers  # noqa: E402
from diffnotes.ddim import ddim_sample  # noqa: E402
from diffnotes.editing.appearance import (CrossImageController, adain,  # noqa: E402
                                          attention_contrast, cross_image_attention,
                                          eye_for_an_eye, feature_correspondence,
                                          image_correspondence, mask_to_grid, selected_layers,
                                          swap_guidance, swap_guidance_weights, warp)
from diffnotes.editing.common import (encode_prompts, pipe_alphas_cumprod,  # noqa: E402
                                      pipe_eps_model, pipe_timesteps)
from diffnotes.editing.inversion import ddim_invert_image, encode_image  # noqa: E402

STEPS = 3


def _latents(pipe, seed):
    """A clean latent z_0 (1, C, h, w): the shapes model encodes a rendered scene, the SD-layout
    pipeline a random image (its VAE is random too)."""
    if pipe.unet.config.sample_size == 16:
        from diffnotes.data.shapes import render_object
        shape, color = [("circle", "red"), ("square", "blue")][seed % 2]
        img, _ = render_object(shape, color, seed=seed)
        return encode_image(pipe, img.astype(np.float64))
    u = pipe.unet.config
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn((1, u.in_channels, u.sample_size, u.sample_size), generator=g,
                             dtype=torch.float64)


def _reconstruction(pipe, z0, prompt="", steps=STEPS):
    """DDIM inversion then DDIM sampling with the same (unguided) ε: the plain reconstruction."""
    zT = ddim_invert_image(pipe, z0, prompt, steps)[-1]
    eps = pipe_eps_model(pipe, encode_prompts(pipe, prompt))
    return ddim_sample(eps, zT, pipe_timesteps(pipe, steps), pipe_alphas_cumprod(pipe))


# ---------------------------------------------------------------------------- AdaIN
def test_adain_of_itself_is_itself_and_matches_reference_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * 3 + 1
    ref = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * 0.5 - 2
    assert torch.allclose(adain(x, x), x, atol=1e-13, rtol=0)
    y = adain(x, ref)
    mu, sd = y.mean((2, 3)), y.std((2, 3), unbiased=False)
    assert torch.allclose(mu, ref.mean((2, 3)), atol=1e-13, rtol=0)
    assert torch.allclose(sd, ref.std((2, 3), unbiased=False), atol=1e-13, rtol=0)
    # a (C, H, W) input and a batch-1 reference broadcast
    assert adain(x[0], ref[0]).shape == (4, 8, 8)
    assert torch.allclose(adain(x, ref[:1])[1].mean((1, 2)), ref[0].mean((1, 2)), atol=1e-13)


def test_adain_official_convention_and_mask():
    """eps = 1e-5 with the unbiased variance (the paper's calc_mean_std) against the formula by
    hand; with a mask only its pixels change and they take the masked reference statistics."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64)
    r = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64) * 2
    y = adain(x, r, eps=1e-5, unbiased=True)
    sx = (x.var((2, 3), unbiased=True) + 1e-5).sqrt()[..., None, None]
    sr = (r.var((2, 3), unbiased=True) + 1e-5).sqrt()[..., None, None]
    hand = (x - x.mean((2, 3), keepdim=True)) / sx * sr + r.mean((2, 3), keepdim=True)
    assert torch.allclose(y, hand, atol=1e-13, rtol=0)
    m = torch.zeros(6, 6, dtype=torch.bool)
    m[1:4, 2:6] = True
    rm = torch.zeros(6, 6, dtype=torch.bool)
    rm[3:, :3] = True
    y = adain(x, r, mask=m, ref_mask=rm)
    assert torch.equal(y[..., ~m], x[..., ~m])
    assert torch.allclose(y[..., m].mean(-1), r[..., rm].mean(-1), atol=1e-13, rtol=0)
    assert torch.allclose(y[..., m].std(-1, unbiased=False), r[..., rm].std(-1, unbiased=False),
                          atol=1e-13, rtol=0)


# ---------------------------------------------------------------------------- contrast, guidance
def test_contrast_identity_row_sums_and_worked_numbers():
    g = torch.Generator().manual_seed(2)
    A = torch.softmax(torch.randn(2, 3, 10, 10, generator=g, dtype=torch.float64), -1)
    assert attention_contrast(A, 1.0) is A                      # β = 1: the identity, bitwise
    B = attention_contrast(A, 2.0, clip=False)
    assert torch.allclose(B.sum(-1), torch.ones_like(B.sum(-1)), atol=1e-14)   # sums kept
    assert torch.allclose(B.mean(-1), A.mean(-1), atol=1e-15)   # row mean = 1/N kept
    row = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    out = attention_contrast(row, 1.67)                         # Ā = 1/3, β = 1.67 (the paper)
    want = torch.tensor([[1 / 3 + 1.67 / 6, 1 / 3 - 1.67 / 30, 1 / 3 - 1.67 * 2 / 15]],
                        dtype=torch.float64)
    assert torch.allclose(out, want, atol=1e-15)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-15)
    assert attention_contrast(row, 3.0)[0, 2] == 0.0            # 1/3 − 3·2/15 < 0 → clipped
    assert (attention_contrast(A, 0.5) - A.mean(-1, keepdim=True)).abs().max() < \
        (A - A.mean(-1, keepdim=True)).abs().max()              # β < 1 flattens


def test_swap_guidance_forms():
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.equal(swap_guidance(a, b, 0.0), b)
    assert torch.allclose(swap_guidance(a, b, 1.0), a, atol=1e-15)
    w = 2.5                                  # the notes' (1 + w') a − w' b with w' = w − 1
    assert torch.allclose(swap_guidance(a, b, w), w * a - (w - 1) * b, atol=1e-14)
    ws = swap_guidance_weights(3.5, 100)
    assert ws[0] == 3.5 and ws[-1] == 1.75 and np.all(np.diff(ws) < 0)
    assert np.all(swap_guidance_weights(1.5, 5) >= 1.0) and swap_guidance_weights(1.5, 5)[-1] == 1


# ---------------------------------------------------------------------------- correspondence
def test_correspondence_recovers_a_permutation_and_respects_masks():
    g = torch.Generator().manual_seed(4)
    C, h, w = 8, 5, 6
    ft = torch.randn(C, h, w, generator=g, dtype=torch.float64)
    perm = torch.randperm(h * w, generator=g)
    fr = ft.reshape(C, -1)[:, perm].reshape(C, h, w)             # F_ref(p) = F_target(π(p))
    idx = feature_correspondence(ft, fr)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(h * w)
    assert torch.equal(idx, inv)                                 # p(q) = π⁻¹(q)
    tok_t, tok_r = ft.reshape(C, -1).T, fr.reshape(C, -1).T
    assert torch.equal(warp(tok_r, idx), tok_t)                  # F̃_ref = F_target
    assert torch.equal(feature_correspondence(ft, ft), torch.arange(h * w))
    rm = torch.zeros(h, w, dtype=torch.bool)
    rm[:, :3] = True
    tm = torch.zeros(h, w, dtype=torch.bool)
    tm[2:, 1:] = True
    idx = feature_correspondence(ft, fr, target_mask=tm, ref_mask=rm)
    inside = tm.reshape(-1)
    assert bool(rm.reshape(-1)[idx[inside]].all())               # matches lie in M_ref
    assert torch.equal(idx[~inside], torch.arange(h * w)[~inside])   # others untouched


def test_mask_to_grid():
    m = np.zeros((64, 64), bool)
    m[:32, :] = True
    assert torch.equal(mask_to_grid(m, 4), torch.tensor([[1, 1, 1, 1]] * 2 + [[0] * 4] * 2).bool())
    with pytest.raises(ValueError, match="mask"):
        mask_to_grid(np.zeros((2, 3, 4)), 4)


# ---------------------------------------------------------------------------- layer rule
def test_layer_rule(pipe):
    idx = selected_layers(pipe.unet, pipe.unet.config.sample_size)
    names = attention_layers(pipe.unet, "self")
    if pipe.unet.config.sample_size == 40:                       # SD 1.5's layout
        assert idx == list(range(10, 16))                        # 20×20 and 40×40 decoder layers
    else:
        assert idx == [i for i, n in enumerate(names) if n.startswith("up_blocks")]
    assert selected_layers(pipe.unet, 16, layers=[1, 0]) == [0, 1]
    with pytest.raises(ValueError, match="layers"):
        selected_layers(pipe.unet, 16, layers=[len(names)])
    with pytest.raises(ValueError, match="min_res_fraction"):
        selected_layers(pipe.unet, 16, min_res_fraction=1.5)


# ---------------------------------------------------------------------------- exact no-ops
@pytest.mark.slow
def test_same_image_is_the_plain_reconstruction(pipe):
    """structure = appearance, contrast 1: the output row reads keys and values equal to its own
    (bitwise, same batch), swap guidance adds w · 0, AdaIN(z, z) = z: the plain DDIM
    reconstruction, <= 1e-10, with AdaIN off and on (off only on the shapes model, for time)."""
    z0 = _latents(pipe, 0)
    want = _reconstruction(pipe, z0)
    for ad in ((False, True) if pipe.unet.config.sample_size == 16 else (True,)):
        out, s, a = cross_image_attention(pipe, z0, z0, contrast=1.0, adain=ad,
                                          num_inference_steps=STEPS, output_type="latent",
                                          return_all=True)
        assert cross_image_attention.last_calls > 0              # the hooks did run
        for y in (out, s, a):
            assert (y - want).abs().max() <= 1e-10
    if pipe.unet.config.sample_size == 16:                       # with classifier-free guidance
        zT = ddim_invert_image(pipe, z0, "a red circle", STEPS)[-1]
        eps = pipe_eps_model(pipe, encode_prompts(pipe, "a red circle"), encode_prompts(pipe, ""),
                             3.0)
        want = ddim_sample(eps, zT, pipe_timesteps(pipe, STEPS), pipe_alphas_cumprod(pipe))
        out = cross_image_attention(pipe, z0, z0, structure_prompt="a red circle", contrast=1.0,
                                    guidance_scale=3.0, num_inference_steps=STEPS,
                                    output_type="latent")
        assert (out - want).abs().max() <= 1e-10


@pytest.mark.slow
def test_eye_for_an_eye_same_image_is_the_plain_reconstruction(pipe):
    """structure = appearance, no masks: the correspondence is the identity, the warped
    features are the output's own, and the output is the plain reconstruction (<= 1e-10)."""
    z0 = _latents(pipe, 0)
    want = _reconstruction(pipe, z0)
    out, corr = eye_for_an_eye(pipe, z0, z0, num_inference_steps=STEPS, output_type="latent",
                               return_correspondence=True)
    assert eye_for_an_eye.last_calls > 0
    for s, idx in corr.items():
        assert torch.equal(idx, torch.arange(s * s))
    assert (out - want).abs().max() <= 1e-10


@pytest.mark.slow
def test_different_images_change_the_output_and_keep_the_inputs(pipe):
    za, zb = _latents(pipe, 0), _latents(pipe, 1)
    out, s, a = cross_image_attention(pipe, za, zb, num_inference_steps=STEPS,
                                      output_type="latent", return_all=True, adain=False)
    rec_s = _reconstruction(pipe, za)
    assert (out - rec_s).abs().max() > 1e-3                      # the transfer does something
    assert (s - rec_s).abs().max() <= 1e-10                      # the structure row is untouched


def test_correspondence_of_identical_images_is_the_identity(pipe):
    f = pipe.vae_scale_factor if hasattr(pipe, "vae_scale_factor") else 8
    side = pipe.unet.config.sample_size * f
    if side == 64:
        from diffnotes.data.shapes import render_object
        img = render_object("star", "green", background="stripes", seed=3)[0]
    else:
        img = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(5),
                         dtype=torch.float64).numpy().transpose(0, 2, 3, 1)[0]
    L = pipe.unet.config.sample_size
    corr = image_correspondence(pipe, img, img, [L, L // 2])
    for s, idx in corr.items():
        assert torch.equal(idx, torch.arange(s * s))


# ---------------------------------------------------------------------------- by hand
def test_hook_reads_the_appearance_rows_keys_and_values(pipe):
    """One decoder layer by hand: the output row's attention is softmax(Q_out K_app^T/√d) with
    the contrast, times V_app, through W_O; the structure and appearance rows are untouched."""
    unet = pipe.unet
    names = attention_layers(unet, "self")
    li = selected_layers(unet, unet.config.sample_size)[-1]
    mod = dict(unet.named_modules())[names[li]]
    layout = BatchLayout(3, cfg=False)
    beta = 1.67
    ctrl = CrossImageController(layout, [li], {s: (0, 10) for s in (5, 8, 10, 16, 20, 40)},
                                contrast=beta)
    seen = {}
    h1 = mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].detach().clone()))
    h2 = mod.register_forward_hook(lambda m, a, o: seen.__setitem__("o", o.detach().clone()))
    store = AttentionStore(kinds=("self",), self_max_res=1, controller=ctrl, layout=layout)
    x = torch.cat([_latents(pipe, 0), _latents(pipe, 1), _latents(pipe, 2)])
    c = encode_prompts(pipe, "").expand(3, -1, -1)
    store.attach(unet)
    try:
        with torch.no_grad():
            unet(x, torch.tensor([500] * 3), encoder_hidden_states=c)
    finally:
        store.detach()
        h1.remove()
        h2.remove()
    assert ctrl.calls == 1
    h, o = seen["h"], seen["o"]
    H = mod.heads

    def split(t):
        return t.reshape(t.shape[0], -1, H, t.shape[-1] // H).transpose(1, 2)

    with torch.no_grad():
        q, k, v = split(mod.to_q(h)), split(mod.to_k(h)), split(mod.to_v(h))
        p = torch.softmax(q[2] @ k[0].transpose(-1, -2) * mod.scale, -1)
        p = attention_contrast(p, beta)
        y = (p @ v[0]).transpose(0, 1).reshape(1, h.shape[1], -1)
        want = mod.to_out[1](mod.to_out[0](y))
        own = torch.softmax(q[1] @ k[1].transpose(-1, -2) * mod.scale, -1) @ v[1]
        own = mod.to_out[0](own.transpose(0, 1).reshape(1, h.shape[1], -1))
    assert (o[2:3] - want).abs().max() <= 1e-10
    assert (o[1:2] - own).abs().max() <= 1e-10


# ---------------------------------------------------------------------------- bad input
def test_bad_input(pipe):
    z0 = _latents(pipe, 0)
    small = z0[..., :-2, :-2]
    with pytest.raises(ValueError, match="structure and appearance"):
        cross_image_attention(pipe, z0, small, num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="structure and appearance"):
        eye_for_an_eye(pipe, z0, small, num_inference_steps=2, output_type="latent")
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="contrast"):
            cross_image_attention(pipe, z0, z0, contrast=bad, num_inference_steps=2)
        with pytest.raises(ValueError, match="contrast"):
            attention_contrast(torch.ones(2, 2), bad)
    for kw in (dict(steps=(0.1, 1.2)), dict(low_res_steps=(-0.1, 0.5)),
               dict(adain_steps=(0.5, 0.2)), dict(steps=0.5)):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=name):
            cross_image_attention(pipe, z0, z0, num_inference_steps=2, **kw)
        with pytest.raises(ValueError, match=name):
            eye_for_an_eye(pipe, z0, z0, num_inference_steps=2, **kw)
    with pytest.raises(ValueError, match="queries"):
        cross_image_attention(pipe, z0, z0, queries="key", num_inference_steps=2)
    with pytest.raises(ValueError, match="inject"):
        eye_for_an_eye(pipe, z0, z0, inject="q", num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps"):
        cross_image_attention(pipe, z0, z0, num_inference_steps=0)
    with pytest.raises(ValueError, match="structure_mask"):
        cross_image_attention(pipe, z0, z0, num_inference_steps=2,
                              structure_mask=np.zeros((8, 8)))
    with pytest.raises(ValueError, match="x and ref"):
        adain(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="f_target and f_ref"):
        feature_correspondence(torch.zeros(3, 4, 4), torch.zeros(3, 5, 4))
