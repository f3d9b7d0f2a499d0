"""Linear inverse problems in closed form: DDRM, DDNM/DDNM+, DiffPIR and DMPS (Zhu's slides, *Sampling from the Posterior*).

For y = A x + σ_y n with a known linear A, these four methods need no gradient through the
network: each replaces the intractable likelihood term of ∇ log p_t(x | y) by a closed form in
A's singular value decomposition A = U diag(s) Vᵀ (:mod:`.operators`):

- :func:`ddrm` (Kawar et al. 2022; Zhu's slides, *DDRM*): a variational sampler in
  the spectral coordinates x̄ = Vᵀ x (VE scale, σ_t = √((1−ᾱ_t)/ᾱ_t)), three cases per
  coordinate (null space, y noisier than x_t, y less noisy);
- :func:`ddnm`, :func:`ddnm_plus` (Wang et al. 2023, Algorithms 1–2; Zhu's slides, *DDNM*): the
  range–null decomposition x̂_0 = A†y + (I − A†A) x_{0|t}; DDNM+ scales the correction by Σ_t
  and the noise by Φ_t for noisy y, and travels back in time;
- :func:`diffpir` (Zhu et al. 2023, Algorithm 1; Zhu's slides, *DiffPIR*): half-quadratic
  splitting, a proximal data step x̂_0 = argmin ‖y − A x‖² + ρ_t ‖x − ẑ_0‖²;
- :func:`dmps` (Meng & Kabashima 2022, Algorithm 1 and eq 12; Zhu's slides, *DMPS*): DDPM's
  ancestral step plus λ times the closed-form gradient of the uninformative-prior likelihood
  p̃(y | x_t) = N(y; A x_t/√ᾱ_t, σ² I + (1−ᾱ_t)/ᾱ_t A Aᵀ) (:func:`dmps_grad`).

Every solver has the restoration signature (``eps_model``, ``operator``, ``y``, ``sigma_y``,
``alphas_cumprod``, ``timesteps``, ``x_T``, ``generator``, ``progress``, ``callback``, then its
hyperparameters with the papers' defaults). ``t`` indexes ``alphas_cumprod`` (0-based); after
the last step of ``timesteps`` ᾱ = 1. On a strided grid the "one step" quantities are those
between consecutive grid levels: α = ᾱ_t/ᾱ_prev, β = 1 − α (Ho et al. 2020, eqs 6–7).
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..ddpm import predict_x0
from ..utils import (batch_timesteps, check_callable, check_choice, check_decreasing,
                     check_int, check_positive, check_range, check_tensor)
from .operators import Operator

__all__ = ["ddrm", "ddnm", "ddnm_plus", "diffpir", "dmps", "dmps_grad", "diffpir_prox",
           "range_null", "ddrm_step", "EVAL_CONFIGS"]


# ---------------------------------------------------------------------------- helpers
def _check_ac(alphas_cumprod) -> torch.Tensor:
    ac = check_tensor(alphas_cumprod, "alphas_cumprod", ndim=1).detach().double().cpu()
    if not bool(((ac > 0) & (ac < 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1); got values in "
                         f"[{float(ac.min())}, {float(ac.max())}]")
    return ac


def _default_timesteps(T, n):
    return list(range(0, T, T // n))[:n][::-1]


def _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps, x_T, generator, n_default,
           need_svd=False):
    """Validate the common arguments once; return (ac, ts, x_T, sigma_y)."""
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    if not isinstance(operator, Operator):
        raise TypeError(f"operator must be a diffnotes.restoration.operators.Operator, got "
                        f"{type(operator).__name__}")
    if need_svd and not operator.has_svd:
        raise ValueError(f"operator {operator.name!r} has no SVD, which this method needs")
    operator.check_y(y, "y")
    sigma_y = check_positive(sigma_y, "sigma_y", allow_zero=True)
    ac = _check_ac(alphas_cumprod)
    ts = _default_timesteps(len(ac), n_default) if timesteps is None else \
        check_decreasing(timesteps, len(ac), "timesteps")
    shape = (y.shape[0], *operator.x_shape)
    if x_T is None:
        x_T = torch.randn(shape, generator=generator, dtype=y.dtype,
                          device=generator.device if generator is not None else y.device)
        x_T = x_T.to(y.device)
    check_tensor(x_T, "x_T")
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape} (one row per measurement), got "
                         f"{tuple(x_T.shape)}")
    return ac, ts, x_T, sigma_y


def _randn(shape, like, generator):
    z = torch.randn(shape, generator=generator, dtype=like.dtype,
                    device=generator.device if generator is not None else like.device)
    return z.to(like.device)


def _levels(ac, ts, i):
    """ᾱ at grid step i and at the next one (1 after the last step)."""
    return float(ac[ts[i]]), (float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0)


def _eps(eps_model, x, t):
    with torch.no_grad():
        return eps_model(x, batch_timesteps(t, x))


def _s_full(op, like):
    """The singular values padded with zeros to the n coordinates of V_T: (B or 1, n)."""
    s = op.singulars_like(like)
    return op._pad(s, op.n) if s.shape[1] < op.n else s


def _clip(x, eps, x0, a, clip_x0):
    """x̂_0 clamped to [−c, c] (DDPM's ``clip_sample``, guided-diffusion's ``clip_denoised``) and
    the ε consistent with it, (x_t − √ᾱ x̂_0)/√(1−ᾱ); unchanged when ``clip_x0`` is None."""
    if clip_x0 is None:
        return x0, eps
    x0 = x0.clamp(-clip_x0, clip_x0)
    return x0, (x - a ** 0.5 * x0) / (1 - a) ** 0.5


def _check_clip(clip_x0):
    return None if clip_x0 is None else check_positive(clip_x0, "clip_x0")


def _bar(ts, progress, desc):
    return tqdm(ts, disable=not progress, desc=desc, leave=False)


def _posterior(x_t, x0, a, a_prev):
    """Mean coefficients and variance of q(x_prev | x_t, x_0) between grid levels ᾱ_t → ᾱ_prev
    (Ho et al. 2020, eqs 6–7): μ̃ = c0 x_0 + ct x_t, β̃ = (1−ᾱ_prev)/(1−ᾱ_t) β."""
    beta = 1 - a / a_prev
    c0 = a_prev ** 0.5 * beta / (1 - a)
    ct = (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)
    return c0 * x0 + ct * x_t, (1 - a_prev) / (1 - a) * beta, c0


# ---------------------------------------------------------------------------- DDRM
def ddrm_step(op, x0_bar, eps_bar, y_bar, s, sigma_next, sigma_y, eta, eta_b, z_bar):
    """One DDRM update in spectral coordinates (Kawar et al. 2022, the reverse kernel p_θ^(t);
    Zhu's slides, *DDRM*):
    for each coordinate i (VE scale, σ = σ_t of the step's target level, σ_y/s_i the noise of ȳ_i)

    * s_i = 0:               x̄_θ + √(1−η²) σ ε̄_i + η σ z_i   (ε̄ = (x̄_{t+1} − x̄_θ)/σ_{t+1});
    * s_i > 0, σ < σ_y/s_i:  x̄_θ + √(1−η²) σ (ȳ_i − x̄_θ)/(σ_y/s_i) + η σ z_i;
    * s_i > 0, σ ≥ σ_y/s_i:  (1−η_b) x̄_θ + η_b ȳ_i + √(σ² − σ_y²/s_i² η_b²) z_i.

    All arguments are (B, n) spectral tensors (``s`` padded with zeros); returns x̄_t (B, n)."""
    obs = s > 0
    s_safe = torch.where(obs, s, torch.ones_like(s))
    noise_y = torch.where(obs, sigma_y / s_safe, torch.zeros_like(s))      # σ_y/s_i (s_i > 0)
    null = x0_bar + (1 - eta ** 2) ** 0.5 * sigma_next * eps_bar + eta * sigma_next * z_bar
    ratio = (y_bar - x0_bar) / torch.where(noise_y > 0, noise_y, torch.ones_like(noise_y))
    before = x0_bar + (1 - eta ** 2) ** 0.5 * sigma_next * ratio + eta * sigma_next * z_bar
    var_b = (sigma_next ** 2 - noise_y ** 2 * eta_b ** 2).clamp_min(0.0)
    after = (1 - eta_b) * x0_bar + eta_b * y_bar + var_b.sqrt() * z_bar
    case3 = obs & (sigma_next >= noise_y)
    case2 = obs & ~case3
    return torch.where(case3, after, torch.where(case2, before, null))


def ddrm(eps_model: Callable, operator: Operator, y: torch.Tensor, sigma_y: float = 0.0, *,
         alphas_cumprod, timesteps=None, x_T=None, generator=None, progress: bool = True,
         callback: Callable | None = None, eta: float = 0.85, eta_b: float = 1.0,
         clip_x0: float | None = None):
    """DDRM (Kawar et al. 2022, and their code's ``efficient_generalized_steps``; Zhu's slides, *DDRM*).

    In spectral coordinates x̄ = Vᵀ x / √ᾱ (VE scale σ_t = √((1−ᾱ_t)/ᾱ_t)), ȳ = Σ† Uᵀ y, each
    coordinate is updated by :func:`ddrm_step`; x_prev = √ᾱ_prev V x̄. Start (p_θ^(T)): observed
    coordinates with σ_T ≥ σ_y/s_i at ȳ_i + √(σ_T² − σ_y²/s_i²) z_i, the others at x_T's own
    coordinates (in VE scale z_i/√ᾱ_T, the paper's σ_T z_i up to a factor √(1−ᾱ_T) ≈ 1), so
    that with A = 0 the sampler is DDIM from the same x_T. ``eta`` (η) and ``eta_b`` (η_b) in
    [0, 1]; the paper's defaults η = 0.85, η_b = 1 and 20 steps.

    DDRM's η is not DDIM's: its noise is η √(1−ᾱ_prev) (VP scale), DDIM's eq 16 σ_t(η) is
    η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_prev); the two agree at η = 0 and η = 1 only in the limit.
    ``clip_x0`` = c clamps the network's x̂_0 to [−c, c] (and ε with it) before the update.
    """
    eta = check_range(eta, "eta", 0.0, 1.0)
    clip_x0 = _check_clip(clip_x0)
    eta_b = check_range(eta_b, "eta_b", 0.0, 1.0)
    ac, ts, x_T, sigma_y = _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps, x_T,
                                  generator, 20, need_svd=True)
    op = operator
    B, n, r = y.shape[0], op.n, op.r
    s = _s_full(op, y).expand(B, n)
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    y_bar = torch.where(s > 0, op._pad(op.U_T(y)[:, :r], n) / s_safe, torch.zeros_like(s))  # Σ†Uᵀy
    a_T = float(ac[ts[0]])
    sig_T = ((1 - a_T) / a_T) ** 0.5
    z = op.V_T(x_T)
    noise_y = torch.where(s > 0, sigma_y / s_safe, torch.zeros_like(s))
    init_obs = (s > 0) & (sig_T >= noise_y)
    x_bar = torch.where(init_obs, y_bar + (sig_T ** 2 - noise_y ** 2).clamp_min(0).sqrt() * z,
                        z / a_T ** 0.5)                                        # p_θ^(T)
    x = a_T ** 0.5 * op.V(x_bar)
    for i, t in enumerate(_bar(ts, progress, "DDRM")):
        a, a_prev = _levels(ac, ts, i)
        eps = _eps(eps_model, x, t)
        x0, eps = _clip(x, eps, predict_x0(x, eps, a), a, clip_x0)
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=x0, eps=eps))
        sig_next = ((1 - a_prev) / a_prev) ** 0.5
        z_bar = _randn((B, n), x, generator)
        x_bar = ddrm_step(op, op.V_T(x0), op.V_T(eps), y_bar, s, sig_next, sigma_y, eta, eta_b,
                          z_bar)                                               # p_θ^(t)
        x = a_prev ** 0.5 * op.V(x_bar)
    return x


# ---------------------------------------------------------------------------- DDNM
def range_null(operator: Operator, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x̂ = A† y + (I − A† A) x_0 = x_0 − A†(A x_0 − y) (Wang et al. 2023, Algorithm 1 line 4; Zhu's slides,
    *DDNM*): keep x_0's null-space part and replace its range-space part by the measurement's."""
    return x0 - operator.A_pinv(operator.A(x0) - y)


def ddnm(eps_model: Callable, operator: Operator, y: torch.Tensor, sigma_y: float = 0.0, *,
         alphas_cumprod, timesteps=None, x_T=None, generator=None, progress: bool = True,
         callback: Callable | None = None, clip_x0: float | None = None):
    """DDNM (Wang et al. 2023, Algorithm 1; Zhu's slides, *DDNM*, Algorithm 1):

    x_{0|t} = (x_t − √(1−ᾱ_t) ε_θ)/√ᾱ_t,  x̂_{0|t} = A† y + (I − A†A) x_{0|t}  (line 4),
    x_{t−1} ~ q(x_{t−1} | x_t, x̂_{0|t})  (DDPM's posterior, Ho et al. eq 7).

    At the last step q has coefficient 1 on x̂_0 and no noise, so A x_0 = A A† y = y exactly
    (noiseless y in A's range). ``sigma_y`` is accepted and ignored (DDNM assumes σ_y = 0; use
    :func:`ddnm_plus` for noisy y). 100 steps by default. ``clip_x0`` = c clamps x_{0|t} to
    [−c, c] before the correction.
    """
    clip_x0 = _check_clip(clip_x0)
    ac, ts, x_T, _ = _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps, x_T,
                            generator, 100)
    x = x_T
    for i, t in enumerate(_bar(ts, progress, "DDNM")):
        a, a_prev = _levels(ac, ts, i)
        eps = _eps(eps_model, x, t)
        x0, _ = _clip(x, eps, predict_x0(x, eps, a), a, clip_x0)     # Algorithm 1, line 3
        x0_hat = range_null(operator, x0, y)                         # line 4
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=x0, x0_corrected=x0_hat, eps=eps))
        mean, var, _ = _posterior(x, x0_hat, a, a_prev)              # line 5
        x = mean + var ** 0.5 * _randn(x.shape, x, generator) if var > 0 else mean
    return x


