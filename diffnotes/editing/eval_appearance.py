"""Appearance transfer, measured on the ground truth of the shapes generator.

``python -m diffnotes.editing.eval_appearance`` runs the evaluation of the chapter "Appearance
transfer: Cross-Image Attention and Eye-for-an-Eye" once and writes
``diffnotes/editing/results/appearance.json`` (figures plus a record of the run: command, wall
time, threads, date, settings).

Pairs (:func:`appearance_pairs`): a *structure* scene (one large object of shape A and colour X
on the plain background, at a random place) and an *appearance* scene (another shape B, another
colour Y, on a random background of the generator: plain, noise, stripes or checker), both
rendered by :func:`diffnotes.data.shapes.render_objects` with their true masks. The model never
generated them.

Methods (:data:`METHODS`): the plain reconstruction of the structure (DDIM inversion and DDIM
sampling: what the model does with no transfer), colour transfer in pixel space (AdaIN of the
structure image's RGB inside its mask to the appearance object's RGB statistics: a simple
baseline that is handed both masks), AdaIN of the latents alone (no attention change),
Cross-Image Attention (the paper's settings, with and without AdaIN, and with the contrast off),
and Eye-for-an-Eye (masks from :func:`diffnotes.models.eval_shapes.segment_object` of the two
inputs).

Measures (:func:`score`), inside the structure's TRUE mask: the judged colour
(:func:`~diffnotes.models.eval_shapes.judge_color`) equals Y (the transfer worked), equals X
(nothing moved); the distance between the mean RGB there and the appearance object's mean RGB;
the difference of their per-channel standard deviations (a texture statistic). Structure kept:
the IoU of the result's segmented object (:func:`~diffnotes.models.eval_shapes.segment_object`)
with the structure's true mask, and the judged shape equal to A. Seconds per image.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..data import shapes as S
from ..models import eval_shapes as ev
from .appearance import adain, cross_image_attention, eye_for_an_eye

__all__ = ["appearance_pairs", "pixel_adain", "transfer", "score", "run", "summarize",
           "load_results", "METHODS", "RESULTS"]

RESULTS = Path(__file__).parent / "results" / "appearance.json"
#: method name -> what it is (the keys of the JSON tables)
METHODS = {
    "reconstruction": "DDIM inversion + DDIM sampling of the structure (no transfer)",
    "pixel_adain": "AdaIN of the structure's RGB inside its mask to the appearance object's",
    "latent_adain": "AdaIN of the output latent only (steps 20-100%), no attention change",
    "cia": "Cross-Image Attention (contrast 1.67, swap guidance 3.5, AdaIN)",
    "cia_no_adain": "Cross-Image Attention without AdaIN",
    "cia_no_contrast": "Cross-Image Attention with contrast 1 (AdaIN on)",
    "eye_for_an_eye": "Eye-for-an-Eye (segmented masks, Q'K'V' from F'_out, AdaIN)",
}


def load_results(path=None) -> dict:
    """The stored record of ``python -m diffnotes.editing.eval_appearance`` (the JSON file)."""
    return json.loads(Path(path or RESULTS).read_text())


def appearance_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` structure/appearance pairs (module doc): dicts with ``structure``, ``appearance``
    (64×64×3 float64 images), their true masks ``structure_mask``, ``appearance_mask``, and the
    attributes ``shape_a, color_x, shape_b, color_y, background``. Training shapes and colours
    only; the same seed gives the same pairs."""
    rng = np.random.default_rng(seed)
    shapes, colors = list(S.TRAIN_SHAPES), [c for c in S.TRAIN_COLORS]
    out = []
    for i in range(n):
        a, b = rng.choice(len(shapes), 2, replace=False)
        x, y = rng.choice(len(colors), 2, replace=False)
        bg = S.BACKGROUNDS[int(rng.integers(len(S.BACKGROUNDS)))]
        pos_s, pos_a = (list(S.POSITIONS)[int(rng.integers(3))] for _ in range(2))
        cy_s, cy_a = (float(rng.uniform(26, 38)) for _ in range(2))
        s_img, s_m = S.render_objects([dict(shape=shapes[a], color=colors[x], size="large",
                                            position=pos_s, cy=cy_s)], background="plain",
                                      seed=seed * 1000 + i)
        a_img, a_m = S.render_objects([dict(shape=shapes[b], color=colors[y], size="large",
                                            position=pos_a, cy=cy_a)], background=bg,
                                      seed=seed * 1000 + 500 + i)
        out.append(dict(structure=s_img.astype(np.float64), appearance=a_img.astype(np.float64),
                        structure_mask=s_m[0], appearance_mask=a_m[0], shape_a=shapes[a],
                        color_x=colors[x], shape_b=shapes[b], color_y=colors[y], background=bg))
    return out


