"""DDPM (Ahmad's notes, §1.1, Algorithms 1-2) against diffusers' DDPMScheduler and closed forms."""
import pytest
import torch
from diffusers import DDPMScheduler

from diffnotes.ddpm import (ddpm_loss, ddpm_sample, ddpm_step, posterior_mean_variance,
                            predict_x0, q_sample)


def _float64_ddpm_scheduler(betas):
    """diffusers' DDPMScheduler with its schedule tensors replaced by float64 ones."""
    s = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(),
                      clip_sample=False, variance_type="fixed_small")
    s.betas = betas.clone()
    s.alphas = 1 - s.betas
    s.alphas_cumprod = torch.cumprod(s.alphas, 0)
    s.one = torch.tensor(1.0, dtype=torch.float64)
    return s


def test_q_sample_matches_diffusers_add_noise(linear_schedule):
    b, ac = linear_schedule
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,), generator=g)
    s = _float64_ddpm_scheduler(b)
    torch.testing.assert_close(q_sample(x0, t, ac, noise), s.add_noise(x0, noise, t),
                               rtol=1e-13, atol=1e-13)


def test_ddpm_step_matches_diffusers_float64(linear_schedule, nonlinear_eps):
    """Full 1000-step ancestral chains, same model, time steps and noise: max |diff| ~ 1e-13."""
    b, _ = linear_schedule
    s = _float64_ddpm_scheduler(b)
    s.set_timesteps(1000)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, ref = x.clone(), x.clone()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    worst_step = 0.0
    for t in s.timesteps.tolist():
        # one step from the same input (no accumulation): the two formulas agree to rounding
        one = ddpm_step(nonlinear_eps, ref, t, b, noise=torch.zeros_like(ref))
        ref_one = s.step(nonlinear_eps(ref, torch.tensor([t])), t, ref,
                         generator=torch.Generator().manual_seed(0)).prev_sample
        if t > 0:  # remove diffusers' noise term to compare the means
            var = s._get_variance(t)
            ref_one = ref_one - var.sqrt() * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0),
                                                         dtype=ref.dtype)
        worst_step = max(worst_step, (one - ref_one).abs().max().item())
        # and the full chains, same noise
        ours = ddpm_step(nonlinear_eps, ours, t, b, generator=g1)
        ref = s.step(nonlinear_eps(ref, torch.tensor([t])), t, ref, generator=g2).prev_sample
    worst = (ours - ref).abs().max().item()
    print(f"ddpm_step vs DDPMScheduler.step, float64: max |diff| per step {worst_step:.3g}, "
          f"after 1000 chained steps {worst:.3g} (|x_0| ~ {ref.abs().max().item():.3g})")
    # Both formulas form 1 - ᾱ_t, which near t = 0 (ᾱ ≈ 1 - 1e-4) loses ~4 of float64's 16 digits
    # to cancellation, and the two routes (ε-form here, x̂0-form in diffusers) round differently.
    assert worst_step < 1e-9
    assert worst < 1e-8


def test_posterior_two_forms_agree(linear_schedule):
    """μ̃ in its x0-form equals the ε-form of Algorithm 2 (with ᾱ, not α) when x_t is built from (x0, ε)."""
    b, ac = linear_schedule
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 6, generator=g, dtype=torch.float64)
    for t in [1, 10, 400, 999]:
        xt = q_sample(x0, t, ac, eps)
        mean, var = posterior_mean_variance(x0, xt, t, b)
        eps_form = ddpm_step(lambda x, tt: eps, xt, t, b, noise=torch.zeros_like(xt))
        torch.testing.assert_close(mean, eps_form, rtol=1e-12, atol=1e-12)
        # β̃_t = 1 / (α_t/β_t + 1/(1-ᾱ_{t-1}))  (completing the square, Zhu's slides, "DDPM: Reverse Diffusion Process")
        alpha = 1 - b[t]
        assert var.item() == pytest.approx(1 / (alpha / b[t] + 1 / (1 - ac[t - 1])).item(), rel=1e-12)
    assert posterior_mean_variance(x0, xt, 400, b)[1].item() == pytest.approx(0.008052216414881602,
                                                                              rel=1e-12)


