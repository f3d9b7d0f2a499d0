"""Label-efficient segmentation and DiffSeg measured on the shapes masks, beside the
unsupervised chapter's k-means / PiCIE / STEGO table on the same features and test scenes.

``python -m diffnotes.recognition.eval_segmentation`` (``nice -n 5``, one thread) writes
``diffnotes/recognition/results/segmentation.json``; the chapter "Segmenting with a diffusion
model" reads it and re-measures a small subset live.

Data and features are those of the chapter "Segmentation without masks"
(``chapters/05_recognition/unsupervised.ipynb``): 96 training and 48 test scenes of
``generate_scenes(144, seed=0, textured=False, min_objects=2)``, the shape classes
(background + the 5 training shapes, 6 classes) as ground truth, and the features
``diffusion_features(pipe, x, t=50, blocks=("up_blocks.0",))`` of the shipped shapes model
(16 x 16; labels upsampled to 64 x 64 by nearest neighbour). The unsupervised rows are
re-run here with the chapter's code and seeds (k = 6 clusters, Hungarian matching over the
whole test set), STEGO also with the official code's two extras.

Label-efficient segmentation (:mod:`diffnotes.recognition.label_efficient`) is trained on the
first N in {1, 5, 20} training scenes of three random draws, and on all 96 (the supervised
reference), with the chapter's features bilinearly upsampled to 64 x 64 and with the paper's
recipe (t in {50, 150, 250}, both decoder blocks). Labels are class names: no matching.

DiffSeg (:mod:`diffnotes.recognition.diffseg`) gives every image its own number of segments
with no names, so it is scored by per-image Hungarian matching (the confusion matrices of the
matched maps summed over the test set), beside k-means on the same per-image features (the
rows of the aggregated attention A_f) with the same number of segments per image. Its KL
threshold is chosen on 16 training scenes (the published 0.9 gives one segment on this
model: its attention is far more diffuse than Stable Diffusion's).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffnotes.segmentation.metrics import hungarian_match, iou_per_class, unsupervised_miou

__all__ = ["RESULTS_PATH", "N_TRAIN", "N_TEST", "K_SHAPE", "K_COLOR", "TAUS", "data",
           "class_maps", "chapter_features", "upsample_labels", "matched_miou_per_image",
           "label_efficient_run", "diffseg_run", "kmeans_per_image", "load_results"]

RESULTS_PATH = Path(__file__).parent / "results" / "segmentation.json"
N_TRAIN, N_TEST = 96, 48
K_SHAPE, K_COLOR = 6, 7
#: the KL thresholds scanned on the training scenes (code convention: half the symmetric KL)
TAUS = (0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03)
N_LABELLED = (1, 5, 20)


def class_maps(sc):
    """(N, 64, 64) shape-class and colour-class maps of a ShapeScenes; 0 is background (the
    unsupervised chapter's ``class_maps``)."""
    from diffnotes.data.shapes import TRAIN_COLORS, TRAIN_SHAPES

    shape = np.zeros(sc.masks.shape[:1] + sc.masks.shape[2:], np.int64)
    color = np.zeros_like(shape)
    for i, objs in enumerate(sc.objects):
        for k, o in enumerate(objs):
            shape[i][sc.masks[i, k]] = 1 + TRAIN_SHAPES.index(o["shape"])
            color[i][sc.masks[i, k]] = 1 + TRAIN_COLORS.index(o["color"])
    return shape, color


def data():
    """``(scenes, images (144, 3, 64, 64) in [0, 1], gt_shape, gt_color)`` as in the
    unsupervised chapter; training scenes are ``[:96]``, test scenes ``[96:]``."""
    from diffnotes.data.shapes import generate_scenes

    scenes = generate_scenes(N_TRAIN + N_TEST, seed=0, textured=False, min_objects=2)
    images = torch.from_numpy(scenes.images).permute(0, 3, 1, 2).contiguous()
    gs, gc = class_maps(scenes)
    return scenes, images, gs, gc


def chapter_features(pipe, images, seed: int = 1) -> torch.Tensor:
    """The unsupervised chapter's backbone: UNet ``up_blocks.0`` at t = 50, (N, C, 16, 16)."""
    from diffnotes.features import diffusion_features

    return diffusion_features(pipe, images, t=50, blocks=("up_blocks.0",),
                              generator=torch.Generator().manual_seed(seed))


def upsample_labels(labels16: torch.Tensor, size: int = 64) -> np.ndarray:
    """(N, h, w) labels -> (N, size, size) by nearest neighbour (the chapter's ``upsample``)."""
    return F.interpolate(labels16[:, None].float(), size=size, mode="nearest")[:, 0].long().numpy()


def matched_miou_per_image(preds, gts, num_classes: int = K_SHAPE) -> tuple[float, float]:
    """mIoU and pixel accuracy after one-to-one Hungarian matching *per image* (each image's
    segments to the classes), the matched maps' confusion summed over the images. Segments left
    unmatched count as wrong. Returns ``(miou, accuracy)``."""
    K = num_classes
    C = np.zeros((K + 1, K + 1), np.int64)
    for p, t in zip(preds, gts):
        p = np.asarray(p, np.int64)
        t = np.asarray(t, np.int64)
        n_seg = max(int(p.max()) + 1, K)
        m = hungarian_match(p, t, n_seg, K)
        q = np.where(m[p] < 0, K, m[p])
        C += np.bincount(t.ravel() * (K + 1) + q.ravel(), minlength=(K + 1) ** 2).reshape(K + 1, K + 1)
    inter = np.diag(C)[:K].astype(float)
    union = (C.sum(0) + C.sum(1) - np.diag(C))[:K].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
    return float(np.nanmean(iou)), float(np.trace(C[:K, :K]) / C.sum())


def _kmeans_labels(train_f, test_f, k, seed=0):
    from diffnotes.segmentation import picie

    _, mu = picie.kmeans(train_f, k, torch.Generator().manual_seed(seed))
    return upsample_labels(picie.assign(picie.flatten_pixels(test_f), mu)
                           .reshape(test_f.shape[0], *test_f.shape[2:]))


def unsupervised_table(pipe, images, gs, gc, feats, progress=False) -> dict:
    """The unsupervised chapter's k-means / PiCIE / STEGO rows, re-run with its code and seeds,
    plus STEGO with the official code's extras. Each row: mIoU on the shape and colour classes
    (dataset-level Hungarian matching, k = number of classes), training seconds."""
    from diffnotes.segmentation import picie, stego
    from diffnotes.utils import seed_everything

    tr, te = slice(0, N_TRAIN), slice(N_TRAIN, None)
    g = seed_everything(0)
    views2 = picie.photometric_jitter(images[tr], g)
    feats2 = chapter_features(pipe, views2)
    rows = {}

    def score(name, fn, seconds):
        row = {"seconds_train": round(seconds, 2)}
        for gname, gt, k in (("shape", gs[te], K_SHAPE), ("colour", gc[te], K_COLOR)):
            row[gname] = unsupervised_miou(fn(k), gt, k)[0]
        rows[name] = row
        if progress:
            print(f"{name:>28}: shape {row['shape']:.3f} colour {row['colour']:.3f}", flush=True)

    score("k-means, features", lambda k: _kmeans_labels(feats[tr], feats[te], k), 0.0)
    t0 = time.perf_counter()
    head, _ = picie.train_picie(feats[tr], feats2, K_COLOR, torch.Generator().manual_seed(4),
                                overcluster=2 * K_COLOR, rounds=3, steps_per_round=40,
                                balance=False, progress=False)
    sec = time.perf_counter() - t0
    with torch.no_grad():
        p_tr, p_te = head(feats[tr]), head(feats[te])
    score("PiCIE", lambda k: _kmeans_labels(p_tr, p_te, k), sec)
    for name, extras in (("STEGO", {}), ("STEGO + global mean", dict(add_mean=True)),
                         ("STEGO + clamp 0.8", dict(stabilize=True)),
                         ("STEGO + both extras", dict(add_mean=True, stabilize=True))):
        t0 = time.perf_counter()
        h, _ = stego.train_stego(feats[tr], torch.Generator().manual_seed(2), dim=32, k=5,
                                 steps=250, n_points=64, shifts=(0.0, 0.0, 0.0), progress=False,
                                 **extras)
        sec = time.perf_counter() - t0
        with torch.no_grad():
            c_tr, c_te = h(feats[tr]), h(feats[te])

        def lab(k, c_tr=c_tr, c_te=c_te):
            probe = stego.fit_cluster_probe(c_tr, k, torch.Generator().manual_seed(3))
            with torch.no_grad():
                return upsample_labels(probe(c_te))
        score(name, lab, sec)
    return rows


def _up(f, size=64):
    return F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)


