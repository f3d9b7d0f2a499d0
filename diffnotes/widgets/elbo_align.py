"""The Bayes-rule explorer of ELBO-T2IAlign: when is a pixel given to the wrong word?

Built on :func:`diffnotes.widgets.explorer` (live sliders in a kernel, a precomputed static twin
on the website). Two classes c_1 (the true class of the pixel) and c_2 compete; the sliders set
the prior p(c_1) and the likelihood ratio p(x|c_1)/p(x|c_2), and the frame shows prior,
likelihood and posterior p(c_i|x) (the ELBO-T2IAlign paper, eq 1;
:func:`diffnotes.recognition.elbo_align.bayes_posterior`) with the paper's failure case the
setting falls in (a rare or small class, a confused class, both).
"""
from __future__ import annotations

from typing import Sequence

from ..utils import check_range
from ._core import explorer

__all__ = ["bayes_explorer", "failure_case", "bayes_figure"]


def failure_case(prior1: float, ratio: float) -> str:
    """The paper's case for p(c_1) = ``prior1`` and p(x|c_1)/p(x|c_2) = ``ratio``, or
    "aligned" when p(c_1|x) > 1/2."""
    post = prior1 * ratio / (prior1 * ratio + (1 - prior1))
    if post > 0.5:
        return "aligned"
    if prior1 < 0.5 and ratio >= 1:
        return "case 1: rare or small class"
    if abs(prior1 - 0.5) < 1e-9 and ratio < 1:
        return "case 2: confused / out-of-distribution"
    if prior1 < 0.5 and ratio < 1:
        return "case 3: both"
    return "misaligned"


def bayes_figure(prior1: float, ratio: float, lik2: float = 0.4):
    """A matplotlib figure: prior, likelihood (p(x|c_2) = ``lik2``) and posterior of the two
    classes, the 1/2 line, and the case."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from ..recognition.elbo_align import bayes_posterior

    p1 = check_range(prior1, "prior1", 0, 1, lo_open=True, hi_open=True)
    r = check_range(ratio, "ratio", 0, lo_open=True)
    priors, liks = (p1, 1 - p1), (min(r * lik2, 1.0), lik2)
    post = bayes_posterior(priors, liks)
    fig, ax = plt.subplots(figsize=(4.4, 2.3))
    x = np.arange(3)
    for k, (vals, col) in enumerate(((priors, "#4477aa"), (np.asarray(liks) / sum(liks), "#ccbb44"),
                                     (post, "#ee6677"))):
        ax.bar(x[k] - 0.18, vals[0], 0.34, color=col, edgecolor="k")
        ax.bar(x[k] + 0.18, vals[1], 0.34, color=col, edgecolor="k", hatch="//", alpha=0.7)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xticks(x, ["prior p(c)", "likelihood p(x|c)\n(normalised)", "posterior p(c|x)"])
    ax.set_ylim(0, 1)
    ax.set_title(f"p(c1)={p1:g}, ratio={r:g}: p(c1|x)={post[0]:.3f}  [{failure_case(p1, r)}]",
                 fontsize=8)
    ax.text(0.01, 0.93, "solid: c1 (true class)   hatched: c2", transform=ax.transAxes,
            fontsize=7)
    fig.tight_layout()
    return fig


def bayes_explorer(priors: Sequence[float] = (0.1, 0.3, 0.5, 0.7),
                   ratios: Sequence[float] = (0.5, 0.6, 1.0, 2.5), lik2: float = 0.4,
                   title: str = "Bayes' rule and misalignment (eq 1)", live: bool | None = None):
    """Sliders over p(c_1) and p(x|c_1)/p(x|c_2) (16 frames by default; the defaults hold the
    paper's three cases as in the study notes: (0.1, 2.5), (0.5, 0.5), (0.3, 0.6))."""
    priors = [check_range(p, "priors", 0, 1, lo_open=True, hi_open=True) for p in priors]
    ratios = [check_range(r, "ratios", 0, lo_open=True) for r in ratios]

    def frame(prior, ratio):
        return bayes_figure(prior, ratio, lik2)

    return explorer(frame, {"prior": priors, "ratio": ratios}, title=title, live=live)
