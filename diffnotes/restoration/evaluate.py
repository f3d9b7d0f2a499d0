"""The shared measurement protocol of the restoration chapters (``python -m diffnotes.restoration.evaluate``).

Two ground truths, one table each:

* **Scenes** (:func:`measure_method`): held-out 32×32 scenes of :mod:`diffnotes.models.pixel_shapes`
  (drawn with its ``TEST_SEED``, never seen in training), five tasks (:data:`TASKS`: a box over
  the largest object, a random mask hiding 70 % of the pixels, ×4 super-resolution, Gaussian
  blur σ = 1.5 px, colourisation), σ_y ∈ :data:`SIGMAS`. Measured against the true image: PSNR
  and SSIM (scikit-image, ``data_range`` = 1 on [0, 1] images), the consistency ‖A x̂ − y‖ (mean
  per image), the number of model evaluations (calls counted), the time per image, and whether
  the restored object keeps its true colour and shape (the judges of
  :mod:`diffnotes.models.eval_shapes` through :func:`diffnotes.models.pixel_shapes.judge`).
* **The Gaussian mixture** (:func:`gmm_measure`): the same five tasks on 3×4×4 "images" with a
  mixture prior, whose ``eps_model`` is exact and whose posterior p(x | y) is known in closed
  form (:meth:`diffnotes.models.gmm.GaussianMixture.posterior`): the error of the method's
  posterior mean and covariance, and the energy distance of its samples to exact posterior
  draws (beside the distance between two sets of exact draws, the Monte-Carlo floor).

Methods are collected from ``EVAL_CONFIGS`` of :mod:`.posterior`, :mod:`.linear` and
:mod:`.conditional` (a module that does not exist yet is skipped), plus the baseline ``pinv``
(x̂ = A† y, no model). An entry is ``dict(fn=, kwargs=, steps=, note=)`` and may add
``tasks=`` (the tasks it applies to) and ``model=`` (a callable ``model(eps_model,
alphas_cumprod) -> eps_model`` for a method with its own network).
The CLI writes ``diffnotes/restoration/results/<method>.json``, one file per method.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import operators as ops

__all__ = ["TASKS", "SIGMAS", "RESULTS_DIR", "collect_configs", "task_data", "make_operator",
           "measure_method", "gmm_problems", "gmm_measure", "energy_distance", "CountingModel",
           "psnr_ssim", "judge_objects", "main"]

TASKS = ("box_inpainting", "random_inpainting", "sr4", "blur", "colorization")
SIGMAS = (0.0, 0.05)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHOD_MODULES = ("posterior", "linear", "conditional")
BLUR_SIGMA = 1.5
KEEP_FRACTION = 0.3          # the random mask hides 70 % of the pixels
BOX_MARGIN = 1               # the box covers the object's bounding box plus one pixel


# ---------------------------------------------------------------------------- methods
def _pinv(eps_model, operator, y, sigma_y=0.0, *, alphas_cumprod=None, timesteps=None, x_T=None,
          generator=None, progress=False, callback=None):
    """The baseline x̂ = A† y (no prior, no model call)."""
    return operator.A_pinv(y)


BASELINES = {"pinv": dict(fn=_pinv, kwargs={}, steps=0, note="x̂ = A† y, no prior")}


def collect_configs(modules=METHOD_MODULES) -> dict:
    """All ``EVAL_CONFIGS`` of the method modules that exist, plus :data:`BASELINES`."""
    out = dict(BASELINES)
    for mod in modules:
        try:
            m = importlib.import_module(f"diffnotes.restoration.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"restoration.{mod}"):
                continue
            raise
        for k, v in getattr(m, "EVAL_CONFIGS", {}).items():
            out[k] = dict(v, module=mod)
    return out


class CountingModel:
    """Wraps ``eps_model`` and counts its calls (one call = one model evaluation of the batch)."""

    def __init__(self, eps_model):
        self.eps_model, self.calls = eps_model, 0

    def __call__(self, x, t, *args, **kwargs):
        self.calls += 1
        return self.eps_model(x, t, *args, **kwargs)


def _timesteps(steps, T):
    """``steps`` evenly spaced indices, high noise first (diffusers' "leading" spacing)."""
    return None if not steps else list(range(0, T, T // steps))[:steps][::-1]


# ---------------------------------------------------------------------------- scenes
_DATA_CACHE: dict = {}


def task_data(n: int = 64, seed: int | None = None):
    """``n`` held-out scenes: (x (n, 3, 32, 32) float32 in [-1, 1], scenes) from
    :func:`diffnotes.models.pixel_shapes.scenes` (``seed`` defaults to its ``TEST_SEED``)."""
    from ..models import pixel_shapes as P

    seed = P.TEST_SEED if seed is None else seed
    key = (n, seed)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = P.scenes(n, seed=seed)
    return _DATA_CACHE[key]


def _largest_object(scenes, i):
    areas = scenes.masks32[i].reshape(scenes.masks32.shape[1], -1).sum(1)
    return int(np.argmax(areas))


def make_operator(task: str, scenes, x: torch.Tensor, seed: int = 0) -> ops.Operator:
    """The task's operator for the images ``x`` (B, 3, S, S); the box covers each scene's largest
    object (its 32×32 bounding box grown by :data:`BOX_MARGIN`), the random mask is seeded."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    B, C, S, _ = x.shape
    if task == "box_inpainting":
        boxes = []
        for i in range(B):
            x0, y0, x1, y1 = scenes.boxes32[i, _largest_object(scenes, i)].tolist()
            boxes.append((max(0, x0 - BOX_MARGIN), max(0, y0 - BOX_MARGIN),
                          min(S, x1 + BOX_MARGIN), min(S, y1 + BOX_MARGIN)))
        return ops.inpainting(ops.box_mask(S, boxes), channels=C)
    if task == "random_inpainting":
        g = torch.Generator().manual_seed(seed + 7)
        return ops.inpainting(ops.random_mask(S, KEEP_FRACTION, generator=g, batch=B), channels=C)
    if task == "sr4":
        return ops.super_resolution(4, size=S, channels=C)
    if task == "blur":
        return ops.gaussian_blur(BLUR_SIGMA, size=S, channels=C)
    return ops.colorization(size=S, channels=C)


def psnr_ssim(x_hat: torch.Tensor, x: torch.Tensor):
    """Per-image PSNR and SSIM (scikit-image) of [-1, 1] images, compared on [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = ((x_hat.detach().double().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    b = ((x.detach().double().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    ps = [peak_signal_noise_ratio(bi, ai, data_range=1.0) for ai, bi in zip(a, b)]
    ss = [structural_similarity(bi, ai, data_range=1.0, channel_axis=-1) for ai, bi in zip(a, b)]
    return np.asarray(ps), np.asarray(ss)


def judge_objects(x_hat: torch.Tensor, scenes, clf=None):
    """For each image: does the judged object that overlaps the true largest object most (IoU on
    the 64×64 masks) have its true colour, and its true shape? Returns two bool arrays."""
    from ..models import pixel_shapes as P

    found = P.judge(x_hat.detach().float().clamp(-1, 1), clf)
    color_ok, shape_ok = [], []
    for i, objs in enumerate(found):
        k = _largest_object(scenes, i)
        truth = scenes.masks[i, k]
        obj = scenes.objects[i][k]
        best, best_iou = None, 0.0
        for o in objs:
            inter = np.logical_and(o["mask"], truth).sum()
            iou = inter / max(1, np.logical_or(o["mask"], truth).sum())
            if iou > best_iou:
                best, best_iou = o, iou
        ok = best is not None and best_iou >= 0.3
        color_ok.append(bool(ok and best["color"] == obj["color"]))
        shape_ok.append(bool(ok and best["shape"] == obj["shape"]))
    return np.asarray(color_ok), np.asarray(shape_ok)


def measure_method(name: str, eps_model, alphas_cumprod, task: str, sigma_y: float, n: int = 64,
                   seed: int = 0, configs=None, judge: bool = True, data=None, **override) -> dict:
    """One row of the scenes table: method ``name`` on ``task`` at noise ``sigma_y``, all ``n``
    images in one batch. ``override`` replaces entries of the method's ``kwargs`` (``steps=``
    the number of steps). Returns a dict of floats (means over images) and settings."""
    configs = configs or collect_configs()
    if name not in configs:
        raise ValueError(f"name must be one of {tuple(configs)}, got {name!r}")
    cfg = configs[name]
    x, sc = data if data is not None else task_data(n)
    x = x[:n]
    op = make_operator(task, sc, x, seed=seed)
    g = torch.Generator().manual_seed(seed)
    y = ops.measure(op, x, sigma_y, generator=g)
    steps = override.pop("steps", cfg.get("steps", 100))
    kwargs = {**cfg.get("kwargs", {}), **override}
    model = cfg["model"](eps_model, alphas_cumprod) if cfg.get("model") else eps_model
    counted = CountingModel(model)
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    t0 = time.perf_counter()
    x_hat = cfg["fn"](counted, op, y, sigma_y, alphas_cumprod=ac,
                      timesteps=_timesteps(steps, len(ac)), generator=g, progress=False, **kwargs)
    seconds = time.perf_counter() - t0
    ps, ss = psnr_ssim(x_hat, x)
    cons = (op.A(x_hat.to(y.dtype)) - y).reshape(n, -1).norm(dim=1)
    cons_truth = (op.A(x) - y).reshape(n, -1).norm(dim=1)               # the noise itself
    row = dict(method=name, task=task, sigma_y=float(sigma_y), n=n, steps=steps,
               psnr=float(ps.mean()), ssim=float(ss.mean()), consistency=float(cons.mean()),
               consistency_truth=float(cons_truth.mean()),
               nfe=counted.calls, seconds_per_image=seconds / n,
               kwargs={k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))})
    if judge:
        c, s = judge_objects(x_hat, sc)
        row.update(color_ok=float(c.mean()), shape_ok=float(s.mean()))
    return row


# ---------------------------------------------------------------------------- the mixture
GMM_SIZE = 4


def gmm_problems(seed: int = 0, n_y: int = 8):
    """The mixture version of the tasks: a K = 6 mixture prior on 3×4×4 "images" (D = 48),
    ``n_y`` true images drawn from it, and for each task its operator on (B, 3, 4, 4)
    (``box_inpainting``: the central 2×2 block hidden; ``sr4``: ×4 pooling down to 1×1; blur
    σ = 1.5 px, whose 1-D singular values 0.72, 0.28, 0.056, 0.005 lose the last to the cut). Returns ``dict(prior=, alphas_cumprod=, x=, operators={task: op})``."""
    from ..models.gmm import GaussianMixture
    from ..schedules import alphas_cumprod, make_betas

    g = torch.Generator().manual_seed(seed)
    K, C, S = 6, 3, GMM_SIZE
    D = C * S * S
    means = 0.6 * torch.randn(K, D, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.2 * torch.rand(K, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(K, generator=g, dtype=torch.float64)
    ac = alphas_cumprod(make_betas("linear", T=1000))
    prior = GaussianMixture(means, stds, weights, alphas_cumprod=ac)
    x = prior.sample(n_y, generator=g).reshape(n_y, C, S, S)
    gm_ops = {
        "box_inpainting": ops.inpainting(ops.box_mask(S, (1, 1, 3, 3)), channels=C),
        "random_inpainting": ops.inpainting(ops.random_mask(S, KEEP_FRACTION,
                                                            generator=g), channels=C),
        "sr4": ops.super_resolution(4, size=S, channels=C),
        "blur": ops.gaussian_blur(BLUR_SIGMA, size=S, channels=C),
        "colorization": ops.colorization(size=S, channels=C),
    }
    return dict(prior=prior, alphas_cumprod=ac, x=x, operators=gm_ops)


def gmm_eps_model(prior, x_shape):
    """The mixture's exact ε*(x, t) on image-shaped x (B, *x_shape)."""
    def f(x, t):
        return prior.eps(x.reshape(x.shape[0], -1), t).reshape(x.shape).to(x.dtype)
    return f


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The energy distance 2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ of two samples (N, D), (M, D)
    (Székely & Rizzo 2013; the V-statistic, ≥ 0)."""
    a, b = a.double(), b.double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def gmm_measure(name: str, task: str, sigma_y: float, n_samples: int = 256, seed: int = 0,
                configs=None, problems=None, **override) -> dict:
    """One row of the mixture table: method ``name``'s samples (``n_samples`` per measurement,
    all measurements in one batch) against the exact posterior of each measurement. Errors are
    averaged over the measurements: ``mean_error`` RMS over coordinates of (method mean − exact
    mean) (the Monte-Carlo floor ``mean_floor`` is the RMS posterior std / √n_samples),
    ``cov_error`` ‖Ĉ − C‖_F / ‖C‖_F (``cov_floor``: the same for exact draws; the denominator
    is floored at 1e-3 of the prior's, for posteriors that are nearly a point), ``energy`` the energy distance to ``n_samples`` exact draws
    (``energy_floor``: between two sets of exact draws)."""
    configs = configs or collect_configs()
    if name not in configs:
        raise ValueError(f"name must be one of {tuple(configs)}, got {name!r}")
    cfg = configs[name]
    pr = problems or gmm_problems(seed)
    prior, ac, x = pr["prior"], pr["alphas_cumprod"], pr["x"]
    op = pr["operators"][task]
    n_y = x.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    y = ops.measure(op, x, sigma_y, generator=g)
    post = prior.posterior(y.reshape(n_y, -1), op, sigma_y)
    exact = post.sample(n_samples, generator=g)                         # (n_y, n, D)
    exact2 = post.sample(n_samples, generator=g)
    steps = override.pop("steps", cfg.get("steps", 100))
    kwargs = {**cfg.get("kwargs", {}), **override}
    for k in ("clip_x0", "clip_sample"):          # the mixture is not confined to [-1, 1]
        if k in kwargs and k not in override:
            kwargs[k] = None if k == "clip_x0" else False
    model = gmm_eps_model(prior, op.x_shape)
    counted = CountingModel(cfg["model"](model, ac) if cfg.get("model") else model)
    yy = y.repeat_interleave(n_samples, dim=0)
    op_rep = op
    if op.batch is not None:
        raise ValueError("per-sample operators are not used on the mixture")
    t0 = time.perf_counter()
    xs = cfg["fn"](counted, op_rep, yy, sigma_y, alphas_cumprod=ac,
                   timesteps=_timesteps(steps, len(ac)), generator=g, progress=False, **kwargs)
    seconds = time.perf_counter() - t0
    xs = xs.reshape(n_y, n_samples, -1).double()
    m_hat, m = xs.mean(1), post.mean()
    C_hat = torch.stack([torch.cov(v.T) for v in xs])
    C = post.cov()
    C_exact = torch.stack([torch.cov(v.T) for v in exact2])
    scale = torch.maximum(C.flatten(1).norm(dim=1),
                          1e-3 * torch.diag_embed(prior.stds ** 2).flatten(1).norm(dim=1).max())
    std = torch.diagonal(C, dim1=-2, dim2=-1).clamp_min(0).mean(-1).sqrt()
    row = dict(method=name, task=task, sigma_y=float(sigma_y), n_y=n_y, n_samples=n_samples,
               steps=steps, nfe=counted.calls, seconds=seconds,
               mean_error=float(((m_hat - m) ** 2).mean(-1).sqrt().mean()),
               mean_floor=float((std / math.sqrt(n_samples)).mean()),
               cov_error=float(((C_hat - C).flatten(1).norm(dim=1) / scale).mean()),
               cov_floor=float(((C_exact - C).flatten(1).norm(dim=1) / scale).mean()),
               energy=float(np.mean([energy_distance(xs[i], exact[i]) for i in range(n_y)])),
               energy_floor=float(np.mean([energy_distance(exact2[i], exact[i])
                                           for i in range(n_y)])),
               consistency=float((op.A(xs.reshape(-1, *op.x_shape)).reshape(n_y, n_samples, -1)
                                  - y.reshape(n_y, 1, -1)).norm(dim=-1).mean()),
               kwargs={k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))})
    return row


# ---------------------------------------------------------------------------- CLI
def _pixel_model():
    from ..models import pixel_shapes as P

    return P.eps_model(P.load()), P.alphas_cumprod()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m diffnotes.restoration.evaluate",
                                description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="all", help="comma-separated names, or 'all'")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--sigmas", default=",".join(map(str, SIGMAS)))
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-scenes", action="store_true", help="only the mixture table")
    p.add_argument("--no-gmm", action="store_true", help="only the scenes table")
    p.add_argument("--gmm-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS_DIR))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    configs = collect_configs()
    names = list(configs) if a.methods == "all" else [s.strip() for s in a.methods.split(",")]
    for nm in names:
        if nm not in configs:
            p.error(f"unknown method {nm!r}; known: {', '.join(configs)}")
    tasks = [s.strip() for s in a.tasks.split(",")]
    for t in tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r}; known: {', '.join(TASKS)}")
    sigmas = [float(s) for s in a.sigmas.split(",")]
    model = None if a.no_scenes else _pixel_model()
    problems = None if a.no_gmm else gmm_problems(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for nm in names:
        cfg = configs[nm]
        t_wall, t_cpu = time.time(), time.process_time()
        rows, gmm_rows = [], []
        for task in tasks:
            if cfg.get("tasks") and task not in cfg["tasks"]:
                continue
            for s in sigmas:
                if model is not None:
                    rows.append(measure_method(nm, model[0], model[1], task, s, n=a.n,
                                               seed=a.seed, configs=configs))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "kwargs"}),
                          flush=True)
                if problems is not None:
                    gmm_rows.append(gmm_measure(nm, task, s, n_samples=a.gmm_samples,
                                                seed=a.seed, configs=configs, problems=problems))
                    print(json.dumps({k: v for k, v in gmm_rows[-1].items() if k != "kwargs"}),
                          flush=True)
        rec = dict(method=nm, module=cfg.get("module", "evaluate"), note=cfg.get("note", ""),
                   steps=cfg.get("steps"), command=" ".join(["python -m diffnotes.restoration.evaluate"]
                                                            + (argv if argv is not None
                                                               else sys.argv[1:])),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   wall_seconds=time.time() - t_wall, cpu_seconds=time.process_time() - t_cpu,
                   threads=torch.get_num_threads(), machine=platform.machine(),
                   torch=torch.__version__, rows=rows, gmm_rows=gmm_rows)
        path = out / f"{nm}.json"
        if path.exists() and (a.no_scenes or a.no_gmm):      # keep the other table
            old = json.loads(path.read_text())
            if a.no_scenes:
                rec["rows"] = old.get("rows", [])
            if a.no_gmm:
                rec["gmm_rows"] = old.get("gmm_rows", [])
        path.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
