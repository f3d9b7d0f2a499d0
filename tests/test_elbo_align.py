"""ELBO-T2IAlign (diffnotes.recognition.elbo_align): the paper's closed forms, Table I, and the
plumbing on both pipelines (the shapes model and the SD-1.5-layout tiny model)."""
import math

import numpy as np
import pytest
import torch

from diffnotes.recognition import elbo_align as ea
from diffnotes.schedules import alphas_cumprod, make_betas

PIPES = ["shapes", "sd-1.5-layout-tiny"]
#: the same, with the SD-layout model's (slower, float64) runs marked slow
PIPES_SLOW = ["shapes", pytest.param("sd-1.5-layout-tiny", marks=pytest.mark.slow)]


class _Pipes(dict):
    """Pipelines loaded on first use, in float64 (exact comparisons)."""

    def __missing__(self, name):
        from diffnotes.models.load import load_pipeline
        self[name] = load_pipeline(name).to(torch.float64)
        return self[name]


@pytest.fixture(scope="module")
def pipes():
    return _Pipes()


def _case(pipe, name):
    """An image of the pipeline's size, a caption and two classes of it."""
    if name == "shapes":
        from diffnotes.data.shapes import generate_scenes
        sc = generate_scenes(1, seed=5, min_objects=2, max_objects=2)
        return sc.images[0].astype(np.float64), sc.captions[0], [o["shape"] for o in sc.objects[0]]
    img = np.random.default_rng(0).random((320, 320, 3))
    return img, "a red cat and a blue dog", ["cat", "dog"]


# ---------------------------------------------------------------------------- closed forms
def test_failure_cases_posteriors():
    want = [0.217391, 0.333333, 0.204545]
    got = [ea.bayes_posterior(p, l)[0] for p, l in ea.FAILURE_CASES.values()]
    np.testing.assert_allclose(got, want, atol=5e-7)
    assert all(g < 0.5 for g in got)


def test_alignment_scores_and_calibration_worked_numbers():
    S = ea.alignment_scores([0.10, 0.15, 0.20], gamma=1 / 3)
    np.testing.assert_allclose(S, [1, 0.577350, 0.333333], atol=5e-7)
    np.testing.assert_allclose(1 / S, [1, 1.732051, 3], atol=5e-7)
    A = torch.full((3, 1), 0.5, dtype=torch.float64)
    np.testing.assert_allclose(ea.calibrate(A, S)[:, 0], [0.5, 0.301024, 0.125], atol=5e-7)
    A4 = torch.tensor([[0, .25, .5, 1]], dtype=torch.float64)
    np.testing.assert_allclose(ea.calibrate(A4, [1 / 3])[0], [0, 0.015625, 0.125, 1], atol=1e-12)


def test_gamma_one_identity_and_equal_losses():
    e = torch.tensor([0.3, 0.1, 0.7], dtype=torch.float64)
    assert torch.equal(ea.alignment_scores(e, 1.0), torch.ones(3, dtype=torch.float64))
    assert torch.equal(ea.alignment_scores([0.2, 0.2, 0.2], 1 / 3), torch.ones(3, dtype=torch.float64))
    A = torch.rand(3, 4, 4, dtype=torch.float64)
    assert torch.equal(ea.calibrate(A, torch.ones(3)), A)


def test_affine_invariance_and_its_failure_for_nonconstant_weighting():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        e = torch.rand(4, generator=g, dtype=torch.float64)
        a, b = float(torch.rand(1, generator=g)) * 5 + 0.1, float(torch.randn(1, generator=g))
        torch.testing.assert_close(ea.alignment_scores(a * e + b), ea.alignment_scores(e),
                                   rtol=0, atol=1e-12)
    # per-time-step losses (classes × t): class 0 better at small t, class 1 at large t
    err = torch.tensor([[0.10, 0.50], [0.20, 0.38]], dtype=torch.float64)
    const = ea.alignment_scores((3.0 * err).mean(1))
    torch.testing.assert_close(const, ea.alignment_scores(err.mean(1)), rtol=0, atol=1e-12)
    w = torch.tensor([10.0, 1.0], dtype=torch.float64)        # −λ′ is large at small t
    weighted = ea.alignment_scores((w * err).mean(1))
    assert not torch.allclose(weighted, const)
    assert int(weighted.argmax()) != int(const.argmax())


