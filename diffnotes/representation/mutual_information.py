"""Mutual information and InfoGAN's variational lower bound (Ahmad's notes, appendix 6.2.1).

One implementation, shared by the representation chapters (InfoGAN) and the recognition part:

- :func:`entropy`, :func:`mutual_information`, :func:`conditional_entropy`: eqs 6.1–6.2 on a
  discrete joint table P(x, y) (natural logarithms: nats).
- :func:`mi_lower_bound`: the variational bound of eqs 6.4–6.6 (Chen et al. 2016, InfoGAN, Lemma
  5.1 and eq 4): for any conditional Q(c | x),

      I(c; x) ≥ H(c) + E_{c ∼ P(c), x ∼ P(x | c)} [log Q(c | x)],

  with equality exactly when Q(c | x) = P(c | x) (the gap is E_x KL(P(c | x) ‖ Q(c | x))). The
  expectation is over the *same* c that generated x. Eq 6.6's first line draws a fresh
  c′ ∼ P(c) independent of x; then E_{c′∼P(c)}[−log Q(c′|x)] ≥ H(c) (a cross-entropy), so that
  "bound" is ≤ 0 for every Q: true but empty. The inner draw must be c′ ∼ P(c | x) (Chen et al.
  2016, Lemma 5.1), which gives the second line.
- :func:`table_mi_lower_bound`: the same bound on a discrete table, for exact checks.
- :func:`categorical_info_loss`, :func:`gaussian_info_loss`: −E log Q(c | x) for InfoGAN's
  categorical and continuous (factorised Gaussian) codes: minimising them maximises the bound.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["entropy", "mutual_information", "conditional_entropy", "mi_lower_bound",
           "table_mi_lower_bound", "categorical_info_loss", "gaussian_info_loss",
           "uniform_entropy"]


def _table(p, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(p) if not isinstance(p, torch.Tensor) else p,
                        dtype=torch.float64)
    if t.ndim < 1 or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be a table of non-negative finite probabilities, "
                         f"got shape {tuple(t.shape)}")
    s = float(t.sum())
    if abs(s - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got {s:.6g}")
    return t


def _xlogy(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p log q with 0 log 0 = 0."""
    return torch.where(p > 0, p * torch.log(torch.where(p > 0, q, torch.ones_like(q))),
                       torch.zeros_like(p))


def entropy(p) -> float:
    """H(P) = −Σ P log P (nats) of a discrete distribution (any shape, summing to 1)."""
    t = _table(p, "p")
    return float(-_xlogy(t, t).sum())


def mutual_information(joint) -> float:
    """I(X; Y) = Σ P(x, y) log P(x, y) / (P(x) P(y)) (Ahmad's notes, eq 6.1), nats.

    ``joint``: a 2-D table P(x, y) (rows x, columns y) summing to 1."""
    t = _table(joint, "joint")
    if t.ndim != 2:
        raise ValueError(f"joint must be a 2-D table P(x, y), got shape {tuple(t.shape)}")
    px, py = t.sum(1, keepdim=True), t.sum(0, keepdim=True)
    return float(_xlogy(t, t / (px * py).clamp_min(1e-300)).sum())


def conditional_entropy(joint) -> float:
    """H(X | Y) = −Σ P(x, y) log P(x | y) for a table P(x, y); eq 6.2 is I = H(X) − H(X | Y)."""
    t = _table(joint, "joint")
    if t.ndim != 2:
        raise ValueError(f"joint must be a 2-D table P(x, y), got shape {tuple(t.shape)}")
    py = t.sum(0, keepdim=True)
    return float(-_xlogy(t, t / py.clamp_min(1e-300)).sum())


def mi_lower_bound(log_q: torch.Tensor, entropy_c: float) -> torch.Tensor:
    """InfoGAN's bound (Ahmad's notes, eq 6.6, corrected; Chen et al. 2016, eq 4):
    L_I = H(c) + mean(log Q(c_i | x_i)), where each x_i was generated from its own c_i.

    ``log_q``: (N,) values log Q(c_i | x_i); ``entropy_c``: H(c) of the code's prior (nats).
    Returns a 0-d tensor (differentiable in ``log_q``)."""
    if not isinstance(log_q, torch.Tensor) or log_q.ndim != 1 or log_q.numel() == 0:
        raise ValueError(f"log_q must be a non-empty 1-D tensor of log Q(c_i | x_i), got "
                         f"{type(log_q).__name__} {tuple(getattr(log_q, 'shape', ()))}")
    if not math.isfinite(float(entropy_c)):
        raise ValueError(f"entropy_c must be a finite number, got {entropy_c!r}")
    return float(entropy_c) + log_q.mean()


def table_mi_lower_bound(joint, q_c_given_x) -> float:
    """The bound of eq 6.5 on a table: H(c) + Σ_{c,x} P(c, x) log Q(c | x).

    ``joint``: P(c, x) with rows c and columns x; ``q_c_given_x``: Q(c | x), same shape, each
    column a distribution over c. Equals :func:`mutual_information` (joint) exactly when
    Q(c | x) = P(c | x), and is smaller otherwise (by E_x KL(P(c|x) ‖ Q(c|x)))."""
    t = _table(joint, "joint")
    q = torch.as_tensor(np.asarray(q_c_given_x) if not isinstance(q_c_given_x, torch.Tensor)
                        else q_c_given_x, dtype=torch.float64)
    if q.shape != t.shape:
        raise ValueError(f"q_c_given_x must have the joint's shape {tuple(t.shape)}, got "
                         f"{tuple(q.shape)}")
    if bool((q < 0).any()) or not torch.allclose(q.sum(0), torch.ones(q.shape[1],
                                                                       dtype=torch.float64),
                                                 atol=1e-6):
        raise ValueError("q_c_given_x must have non-negative columns that sum to 1 (Q(. | x))")
    h_c = entropy(t.sum(1))
    support = t > 0
    if bool((support & (q <= 0)).any()):
        return -math.inf
    return h_c + float(_xlogy(t, q).sum())


def uniform_entropy(k: int | None = None, low: float | None = None, high: float | None = None
                    ) -> float:
    """H of a uniform code: log k for k categories, or log(high − low) (differential) for a
    continuous code on [low, high]."""
    if k is not None:
        return math.log(int(k))
    return math.log(float(high) - float(low))


def categorical_info_loss(logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """−E log Q(c | x) for a categorical code: cross-entropy of Q's ``logits`` (N, K) at the
    codes ``c`` (N,) that generated x."""
    if logits.ndim != 2 or c.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (N, K) and c (N,), got {tuple(logits.shape)} and "
                         f"{tuple(c.shape)}")
    return torch.nn.functional.cross_entropy(logits, c.long())


def gaussian_info_loss(mean: torch.Tensor, log_std: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """−E log Q(c | x) for continuous codes with a factorised Gaussian Q = N(mean, exp(log_std)²),
    summed over the code's dimensions, averaged over the batch."""
    if mean.shape != c.shape or log_std.shape != c.shape:
        raise ValueError(f"mean, log_std and c must have one shape, got {tuple(mean.shape)}, "
                         f"{tuple(log_std.shape)}, {tuple(c.shape)}")
    nll = 0.5 * ((c - mean) / log_std.exp()) ** 2 + log_std + 0.5 * math.log(2 * math.pi)
    return nll.sum(-1).mean() if nll.ndim > 1 else nll.mean()
