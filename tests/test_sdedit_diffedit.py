"""SDEdit (Meng et al. 2022) and DiffEdit (Couairon et al. 2023): diffnotes.editing.sdedit and
diffnotes.editing.diffedit, on the shapes pipeline and on the SD-1.5-layout tiny pipeline.

Exact properties in float64; diffusers' (deprecated) StableDiffusionDiffEditPipeline as the peer
for the mask; the generator's true object mask for DiffEdit's automatic mask.
"""
import numpy as np
import pytest
import torch

from diffnotes.data.shapes import render_object
from diffnotes.ddim import ddim_sample
from diffnotes.ddpm import q_sample
from diffnotes.editing.common import (encode_prompts, pipe_alphas_cumprod, pipe_eps_model,
                                      pipe_timesteps)
from diffnotes.editing.diffedit import (diffedit, diffedit_map, diffedit_mask, minmax_mask,
                                        threshold_map)
from diffnotes.editing.inversion import ddim_invert_image, decode_latents, encode_image
from diffnotes.editing.sdedit import (latent_mask, sdedit, sdedit_timesteps,
                                      strength_timestep)
from diffnotes.models.load import load_pipeline

PIPES = ["shapes", "sd-1.5-layout-tiny"]
SRC, TGT = "a large red circle", "a large blue circle"
_cache = {}


def get_pipe(name, dtype=torch.float32):
    key = (name, dtype)
    if key not in _cache:
        p = load_pipeline(name)
        p.set_progress_bar_config(disable=True)
        _cache[key] = p.to(dtype)
    return _cache[key]


def scene(pipe):
    """A generator scene (64×64 HWC in [0, 1]) and its true mask, upsampled to the pipeline's
    image size (nearest) when it is larger (320 for the tiny SD layout)."""
    img, mask = render_object("circle", "red", "large", "center")
    H = pipe.unet.config.sample_size * pipe.vae_scale_factor
    f = H // img.shape[0]
    if f > 1:
        img = np.repeat(np.repeat(img, f, 0), f, 1)
        mask = np.repeat(np.repeat(mask, f, 0), f, 1)
    return img, mask


def box_mask(z):
    """A latent-resolution mask: the central half-box is editable."""
    h, w = z.shape[-2:]
    m = torch.zeros(h, w, dtype=torch.float64)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    return m


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def iou(a, b):
    a, b = torch.as_tensor(a) > 0.5, torch.as_tensor(b) > 0.5
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


# ------------------------------------------------------------------------------ SDEdit
def test_strength_timestep_mapping():
    T = 1000
    assert strength_timestep(1.0, T) == T - 1            # s = 1: the noisiest level
    assert strength_timestep(0.5, T) == 499              # t₀ = s·T = 500 (1-based) → index 499
    assert strength_timestep(0.3, T) == 299
    assert strength_timestep(1e-6, T) == 0               # s ≤ 1/T: the least noisy level
    for s in np.linspace(0.01, 1, 37):                   # ⌈sT⌉ − 1, monotone, within one step
        t = strength_timestep(float(s), T)
        assert t + 1 >= s * T - 1e-6 and t < s * T + 1e-6


@pytest.mark.parametrize("name", PIPES)
def test_sdedit_starts_at_q_sample_of_t0(name):
    pipe = get_pipe(name, torch.float64)
    img, _ = scene(pipe)
    ts = sdedit_timesteps(pipe, 0.6, 5)
    grid = pipe_timesteps(pipe, 5)
    assert ts[0] == strength_timestep(0.6, 1000) == 599
    assert ts[1:] == [t for t in grid if t < 599]
    _, z, traj = sdedit(pipe, img, SRC, 0.6, num_inference_steps=5, generator=gen(3),
                        return_trajectory=True)
    z0 = encode_image(pipe, img)
    ac = pipe_alphas_cumprod(pipe)
    n0 = torch.randn(z0.shape, generator=gen(3), dtype=z0.dtype)
    assert torch.equal(traj[0], q_sample(z0, 599, ac, n0))   # the blog's VP initialisation
    assert len(traj) == len(ts) + 1 and torch.equal(traj[-1], z)


