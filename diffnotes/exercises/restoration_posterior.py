"""Checkers for the chapter "Restoration as posterior sampling: ILVR, RePaint, DPS, ADIR".

* ``"dps_gaussian_grad"``: ``fn(x, y, A, alpha_bar, mu, s) -> (D,)``: ∇_x ‖y − A x̂_0(x)‖² for a
  Gaussian prior N(μ, s² I), with x̂_0 the exact Tweedie mean μ + √ᾱ s²/v (x − √ᾱ μ),
  v = ᾱ s² + 1 − ᾱ. Library: the ``grad`` that :func:`diffnotes.restoration.posterior.dps`
  hands its callback.
* ``"repaint_calls"``: ``fn(n_steps, jump_length, jump_n_sample) -> int``: the number of model
  calls of RePaint's jump schedule. Library:
  :func:`diffnotes.restoration.posterior.repaint_schedule`.
* ``"ilvr_low_pass"``: ``fn(x, N) -> x-shaped``: ILVR's φ_N, average pooling by N then
  nearest-neighbour upsampling, on (B, C, H, W). Library: ``A_pinv(A(x))`` of
  :func:`diffnotes.restoration.operators.super_resolution`.
* ``"repaint_known"``: ``fn(y, alpha_bar_prev, noise) -> y-shaped``: the known region's draw
  from q(x_{t−1} | y). Library: :func:`diffnotes.restoration.posterior.repaint`, line 5.
* ``"adir_g"``: ``fn(A, mu, y, eps, alpha_bar, lam) -> (D,)``: ADIR's g = −2 Aᵀ Λ (A μ̂ − y_t),
  y_t = √ᾱ y + √(1−ᾱ) A ε̂. Library: :func:`diffnotes.restoration.posterior.adir`.
"""
from __future__ import annotations

import torch

from . import register


def dps_gaussian_grad_reference(x, y, A, alpha_bar, mu, s):
    a = float(alpha_bar)
    v = a * s ** 2 + 1 - a
    x0 = mu + a ** 0.5 * s ** 2 / v * (x - a ** 0.5 * mu)
    return -2 * (a ** 0.5 * s ** 2 / v) * (A.T @ (y - A @ x0))


def _dps_inputs(g):
    D, m = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
    return dict(x=torch.randn(D, generator=g, dtype=torch.float64),
                y=torch.randn(m, generator=g, dtype=torch.float64),
                A=torch.randn(m, D, generator=g, dtype=torch.float64),
                alpha_bar=float(torch.rand(1, generator=g)) * 0.98 + 0.01,
                mu=torch.randn(D, generator=g, dtype=torch.float64),
                s=float(torch.rand(1, generator=g)) + 0.2)


def repaint_calls_reference(n_steps, jump_length, jump_n_sample):
    from ..restoration.posterior import repaint_schedule
    ks = repaint_schedule(n_steps, jump_length, jump_n_sample)
    return torch.tensor(sum(1 for a, b in zip([n_steps] + ks[:-1], ks) if b < a))


def _calls_inputs(g):
    n = int(torch.randint(5, 120, (1,), generator=g))
    return dict(n_steps=n, jump_length=int(torch.randint(1, min(n, 15), (1,), generator=g)),
                jump_n_sample=int(torch.randint(1, 12, (1,), generator=g)))


def ilvr_low_pass_reference(x, N):
    from ..restoration.operators import super_resolution
    op = super_resolution(N, size=x.shape[-1], channels=x.shape[1])
    return op.A_pinv(op.A(x))


def _lp_inputs(g):
    N = [2, 4][int(torch.randint(0, 2, (1,), generator=g))]
    return dict(x=torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), N=N)


def repaint_known_reference(y, alpha_bar_prev, noise):
    a = float(alpha_bar_prev)
    return a ** 0.5 * y + (1 - a) ** 0.5 * noise


def _known_inputs(g):
    return dict(y=torch.randn(2, 5, generator=g, dtype=torch.float64),
                alpha_bar_prev=float(torch.rand(1, generator=g)) * 0.98 + 0.01,
                noise=torch.randn(2, 5, generator=g, dtype=torch.float64))


def adir_g_reference(A, mu, y, eps, alpha_bar, lam):
    a = float(alpha_bar)
    y_t = a ** 0.5 * y + (1 - a) ** 0.5 * (A @ eps)
    return -2 * A.T @ (lam * (A @ mu - y_t))


def _adir_inputs(g):
    D, m = 5, 3
    return dict(A=torch.randn(m, D, generator=g, dtype=torch.float64),
                mu=torch.randn(D, generator=g, dtype=torch.float64),
                y=torch.randn(m, generator=g, dtype=torch.float64),
                eps=torch.randn(D, generator=g, dtype=torch.float64),
                alpha_bar=float(torch.rand(1, generator=g)) * 0.98 + 0.01,
                lam=torch.rand(m, generator=g, dtype=torch.float64) + 0.1)


register("dps_gaussian_grad", dps_gaussian_grad_reference, _dps_inputs, rtol=1e-9, atol=1e-10,
         doc="DPS's gradient of ||y - A x0_hat(x)||^2 for a Gaussian prior N(mu, s^2 I)")
register("repaint_calls", repaint_calls_reference, _calls_inputs, rtol=0, atol=0,
         doc="the number of model calls of RePaint's jump schedule")
register("ilvr_low_pass", ilvr_low_pass_reference, _lp_inputs, rtol=1e-12, atol=1e-12,
         doc="ILVR's low-pass filter: average-pool by N, then nearest upsampling")
register("repaint_known", repaint_known_reference, _known_inputs, rtol=1e-12, atol=1e-12,
         doc="RePaint's known region drawn from q(x_{t-1} | y)")
register("adir_g", adir_g_reference, _adir_inputs, rtol=1e-10, atol=1e-10,
         doc="ADIR's guidance direction g = -2 A^T Lambda (A mu - y_t)")