def test_calibration_monotone_fixed_points_argmax():
    g = torch.Generator().manual_seed(1)
    S = torch.tensor([1.0, 0.6, 1 / 3], dtype=torch.float64)
    x = torch.linspace(0, 1, 101, dtype=torch.float64).expand(3, -1)
    y = ea.calibrate(x, S)
    assert bool((y.diff(dim=1) >= 0).all())
    assert torch.equal(y[:, 0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(y[:, -1], torch.ones(3, dtype=torch.float64))
    A = ea._minmax(torch.rand(3, 8, 8, generator=g, dtype=torch.float64))
    C = ea.calibrate(A, S)
    assert torch.equal(A.flatten(1).argmax(1), C.flatten(1).argmax(1))


# ---------------------------------------------------------------------------- Table I and λ(t)
def _vp_cos(t):
    return math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)


@pytest.mark.parametrize("schedule", ["rf", "vp_cosine"])
def test_table_one_numerically(schedule):
    g = torch.Generator().manual_seed(2)
    for t in (0.2, 0.5, 0.8):
        if schedule == "rf":
            a, s = 1 - t, t
            lam, dlam = (float(v) for v in ea.rf_lambda(t))
        else:
            a, s = _vp_cos(t)
            lam, dlam = 2 * math.log(a / s), -math.pi / (a * s)
        x = torch.randn(3, 4, generator=g, dtype=torch.float64)
        eps = torch.randn(3, 4, generator=g, dtype=torch.float64)
        eps_hat = eps + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)
        z = a * x + s * eps
        ref = -dlam * (eps_hat - eps).pow(2).mean(1)
        for obj in ea.OBJECTIVES:
            got = ea.objective_loss(obj, eps_hat, eps, z, a, s) / ea.omega(obj, a, s, lam, dlam)
            if obj == "flow" and schedule != "rf":
                assert not torch.allclose(got, ref, rtol=1e-3)
            else:
                torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_table_one_sympy_and_rf_values():
    for schedule in ("rf", "vp_cosine"):
        rows = ea.table_one(schedule)
        for obj, (_, ratio) in rows.items():
            if obj == "flow" and schedule == "vp_cosine":
                assert ratio != 1
            else:
                assert ratio == 1, (schedule, obj, ratio)
    # the notes' rectified-flow test vector at t = 0.25 and 0.5
    for t, want in ((0.25, (2.197225, -10.666667, 0.09375, 0.166667, 0.010417, 0.065104, 1.5)),
                    (0.5, (0, -8, 0.125, 0.5, 0.125, 0.125, 0.5))):
        lam, dlam = (float(v) for v in ea.rf_lambda(t))
        a, s = 1 - t, t
        got = (lam, dlam) + tuple(ea.omega(o, a, s, lam, dlam)
                                  for o in ("eps", "flow", "x", "v", "score"))
        np.testing.assert_allclose(got, want, atol=5e-6)


def test_lambda_strictly_decreasing():
    ac = alphas_cumprod(make_betas("scaled_linear"))
    lam = ea.log_snr(ac)
    assert bool((lam.diff() < 0).all())
    assert bool((ea.lambda_prime(ac) < 0).all())
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    lam_rf, dlam_rf = ea.rf_lambda(t)
    assert bool((lam_rf.diff() < 0).all()) and bool((dlam_rf < 0).all())


def test_elbo_timesteps():
    assert ea.elbo_timesteps(20) == list(range(1, 1000, 50))
    assert len(ea.elbo_timesteps(5)) == 5 and len(ea.elbo_timesteps(10, "small")) == 10
    assert max(ea.elbo_timesteps(10, "small")) <= 200
    assert ea.elbo_timesteps(10, "random") == ea.elbo_timesteps(10, "random")


