"""Part I derivations as sympy computations.

Each function builds the algebra of one derivation in the source documents, checks the identities it claims
(raising ``AssertionError`` if sympy cannot confirm one, which would mean a bug here, not in the
reader's input), and returns a ``dict`` of sympy expressions that the chapters print.

Symbols are positive reals with LaTeX names, so ``sympy.latex`` renders them as the book writes
them. Where the DDPM chain is involved, the derivation works in the two free quantities α_t and
ᾱ_{t−1} and substitutes ᾱ_t = α_t ᾱ_{t−1}, β_t = 1 − α_t; the returned "closed form" entries are
written in (β_t, ᾱ_t, ᾱ_{t−1}) as the source documents print them, and :func:`to_chain` maps them back.

Functions (seed references in each docstring):

- :func:`ddpm_posterior` — q(x_{t−1} | x_t, x_0) by completing the square (Zhu's slides, "DDPM: Reverse
  Diffusion Process"; Ahmad's notes, eqs 1.5–1.7; Ho et al. 2020, eqs 6–7).
- :func:`simple_loss_weight` — the weight that eq 1.8 drops between L_{t−1} and L_simple.
- :func:`ddim_family` — k_t and λ_t from eq 1.15 (Ahmad's notes, eqs 1.10–1.21).
- :func:`ddim_sigma_for_ddpm` — the σ_t² that turns DDIM into DDPM, against eq 1.24 as printed.
- :func:`ddim_euler` — the η = 0 DDIM step as an Euler step of eq 1.25, and the sign of eq 1.26.
- :func:`gaussian_ode` — eq 1.25 for Gaussian data, solved in closed form.
"""
from __future__ import annotations

import sympy as sp

__all__ = ["symbols", "to_chain", "ddpm_posterior", "simple_loss_weight", "ddim_family",
           "ddim_sigma_for_ddpm", "ddim_euler", "gaussian_ode", "is_zero"]

# ------------------------------------------------------------------------------- the symbols
alpha_t = sp.Symbol(r"\alpha_t", positive=True)
ab_t = sp.Symbol(r"\bar{\alpha}_t", positive=True)
ab_prev = sp.Symbol(r"\bar{\alpha}_{t-1}", positive=True)
ab_s = sp.Symbol(r"\bar{\alpha}_s", positive=True)
beta_t = sp.Symbol(r"\beta_t", positive=True)
sigma_t = sp.Symbol(r"\sigma_t", positive=True)
k_t = sp.Symbol("k_t", real=True)
lam_t = sp.Symbol(r"\lambda_t", real=True)
x_t = sp.Symbol("x_t", real=True)
x_0 = sp.Symbol("x_0", real=True)
x_prev = sp.Symbol("x_{t-1}", real=True)
eps = sp.Symbol(r"\epsilon", real=True)
eps_theta = sp.Symbol(r"\epsilon_\theta", real=True)
tau = sp.Symbol(r"\tau", nonnegative=True)
u = sp.Symbol("u", real=True)
s_data = sp.Symbol("s", positive=True)


def symbols() -> dict:
    """The symbols used here, by plain name (for substitutions in chapters and tests)."""
    return {"alpha_t": alpha_t, "ab_t": ab_t, "ab_prev": ab_prev, "ab_s": ab_s,
            "beta_t": beta_t, "sigma_t": sigma_t, "k_t": k_t, "lambda_t": lam_t, "x_t": x_t,
            "x_0": x_0, "x_prev": x_prev, "eps": eps, "eps_theta": eps_theta, "tau": tau,
            "u": u, "s": s_data}


def to_chain(expr):
    """Rewrite β_t, ᾱ_t in terms of α_t and ᾱ_{t−1} (β_t = 1 − α_t, ᾱ_t = α_t ᾱ_{t−1}; eq 1.2)."""
    return sp.sympify(expr).subs({beta_t: 1 - alpha_t, ab_t: alpha_t * ab_prev})


