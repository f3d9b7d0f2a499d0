"""Checkers for the chapter "Prompt-to-Prompt: editing through cross-attention".

* ``"p2p_mapper_matrix"``: ``fn(mapper, alphas) -> (L, L)``: the refinement mapper as the matrix
  of Gormley & Chai's lecture ("Attention Swapping", ``Â = A M``), ``M[mapper[j], j] =
  alphas[j]`` and 0 elsewhere, so that ``A @ M`` gathers the source columns ``A[:, mapper[j]]``
  for aligned tokens (Ahmad's notes, eq 3.3). The library's version is
  :func:`diffnotes.editing.p2p.mapper_matrix`.
* ``"p2p_alpha"``: ``fn(num_steps, tau) -> (num_steps,)``: the cross-replace schedule α of one
  token (Gormley & Chai's lecture, "Prompt-to-Prompt: Alpha"; P2P's
  ``get_time_words_attention_alpha``): 1 at the denoising steps i = 0, 1, … that take the
  source's maps, the first ⌊τ N⌋ of them, 0 after.
* ``"p2p_reweight"``: ``fn(src, rep, scale, alpha) -> (K, heads, q, M)``: the re-weighting edit
  (Ahmad's notes, eq 3.4) mixed by the schedule: ``α_j · c_j M_{:,j} + (1 − α_j) M*_{:,j}``
  with the source's probabilities ``src`` (heads, q, M), the K edits' ``rep`` (K, heads, q, M),
  per-token scales ``scale`` (M,) and per-token α ``alpha`` (K, M) in {0, 1}.
"""
from __future__ import annotations

import math

import torch

from . import register


def mapper_matrix_reference(mapper, alphas):
    from ..editing.p2p import mapper_matrix

    return mapper_matrix(mapper, alphas)


def _mapper_inputs(g):
    L = int(torch.randint(4, 9, (1,), generator=g))
    mapper = torch.randint(0, L, (L,), generator=g)
    alphas = (torch.rand(L, generator=g) < 0.7).double()
    return dict(mapper=mapper, alphas=alphas)


def alpha_reference(num_steps, tau):
    k = int(math.floor(tau * num_steps + 1e-9))
    return (torch.arange(num_steps) < k).double()


def _alpha_inputs(g):
    n = int(torch.randint(3, 30, (1,), generator=g))
    tau = [0.0, 1.0, 0.8, 0.4, 0.7, 0.25][int(torch.randint(0, 6, (1,), generator=g))]
    return dict(num_steps=n, tau=tau)


def reweight_reference(src, rep, scale, alpha):
    a = alpha.double()[:, None, None, :]
    return a * (src.unsqueeze(0) * scale.double()) + (1 - a) * rep


def _reweight_inputs(g):
    K, heads, q, M = 2, 2, 6, 5
    src = torch.randn(heads, q, M, generator=g, dtype=torch.float64).softmax(-1)
    rep = torch.randn(K, heads, q, M, generator=g, dtype=torch.float64).softmax(-1)
    scale = torch.ones(M, dtype=torch.float64)
    scale[int(torch.randint(1, M, (1,), generator=g))] = float(torch.empty(1).uniform_(
        -2, 2, generator=g))
    alpha = (torch.rand(K, M, generator=g) < 0.6).double()
    return dict(src=src, rep=rep, scale=scale, alpha=alpha)


register("p2p_mapper_matrix", mapper_matrix_reference, _mapper_inputs, rtol=0, atol=1e-12,
         doc="the refinement mapper as an (L, L) matrix, Gormley & Chai 'Attention Swapping'")
register("p2p_alpha", alpha_reference, _alpha_inputs, rtol=0, atol=1e-12,
         doc="the cross-replace schedule alpha: source maps at the first floor(tau N) steps")
register("p2p_reweight", reweight_reference, _reweight_inputs, rtol=1e-12, atol=1e-12,
         doc="attention re-weighting (Ahmad's notes, eq 3.4) mixed by the schedule alpha")
