"""CCDF, SDEdit-for-restoration and SR3 (diffnotes.restoration.conditional, .sr3).

Peers and exact properties: CCDF without its data step is SDEdit's core (bitwise), CCDF with an
uninformative operator is SDEdit (≤ 1e-10), CCDF from t₀ = T − 1 is ILVR on the same grid
(≤ 1e-10), the data step makes A x̂ = y exactly, and the stochastic contraction on the exact
Gaussian-mixture denoiser: two initial estimates' distance shrinks by more than √ᾱ_{t₀}.
"""
import pytest
import torch
from diffusers import UNet2DModel

from diffnotes.ddim import ddim_sample
from diffnotes.ddpm import q_sample
from diffnotes.editing.sdedit import sdedit_sample
from diffnotes.models.gmm import GaussianMixture
from diffnotes.restoration import operators as ops
from diffnotes.restoration.conditional import (EVAL_CONFIGS, ccdf, ccdf_timesteps,
                                               data_consistency, initial_estimate,
                                               sdedit_restore, sr3)
from diffnotes.restoration.posterior import ilvr


def G(seed=5):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def problem():
    from diffnotes.schedules import alphas_cumprod, make_betas
    ac = alphas_cumprod(make_betas("linear"))
    g = G(0)
    D = 8
    gm = GaussianMixture(torch.randn(4, D, generator=g, dtype=torch.float64), stds=0.3,
                         alphas_cumprod=ac)
    op = ops.dense(torch.randn(3, D, generator=g, dtype=torch.float64))
    x = gm.sample(32, generator=g)
    return dict(ac=ac, eps=gm.eps_model(), op=op, x=x, y=op.A(x), gm=gm)


def _tiny_unet(in_channels=3):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=3,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=8).double().eval()


def test_ccdf_timesteps():
    assert ccdf_timesteps(1000, 299) == [299] + list(range(290, -1, -10))
    assert ccdf_timesteps(1000, 999, list(range(999, -1, -111))) == list(range(999, -1, -111))
    with pytest.raises(ValueError, match="t0"):
        ccdf_timesteps(1000, 1000)


def test_ccdf_without_data_step_is_sdedit_core_bitwise(problem):
    p = problem
    for eta in (0.0, 1.0):
        out = ccdf(p["eps"], p["op"], p["y"], alphas_cumprod=p["ac"], t0=399, eta=eta,
                   data_step=False, generator=G())
        ref = sdedit_sample(p["eps"], p["op"].A_pinv(p["y"]), ccdf_timesteps(1000, 399),
                            p["ac"], eta=eta, generator=G())
        assert torch.equal(out, ref)
        base = sdedit_restore(p["eps"], p["op"], p["y"], alphas_cumprod=p["ac"], t0=399,
                              eta=eta, generator=G())
        assert torch.equal(out, base)


def test_sdedit_core_on_pixels_is_qsample_then_ddim():
    """The one SDEdit implementation on pixels: q_sample to t₀, then DDIM on the rest (η = 0)."""
    unet = _tiny_unet()
    eps = lambda x, t: unet(x, t).sample  # noqa: E731
    from diffnotes.schedules import alphas_cumprod, make_betas
    ac = alphas_cumprod(make_betas("linear"))
    x0 = torch.rand(2, 3, 8, 8, generator=G(1), dtype=torch.float64) * 2 - 1
    ts = [599, 400, 200, 0]
    out = sdedit_sample(eps, x0, ts, ac, generator=G(2))
    e = torch.randn(x0.shape, generator=G(2), dtype=x0.dtype)
    ref = ddim_sample(eps, q_sample(x0, 599, ac, e), ts, ac)
    assert torch.equal(out, ref)
    # a mask of ones is the unmasked edit, a mask of zeros returns x0 exactly
    assert torch.equal(sdedit_sample(eps, x0, ts, ac, generator=G(2), mask=torch.ones(1, 1, 8, 8,
                                                                                 dtype=x0.dtype)),
                       out)
    assert torch.equal(sdedit_sample(eps, x0, ts, ac, generator=G(2),
                                     mask=torch.zeros(1, 1, 8, 8, dtype=x0.dtype)), x0)


def test_ccdf_with_an_uninformative_operator_is_sdedit(problem):
    """A = 0 measures nothing: the data step adds A⁺(A k − A x) = 0, so CCDF = SDEdit (η = 0)."""
    p = problem
    op0 = ops.dense(torch.zeros(3, 8, dtype=torch.float64))
    y0 = op0.A(p["x"])
    init = p["op"].A_pinv(p["y"])
    out = ccdf(p["eps"], op0, y0, alphas_cumprod=p["ac"], t0=499, init=init, eta=0.0,
               generator=G())
    ref = sdedit_restore(p["eps"], op0, y0, alphas_cumprod=p["ac"], t0=499, init=init, eta=0.0,
                         generator=G())
    assert (out - ref).abs().max().item() <= 1e-10
    # while with the real operator the data step changes the result
    real = ccdf(p["eps"], p["op"], p["y"], alphas_cumprod=p["ac"], t0=499, init=init, eta=0.0,
                generator=G())
    assert (real - ref).abs().max().item() > 1e-2


