"""DDRM, DDNM/DDNM+, DiffPIR and DMPS (diffnotes.restoration.linear): exact no-op and limit
properties, closed forms against dense linear algebra and autograd, the slides' worked numbers and
errata, and posterior means against the exact posterior of a Gaussian mixture."""
import math

import pytest
import torch

from diffnotes.ddim import ddim_sample, ddim_sigma, ddim_step
from diffnotes.ddpm import ddpm_sample
from diffnotes.models.gmm import GaussianMixture
from diffnotes.restoration import evaluate as E
from diffnotes.restoration import linear as L
from diffnotes.restoration import operators as ops
from diffnotes.schedules import alphas_cumprod as cumprod
from diffnotes.schedules import make_betas

#: float64 as the default dtype inside this module's tests (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("float64_default")
AC = cumprod(make_betas("linear", T=1000))
TS = list(range(0, 1000, 50))[::-1]                      # 20 steps

def _gen(seed):
    return torch.Generator().manual_seed(seed)

def _mixture(D=6, seed=0, K=3):
    g = _gen(seed)
    return GaussianMixture(torch.randn(K, D, generator=g), stds=0.3 + 0.2 * torch.rand(K, generator=g),
                           alphas_cumprod=AC)

def _model(gm, x_shape):
    return E.gmm_eps_model(gm, x_shape)

# ---------------------------------------------------------------------------- DDRM
def test_ddrm_identity_noiseless_returns_y():
    gm = _mixture()
    op = ops.denoising((6,))
    y = gm.sample(5, generator=_gen(1))
    x = L.ddrm(_model(gm, op.x_shape), op, y, 0.0, alphas_cumprod=AC, timesteps=TS,
               generator=_gen(2), progress=False, eta=0.85, eta_b=1.0)
    assert float((x - y).abs().max()) < 1e-12

def test_ddrm_with_zero_operator_is_ddim():
    gm = _mixture()
    m = _model(gm, (1, 2, 3))
    op = ops.inpainting(torch.zeros(2, 3, dtype=torch.bool), channels=1)   # A = 0, V = I
    y = torch.zeros(4, 1, 2, 3)
    xT = torch.randn(4, 1, 2, 3, generator=_gen(3))
    ref = ddim_sample(m, xT, TS, AC, eta=0.0)
    x = L.ddrm(m, op, y, 0.0, alphas_cumprod=AC, timesteps=TS, x_T=xT, generator=_gen(4),
               progress=False, eta=0.0)
    assert float((x - ref).abs().max()) < 1e-10
    # η > 0: DDRM's noise η √(1 − ᾱ_prev) is DDIM's σ_t(η') for a per-step η'
    g1, g2 = _gen(5), _gen(5)
    x = L.ddrm(m, op, y, 0.0, alphas_cumprod=AC, timesteps=TS, x_T=xT, generator=g1,
               progress=False, eta=0.85)
    ref = xT
    for i, t in enumerate(TS):
        a = float(AC[t])
        ap = float(AC[TS[i + 1]]) if i + 1 < len(TS) else 1.0
        z = torch.randn(ref.shape, generator=g2)
        eps = m(ref, torch.full((4,), t))
        base = ddim_sigma(a, ap, 1.0)
        eta_ddim = 0.85 * (1 - ap) ** 0.5 / base if base > 0 else 0.0
        ref = ddim_step(ref, eps, a, ap, eta_ddim, z if eta_ddim > 0 else None)
    assert float((x - ref).abs().max()) < 1e-10
    dense0 = ops.dense(torch.zeros(2, 6))                 # any V: the η = 0 path is the same
    x6 = L.ddrm(_model(gm, (6,)), dense0, torch.zeros(4, 2), 0.0, alphas_cumprod=AC,
                timesteps=TS, x_T=xT.reshape(4, 6), progress=False, eta=0.0)
    assert float((x6 - ddim_sample(_model(gm, (6,)), xT.reshape(4, 6), TS, AC)).abs().max()) < 1e-10

