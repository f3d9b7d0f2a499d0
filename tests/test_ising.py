"""Ising/Potts segmentation (Ahmad's notes, eqs 5.5–5.11): graph cut = brute-force MAP, networkx
min-cut, alpha-expansion bounds, the sampler's stationary law, and the sign erratum of the notes."""
import itertools
import math

import networkx as nx
import numpy as np
import pytest
from scipy.stats import norm

from diffnotes.segmentation import ising as I

N_BRUTE = 200  # random grids checked against brute force: 100 of 3×3 and 100 of 3×4


def _random_problem(rng, H, W, K=2, kind="normal"):
    if kind == "normal":
        u = rng.normal(size=(K, H, W))
    else:
        u = rng.exponential(size=(K, H, W))
    scale = rng.choice([0.1, 1.0, 3.0])
    wr = scale * rng.exponential(size=(H, W - 1))
    wd = scale * rng.exponential(size=(H - 1, W))
    wr[rng.random(wr.shape) < 0.1] = 0.0  # some edges absent
    return u, wr, wd


def _loop_energy(x, u, wr, wd):
    H, W = x.shape
    e = sum(u[x[i, j], i, j] for i in range(H) for j in range(W))
    e += sum(wr[i, j] for i in range(H) for j in range(W - 1) if x[i, j] != x[i, j + 1])
    e += sum(wd[i, j] for i in range(H - 1) for j in range(W) if x[i, j] != x[i + 1, j])
    return e


def test_energy_matches_loop():
    rng = np.random.default_rng(0)
    for K in (2, 3, 5):
        u, wr, wd = _random_problem(rng, 4, 5, K)
        x = rng.integers(0, K, size=(4, 5))
        assert I.energy(x, u, wr, wd) == pytest.approx(_loop_energy(x, u, wr, wd), abs=1e-12)


def test_graph_cut_equals_brute_force_on_every_small_grid():
    rng = np.random.default_rng(1)
    agree = 0
    for k in range(N_BRUTE):
        H, W = (3, 3) if k % 2 == 0 else (3, 4)
        u, wr, wd = _random_problem(rng, H, W)
        x = I.graph_cut(u, wr, wd)
        _, e_star = I.brute_force_minimum(u, wr, wd)
        agree += abs(I.energy(x, u, wr, wd) - e_star) <= 1e-9 * max(1, abs(e_star))
    assert agree == N_BRUTE


def _networkx_min_cut(u, wr, wd):
    """The s–t graph built edge by edge (no PyMaxflow): source capacity = cost of label 1."""
    _, H, W = u.shape
    G = nx.DiGraph()
    m = np.minimum(u[0], u[1])
    for i, j in itertools.product(range(H), range(W)):
        G.add_edge("s", (i, j), capacity=u[1, i, j] - m[i, j])
        G.add_edge((i, j), "t", capacity=u[0, i, j] - m[i, j])
        if j + 1 < W:
            G.add_edge((i, j), (i, j + 1), capacity=wr[i, j])
            G.add_edge((i, j + 1), (i, j), capacity=wr[i, j])
        if i + 1 < H:
            G.add_edge((i, j), (i + 1, j), capacity=wd[i, j])
            G.add_edge((i + 1, j), (i, j), capacity=wd[i, j])
    value, (S, _) = nx.minimum_cut(G, "s", "t")
    x = np.ones((H, W), np.int64)
    for n in S:
        if n != "s":
            x[n] = 0
    return value + m.sum(), x


