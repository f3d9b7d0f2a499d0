"""Checkers for the chapter "ELBO-T2IAlign: when does a diffusion model know where a word is?".

* ``"elbo_bayes_posterior"``: ``fn(priors, likelihoods) -> (N,)``: p(c_i | x) by Bayes' rule
  (the ELBO-T2IAlign paper, eq 1). Library: :func:`diffnotes.recognition.elbo_align.bayes_posterior`.
* ``"elbo_alignment_scores"``: ``fn(elbos, gamma) -> (N,)``: S = γ^{minmax(ELB)} (eq 5), with
  S ≡ 1 for equal losses. Library: :func:`~diffnotes.recognition.elbo_align.alignment_scores`.
* ``"elbo_calibrate"``: ``fn(maps, scores) -> (N, h, w)``: A^{1/S_i} per class (eq 7).
  Library: :func:`~diffnotes.recognition.elbo_align.calibrate`.
* ``"elbo_omega_v"``: ``fn(alpha, sigma, dlam) -> float``: Table I's ω(t) of v-prediction,
  −(α² + σ²)² / (α² λ′). Library: :func:`~diffnotes.recognition.elbo_align.omega`.
"""
from __future__ import annotations

import torch

from . import register


def _posterior_ref(priors, likelihoods):
    from ..recognition.elbo_align import bayes_posterior
    return torch.as_tensor(bayes_posterior(priors, likelihoods))


def _posterior_inputs(g):
    n = int(torch.randint(2, 5, (1,), generator=g))
    p = torch.rand(n, generator=g, dtype=torch.float64) + 0.05
    return dict(priors=(p / p.sum()).tolist(),
                likelihoods=(torch.rand(n, generator=g, dtype=torch.float64) + 0.01).tolist())


def _scores_ref(elbos, gamma):
    from ..recognition.elbo_align import alignment_scores
    return alignment_scores(elbos, gamma)


def _scores_inputs(g):
    n = int(torch.randint(2, 6, (1,), generator=g))
    e = torch.rand(n, generator=g, dtype=torch.float64)
    if bool(torch.rand(1, generator=g) < 0.2):
        e = torch.full((n,), 0.25, dtype=torch.float64)          # equal losses: S = 1
    gamma = [1 / 3, 0.5, 1.0, 0.2][int(torch.randint(0, 4, (1,), generator=g))]
    return dict(elbos=e, gamma=gamma)


def _calibrate_ref(maps, scores):
    from ..recognition.elbo_align import calibrate
    return calibrate(maps, scores)


def _calibrate_inputs(g):
    n = int(torch.randint(1, 4, (1,), generator=g))
    maps = torch.rand(n, 4, 5, generator=g, dtype=torch.float64)
    maps[:, 0, 0], maps[:, -1, -1] = 0.0, 1.0
    scores = torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.2
    return dict(maps=maps, scores=scores)


def _omega_v_ref(alpha, sigma, dlam):
    from ..recognition.elbo_align import omega
    return torch.tensor(float(omega("v", alpha, sigma, 0.0, dlam)), dtype=torch.float64)


def _omega_v_inputs(g):
    t = float(torch.rand(1, generator=g)) * 0.8 + 0.1
    return dict(alpha=1 - t, sigma=t, dlam=-2 / (t * (1 - t)))


register("elbo_bayes_posterior", _posterior_ref, _posterior_inputs, rtol=1e-10, atol=1e-12,
         doc="Bayes' rule p(c_i|x) (the ELBO-T2IAlign paper, eq 1)")
register("elbo_alignment_scores", _scores_ref, _scores_inputs, rtol=1e-10, atol=1e-12,
         doc="alignment scores S = gamma ** minmax(ELB) (eq 5); S = 1 for equal losses")
register("elbo_calibrate", _calibrate_ref, _calibrate_inputs, rtol=1e-10, atol=1e-12,
         doc="calibration A ** (1 / S_i) per class (eq 7)")
register("elbo_omega_v", _omega_v_ref, _omega_v_inputs, rtol=1e-10, atol=1e-12,
         doc="Table I's omega(t) of v-prediction")