def _ddnm_plus_step(op, x, x0, y, sigma_y, a, a_prev, scale, generator):
    """One DDNM+ update x_t → x_prev (Wang et al. 2023, eq 17 and Algorithm 2, lines 6–8)."""
    corr = op.A_pinv(op.A(x0) - y)                                   # A†(A x_{0|t} − y)
    beta = 1 - a / a_prev
    var = (1 - a_prev) / (1 - a) * beta
    c0 = a_prev ** 0.5 * beta / (1 - a)                              # a_t: x̂_0's coefficient
    if scale is not None:                                            # Σ_t = scale·I, Φ_t = β̃
        x0_hat = x0 - scale * corr
        mean, var, _ = _posterior(x, x0_hat, a, a_prev)
        noise = var ** 0.5 * _randn(x.shape, x, generator) if var > 0 else 0.0
        return mean + noise, x0_hat
    # the paper's rule per singular direction: y's noise in x̂ along v_i is a_t λ_i σ_y / s_i;
    # λ_i = 1 if it fits within the step's noise σ_t = √β̃, else λ_i = σ_t s_i / (a_t σ_y), and
    # Φ_t tops the noise up to σ_t: γ_i = σ_t² − (a_t λ_i σ_y / s_i)² (the authors' code,
    # Lambda and Lambda_noise of its SVD operators).
    B, n = x.shape[0], op.n
    s = _s_full(op, x).expand(B, n)
    obs = s > 0
    s_safe = torch.where(obs, s, torch.ones_like(s))
    sig_t = var ** 0.5
    y_noise = c0 * sigma_y / s_safe                                  # a_t σ_y / s_i
    shrink = obs & (y_noise > sig_t)
    lam = torch.where(shrink, sig_t / torch.where(shrink, y_noise, torch.ones_like(s)),
                      torch.ones_like(s))
    gamma = torch.where(obs, (var - (lam * y_noise) ** 2).clamp_min(0.0), torch.full_like(s, var))
    x0_hat = x0 - op.V(lam * op.V_T(corr))                           # eq 17, Σ_t = V Λ_t Vᵀ
    mean, _, _ = _posterior(x, x0_hat, a, a_prev)
    if var > 0:
        z = _randn(x.shape, x, generator)
        mean = mean + op.V(gamma.sqrt() * op.V_T(z))                 # Φ_t = V diag(γ) Vᵀ
    return mean, x0_hat


