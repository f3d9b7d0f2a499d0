"""Numeric checks behind book/errata.md: Ahmad's notes §1.1–1.3, Zhu's slides, Gormley & Chai's lecture.

Each test computes the document's printed form and the corrected form and shows that only the
corrected one has the property the text claims. Symbolic checks of the same errata live in
tests/test_derive.py. Indices: the library's 0-based t is the documents' t + 1.
"""
import math

import pytest
import torch

from diffnotes import derive
from diffnotes.ddim import ddim_invert, ddim_sample, ddim_sigma, ode_coords, from_ode_coords
from diffnotes.ddpm import ddpm_sample, posterior_mean_variance, q_sample
from diffnotes.models.gmm import GaussianMixture
from diffnotes.schedules import alphas_cumprod, make_betas, make_timesteps

# Small tensors on a shared, busy 2-core machine: torch's intra-op threads only add barrier
# waits (a 4000-element sqrt took 24 ms with 2 threads under load, 0.07 ms with 1).
torch.set_num_threads(1)

BETAS = make_betas("linear", 1000)
AC = alphas_cumprod(BETAS)
ALPHAS = 1 - BETAS


def forward_chain_moments(x0: float):
    """Exact mean and variance of x_t | x_0 by iterating eq 1.1: m ← √α m, v ← α v + β."""
    m, v, ms, vs = x0, 0.0, [], []
    for a, b in zip(ALPHAS.tolist(), BETAS.tolist()):
        m, v = a ** 0.5 * m, a * v + b
        ms.append(m)
        vs.append(v)
    return torch.tensor(ms, dtype=torch.float64), torch.tensor(vs, dtype=torch.float64)


# ---------------------------------------------------------------- Ahmad's notes, Algorithm 1 and §1.2
def test_ahmad_alg1_marginal_needs_alpha_bar():
    m, v = forward_chain_moments(1.0)
    torch.testing.assert_close(m, AC.sqrt(), rtol=1e-12, atol=0)            # corrected
    torch.testing.assert_close(v, 1 - AC, rtol=1e-10, atol=1e-15)
    t = 499
    assert abs(math.sqrt(ALPHAS[t]) - m[t]) > 0.5                          # printed √α_t x_0
    assert abs((1 - ALPHAS[t]) - v[t]) > 0.9                                # printed 1 − α_t
    # the two agree only at the first step (ᾱ_1 = α_1)
    assert float(AC[0]) == float(ALPHAS[0])


# ---------------------------------------------------------------- Ahmad's notes, Algorithm 2
def _eps_gaussian(x, t, mu=0.5, s=0.3):
    """Exact ε* for N(mu, s²) data: √(1−ᾱ)(x − √ᾱ mu)/(ᾱ s² + 1 − ᾱ) (GaussianMixture, K = 1)."""
    ab = AC.to(x.dtype)[t]
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        ab = ab[:, None]
    return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab)


