"""Checkers for the segmentation chapters (Ahmad's notes, §5.2, §5.3, §5.7).

``check("dice", fn)``: fn(a, b) → Dice of two boolean masks (eq 5.4).
``check("mean_iou", fn)``: fn(pred, target, num_classes) → mean IoU over present classes.
``check("energy", fn)``: fn(labels, unary, w_right, w_down) → the (corrected) eq 5.7 energy.
``check("contrast_weights", fn)``: fn(image, lam, sigma) → (w_right, w_down) (eq 5.11).
``check("fda", fn)``: fn(source, target, beta) → FDA image (eq 5.30).
``check("entropy_loss", fn)``: fn(logits, eta, eps) → mean Charbonnier entropy (eq 5.32).
"""
from __future__ import annotations

import torch

from . import register
from ..segmentation import fda as _fda
from ..segmentation import ising as _ising
from ..segmentation import metrics as _metrics


def _int(g, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=g))


def _masks(g):
    H, W = _int(g, 3, 9), _int(g, 3, 9)
    p = torch.rand(2, generator=g, dtype=torch.float64)
    a = torch.rand(H, W, generator=g, dtype=torch.float64) < p[0]
    b = torch.rand(H, W, generator=g, dtype=torch.float64) < p[1]
    a[0, 0] = True  # never both empty
    return {"a": a, "b": b}


def _labels(g):
    K, H, W = _int(g, 2, 6), _int(g, 3, 9), _int(g, 3, 9)
    t = torch.randint(0, K, (H, W), generator=g)
    p = torch.where(torch.rand(H, W, generator=g) < 0.6, t, torch.randint(0, K, (H, W), generator=g))
    return {"pred": p, "target": t, "num_classes": K}


def _energy_inputs(g):
    K, H, W = _int(g, 2, 5), _int(g, 2, 7), _int(g, 2, 7)
    return {"labels": torch.randint(0, K, (H, W), generator=g),
            "unary": torch.randn(K, H, W, generator=g, dtype=torch.float64),
            "w_right": torch.rand(H, W - 1, generator=g, dtype=torch.float64),
            "w_down": torch.rand(H - 1, W, generator=g, dtype=torch.float64)}


def _image(g):
    C, H, W = _int(g, 1, 4), _int(g, 3, 9), _int(g, 3, 9)
    return {"image": torch.rand(C, H, W, generator=g, dtype=torch.float64),
            "lam": float(torch.rand(1, generator=g) * 3), "sigma": float(0.05 + torch.rand(1, generator=g))}


def _fda_inputs(g):
    C, H, W = 3, _int(g, 6, 20), _int(g, 6, 20)
    return {"source": torch.rand(C, H, W, generator=g, dtype=torch.float64),
            "target": torch.rand(C, H, W, generator=g, dtype=torch.float64),
            "beta": float(torch.rand(1, generator=g) * 0.3)}


def _logits(g):
    return {"logits": 2 * torch.randn(2, _int(g, 2, 6), 4, 5, generator=g, dtype=torch.float64),
            "eta": float(0.5 + 2 * torch.rand(1, generator=g)), "eps": 1e-3}


register("dice", lambda a, b: _metrics.dice(a, b), _masks, rtol=1e-6, atol=1e-9,
         doc="Dice coefficient 2|A∩B|/(|A|+|B|) of two boolean masks (Ahmad's notes, eq 5.4)")
register("mean_iou", lambda pred, target, num_classes: _metrics.mean_iou(pred, target, num_classes),
         _labels, rtol=1e-6, atol=1e-9, doc="mean IoU over the classes present in pred or target")
register("energy", lambda labels, unary, w_right, w_down: _ising.energy(labels, unary, w_right, w_down),
         _energy_inputs, rtol=1e-9, atol=1e-10,
         doc="Σ unary[label] + Σ w·[neighbours differ] (Ahmad's notes, eq 5.7, corrected)")
register("contrast_weights", lambda image, lam, sigma: _ising.contrast_weights(image, lam, sigma),
         _image, rtol=1e-9, atol=1e-12, doc="λ·exp(−‖I_i−I_j‖²/2σ²) to the right and below (eq 5.11)")
register("fda", lambda source, target, beta: _fda.fda(source, target, beta), _fda_inputs,
         rtol=1e-7, atol=1e-9, doc="FDA: target low-frequency amplitude, source phase (eq 5.30)")
register("entropy_loss", lambda logits, eta, eps: _fda.entropy_loss(logits, eta, eps), _logits,
         rtol=1e-7, atol=1e-10, doc="mean Charbonnier penalty of the pixel entropy (eq 5.32)")
