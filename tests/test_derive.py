"""diffnotes.derive: the sympy derivations, checked symbolically and against the library.

Symbolic checks use ``sympy.simplify(a - b) == 0`` (after rewriting ᾱ_t = α_t ᾱ_{t−1},
β_t = 1 − α_t); numeric checks evaluate the derived expressions on the DDPM linear schedule and
compare them with ``diffnotes.ddpm.posterior_mean_variance`` and ``diffnotes.ddim.ddim_sigma``.
"""
import functools

import pytest
import sympy as sp
import torch

from diffnotes import derive
from diffnotes.ddim import ddim_sigma, ddim_step, from_ode_coords, ode_coords, ode_sample
from diffnotes.ddpm import posterior_mean_variance
from diffnotes.models.gmm import GaussianMixture
from diffnotes.schedules import alphas_cumprod, make_betas

# Small tensors on a shared, busy 2-core machine: torch's intra-op threads only add barrier
# waits (a 4000-element sqrt took 24 ms with 2 threads under load, 0.07 ms with 1).
torch.set_num_threads(1)

S = derive.symbols()
BETAS = make_betas("linear", 1000)
AC = alphas_cumprod(BETAS)


@functools.lru_cache(None)
def _post():
    return derive.ddpm_posterior()


@functools.lru_cache(None)
def _fam():
    return derive.ddim_family()


@functools.lru_cache(None)
def _sig():
    return derive.ddim_sigma_for_ddpm()


@functools.lru_cache(None)
def _euler():
    return derive.ddim_euler()


def zero(e):
    return sp.simplify(derive.to_chain(e)) == 0


def chain_values(t):
    """The source documents' symbols at 0-based library index t: ᾱ_t = AC[t], ᾱ_{t−1} = AC[t−1] (1 at t = 0)."""
    ab = float(AC[t])
    abp = float(AC[t - 1]) if t > 0 else 1.0
    return {S["alpha_t"]: ab / abp, S["ab_prev"]: abp, S["ab_t"]: ab, S["beta_t"]: float(BETAS[t])}


def ev(expr, vals):
    e = sp.sympify(expr).subs(vals)
    return float(sp.N(derive.to_chain(e).subs(vals)))


# ----------------------------------------------------------------------------- DDPM posterior
def test_posterior_variance_is_beta_tilde_symbolically():
    r = _post()
    assert zero(r["variance"] - r["beta_tilde"])
    assert r["remainder"] == 0        # completing the square leaves nothing over


def test_posterior_mean_coefficients_symbolically():
    r = _post()
    assert zero(r["coef_x0"] - r["coef_x0_closed"])
    assert zero(r["coef_xt"] - r["coef_xt_closed"])
    assert zero(r["mean_eps"] - r["mean_eps_closed"])
    # the mean is linear in (x_0, x_t): nothing else is left
    rest = r["mean"] - r["coef_x0"] * S["x_0"] - r["coef_xt"] * S["x_t"]
    assert sp.simplify(rest) == 0


def test_posterior_exponent_is_gaussian_in_x_prev():
    r = _post()
    xp = derive.x_prev
    e = derive.to_chain(r["exponent"])
    # second derivative of the exponent = 1 / variance (exactly)
    assert zero(sp.diff(e, xp, 2) / 2 - 1 / r["beta_tilde"])
    # its stationary point is the mean
    assert zero(sp.diff(e, xp).subs(xp, r["mean"]))


def test_eq_1_7_as_printed_is_not_the_posterior_mean():
    r = _post()
    assert not derive.is_zero(r["mean_eps_printed_1_7"] - r["mean_eps_closed"],
                              numeric_fallback=False)


@pytest.mark.parametrize("t", [1, 10, 250, 500, 999])
def test_posterior_matches_library_numerically(t):
    r = _post()
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    xt = torch.randn(3, 2, generator=g, dtype=torch.float64)
    mean, var = posterior_mean_variance(x0, xt, t, BETAS)
    v = chain_values(t)
    assert float(var) == pytest.approx(ev(r["variance"], v), rel=1e-12)
    assert float(var) == pytest.approx(ev(r["beta_tilde"], v), rel=1e-12)
    want = ev(r["coef_x0"], v) * x0 + ev(r["coef_xt"], v) * xt
    torch.testing.assert_close(mean, want, rtol=1e-10, atol=1e-12)


def test_posterior_at_first_step_has_zero_variance():
    # library t = 0 is the notes' t = 1 with ᾱ_0 = 1: q(x_0 | x_1, x_0) is a point mass at x_0
    r = _post()
    assert ev(r["variance"], chain_values(0)) == pytest.approx(0.0, abs=1e-15)
    assert ev(r["coef_x0"], chain_values(0)) == pytest.approx(1.0, rel=1e-12)


def test_simple_loss_weight():
    r = derive.simple_loss_weight()
    assert r["residual"] == 0
    # the weight is not constant in t: dropping it (L_simple) changes the objective
    vals = [ev(r["weight"], {**chain_values(t), S["sigma_t"]: float(BETAS[t]) ** 0.5})
            for t in (10, 500, 990)]
    assert max(vals) / min(vals) > 1.5


# ----------------------------------------------------------------------------- DDIM family
def test_ddim_family_solves_eq_1_15():
    r = _fam()
    k, lam = r["k"], r["lam"]
    for eq in r["equations"]:
        assert sp.simplify(eq.lhs - eq.rhs.subs({S["k_t"]: k, S["lambda_t"]: lam})) == 0
    assert len(r["solutions"]) == 2          # ± k; the chapter keeps k > 0
    assert zero(r["mean"] - r["mean_closed"])
    assert zero(r["step"] - r["step_closed"])


