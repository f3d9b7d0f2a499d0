"""An analytic Gaussian mixture: exact noised densities, scores, ε* and class posteriors.

Data x_0 ~ Σ_c π_c N(μ_c, diag(s_c²)). Under the forward kernel (Ahmad's notes, eq 1.3) each component
stays Gaussian: x_t | c ~ N(√ᾱ_t μ_c, diag(v_c)), v_c = ᾱ_t s_c² + 1 − ᾱ_t. Hence, exactly,

    ∇ log p_t(x | c) = −(x − √ᾱ_t μ_c) / v_c,    ε*_c(x, t) = −√(1−ᾱ_t) ∇ log p_t(x | c)  (Zhu's slides,
                                                   "SDE-based Generative Models: DDPM and SDE point of views"),
    p_t(c | x) ∝ π_c N(x; √ᾱ_t μ_c, v_c),        ∇ log p_t(x) = Σ_c p_t(c | x) ∇ log p_t(x | c).

No training: every sampler and guidance rule can be tested against exact answers.
"""
from __future__ import annotations

import math

import torch

from ..utils import check_tensor, check_timestep

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """A K-component mixture in D dimensions with diagonal covariances.

    Args:
        means: (K, D).
        stds: a float, (K,) or (K, D) standard deviations (positive).
        weights: (K,) mixture weights (positive; normalised here). Default uniform.
        alphas_cumprod: the schedule that gives ``t`` its meaning in :meth:`eps_model`.
    All computation is in float64.
    """

    def __init__(self, means, stds=0.1, weights=None, alphas_cumprod=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}")
        K, D = self.means.shape
        s = torch.as_tensor(stds, dtype=torch.float64)
        if s.ndim == 0:
            s = s.expand(K)
        if s.ndim == 1:
            if s.shape[0] != K:
                raise ValueError(f"stds must have K={K} entries, got shape {tuple(s.shape)}")
            s = s[:, None].expand(K, D)
        if tuple(s.shape) != (K, D) or not bool((s > 0).all()):
            raise ValueError(f"stds must be positive with shape (), ({K},) or ({K}, {D}), "
                             f"got shape {tuple(s.shape)}")
        self.stds = s.clone()
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if tuple(w.shape) != (K,) or not bool((w > 0).all()):
            raise ValueError(f"weights must be {K} positive numbers, got {w.tolist()}")
        self.weights = w / w.sum()
        self.alphas_cumprod = None if alphas_cumprod is None else \
            torch.as_tensor(alphas_cumprod, dtype=torch.float64)

    @property
    def K(self) -> int:
        return self.means.shape[0]

    @property
    def D(self) -> int:
        return self.means.shape[1]

    # ------------------------------------------------------------------ the noised mixture
    def _alpha_bar(self, t, x: torch.Tensor) -> torch.Tensor:
        """ᾱ for index ``t`` (int or (B,) tensor), shaped (B, 1); a float in (0, 1] is taken as ᾱ."""
        if isinstance(t, float):
            if not 0 < t <= 1:
                raise ValueError(f"a float t is taken as alpha_bar and must lie in (0, 1], got {t}")
            return torch.full((x.shape[0], 1), t, dtype=torch.float64)
        if self.alphas_cumprod is None:
            raise ValueError("this mixture has no alphas_cumprod; pass one to the constructor "
                             "or give t as a float alpha_bar")
        t = check_timestep(t, len(self.alphas_cumprod))
        a = self.alphas_cumprod[t]
        return a.reshape(-1, 1).expand(x.shape[0], 1) if isinstance(a, torch.Tensor) else a

    def _check_x(self, x):
        check_tensor(x, "x", ndim=2)
        if x.shape[1] != self.D:
            raise ValueError(f"x must have shape (B, {self.D}), got {tuple(x.shape)}")
        return x.to(torch.float64)

    def _component_terms(self, x, t):
        """Per-component mean (B, K, D), variance (1|B, K, D) and log-likelihood (B, K) at t."""
        x = self._check_x(x)
        a = self._alpha_bar(t, x)[:, :, None]                     # (B, 1, 1)
        mu = a.sqrt() * self.means[None]                          # (B, K, D)
        var = a * self.stds[None] ** 2 + 1 - a                    # (B, K, D)
        diff = x[:, None, :] - mu
        ll = -0.5 * ((diff ** 2 / var) + torch.log(2 * math.pi * var)).sum(-1)
        return diff, var, ll

    def log_prob(self, x, t, y=None) -> torch.Tensor:
        """log p_t(x), or log p_t(x | y) for a class index ``y`` (int or (B,) tensor)."""
        _, _, ll = self._component_terms(x, t)
        if y is not None:
            return ll.gather(1, self._class_index(y, x)).squeeze(1)
        return torch.logsumexp(ll + self.weights.log(), dim=1)

    def class_posterior(self, x, t) -> torch.Tensor:
        """p_t(c | x) for every class c: shape (B, K)."""
        _, _, ll = self._component_terms(x, t)
        return torch.softmax(ll + self.weights.log(), dim=1)

    def _class_index(self, y, x):
        y = torch.as_tensor(y, dtype=torch.long)
        if y.ndim == 0:
            y = y.expand(x.shape[0])
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.K):
            raise ValueError(f"y must be a class index in [0, {self.K - 1}], got {y.tolist()}")
        return y.reshape(-1, 1)

    def score(self, x, t, y=None) -> torch.Tensor:
        """∇_x log p_t(x) (or ∇ log p_t(x | y)): shape (B, D)."""
        diff, var, ll = self._component_terms(x, t)
        comp = -diff / var                                        # (B, K, D)
        if y is not None:
            idx = self._class_index(y, x)
            return comp.gather(1, idx[:, :, None].expand(-1, 1, self.D)).squeeze(1)
        r = torch.softmax(ll + self.weights.log(), dim=1)
        return (r[:, :, None] * comp).sum(1)

    def grad_log_class_posterior(self, x, t, y) -> torch.Tensor:
        """∇_x log p_t(y | x) = ∇ log p_t(x | y) − ∇ log p_t(x): the exact classifier gradient."""
        return self.score(x, t, y) - self.score(x, t)

    def eps(self, x, t, y=None) -> torch.Tensor:
        """ε*(x, t) = −√(1−ᾱ_t) ∇ log p_t(x): the exact minimiser of the DDPM loss."""
        a = self._alpha_bar(t, self._check_x(x))
        return -(1 - a).sqrt() * self.score(x, t, y)

    def eps_model(self, y=None):
        """An ``eps_model(x, t)`` callable for the library's samplers (class ``y`` bound)."""
        return lambda x, t: self.eps(x, t, y).to(x.dtype)

    # ------------------------------------------------------------------ sampling the data
    def sample(self, n: int, generator: torch.Generator | None = None, y=None,
               return_labels: bool = False):
        """n exact draws from the clean mixture (or from component ``y``)."""
        if y is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            labels = self._class_index(y, torch.empty(n, 1)).reshape(-1)
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.stds[labels] * z
        return (x, labels) if return_labels else x