def label_efficient_run(feats, gs, idx, seed: int = 0, n_models: int = 10, steps: int = 300,
                        test=slice(N_TRAIN, None)) -> dict:
    """Train the ensemble on the training scenes ``idx`` (features (N, D, h, w), bilinearly
    upsampled to 64 x 64) and score it on the test scenes: mIoU over the 6 shape classes (no
    matching), pixel accuracy, seconds of training and seconds per test image."""
    from diffnotes.recognition import label_efficient as le
    from diffnotes.segmentation.metrics import mean_iou, pixel_accuracy

    idx = list(idx)
    t0 = time.perf_counter()
    models = le.train_ensemble(_up(feats[idx]), torch.from_numpy(gs[idx]), K_SHAPE,
                               n_models=n_models, steps=steps,
                               generator=torch.Generator().manual_seed(seed))
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    ft = feats[test]
    pred = torch.cat([le.predict(models, _up(ft[i:i + 8])) for i in range(0, len(ft), 8)]).numpy()
    t_pred = (time.perf_counter() - t0) / len(ft)
    gt = gs[test]
    return dict(miou=mean_iou(pred, gt, K_SHAPE), accuracy=pixel_accuracy(pred, gt),
                seconds_train=round(t_train, 2), seconds_per_image=t_pred, pred=pred)


