"""Benchmark: diffnotes' graph_cut on 512×512 against a direct PyMaxflow grid call (goal ≤ 1.5×).

Run with ``pytest tests/benchmarks/bench_graph_cut.py -s``. Prints the ratio; asserts only a
generous bound (goal × 3) so a busy machine does not fail CI.
"""
import time

import maxflow
import numpy as np

from diffnotes.segmentation.ising import contrast_weights, energy, gaussian_unary, graph_cut

GOAL = 1.5


def _problem(n=512, seed=0):
    rng = np.random.default_rng(seed)
    ii, jj = np.indices((n, n))
    img = ((ii - n / 2) ** 2 + (jj - n / 2) ** 2 < (n / 4) ** 2).astype(float)
    img = np.clip(img + 0.35 * rng.normal(size=img.shape), 0, 1)
    return gaussian_unary(img, 1.0, 0.35, 0.0, 0.35), *contrast_weights(img, 1.0, 0.3)


def _direct(unary, wr, wd):
    """The reference: one PyMaxflow grid build and solve, no checks (what one would write inline)."""
    H, W = unary.shape[1:]
    g = maxflow.Graph[float](H * W, 2 * H * W)   # same preallocation as graph_cut
    nodes = g.add_grid_nodes((H, W))
    r = np.zeros((H, W)); r[:, :-1] = wr
    d = np.zeros((H, W)); d[:-1, :] = wd
    g.add_grid_edges(nodes, weights=r, structure=np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]]), symmetric=True)
    g.add_grid_edges(nodes, weights=d, structure=np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]]), symmetric=True)
    m = np.minimum(unary[0], unary[1])
    g.add_grid_tedges(nodes, unary[1] - m, unary[0] - m)
    g.maxflow()
    return g.get_grid_segments(nodes).astype(np.int64)


def _best_time(fn, *args, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def test_graph_cut_512_against_direct_pymaxflow(record):
    u, wr, wd = _problem()
    t_ref, x_ref = _best_time(_direct, u, wr, wd)
    t_ours, x = _best_time(graph_cut, u, wr, wd)
    ratio = t_ours / t_ref
    print(f"\ngraph_cut 512×512: {t_ours * 1e3:.1f} ms; direct PyMaxflow {t_ref * 1e3:.1f} ms; "
          f"ratio {ratio:.2f} (goal ≤ {GOAL})")
    record("graph_cut / direct PyMaxflow (time, 512×512)", ratio, goal=f"≤ {GOAL}")
    assert energy(x, u, wr, wd) == energy(x_ref, u, wr, wd) or \
        abs(energy(x, u, wr, wd) - energy(x_ref, u, wr, wd)) < 1e-6 * abs(energy(x_ref, u, wr, wd))
    assert ratio < 3 * GOAL