def _sample_gaussian(step_coef, n=4000, seed=0):
    """Ancestral sampling of N(0.5, 0.3²) data with the exact ε*, mean coefficient given."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    for t in range(999, -1, -1):
        eps = _eps_gaussian(x, t)
        a, ab = float(ALPHAS[t]), float(AC[t])
        abp = float(AC[t - 1]) if t else 1.0
        x = (x - step_coef(a, ab) * eps) / a ** 0.5
        if t:
            x = x + ((1 - abp) / (1 - ab) * (1 - a)) ** 0.5 * torch.randn(
                x.shape, generator=g, dtype=torch.float64)
    return x


def test_ahmad_alg2_sampling_needs_alpha_bar():
    good = _sample_gaussian(lambda a, ab: (1 - a) / (1 - ab) ** 0.5)       # corrected
    bad = _sample_gaussian(lambda a, ab: (1 - a) / (1 - a) ** 0.5)          # as printed
    assert good.mean().item() == pytest.approx(0.5, abs=0.02)
    assert good.std().item() == pytest.approx(0.3, abs=0.02)
    assert not (abs(bad.mean().item() - 0.5) < 0.1 and abs(bad.std().item() - 0.3) < 0.1)
    # the library's sampler is the corrected one, and ε* is the mixture's
    gm = GaussianMixture([[0.5]], stds=0.3, alphas_cumprod=AC)
    x = torch.randn(5, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(_eps_gaussian(x, 700), gm.eps(x, 700))
    lib = ddpm_sample(_eps_gaussian, torch.randn(4000, 1, generator=torch.Generator()
                                                 .manual_seed(0), dtype=torch.float64),
                      BETAS, generator=torch.Generator().manual_seed(1), progress=False)
    assert lib.std().item() == pytest.approx(0.3, abs=0.02)


# ---------------------------------------------------------------- Ahmad's notes, eq 1.7
def test_ahmad_eq_1_7_prefactor():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g,
                                                                         dtype=torch.float64)
    t = 499
    xt = q_sample(x0, t, AC, eps)
    mean, _ = posterior_mean_variance(x0, xt, t, BETAS)
    a, ab = ALPHAS[t], AC[t]
    core = xt - (1 - a) / (1 - ab).sqrt() * eps
    torch.testing.assert_close(core / a.sqrt(), mean, rtol=1e-10, atol=1e-12)   # corrected
    assert (core / ab.sqrt() - mean).abs().max() > 1.0                           # printed


# ---------------------------------------------------------------- Ahmad's notes, §1.2: every marginal
def _propagate(ab, ts, x0=1.0):
    """Mean/var of x_t | x_0 down the σ = 0 DDIM family built from ``ab`` on ``ts``."""
    m, v = math.sqrt(ab[ts[0]]) * x0, 1 - ab[ts[0]]
    out = {ts[0]: (m, v)}
    for t, tp in zip(ts[:-1], ts[1:]):
        k = math.sqrt((1 - ab[tp]) / (1 - ab[t]))                              # eq 1.16, σ = 0
        lam = math.sqrt(ab[tp]) - k * math.sqrt(ab[t])
        m, v = k * m + lam * x0, k * k * v
        out[tp] = (m, v)
    return out


def test_ahmad_family_must_match_every_marginal():
    ac = AC.tolist()
    ts = list(range(999, -1, -50))
    good = _propagate(ac, ts)
    for t in ts:
        assert good[t][0] == pytest.approx(math.sqrt(ac[t]), rel=1e-10)
        assert good[t][1] == pytest.approx(1 - ac[t], rel=1e-10, abs=1e-14)
    # a family built on another schedule with the same ᾱ_T: q(x_T | x_0) agrees, the rest not
    other = [ac[999] ** ((t + 1) / 1000) for t in range(1000)]
    bad = _propagate(other, ts)
    assert bad[999] == pytest.approx(good[999])
    assert abs(bad[199][1] - (1 - ac[199])) > 0.3


# ---------------------------------------------------------------- Ahmad's notes, eqs 1.11 and 1.13
@pytest.mark.parametrize("t,tp", [(500, 400), (900, 700)])
def test_ahmad_eq_1_11_and_1_13_noise(t, tp):
    a, ap = float(AC[t]), float(AC[tp])
    sig = ddim_sigma(a, ap, 1.0)
    k = math.sqrt((1 - ap - sig ** 2) / (1 - a))
    lam = math.sqrt(ap) - k * math.sqrt(a)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    e1, e2 = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2))
    x0 = 1.0
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * e1
    right = k * xt + lam * x0 + sig * e2                       # σ_t ε, independent ε
    printed_1_11 = k * xt + lam * x0 + sig ** 2 * e2           # σ_t² ε
    same_noise = k * xt + lam * x0 + sig * e1                  # eq 1.13's single ε̄
    se = (1 - ap) * math.sqrt(2 / n) * 4                       # 4 standard errors of a variance
    assert right.var().item() == pytest.approx(1 - ap, abs=se)
    assert right.mean().item() == pytest.approx(math.sqrt(ap), abs=0.01)
    assert abs(printed_1_11.var().item() - (1 - ap)) > 3 * se
    assert abs(same_noise.var().item() - (1 - ap)) > 3 * se


# ---------------------------------------------------------------- Ahmad's notes, §1.2 (after eq 1.13): the integral
def _marginal_residual(k, lam, var, t, tp, x0, form):
    """max_y |LHS − RHS| / RHS of the marginal identity at three points y, by 1-D quadrature over
    x_t, for the kernel q(x_{t−1} | x_t, x_0) = N(k x_t + λ x_0, var).

    ``"corrected"``: ∫ q(x_{t−1} | x_t, x_0) q(x_t | x_0) dx_t against N(√ᾱ_{t−1} x_0, 1 − ᾱ_{t−1}).
    ``"printed"``: ∫ q(x_{t−1} | x_0) q(x_t | x_0) dx_t against q(x_{t−1} | x_0), with
    q(x_{t−1} | x_0) the marginal the kernel gives, as the printed identity reads.
    """
    a, ap = float(AC[t]), float(AC[tp])
    xs = torch.linspace(-12, 12, 200_001, dtype=torch.float64)            # x_t grid
    dx = float(xs[1] - xs[0])

    def normal(x, m, v):
        return torch.exp(-(x - m) ** 2 / (2 * v)) / math.sqrt(2 * math.pi * v)

    q_t = normal(xs, math.sqrt(a) * x0, 1 - a)
    out = []
    for y in (-1.0, 0.3, 2.0):
        y = torch.tensor(y, dtype=torch.float64)
        implied = float((normal(y, k * xs + lam * x0, var) * q_t).sum() * dx)
        if form == "corrected":
            lhs, rhs = implied, float(normal(y, math.sqrt(ap) * x0, 1 - ap))
        else:                              # the integrand does not depend on x_t: ∫ q_t = 1
            lhs, rhs = float((implied * q_t).sum() * dx), implied
        out.append(abs(lhs - rhs) / rhs)
    return max(out)


def test_ahmad_marginal_integral():
    t, tp, x0 = 600, 450, 0.7
    a, ap = float(AC[t]), float(AC[tp])
    sig = ddim_sigma(a, ap, 0.5)
    k = math.sqrt((1 - ap - sig ** 2) / (1 - a))                           # eq 1.16
    lam = math.sqrt(ap) - k * math.sqrt(a)
    # a wrong kernel: the σ = 0 coefficient with σ > 0 noise (its variance comes out too large)
    k_bad = math.sqrt((1 - ap) / (1 - a))
    lam_bad = math.sqrt(ap) - k_bad * math.sqrt(a)
    good = dict(k=k, lam=lam, var=sig ** 2, t=t, tp=tp, x0=x0)
    bad = dict(k=k_bad, lam=lam_bad, var=sig ** 2, t=t, tp=tp, x0=x0)
    # the corrected identity holds for the right kernel and rejects the wrong one ...
    assert _marginal_residual(**good, form="corrected") < 1e-6
    assert _marginal_residual(**bad, form="corrected") > 1e-2
    # ... the printed one holds for both (∫ q(x_t | x_0) dx_t = 1): it constrains nothing
    assert _marginal_residual(**good, form="printed") < 1e-6
    assert _marginal_residual(**bad, form="printed") < 1e-6


# ---------------------------------------------------------------- Ahmad's notes, eq 1.24
def test_ahmad_eq_1_24_numbers():
    t = 500
    a, ap, b = float(AC[t]), float(AC[t - 1]), float(BETAS[t])
    beta_tilde = (1 - ap) / (1 - a) * b
    printed = math.sqrt((1 - ap) / (1 - a)) * b
    z = torch.zeros(1, dtype=torch.float64)
    _, var = posterior_mean_variance(z, z, t, BETAS)
    assert ddim_sigma(a, ap, 1.0) ** 2 == pytest.approx(float(var), rel=1e-12)
    assert ddim_sigma(a, ap, 1.0) ** 2 == pytest.approx(beta_tilde, rel=1e-12)
    assert printed != pytest.approx(beta_tilde, rel=1e-7)
    # early steps, where (1−ᾱ_{t−1})/(1−ᾱ_t) is far from 1, show it plainly
    a, ap, b = float(AC[1]), float(AC[0]), float(BETAS[1])
    assert math.sqrt((1 - ap) / (1 - a)) * b / ddim_sigma(a, ap, 1.0) ** 2 > 1.3


# ---------------------------------------------------------------- Ahmad's notes, "DDIM as a Neural ODE": the quotient
def test_ahmad_difference_quotient_sign():
    tau = ((1 - AC) / AC).sqrt()
    # τ increases with t, so the backward quotient (τ(t−Δt) − τ(t))/Δt is negative: −dτ/dt
    assert bool((tau[:-1] - tau[1:] < 0).all())
    r = derive.ddim_euler()
    t = [s for s in r["difference_quotient"].free_symbols if s.name == "t"][0]
    assert str(r["difference_quotient"]).startswith("-")
    assert r["difference_quotient"].has(derive.sp.Derivative) and t is not None


# ---------------------------------------------------------------- Ahmad's notes, after eq 1.25 and §1.3: u(T)
def test_ahmad_initial_condition_of_u():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(200_000, 1, generator=g, dtype=torch.float64) * 0.5
    xT = q_sample(x0, 999, AC, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    u, _ = ode_coords(xT, float(AC[999]))
    var = u.var().item()
    assert var == pytest.approx(1 / float(AC[999]), rel=0.02)              # N(0, I/ᾱ_T)
    assert abs(var - float(ALPHAS[999])) > 1000                            # not N(0, α_T I)


# ---------------------------------------------------------------- Ahmad's notes, eq 1.26
def test_ahmad_eq_1_26_sign():
    gm = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], stds=0.3, alphas_cumprod=AC)
    x0 = gm.sample(256, torch.Generator().manual_seed(0))
    ts = make_timesteps(100)
    eps_model = gm.eps_model()
    xT = ddim_invert(eps_model, x0, ts, AC)
    rec = ddim_sample(eps_model, xT, ts, AC)
    assert (rec - x0).abs().max().item() < 0.1

    # the printed sign, du = −dτ ε, as an Euler step towards larger τ
    acl = AC.tolist()
    u, tau = ode_coords(x0, 1.0)
    for t in ts[::-1]:
        x, _ = from_ode_coords(u, tau)
        eps = eps_model(x, torch.full((x.shape[0],), t))
        tau_next = math.sqrt((1 - acl[t]) / acl[t])
        u = u - (tau_next - tau) * eps
        tau = tau_next
    xT_bad = from_ode_coords(u, tau)[0]
    rec_bad = ddim_sample(eps_model, xT_bad, ts, AC)
    assert (rec_bad - x0).abs().max().item() > 1.0
    assert xT.std().item() == pytest.approx(1.0, abs=0.15)                 # a plausible x_T


# ---------------------------------------------------------------- Zhu's slides, "DDPM: Forward Diffusion Process"
def test_zhu_forward_product_limit():
    _, v = forward_chain_moments(1.0)
    ab_printed = torch.full_like(AC, float(torch.prod(ALPHAS)))          # ∏_{i=1}^T, any t
    torch.testing.assert_close(1 - AC, v, rtol=1e-10, atol=1e-15)         # ∏_{i=1}^t
    assert (1 - ab_printed - v).abs().max() > 0.9
    assert float(ab_printed[-1]) == pytest.approx(float(AC[-1]))         # agrees only at t = T


# ---------------------------------------------------------------- Zhu's slides, "DDIM: Accelerated Generation Processes"
def test_zhu_ddim_subsequence_indices():
    gm = GaussianMixture([[0.5]], stds=0.3, alphas_cumprod=AC)
    ts = make_timesteps(50)
    x = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    good = ddim_sample(gm.eps_model(), x, ts, AC)
    assert good.std().item() == pytest.approx(0.3, abs=0.04)
    # printed: ᾱ_{t−1} (the neighbouring index) as the target level of each jump τ_i → τ_{i−1}
    from diffnotes.ddim import ddim_step
    y = x
    for t in ts:
        y = ddim_step(y, gm.eps(y, t), float(AC[t]), float(AC[t - 1]) if t else 1.0)
    assert y.std().item() > 0.6


# ---------------------------------------------------------------- Zhu's slides, "SDE-based Generative Models: Discretizations"
def test_zhu_vp_sde_sign():
    """Variance ODE of dx = ∓½β x dt + √β dw from x(0) = 0: dv/dt = ∓β v + β."""
    n = 20_000
    dt = 1.0 / n
    beta = lambda s: 0.1 + 19.9 * s  # noqa: E731  (Song et al.'s β_min = 0.1, β_max = 20)
    v_good = v_bad = 0.0
    for i in range(n):
        b = beta((i + 0.5) * dt)
        v_good += (-b * v_good + b) * dt
        v_bad += (b * v_bad + b) * dt
    B = 0.1 + 19.9 / 2
    assert v_good == pytest.approx(1 - math.exp(-B), rel=1e-3)           # → 1: variance kept
    assert v_bad == pytest.approx(math.exp(B) - 1, rel=2e-2)              # explodes
    assert v_bad > 1e4


# ---------------------------------------------------------------- Gormley & Chai's lecture, Properties #1-#3, Option C
def test_gormley_chai_properties():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g,
                                                                         dtype=torch.float64)
    t = 499
    a, ab, abp = ALPHAS[t], AC[t], AC[t - 1]
    # Property #1 (and its restatement under Property #3): the noise coefficient is √(1−ᾱ_t), not 1−ᾱ_t
    _, v = forward_chain_moments(1.0)
    assert float(v[t]) == pytest.approx(float(1 - ab), rel=1e-10)
    assert abs(float((1 - ab) ** 2) - float(v[t])) > 0.05
    xt = q_sample(x0, t, AC, eps)
    # Property #2: the posterior mean's coefficients
    mean, _ = posterior_mean_variance(x0, xt, t, BETAS)
    printed = ab.sqrt() * (1 - a) / (1 - ab) * x0 + a.sqrt() * (1 - ab) / (1 - ab) * xt
    fixed = abp.sqrt() * (1 - a) / (1 - ab) * x0 + a.sqrt() * (1 - abp) / (1 - ab) * xt
    torch.testing.assert_close(fixed, mean, rtol=1e-12, atol=1e-12)
    assert (printed - mean).abs().max() > 1e-4
    # Property #3 (and Option C, with x_0 in place of x_t): recovering x_0 from x_t and ε
    x0_printed = (xt + (1 - ab) * eps) / ab.sqrt()
    x0_fixed = (xt - (1 - ab).sqrt() * eps) / ab.sqrt()
    torch.testing.assert_close(x0_fixed, x0, rtol=1e-12, atol=1e-12)
    assert (x0_printed - x0).abs().max() > 1.0
    x0_l288 = (x0 + (1 - ab) * eps) / ab.sqrt()
    assert (x0_l288 - x0).abs().max() > 1.0