def pixel_adain(pair: dict) -> np.ndarray:
    """The pixel-space baseline: AdaIN (:func:`~diffnotes.editing.appearance.adain`) of the
    structure image's RGB inside its true mask to the appearance object's RGB inside its true
    mask; the result is clipped to [0, 1]."""
    x = torch.from_numpy(pair["structure"]).permute(2, 0, 1)[None]
    r = torch.from_numpy(pair["appearance"]).permute(2, 0, 1)[None]
    y = adain(x, r, mask=torch.from_numpy(pair["structure_mask"]),
              ref_mask=torch.from_numpy(pair["appearance_mask"]))
    return y[0].permute(1, 2, 0).clamp(0, 1).numpy()


def transfer(pipe, pair: dict, method: str, num_inference_steps: int = 10) -> np.ndarray:
    """The result (64×64×3 float array) of ``method`` (a key of :data:`METHODS`) on ``pair``."""
    s, a = pair["structure"], pair["appearance"]
    kw = dict(num_inference_steps=num_inference_steps, output_type="np")
    if method == "pixel_adain":
        return pixel_adain(pair)
    if method == "reconstruction":
        return cross_image_attention(pipe, s, s, contrast=1.0, adain=False,
                                     swap_guidance_scale=1.0, layers=[], **kw)
    if method == "latent_adain":
        return cross_image_attention(pipe, s, a, contrast=1.0, adain=True,
                                     swap_guidance_scale=1.0, layers=[], **kw)
    if method == "cia":
        return cross_image_attention(pipe, s, a, **kw)
    if method == "cia_no_adain":
        return cross_image_attention(pipe, s, a, adain=False, **kw)
    if method == "cia_no_contrast":
        return cross_image_attention(pipe, s, a, contrast=1.0, **kw)
    if method == "eye_for_an_eye":
        return eye_for_an_eye(pipe, s, a, structure_mask=ev.segment_object(s),
                              appearance_mask=ev.segment_object(a), **kw)
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")


def _inner(mask: np.ndarray) -> np.ndarray:
    e = ndimage.binary_erosion(mask, iterations=1)
    return e if e.sum() >= 8 else mask


def score(result: np.ndarray, pair: dict, clf=None) -> dict:
    """The measures of the module doc for one result."""
    sm, am = pair["structure_mask"], pair["appearance_mask"]
    si, ai = _inner(sm), _inner(am)
    col = ev.judge_color(result, sm)
    mean_r, mean_a = result[si].mean(0), pair["appearance"][ai].mean(0)
    std_r, std_a = result[si].std(0), pair["appearance"][ai].std(0)
    seg = ev.segment_object(result)
    inter, union = np.logical_and(seg, sm).sum(), np.logical_or(seg, sm).sum()
    return dict(color_y=bool(col == pair["color_y"]), color_x=bool(col == pair["color_x"]),
                judged_color=col, rgb_dist=float(np.linalg.norm(mean_r - mean_a)),
                std_diff=float(np.abs(std_r - std_a).mean()),
                iou=float(inter / union) if union else 0.0,
                shape_a=bool(ev.judge_shape(seg, clf) == pair["shape_a"]))


