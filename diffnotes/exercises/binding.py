"""Checkers for the chapter "Binding attributes: Attend-and-Excite and StructureDiffusion".

* ``"ae_loss"``: ``fn(maxima) -> scalar``: Attend-and-Excite's loss L = max_s max(0, 1 − m_s)
  of the subjects' smoothed maxima (Ahmad's notes, eq 3.27). Library:
  :func:`diffnotes.editing.binding.ae_loss`.
* ``"ae_smoothed_max"``: ``fn(maps, subjects, n_tokens) -> (S,)``: each subject's smoothed
  maximum from maps (h, w, M): softmax of 100·A over the prompt's tokens 1 … n_tokens − 2,
  the official 3×3 kernel (σ = 0.5) with reflect padding, max over pixels. Library:
  :func:`diffnotes.editing.binding.max_attention_per_token`.
* ``"ae_step_sizes"``: ``fn(scale_factor, num_steps) -> (N,)``: α_i = scale_factor ·
  sqrt(linspace(1, 0.5, N)_i). Library: :func:`diffnotes.editing.binding.step_sizes`.
* ``"np_spans"``: ``fn(prompt) -> (k, 2)``: the word spans (start, end) of the noun phrases of
  a shapes caption (determiner included, end exclusive). Library:
  :func:`diffnotes.editing.binding.noun_phrases`.
* ``"structure_values"``: ``fn(M, values) -> (q, d)``: StructureDiffusion's output
  (1/(k+1)) Σ_i M V_i (Ahmad's notes, eq 3.28) of probabilities M (q, n) and values
  (k + 1, n, d).
"""
from __future__ import annotations

import numpy as np
import torch

from . import register


def ae_loss_reference(maxima):
    from ..editing.binding import ae_loss
    return ae_loss(maxima.double())


def _loss_inputs(g):
    S = int(torch.randint(1, 5, (1,), generator=g))
    m = torch.rand(S, generator=g, dtype=torch.float64) * 1.2
    return dict(maxima=m)


def smoothed_max_reference(maps, subjects, n_tokens):
    from ..editing.binding import gaussian_kernel, max_attention_per_token
    return max_attention_per_token(maps, subjects, n_tokens, "prompt", gaussian_kernel(0.5))


def _smoothed_inputs(g):
    h = int(torch.randint(4, 9, (1,), generator=g))
    M = 12
    n = int(torch.randint(5, 10, (1,), generator=g))
    maps = torch.softmax(3 * torch.randn(h, h, M, generator=g, dtype=torch.float64), -1)
    subjects = [[int(torch.randint(1, n - 1, (1,), generator=g))] for _ in range(2)]
    return dict(maps=maps, subjects=subjects, n_tokens=n)


def step_sizes_reference(scale_factor, num_steps):
    from ..editing.binding import step_sizes
    return torch.as_tensor(step_sizes(scale_factor, num_steps))


def _step_inputs(g):
    return dict(scale_factor=float(torch.randint(1, 40, (1,), generator=g)),
                num_steps=int(torch.randint(2, 60, (1,), generator=g)))


def np_spans_reference(prompt):
    from ..editing.binding import noun_phrases
    return torch.tensor([list(s) for _, s in noun_phrases(prompt)], dtype=torch.float64)


def _np_inputs(g):
    from ..data import shapes as S
    rng = np.random.default_rng(int(torch.randint(0, 10**6, (1,), generator=g)))
    k = int(rng.integers(1, 4))
    objs = [dict(shape=str(rng.choice(S.SHAPES)), color=str(rng.choice(list(S.COLORS))),
                 size=str(rng.choice(list(S.SIZES))), position=str(rng.choice(list(S.POSITIONS))))
            for _ in range(k)]
    mp = [True] + [bool(rng.integers(2)) for _ in range(k - 1)]     # a position phrase always
    cap, _ = S.caption_objects(objs, [bool(rng.integers(2)) for _ in range(k)], mp)
    return dict(prompt=cap)


def structure_values_reference(M, values):
    return torch.einsum("qn,knd->qd", M, values) / values.shape[0]


def _structure_inputs(g):
    q, n, d = 6, 5, 3
    k = int(torch.randint(1, 4, (1,), generator=g))
    M = torch.softmax(torch.randn(q, n, generator=g, dtype=torch.float64), -1)
    return dict(M=M, values=torch.randn(k + 1, n, d, generator=g, dtype=torch.float64))


register("ae_loss", ae_loss_reference, _loss_inputs, rtol=0, atol=1e-12,
         doc="Attend-and-Excite's loss, max over subjects of max(0, 1 - smoothed max)")
register("ae_smoothed_max", smoothed_max_reference, _smoothed_inputs, rtol=1e-6, atol=1e-7,
         doc="each subject's smoothed maximum: softmax(100 A) over the prompt, 3x3 kernel, max")
register("ae_step_sizes", step_sizes_reference, _step_inputs, rtol=1e-12, atol=1e-12,
         doc="A&E's step sizes scale * sqrt(linspace(1, 0.5, N))")
register("np_spans", np_spans_reference, _np_inputs, rtol=0, atol=0,
         doc="word spans of the noun phrases of a shapes caption")
register("structure_values", structure_values_reference, _structure_inputs, rtol=1e-12,
         atol=1e-12, doc="StructureDiffusion's output, M times the mean of the values")