def _probe_values(free, rng) -> dict:
    """A random point of the domain: 0 < ᾱ_t < ᾱ_s, ᾱ_{t−1} < 1, 0 < σ_t² < 1 − ᾱ_{t−1}."""
    a, ap = rng.uniform(0.5, 0.999), rng.uniform(0.05, 0.95)
    vals = {alpha_t: a, ab_prev: ap, ab_s: ap, sigma_t: rng.uniform(0.05, 0.95) * (1 - ap) ** 0.5}
    out = {}
    for sym in free:
        if sym in vals:
            out[sym] = vals[sym]
        elif sym.is_positive or sym.is_nonnegative:
            out[sym] = rng.uniform(0.1, 3.0)
        else:
            out[sym] = rng.normal()
    return {k: sp.Float(v, 40) for k, v in out.items()}


def is_zero(expr, numeric_fallback: bool = True) -> bool:
    """True when ``expr`` is identically 0 on the domain of the schedule.

    First symbolically: ``sympy.simplify`` after :func:`to_chain`. Square roots of perfect
    squares such as √((1−ᾱ_{t−1})²) are not merged by sympy without knowing signs, so if
    simplify leaves a residual and ``numeric_fallback`` is on, the residual is evaluated with 40
    digits at 8 random points of the domain (0 < ᾱ_t < ᾱ_{t−1} < 1, 0 < σ_t² < 1 − ᾱ_{t−1}) and
    must vanish to 1e-25 at all of them.
    """
    e = sp.simplify(to_chain(expr))
    if e == 0:
        return True
    if not numeric_fallback:
        return False
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(8):
        v = sp.N(e.subs(_probe_values(e.free_symbols, rng)), 40)
        if not (v.is_number and abs(complex(v)) < 1e-25):
            return False
    return True


def _check(expr, what: str) -> None:
    if not is_zero(expr):
        raise AssertionError(f"sympy could not confirm {what}: residual {expr}")


