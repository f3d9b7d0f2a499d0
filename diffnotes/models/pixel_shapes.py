"""The shipped pixel-space diffusion model of the shapes scenes (Part I, restoration).

Data: the captioned scenes of :func:`diffnotes.data.shapes.generate_scenes`, rendered at their
native 64×64 and average-pooled ×2 to ``IMAGE_SIZE = 32`` (half on plain, half on textured
backgrounds), scaled to [-1, 1], channels first. Scenes drawn with :data:`TEST_SEED` are held out:
the training command draws its scenes from other seeds.

The model is an unconditional ``diffusers.UNet2DModel`` (:data:`UNET_CONFIG`: levels of 16, 32,
64 channels at 32², 16², 8², self-attention at 8²; 0.69 M parameters) that predicts ε (Ahmad's notes, eq 1.8) under
DDPM's linear schedule (β from 1e-4 to 0.02, T = 1000; Ho et al. 2020). It is the prior of the
restoration chapters: unlike the latent text-to-image model, it acts on pixels, so a measurement
operator y = A x applies to its samples directly (Zhu's slides, *Conditional models*).

Retrain (the weights in ``diffnotes/weights/pixel_shapes/`` were made by this command)::

    torchrun --standalone --nproc_per_node 2 -m diffnotes.models.pixel_shapes train --minutes 25

The loop uses Hugging Face Accelerate, like :mod:`diffnotes.models.train`: on the shared 2-core
CPU, two one-thread processes are much faster than one two-thread process. It checkpoints the EMA
weights every ``--checkpoint-minutes`` (a usable model exists if the run is stopped) and records
the command, wall and CPU time, threads, steps, date and every setting in
``diffnotes/weights/pixel_shapes/TRAINING.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..schedules import alphas_cumprod as _cumprod
from ..schedules import make_betas
from ..utils import batch_timesteps, check_int, check_tensor

__all__ = ["IMAGE_SIZE", "T", "TEST_SEED", "WEIGHTS_DIR", "UNET_CONFIG", "scenes", "to_images",
           "upsample", "build_unet", "load", "betas", "alphas_cumprod", "eps_model", "judge",
           "judged_quality", "total_variation", "judge_accuracy_real", "quality", "sample",
           "weights_available"]

IMAGE_SIZE = 32
T = 1000
#: seed of the held-out scenes (the restoration evaluation draws from it; training never does).
TEST_SEED = 31_337
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "pixel_shapes"

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=32,
)


# ---------------------------------------------------------------------------- schedule, data
def betas() -> torch.Tensor:
    """DDPM's linear β schedule (1e-4 to 0.02, T = 1000; Ho et al. 2020), float64 (1000,)."""
    return make_betas("linear", T=T)


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) of :func:`betas` (Ahmad's notes, below eq 1.2), float64 (1000,)."""
    return _cumprod(betas())


def _pool_masks(masks: np.ndarray) -> np.ndarray:
    """(N, K, 64, 64) bool → (N, K, 32, 32) bool: a 32² pixel belongs to an object when at least
    half of its four 64² pixels do."""
    m = torch.from_numpy(masks).float()
    return (F.avg_pool2d(m, 2) >= 0.5).numpy()


def _boxes(masks: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) end-exclusive of each (N, K, H, W) mask; -1 for empty ones."""
    N, K = masks.shape[:2]
    out = np.full((N, K, 4), -1, dtype=np.int64)
    for i in range(N):
        for k in range(K):
            ys, xs = np.nonzero(masks[i, k])
            if len(xs):
                out[i, k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


def scenes(n: int, seed=TEST_SEED, textured: bool = True, **generate_scenes_kwargs):
    """``n`` scenes as ``(x, sc)``: x float32 (n, 3, 32, 32) in [-1, 1] (the 64×64 renders
    average-pooled ×2), sc the :class:`~diffnotes.data.shapes.ShapeScenes` at 64×64 with two
    extra attributes at 32×32: ``sc.masks32`` (bool (n, K, 32, 32)) and ``sc.boxes32``
    (int (n, K, 4), ``(x0, y0, x1, y1)`` end-exclusive, -1 for empty slots).

    ``seed`` defaults to :data:`TEST_SEED`, the held-out scenes. ``textured`` and the other
    keywords go to :func:`~diffnotes.data.shapes.generate_scenes`. Raises ``ValueError`` for a
    bad ``n`` (and whatever ``generate_scenes`` raises).
    """
    from ..data.shapes import generate_scenes

    n = check_int(n, "n", min=1)
    sc = generate_scenes(n, seed=seed, textured=textured, **generate_scenes_kwargs)
    x = torch.from_numpy(sc.images).permute(0, 3, 1, 2).float()
    x = (F.avg_pool2d(x, 2) * 2 - 1).clamp(-1, 1).contiguous()
    sc.masks32 = _pool_masks(sc.masks)
    sc.boxes32 = _boxes(sc.masks32)
    return x, sc


def to_images(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → float64 (B, H, W, 3) in [0, 1] (clamped), for plots and judges."""
    x = check_tensor(x, "x", ndim=4)
    return ((x.detach().double().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def upsample(x: torch.Tensor, size: int = 64, mode: str = "bilinear") -> torch.Tensor:
    """Enlarge (B, C, S, S) images to (B, C, size, size) (bilinear by default; convex weights,
    so values stay in range). The judges see 64×64 images, like the generator's."""
    x = check_tensor(x, "x", ndim=4)
    size = check_int(size, "size", min=1)
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False)


# ---------------------------------------------------------------------------- the UNet
def build_unet(**overrides):
    """A fresh (untrained) ``diffusers.UNet2DModel`` of :data:`UNET_CONFIG` (0.69 M parameters);
    keywords override config entries (e.g. ``in_channels=6`` for the SR3 model)."""
    from diffusers import UNet2DModel

    return UNet2DModel(**{**UNET_CONFIG, **overrides})


def weights_available(path=None) -> bool:
    """True when the shipped weights (config.json + safetensors) are on disk."""
    p = Path(path) if path is not None else WEIGHTS_DIR
    return (p / "config.json").is_file() and (p / "diffusion_pytorch_model.safetensors").is_file()


def load(device=None, dtype=None, path=None):
    """The shipped trained UNet via ``UNet2DModel.from_pretrained`` on the local directory
    ``diffnotes/weights/pixel_shapes/`` (never a hub). Eval mode, gradients off, on ``device``
    (default CPU) in ``dtype`` (default float32). Raises ``FileNotFoundError`` if missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DModel

    p = Path(path) if path is not None else WEIGHTS_DIR
    if not weights_available(p):
        raise FileNotFoundError(f"no pixel_shapes weights in {p}; train them with "
                                "`python -m diffnotes.models.pixel_shapes train`")
    from .load import _dtype_kwarg

    unet = UNet2DModel.from_pretrained(str(p), local_files_only=True,
                                       **_dtype_kwarg(dtype or torch.float32))
    unet = unet.to(device or "cpu").eval()
    unet.requires_grad_(False)
    return unet


def eps_model(unet, cond: torch.Tensor | None = None):
    """``eps_model(x, t) -> ε_θ(x_t, t)`` of a UNet2DModel (Ahmad's notes, eq 1.8): x of any float
    dtype (the output has x's dtype), t an int or a (B,) long tensor in [0, 1000).

    ``cond`` (B, C, H, W), if given, is concatenated to x along the channels before the UNet
    (SR3's conditioning by concatenation; Saharia et al. 2021, §2).
    """
    def f(x, t):
        x = check_tensor(x, "x", ndim=4)
        dtype = next(unet.parameters()).dtype
        inp = x if cond is None else torch.cat([x, cond.to(x)], dim=1)
        return unet(inp.to(dtype), batch_timesteps(t, x, T)).sample.to(x.dtype)

    return f


def sample(unet, n: int = 16, num_steps: int = 100, generator=None, x_T=None, eta: float = 1.0,
           progress: bool = False) -> torch.Tensor:
    """``n`` unconditional samples (B, 3, 32, 32) in [-1, 1]: ``ddim_sample`` (Ahmad's notes,
    eq 1.21) on ``num_steps`` evenly spaced steps, η = 1 by default (a DDPM-like sampler on the
    sub-sequence), with x̂₀ clipped to [-1, 1] (DDPM's ``clip_sample``)."""
    from ..ddim import ddim_sample
    from ..schedules import make_timesteps

    if x_T is None:
        x_T = torch.randn((check_int(n, "n", min=1), 3, IMAGE_SIZE, IMAGE_SIZE),
                          generator=generator)
    x0 = ddim_sample(eps_model(unet), x_T, make_timesteps(num_steps, T), alphas_cumprod(),
                     eta=eta, generator=generator, progress=progress, clip_sample=True)
    return x0.clamp(-1, 1)


# ---------------------------------------------------------------------------- judges
def judge(x: torch.Tensor, clf=None) -> list[list[dict]]:
    """Every object of each image judged by :func:`diffnotes.models.eval_shapes.judge_scene`
    (colour, shape, position, box; largest first), after bilinear upsampling 32 → 64 so that the
    judges see the size they were built for. Returns one list of dicts per image."""
    from .eval_shapes import judge_scene, shape_judge

    clf = clf or shape_judge()
    x = check_tensor(x, "x", ndim=4)
    imgs = to_images(upsample(x.double(), 64))
    return [judge_scene(im, clf) for im in imgs]


def judged_quality(x: torch.Tensor, clf=None) -> dict:
    """Sample quality without a reference image, from the judges (:func:`judge`): the share of
    images in which they find at least one object, objects per image, the share of found objects
    whose mean colour is within 0.2 (RGB distance) of a palette colour (a clean object, not a
    smear), and the histograms of judged colours and shapes (``color_hist``, ``shape_hist``:
    name → share of found objects). Run it on real scenes pooled to 32² for the ceiling."""
    from ..data import shapes as S

    found = judge(x, clf)
    pal = np.asarray(list(S.COLORS.values()))
    imgs = to_images(upsample(x.double(), 64))
    n_obj, clean = 0, 0
    colors, shapes = {}, {}
    for im, objs in zip(imgs, found):
        for o in objs:
            n_obj += 1
            rgb = im[o["mask"]].mean(0)
            clean += bool(np.min(np.linalg.norm(pal - rgb, axis=1)) < 0.2)
            colors[o["color"]] = colors.get(o["color"], 0) + 1
            shapes[o["shape"]] = shapes.get(o["shape"], 0) + 1
    n = max(1, n_obj)
    return dict(images=len(found), with_object=float(np.mean([len(f) > 0 for f in found])),
                objects_per_image=n_obj / max(1, len(found)), on_palette=clean / n,
                color_hist={k: v / n for k, v in sorted(colors.items())},
                shape_hist={k: v / n for k, v in sorted(shapes.items())})


def total_variation(p: dict, q: dict) -> float:
    """½ Σ |p − q| of two histograms given as name → share."""
    keys = set(p) | set(q)
    return 0.5 * float(sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys))


def judge_accuracy_real(n: int = 64, seed=TEST_SEED, clf=None) -> dict:
    """The judges' accuracy on real held-out scenes at 32² (upsampled like the samples): for the
    largest object of each scene, is a judged object found on it (IoU ≥ 0.3 at 64²), with its
    true colour and shape? The ceiling of every judged figure of the restoration chapters."""
    from .eval_shapes import shape_judge

    clf = clf or shape_judge()
    x, sc = scenes(n, seed=seed)
    found = judge(x, clf)
    hit = {"found": 0, "color": 0, "shape": 0}
    for i, objs in enumerate(found):
        k = int(np.argmax(sc.masks[i].reshape(sc.masks.shape[1], -1).sum(1)))
        truth = sc.masks[i, k]
        best, iou = None, 0.0
        for o in objs:
            v = np.logical_and(o["mask"], truth).sum() / max(1, np.logical_or(o["mask"], truth).sum())
            if v > iou:
                best, iou = o, v
        if best is not None and iou >= 0.3:
            hit["found"] += 1
            hit["color"] += best["color"] == sc.objects[i][k]["color"]
            hit["shape"] += best["shape"] == sc.objects[i][k]["shape"]
    return {k: v / n for k, v in hit.items()}


def quality(n: int = 64, num_steps: int = 100, seed: int = 0, unet=None) -> dict:
    """The shipped model's judged sample quality beside real held-out scenes (the ceiling):
    :func:`judged_quality` of ``n`` samples (:func:`sample`, DDIM η = 1, ``num_steps``, x̂₀
    clipped) and of ``n`` real scenes, the total-variation distances of their colour and shape
    histograms, and :func:`judge_accuracy_real`."""
    from .eval_shapes import shape_judge

    clf = shape_judge()
    unet = unet if unet is not None else load()
    t0 = time.time()
    xs = sample(unet, n, num_steps, generator=torch.Generator().manual_seed(seed))
    secs = time.time() - t0
    xr, _ = scenes(n, seed=TEST_SEED)
    qs, qr = judged_quality(xs, clf), judged_quality(xr, clf)
    return dict(samples=qs, real=qr, seconds_per_sample=secs / n, num_steps=num_steps,
                color_tv=total_variation(qs["color_hist"], qr["color_hist"]),
                shape_tv=total_variation(qs["shape_hist"], qr["shape_hist"]),
                judge_accuracy_real=judge_accuracy_real(n, clf=clf))


# ---------------------------------------------------------------------------- training
def _lr_at(progress: float, base: float, warmup: float = 0.03) -> float:
    if progress < warmup:
        return base * max(progress, 1e-3) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup)
                                                                  / (1 - warmup)))))