def test_ddim_family_matches_library_step():
    r = _fam()
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g,
                                                                          dtype=torch.float64)
    f = sp.lambdify([S["x_t"], S["eps"], S["ab_t"], S["ab_prev"], S["sigma_t"]], r["step"])
    for t, tp, eta in [(980, 960, 0.0), (500, 400, 0.5), (20, 0, 1.0)]:
        a, ap = float(AC[t]), float(AC[tp])
        sig = ddim_sigma(a, ap, eta)
        want = ddim_step(x, e, a, ap, eta=eta, noise=torch.zeros_like(x))
        got = f(x, e, a, ap, sig) if sig > 0 else f(x, e, a, ap, 1e-300)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_printed_eq_1_11_breaks_the_marginal():
    r = _fam()
    # with σ_t ε the variance of x_{t−1} | x_0 is 1 − ᾱ_{t−1}; with eq 1.11's σ_t² ε it is not
    assert zero(r["k"] ** 2 * (1 - S["ab_t"]) + S["sigma_t"] ** 2 - (1 - S["ab_prev"]))
    assert not derive.is_zero(r["variance_printed_1_11"] - (1 - S["ab_prev"]),
                              numeric_fallback=False)
    assert not derive.is_zero(r["noise_same_symbol_1_13"] - (1 - S["ab_prev"]),
                              numeric_fallback=False)


# ----------------------------------------------------------------------------- eq 1.24
def test_sigma_for_ddpm_is_beta_tilde():
    r = _sig()
    assert zero(r["sigma2"] - r["beta_tilde"])
    assert zero(r["eta_form"] - r["beta_tilde"])
    assert r["coef_x0_residual"] == 0 or derive.is_zero(r["coef_x0_residual"])


def test_printed_eq_1_24_is_not_beta_tilde():
    r = _sig()
    assert not derive.is_zero(r["printed_1_24"] - r["beta_tilde"], numeric_fallback=False)
    assert zero(r["printed_1_24"] / r["beta_tilde"] - r["printed_over_correct"])


@pytest.mark.parametrize("t", [1, 100, 500, 999])
def test_sigma_for_ddpm_matches_ddim_sigma(t):
    r = _sig()
    v = chain_values(t)
    a, ap = float(AC[t]), float(AC[t - 1])
    lib = ddim_sigma(a, ap, 1.0) ** 2
    assert lib == pytest.approx(ev(r["sigma2"], v), rel=1e-10)
    assert lib == pytest.approx(ev(r["beta_tilde"], v), rel=1e-10)
    # the printed form differs from the library by the factor sqrt((1-ab_t)/(1-ab_prev)) > 1
    printed = ev(r["printed_1_24"], v)
    assert printed / lib == pytest.approx(((1 - a) / (1 - ap)) ** 0.5, rel=1e-10)
    assert printed > lib
    # general η: σ(η)² = η² β̃ for consecutive steps
    assert ddim_sigma(a, ap, 0.3) ** 2 == pytest.approx(0.09 * ev(r["eta_form"], v), rel=1e-10)


# ----------------------------------------------------------------------------- eq 1.25
def test_euler_in_tau_is_ddim():
    r = _euler()
    assert r["residual"] == 0
    assert sp.simplify(r["x_of_u"] - r["x"]) == 0
    t = sp.Symbol("t", real=True)
    assert sp.simplify(r["difference_quotient"] + sp.Derivative(sp.Function(r"\tau")(t), t)) == 0


def test_inversion_sign():
    r = _euler()
    assert sp.simplify(r["inversion_euler"] - r["inversion_step"]) == 0
    assert sp.simplify(r["printed_1_26_minus_correct"]) != 0


def test_euler_step_matches_library():
    r = _euler()
    f = sp.lambdify([r["x"], S["eps"], S["ab_t"], S["ab_s"]], r["euler_step"])
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g,
                                                                          dtype=torch.float64)
    a, ap = float(AC[700]), float(AC[650])
    torch.testing.assert_close(f(x, e, a, ap), ddim_step(x, e, a, ap), rtol=1e-12, atol=1e-12)
    u, tau = ode_coords(x, a)
    assert tau == pytest.approx(ev(r["tau"], {S["ab_t"]: a}), rel=1e-14)
    torch.testing.assert_close(from_ode_coords(u, tau)[0], x, rtol=1e-14, atol=1e-14)


def test_gaussian_ode_solution_against_ode_sample():
    """Eq 1.25 for N(0, s²) data has a closed-form flow; Euler and Heun converge to it."""
    r = derive.gaussian_ode()
    s = 0.5
    gm = GaussianMixture([[0.0]], stds=s, alphas_cumprod=AC)
    ts = list(range(999, -1, -1))
    x_T = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    tau_T = float(((1 - AC[999]) / AC[999]) ** 0.5)
    f = sp.lambdify([r["x_T"], r["tau_T"], S["s"]], r["x0_of_xT"])
    exact = f(x_T, tau_T, s)
    euler = ode_sample(gm.eps_model(), x_T, ts, AC, method="euler")
    heun = ode_sample(gm.eps_model(), x_T, ts, AC, method="heun")
    err_e = (euler - exact).abs().max().item()
    err_h = (heun - exact).abs().max().item()
    assert err_e < 5e-3
    assert err_h < err_e / 5
    # a coarse Euler grid is worse than the fine one
    coarse = ode_sample(gm.eps_model(), x_T, ts[::50], AC, method="euler")
    assert (coarse - exact).abs().max().item() > 2 * err_e