# ------------------------------------------------------------------------------- DDPM
def ddpm_posterior() -> dict:
    """q(x_{t−1} | x_t, x_0) by completing the square (Zhu's slides, "DDPM: Reverse Diffusion Process";
    Ahmad's notes, eqs 1.5–1.7; Ho et al. 2020, eqs 6–7).

    Bayes: q(x_{t−1} | x_t, x_0) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x_0) / q(x_t | x_0), three
    Gaussians (eqs 1.1 and 1.3). Twice the negative log is a quadratic A x_{t−1}² − 2B x_{t−1} + C
    per coordinate, so the posterior is Gaussian with variance 1/A and mean B/A.

    Returns a dict:

    - ``exponent``: the quadratic (−2 log of the unnormalised density), in α_t, ᾱ_{t−1};
    - ``A``, ``B``: its x_{t−1}² coefficient and half its −x_{t−1} coefficient;
    - ``variance``: 1/A, simplified; ``beta_tilde``: (1−ᾱ_{t−1}) β_t / (1−ᾱ_t), the closed form;
    - ``mean``: B/A; ``coef_x0`` and ``coef_xt``: its coefficients of x_0 and x_t;
      ``coef_x0_closed`` = √ᾱ_{t−1} β_t/(1−ᾱ_t), ``coef_xt_closed`` = √α_t (1−ᾱ_{t−1})/(1−ᾱ_t);
    - ``remainder``: exponent − (x_{t−1} − mean)²/variance, which is 0 (the three Gaussians'
      normalisers combine into the posterior's, so nothing is left over);
    - ``mean_eps``: the mean with x_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t substituted (eq 1.6), and
      ``mean_eps_closed`` = (x_t − β_t ε/√(1−ᾱ_t))/√α_t, the corrected eq 1.7;
    - ``mean_eps_printed_1_7``: eq 1.7 as printed, with 1/√ᾱ_t in front.
    """
    a, ap = alpha_t, ab_prev
    ab = a * ap
    expo = ((x_t - sp.sqrt(a) * x_prev) ** 2 / (1 - a)           # q(x_t | x_{t−1}), eq 1.1
            + (x_prev - sp.sqrt(ap) * x_0) ** 2 / (1 - ap)         # q(x_{t−1} | x_0), eq 1.3
            - (x_t - sp.sqrt(ab) * x_0) ** 2 / (1 - ab))           # q(x_t | x_0), eq 1.3
    poly = sp.Poly(sp.expand(expo), x_prev)
    A = sp.simplify(poly.coeff_monomial(x_prev ** 2))
    B = sp.simplify(-poly.coeff_monomial(x_prev) / 2)
    variance = sp.factor(sp.simplify(1 / A))
    mean = sp.factor(sp.simplify(B / A))
    coef_x0 = sp.factor(sp.diff(mean, x_0))
    coef_xt = sp.factor(sp.diff(mean, x_t))
    remainder = sp.simplify(expo - (x_prev - mean) ** 2 / variance)

    beta_tilde = (1 - ab_prev) / (1 - ab_t) * beta_t
    coef_x0_closed = sp.sqrt(ab_prev) * beta_t / (1 - ab_t)
    coef_xt_closed = sp.sqrt(alpha_t) * (1 - ab_prev) / (1 - ab_t)
    _check(variance - beta_tilde, "variance = beta_tilde")
    _check(coef_x0 - coef_x0_closed, "the x_0 coefficient of the posterior mean")
    _check(coef_xt - coef_xt_closed, "the x_t coefficient of the posterior mean")
    _check(remainder, "that completing the square leaves no remainder")

    x0_of_eps = (x_t - sp.sqrt(1 - ab) * eps) / sp.sqrt(ab)         # eq 1.6
    mean_eps = sp.factor(sp.simplify(mean.subs(x_0, x0_of_eps)))
    mean_eps_closed = (x_t - beta_t / sp.sqrt(1 - ab_t) * eps) / sp.sqrt(alpha_t)   # eq 1.7, fixed
    mean_eps_printed = (x_t - (1 - alpha_t) / sp.sqrt(1 - ab_t) * eps) / sp.sqrt(ab_t)  # as printed
    _check(mean_eps - mean_eps_closed, "the epsilon form of the posterior mean")
    return {"exponent": expo, "A": A, "B": B, "variance": variance, "beta_tilde": beta_tilde,
            "mean": mean, "coef_x0": coef_x0, "coef_xt": coef_xt,
            "coef_x0_closed": coef_x0_closed, "coef_xt_closed": coef_xt_closed,
            "remainder": remainder, "mean_eps": mean_eps, "mean_eps_closed": mean_eps_closed,
            "mean_eps_printed_1_7": mean_eps_printed}


def simple_loss_weight() -> dict:
    """The per-t weight between L_{t−1} and L_simple (Ahmad's notes, eq 1.8; Zhu's slides,
    "DDPM: Parameterization for Training Loss"; Ho et al. 2020, eqs 12 and 14).

    With μ_θ = (x_t − β_t ε_θ/√(1−ᾱ_t))/√α_t and Σ_θ = σ_t² I, the KL term of the VLB is
    ‖μ̃ − μ_θ‖²/(2σ_t²) = w_t ‖ε − ε_θ‖² with w_t = β_t² / (2 σ_t² α_t (1−ᾱ_t)). Eq 1.8 writes the
    two lines as equal; they differ by w_t, which Ho et al. drop on purpose ("L_simple").

    Returns ``{"kl_term", "weight", "residual"}``; ``residual`` = kl_term − weight·(ε−ε_θ)² = 0.
    """
    mu_tilde = (x_t - beta_t / sp.sqrt(1 - ab_t) * eps) / sp.sqrt(alpha_t)
    mu_theta = (x_t - beta_t / sp.sqrt(1 - ab_t) * eps_theta) / sp.sqrt(alpha_t)
    kl = (mu_tilde - mu_theta) ** 2 / (2 * sigma_t ** 2)
    weight = beta_t ** 2 / (2 * sigma_t ** 2 * alpha_t * (1 - ab_t))
    residual = sp.simplify(kl - weight * (eps - eps_theta) ** 2)
    _check(residual, "the L_simple weight")
    return {"kl_term": kl, "weight": weight, "residual": residual}


