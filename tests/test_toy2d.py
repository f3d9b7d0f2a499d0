"""diffnotes.models.toy2d: datasets, the MLP denoiser, its training, the sliced-Wasserstein score."""
import pytest
import torch

from diffnotes.ddim import ddim_sample
from diffnotes.models.toy2d import (ToyMLP, load_toy2d, make_dataset, sliced_wasserstein,
                                    timestep_embedding, train_toy2d)
from diffnotes.schedules import alphas_cumprod, make_betas, make_timesteps

# Small tensors on a shared, busy 2-core machine: torch's intra-op threads only add barrier
# waits (a 4000-element sqrt took 24 ms with 2 threads under load, 0.07 ms with 1).
torch.set_num_threads(1)

AC = alphas_cumprod(make_betas("linear", 1000))


@pytest.mark.parametrize("name", ["moons", "swiss_roll"])
def test_dataset_seeded_and_normalised(name):
    a, b, c = make_dataset(name, 500, seed=1), make_dataset(name, 500, seed=1), \
        make_dataset(name, 500, seed=2)
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.mean(0).abs().max() < 1e-5
    assert a.pow(2).sum(1).mean().item() == pytest.approx(2.0, rel=1e-4)


def test_dataset_bad_input():
    with pytest.raises(ValueError, match="name"):
        make_dataset("circles")
    with pytest.raises(ValueError, match="n must"):
        make_dataset("moons", 0)


def test_embedding_and_model_shapes():
    e = timestep_embedding(torch.tensor([0, 1, 999]), 32)
    assert e.shape == (3, 32)
    torch.testing.assert_close(e[0], torch.cat([torch.ones(16), torch.zeros(16)]))
    m = ToyMLP()
    x = torch.randn(5, 2, dtype=torch.float64)
    out = m(x, 7)
    assert out.shape == (5, 2) and out.dtype == torch.float64
    torch.testing.assert_close(m(x, torch.full((5,), 7)), out)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        m(torch.randn(5, 3), 0)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        m(x, 1000)
    with pytest.raises(ValueError, match="t must be an int or have shape"):
        m(x, torch.zeros(4, dtype=torch.long))


def test_train_bad_input():
    with pytest.raises(ValueError, match="data must have shape"):
        train_toy2d(torch.randn(10, 3), 5, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_toy2d(torch.randn(10, 2), 0, progress=False)


def test_sliced_wasserstein():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 2, generator=g)
    assert sliced_wasserstein(a, a) == 0.0
    b = a + torch.tensor([1.0, 0.0])
    # a pure shift by 1 along x: the projected shift averages E|cos θ| = 2/π over directions
    assert sliced_wasserstein(a, b, n_projections=1000) == pytest.approx(2 / torch.pi, rel=0.06)
    with pytest.raises(ValueError, match="same number of columns"):
        sliced_wasserstein(a, torch.randn(3, 3))


def test_training_is_deterministic_and_learns_moons():
    data = make_dataset("moons", 2000, seed=0)
    m1, l1 = train_toy2d(data, 800, torch.Generator().manual_seed(0), progress=False)
    _, l2 = train_toy2d(data, 20, torch.Generator().manual_seed(3), progress=False)
    _, l3 = train_toy2d(data, 20, torch.Generator().manual_seed(3), progress=False)
    assert l2 == l3 and l2 != l1[:20]                        # same seed, same run
    first, last = sum(l1[:100]) / 100, sum(l1[-100:]) / 100
    assert last < 0.85 * first                               # the loss goes down
    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    ts = make_timesteps(50)
    samples = ddim_sample(m1, x_T, ts, AC)
    untrained = ddim_sample(ToyMLP(), x_T, ts, AC)
    ref = make_dataset("moons", 1000, seed=7)
    d_model = sliced_wasserstein(samples, data)
    assert d_model < 0.6 * sliced_wasserstein(x_T, data)      # much closer than the noise
    assert d_model < 0.6 * sliced_wasserstein(untrained, data)
    assert d_model < 12 * sliced_wasserstein(ref, data)       # within reach of a fresh draw


def test_shipped_weights_sample_moons():
    try:
        m = load_toy2d("moons", train_if_missing=False)
    except FileNotFoundError:
        pytest.skip("weights not shipped yet")
    data = make_dataset("moons", 2000)
    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    samples = ddim_sample(m, x_T, make_timesteps(50), AC)
    assert sliced_wasserstein(samples, data) < 0.35 * sliced_wasserstein(x_T, data)


def test_ddim_explorer_static_twin_and_bad_input():
    from diffnotes.widgets._core import StaticExplorer
    from diffnotes.widgets.ddim import ddim_explorer

    model = ToyMLP()
    x_T = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    w = ddim_explorer(model, x_T, AC, etas=[0.0, 1.0], steps_list=[2, 3], live=False)
    assert isinstance(w, StaticExplorer)
    assert len(w.frames) == 4 and w.params == {"eta": [0.0, 1.0], "steps": [2, 3]}
    html = w.to_html()
    assert html.count("data:image/png;base64,") == 5 and "<script>" in html   # 4 frames + the first shown
    with pytest.raises(ValueError, match="etas must be >= 0"):
        ddim_explorer(model, x_T, AC, etas=[-0.1], live=False)
    with pytest.raises(ValueError, match=r"steps_list must hold ints in \[1, 1000\]"):
        ddim_explorer(model, x_T, AC, steps_list=[0], live=False)
    with pytest.raises(ValueError, match="no default render"):
        ddim_explorer(model, torch.randn(5, 3), AC, live=False)