@pytest.mark.parametrize("name", PIPES)
def test_masked_sdedit_outside_is_forward_noised_original(name):
    """Outside the mask the latent after every step is q_sample(z₀, t', ε') with the step's
    own noise draw (the generator's documented order), and z₀ itself at the end."""
    pipe = get_pipe(name, torch.float64)
    img, _ = scene(pipe)
    z0 = encode_image(pipe, img)
    m = box_mask(z0)
    ts = sdedit_timesteps(pipe, 0.7, 4)
    _, z, traj = sdedit(pipe, img, TGT, 0.7, m, num_inference_steps=4, generator=gen(5),
                        return_trajectory=True)
    ac = pipe_alphas_cumprod(pipe)
    g = gen(5)
    noises = [torch.randn(z0.shape, generator=g, dtype=z0.dtype) for _ in ts]  # init + 1 per step
    out = (m == 0).expand_as(z0)
    assert torch.equal(traj[0], q_sample(z0, ts[0], ac, noises[0]))
    for i in range(1, len(ts)):
        known = q_sample(z0, ts[i], ac, noises[i])
        assert torch.equal(traj[i][out], known[out]), i
        assert not torch.allclose(traj[i][~out], known[~out])   # inside: the model's latent
    assert torch.equal(z[out], z0[out])                          # ᾱ = 1 at the end: z₀ exactly
    # an all-one mask is unmasked SDEdit (bitwise; the extra draws come after the first)
    _, z1 = sdedit(pipe, img, TGT, 0.7, torch.ones_like(m), num_inference_steps=4,
                   generator=gen(5), return_latents=True)
    _, zu = sdedit(pipe, img, TGT, 0.7, num_inference_steps=4, generator=gen(5),
                   return_latents=True)
    assert torch.equal(z1, zu)


@pytest.mark.parametrize("name", PIPES)
def test_sdedit_tiny_strength_returns_the_encoded_input(name):
    """strength → 0: t₀ = 0, one DDIM step to ᾱ = 1, so z_out = x̂₀ = z₀ + c (n − ε_θ) with
    c = √((1−ᾱ₀)/ᾱ₀) ≈ 0.03 (closed form); the image is the VAE round trip up to that."""
    pipe = get_pipe(name, torch.float64)
    img, _ = scene(pipe)
    z0 = encode_image(pipe, img)
    seen = []
    ims, z = sdedit(pipe, img, SRC, 1e-6, num_inference_steps=10, generator=gen(1),
                    return_latents=True, callback=seen.append)
    assert len(seen) == 1 and seen[0]["t"] == 0
    a0 = float(pipe_alphas_cumprod(pipe)[0])
    c = ((1 - a0) / a0) ** 0.5
    n = torch.randn(z0.shape, generator=gen(1), dtype=z0.dtype)
    torch.testing.assert_close(z, z0 + c * (n - seen[0]["eps"]), rtol=0, atol=1e-10)
    rel = ((z - z0).norm() / z0.norm()).item()
    rms = lambda v: v.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(z - z0) <= c * (rms(n) + rms(seen[0]["eps"])) * (1 + 1e-9)
    rt = decode_latents(pipe, z0)[0].permute(1, 2, 0).numpy()
    out = np.asarray(ims[0], dtype=np.float64) / 255
    psnr = 10 * np.log10(1 / np.mean((out - rt) ** 2))
    print(f"\n[{name}] SDEdit strength 1e-6: |z-z0|/|z0| = {rel:.3g} (c = {c:.3g}); "
          f"PSNR against the VAE round trip {psnr:.1f} dB")
    if name == "shapes":                 # a trained VAE (the tiny SD layout's is random)
        assert psnr > 25