# ------------------------------------------------------------------------------- DDIM
def ddim_family() -> dict:
    """The DDIM family: solve eq 1.15 for k_t and λ_t (Ahmad's notes, eqs 1.10–1.21; Zhu's slides,
    "DDIM: Variational Inference for Non-Markovian Forward Processes"; DDIM eq 7).

    Ansatz (eqs 1.10–1.11, with σ_t ε, not σ_t² ε as eq 1.11 prints):
    x_{t−1} = k_t x_t + λ_t x_0 + σ_t ε with x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε' (eq 1.12) and ε, ε'
    independent. Asking x_{t−1} | x_0 to have the marginal N(√ᾱ_{t−1} x_0, (1−ᾱ_{t−1}) I) (eq 1.14)
    gives, matching mean and variance (eq 1.15),

        √ᾱ_{t−1} = k_t √ᾱ_t + λ_t,     1 − ᾱ_{t−1} = k_t² (1−ᾱ_t) + σ_t².

    Here ᾱ_t and ᾱ_{t−1} are independent symbols (the family works on any sub-sequence).

    Returns a dict: ``equations`` (the two), ``solutions`` (both roots), ``k``, ``lam`` (the
    root with k_t > 0, eq 1.16), ``mean`` (k x_t + λ x_0), ``mean_closed`` (eq 1.17's last line),
    ``step`` (eq 1.21 without noise: the mean with x_0 = x̂_0(x_t, ε), eq 1.20) and
    ``step_closed`` (√ᾱ_{t−1} x̂_0 + √(1−ᾱ_{t−1}−σ_t²) ε), ``variance_printed_1_11``
    (k² (1−ᾱ_t) + σ_t⁴: what eq 1.11's σ_t² ε would give) and ``noise_same_symbol_1_13``
    ((k√(1−ᾱ_t) + σ_t)², the variance eq 1.13 would have if its two ε̄ were the same draw).
    """
    eqs = [sp.Eq(sp.sqrt(ab_prev), k_t * sp.sqrt(ab_t) + lam_t),           # eq 1.15, means
           sp.Eq(1 - ab_prev, k_t ** 2 * (1 - ab_t) + sigma_t ** 2)]        # eq 1.15, variances
    sols = sp.solve(eqs, [k_t, lam_t], dict=True)
    probe = {ab_t: sp.Rational(1, 5), ab_prev: sp.Rational(1, 2), sigma_t: sp.Rational(1, 10)}
    pos = [s for s in sols if s[k_t].subs(probe).evalf() > 0]
    if len(pos) != 1:
        raise AssertionError(f"expected one root with k_t > 0, got {sols}")
    k_root, lam_root = pos[0][k_t], pos[0][lam_t]
    k_closed = sp.sqrt(1 - ab_prev - sigma_t ** 2) / sp.sqrt(1 - ab_t)         # eq 1.16
    lam_closed = sp.sqrt(ab_prev) - k_closed * sp.sqrt(ab_t)                  # eq 1.16
    # both k's are positive on the domain, so equal squares make them equal (sympy's root is
    # written with a different square-root branch, which simplify cannot always merge)
    _check(k_root ** 2 - k_closed ** 2, "k_t^2 (eq 1.16)")
    _check(lam_root - (sp.sqrt(ab_prev) - k_root * sp.sqrt(ab_t)), "lambda_t (eq 1.16)")
    k, lam = k_closed, lam_closed
    mean = k * x_t + lam * x_0
    mean_closed = (sp.sqrt(ab_prev) * x_0 + sp.sqrt(1 - ab_prev - sigma_t ** 2)
                   * (x_t - sp.sqrt(ab_t) * x_0) / sp.sqrt(1 - ab_t))          # eq 1.17
    _check(mean - mean_closed, "the DDIM mean (eq 1.17)")
    x0_hat = (x_t - sp.sqrt(1 - ab_t) * eps) / sp.sqrt(ab_t)                   # eq 1.20
    step = sp.simplify(mean.subs(x_0, x0_hat))
    step_closed = sp.sqrt(ab_prev) * x0_hat + sp.sqrt(1 - ab_prev - sigma_t ** 2) * eps  # eq 1.21
    _check(step - step_closed, "the DDIM step (eq 1.21)")
    return {"equations": eqs, "solutions": sols, "k_root": k_root, "lam_root": lam_root,
            "k": k, "lam": lam, "k_closed": k_closed,
            "mean": mean, "mean_closed": mean_closed, "x0_hat": x0_hat, "step": step,
            "step_closed": step_closed,
            "variance_printed_1_11": k_closed ** 2 * (1 - ab_t) + sigma_t ** 4,
            "noise_same_symbol_1_13": (k_closed * sp.sqrt(1 - ab_t) + sigma_t) ** 2}


