"""Shared fixtures. Every test runs offline: no model hub is ever contacted."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# The GPU simulation switch belongs to the notebooks test_gpu_cells.py starts, not to this process
# (tests here check that Stable Diffusion without weights fails with one clear error).
os.environ.pop("DIFFNOTES_SIMULATE_GPU", None)

import pytest  # noqa: E402
import torch  # noqa: E402

from diffnotes.schedules import alphas_cumprod, make_betas  # noqa: E402

# The models under test are tiny: extra intra-op threads only add hand-off overhead, and
# `make test` runs two workers on two cores. One thread per test process.
torch.set_num_threads(1)


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test, restored afterwards (tests that share an
    xdist worker process keep float32). Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def linear_schedule():
    """DDPM's linear schedule, T = 1000, float64: (betas, alphas_cumprod)."""
    b = make_betas("linear")
    return b, alphas_cumprod(b)


@pytest.fixture
def nonlinear_eps():
    """A smooth nonlinear stand-in for a network (float64): ε(x, t) = ½ W₂ tanh(W₁x + 0.01 t) + sin x.

    Works on (B, D) inputs with D = 6.
    """
    g = torch.Generator().manual_seed(1)
    W1 = torch.randn(6, 6, generator=g, dtype=torch.float64) / 6 ** 0.5
    W2 = torch.randn(6, 6, generator=g, dtype=torch.float64) / 6 ** 0.5

    def eps(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        flat = x.reshape(x.shape[0], -1)
        h = torch.tanh(flat @ W1.T + 0.01 * t.reshape(-1, 1))
        return (0.5 * h @ W2.T).reshape(x.shape) + torch.sin(x)

    return eps


@pytest.fixture(scope="session")
def digits_unet():
    """The shipped class-conditional digits UNet (diffnotes.models.digits)."""
    from diffnotes.models import digits
    return digits.load_unet()


@pytest.fixture(scope="session")
def digits_clf():
    """The shipped noise-conditional digits classifier."""
    from diffnotes.models import digits
    return digits.load_classifier()


@pytest.fixture(scope="module", params=["shapes", "sd-1.5-layout-tiny"])
def pipe(request):
    """Both text-to-image layouts every editing and recognition function must run on, in float64
    (exact no-op tests): the shipped shapes pipeline and the random SD-1.5-layout tiny one."""
    from diffnotes.models.load import load_pipeline
    p = load_pipeline(request.param)
    p.to(torch.float64)
    return p
