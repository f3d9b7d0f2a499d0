"""Checkers for the chapter "DreamBooth and Textual Inversion".

* ``"prior_preservation_loss"``: ``fn(pred, target, class_pred, class_target, weight) -> loss``:
  Ahmad's notes eq 4.2 (DreamBooth eq 2) from predictions, mean‖target − pred‖² +
  λ mean‖class_target − class_pred‖². Library:
  :func:`diffnotes.personalization.dreambooth.prior_preservation_loss`.
* ``"ti_gradient_mask"``: ``fn(grad, token_ids) -> grad``: the embedding table's gradient (V, D)
  with every row except ``token_ids`` set to zero (the gradient half of Textual Inversion's
  "only the new rows"; the rows themselves must still be restored after AdamW's weight decay).
* ``"ti_regularizer"``: ``fn(d, e, weight) -> (value, grad)``: λ Σ‖d_k − e‖² and its gradient
  2λ(d − e) (Ahmad's notes §4.4.1, approach 3). Library:
  :func:`diffnotes.personalization.textual_inversion.embedding_regularizer`.
"""
from __future__ import annotations

import torch

from . import register


def _pp_ref(pred, target, class_pred, class_target, weight):
    from ..personalization.dreambooth import prior_preservation_loss
    return prior_preservation_loss(pred, target, class_pred, class_target, weight)


def _pp_inputs(g):
    b, bc = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
    p, t = torch.randn(2, b, 4, 3, 3, generator=g, dtype=torch.float64)
    cp, ct = torch.randn(2, bc, 4, 3, 3, generator=g, dtype=torch.float64)
    w = [0.0, 1.0, float(torch.rand(1, generator=g)) * 2][int(torch.randint(3, (1,), generator=g))]
    return dict(pred=p, target=t, class_pred=cp, class_target=ct, weight=w)


def _mask_ref(grad, token_ids):
    out = torch.zeros_like(grad)
    out[token_ids] = grad[token_ids]
    return out


def _mask_inputs(g):
    V = int(torch.randint(5, 12, (1,), generator=g))
    k = int(torch.randint(1, 4, (1,), generator=g))
    ids = torch.randperm(V, generator=g)[:k].tolist()
    return dict(grad=torch.randn(V, 6, generator=g, dtype=torch.float64), token_ids=ids)


def _reg_ref(d, e, weight):
    from ..personalization.textual_inversion import embedding_regularizer
    d = d.clone().requires_grad_(True)
    v = embedding_regularizer(d, e, weight)
    v.backward()
    return v.detach(), d.grad


def _reg_inputs(g):
    k = int(torch.randint(1, 4, (1,), generator=g))
    return dict(d=torch.randn(k, 5, generator=g, dtype=torch.float64),
                e=torch.randn(5, generator=g, dtype=torch.float64),
                weight=float(torch.rand(1, generator=g)))


register("prior_preservation_loss", _pp_ref, _pp_inputs, rtol=1e-10, atol=1e-12,
         doc="DreamBooth's eq 4.2 from predictions: instance MSE + weight × class MSE")
register("ti_gradient_mask", _mask_ref, _mask_inputs, rtol=0, atol=0,
         doc="Textual Inversion: keep only the new tokens' rows of the embedding gradient")
register("ti_regularizer", _reg_ref, _reg_inputs, rtol=1e-10, atol=1e-12,
         doc="Textual Inversion's L2 pull to a coarse word: value and gradient 2λ(d − e)")