def ddim_sigma_for_ddpm() -> dict:
    """The σ_t² that makes the DDIM kernel the DDPM posterior (Ahmad's notes, eq 1.24; Zhu's slides,
    "DDIM: Sampling from Generalized Generative Processes"; DDIM eq 16).

    Match the x_t coefficient of the DDIM mean (eq 1.17) to that of the DDPM posterior mean
    (:func:`ddpm_posterior`) and solve for σ_t²; then check the x_0 coefficients agree too. The
    answer is β̃_t = (1−ᾱ_{t−1}) β_t/(1−ᾱ_t), which is also the DDIM paper's σ_t(η)² at η = 1.
    Eq 1.24 as printed carries a spurious square root, σ_t² = √((1−ᾱ_{t−1})/(1−ᾱ_t)) β_t.

    Returns a dict: ``sigma2`` (the solution), ``beta_tilde``, ``eta_form`` (σ_t(η=1)²,
    DDIM eq 16), ``printed_1_24``, ``printed_minus_correct`` (factored; zero only when
    ᾱ_{t−1} = ᾱ_t), ``coef_x0_residual`` (0).
    """
    s2 = sp.Symbol("s2", positive=True)
    a, ap = alpha_t, ab_prev
    ab = a * ap
    coef_xt_ddim = sp.sqrt(1 - ap - s2) / sp.sqrt(1 - ab)                     # eq 1.17
    coef_xt_ddpm = sp.sqrt(a) * (1 - ap) / (1 - ab)                            # posterior mean
    sol = sp.solve(sp.Eq(coef_xt_ddim ** 2, coef_xt_ddpm ** 2), s2)
    if len(sol) != 1:
        raise AssertionError(f"expected one solution for sigma^2, got {sol}")
    sigma2 = sp.factor(sp.simplify(sol[0]))
    beta_tilde = (1 - ab_prev) / (1 - ab_t) * beta_t
    _check(sigma2 - beta_tilde, "sigma_t^2 = beta_tilde")
    # √(1 − ᾱ_{t−1} − σ_t²) is √α_t (1 − ᾱ_{t−1})/√(1 − ᾱ_t): both sides are positive and their
    # squares agree, so substitute the square-root-free form (sympy cannot take √ of (1−ᾱ)²
    # without knowing the sign)
    root = sp.sqrt(a) * (1 - ap) / sp.sqrt(1 - ab)
    _check(sp.expand(root ** 2) - (1 - ap - sigma2), "the direction coefficient's square")
    coef_x0_ddim = sp.sqrt(ap) - root * sp.sqrt(ab) / sp.sqrt(1 - ab)
    coef_x0_residual = sp.simplify(coef_x0_ddim - sp.sqrt(ap) * (1 - a) / (1 - ab))
    _check(coef_x0_residual, "the x_0 coefficients with sigma_t^2 = beta_tilde")
    eta_form = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)              # DDIM eq 16, η = 1
    _check(eta_form - beta_tilde, "sigma_t(eta=1)^2 = beta_tilde")
    printed = sp.sqrt(1 - ab_prev) / sp.sqrt(1 - ab_t) * beta_t               # eq 1.24 as printed
    sqrt_r = sp.sqrt(1 - ab_prev) / sp.sqrt(1 - ab_t)                        # √r, r < 1
    diff = beta_t * sqrt_r * (1 - sqrt_r)
    _check(printed - beta_tilde - diff, "printed - correct = beta sqrt(r) (1 - sqrt(r))")
    ratio = sp.simplify(printed / beta_tilde)
    _check(ratio - sp.sqrt(1 - ab_t) / sp.sqrt(1 - ab_prev), "printed / correct")
    return {"sigma2": sigma2, "beta_tilde": beta_tilde, "eta_form": eta_form,
            "printed_1_24": printed, "printed_minus_correct": diff,
            "printed_over_correct": sp.sqrt(1 - ab_t) / sp.sqrt(1 - ab_prev),
            "coef_x0_residual": coef_x0_residual}


