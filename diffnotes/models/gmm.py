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

__all__ = ["GaussianMixture", "GaussianMixturePosterior"]


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

    # ------------------------------------------------------------------ exact posteriors
    def posterior(self, y, A, sigma_y=0.0) -> "GaussianMixturePosterior":
        """The exact posterior p(x | y) for y = A x + σ_y n, n ~ N(0, I) (Zhu's slides, "sampling from
        the posterior": p(x | y) ∝ p(y | x) p(x); Bishop 2006, eqs 2.113–2.117, per component).

        Each component stays Gaussian and the posterior is again a mixture, in closed form:

            S_c = A Σ_c Aᵀ + σ_y² I,   K_c = Σ_c Aᵀ S_c⁻¹,
            w_c ∝ π_c N(y; A μ_c, S_c),   μ_c|y = μ_c + K_c (y − A μ_c),   Σ_c|y = Σ_c − K_c A Σ_c.

        ``A``: a dense (m, D) tensor, a per-row (B, m, D) tensor, or an
        :class:`~diffnotes.restoration.operators.Operator` on (B, D) (or whose ``x_shape`` has D
        entries). ``y``: (m,) or (B, m) (or (B, *y_shape) for an operator). σ_y = 0 is allowed: A is
        first reduced to its row space (A = U diag(s) Vᵀ, y ← Uᵀ y restricted to s > 0), which
        changes no posterior (the dropped part of y carries no information on x, or, with σ_y = 0,
        must be 0 for y to be possible at all) and makes S_c invertible.
        Returns a :class:`GaussianMixturePosterior` with one mixture per row of y.
        """
        from ..utils import check_positive
        sigma_y = check_positive(sigma_y, "sigma_y", allow_zero=True)
        M = A
        if hasattr(A, "matrix") and hasattr(A, "x_shape"):
            if math.prod(A.x_shape) != self.D:
                raise ValueError(f"A acts on x of shape {A.x_shape}, but the mixture has D={self.D}")
            M = A.matrix(torch.float64)
            check_tensor(y, "y")
            y = y.reshape(-1, A.m) if y.ndim > 1 and tuple(y.shape[1:]) == A.y_shape \
                else y.reshape(-1) if tuple(y.shape) == A.y_shape else y
        check_tensor(M, "A", ndim=(2, 3))
        check_tensor(y, "y", ndim=(1, 2))
        if M.shape[-1] != self.D:
            raise ValueError(f"A must have shape (m, {self.D}) or (B, m, {self.D}), got "
                             f"{tuple(M.shape)}")
        if y.shape[-1] != M.shape[-2]:
            raise ValueError(f"y must have shape (m,) or (B, m) with m = {M.shape[-2]} (A's rows), "
                             f"got {tuple(y.shape)}")
        single = y.ndim == 1 and M.ndim == 2
        M = M.to(torch.float64)
        M = M[None] if M.ndim == 2 else M
        y = y.to(torch.float64)
        y = y[None] if y.ndim == 1 else y
        if M.shape[0] not in (1, y.shape[0]) and y.shape[0] != 1:
            raise ValueError(f"A's batch {M.shape[0]} and y's batch {y.shape[0]} do not match")
        B = max(M.shape[0], y.shape[0])
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)            # (Ba, m, k), (Ba, k), (Ba, k, D)
        tol = max(M.shape[-2:]) * torch.finfo(torch.float64).eps * s.amax(-1, keepdim=True)
        keep = s > tol
        Ar = ((s * keep)[..., None] * Vh).expand(B, -1, -1)                      # (B, k, D)
        yr = torch.einsum("bmk,bm->bk", U.expand(B, -1, -1), y.expand(B, -1)) * keep   # (B, k)
        tau = torch.where(keep, torch.full_like(s, sigma_y ** 2), torch.ones_like(s)).expand(B, -1)
        d = self.stds ** 2                                                     # (K, D): Σ_c diagonals
        ArD = Ar[:, None] * d[None, :, None, :]                                # (B, K, k, D) = A Σ_c
        S = ArD @ Ar[:, None].transpose(-1, -2) + torch.diag_embed(tau)[:, None]  # S_c (B, K, k, k)
        L = torch.linalg.cholesky(S)
        resid = yr[:, None] - torch.einsum("bkd,cd->bck", Ar, self.means)        # y − A μ_c
        sol = torch.cholesky_solve(resid[..., None], L)[..., 0]                 # S_c⁻¹ (y − A μ_c)
        k = Ar.shape[1]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        loglik = -0.5 * ((resid * sol).sum(-1) + logdet + k * math.log(2 * math.pi))
        logw = loglik + self.weights.log()
        weights = torch.softmax(logw, dim=-1)                                  # w_c ∝ π_c N(y; Aμ_c, S_c)
        means = self.means[None] + torch.einsum("bckd,bck->bcd", ArD, sol)     # μ_c + Σ_c Aᵀ S_c⁻¹ r
        gain_T = torch.cholesky_solve(ArD, L)                                  # S_c⁻¹ A Σ_c (B, K, k, D)
        covs = torch.diag_embed(d)[None] - ArD.transpose(-1, -2) @ gain_T      # Σ_c − Σ_c Aᵀ S_c⁻¹ A Σ_c
        covs = (covs + covs.transpose(-1, -2)) / 2
        post = GaussianMixturePosterior(weights, means, covs, single=single)
        post._matheron = dict(prior=self, Ar=Ar, yr=yr, tau=tau, L=L, ArD=ArD)
        post.log_evidence = torch.logsumexp(logw, -1) if not single else torch.logsumexp(logw, -1)[0]
        return post

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


