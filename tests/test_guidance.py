"""Guidance on the analytic mixture: exact identities, conventions, batching, dropout, bad input.

Ahmad's notes, §1.4 (eqs 1.28–1.36, 1.44); the controlled-generation blog, §2. float64 for every exact equivalence.
"""
import math

import pytest
import sympy as sp
import torch

from diffnotes import guidance as G
from diffnotes.ddpm import ddpm_sample
from diffnotes.models.gmm import GaussianMixture
from diffnotes.schedules import alphas_cumprod, make_betas

SCALES = [0.0, 0.5, 1.0, 2.0, 3.0, 7.5, -1.5]


@pytest.fixture
def gmm(linear_schedule):
    _, ac = linear_schedule
    return GaussianMixture([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], stds=[0.6, 0.4, 0.5],
                           weights=[0.5, 0.3, 0.2], alphas_cumprod=ac)


@pytest.fixture
def xs():
    return torch.randn(256, 2, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64) * 1.5


# ----------------------------------------------------------------------------- CG = CFG exactly
@pytest.mark.parametrize("t", [0, 50, 250, 500, 900, 999])
def test_classifier_guidance_with_exact_classifier_equals_cfg(gmm, xs, t):
    """ε_u − s√(1−ᾱ)∇log p(y|x_t) = ε_u + s(ε_y − ε_u) for every s (Ahmad's notes, eqs 1.30, 1.35, 1.44)."""
    a = float(gmm.alphas_cumprod[t])
    for y in range(3):
        eu, ec = gmm.eps(xs, t), gmm.eps(xs, t, y)
        grad = gmm.grad_log_class_posterior(xs, t, y)
        for s in SCALES:
            cg = G.classifier_guidance(eu, grad, a, s)
            free = G.cfg(eu, ec, s)
            assert (cg - free).abs().max().item() < 1e-12


def test_classifier_guidance_per_row_alpha_bar(gmm, xs):
    t = torch.randint(0, 1000, (xs.shape[0],), generator=torch.Generator().manual_seed(3))
    a = gmm.alphas_cumprod[t]
    cg = G.classifier_guidance(gmm.eps(xs, t), gmm.grad_log_class_posterior(xs, t, 1), a, 2.5)
    torch.testing.assert_close(cg, G.cfg(gmm.eps(xs, t), gmm.eps(xs, t, 1), 2.5),
                               rtol=0, atol=1e-12)


def test_scale_one_is_conditional_and_zero_unconditional(gmm, xs):
    eu, ec = gmm.eps(xs, 300), gmm.eps(xs, 300, 2)
    assert torch.equal(G.cfg(eu, ec, 0.0), eu)
    torch.testing.assert_close(G.cfg(eu, ec, 1.0), ec, rtol=0, atol=1e-15)
    grad = gmm.grad_log_class_posterior(xs, 300, 2)
    torch.testing.assert_close(G.classifier_guidance(eu, grad, float(gmm.alphas_cumprod[300]), 1),
                               ec, rtol=0, atol=1e-12)


def test_cfg_numeric_vector():
    """Hand-computed: ε_u = [0, 1, −½], ε_c = [1, 1, ½], scale 7.5 → [7.5, 1, 7]."""
    eu = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64)
    ec = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    assert G.cfg(eu, ec, 7.5).tolist() == [7.5, 1.0, 7.0]


def test_guidance_step_raises_classifier_log_prob(gmm, xs):
    """Sign check: one small DDIM-like move along −ε̃ with scale > 0 raises log p(y|x)."""
    t, y = 200, 0
    a = float(gmm.alphas_cumprod[t])
    eu = gmm.eps(xs, t)
    grad = gmm.grad_log_class_posterior(xs, t, y)
    # x moves by −h √(1−ᾱ) · ε̃ / ... ; the guidance part of that move is +h s (1−ᾱ) ∇log p(y|x)
    h = 1e-3
    move_u = -h * eu
    move_g = -h * G.classifier_guidance(eu, grad, a, 3.0)
    lp = lambda x: torch.log(gmm.class_posterior(x, t)[:, y])  # noqa: E731
    gain = lp(xs + move_g) - lp(xs + move_u)
    assert (gain > 0).float().mean() > 0.99