def ddim_euler() -> dict:
    """The η = 0 DDIM step is an Euler step of eq 1.25 (Ahmad's notes, eqs 1.22 and 1.25–1.26;
    DDIM eqs 13–14).

    With u = x/√ᾱ and τ = √((1−ᾱ)/ᾱ), eq 1.22 rearranges to u_s − u_t = (τ_s − τ_t) ε_θ(x_t, t):
    one Euler step of du/dτ = ε_θ(u/√(1+τ²), τ) from τ_t to τ_s. Here s is the next (lower)
    level, ᾱ_s > ᾱ_t.

    Inversion (eq 1.26) integrates the *same* ODE towards larger τ: u_t = u_s + (τ_t − τ_s) ε.
    The printed du = −dτ ε flips the sign of the ε term, which is a different map.

    Returns a dict: ``u``, ``tau`` (of x_t), ``x_of_u`` (u/√(1+τ²), equal to x_t),
    ``euler_step`` (x_s from the Euler step), ``ddim_step`` (eq 1.22), ``residual`` (0),
    ``inversion_step`` (the η = 0 step from level s up to t, as ``ddim_invert`` takes it),
    ``inversion_euler`` (Euler with +dτ), ``inversion_printed_1_26`` (Euler with −dτ),
    ``printed_1_26_minus_correct`` (not 0), and ``difference_quotient``: the limit of
    (τ(t−Δt) − τ(t))/Δt, which is −dτ/dt (Ahmad's notes write +dτ/dt; the sign cancels between the
    two sides).
    """
    x = sp.Symbol("x", real=True)
    uu = x / sp.sqrt(ab_t)                                                      # eq 1.25: u
    tt = sp.sqrt((1 - ab_t) / ab_t)                                            # eq 1.25: τ
    ts = sp.sqrt((1 - ab_s) / ab_s)
    x_of_u = sp.simplify(uu / sp.sqrt(1 + tt ** 2))
    _check(x_of_u - x, "x = u / sqrt(1 + tau^2)")
    u_next = uu + (ts - tt) * eps                                              # Euler, du = ε dτ
    x_next = sp.simplify(u_next / sp.sqrt(1 + ts ** 2))
    ddim = sp.sqrt(ab_s) * (x - sp.sqrt(1 - ab_t) * eps) / sp.sqrt(ab_t) + sp.sqrt(1 - ab_s) * eps
    residual = sp.simplify(x_next - ddim)                                     # eq 1.22
    _check(residual, "Euler in tau = DDIM (eq 1.22)")

    # inversion: from level s (less noise, x) up to level t; ε evaluated at the start point
    us, tss = x / sp.sqrt(ab_s), ts
    inv_step = sp.sqrt(ab_t) * (x - sp.sqrt(1 - ab_s) * eps) / sp.sqrt(ab_s) + sp.sqrt(1 - ab_t) * eps
    inv_euler = sp.simplify((us + (tt - tss) * eps) * sp.sqrt(ab_t))
    inv_printed = sp.simplify((us - (tt - tss) * eps) * sp.sqrt(ab_t))
    _check(inv_euler - inv_step, "inversion = Euler with +dtau")
    printed_diff = sp.simplify(inv_printed - inv_step)

    t, h = sp.symbols("t h", real=True)
    f = sp.Function(r"\tau")
    # first-order Taylor expansion of τ(t − Δt), then the quotient at Δt → 0
    quotient = sp.simplify(((f(t - h).series(h, 0, 2).removeO() - f(t)) / h).doit())
    return {"u": uu, "tau": tt, "x_of_u": x_of_u, "euler_step": x_next, "ddim_step": ddim,
            "residual": residual, "inversion_step": inv_step, "inversion_euler": inv_euler,
            "inversion_printed_1_26": inv_printed, "printed_1_26_minus_correct": printed_diff,
            "difference_quotient": quotient, "x": x}