def test_ddrm_inpainting_keeps_the_observed_pixels():
    gm = _mixture()
    mask = torch.tensor([[True, False, True], [False, True, True]])
    op = ops.inpainting(mask, channels=1)
    x0 = gm.sample(3, generator=_gen(6)).reshape(3, 1, 2, 3)
    y = op.A(x0)
    x = L.ddrm(_model(gm, op.x_shape), op, y, 0.0, alphas_cumprod=AC, timesteps=TS,
               generator=_gen(7), progress=False)
    assert float((x - x0)[:, :, mask].abs().max()) < 1e-12
    assert float((x - x0)[:, :, ~mask].abs().max()) > 1e-3          # the rest is generated

def test_ddrm_step_cases_and_variances():
    s = torch.tensor([[0.0, 2.0, 0.5]])
    x0b, eb, yb, zb = (torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[1.0, -1.0, 0.5]]),
                       torch.tensor([[0.0, 0.4, -0.2]]), torch.tensor([[0.3, -0.7, 1.1]]))
    sig, sy, eta, eb_ = 0.1, 0.1, 0.85, 1.0
    out = L.ddrm_step(None, x0b, eb, yb, s, sig, sy, eta, eb_, zb)
    c = (1 - eta ** 2) ** 0.5
    exp0 = 0.1 + c * sig * 1.0 + eta * sig * 0.3                           # s = 0
    exp1 = 0.4 + (sig ** 2 - (sy / 2) ** 2) ** 0.5 * -0.7                   # σ ≥ σ_y/s: y
    exp2 = 0.3 + c * sig * (-0.2 - 0.3) / (sy / 0.5) + eta * sig * 1.1      # σ < σ_y/s
    assert torch.allclose(out, torch.tensor([[exp0, exp1, exp2]]), atol=1e-15)

# ---------------------------------------------------------------------------- DiffPIR
@pytest.mark.parametrize("rho, exact, approx", [
    (0.5, (0.7333, -0.1333), (1.8, 0.4)),
    (5.0, (0.3333, -0.3333), (0.36, -0.32)),
    (50.0, (0.215686, -0.392157), (0.216, -0.392)),
])
def test_diffpir_prox_worked_table(rho, exact, approx):
    op = ops.denoising((2,))
    z0, y = torch.tensor([[0.2, -0.4]]), torch.tensor([[1.0, 0.0]])
    ex = L.diffpir_prox(op, z0, y, rho, "exact")
    ap = L.diffpir_prox(op, z0, y, rho, "first_order")
    assert torch.allclose(ex, torch.tensor([exact]), atol=1e-4)
    assert torch.allclose(ap, torch.tensor([approx]), atol=1e-12)
    assert float((ex - ap).norm()) < 2.5 / rho ** 2                  # agree to O(1/ρ²)

def test_diffpir_prox_limits_and_dense_closed_form():
    op = ops.denoising((2,))
    z0, y = torch.tensor([[0.2, -0.4]]), torch.tensor([[1.0, 0.0]])
    assert torch.allclose(L.diffpir_prox(op, z0, y, 1e12), z0, atol=1e-10)     # ρ → ∞
    assert torch.allclose(L.diffpir_prox(op, z0, y, 0.0), y, atol=1e-15)       # ρ → 0, H = I
    mask = torch.tensor([[True, False], [False, True]])
    mop = ops.inpainting(mask, channels=1)
    z = torch.randn(2, 1, 2, 2, generator=_gen(8))
    yy = mop.A(torch.randn(2, 1, 2, 2, generator=_gen(9)))
    p0 = L.diffpir_prox(mop, z, yy, 0.0)
    assert torch.equal(p0[:, :, mask], yy[:, :, mask]) and torch.equal(p0[:, :, ~mask], z[:, :, ~mask])
    rho = 0.3
    assert torch.allclose(L.diffpir_prox(mop, z, yy, rho), (mask * yy + rho * z) / (mask + rho))
    for op2 in (ops.dense(torch.randn(3, 5, generator=_gen(10))),
                ops.gaussian_blur(1.5, size=4, channels=1)):
        M = op2.matrix()
        zz = torch.randn(2, *op2.x_shape, generator=_gen(11))
        y2 = torch.randn(2, *op2.y_shape, generator=_gen(12))
        ref = torch.linalg.solve(M.T @ M + rho * torch.eye(op2.n),
                                 (y2.reshape(2, -1) @ M + rho * zz.reshape(2, -1)).T).T
        assert torch.allclose(L.diffpir_prox(op2, zz, y2, rho).reshape(2, -1), ref, atol=1e-10)

