"""Correspondence and keypoints measured on the shapes generator's exact keypoints.

``python -m diffnotes.recognition.eval_correspondence`` runs the measurement once and writes
``diffnotes/recognition/results/correspondence.json`` (figures plus a record of the run:
command, wall and CPU time, threads, date, settings). The chapter "Correspondence and keypoints
from diffusion features" reads it and re-measures a small subset live.

Pairs: two single-object scenes of the same shape (:func:`make_pairs`), the target drawn with
another position, size, colour and background (:func:`diffnotes.data.shapes.render_objects`).
Queries: every keypoint of the source object (:func:`diffnotes.data.shapes.shape_keypoints`:
centre, corners, tips). A prediction is correct when it lies within 0.1 × the larger side of
the target object's box (PCK@0.1).

Methods: argmax correspondence (Ahmad's notes, eq 5.33, cosine) on UNet block outputs of the
shipped shapes model at several t and blocks, on the VAE latents, on raw pixels and on fixed
random convolution features; optimal transport on the best UNet features; the prompt
optimisation of Hedlin et al. 2023 on fewer pairs; StableKeypoints' regressed keypoints on
stars against the true ones, with an untrained-embedding baseline and the box of the true mask
as an oracle detector. Time per image for each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from diffnotes import features as FT
from diffnotes.data import shapes as S

__all__ = ["RESULTS_PATH", "TIMESTEPS", "BLOCKS", "make_pairs", "pck", "feature_predictions",
           "measure_features", "measure_ot", "measure_hedlin", "keypoint_scenes",
           "measure_stable_keypoints", "load_results", "main"]

RESULTS_PATH = Path(__file__).parent / "results" / "correspondence.json"
TIMESTEPS = (0, 50, 100, 200, 300, 500, 700)
BLOCKS = ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1")
ALPHA = 0.1


# ------------------------------------------------------------------ data
def _draw(rng, shape):
    return dict(shape=shape, color=str(rng.choice(S.TRAIN_COLORS)),
                center=(float(rng.uniform(18, 46)), float(rng.uniform(18, 46))),
                radius=float(rng.uniform(6.5, 10.5)))


def _render(rng, obj):
    img, masks, kps = S.render_objects([obj], background=str(rng.choice(S.BACKGROUNDS)),
                                       seed=int(rng.integers(2 ** 31)), keypoints=True)
    ys, xs = np.nonzero(masks[0])
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return img, np.array(list(kps[0].values())), box, masks[0]


def make_pairs(n: int, seed: int = 0, shapes=S.TRAIN_SHAPES) -> dict:
    """``n`` pairs of single-object scenes of one shape each (cycling through ``shapes``): the
    target has another position, radius (6.5–10.5 px), colour and background (plain, noise,
    stripes, checker). Returns images ``source``/``target`` (n, 64, 64, 3), keypoint arrays
    ``kp_source``/``kp_target`` (lists of (P, 2)), target boxes (n, 4) and the shape names."""
    rng = np.random.default_rng(seed)
    out = dict(source=[], target=[], kp_source=[], kp_target=[], box_target=[], shape=[],
               mask_target=[])
    for i in range(n):
        shape = shapes[i % len(shapes)]
        a, b = _draw(rng, shape), _draw(rng, shape)
        ia, ka, _, _ = _render(rng, a)
        ib, kb, bb, mb = _render(rng, b)
        for k, v in (("source", ia), ("target", ib), ("kp_source", ka), ("kp_target", kb),
                     ("box_target", bb), ("shape", shape), ("mask_target", mb)):
            out[k].append(v)
    out["source"] = np.stack(out["source"])
    out["target"] = np.stack(out["target"])
    out["box_target"] = np.array(out["box_target"], dtype=np.float64)
    return out


def pck(pred, true, box, alpha: float = ALPHA) -> np.ndarray:
    """Correct (bool per point) when ``||pred - true|| <= alpha * max(box width, height)``."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    side = max(box[2] - box[0], box[3] - box[1])
    return np.linalg.norm(pred - true, axis=-1) <= alpha * side


def _summary(correct: list, errors: list, shapes: list) -> dict:
    allc = np.concatenate(correct)
    per_shape = {}
    for s in sorted(set(shapes)):
        c = np.concatenate([c for c, sh in zip(correct, shapes) if sh == s])
        per_shape[s] = float(c.mean())
    return dict(pck=float(allc.mean()), n_points=int(allc.size),
                mean_error_box=float(np.mean(np.concatenate(errors))), pck_by_shape=per_shape)


