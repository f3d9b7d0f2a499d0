"""The P+ mixing explorer: the split layer k of "coarse from A, fine from B" (Ahmad's notes,
§4.4.2, P+_mix), and the α of ReVersion's importance sampling (eq 4.11).

Built on ``diffnotes.widgets.explorer`` (live sliders in a kernel; the static twin with every
frame precomputed on the website).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..utils import check_int
from ._core import explorer

__all__ = ["plus_mixing_frame", "plus_mixing_explorer", "importance_frame",
           "importance_explorer"]


def plus_mixing_frame(pipe, prompt_a: str, prompt_b: str, k: int, n: int = 4, seed: int = 0,
                      num_inference_steps: int = 10):
    """One frame: ``n`` samples of P+_mix = A's prompt in layers ``< k`` (forward order), B's in
    the rest (``diffnotes.personalization.extended.mix_plus``), with the judged shape and
    colour. Returns the figure."""
    import matplotlib.pyplot as plt

    from ..personalization import extended as X
    from ..personalization.evaluate import judge_images

    L = len(X.cross_layers(pipe.unet))
    k = check_int(k, "k", min=0)
    lp = X.mix_plus([[prompt_a] * n] * L, [[prompt_b] * n] * L, k)
    ims = X.sample_per_layer(pipe, lp, seed=seed, num_inference_steps=num_inference_steps)
    j = judge_images(ims)
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 2.0), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(np.clip(ims[i], 0, 1))
        axes[0, i].set_title(f"{j[i]['color']} {j[i]['shape']}", fontsize=7)
        axes[0, i].axis("off")
    fig.suptitle(f"layers 0..{k - 1}: '{prompt_a}', layers {k}..{L - 1}: '{prompt_b}'",
                 fontsize=7)
    fig.tight_layout()
    return fig


def plus_mixing_explorer(pipe, prompt_a: str = "a red square", prompt_b: str = "a green circle",
                         ks: Sequence[int] | None = None, n: int = 4, seed: int = 0,
                         num_inference_steps: int = 10, live: bool | None = None):
    """A slider over the split layer k (default every k = 0 … n_layers)."""
    from ..personalization.extended import cross_layers

    ks = list(range(len(cross_layers(pipe.unet)) + 1)) if ks is None else list(ks)

    def frame(k):
        return plus_mixing_frame(pipe, prompt_a, prompt_b, k, n, seed, num_inference_steps)

    return explorer(frame, {"k": ks}, title="P+ mixing: the split layer k", live=live)


def importance_frame(alpha: float, T: int = 1000, n: int = 20000, seed: int = 0):
    """The density f(t) for ``alpha`` and a histogram of ``n`` seeded draws (cheap)."""
    import matplotlib.pyplot as plt
    import torch

    from ..personalization.reversion import importance_weights, sample_timesteps

    f = importance_weights(T, alpha, normalize=True).numpy()
    t = sample_timesteps(n, T, alpha, torch.Generator().manual_seed(seed)).numpy()
    fig, ax = plt.subplots(figsize=(4.2, 2.4))
    ax.hist(t, bins=40, density=True, alpha=0.5, label=f"{n} draws")
    ax.plot(np.arange(T), f, "k", label="f(t) / Σf")
    ax.set_xlabel("t"); ax.set_ylim(0, 2.1 / T)
    ax.set_title(f"α = {alpha:g}: mean t = {t.mean():.0f}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def importance_explorer(alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                        live: bool | None = None):
    """A slider over ReVersion's α (eq 4.11)."""
    return explorer(lambda alpha: importance_frame(alpha), {"alpha": list(alphas)},
                    title="ReVersion: relation-focal sampling of t", live=live)