def summarize(rows: dict) -> dict:
    """Means per method of the per-pair scores: {method: {color_y_rate, color_x_rate,
    rgb_dist, std_diff, iou, shape_rate, seconds}}."""
    out = {}
    for m, rs in rows.items():
        out[m] = dict(color_y_rate=float(np.mean([r["color_y"] for r in rs])),
                      color_x_rate=float(np.mean([r["color_x"] for r in rs])),
                      rgb_dist=float(np.mean([r["rgb_dist"] for r in rs])),
                      std_diff=float(np.mean([r["std_diff"] for r in rs])),
                      iou=float(np.mean([r["iou"] for r in rs])),
                      shape_rate=float(np.mean([r["shape_a"] for r in rs])),
                      seconds=float(np.mean([r["seconds"] for r in rs])), n=len(rs))
    return out


def run(n: int = 40, seed: int = 0, num_inference_steps: int = 10, methods=None, pipe=None,
        progress: bool = True) -> dict:
    """Every method on ``n`` pairs: ``{"summary": summarize(...), "per_pair": {method: [...]},
    "pairs": [attributes]}``."""
    from tqdm.auto import tqdm

    from ..models.load import load_pipeline

    pipe = pipe or load_pipeline("shapes")
    methods = list(methods or METHODS)
    pairs = appearance_pairs(n, seed)
    clf = ev.shape_judge()
    rows: dict = {m: [] for m in methods}
    for pair in tqdm(pairs, disable=not progress, desc="appearance pairs"):
        for m in methods:
            t0 = time.perf_counter()
            res = transfer(pipe, pair, m, num_inference_steps)
            sec = time.perf_counter() - t0
            r = score(res, pair, clf)
            r["seconds"] = sec
            rows[m].append(r)
    # the judges on the inputs themselves (their accuracy on these pairs)
    inputs = dict(structure_color_ok=float(np.mean([ev.judge_color(p["structure"],
                                                                   p["structure_mask"])
                                                    == p["color_x"] for p in pairs])),
                  appearance_color_ok=float(np.mean([ev.judge_color(p["appearance"],
                                                                    p["appearance_mask"])
                                                     == p["color_y"] for p in pairs])),
                  structure_iou=float(np.mean([score(p["structure"], p, clf)["iou"]
                                               for p in pairs])))
    return dict(summary=summarize(rows), per_pair=rows, judges_on_inputs=inputs,
                pairs=[{k: p[k] for k in ("shape_a", "color_x", "shape_b", "color_y",
                                          "background")} for p in pairs])


def main(argv=None) -> None:  # pragma: no cover - the measurement command
    import argparse

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    start, cpu0 = time.perf_counter(), time.process_time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res = run(a.pairs, a.seed, a.steps)
    res["record"] = dict(
        command=("python -m diffnotes.editing.eval_appearance "
                 + " ".join(argv or sys.argv[1:])).strip(),
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        wall_time_s=round(time.perf_counter() - start, 1),
        process_cpu_time_s=round(time.process_time() - cpu0, 1), threads=a.threads,
        machine=f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        load_average_at_start=load, torch=torch.__version__, model="shapes", dtype="float32",
        pairs=a.pairs, seed=a.seed, num_inference_steps=a.steps, guidance_scale=1.0,
        prompts="", methods=METHODS,
        cia=dict(contrast=1.67, swap_guidance_scale=3.5, steps=[0.1, 0.9],
                 low_res_steps=[0.1, 0.7], adain_steps=[0.2, 1.0], min_res_fraction=0.5,
                 queries="output"),
        eye_for_an_eye=dict(feature_t=261, feature_blocks="up_blocks.1", inject="qkv"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out} in {res['record']['wall_time_s']} s")


if __name__ == "__main__":  # pragma: no cover
    main()
