"""Manifolds and tangent spaces (Ahmad's notes, §2.2, eqs 2.9–2.11).

A d-dimensional manifold parametrised by a chart g: ℝ^d → ℝ^D has, at x = g(h), the tangent
space spanned by the columns of the Jacobian J_g(h) ∈ ℝ^{D×d} (eq 2.10). Its orthogonal
complement, the normal space, is {x_⊥ : J_g(h)ᵀ x_⊥ = 0} (eq 2.11 as it should read: the notes
print J_g x_⊥ = 0, a product of a D×d matrix with a D-vector).

- :func:`jacobian` (torch.func), :func:`tangent_basis` (SVD), :func:`project_tangent`,
  :func:`project_normal`, :func:`principal_angles`.
- :func:`sphere_chart` (sympy) and :func:`sphere` (torch): the notes' sphere example, with φ the
  polar angle (measured from the z axis) and θ the azimuth.
- The one-object shapes manifold: :func:`sample_scene_params`, :func:`render_scenes` and
  :func:`true_tangents` (central differences of :func:`diffnotes.data.shapes.render_objects`
  with respect to the object's centre x, y and radius), and :func:`local_pca_dimension`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import sympy as sp
import torch

from ..utils import check_callable, check_int, check_positive, check_tensor

__all__ = ["jacobian", "tangent_basis", "project_tangent", "project_normal", "principal_angles",
           "sphere_chart", "sphere", "FACTORS", "sample_scene_params", "render_scenes",
           "true_tangents", "local_pca_dimension", "local_pca_tangents"]


# ------------------------------------------------------------------------------- linear algebra
def jacobian(g: Callable, h: torch.Tensor) -> torch.Tensor:
    """J_g(h) = ∂g/∂h (eq 2.10) by ``torch.func.jacrev``.

    ``g`` maps a (d,) tensor to a (D,) tensor (or any shape, flattened); ``h`` is (d,) or a
    batch (B, d) (then ``torch.func.vmap`` is used and the result is (B, D, d))."""
    check_callable(g, "g", "g(h) -> tensor")
    check_tensor(h, "h", ndim=(1, 2))

    def flat(v):
        return g(v).reshape(-1)

    jf = torch.func.jacrev(flat)
    if h.ndim == 1:
        return jf(h)
    return torch.func.vmap(jf)(h)


def _basis_input(J, name: str) -> torch.Tensor:
    check_tensor(J, name, ndim=(2, 3))
    if J.shape[-2] < J.shape[-1]:
        raise ValueError(f"{name} must be (D, d) with D ≥ d (a Jacobian of g: ℝ^d → ℝ^D), got "
                         f"shape {tuple(J.shape)}")
    return J


def tangent_basis(J: torch.Tensor, rank: int | None = None, rtol: float = 1e-8) -> torch.Tensor:
    """An orthonormal basis (D, k) of the column space of J (D, d) (or a batch (B, D, d)).

    From the thin SVD J = U S Vᵀ: the first k columns of U, with k = ``rank`` or the number of
    singular values above ``rtol`` times the largest (the tangent space's dimension)."""
    J = _basis_input(J, "J")
    U, S, _ = torch.linalg.svd(J, full_matrices=False)
    if rank is None:
        smax = S.max(dim=-1, keepdim=True).values
        k = int((S > rtol * smax).sum(-1).max())
    else:
        k = check_int(rank, "rank", 1)
        if k > J.shape[-1]:
            raise ValueError(f"rank must be ≤ d = {J.shape[-1]} (the Jacobian's columns), got {k}")
    return U[..., :k]


def _projector_inputs(v, basis):
    check_tensor(v, "v", ndim=(1, 2, 3))
    B = _basis_input(basis, "basis")
    if v.shape[-1] != B.shape[-2]:
        raise ValueError(f"v must have last dimension D = {B.shape[-2]} (the basis' rows), got "
                         f"shape {tuple(v.shape)}; basis has shape {tuple(B.shape)}")
    return v, B


def project_tangent(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x_T = U Uᵀ v: the component of v (…, D) in the span of the orthonormal ``basis`` (D, k)
    (or a batch (B, D, k) with v (B, D)). Pass a Jacobian through :func:`tangent_basis` first."""
    v, U = _projector_inputs(v, basis)
    if U.ndim == 2:
        return (v @ U) @ U.T
    return torch.einsum("bdk,bk->bd", U, torch.einsum("bdk,bd->bk", U, v))


def project_normal(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x_⊥ = v − U Uᵀ v: the component orthogonal to the tangent space, so that
    basisᵀ x_⊥ = 0 (eq 2.11, corrected)."""
    return v - project_tangent(v, basis)


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of A (D, a) and B (D, b):
    arccos of the singular values of Q_Aᵀ Q_B (Björck & Golub 1973). min(a, b) angles; 0 means a
    shared direction, π/2 an orthogonal one."""
    A, B = _basis_input(A, "A"), _basis_input(B, "B")
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(f"A and B must be (D, a) and (D, b) with the same D, got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    qa, _ = torch.linalg.qr(A.to(torch.float64))
    qb, _ = torch.linalg.qr(B.to(torch.float64))
    s = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.arccos(s).sort().values


# ------------------------------------------------------------------------------- the sphere
def sphere_chart() -> dict:
    """The notes' sphere example in sympy (Ahmad's notes, §2.2, after eq 2.10).

    g(θ, φ) = r (sin φ cos θ, sin φ sin θ, cos φ): θ the azimuth, φ the **polar** angle (the
    notes call both "azimuthal"). Returns ``{"theta", "phi", "r", "g", "J", "J_printed",
    "normal", "metric"}``; checks that ``J`` (sympy's Jacobian) equals the matrix the notes
    print, that both columns are orthogonal to the normal g/r, and that the metric JᵀJ is
    diag(r² sin² φ, r²)."""
    th, ph = sp.symbols(r"\theta \phi", real=True)
    r = sp.Symbol("r", positive=True)
    g = sp.Matrix([r * sp.sin(ph) * sp.cos(th), r * sp.sin(ph) * sp.sin(th), r * sp.cos(ph)])
    J = g.jacobian([th, ph])
    J_printed = sp.Matrix([[-r * sp.sin(ph) * sp.sin(th), r * sp.cos(ph) * sp.cos(th)],
                           [r * sp.sin(ph) * sp.cos(th), r * sp.cos(ph) * sp.sin(th)],
                           [0, -r * sp.sin(ph)]])
    if sp.simplify(J - J_printed) != sp.zeros(3, 2):
        raise AssertionError("sympy's Jacobian of the sphere differs from the printed one")
    normal = g / r
    if sp.simplify(J.T * normal) != sp.zeros(2, 1):
        raise AssertionError("the sphere's tangents are not orthogonal to its normal")
    metric = sp.simplify(J.T * J)
    if sp.simplify(metric - sp.diag(r ** 2 * sp.sin(ph) ** 2, r ** 2)) != sp.zeros(2, 2):
        raise AssertionError("the sphere's metric is not diag(r² sin² φ, r²)")
    return {"theta": th, "phi": ph, "r": r, "g": g, "J": J, "J_printed": J_printed,
            "normal": normal, "metric": metric}


def sphere(h: torch.Tensor, r: float = 1.0) -> torch.Tensor:
    """The sphere's chart in torch: h = (θ, φ) (…, 2) → r (sin φ cos θ, sin φ sin θ, cos φ)."""
    check_tensor(h, "h", ndim=(1, 2))
    if h.shape[-1] != 2:
        raise ValueError(f"h must be (θ, φ) with last dimension 2, got shape {tuple(h.shape)}")
    th, ph = h[..., 0], h[..., 1]
    return r * torch.stack([torch.sin(ph) * torch.cos(th), torch.sin(ph) * torch.sin(th),
                            torch.cos(ph)], -1)


# ------------------------------------------------------------------------------- one-object scenes
#: the continuous factors of a one-object scene, in the order of the tangent columns.
FACTORS: tuple[str, ...] = ("x", "y", "radius")
_RANGES = {"x": (18.0, 46.0), "y": (18.0, 46.0), "radius": (6.0, 11.0)}


def sample_scene_params(n: int, seed=0, shapes: Sequence[str] = ("circle",),
                        ranges: Mapping[str, tuple] | None = None) -> dict:
    """Draw ``n`` one-object scenes' true factors: ``{"x", "y", "radius"}`` (px of the 64×64
    render, uniform in their ranges) and ``"shape"`` (indices into ``shapes``, uniform), plus
    ``"shapes"`` (the names). Seeded by ``seed`` (int or numpy Generator)."""
    n = check_int(n, "n", 1)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    rg = dict(_RANGES, **(ranges or {}))
    out = {k: rng.uniform(*rg[k], size=n) for k in FACTORS}
    out["shape"] = rng.integers(0, len(shapes), size=n)
    out["shapes"] = tuple(shapes)
    return out


def _one(params, i):
    shapes = params.get("shapes", ("circle",))
    shape_idx = np.atleast_1d(params.get("shape", np.zeros(1, int)))
    return (float(np.atleast_1d(params["x"])[i]), float(np.atleast_1d(params["y"])[i]),
            float(np.atleast_1d(params["radius"])[i]), shapes[int(shape_idx[min(i, len(shape_idx) - 1)])])


def _check_params(params) -> int:
    if not isinstance(params, Mapping) or any(k not in params for k in FACTORS):
        raise ValueError(f"scene_params must be a dict with keys {list(FACTORS)} (and optional "
                         f"'shape', 'shapes'), got {type(params).__name__}"
                         f"{'' if not isinstance(params, Mapping) else ' with ' + str(list(params))}")
    n = {len(np.atleast_1d(params[k])) for k in FACTORS}
    if len(n) != 1:
        raise ValueError(f"scene_params' arrays {list(FACTORS)} must have one length, got {n}")
    return n.pop()


def _render_one(x, y, radius, shape, resolution, color):
    from ..data.shapes import IMAGE_SIZE, render_objects

    img, _ = render_objects([dict(shape=shape, color=color, center=(x, y), radius=radius)],
                            background=0.0)
    g = img.mean(-1)                                                     # grey (64, 64)
    f = IMAGE_SIZE // resolution
    return g.reshape(resolution, f, resolution, f).mean((1, 3))          # area downsampling


def render_scenes(scene_params: Mapping, resolution: int = 16, color: str = "white") -> np.ndarray:
    """Grey one-object scenes (N, resolution²) in [0, 1] (float64): each drawn by
    :func:`diffnotes.data.shapes.render_objects` at 64×64 with a continuous centre and radius on a
    black background, averaged over its channels and area-downsampled (which anti-aliases it,
    so that the image depends almost smoothly on the factors)."""
    n = _check_params(scene_params)
    resolution = check_int(resolution, "resolution", 1)
    if 64 % resolution:
        raise ValueError(f"resolution must divide 64, got {resolution}")
    return np.stack([_render_one(*_one(scene_params, i), resolution, color).reshape(-1)
                     for i in range(n)]).astype(np.float64)


def true_tangents(scene_params: Mapping, resolution: int = 16, step: float = 1.0,
                  color: str = "white") -> np.ndarray:
    """The generator's tangent vectors at each scene: ∂image/∂(x, y, radius) (N, D, 3), by central
    differences of :func:`render_scenes` with ``step`` px (of the 64×64 render) per factor.

    These are the columns of the true chart's Jacobian (eq 2.10) on the one-object manifold (for
    a fixed shape and colour): the directions in which a scene can move and stay a scene."""
    n = _check_params(scene_params)
    step = check_positive(step, "step")
    out = np.zeros((n, resolution * resolution, len(FACTORS)))
    for i in range(n):
        base = list(_one(scene_params, i))
        for j in range(len(FACTORS)):
            plus, minus = list(base), list(base)
            plus[j] += step
            minus[j] -= step
            out[i, :, j] = (_render_one(*plus, resolution, color)
                            - _render_one(*minus, resolution, color)).reshape(-1) / (2 * step)
    return out


def local_pca_dimension(X, n_neighbors: int = 30, n_anchors: int = 100, threshold: float = 0.9,
                        seed: int = 0) -> dict:
    """Intrinsic dimension by local PCA (Fukunaga & Olsen 1971): at ``n_anchors`` random points,
    PCA of the ``n_neighbors`` nearest points (Euclidean); the local dimension is the number of
    components needed to explain ``threshold`` of the local variance.

    Returns ``{"dimension": median over anchors, "dims": per-anchor (n_anchors,),
    "spectrum": mean normalised local eigenvalues (sorted, first 10)}``."""
    X = np.asarray(X.detach().cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] <= n_neighbors:
        raise ValueError(f"X must be (N, D) with N > n_neighbors = {n_neighbors}, got {X.shape}")
    rng = np.random.default_rng(seed)
    anchors = rng.choice(X.shape[0], size=min(n_anchors, X.shape[0]), replace=False)
    sq = (X ** 2).sum(1)
    dims, spectra = [], []
    for a in anchors:
        d2 = sq + sq[a] - 2 * X @ X[a]
        nb = X[np.argsort(d2)[:n_neighbors]]
        nb = nb - nb.mean(0)
        ev = np.linalg.svd(nb, compute_uv=False) ** 2
        ev = ev / ev.sum()
        dims.append(int(np.searchsorted(np.cumsum(ev), threshold) + 1))
        k = min(10, len(ev))
        spectra.append(np.pad(ev[:k], (0, 10 - k)))
    dims = np.array(dims)
    return {"dimension": float(np.median(dims)), "dims": dims,
            "spectrum": np.mean(spectra, 0)}


def local_pca_tangents(pool, x, n_neighbors: int = 20, d: int = 3) -> np.ndarray:
    """A data-only tangent estimate: the top-d principal directions of the ``n_neighbors``
    points of ``pool`` (M, D) nearest to each row of ``x`` (N, D). Returns (N, D, d)."""
    P = np.asarray(pool, dtype=np.float64)
    X = np.asarray(x, dtype=np.float64)
    if P.ndim != 2 or X.ndim != 2 or P.shape[1] != X.shape[1]:
        raise ValueError(f"pool and x must be (M, D) and (N, D) with one D, got {P.shape} and {X.shape}")
    out = []
    sq = (P ** 2).sum(1)
    for row in X:
        nb = P[np.argsort(sq - 2 * P @ row)[:n_neighbors]]
        _, _, Vh = np.linalg.svd(nb - nb.mean(0), full_matrices=False)
        out.append(Vh[:d].T)
    return np.stack(out)