def test_diffpir_zeta0_zero_operator_is_ddim():
    gm = _mixture()
    m = _model(gm, (1, 2, 3))
    op = ops.inpainting(torch.zeros(2, 3, dtype=torch.bool), channels=1)
    xT = torch.randn(4, 1, 2, 3, generator=_gen(13))
    x = L.diffpir(m, op, torch.zeros(4, 1, 2, 3), 0.05, alphas_cumprod=AC, timesteps=TS, x_T=xT,
                  progress=False, zeta=0.0)
    assert float((x - ddim_sample(m, xT, TS, AC, eta=0.0)).abs().max()) < 1e-10

# ---------------------------------------------------------------------------- DMPS
def _log_ptilde(op, x, y, sigma, a):
    M = op.matrix()
    G = sigma ** 2 * torch.eye(op.m) + (1 - a) / a * M @ M.T
    r = y.reshape(-1) - M @ x.reshape(-1) / a ** 0.5
    return -0.5 * r @ torch.linalg.solve(G, r)

def test_dmps_three_forms_and_autograd_agree():
    op = ops.dense(torch.randn(4, 6, generator=_gen(14)))
    x = torch.randn(1, 6, generator=_gen(15))
    y = torch.randn(1, 4, generator=_gen(16))
    sigma, a = 0.05 ** 0.5, 0.3
    g_svd = L.dmps_grad(op, x, y, sigma, a, "svd")
    g_dir = L.dmps_grad(op, x, y, sigma, a, "direct")
    assert float((g_svd - g_dir).abs().max()) < 1e-12
    xr = x.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(_log_ptilde(op, xr, y, sigma, a), xr)
    assert float((g_auto - g_svd).abs().max()) < 1e-12
    h = 1e-6                                                          # and finite differences
    fd = torch.stack([(_log_ptilde(op, x + h * e, y, sigma, a) - _log_ptilde(op, x - h * e, y, sigma, a))
                      / (2 * h) for e in torch.eye(6)])
    assert float((fd - g_svd[0]).abs().max()) < 1e-7
    for opo in (ops.inpainting(ops.random_mask(4, 0.5, generator=_gen(17)), channels=3),
                ops.super_resolution(2, size=4), ops.colorization(size=4)):   # row-orthogonal
        xo = torch.randn(2, *opo.x_shape, generator=_gen(18))
        yo = torch.randn(2, *opo.y_shape, generator=_gen(19))
        gs = L.dmps_grad(opo, xo, yo, 0.1, 0.4, "svd")
        assert float((gs - L.dmps_grad(opo, xo, yo, 0.1, 0.4, "row_orthogonal")).abs().max()) < 1e-12
        assert float((gs - L.dmps_grad(opo, xo, yo, 0.1, 0.4, "direct")).abs().max()) < 1e-12

def test_dmps_row_orthogonal_form_erratum():
    """The slide's entry-wise form a_mᵀ(y − A x/√ᾱ)/(σ²√ᾱ + (1−ᾱ)/√ᾱ ‖a_m‖²) (computable only
    when m = n) is not the gradient; Σ_m a_m (y_m − a_mᵀx/√ᾱ)/(…) is."""
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=_gen(20)))
    A = torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.3])) @ Q            # orthogonal rows, m = n
    op = ops.dense(A)
    x, y = torch.randn(1, 4, generator=_gen(21)), torch.randn(1, 4, generator=_gen(22))
    sigma, a = 0.2, 0.4
    xr = x.clone().requires_grad_(True)
    (g_true,) = torch.autograd.grad(_log_ptilde(op, xr, y, sigma, a), xr)
    r = (y - x @ A.T / a ** 0.5)[0]
    den = sigma ** 2 * a ** 0.5 + (1 - a) / a ** 0.5 * (A ** 2).sum(1)
    printed = torch.stack([A[k] @ r / den[k] for k in range(4)])
    corrected = (A * (r / den)[:, None]).sum(0)
    assert float((corrected - g_true[0]).abs().max()) < 1e-12
    assert float((L.dmps_grad(op, x, y, sigma, a, "row_orthogonal") - g_true).abs().max()) < 1e-12
    assert float((printed - g_true[0]).abs().max()) > 0.1