def gaussian_ode() -> dict:
    """Eq 1.25 for 1-D Gaussian data N(0, s²), where ε* is known, solved in closed form.

    For x_0 ~ N(0, s²), x_t ~ N(0, ᾱ s² + 1 − ᾱ) and ε*(x) = √(1−ᾱ) x/(ᾱ s² + 1 − ᾱ) (the
    GaussianMixture formula with one component). In (u, τ) this is ε* = τ u/(s² + τ²), so eq 1.25
    reads du/dτ = τ u/(s² + τ²), solved by u(τ) = u(τ_T) √((s² + τ²)/(s² + τ_T²)): at τ = 0 the
    sample is x_0 = u(0) = s · u(τ_T)/√(s² + τ_T²). With x_T drawn from the true marginal
    N(0, ᾱ_T s² + 1 − ᾱ_T), x_0 is exactly N(0, s²): the ODE carries marginals to marginals.

    Returns ``{"eps_star_u", "ode", "solution", "x0_of_xT"}``.
    """
    ab = 1 / (1 + tau ** 2)
    x = u / sp.sqrt(1 + tau ** 2)
    eps_star = sp.simplify(sp.sqrt(1 - ab) * x / (ab * s_data ** 2 + 1 - ab))
    uf = sp.Function("u")
    ode = sp.Eq(uf(tau).diff(tau), eps_star.subs(u, uf(tau)))
    sol = sp.dsolve(ode)
    tau_T, u_T = sp.symbols(r"\tau_T u_T", positive=True)
    consts = sorted((c for c in sol.rhs.free_symbols if c.name.startswith("C")), key=str)
    if len(consts) != 1:
        raise AssertionError(f"expected one integration constant in {sol}")
    C = sp.solve(sp.Eq(sol.rhs.subs(tau, tau_T), u_T), consts[0])[0]
    u_of_tau = sp.simplify(sol.rhs.subs(consts[0], C))
    _check(sp.diff(u_of_tau, tau) - eps_star.subs(u, u_of_tau), "the Gaussian ODE solution")
    x_T = sp.Symbol("x_T", real=True)
    x0 = sp.simplify(u_of_tau.subs(tau, 0).subs(u_T, x_T * sp.sqrt(1 + tau_T ** 2)))
    return {"eps_star_u": eps_star, "ode": ode, "solution": u_of_tau, "x0_of_xT": x0,
            "tau_T": tau_T, "u_T": u_T, "x_T": x_T}
