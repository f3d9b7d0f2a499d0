"""The GAN explorer: style mixing's crossover layer and the truncation ψ.

Built on :func:`diffnotes.widgets.explorer` (live sliders in a kernel, a static twin with every
frame precomputed on the website). A frame shows, for a few pairs of codes (w_A, w_B) of the
shipped StyleGAN-like generator (``diffnotes.personalization.gan``), the image of w_A, the mix
(layers below the crossover from w_A, the rest from w_B; StyleGAN §3.1) and w_B, all truncated
towards the mean code with ψ (StyleGAN §3; w' = w̄ + ψ (w − w̄)).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..utils import check_range
from ._core import explorer

__all__ = ["gan_explorer", "gan_frame"]


@torch.no_grad()
def gan_frame(G, wa: torch.Tensor, wb: torch.Tensor, crossover: int, psi: float):
    """One frame: rows = pairs, columns = (w_A, mix at ``crossover``, w_B). Returns the figure."""
    import matplotlib.pyplot as plt

    from ..personalization import gan

    L = G.num_layers
    ta, tb = gan.truncate(wa, G.w_avg, psi), gan.truncate(wb, G.w_avg, psi)
    cols = [gan.generate(G, ta), G.synthesis(gan.mix_styles(ta, tb, crossover, L)),
            gan.generate(G, tb)]
    ims = [gan.to_hwc(c) for c in cols]
    n = wa.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(4.2, 1.45 * n), squeeze=False)
    titles = ("w_A", f"layers < {crossover} from A", "w_B")
    for i in range(n):
        for j in range(3):
            axes[i, j].imshow(ims[j][i], interpolation="nearest")
            axes[i, j].set_xticks([]); axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=7)
    fig.suptitle(f"style mixing, crossover {crossover} of {L}; truncation ψ = {psi:g}",
                 fontsize=8)
    fig.tight_layout()
    return fig


def gan_explorer(G, wa: torch.Tensor, wb: torch.Tensor,
                 crossovers: Sequence[int] = (0, 2, 4, 6, 8), psis: Sequence[float] = (1.0, 0.5),
                 title: str = "StyleGAN: style mixing and truncation", live: bool | None = None):
    """Sliders over the crossover layer (0 … G.num_layers) and ψ for the code pairs
    ``wa``, ``wb`` (B, w_dim). Raises ``ValueError`` for a crossover outside [0, L], a ψ outside
    [0, 1.5] or codes of different or wrong shapes."""
    L = G.num_layers
    crossovers = [int(c) for c in crossovers]
    for c in crossovers:
        if not 0 <= c <= L:
            raise ValueError(f"crossovers must lie in [0, {L}], got {c}")
    psis = [check_range(p, "psis", 0, 1.5) for p in psis]
    if wa.ndim != 2 or wa.shape != wb.shape or wa.shape[1] != G.cfg.w_dim:
        raise ValueError(f"wa and wb must both be (B, {G.cfg.w_dim}), got {tuple(wa.shape)} "
                         f"and {tuple(wb.shape)}")

    def frame(crossover, psi):
        return gan_frame(G, wa, wb, crossover, psi)

    return explorer(frame, {"crossover": crossovers, "psi": psis}, title=title, live=live)