def _short_schedule(T=50):
    betas = make_betas("linear", T=T, beta_start=1e-3, beta_end=0.2)
    return betas, cumprod(betas)

def test_dmps_lambda0_is_ddpm_and_the_slide_step_diverges():
    gm = _mixture(D=4)
    betas, ac = _short_schedule()
    gm.alphas_cumprod = ac
    op = ops.dense(torch.randn(2, 4, generator=_gen(22)))
    m = _model(gm, (4,))
    xT = torch.randn(2000, 4, generator=_gen(23))
    ref = ddpm_sample(m, xT, betas, generator=_gen(24), progress=False)
    x = L.dmps(m, op, torch.zeros(2000, 2), 0.1, alphas_cumprod=ac, timesteps=list(range(49, -1, -1)),
               x_T=xT, generator=_gen(24), progress=False, lam=0.0)
    assert float((x - ref).abs().max()) < 1e-10
    # the slide's line 3: (x_t − (1−ᾱ_t)/√(1−ᾱ_t) s_θ)/√ᾱ_t + σ̃ z, s_θ = −ε/√(1−ᾱ_t)
    g = _gen(24)
    xs = xT
    for t in range(49, -1, -1):
        a, ap = float(ac[t]), float(ac[t - 1]) if t > 0 else 1.0
        score = -m(xs, torch.full((2000,), t)) / (1 - a) ** 0.5
        xs = (xs - (1 - a) / (1 - a) ** 0.5 * score) / a ** 0.5
        if t > 0:
            xs = xs + ((1 - ap) / (1 - a) * (1 - a / ap)) ** 0.5 * torch.randn(xs.shape, generator=g)
    prior_std = gm.sample(2000, generator=_gen(25)).std()
    assert float(x.std()) < 2 * float(prior_std) and float(xs.std()) > 100 * float(prior_std)

# ---------------------------------------------------------------------------- DDNM
@pytest.mark.parametrize("make", [lambda: ops.dense(torch.randn(3, 8, generator=_gen(26))),
                                  lambda: ops.super_resolution(2, size=2, channels=2),
                                  lambda: ops.colorization(size=2, channels=2)])
def test_ddnm_output_is_consistent(make):
    op = make()
    D = op.n
    gm = _mixture(D=D)
    x0 = gm.sample(4, generator=_gen(27)).reshape(4, *op.x_shape)
    y = op.A(x0)
    assert float((op.A(L.range_null(op, torch.randn_like(x0), y)) - y).abs().max()) < 1e-13
    P = lambda v: op.project_null(v)                                  # noqa: E731
    v = torch.randn_like(x0)
    assert torch.allclose(P(P(v)), P(v), atol=1e-13)                  # I − A†A is idempotent
    x = L.ddnm(_model(gm, op.x_shape), op, y, alphas_cumprod=AC, timesteps=TS, generator=_gen(28),
               progress=False)
    assert float((op.A(x) - y).abs().max()) < 1e-12

