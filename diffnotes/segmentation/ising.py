"""Ising and Potts models for segmentation (Ahmad's notes, §5.3, eqs 5.5–5.11).

Conventions: a 4-connected H×W grid; label 1 is foreground, 0 background (the Ising spin is
s = 2·label − 1). A labelling ``x`` of shape (H, W) with values in 0..K−1 has the energy

    E(x) = Σ_i unary[x_i, i] + Σ_{i→j right} w_right[i]·[x_i ≠ x_j] + Σ_{i↓j} w_down[i]·[x_i ≠ x_j]

with ``unary`` (K, H, W), ``w_right`` (H, W−1) and ``w_down`` (H−1, W), all weights ≥ 0. This is
the corrected form of eq 5.7 of Ahmad's notes (their +J s_i s_j with J > 0 rewards disagreement,
see erratum ``erratum-seg-ising-sign``); since s_i s_j = 1 − 2[s_i ≠ s_j], the Ising term
−J s_i s_j is 2J[s_i ≠ s_j] up to a constant.

- :func:`gaussian_unary` (eq 5.6, as a true negative log-likelihood), :func:`contrast_weights`
  (eq 5.11), :func:`energy`;
- :func:`graph_cut`: the exact binary minimiser by max-flow/min-cut (PyMaxflow, i.e. the
  Boykov–Kolmogorov algorithm), graph built with ``add_grid_edges``/``add_grid_tedges``;
- :func:`potts_alpha_expansion`: K labels by expansion moves, each one a graph cut;
- :func:`brute_force_minimum`: every labelling of a tiny grid, for checks;
- :func:`ising_hamiltonian` (eq 5.5), :func:`ising_gibbs` (checkerboard heat-bath sampler),
  :func:`ising_to_graph` and :func:`onsager_magnetisation` for the physics.
"""
from __future__ import annotations

import itertools
import math

import maxflow
import numpy as np
import torch

from ..utils import check_int, check_positive

__all__ = ["gaussian_unary", "contrast_weights", "energy", "graph_cut", "potts_alpha_expansion",
           "brute_force_minimum", "ising_hamiltonian", "ising_gibbs", "ising_to_graph",
           "onsager_magnetisation", "CRITICAL_TEMPERATURE"]

#: Onsager's critical temperature of the square-lattice Ising model, in units of J/k_B.
CRITICAL_TEMPERATURE = 2.0 / math.log(1.0 + math.sqrt(2.0))


# ---------------------------------------------------------------------------- argument checks
def _array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}") from None
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got non-finite values")
    return a


def _image(image, name: str = "image") -> np.ndarray:
    """(H, W) or channels-first (C, H, W) → float64 (C, H, W)."""
    a = _array(image, name)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (H, W) or (C, H, W), got shape {a.shape}")
    if a.shape[0] > 4 and a.shape[-1] in (1, 3, 4):
        raise ValueError(f"{name} must be channels-first (C, H, W); got shape {a.shape}, which "
                         "looks channels-last: pass image.transpose(2, 0, 1)")
    return a


def _unary(unary, name: str = "unary", K: int | None = None) -> np.ndarray:
    u = _array(unary, name)
    if u.ndim != 3 or (K is not None and u.shape[0] != K) or u.shape[0] < 2:
        want = f"({K}, H, W)" if K is not None else "(K, H, W) with K >= 2"
        raise ValueError(f"{name} must have shape {want}, got shape {u.shape}")
    return u


