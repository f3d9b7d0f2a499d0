"""Disentangled representations: the β-VAE and three metrics against the true factors.

Ahmad's notes, §2.3, ask that "each latent variable captures one factor of variation". With the
shapes generator the factors are known, so that can be measured:

- :func:`mig` — Mutual Information Gap (Chen et al. 2018, eq 4): for each factor v_k, the gap
  between the two largest I(z_j; v_k), divided by H(v_k); averaged over factors.
- :func:`dci` — Disentanglement, Completeness, Informativeness (Eastwood & Williams 2018): an
  importance matrix R (codes × factors) from regressors predicting each factor from all codes;
  D_j = 1 − H_K(P_j·) per code (weighted by its share of importance), C_k = 1 − H_J(P̃_·k) per
  factor, I = the regressors' accuracy (R² or classification accuracy).
- :func:`sap` — Separated Attribute Predictability (Kumar et al. 2018, §3): a score S_jk of
  predicting factor k from code j alone; for each factor the gap between its two best codes.

A code that is a permutation and rescaling of independent factors scores 1 on all three (up to
the plug-in bias of the histogram MI estimate in MIG); a rotation of it scores less.

- :class:`BetaVAE`, :func:`beta_vae_loss` (Higgins et al. 2017, eq 4: reconstruction + β KL),
  :func:`train_beta_vae`.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn

from ..utils import check_int, check_positive, check_tensor

__all__ = ["discretize", "mutual_info_matrix", "mig", "dci", "sap", "BetaVAE", "beta_vae_loss",
           "train_beta_vae", "encode_means"]


def _arrays(codes, factors, discrete):
    z = np.asarray(codes.detach().cpu() if isinstance(codes, torch.Tensor) else codes, dtype=float)
    v = np.asarray(factors.detach().cpu() if isinstance(factors, torch.Tensor) else factors,
                   dtype=float)
    if z.ndim != 2:
        raise ValueError(f"codes must be (N, J), got shape {z.shape}")
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[0] != z.shape[0]:
        raise ValueError(f"factors must be (N, K) with the codes' N = {z.shape[0]} rows, got "
                         f"shape {v.shape}")
    if not (np.isfinite(z).all() and np.isfinite(v).all()):
        raise ValueError("codes and factors must be finite")
    K = v.shape[1]
    if discrete is None:
        discrete = [bool(np.all(v[:, k] == np.round(v[:, k])) and len(np.unique(v[:, k])) <= 20)
                    for k in range(K)]
    discrete = list(discrete)
    if len(discrete) != K:
        raise ValueError(f"discrete must have one entry per factor ({K}), got {len(discrete)}")
    return z, v, discrete


def discretize(x: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Equal-width histogram bins of each column (Locatello et al. 2019's choice for MIG)."""
    x = np.asarray(x, dtype=float)
    out = np.zeros(x.shape, dtype=np.int64)
    for j in range(x.shape[1]):
        col = x[:, j]
        lo, hi = col.min(), col.max()
        if hi <= lo:
            continue
        out[:, j] = np.minimum(((col - lo) / (hi - lo) * n_bins).astype(np.int64), n_bins - 1)
    return out