def test_ddnm_plus_reductions():
    gm = _mixture()
    op = ops.dense(torch.randn(3, 6, generator=_gen(29)))
    m = _model(gm, (6,))
    y = op.A(gm.sample(3, generator=_gen(30))) + 0.05 * torch.randn(3, 3, generator=_gen(31))
    xT = torch.randn(3, 6, generator=_gen(32))
    kw = dict(alphas_cumprod=AC, timesteps=TS, x_T=xT, progress=False)
    ref = L.ddnm(m, op, y, **kw, generator=_gen(33))
    one = L.ddnm_plus(m, op, y, 0.05, **kw, generator=_gen(33), scale=1.0)
    assert torch.equal(one, ref)                                      # Σ = I, no travel: DDNM
    adaptive0 = L.ddnm_plus(m, op, y, 0.0, **kw, generator=_gen(33))
    assert float((adaptive0 - ref).abs().max()) < 1e-10               # σ_y = 0: Σ_t = I, Φ_t = β̃
    adaptive = L.ddnm_plus(m, op, y, 0.05, **kw, generator=_gen(33))
    assert float((adaptive - ref).abs().max()) > 1e-4                 # σ_y > 0 changes it
    betas, ac = _short_schedule()
    gm.alphas_cumprod = ac
    xT2 = torch.randn(5, 6, generator=_gen(34))
    ddpm = ddpm_sample(m, xT2, betas, generator=_gen(35), progress=False)
    zero = L.ddnm_plus(m, op, torch.zeros(5, 3), 0.0, alphas_cumprod=ac,
                       timesteps=list(range(49, -1, -1)), x_T=xT2, generator=_gen(35),
                       progress=False, scale=0.0)
    assert float((zero - ddpm).abs().max()) < 1e-10                  # Σ = 0: unconditional

def test_ddnm_plus_time_travel_costs_and_stays_consistent():
    gm = _mixture()
    op = ops.dense(torch.randn(3, 6, generator=_gen(36)))
    y = op.A(gm.sample(2, generator=_gen(37)))
    counter = E.CountingModel(_model(gm, (6,)))
    x = L.ddnm_plus(counter, op, y, 0.0, alphas_cumprod=AC, timesteps=TS, generator=_gen(38),
                    progress=False, travel_length=2, travel_every=1)
    assert counter.calls == 1 + 2 + 3 * (len(TS) - 2)                # Σ_k (min(k, l) + 1)
    assert float((op.A(x) - y).abs().max()) < 1e-12

# ---------------------------------------------------------------------------- the mixture
def test_posterior_means_on_the_mixture():
    """Each solver's posterior mean against the exact one, on inpainting of a 3×2×2 mixture with
    σ_y = 0.05 (the samples of all four lie far closer to the exact posterior than A†y)."""
    g = _gen(39)
    gm = GaussianMixture(0.8 * torch.randn(3, 12, generator=g), stds=0.3, alphas_cumprod=AC)
    op = ops.inpainting(torch.tensor([[True, False], [True, True]]), channels=3)
    x = gm.sample(2, generator=g).reshape(2, 3, 2, 2)
    y = ops.measure(op, x, 0.05, generator=g)
    post = gm.posterior(y.reshape(2, -1), op, 0.05)
    n = 400
    yy = y.repeat_interleave(n, 0)
    base = float((op.A_pinv(y).reshape(2, -1) - post.mean()).norm(dim=1).mean())
    for name, fn, kw in [("ddrm", L.ddrm, {}), ("ddnm_plus", L.ddnm_plus, {}),
                         ("diffpir", L.diffpir, dict(zeta=1.0)), ("dmps", L.dmps, {})]:
        xs = fn(_model(gm, op.x_shape), op, yy, 0.05, alphas_cumprod=AC, timesteps=TS,
                generator=_gen(40), progress=False, **kw).reshape(2, n, -1)
        err = float((xs.mean(1) - post.mean()).norm(dim=1).mean())
        assert err < 0.25 * base, (name, err, base)

def test_evaluate_mixture_row_and_energy_distance():
    a = torch.randn(200, 3, generator=_gen(41))
    assert abs(E.energy_distance(a, a)) < 1e-12
    b = a + 1.0
    assert E.energy_distance(a, b) > 0.5
    pr = E.gmm_problems(0, n_y=2)
    row = E.gmm_measure("ddnm", "box_inpainting", 0.0, n_samples=32, problems=pr, steps=10)
    assert row["nfe"] == 10 and row["consistency"] < 1e-10
    assert row["mean_error"] < 0.5 * E.gmm_measure("pinv", "box_inpainting", 0.0, n_samples=32,
                                                    problems=pr)["mean_error"]

