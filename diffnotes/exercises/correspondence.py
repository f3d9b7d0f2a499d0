"""Checkers for the chapter "Correspondence and keypoints from diffusion features".

* ``"dense_correspondence"``: ``fn(f1, f2) -> (h1, w1, 2)``: for every pixel of ``f1`` (C, h1,
  w1) the (row, col) of the most cosine-similar pixel of ``f2`` (C, h2, w2) (Ahmad's notes,
  eq 5.33). Library: :func:`diffnotes.features.dense_correspondence`.
* ``"gaussian_target"``: ``fn(x, y, sigma, H, W) -> (H, W)``: the unit-peak Gaussian of
  Hedlin et al.'s target (Ahmad's notes, eq 5.43) over pixel centres ``(j + 0.5, i + 0.5)``.
  Library: :func:`diffnotes.recognition.correspondence.gaussian_map`.
* ``"localization_loss"``: ``fn(maps, sigma) -> scalar``: StableKeypoints' ``L_loc`` (Ahmad's
  notes, eqs 5.50–5.52): the mean squared difference between each map (N, h, w) and a
  unit-peak Gaussian at its own argmax. Library:
  :func:`diffnotes.recognition.keypoints.localization_loss`.
"""
from __future__ import annotations

import torch

from . import register


def dense_reference(f1, f2):
    from ..features import dense_correspondence
    return dense_correspondence(f1, f2, "cos")


def _dense_inputs(g):
    C = int(torch.randint(2, 6, (1,), generator=g))
    h1, w1, h2, w2 = (int(v) for v in torch.randint(2, 6, (4,), generator=g))
    return dict(f1=torch.randn(C, h1, w1, generator=g, dtype=torch.float64),
                f2=torch.randn(C, h2, w2, generator=g, dtype=torch.float64))


def gaussian_reference(x, y, sigma, H, W):
    from ..recognition.correspondence import gaussian_map
    return gaussian_map((x, y), sigma, (H, W))


def _gaussian_inputs(g):
    H, W = (int(v) for v in torch.randint(4, 20, (2,), generator=g))
    return dict(x=float(torch.rand(1, generator=g)) * W, y=float(torch.rand(1, generator=g)) * H,
                sigma=0.5 + 3 * float(torch.rand(1, generator=g)), H=H, W=W)


def localization_reference(maps, sigma):
    from ..recognition.keypoints import localization_loss
    return localization_loss(maps, sigma)


def _localization_inputs(g):
    N = int(torch.randint(1, 5, (1,), generator=g))
    h = int(torch.randint(4, 12, (1,), generator=g))
    # distinct values: the argmax is unique
    maps = torch.rand(N, h, h, generator=g, dtype=torch.float64)
    return dict(maps=maps, sigma=0.5 + 2 * float(torch.rand(1, generator=g)))


register("dense_correspondence", dense_reference, _dense_inputs, rtol=0, atol=0,
         doc="argmax cosine correspondence, (row, col) in f2 for every pixel of f1")
register("gaussian_target", gaussian_reference, _gaussian_inputs, rtol=1e-12, atol=1e-12,
         doc="unit-peak Gaussian at (x, y) over pixel centres")
register("localization_loss", localization_reference, _localization_inputs, rtol=1e-10,
         atol=1e-12, doc="mean squared error between each map and a Gaussian at its own peak")
