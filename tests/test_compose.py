"""Per-channel dropout and channel-wise composition (the controlled-generation blog, §2.4.2–2.4.3).

Exact properties in float64: all weights 0 is ε_u, one channel is CFG, a negative channel is the
positive one with the opposite weight, the sum of deltas is exact on a factorised Gaussian
mixture; the dropout's rates within binomial bounds; the batched model equals the unbatched
formula; the two errata (double negative, unbounded SNR^α) with numbers.
"""
import math

import pytest
import torch
from torch import nn

from diffnotes import guidance as G
from diffnotes.control import Channel, SNRSchedule, channel_dropout, compose, composed_eps_model
from diffnotes.ddim import ddim_sample
from diffnotes.models.gmm import GaussianMixture
from diffnotes.schedules import snr

SCALES = [0.0, 0.5, 1.0, 3.0, 7.5, -1.5]


def _eps(seed, shape=(64, 2)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def xs():
    return _eps(0, (256, 2)) * 1.5


def _factorised(ac):
    """notes_control B7, test 4: u ~ GMM(−2, 2) labelled c₁, v ~ GMM(−1, 3) labelled c₂,
    s² = 0.3, π = (½, ½); independent blocks, so c₁ ⊥ c₂ | x_t exactly."""
    g1 = GaussianMixture([[-2.0], [2.0]], stds=0.3 ** 0.5, alphas_cumprod=ac)
    g2 = GaussianMixture([[-1.0], [3.0]], stds=0.3 ** 0.5, alphas_cumprod=ac)
    return G.product_mixture_cond_model([g1, g2])


# ----------------------------------------------------------------------------- compose: no-ops
def test_all_weights_zero_is_eps_u_bitwise(linear_schedule):
    _, ac = linear_schedule
    eu, d1, d2 = _eps(1), _eps(2), _eps(3)
    assert torch.equal(compose(eu, [d1, d2], [0.0, 0.0]), eu)
    assert torch.equal(compose(eu, [d1, d2], [0.0, 0.0], [0.0, 0.0]), eu)
    assert torch.equal(compose(eu, [d1, d2], [0.0, 0.0], schedule=SNRSchedule(0.5), t=300,
                               alphas_cumprod=ac), eu)
    assert torch.equal(compose(eu, [], []), eu)
    assert not torch.equal(compose(eu, [d1, d2], [0.0, 1e-3]), eu)   # the test can fail


@pytest.mark.parametrize("s", SCALES)
def test_one_positive_channel_is_cfg_bitwise(s):
    eu, ec = _eps(1), _eps(2)
    assert torch.equal(compose(eu, [ec - eu], [s]), G.cfg(eu, ec, s))
    assert torch.equal(compose(eu, [ec - eu], [s], [0.0]), G.cfg(eu, ec, s))
    per_row = torch.linspace(-1, 4, eu.shape[0], dtype=torch.float64)
    assert torch.equal(compose(eu, [ec - eu], [per_row]), G.cfg(eu, ec, per_row))


def test_multi_cfg_is_the_same_implementation():
    eu, e1, e2 = _eps(1), _eps(2), _eps(3)
    assert torch.equal(compose(eu, [e1 - eu, e2 - eu], [2.0, -1.5]),
                       G.multi_cfg(eu, [e1, e2], [2.0, -1.5]))


@pytest.mark.parametrize("wn", [0.5, 1.0, 4.0])
def test_negative_channel_equals_positive_with_opposite_weight(wn):
    """The corrected §2.4.3: −w⁻ d with w⁻ ≥ 0 inside the explicit minus."""
    eu, d1, d2 = _eps(1), _eps(2), _eps(3)
    neg = compose(eu, [d1, d2], [3.0, 0.0], [0.0, wn])
    assert torch.equal(neg, compose(eu, [d1, d2], [3.0, -wn]))
    torch.testing.assert_close(neg, eu + 3.0 * d1 - wn * d2, rtol=0, atol=1e-14)
    # the negative guide pushes away: the component along d₂ decreases with w⁻
    assert ((neg - eu) * d2).sum() < ((compose(eu, [d1, d2], [3.0, 0.0]) - eu) * d2).sum()


def test_double_negative_of_the_blog_is_rejected_and_would_flip_the_sign():
    """The blog subtracts the negative guide *and* says it uses negative weights: both signs
    together give + |w⁻| d, a positive condition (erratum-guidance-negative-weights)."""
    eu, d1, d2 = _eps(1), _eps(2), _eps(3)
    with pytest.raises(ValueError, match="negative_weights"):
        compose(eu, [d1, d2], [3.0, 0.0], [0.0, -2.0])
    printed = eu + 3.0 * d1 - (-2.0) * d2                      # literal reading of the blog
    assert torch.equal(printed, eu + 3.0 * d1 + 2.0 * d2)      # = the positive channel, w = 2
    assert (printed - compose(eu, [d1, d2], [3.0, 0.0], [0.0, 2.0])).abs().max() > 1


def test_diffusers_negative_prompt_is_a_tied_negative_weight(linear_schedule, xs):
    """diffusers replaces ε_u by ε_n: ε_n + s (ε_c − ε_n) = ε_u + s d_c − (s − 1) d_n, the
    blog's formula with w⁻ tied to s − 1 (not an independent weight)."""
    _, ac = linear_schedule
    g = GaussianMixture([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], stds=[0.6, 0.4, 0.5],
                        weights=[0.5, 0.3, 0.2], alphas_cumprod=ac)
    eu, ec, en = g.eps(xs, 300), g.eps(xs, 300, 0), g.eps(xs, 300, 2)
    for s in (1.5, 4.0, 7.5):
        diffusers = G.cfg(en, ec, s)                           # negative_prompt=…
        torch.testing.assert_close(compose(eu, [ec - eu, en - eu], [s, 0.0], [0.0, s - 1]),
                                   diffusers, rtol=0, atol=1e-13)
        assert (compose(eu, [ec - eu], [s]) - diffusers).abs().max() > 1e-2


# ----------------------------------------------------------------------------- exact composition
def test_sum_of_deltas_exact_on_factorised_mixture(linear_schedule, xs):
    """c₁ ⊥ c₂ | x_t holds exactly: ε(c₁, c₂) = ε_u + d₁ + d₂ (≤ 1e-10), and the worked value of
    the study notes (B7, test 4; computed there in numpy) at x = (0.3, −0.7), t = 200,
    w = (2, 3)."""
    _, ac = linear_schedule
    model = _factorised(ac)
    B = xs.shape[0]
    c = lambda a, b: torch.tensor([[a, b]]).expand(B, 2)  # noqa: E731
    for t in (10, 200, 500, 900):
        tt = torch.full((B,), t)
        eu, e1, e2 = model(xs, tt, c(-1, -1)), model(xs, tt, c(1, -1)), model(xs, tt, c(-1, 0))
        both = model(xs, tt, c(1, 0))
        assert (compose(eu, [e1 - eu, e2 - eu], [1.0, 1.0]) - both).abs().max() <= 1e-10
        assert (eu - both).abs().max() > 1e-2                   # not trivially equal
    x, t = torch.tensor([[0.3, -0.7]], dtype=torch.float64), torch.tensor([200])
    eu, e1, e2 = (model(x, t, torch.tensor([ab])) for ab in ((-1, -1), (1, -1), (-1, 0)))
    torch.testing.assert_close(compose(eu, [e1 - eu, e2 - eu], [2.0, 3.0]),
                               torch.tensor([[-1.93099792, 0.12027961]], dtype=torch.float64),
                               rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- the SNR schedule
def test_snr_schedule_printed_form_is_unbounded_and_clipping_bounds_it(linear_schedule):
    """erratum-guidance-snr-weights: w̄ SNR^½ with w̄ = 5 is 0.032 at t = 999 and 500 at t = 0;
    clipped, it is monotone non-decreasing as t decreases, never above w̄, w̄ where SNR ≥ 1."""
    _, ac = linear_schedule
    ts = torch.arange(1000)
    printed = 5 * SNRSchedule(0.5, max_factor=None)(ts, ac)
    assert abs(printed[999].item() - 0.0318) < 1e-3 and abs(printed[0].item() - 500.0) < 0.1
    assert abs(printed[500].item() - 1.4522) < 1e-3 and abs(printed[250].item() - 5.219) < 1e-2
    torch.testing.assert_close(printed, 5 * snr(ac) ** 0.5, rtol=1e-12, atol=0)
    clipped = 5 * SNRSchedule(0.5)(ts, ac)
    assert clipped.max().item() <= 5.0 and bool((clipped[:-1] >= clipped[1:]).all())
    high = snr(ac) >= 1
    assert bool((clipped[high] == 5.0).all()) and bool((clipped[~high] < 5.0).all())
    torch.testing.assert_close(clipped[999], printed[999], rtol=0, atol=0)
    lo = SNRSchedule(0.5, min_factor=0.2)(ts, ac)
    assert lo.min().item() == 0.2


def test_compose_with_schedule_scales_every_weight(linear_schedule):
    _, ac = linear_schedule
    eu, d1, d2 = _eps(1), _eps(2), _eps(3)
    t = torch.randint(0, 1000, (eu.shape[0],), generator=torch.Generator().manual_seed(4))
    sch = SNRSchedule(0.7)
    f = sch(t, ac).reshape(-1, 1)
    out = compose(eu, [d1, d2], [4.0, 0.0], [0.0, 1.5], schedule=sch, t=t, alphas_cumprod=ac)
    torch.testing.assert_close(out, eu + 4.0 * f * d1 - 1.5 * f * d2, rtol=0, atol=1e-13)
    ec = _eps(5)
    for tt in (100, 700):
        one = compose(eu, [ec - eu], [4.0], schedule=sch, t=tt, alphas_cumprod=ac)
        assert torch.equal(one, G.cfg(eu, ec, 4.0 * sch(tt, ac)))
    assert sch(100, ac) == 1.0 and sch(700, ac) < 0.1


# ----------------------------------------------------------------------------- bad input
def test_compose_bad_input_names_the_argument(linear_schedule):
    _, ac = linear_schedule
    eu, d1, d2 = _eps(1), _eps(2), _eps(3)
    with pytest.raises(ValueError, match="weights must have one weight per entry of deltas"):
        compose(eu, [d1, d2], [1.0])
    with pytest.raises(ValueError, match="weights"):
        compose(eu, [d1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="negative_weights must have one"):
        compose(eu, [d1, d2], [1.0, 1.0], [0.0])
    with pytest.raises(ValueError, match=r"deltas\[1\]"):
        compose(eu, [d1, d2[:10]], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        compose(eu, [d1], [math.nan])
    with pytest.raises(ValueError, match="t must be given"):
        compose(eu, [d1], [1.0], schedule=SNRSchedule())
    with pytest.raises(ValueError, match="alphas_cumprod"):
        compose(eu, [d1], [1.0], schedule=SNRSchedule(), t=3)
    with pytest.raises(ValueError, match="t must lie"):
        compose(eu, [d1], [1.0], schedule=SNRSchedule(), t=1000, alphas_cumprod=ac)
    with pytest.raises(TypeError, match="deltas"):
        compose(eu, {"a": d1}, [1.0])
    with pytest.raises(ValueError, match="alpha"):
        SNRSchedule(-0.5)
    with pytest.raises(ValueError, match="max_factor"):
        SNRSchedule(0.5, max_factor=0.1, min_factor=0.2)


# ----------------------------------------------------------------------------- channels, dropout
def _channels(K=3, dropout=0.1):
    return [Channel(f"c{k}", None, torch.full((2,), 10.0 + k), dropout=dropout) for k in range(K)]


def test_channel_needs_its_own_null_embedding():
    with pytest.raises(ValueError, match="null_embedding"):
        Channel("depth", None, None)
    with pytest.raises(ValueError, match="dropout"):
        Channel("depth", None, torch.zeros(3), dropout=1.5)
    with pytest.raises(ValueError, match="name"):
        Channel("", None, torch.zeros(3))
    z = torch.zeros(4)
    a, b = Channel("a", None, z), Channel("b", None, z)
    # the same tensor gives two distinct parameters (a copy each, no shared storage)
    assert isinstance(a.null_embedding, nn.Parameter) and isinstance(b.null_embedding, nn.Parameter)
    assert a.null_embedding is not b.null_embedding
    assert a.null_embedding.data_ptr() != b.null_embedding.data_ptr() != z.data_ptr()
    with torch.no_grad():
        a.null_embedding.add_(1.0)
    assert b.null_embedding.sum() == 0 and z.sum() == 0
    # one Parameter given to two channels is refused where they meet
    p = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="share one null embedding"):
        channel_dropout([torch.ones(5, 4), torch.ones(5, 4)],
                        [Channel("a", None, p), Channel("b", None, p)], u=0.1)
    with pytest.raises(ValueError, match="distinct names"):
        channel_dropout([torch.ones(5, 4)] * 2, [Channel("a", None, z), Channel("a", None, z)])
    # registered parameters: an optimizer over the channels sees one null each, plus encoders
    enc = nn.Linear(3, 4)
    ch = Channel("text", enc, torch.zeros(4))
    assert {id(q) for q in ch.parameters()} == {id(ch.null_embedding), id(enc.weight), id(enc.bias)}


@pytest.mark.parametrize("u", [0.0, 1.0, -0.1, 1.2])
def test_u_outside_open_unit_interval_raises(u):
    with pytest.raises(ValueError, match=r"u must lie in \(0, 1\)"):
        channel_dropout([torch.ones(4, 2)] * 3, _channels(), u=u)


def test_dropout_rates_match_u_and_q_within_binomial_bounds():
    """blog §2.4.2: q = u^{1/K}; the all-dropped rate is u, each channel's q, pairs q² (independent
    masks); 4σ binomial bounds on 200 000 seeded rows."""
    n, K, u = 200_000, 3, 0.1
    q = u ** (1 / K)
    assert abs(q - 0.4642) < 1e-4
    conds = [torch.zeros(n, 2, dtype=torch.float64) for _ in range(K)]
    gen = torch.Generator().manual_seed(0)
    out, keep = channel_dropout(conds, _channels(K), u=u, generator=gen)
    drop = (~keep).double()

    def within(p_hat, p):
        return abs(p_hat - p) < 4 * math.sqrt(p * (1 - p) / n)

    assert within(drop.prod(1).mean().item(), u)
    for k in range(K):
        assert within(drop[:, k].mean().item(), q)
        # dropped rows carry exactly the channel's own null, kept rows the condition
        assert bool((out[k][~keep[:, k]] == 10.0 + k).all())
        assert bool((out[k][keep[:, k]] == 0).all())
        for j in range(k):
            assert within((drop[:, k] * drop[:, j]).mean().item(), q * q)
    assert within(((1 - drop).prod(1)).mean().item(), (1 - q) ** K)   # all present: 15.4 %
    # a wrong u would be detected: u = 0.1 rows are not u = 0.15 rows
    assert not within(drop.prod(1).mean().item(), 0.15)


def test_channel_rates_time_dependent_and_unequal():
    """Without u: each channel's own q_k(t); all-dropped = Π q_k; an unavailable channel is null."""
    n = 100_000
    t = torch.cat([torch.zeros(n // 2, dtype=torch.long), torch.full((n // 2,), 999)])
    chans = [Channel("text", None, torch.full((2,), -1.0), dropout=0.2),
             Channel("depth", None, torch.full((2,), -2.0), dropout=lambda t: 0.1 + 0.8 * t / 999)]
    conds = [torch.zeros(n, 2), torch.zeros(n, 2)]
    _, keep = channel_dropout(conds, chans, generator=torch.Generator().manual_seed(1), t=t)
    drop = (~keep).double()
    bound = lambda p, m: 4 * math.sqrt(p * (1 - p) / m)  # noqa: E731
    lo, hi = drop[: n // 2], drop[n // 2:]
    assert abs(drop[:, 0].mean().item() - 0.2) < bound(0.2, n)
    assert abs(lo[:, 1].mean().item() - 0.1) < bound(0.1, n // 2)
    assert abs(hi[:, 1].mean().item() - 0.9) < bound(0.9, n // 2)
    assert abs(hi.prod(1).mean().item() - 0.18) < bound(0.18, n // 2)
    with pytest.raises(ValueError, match="t must be given"):
        channel_dropout(conds, chans)
    out, keep = channel_dropout(conds, chans, generator=torch.Generator().manual_seed(2), t=t,
                                available=torch.tensor([True, False]))
    assert bool((~keep[:, 1]).all()) and bool((out[1] == -2.0).all())


def test_null_gradient_reaches_only_its_channel_rows():
    """A learned null receives the gradient of exactly the rows it replaced (notes B6, test 3)."""
    B = 64
    emb = nn.Embedding(10, 3)
    chans = [Channel("label", emb, torch.zeros(3), dropout=0.5),
             Channel("size", None, torch.zeros(1), dropout=0.3)]
    labels = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(0))
    out, keep = channel_dropout({"label": labels, "size": torch.rand(B, 1)}, chans,
                                generator=torch.Generator().manual_seed(3))
    assert set(out) == {"label", "size"} and out["label"].shape == (B, 3)
    assert torch.equal(out["label"][keep[:, 0]], emb(labels)[keep[:, 0]])
    (2.0 * out["label"].sum() + 5.0 * out["size"].sum()).backward()
    n0, n1 = int((~keep[:, 0]).sum()), int((~keep[:, 1]).sum())
    assert 0 < n0 < B and 0 < n1 < B
    assert torch.equal(chans[0].null_embedding.grad, torch.full((3,), 2.0 * n0))
    assert torch.equal(chans[1].null_embedding.grad, torch.full((1,), 5.0 * n1))
    # the encoder is trained by the kept rows only
    kept_labels = torch.bincount(labels[keep[:, 0]], minlength=10)
    assert torch.equal(emb.weight.grad.sum(1), kept_labels * 6.0)


def test_dropout_bad_input():
    with pytest.raises(ValueError, match="batch_conditions must have one entry per channel"):
        channel_dropout([torch.ones(4, 2)] * 2, _channels(3), u=0.1)
    with pytest.raises(ValueError, match="batch_conditions"):
        channel_dropout({"c0": torch.ones(4, 2)}, _channels(2), u=0.1)
    with pytest.raises(ValueError, match=r"batch_conditions\[1\]"):
        channel_dropout([torch.ones(4, 2), torch.ones(5, 2)], _channels(2), u=0.1)
    with pytest.raises(ValueError, match="channels"):
        channel_dropout([torch.ones(4, 2)], [], u=0.1)
    bad = Channel("q", None, torch.zeros(2), dropout=lambda t: 2.0)
    with pytest.raises(ValueError, match="dropout"):
        channel_dropout([torch.ones(4, 2)], [bad], t=3)


# ----------------------------------------------------------------------------- batched eps_model
def test_composed_eps_model_one_batched_call_equals_unbatched(linear_schedule, xs):
    _, ac = linear_schedule
    model = _factorised(ac)
    calls = []

    def counted(x, t, c):
        calls.append(x.shape[0])
        return model(x, t, c)

    stack = lambda cs: torch.stack(cs, 1)  # noqa: E731
    B = xs.shape[0]
    t = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(5))
    sch = SNRSchedule(0.5, max_factor=2.0)
    f = composed_eps_model(counted, [1, 0], [-1, -1], [2.0, 0.0], [0.0, 1.5], schedule=sch,
                           alphas_cumprod=ac, combine=stack)
    out = f(xs, t)
    assert calls == [3 * B]
    lab = lambda a, b: torch.tensor([[a, b]]).expand(B, 2)  # noqa: E731
    eu, e1, e2 = model(xs, t, lab(-1, -1)), model(xs, t, lab(1, -1)), model(xs, t, lab(-1, 0))
    w = sch(t, ac).reshape(-1, 1)
    torch.testing.assert_close(out, eu + 2.0 * w * (e1 - eu) - 1.5 * w * (e2 - eu),
                               rtol=0, atol=1e-13)
    # unit weights, no schedule: the joint conditional ε(c₁, c₂) of the factorised toy
    g = composed_eps_model(model, [1, 0], [-1, -1], [1.0, 1.0], combine=stack)
    assert (g(xs, t) - model(xs, t, lab(1, 0))).abs().max() <= 1e-10
    # one channel: bitwise the guided_eps_model of guidance.py
    first_on = lambda y: torch.stack([y, torch.full_like(y, -1)], 1)  # noqa: E731
    single = lambda x, t, c: model(x, t, first_on(c[0]))  # noqa: E731
    ref = G.guided_eps_model(lambda x, t, y: model(x, t, first_on(y)), 1, -1, 3.0)
    assert torch.equal(composed_eps_model(single, [1], [-1], [3.0])(xs, t), ref(xs, t))
    # a sampler can use it
    x0 = ddim_sample(g, _eps(9, (16, 2)), list(range(999, -1, -100)), ac)
    assert x0.shape == (16, 2) and bool(torch.isfinite(x0).all())


def test_composed_eps_model_with_channels_on_a_cross_attention_unet():
    """Two embedding channels (token sequences concatenated for cross-attention) on a random
    UNet2DConditionModel: the batched pass equals three separate passes."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=4).eval()
    text = Channel("text", None, torch.randn(3, 16))
    ref = Channel("ref", None, torch.randn(2, 16))
    model = lambda x, t, cs: unet(x, t, encoder_hidden_states=torch.cat(cs, 1)).sample  # noqa
    B = 2
    x = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ct, cr = torch.randn(1, 3, 16), torch.randn(B, 2, 16)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        out = composed_eps_model(model, [ct, cr], [text, ref], [4.0, 1.0], [0.0, 0.5])(x, t)
        nt = text.null_embedding[None].expand(B, -1, -1)
        nr = ref.null_embedding[None].expand(B, -1, -1)
        eu = model(x, t, [nt, nr])
        e1 = model(x, t, [ct.expand(B, -1, -1), nr])
        e2 = model(x, t, [nt, cr])
    torch.testing.assert_close(out, eu + 4.0 * (e1 - eu) + 0.5 * (e2 - eu), rtol=1e-4, atol=1e-5)
    assert (out - eu).abs().max() > 1e-3


def test_composed_eps_model_bad_input(linear_schedule):
    _, ac = linear_schedule
    m = _factorised(ac)
    with pytest.raises(ValueError, match="weights must have one weight per channel"):
        composed_eps_model(m, [1, 0], [-1, -1], [1.0])
    with pytest.raises(ValueError, match="negative_weights"):
        composed_eps_model(m, [1, 0], [-1, -1], [1.0, 1.0], [0.0, -1.0])
    with pytest.raises(ValueError, match="nulls"):
        composed_eps_model(m, [1, 0], [-1], [1.0, 1.0])
    with pytest.raises(ValueError, match="conds"):
        composed_eps_model(m, [], [], [])
    with pytest.raises(ValueError, match="alphas_cumprod"):
        composed_eps_model(m, [1, 0], [-1, -1], [1.0, 1.0], schedule=SNRSchedule())
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        composed_eps_model(m, [1, 0], [-1, -1], [1.0, math.inf])
    f = composed_eps_model(m, [torch.tensor([1, 1, 1]), 0], [-1, -1], [1.0, 1.0],
                           combine=lambda cs: torch.stack(cs, 1))
    with pytest.raises(ValueError, match=r"conds\[0\]"):
        f(torch.zeros(4, 2, dtype=torch.float64), 10)