# ---------------------------------------------------------------------------- bad input
def test_bad_input():
    gm = _mixture()
    op = ops.denoising((6,))
    m = _model(gm, (6,))
    y = torch.zeros(2, 6)
    kw = dict(alphas_cumprod=AC, timesteps=TS, progress=False)
    with pytest.raises(ValueError, match="eta"):
        L.ddrm(m, op, y, **kw, eta=1.5)
    with pytest.raises(ValueError, match="eta_b"):
        L.ddrm(m, op, y, **kw, eta_b=-0.1)
    with pytest.raises(ValueError, match="zeta"):
        L.diffpir(m, op, y, **kw, zeta=-0.1)
    with pytest.raises(ValueError, match="lam"):
        L.diffpir(m, op, y, **kw, lam=0.0)
    with pytest.raises(ValueError, match="data_step"):
        L.diffpir(m, op, y, **kw, data_step="newton")
    with pytest.raises(ValueError, match="lam"):
        L.dmps(m, op, y, **kw, lam=-1.0)
    with pytest.raises(ValueError, match="form"):
        L.dmps(m, op, y, **kw, form="qr")
    with pytest.raises(ValueError, match="travel_length"):
        L.ddnm_plus(m, op, y, **kw, travel_length=-1)
    with pytest.raises(ValueError, match="scale"):
        L.ddnm_plus(m, op, y, **kw, scale=-1.0)
    with pytest.raises(ValueError, match="sigma_y"):
        L.ddnm(m, op, y, -0.1, **kw)
    with pytest.raises(ValueError, match="y must have shape"):
        L.ddnm(m, op, torch.zeros(2, 5), **kw)
    with pytest.raises(ValueError, match="x_T"):
        L.ddrm(m, op, y, **kw, x_T=torch.zeros(3, 6))
    with pytest.raises(ValueError, match="timesteps"):
        L.ddnm(m, op, y, alphas_cumprod=AC, timesteps=[10, 20], progress=False)
    with pytest.raises(TypeError, match="operator"):
        L.ddnm(m, "A", y, **kw)
    with pytest.raises(TypeError, match="eps_model"):
        L.ddnm(3, op, y, **kw)
    with pytest.raises(ValueError, match="rho"):
        L.diffpir_prox(op, y, y, 0.0, "first_order")

@pytest.mark.parametrize("name", list(L.EVAL_CONFIGS))
def test_float32_images_run_finite(name):
    """Each solver on float32 images (the pixel model's dtype), all five tasks' operators."""
    cfg = L.EVAL_CONFIGS[name]
    g = _gen(50)
    x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float32) * 2 - 1
    model = lambda v, t: 0.1 * v                                       # noqa: E731
    for op in (ops.inpainting(ops.box_mask(8, [(1, 1, 4, 4), (2, 3, 6, 7)]), channels=3),
               ops.super_resolution(4, size=8), ops.gaussian_blur(1.5, size=8),
               ops.colorization(size=8)):
        y = ops.measure(op, x, 0.05, generator=g)
        out = cfg["fn"](model, op, y, 0.05, alphas_cumprod=AC, timesteps=TS[:5] + [0],
                        generator=g, progress=False, **cfg["kwargs"])
        assert out.dtype == torch.float32 and out.shape == x.shape and bool(out.isfinite().all())

