"""Prompt-to-Prompt measured on the shapes model, judged by :mod:`diffnotes.models.eval_shapes`.

``python -m diffnotes.editing.eval_p2p`` runs the full evaluation once (60 source prompts per
edit kind by default) and writes ``diffnotes/editing/results/p2p.json``: the figures and a
record of the run (command, wall time, threads, date, settings), like the weights'
``TRAINING.json``. The chapter "Prompt-to-Prompt" reads that file for its tables and re-measures
the first few prompts of each kind with :func:`evaluate` to show that they reproduce.

Edit kinds (the source prompts are single-object prompts of
:func:`~diffnotes.models.eval_shapes.single_object_prompts`, deterministic for the seed):

* ``colour``: "… red <shape> …" → "… blue <shape> …" (:class:`~diffnotes.editing.p2p.WordSwap`);
* ``shape``: "… circle …" → "… square …" (WordSwap);
* ``size``: "small" ↔ "large" (WordSwap);
* ``refine``: adding a size ("a red circle on the left" → "a large red circle on the left") or
  a position ("a large red circle" → "a large red circle on the right")
  (:class:`~diffnotes.editing.p2p.Refine`), alternately;
* ``reweight``: "a large … " with the maps of "large" multiplied by c
  (:class:`~diffnotes.editing.p2p.Reweight`), c in ``REWEIGHT_SCALES``; c = 1 is the source
  itself (the identity edit, tested to equal plain sampling), so it is not re-run.

For every edit: **success** (the edited attribute of the edited image, judged, equals the
target value), **preservation** (the other judged attributes — of colour, shape, position,
size — equal the source image's) and **PSNR outside** the union of the source's and the edit's
segmented object masks. The **baseline** resamples the target prompt from the same initial
latent without attention control (plain DDIM with guidance, :func:`diffnotes.ddim.ddim_sample`;
the same as ``prompt_to_prompt`` with τ = 0 and no self-replacement). ``already`` is the
fraction of sources whose judged attribute already had the target value (an edit that does
nothing scores that much).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import shapes as S
from ..ddim import ddim_sample
from ..models import eval_shapes as ev
from ..utils import check_choice, check_int
from .common import encode_prompts, pipe_alphas_cumprod, pipe_eps_model, pipe_timesteps
from .inversion import decode_latents
from .p2p import Refine, Reweight, WordSwap, prompt_to_prompt

__all__ = ["KINDS", "REWEIGHT_SCALES", "ATTRIBUTES", "SETTINGS", "RESULTS_PATH", "edit_specs",
           "judge", "psnr_outside", "initial_latent", "evaluate_kind", "evaluate", "summarize",
           "load_results"]

KINDS = ("colour", "shape", "size", "refine", "reweight")
REWEIGHT_SCALES = (-2.0, -1.0, 0.0, 1.0, 2.0)
ATTRIBUTES = ("color", "shape", "position", "size")
#: the default settings of the measurement (P2P's defaults, the book's 20 DDIM steps).
SETTINGS = dict(num_inference_steps=20, guidance_scale=7.5, cross_replace_steps=0.8,
                self_replace_steps=0.4, seed=0)
RESULTS_PATH = Path(__file__).parent / "results" / "p2p.json"
_BASELINE_CHUNK = 5      # plain samples per batch (fixed, so a prefix of the list reproduces)


# ---------------------------------------------------------------------------- the prompts
def edit_specs(kind: str, n: int = 60, seed: int = 0) -> list[dict]:
    """The ``n`` (source, target) pairs of an edit kind, deterministic for ``seed``: dicts with
    ``source``, ``target``, ``attribute`` (the edited attribute, one of :data:`ATTRIBUTES`),
    ``value`` (its target value; None for ``reweight``) and the source's spec."""
    check_choice(kind, "kind", KINDS)
    n = check_int(n, "n", min=1)
    out = []
    if kind == "colour":
        for s in ev.single_object_prompts(n, seed, colors=("red",)):
            out.append(dict(s, source=s["prompt"], target=s["prompt"].replace("red", "blue"),
                            attribute="color", value="blue"))
    elif kind == "shape":
        for s in ev.single_object_prompts(n, seed, shapes=("circle",)):
            out.append(dict(s, source=s["prompt"], target=s["prompt"].replace("circle", "square"),
                            attribute="shape", value="square"))
    elif kind == "size":
        for s in ev.single_object_prompts(n, seed):
            new = "large" if s["size"] == "small" else "small"
            out.append(dict(s, source=s["prompt"], target=s["prompt"].replace(s["size"], new),
                            attribute="size", value=new))
    elif kind == "refine":
        for i, s in enumerate(ev.single_object_prompts(n, seed)):
            if i % 2 == 0:       # add a size
                src = S.prompt_for(s["shape"], s["color"], None, s["position"])
                out.append(dict(s, source=src, target=s["prompt"], attribute="size",
                                value=s["size"]))
            else:                # add a position
                src = S.prompt_for(s["shape"], s["color"], s["size"], None)
                out.append(dict(s, source=src, target=s["prompt"], attribute="position",
                                value=s["position"]))
    else:
        for s in ev.single_object_prompts(n, seed):
            p = S.prompt_for(s["shape"], s["color"], "large", s["position"])
            out.append(dict(s, size="large", prompt=p, source=p, target=p, attribute="size",
                            value=None))
    return out