def ddnm_plus(eps_model: Callable, operator: Operator, y: torch.Tensor, sigma_y: float = 0.0, *,
              alphas_cumprod, timesteps=None, x_T=None, generator=None, progress: bool = True,
              callback: Callable | None = None, scale: float | None = None,
              travel_length: int = 0, travel_every: int = 1, clip_x0: float | None = None):
    """DDNM+ (Wang et al. 2023, Algorithm 2; Zhu's slides, *DDNM*, Algorithm 2):

    x̂_{0|t} = x_{0|t} − Σ_t A†(A x_{0|t} − y)  (eq 17),  x_{t−1} ~ N(μ̃(x_t, x̂_{0|t}), Φ_t).

    ``scale=None`` takes the paper's Σ_t and Φ_t for noisy y (§3.3), written per singular
    direction as the authors' code does (Σ_t = V Λ_t Vᵀ; for unit singular values, as
    inpainting, it is the paper's scalar λ_t); a number gives Σ_t = scale·I with Φ_t = β̃ (so
    ``scale=1`` is :func:`ddnm` and ``scale=0`` unconditional DDPM). With σ_y = 0 the rule gives
    Σ_t = I, Φ_t = β̃: DDNM again.

    Time travel (Algorithm 2, lines 3–5): at grid step k, L = min(k, ``travel_length``) steps are
    undone by the forward process, x_{t+L} ~ q(x_{t+L} | x_t), and sampled again (L + 1 model
    calls for one step of progress); ``travel_every`` = s travels only at every s-th step.
    ``clip_x0`` = c clamps x_{0|t} to [−c, c] before the correction.
    """
    clip_x0 = _check_clip(clip_x0)
    if scale is not None:
        scale = check_range(scale, "scale", 0.0, None)
    travel_length = check_int(travel_length, "travel_length", min=0)
    travel_every = check_int(travel_every, "travel_every", min=1)
    ac, ts, x_T, sigma_y = _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps,
                                  x_T, generator, 100, need_svd=scale is None)
    x = x_T
    for k, t in enumerate(_bar(ts, progress, "DDNM+")):
        L = min(k, travel_length) if k % travel_every == 0 else 0
        if L > 0:                                                    # line 4: x_{t+L} ~ q(·|x_t)
            a_from, a_to = float(ac[ts[k]]), float(ac[ts[k - L]])
            x = (a_to / a_from) ** 0.5 * x + (1 - a_to / a_from) ** 0.5 * \
                _randn(x.shape, x, generator)
        for j in range(k - L, k + 1):                                # lines 5–8
            a, a_prev = _levels(ac, ts, j)
            eps = _eps(eps_model, x, ts[j])
            x0, _ = _clip(x, eps, predict_x0(x, eps, a), a, clip_x0)
            x_new, x0_hat = _ddnm_plus_step(operator, x, x0, y, sigma_y, a, a_prev, scale,
                                            generator)
            if callback is not None:
                callback(dict(i=k, t=ts[j], x=x, x0_hat=x0, x0_corrected=x0_hat, eps=eps,
                              travel=j < k))
            x = x_new
    return x


