"""ReVersion: a *relation* learned as a word ⟨R⟩ from exemplar images (Ahmad's notes, §4.4.4,
eqs 4.8–4.13; Huang et al. 2023, "ReVersion: Diffusion-Based Relation Inversion from Images",
eqs 1–5).

Only the embedding row of ⟨R⟩ is trained, on exemplar captions such as ``"a red circle <R> a
blue square"``, with

- the denoising loss with **relation-focal importance sampling** of t (eqs 4.11–4.12):
  t is drawn with probability ∝ f(t) = (1 − α cos(πt/T))/T, which favours large t (early
  denoising steps, where layout is decided); α = 0.5 (official ``scaled_cosine_alpha``);
  Σ_t f(t) = 1 − α/T, so the probabilities are f / (1 − α/T) (:func:`importance_weights`);
- the **relation-steering contrastive loss** (eq 4.10 with the corrected denominator, an
  InfoNCE loss): with cosine-normalised embeddings and temperature γ = 0.07,

      L_steer = −log( Σ_l exp(R·P^l/γ) / (Σ_l exp(R·P^l/γ) + Σ_k exp(R·N^k/γ)) )
              = logsumexp(all) − logsumexp(positives)

  where P^l are L prepositions drawn from a basis set and N^k the caption's other words (stop
  words, special tokens and ⟨R⟩ removed). The notes print a single P_i in the denominator
  (erratum);
- L = λ_steer L_steer + λ_denoise L_denoise (eq 4.13), official weights 0.01 and 1.

On the shapes model the relation is "⟨R⟩ = on the left of": the exemplars are two-object scenes
with the first object on the left, and the positives are the shapes tokenizer's own
prepositions (:data:`SHAPES_PREPOSITIONS`). ``python -m diffnotes.personalization.reversion
evaluate`` measures it by the judged positions of the two objects on ≥ 40 new object pairs, and
writes ``results/reversion.json``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import check_int, check_positive, check_range
from .common import add_placeholder, diffusion_loss, encode_images, encode_text, freeze, \
    train_loop

__all__ = ["importance_weights", "sample_timesteps", "steering_loss", "pre_loss",
           "relation_negatives", "reversion", "Relation", "relation_exemplars",
           "relation_prompts", "evaluate_relation", "OFFICIAL", "STOP_WORDS",
           "SHAPES_PREPOSITIONS", "RESULT_PATH"]

#: official ziqihuangg/ReVersion train.py defaults
OFFICIAL = dict(temperature=0.07, num_positives=4, steer_weight=0.01, denoise_weight=1.0,
                alpha=0.5, steps=3000, lr=2.5e-4)
#: the stop words removed from the negatives (an NLTK-style list, as the official code's)
STOP_WORDS = ("a", "an", "the", "is", "are", "on", "of", "in", "at", "by", "to", "and", "with",
              "above", "below", "under", "over", "from", "into", "onto", "for", "as")
#: the prepositions of the shapes tokenizer (positives; ``pipe.tokenizer.get_vocab()``)
SHAPES_PREPOSITIONS = ("on", "in", "of", "with", "at")
RESULT_PATH = __import__("pathlib").Path(__file__).resolve().parent / "results" / "reversion.json"


def importance_weights(T: int = 1000, alpha: float = 0.5, normalize: bool = False
                       ) -> torch.Tensor:
    """f(t) = (1 − α cos(πt/T)) / T for t = 0 … T−1 (Ahmad's notes, eq 4.11; ReVersion eq 4),
    float64. Σ f = 1 − α/T (because Σ_t cos(πt/T) = 1): 0.9995 for T = 1000, α = 0.5; f(0) =
    0.0005, f(500) = 0.001, f(999)/f(0) ≈ 3. ``normalize`` divides by the sum (probabilities).
    α = 0 is uniform. Raises ``ValueError`` naming ``T`` or ``alpha`` (α ∈ [0, 1])."""
    T = check_int(T, "T", min=1)
    alpha = check_range(alpha, "alpha", 0, 1)
    t = torch.arange(T, dtype=torch.float64)
    f = (1 - alpha * torch.cos(math.pi * t / T)) / T
    return f / f.sum() if normalize else f


def sample_timesteps(n: int, T: int = 1000, alpha: float = 0.5,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` timesteps drawn with probabilities ∝ f(t) (eq 4.11; the official
    ``torch.multinomial(weights, n, replacement=True)``); (n,) long."""
    n = check_int(n, "n", min=1)
    return torch.multinomial(importance_weights(T, alpha), n, replacement=True,
                             generator=generator)


def steering_loss(R: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                  temperature: float = 0.07) -> torch.Tensor:
    """L_steer (Ahmad's notes, eq 4.10 corrected; ReVersion eq 3): ``R`` (D,), ``positives``
    (L, D), ``negatives`` (K, D); all cosine-normalised, logits = cos/γ;
    ``logsumexp(pos ∪ neg) − logsumexp(pos)``. One positive equal to R and K orthogonal
    negatives give −log(e^{1/γ}/(e^{1/γ} + K)). Raises ``ValueError`` naming the argument on
    wrong shapes or ``temperature`` ≤ 0."""
    temperature = check_positive(temperature, "temperature")
    if R.ndim != 1:
        raise ValueError(f"R must be one embedding (D,), got shape {tuple(R.shape)}")
    for name, x in (("positives", positives), ("negatives", negatives)):
        if x.ndim != 2 or x.shape[-1] != R.shape[0] or (name == "positives" and len(x) == 0):
            raise ValueError(f"{name} must be (n, {R.shape[0]}) with n >= 1 for positives, got "
                             f"shape {tuple(x.shape)}")
    r = F.normalize(R, dim=-1)
    lp = F.normalize(positives, dim=-1) @ r / temperature
    ln = F.normalize(negatives, dim=-1) @ r / temperature
    return torch.logsumexp(torch.cat([lp, ln]), 0) - torch.logsumexp(lp, 0)


def pre_loss(R: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             temperature: float = 0.07) -> torch.Tensor:
    """L_pre (Ahmad's notes, eq 4.9): the single-positive InfoNCE, = :func:`steering_loss` with
    one positive."""
    return steering_loss(R, positive.reshape(1, -1), negatives, temperature)


def relation_negatives(caption: str, placeholder: str, stop_words=STOP_WORDS) -> list[str]:
    """The caption's words that are negatives: every word but the stop words and the
    placeholder (special tokens are not words here). "A cat is sitting on a chair." → cat,
    sitting, chair, ".": the official stop mask keeps punctuation, which counts as a word of its
    own (a tokenizer splits it off)."""
    words = []
    for w in caption.replace(".", " . ").split():
        if w.lower() in stop_words or w == placeholder:
            continue
        words.append(w.lower())
    return words


@dataclass
class Relation:
    """A learned relation word: ``placeholder``, its ``token_id`` and ``embedding`` (D,), the
    per-step ``denoise`` and ``steer`` losses, the seconds."""
    placeholder: str
    token_id: int
    embedding: torch.Tensor
    losses: list
    denoise: list
    steer: list
    seconds: float
    extra: dict = field(default_factory=dict)


def reversion(pipe, exemplars, relation_placeholder: str = "<R>", initializer: str | None = None,
              *, prepositions: Sequence[str] = SHAPES_PREPOSITIONS, num_positives: int = 4,
              temperature: float = OFFICIAL["temperature"],
              steer_weight: float = OFFICIAL["steer_weight"],
              denoise_weight: float = OFFICIAL["denoise_weight"], alpha: float = OFFICIAL["alpha"],
              steps: int = 100, lr: float = 2e-2, batch_size: int = 4, seed: int = 0,
              progress: bool = True) -> Relation:
    """Learn the relation word ``relation_placeholder`` from ``exemplars`` (Ahmad's notes, eqs
    4.8–4.13; ReVersion eq 5): a pair ``(images (n, H, W, 3) in [0, 1], captions)`` whose
    captions contain the placeholder. Only its embedding row changes (the others are restored
    after each step; UNet and text encoder frozen). Each step: ``batch_size`` exemplars, t from
    :func:`sample_timesteps` (α = ``alpha``), L = ``denoise_weight`` L_denoise +
    ``steer_weight`` L_steer with ``num_positives`` prepositions drawn from ``prepositions`` and
    the caption's other words as negatives (:func:`relation_negatives`). Official: 3000 steps,
    lr 2.5e-4 on SD. Raises ``ValueError`` naming ``exemplars``, ``prepositions`` (words the
    tokenizer does not know), ``relation_placeholder`` or a hyper-parameter."""
    try:
        images, captions = exemplars
    except (TypeError, ValueError):
        raise ValueError("exemplars must be a pair (images (n, H, W, 3), captions)") from None
    images = np.asarray(images, dtype=np.float32)
    captions = list(captions)
    if images.ndim != 4 or len(images) == 0 or len(captions) != len(images):
        raise ValueError(f"exemplars must hold n >= 1 images (n, H, W, 3) and n captions, got "
                         f"{images.shape} and {len(captions)} captions")
    if any(relation_placeholder not in c.split() for c in captions):
        raise ValueError(f"exemplars: every caption must contain {relation_placeholder!r}")
    steps = check_int(steps, "steps", min=1)
    lr = check_positive(lr, "lr")
    num_positives = check_int(num_positives, "num_positives", min=1)
    check_range(steer_weight, "steer_weight", 0)
    check_range(denoise_weight, "denoise_weight", 0)
    tok, enc, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    vocab = tok.get_vocab()
    unknown = [p for p in prepositions if p not in vocab]
    if unknown or not prepositions:
        raise ValueError(f"prepositions must be words of the tokenizer, got unknown {unknown}")
    rid = add_placeholder(pipe, relation_placeholder, initializer)[0]
    freeze(unet, enc)
    table = enc.get_input_embeddings().weight
    frozen = table.detach().clone()
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[rid] = False
    pos_ids = torch.tensor([vocab[p] for p in prepositions])
    neg_ids = []
    for c in captions:
        ws = [w for w in relation_negatives(c, relation_placeholder) if w in vocab]
        neg_ids.append(torch.tensor([vocab[w] for w in ws], dtype=torch.long))
    with torch.no_grad():
        z0 = encode_images(pipe, images)
    ac = pipe.scheduler.alphas_cumprod
    T = len(ac)
    g = torch.Generator().manual_seed(int(seed))
    d_log, s_log = [], []

    def loss_fn(step):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=g)
        cond = encode_text(pipe, [captions[i] for i in idx.tolist()], grad=True)
        t = sample_timesteps(len(idx), T, alpha, g)                             # eq 4.11
        den = diffusion_loss(unet, z0[idx], cond, ac, generator=g, t=t)         # eq 4.12
        k = min(num_positives, len(pos_ids))
        pos = table[pos_ids[torch.randperm(len(pos_ids), generator=g)[:k]]].detach()
        steer = torch.stack([steering_loss(table[rid], pos, table[neg_ids[i]].detach(),
                                           temperature) for i in idx.tolist()]).mean()
        d_log.append(float(den.detach()))
        s_log.append(float(steer.detach()))
        return denoise_weight * den + steer_weight * steer                       # eq 4.13

    def restore(step):
        with torch.no_grad():
            table[keep] = frozen[keep]

    table.requires_grad_(True)
    t0 = time.perf_counter()
    try:
        r = train_loop([table], loss_fn, steps, lr, after_step=restore, desc="ReVersion",
                       progress=progress)
    finally:
        table.requires_grad_(False)
    return Relation(relation_placeholder, rid, table[rid].detach().clone(), r.losses, d_log,
                    s_log, time.perf_counter() - t0,
                    extra=dict(steps=steps, lr=lr, alpha=alpha, steer_weight=steer_weight,
                               prepositions=list(prepositions)))