def test_dmps_likelihood_weight_erratum():
    """Algorithm 1, line 5: the likelihood term takes the score's weight (1−α_t)/√α_t (one
    step's β); the slide's (1−ᾱ_t)/√ᾱ_t, about 1/√ᾱ_T ≈ 157 at the start, blows the samples up."""
    g = _gen(60)
    gm = GaussianMixture(0.8 * torch.randn(3, 12, generator=g), stds=0.3, alphas_cumprod=AC)
    op = ops.inpainting(torch.tensor([[True, False], [True, True]]), channels=3)
    y = ops.measure(op, gm.sample(1, generator=g).reshape(1, 3, 2, 2), 0.05, generator=g)
    yy = y.expand(100, -1, -1, -1)
    m = _model(gm, op.x_shape)
    ts = list(range(0, 1000, 20))[::-1]
    exact = gm.posterior(y.reshape(1, -1), op, 0.05).mean()
    errs = {}
    for weight in ("paper", "slide"):
        gg = _gen(61)
        x = torch.randn(100, 3, 2, 2, generator=gg)
        for i, t in enumerate(ts):
            a = float(AC[t])
            ap = float(AC[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            b = 1 - a / ap
            eps = m(x, torch.full((100,), t))
            new = (x - b / (1 - a) ** 0.5 * eps) / (1 - b) ** 0.5
            if i + 1 < len(ts):
                new = new + ((1 - ap) / (1 - a) * b) ** 0.5 * torch.randn(x.shape, generator=gg)
            w = b / (1 - b) ** 0.5 if weight == "paper" else (1 - a) / a ** 0.5
            x = new + w * L.dmps_grad(op, x, yy, 0.05, a)
        errs[weight] = float((x.reshape(100, -1).mean(0) - exact).norm())
    ref = L.dmps(m, op, yy, 0.05, alphas_cumprod=AC, timesteps=ts, x_T=torch.randn(100, 3, 2, 2, generator=_gen(61)),
                 generator=_gen(62), progress=False)
    base = float((op.A_pinv(y).reshape(-1) - exact).norm())          # A†y: no prior at all
    assert errs["paper"] < 0.7 * base
    assert float((ref.reshape(100, -1).mean(0) - exact).norm()) < 0.7 * base
    assert errs["slide"] > 1e3 * base

def test_evaluate_scene_tasks_and_rows():
    """The scene protocol on 4 held-out scenes: the box hides the largest object, the random mask
    hides 70 % of the pixels, and a row for A†y has the expected consistency (0 without noise)."""
    from diffnotes.models import pixel_shapes as P
    x, sc = P.scenes(4)
    box = E.make_operator("box_inpainting", sc, x)
    for i in range(4):
        k = int(sc.masks32[i].reshape(sc.masks32.shape[1], -1).sum(1).argmax())
        assert not bool(box.mask[i, 0][torch.from_numpy(sc.masks32[i, k])].any())
    rnd = E.make_operator("random_inpainting", sc, x)
    assert torch.allclose(rnd.mask[:, 0].double().mean((1, 2)), torch.full((4,), 0.3), atol=1e-3)
    assert E.make_operator("sr4", sc, x).y_shape == (3, 8, 8)
    row = E.measure_method("pinv", None, AC, "sr4", 0.0, n=4, data=(x, sc), judge=False)
    assert row["consistency"] < 1e-5 and row["nfe"] == 0 and row["consistency_truth"] < 1e-5
    noisy = E.measure_method("pinv", None, AC, "colorization", 0.05, n=4, data=(x, sc), judge=False)
    assert abs(noisy["consistency_truth"] - 0.05 * 32) < 0.1            # ‖σ n‖ over 32×32 values
    with pytest.raises(ValueError, match="task"):
        E.make_operator("deblur", sc, x)
    with pytest.raises(ValueError, match="name"):
        E.measure_method("nope", None, AC, "sr4", 0.0, n=4, data=(x, sc))

def test_clip_x0():
    """``clip_x0`` bounds the network's x̂_0; a bound nothing reaches changes nothing (DMPS's
    posterior-mean form of the clipped step equals its Algorithm-1 form)."""
    gm = _mixture()
    op = ops.dense(torch.randn(3, 6, generator=_gen(70)))
    m = _model(gm, (6,))
    y = op.A(gm.sample(3, generator=_gen(71)))
    xT = torch.randn(3, 6, generator=_gen(72))
    kw = dict(alphas_cumprod=AC, timesteps=TS, x_T=xT, progress=False)
    seen = []
    L.ddnm(m, op, y, **kw, generator=_gen(73), clip_x0=0.5,
           callback=lambda d: seen.append(float(d["x0_hat"].abs().max())))
    assert max(seen) <= 0.5 + 1e-12
    for fn in (L.ddrm, L.ddnm, L.ddnm_plus, L.diffpir, L.dmps):
        a = fn(m, op, y, 0.05, **kw, generator=_gen(74))
        b = fn(m, op, y, 0.05, **kw, generator=_gen(74), clip_x0=1e9)
        assert float((a - b).abs().max()) < 1e-10, fn.__name__
    with pytest.raises(ValueError, match="clip_x0"):
        L.ddrm(m, op, y, **kw, clip_x0=0.0)