# ---------------------------------------------------------------------------- DiffPIR
def diffpir_prox(operator: Operator, z0: torch.Tensor, y: torch.Tensor, rho: float,
                 data_step: str = "exact") -> torch.Tensor:
    """DiffPIR's data step x̂_0 = argmin_x ‖y − A x‖² + ρ ‖x − ẑ_0‖² (Zhu et al. 2023, Algorithm 1;
    Zhu's slides, *DiffPIR*, Algorithm 1 line 4).

    ``"exact"``: (AᵀA + ρI)⁻¹(Aᵀy + ρ ẑ_0), in A's SVD per coordinate (s_i u_i + ρ z̄_i)/(s_i² + ρ)
    with u = Uᵀy, z̄ = Vᵀẑ_0 (for a mask (m ⊙ y + ρ ẑ_0)/(m + ρ)); ρ = 0 is its limit A†y +
    (I − A†A) ẑ_0. ``"first_order"``: the slide's approximation
    ẑ_0 − 1/(2ρ) ∇_z ‖y − A z‖² = ẑ_0 + Aᵀ(y − A ẑ_0)/ρ (ρ > 0), one gradient step."""
    data_step = check_choice(data_step, "data_step", ("exact", "first_order"))
    rho = check_positive(rho, "rho", allow_zero=True)
    if data_step == "first_order":
        if rho == 0:
            raise ValueError("rho must be positive for the first-order data step")
        return z0 + operator.A_T(y - operator.A(z0)) / rho
    B, n, r = z0.shape[0], operator.n, operator.r
    s = _s_full(operator, z0).expand(B, n)
    u = operator._pad(operator.U_T(y)[:, :r], n)
    zb = operator.V_T(z0)
    obs = s > 0
    xb = torch.where(obs, (s * u + rho * zb) / torch.where(obs, s * s + rho, torch.ones_like(s)), zb)
    return operator.V(xb)


