"""The DPS explorer: the step size ζ' against PSNR and measurement consistency.

Built on :func:`diffnotes.widgets.explorer` (live sliders in a kernel, a static twin with every
frame precomputed on the website). Every ζ' is run once, up front, by
:func:`diffnotes.restoration.posterior.dps` from the same x_T and noise, so the frames differ only
in ζ'. A frame shows the true images, the pseudo-inverse A⁺y, the DPS restorations at the chosen
ζ', and the curves PSNR(ζ') and ‖A x̂ − y‖(ζ') with the chosen value marked.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..utils import check_positive, check_tensor
from ._core import explorer

__all__ = ["dps_explorer", "dps_sweep"]


def dps_sweep(eps_model, operator, x: torch.Tensor, y: torch.Tensor, alphas_cumprod,
              zetas: Sequence[float], sigma_y: float = 0.0, steps: int = 50, seed: int = 0,
              clip_x0: float | None = 1.0) -> dict:
    """DPS at every ζ' in ``zetas`` on the images ``x`` (B, 3, H, W) in [−1, 1] with measurement
    ``y``: returns ``dict(zetas, images={ζ': x̂}, psnr=[…], consistency=[…])`` (means over the
    batch; PSNR on [0, 1] images)."""
    from ..restoration.posterior import default_timesteps, dps

    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    ts = default_timesteps(len(ac), steps)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(x.shape, generator=g, dtype=x.dtype)
    out = dict(zetas=list(zetas), images={}, psnr=[], consistency=[])
    for z in zetas:
        xh = dps(eps_model, operator, y, sigma_y, alphas_cumprod=ac, timesteps=ts, x_T=x_T,
                 zeta=z, generator=torch.Generator().manual_seed(seed + 1), progress=False,
                 clip_x0=clip_x0).detach().clamp(-1, 1)
        mse = ((xh - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
        out["images"][z] = xh
        out["psnr"].append(float((-10 * torch.log10(mse)).mean()))
        out["consistency"].append(float((operator.A(xh) - y).flatten(1).norm(dim=1).mean()))
    return out


def dps_explorer(eps_model, operator, x: torch.Tensor, y: torch.Tensor, alphas_cumprod,
                 zetas: Sequence[float] = (0.0, 0.1, 0.3, 1.0, 3.0), sigma_y: float = 0.0,
                 steps: int = 50, seed: int = 0, title: str = "DPS: the step size ζ'",
                 live: bool | None = None, sweep: dict | None = None):
    """A slider over DPS's ζ' (``zetas``, each ≥ 0) on the images ``x`` and measurement ``y``
    of ``operator``. ``sweep`` (from :func:`dps_sweep`) reuses runs already made. Raises
    ``ValueError`` for a negative ζ' or images that are not (B, C, H, W)."""
    import matplotlib.pyplot as plt

    zetas = [check_positive(z, "zetas", allow_zero=True) for z in zetas]
    check_tensor(x, "x", ndim=4)
    res = sweep if sweep is not None else dps_sweep(eps_model, operator, x, y, alphas_cumprod,
                                                    zetas, sigma_y, steps, seed)
    pinv = operator.A_pinv(y).detach().clamp(-1, 1)
    show = lambda v: ((v.double().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()  # noqa: E731
    B = min(4, x.shape[0])

    def frame(zeta):
        fig = plt.figure(figsize=(1.2 * B + 3.6, 3.2))
        gs = fig.add_gridspec(3, B + 2, width_ratios=[1] * B + [0.2, 2.6])
        for r, (row, name) in enumerate(((x, "truth"), (pinv, "A⁺y"),
                                         (res["images"][zeta], f"DPS ζ'={zeta:g}"))):
            for b in range(B):
                ax = fig.add_subplot(gs[r, b])
                ax.imshow(show(row[b]))
                ax.set_xticks([]); ax.set_yticks([])
                if b == 0:
                    ax.set_ylabel(name, fontsize=7)
        ax = fig.add_subplot(gs[:, B + 1])
        zs = [max(z, 1e-2) for z in res["zetas"]]
        ax.semilogx(zs, res["psnr"], "o-", color="C0", label="PSNR (dB)")
        ax.set_xlabel("ζ' (0 drawn at 0.01)", fontsize=7)
        ax.set_ylabel("PSNR (dB)", fontsize=7, color="C0")
        ax2 = ax.twinx()
        ax2.semilogx(zs, res["consistency"], "s--", color="C3")
        ax2.set_ylabel("‖A x̂ − y‖", fontsize=7, color="C3")
        k = res["zetas"].index(zeta)
        ax.axvline(zs[k], color="k", lw=0.8)
        ax.tick_params(labelsize=6); ax2.tick_params(labelsize=6)
        ax.set_title(f"PSNR {res['psnr'][k]:.2f} dB, ‖Ax̂−y‖ {res['consistency'][k]:.3f}",
                     fontsize=7)
        fig.tight_layout()
        return fig

    return explorer(frame, {"zeta": list(res["zetas"])}, title=title, live=live)
