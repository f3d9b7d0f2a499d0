"""The noise-level explorer of the closed-form restoration chapter: σ_y against each solver's PSNR.

Built on :func:`diffnotes.widgets.explorer` (live slider in a kernel, a static twin with every
frame precomputed on the website). :func:`noise_level_sweep` runs every method of
:data:`diffnotes.restoration.linear.EVAL_CONFIGS` (and the A†y baseline) once per noise level
on the same images, operator, measurement noise and initial noise; each frame shows, for one
σ_y, the first image restored by each method and the PSNR of all methods against σ_y with the
current level marked.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..utils import check_tensor
from ._core import explorer

__all__ = ["noise_level_sweep", "noise_level_frame", "noise_level_explorer"]

METHODS = ("ddrm", "ddnm", "ddnm_plus", "diffpir", "dmps")


def noise_level_sweep(eps_model, alphas_cumprod, x: torch.Tensor, operator,
                      sigmas: Sequence[float] = (0.0, 0.05, 0.1, 0.2),
                      methods: Sequence[str] = METHODS, steps: int = 10, seed: int = 0) -> dict:
    """Restore ``x`` (B, 3, H, W) in [-1, 1] through ``operator`` at every σ_y of ``sigmas``
    with every method (``steps`` steps each; DDNM+ without time travel), plus x̂ = A†y.

    The measurement noise n and the initial x_T are the same at every level (y = A x + σ_y n),
    so only σ_y changes between frames. Returns ``dict(sigmas, methods, images={(m, σ): x̂},
    psnr={m: [mean PSNR per σ]}, y={σ: y})``."""
    from ..restoration import linear as L
    from ..restoration.evaluate import psnr_ssim

    check_tensor(x, "x", ndim=4)
    unknown = [m for m in methods if m not in L.EVAL_CONFIGS]
    if unknown:
        raise ValueError(f"methods must be among {tuple(L.EVAL_CONFIGS)}, got {unknown}")
    g = torch.Generator().manual_seed(seed)
    clean = operator.A(x)
    n = torch.randn(clean.shape, generator=g, dtype=x.dtype)
    x_T = torch.randn(x.shape, generator=g, dtype=x.dtype)
    ts = list(range(0, len(alphas_cumprod), len(alphas_cumprod) // steps))[:steps][::-1]
    images, psnr, ys = {}, {m: [] for m in ("pinv", *methods)}, {}
    for s in sigmas:
        y = clean + float(s) * n
        ys[s] = y
        images[("pinv", s)] = operator.A_pinv(y)
        psnr["pinv"].append(float(psnr_ssim(images[("pinv", s)], x)[0].mean()))
        for m in methods:
            cfg = L.EVAL_CONFIGS[m]
            kw = dict(cfg["kwargs"])
            kw.pop("travel_length", None)
            out = cfg["fn"](eps_model, operator, y, float(s), alphas_cumprod=alphas_cumprod,
                            timesteps=ts, x_T=x_T, generator=torch.Generator().manual_seed(seed + 1),
                            progress=False, **kw)
            images[(m, s)] = out
            psnr[m].append(float(psnr_ssim(out, x)[0].mean()))
    return dict(sigmas=list(sigmas), methods=["pinv", *methods], images=images, psnr=psnr, y=ys,
                x=x)


def _show(t):
    return ((t.detach().double().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def noise_level_frame(sweep: dict, sigma_y: float):
    """One frame (a matplotlib figure): the truth, the restorations of the first image at
    ``sigma_y``, and the mean PSNR of every method against σ_y."""
    import matplotlib.pyplot as plt

    methods = sweep["methods"]
    fig = plt.figure(figsize=(1.15 * (len(methods) + 1) + 2.8, 1.9))
    k = len(methods) + 1
    gs = fig.add_gridspec(1, k + 2)
    ax = fig.add_subplot(gs[0, 0])
    ax.imshow(_show(sweep["x"][0]))
    ax.set_title("truth", fontsize=7)
    ax.axis("off")
    i = sweep["sigmas"].index(sigma_y)
    for j, m in enumerate(methods):
        ax = fig.add_subplot(gs[0, j + 1])
        ax.imshow(_show(sweep["images"][(m, sigma_y)][0]))
        ax.set_title(f"{'A†y' if m == 'pinv' else m}\n{sweep['psnr'][m][i]:.1f} dB", fontsize=7)
        ax.axis("off")
    ax = fig.add_subplot(gs[0, k:])
    for m in methods:
        ax.plot(sweep["sigmas"], sweep["psnr"][m], marker="o", ms=3,
                label="A†y" if m == "pinv" else m, ls="--" if m == "pinv" else "-")
    ax.axvline(sigma_y, color="k", lw=0.8)
    ax.set_xlabel("σ_y", fontsize=7)
    ax.set_ylabel("PSNR (dB)", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=5, loc="upper right")
    fig.tight_layout()
    return fig


def noise_level_explorer(eps_model=None, alphas_cumprod=None, x=None, operator=None,
                         sigmas: Sequence[float] = (0.0, 0.05, 0.1, 0.2),
                         methods: Sequence[str] = METHODS, steps: int = 10, seed: int = 0,
                         sweep: dict | None = None, live: bool | None = None):
    """Slider over σ_y; each frame from :func:`noise_level_frame`. Pass a precomputed ``sweep``
    (from :func:`noise_level_sweep`) or the arguments to compute one."""
    if sweep is None:
        if eps_model is None or alphas_cumprod is None or x is None or operator is None:
            raise ValueError("pass sweep=, or eps_model, alphas_cumprod, x and operator")
        sweep = noise_level_sweep(eps_model, alphas_cumprod, x, operator, sigmas, methods, steps,
                                  seed)
    return explorer(lambda sigma_y: noise_level_frame(sweep, sigma_y),
                    {"sigma_y": sweep["sigmas"]},
                    title=f"σ_y against PSNR ({operator.name if operator is not None else ''})",
                    live=live)
