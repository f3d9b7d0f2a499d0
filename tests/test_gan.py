"""Tests of diffnotes.personalization.gan: the StyleGAN-like generator, W / W+ inversion, PTI,
EWC. Tiny sizes; the shipped weights only where the test is about them."""
import pytest
import torch

from diffnotes.personalization import gan


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    return gan.Generator().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def D():
    torch.manual_seed(1)
    return gan.Discriminator().eval().requires_grad_(False)


def test_shapes(G, D):
    z = torch.randn(3, G.cfg.z_dim, generator=torch.Generator().manual_seed(0))
    w = G.mapping(z)
    assert w.shape == (3, G.cfg.w_dim)
    ws = gan.broadcast_w(w, G.num_layers)
    assert ws.shape == (3, G.num_layers, G.cfg.w_dim)
    x = G.synthesis(ws)
    assert x.shape == (3, 3, 32, 32)
    assert D(x).shape == (3,)
    assert G.num_layers == 2 * len(G.cfg.channels)


def test_adain_is_instance_norm_not_layer_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 6, generator=g, dtype=torch.float64) * \
        torch.arange(1, 6, dtype=torch.float64)[None, :, None, None] + 3
    s, b = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g,
                                                                          dtype=torch.float64)
    y = gan.adain(x, s, b, eps=0.0)
    ref = torch.nn.functional.instance_norm(x, eps=0.0) * s[..., None, None] + b[..., None, None]
    assert torch.allclose(y, ref, atol=1e-10)
    # per channel the output has mean b and std |s|: the style sets each channel's statistics
    assert torch.allclose(y.mean((2, 3)), b, atol=1e-10)
    assert torch.allclose(y.std((2, 3), unbiased=False), s.abs(), atol=1e-10)
    ln = gan.layer_norm_modulation(x, s, b, eps=0.0)
    assert not torch.allclose(ln.mean((2, 3)), b, atol=1e-3)     # "AdaLN" does not