# ---------------------------------------------------------------------------- shapes experiment
def _pairs(seed: int, n: int, exclude=()):
    from ..data import shapes as S

    rng = np.random.default_rng(seed)
    out, seen = [], set(exclude)
    shapes, colors = list(S.TRAIN_SHAPES), list(S.TRAIN_COLORS)
    while len(out) < n:
        s1, s2 = rng.choice(len(shapes), 2, replace=False)
        c1, c2 = rng.choice(len(colors), 2, replace=False)
        key = (shapes[s1], colors[c1], shapes[s2], colors[c2])
        if key in seen:
            continue
        seen.add(key)
        out.append(key)
    return out


def relation_exemplars(n: int = 8, placeholder: str = "<R>", seed: int = 0):
    """``n`` two-object scenes "a {c1} {s1} <R> a {c2} {s2}", rendered with the first object on
    the left and the second on the right (``render_objects``, large objects, random heights).
    Returns ``(images (n, 64, 64, 3), captions, pairs)``."""
    from ..data.shapes import render_objects

    n = check_int(n, "n", min=1)
    rng = np.random.default_rng(seed + 1)
    ims, caps = [], []
    pairs = _pairs(seed, n)
    for s1, c1, s2, c2 in pairs:
        im, _ = render_objects([dict(shape=s1, color=c1, position="left",
                                     cy=float(rng.uniform(22, 42))),
                                dict(shape=s2, color=c2, position="right",
                                     cy=float(rng.uniform(22, 42)))],
                               seed=int(rng.integers(2**31)))
        ims.append(im)
        caps.append(f"a {c1} {s1} {placeholder} a {c2} {s2}")
    return np.stack(ims).astype(np.float32), caps, pairs


