"""Non-maximum suppression, the preamble of Ahmad's notes, §5.13.

Candidate regions ``R_i`` come with a confidence ``S_i`` and a box ``B_i = (x_min, y_min, x_max,
y_max)`` (or a binary mask). NMS sorts them by confidence, keeps the best, suppresses every
remaining region whose IoU with it exceeds a threshold ``T``, and repeats on what is left.
The boxes are continuous rectangles: the area of ``(0, 0, 10, 10)`` is 100.

DiffSeg's last step, which the notes also call NMS, is a per-pixel argmax over the merged
proposals (:func:`diffnotes.recognition.diffseg.label_map`); it suppresses per pixel, not per
region.
"""
from __future__ import annotations

import torch

from diffnotes.utils import check_range, check_tensor

__all__ = ["box_iou", "mask_iou", "nms", "nms_masks"]


def _check_boxes(boxes, name):
    check_tensor(boxes, name, 2)
    if boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) as (x_min, y_min, x_max, y_max), got "
                         f"{tuple(boxes.shape)}")
    if bool((boxes[:, 2] < boxes[:, 0]).any() | (boxes[:, 3] < boxes[:, 1]).any()):
        raise ValueError(f"{name} must satisfy x_max >= x_min and y_max >= y_min")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU(B_i, B_j) = Area(B_i ∩ B_j) / Area(B_i ∪ B_j) of every pair (Ahmad's notes, §5.13).

    Args:
        a: (N, 4), b: (M, 4) boxes (x_min, y_min, x_max, y_max).
    Returns:
        (N, M); 0 where the union is empty.
    """
    _check_boxes(a, "a")
    _check_boxes(b, "b")
    if not a.is_floating_point():
        a = a.double()
    b = b.to(a.dtype)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]                             # Area(B_i ∩ B_j)
    union = area_a[:, None] + area_b[None, :] - inter           # Area(B_i ∪ B_j)
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)),
                       torch.zeros_like(inter))


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of binary masks: a (N, H, W), b (M, H, W) -> (N, M); 0 for two empty
    masks."""
    check_tensor(a, "a", 3)
    check_tensor(b, "b", 3)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a and b must have the same mask size, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def _greedy(iou: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    # sort by S_i, descending; ties keep the input order (stable)
    order = torch.sort(scores, descending=True, stable=True).indices
    alive = torch.ones(len(scores), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if not alive[i]:
            continue
        keep.append(i)                      # (a) the best remaining region joins M
        alive &= ~(iou[i] > threshold)      # suppress R_j with IoU(B_i, B_j) > T
        alive[i] = False
    return torch.tensor(keep, dtype=torch.long)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression of boxes (Ahmad's notes, §5.13, steps 1-3).

    Args:
        boxes: (N, 4) as (x_min, y_min, x_max, y_max).
        scores: (N,) confidences.
        iou_threshold: T in [0, 1]; a box is suppressed when its IoU with a kept, higher-scoring
            box is *greater* than T (T = 1 keeps every box).
    Returns:
        (K,) long indices of the kept boxes, highest score first (equal scores: input order).
    Raises:
        ValueError on a wrong shape or a threshold outside [0, 1].
    """
    _check_boxes(boxes, "boxes")
    check_tensor(scores, "scores", 1)
    if len(scores) != len(boxes):
        raise ValueError(f"scores must have one entry per box ({len(boxes)}), got shape "
                         f"{tuple(scores.shape)}")
    t = check_range(iou_threshold, "iou_threshold", 0.0, 1.0)
    return _greedy(box_iou(boxes, boxes), scores, t)


def nms_masks(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`nms` with the IoU of binary masks (N, H, W) instead of boxes."""
    check_tensor(masks, "masks", 3)
    check_tensor(scores, "scores", 1)
    if len(scores) != len(masks):
        raise ValueError(f"scores must have one entry per mask ({len(masks)}), got shape "
                         f"{tuple(scores.shape)}")
    t = check_range(iou_threshold, "iou_threshold", 0.0, 1.0)
    return _greedy(mask_iou(masks.bool(), masks.bool()), scores, t)