def test_phrase_weights():
    torch.testing.assert_close(ea.phrase_weights([0.0, 0.5, 1.0]),
                               torch.tensor([1.0, 1.1, 1.2], dtype=torch.float64))
    assert torch.equal(ea.phrase_weights([0.3, 0.3]), torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------------------- both pipelines
@pytest.mark.parametrize("name", PIPES_SLOW)
def test_elbo_loss_properties(pipes, name):
    pipe = pipes[name]
    img, cap, cls = _case(pipe, name)
    ts = [1, 901]
    prompts = [f"a {cls[0]}", f"a {cls[0]}", f"a {cls[1]}"]
    e = ea.elbo_loss(pipe, img, prompts, timesteps=ts)
    assert e.shape == (3,) and bool(torch.isfinite(e).all())
    assert e[0] == e[1]                                        # identical prompts, shared noise
    per_t = ea.elbo_loss(pipe, img, prompts, timesteps=ts, reduction="none")
    torch.testing.assert_close(per_t.mean(1), e, rtol=0, atol=1e-14)
    lp = ea.elbo_loss(pipe, img, prompts, timesteps=ts, weighting="lambda_prime")
    for w in ("eps", "x", "v", "score"):                       # eq 6 with Table I = eq 4
        torch.testing.assert_close(ea.elbo_loss(pipe, img, prompts, timesteps=ts, weighting=w),
                                   lp, rtol=1e-8, atol=1e-10)
    noise = torch.randn(len(ts), *ea._latents(pipe, img).shape[1:],
                        generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    torch.testing.assert_close(ea.elbo_loss(pipe, img, prompts, timesteps=ts, noise=noise), e)


@pytest.mark.parametrize("name", PIPES_SLOW)
def test_alignment_pipeline(pipes, name):
    pipe = pipes[name]
    img, cap, cls = _case(pipe, name)
    coll = [20, 100]
    H = ea.attention_alignment(pipe, img, cap, cls, collect_timesteps=coll)
    assert H.shape == (2, img.shape[0], img.shape[1])
    assert float(H.min()) >= 0 and float(H.max()) <= 1 + 1e-12
    H0 = ea.attention_alignment(pipe, img, cap, cls, collect_timesteps=coll, self_attention=False)
    assert H0.shape == H.shape
    # γ = 1: ELBO-T2IAlign's heatmaps are attention alone
    r = ea.elbo_t2ialign(pipe, img, cap, cls, gamma=1.0, timesteps=[1, 501],
                         collect_timesteps=coll, return_details=True)
    torch.testing.assert_close(r["heatmaps"], H, rtol=0, atol=1e-12)
    torch.testing.assert_close(r["output"].sum(0), torch.ones_like(H[0]), rtol=0, atol=1e-12)
    lab = ea.elbo_t2ialign(pipe, img, cap, cls, timesteps=[1, 501], collect_timesteps=coll,
                           readout="argmax_threshold", threshold=0.5)
    assert lab.shape == H.shape[1:] and lab.dtype == torch.long
    assert int(lab.min()) >= 0 and int(lab.max()) <= len(cls)


@pytest.mark.parametrize("name", PIPES)
def test_bad_input(pipes, name):
    pipe = pipes[name]
    img, cap, cls = _case(pipe, name)
    kw = dict(timesteps=[1], collect_timesteps=[20])
    with pytest.raises(ValueError, match="classes"):
        ea.elbo_t2ialign(pipe, img, cap, ["heptagon"], **kw)
    with pytest.raises(ValueError, match="classes"):
        ea.elbo_t2ialign(pipe, img, cap, [], **kw)
    with pytest.raises(ValueError, match="classes"):
        ea.attention_alignment(pipe, img, cap, [], collect_timesteps=[20])
    for g in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="gamma"):
            ea.elbo_t2ialign(pipe, img, cap, cls, gamma=g, **kw)
        with pytest.raises(ValueError, match="gamma"):
            ea.alignment_scores([0.1, 0.2], gamma=g)
    for ts in ([1000], [-1], []):
        with pytest.raises(ValueError, match="timesteps"):
            ea.elbo_loss(pipe, img, ["a " + cls[0]], timesteps=ts)
        with pytest.raises(ValueError, match="timesteps"):
            ea.elbo_t2ialign(pipe, img, cap, cls, timesteps=ts, collect_timesteps=[20])
    with pytest.raises(ValueError, match="collect_timesteps"):
        ea.attention_alignment(pipe, img, cap, cls, collect_timesteps=[5000])
    with pytest.raises(ValueError, match="readout"):
        ea.elbo_t2ialign(pipe, img, cap, cls, readout="max", **kw)


@pytest.mark.parametrize("name", PIPES_SLOW)
def test_reweighted_sampling_base_one_is_plain_ddim(pipes, name):
    from diffnotes.ddim import ddim_sample
    from diffnotes.editing.common import (encode_prompts, pipe_alphas_cumprod, pipe_eps_model,
                                          pipe_timesteps)
    from diffnotes.editing.inversion import decode_latents
    pipe = pipes[name]
    _, cap, cls = _case(pipe, name)
    s = pipe.unet.config.sample_size
    x = torch.randn(1, 4, s, s, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    img = ea.elbo_reweighted_sample(pipe, cap, cls, num_inference_steps=2, base=1.0, latents=x)
    eps_model = pipe_eps_model(pipe, encode_prompts(pipe, cap), encode_prompts(pipe, ""), 7.5)
    z = ddim_sample(eps_model, x, pipe_timesteps(pipe, 2), pipe_alphas_cumprod(pipe))
    ref = decode_latents(pipe, z).permute(0, 2, 3, 1).double().numpy()
    np.testing.assert_allclose(img, ref, rtol=0, atol=1e-10)
    img2, w = ea.elbo_reweighted_sample(pipe, cap, cls, num_inference_steps=2, base=1.2,
                                        latents=x, return_weights=True)
    assert w.shape == (2, len(cls)) and float(w.max()) <= 1.2 and float(w.min()) >= 1.0


@pytest.mark.parametrize("name", PIPES_SLOW)
def test_calibrated_swap_with_unit_scores_is_word_swap(pipes, name):
    from diffnotes.editing.p2p import WordSwap, prompt_to_prompt
    pipe = pipes[name]
    words = ["circle", "square"] if name == "shapes" else ["cat", "dog"]
    src = f"a red {words[0]} and a blue {words[1]}"
    tgt = src.replace("red", "green")
    s = pipe.unet.config.sample_size
    x = torch.randn(1, 4, s, s, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(num_inference_steps=2, latents=x, output_type="latent")
    a, _ = prompt_to_prompt(pipe, [src, tgt], WordSwap(), **kw)
    b, _ = prompt_to_prompt(pipe, [src, tgt], ea.ELBOCalibratedSwap(words, [1.0, 1.0]), **kw)
    assert torch.equal(a, b)
    c, _ = prompt_to_prompt(pipe, [src, tgt], ea.ELBOCalibratedSwap(words, [1.0, 1 / 3]), **kw)
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_flow_row_with_the_schedules_own_velocity_holds_for_any_schedule():
    """Table I's flow row read with u = α′x + σ′ε (the schedule's own velocity) holds for every
    schedule; read with u = ε − x (rectified flow's target) only for rectified flow."""
    import sympy as sp
    t = sp.symbols("t", positive=True)
    for a, s in ((sp.cos(sp.pi * t / 2), sp.sin(sp.pi * t / 2)), (1 - t, t),
                 (sp.sqrt(sp.exp(-t)), sp.sqrt(1 - sp.exp(-t)))):
        lam = 2 * sp.log(a / s)
        dlam = sp.diff(lam, t)
        k = sp.diff(s, t) - sp.diff(a, t) * s / a          # û − u = k δ
        w = ea.omega("flow", a, s, lam, dlam)
        assert sp.simplify((k ** 2 / w) / (-dlam) - 1) == 0


def test_paper_tables_cross_check():
    from diffnotes.recognition.eval_elbo_align import PAPER, PAPER_TABLE_IX_10_SMALL
    assert PAPER_TABLE_IX_10_SMALL == PAPER["elbo_even10"]      # Table IX "10 Small" = VII "Even"
    assert PAPER_TABLE_IX_10_SMALL != PAPER["elbo"]             # ≠ the 20-step default
    for k in (2, 3, 4):                                         # Table VIII: constant S < no ELB
        assert PAPER[f"const_S_{k}"]["VOC"] < PAPER["attention+self"]["VOC"]


@pytest.mark.parametrize("name", PIPES_SLOW)
def test_elbo_p2p_gamma_one_is_word_swap(pipes, name):
    from diffnotes.editing.p2p import WordSwap, prompt_to_prompt
    pipe = pipes[name]
    words = ["circle", "square"] if name == "shapes" else ["cat", "dog"]
    src = f"a red {words[0]} and a blue {words[1]}"
    tgt = src.replace("red", "green")
    s = pipe.unet.config.sample_size
    x = torch.randn(1, 4, s, s, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ims, _, S = ea.elbo_p2p(pipe, [src, tgt], words, gamma=1.0, latents=x, num_inference_steps=2,
                            elbo_steps=2)
    ref, _ = prompt_to_prompt(pipe, [src, tgt], WordSwap(), num_inference_steps=2, latents=x,
                              guidance_scale=7.5, cross_replace_steps=0.8, self_replace_steps=0.4)
    assert torch.equal(S, torch.ones(2, dtype=torch.float64))
    for a, b in zip(ims, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="gamma"):
        ea.elbo_p2p(pipe, [src, tgt], words, gamma=0.0, latents=x, num_inference_steps=2)
    with pytest.raises(ValueError, match="words"):
        ea.elbo_p2p(pipe, [src, tgt], ["heptagon"], latents=x, num_inference_steps=2)
