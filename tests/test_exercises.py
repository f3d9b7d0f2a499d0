"""The Part I checkers: the reference passes, wrong answers fail with the right diagnosis."""
import re

import pytest
import torch

from diffnotes import ddim, ddpm
from diffnotes.exercises import available, check
from diffnotes.schedules import alphas_cumprod

# Small tensors on a shared, busy 2-core machine: torch's intra-op threads only add barrier
# waits (a 4000-element sqrt took 24 ms with 2 threads under load, 0.07 ms with 1).
torch.set_num_threads(1)

PART1 = ["q_sample", "predict_x0", "posterior_mean_variance", "ddpm_step_mean", "ddim_sigma",
         "ddim_step", "ode_coords"]


def test_part1_checkers_are_registered():
    assert set(PART1) <= set(available())


@pytest.mark.parametrize("name,fn", [
    ("q_sample", ddpm.q_sample), ("predict_x0", ddpm.predict_x0),
    ("posterior_mean_variance", ddpm.posterior_mean_variance), ("ddim_sigma", ddim.ddim_sigma),
    ("ddim_step", ddim.ddim_step), ("ode_coords", ddim.ode_coords)])
def test_reference_passes(name, fn):
    r = check(name, fn, cases=8, verbose=False)
    assert r.passed, r.message
    assert r.cases == 8


# ----------------------------------------------------------------------------- student answers
def q_sample_own(x0, t, alphas_cumprod, noise):
    a = alphas_cumprod[t]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def q_sample_no_sqrt(x0, t, alphas_cumprod, noise):      # Gormley & Chai, Property #1's misprint
    a = alphas_cumprod[t]
    return a.sqrt() * x0 + (1 - a) * noise


def q_sample_flat(x0, t, alphas_cumprod, noise):
    return q_sample_own(x0, t, alphas_cumprod, noise).reshape(-1)


def q_sample_crash(x0, t, alphas_cumprod, noise):
    return x0 @ noise                                     # wrong inner dimensions


def ddpm_step_mean_own(x_t, eps, t, betas):
    ac = alphas_cumprod(betas)
    return (x_t - betas[t] / (1 - ac[t]).sqrt() * eps) / (1 - betas[t]).sqrt()


def ddpm_step_mean_seed(x_t, eps, t, betas):              # Algorithm 2 as printed in Ahmad's notes
    a = 1 - betas[t]
    return (x_t - (1 - a) / (1 - a).sqrt() * eps) / a.sqrt()


def ddim_sigma_printed_1_24(alpha_bar_t, alpha_bar_prev, eta):
    beta = 1 - alpha_bar_t / alpha_bar_prev
    return eta * (((1 - alpha_bar_prev) / (1 - alpha_bar_t)) ** 0.5 * beta) ** 0.5


def posterior_large_variance(x0, x_t, t, betas):
    mean, _ = ddpm.posterior_mean_variance(x0, x_t, t, betas)
    return mean, betas[t]


def test_own_implementations_pass():
    assert check("q_sample", q_sample_own, verbose=False).passed
    assert check("ddpm_step_mean", ddpm_step_mean_own, verbose=False).passed


def test_shape_error_reported_as_shape():
    r = check("q_sample", q_sample_flat, verbose=False)
    assert not r.passed
    assert r.message.startswith("shape:")
    assert re.search(r"has shape \(\d+,\), expected \(\d+, \d+\)", r.message)


def test_value_error_names_the_index():
    r = check("q_sample", q_sample_no_sqrt, verbose=False)
    assert not r.passed and r.message.startswith("value:")
    # recompute the first bad element independently and compare with the report
    kw = r.details["inputs"]
    got = q_sample_no_sqrt(**kw)
    want = ddpm.q_sample(**kw)
    bad = ~torch.isclose(got, want, rtol=1e-9, atol=1e-12)
    first = tuple(int(i) for i in bad.nonzero()[0])
    assert r.details["index"] == first
    assert f"the output{list(first)}" in r.message
    assert r.details["got"] == pytest.approx(got[first].item())


def test_exception_is_reported_not_raised():
    r = check("q_sample", q_sample_crash, verbose=False)
    assert not r.passed
    assert r.message.startswith("raised RuntimeError")


def test_seed_misprints_fail():
    assert not check("ddpm_step_mean", ddpm_step_mean_seed, verbose=False).passed
    r = check("ddim_sigma", ddim_sigma_printed_1_24, cases=10, verbose=False)
    assert not r.passed and "value" in r.message
    r = check("posterior_mean_variance", posterior_large_variance, verbose=False)
    assert not r.passed and "output 1" in r.message       # the mean is right, the variance not


def test_wrong_number_of_outputs():
    r = check("posterior_mean_variance", lambda x0, x_t, t, betas: x0, verbose=False)
    assert not r.passed and "returned 1 value(s), expected 2" in r.message


def test_verdict_is_deterministic():
    for fn in (q_sample_no_sqrt, q_sample_own):
        a = check("q_sample", fn, verbose=False)
        b = check("q_sample", fn, verbose=False)
        assert (a.passed, a.message, a.cases) == (b.passed, b.message, b.cases)


def test_student_cannot_corrupt_the_reference():
    def mutating(x0, t, alphas_cumprod, noise):
        out = ddpm.q_sample(x0, t, alphas_cumprod, noise)
        x0.mul_(0), noise.mul_(0), alphas_cumprod.fill_(0.5)
        return out
    assert check("q_sample", mutating, verbose=False).passed


def test_ddim_step_eta_cases_are_exercised():
    # an answer that ignores sigma (always eta = 0) must fail on some case with eta > 0
    def no_noise(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise):
        return ddim.ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, 0.0)
    assert not check("ddim_step", no_noise, cases=10, verbose=False).passed


def test_raise_on_fail_and_unknown_name():
    with pytest.raises(AssertionError, match="q_sample"):
        check("q_sample", q_sample_no_sqrt, verbose=False, raise_on_fail=True)
    with pytest.raises(ValueError, match="name must be one of"):
        check("no_such_exercise", q_sample_own)
