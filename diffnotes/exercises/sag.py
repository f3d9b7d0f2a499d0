"""Checkers for the chapter "Self-attention guidance".

* ``"sag_combine"``: ``fn(eps, eps_ref, eps_degraded, s) -> ε̃``: the corrected eq 5.55 of
  Ahmad's notes, ε + s (ε_ref − ε_θ(x̂_t)). Library: :func:`diffnotes.guidance.sag_combine`.
* ``"sag_mask"``: ``fn(attn, latent_hw) -> (B, 1, H, W)``: the blur mask of head-averaged
  self-attention (B, N, N): column sums > 1, reshaped to the token grid, nearest upsampling.
  Library: :func:`diffnotes.guidance.sag_mask`.
* ``"sag_blur"``: ``fn(x, kernel_size, sigma) -> x``: the normalised separable Gaussian blur
  with reflect padding. Library: :func:`diffnotes.guidance.gaussian_blur_2d`.
"""
from __future__ import annotations

import torch

from . import register


def _combine_ref(eps, eps_ref, eps_degraded, s):
    from ..guidance import sag_combine
    return sag_combine(eps, eps_ref, eps_degraded, s)


def _combine_inputs(g):
    e, r, d = torch.randn(3, 2, 4, 6, 6, generator=g, dtype=torch.float64)
    return dict(eps=e, eps_ref=r, eps_degraded=d, s=float(torch.rand(1, generator=g)) * 2)


def _mask_ref(attn, latent_hw):
    from ..guidance import sag_mask
    return sag_mask(attn, latent_hw)


def _mask_inputs(g):
    side = int(torch.randint(2, 6, (1,), generator=g))
    N = side * side
    up = 2 ** int(torch.randint(0, 3, (1,), generator=g))   # the latent: a power of two larger
    attn = torch.softmax(3 * torch.randn(2, N, N, generator=g, dtype=torch.float64), -1)
    return dict(attn=attn, latent_hw=(side * up, side * up))


def _blur_ref(x, kernel_size, sigma):
    from ..guidance import gaussian_blur_2d
    return gaussian_blur_2d(x, kernel_size, sigma)


def _blur_inputs(g):
    k = int(torch.randint(1, 5, (1,), generator=g)) * 2 + 1
    x = torch.randn(1, 2, k + 4, k + 4, generator=g, dtype=torch.float64)
    return dict(x=x, kernel_size=k, sigma=0.5 + float(torch.rand(1, generator=g)) * 2)


register("sag_combine", _combine_ref, _combine_inputs, rtol=1e-12, atol=1e-12,
         doc="SAG's guided prediction, eps + s (eps_ref - eps_degraded)")
register("sag_mask", _mask_ref, _mask_inputs, rtol=0, atol=0,
         doc="SAG's blur mask: head-mean self-attention column sums > 1, nearest upsampling")
register("sag_blur", _blur_ref, _blur_inputs, rtol=1e-10, atol=1e-12,
         doc="normalised separable Gaussian blur with reflect padding")
