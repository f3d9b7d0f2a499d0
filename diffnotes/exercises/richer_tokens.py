"""Checkers for the chapter "Richer tokens: P+, Break-A-Scene, ReVersion".

* ``"reversion_f"``: ``fn(T, alpha) -> (T,)``: the relation-focal weights f(t) = (1 − α
  cos(πt/T))/T, t = 0 … T−1 (Ahmad's notes, eq 4.11). Library:
  ``diffnotes.personalization.reversion.importance_weights``.
* ``"reversion_steer"``: ``fn(R, positives, negatives, temperature) -> scalar``: the corrected
  steering loss (eq 4.10 with every positive in the denominator), cosine-normalised. Library:
  ``reversion.steering_loss``.
* ``"bas_masked_loss"``: ``fn(eps, eps_pred, mask) -> scalar``: Break-A-Scene's masked loss
  (eq 4.5) reduced as the official code (mean over all elements). Library:
  ``break_a_scene.masked_loss``.
"""
from __future__ import annotations

import torch

from . import register


def _f_ref(T, alpha):
    from ..personalization.reversion import importance_weights
    return importance_weights(T, alpha)


def _f_inputs(g):
    return dict(T=int(torch.randint(2, 2000, (1,), generator=g)),
                alpha=float(torch.rand(1, generator=g)))


def _steer_ref(R, positives, negatives, temperature):
    from ..personalization.reversion import steering_loss
    return steering_loss(R, positives, negatives, temperature)


def _steer_inputs(g):
    D = int(torch.randint(3, 9, (1,), generator=g))
    L, K = (int(torch.randint(1, 5, (1,), generator=g)) for _ in range(2))
    return dict(R=torch.randn(D, generator=g, dtype=torch.float64),
                positives=torch.randn(L, D, generator=g, dtype=torch.float64),
                negatives=torch.randn(K, D, generator=g, dtype=torch.float64),
                temperature=0.05 + float(torch.rand(1, generator=g)))


def _masked_ref(eps, eps_pred, mask):
    from ..personalization.break_a_scene import masked_loss
    return masked_loss(eps, eps_pred, mask)


def _masked_inputs(g):
    e, p = torch.randn(2, 2, 4, 6, 6, generator=g, dtype=torch.float64)
    m = (torch.rand(2, 1, 6, 6, generator=g) > 0.6).double()
    return dict(eps=e, eps_pred=p, mask=m)


register("reversion_f", _f_ref, _f_inputs, rtol=1e-12, atol=1e-15,
         doc="ReVersion's importance weights f(t) = (1 - alpha cos(pi t / T)) / T")
register("reversion_steer", _steer_ref, _steer_inputs, rtol=1e-10, atol=1e-12,
         doc="ReVersion's corrected steering loss (InfoNCE with all positives below)")
register("bas_masked_loss", _masked_ref, _masked_inputs, rtol=1e-12, atol=1e-14,
         doc="Break-A-Scene's masked diffusion loss, mean over all elements")
