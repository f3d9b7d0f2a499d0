"""Editing real images, measured on the ground truth of the shapes generator.

``python -m diffnotes.editing.eval_real`` runs the full evaluation of the chapter "Editing real
images" once and writes ``diffnotes/editing/results/real_images.json``: the figures and a record
of the run (command, wall time, threads, date, settings), like the weights' ``TRAINING.json``.

The "real images" are scenes of :func:`diffnotes.data.shapes.generate_scenes` (one object each,
with its caption and its true mask): the model never generated them.

* **Reconstruction** (:func:`reconstruct`): invert the scene under its caption and sample it back,
  PSNR against the scene. Methods: DDIM inversion (:func:`~diffnotes.editing.inversion.
  ddim_invert_image`, then guided DDIM at the same guidance), null-text inversion
  (:func:`~diffnotes.editing.inversion.null_text_inversion`) and negative-prompt inversion
  (:func:`~diffnotes.editing.inversion.negative_prompt_inversion`), both sampled by
  :func:`~diffnotes.editing.inversion.sample_with_null_embeddings`, EDICT
  (:func:`~diffnotes.editing.inversion.edict_invert` / ``edict_sample``) and BDIA (γ = 1,
  ``bdia_invert`` / ``bdia_sample``), at guidance 1 and 7.5 and 10, 20, 50 steps; the VAE round
  trip (:func:`~diffnotes.editing.inversion.encode_image` then ``decode_latents``) is the ceiling.
  At guidance 1, null-text and negative-prompt inversion are DDIM inversion (nothing to
  correct), so they are run at 7.5 only.
* **Edits** (:func:`edit_scene`): a colour swap ("red" → "blue" in the caption) by NTI + P2P
  (word swap; also with P2P's local blend on the shape word), NPI + P2P, DiffEdit (its own mask), SDEdit (a strength sweep) and masked SDEdit
  (the true mask): success = the colour judge of :mod:`diffnotes.models.eval_shapes` on the
  true mask says the target colour; preservation = PSNR outside the true mask (dilated by one
  pixel, so that the soft edges the decoder draws do not count); DiffEdit's mask against the
  true object mask (IoU).
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

from ..data import shapes as S
from ..models import eval_shapes as ev
from .common import encode_prompts, pipe_alphas_cumprod, pipe_eps_model, pipe_timesteps
from .diffedit import diffedit, diffedit_mask
from .inversion import (bdia_invert, bdia_sample, decode_latents, edict_invert, edict_sample,
                        encode_image, negative_prompt_inversion, null_text_inversion, psnr,
                        sample_with_null_embeddings, ddim_invert_image)
from .p2p import LocalBlend, WordSwap, prompt_to_prompt
from .sdedit import sdedit

__all__ = ["real_scenes", "target_caption", "reconstruct", "edit_scene", "masked_psnr",
           "mask_iou", "run", "RESULTS", "METHODS", "NTI_LR"]

RESULTS = Path(__file__).parent / "results" / "real_images.json"
#: reconstruction methods and the guidance scales each is run at
METHODS = {"ddim": (1.0, 7.5), "null-text": (7.5,), "negative-prompt": (7.5,),
           "edict": (1.0, 7.5), "bdia": (1.0, 7.5)}
#: null-text inversion's learning rate: the paper's 1e-2 is tuned for 50 steps; at 10 steps it
#: needs about 0.1 on the shapes model (see null_text_inversion's docstring)
NTI_LR = {10: 0.1, 20: 0.05, 50: 0.01}


def real_scenes(n: int, seed: int = 0):
    """``n`` single-object generator scenes (plain or textured backgrounds, training concepts):
    list of dicts ``{image (64, 64, 3), mask (64, 64) bool, caption, color, shape}``."""
    sc = S.generate_scenes(n, seed=seed, min_objects=1, max_objects=1, p_mention_size=0.5,
                           p_mention_position=1.0)
    return [dict(image=sc.images[i], mask=sc.masks[i, 0], caption=sc.captions[i],
                 color=sc.objects[i][0]["color"], shape=sc.objects[i][0]["shape"])
            for i in range(n)]


def target_caption(scene: dict, k: int = 0) -> tuple[str, str]:
    """The colour-swap edit of a scene: ``(target caption, target colour)``, the k-th other
    training colour after the scene's (deterministic)."""
    colors = [c for c in S.TRAIN_COLORS if c != scene["color"]]
    tgt = colors[(S.TRAIN_COLORS.index(scene["color"]) + k) % len(colors)]
    words = [tgt if w == scene["color"] else w for w in scene["caption"].split()]
    if words[0] in ("a", "an") and len(words) > 1:     # "an orange" / "a red"
        words[0] = "an" if words[1][0] in "aeiou" else "a"
    return " ".join(words), tgt


