"""DDIM (Ahmad's notes, §1.2-1.3, eqs 1.21-1.26) against diffusers and against exact answers."""
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffnotes.ddim import (ddim_invert, ddim_sample, ddim_sigma, ddim_step, from_ode_coords,
                            ode_coords, ode_sample)
from diffnotes.ddpm import ddpm_step, posterior_mean_variance
from diffnotes.models.gmm import GaussianMixture
from diffnotes.schedules import make_timesteps


def _float64_ddim_scheduler(betas, n):
    s = DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(),
                      clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                      timestep_spacing="leading")
    s.alphas_cumprod = torch.cumprod(1 - betas, 0)
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    s.set_timesteps(n)
    return s


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).double().eval()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_sample_matches_diffusers_loop_on_a_unet_float64(linear_schedule, eta):
    b, ac = linear_schedule
    unet = _tiny_unet()
    eps_model = lambda x, t: unet(x, t).sample  # noqa: E731
    s = _float64_ddim_scheduler(b, 20)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = ddim_sample(eps_model, x_T, s.timesteps.tolist(), ac, eta=eta,
                       generator=torch.Generator().manual_seed(5))
    ref, g = x_T.clone(), torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in s.timesteps:
            ref = s.step(eps_model(ref, t), t, ref, eta=eta, generator=g).prev_sample
    diff = (ours - ref).abs().max().item()
    print(f"ddim_sample vs DDIMScheduler loop (tiny UNet, float64, 20 steps, eta={eta}): "
          f"max |diff| = {diff:.3g}")
    assert diff < 1e-10


def test_eta_one_gives_the_ddpm_posterior_variance(linear_schedule):
    """σ_t(η=1)² = β̃_t for every t: the corrected eq 1.24 (no square root)."""
    b, ac = linear_schedule
    x = torch.zeros(1, 1, dtype=torch.float64)
    for t in range(1, 1000):
        var = posterior_mean_variance(x, x, t, b)[1].item()
        assert ddim_sigma(ac[t].item(), ac[t - 1].item(), 1.0) ** 2 == pytest.approx(var, rel=1e-10)
    # the printed eq 1.24, √((1-ᾱ_{t-1})/(1-ᾱ_t))·β_t, is not β̃_t
    t = 500
    printed = ((1 - ac[t - 1]) / (1 - ac[t])).sqrt() * b[t]
    assert abs(printed.item() - posterior_mean_variance(x, x, t, b)[1].item()) > 1e-6


def test_eta_one_full_schedule_equals_ddpm_ancestral_step(linear_schedule, nonlinear_eps):
    b, ac = linear_schedule
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 6, generator=g, dtype=torch.float64)
    for t in [999, 500, 37, 1]:
        eps = nonlinear_eps(x, torch.tensor([t]))
        a = ddim_step(x, eps, ac[t].item(), ac[t - 1].item(), eta=1.0, noise=noise)
        c = ddpm_step(nonlinear_eps, x, t, b, noise=noise)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_eta_zero_is_deterministic(linear_schedule, nonlinear_eps):
    _, ac = linear_schedule
    x = torch.randn(2, 6, dtype=torch.float64)
    ts = make_timesteps(25)
    a = ddim_sample(nonlinear_eps, x, ts, ac, eta=0.0, generator=torch.Generator().manual_seed(1))
    c = ddim_sample(nonlinear_eps, x, ts, ac, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, c)
    d = ddim_sample(nonlinear_eps, x, ts, ac, eta=1.0, generator=torch.Generator().manual_seed(1))
    e = ddim_sample(nonlinear_eps, x, ts, ac, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(d, e)


def test_ode_euler_is_ddim(linear_schedule, nonlinear_eps):
    _, ac = linear_schedule
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in (5, 50):
        ts = make_timesteps(n)
        torch.testing.assert_close(ode_sample(nonlinear_eps, x, ts, ac, "euler"),
                                   ddim_sample(nonlinear_eps, x, ts, ac), rtol=1e-12, atol=1e-12)


def test_ode_coords_round_trip(linear_schedule):
    _, ac = linear_schedule
    x = torch.randn(3, 2, dtype=torch.float64)
    u, tau = ode_coords(x, ac[300].item())
    assert tau == pytest.approx(((1 - ac[300]) / ac[300]).sqrt().item())
    back, a = from_ode_coords(u, tau)
    torch.testing.assert_close(back, x)
    assert a == pytest.approx(ac[300].item(), rel=1e-12)


def _mixture(ac):
    return GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.0, 1.2]], [0.3, 0.25, 0.2],
                           weights=[0.5, 0.3, 0.2], alphas_cumprod=ac)


