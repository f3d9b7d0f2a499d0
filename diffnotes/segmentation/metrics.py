"""Segmentation metrics and losses (Ahmad's notes, §5.2, eqs 5.2–5.4).

Label maps are integer arrays of shape (H, W) or (B, H, W) (numpy or torch; torch tensors are
moved to numpy for the metrics). Class ``c`` is the integer ``c`` in ``0 .. num_classes-1``;
pixels equal to ``ignore_index`` in the target are left out of every count.

- :func:`confusion_matrix`, :func:`pixel_accuracy`, :func:`iou_per_class`, :func:`mean_iou`;
- :func:`dice` (eq 5.4) and the differentiable :func:`soft_dice_loss`;
- :func:`pixel_cross_entropy` (eqs 5.2–5.3), on logits;
- :func:`hungarian_match` and :func:`unsupervised_miou`: clusters have no names, so each cluster
  is first matched to the class it overlaps most under a one-to-one assignment (Kuhn–Munkres,
  ``scipy.optimize.linear_sum_assignment``), then scored like a supervised prediction.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["confusion_matrix", "pixel_accuracy", "iou_per_class", "mean_iou", "dice",
           "soft_dice_loss", "pixel_cross_entropy", "hungarian_match", "unsupervised_miou"]


def _labels(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == bool:
        x = x.astype(np.int64)
    if not np.issubdtype(x.dtype, np.integer):
        if np.issubdtype(x.dtype, np.floating) and np.all(np.isfinite(x)) and np.all(x == np.round(x)):
            x = x.astype(np.int64)
        else:
            raise TypeError(f"{name} must hold integer labels, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must be a label map of shape (H, W) or (B, H, W), got a scalar")
    return x.astype(np.int64, copy=False)


def _pair(pred, target, num_classes, ignore_index, pred_name="pred", num_pred=None):
    p, t = _labels(pred, pred_name), _labels(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"{pred_name} and target must have the same shape, got {p.shape} and {t.shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    num_pred = num_classes if num_pred is None else num_pred
    keep = np.ones(t.shape, bool) if ignore_index is None else t != ignore_index
    p, t = p[keep], t[keep]
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target labels must lie in [0, {num_classes - 1}] (or equal ignore_index="
                         f"{ignore_index}), got values in [{t.min()}, {t.max()}]")
    if p.size and (p.min() < 0 or p.max() >= num_pred):
        raise ValueError(f"{pred_name} labels must lie in [0, {num_pred - 1}], got values in "
                         f"[{p.min()}, {p.max()}]")
    return p, t


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Counts ``C[i, j]`` = number of pixels with target class i predicted as class j.

    ``pred`` and ``target``: integer label maps of the same shape. Returns an int64 array
    (num_classes, num_classes). Raises ``ValueError`` on a shape mismatch or out-of-range labels.
    """
    p, t = _pair(pred, target, num_classes, ignore_index)
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def pixel_accuracy(pred, target, ignore_index: int | None = None) -> float:
    """Fraction of (non-ignored) pixels whose predicted label equals the target label."""
    p, t = _labels(pred, "pred"), _labels(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    keep = np.ones(t.shape, bool) if ignore_index is None else t != ignore_index
    n = int(keep.sum())
    if n == 0:
        raise ValueError("target has no pixel left after removing ignore_index")
    return float((p[keep] == t[keep]).sum() / n)


def iou_per_class(pred, target, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """IoU_c = |P_c ∩ T_c| / |P_c ∪ T_c| for every class c; NaN where the class is in neither map.

    Returns a float64 array of shape (num_classes,).
    """
    C = confusion_matrix(pred, target, num_classes, ignore_index).astype(np.float64)
    inter = np.diag(C)
    union = C.sum(0) + C.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)


def mean_iou(pred, target, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean of :func:`iou_per_class` over the classes present in the prediction or the target."""
    iou = iou_per_class(pred, target, num_classes, ignore_index)
    if np.all(np.isnan(iou)):
        raise ValueError("no class is present in pred or target")
    return float(np.nanmean(iou))


def dice(a, b) -> float:
    """Dice coefficient 2|A ∩ B| / (|A| + |B|) of two binary masks (Ahmad's notes, eq 5.4).

    ``a`` and ``b``: boolean (or 0/1) arrays of the same shape. Two empty masks agree perfectly:
    the result is then 1. Raises ``ValueError`` on a shape mismatch or non-binary values.
    """
    A, B = _labels(a, "a"), _labels(b, "b")
    if A.shape != B.shape:
        raise ValueError(f"a and b must have the same shape, got {A.shape} and {B.shape}")
    for n, m in (("a", A), ("b", B)):
        if m.size and (m.min() < 0 or m.max() > 1):
            raise ValueError(f"{n} must be a binary mask (values 0/1), got values in [{m.min()}, {m.max()}]")
    size = A.sum() + B.sum()
    if size == 0:
        return 1.0
    return float(2.0 * np.logical_and(A, B).sum() / size)  # eq 5.4


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 − mean over classes of the soft Dice 2Σ p·y / (Σ p + Σ y) (eq 5.4 with probabilities).

    ``probs``: (B, K, H, W) or (K, H, W) class probabilities; ``target``: integer labels (B, H, W)
    or (H, W). Differentiable in ``probs``. On one-hot ``probs`` it equals 1 − mean per-class Dice.
    """
    if not isinstance(probs, torch.Tensor) or probs.ndim not in (3, 4):
        raise ValueError(f"probs must be a tensor (B, K, H, W) or (K, H, W), got "
                         f"{getattr(probs, 'shape', type(probs).__name__)}")
    target = torch.as_tensor(target).long()
    if tuple(target.shape) != tuple(probs.shape[:-3]) + tuple(probs.shape[-2:]):
        raise ValueError(f"target must have shape {tuple(probs.shape[:-3]) + tuple(probs.shape[-2:])}, "
                         f"got {tuple(target.shape)}")
    K = probs.shape[-3]
    onehot = torch.nn.functional.one_hot(target, K).movedim(-1, -3).to(probs.dtype)
    dims = tuple(d for d in range(probs.ndim) if d != probs.ndim - 3)
    inter = (probs * onehot).sum(dims)
    size = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (size + eps)).mean()  # eq 5.4, per class


def pixel_cross_entropy(logits, target, reduction: str = "sum", ignore_index: int | None = None):
    """Pixel cross-entropy on logits (Ahmad's notes, eqs 5.2–5.3).

    Per pixel, L = −log softmax(z)[c*] (eq 5.2, with the softmax applied to unnormalised scores z,
    see erratum ``erratum-seg-ce-logits``); the image loss sums over pixels (eq 5.3,
    ``reduction="sum"``) or averages (``"mean"``, what training code uses).

    ``logits``: (B, K, H, W) or (K, H, W), numpy or torch; ``target``: integer (B, H, W) or (H, W).
    Returns a torch scalar (differentiable) for torch input, a float for numpy input.
    """
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    is_np = not isinstance(logits, torch.Tensor)
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64)) if is_np else logits
    if z.ndim not in (3, 4):
        raise ValueError(f"logits must have shape (B, K, H, W) or (K, H, W), got {tuple(z.shape)}")
    t = torch.as_tensor(_labels(target, "target"), device=z.device)
    want = tuple(z.shape[:-3]) + tuple(z.shape[-2:])
    if tuple(t.shape) != want:
        raise ValueError(f"target must have shape {want} for logits of shape {tuple(z.shape)}, "
                         f"got {tuple(t.shape)}")
    K = z.shape[-3]
    keep = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    if bool(((t[keep] < 0) | (t[keep] >= K)).any()):
        raise ValueError(f"target labels must lie in [0, {K - 1}]")
    logp = torch.log_softmax(z, dim=-3)                                     # eq 5.2
    nll = -logp.gather(-3, t.clamp(0, K - 1).unsqueeze(-3)).squeeze(-3)     # eq 5.2
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    if reduction == "sum":
        out = nll.sum()                                                     # eq 5.3
    elif reduction == "mean":
        out = nll.sum() / keep.sum().clamp_min(1)
    else:
        out = nll
    if is_np:
        return float(out) if reduction != "none" else out.numpy()
    return out


