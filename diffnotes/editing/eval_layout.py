"""Layout control measured on the shapes model, judged by :mod:`diffnotes.models.eval_shapes`.

``python -m diffnotes.editing.eval_layout`` runs the full measurement once (40 layouts by
default) and writes ``diffnotes/editing/results/layout.json``: the figures, one record per
layout and method, and a record of the run (command, wall time, threads, date, settings). The
chapter "Layout: SpaText, LLM-grounded diffusion, dense generation" reads that file for its
tables and re-measures the first layouts with :func:`evaluate`.

The requested layouts are the generator's own scenes (:func:`diffnotes.data.shapes.
generate_scenes`, 1 or 2 objects, plain backgrounds): each object's colour and shape, its box
(the generator's tight box, as a fraction of the 64-pixel canvas) and its mask. Methods, all
from the same initial noise per layout (20 DDIM steps, guidance 7.5):

* ``plain``: plain sampling of the caption without positions ("a red circle and a blue
  square"), a floor: where the model puts objects on its own;
* ``positional``: plain sampling of the caption WITH the generator's position phrases ("a red
  circle on the left and a blue square in the center"): the baseline, since the shapes model was
  trained on such captions;
* ``lmd``: :func:`diffnotes.editing.layout.lmd` on the boxes (LMD's defaults, η = 5);
  ``lmd_eta50``: the same with the step size η = :data:`ETA_STRONG` = 50;
* ``dense``: :func:`diffnotes.editing.layout.dense_diffusion` on the caption without positions,
  with the objects' masks as segments (eq 3.17 as printed: tokens and pixels in no segment are
  pushed down); ``dense_background``: the same with the uncovered pixels as one more segment
  (``background=True``, the official demo's habit);
* ``spatext``: :func:`diffnotes.editing.spatext.spatext` on the masks (not run by default:
  SpaText has its own measurement, ``python -m diffnotes.editing.spatext evaluate``).

``--methods`` picks a subset; ``--add`` evaluates more methods into an existing record (same
layouts and seeds), keeping what is there; ``--merge FILE`` adds the methods of another record
of the same layouts.

Judging: :func:`diffnotes.models.eval_shapes.judge_scene` finds the generated objects; each
requested object is matched to a found one of its colour and shape (else of its colour), the
one overlapping its box most; unmatched counts as missed (IoU 0, not inside). Per object:

* ``box_iou``: IoU of the found object's bounding box with the requested box;
* ``mask_iou``: IoU of the found object's mask with the requested segment (the generator's mask);
* ``inside``: at least 80% of the found object's pixels lie in the requested box grown by 4 px
  (one latent pixel) on each side;
* ``found``: a match exists.
``time_s``: seconds per image (wall clock, one thread) of each method.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from ..data import shapes as S
from ..ddim import ddim_sample
from ..models import eval_shapes as ev
from ..utils import check_int
from .common import encode_prompts, pipe_alphas_cumprod, pipe_eps_model, pipe_timesteps
from .inversion import decode_latents
from .layout import dense_diffusion, lmd, make_layout

__all__ = ["METHODS", "SETTINGS", "RESULTS_PATH", "layouts", "judge_layout", "run_method",
           "evaluate", "summarize", "merge_results", "load_results", "spatext_available"]

METHODS = ("plain", "positional", "lmd", "lmd_eta50", "dense", "dense_background", "spatext")
#: the larger LMD step size of ``lmd_eta50`` (LMD's own is η = 5, tuned on Stable Diffusion)
ETA_STRONG = 50.0
SETTINGS = dict(num_inference_steps=20, guidance_scale=7.5, seed=0, margin_px=4,
                inside_fraction=0.8)
RESULTS_PATH = Path(__file__).parent / "results" / "layout.json"


_POOL = 160      # scenes per generator call: the layouts of a seed do not depend on n


def _scene_pool(seed: int):
    """(index, scenes) of the generator's scenes, chunk after chunk of :data:`_POOL` (chunk 0
    from ``seed``, chunk k from the generator seeded with ``[seed, k]``), so that the first
    layouts are the same whatever the number asked for."""
    k = 0
    while True:
        rng = seed if k == 0 else np.random.default_rng([seed, k])
        sc = S.generate_scenes(_POOL, seed=rng, min_objects=1, max_objects=2,
                               object_count_probs=(0.5, 0.5, 0.0), textured=False)
        for i in range(len(sc)):
            yield i, sc
        k += 1


def layouts(n: int = 40, seed: int = 0) -> list[dict]:
    """``n`` requested layouts from the generator's scenes (1 or 2 objects, equally often, plain
    backgrounds; scenes whose two objects share a colour or a shape are skipped, so matching is
    unique): dicts with ``objects`` (shape, colour, position), ``boxes`` (fractions, end
    exclusive), ``masks`` (bool (k, 64, 64)), ``phrases`` ("a red circle"), ``prompt`` (no
    positions) and ``positional`` (with the position phrases). The first layouts of a seed do
    not depend on ``n``."""
    n = check_int(n, "n", min=1)
    out = []
    for i, sc in _scene_pool(seed):
        objs = sc.objects[i]
        if len(out) == n:
            break
        if len({o["color"] for o in objs}) < len(objs) or len({o["shape"] for o in objs}) \
                < len(objs):
            continue                       # distinct colours and shapes: matching is unique
        k = len(objs)
        phrases = [S.caption_objects([dict(shape=o["shape"], color=o["color"])])[0]
                   for o in objs]
        boxes = [tuple(float(v) / S.IMAGE_SIZE for v in sc.boxes[i, j]) for j in range(k)]
        out.append(dict(
            objects=[dict(shape=o["shape"], color=o["color"], position=o["position"])
                     for o in objs],
            boxes=boxes, masks=sc.masks[i, :k].copy(), phrases=phrases,
            prompt=" and ".join(phrases),
            positional=S.caption_objects(objs, mention_size=False, mention_position=True)[0]))
    return out


def judge_layout(image, spec: dict, clf=None, margin_px: int = 4,
                 inside_fraction: float = 0.8) -> list[dict]:
    """Judge a generated image against a requested layout (see the module doc): one dict per
    requested object with ``found``, ``box_iou``, ``mask_iou``, ``inside``."""
    found = ev.judge_scene(image, clf)
    H = W = S.IMAGE_SIZE
    out = []
    for j, obj in enumerate(spec["objects"]):
        x0, y0, x1, y1 = (int(round(v * S.IMAGE_SIZE)) for v in spec["boxes"][j])
        box = np.zeros((H, W), dtype=bool)
        box[y0:y1, x0:x1] = True
        grown = np.zeros((H, W), dtype=bool)
        grown[max(y0 - margin_px, 0):y1 + margin_px, max(x0 - margin_px, 0):x1 + margin_px] = True
        cands = [f for f in found if f["color"] == obj["color"] and f["shape"] == obj["shape"]]
        cands = cands or [f for f in found if f["color"] == obj["color"]]
        if not cands:
            out.append(dict(found=False, box_iou=0.0, mask_iou=0.0, inside=False))
            continue
        f = max(cands, key=lambda f: (f["mask"] & box).sum() / f["area"])
        fb = np.zeros((H, W), dtype=bool)
        bx0, by0, bx1, by1 = f["box"]
        fb[by0:by1, bx0:bx1] = True
        seg = spec["masks"][j]
        out.append(dict(
            found=True,
            box_iou=float((fb & box).sum() / (fb | box).sum()),
            mask_iou=float((f["mask"] & seg).sum() / (f["mask"] | seg).sum()),
            inside=bool((f["mask"] & grown).sum() >= inside_fraction * f["area"])))
    return out


def spatext_available(pipe=None) -> bool:
    """Whether :mod:`diffnotes.editing.spatext` can be imported and its model loaded."""
    try:
        from . import spatext as sp
        if pipe is not None:
            sp.load_spatext(pipe)
        return True
    except Exception:                                    # noqa: BLE001 - any failure: skip
        return False


def _plain(pipe, prompt, x_T, steps, gs):
    eps = pipe_eps_model(pipe, encode_prompts(pipe, prompt), encode_prompts(pipe, ""), gs)
    with torch.no_grad():
        z = ddim_sample(eps, x_T, pipe_timesteps(pipe, steps), pipe_alphas_cumprod(pipe))
    return decode_latents(pipe, z).permute(0, 2, 3, 1).float().cpu().numpy()[0]


def run_method(pipe, method: str, spec: dict, seed: int, num_inference_steps: int = 20,
               guidance_scale: float = 7.5, spatext_model=None, **kw) -> np.ndarray:
    """One image (H, W, 3 in [0, 1]) of ``method`` for the layout ``spec``, from the initial
    noise of ``torch.Generator().manual_seed(seed)``."""
    steps, gs = num_inference_steps, guidance_scale
    g = torch.Generator().manual_seed(seed)
    u = pipe.unet.config
    x_T = torch.randn((1, u.in_channels, u.sample_size, u.sample_size), generator=g,
                      dtype=pipe.unet.dtype)
    if method == "plain":
        return _plain(pipe, spec["prompt"], x_T, steps, gs)
    if method == "positional":
        return _plain(pipe, spec["positional"], x_T, steps, gs)
    if method in ("lmd", "lmd_eta50"):
        if method == "lmd_eta50":
            kw = dict(kw, eta=ETA_STRONG)
        lay = make_layout(list(zip(spec["phrases"], spec["boxes"])))
        return lmd(pipe, lay, latents=x_T, num_inference_steps=steps, guidance_scale=gs,
                   output_type="np", **kw)[0]
    if method in ("dense", "dense_background"):
        if method == "dense_background":
            kw = dict(kw, background=True)
        segs = list(zip(spec["phrases"], [torch.as_tensor(m) for m in spec["masks"]]))
        return dense_diffusion(pipe, spec["prompt"], segs, latents=x_T,
                               num_inference_steps=steps, guidance_scale=gs, output_type="np",
                               **kw)[0]
    if method == "spatext":
        from .spatext import spatext
        segs = list(zip(spec["phrases"], [torch.as_tensor(m) for m in spec["masks"]]))
        segs = [(p, m.bool()) for p, m in segs]
        return spatext(pipe, spec["prompt"], segs, model=spatext_model, latents=x_T,
                       num_inference_steps=steps, guidance_scale=gs, output_type="np")[0]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def evaluate(pipe, n: int = 40, seed: int = 0, methods=("plain", "positional", "lmd", "dense"),
             num_inference_steps: int = 20, guidance_scale: float = 7.5, clf=None,
             method_kwargs: dict | None = None, progress: bool = False) -> dict:
    """Generate and judge the first ``n`` layouts of :func:`layouts` with each method: returns
    ``{"records": {method: [per layout: {"objects": [judged], "time_s"}]}, "summary":
    summarize(records)}``. Layout i uses seed ``seed + i`` for its initial noise."""
    clf = clf or ev.shape_judge()
    specs = layouts(n, seed)
    method_kwargs = method_kwargs or {}
    sp_model = None
    if "spatext" in methods:
        from .spatext import load_spatext
        sp_model = load_spatext(pipe)
    records = {m: [] for m in methods}
    for i, spec in enumerate(specs):
        for m in methods:
            t0 = time.perf_counter()
            img = run_method(pipe, m, spec, seed + i, num_inference_steps, guidance_scale,
                             spatext_model=sp_model, **method_kwargs.get(m, {}))
            dt = time.perf_counter() - t0
            records[m].append(dict(prompt=spec["prompt"], n_objects=len(spec["objects"]),
                                   objects=judge_layout(img, spec, clf), time_s=dt))
        if progress:
            print(f"layout {i + 1}/{n}", flush=True)
    return dict(records=records, summary=summarize(records))


def summarize(records: dict) -> dict:
    """Per method: mean ``box_iou``, ``mask_iou``, the shares ``inside`` and ``found`` over all
    requested objects, the same for 1- and 2-object layouts, and the mean ``time_s``."""
    out = {}
    for m, recs in records.items():
        objs = [o for r in recs for o in r["objects"]]
        row = dict(n_layouts=len(recs), n_objects=len(objs),
                   box_iou=float(np.mean([o["box_iou"] for o in objs])),
                   mask_iou=float(np.mean([o["mask_iou"] for o in objs])),
                   inside=float(np.mean([o["inside"] for o in objs])),
                   found=float(np.mean([o["found"] for o in objs])),
                   time_s=float(np.mean([r["time_s"] for r in recs])))
        for k in (1, 2):
            sub = [o for r in recs if r["n_objects"] == k for o in r["objects"]]
            if sub:
                row[f"box_iou_{k}"] = float(np.mean([o["box_iou"] for o in sub]))
                row[f"inside_{k}"] = float(np.mean([o["inside"] for o in sub]))
        out[m] = row
    return out


def merge_results(main: dict, extra: dict) -> dict:
    """``main`` with the methods of ``extra`` added (both records of :func:`main`'s format, the
    same ``n`` and ``seed``, so the same layouts and noise); ``extra``'s run record is kept in
    ``main["added"]``."""
    a, b = main["record"]["settings"], extra["record"]["settings"]
    if (a["n"], a["seed"]) != (b["n"], b["seed"]):
        raise ValueError(f"extra must have the same n and seed as main ({a['n']}, {a['seed']}), "
                         f"got ({b['n']}, {b['seed']})")
    out = dict(main)
    out["records"] = dict(main["records"], **extra["records"])
    out["summary"] = summarize(out["records"])
    out["added"] = list(main.get("added", [])) + [extra["record"]]
    return out


def load_results(path: str | os.PathLike | None = None) -> dict:
    """The stored full measurement (``results/layout.json``)."""
    import json
    with open(path or RESULTS_PATH) as f:
        return json.load(f)


def main(argv=None) -> None:  # pragma: no cover - the measurement command
    import argparse
    import datetime
    import json
    import sys

    from ..models.load import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=SETTINGS["seed"])
    ap.add_argument("--methods", default="plain,positional,lmd,dense",
                    help="comma-separated subset of " + ",".join(METHODS) + " (auto: every "
                         "available one; SpaText has its own measurement, "
                         "python -m diffnotes.editing.spatext evaluate)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS_PATH))
    ap.add_argument("--add", action="store_true",
                    help="add the methods to the record in --out (same n and seed)")
    ap.add_argument("--merge", default=None,
                    help="merge the methods of this record file (same n and seed) into --out, "
                         "then stop")
    a = ap.parse_args(argv)
    if a.merge:
        res = merge_results(load_results(a.out), load_results(a.merge))
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=float)
        print(f"merged {a.merge} into {a.out}: methods {list(res['records'])}")
        return
    torch.set_num_threads(a.threads)
    start, cpu0 = time.perf_counter(), time.process_time()
    pipe = load_pipeline("shapes")
    if a.methods == "auto":
        methods = [m for m in METHODS if m != "spatext"] + (
            ["spatext"] if spatext_available(pipe) else [])
    else:
        methods = a.methods.split(",")
    res = evaluate(pipe, a.n, a.seed, methods, SETTINGS["num_inference_steps"],
                   SETTINGS["guidance_scale"], progress=True)
    record = dict(
        command=" ".join(["python -m diffnotes.editing.eval_layout"]
                         + (sys.argv[1:] if argv is None else list(argv))),
        wall_time_s=round(time.perf_counter() - start, 1),
        process_cpu_time_s=round(time.process_time() - cpu0, 1), threads=a.threads,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        settings=dict(SETTINGS, n=a.n, methods=methods), torch=torch.__version__)
    res["record"] = record
    if a.add:
        res = merge_results(load_results(a.out), res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=float)
    for m, row in res["summary"].items():
        print(m, json.dumps(row))
    print(f"wrote {a.out} in {res['record']['wall_time_s']} s")


if __name__ == "__main__":
    main()
