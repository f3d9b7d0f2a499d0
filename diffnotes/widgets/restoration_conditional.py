"""The CCDF explorer: the starting time t₀ against PSNR, with and without the data step.

Built on :func:`diffnotes.widgets.explorer` (live slider in a kernel, a static twin with every
frame precomputed on the website). Every t₀ is run once, up front
(:func:`ccdf_sweep`): :func:`diffnotes.restoration.conditional.ccdf` and its no-data-step special
case :func:`~diffnotes.restoration.conditional.sdedit_restore` (SDEdit) from the same initial
estimate A⁺y and the same noise. A frame shows the truth, A⁺y, the CCDF and SDEdit restorations
at the chosen t₀, and PSNR(t₀) of both with the model calls (NFE) on a second axis.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..utils import check_range, check_tensor
from ._core import explorer

__all__ = ["ccdf_explorer", "ccdf_sweep", "psnr"]


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [−1, 1] images compared on [0, 1] (peak 1)."""
    mse = ((x_hat.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return -10 * torch.log10(mse)


def ccdf_sweep(eps_model, operator, x: torch.Tensor, y: torch.Tensor, alphas_cumprod,
               strengths: Sequence[float], sigma_y: float = 0.0, steps: int = 50,
               seed: int = 0, clip_sample: bool = False) -> dict:
    """CCDF and SDEdit at every strength s (t₀ = ⌈s·T⌉ − 1) on images ``x`` (B, 3, H, W) in
    [−1, 1] with measurement ``y``, on a ``steps``-step grid (NFE ≈ s·steps + 1), the same noise
    for all (``clip_sample``: x̂₀ clipped to [−1, 1]): ``dict(strengths, ccdf={s: x̂},
    sdedit={s: x̂}, psnr_ccdf, psnr_sdedit, nfe,
    psnr_pinv)`` (PSNRs are batch means)."""
    from ..restoration.conditional import ccdf, ccdf_timesteps, sdedit_restore
    from ..restoration.posterior import default_timesteps
    from ..editing.sdedit import strength_timestep

    x = check_tensor(x, "x", ndim=4)
    strengths = [check_range(s, "strengths", 0.0, 1.0, lo_open=True) for s in strengths]
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    grid = default_timesteps(len(ac), steps)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    out = dict(strengths=list(strengths), ccdf={}, sdedit={}, psnr_ccdf=[], psnr_sdedit=[],
               nfe=[], psnr_pinv=float(psnr(operator.A_pinv(y), x).mean()))
    for s in strengths:
        kw = dict(alphas_cumprod=ac, timesteps=grid, x_T=noise, strength=s, progress=False,
                  clip_sample=clip_sample)
        a = ccdf(eps_model, operator, y, sigma_y, generator=torch.Generator().manual_seed(seed + 1),
                 **kw).detach().clamp(-1, 1)
        b = sdedit_restore(eps_model, operator, y, sigma_y,
                           generator=torch.Generator().manual_seed(seed + 1), **kw)
        b = b.detach().clamp(-1, 1)
        out["ccdf"][s], out["sdedit"][s] = a, b
        out["psnr_ccdf"].append(float(psnr(a, x).mean()))
        out["psnr_sdedit"].append(float(psnr(b, x).mean()))
        out["nfe"].append(len(ccdf_timesteps(len(ac), strength_timestep(s, len(ac)), grid)))
    return out


def _row(ax_row, images, label):
    for ax, im in zip(ax_row, images):
        ax.imshow(((im.double().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy(),
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    ax_row[0].set_ylabel(label, fontsize=8)


def ccdf_explorer(eps_model, operator, x: torch.Tensor, y: torch.Tensor, alphas_cumprod,
                  strengths: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
                  sigma_y: float = 0.0, steps: int = 50, seed: int = 0, sweep: dict | None = None,
                  title: str = "CCDF: the starting time t₀", live: bool | None = None):
    """A slider over CCDF's strength t₀/T (``strengths``, one frame each) on the images ``x``
    (B ≤ 6 shown) with measurement ``y`` through ``operator``. ``sweep``: a precomputed
    :func:`ccdf_sweep` (then nothing is run here). Raises ``ValueError`` for a strength outside
    (0, 1] or images of the wrong rank."""
    import matplotlib.pyplot as plt

    if sweep is None:
        sweep = ccdf_sweep(eps_model, operator, x, y, alphas_cumprod, strengths, sigma_y, steps,
                           seed)
    strengths = sweep["strengths"]
    B = min(x.shape[0], 6)
    pinv = operator.A_pinv(y)[:B]

    def frame(strength):
        fig = plt.figure(figsize=(1.1 * B + 3.6, 4.6))
        gs = fig.add_gridspec(4, B + 3)
        rows = [(x[:B], "truth"), (pinv, "A⁺y"), (sweep["ccdf"][strength][:B], "CCDF"),
                (sweep["sdedit"][strength][:B], "SDEdit")]
        for r, (ims, label) in enumerate(rows):
            _row([fig.add_subplot(gs[r, c]) for c in range(B)], ims, label)
        ax = fig.add_subplot(gs[:, B:])
        ax.plot(strengths, sweep["psnr_ccdf"], "o-", label="CCDF")
        ax.plot(strengths, sweep["psnr_sdedit"], "s--", label="SDEdit (no data step)")
        ax.axhline(sweep["psnr_pinv"], color="gray", lw=1, label="A⁺y")
        ax.axvline(strength, color="k", lw=0.8)
        ax.set_xlabel("t₀ / T")
        ax.set_ylabel("PSNR (dB)")
        ax.legend(fontsize=7)
        i = strengths.index(strength)
        ax.set_title(f"t₀/T = {strength:g}: {sweep['nfe'][i]} model calls", fontsize=9)
        fig.tight_layout()
        return fig

    return explorer(frame, {"strength": strengths}, title=title, live=live)