def feature_predictions(f_src: torch.Tensor, f_tgt: torch.Tensor, pairs: dict,
                        similarity: str = "cos", idx=None) -> dict:
    """PCK of :func:`diffnotes.features.match_points` on per-pair feature maps (n, C, h, w)."""
    correct, errors, shapes = [], [], []
    idx = range(len(pairs["shape"])) if idx is None else idx
    for i in idx:
        p = FT.match_points(f_src[i].double(), f_tgt[i].double(), pairs["kp_source"][i],
                            (64, 64), similarity=similarity).numpy()
        box = pairs["box_target"][i]
        correct.append(pck(p, pairs["kp_target"][i], box))
        side = max(box[2] - box[0], box[3] - box[1])
        errors.append(np.linalg.norm(p - pairs["kp_target"][i], axis=-1) / side)
        shapes.append(pairs["shape"][i])
    return _summary(correct, errors, shapes)


# ------------------------------------------------------------------ measurements
def measure_features(pipe, pairs: dict, timesteps=TIMESTEPS, blocks=BLOCKS, seed: int = 0,
                     prompt: str = "") -> dict:
    """PCK@0.1 for every (t, block) of UNet features, VAE latents, pixels and random conv
    features; seconds per image."""
    rows = {}
    both = np.concatenate([pairs["source"], pairs["target"]])
    n = len(pairs["shape"])
    for t in timesteps:
        t0 = time.process_time()
        f = FT.extract(pipe, both, t, layers=blocks, prompt=prompt,
                       generator=torch.Generator().manual_seed(seed))
        sec = (time.process_time() - t0) / len(both)
        for b in blocks:
            r = feature_predictions(f[b][:n], f[b][n:], pairs)
            r.update(t=int(t), block=b, channels=int(f[b].shape[1]),
                     grid=int(f[b].shape[-1]), cpu_seconds_per_image=sec)
            rows[f"unet:{b}:t={t}"] = r
    t0 = time.process_time()
    with torch.no_grad():
        z = FT.vae_features(pipe, both)
    sec = (time.process_time() - t0) / len(both)
    r = feature_predictions(z[:n], z[n:], pairs)
    r.update(channels=int(z.shape[1]), grid=int(z.shape[-1]), cpu_seconds_per_image=sec)
    rows["vae"] = r
    x = FT.as_image_tensor(both)
    for sim in ("cos", "neg_l1"):
        r = feature_predictions(x[:n], x[n:], pairs, similarity=sim)
        r.update(channels=3, grid=64, cpu_seconds_per_image=0.0)
        rows[f"pixels:{sim}"] = r
    t0 = time.process_time()
    rc = FT.random_conv_features(both, torch.Generator().manual_seed(seed), patch=4)
    sec = (time.process_time() - t0) / len(both)
    r = feature_predictions(rc[:n], rc[n:], pairs)
    r.update(channels=int(rc.shape[1]), grid=int(rc.shape[-1]), cpu_seconds_per_image=sec)
    rows["random_conv"] = r
    return rows


def _cell(points, grid, size=64):
    c = np.clip(np.floor(np.asarray(points) / size * grid).astype(int), 0, grid - 1)
    return c[:, 1], c[:, 0]            # rows, cols


def measure_ot(pipe, pairs: dict, t: int, block: str, seed: int = 0) -> dict:
    """Argmax against exact optimal transport (POT's ``ot.emd``) on one feature grid: the query
    snapped to its cell, the answer the centre of the chosen target cell (both methods alike)."""
    both = np.concatenate([pairs["source"], pairs["target"]])
    n = len(pairs["shape"])
    f = FT.extract(pipe, both, t, layers=(block,), generator=torch.Generator().manual_seed(seed))[block]
    out = {}
    for method in ("argmax", "ot"):
        correct, errors, shapes = [], [], []
        t0 = time.process_time()
        for i in range(n):
            fs, ft = f[i].double(), f[n + i].double()
            g = fs.shape[-1]
            if method == "argmax":
                m = FT.dense_correspondence(fs, ft, "cos")
            else:
                m, _ = FT.ot_match(fs, ft, "cos", method="emd")
            r, c = _cell(pairs["kp_source"][i], g)
            tgt = m[r, c].numpy()                              # (P, 2) rows, cols
            p = np.stack([(tgt[:, 1] + 0.5) * 64 / g, (tgt[:, 0] + 0.5) * 64 / g], 1)
            box = pairs["box_target"][i]
            correct.append(pck(p, pairs["kp_target"][i], box))
            side = max(box[2] - box[0], box[3] - box[1])
            errors.append(np.linalg.norm(p - pairs["kp_target"][i], axis=-1) / side)
            shapes.append(pairs["shape"][i])
        sec = (time.process_time() - t0) / n
        out[method] = dict(_summary(correct, errors, shapes), t=int(t), block=block,
                           cpu_seconds_per_pair=sec)
    return out