# ----------------------------------------------------------------------------- conventions, sympy
def test_bayes_gradient_is_exact(gmm, xs):
    """Eq 1.34 is exact: ∇ log p_t(y|x) (autograd) = ∇ log p_t(x|y) − ∇ log p_t(x)."""
    x = xs.clone().requires_grad_(True)
    for y in range(3):
        (g,) = torch.autograd.grad(torch.log(gmm.class_posterior(x, 350)[:, y]).sum(), x)
        torch.testing.assert_close(g, gmm.score(xs, 350, y) - gmm.score(xs, 350),
                                   rtol=0, atol=1e-12)


def test_wrong_factor_breaks_cg_cfg_equality(gmm, xs):
    """With (1−ᾱ) in place of √(1−ᾱ) (a misreading of eq 1.30) the identity fails."""
    t, s = 100, 3.0
    a = float(gmm.alphas_cumprod[t])
    eu, ec = gmm.eps(xs, t), gmm.eps(xs, t, 0)
    grad = gmm.grad_log_class_posterior(xs, t, 0)
    wrong = eu - s * (1 - a) * grad
    assert (wrong - G.cfg(eu, ec, s)).abs().max().item() > 0.1


def test_snr_weight_schedule_grows_at_low_noise(linear_schedule):
    """The controlled-generation blog, §2.4.3: w̄·SNR^½ with w̄ = 5 is ≈0.032 at t = 999 and ≈500 at t = 0."""
    from diffnotes.schedules import snr

    _, ac = linear_schedule
    w = 5 * snr(ac) ** 0.5
    assert abs(w[999].item() - 0.0318) < 1e-3 and abs(w[0].item() - 500.0) < 0.1
    assert bool((w[:-1] >= w[1:]).all())              # decreasing in t: largest at low noise


def test_ho_salimans_convention_sympy():
    """Eq 1.36's (w+1)ε_c − wε_u is eq 1.44's ε_u + s(ε_c − ε_u) with s = w + 1; the notes'
    second line of eq 1.36, ε_c − w(ε_c − ε_u), is a different rule (the sign is wrong)."""
    eu, ec, w, s = sp.symbols("epsilon_u epsilon_c w s")
    eq144 = eu + s * (ec - eu)
    eq136 = (w + 1) * ec - w * eu
    assert sp.simplify(eq144.subs(s, w + 1) - eq136) == 0
    # the derivation: CG applied to the *conditional* model with the implicit classifier
    sig = sp.symbols("sigma", positive=True)
    grad = -(ec - eu) / sig                                    # eq 1.35
    assert sp.simplify((ec - sig * w * grad) - eq136) == 0     # first line of eq 1.36
    printed_second_line = ec - w * (ec - eu)
    assert sp.simplify(printed_second_line - eq136) != 0
    assert G.scale_from_ho_salimans(0.0) == 1.0
    assert G.ho_salimans_from_scale(7.5) == 6.5
    e_u = torch.tensor([0.3, -1.0], dtype=torch.float64)
    e_c = torch.tensor([1.1, 0.4], dtype=torch.float64)
    for wv in (0.0, 1.0, 6.5):
        torch.testing.assert_close(G.cfg(e_u, e_c, G.scale_from_ho_salimans(wv)),
                                   (wv + 1) * e_c - wv * e_u, rtol=0, atol=1e-15)


def test_seed_eq_1_28_factoring_sympy():
    """Eq 1.28: −ε/√(1−ᾱ) + g = −(ε − √(1−ᾱ) g)/√(1−ᾱ); with the notes' λ, σ̄ it holds only if
    both mean ᾱ_t."""
    eps, g, a = sp.symbols("epsilon g alpha_bar", positive=True)
    lhs = -eps / sp.sqrt(1 - a) + g
    rhs = -(eps - sp.sqrt(1 - a) * g) / sp.sqrt(1 - a)
    assert sp.simplify(lhs - rhs) == 0


