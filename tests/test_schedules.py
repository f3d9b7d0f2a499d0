"""Schedules against diffusers and against the worked numbers of the study notes (F6)."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffnotes.schedules import alphas_cumprod, make_betas, make_timesteps, snr


@pytest.mark.parametrize("kind,dname", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                         ("cosine", "squaredcos_cap_v2")])
def test_betas_match_diffusers(kind, dname):
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if kind == "scaled_linear" else {}
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=dname, **kw).betas.double()
    ours = make_betas(kind)
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    # diffusers builds its schedules in float32: agreement to float32 precision
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-9)


def test_worked_values_linear():
    # DDPM's linear schedule, 1-based ᾱ_t as in the papers: index t-1 here
    ac = alphas_cumprod(make_betas("linear"))
    for t, v in [(1, 0.9999), (100, 0.897018), (250, 0.524085), (500, 0.078587),
                 (750, 0.003351)]:
        assert ac[t - 1].item() == pytest.approx(v, abs=1e-6)
    assert ac[-1].item() == pytest.approx(4.04e-5, rel=1e-2)
    s = snr(ac)
    assert s[249].item() == pytest.approx(1.1012, abs=1e-4)
    assert s[499].item() == pytest.approx(0.08529, abs=1e-5)


def test_worked_values_scaled_linear():
    ac = alphas_cumprod(make_betas("scaled_linear"))
    assert ac[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert ac[-1].item() == pytest.approx(0.004660, abs=1e-6)


def test_variance_recursion_matches_closed_form():
    # Var_t = α_t Var_{t-1} + β_t from 0 gives 1 - ᾱ_t (eq 1.1 iterated vs eq 1.3)
    b = make_betas("linear")
    var, out = 0.0, []
    for beta in b.tolist():
        var = (1 - beta) * var + beta
        out.append(var)
    torch.testing.assert_close(torch.tensor(out, dtype=torch.float64), 1 - alphas_cumprod(b),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n,spacing,offset", [(50, "leading", 1), (50, "leading", 0),
                                               (10, "trailing", 0), (7, "leading", 0)])
def test_timesteps_match_diffusers(n, spacing, offset):
    s = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    s.set_timesteps(n)
    assert make_timesteps(n, spacing=spacing, steps_offset=offset) == s.timesteps.tolist()


def test_sd_grid():
    ts = make_timesteps(50, steps_offset=1)
    assert ts[:2] == [981, 961] and ts[-1] == 1


@pytest.mark.parametrize("kw,match", [
    (dict(kind="nope"), "kind"), (dict(kind="linear", T=0), "T"),
    (dict(kind="linear", beta_start=0.0), "beta_start"),
    (dict(kind="linear", beta_end=1.5), "beta_end"),
    (dict(kind="cosine", beta_end=0.02), "beta_start and beta_end"),
])
def test_make_betas_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        make_betas(**kw)


def test_alphas_cumprod_rejects_betas_outside_unit_interval():
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\).*1\.2"):
        alphas_cumprod(torch.tensor([0.1, 1.2]))
    with pytest.raises(ValueError, match="betas"):
        alphas_cumprod(torch.tensor([0.0, 0.1]))


def test_make_timesteps_bad_input():
    with pytest.raises(ValueError, match="num_steps"):
        make_timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        make_timesteps(10, spacing="middle")
