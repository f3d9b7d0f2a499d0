"""Checkers for the chapter "Conditional restoration models: SDEdit, CCDF, SR3 and Palette".

* ``"ccdf_forward"``: ``fn(x0, t0, alphas_cumprod, noise) -> x_{t₀}``: CCDF's (and SDEdit's)
  start x_{t₀} = √ᾱ_{t₀} x̂₀ + √(1−ᾱ_{t₀}) ε, t₀ a 0-based index. Library:
  :func:`diffnotes.ddpm.q_sample`.
* ``"ccdf_data_step"``: ``fn(x, k, A) -> x + A⁺(A k − A x)`` for a dense matrix A (m, n) acting
  on rows x (B, n) and the forward-noised reference k (B, n). Library:
  :func:`diffnotes.restoration.conditional.data_consistency`.
* ``"sr3_input"``: ``fn(x_t, y) -> (B, 6, H, W)``: SR3's network input, x_t (B, 3, H, W)
  concatenated along the channels with y (B, 3, H/4, W/4) upsampled bicubically to H × W
  (``align_corners=False``) and clamped to [−1, 1]. Library:
  :func:`diffnotes.restoration.sr3.condition`.
"""
from __future__ import annotations

import torch

from . import register


def forward_reference(x0, t0, alphas_cumprod, noise):
    from ..ddpm import q_sample
    return q_sample(x0, t0, alphas_cumprod, noise)


def _forward_inputs(g):
    from ..schedules import alphas_cumprod, make_betas
    ac = alphas_cumprod(make_betas("linear"))
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    return dict(x0=x0, t0=int(torch.randint(0, 1000, (1,), generator=g)), alphas_cumprod=ac,
                noise=torch.randn(x0.shape, generator=g, dtype=torch.float64))


def data_step_reference(x, k, A):
    from ..restoration import operators as ops
    from ..restoration.conditional import data_consistency
    op = ops.dense(A)
    return data_consistency(op, op.A(k), None)(x, 0, None)


def _data_step_inputs(g):
    n = int(torch.randint(3, 8, (1,), generator=g))
    m = int(torch.randint(1, n, (1,), generator=g))
    return dict(x=torch.randn(4, n, generator=g, dtype=torch.float64),
                k=torch.randn(4, n, generator=g, dtype=torch.float64),
                A=torch.randn(m, n, generator=g, dtype=torch.float64))


def sr3_input_reference(x_t, y):
    from ..restoration.sr3 import condition
    return torch.cat([x_t, condition(y, x_t.shape[-1])], dim=1)


def _sr3_inputs(g):
    h = int(torch.randint(2, 5, (1,), generator=g))
    return dict(x_t=torch.randn(2, 3, 4 * h, 4 * h, generator=g, dtype=torch.float64),
                y=torch.rand(2, 3, h, h, generator=g, dtype=torch.float64) * 2 - 1)


register("ccdf_forward", forward_reference, _forward_inputs, rtol=1e-10, atol=1e-12,
         doc="CCDF's start: the initial estimate forward-diffused to t0")
register("ccdf_data_step", data_step_reference, _data_step_inputs, rtol=1e-8, atol=1e-10,
         doc="CCDF's data-consistency step x + A^+(A k - A x)")
register("sr3_input", sr3_input_reference, _sr3_inputs, rtol=1e-10, atol=1e-10,
         doc="SR3's input: x_t concatenated with the bicubic-upsampled low-resolution image")