@pytest.mark.parametrize("name", PIPES)
def test_bad_inputs_name_the_argument(name):
    pipe = get_pipe(name)
    img, _ = scene(pipe)
    z0 = encode_image(pipe, img)
    h, w = z0.shape[-2:]
    for s in (0, 0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength"):
            sdedit(pipe, img, SRC, s, num_inference_steps=2)
        with pytest.raises(ValueError, match="inpaint_strength"):
            diffedit(pipe, img, torch.zeros(h, w), TGT, s, num_inference_steps=2)
        with pytest.raises(ValueError, match="encode_strength"):
            diffedit_mask(pipe, img, SRC, TGT, 1, s)
    for bad in (torch.zeros(h + 1, w), torch.zeros(2, h, w), torch.zeros(3 * h, 3 * w)):
        with pytest.raises(ValueError, match="mask"):
            sdedit(pipe, img, SRC, 0.5, bad, num_inference_steps=2)
        with pytest.raises(ValueError, match="mask"):
            diffedit(pipe, img, bad, TGT, num_inference_steps=2)
    with pytest.raises(ValueError, match="mask"):
        sdedit(pipe, img, SRC, 0.5, torch.full((h, w), 2.0), num_inference_steps=2)
    for bad in (img[:-8], img[None, None], img * 255):          # size, rank, range
        with pytest.raises(ValueError, match="image"):
            sdedit(pipe, bad, SRC, 0.5, num_inference_steps=2)
        with pytest.raises(ValueError, match="image"):
            diffedit_mask(pipe, bad, SRC, TGT, 1)
    with pytest.raises(ValueError, match="num_maps"):
        diffedit_mask(pipe, img, SRC, TGT, 0)
    with pytest.raises(ValueError, match="threshold_ratio"):
        diffedit_mask(pipe, img, SRC, TGT, 1, 0.5, 0.0)


def test_latent_mask_resolutions():
    pipe = get_pipe("shapes")
    z = torch.zeros(1, 4, 16, 16)
    m = torch.zeros(64, 64)
    m[10:20, 30:31] = 1                                   # image resolution, a thin stripe
    lm = latent_mask(pipe, m, z)
    assert lm.shape == (1, 1, 16, 16)
    ref = torch.zeros(16, 16)
    ref[2:5, 7] = 1                                       # any image pixel editable → editable
    assert torch.equal(lm[0, 0], ref)
    assert torch.equal(latent_mask(pipe, ref[None].numpy() > 0, z)[0, 0], ref)


# ------------------------------------------------------------------------------ DiffEdit
def test_mask_rules_on_the_notes_vector():
    """The test vector of the study notes: the paper's clamp rule (diffusers) and the min–max
    rescaling of Ahmad's notes / the blog give different masks."""
    d = torch.tensor([0.0, 1, 2, 3, 4])
    assert threshold_map(d, 3.0).tolist() == [0, 0, 0, 0, 1]   # cap 6: 4/6 > ½ only
    assert minmax_mask(d).tolist() == [0, 0, 0, 1, 1]          # (d − 0)/4 > ½
    for f in (0.1, 7.0):                                       # both are scale-free
        assert torch.equal(threshold_map(f * d), threshold_map(d))
        assert torch.equal(minmax_mask(f * d), minmax_mask(d))
    assert threshold_map(torch.zeros(5)).sum() == 0 and minmax_mask(torch.ones(5)).sum() == 0


@pytest.mark.parametrize("name", PIPES)
def test_diffedit_mask_equal_prompts_is_empty_and_averages_the_maps(name):
    pipe = get_pipe(name)
    img, _ = scene(pipe)
    assert diffedit_mask(pipe, img, SRC, SRC, 2, generator=gen(0)).sum() == 0
    d2 = diffedit_map(pipe, img, SRC, TGT, 2, generator=gen(4))
    g = gen(4)
    z0 = encode_image(pipe, img)
    noise = torch.randn((2, *z0.shape[1:]), generator=g)
    singles = []
    for j in range(2):                   # the same two noisings, one at a time (batch of 1)
        gj = torch.Generator()
        gj.set_state(_state_after(noise, j))
        singles.append(diffedit_map(pipe, img, SRC, TGT, 1, generator=gj))
    torch.testing.assert_close(d2, (singles[0] + singles[1]) / 2, rtol=1e-4, atol=1e-6)


def _state_after(noise, j):
    """A generator state whose first draw of one latent is ``noise[j]`` (draws are sequential:
    the (2, C, h, w) draw of seed 4 is row 0 then row 1)."""
    g = gen(4)
    for _ in range(j):
        torch.randn(noise[0:1].shape, generator=g)
    return g.get_state()


@pytest.mark.parametrize("name", PIPES)
def test_diffedit_zero_mask_returns_the_input_latent(name):
    """"Returns the input latent": with M ≡ 0 the final latent is the inversion trajectory's
    first entry z₀ = encode_image(image) — bitwise, since the last blend takes (1 − 0)·z₀ — not
    the DDIM reconstruction of z₀ from the encoded latent (which differs by the inversion
    error, printed). With M ≡ 1 it is plain DDIM from the encoded latent under the target."""
    pipe = get_pipe(name, torch.float64)
    img, _ = scene(pipe)
    N, r = 5, 0.8
    _, z = diffedit(pipe, img, torch.zeros(64, 64) if name == "shapes" else
                    torch.zeros(320, 320), TGT, r, num_inference_steps=N, return_latents=True)
    z0 = encode_image(pipe, img)
    traj = ddim_invert_image(pipe, img, "", N)
    assert torch.equal(traj[0], z0)
    assert ((z - z0).norm() / z0.norm()).item() <= 1e-10
    assert torch.equal(z, z0)
    k = int(N * r)
    ts = pipe_timesteps(pipe, N)[N - k:]
    ac = pipe_alphas_cumprod(pipe)
    recon = ddim_sample(pipe_eps_model(pipe, encode_prompts(pipe, "")), traj[k], ts, ac)
    print(f"\n[{name}] DiffEdit M≡0: |z−z0|/|z0| = {((z - z0).norm() / z0.norm()).item():.1e}; "
          f"DDIM reconstruction from the encoded latent: "
          f"{((recon - z0).norm() / z0.norm()).item():.2e}")
    _, z1 = diffedit(pipe, img, torch.ones_like(z0[0, 0]), TGT, r, num_inference_steps=N,
                     return_latents=True)
    plain = ddim_sample(pipe_eps_model(pipe, encode_prompts(pipe, TGT), guidance_scale=7.5),
                        traj[k], ts, ac)
    assert ((z1 - plain).norm() / plain.norm()).item() <= 1e-10


# ------------------------------------------------------------------------------ peer and truth
def _diffusers_diffedit(pipe):
    import warnings
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = StableDiffusionDiffEditPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            unet=pipe.unet,
            scheduler=DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True),
            inverse_scheduler=DDIMInverseScheduler.from_config(pipe.scheduler.config,
                                                               set_alpha_to_one=True),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    dp.set_progress_bar_config(disable=True)
    return dp


