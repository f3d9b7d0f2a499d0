"""Checkers for Part II, representation learning ("Manifolds, autoencoders and the score";
"Disentangled representations and InfoGAN").

* ``"sphere_jacobian"``: ``fn(theta, phi, r) -> (3, 2)``: J_g(θ, φ) of the sphere
  g = r (sin φ cos θ, sin φ sin θ, cos φ) (Ahmad's notes, §2.2; φ the polar angle), columns
  ∂g/∂θ and ∂g/∂φ. Reference: :func:`diffnotes.representation.manifold.jacobian` of
  :func:`~diffnotes.representation.manifold.sphere`.
* ``"project_normal"``: ``fn(J, v) -> (D,)``: the component of v orthogonal to the column
  space of J (eq 2.11, corrected: Jᵀ x_⊥ = 0).
* ``"cae_penalty_one_layer"``: ``fn(W, b, x) -> ()``: the contractive penalty
  mean_b ‖J_f(x_b)‖_F² of the sigmoid encoder f(x) = σ(W x + b) (eqs 2.14–2.15 with the square;
  Rifai et al. 2011), for x (B, D), W (d, D), b (d,).
* ``"mutual_information_table"``: ``fn(joint) -> ()``: I(X; Y) in nats of a 2-D table P(x, y)
  (Ahmad's notes, eq 6.1).
* ``"mi_lower_bound_table"``: ``fn(joint, q) -> ()``: InfoGAN's bound H(c) + Σ P(c, x) log Q(c | x)
  on a table with rows c and columns x (eq 6.5; eq 6.6 corrected).
"""
from __future__ import annotations

import math

import torch

from . import register


def _sphere_jacobian(theta, phi, r):
    from ..representation.manifold import jacobian, sphere

    h = torch.stack([torch.as_tensor(theta, dtype=torch.float64), torch.as_tensor(phi, dtype=torch.float64)])
    return jacobian(lambda v: sphere(v, float(r)), h)


def _sphere_inputs(g):
    u = torch.rand(3, generator=g, dtype=torch.float64)
    return dict(theta=2 * math.pi * u[0], phi=0.1 + 2.9 * u[1], r=float(0.5 + 2 * u[2]))


def _project_normal(J, v):
    from ..representation.manifold import project_normal, tangent_basis

    return project_normal(v, tangent_basis(J))


def _project_inputs(g):
    D = int(torch.randint(4, 9, (1,), generator=g))
    d = int(torch.randint(1, 4, (1,), generator=g))
    return dict(J=torch.randn(D, d, generator=g, dtype=torch.float64),
                v=torch.randn(D, generator=g, dtype=torch.float64))


def _cae(W, b, x):
    from ..representation.autoencoders import contractive_penalty

    lin = torch.nn.Linear(W.shape[1], W.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    return contractive_penalty(torch.nn.Sequential(lin, torch.nn.Sigmoid()), x, "jacobian").detach()


def _cae_inputs(g):
    D = int(torch.randint(3, 10, (1,), generator=g))
    d = int(torch.randint(1, 5, (1,), generator=g))
    return dict(W=torch.randn(d, D, generator=g, dtype=torch.float64),
                b=torch.randn(d, generator=g, dtype=torch.float64),
                x=torch.randn(int(torch.randint(1, 6, (1,), generator=g)), D, generator=g,
                              dtype=torch.float64))


def _mi(joint):
    from ..representation.mutual_information import mutual_information

    return torch.tensor(mutual_information(joint), dtype=torch.float64)


def _table(g, rows=None, cols=None):
    r = rows or int(torch.randint(2, 6, (1,), generator=g))
    c = cols or int(torch.randint(2, 6, (1,), generator=g))
    p = torch.rand(r, c, generator=g, dtype=torch.float64) ** 2 + 1e-3
    return p / p.sum()


def _bound(joint, q):
    from ..representation.mutual_information import table_mi_lower_bound

    return torch.tensor(table_mi_lower_bound(joint, q), dtype=torch.float64)


def _bound_inputs(g):
    P = _table(g)
    q = torch.rand(P.shape, generator=g, dtype=torch.float64) + 0.05
    return dict(joint=P, q=q / q.sum(0, keepdim=True))


register("sphere_jacobian", _sphere_jacobian, _sphere_inputs, rtol=1e-9, atol=1e-12,
         doc="the Jacobian of the sphere's chart (Ahmad's notes, §2.2), phi the polar angle")
register("project_normal", _project_normal, _project_inputs, rtol=1e-9, atol=1e-10,
         doc="the normal component of v: J^T x_perp = 0 (eq 2.11 corrected)")
register("cae_penalty_one_layer", _cae, _cae_inputs, rtol=1e-9, atol=1e-12,
         doc="mean squared Frobenius norm of a sigmoid encoder's Jacobian (eqs 2.14-2.15)")
register("mutual_information_table", _mi, lambda g: dict(joint=_table(g)), rtol=1e-9, atol=1e-12,
         doc="I(X;Y) of a discrete joint table, nats (Ahmad's notes, eq 6.1)")
register("mi_lower_bound_table", _bound, _bound_inputs, rtol=1e-9, atol=1e-12,
         doc="InfoGAN's variational bound H(c) + sum P(c,x) log Q(c|x) (eqs 6.5-6.6)")
