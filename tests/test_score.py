"""diffnotes.representation.score: the DAE ↔ score link, exact on the Gaussian mixture."""
import math

import pytest
import torch

from diffnotes.models.gmm import GaussianMixture
from diffnotes.representation import score as S
from diffnotes.schedules import alphas_cumprod, make_betas


def _gmm():
    return GaussianMixture(means=[[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]], stds=[0.3, 0.4, 0.25],
                           weights=[0.3, 0.4, 0.3])


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.5, 1.0, 3.0])
def test_optimal_denoiser_gives_exact_score_at_every_sigma(sigma):
    gmm = _gmm()
    y = gmm.sample(200, torch.Generator().manual_seed(0))
    y = y + sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    r = S.posterior_mean(gmm, y, sigma)
    est = S.dae_score(lambda v: S.posterior_mean(gmm, v, sigma), y, sigma)
    assert torch.allclose(est, S.smoothed_score(gmm, y, sigma), rtol=1e-9, atol=1e-9)
    # Tweedie in the other direction
    assert torch.allclose(S.tweedie_denoiser(lambda v: S.smoothed_score(gmm, v, sigma), sigma)(y), r,
                          atol=1e-10)


def test_smoothed_score_tends_to_data_score():
    gmm = _gmm()
    y = gmm.sample(100, torch.Generator().manual_seed(2))
    s0 = gmm.score(y, 1.0)
    assert torch.allclose(S.smoothed_score(gmm, y, 0.0), s0, atol=1e-12)
    errs = [S.relative_error(S.smoothed_score(gmm, y, s), s0) for s in (0.3, 0.1, 0.03, 0.01)]
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-2


def test_eps_link_to_part_one():
    # ε* = −σ ∇log p_σ(y) equals the mixture's VP ε*(x_t, t) at x_t = √ᾱ y, and a diffusion
    # model's x̂0 is the posterior mean (the optimal denoiser)
    ac = alphas_cumprod(make_betas("linear", 1000))
    gmm = GaussianMixture(_gmm().means, _gmm().stds[:, 0], _gmm().weights, alphas_cumprod=ac)
    x0 = gmm.sample(64, torch.Generator().manual_seed(3))
    for t in (10, 200, 700):
        out = S.denoise_with_eps_model(gmm.eps_model(), x0, t, ac, torch.Generator().manual_seed(t))
        a = float(ac[t])
        y = out["x_t"] / math.sqrt(a)
        assert abs(out["sigma"] - math.sqrt((1 - a) / a)) < 1e-12
        assert torch.allclose(out["x0_hat"], S.posterior_mean(gmm, y, out["sigma"]), atol=1e-8)
        eps = S.eps_from_score(S.smoothed_score(gmm, y, out["sigma"]), out["sigma"])
        assert torch.allclose(eps, gmm.eps(out["x_t"], torch.full((64,), t)), atol=1e-9)
        assert torch.allclose(S.score_from_eps(eps, out["sigma"]), S.smoothed_score(gmm, y, out["sigma"]), atol=1e-9)


def test_trained_dae_approaches_score_as_sigma_shrinks():
    torch.set_num_threads(1)
    gmm = _gmm()
    y = gmm.sample(2000, torch.Generator().manual_seed(5))
    s0 = gmm.score(y, 1.0)
    errs = {}
    for sigma in (0.8, 0.2):
        res = S.train_dae(lambda n, g: gmm.sample(n, g), sigma, steps=600, batch_size=256, hidden=64)
        with torch.no_grad():
            est = S.dae_score(res["model"], y.float(), sigma).double()
        errs[sigma] = S.relative_error(est, s0)
    assert errs[0.2] < errs[0.8] < 1.0


def test_bad_sigma():
    gmm = _gmm()
    y = torch.zeros(2, 2, dtype=torch.float64)
    for f in (lambda: S.posterior_mean(gmm, y, 0.0), lambda: S.dae_score(lambda v: v, y, -1.0),
              lambda: S.smoothed_score(gmm, y, -0.5), lambda: S.eps_from_score(y, 0),
              lambda: S.train_dae(lambda n, g: y, 0.0)):
        with pytest.raises(ValueError, match="sigma"):
            f()