def test_heun_beats_euler_against_a_fine_reference(linear_schedule):
    _, ac = linear_schedule
    gm = _mixture(ac)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = ode_sample(gm.eps_model(), x, make_timesteps(1000), ac, "heun")
    err = {}
    for m in ("euler", "heun"):
        err[m] = (ode_sample(gm.eps_model(), x, make_timesteps(20), ac, m) - ref).norm(dim=1).mean()
    assert err["heun"] < 0.5 * err["euler"]
    # and Euler's error shrinks with the number of steps
    errs = [(ode_sample(gm.eps_model(), x, make_timesteps(n), ac) - ref).norm(dim=1).mean().item()
            for n in (10, 20, 50, 100)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_inversion_recovers_x_T_on_the_analytic_mixture(linear_schedule):
    """Sample with DDIM from x_T, invert the sample: with enough steps x_T comes back."""
    _, ac = linear_schedule
    gm = _mixture(ac)
    x_T = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for n in (10, 50, 250):
        ts = make_timesteps(n)
        x0 = ddim_sample(gm.eps_model(), x_T, ts, ac)
        errs.append((ddim_invert(gm.eps_model(), x0, ts, ac) - x_T).norm(dim=1).mean().item())
    print("inversion error |x_T - invert(sample(x_T))| for 10/50/250 steps:", errs)
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.05


def test_eta_one_ddim_has_correct_marginals_on_gaussian_data(linear_schedule):
    _, ac = linear_schedule
    gm = GaussianMixture([[2.0]], 0.4, alphas_cumprod=ac)
    x_T = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # η = 1 is a stochastic sampler whose discretisation error is larger at few steps (the DDIM
    # paper's FID table shows the same): give it the full schedule
    for eta, n in ((0.0, 100), (1.0, 1000)):
        x = ddim_sample(gm.eps_model(), x_T, make_timesteps(n), ac, eta=eta,
                        generator=torch.Generator().manual_seed(1))
        assert x.mean().item() == pytest.approx(2.0, abs=4 * 0.4 / 4000 ** 0.5)
        assert x.std().item() == pytest.approx(0.4, rel=0.06)


def test_bad_input(linear_schedule, nonlinear_eps):
    _, ac = linear_schedule
    x = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x_t and eps must have the same shape.*\(2, 6\).*\(2, 3\)"):
        ddim_step(x, torch.zeros(2, 3), 0.5, 0.6)
    with pytest.raises(ValueError, match="eta must be >= 0, got -0.1"):
        ddim_step(x, x, 0.5, 0.6, eta=-0.1)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_sample(nonlinear_eps, x, [10, 5], ac, eta=-1)
    with pytest.raises(ValueError, match="timesteps must be strictly decreasing.*5 followed by 10"):
        ddim_sample(nonlinear_eps, x, [20, 5, 10], ac)
    with pytest.raises(ValueError, match="timesteps must be strictly decreasing"):
        ddim_invert(nonlinear_eps, x, [5, 5], ac)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\].*1000"):
        ddim_sample(nonlinear_eps, x, [1000, 5], ac)
    with pytest.raises(ValueError, match="noise is required"):
        ddim_step(x, x, 0.5, 0.6, eta=0.5)
    with pytest.raises(ValueError, match="alpha_bar_t must lie in"):
        ddim_step(x, x, 1.5, 0.6)
    with pytest.raises(ValueError, match="eta must be finite"):
        ddim_sigma(0.5, 0.6, float("nan"))
    with pytest.raises(ValueError, match="method"):
        ode_sample(nonlinear_eps, x, [10, 5], ac, method="rk4")


# ---------------------------------------------------------------------------- callback
def _run_with_and_without_callback(name, fn, eps_model, x, ts, ac, b):
    calls, seen_t = [], []

    def model(x_, t_):                        # records what eps_model receives
        seen_t.append(t_)
        return eps_model(x_, t_)

    kw = dict(generator=torch.Generator().manual_seed(3))
    args = {"ddpm_sample": (model, x, b), "ddim_sample": (model, x, ts, ac),
            "ddim_invert": (model, x, ts, ac), "ode_sample": (model, x, ts, ac)}[name]
    extra = {"ddpm_sample": dict(progress=False, **kw), "ddim_sample": dict(eta=0.5, **kw),
             "ddim_invert": {}, "ode_sample": dict(method="heun")}[name]
    plain = fn(*args, **extra)
    n_plain = len(seen_t)
    if name == "ddpm_sample" or name == "ddim_sample":
        extra["generator"] = torch.Generator().manual_seed(3)
    with_cb = fn(*args, callback=calls.append, **extra)
    return plain, with_cb, calls, seen_t[:n_plain]


@pytest.mark.parametrize("name", ["ddim_sample", "ddpm_sample", "ode_sample", "ddim_invert"])
def test_samplers_callback_once_per_step_and_bitwise_same(linear_schedule, nonlinear_eps, name):
    from diffnotes.ddpm import ddpm_sample, predict_x0
    b, ac = linear_schedule
    fn = dict(ddim_sample=ddim_sample, ddpm_sample=ddpm_sample, ode_sample=ode_sample,
              ddim_invert=ddim_invert)[name]
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = make_timesteps(7, 1000)
    plain, with_cb, calls, seen_t = _run_with_and_without_callback(name, fn, nonlinear_eps, x,
                                                                   ts, ac, b)
    assert torch.equal(plain, with_cb)                  # the callback only looks
    # eps_model receives t as a (B,) long tensor
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.long and t.shape == (3,)
               for t in seen_t)
    steps = list(range(999, -1, -1)) if name == "ddpm_sample" else \
        (ts[::-1] if name == "ddim_invert" else ts)
    assert [c["i"] for c in calls] == list(range(len(steps)))
    assert [c["t"] for c in calls] == steps
    for c in calls:
        assert set(c) == {"i", "t", "x", "x0_hat", "eps"}
        torch.testing.assert_close(c["eps"], nonlinear_eps(c["x"], torch.full((3,), c["t"])))
    c = calls[0]
    if name != "ddim_invert":                 # x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t at the step's t
        torch.testing.assert_close(c["x0_hat"], predict_x0(c["x"], c["eps"], float(ac[c["t"]])))
        torch.testing.assert_close(c["x"], x)
    else:                                     # the first inversion step starts from clean x_0
        torch.testing.assert_close(c["x0_hat"], x)
