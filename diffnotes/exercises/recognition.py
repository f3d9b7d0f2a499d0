"""Checkers for the unsupervised-segmentation chapter (Ahmad's notes, §5.4-5.6).

``check("pacl_weights", fn)``: fn(patch_emb (B,T,D), text_emb (K,D)) -> (B,K,T) softmax weights
(eqs 5.14-5.15). ``check("pacl_logits", fn)``: fn(patch_emb, text_emb, temperature) -> (B,B')
(eqs 5.14-5.17). ``check("picie_cluster_loss", fn)``: fn(z (B,C,H,W), y (B,H,W), mu (K,C)) ->
scalar (eq 5.21). ``check("stego_loss", fn)``: fn(feats_a, feats_b, codes_a, codes_b, shift) ->
scalar (eq 5.28 with spatial centring and zero clamping).
"""
from __future__ import annotations

import torch

from diffnotes.exercises import register
from diffnotes.segmentation.pacl import pacl_logits, patch_weights
from diffnotes.segmentation.picie import cluster_loss
from diffnotes.segmentation.stego import stego_loss


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _int(g, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=g))


def _pacl_weight_inputs(g):
    B, T, K, D = _int(g, 1, 4), _int(g, 2, 9), _int(g, 1, 5), _int(g, 2, 7)
    return {"patch_emb": _randn(g, B, T, D), "text_emb": _randn(g, K, D)}


def _pacl_logit_inputs(g):
    B, T, K, D = _int(g, 1, 5), _int(g, 2, 9), _int(g, 1, 5), _int(g, 2, 7)
    tau = float(torch.empty(1, dtype=torch.float64).uniform_(0.05, 1.5, generator=g))
    return {"patch_emb": _randn(g, B, T, D), "text_emb": _randn(g, K, D), "temperature": tau}


def _picie_inputs(g):
    B, C, H, W, K = _int(g, 1, 3), _int(g, 2, 6), _int(g, 2, 5), _int(g, 2, 5), _int(g, 2, 6)
    return {"z": _randn(g, B, C, H, W), "y": torch.randint(0, K, (B, H, W), generator=g),
            "mu": _randn(g, K, C)}


def _stego_inputs(g):
    B, C, K = _int(g, 1, 3), _int(g, 3, 8), _int(g, 2, 5)
    H, W, I, J = (_int(g, 2, 5) for _ in range(4))
    shift = float(torch.empty(1, dtype=torch.float64).uniform_(0.0, 0.5, generator=g))
    return {"feats_a": _randn(g, B, C, H, W), "feats_b": _randn(g, B, C, I, J),
            "codes_a": _randn(g, B, K, H, W), "codes_b": _randn(g, B, K, I, J), "shift": shift}


register("pacl_weights", patch_weights, _pacl_weight_inputs, rtol=1e-7, atol=1e-10,
         doc="softmax over patches of patch-text cosines, Ahmad's notes, eqs 5.14-5.15")
register("pacl_logits", pacl_logits, _pacl_logit_inputs, rtol=1e-7, atol=1e-10,
         doc="PACL image-text logits, Ahmad's notes, eqs 5.14-5.17")
register("picie_cluster_loss", lambda z, y, mu: cluster_loss(z, y, mu), _picie_inputs,
         rtol=1e-7, atol=1e-10, doc="PiCIE's cluster loss, Ahmad's notes, eq 5.21 (pixel mean)")
register("stego_loss", lambda feats_a, feats_b, codes_a, codes_b, shift:
         stego_loss(feats_a, feats_b, codes_a, codes_b, shift), _stego_inputs,
         rtol=1e-7, atol=1e-10, doc="STEGO correlation loss, Ahmad's notes, eq 5.28 (corrected)")
