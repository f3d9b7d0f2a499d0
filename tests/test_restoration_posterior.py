"""Posterior-sampling restoration (Zhu's slides, *Sampling from the Posterior*): ILVR, RePaint, DPS,
ADIR against plain DDPM, closed forms on Gaussian / mixture priors, diffusers' RePaint schedule,
brute-force call counts and the notes' worked numbers."""
import pytest
import torch

from diffnotes.ddpm import ddpm_step
from diffnotes.models.gmm import GaussianMixture
from diffnotes.restoration import operators as ops
from diffnotes.restoration.posterior import (EVAL_CONFIGS, adir, default_timesteps, dps, ilvr,
                                             poisson_weights, repaint, repaint_schedule)
from diffnotes.schedules import alphas_cumprod, make_betas

D = 8


@pytest.fixture
def short():
    """A 40-step schedule (betas, alphas_cumprod) and a 3-component mixture prior in D = 8."""
    b = torch.linspace(1e-3, 0.25, 40, dtype=torch.float64)
    ac = alphas_cumprod(b)
    g = torch.Generator().manual_seed(3)
    gmm = GaussianMixture(torch.randn(3, D, generator=g, dtype=torch.float64), stds=0.4,
                          alphas_cumprod=ac)
    return b, ac, gmm


def _dense(seed=0, m=3):
    g = torch.Generator().manual_seed(seed)
    return ops.dense(torch.randn(m, D, generator=g, dtype=torch.float64))


def _ddpm_with(eps_model, x, betas, noises):
    """Plain ancestral DDPM over the full grid with the given per-step noises."""
    for k, t in enumerate(range(len(betas) - 1, -1, -1)):
        x = ddpm_step(eps_model, x, t, betas, noise=noises[k] if t > 0 else None)
    return x


def _xT(B=4, seed=11):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _record():
    rec = []
    return rec, rec.append


# ------------------------------------------------------------------------------------ ILVR
def test_ilvr_low_pass_band_equals_reference_at_every_step(short):
    """φ_N is a projector, so after each refinement φ(x_{t-1}) = φ(y_{t-1}) exactly, and at the end
    φ(x_0) = φ(A⁺y) (Choi et al. 2021, eq 8)."""
    _, ac, gmm = short
    A = _dense()
    y = A.A(gmm.sample(4, torch.Generator().manual_seed(1)))
    phi = lambda v: A.A_pinv(A.A(v))  # noqa: E731
    rec, cb = _record()
    x0 = ilvr(gmm.eps_model(), A, y, alphas_cumprod=ac, timesteps=list(range(39, -1, -1)),
              x_T=_xT(), generator=torch.Generator().manual_seed(0), progress=False, callback=cb)
    assert len(rec) == 40
    for r in rec:
        torch.testing.assert_close(phi(r["x_prev"]), phi(r["y_prev"]), rtol=0, atol=1e-12)
    torch.testing.assert_close(A.A(x0), y, rtol=0, atol=1e-12)
    # and the unmeasured part is not the reference's (the model fills it)
    assert float((x0 - phi(x0)).norm()) > 0.1


def test_ilvr_super_resolution_filter_is_down_then_up():
    """For average pooling, A⁺A is 'downsample then upsample' (nearest): the paper's φ_N."""
    sr = ops.super_resolution(4, size=16, channels=3)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 4), scale_factor=4,
                                          mode="nearest")
    torch.testing.assert_close(sr.A_pinv(sr.A(x)), ref, rtol=0, atol=1e-12)


def test_ilvr_scale_zero_is_the_unconditional_sampler(short):
    b, ac, gmm = short
    A = _dense()
    y = A.A(gmm.sample(4, torch.Generator().manual_seed(1)))
    rec, cb = _record()
    x0 = ilvr(gmm.eps_model(), A, y, alphas_cumprod=ac, timesteps=list(range(39, -1, -1)),
              x_T=_xT(), generator=torch.Generator().manual_seed(0), progress=False, callback=cb,
              scale=0.0)
    ref = _ddpm_with(gmm.eps_model(), _xT(), b, [r["noise"] for r in rec])
    assert float((x0 - ref).abs().max()) <= 1e-10


