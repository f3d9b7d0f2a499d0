"""Textual Inversion: a new word for a concept, learned from a few images (Ahmad's notes, §4.4.1;
Gal et al. 2023, "An image is worth one word").

The UNet, the VAE and the text encoder stay frozen; only the embedding rows of the new token(s)
are learned, by the denoising loss of Ahmad's notes, eq 1.8 with the placeholder in the prompt
(Gal et al., eq 2):

.. math::  v_* = \\arg\\min_v \\mathbb E_{z\\sim\\mathcal E(x), y, \\varepsilon, t}
           \\|\\varepsilon - \\varepsilon_\\theta(z_t, t, c_\\theta(y(v)))\\|^2 .

The gradient reaches the whole token-embedding table, and AdamW's weight decay shrinks every row
of it, so after each step the frozen rows are copied back from a snapshot (what diffusers'
``examples/textual_inversion`` does): the other rows stay bitwise equal.

The four variants of Ahmad's notes §4.4.1 (Gal et al. §4.3 and appendix) are options of one
function, not copies: ``num_vectors`` (multi-vector), ``progressive`` (vectors switched on at given
steps: :func:`active_vectors`), ``reg_weight`` (L2 pull towards a coarse descriptor word:
:func:`embedding_regularizer`) and ``per_image`` (a shared :math:`S_*` plus one :math:`S_i` per
image: the notes write :math:`S_i` for both, an erratum).

:func:`save_textual_inversion` writes ``{placeholder: (num_vectors, d)}`` as safetensors, the file
diffusers' ``pipe.load_textual_inversion`` reads (and :func:`load_textual_inversion` calls it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..utils import check_int, check_positive
from .common import (ConceptSet, INITIALIZERS, add_placeholder, diffusion_loss, encode_images,
                     encode_text, expand_placeholder, freeze, train_loop)

__all__ = ["SINGLE_TEMPLATES", "DUAL_TEMPLATES", "SHAPES_TEMPLATES", "SHAPES_DUAL_TEMPLATES",
           "default_templates", "active_vectors", "embedding_regularizer", "textual_inversion",
           "TextualInversionResult", "save_textual_inversion", "load_textual_inversion",
           "prepare_images", "EVAL_CONFIGS", "EVAL_SETTINGS"]

#: the single-subject templates of Gal et al.'s code, as Ahmad's notes §4.4.1 list them (the notes
#: print "}" where the placeholder goes; here it is ``{}``).
SINGLE_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}",
    "a photo of my {}", "a photo of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}",
)
#: the dual-subject templates (object ``{}`` with per-image token ``{}``: the per-image variant).
DUAL_TEMPLATES = (
    "a photo of a {} with {}", "a rendering of a {} with {}", "a cropped photo of the {} with {}",
    "the photo of a {} with {}", "a photo of a clean {} with {}", "a photo of a dirty {} with {}",
    "a dark photo of the {} with {}", "a photo of my {} with {}", "a photo of the cool {} with {}",
)
#: short templates in the shapes tokenizer's 41-word vocabulary (words like "rendering" or "cool"
#: would map to ``<|unk|>`` there).
SHAPES_TEMPLATES = ("a {}", "a photo of a {}", "a picture of a {}", "an image of a {}")
SHAPES_DUAL_TEMPLATES = ("a {} with {}", "a photo of a {} with {}", "a picture of a {} with {}")


def default_templates(pipe, dual: bool = False) -> tuple:
    """The paper's templates if the pipeline's tokenizer knows all their words, else the short
    :data:`SHAPES_TEMPLATES` (single) / :data:`SHAPES_DUAL_TEMPLATES` (dual)."""
    vocab = pipe.tokenizer.get_vocab()
    paper = DUAL_TEMPLATES if dual else SINGLE_TEMPLATES
    words = {w for t in paper for w in t.replace("{}", " ").split()}
    unk = getattr(pipe.tokenizer, "unk_token_id", None)
    known = all(w in vocab or (unk not in pipe.tokenizer.encode(w, add_special_tokens=False))
                for w in words)
    if known and len(vocab) > 100:      # a real BPE vocabulary, not the shapes word list
        return paper
    return SHAPES_DUAL_TEMPLATES if dual else SHAPES_TEMPLATES


def active_vectors(step: int, schedule: Sequence[int]) -> int:
    """Number of vectors in use at ``step`` for a progressive schedule (Ahmad's notes §4.4.1,
    approach 2; Gal et al. §4.3): one vector, plus one more from each step of ``schedule``
    onwards. ``active_vectors(s, (2000, 4000))`` is 1, 1, 2, 2, 3 for s = 0, 1999, 2000, 3999,
    4000. Raises ``ValueError`` naming ``step`` or ``schedule`` (negative, unsorted)."""
    step = check_int(step, "step", min=0)
    sched = [check_int(s, "schedule", min=1) for s in schedule]
    if sorted(sched) != sched:
        raise ValueError(f"schedule must be increasing steps, got {list(schedule)}")
    return 1 + sum(step >= s for s in sched)


def embedding_regularizer(d: torch.Tensor, e: torch.Tensor, weight: float) -> torch.Tensor:
    """λ Σ ‖d_k − e‖²: the pull of the learned vectors ``d`` (k, D) (or (D,)) towards the coarse
    descriptor's embedding ``e`` (D,) (Ahmad's notes §4.4.1, approach 3; Gal et al. §4.3).
    Zero at d = e, gradient 2λ(d − e). Raises ``ValueError`` naming ``weight`` if negative."""
    weight = check_positive(weight, "weight", allow_zero=True)
    if d.shape[-1] != e.shape[-1]:
        raise ValueError(f"e must have the embedding width {d.shape[-1]} of d, got "
                         f"{tuple(e.shape)}")
    return weight * ((d - e) ** 2).sum()


@dataclass
class TextualInversionResult:
    """What :func:`textual_inversion` learned.

    ``embeddings`` (num_vectors, D): the rows of ``tokens`` (``placeholder``, ``placeholder_1``, …);
    ``image_tokens`` / ``image_embeddings`` (n, D): the per-image :math:`S_i` (empty / ``None``
    unless ``per_image``); ``initial``: the rows before training; ``losses`` per step."""
    placeholder: str
    tokens: list
    token_ids: list
    embeddings: torch.Tensor
    initial: torch.Tensor
    losses: list
    seconds: float
    trained_parameters: int
    image_tokens: list = field(default_factory=list)
    image_embeddings: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)


def _image_size(pipe) -> int:
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(pipe.unet.config.sample_size) * f


def prepare_images(pipe, images, name: str = "images") -> torch.Tensor:
    """Latents (n, C, h, w) of ``images``: a :class:`ConceptSet`, an array (n, H, W, 3) or a tensor
    (n, 3, H, W) in [0, 1] of the pipeline's image size. Raises ``ValueError`` naming ``name`` for
    no images, a wrong rank, channel count or size, and ``TypeError`` for another type."""
    S = _image_size(pipe)
    if isinstance(images, ConceptSet):
        arr = images.images
    elif isinstance(images, np.ndarray):
        arr = images
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} must be a (n, 3, H, W) tensor, got shape "
                             f"{tuple(images.shape)}")
        arr = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    else:
        raise TypeError(f"{name} must be a ConceptSet, an (n, H, W, 3) array or an (n, 3, H, W) "
                        f"tensor, got {type(images).__name__}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name} must be (n, H, W, 3) images, got shape {tuple(arr.shape)}")
    if len(arr) == 0:
        raise ValueError(f"{name} must hold at least one image, got 0")
    if arr.shape[1:3] != (S, S):
        raise ValueError(f"{name} must be {S}×{S} (the pipeline's image size), got "
                         f"{arr.shape[1]}×{arr.shape[2]}")
    if not np.isfinite(arr).all() or arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
        raise ValueError(f"{name} must be finite and in [0, 1], got range "
                         f"[{float(arr.min()):.3g}, {float(arr.max()):.3g}]")
    return encode_images(pipe, np.ascontiguousarray(arr, dtype=np.float32))


def _captions(images, captions, placeholder: str, n: int, old_placeholder: str | None = None):
    if captions is None:
        return None
    if isinstance(captions, str):
        captions = [captions] * n
    captions = list(captions)
    if len(captions) != n or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"captions must be one string per image ({n}), got {captions!r}")
    if old_placeholder and old_placeholder != placeholder:
        captions = [" ".join(placeholder if w == old_placeholder else w for w in c.split())
                    for c in captions]
    bad = [c for c in captions if placeholder not in c.split()]
    if bad:
        raise ValueError(f"captions must contain the placeholder {placeholder!r} as a word, got "
                         f"{bad[:3]}")
    return captions


def _check_known(pipe, texts, name):
    unk = getattr(pipe.tokenizer, "unk_token_id", None)
    for t in texts:
        if unk is not None and unk in pipe.tokenizer.encode(t, add_special_tokens=False):
            raise ValueError(f"{name}: {t!r} has words the tokenizer does not know (they become "
                             f"{pipe.tokenizer.unk_token}); known words: "
                             f"{sorted(pipe.tokenizer.get_vocab())[:60]}")


def textual_inversion(pipe, images, placeholder: str = "<heart>", initializer: str | None = "star",
                      steps: int = 300, lr: float = 2e-2, num_vectors: int = 1, *,
                      captions=None, templates: Sequence[str] | None = None, batch_size: int = 4,
                      progressive: Sequence[int] | None = None, reg_weight: float = 0.0,
                      reg_word: str | None = None, per_image: bool = False,
                      weight_decay: float = 1e-2, max_grad_norm: float | None = None,
                      seed: int = 0, progress: bool = True) -> TextualInversionResult:
    """Learn the embedding of a new word ``placeholder`` from a few images (Ahmad's notes §4.4.1,
    the loss L(d) = E‖ε − ε_θ(z_t, d)‖²; Gal et al. 2023, eq 2). Modifies ``pipe`` in place: its
    tokenizer gains the new tokens and its text encoder their rows; nothing else changes (the
    frozen rows are restored after every AdamW step, bitwise).

    ``images``: a :class:`~diffnotes.personalization.common.ConceptSet` (its captions are used,
    its placeholder replaced by ``placeholder``), or an array (n, H, W, 3) / tensor (n, 3, H, W)
    in [0, 1] of the pipeline's image size with ``captions`` (one per image, containing the
    placeholder) or ``templates`` (``"a photo of a {}"``; default :func:`default_templates`).
    ``templates`` given with a ConceptSet replace its captions.

    Variants (Gal et al. §4.3): ``num_vectors`` > 1 learns ``placeholder``, ``placeholder_1``, …
    (diffusers' multi-vector convention); ``progressive=(2000, 4000)`` starts with one vector and
    switches on one more at each listed step (``num_vectors`` becomes len + 1; see
    :func:`active_vectors`); ``reg_weight`` λ adds λ Σ‖d_k − e‖² with e the embedding of
    ``reg_word`` (default ``initializer``); ``per_image=True`` adds a token ``placeholder_img{i}``
    per image, trained with the dual templates (``"a {} with {}"``: the shared S* with S_i).

    One step: ``batch_size`` images drawn with replacement, t and ε from ``seed``'s generator.
    Returns a :class:`TextualInversionResult`. Raises ``ValueError`` naming ``images`` (none,
    wrong size), ``placeholder`` (already a token), ``initializer``/``reg_word`` (not one known
    token), ``captions``, ``steps``, ``lr``, ``num_vectors``, ``batch_size``, ``progressive``.
    """
    steps = check_int(steps, "steps", min=1)
    lr = check_positive(lr, "lr")
    num_vectors = check_int(num_vectors, "num_vectors", min=1)
    batch_size = check_int(batch_size, "batch_size", min=1)
    reg_weight = check_positive(reg_weight, "reg_weight", allow_zero=True)
    schedule = None
    if progressive is not None:
        schedule = [check_int(s, "progressive", min=1) for s in progressive]
        if not schedule or sorted(schedule) != schedule:
            raise ValueError(f"progressive must be a non-empty increasing list of steps, got "
                             f"{progressive!r}")
        if num_vectors not in (1, len(schedule) + 1):
            raise ValueError(f"num_vectors must be len(progressive) + 1 = {len(schedule) + 1} "
                             f"with a progressive schedule, got {num_vectors}")
        num_vectors = len(schedule) + 1
    latents = prepare_images(pipe, images)
    n = latents.shape[0]
    if templates is not None:
        templates = list(templates)
        if not templates or not all(isinstance(t, str) and t.count("{}") == (2 if per_image else 1)
                                    for t in templates):
            raise ValueError(f"templates must be strings with {2 if per_image else 1} '{{}}' "
                             f"each, got {templates!r}")
        caps = None
    else:
        old = images.placeholder if isinstance(images, ConceptSet) else None
        if captions is None and isinstance(images, ConceptSet):
            captions = images.captions
        caps = _captions(images, captions, placeholder, n, old)
        if caps is None:
            templates = list(default_templates(pipe, dual=per_image))
    # new tokens
    ids = add_placeholder(pipe, placeholder, initializer, num_vectors)
    tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]
    img_tokens, img_ids = [], []
    if per_image:
        for i in range(n):
            tk = f"{placeholder}_img{i}"
            img_ids += add_placeholder(pipe, tk, initializer, 1)
            img_tokens.append(tk)
    text = (caps or []) + [t.replace("{}", "a") for t in (templates or [])]
    _check_known(pipe, [c.replace(placeholder, "a") for c in text], "captions")
    table = pipe.text_encoder.get_input_embeddings().weight
    e_coarse = None
    if reg_weight > 0:
        word = reg_word if reg_word is not None else initializer
        wid = pipe.tokenizer.encode(word, add_special_tokens=False) if isinstance(word, str) else []
        if len(wid) != 1 or wid[0] == getattr(pipe.tokenizer, "unk_token_id", None):
            raise ValueError(f"reg_word must be one token the tokenizer knows (default the "
                             f"initializer), got {word!r}")
        e_coarse = table[wid[0]].detach().clone()
    freeze(pipe.unet, pipe.vae, pipe.text_encoder)
    table.requires_grad_(True)
    snapshot = table.detach().clone()
    initial = snapshot[ids].clone()
    ac = pipe.scheduler.alphas_cumprod.to(latents.device)
    g = torch.Generator().manual_seed(int(seed))

    def caption(i: int, k: int) -> str:
        if templates is not None:
            tpl = templates[int(torch.randint(len(templates), (1,), generator=g))]
            c = tpl.format(placeholder, img_tokens[i]) if per_image else tpl.format(placeholder)
        elif per_image:
            # the caption with " with S_i" appended, the dual form: "a <heart> with <heart>_img2"
            c = f"{caps[i]} with {img_tokens[i]}"
        else:
            c = caps[i]
        return expand_placeholder(c, placeholder, k)

    state = dict(k=active_vectors(0, schedule) if schedule else num_vectors)

    def loss_fn(step: int) -> torch.Tensor:
        k = active_vectors(step, schedule) if schedule else num_vectors
        state["k"] = k
        idx = torch.randint(n, (batch_size,), generator=g)
        prompts = [caption(int(i), k) for i in idx]
        cond = encode_text(pipe, prompts, grad=True)
        loss = diffusion_loss(pipe.unet, latents[idx], cond, ac, generator=g)
        if e_coarse is not None:
            loss = loss + embedding_regularizer(table[ids[:k]], e_coarse, reg_weight)
        return loss

    keeps = {}
    for k in range(1, num_vectors + 1):          # the frozen rows while k vectors are active
        keep = torch.ones(table.shape[0], dtype=torch.bool)
        keep[list(ids[:k]) + list(img_ids)] = False
        keeps[k] = keep.to(table.device)

    def restore(step: int) -> None:
        keep = keeps[state["k"]]
        with torch.no_grad():
            table[keep] = snapshot[keep]

    try:
        res = train_loop([table], loss_fn, steps, lr, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, after_step=restore,
                         desc=f"textual inversion {placeholder}", progress=progress)
    finally:
        table.requires_grad_(False)
        table.grad = None
    learned = table.detach()[ids].clone()
    return TextualInversionResult(
        placeholder=placeholder, tokens=tokens, token_ids=list(ids), embeddings=learned,
        initial=initial, losses=res.losses, seconds=res.seconds,
        trained_parameters=(len(ids) + len(img_ids)) * table.shape[1], image_tokens=img_tokens,
        image_embeddings=table.detach()[img_ids].clone() if img_ids else None,
        settings=dict(steps=steps, lr=lr, num_vectors=num_vectors, batch_size=batch_size,
                      progressive=schedule, reg_weight=reg_weight, per_image=per_image,
                      weight_decay=weight_decay, initializer=initializer, seed=seed))


def save_textual_inversion(path, result: TextualInversionResult | torch.Tensor,
                           placeholder: str | None = None) -> int:
    """Write learned embeddings as ``{placeholder: (num_vectors, D)}`` in safetensors (``.pt``
    for another suffix), the diffusers format ``pipe.load_textual_inversion(path)`` reads (it
    registers ``placeholder``, ``placeholder_1``, … as :func:`textual_inversion` does). ``result``
    is a :class:`TextualInversionResult` or a tensor (k, D) / (D,) with ``placeholder``. Returns
    the file's size in bytes. Raises ``ValueError`` naming ``placeholder`` or ``result``."""
    if isinstance(result, TextualInversionResult):
        emb, placeholder = result.embeddings, placeholder or result.placeholder
    elif isinstance(result, torch.Tensor):
        emb = result
    else:
        raise TypeError(f"result must be a TextualInversionResult or a tensor, got "
                        f"{type(result).__name__}")
    if not isinstance(placeholder, str) or len(placeholder.split()) != 1:
        raise ValueError(f"placeholder must be one word, got {placeholder!r}")
    emb = emb.detach().cpu().float()
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2:
        raise ValueError(f"result must be (num_vectors, D) embeddings, got {tuple(emb.shape)}")
    path = os.fspath(path)
    state = {placeholder: emb.contiguous()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    return os.path.getsize(path)


def load_textual_inversion(pipe, path, token: str | None = None):
    """Load a file written by :func:`save_textual_inversion` (or any diffusers / A1111 embedding)
    through diffusers' ``pipe.load_textual_inversion``; returns the pipeline."""
    pipe.load_textual_inversion(os.fspath(path), token=token)
    return pipe


# ---------------------------------------------------------------------------- measured
#: settings of the stored measurement (tuned briefly on the heart: lr 5e-3 barely moved the
#: vector in 300 steps; 5e-2 learned the heart; see the chapter).
EVAL_SETTINGS = dict(steps=300, lr=5e-2, batch_size=4, weight_decay=1e-2)


def _eval_placeholder(concept: ConceptSet, pipe) -> tuple[str, str]:
    from .evaluate import new_placeholder

    ph = new_placeholder(concept, pipe)  # the instance's "sks" is an existing word: "<sks>"
    if concept.kind == "instance":
        init = "object"
    else:
        init = INITIALIZERS.get(str(concept.concept), concept.class_word)
    return ph, init


def _eval_textual_inversion(concept: ConceptSet, progress: bool = False):
    import tempfile

    from .evaluate import pipeline_sampler, protocol_pipeline, Tuned

    pipe = protocol_pipeline()
    ph, init = _eval_placeholder(concept, pipe)
    torch.manual_seed(0)
    res = textual_inversion(pipe, concept, placeholder=ph, initializer=init, seed=0,
                            progress=progress, **EVAL_SETTINGS)
    with tempfile.TemporaryDirectory() as d:
        size = save_textual_inversion(os.path.join(d, "learned_embeds.safetensors"), res)
    return Tuned(sample=pipeline_sampler(pipe, progress=False), placeholder=ph,
                 trained_parameters=res.trained_parameters, file_bytes=size,
                 train_seconds=res.seconds,
                 extra=dict(EVAL_SETTINGS, initializer=init, final_loss=float(
                     np.mean(res.losses[-20:])), first_loss=float(np.mean(res.losses[:20])),
                     moved=float((res.embeddings - res.initial).norm())))


EVAL_CONFIGS = {"textual_inversion": _eval_textual_inversion}