def _x(image) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].double()


def _hwc(images) -> np.ndarray:
    """PIL image / (1, 3, H, W) tensor -> HWC float array in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images[0].permute(1, 2, 0).double().cpu().numpy()
    return np.asarray(images.convert("RGB"), dtype=np.float64) / 255.0


def masked_psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    """PSNR (dB) between HWC images ``a`` and ``b`` over the pixels where ``keep`` is True."""
    mse = float(((a - b) ** 2)[keep].mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1 for two empty masks)."""
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 1.0


def _outside(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    return ~ndimage.binary_dilation(mask, iterations=1)


def reconstruct(pipe, image, caption: str, method: str, num_inference_steps: int,
                guidance_scale: float) -> tuple[torch.Tensor, float]:
    """Invert ``image`` under ``caption`` with ``method`` (a key of :data:`METHODS`, or
    ``"vae"``) and sample it back at ``guidance_scale``: ``(decoded (1, 3, H, W), seconds)``."""
    t0 = time.perf_counter()
    n, w = num_inference_steps, guidance_scale
    if method == "vae":
        z = encode_image(pipe, image)
    elif method == "ddim":
        traj = ddim_invert_image(pipe, image, caption, n, w)
        z = sample_with_null_embeddings(pipe, traj[-1], caption, None, w, n)
    elif method == "null-text":
        x_T, nulls = null_text_inversion(pipe, image, caption, n, w,
                                         learning_rate=NTI_LR.get(n, 0.01))
        z = sample_with_null_embeddings(pipe, x_T, caption, nulls, w)
    elif method == "negative-prompt":
        x_T, nulls = negative_prompt_inversion(pipe, image, caption, n)
        z = sample_with_null_embeddings(pipe, x_T, caption, nulls, w)
    elif method in ("edict", "bdia"):
        z0 = encode_image(pipe, image)
        ts, ac = pipe_timesteps(pipe, n), pipe_alphas_cumprod(pipe)
        em = pipe_eps_model(pipe, encode_prompts(pipe, caption), None, w)
        if method == "edict":
            z = edict_sample(em, edict_invert(em, z0, ts, ac), ts, ac)[0]
        else:
            x_T, x_next = bdia_invert(em, z0, ts, ac)
            z = bdia_sample(em, x_T, ts, ac, x_next=x_next)
    else:
        raise ValueError(f"method must be one of {['vae', *METHODS]}, got {method!r}")
    x = decode_latents(pipe, z)
    return x, time.perf_counter() - t0


def edit_scene(pipe, scene: dict, num_inference_steps: int = 10,
               strengths=(0.3, 0.5, 0.7, 0.9), seed: int = 0, guidance_scale: float = 7.5
               ) -> dict:
    """The colour-swap edits of one scene (see the module doc). Returns a dict: per method
    ``{success, psnr_out, seconds}`` (SDEdit per strength), DiffEdit's ``mask_iou``, and the
    images (HWC arrays) under ``"images"``."""
    n, w = num_inference_steps, guidance_scale
    cap = scene["caption"]
    tgt, color = target_caption(scene)
    m = scene["mask"]
    out_px = _outside(m)
    src = np.asarray(scene["image"], dtype=np.float64)
    res, ims = {}, {}

    def judge(name, hwc, seconds):
        ims[name] = hwc
        res[name] = dict(success=bool(ev.judge_color(hwc, m) == color),
                         psnr_out=masked_psnr(hwc, src, out_px), seconds=seconds)

    t0 = time.perf_counter()
    judge("vae", _hwc(decode_latents(pipe, encode_image(pipe, scene["image"]))), 0.0)
    res["vae"]["success"] = False            # the ceiling of preservation, no edit
    for name, inv in (("nti+p2p", "nti"), ("npi+p2p", "npi")):
        t0 = time.perf_counter()
        if inv == "nti":
            x_T, nulls = null_text_inversion(pipe, scene["image"], cap, n, w,
                                             learning_rate=NTI_LR.get(n, 0.01))
        else:
            x_T, nulls = negative_prompt_inversion(pipe, scene["image"], cap, n)
        for blend in (None, LocalBlend(scene["shape"])):
            images, _ = prompt_to_prompt(pipe, [cap, tgt], WordSwap(), num_inference_steps=n,
                                         guidance_scale=w, cross_replace_steps=0.8,
                                         self_replace_steps=0.4, latents=x_T,
                                         null_embeddings=nulls, local_blend=blend)
            judge(name + ("" if blend is None else "+blend"), _hwc(images[1]),
                  time.perf_counter() - t0)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    dmask = diffedit_mask(pipe, scene["image"], cap, tgt, generator=g, guidance_scale=w)
    f = m.shape[0] // dmask.shape[0]
    dm = np.kron(dmask.cpu().numpy(), np.ones((f, f))) > 0.5
    images = diffedit(pipe, scene["image"], dmask, tgt, num_inference_steps=n, guidance_scale=w)
    judge("diffedit", _hwc(images[0]), time.perf_counter() - t0)
    res["diffedit"]["mask_iou"] = mask_iou(dm, m)
    ims["diffedit_mask"] = dm
    for s in strengths:
        for masked in (False, True):
            name = f"{'masked-' if masked else ''}sdedit@{s:g}"
            t0 = time.perf_counter()
            images = sdedit(pipe, scene["image"], tgt, s, mask=m if masked else None,
                            num_inference_steps=n, guidance_scale=w,
                            generator=torch.Generator().manual_seed(seed))
            judge(name, _hwc(images[0]), time.perf_counter() - t0)
    return dict(results=res, images=ims, target=tgt, target_color=color)


def _summary(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    out = {}
    for k in keys:
        vals = [r[k] for r in rows]
        d = dict(success=float(np.mean([v["success"] for v in vals])),
                 psnr_out=float(np.mean([v["psnr_out"] for v in vals])),
                 seconds=float(np.mean([v["seconds"] for v in vals])))
        if "mask_iou" in vals[0]:
            d["mask_iou"] = float(np.mean([v["mask_iou"] for v in vals]))
        out[k] = d
    return out


def run(n_scenes: int = 8, steps=(10, 20, 50), seed: int = 0, edit_steps: int = 10,
        strengths=(0.3, 0.5, 0.7, 0.9), progress: bool = True, pipe=None) -> dict:
    """The full evaluation: reconstruction table and edit table (means over the scenes)."""
    from tqdm.auto import tqdm

    from ..models.load import load_pipeline

    pipe = pipe or load_pipeline("shapes")
    scenes = real_scenes(n_scenes, seed)
    jobs = [(i, "vae", 1, 1.0) for i in range(n_scenes)]
    jobs += [(i, m, n, w) for n in steps for m, ws in METHODS.items() for w in ws
             for i in range(n_scenes)]
    recon: dict = {}
    bar = tqdm(total=len(jobs) + n_scenes, disable=not progress, desc="real images")
    for i, m, n, w in jobs:
        sc = scenes[i]
        x, sec = reconstruct(pipe, sc["image"], sc["caption"], m, n, w)
        p = float(psnr(x.double().cpu(), _x(sc["image"]))[0])
        key = "vae" if m == "vae" else f"{m}|w={w:g}|steps={n}"
        recon.setdefault(key, dict(psnr=[], seconds=[]))
        recon[key]["psnr"].append(p)
        recon[key]["seconds"].append(sec)
        bar.update()
    rows = []
    for sc in scenes:
        rows.append(edit_scene(pipe, sc, edit_steps, strengths, seed)["results"])
        bar.update()
    bar.close()
    table = {k: dict(psnr=float(np.mean(v["psnr"])), psnr_std=float(np.std(v["psnr"])),
                     seconds=float(np.mean(v["seconds"])), per_scene=v["psnr"])
             for k, v in recon.items()}
    return dict(reconstruction=table, edits=_summary(rows), edits_per_scene=rows,
                scenes=[dict(caption=s["caption"], target=target_caption(s)[0]) for s in scenes])


def main(argv=None) -> None:  # pragma: no cover - the measurement command
    import argparse

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default="10,20,50")
    ap.add_argument("--edit-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    steps = tuple(int(s) for s in a.steps.split(","))
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res = run(a.scenes, steps, a.seed, a.edit_steps)
    record = dict(command="python -m diffnotes.editing.eval_real " + " ".join(argv or sys.argv[1:]),
                  date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  wall_time_s=round(time.perf_counter() - start, 1), threads=a.threads,
                  machine=f"{platform.machine()}, {os.cpu_count()} logical CPUs",
                  load_average_at_start=load, torch=torch.__version__, model="shapes",
                  settings=dict(scenes=a.scenes, seed=a.seed, steps=list(steps),
                                guidance=[1.0, 7.5], edit_steps=a.edit_steps,
                                edit_guidance=7.5, sdedit_strengths=[0.3, 0.5, 0.7, 0.9],
                                nti_learning_rate=NTI_LR, nti_inner_steps=10, edict_p=0.93,
                                bdia_gamma=1.0, p2p=dict(cross_replace_steps=0.8,
                                                         self_replace_steps=0.4),
                                diffedit=dict(num_maps=10, encode_strength=0.5,
                                              threshold_ratio=3.0, inpaint_strength=0.8)))
    res["record"] = record
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out} in {record['wall_time_s']} s")


if __name__ == "__main__":  # pragma: no cover
    main()