def diffpir(eps_model: Callable, operator: Operator, y: torch.Tensor, sigma_y: float = 0.0, *,
            alphas_cumprod, timesteps=None, x_T=None, generator=None, progress: bool = True,
            callback: Callable | None = None, lam: float = 1.0, zeta: float = 0.1,
            sigma_n: float | None = None, data_step: str = "exact", clip_x0: float | None = None):
    """DiffPIR (Zhu et al. 2023, Algorithm 1; Zhu's slides, *DiffPIR*): for each step

    ẑ_0 = (x_t + (1−ᾱ_t) s_θ)/√ᾱ_t (the denoiser),  ρ_t = λ σ_n²/σ̄_t², σ̄_t² = (1−ᾱ_t)/ᾱ_t,
    x̂_0 = :func:`diffpir_prox` (ẑ_0, ρ_t),  ε̂ = (x_t − √ᾱ_t x̂_0)/√(1−ᾱ_t),
    x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1−ᾱ_{t−1}) (√(1−ζ) ε̂ + √ζ ε_t).

    ``lam`` (λ > 0), ``zeta`` (ζ ∈ [0, 1]; the authors' configurations: λ = 1, ζ = 0.1 for
    super-resolution and deblurring, ζ = 1 for inpainting), ``sigma_n`` the noise level in ρ_t
    (default max(σ_y, 0.001), as the authors' code), ``data_step`` ``"exact"`` or ``"first_order"``;
    ``clip_x0`` = c clamps the denoiser's ẑ_0 to [−c, c] (the authors' code clips it to [−1, 1]).
    """
    clip_x0 = _check_clip(clip_x0)
    lam = check_positive(lam, "lam")
    zeta = check_range(zeta, "zeta", 0.0, 1.0)
    data_step = check_choice(data_step, "data_step", ("exact", "first_order"))
    ac, ts, x_T, sigma_y = _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps, x_T,
                                  generator, 100, need_svd=data_step == "exact")
    sigma_n = max(sigma_y, 1e-3) if sigma_n is None else check_positive(sigma_n, "sigma_n",
                                                                       allow_zero=True)
    x = x_T
    for i, t in enumerate(_bar(ts, progress, "DiffPIR")):
        a, a_prev = _levels(ac, ts, i)
        eps = _eps(eps_model, x, t)
        z0, _ = _clip(x, eps, predict_x0(x, eps, a), a, clip_x0)     # line 3 (s_θ = −ε/√(1−ᾱ))
        rho = lam * sigma_n ** 2 / ((1 - a) / a)                     # line 1: ρ_t
        x0 = diffpir_prox(operator, z0, y, rho, data_step)           # line 4
        eps_hat = (x - a ** 0.5 * x0) / (1 - a) ** 0.5               # line 5
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=z0, x0_corrected=x0, eps=eps, rho=rho))
        mix = (1 - zeta) ** 0.5 * eps_hat
        if zeta > 0 and a_prev < 1:
            mix = mix + zeta ** 0.5 * _randn(x.shape, x, generator)   # line 6
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * mix           # line 7
    return x