def test_cfg_is_affine_in_scale(gmm, xs):
    eu, ec = gmm.eps(xs, 100), gmm.eps(xs, 100, 1)
    d = G.cfg(eu, ec, 2.0) - G.cfg(eu, ec, 1.0)
    torch.testing.assert_close(d, ec - eu, rtol=0, atol=1e-14)


def test_per_row_scale(gmm, xs):
    eu, ec = gmm.eps(xs, 100), gmm.eps(xs, 100, 1)
    s = torch.linspace(0, 5, xs.shape[0], dtype=torch.float64)
    out = G.cfg(eu, ec, s)
    for i in (0, 17, 255):
        torch.testing.assert_close(out[i], G.cfg(eu[i:i + 1], ec[i:i + 1], float(s[i]))[0])


# ----------------------------------------------------------------------------- batched model
def test_guided_eps_model_one_batched_call_equals_separate(gmm, xs):
    calls = []
    base = G.mixture_cond_model(gmm)

    def model(x, t, y):
        calls.append((x.shape[0], y.clone()))
        return base(x, t, y)

    eps_model = G.guided_eps_model(model, 2, -1, 4.0)
    t = torch.full((xs.shape[0],), 400)
    out = eps_model(xs, t)
    assert len(calls) == 1 and calls[0][0] == 2 * xs.shape[0]
    assert (calls[0][1][:256] == -1).all() and (calls[0][1][256:] == 2).all()
    torch.testing.assert_close(out, G.cfg(gmm.eps(xs, 400), gmm.eps(xs, 400, 2), 4.0),
                               rtol=0, atol=1e-14)
    # per-row labels and int t
    y = torch.randint(0, 3, (xs.shape[0],), generator=torch.Generator().manual_seed(1))
    out = G.guided_eps_model(base, y, -1, 2.0)(xs, 400)
    torch.testing.assert_close(out, G.cfg(gmm.eps(xs, 400), gmm.eps(xs, 400, y), 2.0),
                               rtol=0, atol=1e-14)
    # the fast exact path agrees
    torch.testing.assert_close(G.mixture_guided_eps(gmm, 2, 4.0)(xs, t),
                               G.guided_eps_model(base, 2, -1, 4.0)(xs, t), rtol=0, atol=1e-14)


