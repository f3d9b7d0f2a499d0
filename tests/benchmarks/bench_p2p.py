"""Benchmarks for diffnotes.editing.p2p (run: pytest tests/benchmarks/bench_p2p.py -s).

1. Time: a Prompt-to-Prompt edit (source + 1 edit, WordSwap with local blending, the default
   schedules) against plain DDIM sampling of the same 2 prompts with the same guided ε-model,
   interleaved in one loop, median of repeats. Goal <= 1.25x; asserted < 3 x goal.
2. Memory: the same edit at 10 and at 50 steps: the returned store's bytes (goal: equal,
   asserted equal) and the growth of the process's peak RSS from the 10- to the 50-step run.
"""
import os
import resource
import statistics
import time

import pytest
import torch

from diffnotes.ddim import ddim_sample
from diffnotes.editing.common import (encode_prompts, pipe_alphas_cumprod, pipe_eps_model,
                                      pipe_timesteps)
from diffnotes.editing.p2p import LocalBlend, WordSwap, prompt_to_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["a red circle", "a blue circle"]


@pytest.fixture(scope="module", params=["shapes", "sd-1.5-layout-tiny"])
def pipe(request):
    from diffnotes.models.load import load_pipeline
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield request.param, load_pipeline(request.param)
    torch.set_num_threads(n)


def _xT(pipe):
    u = pipe.unet.config
    return torch.randn((1, u.in_channels, u.sample_size, u.sample_size),
                       generator=torch.Generator().manual_seed(0))


def test_p2p_time_ratio(pipe, record):
    name, pipe = pipe
    xT, steps = _xT(pipe), 10
    cond, null = encode_prompts(pipe, PROMPTS), encode_prompts(pipe, "")
    ts, ac = pipe_timesteps(pipe, steps), pipe_alphas_cumprod(pipe)

    def plain():
        ddim_sample(pipe_eps_model(pipe, cond, null, 7.5), xT.expand(2, -1, -1, -1), ts, ac)

    def edit():
        prompt_to_prompt(pipe, PROMPTS, WordSwap(), num_inference_steps=steps, latents=xT,
                         local_blend=LocalBlend(["red", "blue"]), output_type="latent")

    plain(), edit()
    tp, te = [], []
    for _ in range(5):
        for fn, acc in ((plain, tp), (edit, te)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    ratio = statistics.median(te) / statistics.median(tp)
    print(f"\n[bench_p2p] {name}: plain {statistics.median(tp):.3f}s, P2P "
          f"{statistics.median(te):.3f}s, ratio {ratio:.3f}")
    record(f"p2p.time_ratio.{name}", ratio, goal=1.25, unit="ratio",
           note="P2P edit (source + 1, WordSwap + LocalBlend) / plain sampling of the 2 prompts")
    assert ratio < 3 * 1.25


def test_p2p_memory_flat(pipe, record):
    name, pipe = pipe
    xT = _xT(pipe)
    out = {}
    for steps in (10, 50):
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _, store = prompt_to_prompt(pipe, PROMPTS, WordSwap(), num_inference_steps=steps,
                                    latents=xT, local_blend=LocalBlend(["red", "blue"]),
                                    output_type="latent")
        out[steps] = (store.nbytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0)
    ratio = out[50][0] / out[10][0]
    print(f"\n[bench_p2p] {name}: store bytes {out[10][0]} (10 steps) vs {out[50][0]} (50 "
          f"steps); peak RSS growth {out[10][1]} kB then {out[50][1]} kB")
    record(f"p2p.store_bytes_ratio_50_vs_10.{name}", ratio, goal=1.0, unit="ratio",
           note="bytes of the returned attention store, 50 steps / 10 steps")
    record(f"p2p.peak_rss_growth_50_steps.{name}", out[50][1] / 1024, goal=0.0, unit="MB",
           note="growth of peak RSS during the 50-step run after the 10-step run")
    assert out[10][0] == out[50][0]