@pytest.mark.parametrize("name", PIPES)
def test_mask_agrees_with_diffusers_diffedit(name):
    """Same latent (the encoder's mean, handed to diffusers as latents), same seed (diffusers
    draws the n noises as one (n, C, h, w) tensor, as diffedit_mask does), same level (its
    timestep grid for 500 steps puts strength ½ at index 499 = strength_timestep(½)), same
    guidance and clamp rule: the masks can differ only where float32 batching order moves a
    pixel across the threshold, so the IoU must be ≥ 0.95 (measured: 1.0 on both pipelines)."""
    pipe = get_pipe(name)
    dp = _diffusers_diffedit(pipe)
    img, _ = scene(pipe)
    z0 = encode_image(pipe, img)
    ours = diffedit_mask(pipe, img, SRC, TGT, 4, 0.5, 3.0, gen(11))
    theirs = dp.generate_mask(image=z0, source_prompt=SRC, target_prompt=TGT,
                              num_maps_per_mask=4, mask_encode_strength=0.5,
                              mask_thresholding_ratio=3.0, num_inference_steps=500,
                              guidance_scale=7.5, generator=gen(11))[0]
    score = iou(ours, torch.from_numpy(theirs))
    print(f"\n[{name}] IoU(diffnotes mask, diffusers generate_mask) = {score:.3f} "
          f"({int(ours.sum())} vs {int(theirs.sum())} latent pixels)")
    assert ours.sum() > 0 and score >= 0.95


def test_edit_agreement_with_diffusers_and_mask_against_truth():
    """Reported: DiffEdit's mask against the generator's true object mask (IoU, sanity bound
    only) and the edit agreement with diffusers' pipeline on the same mask and inversion.
    diffusers blends after step i with the inverted latent of the level *before* the step
    (`image_latents[i]`), so its output outside the mask is the inverted latent at the lowest
    grid level, not z₀: measured below with an all-zero mask."""
    pipe = get_pipe("shapes")
    dp = _diffusers_diffedit(pipe)
    img, true = scene(pipe)
    m = diffedit_mask(pipe, img, SRC, TGT, generator=gen(0))       # the defaults: n = 10, r = ½
    f = pipe.vae_scale_factor
    t = torch.nn.functional.max_pool2d(torch.from_numpy(true).double()[None, None], f)[0, 0]
    truth_iou = iou(m, t)
    inside = (m * t).sum().item() / max(m.sum().item(), 1)
    print(f"\n[shapes] IoU(DiffEdit mask, true object mask) = {truth_iou:.3f}; "
          f"{inside:.0%} of the mask lies on the object, which covers {t.mean().item():.0%}")
    assert m.sum() > 0 and inside > 2 * t.mean().item()            # far better than chance
    N, r = 10, 0.8
    z0 = encode_image(pipe, img)
    ims, z = diffedit(pipe, img, m, TGT, r, num_inference_steps=N, return_latents=True)
    inv = dp.invert(prompt="", image=z0, num_inference_steps=N, inpaint_strength=r,
                    guidance_scale=1.0).latents
    traj = ddim_invert_image(pipe, img, "", N)
    k = int(N * r)
    inv_gap = max((traj[j + 1] - inv[0, -1 - j]).abs().max().item() for j in range(k))
    zd = dp(mask_image=m[None].numpy(), image_latents=inv, prompt=TGT, inpaint_strength=r,
            num_inference_steps=N, guidance_scale=7.5, output_type="latent").images
    zd0 = dp(mask_image=np.zeros((1, *m.shape), np.float32), image_latents=inv, prompt=TGT,
             inpaint_strength=r, num_inference_steps=N, guidance_scale=7.5,
             output_type="latent").images
    a, b = decode_latents(pipe, z), decode_latents(pipe, zd)
    psnr = (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()
    print(f"[shapes] inversion vs diffusers' invert: max |Δ| = {inv_gap:.1e}; edit agreement: "
          f"|z − z_diffusers|/|z| = {((z - zd).norm() / z.norm()).item():.3f}, image PSNR "
          f"{psnr:.1f} dB; diffusers with M ≡ 0: |z − z0|/|z0| = "
          f"{((zd0 - z0).norm() / z0.norm()).item():.3f} (ours: 0)")
    assert inv_gap < 1e-4
    assert psnr > 15