@pytest.mark.parametrize("shape", [(8, 8), (8, 8), (8, 8), (7, 11), (10, 6)])
def test_graph_cut_agrees_with_networkx_min_cut(shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    u, wr, wd = _random_problem(rng, *shape)
    x = I.graph_cut(u, wr, wd)
    value, x_nx = _networkx_min_cut(u, wr, wd)
    assert I.energy(x, u, wr, wd) == pytest.approx(value, rel=1e-9)
    assert I.energy(x_nx, u, wr, wd) == pytest.approx(value, rel=1e-9)


def test_seed_tlinks_swapped_solve_the_wrong_problem():
    """Erratum erratum-seg-tlinks: the notes' wiring, built literally, minimises the swapped unaries."""
    rng = np.random.default_rng(3)
    wrong = 0
    for _ in range(20):
        u, wr, wd = _random_problem(rng, 3, 3)
        _, e_star = I.brute_force_minimum(u, wr, wd)
        # seed: source S = foreground, w(i,S) = ψ_u(fg) = u[1], w(i,T) = ψ_u(bg) = u[0]
        G = nx.DiGraph()
        for i, j in itertools.product(range(3), range(3)):
            m = min(u[0, i, j], u[1, i, j])
            G.add_edge("s", (i, j), capacity=u[1, i, j] - m)
            G.add_edge((i, j), "t", capacity=u[0, i, j] - m)
            for (a, b), w in (((i, j + 1), wr[i, j] if j < 2 else 0), ((i + 1, j), wd[i, j] if i < 2 else 0)):
                if w:
                    G.add_edge((i, j), (a, b), capacity=w)
                    G.add_edge((a, b), (i, j), capacity=w)
        _, (S, _) = nx.minimum_cut(G, "s", "t")
        x_seed = np.zeros((3, 3), np.int64)
        for n in S - {"s"}:
            x_seed[n] = 1                                   # source side = foreground
        # it is the exact minimiser of the swapped problem ...
        assert I.energy(x_seed, u[::-1], wr, wd) == pytest.approx(
            I.brute_force_minimum(u[::-1], wr, wd)[1], abs=1e-9)
        # ... and, for the real one, usually not a minimiser at all
        wrong += I.energy(x_seed, u, wr, wd) > e_star + 1e-9
    assert wrong >= 15


def _seed_energy_all(psi, J):
    """Eq 5.7 of Ahmad's notes on every ±1 labelling: Σ ψ_u(s_i) + Σ_<ij> J s_i s_j."""
    _, H, W = psi.shape
    X = np.array(list(itertools.product((0, 1), repeat=H * W))).reshape(-1, H, W)
    s = 2 * X - 1
    data = np.take_along_axis(psi[None], X[:, None], 1)[:, 0].sum((1, 2))
    pair = (s[:, :, 1:] * s[:, :, :-1]).sum((1, 2)) + (s[:, 1:, :] * s[:, :-1, :]).sum((1, 2))
    return X, data + J * pair


def test_seed_sign_gives_checkerboards():
    """Erratum erratum-seg-ising-sign: with +J s_i s_j, J > 0, minimisers alternate."""
    psi = np.zeros((2, 4, 4))
    X, E = _seed_energy_all(psi, J=1.0)
    best = X[E == E.min()]
    ii, jj = np.indices((4, 4))
    cb = (ii + jj) % 2
    assert len(best) == 2 and {tuple(b.ravel()) for b in best} == {tuple(cb.ravel()), tuple((1 - cb).ravel())}
    # with a weak data term that prefers a smooth blob the printed sign still alternates,
    # the corrected sign (−J s_i s_j, i.e. w = 2J) returns the blob
    psi = np.stack([np.zeros((4, 4)), np.zeros((4, 4))])
    psi[1, :, :2] -= 1.5   # left half prefers foreground
    psi[0, :, 2:] -= 1.5   # right half prefers background
    X, E = _seed_energy_all(psi, J=1.0)
    x_seed = X[np.argmin(E)]
    assert (x_seed[:, 1:] != x_seed[:, :-1]).all() and (x_seed[1:] != x_seed[:-1]).all()
    x_ok = I.graph_cut(psi, np.full((4, 3), 2.0), np.full((3, 4), 2.0))
    split = np.zeros((4, 4), np.int64)
    split[:, :2] = 1
    np.testing.assert_array_equal(x_ok, split)


def test_ising_map_is_graph_cut():
    rng = np.random.default_rng(4)
    for _ in range(20):
        h = rng.normal(size=(3, 4))
        J = rng.uniform(0, 1.5)
        x = I.graph_cut(*I.ising_to_graph(h, J))
        X = np.array(list(itertools.product((-1, 1), repeat=12))).reshape(-1, 3, 4).astype(float)
        Hs = I.ising_hamiltonian(X, J, h)
        assert I.ising_hamiltonian(2.0 * x - 1, J, h) == pytest.approx(Hs.min(), abs=1e-9)


def test_ising_hamiltonian_matches_loop():
    rng = np.random.default_rng(5)
    s = rng.choice([-1.0, 1.0], size=(4, 6))
    h = rng.normal(size=(4, 6))
    want = -0.7 * (sum(s[i, j] * s[i, j + 1] for i in range(4) for j in range(5))
                   + sum(s[i, j] * s[i + 1, j] for i in range(3) for j in range(6))) - (h * s).sum()
    assert I.ising_hamiltonian(s, 0.7, h) == pytest.approx(want)
    want_p = want - 0.7 * (sum(s[i, 5] * s[i, 0] for i in range(4)) + sum(s[3, j] * s[0, j] for j in range(6)))
    assert I.ising_hamiltonian(s, 0.7, h, periodic=True) == pytest.approx(want_p)


@pytest.mark.parametrize("K,shape", [(3, (3, 3)), (4, (2, 3)), (3, (2, 4))])
def test_alpha_expansion_within_factor_two_of_brute_force(K, shape):
    rng = np.random.default_rng(6 + K)
    for _ in range(15):
        u, wr, wd = _random_problem(rng, *shape, K=K, kind="exp")   # non-negative data term
        x = I.potts_alpha_expansion(u, (wr, wd))
        x_star, e_star = I.brute_force_minimum(u, wr, wd)
        e = I.energy(x, u, wr, wd)
        assert e_star - 1e-9 <= e <= 2 * e_star + 1e-9
        # the sharper form of the bound: E(x̂) ≤ E_data(x*) + 2·E_smooth(x*)
        zero = np.zeros_like(u)
        e_smooth = I.energy(x_star, zero, wr, wd)
        assert e <= (e_star - e_smooth) + 2 * e_smooth + 1e-9


def test_alpha_expansion_is_a_local_minimum_of_every_expansion_move():
    rng = np.random.default_rng(7)
    u, wr, wd = _random_problem(rng, 3, 3, K=3)
    x = I.potts_alpha_expansion(u, (wr, wd))
    e = I.energy(x, u, wr, wd)
    for alpha in range(3):
        for bits in itertools.product((0, 1), repeat=9):
            cand = np.where(np.array(bits).reshape(3, 3) == 1, alpha, x)
            assert I.energy(cand, u, wr, wd) >= e - 1e-9


def test_alpha_expansion_scalar_weight_and_pymaxflow_reference():
    """A scalar weight means a uniform Potts prior; compare with PyMaxflow's own α-expansion."""
    from maxflow.fastmin import aexpansion_grid
    rng = np.random.default_rng(13)
    for _ in range(5):
        u = rng.exponential(size=(4, 12, 12))
        x = I.potts_alpha_expansion(u, 0.7)
        wr, wd = np.full((12, 11), 0.7), np.full((11, 12), 0.7)
        np.testing.assert_array_equal(x, I.potts_alpha_expansion(u, (wr, wd)))
        V = 0.7 * (1 - np.eye(4))
        x_ref = aexpansion_grid(np.ascontiguousarray(u.transpose(1, 2, 0)), V)
        e, e_ref = I.energy(x, u, wr, wd), I.energy(x_ref, u, wr, wd)
        assert abs(e - e_ref) <= 0.02 * e_ref     # both are local minima of the same moves


def test_alpha_expansion_exact_for_two_labels():
    rng = np.random.default_rng(8)
    for k in range(40):
        u, wr, wd = _random_problem(rng, 3, 4 if k % 2 else 3)
        x = I.potts_alpha_expansion(u, (wr, wd))
        assert I.energy(x, u, wr, wd) == pytest.approx(I.brute_force_minimum(u, wr, wd)[1], abs=1e-9)


def test_gaussian_unary_is_negative_log_density():
    rng = np.random.default_rng(9)
    img = rng.random((5, 6))
    u = I.gaussian_unary(img, 0.8, 0.1, 0.2, 0.3)
    np.testing.assert_allclose(u[1], -norm.logpdf(img, 0.8, 0.1), atol=1e-12)
    np.testing.assert_allclose(u[0], -norm.logpdf(img, 0.2, 0.3), atol=1e-12)
    rgb = rng.random((3, 4, 4))
    u3 = I.gaussian_unary(rgb, [0.1, 0.2, 0.3], 0.2, 0.5, 0.4)
    want = -norm.logpdf(rgb, np.array([0.1, 0.2, 0.3])[:, None, None], 0.2).sum(0)
    np.testing.assert_allclose(u3[1], want, atol=1e-12)


def test_seed_unary_without_log_sigma_is_wrong():
    """Erratum erratum-seg-unary-logsigma: (I−μ)²/2σ² alone never picks the narrow class."""
    I_vals = np.linspace(-3, 3, 601)[None]
    full = I.gaussian_unary(I_vals, 0.0, 1.0, 0.0, 3.0)
    seed = np.stack([I_vals ** 2 / 18, I_vals ** 2 / 2])
    assert not (seed[1] < seed[0]).any()             # seed form: foreground never cheaper
    fg = np.abs(I_vals[full[1] < full[0]])
    boundary = math.sqrt(math.log(3) / (0.5 - 1 / 18))
    assert fg.max() == pytest.approx(boundary, abs=0.011)  # |I| < 1.572 → foreground


def test_contrast_weights_match_loop():
    rng = np.random.default_rng(10)
    img = rng.random((3, 4, 5))
    wr, wd = I.contrast_weights(img, 2.0, 0.25)
    assert wr.shape == (4, 4) and wd.shape == (3, 5)
    for i, j in itertools.product(range(4), range(4)):
        d = ((img[:, i, j] - img[:, i, j + 1]) ** 2).sum()
        assert wr[i, j] == pytest.approx(2.0 * math.exp(-d / (2 * 0.25 ** 2)))
    d = ((img[:, 2, 3] - img[:, 3, 3]) ** 2).sum()
    assert wd[2, 3] == pytest.approx(2.0 * math.exp(-d / (2 * 0.25 ** 2)))


def test_gibbs_sampler_reaches_the_boltzmann_law():
    """2×3 free grid, field and coupling: empirical law of 8000 chains vs exact enumeration."""
    rng = np.random.default_rng(11)
    J, T = 0.6, 1.3
    h = np.array([[0.3, -0.2, 0.0], [0.1, 0.4, -0.5]])
    X = np.array(list(itertools.product((-1.0, 1.0), repeat=6))).reshape(-1, 2, 3)
    p = np.exp(-I.ising_hamiltonian(X, J, h) / T)
    p /= p.sum()
    n = 8000
    s0 = rng.choice([-1.0, 1.0], size=(n, 2, 3))
    s = I.ising_gibbs(s0, T, J, h, n_sweeps=25, rng=rng, periodic=False)
    codes = ((s.reshape(n, 6) > 0) * (2 ** np.arange(5, -1, -1))).sum(1)
    emp = np.bincount(codes, minlength=64) / n
    tv = 0.5 * np.abs(emp - p).sum()
    assert tv < 0.05


def test_gibbs_phase_transition_and_reproducibility():
    rng = np.random.default_rng(12)
    s0 = np.ones((2, 16, 16))
    T = np.array([1.5, 4.0])
    s, m = I.ising_gibbs(s0, T, n_sweeps=200, rng=rng, return_magnetisation=True)
    assert m.shape == (200, 2)
    assert np.abs(m[100:, 0]).mean() > 0.9       # ordered below T_c ≈ 2.269
    assert np.abs(m[100:, 1]).mean() < 0.25      # disordered above
    a = I.ising_gibbs(s0, 2.0, n_sweeps=5, rng=np.random.default_rng(1))
    b = I.ising_gibbs(s0, 2.0, n_sweeps=5, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert I.onsager_magnetisation(1.5) == pytest.approx((1 - math.sinh(2 / 1.5) ** -4) ** 0.125)
    assert I.onsager_magnetisation(3.0) == 0.0


def test_bad_inputs_raise_naming_the_argument():
    u = np.zeros((2, 3, 4))
    wr, wd = np.ones((3, 3)), np.ones((2, 4))
    with pytest.raises(ValueError, match="unary"):
        I.graph_cut(np.zeros((3, 3, 4)), wr, wd)
    with pytest.raises(ValueError, match="unary"):
        I.graph_cut(np.zeros((3, 4)), wr, wd)
    with pytest.raises(ValueError, match="w_right"):
        I.graph_cut(u, -wr, wd)
    with pytest.raises(ValueError, match="w_down"):
        I.graph_cut(u, wr, np.ones((3, 4)))
    with pytest.raises(ValueError, match="weights"):
        I.potts_alpha_expansion(np.zeros((3, 3, 4)), wr)
    with pytest.raises(ValueError, match="w_down"):
        I.potts_alpha_expansion(np.zeros((3, 3, 4)), (wr, -wd))
    with pytest.raises(ValueError, match="image"):
        I.contrast_weights(np.zeros((2, 3, 4, 5)), 1.0, 1.0)
    with pytest.raises(ValueError, match="image"):
        I.gaussian_unary(np.zeros(7), 0, 1, 1, 1)
    with pytest.raises(ValueError, match="sigma_fg"):
        I.gaussian_unary(np.zeros((3, 3)), 0, 0.0, 1, 1)
    with pytest.raises(ValueError, match="lam"):
        I.contrast_weights(np.zeros((3, 3)), -1.0, 1.0)
    with pytest.raises(ValueError, match="labels"):
        I.energy(np.full((3, 4), 2), u, wr, wd)
    with pytest.raises(TypeError, match="rng"):
        I.ising_gibbs(np.ones((4, 4)), 1.0, n_sweeps=1)
    with pytest.raises(ValueError, match="temperature"):
        I.ising_gibbs(np.ones((4, 4)), 0.0, n_sweeps=1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="spins"):
        I.ising_gibbs(np.zeros((4, 4)), 1.0, n_sweeps=1, rng=np.random.default_rng(0))
