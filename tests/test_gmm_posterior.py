"""GaussianMixture.posterior: the exact posterior of a mixture prior under y = A x + σ_y n."""
import math

import numpy as np
import pytest
import torch

from diffnotes.models.gmm import GaussianMixture
from diffnotes.restoration import operators as ops


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mixture2d():
    return GaussianMixture(means=[[-1.0, 0.5], [1.2, -0.3], [0.2, 1.5]],
                           stds=[[0.3, 0.5], [0.4, 0.2], [0.25, 0.25]], weights=[0.5, 0.3, 0.2])


def test_matches_numerical_integration_on_a_grid():
    gm = _mixture2d()
    A = torch.tensor([[1.0, 0.7]])
    y, sigma = torch.tensor([0.4]), 0.3
    post = gm.posterior(y, A, sigma)
    # brute force: p(x | y) ∝ p(x) N(y; A x, σ²) on a fine grid
    g = torch.linspace(-4, 4, 801, dtype=torch.float64)
    X = torch.cartesian_prod(g, g)
    logp = gm.log_prob(X, 1.0) - 0.5 * ((y - X @ A.T.double()) ** 2).sum(1) / sigma ** 2
    w = torch.softmax(logp, 0)
    mean = (w[:, None] * X).sum(0)
    cov = (w[:, None, None] * (X - mean)[:, :, None] * (X - mean)[:, None, :]).sum(0)
    assert torch.allclose(post.mean(), mean, atol=1e-6)
    assert torch.allclose(post.cov(), cov, atol=1e-6)
    # the density itself, normalised on the grid
    dens = post.log_prob(X).exp()
    assert abs(float(dens.sum() * (g[1] - g[0]) ** 2) - 1) < 1e-6
    assert torch.allclose(dens / dens.sum(), w, atol=1e-9)


def test_one_component_is_gaussian_conditioning_by_dense_linear_algebra():
    rng = np.random.default_rng(0)
    D, m = 5, 3
    mu, s = rng.normal(size=D), rng.uniform(0.3, 1.0, size=D)
    A, y, sigma = rng.normal(size=(m, D)), rng.normal(size=m), 0.2
    gm = GaussianMixture(means=mu[None], stds=s[None])
    post = gm.posterior(torch.tensor(y), torch.tensor(A), sigma)
    # the joint Gaussian of (x, y), conditioned with a plain solve
    Sxx = np.diag(s ** 2)
    Sxy = Sxx @ A.T
    Syy = A @ Sxx @ A.T + sigma ** 2 * np.eye(m)
    mean = mu + Sxy @ np.linalg.solve(Syy, y - A @ mu)
    cov = Sxx - Sxy @ np.linalg.solve(Syy, Sxy.T)
    assert np.allclose(post.mean().numpy(), mean, atol=1e-12)
    assert np.allclose(post.cov().numpy(), cov, atol=1e-12)
    # the evidence: log N(y; A mu, Syy)
    _, logdet = np.linalg.slogdet(Syy)
    r = y - A @ mu
    ev = -0.5 * (r @ np.linalg.solve(Syy, r) + logdet + m * math.log(2 * math.pi))
    assert abs(float(post.log_evidence) - ev) < 1e-10


def test_component_weights_against_importance_sampling():
    gm = _mixture2d()
    A = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    y, sigma = torch.tensor([-0.2]), 0.25
    post = gm.posterior(y, A, sigma)
    x, lab = gm.sample(400_000, generator=_gen(0), return_labels=True)
    lw = -0.5 * ((y - x @ A.T) ** 2).sum(1) / sigma ** 2
    w = torch.softmax(lw, 0)
    is_weights = torch.stack([w[lab == c].sum() for c in range(3)])
    is_mean = (w[:, None] * x).sum(0)
    assert torch.allclose(post.weights[0], is_weights, atol=0.01)
    assert torch.allclose(post.mean(), is_mean, atol=0.01)


def test_sigma_zero_with_a_mask_pins_the_observed_coordinates():
    gm = GaussianMixture(means=torch.randn(4, 6, generator=_gen(1)), stds=0.5)
    mask = torch.tensor([True, False, True, True, False, False])
    A = torch.diag(mask.double())                    # A = diag(m): zero rows, rank 3
    x = gm.sample(2, generator=_gen(2))
    y = x @ A.T
    post = gm.posterior(y, A, 0.0)
    mean, cov = post.mean(), post.cov()
    assert torch.allclose(mean[:, mask], x[:, mask], atol=1e-12)
    assert float(cov[:, mask][:, :, mask].abs().max()) < 1e-12
    draws = post.sample(50, generator=_gen(3))
    assert draws.shape == (2, 50, 6)
    assert torch.allclose(draws[:, :, mask], x[:, None, mask].expand(-1, 50, -1), atol=1e-12)
    # continuity: σ_y → 0 approaches the σ_y = 0 answer
    near = gm.posterior(y, A, 1e-7)
    assert torch.allclose(near.mean(), mean, atol=1e-6)
    # the same through the Operator interface (an inpainting mask on (B, 6) is a dense diag)
    op = ops.dense(A)
    assert torch.allclose(gm.posterior(y, op, 0.0).mean(), mean, atol=1e-12)


def test_samples_have_the_posterior_moments_and_rows_are_independent():
    gm = _mixture2d()
    A = torch.tensor([[1.0, 1.0]])
    ys = torch.tensor([[0.3], [-1.5]])
    post = gm.posterior(ys, A, 0.2)
    assert post.weights.shape == (2, 3) and post.mean().shape == (2, 2)
    for i in range(2):
        one = gm.posterior(ys[i], A, 0.2)
        assert torch.allclose(one.mean(), post.mean()[i], atol=1e-13)
    draws = post.sample(200_000, generator=_gen(4))
    assert torch.allclose(draws.mean(1), post.mean(), atol=0.01)
    emp = torch.stack([torch.cov(d.T) for d in draws])
    assert torch.allclose(emp, post.cov(), atol=0.01)


def test_per_sample_operator_matrices():
    gm = GaussianMixture(means=torch.randn(3, 4, generator=_gen(5)), stds=0.4)
    A = torch.randn(2, 2, 4, generator=_gen(6))
    y = torch.randn(2, 2, generator=_gen(7))
    post = gm.posterior(y, A, 0.1)
    for i in range(2):
        assert torch.allclose(post.mean()[i], gm.posterior(y[i], A[i], 0.1).mean(), atol=1e-12)


def test_bad_input():
    gm = _mixture2d()
    with pytest.raises(ValueError, match="sigma_y"):
        gm.posterior(torch.zeros(1), torch.ones(1, 2), -1.0)
    with pytest.raises(ValueError, match="A must have shape"):
        gm.posterior(torch.zeros(1), torch.ones(1, 3), 0.1)
    with pytest.raises(ValueError, match="y must have shape"):
        gm.posterior(torch.zeros(2), torch.ones(1, 2), 0.1)
    with pytest.raises(ValueError, match="n must be"):
        gm.posterior(torch.zeros(1), torch.ones(1, 2), 0.1).sample(0)
