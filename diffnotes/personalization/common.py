"""What every personalization method of Part IV shares: the concept images, new tokens, the
diffusion loss on a handful of latents, and one training loop.

The ground truth of Part IV is the shapes generator's held-out concepts
(``diffnotes.data.shapes.HELD_OUT_SHAPES = ("heart",)``, ``HELD_OUT_COLORS = ("purple",)``): the
shipped model has never seen a heart or the colour purple, so a method that learns them from a
few images can be judged by the shape judge, which does know hearts, and by the colour judge,
whose palette has purple (``diffnotes.models.eval_shapes``).

- :func:`concept_images` renders a few scenes of one concept with captions that name it by a
  placeholder (``"a <heart>"``, ``"a <purple> circle"``, ``"a sks star"``).
- :func:`add_placeholder` adds new tokens to a pipeline's tokenizer and text encoder (diffusers'
  multi-vector convention ``<heart>``, ``<heart>_1``, … and :func:`expand_placeholder`).
- :func:`diffusion_loss` is the denoising loss of Ahmad's notes, eq 1.8 (DDPM's
  :math:`L_\\text{simple}`), on latents with text conditioning, optionally weighted per pixel
  (Break-A-Scene's masked loss) and per sample.
- :func:`train_loop` runs Adam(W) on given parameters for a fixed number of steps with a
  progress bar, through Accelerate as ``diffnotes.models.train`` does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..data import shapes as S
from ..ddpm import q_sample
from ..utils import check_choice, check_int, check_positive

__all__ = ["ConceptSet", "concept_images", "INITIALIZERS", "add_placeholder",
           "expand_placeholder", "encode_images", "encode_text", "diffusion_loss", "train_loop",
           "TrainResult", "count_parameters", "tensor_bytes", "freeze"]

#: the word each held-out concept starts from (Textual Inversion's initializer, DreamBooth's
#: class noun): the nearest training concept.
INITIALIZERS = {"heart": "star", "purple": "blue"}


@dataclass
class ConceptSet:
    """A few images of one concept and their captions.

    ``images`` (n, 64, 64, 3) float32 in [0, 1]; ``masks`` (n, 64, 64) bool, the concept's
    object; ``objects`` the generator's records (shape, colour, size, position, centre, ...);
    ``captions`` with the placeholder (``"a <heart>"``); ``class_captions`` the same with the
    class word in its place (``"a star"``: DreamBooth's class prompts, eq 4.2); ``kind`` is
    ``"shape"``, ``"color"`` or ``"instance"``.
    """
    concept: object
    kind: str
    placeholder: str
    class_word: str
    images: np.ndarray
    masks: np.ndarray
    objects: list
    captions: list
    class_captions: list
    background: str = "plain"

    def __len__(self) -> int:
        return len(self.images)

    def tensor(self) -> torch.Tensor:
        """The images as a (n, 3, 64, 64) float tensor in [0, 1]."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).contiguous()


def _instance_spec(concept: dict) -> dict:
    if "shape" not in concept or "color" not in concept:
        raise ValueError(f"concept: an instance is a dict with at least 'shape' and 'color', got "
                         f"{concept!r}")
    spec = dict(size="large", background="plain")
    spec.update(concept)
    unknown = set(spec) - {"shape", "color", "size", "background"}
    if unknown:
        raise ValueError(f"concept: unknown instance keys {sorted(unknown)}; expected shape, "
                         f"color, size, background")
    check_choice(spec["shape"], "concept['shape']", S.SHAPES)
    check_choice(spec["color"], "concept['color']", tuple(S.COLORS))
    check_choice(spec["size"], "concept['size']", tuple(S.SIZES))
    check_choice(spec["background"], "concept['background']", S.BACKGROUNDS)
    return spec


def concept_images(concept, n: int = 4, seed: int = 0, placeholder: str | None = None
                   ) -> ConceptSet:
    """``n`` single-object generator scenes of a concept, captioned with a placeholder.

    ``concept`` is one of
    - a shape name (``"heart"``): hearts of random training colours, sizes and positions on a plain
      background, captioned ``"a <heart>"``; class word = :data:`INITIALIZERS` (``"star"``);
    - a colour name (``"purple"``): purple objects of random training shapes, captioned
      ``"a <purple> circle"``; class word ``"blue"``;
    - an instance ``dict(shape=, color=, size="large", background="plain")``: one object that
      only moves (random position, random texture seed), captioned ``"a sks star"`` (DreamBooth's
      rare-token-plus-class-noun form, Ahmad's notes §4.3); class word = its shape.
    ``placeholder`` defaults to ``"<heart>"`` / ``"<purple>"`` / ``"sks"``.

    Deterministic for ``seed``. Raises ``ValueError`` naming ``concept`` or ``n``.
    """
    n = check_int(n, "n", min=1)
    rng = np.random.default_rng(seed)
    train_colors, train_shapes = list(S.TRAIN_COLORS), list(S.TRAIN_SHAPES)
    positions, sizes = list(S.POSITIONS), list(S.SIZES)
    background = "plain"
    if isinstance(concept, str) and concept in S.SHAPES:
        kind, ph, cls = "shape", placeholder or f"<{concept}>", INITIALIZERS.get(concept, "star")
        objs = [dict(shape=concept, color=train_colors[rng.integers(len(train_colors))],
                     size=sizes[rng.integers(2)], position=positions[rng.integers(3)])
                for _ in range(n)]
        captions = [f"a {ph}"] * n
        class_captions = [f"a {cls}"] * n
    elif isinstance(concept, str) and concept in S.COLORS:
        kind, ph, cls = "color", placeholder or f"<{concept}>", INITIALIZERS.get(concept, "blue")
        objs = [dict(shape=train_shapes[rng.integers(len(train_shapes))], color=concept,
                     size=sizes[rng.integers(2)], position=positions[rng.integers(3)])
                for _ in range(n)]
        captions = [f"a {ph} {o['shape']}" for o in objs]
        class_captions = [f"a {cls} {o['shape']}" for o in objs]
    elif isinstance(concept, dict):
        spec = _instance_spec(concept)
        kind, ph, cls = "instance", placeholder or "sks", spec["shape"]
        background = spec["background"]
        objs = [dict(shape=spec["shape"], color=spec["color"], size=spec["size"],
                     position=positions[rng.integers(3)]) for _ in range(n)]
        captions = [f"a {ph} {cls}"] * n
        class_captions = [f"a {cls}"] * n
    else:
        raise ValueError(f"concept must be a shape name {S.SHAPES}, a colour name "
                         f"{tuple(S.COLORS)} or an instance dict(shape=, color=, size=, "
                         f"background=), got {concept!r}")
    if not isinstance(ph, str) or not ph.strip() or len(ph.split()) != 1:
        raise ValueError(f"placeholder must be one word, got {placeholder!r}")
    images, masks = [], []
    for i, o in enumerate(objs):
        cy = float(rng.uniform(*S._Y_RANGE))
        im, m = S.render_objects([dict(o, cy=cy)], background=background,
                                 seed=int(rng.integers(2**31)))
        images.append(im)
        masks.append(m[0])
    return ConceptSet(concept=concept, kind=kind, placeholder=ph, class_word=cls,
                      images=np.stack(images).astype(np.float32), masks=np.stack(masks),
                      objects=objs, captions=captions, class_captions=class_captions,
                      background=background)


# ---------------------------------------------------------------------------- tokens
def _vector_tokens(placeholder: str, num_vectors: int) -> list[str]:
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def expand_placeholder(text: str, placeholder: str, num_vectors: int) -> str:
    """``"a <heart>"`` → ``"a <heart> <heart>_1 <heart>_2"`` for a multi-vector placeholder, as
    diffusers' ``maybe_convert_prompt`` writes it (identity for ``num_vectors == 1``)."""
    num_vectors = check_int(num_vectors, "num_vectors", min=1)
    if num_vectors == 1:
        return text
    return " ".join(" ".join(_vector_tokens(placeholder, num_vectors)) if w == placeholder else w
                    for w in text.split(" "))


def add_placeholder(pipe, placeholder: str, initializer: str | None = None,
                    num_vectors: int = 1) -> list[int]:
    """Add ``placeholder`` (and ``placeholder_1`` … for ``num_vectors > 1``) to the pipeline's
    tokenizer, grow the text encoder's token-embedding table, and set the new rows to the
    embedding of ``initializer`` (one existing token; Textual Inversion's initialisation, Gal
    et al. 2023 §4) or, without one, to the mean of the table. Returns the new token ids.

    Raises ``ValueError`` naming ``placeholder`` if it is already a token (or not one word), and
    ``initializer`` if it is not exactly one known token.
    """
    num_vectors = check_int(num_vectors, "num_vectors", min=1)
    tok, enc = pipe.tokenizer, pipe.text_encoder
    if not isinstance(placeholder, str) or len(placeholder.split()) != 1:
        raise ValueError(f"placeholder must be one word without spaces, got {placeholder!r}")
    vocab = tok.get_vocab()
    tokens = _vector_tokens(placeholder, num_vectors)
    clash = [t for t in tokens if t in vocab]
    if clash:
        raise ValueError(f"placeholder {placeholder!r} is already in the tokenizer ({clash}); "
                         f"choose a new string such as '<{placeholder.strip('<>')}2>'")
    init_row = None
    if initializer is not None:
        ids = tok.encode(initializer, add_special_tokens=False) if isinstance(initializer, str) \
            else []
        unk = getattr(tok, "unk_token_id", None)
        if len(ids) != 1 or ids[0] == unk:
            raise ValueError(f"initializer must be one token the tokenizer knows, got "
                             f"{initializer!r} (token ids {ids})")
        init_row = ids[0]
    tok.add_tokens(tokens)
    new_ids = tok.convert_tokens_to_ids(tokens)
    enc.resize_token_embeddings(len(tok), mean_resizing=False)
    table = enc.get_input_embeddings().weight
    with torch.no_grad():
        src = table[init_row] if init_row is not None else table[:min(new_ids)].mean(0)
        for i in new_ids:
            table[i] = src
    return list(new_ids)


# ---------------------------------------------------------------------------- loss and loop
def encode_images(pipe, images) -> torch.Tensor:
    """Latents z₀ = s·E(2x − 1) of images (Ahmad's notes, eq 1.37): a :class:`ConceptSet`, an
    array (n, H, W, 3) or a tensor (n, 3, H, W) in [0, 1] → (n, C, h, w), encoder means."""
    from ..editing.inversion import encode_image
    if isinstance(images, ConceptSet):
        images = images.images
    if isinstance(images, np.ndarray) and images.ndim == 4 and len(images) == 0 or \
            isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got 0")
    return encode_image(pipe, images)


def encode_text(pipe, prompts: str | Sequence[str], grad: bool = False) -> torch.Tensor:
    """Text embeddings (B, L, D) of ``prompts``, padded like the pipeline pads them; with
    ``grad=True`` the text encoder's graph is kept (Textual Inversion, DreamBooth with
    ``train_text_encoder``)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    ids = tok.input_ids.to(pipe.text_encoder.device)
    with torch.set_grad_enabled(grad):
        emb = pipe.text_encoder(ids)[0]
    return emb.to(pipe.unet.dtype)


def diffusion_loss(unet, latents: torch.Tensor, cond: torch.Tensor, alphas_cumprod: torch.Tensor,
                   generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, pixel_weight: torch.Tensor | None = None,
                   reduction: str = "mean", unet_kwargs: dict | None = None) -> torch.Tensor:
    """E‖ε − ε_θ(√ᾱ_t z₀ + √(1−ᾱ_t) ε, t, c)‖² (Ahmad's notes, eq 1.8 with text conditioning:
    LDM's objective, eq 1.41; the base of eqs 4.1–4.2 and of Textual Inversion's eq 2).

    ``latents`` (B, C, h, w), ``cond`` (B, L, D); ``t`` (B,) long (default uniform in [0, T));
    ``noise`` default standard normal from ``generator``. ``pixel_weight`` (B, 1, h, w)
    multiplies the squared error per latent pixel before the mean over *all* pixels
    (Break-A-Scene's masked loss, eq 4.5, as its official code reduces it: a mask covering a
    quarter of the pixels counts a quarter of them, so ε = 1, ε_θ = 0 gives 0.25). ``reduction``
    ``"mean"`` → a scalar, ``"none"`` → (B,). ``unet_kwargs`` go to the UNet call
    (``cross_attention_kwargs``, ``down_block_additional_residuals``, ...).
    """
    check_choice(reduction, "reduction", ("mean", "none"))
    B = latents.shape[0]
    if cond.shape[0] != B:
        raise ValueError(f"cond must have one row per latent ({B}), got shape {tuple(cond.shape)}")
    T = len(alphas_cumprod)
    if t is None:
        t = torch.randint(0, T, (B,), generator=generator).to(latents.device)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    x_t = q_sample(latents, t, alphas_cumprod.to(latents.dtype), noise)     # eq 1.2
    eps = unet(x_t, t, encoder_hidden_states=cond, **(unet_kwargs or {})).sample
    err = (eps - noise) ** 2                                                # eq 1.8
    if pixel_weight is None:
        per = err.flatten(1).mean(1)
    else:
        if pixel_weight.shape[0] != B or pixel_weight.shape[-2:] != latents.shape[-2:]:
            raise ValueError(f"pixel_weight must have shape ({B}, 1, {latents.shape[-2]}, "
                             f"{latents.shape[-1]}), got {tuple(pixel_weight.shape)}")
        w = pixel_weight.to(err.dtype).expand_as(err)
        per = (err * w).flatten(1).mean(1)                                  # eq 4.5
    return per.mean() if reduction == "mean" else per


@dataclass
class TrainResult:
    """Losses per step, wall time, and the number of trained parameters."""
    losses: list
    seconds: float
    trained_parameters: int
    extra: dict = field(default_factory=dict)


def count_parameters(params) -> int:
    """Number of scalars in an iterable of tensors (the trainable ones only)."""
    return int(sum(p.numel() for p in params))


def tensor_bytes(state: dict) -> int:
    """Bytes of a state dict's tensors (what its safetensors file holds, headers aside)."""
    return int(sum(v.numel() * v.element_size() for v in state.values()))


def freeze(*modules) -> None:
    """``requires_grad_(False)`` on every parameter of the modules."""
    for m in modules:
        if m is not None:
            m.requires_grad_(False)


def train_loop(params: Sequence[torch.Tensor] | Sequence[dict], loss_fn: Callable[[int], torch.Tensor],
               steps: int, lr: float, *, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
               after_step: Callable[[int], None] | None = None, desc: str = "training",
               progress: bool = True) -> TrainResult:
    """``steps`` steps of AdamW on ``params`` (tensors, or torch param groups) minimising
    ``loss_fn(step)``, through an ``accelerate.Accelerator`` (backward and gradient clipping), with
    a progress bar. ``after_step(step)`` runs after each update (Textual Inversion's restore of
    the frozen embedding rows). Returns a :class:`TrainResult`.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    steps = check_int(steps, "steps", min=1)
    lr = check_positive(lr, "lr")
    groups = list(params)
    if not groups:
        raise ValueError("params must hold at least one tensor to train, got none")
    flat = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    opt = acc.prepare(opt)
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        loss = loss_fn(step)
        acc.backward(loss)
        if max_grad_norm is not None:
            acc.clip_grad_norm_(flat, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step)
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    return TrainResult(losses=losses, seconds=time.perf_counter() - t0,
                       trained_parameters=count_parameters(flat))