def test_guided_eps_model_with_tiny_unet_matches_two_passes():
    """The batched pass equals two separate passes on a random class-conditional UNet2DModel."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       num_class_embeds=11).eval()
    model = lambda x, t, y: unet(x, t, class_labels=y).sample  # noqa: E731
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 900])
    with torch.no_grad():
        out = G.guided_eps_model(model, torch.tensor([1, 4, 7]), 10, 3.0)(x, t)
        eu = model(x, t, torch.full((3,), 10))
        ec = model(x, t, torch.tensor([1, 4, 7]))
    torch.testing.assert_close(out, eu + 3.0 * (ec - eu), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- multi-condition
def _factorised(ac):
    g1 = GaussianMixture([[-2.0], [2.0]], stds=0.3 ** 0.5, alphas_cumprod=ac)
    g2 = GaussianMixture([[-1.0], [3.0]], stds=0.3 ** 0.5, alphas_cumprod=ac)
    return g1, g2, G.product_mixture_cond_model([g1, g2])


def test_multi_cfg_exact_composition_on_factorised_mixture(linear_schedule, xs):
    """Conditionally independent channels: ε(c1, c2) = ε_u + (ε_1 − ε_u) + (ε_2 − ε_u)."""
    _, ac = linear_schedule
    g1, g2, model = _factorised(ac)
    B = xs.shape[0]
    for t in (10, 200, 700):
        tt = torch.full((B,), t)
        c = lambda a, b: torch.tensor([[a, b]]).expand(B, 2)  # noqa: E731
        eu, e1, e2 = model(xs, tt, c(-1, -1)), model(xs, tt, c(1, -1)), model(xs, tt, c(-1, 0))
        both = model(xs, tt, c(1, 0))
        torch.testing.assert_close(G.multi_cfg(eu, [e1, e2], [1.0, 1.0]), both,
                                   rtol=0, atol=1e-13)
    # the worked value of the study notes (B7, test 4; computed there independently in numpy):
    # x = (0.3, −0.7) at ᾱ = alphas_cumprod[200], weights (2, 3)
    x = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    t = torch.tensor([200])
    e = [model(x, t, torch.tensor([[a, b]])) for a, b in ((-1, -1), (1, -1), (-1, 0))]
    out = G.multi_cfg(e[0], e[1:], [2.0, 3.0])
    torch.testing.assert_close(out, torch.tensor([[-1.93099792, 0.12027961]], dtype=torch.float64),
                               rtol=0, atol=1e-7)


def test_multi_cfg_reductions(gmm, xs):
    eu, e1, e2 = gmm.eps(xs, 50), gmm.eps(xs, 50, 0), gmm.eps(xs, 50, 1)
    assert torch.equal(G.multi_cfg(eu, [e1, e2], [0.0, 0.0]), eu)
    torch.testing.assert_close(G.multi_cfg(eu, [e1], [3.0]), G.cfg(eu, e1, 3.0), rtol=0, atol=0)
    # a negative channel with weight w⁻ = the same channel with weight −w⁻
    torch.testing.assert_close(G.multi_cfg(eu, [e1, e2], [3.0, -2.0]),
                               G.cfg(eu, e1, 3.0) - 2.0 * (e2 - eu), rtol=0, atol=1e-14)
    assert torch.equal(G.multi_cfg(eu, [], []), eu)


def test_guided_eps_model_multi_condition_one_call(linear_schedule, xs):
    _, ac = linear_schedule
    g1, g2, model = _factorised(ac)
    n_calls = []

    def counted(x, t, c):
        n_calls.append(x.shape[0])
        return model(x, t, c)

    null = torch.tensor([[-1, -1]])
    conds = [torch.tensor([[1, -1]]), torch.tensor([[-1, 0]])]
    out = G.guided_eps_model(counted, conds, null, [2.0, -1.0])(xs, 300)
    assert n_calls == [3 * xs.shape[0]]
    tt = torch.full((xs.shape[0],), 300)
    eu, e1, e2 = (model(xs, tt, c.expand(xs.shape[0], 2)) for c in [null] + conds)
    torch.testing.assert_close(out, eu + 2.0 * (e1 - eu) - 1.0 * (e2 - eu), rtol=0, atol=1e-14)


def test_composition_fails_without_conditional_independence(linear_schedule, xs):
    """Correlated labels (non-product weights): the sum of differences is not ε(c1, c2)."""
    _, ac = linear_schedule
    # four corners; attribute a = left/right, b = bottom/top; weights make a and b dependent
    means = [[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]]
    g = GaussianMixture(means, stds=0.7, weights=[0.4, 0.1, 0.1, 0.4], alphas_cumprod=ac)
    t = 300
    r = g.class_posterior(xs, t)
    s_comp = torch.stack([g.score(xs, t, k) for k in range(4)], 1)

    def eps_of(mask):  # ε given "component in mask"
        w = r * mask
        w = w / w.sum(1, keepdim=True)
        return -(1 - g.alphas_cumprod[t]).sqrt() * (w[:, :, None] * s_comp).sum(1)

    eu = g.eps(xs, t)
    e_right = eps_of(torch.tensor([0, 0, 1, 1.0], dtype=torch.float64))
    e_top = eps_of(torch.tensor([0, 1, 0, 1.0], dtype=torch.float64))
    e_both = g.eps(xs, t, 3)
    err = (G.multi_cfg(eu, [e_right, e_top], [1.0, 1.0]) - e_both).abs().max().item()
    assert err > 1e-2


# ----------------------------------------------------------------------------- dropout
def test_condition_dropout_marginal_rates():
    q = [0.1, 0.4642, 0.7]
    n = 200_000
    keep = G.condition_dropout_mask(n, q, torch.Generator().manual_seed(0))
    assert keep.shape == (n, 3) and keep.dtype == torch.bool
    drop = (~keep).double()
    for k, qk in enumerate(q):
        se = math.sqrt(qk * (1 - qk) / n)
        assert abs(drop[:, k].mean().item() - qk) < 5 * se
    # independence: the all-dropped rate is the product, pairwise covariances vanish
    all_drop = drop.prod(1).mean().item()
    u = math.prod(q)
    assert abs(all_drop - u) < 5 * math.sqrt(u * (1 - u) / n)
    c = torch.cov(drop.T)
    assert c[0, 1].abs() < 5e-3 and c[0, 2].abs() < 5e-3 and c[1, 2].abs() < 5e-3


def test_uniform_drop_rate_gives_target_unconditional_rate():
    assert abs(G.uniform_drop_rate(0.1, 3) - 0.4642) < 1e-4
    assert abs(G.uniform_drop_rate(0.2, 2) - 0.4472) < 1e-4
    q = G.uniform_drop_rate(0.15, 4)
    n = 100_000
    keep = G.condition_dropout_mask(n, [q] * 4, torch.Generator().manual_seed(1))
    rate = (~keep).all(1).double().mean().item()
    assert abs(rate - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n)


def test_drop_conditions_uses_own_null_and_availability():
    B = 50_000
    labels = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(0))
    emb = torch.randn(B, 4, generator=torch.Generator().manual_seed(1))
    null_emb = torch.full((4,), 9.0)
    avail = torch.tensor([True, False])
    (l2, e2), keep = G.drop_conditions([labels, emb], [10, null_emb], [0.2, 0.0],
                                       torch.Generator().manual_seed(2), available=avail)
    assert ((l2 == 10) == ~keep[:, 0]).all()
    assert abs((l2 == 10).double().mean().item() - 0.2) < 0.01
    assert (~keep[:, 1]).all() and (e2 == 9.0).all()      # unavailable → always null
    kept = keep[:, 0]
    assert torch.equal(l2[kept], labels[kept])


# ----------------------------------------------------------------------------- tilted distribution
def test_guided_sampling_is_not_the_tilted_distribution():
    """At scale 1 (the plain conditional model) the guided samples match p(x|y) on the grid to
    within the histogram's sampling floor; at scale 4 they are far from p(x) p(y|x)^4."""
    T = 100
    betas = make_betas("linear", T=T, beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)
    ac = alphas_cumprod(betas)
    g = GaussianMixture([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], stds=0.6, alphas_cumprod=ac)
    box, bins, n = ((-4, 4), (-4, 4)), 16, 3000
    scales = torch.tensor([1.0, 4.0], dtype=torch.float64).repeat_interleave(n)
    gen = torch.Generator().manual_seed(0)
    x = ddpm_sample(G.mixture_guided_eps(g, 0, scales),
                    torch.randn(2 * n, 2, generator=gen, dtype=torch.float64), betas,
                    generator=gen, progress=False)
    tv = {}
    floor = {}
    for i, s in enumerate((1.0, 4.0)):
        p = G.grid_density(lambda z: G.tilted_log_density(g, z, 0, s), box, bins)
        h = G.histogram_density(x[i * n:(i + 1) * n], box, bins)
        tv[s] = G.total_variation(h, p)
        idx = torch.multinomial(p.flatten(), n, replacement=True, generator=gen)
        floor[s] = G.total_variation(torch.bincount(idx, minlength=bins * bins)
                                     .double().reshape(bins, bins) / n, p)
    assert tv[1.0] < 2 * floor[1.0] + 0.02
    assert tv[4.0] > 3 * floor[4.0] and tv[4.0] > 0.15


