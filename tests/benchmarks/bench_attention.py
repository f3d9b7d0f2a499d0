"""Benchmarks for diffnotes.attention (run: pytest tests/benchmarks/bench_attention.py -s).

1. Time: a UNet forward pass with the attention store attached (cross-attention recorded, the
   default) against the plain forward pass (diffusers' default processors), same process,
   interleaved, median of many repeats. Goal ≤ 1.15×; asserted ≤ 3× (noise on a shared CPU).
2. Memory: a whole text-to-image run with 10 and with 50 denoising steps. The store's tensors
   must have the same size (goal: equal; asserted equal, it is exact), and the process's peak
   RSS must not grow by more than a few MB from the 10-step to the 50-step run.
3. Stable Diffusion 1.5 at 512×512, on the meta device (no weights, no memory): the store's size
   after 2 and after 5 UNet calls (equal), and what it would be per step if every step were kept.

The model is the shipped shapes pipeline when its weights exist, else the same architecture
untrained (timing and memory do not depend on the weights).
"""
import os
import resource
import statistics
import time

import pytest
import torch

from diffnotes.attention import AttentionStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pipeline():
    try:
        from diffnotes.models.load import load_pipeline
        pipe = load_pipeline("shapes")
        what = "shipped shapes pipeline"
    except Exception:  # weights not there yet: same architecture, random weights
        from diffusers import StableDiffusionPipeline

        from diffnotes.models.shapes import make_components
        torch.manual_seed(0)
        pipe = StableDiffusionPipeline(**make_components(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        what = "shapes architecture, untrained"
    pipe.set_progress_bar_config(disable=True)
    return pipe, what


@pytest.fixture(scope="module")
def pipe():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    p, what = _pipeline()
    print(f"\n[bench_attention] model: {what}")
    yield p
    torch.set_num_threads(n)


def _time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def test_recording_overhead(pipe, record):
    unet = pipe.unet
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ctx = torch.randn(2, pipe.tokenizer.model_max_length, cfg.cross_attention_dim, generator=g)

    def plain():
        with torch.no_grad():
            unet(x, 500, ctx)

    from diffusers.models.attention_processor import AttnProcessor

    saved = dict(unet.attn_processors)

    def explicit():
        unet.set_attn_processor(AttnProcessor())
        try:
            with torch.no_grad():
                unet(x, 500, ctx)
        finally:
            unet.set_attn_processor(dict(saved))

    results = {}
    for kinds in (("cross",), ("cross", "self")):
        store = AttentionStore(kinds=kinds)

        def rec():
            with torch.no_grad():
                unet(x, 500, ctx)

        for _ in range(3):
            plain()                                                # warm-up
        t_plain, t_rec, t_expl = [], [], []
        for _ in range(15):                                          # interleave: same conditions
            t_plain += _time(plain, 3)
            t_expl += _time(explicit, 1)
            store.attach(unet)
            try:
                t_rec += _time(rec, 3)
            finally:
                store.detach()
        ratio = statistics.median(t_rec) / statistics.median(t_plain)
        results[kinds] = ratio
        print(f"[bench_attention] forward (batch 2, latent {cfg.sample_size}²): plain (SDPA) "
              f"{1e3 * statistics.median(t_plain):.1f} ms, plain AttnProcessor (explicit "
              f"softmax everywhere) {1e3 * statistics.median(t_expl):.1f} ms, recording "
              f"{'+'.join(kinds)} {1e3 * statistics.median(t_rec):.1f} ms -> ratio "
              f"{ratio:.3f} vs plain (goal <= 1.15)")
    record("recording cross-attention / plain forward (time)", results[("cross",)], goal="≤ 1.15")
    record("recording cross- and self-attention / plain forward (time)", results[("cross", "self")])
    assert results[("cross",)] < 3 * 1.15


def _maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_memory_10_vs_50_steps(pipe, record):
    from diffnotes.attention import generate_with_attention

    prompt = "a red circle on the left"
    sizes, rss = {}, {}
    for label, steps in (("warm-up", 10), ("a", 10), ("b", 50)):
        t0 = time.perf_counter()
        _, store = generate_with_attention(pipe, prompt, num_inference_steps=steps,
                                           guidance_scale=4.0,
                                           generator=torch.Generator().manual_seed(0),
                                           kinds=("cross", "self"))
        assert store.num_steps == steps
        sizes[steps] = store.nbytes()
        rss[label] = _maxrss_mb()
        print(f"[bench_attention] {steps:2d} steps ({label}): store {store.nbytes() / 1024:.1f} "
              f"KiB, peak RSS so far {rss[label]:.1f} MB, {time.perf_counter() - t0:.1f} s")
    record("attention store, 50 steps / 10 steps (bytes)", sizes[50] / sizes[10], goal="= 1")
    assert sizes[10] == sizes[50]
    growth = rss["b"] - rss["a"]
    print(f"[bench_attention] peak RSS growth from the 10-step to the 50-step run: "
          f"{growth:.1f} MB (goal: 0)")
    record("peak RSS growth, 10 → 50 steps", growth, goal="0", unit="MB")
    assert growth < 50


def test_sd15_store_size_on_meta_device(record):
    from diffnotes.models.sd_shapes import meta_unet

    unet = meta_unet("sd-1.5")
    x = torch.zeros(2, 4, 64, 64, device="meta")
    ctx = torch.zeros(2, 77, 768, device="meta")
    sizes = {}
    for n in (2, 5):
        store = AttentionStore(kinds=("cross", "self"), rows="cond", self_max_res=32)
        with torch.no_grad(), store.attach(unet):
            for _ in range(n):
                unet(x, torch.zeros((), dtype=torch.long, device="meta"), ctx)
        sizes[n] = store.nbytes()
    cross = sum(store.sums[i.name].numel() * 4 for i in store.layers("cross"))
    print(f"[bench_attention] SD 1.5, 512x512, CFG batch: store {sizes[5] / 2**20:.1f} MiB after "
          f"2 and after 5 UNet calls ({sizes[2] == sizes[5]}); cross-attention part "
          f"{cross / 2**20:.1f} MiB; keeping every step's maps would add that much per step")
    record("SD 1.5 attention store after 5 / after 2 UNet calls (bytes, meta device)", sizes[5] / sizes[2], goal="= 1")
    assert sizes[2] == sizes[5]