def kmeans_per_image(A: torch.Tensor, k: int, seed: int = 0, out_size: int = 64) -> np.ndarray:
    """k-means (Euclidean, k-means++ seeding) on the rows of one image's aggregated attention
    (P, P): the label map (out_size, out_size), nearest-neighbour upsampled."""
    from diffnotes.segmentation import picie

    R = int(round(A.shape[0] ** 0.5))
    lab, _ = picie.kmeans(A.float(), k, torch.Generator().manual_seed(seed), metric="euclidean")
    return upsample_labels(lab.reshape(1, R, R), out_size)[0]


def diffseg_run(pipe, images, gts, taus=TAUS, num_points: int = 8, weights="official",
                refine: bool = True, kl_convention: str = "code", t: int = 300,
                baseline: bool = True) -> dict:
    """DiffSeg on ``images`` for every threshold in ``taus`` (one attention pass per image):
    per-image-matched mIoU and mean number of segments per threshold, and (``baseline``)
    k-means on the same A_f rows with DiffSeg's number of segments of each image at that
    threshold; seconds per image (attention pass, and merging per threshold)."""
    from diffnotes.recognition import diffseg as ds

    out = {float(tau): dict(preds=[], k=[], kmeans=[]) for tau in taus}
    t_attn = t_merge = 0.0
    for i in range(len(images)):
        t0 = time.perf_counter()
        maps, _ = ds.self_attention_maps(pipe, images[i:i + 1], t=t)
        A = ds.aggregate_attention([m[0].double() for m in maps], weights=weights)
        t_attn += time.perf_counter() - t0
        R = int(round(A.shape[0] ** 0.5))
        for tau in taus:
            t0 = time.perf_counter()
            props = ds.merge_attention(A, ds.anchor_grid(min(num_points, R), R), (tau,) * 3,
                                       kl_convention)
            if refine:
                props = ds.refine_kmeans(A, props)
            lab = ds.label_map(props, images.shape[-1])
            _, lab = torch.unique(lab, return_inverse=True)
            t_merge += time.perf_counter() - t0
            rec = out[float(tau)]
            rec["preds"].append(lab.numpy())
            rec["k"].append(int(lab.max()) + 1)
            if baseline:
                rec["kmeans"].append(kmeans_per_image(A, int(lab.max()) + 1, seed=i,
                                                      out_size=images.shape[-1]))
    res = {}
    for tau, rec in out.items():
        row = dict(zip(("miou", "accuracy"), matched_miou_per_image(rec["preds"], gts)))
        row["mean_segments"] = float(np.mean(rec["k"]))
        row["segments"] = [int(k) for k in rec["k"]]
        row["miou_first12"] = matched_miou_per_image(rec["preds"][:12], gts[:12])[0]
        if baseline:
            row["kmeans_miou"], row["kmeans_accuracy"] = matched_miou_per_image(rec["kmeans"], gts)
        res[tau] = row
    n = max(len(images), 1)
    return dict(by_tau=res, seconds_attention_per_image=t_attn / n,
                seconds_merge_per_image_per_tau=t_merge / n / max(len(taus), 1),
                preds={tau: rec["preds"] for tau, rec in out.items()})