# ---------------------------------------------------------------------------- DMPS
def dmps_grad(operator: Operator, x_t: torch.Tensor, y: torch.Tensor, sigma_y: float,
              alpha_bar: float, form: str = "svd") -> torch.Tensor:
    """∇_{x_t} log p̃(y | x_t) for p̃ = N(y; A x_t/√ᾱ, σ² I + (1−ᾱ)/ᾱ A Aᵀ) (Meng & Kabashima
    2022, eq 12 and the Gaussian before it; Zhu's slides, *DMPS*), σ = σ_y:

    * ``"direct"``: (1/√ᾱ) Aᵀ (σ² I + (1−ᾱ)/ᾱ A Aᵀ)⁻¹ (y − A x_t/√ᾱ) with the dense matrix
      (pseudo-inverse when σ = 0), for small problems;
    * ``"svd"`` (eq 12): (1/√ᾱ) V Σ (σ² I + (1−ᾱ)/ᾱ Σ²)⁻¹ (Uᵀ y − Σ Vᵀ x_t/√ᾱ);
    * ``"row_orthogonal"``: for A with orthogonal rows a_m (masks, pooling, colourisation),
      Σ_m a_m (y_m − a_mᵀ x_t/√ᾱ) / (σ² √ᾱ + (1−ᾱ)/√ᾱ ‖a_m‖²) — the slide prints the m-th
      entry as a_mᵀ(y − A x_t/√ᾱ)/(…), which mixes an n-vector with an m-vector; the row norms
      are read off as A Aᵀ 1 (diagonal for such A).
    Directions with s_i = 0 (and σ = 0) carry no information and contribute 0.
    """
    form = check_choice(form, "form", ("svd", "direct", "row_orthogonal"))
    sigma_y = check_positive(sigma_y, "sigma_y", allow_zero=True)
    a = float(alpha_bar)
    c = (1 - a) / a
    if form == "svd":
        B, r = x_t.shape[0], operator.r
        s = operator.singulars_like(x_t).expand(B, r)
        u = operator.U_T(y)[:, :r]
        v = operator.V_T(x_t)[:, :r]
        den = sigma_y ** 2 + c * s ** 2
        w = torch.where(den > 0, s / torch.where(den > 0, den, torch.ones_like(den)),
                        torch.zeros_like(den))
        coef = w * (u - s * v / a ** 0.5) / a ** 0.5                          # eq 12
        return operator.V(operator._pad(coef, operator.n))
    if form == "row_orthogonal":
        ones = torch.ones((1, *operator.y_shape), dtype=x_t.dtype, device=x_t.device)
        rn = operator.A(operator.A_T(ones) if operator.batch is None else
                        operator.A_T(ones.expand(operator.batch, *operator.y_shape)))
        den = sigma_y ** 2 * a ** 0.5 + (1 - a) / a ** 0.5 * rn
        resid = y - operator.A(x_t) / a ** 0.5
        return operator.A_T(torch.where(den > 0, resid / torch.where(den > 0, den,
                                                                      torch.ones_like(den)),
                                        torch.zeros_like(den)))
    M = operator.matrix(x_t.dtype).to(x_t.device)
    M = M[None] if M.ndim == 2 else M
    B = x_t.shape[0]
    xf, yf = x_t.reshape(B, -1), y.reshape(B, -1)
    G = sigma_y ** 2 * torch.eye(M.shape[1], dtype=x_t.dtype, device=x_t.device) + \
        c * M @ M.transpose(-1, -2)
    resid = yf - torch.einsum("bmn,bn->bm", M.expand(B, -1, -1), xf) / a ** 0.5
    Ginv = torch.linalg.pinv(G) if sigma_y == 0 else torch.linalg.inv(G)
    sol = torch.einsum("bmk,bk->bm", Ginv.expand(B, -1, -1), resid)
    return (torch.einsum("bmn,bm->bn", M.expand(B, -1, -1), sol) / a ** 0.5).reshape(x_t.shape)


