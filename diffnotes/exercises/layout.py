"""Checkers for the chapter "Layout: SpaText, LLM-grounded diffusion, dense generation".

* ``"layout_box_masks"``: ``fn(boxes, H, W) -> (n, H, W)``: boxes ``(x0, y0, x1, y1)``
  (fractions of the canvas) on an H × W grid with LMD's rounding: ``x0 = round(x0·W)``,
  ``x1 = x0 + round((x1 − x0)·W)`` (the same for y, Python's ``round``: halves to even), clipped
  to the grid; 1 inside ``[y0:y1, x0:x1]``, 0 outside. The library's version is
  :func:`diffnotes.editing.layout.box_masks`.
* ``"layout_energy"``: ``fn(a, b, fg_top_p, bg_top_p, bg_weight) -> scalar``: LMD's attention
  energy of one token's map (Ahmad's notes, eq 3.13): ``−Topk(a·b) + ω Topk(a·(1 − b))`` with
  ``Topk`` the mean of the ``max(⌊p · count⌋, 1)`` largest values, count = the box's area for
  the first term and the area outside for the second; ``a`` and ``b`` flat (N,) tensors.
* ``"layout_dense_modulation"``: ``fn(scores, R, size_factor, lam) -> scores'``: Dense
  Diffusion's modulation (Ahmad's notes, eq 3.19 with the official M_pos, M_neg):
  ``s + λ (1 − S) [R (max_j s − s) − (1 − R)(s − min_j s)]``, max/min per query row
  (last axis); ``scores`` (q, k), ``R`` (q, k) in {0, 1}, ``size_factor`` (q, 1).
"""
from __future__ import annotations

import torch

from . import register


def box_masks_reference(boxes, H, W):
    from ..editing.layout import box_masks

    return box_masks([tuple(float(v) for v in b) for b in boxes], (H, W)).double()


def _box_inputs(g):
    H = int(torch.randint(4, 20, (1,), generator=g))
    W = int(torch.randint(4, 20, (1,), generator=g))
    n = int(torch.randint(1, 4, (1,), generator=g))
    boxes = []
    for _ in range(n):
        # corners on a half-pixel lattice half of the time, to exercise round-half-to-even
        if float(torch.rand(1, generator=g)) < 0.5:
            xs = sorted(torch.randint(0, 2 * W + 1, (2,), generator=g).tolist())
            ys = sorted(torch.randint(0, 2 * H + 1, (2,), generator=g).tolist())
            if xs[0] == xs[1]:
                xs = [max(xs[0] - 1, 0), xs[0] + 1] if xs[0] < 2 * W else [xs[0] - 1, xs[0]]
            if ys[0] == ys[1]:
                ys = [max(ys[0] - 1, 0), ys[0] + 1] if ys[0] < 2 * H else [ys[0] - 1, ys[0]]
            boxes.append([xs[0] / (2 * W), ys[0] / (2 * H), xs[1] / (2 * W), ys[1] / (2 * H)])
        else:
            x = sorted(torch.rand(2, generator=g).tolist())
            y = sorted(torch.rand(2, generator=g).tolist())
            boxes.append([x[0], y[0], max(x[1], x[0] + 0.05), max(y[1], y[0] + 0.05)])
            boxes[-1] = [min(v, 1.0) for v in boxes[-1]]
    return dict(boxes=torch.tensor(boxes, dtype=torch.float64), H=H, W=W)


def energy_reference(a, b, fg_top_p, bg_top_p, bg_weight):
    from ..editing.layout import token_energy

    return token_energy(a, b, fg_top_p=fg_top_p, bg_top_p=bg_top_p, bg_weight=bg_weight)


def _energy_inputs(g):
    N = int(torch.randint(8, 40, (1,), generator=g))
    a = torch.rand(N, generator=g, dtype=torch.float64)
    b = (torch.rand(N, generator=g) < 0.4).double()
    b[0], b[-1] = 1.0, 0.0
    return dict(a=a, b=b, fg_top_p=[0.2, 0.5, 1.0][int(torch.randint(0, 3, (1,), generator=g))],
                bg_top_p=0.2, bg_weight=[1.0, 4.0][int(torch.randint(0, 2, (1,), generator=g))])


def modulation_reference(scores, R, size_factor, lam):
    from ..editing.layout import dense_modulation

    return dense_modulation(scores, R, size_factor, lam)


def _modulation_inputs(g):
    q, k = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
    return dict(scores=torch.randn(q, k, generator=g, dtype=torch.float64) * 3,
                R=(torch.rand(q, k, generator=g) < 0.4).double(),
                size_factor=torch.rand(q, 1, generator=g, dtype=torch.float64),
                lam=float(torch.rand(1, generator=g)))


register("layout_box_masks", box_masks_reference, _box_inputs, rtol=0, atol=0,
         doc="LMD's boxes on a grid: corner and size rounded separately (halves to even)")
register("layout_energy", energy_reference, _energy_inputs, rtol=1e-12, atol=1e-12,
         doc="LMD's attention energy of one token (Ahmad's notes, eq 3.13)")
register("layout_dense_modulation", modulation_reference, _modulation_inputs, rtol=1e-12,
         atol=1e-12, doc="Dense Diffusion's logit modulation (Ahmad's notes, eq 3.19)")