def test_tilted_density_scale_one_is_conditional(gmm, xs):
    a = G.tilted_log_density(gmm, xs, 1, 1.0)
    b = gmm.log_prob(xs, 1.0, 1) + math.log(gmm.weights[1])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_grid_density_and_tv():
    p = G.grid_density(lambda z: -0.5 * (z ** 2).sum(1), ((-5, 5), (-5, 5)), 10)
    assert abs(p.sum().item() - 1) < 1e-12
    # the mass of [0, 1]² under N(0, I): (Φ(1) − ½)² ≈ 0.1165
    assert abs(p[5, 5].item() - (0.5 * math.erf(1 / 2 ** 0.5)) ** 2) < 2e-3
    assert G.total_variation(p, p) == 0.0
    q = torch.zeros_like(p)
    q[0, 0] = 1
    assert abs(G.total_variation(p, q) - (1 - p[0, 0].item())) < 1e-12


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_argument():
    e = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="scale"):
        G.cfg(e, e, float("nan"))
    with pytest.raises(ValueError, match="scale"):
        G.cfg(e, e, torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="eps_uncond and eps_cond"):
        G.cfg(e, torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="scale"):
        G.classifier_guidance(e, e, 0.5, float("inf"))
    with pytest.raises(ValueError, match="eps and grad_log_prob"):
        G.classifier_guidance(e, torch.zeros(3, 3), 0.5, 1.0)
    with pytest.raises(ValueError, match="alpha_bar_t"):
        G.classifier_guidance(e, e, 1.5, 1.0)
    with pytest.raises(ValueError, match="scales"):
        G.multi_cfg(e, [e, e], [1.0])
    with pytest.raises(ValueError, match=r"scales\[1\]"):
        G.multi_cfg(e, [e, e], [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"eps_conds\[1\]"):
        G.multi_cfg(e, [e, torch.zeros(4, 4)], [1.0, 1.0])
    with pytest.raises(TypeError, match="eps_cond"):
        G.cfg(e, [0, 0, 0], 1.0)
    with pytest.raises(ValueError, match="scale"):
        G.guided_eps_model(lambda x, t, c: x, 1, -1, float("nan"))
    with pytest.raises(ValueError, match="scale"):
        G.guided_eps_model(lambda x, t, c: x, [1, 2], -1, [1.0])
    with pytest.raises(ValueError, match="drop_probs"):
        G.condition_dropout_mask(10, [0.1, 1.5])
    with pytest.raises(ValueError, match="cond"):
        G.guided_eps_model(lambda x, t, c: x, torch.zeros(3, dtype=torch.long), -1, 2.0)(
            torch.zeros(4, 2), 0)


# ----------------------------------------------------------------------------- the explorer
class _StubPipeline:
    """Has a diffusers text-to-image pipeline's call signature; images depend on every input."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, height=None, width=None, num_inference_steps=50,
                 guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1,
                 generator=None, **kwargs):
        from types import SimpleNamespace

        from PIL import Image

        self.calls.append(dict(prompt=prompt, guidance_scale=guidance_scale,
                               steps=num_inference_steps, n=num_images_per_prompt))
        base = torch.rand(num_images_per_prompt, 8, 8, 3, generator=generator)
        shade = (base * 0.5 + 0.05 * guidance_scale + 0.1 * len(prompt) % 1).clamp(0, 1)
        ims = [Image.fromarray((a.numpy() * 255).astype("uint8")) for a in shade]
        return SimpleNamespace(images=ims)


def test_guidance_explorer_pipeline_path_static_twin(tmp_path):
    from diffnotes.widgets import StaticExplorer
    from diffnotes.widgets.guidance import guidance_explorer

    pipe = _StubPipeline()
    ex = guidance_explorer(pipe, ["a red cube", "a blue ball"], scales=[1.0, 7.5], seeds=[0, 3],
                           n_samples=2, num_inference_steps=4, live=False)
    assert isinstance(ex, StaticExplorer)
    assert len(ex.frames) == 2 * 2 * 2 == len(pipe.calls)
    assert {c["guidance_scale"] for c in pipe.calls} == {1.0, 7.5}
    assert all(c["steps"] == 4 and c["n"] == 2 for c in pipe.calls)
    assert len(set(ex.frames.values())) == len(ex.frames)      # every frame differs
    html = ex.to_html()
    assert html.count('type="range"') == 3 and "a blue ball" in html and "7.5" in html
    assert "http" not in html                                  # nothing from a CDN
    ex.save(str(tmp_path / "x.html"))
    # the same seed gives the same images (explicit generators)
    ex2 = guidance_explorer(_StubPipeline(), ["a red cube", "a blue ball"], scales=[1.0, 7.5],
                            seeds=[0, 3], n_samples=2, num_inference_steps=4, live=False)
    assert ex2.frames == ex.frames


def test_guidance_explorer_class_path_on_mixture(linear_schedule):
    from diffnotes.widgets.guidance import ClassConditional, guidance_explorer, sample_scales

    _, ac = linear_schedule
    g = GaussianMixture([[-1.0, 0.0], [1.0, 0.0]], stds=0.5, alphas_cumprod=ac)
    calls = []
    base = G.mixture_cond_model(g)

    def model(x, t, y):
        calls.append(x.shape[0])
        return base(x, t, y)

    def to_image(x):  # points → a tiny image: the mean position as a grey level
        v = ((x.mean(0) + 2) / 4).clamp(0, 1)
        return torch.stack([v[0].expand(4, 4), v[1].expand(4, 4), v[0].expand(4, 4)], -1).numpy()

    setup = ClassConditional(model, -1, (2,), ac, num_steps=5, to_image=to_image)
    s = sample_scales(setup, 1, [0.0, 1.0, 4.0], seed=0, n=7)
    assert s.shape == (3, 7, 2) and calls == [2 * 21] * 5        # one call per step
    # guidance pushes class 1 (at x = +1) to the right, monotonically in the mean
    m = s[:, :, 0].mean(1)
    assert m[0] < m[1] < m[2]
    calls.clear()
    ex = guidance_explorer(setup, [0, 1], scales=[0.0, 1.0, 4.0], seeds=[0], n_samples=7,
                           live=False)
    assert len(ex.frames) == 6 and len(calls) == 2 * 5         # one batched run per class


def test_guidance_explorer_rejects_bad_input(linear_schedule):
    from diffnotes.widgets.guidance import guidance_explorer

    with pytest.raises(ValueError, match="scales"):
        guidance_explorer(_StubPipeline(), ["x"], scales=[1.0, float("nan")], live=False)
    with pytest.raises(TypeError, match="conditions"):
        guidance_explorer(_StubPipeline(), [3], live=False)
    with pytest.raises(TypeError, match="source"):
        guidance_explorer(42, [0], live=False)


def _tiny_sd_pipeline(tmp):
    """A real diffusers StableDiffusionPipeline with tiny random components (no download): a
    character-level CLIP tokenizer written to ``tmp``, a 1-layer CLIP text encoder, a 2-level
    UNet2DConditionModel with cross-attention and a 1-level VAE."""
    import json

    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
                        sample_size=8).eval()
    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sch, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_guidance_explorer_with_a_real_tiny_diffusers_pipeline(tmp_path):
    """The pipeline path on an actual StableDiffusionPipeline (random tiny weights, CPU)."""
    from diffnotes.widgets.guidance import guidance_explorer

    pipe = _tiny_sd_pipeline(tmp_path)
    ex = guidance_explorer(pipe, ["a red cube"], scales=[1.0, 6.0], seeds=[0],
                           n_samples=2, num_inference_steps=3, live=False, height=8, width=8)
    assert len(ex.frames) == 2
    f1, f6 = ex.frames[(0, 0, 0)], ex.frames[(1, 0, 0)]
    assert f1 != f6                                           # the scale reaches the pipeline
    again = guidance_explorer(pipe, ["a red cube"], scales=[1.0, 6.0], seeds=[0], n_samples=2,
                              num_inference_steps=3, live=False, height=8, width=8)
    assert again.frames == ex.frames                          # seeded: reproducible