@pytest.mark.parametrize("crossover", ["zero", "last"])
def test_style_mixing_endpoints(G, crossover):
    g = torch.Generator().manual_seed(2)
    w1, w2 = G.mapping(torch.randn(2, 64, generator=g)), G.mapping(torch.randn(2, 64, generator=g))
    k = 0 if crossover == "zero" else G.num_layers
    mixed = G.synthesis(gan.mix_styles(w1, w2, k, G.num_layers))
    single = gan.generate(G, w2 if k == 0 else w1)
    assert torch.equal(mixed, single)
    mid = G.synthesis(gan.mix_styles(w1, w2, G.num_layers // 2, G.num_layers))
    assert not torch.equal(mid, single)


def test_w_plus_equal_rows_is_w_bitwise(G):
    w = G.mapping(torch.randn(4, 64, generator=torch.Generator().manual_seed(3)))
    ws = w[:, None, :].repeat(1, G.num_layers, 1).clone()      # contiguous, independent rows
    assert torch.equal(gan.generate(G, ws), gan.generate(G, w))


def test_truncation_psi_one_identity_and_zero_mean(G):
    w = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    avg = torch.randn(64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(gan.truncate(w, avg, 1.0), w)
    assert torch.equal(gan.truncate(w, avg, 0.0), avg.expand_as(w))
    half = gan.truncate(w.double(), avg.double(), 0.5)
    assert torch.allclose(half, avg.double() + 0.5 * (w.double() - avg.double()), atol=1e-12)


def test_inversion_reduces_loss_and_keeps_G(G):
    before = {k: v.clone() for k, v in G.state_dict().items()}
    target = gan.generate(G, G.mapping(torch.randn(2, 64, generator=torch.Generator()
                                                   .manual_seed(6)))).detach()
    rw = gan.invert(G, target, "w", steps=15, progress=False)
    rp = gan.invert(G, target, "w+", steps=15, progress=False)
    assert rw["history"][-1] < rw["history"][0]
    assert rw["ws"].shape == rp["ws"].shape == (2, G.num_layers, 64)
    # W inversion's code broadcast is a valid W+ code giving the same image
    assert torch.equal(gan.generate(G, rw["ws"]), gan.generate(G, rw["w"]))
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())  # G unchanged
    r0 = gan.invert(G, target, "w+", steps=0, progress=False)
    assert torch.equal(r0["ws"], gan.broadcast_w(G.w_avg[None].expand(2, -1), G.num_layers))


def test_pti_pivot_fixed_generator_tuned(G):
    target = gan.training_images(1, seed=11)
    pivot = gan.invert(G, target, "w", steps=5, progress=False)["w"]
    saved = pivot.clone()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    r = gan.pti(G, target, pivot=pivot, steps=8, lr=3e-3, progress=False)
    assert torch.equal(r["pivot"], saved) and torch.equal(pivot, saved)
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())  # source untouched
    assert r["mse"][0] < r["pivot_mse"][0]
    changed = any(not torch.equal(p, q) for p, q in zip(r["generators"][0].parameters(),
                                                         G.parameters()))
    assert changed
    r0 = gan.pti(G, target, pivot=pivot, steps=0, progress=False)
    assert torch.equal(r0["images"], gan.generate(G, pivot))              # 0 steps: no-op


def test_ewc_penalty_properties():
    torch.manual_seed(0)
    Gs = gan.Generator()
    theta = {k: v.detach().clone().double() for k, v in Gs.named_parameters()}
    Gd = gan.Generator().double()
    Gd.load_state_dict({k: v.double() for k, v in Gs.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    fisher = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()}
    name = "synthesis.to_rgb.weight"
    fisher[name] = torch.zeros_like(fisher[name])
    assert gan.ewc_penalty(Gd, fisher, theta, 3.0).item() == 0.0            # zero at θ*
    delta = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()}

    def at(t):
        with torch.no_grad():
            for k, p in Gd.named_parameters():
                p.copy_(theta[k] + t * delta[k])
        return gan.ewc_penalty(Gd, fisher, theta, 3.0)

    p1, p2, p3 = at(1.0).item(), at(2.0).item(), at(-3.0).item()
    assert abs(p2 - 4 * p1) <= 1e-10 * p2 and abs(p3 - 9 * p1) <= 1e-10 * p3   # quadratic
    closed = 3.0 * sum((fisher[k] * delta[k] ** 2).sum() for k in theta).item()
    assert abs(p1 - closed) <= 1e-10 * closed
    at(1.0).backward()
    grads = dict(Gd.named_parameters())
    assert torch.count_nonzero(grads[name].grad) == 0                       # zero-Fisher: free
    k2 = "synthesis.const"
    assert torch.allclose(grads[k2].grad, 2 * 3.0 * fisher[k2] * delta[k2], atol=1e-12)
    with pytest.raises(ValueError, match="lam"):
        gan.ewc_penalty(Gd, fisher, theta, -1.0)


def test_ewc_fisher_nonnegative_and_adapt_runs(G, D):
    f = gan.ewc_fisher(G, D, n=3, progress=False)
    assert set(f) == {k for k, _ in G.named_parameters()}
    assert all((v >= 0).all() for v in f.values()) and sum(v.sum() for v in f.values()) > 0
    imgs = gan.few_shot_hearts(4)
    Ga, _, hist = gan.adapt(G, D, imgs, steps=2, ewc_weight=1.0, fisher=f, progress=False)
    assert len(hist["g"]) == 2 and hist["ewc"][0] == 0.0
    Gb, _, _ = gan.adapt(G, D, imgs, steps=0, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(Gb.parameters(), G.parameters()))


def test_bad_input(G, D):
    t = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="space"):
        gan.invert(G, t, "z")
    with pytest.raises(ValueError, match="target"):
        gan.invert(G, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="steps"):
        gan.invert(G, t, steps=-1)
    with pytest.raises(ValueError, match="crossover"):
        gan.mix_styles(torch.zeros(1, 64), torch.zeros(1, 64), G.num_layers + 1, G.num_layers)
    with pytest.raises(ValueError, match="pivot"):
        gan.pti(G, t, pivot=torch.zeros(2, 64), steps=1, progress=False)
    with pytest.raises(ValueError, match="fisher"):
        gan.adapt(G, D, t, steps=1, ewc_weight=1.0)
    with pytest.raises(ValueError, match="n"):
        gan.training_images(0)


def test_shipped_weights_load_and_generate():
    if not (gan.WEIGHTS_DIR / "model.safetensors").is_file():
        pytest.fail("the shipped GAN weights are missing")
    G, D = gan.load_gan(with_discriminator=True)
    x = G(torch.randn(8, G.cfg.z_dim, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()
    # no output non-linearity (as in StyleGAN): most pixels lie in the data range [-1, 1]
    assert (x.abs() <= 1.1).float().mean() > 0.9
    assert x.mean().abs() < 1.0
    assert D(x).shape == (8,)
    assert not any(p.requires_grad for p in G.parameters())
