"""x̂₀ clipping (DDPM's original code, diffusers' ``clip_sample=True``) in ddpm_step/ddpm_sample and
ddim_step/ddim_sample: step for step against diffusers in float64, and off = the old result."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffnotes.ddim import ddim_sample, ddim_step
from diffnotes.ddpm import ddpm_sample, ddpm_step, predict_x0


def _ddpm_scheduler(betas, clip=True, rng=1.0):
    s = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(),
                      clip_sample=clip, clip_sample_range=rng, variance_type="fixed_small")
    s.betas = betas.clone()
    s.alphas = 1 - s.betas
    s.alphas_cumprod = torch.cumprod(s.alphas, 0)
    s.one = torch.tensor(1.0, dtype=torch.float64)
    return s


def _ddim_scheduler(betas, n, clip=True, rng=1.0):
    s = DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(),
                      clip_sample=clip, clip_sample_range=rng, set_alpha_to_one=True,
                      steps_offset=0, timestep_spacing="leading")
    s.alphas_cumprod = torch.cumprod(1 - betas, 0)
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    s.set_timesteps(n)
    return s


def _wild_eps(x, t):
    """A stand-in model whose x̂₀ leaves [-1, 1] often (so clipping acts): ε = -0.8 x + sin(3x)."""
    return -0.8 * x + torch.sin(3 * x)


@pytest.mark.parametrize("rng", [1.0, 0.5])
def test_ddpm_clip_matches_diffusers_step_for_step(linear_schedule, rng):
    b, ac = linear_schedule
    s = _ddpm_scheduler(b, rng=rng)
    s.set_timesteps(1000)
    x = 1.5 * torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, ref = x.clone(), x.clone()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    clipped_steps = 0
    for t in s.timesteps.tolist():
        x0 = predict_x0(ref, _wild_eps(ref, t), ac[t].item())
        clipped_steps += bool((x0.abs() > rng).any())
        one = ddpm_step(_wild_eps, ref, t, b, generator=torch.Generator().manual_seed(t),
                        clip_sample=True, clip_sample_range=rng)
        ref_one = s.step(_wild_eps(ref, t), t, ref,
                         generator=torch.Generator().manual_seed(t)).prev_sample
        assert (one - ref_one).abs().max().item() < 1e-10, t
        ours = ddpm_step(_wild_eps, ours, t, b, generator=g1, clip_sample=True,
                         clip_sample_range=rng)
        ref = s.step(_wild_eps(ref, t), t, ref, generator=g2).prev_sample
    assert clipped_steps > 100                               # the clip acted
    assert (ours - ref).abs().max().item() < 1e-8
    assert ours.abs().max().item() <= rng + 1e-12            # the last step returns the clipped x̂₀


def test_ddpm_sample_clip_equals_its_steps(linear_schedule):
    b, _ = linear_schedule
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = ddpm_sample(_wild_eps, x, b, generator=torch.Generator().manual_seed(2), progress=False,
                      clip_sample=True)
    ref, g = x.clone(), torch.Generator().manual_seed(2)
    for t in range(999, -1, -1):
        ref = ddpm_step(_wild_eps, ref, t, b, generator=g, clip_sample=True)
    assert torch.equal(out, ref)
    # and it differs from the unclipped chain (clipping is not a no-op on this model)
    plain = ddpm_sample(_wild_eps, x, b, generator=torch.Generator().manual_seed(2),
                        progress=False)
    assert (plain - out).abs().max().item() > 1e-2


def test_ddpm_clip_off_is_bitwise_the_old_result(linear_schedule, nonlinear_eps):
    b, _ = linear_schedule
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    new = ddpm_sample(nonlinear_eps, x, b, generator=torch.Generator().manual_seed(3),
                      progress=False, clip_sample=False)
    old = ddpm_sample(nonlinear_eps, x, b, generator=torch.Generator().manual_seed(3),
                      progress=False)
    assert torch.equal(new, old)
    # the old formula, written out (Algorithm 2 with ᾱ): the default path computes exactly it
    t, bt, a = 500, b[500].item(), torch.cumprod(1 - b, 0)[500].item()
    eps = nonlinear_eps(x, torch.tensor([t]))
    expected = (x - bt / (1 - a) ** 0.5 * eps) / (1 - bt) ** 0.5
    assert torch.equal(ddpm_step(nonlinear_eps, x, t, b, noise=torch.zeros_like(x)),
                       expected + 0.0 * x)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_clip_matches_diffusers_step_for_step(linear_schedule, eta):
    b, ac = linear_schedule
    s = _ddim_scheduler(b, 50)
    x_T = 1.5 * torch.randn(2, 6, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
    ours = ddim_sample(_wild_eps, x_T, s.timesteps.tolist(), ac, eta=eta,
                       generator=torch.Generator().manual_seed(5), clip_sample=True)
    ref, g = x_T.clone(), torch.Generator().manual_seed(5)
    ts = s.timesteps.tolist()
    for i, t in enumerate(ts):
        # one step from the same input
        a_prev = ac[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        one = ddim_step(ref, _wild_eps(ref, t), ac[t].item(), a_prev, 0.0, clip_sample=True)
        ref_one = s.step(_wild_eps(ref, t), t, ref, eta=0.0).prev_sample
        assert (one - ref_one).abs().max().item() < 1e-12
        ref = s.step(_wild_eps(ref, t), t, ref, eta=eta, generator=g).prev_sample
    assert (ours - ref).abs().max().item() < 1e-10
    unclipped = ddim_sample(_wild_eps, x_T, ts, ac, eta=eta,
                            generator=torch.Generator().manual_seed(5))
    assert (unclipped - ours).abs().max().item() > 1e-2


def test_ddim_clip_off_is_bitwise_the_old_result(linear_schedule, nonlinear_eps):
    _, ac = linear_schedule
    ts = list(range(999, -1, -50))
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for eta in (0.0, 0.7):
        new = ddim_sample(nonlinear_eps, x, ts, ac, eta=eta,
                          generator=torch.Generator().manual_seed(3), clip_sample=False)
        old = ddim_sample(nonlinear_eps, x, ts, ac, eta=eta,
                          generator=torch.Generator().manual_seed(3))
        assert torch.equal(new, old)
    eps = nonlinear_eps(x, torch.tensor([999]))
    a, ap = ac[999].item(), ac[949].item()
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    assert torch.equal(ddim_step(x, eps, a, ap), ap ** 0.5 * x0 + (1 - ap) ** 0.5 * eps)


def test_callback_sees_the_clipped_x0(linear_schedule):
    _, ac = linear_schedule
    seen = []
    x = 3 * torch.randn(2, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ddim_sample(_wild_eps, x, [999, 500, 10], ac, clip_sample=True, clip_sample_range=0.5,
                callback=lambda d: seen.append(d["x0_hat"].abs().max().item()))
    assert len(seen) == 3 and max(seen) <= 0.5


def test_bad_clip_arguments(linear_schedule):
    b, ac = linear_schedule
    x = torch.zeros(1, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="clip_sample_range"):
        ddpm_step(_wild_eps, x, 10, b, clip_sample=True, clip_sample_range=0.0)
    with pytest.raises(TypeError, match="clip_sample"):
        ddim_step(x, x, 0.5, 0.9, clip_sample="yes")
    with pytest.raises(ValueError, match="clip_sample_range"):
        ddim_step(x, x, 0.5, 0.9, clip_sample=True, clip_sample_range=-1.0)
