"""Checkers for the chapter "Self-attention: MasaCtrl and Plug-and-Play".

* ``"kv_injection"``: ``fn(q, k_ref, v_ref) -> (..., N_q, d)``: one key-value-injection attention
  step, softmax(Q K_ref^T / sqrt d) V_ref (Ahmad's notes, eq 3.6); the library's
  :func:`diffnotes.editing.masactrl.kv_injection`.
* ``"masactrl_allowed_keys"``: ``fn(mask_s, mask_t) -> (N_t, N_s)``: 1.0 where target query i
  may attend to source key j under the corrected masked mutual attention (same side of the
  masks: M_t(i) = M_s(j)), 0.0 elsewhere; a query whose side has no source key may attend to
  every key. The library turns it into the logit bias of
  :func:`diffnotes.editing.masactrl.mask_logit_bias`.
* ``"masactrl_masked_blend"``: ``fn(q, k_s, v_s, mask_s, mask_t) -> (..., N_t, d)``: the
  corrected masked mutual attention in MasaCtrl's own form, f = M_t ⊙ softmax(S + log M_s) V_s
  + (1 − M_t) ⊙ softmax(S + log(1 − M_s)) V_s (:func:`diffnotes.editing.masactrl.
  masked_mutual_attention_blend`); the masks drawn here always have both sides non-empty.
"""
from __future__ import annotations

import torch

from . import register


def _kv_reference(q, k_ref, v_ref):
    from ..editing.masactrl import kv_injection
    return kv_injection(q, k_ref, v_ref)


def _kv_inputs(g):
    n_q, n_k, d = (int(torch.randint(3, 9, (1,), generator=g)) for _ in range(3))
    return dict(q=torch.randn(2, n_q, d, generator=g, dtype=torch.float64),
                k_ref=torch.randn(2, n_k, d, generator=g, dtype=torch.float64),
                v_ref=torch.randn(2, n_k, d, generator=g, dtype=torch.float64))


def _allowed_reference(mask_s, mask_t):
    from ..editing.masactrl import mask_logit_bias
    return (mask_logit_bias(mask_s, mask_t) == 0).double()


def _mask(g, n, both=True):
    while True:
        m = (torch.rand(n, generator=g) < 0.4).double()
        if not both or 0 < m.sum() < n:
            return m


def _allowed_inputs(g):
    n = int(torch.randint(4, 12, (1,), generator=g))
    ms = _mask(g, n, both=bool(torch.rand(1, generator=g) < 0.7))
    if float(torch.rand(1, generator=g)) < 0.2:
        ms = torch.zeros(n, dtype=torch.float64)          # no foreground key at all
    return dict(mask_s=ms, mask_t=_mask(g, n))


def _blend_reference(q, k_s, v_s, mask_s, mask_t):
    from ..editing.masactrl import masked_mutual_attention_blend
    return masked_mutual_attention_blend(q, k_s, v_s, mask_s, mask_t)


def _blend_inputs(g):
    n, d = int(torch.randint(4, 10, (1,), generator=g)), 4
    return dict(q=torch.randn(2, n, d, generator=g, dtype=torch.float64),
                k_s=torch.randn(2, n, d, generator=g, dtype=torch.float64),
                v_s=torch.randn(2, n, d, generator=g, dtype=torch.float64),
                mask_s=_mask(g, n), mask_t=_mask(g, n))


register("kv_injection", _kv_reference, _kv_inputs, rtol=1e-10, atol=1e-12,
         doc="one key-value-injection attention step (Ahmad's notes, eq 3.6)")
register("masactrl_allowed_keys", _allowed_reference, _allowed_inputs, rtol=0, atol=0,
         doc="which source keys a target query may read under the corrected masked attention")
register("masactrl_masked_blend", _blend_reference, _blend_inputs, rtol=1e-10, atol=1e-12,
         doc="the corrected masked mutual attention, blended by the target mask")