def _mi_discrete(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import mutual_info_score

    return float(mutual_info_score(a, b))


def _factor_labels(v, discrete, n_bins):
    return np.stack([np.unique(v[:, k], return_inverse=True)[1] if discrete[k]
                     else discretize(v[:, k:k + 1], n_bins)[:, 0] for k in range(v.shape[1])], 1)


def mutual_info_matrix(codes, factors, n_bins: int = 20, discrete=None) -> np.ndarray:
    """I(z_j; v_k) (J, K) in nats, with codes (and continuous factors) in ``n_bins`` bins."""
    z, v, discrete = _arrays(codes, factors, discrete)
    zb = discretize(z, n_bins)
    vb = _factor_labels(v, discrete, n_bins)
    return np.array([[_mi_discrete(zb[:, j], vb[:, k]) for k in range(v.shape[1])]
                     for j in range(z.shape[1])])


def mig(codes, factors, n_bins: int = 20, discrete=None) -> dict:
    """Mutual Information Gap (Chen et al. 2018, eq 4):
    MIG = (1/K) Σ_k (I(z_{j(1)}; v_k) − I(z_{j(2)}; v_k)) / H(v_k).

    ``codes`` (N, J) (J ≥ 2), ``factors`` (N, K); ``discrete[k]`` says whether factor k is
    categorical (default: integer-valued with ≤ 20 values); continuous factors are binned like
    the codes. Returns ``{"mig", "per_factor" (K,), "mi" (J, K), "entropy" (K,)}``."""
    z, v, discrete = _arrays(codes, factors, discrete)
    if z.shape[1] < 2:
        raise ValueError(f"codes must have at least 2 columns for a gap, got {z.shape[1]}")
    mi = mutual_info_matrix(z, v, n_bins, discrete)
    vb = _factor_labels(v, discrete, n_bins)
    H = np.array([_mi_discrete(vb[:, k], vb[:, k]) for k in range(v.shape[1])])
    top = np.sort(mi, axis=0)[::-1]
    per = (top[0] - top[1]) / np.maximum(H, 1e-12)
    return {"mig": float(per.mean()), "per_factor": per, "mi": mi, "entropy": H}


def _entropy_rows(P: np.ndarray, base: int) -> np.ndarray:
    P = P / np.maximum(P.sum(1, keepdims=True), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(P > 0, P * np.log(P), 0.0).sum(1)
    return h / math.log(base) if base > 1 else np.zeros(P.shape[0])


def _split(n, seed, test_fraction=0.3):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    k = int(round(n * (1 - test_fraction)))
    return perm[:k], perm[k:]


def dci(codes, factors, discrete=None, method: str = "linear", seed: int = 0) -> dict:
    """DCI (Eastwood & Williams 2018, §3): importance R_jk of code j for factor k, from one
    regressor per factor trained on all (standardised) codes.

    ``method="linear"``: |coefficients| of least squares on standardised codes and factors (a
    categorical factor: one-vs-rest least squares on its indicators, |coefficients| summed);
    ``"forest"``: scikit-learn random-forest importances (the paper's second choice).
    D = Σ_j ρ_j (1 − H_K(P_j·)), ρ_j = Σ_k R_jk / Σ R; C = mean_k (1 − H_J(P̃_·k));
    I = mean test R² (continuous) / accuracy (categorical) on a held-out 30%.
    Returns ``{"disentanglement", "completeness", "informativeness", "importance" (J, K)}``."""
    z, v, discrete = _arrays(codes, factors, discrete)
    if method not in ("linear", "forest"):
        raise ValueError(f"method must be 'linear' or 'forest', got {method!r}")
    J, K = z.shape[1], v.shape[1]
    zs = (z - z.mean(0)) / np.maximum(z.std(0), 1e-12)
    tr, te = _split(len(z), seed)
    R = np.zeros((J, K))
    info = np.zeros(K)
    for k in range(K):
        y = v[:, k]
        if discrete[k]:
            classes, yi = np.unique(y, return_inverse=True)
            if method == "linear":
                Y = np.eye(len(classes))[yi]
                A = np.c_[zs, np.ones(len(zs))]
                W, *_ = np.linalg.lstsq(A[tr], Y[tr], rcond=None)
                R[:, k] = np.abs(W[:J]).sum(1)
                info[k] = float((np.argmax(A[te] @ W, 1) == yi[te]).mean())
            else:
                from sklearn.ensemble import RandomForestClassifier
                m = RandomForestClassifier(50, max_depth=8, random_state=seed).fit(zs[tr], yi[tr])
                R[:, k] = m.feature_importances_
                info[k] = float(m.score(zs[te], yi[te]))
        else:
            ys = (y - y.mean()) / max(y.std(), 1e-12)
            if method == "linear":
                A = np.c_[zs, np.ones(len(zs))]
                w, *_ = np.linalg.lstsq(A[tr], ys[tr], rcond=None)
                R[:, k] = np.abs(w[:J])
                res = ys[te] - A[te] @ w
            else:
                from sklearn.ensemble import RandomForestRegressor
                m = RandomForestRegressor(50, max_depth=8, random_state=seed).fit(zs[tr], ys[tr])
                R[:, k] = m.feature_importances_
                res = ys[te] - m.predict(zs[te])
            info[k] = float(1 - (res ** 2).mean() / max(ys[te].var(), 1e-12))
    Dj = 1 - _entropy_rows(R, K)
    rho = R.sum(1) / max(R.sum(), 1e-300)
    Ck = 1 - _entropy_rows(R.T, J)
    return {"disentanglement": float((rho * Dj).sum()), "completeness": float(Ck.mean()),
            "informativeness": float(info.mean()), "importance": R,
            "per_code": Dj, "per_factor": Ck}


def _one_code_score(zj, y, discrete, tr, te):
    """Predictability of factor y from the single code zj: R² of a 1-D linear fit (continuous), or
    the chance-corrected test accuracy of a 1-D decision tree (categorical)."""
    if not discrete:
        if zj.std() < 1e-12 or y.std() < 1e-12:
            return 0.0
        return float(np.corrcoef(zj, y)[0, 1] ** 2)
    from sklearn.tree import DecisionTreeClassifier

    classes, yi = np.unique(y, return_inverse=True)
    chance = np.bincount(yi[te], minlength=len(classes)).max() / len(te)
    m = DecisionTreeClassifier(max_leaf_nodes=4 * len(classes), random_state=0)
    acc = m.fit(zj[tr, None], yi[tr]).score(zj[te, None], yi[te])
    return float(max(0.0, (acc - chance) / max(1 - chance, 1e-12)))


def sap(codes, factors, discrete=None, seed: int = 0) -> dict:
    """Separated Attribute Predictability (Kumar et al. 2018, §3): S_jk = how well code j alone
    predicts factor k (R² of a linear fit for a continuous factor; for a categorical one the test
    accuracy of a one-feature decision tree, rescaled so that chance is 0 and perfect is 1 —
    Kumar et al. use the raw accuracy, whose gap cannot reach 1); SAP = mean_k (top − second).
    Returns ``{"sap", "per_factor" (K,), "scores" (J, K)}``."""
    z, v, discrete = _arrays(codes, factors, discrete)
    if z.shape[1] < 2:
        raise ValueError(f"codes must have at least 2 columns for a gap, got {z.shape[1]}")
    tr, te = _split(len(z), seed)
    S = np.array([[_one_code_score(z[:, j], v[:, k], discrete[k], tr, te)
                   for k in range(v.shape[1])] for j in range(z.shape[1])])
    top = np.sort(S, axis=0)[::-1]
    per = top[0] - top[1]
    return {"sap": float(per.mean()), "per_factor": per, "scores": S}


# ------------------------------------------------------------------------------- β-VAE
class BetaVAE(nn.Module):
    """An MLP VAE on flattened images in [0, 1]: q(z | x) = N(μ(x), diag σ²(x)), p(x | z) Bernoulli
    with logits dec(z) (Kingma & Welling 2014; Higgins et al. 2017)."""

    def __init__(self, D: int, d: int = 6, hidden: tuple = (256, 128)):
        super().__init__()
        self.D, self.d = check_int(D, "D", 1), check_int(d, "d", 1)
        enc, size = [], D
        for hsz in hidden:
            enc += [nn.Linear(size, hsz), nn.SiLU()]
            size = hsz
        self.encoder = nn.Sequential(*enc, nn.Linear(size, 2 * d))
        dec, size = [], d
        for hsz in reversed(hidden):
            dec += [nn.Linear(size, hsz), nn.SiLU()]
            size = hsz
        self.decoder = nn.Sequential(*dec, nn.Linear(size, D))

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, -1)
        return mu, logvar.clamp(-12, 6)

    def decode_logits(self, z):
        return self.decoder(z)

    def decode(self, z):
        return torch.sigmoid(self.decoder(z))

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        return self.decode_logits(z), mu, logvar


def beta_vae_loss(model: BetaVAE, x: torch.Tensor, beta: float = 1.0,
                  generator: torch.Generator | None = None) -> dict:
    """−ELBO_β = E_q[−log p(x | z)] + β KL(q(z | x) ‖ N(0, I)) per example, batch mean
    (Higgins et al. 2017, eq 4; β = 1 is the VAE). Returns ``{"loss", "recon", "kl"}``."""
    beta = check_positive(beta, "beta", allow_zero=True)
    check_tensor(x, "x", ndim=2)
    if x.shape[1] != model.D:
        raise ValueError(f"x must have shape (B, {model.D}), got {tuple(x.shape)}")
    logits, mu, logvar = model(x, generator)
    recon = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1).mean()
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1).mean()
    return {"loss": recon + beta * kl, "recon": recon, "kl": kl}


def train_beta_vae(data: torch.Tensor, beta: float = 4.0, d: int = 6, steps: int = 3000,
                   batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                   hidden: tuple = (256, 128)) -> dict:
    """Train a :class:`BetaVAE` on ``data`` (N, D) in [0, 1] (seeded, Adam).
    Returns ``{"model", "losses" (steps, 3: loss, recon, kl), "seconds"}``."""
    beta = check_positive(beta, "beta", allow_zero=True)
    check_tensor(data, "data", ndim=2)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = BetaVAE(data.shape[1], d, hidden).to(data.dtype)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    hist = []
    t0 = time.perf_counter()
    for _ in range(check_int(steps, "steps", 1)):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        out = beta_vae_loss(model, data[idx], beta, g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        hist.append(tuple(float(out[k].detach()) for k in ("loss", "recon", "kl")))
    return {"model": model, "losses": np.array(hist), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def encode_means(model: BetaVAE, data: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """μ(x) for every row of ``data``: the representation the metrics score."""
    return torch.cat([model.encode(data[i:i + batch_size])[0]
                      for i in range(0, data.shape[0], batch_size)])