#: the prompt forms compared: the learned word, no relation word, plain words, the model's own
FORMS = {"learned <R>": "a {c1} {s1} <R> a {c2} {s2}",
         "no relation word": "a {c1} {s1} a {c2} {s2}",
         "and": "a {c1} {s1} and a {c2} {s2}",
         "plain words 'on the left of'": "a {c1} {s1} on the left of a {c2} {s2}",
         "training captions (upper bound)": "a {c1} {s1} on the left and a {c2} {s2} on the right"}


def relation_prompts(n: int = 40, seed: int = 100, exclude=()):
    """``n`` new object pairs ``(s1, c1, s2, c2)`` (distinct shapes and colours; none of
    ``exclude``)."""
    return _pairs(seed, n, exclude)


def evaluate_relation(pipe, pairs, form: str, placeholder: str = "<R>", seed: int = 0,
                      num_inference_steps: int = 20, guidance_scale: float = 4.0,
                      batch_size: int = 20, keep_images: bool = False) -> dict:
    """Sample ``FORMS[form]`` for each pair and judge the two objects' positions
    (``diffnotes.models.eval_shapes.judge_scene``): an object matches a requested one if its
    shape and colour agree (else its colour alone). ``left_of``: fraction of samples where both
    are found and the first's box centre is left of the second's; ``found``: both found;
    ``left_of_found``: ``left_of`` / ``found``."""
    from ..models import eval_shapes as E

    clf = E.shape_judge()
    tmpl = FORMS[form].replace("<R>", placeholder)
    prompts = [tmpl.format(s1=s1, c1=c1, s2=s2, c2=c2) for s1, c1, s2, c2 in pairs]
    g = torch.Generator().manual_seed(int(seed))
    ims = np.concatenate([pipe(prompts[i:i + batch_size], num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, generator=g,
                               output_type="np").images
                          for i in range(0, len(prompts), batch_size)])
    left, found = [], []
    for im, (s1, c1, s2, c2) in zip(ims, pairs):
        objs = E.judge_scene(im, clf)

        def find(s, c):
            for o in objs:
                if o["shape"] == s and o["color"] == c:
                    return o
            for o in objs:
                if o["color"] == c:
                    return o
            return None
        a, b = find(s1, c1), find(s2, c2)
        ok = a is not None and b is not None and a is not b
        found.append(ok)
        left.append(ok and (a["box"][0] + a["box"][2]) < (b["box"][0] + b["box"][2]))
    out = dict(form=form, prompt=tmpl, left_of=float(np.mean(left)), found=float(np.mean(found)),
               left_of_found=float(np.sum(left) / max(1, np.sum(found))), n=len(pairs))
    if keep_images:
        out["images"] = ims
    return out


