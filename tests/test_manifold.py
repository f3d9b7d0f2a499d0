"""diffnotes.representation.manifold: Jacobians, tangent bases, projections, the sphere, the
shapes manifold's true tangents."""
import math

import numpy as np
import pytest
import sympy as sp
import torch

from diffnotes.representation import manifold as M


def test_sphere_sympy_jacobian_equals_torch_func():
    sc = M.sphere_chart()                      # also asserts J = the printed matrix, JᵀN = 0
    rng = np.random.default_rng(0)
    f = sp.lambdify((sc["theta"], sc["phi"], sc["r"]), sc["J"], "numpy")
    for _ in range(5):
        th, ph, r = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 3.0), rng.uniform(0.5, 3)
        J = M.jacobian(lambda h: M.sphere(h, r), torch.tensor([th, ph], dtype=torch.float64))
        assert np.abs(np.array(f(th, ph, r), dtype=float) - J.numpy()).max() < 1e-12


def test_sphere_phi_is_polar_angle():
    # φ = 0 is the north pole whatever θ: the polar angle, not the azimuth
    sc = M.sphere_chart()
    g0 = sc["g"].subs(sc["phi"], 0)
    assert sp.simplify(g0 - sp.Matrix([0, 0, sc["r"]])) == sp.zeros(3, 1)


def test_batched_jacobian():
    h = torch.rand(4, 2, dtype=torch.float64)
    J = M.jacobian(M.sphere, h)
    assert J.shape == (4, 3, 2)
    assert torch.allclose(J[2], M.jacobian(M.sphere, h[2]))


def test_tangent_basis_orthonormal_and_spans_columns():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(20, 3, generator=g, dtype=torch.float64)
    U = M.tangent_basis(J)
    assert U.shape == (20, 3)
    assert torch.allclose(U.T @ U, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(U @ (U.T @ J), J, atol=1e-12)           # J's columns lie in span U
    # a rank-deficient Jacobian: the basis has its rank
    Jd = torch.cat([J[:, :2], J[:, :1] + J[:, 1:2]], 1)
    assert M.tangent_basis(Jd).shape == (20, 2)


def test_projections_idempotent_complementary():
    g = torch.Generator().manual_seed(1)
    U = M.tangent_basis(torch.randn(10, 3, generator=g, dtype=torch.float64))
    v = torch.randn(5, 10, generator=g, dtype=torch.float64)
    t, n = M.project_tangent(v, U), M.project_normal(v, U)
    assert torch.allclose(M.project_tangent(t, U), t, atol=1e-12)
    assert torch.allclose(M.project_normal(n, U), n, atol=1e-12)
    assert torch.allclose(t + n, v, atol=1e-12)
    assert torch.allclose(n @ U, torch.zeros(5, 3, dtype=torch.float64), atol=1e-12)  # Jᵀx⊥ = 0
    assert abs(float((t * n).sum())) < 1e-10


def test_sphere_normal_is_radial():
    h = torch.tensor([0.7, 1.2], dtype=torch.float64)
    U = M.tangent_basis(M.jacobian(M.sphere, h))
    x = M.sphere(h)
    assert torch.allclose(M.project_normal(x, U), x, atol=1e-12)


def test_principal_angles():
    e = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(M.principal_angles(e[:, :2], e[:, :2]), torch.zeros(2, dtype=torch.float64), atol=1e-7)
    ang = M.principal_angles(e[:, :2], e[:, [0, 2]])
    assert abs(float(ang[0])) < 1e-7 and abs(float(ang[1]) - math.pi / 2) < 1e-7


def test_true_tangents_match_finite_change():
    p = M.sample_scene_params(3, seed=0)
    T = M.true_tangents(p, resolution=16, step=1.0)
    assert T.shape == (3, 256, 3)
    # moving the centre right by 1 px changes the image by about the x tangent
    q = dict(p, x=p["x"] + 1.0)
    dx = M.render_scenes(q) - M.render_scenes(p)
    cos = (dx * T[:, :, 0]).sum(1) / np.linalg.norm(dx, axis=1) / np.linalg.norm(T[:, :, 0], axis=1)
    assert (cos > 0.8).all()
    # x and y tangents of a circle are (nearly) orthogonal, radius is not along either
    assert np.abs((T[:, :, 0] * T[:, :, 1]).sum(1)).max() < 0.2 * np.linalg.norm(T[:, :, 0], axis=1).min() ** 2


def test_render_objects_continuous_radius_backwards_compatible():
    from diffnotes.data.shapes import render_objects, SIZES
    a, _ = render_objects([dict(shape="circle", color="red", size="small")])
    b, _ = render_objects([dict(shape="circle", color="red", radius=SIZES["small"])])
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="radius"):
        render_objects([dict(shape="circle", color="red", radius=-1.0)])


def test_local_pca_dimension_of_a_plane():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(800, 2)) @ rng.normal(size=(2, 10))
    assert M.local_pca_dimension(X, 20, 30)["dimension"] == 2


def test_bad_input():
    J = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="v"):
        M.project_tangent(torch.randn(4, dtype=torch.float64), M.tangent_basis(J))
    with pytest.raises(ValueError, match="J"):
        M.tangent_basis(torch.randn(2, 5))
    with pytest.raises(ValueError, match="A and B"):
        M.principal_angles(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="scene_params"):
        M.true_tangents({"x": [1.0]})
    with pytest.raises(ValueError, match="h"):
        M.sphere(torch.zeros(3))


def test_eq_2_11_as_printed_does_not_typecheck_and_corrected_holds():
    # Ahmad's notes, eq 2.11 prints J_g(h) · x_⊥ = 0 with J_g ∈ ℝ^{D×d}, x_⊥ ∈ ℝ^D: no product
    h = torch.tensor([0.4, 1.0], dtype=torch.float64)
    J = M.jacobian(M.sphere, h)                              # (3, 2)
    x_perp = M.project_normal(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), M.tangent_basis(J))
    with pytest.raises(RuntimeError):
        J @ x_perp
    assert torch.allclose(J.T @ x_perp, torch.zeros(2, dtype=torch.float64), atol=1e-12)