def measure_hedlin(pipe, pairs: dict, n: int, seed: int = 0, **kwargs) -> dict:
    """Hedlin et al. 2023 on the first ``n`` pairs, one query per pair (keypoint ``i mod P``),
    with the settings in ``kwargs`` (default: the official ones scaled, one round)."""
    from diffnotes.recognition.correspondence import optimize_prompt_correspondence
    correct, errors, shapes, queries = [], [], [], []
    t0 = time.process_time()
    for i in range(n):
        P = len(pairs["kp_source"][i])
        q = i % P
        g = torch.Generator().manual_seed(seed + i)
        p = optimize_prompt_correspondence(pipe, pairs["source"][i:i + 1],
                                           pairs["target"][i:i + 1],
                                           pairs["kp_source"][i][q], generator=g, **kwargs)
        true = pairs["kp_target"][i][q:q + 1]
        box = pairs["box_target"][i]
        correct.append(pck(p.numpy()[None], true, box))
        side = max(box[2] - box[0], box[3] - box[1])
        errors.append(np.linalg.norm(p.numpy()[None] - true, axis=-1) / side)
        shapes.append(pairs["shape"][i])
        queries.append(q)
    sec = (time.process_time() - t0) / n
    return dict(_summary(correct, errors, shapes), pairs=n, queries=queries,
                cpu_seconds_per_pair=sec, settings={k: v for k, v in kwargs.items()})


def keypoint_scenes(n: int, seed: int, shape: str = "star"):
    """``n`` single-object scenes of ``shape`` (random position, radius, colour, background):
    images (n, 64, 64, 3), true keypoints (n, P, 2), boxes (n, 4), (centre, radius) (n, 3),
    masks (n, 64, 64)."""
    rng = np.random.default_rng(seed)
    imgs, kps, boxes, geo, masks = [], [], [], [], []
    for _ in range(n):
        o = _draw(rng, shape)
        img, kp, box, m = _render(rng, o)
        imgs.append(img)
        kps.append(kp)
        boxes.append(box)
        geo.append((*o["center"], o["radius"]))
        masks.append(m)
    return (np.stack(imgs), np.stack(kps), np.array(boxes, dtype=np.float64), np.array(geo),
            np.stack(masks))


def measure_stable_keypoints(pipe, n_train: int = 32, n_test: int = 32, steps: int = 100,
                             n_tokens: int = 32, shape: str = "star", seed: int = 0) -> dict:
    """StableKeypoints on ``shape`` scenes: regressed-keypoint error on held-out scenes
    (normalised by the larger box side), with an untrained-embedding baseline and the oracle
    regressor from the true mask's box; stability: the spread across test scenes of each found
    keypoint in object coordinates ((p - centre) / radius) and the fraction on the object."""
    from diffnotes.recognition import keypoints as K
    xtr, ktr, btr, gtr, _ = keypoint_scenes(n_train, seed, shape)
    xte, kte, bte, gte, mte = keypoint_scenes(n_test, seed + 1, shape)
    P = ktr.shape[1]
    side = np.maximum(bte[:, 2] - bte[:, 0], bte[:, 3] - bte[:, 1])
    out = {}
    for name, st in (("trained", steps), ("untrained", 0)):
        t0 = time.process_time()
        res = K.stable_keypoints(pipe, xtr, P, steps=st, n_tokens=n_tokens,
                                 generator=torch.Generator().manual_seed(seed))
        t_fit = time.process_time() - t0
        t0 = time.process_time()
        found = res.find(pipe, xte)
        t_find = (time.process_time() - t0) / n_test
        W = K.fit_regressor(res.keypoints, ktr)
        pred = K.apply_regressor(W, found).numpy()
        err = np.linalg.norm(pred - kte, axis=-1) / side[:, None]
        obj = (found.numpy() - gte[:, None, :2]) / gte[:, None, 2:3]
        spread = float(np.sqrt(obj.var(0).sum(-1)).mean())
        fp = found.numpy()
        r = np.clip(np.floor(fp[..., 1]).astype(int), 0, 63)
        c = np.clip(np.floor(fp[..., 0]).astype(int), 0, 63)
        on = mte[np.arange(n_test)[:, None], r, c]                # the peak's pixel is the object's
        out[name] = dict(normalised_error=float(err.mean()), pck=float((err <= ALPHA).mean()),
                         spread_object_units=spread, on_object=float(on.mean()),
                         tokens=res.tokens.tolist(),
                         steps=st, cpu_seconds_fit=t_fit, cpu_seconds_per_image=t_find)
    X = np.concatenate([btr, np.ones((len(btr), 1))], 1)
    W, *_ = np.linalg.lstsq(X, ktr.reshape(len(ktr), -1), rcond=None)
    pred = (np.concatenate([bte, np.ones((len(bte), 1))], 1) @ W).reshape(kte.shape)
    err = np.linalg.norm(pred - kte, axis=-1) / side[:, None]
    out["oracle_box"] = dict(normalised_error=float(err.mean()), pck=float((err <= ALPHA).mean()))
    out.update(shape=shape, n_train=n_train, n_test=n_test, n_keypoints=P, n_tokens=n_tokens)
    return out


