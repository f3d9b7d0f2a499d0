"""Checkers for the chapter "Linear inverse problems in closed form: DDRM, DDNM, DiffPIR, DMPS".

* ``"pinv_svd"``: ``fn(A) -> (n, m)``: the Moore–Penrose pseudo-inverse V diag(1/s) Uᵀ of a
  dense (m, n) matrix from its SVD, zero singular values skipped (Wang et al. 2023, eq 3).
  Reference: ``torch.linalg.pinv``; the library's operators: ``A_pinv``.
* ``"range_null"``: ``fn(A, x0, y) -> (B, n)``: DDNM's range–null correction
  x̂ = A†y + (I − A†A) x0 for a dense A (m, n), x0 (B, n), y (B, m) (Wang et al. 2023, eq 5).
  Library: :func:`diffnotes.restoration.linear.range_null`.
* ``"ddrm_step"``: ``fn(x0_bar, eps_bar, y_bar, s, sigma_next, sigma_y, eta, eta_b, z) -> (n,)``:
  one DDRM update in spectral coordinates, the three cases of Kawar et al. 2022, eq 8.
  Library: :func:`diffnotes.restoration.linear.ddrm_step`.
* ``"diffpir_mask_prox"``: ``fn(mask, y, z0, rho) -> x``: DiffPIR's data step for a mask
  (a float64 (H, W) tensor of 0s and 1s, 1 = observed; y and z0 (B, 3, H, W)),
  (m ⊙ y + ρ ẑ_0)/(m + ρ) (Zhu et al. 2023, eq 13 in closed form). Library:
  :func:`diffnotes.restoration.linear.diffpir_prox`.
"""
from __future__ import annotations

import torch

from . import register


def pinv_reference(A):
    return torch.linalg.pinv(A)


def _pinv_inputs(g):
    m = int(torch.randint(2, 6, (1,), generator=g))
    n = int(torch.randint(2, 7, (1,), generator=g))
    r = int(torch.randint(1, min(m, n) + 1, (1,), generator=g))         # rank-deficient too
    A = torch.randn(m, r, generator=g, dtype=torch.float64) @ \
        torch.randn(r, n, generator=g, dtype=torch.float64)
    return dict(A=A)


def range_null_reference(A, x0, y):
    from ..restoration import operators as ops
    from ..restoration.linear import range_null
    return range_null(ops.dense(A), x0, y)


def _range_null_inputs(g):
    m = int(torch.randint(1, 5, (1,), generator=g))
    n = m + int(torch.randint(1, 5, (1,), generator=g))
    B = int(torch.randint(1, 4, (1,), generator=g))
    return dict(A=torch.randn(m, n, generator=g, dtype=torch.float64),
                x0=torch.randn(B, n, generator=g, dtype=torch.float64),
                y=torch.randn(B, m, generator=g, dtype=torch.float64))


def ddrm_step_reference(x0_bar, eps_bar, y_bar, s, sigma_next, sigma_y, eta, eta_b, z):
    from ..restoration.linear import ddrm_step
    return ddrm_step(None, x0_bar[None], eps_bar[None], y_bar[None], s[None], sigma_next,
                     sigma_y, eta, eta_b, z[None])[0]


def _ddrm_inputs(g):
    n = 6
    s = torch.tensor([0.0, 0.0, 0.05, 0.3, 1.0, 2.0], dtype=torch.float64)[torch.randperm(n, generator=g)]
    f = lambda: torch.randn(n, generator=g, dtype=torch.float64)          # noqa: E731
    y_bar = torch.where(s > 0, f(), torch.zeros(n, dtype=torch.float64))
    return dict(x0_bar=f(), eps_bar=f(), y_bar=y_bar, s=s,
                sigma_next=float(torch.rand(1, generator=g)) * 0.5,
                sigma_y=0.05 + 0.1 * float(torch.rand(1, generator=g)),
                eta=float(torch.rand(1, generator=g)), eta_b=float(torch.rand(1, generator=g)),
                z=f())


def mask_prox_reference(mask, y, z0, rho):
    from ..restoration import operators as ops
    from ..restoration.linear import diffpir_prox
    op = ops.inpainting(mask > 0.5, channels=y.shape[1])
    return diffpir_prox(op, z0, y, rho)


def _mask_prox_inputs(g):
    mask = (torch.rand(4, 4, generator=g) < 0.5).double()             # 1 = observed
    y = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * mask
    return dict(mask=mask, y=y, z0=torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
                rho=float(torch.rand(1, generator=g)) * 3 + 0.01)


register("pinv_svd", pinv_reference, _pinv_inputs, rtol=1e-7, atol=1e-8,
         doc="the Moore-Penrose pseudo-inverse from the SVD, zero singular values skipped")
register("range_null", range_null_reference, _range_null_inputs, rtol=1e-9, atol=1e-10,
         doc="DDNM's range-null correction A+ y + (I - A+ A) x0")
register("ddrm_step", ddrm_step_reference, _ddrm_inputs, rtol=1e-10, atol=1e-12,
         doc="one DDRM update in spectral coordinates, three cases per coordinate")
register("diffpir_mask_prox", mask_prox_reference, _mask_prox_inputs, rtol=1e-10, atol=1e-12,
         doc="DiffPIR's proximal data step for an inpainting mask")