class GaussianMixturePosterior:
    """A Gaussian mixture with full covariances, one per measurement row (the output of
    :meth:`GaussianMixture.posterior`).

    ``weights`` (B, K), ``means`` (B, K, D), ``covariances`` (B, K, D, D); with an unbatched y
    the leading B is dropped from what :meth:`mean`, :meth:`cov` and :meth:`sample` return
    (the attributes keep it)."""

    def __init__(self, weights, means, covariances, single=False):
        self.weights, self.means, self.covariances = weights, means, covariances
        self.single = single
        self._matheron = None

    @property
    def K(self) -> int:
        return self.weights.shape[-1]

    @property
    def D(self) -> int:
        return self.means.shape[-1]

    def _out(self, v):
        return v[0] if self.single else v

    def mean(self) -> torch.Tensor:
        """E[x | y] = Σ_c w_c μ_c: (B, D), or (D,)."""
        return self._out((self.weights[..., None] * self.means).sum(-2))

    def cov(self) -> torch.Tensor:
        """Cov[x | y] = Σ_c w_c (Σ_c + μ_c μ_cᵀ) − m mᵀ (the law of total covariance): (B, D, D)."""
        w = self.weights[..., None, None]
        m = (self.weights[..., None] * self.means).sum(-2)
        second = (w * (self.covariances + self.means[..., :, None] * self.means[..., None, :])).sum(-3)
        c = second - m[..., :, None] * m[..., None, :]
        return self._out((c + c.transpose(-1, -2)) / 2)

    def log_prob(self, x) -> torch.Tensor:
        """log p(x | y) for x of shape (B, N, D) (or (N, D) when unbatched); degenerate
        (σ_y = 0) posteriors have no density and are refused."""
        x = x[None] if self.single else x
        L = torch.linalg.cholesky(self.covariances)                          # (B, K, D, D)
        diff = x[:, :, None, :] - self.means[:, None]                         # (B, N, K, D)
        z = torch.linalg.solve_triangular(L[:, None], diff[..., None], upper=False)[..., 0]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)   # (B, K)
        ll = -0.5 * ((z ** 2).sum(-1) + logdet[:, None] + self.D * math.log(2 * math.pi))
        return self._out(torch.logsumexp(ll + self.weights.log()[:, None], -1))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws per row: (B, n, D), or (n, D) for an unbatched y.

        By Gaussian conditioning on a prior draw ("Matheron's rule"): pick c ~ w, draw
        x ~ N(μ_c, Σ_c) and ε ~ N(0, I), and return x + Σ_c Aᵀ S_c⁻¹ (y − A x − σ_y ε), which has
        exactly the law N(μ_c|y, Σ_c|y), also when Σ_c|y is singular (σ_y = 0)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        B = self.weights.shape[0]
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (B, n)
        z = torch.randn(B, n, self.D, generator=generator, dtype=torch.float64)
        if self._matheron is None:                       # plain mixture: eigen square roots
            evals, evecs = torch.linalg.eigh(self.covariances)
            root = evecs * evals.clamp_min(0).sqrt()[..., None, :]
            bi = torch.arange(B)[:, None]
            x = self.means[bi, labels] + (root[bi, labels] @ z[..., None])[..., 0]
            return self._out(x)
        p = self._matheron
        prior = p["prior"]
        x0 = prior.means[labels] + prior.stds[labels] * z                    # x ~ N(μ_c, Σ_c)
        k = p["Ar"].shape[1]
        eps = torch.randn(B, n, k, generator=generator, dtype=torch.float64)
        r = p["yr"][:, None] - torch.einsum("bkd,bnd->bnk", p["Ar"], x0) - p["tau"].sqrt()[:, None] * eps
        bi = torch.arange(B)[:, None]
        Lc = p["L"][bi, labels]                                              # (B, n, k, k)
        sol = torch.cholesky_solve(r[..., None], Lc)[..., 0]
        x = x0 + torch.einsum("bnkd,bnk->bnd", p["ArD"][bi, labels], sol)
        return self._out(x)
