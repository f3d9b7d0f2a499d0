"""Benchmark for diffnotes.guidance.sag_sample (run: pytest tests/benchmarks/bench_sag.py -s).

Time against the peer: ``sag_sample`` (diffnotes.ddim.ddim_sample + cfg + the
self_attention_guidance wrapper, the mid-block map read by an AttentionCollector) against
diffusers' ``StableDiffusionSAGPipeline`` built from the shapes pipeline's components: same
latents, prompt, 20 steps, guidance 7.5, SAG scale 0.75, latents out (no decoding), interleaved
in one loop, median of repeats, one thread. Both run three UNet passes' worth of rows per step
(two CFG rows and one degraded row). Goal ours/diffusers <= 1.1; asserted < 3 x goal.
"""
import os
import statistics
import time
import warnings

import pytest
import torch

from diffnotes.guidance import sag_sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT, STEPS = "a red circle on the left", 20


@pytest.fixture(scope="module")
def pipe():
    from diffnotes.models.load import load_pipeline
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_pipeline("shapes")
    torch.set_num_threads(n)


def _median_times(fns, repeats=5):
    for f in fns:
        f()
    acc = [[] for _ in fns]
    for _ in range(repeats):
        for f, a in zip(fns, acc):
            t0 = time.perf_counter()
            f()
            a.append(time.perf_counter() - t0)
    return [statistics.median(a) for a in acc]


def test_sag_time_ratio_vs_diffusers(pipe, record):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import StableDiffusionSAGPipeline
        peer = StableDiffusionSAGPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    peer.set_progress_bar_config(disable=True)
    u = pipe.unet.config
    xT = torch.randn((1, u.in_channels, u.sample_size, u.sample_size),
                     generator=torch.Generator().manual_seed(0))

    def ours():
        sag_sample(pipe, PROMPT, sag_scale=0.75, guidance_scale=7.5,
                   num_inference_steps=STEPS, latents=xT, output_type="latent")

    def theirs():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, sag_scale=0.75,
                 latents=xT.clone(), output_type="latent")

    t_ours, t_peer = _median_times([ours, theirs])
    ratio = t_ours / t_peer
    record("sag_vs_diffusers_time", ratio, goal=1.1,
           note=f"sag_sample / StableDiffusionSAGPipeline, shapes, {STEPS} steps, 1 thread "
                f"({t_ours:.3f} s vs {t_peer:.3f} s)")
    print(f"\nSAG ours {t_ours:.3f} s, diffusers {t_peer:.3f} s, ratio {ratio:.2f}")
    assert ratio < 3 * 1.1