def load_results(path=RESULTS_PATH) -> dict:
    """The stored measurement record (``results/segmentation.json``) the chapter reads."""
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> None:  # pragma: no cover - the measurement command
    import argparse
    import platform
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draws", type=int, default=3, help="random draws of the labelled scenes")
    ap.add_argument("--out", default=str(RESULTS_PATH))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffnotes.models.load import load_pipeline
    from diffnotes.recognition import label_efficient as le

    start, cpu0 = time.perf_counter(), time.process_time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    pipe = load_pipeline("shapes")
    scenes, images, gs, gc = data()
    te = slice(N_TRAIN, None)

    t0 = time.perf_counter()
    feats = chapter_features(pipe, images)
    t_feat = (time.perf_counter() - t0) / len(images)
    t0 = time.perf_counter()
    multi = le.pixel_features(pipe, images, timesteps=le.DEFAULT_TIMESTEPS, seed=1, out_size=16)
    t_multi = (time.perf_counter() - t0) / len(images)
    print("features", tuple(feats.shape), tuple(multi.shape), flush=True)

    unsup = unsupervised_table(pipe, images, gs, gc, feats, progress=True)

    le_rows = {}
    for fname, F_ in (("chapter", feats), ("paper recipe", multi)):
        for n in (*N_LABELLED, N_TRAIN):
            draws = []
            for d in range(a.draws if n < N_TRAIN else 1):
                idx = (list(range(n)) if d == 0 else
                       np.random.default_rng(100 + d).choice(N_TRAIN, n, replace=False).tolist())
                r = label_efficient_run(F_, gs, idx, seed=d)
                r.pop("pred")
                draws.append(dict(r, scenes=idx))
            m = [r["miou"] for r in draws]
            le_rows[f"{fname}, N={n}"] = dict(
                features=fname, n_labelled=n, miou_mean=float(np.mean(m)),
                miou_std=float(np.std(m)), draws=draws,
                seconds_train=float(np.mean([r["seconds_train"] for r in draws])),
                seconds_per_image=float(np.mean([r["seconds_per_image"] for r in draws])))
            print(f"LE {fname:>13} N={n:>3}: mIoU {np.mean(m):.3f} ± {np.std(m):.3f}", flush=True)

    # DiffSeg: threshold chosen on 16 training scenes, then the test scenes
    sel = diffseg_run(pipe, images[:16], gs[:16], TAUS, baseline=False)
    best = max(sel["by_tau"], key=lambda k: sel["by_tau"][k]["miou"])
    test_taus = sorted(set(TAUS) | {0.9})
    ds_test = diffseg_run(pipe, images[te], gs[te], test_taus)
    ds_notes = diffseg_run(pipe, images[te], gs[te], (best,), weights="notes", baseline=False)
    ds_paper = diffseg_run(pipe, images[te], gs[te], (best,), kl_convention="paper",
                           baseline=False)
    ds_norefine = diffseg_run(pipe, images[te], gs[te], (best,), refine=False, baseline=False)
    for tau, row in ds_test["by_tau"].items():
        print(f"DiffSeg tau={tau}: mIoU {row['miou']:.3f} ({row['mean_segments']:.1f} segments), "
              f"k-means {row['kmeans_miou']:.3f}", flush=True)
    # the unsupervised rows scored like DiffSeg (per-image matching), for the comparison
    per_image = {}
    from diffnotes.segmentation import picie
    km = _kmeans_labels(feats[:N_TRAIN], feats[te], K_SHAPE)
    per_image["k-means, features (k = 6 over the data set)"] = matched_miou_per_image(km, gs[te])[0]
    best_row = ds_test["by_tau"][best]
    per_k = [int(p.max()) + 1 for p in ds_test["preds"][best]]
    km_img = [upsample_labels(picie.kmeans(feats[N_TRAIN + i:N_TRAIN + i + 1], k,
                                           torch.Generator().manual_seed(i))[0]
                              .reshape(1, 16, 16))[0] for i, k in enumerate(per_k)]
    per_image["k-means per image on UNet features (DiffSeg's k)"] = \
        matched_miou_per_image(km_img, gs[te])[0]

    res = dict(
        classes="shape: background + the 5 training shapes (6 classes)",
        features=dict(chapter="diffusion_features(t=50, blocks=('up_blocks.0',)), 16x16",
                      paper_recipe=f"label_efficient.pixel_features(t={le.DEFAULT_TIMESTEPS}, "
                                   f"blocks={le.decoder_blocks(pipe.unet)}), 16x16",
                      seconds_per_image_chapter=t_feat, seconds_per_image_paper_recipe=t_multi),
        unsupervised=unsup, label_efficient=le_rows,
        diffseg=dict(selection_taus=list(TAUS),
                     selection={str(k): v for k, v in sel["by_tau"].items()},
                     tau=best, kl_convention="code (half the symmetric KL of eq 5.66)",
                     num_points=8, t=300, refine=True,
                     test={str(k): v for k, v in ds_test["by_tau"].items()},
                     best=best_row,
                     notes_weights=ds_notes["by_tau"][best],
                     paper_convention_same_tau=ds_paper["by_tau"][best],
                     no_refinement=ds_norefine["by_tau"][best],
                     seconds_attention_per_image=ds_test["seconds_attention_per_image"],
                     seconds_merge_per_image=ds_notes["seconds_merge_per_image_per_tau"]),
        per_image_matching=per_image)
    res["record"] = dict(
        command=" ".join(["python -m diffnotes.recognition.eval_segmentation",
                          *(argv if argv is not None else sys.argv[1:])]),
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        wall_time_s=round(time.perf_counter() - start, 1),
        process_cpu_time_s=round(time.process_time() - cpu0, 1), threads=a.threads,
        machine=f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        load_average_at_start=load, torch=torch.__version__, model="shapes",
        n_train=N_TRAIN, n_test=N_TEST, draws=a.draws)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=float)
        f.write("\n")
    print(f"wrote {a.out} in {res['record']['wall_time_s']} s")


if __name__ == "__main__":  # pragma: no cover
    main()
