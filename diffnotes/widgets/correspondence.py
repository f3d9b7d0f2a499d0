"""The correspondence explorer: which time step and which UNet block carry correspondence.

Built on :func:`diffnotes.widgets.explorer` (live sliders in a kernel, a static twin with every
frame precomputed on the website). Each frame extracts the block's output at time step t for a
source and a target image (:func:`diffnotes.features.extract`), matches the source's keypoints
by the argmax of cosine similarity (:func:`diffnotes.features.match_points`; Ahmad's notes,
eq 5.33), draws the predictions on the target beside the true keypoints, and shows the
similarity map of one query point.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ._core import explorer

__all__ = ["correspondence_explorer", "correspondence_frame"]


def correspondence_frame(pipe, source, target, kp_source, kp_target, t: int, block: str,
                         query: int = 0, box=None):
    """One matplotlib figure: the source with its keypoints, the target with the predicted
    (crosses) and true (circles) keypoints, lines joining them, and the similarity map of
    keypoint ``query``. ``source``/``target`` (64, 64, 3) in [0, 1]; keypoints (P, 2) (x, y)."""
    import matplotlib.pyplot as plt

    from ..features import extract, match_points, point_similarity

    both = np.stack([source, target])
    f = extract(pipe, both, int(t), layers=(block,),
                generator=torch.Generator().manual_seed(0))[block].double()
    H, W = source.shape[:2]
    pred = match_points(f[0], f[1], kp_source, (H, W)).numpy()
    sim = point_similarity(f[0], f[1], kp_source[query:query + 1], (H, W))[0].numpy()
    kt = np.asarray(kp_target)
    ok = None
    if box is not None:
        side = max(box[2] - box[0], box[3] - box[1])
        ok = np.linalg.norm(pred - kt, axis=-1) <= 0.1 * side
    fig, ax = plt.subplots(1, 3, figsize=(7.2, 2.6))
    ax[0].imshow(source)
    ax[0].scatter(*np.asarray(kp_source).T, c=np.arange(len(kp_source)), cmap="tab10", s=25,
                  vmin=0, vmax=9, edgecolors="k")
    ax[0].set_title("source + keypoints", fontsize=8)
    ax[1].imshow(target)
    for i, (p, q) in enumerate(zip(pred, kt)):
        ax[1].plot([p[0], q[0]], [p[1], q[1]], "w-", lw=0.6)
    ax[1].scatter(*kt.T, facecolors="none", edgecolors="w", s=40)
    ax[1].scatter(*pred.T, c=np.arange(len(pred)), cmap="tab10", vmin=0, vmax=9, marker="x", s=30)
    n_ok = "" if ok is None else f": {int(ok.sum())}/{len(ok)} within 0.1 box"
    ax[1].set_title(f"target: predicted ×, true ○{n_ok}", fontsize=8)
    ax[2].imshow(sim, cmap="magma")
    ax[2].scatter(*kt[query], facecolors="none", edgecolors="c", s=40)
    ax[2].set_title(f"cosine similarity of keypoint {query}", fontsize=8)
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"{block}, t = {t}", fontsize=9)
    fig.tight_layout()
    return fig


def correspondence_explorer(pipe, source, target, kp_source, kp_target,
                            timesteps: Sequence[int] = (0, 100, 300, 600),
                            blocks: Sequence[str] = ("down_blocks.1", "mid_block", "up_blocks.0",
                                                     "up_blocks.1"),
                            query: int = 0, box=None,
                            title: str = "Correspondence: time step and block",
                            live: bool | None = None):
    """Sliders over the time step ``t`` and the UNet ``block`` whose features match the source's
    keypoints into the target (len(timesteps) × len(blocks) frames). Raises ``ValueError`` for
    a block the UNet does not have, a time step out of range, or keypoints of the wrong shape."""
    from ..utils import check_timestep

    kp_source = np.asarray(kp_source, dtype=np.float64)
    kp_target = np.asarray(kp_target, dtype=np.float64)
    if kp_source.ndim != 2 or kp_source.shape[1] != 2 or kp_source.shape != kp_target.shape:
        raise ValueError(f"kp_source and kp_target must be (P, 2) arrays of the same shape, got "
                         f"{kp_source.shape} and {kp_target.shape}")
    modules = dict(pipe.unet.named_modules())
    bad = [b for b in blocks if b not in modules]
    if bad:
        raise ValueError(f"blocks must name submodules of the UNet, unknown: {bad}")
    T = len(pipe.scheduler.alphas_cumprod)
    timesteps = [int(check_timestep(int(t), T, "timesteps")) for t in timesteps]

    def render(t, block):
        return correspondence_frame(pipe, source, target, kp_source, kp_target, t, block, query,
                                    box)
    return explorer(render, {"t": list(timesteps), "block": list(blocks)}, title=title,
                    live=live)