def test_seed_algorithm_misprint_differs(linear_schedule):
    """Algorithm 2 of Ahmad's notes prints (1-α_t)/√(1-α_t) = √β_t; with ᾱ it is β_t/√(1-ᾱ_t). They differ."""
    b, ac = linear_schedule
    t = 500
    printed = (b[t] / (1 - (1 - b[t])) ** 0.5).item()
    corrected = (b[t] / (1 - ac[t]) ** 0.5).item()
    assert abs(printed - corrected) > 0.05


def test_predict_x0_inverts_q_sample(linear_schedule):
    _, ac = linear_schedule
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(predict_x0(q_sample(x0, 300, ac, eps), eps, ac[300]), x0)


def test_last_step_adds_no_noise(linear_schedule, nonlinear_eps):
    b, _ = linear_schedule
    x = torch.randn(3, 6, dtype=torch.float64)
    a = ddpm_step(nonlinear_eps, x, 0, b, generator=torch.Generator().manual_seed(1))
    c = ddpm_step(nonlinear_eps, x, 0, b, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, c)


def test_ddpm_loss_is_zero_for_the_true_noise_and_positive_otherwise(linear_schedule):
    """With ε_θ returning exactly the noise used, eq 1.8 is 0; a zero predictor scores ≈ 1."""
    _, ac = linear_schedule
    x0 = torch.zeros(4096, 2, dtype=torch.float64)
    # for x0 = 0, x_t = √(1-ᾱ)ε, so the oracle is x_t / √(1-ᾱ_t)
    oracle = lambda x, t: x / (1 - ac[t]).sqrt().reshape(-1, 1)  # noqa: E731
    assert ddpm_loss(oracle, x0, ac, torch.Generator().manual_seed(0)).item() < 1e-20
    zero = ddpm_loss(lambda x, t: torch.zeros_like(x), x0, ac, torch.Generator().manual_seed(0))
    assert zero.item() == pytest.approx(1.0, abs=0.05)


def test_ddpm_sample_recovers_gaussian_data_moments(linear_schedule):
    """For data N(m, s²), the exact ε* makes ancestral sampling reproduce mean and variance."""
    from diffnotes.models.gmm import GaussianMixture
    b, ac = linear_schedule
    gm = GaussianMixture([[1.5]], 0.5, alphas_cumprod=ac)
    x = ddpm_sample(gm.eps_model(), torch.randn(4000, 1, generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.float64), b,
                    generator=torch.Generator().manual_seed(1), progress=False)
    se_mean = 0.5 / 4000 ** 0.5
    assert abs(x.mean().item() - 1.5) < 4 * se_mean
    assert x.std().item() == pytest.approx(0.5, rel=0.05)


def test_bad_input(linear_schedule, nonlinear_eps):
    b, ac = linear_schedule
    x = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\].*1000"):
        q_sample(x, 1000, ac, x)
    with pytest.raises(ValueError, match="t must lie.*-1"):
        ddpm_step(nonlinear_eps, x, -1, b)
    with pytest.raises(ValueError, match=r"x0 and noise must have the same shape.*\(2, 6\).*\(2, 5\)"):
        q_sample(x, 3, ac, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="betas must lie in"):
        ddpm_step(nonlinear_eps, x, 3, torch.tensor([0.1, 1.5, 0.2, 0.3]))
    with pytest.raises(TypeError, match="t must be an int"):
        q_sample(x, 3.5, ac, x)
    with pytest.raises(ValueError, match="variance"):
        ddpm_step(nonlinear_eps, x, 3, b, variance="huge")
    with pytest.raises(ValueError, match=r"eps_model\(x_t, t\)"):
        ddpm_step(lambda x, t: x[:, :3], x, 3, b)