def _training_data(n: int, seed: int, textured_fraction: float = 0.5) -> torch.Tensor:
    """uint8 (n, 3, 32, 32) training scenes (never :data:`TEST_SEED`)."""
    out = []
    chunk = 2000
    for j, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        n_tex = int(round(m * textured_fraction))
        for k, (cnt, tex) in enumerate(((n_tex, True), (m - n_tex, False))):
            if cnt == 0:
                continue
            s = 1_000_003 * (seed + 1) + 7919 * j + k
            assert s != TEST_SEED
            x, _ = scenes(cnt, seed=s, textured=tex)
            out.append(((x + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def train_model(args, *, build, make_batch, out_dir: Path, name: str) -> None:
    """The shared Accelerate loop of the pixel-space models: ε-loss (Ahmad's notes, eq 1.8) with
    t uniform, AdamW, warm-up + cosine lr, EMA, checkpoints of the EMA weights every
    ``args.checkpoint_minutes`` and a TRAINING.json. ``make_batch(x0_uint8, g)`` returns
    ``(x0, cond)`` (cond None for the unconditional model, else concatenated to x_t)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..ddpm import q_sample

    torch.set_num_threads(args.threads)
    acc = Accelerator(cpu=True)
    torch.manual_seed(args.seed)
    data = _training_data(args.n_train, args.seed, args.textured_fraction)
    unet = build()
    previous = None
    if getattr(args, "init_from", ""):                 # continue an earlier run's EMA weights
        from diffusers import UNet2DModel
        unet.load_state_dict(UNet2DModel.from_pretrained(args.init_from).state_dict())
        log = Path(args.init_from) / "TRAINING.json"
        previous = json.loads(log.read_text()) if log.is_file() else None
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    unet, opt = acc.prepare(unet, opt)
    raw = acc.unwrap_model(unet)
    ema = build()
    ema.load_state_dict(raw.state_dict())
    ema.requires_grad_(False)
    ac = alphas_cumprod().float()
    g = torch.Generator().manual_seed(args.seed + 1000 * acc.process_index)
    budget = args.minutes * 60
    t0 = time.time()
    last_ckpt = t0
    losses, step = [], 0
    bar = tqdm(desc=name, mininterval=30, disable=not acc.is_main_process)

    def progress():
        p = torch.tensor([max(step / max(args.steps, 1) if args.steps else 0.0,
                              (time.time() - t0) / budget)], dtype=torch.float64)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast
            p = broadcast(p, from_process=0)
        return float(p.item())

    def save(final: bool):
        if not acc.is_main_process:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        ema.save_pretrained(str(out_dir), safe_serialization=True)
        wall = time.time() - t0
        entry = dict(
            command=" ".join(["python -m diffnotes." + name] + sys.argv[1:])
            if acc.num_processes == 1 else
            f"torchrun --standalone --nproc_per_node {acc.num_processes} -m diffnotes.{name} "
            + " ".join(sys.argv[1:]),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            wall_seconds=round(wall, 1),
            cpu_seconds_rank0=round(time.process_time(), 1),
            cpu_seconds_all_processes_estimate=round(time.process_time() * acc.num_processes, 1),
            processes=acc.num_processes, threads_per_process=torch.get_num_threads(),
            steps=step, samples_seen=step * args.batch_size * acc.num_processes,
            finished=final, parameters=sum(p.numel() for p in ema.parameters()),
            final_train_loss_avg200=round(float(np.mean(losses[-200:])), 5) if losses else None,
            settings={k: v for k, v in vars(args).items() if k != "func"},
            torch=torch.__version__, python=platform.python_version(),
            machine=platform.machine())
        if previous is not None:
            entry["previous_run"] = previous
            entry["total_wall_seconds"] = round(wall + previous.get(
                "total_wall_seconds", previous.get("wall_seconds", 0.0)), 1)
            entry["total_steps"] = step + previous.get("total_steps", previous.get("steps", 0))
        (out_dir / "TRAINING.json").write_text(json.dumps(entry, indent=2) + "\n")

    while True:
        p = progress()
        if p >= 1.0:
            break
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(p, args.lr)
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g)
        x0, cond = make_batch(data[idx], g)
        t = torch.randint(0, T, (args.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = q_sample(x0, t, ac, noise)                                     # eq 1.2
        inp = x_t if cond is None else torch.cat([x_t, cond], dim=1)
        loss = F.mse_loss(unet(inp, t).sample, noise)                        # eq 1.8
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pr in zip(ema.parameters(), raw.parameters()):
                pe.lerp_(pr.detach(), 1 - decay)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save(False)
            last_ckpt = time.time()
    bar.close()
    save(True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        print(json.dumps(json.loads((out_dir / "TRAINING.json").read_text()), indent=2))


def _uncond_batch(x_uint8, g):
    x0 = x_uint8.float() / 127.5 - 1.0
    flip = torch.rand(x0.shape[0], generator=g) < 0.5                      # mirror augmentation
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    return x0, None


def add_train_arguments(p: argparse.ArgumentParser, minutes: float, out: Path) -> None:
    """The training options shared by this model's and SR3's ``train`` commands."""
    p.add_argument("--minutes", type=float, default=minutes, help="wall-time budget")
    p.add_argument("--steps", type=int, default=0, help="step cap (0: as many as fit)")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--n-train", type=int, default=30000, help="training scenes")
    p.add_argument("--textured-fraction", type=float, default=0.5)
    p.add_argument("--checkpoint-minutes", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=str(out))
    p.add_argument("--init-from", default="", help="continue from this run's weights (a copy)")


def main(argv=None) -> None:
    """``python -m diffnotes.models.pixel_shapes train [--minutes N] ...``."""
    p = argparse.ArgumentParser(prog="python -m diffnotes.models.pixel_shapes",
                                description="Train the shipped pixel-space shapes model.")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_train_arguments(sub.add_parser("train", help="train the unconditional UNet (ε-loss)"),
                        25.0, WEIGHTS_DIR)
    q = sub.add_parser("quality", help="judge samples of the shipped model (QUALITY.json)")
    q.add_argument("--n", type=int, default=64)
    q.add_argument("--steps", type=int, default=100)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cmd == "quality":
        torch.set_num_threads(args.threads)
        rec = quality(args.n, args.steps, args.seed)
        rec.update(command="python -m diffnotes.models.pixel_shapes " + " ".join(sys.argv[1:]),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   weights_steps=json.loads((WEIGHTS_DIR / "TRAINING.json").read_text())["steps"])
        (WEIGHTS_DIR / "QUALITY.json").write_text(json.dumps(rec, indent=1) + "\n")
        print(json.dumps(rec, indent=1))
        return
    train_model(args, build=build_unet, make_batch=_uncond_batch, out_dir=Path(args.out),
                name="models.pixel_shapes")


if __name__ == "__main__":
    main()