def dmps(eps_model: Callable, operator: Operator, y: torch.Tensor, sigma_y: float = 0.0, *,
         alphas_cumprod, timesteps=None, x_T=None, generator=None, progress: bool = True,
         callback: Callable | None = None, lam: float = 1.0, form: str = "svd",
         clip_x0: float | None = None):
    """DMPS (Meng & Kabashima 2022, Algorithm 1; Zhu's slides, *DMPS*, Algorithm 1): DDPM's
    ancestral step with the score, then the likelihood term with the same weight,

    x_{t−1} = (x_t + (1−α_t) s_θ(x_t, t))/√α_t + σ̃_t z_t + λ (1−α_t)/√α_t ∇ log p̃(y | x_t),

    s_θ = −ε_θ/√(1−ᾱ_t), σ̃_t² = β̃_t, the gradient from :func:`dmps_grad` (``form``), no
    backpropagation through the network. The slide prints the first line with ᾱ_t for α_t and
    (1−ᾱ_t)/√(1−ᾱ_t) s_θ, and the weight (1−ᾱ_t)/√ᾱ_t: see the chapter's errata. ``lam`` = 0 is
    DDPM. The paper runs all 1000 steps; 100 by default here. ``clip_x0`` = c clamps the
    network's x̂_0 to [−c, c] and takes the DDPM step as the posterior mean at it (Ho et al.
    2020, eq 7; the same step when nothing is clipped).
    """
    clip_x0 = _check_clip(clip_x0)
    lam = check_range(lam, "lam", 0.0, None)
    form = check_choice(form, "form", ("svd", "direct", "row_orthogonal"))
    ac, ts, x_T, sigma_y = _setup(eps_model, operator, y, sigma_y, alphas_cumprod, timesteps, x_T,
                                  generator, 100, need_svd=form == "svd")
    x = x_T
    for i, t in enumerate(_bar(ts, progress, "DMPS")):
        a, a_prev = _levels(ac, ts, i)
        b = 1 - a / a_prev                                           # β between grid levels
        eps = _eps(eps_model, x, t)
        if callback is not None:
            callback(dict(i=i, t=t, x=x, x0_hat=predict_x0(x, eps, a), eps=eps))
        if clip_x0 is None:
            mean = (x - b / (1 - a) ** 0.5 * eps) / (1 - b) ** 0.5   # line 3, = (x + β s_θ)/√α
        else:
            x0c, _ = _clip(x, eps, predict_x0(x, eps, a), a, clip_x0)
            mean = _posterior(x, x0c, a, a_prev)[0]                  # μ̃(x_t, clipped x̂_0)
        var = (1 - a_prev) / (1 - a) * b
        x_new = mean + var ** 0.5 * _randn(x.shape, x, generator) if var > 0 else mean
        if lam > 0:
            g = dmps_grad(operator, x, y, sigma_y, a, form)          # line 4, eq 12
            x_new = x_new + lam * b / (1 - b) ** 0.5 * g             # line 5
        x = x_new
    return x


