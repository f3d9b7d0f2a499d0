"""Benchmark of the restoration solvers (run: pytest tests/benchmarks/bench_restoration.py -s).

Time per model evaluation of every method in the evaluation's ``EVAL_CONFIGS`` (all modules
found: posterior, linear, conditional) against plain DDIM (η = 0) on the same model, the same
batch and the same number of steps, in one process, interleaved, median of a few repeats. The
ratio is the overhead of the method's data step (an SVD-coordinate update, a pseudo-inverse,
a proximal step, a backward pass through the UNet for DPS). The model is the pixel-space
shapes UNet (the shipped weights when present, else the same architecture untrained: timing
does not depend on the weights), batch 8 of 32×32, float32, one thread.

Goals (asserted generously, never absolute times): the closed-form methods of
:mod:`diffnotes.restoration.linear` cost ≤ 3× DDIM per evaluation (goal ≈ 1.1×); every other
method ≤ 10× (DPS backpropagates through the network: goal ≈ 3×).
"""
import statistics
import time

import pytest
import torch

from diffnotes.ddim import ddim_sample
from diffnotes.restoration import evaluate as E
from diffnotes.restoration import operators as ops

STEPS, BATCH, REPS = 8, 8, 3


@pytest.fixture(scope="module")
def model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    from diffnotes.models import pixel_shapes as P
    try:
        unet, what = P.load(), "shipped pixel_shapes UNet"
    except Exception:
        torch.manual_seed(0)
        unet, what = P.build_unet().eval(), "pixel_shapes architecture, untrained"
    print(f"\n[bench_restoration] model: {what}")
    yield P.eps_model(unet), P.alphas_cumprod()
    torch.set_num_threads(n)


def test_time_per_model_evaluation(model):
    eps_model, ac = model
    configs = E.collect_configs()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 3, 32, 32, generator=g) * 2 - 1
    op = ops.super_resolution(4)
    y = ops.measure(op, x, 0.05, generator=g)
    ts = list(range(0, 1000, 1000 // STEPS))[:STEPS][::-1]
    x_T = torch.randn(BATCH, 3, 32, 32, generator=g)

    def run_ddim():
        c = E.CountingModel(eps_model)
        ddim_sample(c, x_T, ts, ac, eta=0.0)
        return c.calls

    def runner(cfg):
        def run():
            c = E.CountingModel(cfg["model"](eps_model, ac) if cfg.get("model") else eps_model)
            cfg["fn"](c, op, y, 0.05, alphas_cumprod=ac, timesteps=ts, x_T=x_T,
                      generator=torch.Generator().manual_seed(1), progress=False,
                      **cfg.get("kwargs", {}))
            return c.calls
        return run

    names = [n for n, c in configs.items() if c.get("steps") and
             (not c.get("tasks") or "sr4" in c["tasks"])]
    per_nfe = {n: [] for n in ["ddim", *names]}
    skipped = {}
    for _ in range(REPS):
        for n in ["ddim", *names]:
            if n in skipped:
                continue
            t0 = time.perf_counter()
            try:
                calls = run_ddim() if n == "ddim" else runner(configs[n])()
            except Exception as e:  # a method that cannot run this task on this model
                skipped[n] = f"{type(e).__name__}: {e}"
                continue
            per_nfe[n].append((time.perf_counter() - t0) / max(calls, 1))
    base = statistics.median(per_nfe["ddim"])
    print(f"\n{'method':12s} {'module':12s} {'s / eval':>10s} {'× DDIM':>8s}")
    ratios = {}
    for n in ["ddim", *names]:
        if n in skipped:
            print(f"{n:12s} skipped ({skipped[n][:60]})")
            continue
        med = statistics.median(per_nfe[n])
        ratios[n] = med / base
        mod = configs[n].get("module", "") if n != "ddim" else "ddim"
        print(f"{n:12s} {mod:12s} {med:10.4f} {ratios[n]:8.2f}")
    for n, r in ratios.items():
        if n == "ddim":
            continue
        limit = 3.0 if configs[n].get("module") == "linear" else 10.0
        assert r <= limit, f"{n}: {r:.2f}× DDIM per model evaluation (limit {limit}×)"
    for n in ("ddrm", "ddnm", "ddnm_plus", "diffpir", "dmps"):
        assert n in ratios, f"{n} did not run: {skipped.get(n)}"
