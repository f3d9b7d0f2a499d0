"""The analytic mixture's exact quantities, checked against autograd and Monte Carlo."""
import pytest
import torch

from diffnotes.ddpm import q_sample
from diffnotes.models.gmm import GaussianMixture


@pytest.fixture
def gm(linear_schedule):
    _, ac = linear_schedule
    return GaussianMixture([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]], [[0.2, 0.3], [0.25, 0.25], [0.4, 0.1]],
                           weights=[0.2, 0.5, 0.3], alphas_cumprod=ac)


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_score_is_the_gradient_of_log_prob(gm, t):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(t), dtype=torch.float64,
                    requires_grad=True)
    (g,) = torch.autograd.grad(gm.log_prob(x, t).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), t), g, rtol=1e-10, atol=1e-10)
    for y in range(3):
        (gy,) = torch.autograd.grad(gm.log_prob(x, t, y).sum(), x)
        torch.testing.assert_close(gm.score(x.detach(), t, y), gy, rtol=1e-10, atol=1e-10)
        # ∇ log p(y | x) by autograd of log π_y + log p(x|y) − log p(x)
        lp = gm.weights[y].log() + gm.log_prob(x, t, y) - gm.log_prob(x, t)
        (gc,) = torch.autograd.grad(lp.sum(), x)
        torch.testing.assert_close(gm.grad_log_class_posterior(x.detach(), t, y), gc,
                                   rtol=1e-9, atol=1e-9)


def test_class_posterior_is_bayes(gm):
    x = torch.randn(10, 2, dtype=torch.float64)
    post = gm.class_posterior(x, 300)
    torch.testing.assert_close(post.sum(1), torch.ones(10, dtype=torch.float64))
    joint = torch.stack([gm.weights[y].log() + gm.log_prob(x, 300, y) for y in range(3)], 1)
    torch.testing.assert_close(post, torch.softmax(joint, 1))


def test_eps_star_minimises_the_denoising_loss(gm, linear_schedule):
    """E[ε | x_t] is the exact minimiser: its loss is below that of perturbed predictors."""
    _, ac = linear_schedule
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(20000, g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = 400
    xt = q_sample(x0, t, ac, noise)
    best = ((noise - gm.eps(xt, t)) ** 2).mean()
    for scale in (0.9, 1.1):
        assert ((noise - scale * gm.eps(xt, t)) ** 2).mean() > best
    # and the optimal loss is well below 1 (predicting zeros)
    assert best < 0.9


def test_noised_density_matches_monte_carlo(gm, linear_schedule):
    _, ac = linear_schedule
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(50000, g)
    xt = q_sample(x0, 250, ac, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    mean_exact = (gm.weights[:, None] * gm.means).sum(0) * ac[250].sqrt()
    torch.testing.assert_close(xt.mean(0), mean_exact, atol=0.02, rtol=0)


def test_bad_input(gm):
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        gm.eps(torch.zeros(3, 5, dtype=torch.float64), 10)
    with pytest.raises(ValueError, match="y must be a class index"):
        gm.eps(torch.zeros(3, 2, dtype=torch.float64), 10, y=7)
    with pytest.raises(ValueError, match="t must lie"):
        gm.eps(torch.zeros(3, 2, dtype=torch.float64), 1000)
    with pytest.raises(ValueError, match="stds must be positive"):
        GaussianMixture([[0.0]], -1.0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([[0.0], [1.0]], 0.1, weights=[1.0, 0.0])