def test_ccdf_from_T_minus_1_is_ilvr(problem):
    """t₀ = T − 1 with the whole grid: CCDF is ILVR (Choi et al. 2021, a = 1, φ = A⁺A) started
    from the forward-diffused estimate — the full sampler (DDIM η = 1 = DDPM on the grid)."""
    p = problem
    ts = list(range(999, -1, -20))
    out = ccdf(p["eps"], p["op"], p["y"], alphas_cumprod=p["ac"], timesteps=ts, t0=999,
               generator=G())
    g = G()
    x_init = p["op"].A_pinv(p["y"])
    x_T = q_sample(x_init, 999, p["ac"], torch.randn(x_init.shape, generator=g,
                                                     dtype=x_init.dtype))
    ref = ilvr(p["eps"], p["op"], p["y"], alphas_cumprod=p["ac"], timesteps=ts, x_T=x_T,
               generator=g, progress=False)
    assert (out - ref).abs().max().item() <= 1e-10


def test_ccdf_is_data_consistent_and_better_than_its_start(problem):
    p = problem
    out = ccdf(p["eps"], p["op"], p["y"], alphas_cumprod=p["ac"], t0=299, generator=G())
    assert (p["op"].A(out) - p["y"]).abs().max().item() < 1e-10          # A x̂ = y exactly
    sd = sdedit_restore(p["eps"], p["op"], p["y"], alphas_cumprod=p["ac"], t0=299, generator=G())
    assert (p["op"].A(sd) - p["y"]).norm(dim=1).mean().item() > 0.1      # SDEdit is not
    init = p["op"].A_pinv(p["y"])
    mse = lambda a: ((a - p["x"]) ** 2).sum(1).mean().item()  # noqa: E731
    assert mse(out) < 0.8 * mse(init)


@pytest.mark.parametrize("strength", [0.1, 0.3, 0.6])
def test_stochastic_contraction(problem, strength):
    """Chung et al. 2022, Theorem 1: two initial estimates x_a, x_b (differing in A's null space)
    run with the same noise end closer than √ᾱ_{t₀}‖x_a − x_b‖ (the forward diffusion shrinks the
    gap by √ᾱ_{t₀}, the reverse steps with the non-expansive data step do not widen it)."""
    p = problem
    ac = p["ac"]
    t0 = round(strength * 1000) - 1
    xa = p["op"].A_pinv(p["y"])
    xb = xa + p["op"].project_null(torch.randn(xa.shape, generator=G(9), dtype=xa.dtype))
    oa = ccdf(p["eps"], p["op"], p["y"], alphas_cumprod=ac, t0=t0, init=xa, generator=G())
    ob = ccdf(p["eps"], p["op"], p["y"], alphas_cumprod=ac, t0=t0, init=xb, generator=G())
    ratio = ((oa - ob).norm(dim=1) / (xa - xb).norm(dim=1)).mean().item()
    assert ratio < ac[t0].sqrt().item()
    assert ratio < 1.0


def test_data_consistency_step_replaces_the_measured_part(problem):
    p = problem
    step = data_consistency(p["op"], p["y"], p["ac"], G())
    x = torch.randn(p["x"].shape, generator=G(3), dtype=torch.float64)
    out = step(x, 0, None)                              # at the clean end: A x = y
    assert (p["op"].A(out) - p["y"]).abs().max().item() < 1e-12
    assert torch.allclose(p["op"].project_null(out), p["op"].project_null(x), atol=1e-12)
    # on images: super-resolution's P = upsample∘pool keeps the high frequencies of x
    sr = ops.super_resolution(4, size=8, channels=3)
    xi = torch.rand(2, 3, 8, 8, generator=G(4), dtype=torch.float64)
    yi = sr.A(torch.rand(2, 3, 8, 8, generator=G(5), dtype=torch.float64))
    oi = data_consistency(sr, yi, p["ac"])(xi, 0, None)
    assert (sr.A(oi) - yi).abs().max().item() < 1e-12
    assert torch.allclose(oi - sr.A_pinv(sr.A(oi)), xi - sr.A_pinv(sr.A(xi)), atol=1e-12)


def test_initial_estimate_options(problem):
    p = problem
    assert torch.equal(initial_estimate(p["op"], p["y"]), p["op"].A_pinv(p["y"]))
    assert torch.equal(initial_estimate(p["op"], p["y"], p["x"]), p["x"])
    assert torch.equal(initial_estimate(p["op"], p["y"], lambda op, y: 2 * op.A_pinv(y)),
                       2 * p["op"].A_pinv(p["y"]))


def test_ccdf_bad_arguments(problem):
    p = problem
    kw = dict(alphas_cumprod=p["ac"])
    with pytest.raises(TypeError, match="operator"):
        ccdf(p["eps"], "blur", p["y"], **kw)
    with pytest.raises(TypeError, match="eps_model"):
        ccdf(3, p["op"], p["y"], **kw)
    with pytest.raises(ValueError, match="strength"):
        ccdf(p["eps"], p["op"], p["y"], strength=1.5, **kw)
    with pytest.raises(ValueError, match="t0"):
        ccdf(p["eps"], p["op"], p["y"], t0=1000, **kw)
    with pytest.raises(ValueError, match="weight"):
        ccdf(p["eps"], p["op"], p["y"], weight=2.0, **kw)
    with pytest.raises(ValueError, match="sigma_y"):
        ccdf(p["eps"], p["op"], p["y"], -1.0, **kw)


