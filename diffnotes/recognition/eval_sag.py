"""Does self-attention guidance help the shapes model? ``python -m diffnotes.recognition.eval_sag``.

Hong et al. (ICCV 2023) report better FID/IS with SAG on ADM and Stable Diffusion; Ahmad's notes
(§5.11) give no numbers. Here the ground truth is the prompt: every image is judged by the
project's model-independent judges (:mod:`diffnotes.models.eval_shapes`), with and without SAG
(:func:`diffnotes.guidance.sag_sample`, scale 0.75, blur σ = 1, kernel 9: the paper's defaults),
at a low (1.5) and the usual (7.5) classifier-free guidance scale, from the same initial noise:

* single-object prompts (:func:`~diffnotes.models.eval_shapes.single_object_prompts`): the share
  of images whose object passes the shape judge, the colour judge, and both;
* two-object prompts (:func:`~diffnotes.models.eval_shapes.two_object_prompts`): the share of
  each :func:`~diffnotes.models.eval_shapes.binding_outcome` of
  :func:`~diffnotes.models.eval_shapes.judge_scene`, ``correct`` being the accuracy;
* paired counts: prompts that SAG fixes (plain wrong, SAG right) and breaks;
* the judges' own accuracy on the generator's scenes (their error bar).

Writes ``diffnotes/recognition/results/sag.json``. Run with ``nice -n 5``, one thread.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "sag.json"
SAG_SCALE, SIGMA, KERNEL, STEPS = 0.75, 1.0, 9, 20

__all__ = ["generate", "judge_single", "judge_two", "measure", "main", "RESULTS_PATH"]


def _latents(pipe, n: int, seed: int) -> torch.Tensor:
    """One initial latent per prompt, prompt i from a generator seeded ``seed + i`` (the same
    noise with and without SAG, whatever the batching)."""
    u = pipe.unet.config
    return torch.cat([torch.randn((1, u.in_channels, u.sample_size, u.sample_size),
                                  generator=torch.Generator().manual_seed(seed + i),
                                  dtype=pipe.unet.dtype) for i in range(n)])


def generate(pipe, prompts, guidance_scale: float, sag_scale: float, seed: int = 0,
             steps: int = STEPS, batch: int = 10, sigma: float = SIGMA) -> np.ndarray:
    """Images (n, H, W, 3) in [0, 1] of ``prompts``; ``sag_scale = 0`` is plain CFG DDIM."""
    from ..guidance import sag_sample

    xT = _latents(pipe, len(prompts), seed)
    out = []
    for a in range(0, len(prompts), batch):
        out.append(sag_sample(pipe, list(prompts[a:a + batch]), sag_scale=sag_scale,
                              guidance_scale=guidance_scale, num_inference_steps=steps,
                              sigma=sigma, kernel_size=KERNEL, latents=xT[a:a + batch]))
    return np.concatenate(out)


def judge_single(images, specs, clf) -> list[dict]:
    """Per image: ``shape_ok``, ``color_ok`` of the largest segmented object."""
    from ..models.eval_shapes import judge_color, judge_shape, segment_object

    out = []
    for im, sp in zip(images, specs):
        m = segment_object(im)
        ok = m.sum() > 0
        out.append(dict(shape_ok=bool(ok and judge_shape(m, clf) == sp["shape"]),
                        color_ok=bool(ok and judge_color(im, m) == sp["color"])))
    return out


def judge_two(images, specs, clf) -> list[str]:
    """Per image: the :func:`~diffnotes.models.eval_shapes.binding_outcome`."""
    from ..models.eval_shapes import binding_outcome, judge_scene

    return [binding_outcome(judge_scene(im, clf), sp["objects"]) for im, sp in zip(images, specs)]


def measure(pipe, n_single: int = 60, n_two: int = 60, guidance_scales=(1.5, 7.5),
            sag_scale: float = SAG_SCALE, seed: int = 0, steps: int = STEPS, batch: int = 10,
            sigma: float = SIGMA, progress: bool = True) -> dict:
    """The figures of the module docstring, as a dict keyed ``"cfg1.5"``, ``"cfg7.5"``."""
    from tqdm.auto import tqdm

    from ..models.eval_shapes import OUTCOMES, shape_judge, single_object_prompts, two_object_prompts

    clf = shape_judge()
    singles = single_object_prompts(n_single, seed=seed + 11)
    twos = two_object_prompts(n_two, seed=seed + 13)
    res = {}
    jobs = [(gs, s) for gs in guidance_scales for s in (0.0, sag_scale)]
    per = {}
    for gs, s in tqdm(jobs, disable=not progress, desc="SAG eval"):
        t0 = time.perf_counter()
        im1 = generate(pipe, [p["prompt"] for p in singles], gs, s, seed, steps, batch, sigma)
        im2 = generate(pipe, [p["prompt"] for p in twos], gs, s, seed + 1000, steps, batch, sigma)
        secs = (time.perf_counter() - t0) / (n_single + n_two)
        per[(gs, s)] = (judge_single(im1, singles, clf), judge_two(im2, twos, clf), secs)
    for gs in guidance_scales:
        row = {}
        for s, name in ((0.0, "plain"), (sag_scale, "sag")):
            one, two, secs = per[(gs, s)]
            row[name] = dict(
                shape_ok=float(np.mean([r["shape_ok"] for r in one])),
                color_ok=float(np.mean([r["color_ok"] for r in one])),
                single_correct=float(np.mean([r["shape_ok"] and r["color_ok"] for r in one])),
                binding={o: float(np.mean([x == o for x in two])) for o in OUTCOMES},
                two_correct=float(np.mean([x == "correct" for x in two])),
                seconds_per_image=secs)
        (p1, p2, _), (q1, q2, _) = per[(gs, 0.0)], per[(gs, sag_scale)]
        row["paired"] = dict(
            shape_fixed=int(sum((not a["shape_ok"]) and b["shape_ok"] for a, b in zip(p1, q1))),
            shape_broken=int(sum(a["shape_ok"] and not b["shape_ok"] for a, b in zip(p1, q1))),
            two_fixed=int(sum(a != "correct" and b == "correct" for a, b in zip(p2, q2))),
            two_broken=int(sum(a == "correct" and b != "correct" for a, b in zip(p2, q2))))
        res[f"cfg{gs:g}"] = row
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m diffnotes.recognition.eval_sag")
    ap.add_argument("--n", type=int, default=60, help="prompts of each kind")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_PATH))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from ..models.eval_shapes import scene_judge_accuracy
    from ..models.load import load_pipeline

    t0, c0 = time.time(), time.process_time()
    pipe = load_pipeline("shapes")
    res = measure(pipe, a.n, a.n, seed=a.seed, steps=a.steps)
    judges = scene_judge_accuracy(100)
    rec = dict(
        method="self-attention guidance (diffnotes.guidance.sag_sample): DDIM, CFG, mid-block "
               "self-attention mask, blur of x̂_0, re-noised, one extra unconditional pass",
        sag_scale=SAG_SCALE, blur_sigma=SIGMA, kernel_size=KERNEL, steps=a.steps,
        n_single=a.n, n_two=a.n, seed=a.seed, results=res,
        judges_on_ground_truth=judges,
        command="nice -n 5 python -m diffnotes.recognition.eval_sag",
        wall_seconds=round(time.time() - t0, 1), cpu_seconds=round(time.process_time() - c0, 1),
        threads=1, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
