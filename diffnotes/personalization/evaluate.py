"""The one measurement protocol of Part IV: fidelity, editability, prior preservation and cost of
a personalization method, judged on the shapes generator's held-out concepts.

Three concepts (:data:`CONCEPTS`), each learned from :data:`N_IMAGES` images of
:func:`~diffnotes.personalization.common.concept_images`:

- ``heart``: a shape the model never saw, captioned ``"a <heart>"``;
- ``purple``: a colour it never saw, captioned ``"a <purple> circle"``;
- ``instance``: one specific object (a large orange star on stripes), captioned ``"a sks star"``.

Rows, each on ``n`` ≥ 40 prompts, sampled with the same seeds for every method (paired noise):

- **fidelity**: the placeholder alone (``"a <heart>"``; ``"a <purple> {shape}"`` over the five
  training shapes; ``"a sks star"``) — is the concept there? (shape judge = heart; colour judge
  = purple; shape, colour and size of the instance);
- **editability**: the concept in new contexts (``"a small blue <heart> on the right"``; for
  purple a size, shape and position; for the instance a position) — the concept *and* every
  requested attribute;
- **prior** (language drift): the untuned model's own single-object prompts of the training
  concepts (``diffnotes.models.eval_shapes.single_object_prompts``) — colour, shape and position
  accuracy, and the same on the prompts that use the concept's class word (``star`` for the
  heart, ``blue`` for purple, ``star`` for the instance);
- **cost**: trained parameters, bytes of what must be saved, training seconds.

A method module takes part by defining ``EVAL_CONFIGS = {name: fn}`` with
``fn(concept: ConceptSet, progress: bool) -> Tuned``: it trains on the concept's images and
returns a :class:`Tuned` whose ``sample(prompts, seed)`` generates with the tuned model (usually
:func:`pipeline_sampler` of the tuned pipeline) and whose ``placeholder`` is the word prompts
use. ``python -m diffnotes.personalization.evaluate --methods textual_inversion dreambooth ...``
runs the protocol and writes ``diffnotes/personalization/results/<name>.json``; ``baseline`` is
the untuned model prompted with the concept's own word (``"a heart"``: a word it never trained
on).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import shapes as S
from ..utils import check_int
from .common import ConceptSet, concept_images

__all__ = ["CONCEPTS", "N_IMAGES", "PROTOCOL", "Tuned", "pipeline_sampler", "judge_images",
           "concept_prompts", "evaluate_tuned", "run_method", "baseline_config", "load_result",
           "METHOD_MODULES", "RESULTS_DIR", "summary_table", "protocol_pipeline", "new_placeholder"]

CONCEPTS = {"heart": "heart", "purple": "purple",
            "instance": dict(shape="star", color="orange", size="large", background="stripes")}
N_IMAGES = 5
#: sampling settings of every row (the shapes model's defaults).
PROTOCOL = dict(n=40, num_inference_steps=20, guidance_scale=4.0, seed=1234, image_seed=7)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: modules searched for ``EVAL_CONFIGS``.
METHOD_MODULES = ("textual_inversion", "dreambooth", "extended", "break_a_scene", "lora",
                  "custom_diffusion", "e4t")


@dataclass
class Tuned:
    """A tuned model as the protocol sees it: ``sample(prompts, seed) -> (B, 64, 64, 3)`` images
    in [0, 1]; the ``placeholder`` its prompts use; the cost."""
    sample: Callable
    placeholder: str
    trained_parameters: int = 0
    file_bytes: int = 0
    train_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def protocol_pipeline():
    """A fresh shipped shapes pipeline with its progress bar off: what every method of the
    protocol trains on (each concept starts from the untuned weights)."""
    from ..models.load import load_pipeline

    pipe = load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def new_placeholder(concept: ConceptSet, pipe) -> str:
    """The concept's placeholder, bracketed (``"<sks>"``) when it is already a word of the
    pipeline's tokenizer (the instance's ``"sks"``), for methods that add a new token."""
    ph = concept.placeholder
    return f"<{ph.strip('<>')}>" if ph in pipe.tokenizer.get_vocab() else ph


def pipeline_sampler(pipe, num_inference_steps: int = PROTOCOL["num_inference_steps"],
                     guidance_scale: float = PROTOCOL["guidance_scale"], batch_size: int = 20,
                     progress: bool = False, **call_kwargs) -> Callable:
    """``sample(prompts, seed)``: ``pipe(prompts, ...)`` in batches, one ``torch.Generator``
    seeded with ``seed`` for the whole list (the same noise for every method), ``output_type="np"``.
    ``call_kwargs`` go to every pipeline call (e.g. ``cross_attention_kwargs``)."""
    from tqdm.auto import tqdm

    def sample(prompts, seed: int) -> np.ndarray:
        g = torch.Generator().manual_seed(int(seed))
        out = []
        for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress,
                      leave=False):
            out.append(pipe(list(prompts[i:i + batch_size]), num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, generator=g, output_type="np",
                            **call_kwargs).images)
        return np.concatenate(out).astype(np.float32)
    return sample


def judge_images(images) -> list[dict]:
    """The model-independent judges of ``diffnotes.models.eval_shapes`` on each single-object
    image: ``{shape, color, size, position, area}`` of its largest object (``"none"`` if empty).
    The colour palette includes purple and the shape judge knows hearts."""
    from ..models import eval_shapes as E

    clf = E.shape_judge()
    out = []
    for im in images:
        m = E.segment_object(im)
        if not m.any():
            out.append(dict(shape="none", color="none", size="none", position="none", area=0))
            continue
        out.append(dict(shape=E.judge_shape(m, clf), color=E.judge_color(im, m),
                        size=E.judge_size(m), position=E.judge_position(m), area=int(m.sum())))
    return out


def concept_prompts(concept: ConceptSet, row: str, placeholder: str, n: int = 40,
                    seed: int = 0) -> list[dict]:
    """The ``n`` prompt specs of a row (``"fidelity"``, ``"editability"``, ``"prior"``): dicts
    ``{prompt, expect: {attribute: value}}``; ``placeholder`` is substituted for the concept."""
    from ..models.eval_shapes import single_object_prompts

    n = check_int(n, "n", min=1)
    rng = np.random.default_rng(seed)
    kind, ph = concept.kind, placeholder
    colors, shapes = list(S.TRAIN_COLORS), list(S.TRAIN_SHAPES)
    pos, sizes = list(S.POSITIONS), list(S.SIZES)
    specs = []
    if row == "prior":
        for s in single_object_prompts(n, seed=seed):
            specs.append(dict(prompt=s["prompt"], expect=dict(shape=s["shape"], color=s["color"],
                                                               position=s["position"])))
        return specs
    if row not in ("fidelity", "editability"):
        raise ValueError(f"row must be 'fidelity', 'editability' or 'prior', got {row!r}")
    c = concept.concept
    for i in range(n):
        if kind == "shape":
            if row == "fidelity":
                specs.append(dict(prompt=f"a {ph}", expect=dict(shape=c)))
            else:
                col, sz, p = colors[i % len(colors)], sizes[(i // len(colors)) % 2], pos[i % 3]
                specs.append(dict(prompt=f"a {sz} {col} {ph} {S.POSITION_PHRASES[p]}",
                                  expect=dict(shape=c, color=col, size=sz, position=p)))
        elif kind == "color":
            shp = shapes[i % len(shapes)]
            if row == "fidelity":
                specs.append(dict(prompt=f"a {ph} {shp}", expect=dict(color=c, shape=shp)))
            else:
                sz, p = sizes[(i // len(shapes)) % 2], pos[int(rng.integers(3))]
                specs.append(dict(prompt=f"a {sz} {ph} {shp} {S.POSITION_PHRASES[p]}",
                                  expect=dict(color=c, shape=shp, size=sz, position=p)))
        else:
            inst = dict(shape=c["shape"], color=c["color"], size=c.get("size", "large"))
            if row == "fidelity":
                specs.append(dict(prompt=f"a {ph} {concept.class_word}", expect=inst))
            else:
                p = pos[i % 3]
                specs.append(dict(prompt=f"a {ph} {concept.class_word} {S.POSITION_PHRASES[p]}",
                                  expect=dict(inst, position=p)))
    return specs


def _score(specs, judged) -> dict:
    keys = sorted({k for s in specs for k in s["expect"]})
    res = {k: float(np.mean([j[k] == s["expect"][k] for s, j in zip(specs, judged)
                             if k in s["expect"]])) for k in keys}
    res["all"] = float(np.mean([all(j[k] == v for k, v in s["expect"].items())
                                for s, j in zip(specs, judged)]))
    res["present"] = float(np.mean([j["area"] > 0 for j in judged]))
    res["n"] = len(specs)
    return res


def evaluate_tuned(tuned: Tuned, concept: ConceptSet, n: int = PROTOCOL["n"],
                   seed: int = PROTOCOL["seed"], rows=("fidelity", "editability", "prior"),
                   keep_images: bool = False) -> dict:
    """Run the protocol's rows on a :class:`Tuned` model: ``{row: {attribute: fraction correct,
    all, present, n}}``, plus ``prior_class`` (the prior prompts that use the class word, when
    there are any) and ``cost``. Same prompts and seeds for every method."""
    out, images = {}, {}
    for row in rows:
        specs = concept_prompts(concept, row, tuned.placeholder, n=n, seed=seed)
        ims = tuned.sample([s["prompt"] for s in specs], seed)
        judged = judge_images(ims)
        out[row] = _score(specs, judged)
        if row == "prior":
            word = concept.class_word
            cls = [(s, j) for s, j in zip(specs, judged) if word in s["prompt"].split()]
            if cls:
                out["prior_class"] = _score([s for s, _ in cls], [j for _, j in cls])
                out["prior_class"]["word"] = word
        if keep_images:
            images[row] = ims
    out["cost"] = dict(trained_parameters=int(tuned.trained_parameters),
                       file_bytes=int(tuned.file_bytes), train_seconds=float(tuned.train_seconds))
    if keep_images:
        out["images"] = images
    return out


def baseline_config(concept: ConceptSet, progress: bool = False) -> Tuned:
    """The untuned shipped model, prompted with the concept's own word (``"a heart"``,
    ``"a purple circle"``): the floor every method is compared with. The instance is prompted
    with its full description (``"a large orange star"``), which the judges cannot tell from the
    instance (its striped background is not judged): there the baseline is an upper reference."""
    pipe = protocol_pipeline()
    if concept.kind == "instance":
        word = f"{concept.concept.get('size', 'large')} {concept.concept['color']}"
    else:
        word = concept.concept
    return Tuned(sample=pipeline_sampler(pipe, progress=progress), placeholder=word)


def _configs() -> dict:
    found = {"baseline": baseline_config}
    for mod in METHOD_MODULES:
        try:
            m = importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{mod}":
                continue
            raise
        found.update(getattr(m, "EVAL_CONFIGS", {}))
    return found


def run_method(name: str, concepts=tuple(CONCEPTS), n: int = PROTOCOL["n"], progress: bool = True,
               write: bool = True, command: str | None = None) -> dict:
    """Train method ``name`` (an ``EVAL_CONFIGS`` entry) on each concept's :data:`N_IMAGES`
    images and run :func:`evaluate_tuned`; write ``results/<name>.json`` when ``write``."""
    from tqdm.auto import tqdm

    configs = _configs()
    if name not in configs:
        raise ValueError(f"name must be one of {sorted(configs)}, got {name!r}")
    t0 = time.perf_counter()
    res = dict(method=name, command=command or f"python -m diffnotes.personalization.evaluate "
               f"--methods {name}", protocol=dict(PROTOCOL, n=n, n_images=N_IMAGES),
               threads=torch.get_num_threads(), concepts={})
    for cname in tqdm(list(concepts), desc=name, disable=not progress):
        torch.manual_seed(0)
        cs = concept_images(CONCEPTS[cname], n=N_IMAGES, seed=PROTOCOL["image_seed"])
        tuned = configs[name](cs, progress=progress)
        r = evaluate_tuned(tuned, cs, n=n)
        r["placeholder"] = tuned.placeholder
        r["extra"] = tuned.extra
        res["concepts"][cname] = r
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if write:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / f"{name}.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    return res


def load_result(name: str) -> dict:
    """The stored ``results/<name>.json`` of a method."""
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no stored result {path}; run python -m "
                                f"diffnotes.personalization.evaluate --methods {name}")
    return json.loads(path.read_text())


def summary_table(names, concepts=tuple(CONCEPTS)):
    """One row per (method, concept) of the stored results: fidelity, editability, prior
    preservation (all prompts and the class word's), trained parameters, file size (kB) and
    training seconds; a ``pandas.DataFrame``. The fractions are "all requested attributes right"."""
    import pandas as pd

    rows = []
    for name in names:
        res = load_result(name)
        for c in concepts:
            if c not in res["concepts"]:
                continue
            r = res["concepts"][c]
            rows.append(dict(method=name, concept=c, fidelity=r["fidelity"]["all"],
                             editability=r["editability"]["all"], prior=r["prior"]["all"],
                             prior_class=r.get("prior_class", {}).get("all", float("nan")),
                             parameters=r["cost"]["trained_parameters"],
                             kB=r["cost"]["file_bytes"] / 1e3,
                             train_s=r["cost"]["train_seconds"]))
    return pd.DataFrame(rows)


def main(argv=None):  # pragma: no cover - a command
    import argparse

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=list(CONCEPTS))
    ap.add_argument("--n", type=int, default=PROTOCOL["n"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = "python -m diffnotes.personalization.evaluate " + " ".join(sys.argv[1:] if argv is None
                                                                      else argv)
    for m in args.methods:
        r = run_method(m, concepts=args.concepts, n=args.n, command=cmd)
        for c, v in r["concepts"].items():
            print(m, c, {k: v[k].get("all") for k in ("fidelity", "editability", "prior")},
                  v["cost"])


if __name__ == "__main__":  # pragma: no cover
    main()
