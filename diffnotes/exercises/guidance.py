"""Checkers for the guidance chapter: ``cfg`` and ``classifier_guidance``.

    from diffnotes.exercises import check
    check("cfg", my_cfg)                                  # my_cfg(eps_uncond, eps_cond, scale)
    check("classifier_guidance", my_classifier_guidance)  # (eps, grad_log_prob, alpha_bar_t, scale)

Inputs are random float64 tensors of shape (B, C, H, W) and random scales, including 0, 1 and
values above 1 (diffusers' convention: 0 unconditional, 1 conditional).
"""
from __future__ import annotations

import torch

from . import register
from .. import guidance as _g

_SPECIAL_SCALES = [0.0, 1.0, 7.5]


def _shape(g: torch.Generator):
    B = int(torch.randint(1, 5, (1,), generator=g))
    return (B, int(torch.randint(1, 4, (1,), generator=g)), 4, 4)


def _scale(g: torch.Generator) -> float:
    i = int(torch.randint(0, 5, (1,), generator=g))
    if i < len(_SPECIAL_SCALES):
        return _SPECIAL_SCALES[i]
    return float(torch.rand(1, generator=g, dtype=torch.float64) * 12 - 1)


def _cfg_inputs(g: torch.Generator) -> dict:
    shape = _shape(g)
    return dict(eps_uncond=torch.randn(shape, generator=g, dtype=torch.float64),
                eps_cond=torch.randn(shape, generator=g, dtype=torch.float64),
                scale=_scale(g))


def _cg_inputs(g: torch.Generator) -> dict:
    shape = _shape(g)
    return dict(eps=torch.randn(shape, generator=g, dtype=torch.float64),
                grad_log_prob=torch.randn(shape, generator=g, dtype=torch.float64) * 3,
                alpha_bar_t=float(torch.rand(1, generator=g, dtype=torch.float64) * 0.98 + 0.01),
                scale=_scale(g))


register("cfg", _g.cfg, _cfg_inputs, rtol=1e-10, atol=1e-12,
         doc="Classifier-free guidance ε_u + s(ε_c − ε_u) (Ahmad's notes, eq 1.44).")
register("classifier_guidance", _g.classifier_guidance, _cg_inputs, rtol=1e-10, atol=1e-12,
         doc="Classifier guidance ε − s√(1−ᾱ_t)∇log p(y|x_t) (Ahmad's notes, eq 1.30, corrected).")
