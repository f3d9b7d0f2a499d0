"""Checkers for the chapter "Stable Diffusion, part by part" (cross-attention and its maps).

* ``"cross_attention"``: ``fn(f, c, w_q, w_k, w_v, w_o, heads) -> (B, N, C)``, multi-head
  cross-attention with row-vector projections (the matrix form ``Q = Y W_q`` of Gormley & Chai's
  lecture, slide "Cross Attention"):
  ``Q = f W_q``, ``K = c W_k``, ``V = c W_v`` (Ahmad's notes, eq 1.48), split into ``heads`` heads
  of width ``d``, ``softmax(Q K^T / sqrt(d)) V`` per head (eq 1.47), heads concatenated,
  times ``W_o``.
* ``"token_map"``: ``fn(probs, heads, height, width, token) -> (B, height, width)``: the map of
  key token ``token`` from attention probabilities ``(B·heads, height·width, M)`` (diffusers'
  layout: batch-major then head, queries flattened row-major), averaged over heads (Ahmad's
  notes, eq 3.1).
"""
from __future__ import annotations

import math

import torch

from . import register


def cross_attention_reference(f, c, w_q, w_k, w_v, w_o, heads):
    """Multi-head cross-attention (Ahmad's notes, eqs 1.47-1.48), shapes in the module docstring."""
    B, N, _ = f.shape
    M = c.shape[1]
    q, k, v = f @ w_q, c @ w_k, c @ w_v                                  # eq 1.48
    d = q.shape[-1] // heads
    q = q.reshape(B, N, heads, d).transpose(1, 2)                        # (B, h, N, d)
    k = k.reshape(B, M, heads, d).transpose(1, 2)
    v = v.reshape(B, M, heads, d).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)   # eq 1.47
    y = (a @ v).transpose(1, 2).reshape(B, N, heads * d)
    return y @ w_o


def _cross_inputs(g):
    B, N, M, C, D, heads, d = 2, 12, 5, 6, 4, 2, 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(f=r(B, N, C), c=r(B, M, D), w_q=r(C, heads * d), w_k=r(D, heads * d),
                w_v=r(D, heads * d), w_o=r(heads * d, C), heads=heads)


def token_map_reference(probs, heads, height, width, token):
    """Column ``token`` of ``probs`` (B·heads, h·w, M), mean over heads, reshaped (B, h, w)."""
    bh, n, _ = probs.shape
    p = probs.reshape(bh // heads, heads, n, -1).mean(1)
    return p[..., token].reshape(-1, height, width)


def _token_inputs(g):
    B, heads, h, w, M = 2, 3, 3, 5, 6
    logits = torch.randn(B * heads, h * w, M, generator=g, dtype=torch.float64)
    return dict(probs=logits.softmax(-1), heads=heads, height=h, width=w,
                token=int(torch.randint(0, M, (1,), generator=g)))


register("cross_attention", cross_attention_reference, _cross_inputs, rtol=1e-9, atol=1e-12,
         doc="multi-head cross-attention softmax(QK^T/sqrt d)V, Ahmad's notes, eqs 1.47-1.48")
register("token_map", token_map_reference, _token_inputs, rtol=1e-9, atol=1e-12,
         doc="one token's attention map from (B*heads, h*w, M) probabilities, Ahmad's notes, eq 3.1")