def load_results(path=RESULTS_PATH) -> dict:
    """The stored record (the chapter reads it)."""
    return json.loads(Path(path).read_text())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=120)
    ap.add_argument("--hedlin-pairs", type=int, default=12)
    ap.add_argument("--hedlin-steps", type=int, default=129)
    ap.add_argument("--keypoint-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS_PATH))
    ap.add_argument("--hedlin-lr", type=float, default=None,
                    help="only add a Hedlin et al. run with this learning rate to the stored record")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffnotes.models.load import load_pipeline
    wall, cpu = time.time(), time.process_time()
    pipe = load_pipeline("shapes")
    pairs = make_pairs(a.pairs, a.seed)
    hk = dict(rounds=1, steps=a.hedlin_steps, inference_crops=10)
    if a.hedlin_lr is not None:          # one more setting, added to the stored record
        res = load_results(a.out)
        key = f"hedlin_lr={a.hedlin_lr:g}"
        res[key] = measure_hedlin(pipe, pairs, a.hedlin_pairs, a.seed, lr=a.hedlin_lr, **hk)
        res[key]["record"] = dict(command="python -m diffnotes.recognition.eval_correspondence "
                                  + " ".join(argv if argv is not None else sys.argv[1:]),
                                  wall_seconds=time.time() - wall,
                                  cpu_seconds=time.process_time() - cpu, threads=a.threads,
                                  date=datetime.now(timezone.utc).isoformat())
        Path(a.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(key, "done", res[key]["pck"], flush=True)
        return res
    res = dict()

    def save(stage):
        res["record"] = dict(
            command="python -m diffnotes.recognition.eval_correspondence "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            wall_seconds=time.time() - wall, cpu_seconds=time.process_time() - cpu,
            threads=a.threads, date=datetime.now(timezone.utc).isoformat(), complete=stage,
            pairs=a.pairs, seed=a.seed, alpha=ALPHA, timesteps=list(TIMESTEPS),
            blocks=list(BLOCKS), similarity="cos", prompt="",
            hedlin=dict(pairs=a.hedlin_pairs, **hk),
            ot="POT ot.emd (exact), uniform marginals", nice=os.nice(0))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(stage, "done", f"{time.time() - wall:.0f} s", flush=True)

    res["features"] = measure_features(pipe, pairs, seed=a.seed)
    unet = {k: v for k, v in res["features"].items() if k.startswith("unet:")}
    best = max(unet, key=lambda k: unet[k]["pck"])
    res["best_unet"] = best
    res["ot"] = measure_ot(pipe, pairs, unet[best]["t"], unet[best]["block"], a.seed)
    save("features")
    res["stable_keypoints"] = measure_stable_keypoints(pipe, steps=a.keypoint_steps, seed=a.seed)
    save("stable_keypoints")
    res["hedlin"] = measure_hedlin(pipe, pairs, a.hedlin_pairs, a.seed, **hk)
    # the UNet features' PCK on exactly the Hedlin queries, for a like-for-like comparison
    n = a.hedlin_pairs
    both = np.concatenate([pairs["source"][:n], pairs["target"][:n]])
    f = FT.extract(pipe, both, unet[best]["t"], layers=(unet[best]["block"],),
                   generator=torch.Generator().manual_seed(a.seed))[unet[best]["block"]]
    qs = res["hedlin"]["queries"]
    sub = dict(pairs, kp_source=[pairs["kp_source"][i][q:q + 1] for i, q in enumerate(qs)],
               kp_target=[pairs["kp_target"][i][q:q + 1] for i, q in enumerate(qs)])
    res["hedlin"]["unet_same_queries"] = feature_predictions(f[:n], f[n:], sub, idx=range(n))
    save("hedlin")
    return res



if __name__ == "__main__":
    main()