def _weights(w_right, w_down, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    wr, wd = _array(w_right, "w_right"), _array(w_down, "w_down")
    if wr.shape != (H, W - 1):
        raise ValueError(f"w_right must have shape (H, W-1) = {(H, W - 1)}, got {wr.shape}")
    if wd.shape != (H - 1, W):
        raise ValueError(f"w_down must have shape (H-1, W) = {(H - 1, W)}, got {wd.shape}")
    for n, w in (("w_right", wr), ("w_down", wd)):
        if w.size and w.min() < 0:
            raise ValueError(f"{n} must be non-negative (a cut cannot have negative capacity), "
                             f"got a minimum of {w.min():.4g}")
    return wr, wd


def _means(mu, name: str, C: int) -> np.ndarray:
    """A class mean: a scalar or one value per channel, as a (C, 1, 1) array."""
    m = _array(mu, name).reshape(-1)
    if m.size not in (1, C):
        raise ValueError(f"{name} must be a scalar or have {C} values (one per channel), "
                         f"got {m.size}")
    return m.reshape(-1, 1, 1)


def _edge_weights(weights, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """One number for every edge, or a pair ``(w_right, w_down)``, checked by :func:`_weights`."""
    if isinstance(weights, (int, float, np.integer, np.floating)) and not isinstance(weights, bool):
        weights = (np.full((H, W - 1), float(weights)), np.full((H - 1, W), float(weights)))
    if not isinstance(weights, (tuple, list)) or len(weights) != 2:
        raise ValueError(f"weights must be a pair (w_right, w_down), got {type(weights).__name__}"
                         + (f" of length {len(weights)}" if hasattr(weights, "__len__") else ""))
    return _weights(weights[0], weights[1], H, W)


def _temperature(temperature, batch_shape: tuple) -> np.ndarray:
    """Positive temperature(s): a scalar or one per chain, shaped to broadcast over (H, W)."""
    T = _array(temperature, "temperature")
    if np.any(T <= 0):
        raise ValueError(f"temperature must be positive, got a minimum of {T.min()}")
    if T.ndim and T.shape != batch_shape:
        raise ValueError(f"temperature must be a scalar or have the batch shape {batch_shape}, "
                         f"got {T.shape}")
    return T.reshape(T.shape + (1, 1))


def _labels(labels, K: int, shape: tuple) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    x = np.asarray(labels)
    if x.shape != shape:
        raise ValueError(f"labels must have shape {shape}, got {x.shape}")
    if x.dtype == bool:
        x = x.astype(np.int64)
    if not np.issubdtype(x.dtype, np.integer):
        if not np.all(x == np.round(x)):
            raise TypeError(f"labels must be integers, got dtype {x.dtype}")
        x = x.astype(np.int64)
    if x.size and (x.min() < 0 or x.max() >= K):
        raise ValueError(f"labels must lie in [0, {K - 1}], got values in [{x.min()}, {x.max()}]")
    return x.astype(np.int64)


# ---------------------------------------------------------------------------- the energy
def gaussian_unary(image, mu_fg, sigma_fg, mu_bg, sigma_bg) -> np.ndarray:
    """Negative log-likelihood costs of each label under a Gaussian per class (Ahmad's notes, eq 5.6).

    cost[1] = −log N(I; μ_fg, σ_fg²) = ‖I − μ_fg‖²/(2σ_fg²) + C·log σ_fg + (C/2)·log 2π, and
    likewise cost[0] with the background parameters. Ahmad's notes drop the log σ term, which is
    wrong whenever σ_fg ≠ σ_bg (erratum ``erratum-seg-unary-logsigma``).

    ``image``: (H, W) or channels-first (C, H, W); ``mu_*``: a scalar or C values; ``sigma_*``:
    a positive scalar (isotropic). Returns float64 costs of shape (2, H, W): index 0 background,
    1 foreground. Raises ``ValueError`` on a wrong rank, a wrong number of means or σ ≤ 0.
    """
    img = _image(image)
    C = img.shape[0]
    classes = [(_means(mu_bg, "mu_bg", C), check_positive(sigma_bg, "sigma_bg")),   # label 0
               (_means(mu_fg, "mu_fg", C), check_positive(sigma_fg, "sigma_fg"))]   # label 1
    return np.stack([((img - mu) ** 2).sum(0) / (2 * sig ** 2)
                     + C * math.log(sig) + 0.5 * C * math.log(2 * math.pi)          # eq 5.6
                     for mu, sig in classes])


def contrast_weights(image, lam: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Contrast-sensitive edge weights w_ij = λ·exp(−‖I_i − I_j‖²/(2σ²)) (Ahmad's notes, eq 5.11).

    ``image``: (H, W) or channels-first (C, H, W) (the squared difference sums over channels).
    Returns ``(w_right, w_down)`` of shapes (H, W−1) and (H−1, W). Raises ``ValueError`` when
    λ < 0 or σ ≤ 0 or the image has the wrong rank.
    """
    img = _image(image)
    lam, sigma = check_positive(lam, "lam", allow_zero=True), check_positive(sigma, "sigma")
    dr = ((img[:, :, 1:] - img[:, :, :-1]) ** 2).sum(0)
    dd = ((img[:, 1:, :] - img[:, :-1, :]) ** 2).sum(0)
    return lam * np.exp(-dr / (2 * sigma ** 2)), lam * np.exp(-dd / (2 * sigma ** 2))  # eq 5.11


def energy(labels, unary, w_right, w_down) -> float:
    """E(x) = Σ unary[x_i, i] + Σ w·[neighbours differ] (corrected eq 5.7; Potts eq 5.8 for K > 2).

    ``labels``: integers (H, W) in 0..K−1; ``unary``: (K, H, W); ``w_right``: (H, W−1);
    ``w_down``: (H−1, W), non-negative. Returns a float. Raises ``ValueError`` on any mismatch.
    """
    u = _unary(unary)
    K, H, W = u.shape
    wr, wd = _weights(w_right, w_down, H, W)
    x = _labels(labels, K, (H, W))
    data = np.take_along_axis(u, x[None], 0).sum()
    smooth = (wr * (x[:, 1:] != x[:, :-1])).sum() + (wd * (x[1:, :] != x[:-1, :])).sum()
    return float(data + smooth)


# ---------------------------------------------------------------------------- exact binary MAP
_RIGHT = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]])
_DOWN = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]])


def _pad(w: np.ndarray, H: int, W: int) -> np.ndarray:
    """Edge weights (H, W−1) or (H−1, W) padded with zeros to the node grid (H, W)."""
    out = np.zeros((H, W))
    out[:w.shape[0], :w.shape[1]] = w
    return out


def _solve_binary(cost0, cost1, right, down, symmetric: bool = True) -> np.ndarray:
    """Min cut of Σ cost_{x_i} + edge terms, x = 1 on the sink side. Returns bool (H, W).

    ``right``/``down`` are node-grid shaped (H, W) capacities of the edge from each node to its
    right/lower neighbour. A directed edge i→j is cut when x_i = 0 and x_j = 1; with
    ``symmetric`` the same capacity is also put on j→i, so it is paid whenever x_i ≠ x_j.
    """
    H, W = cost0.shape
    g = maxflow.Graph[float](H * W, 2 * H * W)
    nodes = g.add_grid_nodes((H, W))
    g.add_grid_edges(nodes, weights=right, structure=_RIGHT, symmetric=symmetric)
    g.add_grid_edges(nodes, weights=down, structure=_DOWN, symmetric=symmetric)
    # x = 1 (sink side) cuts the source t-link: source capacity = cost of 1, sink capacity = cost of 0
    m = np.minimum(cost0, cost1)
    g.add_grid_tedges(nodes, cost1 - m, cost0 - m)
    g.maxflow()
    return g.get_grid_segments(nodes)


def graph_cut(unary, w_right, w_down) -> np.ndarray:
    """Exact minimiser of the binary :func:`energy` by max-flow/min-cut (Ahmad's notes, eqs 5.7, 5.10).

    The graph: one node per pixel; t-links carry the unary costs (the link to the source carries
    the cost of label 1, since cutting it puts the pixel on the sink = label-1 side; Ahmad's notes
    have these swapped, erratum ``erratum-seg-tlinks``); n-links carry ``w_right``/``w_down`` in both
    directions. Built with ``add_grid_tedges``/``add_grid_edges`` in three vectorised calls,
    solved with PyMaxflow's Boykov–Kolmogorov max-flow.

    ``unary``: (2, H, W), any real costs (a per-pixel constant is removed first); ``w_right``:
    (H, W−1); ``w_down``: (H−1, W), non-negative. Returns int64 labels (H, W), 1 = foreground.
    Raises ``ValueError`` on wrong shapes or negative weights.
    """
    u = _unary(unary, K=2)
    _, H, W = u.shape
    wr, wd = _weights(w_right, w_down, H, W)
    return _solve_binary(u[0], u[1], _pad(wr, H, W), _pad(wd, H, W)).astype(np.int64)


# ---------------------------------------------------------------------------- K labels
def potts_alpha_expansion(unary, weights, max_cycles: int = 10, init=None) -> np.ndarray:
    """Approximate minimiser of the Potts energy (Ahmad's notes, eq 5.8 with unaries) by α-expansion.

    Each move asks every pixel "keep your label or switch to α?": a binary problem whose pairwise
    terms E(0,0)=w[x_i≠x_j], E(0,1)=w[x_i≠α], E(1,0)=w[α≠x_j], E(1,1)=0 are submodular because
    the Potts distance is a metric, so the move is solved exactly by one graph cut (Boykov,
    Veksler & Zabih 2001). Cycles over α = 0..K−1 until no move lowers the energy. The result x̂
    satisfies E_data(x̂)+E_smooth(x̂) ≤ E_data(x*) + 2·E_smooth(x*) for the optimum x*; from the
    default all-zero start, K = 2 is solved exactly by the first move (α = 1 can reach every
    labelling).

    ``unary``: (K, H, W); ``weights``: a pair ``(w_right, w_down)`` of shapes (H, W−1), (H−1, W),
    non-negative, or one number for every edge; ``init``: optional starting labels (H, W). Returns int64 labels (H, W).
    """
    u = _unary(unary)
    K, H, W = u.shape
    wr, wd = _edge_weights(weights, H, W)
    max_cycles = check_int(max_cycles, "max_cycles", min=1)
    x = np.zeros((H, W), np.int64) if init is None else _labels(init, K, (H, W)).copy()
    best = energy(x, u, wr, wd)
    for _ in range(max_cycles):
        improved = False
        for alpha in range(K):
            # per-pixel costs of keeping (0) or switching to alpha (1)
            c0 = np.take_along_axis(u, x[None], 0)[0].copy()
            c1 = u[alpha].copy()
            right = np.zeros((H, W)); down = np.zeros((H, W))
            for w, a, b, cap, sl_a, sl_b in (
                    (wr, x[:, :-1], x[:, 1:], right, (slice(None), slice(0, W - 1)),
                     (slice(None), slice(1, W))),
                    (wd, x[:-1, :], x[1:, :], down, (slice(0, H - 1), slice(None)),
                     (slice(1, H), slice(None)))):
                A = w * (a != b)          # E(0,0)
                B = w * (a != alpha)      # E(0,1): i keeps a, j takes alpha
                C = w * (alpha != b)      # E(1,0): i takes alpha, j keeps b
                # E = A + (C−A)·x_i + (D−C)·x_j + (B+C−A−D)·(1−x_i)·x_j, with D = 0
                c0[sl_a] += A             # constant A charged to x_i = 0 and ...
                c1[sl_a] += C             # ... A + (C − A) = C to x_i = 1
                c1[sl_b] -= C             # (D − C)·x_j
                cap[sl_a] = B + C - A     # ≥ 0 by the triangle inequality of the Potts metric
            move = _solve_binary(c0, c1, right, down, symmetric=False)
            cand = np.where(move, alpha, x)
            e = energy(cand, u, wr, wd)
            if e < best - 1e-12 * max(1.0, abs(best)):
                x, best, improved = cand, e, True
        if not improved:
            break
    return x


def brute_force_minimum(unary, w_right, w_down, max_labellings: int = 2 ** 20):
    """Minimum of :func:`energy` over all K^(H·W) labellings (for tiny grids and tests).

    Returns ``(labels, energy)``; ties go to the first labelling in lexicographic order. Raises
    ``ValueError`` when there are more than ``max_labellings`` labellings.
    """
    u = _unary(unary)
    K, H, W = u.shape
    wr, wd = _weights(w_right, w_down, H, W)
    n = K ** (H * W)
    if n > max_labellings:
        raise ValueError(f"unary of shape {u.shape} has {n} labellings, more than "
                         f"max_labellings={max_labellings}")
    X = np.array(list(itertools.product(range(K), repeat=H * W)), dtype=np.int64).reshape(n, H, W)
    data = np.take_along_axis(u[None], X[:, None], 1)[:, 0].sum((1, 2))
    smooth = ((wr * (X[:, :, 1:] != X[:, :, :-1])).sum((1, 2))
              + (wd * (X[:, 1:, :] != X[:, :-1, :])).sum((1, 2)))
    E = data + smooth
    i = int(np.argmin(E))
    return X[i], float(E[i])


# ---------------------------------------------------------------------------- the physics
def _neighbour_sum(s: np.ndarray, periodic: bool) -> np.ndarray:
    if periodic:
        return (np.roll(s, 1, -1) + np.roll(s, -1, -1) + np.roll(s, 1, -2) + np.roll(s, -1, -2))
    nb = np.zeros_like(s)
    nb[..., :, 1:] += s[..., :, :-1]
    nb[..., :, :-1] += s[..., :, 1:]
    nb[..., 1:, :] += s[..., :-1, :]
    nb[..., :-1, :] += s[..., 1:, :]
    return nb


def _spins(spins, name="spins") -> np.ndarray:
    s = _array(spins, name)
    if s.ndim < 2:
        raise ValueError(f"{name} must have shape (..., H, W), got shape {s.shape}")
    if not np.all(np.abs(s) == 1):
        raise ValueError(f"{name} must hold only -1 and +1")
    return s


def ising_hamiltonian(spins, J: float = 1.0, field=0.0, periodic: bool = False):
    """H(s) = −J Σ_<ij> s_i s_j − Σ_i h_i s_i (Ahmad's notes, eq 5.5), each pair counted once.

    ``spins``: ±1 array (..., H, W); ``field``: scalar or broadcastable to (..., H, W). Returns a
    float, or an array of shape (...) for a batch.
    """
    s = _spins(spins)
    h = np.broadcast_to(_array(field, "field"), s.shape)
    if periodic:
        pair = (s * np.roll(s, -1, -1)).sum((-2, -1)) + (s * np.roll(s, -1, -2)).sum((-2, -1))
    else:
        pair = (s[..., :, 1:] * s[..., :, :-1]).sum((-2, -1)) + (s[..., 1:, :] * s[..., :-1, :]).sum((-2, -1))
    out = -J * pair - (h * s).sum((-2, -1))  # eq 5.5
    return float(out) if np.ndim(out) == 0 else out


def ising_gibbs(spins, temperature, J: float = 1.0, field=0.0, n_sweeps: int = 100,
                rng: np.random.Generator | None = None, periodic: bool = True,
                return_magnetisation: bool = False):
    """Heat-bath (Gibbs) sampling of the Ising model p(s) ∝ exp(−H(s)/T) (H from eq 5.5).

    One sweep updates the two colours of a checkerboard in turn; sites of one colour are not
    neighbours, so each colour is resampled at once from its exact conditional
    p(s_i = +1 | rest) = σ(2(J·Σ_{j~i} s_j + h_i)/T).

    ``spins``: ±1 array (..., H, W) (a batch of independent chains); ``temperature``: positive,
    scalar or shape (...) (one per chain); ``field``: scalar or broadcastable to (..., H, W);
    ``rng``: a ``numpy.random.Generator`` (required, for reproducibility); ``periodic``: toroidal
    boundary (needs even H and W for the checkerboard). Returns the final spins, and with
    ``return_magnetisation`` also the mean spin after every sweep, shape (n_sweeps, ...).
    """
    s = _spins(spins).copy()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    H, W = s.shape[-2:]
    if periodic and (H % 2 or W % 2):
        raise ValueError(f"spins must have even H and W for periodic checkerboard updates, got {(H, W)}")
    T = _temperature(temperature, s.shape[:-2])
    h = np.broadcast_to(_array(field, "field"), s.shape)
    n_sweeps = check_int(n_sweeps, "n_sweeps", min=0)
    ii, jj = np.indices((H, W))
    colours = [(ii + jj) % 2 == 0, (ii + jj) % 2 == 1]
    mags = []
    for _ in range(n_sweeps):
        for mask in colours:
            local = J * _neighbour_sum(s, periodic) + h
            p_up = 0.5 * (1.0 + np.tanh(local / T))  # = sigmoid(2·local/T), stable
            new = np.where(rng.random(s.shape) < p_up, 1.0, -1.0)
            s = np.where(mask, new, s)
        if return_magnetisation:
            mags.append(s.mean((-2, -1)))
    if return_magnetisation:
        return s, np.array(mags)
    return s


def ising_to_graph(field, J: float):
    """The Ising energy (eq 5.5, free boundary) as ``(unary, w_right, w_down)`` for :func:`graph_cut`.

    With s = 2x − 1: −h_i s_i gives unary[1] = −h_i, unary[0] = +h_i, and −J s_i s_j =
    2J·[x_i ≠ x_j] − J, so w = 2J on every edge (the constant −J per edge is dropped). Needs
    J ≥ 0 (ferromagnetic); the sign printed in Ahmad's notes (eq 5.7) would need J < 0, which no cut can represent.
    ``field``: (H, W). Returns arrays of shapes (2, H, W), (H, W−1), (H−1, W).
    """
    h = _array(field, "field")
    if h.ndim != 2:
        raise ValueError(f"field must have shape (H, W), got {h.shape}")
    if J < 0:
        raise ValueError(f"J must be non-negative (ferromagnetic) for a graph cut, got {J}")
    H, W = h.shape
    return np.stack([h, -h]), np.full((H, W - 1), 2.0 * J), np.full((H - 1, W), 2.0 * J)


def onsager_magnetisation(temperature, J: float = 1.0):
    """Onsager–Yang spontaneous magnetisation of the infinite square lattice (k_B = 1):
    M(T) = (1 − sinh(2J/T)^−4)^(1/8) below T_c = 2J/ln(1+√2), and 0 above."""
    T = np.asarray(temperature, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = 1.0 - np.sinh(2.0 * J / T) ** -4.0
        return np.where(x > 0, np.abs(x) ** 0.125, 0.0)
