"""Checkers for Part I's exercises (DDPM and DDIM chapters).

Each checker draws float64 inputs from a seeded generator and compares the student's function
with the library's reference:

- ``q_sample(x0, t, alphas_cumprod, noise)`` — Ahmad's notes, eq 1.2;
- ``predict_x0(x_t, eps, alpha_bar_t)`` — eq 1.6;
- ``posterior_mean_variance(x0, x_t, t, betas)`` — Zhu's slides, "DDPM: Reverse Diffusion
  Process" (returns (mean, variance), the
  variance a scalar tensor);
- ``ddpm_step_mean(x_t, eps, t, betas)`` — Algorithm 2 line 4 without the noise, with ᾱ where
  Ahmad's notes print α;
- ``ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)`` — DDIM paper eq 16 (a float);
- ``ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise)`` — eq 1.21;
- ``ode_coords(x_t, alpha_bar)`` — (u, τ) of eq 1.25.
"""
from __future__ import annotations

import torch

from ..ddim import ddim_sigma, ddim_step, ode_coords
from ..ddpm import posterior_mean_variance, predict_x0, q_sample
from ..schedules import alphas_cumprod, make_betas
from . import register

_BETAS = make_betas("linear", 1000)
_AC = alphas_cumprod(_BETAS)


def _shape(g):
    return (int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g)))


def _randn(shape, g):
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _t(g, low=0):
    return int(torch.randint(low, 1000, (1,), generator=g))


def _q_sample_inputs(g):
    s = _shape(g)
    return {"x0": _randn(s, g), "t": _t(g), "alphas_cumprod": _AC.clone(), "noise": _randn(s, g)}


def _predict_x0_inputs(g):
    s = _shape(g)
    return {"x_t": _randn(s, g), "eps": _randn(s, g), "alpha_bar_t": float(_AC[_t(g)])}


def _posterior_inputs(g):
    s = _shape(g)
    return {"x0": _randn(s, g), "x_t": _randn(s, g), "t": _t(g, low=1), "betas": _BETAS.clone()}


def _ddpm_step_mean(x_t, eps, t, betas):
    """Algorithm 2, line 4, noise-free: (x_t − β_t/√(1−ᾱ_t) ε)/√α_t."""
    ac = alphas_cumprod(betas)
    return (x_t - betas[t] / (1 - ac[t]).sqrt() * eps) / (1 - betas[t]).sqrt()


def _ddpm_step_inputs(g):
    s = _shape(g)
    return {"x_t": _randn(s, g), "eps": _randn(s, g), "t": _t(g), "betas": _BETAS.clone()}


def _levels(g):
    """A pair ᾱ_t < ᾱ_prev from two distinct indices (ᾱ_prev = 1 one time in five)."""
    t = _t(g, low=1)
    if int(torch.randint(0, 5, (1,), generator=g)) == 0:
        return float(_AC[t]), 1.0
    tp = int(torch.randint(0, t, (1,), generator=g))
    return float(_AC[t]), float(_AC[tp])


def _eta(g):
    return [0.0, 0.3, 0.5, 1.0][int(torch.randint(0, 4, (1,), generator=g))]


def _ddim_sigma_inputs(g):
    a, ap = _levels(g)
    return {"alpha_bar_t": a, "alpha_bar_prev": ap, "eta": _eta(g)}


def _ddim_step_inputs(g):
    s = _shape(g)
    a, ap = _levels(g)
    return {"x_t": _randn(s, g), "eps": _randn(s, g), "alpha_bar_t": a, "alpha_bar_prev": ap,
            "eta": _eta(g), "noise": _randn(s, g)}


def _ode_coords_inputs(g):
    return {"x_t": _randn(_shape(g), g), "alpha_bar": float(_AC[_t(g)])}


register("q_sample", q_sample, _q_sample_inputs, rtol=1e-9, atol=1e-12,
         doc="x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (Ahmad's notes, eq 1.2)")
register("predict_x0", predict_x0, _predict_x0_inputs, rtol=1e-9, atol=1e-12,
         doc="x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) (eq 1.6)")
register("posterior_mean_variance", posterior_mean_variance, _posterior_inputs, rtol=1e-9,
         atol=1e-12, doc="mean and variance of q(x_{t-1} | x_t, x_0) (Zhu's slides, DDPM: Reverse Diffusion Process)")
register("ddpm_step_mean", _ddpm_step_mean, _ddpm_step_inputs, rtol=1e-9, atol=1e-12,
         doc="the mean of Algorithm 2's step, with alpha-bar where Ahmad's notes print alpha")
register("ddim_sigma", ddim_sigma, _ddim_sigma_inputs, rtol=1e-9, atol=1e-12,
         doc="sigma_t(eta) of the DDIM paper, eq 16")
register("ddim_step", ddim_step, _ddim_step_inputs, rtol=1e-9, atol=1e-12,
         doc="one DDIM step (Ahmad's notes, eq 1.21; DDIM eq 12)")
register("ode_coords", ode_coords, _ode_coords_inputs, rtol=1e-9, atol=1e-12,
         doc="u = x / sqrt(ab), tau = sqrt((1 - ab) / ab) (eq 1.25)")
