"""The DDIM explorer: η (stochasticity) and the number of steps, on one fixed x_T.

Built on :func:`diffnotes.widgets.explorer`: live sliders in a kernel, a static twin (every
frame precomputed) on the website.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..ddim import ddim_sample
from ..schedules import make_timesteps
from ..utils import check_tensor
from ._core import explorer

__all__ = ["ddim_explorer", "scatter_render", "image_render"]


def scatter_render(reference: torch.Tensor | None = None, lim: float = 2.5,
                   size: float = 3.0) -> Callable:
    """A render function for 2-D samples (N, 2): a scatter plot, ``reference`` in grey behind."""
    def render(x0: torch.Tensor, eta: float, steps: int):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(size, size))
        if reference is not None:
            r = reference.detach().cpu()
            ax.scatter(r[:, 0], r[:, 1], s=2, c="0.8")
        x = x0.detach().cpu().float()
        ax.scatter(x[:, 0], x[:, 1], s=3, c="C0")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[],
               title=f"η = {eta}, {steps} steps")
        ax.set_aspect("equal")
        return fig
    return render


def image_render(nrow: int | None = None, scale: int | None = None) -> Callable:
    """A render function for image batches (B, C, H, W) in [−1, 1]: one grid, upscaled by
    ``scale`` (default: about 64 pixels per image side) with nearest-neighbour pixels."""
    def render(x0: torch.Tensor, eta: float, steps: int):
        from PIL import Image

        from ..utils import image_grid

        k = scale or max(1, 64 // x0.shape[-1])
        grid = image_grid([im for im in x0.detach().cpu().float().clamp(-1, 1)],
                          cols=nrow or min(len(x0), 8), pad=1)
        return grid.resize((grid.width * k, grid.height * k), Image.NEAREST)
    return render


def ddim_explorer(eps_model: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor,
                  etas: Sequence[float] = (0.0, 0.5, 1.0),
                  steps_list: Sequence[int] = (5, 10, 20, 50), render: Callable | None = None,
                  seed: int = 0, spacing: str = "leading", title: str = "DDIM: η and steps",
                  live: bool | None = None):
    """Sliders over η and the number of DDIM steps, sampling from the same ``x_T`` each time.

    Each frame is :func:`diffnotes.ddim.ddim_sample` (Ahmad's notes, eq 1.21) from ``x_T`` along
    ``make_timesteps(steps, T, spacing)``; for η > 0 the noise comes from a generator seeded with
    ``seed``, so frames are reproducible. ``render(x0, eta, steps)`` turns the samples into a
    PIL image / matplotlib figure / HWC array; by default a scatter plot for (N, 2) samples and
    an image grid for (B, C, H, W). At most ~60 frames are sensible for the static twin.

    Raises ``ValueError`` for an η < 0, a step count outside [1, T], or no default render for
    ``x_T``'s shape.
    """
    check_tensor(x_T, "x_T")
    etas, steps_list = list(etas), list(steps_list)
    T = len(alphas_cumprod)
    for e in etas:
        if float(e) < 0:
            raise ValueError(f"etas must be >= 0, got {e}")
    for s in steps_list:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= T:
            raise ValueError(f"steps_list must hold ints in [1, {T}], got {s!r}")
    if render is None:
        if x_T.ndim == 2 and x_T.shape[1] == 2:
            render = scatter_render()
        elif x_T.ndim == 4:
            render = image_render()
        else:
            raise ValueError(f"no default render for x_T of shape {tuple(x_T.shape)}; "
                             "pass render=")

    def frame(eta, steps):
        g = torch.Generator().manual_seed(seed)
        x0 = ddim_sample(eps_model, x_T, make_timesteps(steps, T, spacing), alphas_cumprod,
                         eta=float(eta), generator=g)
        return render(x0, eta, steps)

    return explorer(frame, {"eta": etas, "steps": steps_list}, title=title, live=live)
