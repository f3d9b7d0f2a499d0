"""Checkers for the chapter "Segmenting with a diffusion model: label-efficient segmentation,
DiffSeg and DiffewS".

* ``"diffseg_sym_kl"``: ``fn(p, q) -> (N,)``: the symmetric KL KL(p||q) + KL(q||p) of eq 5.66
  (Ahmad's notes) between matching rows of p and q (N, D), strictly positive distributions.
  Library: :func:`diffnotes.recognition.diffseg.sym_kl` (``convention="paper"``).
* ``"diffseg_weights"``: ``fn(resolutions) -> (L,)``: the official per-layer aggregation
  weights (resolution r / sum of the distinct resolutions, shared by the layers of that
  resolution). Library: :func:`diffnotes.recognition.diffseg.aggregation_weights`.
* ``"diffseg_anchor_grid"``: ``fn(num_points, size) -> (M*M,)``: the official anchor grid as
  flat row-major indices. Library: :func:`diffnotes.recognition.diffseg.anchor_grid`.
* ``"box_nms"``: ``fn(boxes, scores, iou_threshold) -> (K,)``: greedy NMS, kept indices by
  decreasing score. Library: :func:`diffnotes.recognition.nms.nms`.
* ``"le_majority_vote"``: ``fn(votes) -> (N,)``: the per-column mode of (M, N) integer votes,
  ties to the smallest label. Library:
  :func:`diffnotes.recognition.label_efficient.majority_vote`.
"""
from __future__ import annotations

import torch

from . import register


def _sym_kl_reference(p, q):
    from ..recognition.diffseg import sym_kl
    return sym_kl(p, q, "paper")


def _sym_kl_inputs(g):
    n, d = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(2, 10, (1,), generator=g))
    p = torch.softmax(2 * torch.randn(n, d, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(2 * torch.randn(n, d, generator=g, dtype=torch.float64), -1)
    return dict(p=p, q=q)


def _weights_reference(resolutions):
    from ..recognition.diffseg import aggregation_weights
    return aggregation_weights(resolutions, "official")


def _weights_inputs(g):
    sides = [64, 32, 16, 8]
    L = int(torch.randint(1, 17, (1,), generator=g))
    return dict(resolutions=[sides[int(i)] for i in torch.randint(0, 4, (L,), generator=g)])


def _grid_reference(num_points, size):
    from ..recognition.diffseg import anchor_grid
    return anchor_grid(num_points, size)


def _grid_inputs(g):
    size = int(torch.randint(8, 65, (1,), generator=g))
    return dict(num_points=int(torch.randint(2, min(size, 17) + 1, (1,), generator=g)), size=size)


def _nms_reference(boxes, scores, iou_threshold):
    from ..recognition.nms import nms
    return nms(boxes, scores, iou_threshold)


def _nms_inputs(g):
    n = int(torch.randint(1, 10, (1,), generator=g))
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 10
    wh = 1 + 5 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    return dict(boxes=torch.cat([xy, xy + wh], 1),
                scores=torch.rand(n, generator=g, dtype=torch.float64),
                iou_threshold=float(torch.rand(1, generator=g)))


def _vote_reference(votes):
    from ..recognition.label_efficient import majority_vote
    return majority_vote(votes)


def _vote_inputs(g):
    M, N = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
    return dict(votes=torch.randint(0, 4, (M, N), generator=g))


register("diffseg_sym_kl", _sym_kl_reference, _sym_kl_inputs, rtol=1e-9, atol=1e-12,
         doc="the symmetric KL of eq 5.66, KL(p||q) + KL(q||p), row by row")
register("diffseg_weights", _weights_reference, _weights_inputs, rtol=1e-12, atol=1e-14,
         doc="DiffSeg's official per-layer aggregation weights")
register("diffseg_anchor_grid", _grid_reference, _grid_inputs, rtol=0, atol=0,
         doc="DiffSeg's anchor grid as flat indices")
register("box_nms", _nms_reference, _nms_inputs, rtol=0, atol=0,
         doc="greedy non-maximum suppression, kept indices by decreasing score")
register("le_majority_vote", _vote_reference, _vote_inputs, rtol=0, atol=0,
         doc="per-pixel majority vote of the ensemble, ties to the smallest label")
