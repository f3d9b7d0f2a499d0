"""Denoising autoencoders estimate the score (Vincent 2011; Alain & Bengio 2014).

Corrupt x ∼ p with Gaussian noise, x̃ = x + σε, and let p_σ = p ∗ N(0, σ²I) be the density of x̃.
The denoiser that minimises E‖x − r(x̃)‖² (the corrected eq 2.17 of Ahmad's notes) is the
posterior mean r*(x̃) = E[x | x̃], and Tweedie's formula (Robbins 1956; Miyasawa 1961; Efron 2011)
says, exactly and at every σ,

    r*(x̃) = x̃ + σ² ∇ log p_σ(x̃),    so    (r*(x̃) − x̃) / σ² = ∇ log p_σ(x̃)  →  ∇ log p(x̃)  as σ → 0

(Alain & Bengio 2014, Theorem 1, state the small-σ limit; Vincent 2011, eq 9, the equivalence of
denoising and score matching). In ε-prediction form, ε*(x̃) = (x̃ − r*(x̃)) / σ = −σ ∇ log p_σ(x̃);
in the variance-preserving coordinates of Part I, x_t = √ᾱ_t x̃ with σ² = (1 − ᾱ_t)/ᾱ_t and
ε* = −√(1 − ᾱ_t) ∇ log p_t(x_t) (the same number: :class:`diffnotes.models.gmm.GaussianMixture`'s
``eps``). A diffusion model's ε_θ is a denoising autoencoder at every noise level at once.

On the analytic Gaussian mixture everything is exact: :func:`smoothed_score` (from the mixture
class, no second implementation), :func:`posterior_mean` (the optimal denoiser, computed
directly from the components' posteriors), and the trained :class:`ResidualDenoiser` is compared
with both.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn

from ..ddpm import predict_x0, q_sample
from ..utils import check_callable, check_int, check_positive, check_tensor

__all__ = ["alpha_bar_of_sigma", "sigma_of_alpha_bar", "smoothed_score", "posterior_mean",
           "tweedie_denoiser", "dae_score", "eps_from_score", "score_from_eps", "ResidualDenoiser",
           "train_dae", "denoise_with_eps_model", "relative_error", "empirical_posterior_mean"]


def alpha_bar_of_sigma(sigma: float) -> float:
    """ᾱ with x_t = √ᾱ (x + σε): ᾱ = 1 / (1 + σ²)."""
    sigma = check_positive(sigma, "sigma", allow_zero=True)
    return 1.0 / (1.0 + sigma ** 2)


def sigma_of_alpha_bar(alpha_bar: float) -> float:
    """σ = √((1 − ᾱ)/ᾱ), the noise level of x_t/√ᾱ_t."""
    a = float(alpha_bar)
    if not 0 < a <= 1:
        raise ValueError(f"alpha_bar must lie in (0, 1], got {alpha_bar!r}")
    return math.sqrt((1 - a) / a)


def _sigma(sigma, allow_zero=False) -> float:
    return check_positive(sigma, "sigma", allow_zero=allow_zero)


def smoothed_score(gmm, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """∇ log p_σ(y) for the mixture ``gmm`` smoothed by N(0, σ²I) (σ = 0: the data's own score).

    Uses the mixture's exact VP score: y = x_t/√ᾱ with ᾱ = 1/(1+σ²), so
    ∇_y log p_σ(y) = √ᾱ ∇_{x_t} log p_t(√ᾱ y)."""
    a = alpha_bar_of_sigma(_sigma(sigma, allow_zero=True))
    check_tensor(y, "y", ndim=2)
    y = y.to(torch.float64)
    return math.sqrt(a) * gmm.score(math.sqrt(a) * y, float(a))


def posterior_mean(gmm, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x | x̃ = y] for x ∼ ``gmm``, x̃ = x + σε: the optimal denoiser, from the components.

    Component c: x̃ | c ∼ N(μ_c, s_c² + σ²) and E[x | x̃, c] = μ_c + s_c²/(s_c² + σ²) (x̃ − μ_c);
    the mixture's mean weighs them by p(c | x̃) (computed here directly, not from the score)."""
    sigma = _sigma(sigma)
    check_tensor(y, "y", ndim=2)
    y = y.to(torch.float64)
    mu, s2 = gmm.means[None], gmm.stds[None] ** 2                        # (1, K, D)
    var = s2 + sigma ** 2
    diff = y[:, None, :] - mu
    ll = -0.5 * (diff ** 2 / var + torch.log(2 * math.pi * var)).sum(-1) + gmm.weights.log()
    r = torch.softmax(ll, dim=1)                                          # (B, K)
    comp = mu + s2 / var * diff                                           # (B, K, D)
    return (r[:, :, None] * comp).sum(1)


def tweedie_denoiser(score_fn, sigma: float):
    """r(y) = y + σ² s(y) from a score function ``score_fn(y)``."""
    check_callable(score_fn, "score_fn", "score_fn(y)")
    sigma = _sigma(sigma)
    return lambda y: y + sigma ** 2 * score_fn(y)


def dae_score(denoiser, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """(r(y) − y) / σ²: a denoising autoencoder's estimate of the score (Alain & Bengio 2014,
    Theorem 1). ``denoiser``: a callable r; ``sigma`` > 0 the noise level it was trained at."""
    check_callable(denoiser, "denoiser", "denoiser(y)")
    sigma = _sigma(sigma)
    check_tensor(y, "y")
    return (denoiser(y) - y) / sigma ** 2


def eps_from_score(score: torch.Tensor, sigma: float) -> torch.Tensor:
    """ε* = −σ ∇ log p_σ (the ε-prediction of a denoiser at noise σ; in VP coordinates
    −√(1 − ᾱ_t) ∇ log p_t, Ahmad's notes, eq 1.38's ε; Song et al. 2021)."""
    return -_sigma(sigma) * score


def score_from_eps(eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """∇ log p_σ = −ε / σ, the inverse of :func:`eps_from_score`."""
    return -eps / _sigma(sigma)


class ResidualDenoiser(nn.Module):
    """r(y) = y + MLP(y): a denoising autoencoder for low-dimensional data (the skip connection
    leaves only the correction σ² ∇ log p_σ to learn)."""

    def __init__(self, D: int = 2, hidden: int = 128, layers: int = 3):
        super().__init__()
        sizes = [check_int(D, "D", 1)] + [check_int(hidden, "hidden", 1)] * layers + [D]
        mods: list[nn.Module] = []
        for k in range(len(sizes) - 1):
            mods.append(nn.Linear(sizes[k], sizes[k + 1]))
            if k < len(sizes) - 2:
                mods.append(nn.SiLU())
        self.net = nn.Sequential(*mods)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.net(y)


def train_dae(sample_fn, sigma: float, D: int = 2, steps: int = 2000, batch_size: int = 512,
              lr: float = 2e-3, hidden: int = 128, seed: int = 0, dtype=torch.float32) -> dict:
    """Train a :class:`ResidualDenoiser` with the denoising loss ‖x − r(x + σε)‖² (corrected
    eq 2.17, Gaussian corruption) on fresh draws ``sample_fn(n, generator)`` (N, D).
    Returns ``{"model", "losses", "seconds"}``."""
    check_callable(sample_fn, "sample_fn", "sample_fn(n, generator)")
    sigma = _sigma(sigma)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResidualDenoiser(D, hidden).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    t0 = time.perf_counter()
    for _ in range(check_int(steps, "steps", 1)):
        x = sample_fn(batch_size, g).to(dtype)
        xt = x + sigma * torch.randn(x.shape, generator=g, dtype=dtype)
        # the loss divided by σ² keeps the gradients' scale the same at every σ
        loss = ((model(xt) - x) ** 2).sum(1).mean() / sigma ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return {"model": model, "losses": np.array(losses), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def denoise_with_eps_model(eps_model, x0: torch.Tensor, t: int, alphas_cumprod: torch.Tensor,
                           generator: torch.Generator | None = None) -> dict:
    """A diffusion model as a denoiser at step t: x_t = q_sample(x0, t) (eq 1.3), then
    x̂_0 = predict_x0(x_t, ε_θ(x_t, t)) (eq 1.6) — the posterior mean when ε_θ is optimal.
    Returns ``{"x_t", "x0_hat", "sigma"}`` (σ = √((1−ᾱ_t)/ᾱ_t), the equivalent noise level)."""
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    check_tensor(x0, "x0")
    t = check_int(t, "t", 0)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    tt = torch.full((x0.shape[0],), t, dtype=torch.long)
    x_t = q_sample(x0, tt, alphas_cumprod, noise)
    a = float(alphas_cumprod[t])
    x0_hat = predict_x0(x_t, eps_model(x_t, tt), a)
    return {"x_t": x_t, "x0_hat": x0_hat, "sigma": sigma_of_alpha_bar(a)}


def relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """√(Σ‖estimate − truth‖² / Σ‖truth‖²)."""
    return float(((estimate - truth) ** 2).sum().sqrt() / (truth ** 2).sum().sqrt())


def empirical_posterior_mean(data: torch.Tensor, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """E[x_0 | x_t] when x_0 is uniform over the rows of ``data`` (N, D) and
    x_t = √ᾱ x_0 + √(1−ᾱ) ε: a softmax-weighted mean of the data, the optimal denoiser of the
    training set (what a diffusion model would learn if it memorised it)."""
    check_tensor(data, "data", ndim=2)
    check_tensor(x_t, "x_t", ndim=2)
    a = float(alpha_bar)
    d = data.to(torch.float64)
    logits = -((x_t.to(torch.float64)[:, None, :] - math.sqrt(a) * d[None]) ** 2).sum(-1) / (2 * (1 - a))
    return torch.softmax(logits, 1) @ d