def hungarian_match(clusters, target, num_clusters: int, num_classes: int,
                    ignore_index: int | None = None) -> np.ndarray:
    """One-to-one assignment of clusters to classes that maximises the matched pixel count.

    ``clusters``: integer map in [0, num_clusters); ``target``: class map in [0, num_classes).
    Returns ``mapping`` (num_clusters,) int64: ``mapping[k]`` is the class of cluster k, or −1 for
    clusters left unmatched when ``num_clusters > num_classes`` (over-clustering); their pixels
    then count as wrong. Uses ``scipy.optimize.linear_sum_assignment`` on the overlap matrix.
    """
    p, t = _pair(clusters, target, num_classes, ignore_index, pred_name="clusters",
                 num_pred=num_clusters)
    overlap = np.bincount(p * num_classes + t, minlength=num_clusters * num_classes)
    overlap = overlap.reshape(num_clusters, num_classes)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    mapping = np.full(num_clusters, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def unsupervised_miou(clusters, target, num_classes: int, num_clusters: int | None = None,
                      ignore_index: int | None = None) -> tuple[float, np.ndarray, float]:
    """mIoU and pixel accuracy of a clustering after Hungarian matching to the classes.

    Returns ``(miou, mapping, accuracy)``. ``num_clusters`` defaults to ``num_classes``. Clusters
    left unmatched (``mapping == -1``) are scored as a class that matches nothing.
    """
    num_clusters = num_classes if num_clusters is None else num_clusters
    if num_clusters < num_classes:
        raise ValueError(f"num_clusters must be >= num_classes={num_classes}, got {num_clusters}")
    mapping = hungarian_match(clusters, target, num_clusters, num_classes, ignore_index)
    p = mapping[_labels(clusters, "clusters")]
    t = _labels(target, "target")
    keep = np.ones(t.shape, bool) if ignore_index is None else t != ignore_index
    # unmatched clusters become an extra class ``num_classes`` that no target pixel has
    p = np.where(p < 0, num_classes, p)
    iou = iou_per_class(p[keep], t[keep], num_classes + 1)[:num_classes]
    acc = float((p[keep] == t[keep]).mean())
    return float(np.nanmean(iou)), mapping, acc