SHAPES_SETTINGS = dict(n_exemplars=8, steps=100, lr=2e-2, batch_size=4, alpha=0.5,
                       steer_weight=0.01, n_eval=40)


def run_evaluation(write: bool = True, progress: bool = True) -> dict:
    from .evaluate import protocol_pipeline

    """Train ⟨R⟩ on the shapes model (:data:`SHAPES_SETTINGS`) and judge every prompt form of
    :data:`FORMS` on 40 new pairs (and the ablation without the steering loss and with uniform
    t); write ``results/reversion.json``."""

    t0 = time.perf_counter()
    cfg = SHAPES_SETTINGS
    ims, caps, ex_pairs = relation_exemplars(cfg["n_exemplars"])
    pairs = relation_prompts(cfg["n_eval"], exclude=ex_pairs)
    res = dict(method="reversion", command="python -m diffnotes.personalization.reversion "
               "evaluate", settings=cfg, threads=torch.get_num_threads(), rows={})
    variants = {"ReVersion (steer + importance sampling)": dict(),
                "denoising only, uniform t": dict(steer_weight=0.0, alpha=0.0)}
    base = protocol_pipeline()
    for form in FORMS:
        if form != "learned <R>":
            res["rows"][form] = evaluate_relation(base, pairs, form)
    for vname, over in variants.items():
        pipe = protocol_pipeline()
        kw = dict(steps=cfg["steps"], lr=cfg["lr"], batch_size=cfg["batch_size"],
                  alpha=cfg["alpha"], steer_weight=cfg["steer_weight"])
        kw.update(over)
        rel = reversion(pipe, (ims, caps), "<R>", progress=progress, **kw)
        row = evaluate_relation(pipe, pairs, "learned <R>")
        row.update(train_seconds=rel.seconds, final_denoise=float(np.mean(rel.denoise[-20:])),
                   final_steer=float(np.mean(rel.steer[-20:])), **over)
        res["rows"][f"learned <R>: {vname}"] = row
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if write:
        RESULT_PATH.parent.mkdir(exist_ok=True)
        RESULT_PATH.write_text(json.dumps(res, indent=1) + "\n")
    return res


def main(argv=None):  # pragma: no cover - a command
    import argparse
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description="ReVersion on the shapes model")
    ap.add_argument("command", choices=["evaluate"])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = run_evaluation()
    for k, v in r["rows"].items():
        print(f"{k:55s} left_of={v['left_of']:.3f} found={v['found']:.3f}")


if __name__ == "__main__":  # pragma: no cover
    main()
