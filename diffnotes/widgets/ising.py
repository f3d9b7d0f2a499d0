"""Explorer for the Ising chapter: binary graph-cut segmentation of a photograph against λ and σ.

``graph_cut_explorer(image)`` shows, for every (λ, σ) pair, the photograph and its exact MAP
segmentation (:func:`diffnotes.segmentation.ising.graph_cut`) under Gaussian unaries (eq 5.6) and
contrast-sensitive edge weights λ·exp(−‖I_i − I_j‖²/2σ²) (eq 5.11). Live sliders in a kernel,
the static twin on the website (keep ``len(lams) * len(sigmas)`` ≤ ~60).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..segmentation.ising import contrast_weights, gaussian_unary, graph_cut
from ._core import explorer

__all__ = ["otsu_unary", "overlay", "graph_cut_explorer"]


def _chw(image) -> np.ndarray:
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (H, W) or (C, H, W) with C in (1, 3), got {np.shape(image)}")
    return a


def otsu_unary(image) -> np.ndarray:
    """Gaussian unaries (eq 5.6) with the two classes of Otsu's threshold on the grey levels.

    The brighter class is the foreground (label 1); means and standard deviations are the
    classes' sample statistics (per channel mean, pooled σ). Returns costs (2, H, W).
    """
    from skimage.filters import threshold_otsu

    a = _chw(image)
    grey = a.mean(0)
    fg = grey > threshold_otsu(grey)
    stats = []
    for m in (fg, ~fg):
        px = a[:, m]
        stats.append((px.mean(1), max(float(px.std()), 1e-3)))
    (mu_fg, s_fg), (mu_bg, s_bg) = stats
    return gaussian_unary(a, mu_fg, s_fg, mu_bg, s_bg)


def overlay(image, labels, colour=(1.0, 0.25, 0.1), alpha=0.55) -> np.ndarray:
    """HWC array in [0, 1]: the image with label-1 pixels tinted, beside the binary mask."""
    a = _chw(image)
    rgb = np.repeat(a, 3, 0) if a.shape[0] == 1 else a
    rgb = rgb.transpose(1, 2, 0).clip(0, 1)
    m = np.asarray(labels, bool)[..., None]
    tinted = np.where(m, (1 - alpha) * rgb + alpha * np.asarray(colour), rgb)
    sep = np.ones((rgb.shape[0], 4, 3))
    return np.concatenate([tinted, sep, np.repeat(m.astype(float), 3, -1)], axis=1)


def graph_cut_explorer(image, unary=None, lams: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
                       sigmas: Sequence[float] = (0.02, 0.05, 0.1, 0.3, 1.0), title: str = "",
                       live: bool | None = None):
    """Sliders over λ (smoothness strength) and σ (contrast scale) of eq 5.11.

    ``image``: (H, W) or channels-first (C, H, W) in [0, 1]; ``unary``: (2, H, W) costs, by
    default :func:`otsu_unary`. Each frame: the exact graph-cut MAP, shown over the image.
    """
    a = _chw(image)
    u = otsu_unary(a) if unary is None else np.asarray(unary, dtype=np.float64)

    def render(lam, sigma):
        wr, wd = contrast_weights(a, lam, sigma)
        return overlay(a, graph_cut(u, wr, wd))

    return explorer(render, {"lam": list(lams), "sigma": list(sigmas)},
                    title=title or "graph-cut segmentation: λ (smoothness) and σ (contrast)", live=live)
