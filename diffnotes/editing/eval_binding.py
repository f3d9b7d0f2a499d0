"""Attribute binding and neglect on the shapes model, judged by :mod:`diffnotes.models.eval_shapes`.

``python -m diffnotes.editing.eval_binding`` generates the two-object prompts of
:func:`~diffnotes.models.eval_shapes.two_object_prompts` ("a red circle and a blue square",
distinct shapes and colours, no positions) with every method of :data:`METHODS`, from the same
initial latent per prompt, judges each image with :func:`~diffnotes.models.eval_shapes.
judge_scene` and :func:`~diffnotes.models.eval_shapes.binding_outcome` (neglect = fewer than two
objects; binding = both shapes but a colour on the wrong one or repeated; wrong shape; correct),
and writes ``diffnotes/editing/results/binding.json`` with the rates, the time per image, the
diagnostics of the Attend-and-Excite analysis (attention mass per token, gradient and latent
norms, refinement iterations, whether the A&E loss of plain sampling predicts neglect) and a
record of the run (command, wall time, threads, date).

Methods: ``plain`` (guided DDIM; run as Attend-and-Excite with step size 0 and thresholds 0,
which is plain sampling exactly, tests/test_binding.py, so its A&E losses come for free), A&E
with the diffusers token slice (the earlier measurement's setting) and with the paper's at
several step scales, StructureDiffusion, Dense Diffusion and LMD (boxes from
:func:`~diffnotes.editing.layout.canvas_split_boxes`).

``--methods a b`` runs a subset (into ``--out``); ``--combine f1.json f2.json ...`` merges runs
made side by side into one record (each run's record kept under ``record["parts"]``);
``--timing`` times the methods one prompt at a time, interleaved with plain sampling, which is
what the time ratios of the chapter use (a run's own wall times depend on the machine's load).
The stored record was made that way on a shared 2-core machine: see its ``parts``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS_PATH = Path(__file__).parent / "results" / "binding.json"
#: the measurement's sampler settings (those of the earlier diffusers measurement)
SETTINGS = dict(num_inference_steps=20, guidance_scale=7.5, seed=0)
#: A&E's altered steps at 20 steps (the earlier measurement: 10; the paper: 25 of 50)
AE_ITER = 10

#: name -> (kind, keyword arguments)
METHODS = {
    "plain": ("ae", dict(scale_factor=0.0, thresholds={0: 0.0})),
    "ae_diffusers_s20": ("ae", dict(scale_factor=20, softmax_tokens="diffusers")),
    "ae_paper_s20": ("ae", dict(scale_factor=20, softmax_tokens="prompt")),
    "structure": ("structure", {}),
    "dense": ("dense", {}),
    "lmd": ("lmd", {}),
    "ae_paper_s5": ("ae", dict(scale_factor=5, softmax_tokens="prompt")),
    "ae_raw_s5": ("ae", dict(scale_factor=5, softmax_tokens="none",
                             thresholds={0: 0.05, 10: 0.2})),
    "ae_paper_s1": ("ae", dict(scale_factor=1, softmax_tokens="prompt")),
    "ae_diffusers_s5": ("ae", dict(scale_factor=5, softmax_tokens="diffusers")),
}
#: methods run one prompt at a time (their time is compared with plain sampling at batch 1)
BATCH1 = ("dense", "lmd")


def plain_seconds(pipe, specs, xT, batch_size, steps=20, guidance=7.5) -> float:
    """Seconds per image of plain guided DDIM (:func:`diffnotes.ddim.ddim_sample`, Ahmad's
    notes eq 1.44 guidance) with decoding, in batches of ``batch_size``."""
    from ..ddim import ddim_sample
    from .common import encode_prompts, pipe_alphas_cumprod, pipe_eps_model, pipe_timesteps
    from .inversion import decode_latents
    t0 = time.perf_counter()
    null = encode_prompts(pipe, "")
    for a in range(0, len(specs), batch_size):
        c = encode_prompts(pipe, [s["prompt"] for s in specs[a:a + batch_size]])
        with torch.no_grad():
            z = ddim_sample(pipe_eps_model(pipe, c, null, guidance), xT[a:a + batch_size],
                            pipe_timesteps(pipe, steps), pipe_alphas_cumprod(pipe))
        decode_latents(pipe, z)
    return (time.perf_counter() - t0) / len(specs)


def initial_latents(pipe, n: int, seed: int) -> torch.Tensor:
    """One initial latent per prompt, prompt k from ``torch.Generator().manual_seed(seed + k)``
    (so a prompt's latent does not depend on the batch it runs in)."""
    u = pipe.unet.config
    out = [torch.randn((1, u.in_channels, u.sample_size, u.sample_size),
                       generator=torch.Generator().manual_seed(seed + k)) for k in range(n)]
    return torch.cat(out).to(pipe.unet.dtype)


def subject_words(spec) -> list[str]:
    return [o["shape"] for o in spec["objects"]]


def run_method(pipe, name, specs, xT, batch_size=10, steps=20, guidance=7.5):
    """Images (n, H, W, 3) of method ``name`` and, for A&E, the per-prompt traces."""
    from .binding import attend_and_excite, structure_diffusion
    kind, kw = METHODS[name]
    images, traces = [], []
    if kind in ("ae", "structure"):
        for a in range(0, len(specs), batch_size):
            sp, z = specs[a:a + batch_size], xT[a:a + batch_size]
            prompts = [s["prompt"] for s in sp]
            if kind == "ae":
                kw2 = dict(max_iter_to_alter=AE_ITER)
                kw2.update(kw)
                im, tr = attend_and_excite(pipe, prompts, [subject_words(s) for s in sp],
                                           num_inference_steps=steps, guidance_scale=guidance,
                                           latents=z, output_type="np", **kw2)
                traces.append(tr)
            else:
                im, _ = structure_diffusion(pipe, prompts, num_inference_steps=steps,
                                            guidance_scale=guidance, latents=z,
                                            output_type="np")
            images.append(im)
        return np.concatenate(images), traces
    from .layout import box_masks, canvas_split_boxes, dense_diffusion, lmd, make_layout
    boxes = canvas_split_boxes(2)
    for s, z in zip(specs, xT):
        from ..data.shapes import caption_objects
        phrases = [caption_objects([o], False, False)[0] for o in s["objects"]]
        layout = make_layout(list(zip(phrases, boxes)))
        if kind == "dense":
            masks = box_masks(layout, (64, 64))
            segs = [(p, masks[k].bool().numpy()) for k, p in enumerate(phrases)]
            im = dense_diffusion(pipe, s["prompt"], segs, num_inference_steps=steps,
                                 guidance_scale=guidance, latents=z[None], output_type="np")
        else:
            im = lmd(pipe, layout, num_inference_steps=steps, guidance_scale=guidance,
                     latents=z[None], output_type="np")
        images.append(np.asarray(im))
    return np.concatenate(images), traces


def judge(images, specs, clf=None):
    from ..models import eval_shapes as ev
    clf = clf or ev.shape_judge()
    out = []
    for im, s in zip(images, specs):
        found = ev.judge_scene(im, clf)
        out.append(dict(outcome=ev.binding_outcome(found, s["objects"]), n_found=len(found),
                        found=[(o["shape"], o["color"]) for o in found]))
    return out


def rates(judged) -> dict:
    from ..models.eval_shapes import OUTCOMES
    n = len(judged)
    r = {k: sum(j["outcome"] == k for j in judged) / n for k in OUTCOMES}
    r["failure"] = 1 - r["correct"]
    r["neglect_or_binding"] = r["neglect"] + r["binding"]
    return r


def _auc(score, label) -> float | None:
    """Area under the ROC curve of ``score`` for the positives ``label`` (ties count half)."""
    score, label = np.asarray(score, float), np.asarray(label, bool)
    pos, neg = score[label], score[~label]
    if not len(pos) or not len(neg):
        return None
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def ae_diagnostics(traces, judged_plain=None, pipe=None, specs=None) -> dict:
    """Summaries of A&E traces: refinement iterations, loss per step, ‖∇L‖ and ‖α∇L‖/‖z‖ at the
    first step, attention mass per token class, and (for plain sampling) the AUC of the loss
    for neglect."""
    loss = torch.cat([torch.stack(t["loss"], 1) for t in traces])         # (n, steps)
    gn = torch.cat([torch.stack(t["grad_norm"], 1) for t in traces])
    zn = torch.cat([torch.stack(t["latent_norm"], 1) for t in traces])
    alpha = np.asarray(traces[0]["step_size"])[traces[0]["steps"]]
    refined = {}
    for t in traces:
        for k, v in t["refined"].items():
            refined.setdefault(str(k), []).append(v)
    n = loss.shape[0]
    d = dict(loss_mean=loss.mean(0).tolist(), loss_step0=loss[:, 0].tolist(),
             grad_norm_step0=float(gn[:, 0].mean()),
             relative_update_step0=float((alpha[0] * gn[:, 0] / zn[:, 0]).mean()),
             refined_mean={k: float(np.sum(v)) / n for k, v in refined.items()},
             refined_prompts={k: len(v) / n for k, v in refined.items()})
    if pipe is not None and specs is not None:
        from ..attention import tokenize_prompt
        mass = torch.cat([t["mass"] for t in traces])                    # (n, M)
        cls = dict(start=[], subject=[], other_words=[], end=[], padding=[])
        for b, s in enumerate(specs):
            L = tokenize_prompt(s["prompt"], pipe.tokenizer)["length"]
            from ..attention import word_token_indices
            subj = sum((word_token_indices(s["prompt"], w, pipe.tokenizer)
                        for w in subject_words(s)), [])
            m = mass[b]
            cls["start"].append(float(m[0]))
            cls["subject"].append(float(m[subj].sum()))
            cls["other_words"].append(float(m[1:L - 1].sum() - m[subj].sum()))
            cls["end"].append(float(m[L - 1]))
            cls["padding"].append(float(m[L:].sum()))
        d["mass_step0"] = {k: float(np.mean(v)) for k, v in cls.items()}
    if judged_plain is not None:
        neg = [j["outcome"] == "neglect" for j in judged_plain]
        fail = [j["outcome"] != "correct" for j in judged_plain]
        d["loss_auc_neglect"] = {str(i): _auc(loss[:, i].numpy(), neg)
                                 for i in range(min(loss.shape[1], 5))}
        d["loss_auc_failure"] = {str(i): _auc(loss[:, i].numpy(), fail)
                                 for i in range(min(loss.shape[1], 5))}
    return d


def evaluate(pipe, n=100, methods=None, seed=0, steps=20, guidance=7.5, batch_size=10,
             log=print) -> dict:
    from ..models import eval_shapes as ev
    specs = ev.two_object_prompts(n, seed)
    xT = initial_latents(pipe, n, seed)
    clf = ev.shape_judge()
    out = {}
    for name in methods or METHODS:
        t0 = time.perf_counter()
        try:
            images, traces = run_method(pipe, name, specs, xT, batch_size, steps, guidance)
        except Exception as e:          # a method of another module failing: keep the rest
            log(f"{name}: skipped ({type(e).__name__}: {e})")
            continue
        sec = (time.perf_counter() - t0) / n
        judged = judge(images, specs, clf)
        res = dict(rates=rates(judged), seconds_per_image=sec, n=n,
                   outcomes=[j["outcome"] for j in judged])
        if name == "plain":     # its run carried A&E's loss passes: time true plain sampling
            k = min(n, 20)
            res["seconds_per_image_with_loss_passes"] = sec
            res["seconds_per_image"] = plain_seconds(pipe, specs[:k], xT[:k], batch_size, steps,
                                                     guidance)
            res["seconds_per_image_batch1"] = plain_seconds(pipe, specs[:k], xT[:k], 1, steps,
                                                            guidance)
        if traces:
            res["diagnostics"] = ae_diagnostics(traces, judged if name == "plain" else None,
                                                pipe, specs)
        out[name] = res
        log(f"{name}: {json.dumps(res['rates'], default=float)} {sec:.2f} s/image")
    return out


def _time_ratios(methods):
    if "plain" not in methods:
        return
    p = methods["plain"]
    for name, r in methods.items():
        base = p.get("seconds_per_image_batch1", p["seconds_per_image"]) if name in BATCH1 \
            else p["seconds_per_image"]
        r["time_ratio"] = r["seconds_per_image"] / base


def timing(pipe, names, k=3, repeats=2, seed=0, steps=20, guidance=7.5) -> dict:
    """Seconds per image of each method and of plain sampling, all one prompt at a time on the
    first ``k`` prompts, interleaved (method by method inside each repeat, the median over
    repeats), so that the ratios compare like with like on a shared machine."""
    import statistics

    from ..models import eval_shapes as ev
    specs = ev.two_object_prompts(k, seed)
    xT = initial_latents(pipe, k, seed)
    acc = {n: [] for n in ["plain", *names]}
    for _ in range(repeats):
        for n in acc:
            t0 = time.perf_counter()
            if n == "plain":
                plain_seconds(pipe, specs, xT, 1, steps, guidance)
            else:
                run_method(pipe, n, specs, xT, 1, steps, guidance)
            acc[n].append((time.perf_counter() - t0) / k)
    sec = {n: statistics.median(v) for n, v in acc.items()}
    return dict(seconds_per_image=sec, ratio={n: v / sec["plain"] for n, v in sec.items()},
                k=k, repeats=repeats, batch=1)


def combine(paths, out=None) -> dict:
    """Merge the JSON records of several runs (``--methods`` subsets run side by side) into one:
    the methods of each, the first run's where two have the same method, the time ratios
    against the first run's plain sampling, and every run's record under ``record["parts"]``."""
    parts = [load_results(p) for p in paths]
    methods = {}
    for part in parts:
        for k, v in part["methods"].items():
            methods.setdefault(k, v)
    _time_ratios(methods)
    rec = dict(parts[0]["record"])
    rec["command"] = "; ".join(p["record"]["command"] for p in parts)
    rec["wall_seconds"] = max(p["record"]["wall_seconds"] for p in parts)
    rec["parts"] = [p["record"] for p in parts]
    res = dict(record=rec, methods=methods,
               scene_judge_accuracy=parts[0]["scene_judge_accuracy"])
    for p in parts:
        if "timing" in p:
            res["timing"] = p["timing"]
    with open(out or RESULTS_PATH, "w") as f:
        json.dump(res, f, indent=1, default=float)
    return res


def load_results(path=None) -> dict:
    with open(path or RESULTS_PATH) as f:
        return json.load(f)


def main(argv=None):
    import argparse
    import datetime
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--out", default=str(RESULTS_PATH))
    ap.add_argument("--merge", action="store_true", help="keep methods already in --out")
    ap.add_argument("--combine", nargs="*", default=None,
                    help="only merge these result files (runs side by side) into --out")
    ap.add_argument("--timing", action="store_true",
                    help="only time the methods one prompt at a time, interleaved, into --out")
    args = ap.parse_args(argv)
    if args.combine:
        combine(args.combine, args.out)
        return
    if args.timing:
        torch.set_num_threads(args.threads)
        from ..models.load import load_pipeline
        t0 = time.perf_counter()
        tm = timing(load_pipeline("shapes"), args.methods or [m for m in METHODS if m != "plain"])
        tm["record"] = dict(command="python -m diffnotes.editing.eval_binding --timing",
                            date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                                timespec="seconds"),
                            wall_seconds=time.perf_counter() - t0, threads=args.threads)
        with open(args.out, "w") as f:
            json.dump(dict(record=tm["record"], methods={}, timing=tm,
                           scene_judge_accuracy=None), f, indent=1, default=float)
        print(json.dumps(tm["ratio"], default=float))
        return
    torch.set_num_threads(args.threads)
    from ..models import eval_shapes as ev
    from ..models.load import load_pipeline
    pipe = load_pipeline("shapes")
    t0 = time.perf_counter()
    prev = {}
    if args.merge and Path(args.out).exists():
        prev = load_results(args.out)
    methods = {**prev.get("methods", {})}

    def save(extra):
        rec = dict(command="python -m diffnotes.editing.eval_binding " + " ".join(
            argv if argv is not None else sys.argv[1:]),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            wall_seconds=time.perf_counter() - t0 + prev.get("record", {}).get("wall_seconds", 0),
            threads=args.threads, torch=torch.__version__, n=args.n, ae_iter=AE_ITER,
            settings=SETTINGS, method_settings={k: [v[0], v[1]] for k, v in METHODS.items()})
        res = dict(record=rec, methods=methods, **extra)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=float)

    judges = prev.get("scene_judge_accuracy") or ev.scene_judge_accuracy()
    print("scene judges on generator scenes:", judges, flush=True)
    for name in args.methods or METHODS:
        methods.update(evaluate(pipe, args.n, [name], SETTINGS["seed"],
                                SETTINGS["num_inference_steps"], SETTINGS["guidance_scale"],
                                log=lambda s: print(s, flush=True)))
        _time_ratios(methods)
        save(dict(scene_judge_accuracy=judges))
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":  # pragma: no cover
    main()