def test_ilvr_t_stop_leaves_the_late_steps_alone(short):
    _, ac, gmm = short
    A = _dense()
    y = A.A(gmm.sample(2, torch.Generator().manual_seed(1)))
    rec, cb = _record()
    ilvr(gmm.eps_model(), A, y, alphas_cumprod=ac, timesteps=list(range(39, -1, -1)),
         x_T=_xT(2), generator=torch.Generator().manual_seed(0), progress=False, callback=cb,
         t_stop=20)
    assert [r["y_prev"] is None for r in rec] == [t < 20 for t in range(39, -1, -1)]


# ------------------------------------------------------------------------------------ RePaint
def test_repaint_schedule_matches_diffusers():
    from diffusers import RePaintScheduler
    for n, j, r in [(20, 3, 2), (50, 5, 5), (250, 10, 10), (10, 1, 3)]:
        s = RePaintScheduler(num_train_timesteps=1000)
        s.set_timesteps(n, jump_length=j, jump_n_sample=r)
        assert repaint_schedule(n, j, r) == (s.timesteps // (1000 // n)).tolist()


def test_repaint_model_calls_match_the_jump_schedule(short):
    """Brute force: count ε-network calls; compare with the downward moves of the schedule and the
    closed form n + (r−1)·j·⌈(n−j)/j⌉."""
    _, ac, gmm = short
    mask = torch.zeros(D, dtype=torch.bool)
    mask[:3] = True
    y = mask * gmm.sample(2, torch.Generator().manual_seed(1))
    for n, j, r in [(40, 10, 10), (20, 3, 2), (40, 1, 1), (13, 4, 3)]:
        calls = []

        def counting(x, t):
            calls.append(int(t[0]))
            return gmm.eps(x, t)

        ts = default_timesteps(40, n)
        repaint(counting, None, y, alphas_cumprod=ac, timesteps=ts, x_T=_xT(2), mask=mask,
                generator=torch.Generator().manual_seed(0), progress=False, jump_length=j,
                jump_n_sample=r)
        sched = repaint_schedule(n, j, r)
        downs = sum(1 for a, b_ in zip([n] + sched[:-1], sched) if b_ < a)
        n_jumps = len(range(0, n - j, j)) if r > 1 else 0
        assert len(calls) == downs == n + (r - 1) * j * n_jumps
        assert calls[0] == ts[0] and calls[-1] == ts[-1]


def test_repaint_mask_all_known_returns_the_known_image(short):
    _, ac, gmm = short
    y = gmm.sample(3, torch.Generator().manual_seed(1))
    x0 = repaint(gmm.eps_model(), None, y, alphas_cumprod=ac, timesteps=default_timesteps(40, 20),
                 x_T=_xT(3), mask=torch.ones(D, dtype=torch.bool),
                 generator=torch.Generator().manual_seed(0), progress=False, jump_length=3,
                 jump_n_sample=3)
    assert torch.equal(x0, y)


def test_repaint_known_pixels_exact_for_any_mask(short):
    _, ac, gmm = short
    y0 = gmm.sample(3, torch.Generator().manual_seed(1))
    mask = torch.rand(D, generator=torch.Generator().manual_seed(2)) < 0.5
    x0 = repaint(gmm.eps_model(), None, mask * y0, alphas_cumprod=ac,
                 timesteps=default_timesteps(40, 20), x_T=_xT(3), mask=mask,
                 generator=torch.Generator().manual_seed(0), progress=False, jump_length=3,
                 jump_n_sample=3)
    torch.testing.assert_close(x0[:, mask], y0[:, mask], rtol=0, atol=1e-14)


def test_repaint_mask_none_known_one_sample_is_plain_ddpm(short):
    b, ac, gmm = short
    rec, cb = _record()
    x0 = repaint(gmm.eps_model(), None, torch.zeros(4, D, dtype=torch.float64), alphas_cumprod=ac,
                 timesteps=list(range(39, -1, -1)), x_T=_xT(), mask=torch.zeros(D, dtype=torch.bool),
                 generator=torch.Generator().manual_seed(0), progress=False, jump_n_sample=1,
                 callback=cb)
    ref = _ddpm_with(gmm.eps_model(), _xT(), b, [r["noise"] for r in rec])
    assert float((x0 - ref).abs().max()) <= 1e-10


def test_repaint_inpainting_operator_equals_explicit_mask(short):
    """Without a mask RePaint uses A⁺A; for the inpainting operator that is diag(m): same sampler."""
    _, ac, gmm = short
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :] = True
    op = ops.inpainting(mask[0, 0])
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = lambda v, t: 0.3 * v  # noqa: E731
    kw = dict(alphas_cumprod=ac, timesteps=default_timesteps(40, 10), progress=False,
              jump_length=2, jump_n_sample=2,
              x_T=torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64))
    a = repaint(eps, op, op.A(x), generator=torch.Generator().manual_seed(5), **kw)
    b_ = repaint(eps, op, op.A(x), mask=mask, generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(a, b_, rtol=0, atol=1e-13)


def test_repaint_known_region_uses_the_previous_level(short):
    """Erratum check: the known region is drawn from q(x_{t-1} | y): mean √ᾱ_{t-1} y and standard
    deviation √(1−ᾱ_{t-1}); the slide's √α_t y + (1−ᾱ_t) ε has the wrong spread."""
    _, ac, _ = short
    n = 20000
    y = torch.full((1, n), 0.5, dtype=torch.float64)
    mask = torch.ones(n, dtype=torch.bool)
    rec, cb = _record()
    ts = list(range(39, -1, -1))
    repaint(lambda x, t: torch.zeros_like(x), None, y, alphas_cumprod=ac, timesteps=ts,
            x_T=torch.zeros(1, n, dtype=torch.float64), mask=mask,
            generator=torch.Generator().manual_seed(0), progress=False, jump_n_sample=1, callback=cb)
    for r, t in zip(rec[:-1], ts):
        a_prev, a_t = float(ac[t - 1]), float(ac[t])
        k = r["known"]
        assert abs(float(k.mean()) - a_prev ** 0.5 * 0.5) < 0.03
        std = float(k.std())
        assert abs(std / (1 - a_prev) ** 0.5 - 1) < 0.03
        slide = 1 - a_t
        if abs(slide / (1 - a_prev) ** 0.5 - 1) > 0.1:
            assert abs(std / slide - 1) > 0.06


# ------------------------------------------------------------------------------------ DPS
def test_dps_zeta_zero_is_plain_ddpm(short):
    b, ac, gmm = short
    A = _dense()
    y = A.A(gmm.sample(4, torch.Generator().manual_seed(1)))
    rec, cb = _record()
    x0 = dps(gmm.eps_model(), A, y, alphas_cumprod=ac, x_T=_xT(), zeta=0.0,
             generator=torch.Generator().manual_seed(0), progress=False, callback=cb)
    ref = _ddpm_with(gmm.eps_model(), _xT(), b, [r["noise"] for r in rec])
    assert len(rec) == 40 and float((x0 - ref).abs().max()) <= 1e-10
    # without a callback the ζ = 0 sampler draws the same noise: identical output
    x1 = dps(gmm.eps_model(), A, y, alphas_cumprod=ac, x_T=_xT(), zeta=0.0,
             generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(x0, x1)


def _mixture_tweedie_jacobian(gmm, x, a):
    """∂E[x_0 | x_t]/∂x_t = √ᾱ/(1−ᾱ) Cov[x_0 | x_t] in closed form (per row), for the mixture."""
    v = a * gmm.stds ** 2 + 1 - a                                   # (K, D)
    r = gmm.class_posterior(x, a)                                    # (B, K)
    m_c = gmm.means[None] + (a ** 0.5 * gmm.stds ** 2 / v)[None] * (x[:, None] - a ** 0.5 * gmm.means[None])
    var_c = gmm.stds ** 2 * (1 - a) / v                              # (K, D)
    m = (r[:, :, None] * m_c).sum(1)
    second = torch.einsum("bk,bki,bkj->bij", r, m_c, m_c) + \
        torch.einsum("bk,ki->bi", r, var_c).diag_embed()
    cov = second - m[:, :, None] * m[:, None, :]
    return a ** 0.5 / (1 - a) * cov, m


def test_dps_gradient_equals_closed_form_on_gaussian_and_mixture(short):
    """∇_x ‖y − A x̂_0(x)‖² = −2 J(x)ᵀ Aᵀ(y − A x̂_0), J = √ᾱ s²/v · I for a Gaussian prior
    N(μ, s² I) and √ᾱ/(1−ᾱ) Cov[x_0|x_t] for the mixture: autograd through the exact ε* agrees."""
    _, ac, gmm = short
    A = _dense()
    y = A.A(gmm.sample(4, torch.Generator().manual_seed(1)))
    M = A.A(torch.eye(D, dtype=torch.float64)).T                     # (m, D) matrix of the operator
    g1 = GaussianMixture(gmm.means[:1], stds=0.7, alphas_cumprod=ac)
    for prior in (g1, gmm):
        rec, cb = _record()
        dps(prior.eps_model(), A, y, alphas_cumprod=ac, x_T=_xT(), zeta=0.5,
            generator=torch.Generator().manual_seed(0), progress=False, callback=cb)
        for r in rec[::7]:
            a = float(ac[r["t"]])
            J, mean = _mixture_tweedie_jacobian(prior, r["x"], a)
            torch.testing.assert_close(r["x0_hat"], mean, rtol=0, atol=1e-10)  # Tweedie
            res = y - r["x0_hat"] @ M.T
            closed = -2 * torch.einsum("bji,bj->bi", J, res @ M)
            torch.testing.assert_close(r["grad"], closed, rtol=1e-9, atol=1e-10)
            if prior is g1:
                s2, v = 0.49, a * 0.49 + 1 - a
                torch.testing.assert_close(J[0], a ** 0.5 * s2 / v * torch.eye(D, dtype=torch.float64))


def test_dps_tweedie_erratum(short):
    """x̂_0 = (x + (1−ᾱ) ŝ)/√ᾱ is E[x_0 | x_t] for a Gaussian; the slide's √(1−ᾱ) ŝ is not."""
    _, ac, _ = short
    g1 = GaussianMixture(torch.full((1, D), 0.3, dtype=torch.float64), stds=0.7, alphas_cumprod=ac)
    x = _xT()
    t = 20
    a = float(ac[t])
    s = g1.score(x, t)
    exact = 0.3 + a ** 0.5 * 0.49 / (a * 0.49 + 1 - a) * (x - a ** 0.5 * 0.3)
    torch.testing.assert_close((x + (1 - a) * s) / a ** 0.5, exact, rtol=0, atol=1e-12)
    assert float(((x + (1 - a) ** 0.5 * s) / a ** 0.5 - exact).abs().max()) > 0.05


def test_dps_worked_numbers_identity_operator(linear_schedule):
    """The notes' worked numbers: prior N(0, I) in d = 16, A = I, σ_y = 0, T = 1000: ‖x_0 − y‖/‖y‖
    ≈ 0.017 at ζ' = 0.1 (< 0.05), ≈ 1.4 at ζ' = 0, and larger steps overshoot (≈ 0.1 at 0.5)."""
    _, ac = linear_schedule
    g = GaussianMixture(torch.zeros(1, 16, dtype=torch.float64), stds=1.0, alphas_cumprod=ac)
    y = torch.randn(1, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = {}
    for z in (0.0, 0.1, 0.5):
        x = dps(g.eps_model(), ops.denoising((16,)), y, alphas_cumprod=ac, zeta=z,
                generator=torch.Generator().manual_seed(1), progress=False)
        err[z] = float((x - y).norm() / y.norm())
    assert err[0.1] < 0.05 and abs(err[0.1] - 0.017) < 0.005
    assert err[0.0] > 1.0
    assert err[0.1] < err[0.5] < err[0.0]


# ------------------------------------------------------------------------------------ ADIR
def test_adir_zero_weights_and_zero_scale_are_unguided(short):
    b, ac, gmm = short
    A = _dense()
    y = A.A(gmm.sample(4, torch.Generator().manual_seed(1)))
    for kw in (dict(weights=torch.zeros(3, dtype=torch.float64)), dict(scale=0.0)):
        rec, cb = _record()
        x0 = adir(gmm.eps_model(), A, y, alphas_cumprod=ac, timesteps=list(range(39, -1, -1)),
                  x_T=_xT(), generator=torch.Generator().manual_seed(0), progress=False,
                  callback=cb, **kw)
        ref = _ddpm_with(gmm.eps_model(), _xT(), b, [r["noise"] for r in rec])
        assert float((x0 - ref).abs().max()) <= 1e-10


def test_adir_g_is_the_gradient_of_the_weighted_loss(short):
    _, ac, gmm = short
    A = _dense()
    y = A.A(gmm.sample(4, torch.Generator().manual_seed(1))).abs() + 0.1
    lam = poisson_weights(y)
    rec, cb = _record()
    adir(gmm.eps_model(), A, y, alphas_cumprod=ac, timesteps=default_timesteps(40, 10), x_T=_xT(),
         generator=torch.Generator().manual_seed(0), progress=False, callback=cb, weights="poisson")
    for r in rec:
        mu = r["mu"].clone().requires_grad_(True)
        L = -(lam * (A.A(mu) - r["y_t"]) ** 2).sum()
        torch.testing.assert_close(r["g"], torch.autograd.grad(L, mu)[0], rtol=1e-12, atol=1e-12)


def test_adir_one_step_worked_numbers():
    """One step by hand: D = 2, A = [1, 1], ε̂ ≡ (0.5, −0.5), ᾱ_t = 0.5 → ᾱ_prev = 0.8 (the last
    step of a two-step grid is the clean level, so take the first). x_t = (1, 0), y = 2, s = 3.
    β = 1 − 0.5/0.8 = 0.375, x̂_0 = (x − √0.5 ε̂)/√0.5, μ̂ = μ̃(x_t, x̂_0), Σ̂ = 0.2/0.5·0.375 = 0.15,
    y_t = √0.5·2 + √0.5·0 = √2, g = −2 Aᵀ(A μ̂ − y_t)."""
    ac = torch.tensor([0.8, 0.5], dtype=torch.float64)
    A = ops.dense(torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    eps = lambda x, t: torch.tensor([[0.5, -0.5]], dtype=torch.float64).expand_as(x)  # noqa: E731
    x_t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    rec, cb = _record()
    adir(eps, A, torch.tensor([[2.0]], dtype=torch.float64), alphas_cumprod=ac, timesteps=[1, 0],
         x_T=x_t, generator=torch.Generator().manual_seed(0), progress=False, callback=cb, scale=3.0)
    r = rec[0]
    x0 = (x_t - 0.5 ** 0.5 * torch.tensor([[0.5, -0.5]])) / 0.5 ** 0.5     # (0.9142, 0.5)
    mu = (0.8 ** 0.5 * 0.375 / 0.5) * x0 + (0.625 ** 0.5 * 0.2 / 0.5) * x_t
    torch.testing.assert_close(r["mu"], mu.double())
    assert abs(float(r["y_t"]) - 2 ** 0.5) < 1e-14
    g = -2 * (float(mu.sum()) - 2 ** 0.5)
    torch.testing.assert_close(r["g"], torch.tensor([[g, g]], dtype=torch.float64))
    mean = mu.double() + 3.0 * 0.15 * torch.tensor([[g, g]], dtype=torch.float64)
    torch.testing.assert_close(r["x_prev"] - 0.15 ** 0.5 * r["noise"], mean)
    # the numbers themselves (by hand): μ̂ = (0.929501, 0.335410), A μ̂ = 1.264911 < y_t = 1.414214,
    # so g = −2(1.264911 − 1.414214) = +0.298605 pushes both coordinates up
    torch.testing.assert_close(r["mu"], torch.tensor([[0.929501, 0.335410]], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert abs(float(r["g"][0, 0]) - 0.298605) < 1e-6


def test_adir_lambda_index_erratum():
    """[Λ]_ii = 1/(2 y_i) makes ‖y − λ‖²_Λ the second-order Poisson NLL around λ = y, entry by
    entry; pairing each residual with another entry's y (the slide's j) does not."""
    g = torch.Generator().manual_seed(0)
    y = torch.rand(64, generator=g, dtype=torch.float64) * 99 + 1
    lam = y * (1 + 0.01 * torch.randn(64, generator=g, dtype=torch.float64))
    exact = (lam - y * torch.log(lam)) - (y - y * torch.log(y))      # per-entry Poisson NLL gap
    quad_i = poisson_weights(y) * (y - lam) ** 2
    quad_j = poisson_weights(y.roll(1)) * (y - lam) ** 2
    assert float((quad_i / exact - 1).abs().max()) < 0.02
    assert float((quad_j / exact - 1).abs().max()) > 1.0


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_argument(short):
    _, ac, gmm = short
    A = _dense()
    y = torch.zeros(2, 3, dtype=torch.float64)
    kw = dict(alphas_cumprod=ac, progress=False, timesteps=default_timesteps(40, 10))
    with pytest.raises(ValueError, match="zeta"):
        dps(gmm.eps_model(), A, y, zeta=-1.0, **kw)
    with pytest.raises(ValueError, match="sigma_y"):
        dps(gmm.eps_model(), A, y, -0.1, **kw)
    with pytest.raises(ValueError, match="sigma_y"):
        ilvr(gmm.eps_model(), A, y, -0.1, **kw)
    yi = torch.zeros(2, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="jump_length"):
        repaint(gmm.eps_model(), None, yi, mask=torch.ones(D, dtype=torch.bool), jump_length=10, **kw)
    with pytest.raises(ValueError, match="mask"):
        repaint(gmm.eps_model(), None, yi, mask=torch.ones(D), **kw)
    with pytest.raises(ValueError, match="mask"):
        repaint(gmm.eps_model(), None, yi, mask=torch.ones(D + 1, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="timesteps"):
        adir(gmm.eps_model(), A, y, **{**kw, "timesteps": [3, 5]})
    with pytest.raises(ValueError, match="weights"):
        adir(gmm.eps_model(), A, y, weights="laplace", **kw)
    with pytest.raises(TypeError, match="eps_model"):
        ilvr(3, A, y, **kw)


def test_eval_configs_follow_the_contract():
    assert set(EVAL_CONFIGS) == {"ilvr", "repaint", "dps", "adir"}
    for name, cfg in EVAL_CONFIGS.items():
        assert callable(cfg["fn"]) and cfg["fn"].__name__ == name
        assert isinstance(cfg["kwargs"], dict) and cfg["steps"] > 0 and cfg["note"]


def test_dps_explorer_static_twin_has_one_frame_per_zeta():
    from diffnotes.widgets import StaticExplorer
    from diffnotes.widgets.restoration import dps_explorer, dps_sweep
    ac = alphas_cumprod(make_betas("linear", 1000))
    eps = lambda x, t: 0.1 * x  # noqa: E731
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    op = ops.super_resolution(2, size=8)
    sw = dps_sweep(eps, op, x, op.A(x), ac, zetas=(0.0, 1.0), steps=3)
    assert sw["consistency"][1] < sw["consistency"][0]      # the guidance pulls towards y
    ex = dps_explorer(eps, op, x, op.A(x), ac, zetas=(0.0, 1.0), steps=3, live=False, sweep=sw)
    assert isinstance(ex, StaticExplorer) and len(ex.frames) == 2
    with pytest.raises(ValueError, match="zetas"):
        dps_explorer(eps, op, x, op.A(x), ac, zetas=(-1.0,), live=False)
