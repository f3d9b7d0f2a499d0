"""Explorers for Part II: the noise level σ of a denoising autoencoder, and β of the β-VAE.

Both are built on :func:`diffnotes.widgets.explorer` (live sliders in a kernel, a static twin on
the website) and draw their frames from the measurements of
``python -m diffnotes.representation.eval_representation`` (the trained fields and traversals
are stored there), so a frame costs a plot, not a training run.

- :func:`dae_sigma_explorer`: on the 2-D Gaussian mixture, the DAE's score estimate
  (r(x̃) − x̃)/σ² (arrows) against the exact score of p_σ or of the data itself, for each σ.
- :func:`beta_vae_explorer`: latent traversals of the β-VAE on one-object scenes for each β,
  with MIG / DCI / SAP against the true factors.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import torch

from ._core import explorer

__all__ = ["dae_sigma_explorer", "beta_vae_explorer", "dae_field_figure"]


def dae_field_figure(grid, field, gmm, sigma: float, compare: str = "smoothed score"):
    """One frame: the mixture's density, the DAE field (black) and the exact field (red)."""
    import matplotlib.pyplot as plt

    from ..representation.score import smoothed_score

    lin = torch.as_tensor(grid, dtype=torch.float64)
    gx, gy = torch.meshgrid(lin, lin, indexing="xy")
    G = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    fine = torch.linspace(float(lin[0]), float(lin[-1]), 80, dtype=torch.float64)
    fx, fy = torch.meshgrid(fine, fine, indexing="xy")
    F = torch.stack([fx.reshape(-1), fy.reshape(-1)], 1)
    dens = gmm.log_prob(F, 1.0).exp().reshape(80, 80)
    exact = smoothed_score(gmm, G, sigma if compare == "smoothed score" else 0.0)
    est = torch.as_tensor(np.asarray(field), dtype=torch.float64)

    def unit(v):
        n = v.norm(dim=1, keepdim=True).clamp_min(1e-9)
        return v / n * torch.log1p(n) / np.log1p(n.max().item())

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.contourf(fx.numpy(), fy.numpy(), dens.numpy(), levels=12, cmap="Blues")
    e, u = unit(exact), unit(est)
    ax.quiver(G[:, 0], G[:, 1], e[:, 0], e[:, 1], color="tab:red", scale=14, width=0.006,
              label=f"exact ∇log p{'_σ' if compare == 'smoothed score' else ''}")
    ax.quiver(G[:, 0], G[:, 1], u[:, 0], u[:, 1], color="k", scale=14, width=0.004,
              label="DAE (r(x̃)−x̃)/σ²")
    ax.set_title(f"σ = {sigma:g}")
    ax.legend(loc="lower left", fontsize=7)
    ax.set_xticks([]), ax.set_yticks([])
    return fig


def dae_sigma_explorer(results: dict | None = None, live: bool | None = None):
    """σ slider (the DAEs stored by the ``dae`` section) × what to compare with: the exact score
    of the smoothed density p_σ (which the optimal DAE matches at every σ) or of the data p
    (which it approaches as σ → 0)."""
    from ..representation.eval_representation import load_results, mixture

    res = load_results("dae") if results is None else results
    gmm = mixture()
    sigmas = [float(s) for s in res["sigmas"]]

    def frame(sigma, compare):
        return dae_field_figure(res["grid"], res["results"][str(sigma)]["field"], gmm, sigma, compare)

    return explorer(frame, {"sigma": sigmas, "compare": ["smoothed score", "data score"]},
                    title="Denoising autoencoder vs the exact score", live=live, dpi=60)


def beta_vae_explorer(results: dict | None = None, live: bool | None = None, scale: int = 2):
    """β slider: the stored traversal grid of each β-VAE (rows: latent units by decreasing
    variance; columns: the unit set to −2.5 … 2.5 with the others at a test scene's code)."""
    from PIL import Image, ImageDraw

    from ..representation.eval_representation import load_results

    res = load_results("betavae") if results is None else results
    betas = [float(b) for b in res["betas"]]

    def frame(beta):
        r = res["results"][str(beta)]
        im = Image.open(io.BytesIO(base64.b64decode(r["traversal_png"]))).convert("L")
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        top = 28
        out = Image.new("L", (im.width, im.height + top), 255)
        out.paste(im, (0, top))
        d = ImageDraw.Draw(out)
        d.text((2, 1), f"beta={beta:g}  MIG {r['mig']:.2f}  SAP {r['sap']:.2f}", fill=0)
        d.text((2, 14), f"DCI-D {r['dci']['disentanglement']:.2f}  active units {r['active_units']}", fill=0)
        return out

    return explorer(frame, {"beta": betas}, title="β-VAE latent traversals", live=live)