# ---------------------------------------------------------------------------- evaluation
#: ``clip_x0=1``: the pixel model's own sampler clips x̂_0 to [-1, 1] (without it even its plain
#: DDIM samples drift to values of ±5); the mixture evaluation turns clipping off.
EVAL_CONFIGS = {
    "ddrm": dict(fn=ddrm, kwargs=dict(eta=0.85, eta_b=1.0, clip_x0=1.0), steps=20,
                 note="η = 0.85, η_b = 1, 20 steps (the paper's); x̂_0 clipped to [-1, 1]"),
    "ddnm": dict(fn=ddnm, kwargs=dict(clip_x0=1.0), steps=25,
                 note="Algorithm 1, DDPM posterior (assumes σ_y = 0), 25 steps (the paper: 100)"),
    "ddnm_plus": dict(fn=ddnm_plus, kwargs=dict(travel_length=1, clip_x0=1.0), steps=20,
                      note="Algorithm 2: the paper's Σ_t, Φ_t (per singular direction), "
                           "time travel L = 1 at every step of a 20-step grid (39 model calls)"),
    "diffpir": dict(fn=diffpir, kwargs=dict(lam=1.0, zeta=0.1, clip_x0=1.0), steps=25,
                    note="λ = 1, ζ = 0.1 (the authors' SR/deblur configuration), exact data "
                         "step, σ_n = max(σ_y, 0.001), 25 steps (the paper: 20 to 100)"),
    "dmps": dict(fn=dmps, kwargs=dict(lam=1.0, clip_x0=1.0), steps=25,
                 note="λ = 1, SVD form (eq 12), 25 steps (the paper: 1000)"),
}