def test_sr3_concatenates_the_upsampled_input_and_samples_like_ddim():
    from diffnotes.restoration import sr3 as S
    from diffnotes.schedules import alphas_cumprod, make_betas
    ac = alphas_cumprod(make_betas("linear"))
    unet = _tiny_unet(in_channels=6)
    f = S.sr3_eps_model(unet)
    seen = []

    def spy(x, t, cond):
        seen.append(cond)
        return f(x, t, cond)
    op = ops.super_resolution(4, size=8, channels=3)
    x = torch.rand(2, 3, 8, 8, generator=G(1), dtype=torch.float64) * 2 - 1
    y = op.A(x)
    ts = [999, 500, 0]
    out = sr3(spy, op, y, alphas_cumprod=ac, timesteps=ts, generator=G(2))
    cond = S.condition(y, 8)
    assert all(torch.equal(c, cond) for c in seen) and len(seen) == 3
    assert cond.shape == (2, 3, 8, 8)
    x_T = torch.randn((2, 3, 8, 8), generator=G(2), dtype=torch.float64)
    g = G(2)
    torch.randn((2, 3, 8, 8), generator=g, dtype=torch.float64)
    ref = ddim_sample(lambda xx, t: unet(torch.cat([xx, cond], 1), t).sample, x_T, ts, ac,
                      eta=1.0, generator=g, clip_sample=True)
    assert torch.equal(out, ref)
    assert out.abs().max().item() <= 1.0 + 1e-12
    with pytest.raises(ValueError, match="operator"):
        sr3(spy, ops.super_resolution(2, size=8, channels=3), y, alphas_cumprod=ac)


def test_sr3_training_pairs_use_the_operator():
    """The training condition is bicubic(A x) with A the evaluation's average pooling ×4."""
    from diffnotes.restoration import sr3 as S
    x8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x0, cond = S._sr3_batch(x8, G(0))
    op = ops.super_resolution(4, size=32, channels=3)
    assert torch.allclose(cond, S.condition(op.A(x0), 32), atol=1e-6)
    nearest = S.condition(op.A(x0), 32, mode="nearest")
    assert torch.allclose(nearest, op.A_pinv(op.A(x0)), atol=1e-6)       # A⁺ = nearest ×4


def test_eval_configs_follow_the_contract():
    assert {"ccdf", "sdedit", "sr3"} <= set(EVAL_CONFIGS)
    for cfg in EVAL_CONFIGS.values():
        assert callable(cfg["fn"]) and isinstance(cfg["kwargs"], dict) and cfg["note"]
        assert isinstance(cfg["steps"], int)
    assert EVAL_CONFIGS["sr3"]["tasks"] == ("sr4",)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_contraction_factor_on_a_standard_normal_prior(eta):
    """For the prior N(0, I), E[x₀ | x_t] = √ᾱ_t x_t and each reverse step is affine in x_t: with
    η = 1 (ancestral) its slope is √(ᾱ_t/ᾱ_t'), so the chain from t₀ multiplies the gap between
    two starts by √ᾱ_{t₀} and, with the forward diffusion, the gap of two initial estimates
    shrinks by exactly ᾱ_{t₀}: the stochastic contraction. With η = 0 (DDIM) the slope is
    √(ᾱ_t ᾱ_t') + √((1−ᾱ_t)(1−ᾱ_t')) = cos(θ_t − θ_t') ≈ 1: the deterministic sampler barely
    contracts, only the forward factor √ᾱ_{t₀} remains."""
    from diffnotes.schedules import alphas_cumprod, make_betas
    ac = alphas_cumprod(make_betas("linear"))
    gm = GaussianMixture(torch.zeros(1, 5, dtype=torch.float64), stds=1.0, alphas_cumprod=ac)
    xa = torch.randn(3, 5, generator=G(1), dtype=torch.float64)
    xb = torch.randn(3, 5, generator=G(2), dtype=torch.float64)
    for t0 in (99, 299, 599):
        ts = ccdf_timesteps(1000, t0, num_steps=50)
        oa = sdedit_sample(gm.eps_model(), xa, ts, ac, eta=eta, generator=G())
        ob = sdedit_sample(gm.eps_model(), xb, ts, ac, eta=eta, generator=G())
        a = [ac[t].item() for t in ts] + [1.0]
        if eta == 1.0:
            factor = ac[t0].item()
        else:
            factor = a[0] ** 0.5
            for u, v in zip(a[:-1], a[1:]):
                factor *= (u * v) ** 0.5 + ((1 - u) * (1 - v)) ** 0.5
            assert factor > 0.95 * a[0] ** 0.5
        torch.testing.assert_close(oa - ob, factor * (xa - xb), rtol=1e-9, atol=1e-11)
