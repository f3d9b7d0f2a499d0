"""Checkers for the chapter "Before diffusion: personalizing GANs".

* ``"gan_adain"``: ``fn(x, scale, bias) -> y``: StyleGAN's AdaIN (StyleGAN eq 1): instance norm
  per sample and channel over (H, W) (biased variance, eps 1e-8 inside the square root), then
  the style's scale and bias. x (B, C, H, W), scale and bias (B, C). Library:
  ``diffnotes.personalization.gan.adain``.
* ``"gan_ewc_penalty"``: ``fn(theta, theta_star, fisher, lam) -> float tensor``: the EWC
  penalty of Li et al. 2020 eq 3, λ Σ_i F_i (θ_i − θ*_i)², for flat float64 vectors.
  Library: ``diffnotes.personalization.gan.ewc_penalty`` (on a module's parameters).
* ``"gan_w_plus"``: ``fn(w, num_layers) -> ws``: W → W+, (B, w_dim) → (B, L, w_dim) with every
  row equal to w. Library: ``diffnotes.personalization.gan.broadcast_w``.
"""
from __future__ import annotations

import torch

from . import register


def _adain_ref(x, scale, bias):
    from ..personalization.gan import adain
    return adain(x, scale, bias)


def _adain_inputs(g):
    B, C = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    H = int(torch.randint(2, 7, (1,), generator=g))
    # channels with different means and spreads, so that normalising over C as well (layer
    # norm, "AdaLN") gives a visibly different answer
    x = (torch.randn(B, C, H, H, generator=g, dtype=torch.float64)
         * (0.5 + 3 * torch.rand(1, C, 1, 1, generator=g, dtype=torch.float64))
         + 4 * torch.randn(1, C, 1, 1, generator=g, dtype=torch.float64))
    return dict(x=x, scale=torch.randn(B, C, generator=g, dtype=torch.float64),
                bias=torch.randn(B, C, generator=g, dtype=torch.float64))


def _ewc_ref(theta, theta_star, fisher, lam):
    return lam * (fisher * (theta - theta_star) ** 2).sum()


def _ewc_inputs(g):
    n = int(torch.randint(3, 20, (1,), generator=g))
    f = torch.rand(n, generator=g, dtype=torch.float64)
    f[torch.rand(n, generator=g) < 0.3] = 0.0
    return dict(theta=torch.randn(n, generator=g, dtype=torch.float64),
                theta_star=torch.randn(n, generator=g, dtype=torch.float64), fisher=f,
                lam=float(torch.rand(1, generator=g)) * 10)


def _wplus_ref(w, num_layers):
    from ..personalization.gan import broadcast_w
    return broadcast_w(w, num_layers).clone()


def _wplus_inputs(g):
    B, d = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
    return dict(w=torch.randn(B, d, generator=g, dtype=torch.float64),
                num_layers=int(torch.randint(1, 9, (1,), generator=g)))


register("gan_adain", _adain_ref, _adain_inputs, rtol=1e-9, atol=1e-10,
         doc="StyleGAN's AdaIN: instance norm per channel, then the style's scale and bias")
register("gan_ewc_penalty", _ewc_ref, _ewc_inputs, rtol=1e-12, atol=1e-12,
         doc="the EWC penalty lam * sum F_i (theta_i - theta*_i)^2")
register("gan_w_plus", _wplus_ref, _wplus_inputs, rtol=0, atol=0,
         doc="W to W+: every layer's style the same w")
