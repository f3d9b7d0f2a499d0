"""Benchmarks for diffnotes.editing.masactrl and diffnotes.editing.pnp (run: pytest
tests/benchmarks/bench_self_attention.py -s).

Time: a MasaCtrl edit (source + target in one guided batch, control on from step 1 on the
default layers) and a Plug-and-Play translation from a given x_T (no inversion; features and
attention injected at the official fractions) against plain DDIM sampling of the same 2 prompts
with the same guided ε-model, interleaved in one loop, median of repeats. The control adds only
a copy of K, V (or Q, K) and a forward hook, so the goal is <= 1.25x; asserted < 3 x goal.
"""
import os
import statistics
import time

import pytest
import torch

from diffnotes.ddim import ddim_sample
from diffnotes.editing.common import (encode_prompts, pipe_alphas_cumprod, pipe_eps_model,
                                      pipe_timesteps)
from diffnotes.editing.masactrl import mutual_self_attention
from diffnotes.editing.pnp import plug_and_play

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["a red circle", "a red square"]
GOAL = 1.25


@pytest.fixture(scope="module", params=["shapes", "sd-1.5-layout-tiny"])
def pipe(request):
    from diffnotes.models.load import load_pipeline
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield request.param, load_pipeline(request.param)
    torch.set_num_threads(n)


@pytest.mark.parametrize("method", ["masactrl", "pnp"])
def test_self_attention_time_ratio(pipe, method, record):
    name, pipe = pipe
    u = pipe.unet.config
    xT = torch.randn((1, u.in_channels, u.sample_size, u.sample_size),
                     generator=torch.Generator().manual_seed(0))
    steps = 10
    cond, null = encode_prompts(pipe, PROMPTS), encode_prompts(pipe, "")
    ts, ac = pipe_timesteps(pipe, steps), pipe_alphas_cumprod(pipe)

    def plain():
        ddim_sample(pipe_eps_model(pipe, cond, null, 7.5), xT.expand(2, -1, -1, -1), ts, ac)

    def edit():
        if method == "masactrl":
            mutual_self_attention(pipe, *PROMPTS, start_step=1, num_inference_steps=steps,
                                  latents=xT, output_type="latent")
        else:
            plug_and_play(pipe, xT, PROMPTS[1], invert=False, num_inference_steps=steps,
                          output_type="latent")

    plain(), edit()
    tp, te = [], []
    for _ in range(5):
        for fn, acc in ((plain, tp), (edit, te)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    ratio = statistics.median(te) / statistics.median(tp)
    record(f"{method} / plain sampling, 2 prompts, 10 steps ({name})", ratio, goal=GOAL,
           note="median of 5 interleaved repeats, one thread")
    assert ratio < 3 * GOAL