# ---------------------------------------------------------------------------- the judges
def judge(image) -> dict:
    """The judged attributes of a generated image (:mod:`diffnotes.models.eval_shapes`) and its
    segmented object mask: ``{color, shape, position, size, area, mask}``."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    img = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    m = ev.segment_object(img)
    return dict(color=ev.judge_color(img, m), shape=ev.judge_shape(m),
                position=ev.judge_position(m), size=ev.judge_size(m), area=int(m.sum()), mask=m,
                image=img)


def psnr_outside(a: dict, b: dict) -> float:
    """PSNR (dB, images in [0, 1]) between two judged images over the pixels outside the union
    of their object masks (inf if they agree there; nan if the union covers everything)."""
    out = ~(a["mask"] | b["mask"])
    if not out.any():
        return float("nan")
    mse = float(((a["image"] - b["image"]) ** 2)[out].mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def initial_latent(pipe, seed: int, i: int) -> torch.Tensor:
    """The initial latent x_T (1, C, h, w) of prompt ``i`` of a run seeded by ``seed``."""
    u = pipe.unet.config
    g = torch.Generator().manual_seed(seed * 100003 + i)
    x = torch.randn((1, u.in_channels, u.sample_size, u.sample_size), generator=g)
    return (x * getattr(pipe.scheduler, "init_noise_sigma", 1.0)).to(pipe.unet.dtype)


def _plain(pipe, prompts, x_T, steps, guidance):
    """Plain guided DDIM samples of ``prompts`` from the latents ``x_T`` (the baseline)."""
    eps = pipe_eps_model(pipe, encode_prompts(pipe, list(prompts)), encode_prompts(pipe, ""),
                         guidance)
    z = ddim_sample(eps, x_T.to(pipe.unet.device), pipe_timesteps(pipe, steps),
                    pipe_alphas_cumprod(pipe))
    x = decode_latents(pipe, z).permute(0, 2, 3, 1).float().cpu().numpy()
    return [a.astype(np.float64) for a in x]


def _record(spec, src, edit, kind, c=None) -> dict:
    others = [a for a in ATTRIBUTES if a != spec["attribute"]]
    r = dict(source=spec["source"], target=spec["target"], attribute=spec["attribute"],
             value=spec["value"], src={a: src[a] for a in ATTRIBUTES} | {"area": src["area"]},
             edit={a: edit[a] for a in ATTRIBUTES} | {"area": edit["area"]},
             preserved=all(edit[a] == src[a] for a in others),
             psnr_outside=psnr_outside(src, edit))
    if kind != "reweight":
        r["success"] = edit[spec["attribute"]] == spec["value"]
        r["already"] = src[spec["attribute"]] == spec["value"]
    else:
        r["c"] = c
    return r


def evaluate_kind(pipe, kind: str, n: int = 60, seed: int = 0, limit: int | None = None,
                  num_inference_steps: int = 20, guidance_scale: float = 7.5,
                  cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4,
                  scales=REWEIGHT_SCALES, baseline: bool = True, progress: bool = True) -> dict:
    """P2P (and the baseline) on the first ``limit`` (default all) of the ``n`` pairs of
    :func:`edit_specs`; prompt i starts from the latent seeded by (``seed``, i), so a prefix of
    the list reproduces the full run's records. Returns ``{"p2p": [...], "baseline": [...]}``,
    one record per edit (per prompt and scale for ``reweight``; no baseline there)."""
    specs = edit_specs(kind, n, seed)[: limit or n]
    p2p, base = [], []
    for i, spec in enumerate(tqdm(specs, disable=not progress, desc=kind, leave=False)):
        x_T = initial_latent(pipe, seed, i)
        kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps,
                  latents=x_T)
        if kind == "reweight":
            src = None
            for c in scales:
                if c == 1.0 and src is not None:
                    p2p.append(_record(spec, src, src, kind, c))
                    continue
                ims, _ = prompt_to_prompt(pipe, [spec["source"], spec["target"]],
                                          Reweight("large", c), **kw)
                src = src or judge(ims[0])
                p2p.append(_record(spec, src, judge(ims[1]), kind, c))
            continue
        edit = Refine() if kind == "refine" else WordSwap()
        ims, _ = prompt_to_prompt(pipe, [spec["source"], spec["target"]], edit, **kw)
        src = judge(ims[0])
        p2p.append(_record(spec, src, judge(ims[1]), kind))
        spec["_src"] = src
    if baseline and kind != "reweight":
        for k in range(0, len(specs), _BASELINE_CHUNK):
            chunk = specs[k:k + _BASELINE_CHUNK]
            x_T = torch.cat([initial_latent(pipe, seed, k + j) for j in range(len(chunk))])
            outs = _plain(pipe, [s["target"] for s in chunk], x_T, num_inference_steps,
                          guidance_scale)
            for s, im in zip(chunk, outs):
                base.append(_record(s, s["_src"], judge(im), kind))
    for s in specs:
        s.pop("_src", None)
    return {"p2p": p2p, "baseline": base}


def summarize(kind: str, res: dict) -> dict:
    """Rates and means of one kind's records: for each method, ``n``, ``success``, ``already``,
    ``preserved``, ``psnr_outside`` (median, dB; medians because identical backgrounds give
    inf); for ``reweight``, per scale c the mean object area and preservation, and the
    fractions of prompts whose area grows from c = 1 to 2 and shrinks from 1 to 0."""
    def med(v):
        v = [x for x in v if not math.isnan(x)]
        return float(np.median(v)) if v else float("nan")

    if kind == "reweight":
        recs = res["p2p"]
        by_c = {}
        for c in sorted({r["c"] for r in recs}):
            rc = [r for r in recs if r["c"] == c]
            areas = [r["edit"]["area"] for r in rc]
            by_c[f"{c:g}"] = dict(n=len(rc), area=float(np.mean(areas)),
                                  area_std=float(np.std(areas)),
                                  large=float(np.mean([r["edit"]["size"] == "large" for r in rc])),
                                  preserved=float(np.mean([r["preserved"] for r in rc])),
                                  psnr_outside=med([r["psnr_outside"] for r in rc]))
        groups = [recs[i:i + len(by_c)] for i in range(0, len(recs), len(by_c))]
        area = [{r["c"]: r["edit"]["area"] for r in g} for g in groups]
        has = set(area[0]) if area else set()
        grows = float(np.mean([a[2.0] > a[1.0] for a in area])) if {1.0, 2.0} <= has else None
        shrinks = float(np.mean([a[0.0] < a[1.0] for a in area])) if {0.0, 1.0} <= has else None
        return dict(n=len(groups), by_c=by_c, grows_1_to_2=grows, shrinks_1_to_0=shrinks)
    out = {}
    for method, recs in res.items():
        if not recs:
            continue
        out[method] = dict(n=len(recs), success=float(np.mean([r["success"] for r in recs])),
                           already=float(np.mean([r["already"] for r in recs])),
                           preserved=float(np.mean([r["preserved"] for r in recs])),
                           psnr_outside=med([r["psnr_outside"] for r in recs]))
    if kind == "refine":
        for attr in ("size", "position"):
            for method, recs in res.items():
                rr = [r for r in recs if r["attribute"] == attr]
                if rr:
                    out[method][f"success_{attr}"] = float(np.mean([r["success"] for r in rr]))
    return out


def evaluate(pipe, n: int = 60, seed: int = 0, limit: int | None = None,
             kinds=KINDS, reweight_limit: int | None = None, progress: bool = True,
             **settings) -> dict:
    """Every kind of :data:`KINDS` (see :func:`evaluate_kind`); returns ``{kind: {"summary":
    ..., "records": ...}}``. ``reweight_limit`` (default ``limit``) caps the re-weighted
    prompts, which cost one edit per scale."""
    out = {}
    for kind in kinds:
        lim = reweight_limit or limit if kind == "reweight" else limit
        res = evaluate_kind(pipe, kind, n, seed, lim, progress=progress, **settings)
        out[kind] = dict(summary=summarize(kind, res), records=res)
    return out


def load_results(path=None) -> dict:
    """The stored full evaluation (``results/p2p.json``)."""
    import json

    with open(path or RESULTS_PATH) as f:
        return json.load(f)


def main(argv=None) -> None:  # pragma: no cover - the measurement command
    import argparse
    import json
    import platform
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="source prompts per edit kind")
    ap.add_argument("--seed", type=int, default=SETTINGS["seed"])
    ap.add_argument("--steps", type=int, default=SETTINGS["num_inference_steps"])
    ap.add_argument("--guidance", type=float, default=SETTINGS["guidance_scale"])
    ap.add_argument("--tau", type=float, default=SETTINGS["cross_replace_steps"])
    ap.add_argument("--self-tau", type=float, default=SETTINGS["self_replace_steps"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS_PATH))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ..models.load import load_pipeline

    start, cpu0 = time.perf_counter(), time.process_time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    pipe = load_pipeline("shapes")
    settings = dict(num_inference_steps=a.steps, guidance_scale=a.guidance,
                    cross_replace_steps=a.tau, self_replace_steps=a.self_tau)
    res = {}
    for kind in tqdm(KINDS, desc="edit kinds"):
        r = evaluate_kind(pipe, kind, a.n, a.seed, progress=True, **settings)
        res[kind] = dict(summary=summarize(kind, r), records=r)
    record = dict(command=" ".join(["python -m diffnotes.editing.eval_p2p",
                                    *(argv if argv is not None else sys.argv[1:])]),
                  date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  wall_time_s=round(time.perf_counter() - start, 1),
                  process_cpu_time_s=round(time.process_time() - cpu0, 1), threads=a.threads,
                  machine=f"{platform.machine()}, {os.cpu_count()} logical CPUs",
                  load_average_at_start=load, torch=torch.__version__, model="shapes",
                  n=a.n, seed=a.seed, scales=list(REWEIGHT_SCALES), **settings)
    res["record"] = record
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=float)
        f.write("\n")
    for kind in KINDS:
        print(kind, json.dumps(res[kind]["summary"], default=float))
    print(f"wrote {a.out} in {record['wall_time_s']} s")


if __name__ == "__main__":  # pragma: no cover
    main()
