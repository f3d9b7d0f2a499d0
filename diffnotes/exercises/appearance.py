"""Checkers for the chapter "Appearance transfer: Cross-Image Attention and Eye-for-an-Eye".

* ``"appearance_adain"``: ``fn(x, ref) -> (B, C, H, W)``: adaptive instance normalisation
  (Ahmad's notes, eq 3.31, printed "AdaLN"): per row and channel, ``σ(ref) (x − μ(x)) / σ(x) +
  μ(ref)`` with the population standard deviation and no ε. The library's version is
  :func:`diffnotes.editing.appearance.adain`.
* ``"appearance_contrast"``: ``fn(probs, beta) -> probs'``: Cross-Image Attention's contrast,
  ``clip(β (A − Ā) + Ā, 0, 1)`` with Ā the mean of each row over the last axis
  (:func:`diffnotes.editing.appearance.attention_contrast`).
* ``"appearance_correspondence"``: ``fn(f_target, f_ref) -> (h·w,) long``: Eye-for-an-Eye's
  matching (Ahmad's notes, eq 3.32): for every target pixel q (row-major), the index of the
  reference pixel p with the largest cosine similarity between the feature vectors (C, h, w)
  (:func:`diffnotes.editing.appearance.feature_correspondence`).
"""
from __future__ import annotations

import torch

from . import register


def adain_reference(x, ref):
    from ..editing.appearance import adain

    return adain(x, ref)


def _adain_inputs(g):
    B, C = 2, int(torch.randint(2, 5, (1,), generator=g))
    h, w = int(torch.randint(3, 7, (1,), generator=g)), int(torch.randint(3, 7, (1,), generator=g))
    x = torch.randn(B, C, h, w, generator=g, dtype=torch.float64) * 2 + 1
    ref = torch.randn(B, C, h, w, generator=g, dtype=torch.float64) * 0.5 - 1
    return dict(x=x, ref=ref)


def contrast_reference(probs, beta):
    from ..editing.appearance import attention_contrast

    return attention_contrast(probs, beta)


def _contrast_inputs(g):
    n = int(torch.randint(3, 9, (1,), generator=g))
    probs = (torch.randn(2, n, n, generator=g, dtype=torch.float64) * 2).softmax(-1)
    beta = [1.0, 1.67, 0.5, 3.0, 5.0][int(torch.randint(0, 5, (1,), generator=g))]
    return dict(probs=probs, beta=beta)


def correspondence_reference(f_target, f_ref):
    from ..editing.appearance import feature_correspondence

    return feature_correspondence(f_target, f_ref)


def _correspondence_inputs(g):
    C, h, w = 6, int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(2, 6, (1,),
                                                                                 generator=g))
    ft = torch.randn(C, h, w, generator=g, dtype=torch.float64)
    fr = torch.randn(C, h, w, generator=g, dtype=torch.float64)
    return dict(f_target=ft, f_ref=fr)


register("appearance_adain", adain_reference, _adain_inputs, rtol=1e-10, atol=1e-10,
         doc="AdaIN (Ahmad's notes, eq 3.31): per-channel mean and std of ref, population std")
register("appearance_contrast", contrast_reference, _contrast_inputs, rtol=1e-12, atol=1e-12,
         doc="Cross-Image Attention's contrast clip(beta (A - mean) + mean, 0, 1)")
register("appearance_correspondence", correspondence_reference, _correspondence_inputs,
         rtol=0, atol=0, doc="Eye-for-an-Eye's cosine-similarity argmax (Ahmad's notes, eq 3.32)")
