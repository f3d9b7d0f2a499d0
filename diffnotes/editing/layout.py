"""Layout control: tell a text-to-image model WHERE each object goes.

Three training-free or lightly trained routes of Ahmad's notes, §3.3 ("Spatial Layout Control"):

* **LLM-grounded diffusion** (LMD, Lian et al. 2023; Ahmad's notes, §3.3.2). Stage 1: a large
  language model turns the caption into a layout, a list of ``('phrase', [x, y, w, h])`` boxes
  on a 512×512 canvas, a background prompt and a negative prompt. No LLM is called here:
  :func:`layout_prompt` writes the text an LLM would receive and :func:`parse_layout` reads its
  answer into a :class:`Layout`. Stage 2 (:func:`lmd`): every object is generated alone
  ("[background prompt] with [phrase]") from the SAME initial noise, with attention-energy
  guidance (Ahmad's notes, eqs 3.13-3.15) pushing its phrase's cross-attention into its box;
  its latents, masked by a saliency mask, are then composed into one generation of the whole
  scene during the first steps (LatentCompose, from T down to rT), with the energy of the
  composite plus an attention-transfer term of weight λ = 2.0 (the notes' E^comp).
* **Dense Diffusion** (Kim et al. 2023, "Dense Text-to-Image Generation with Attention
  Modulation"; Ahmad's notes, §3.3.3, eqs 3.16-3.21): no gradient at all. Each attention
  layer's logits are modulated (:func:`dense_modulation`): for query pixels inside segment n,
  the logits of segment n's tokens (cross-attention) or pixels (self-attention) are raised
  towards the row maximum, the others lowered towards the row minimum, by
  λ_t (1 − S) (Ahmad's notes, eq 3.19), with λ_t = w (t/T)^p decreasing as t goes to 0 (eq 3.18).
* **SpaText** (Avrahami et al. 2023; Ahmad's notes, §3.3.1): a model trained with extra input
  channels carrying per-segment embeddings. It lives in :mod:`diffnotes.editing.spatext`;
  ``spatext`` and ``load_spatext`` are re-exported here (imported lazily).

Boxes are ``(x0, y0, x1, y1)`` fractions of the canvas, x to the right and y downwards, end
exclusive; :func:`box_masks` puts them on a grid with LMD's own rounding (its code's
``scale_proportion``: corner and size rounded separately, Python's ``round``, so halves go to the
even integer). Every function runs on any Stable-Diffusion-style pipeline: nothing assumes the
shapes model's 16×16 latent or its 32 tokens (layer rules are stated as resolutions).

Simplifications against the papers' code (documented in the chapter):

* LMD's saliency mask is the per-box generation's phrase attention, thresholded and cut to the
  box (the paper's "simple thresholding" option; SAM is not used); ``mask="box"`` uses the box.
* One gradient step per guided denoising step (the official code iterates up to a loss
  threshold in the first steps), scaled like classifier guidance by sqrt(1 − ᾱ_t).
* Dense Diffusion's modulation runs on every attention layer of the conditional rows during the
  first 30% of the steps, as in the official code; segments are used as given, eq 3.17 as
  printed (the official demo draws a background segment over the rest of the canvas:
  ``background=True`` makes the uncovered pixels that segment).
"""
from __future__ import annotations

import ast
import contextlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import (AttentionCollector, AttentionController, AttentionStore, BatchLayout,
                         attention_layers, layer_resolutions, word_token_indices)
from ..ddim import ddim_step
from ..utils import batch_timesteps, check_int, check_range, check_tensor
from .common import (encode_prompts, fraction_steps, pipe_alphas_cumprod, pipe_eps_model,
                     pipe_timesteps)

__all__ = ["LayoutObject", "Layout", "make_layout", "parse_layout", "layout_prompt",
           "format_layout", "box_to_grid", "box_masks", "canvas_split_boxes", "token_energy",
           "attention_energy", "latent_compose", "lmd", "dense_modulation", "dense_lambda",
           "DenseController", "dense_condition_maps", "dense_diffusion", "lmd_guidance_layers",
           "SOURCE_EXAMPLE"]
# ``spatext`` and ``load_spatext`` are re-exported lazily (module ``__getattr__`` at the end).

CANVAS = 512            # LMD's canvas (pixels) in the LLM's answers
_ARTICLES = ("a", "an", "the")


# ---------------------------------------------------------------------------- the layout
def _check_box(box, name: str) -> tuple[float, float, float, float]:
    """A box ``(x0, y0, x1, y1)`` of fractions in [0, 1] with x0 < x1 and y0 < y1."""
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 4 numbers (x0, y0, x1, y1), got {box!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = vals
    if not all(0.0 <= v <= 1.0 for v in vals):
        raise ValueError(f"{name} must lie in [0, 1] (fractions of the canvas), got {box!r}")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"{name} must have x0 < x1 and y0 < y1, got {box!r}")
    return (x0, y0, x1, y1)


@dataclass(frozen=True)
class LayoutObject:
    """One object of a layout: its ``phrase`` ("a gray cat") and ``box`` ``(x0, y0, x1, y1)``,
    fractions of the canvas in [0, 1], end exclusive."""

    phrase: str
    box: tuple[float, float, float, float]


@dataclass
class Layout:
    """A scene layout as LMD's stage 1 produces it (Ahmad's notes, §3.3.2): ``objects`` (each a
    :class:`LayoutObject`), the ``background`` prompt, the ``negative`` prompt ("" when none)
    and the ``caption`` it was made for ("" if unknown)."""

    objects: tuple[LayoutObject, ...]
    background: str = ""
    negative: str = ""
    caption: str = ""

    def __post_init__(self):
        objs = tuple(self.objects)
        if not objs:
            raise ValueError("layout must hold at least one object, got none")
        checked = []
        for i, o in enumerate(objs):
            if not isinstance(o, LayoutObject):
                raise ValueError(f"layout.objects[{i}] must be a LayoutObject, got "
                                 f"{type(o).__name__}")
            if not isinstance(o.phrase, str) or not o.phrase.strip():
                raise ValueError(f"layout.objects[{i}].phrase must be a non-empty str, got "
                                 f"{o.phrase!r}")
            checked.append(LayoutObject(o.phrase.strip(),
                                        _check_box(o.box, f"layout.objects[{i}].box")))
        self.objects = tuple(checked)
        for name in ("background", "negative", "caption"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"layout.{name} must be a str, got "
                                 f"{type(getattr(self, name)).__name__}")

    @property
    def phrases(self) -> list[str]:
        return [o.phrase for o in self.objects]

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [o.box for o in self.objects]

    def box_prompt(self, i: int) -> str:
        """The prompt of object i's own generation: "[background prompt] with [phrase]" (LMD;
        Ahmad's notes, §3.3.2), or the phrase alone when there is no background prompt."""
        p = self.objects[i].phrase
        bg = self.background.strip().rstrip(".")
        return f"{bg} with {p}" if bg else p

    def prompt(self) -> str:
        """The prompt of the composed generation: "[background] with [p1] and [p2] ..." (the
        phrases joined by "and"), or the phrases alone without a background prompt."""
        objs = " and ".join(self.phrases)
        bg = self.background.strip().rstrip(".")
        return f"{bg} with {objs}" if bg else objs


def make_layout(objects, background: str = "", negative: str = "", caption: str = "") -> Layout:
    """A :class:`Layout` from ``objects`` = a list of ``(phrase, (x0, y0, x1, y1))`` with boxes
    as fractions of the canvas. Raises ``ValueError`` naming the bad box."""
    if isinstance(objects, (str, bytes)) or not isinstance(objects, (list, tuple)):
        raise ValueError(f"objects must be a list of (phrase, box) pairs, got {objects!r}")
    objs = []
    for i, item in enumerate(objects):
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise ValueError(f"objects[{i}] must be a (phrase, box) pair, got {item!r}")
        objs.append(LayoutObject(item[0], _check_box(item[1], f"objects[{i}] box")))
    return Layout(tuple(objs), background, negative, caption)


# ---------------------------------------------------------------------------- stage 1: text
#: The LLM answer printed in Ahmad's notes, §3.3.2 (their example of LMD's stage 1).
SOURCE_EXAMPLE = """Caption: A realistic photo of a gray cat and an orange dog on the grass.
Objects:
- 'a gray cat': [50, 120, 180, 200]
- 'an orange dog': [300, 120, 180, 200]
- 'grass': [0, 340, 512, 172]
Background prompt: A realistic photo of a grassy outdoor scene.
Negative prompt: None"""

_KEYS = {"caption": "caption", "objects": "objects", "background prompt": "background",
         "negative prompt": "negative"}
_OBJECT_LINE = re.compile(r"""^\s*(?:[-*•]\s*)?(?P<q>['"])(?P<phrase>.+?)(?P=q)\s*:\s*
                              (?P<box>\[.*\])\s*,?\s*$""", re.X)


def _clean(s: str) -> str:
    """Strip surrounding whitespace and markdown emphasis (``*text*``, ``_text_``)."""
    s = s.strip()
    while len(s) >= 2 and s[0] == s[-1] and s[0] in "*_`":
        s = s[1:-1].strip()
    return s


def _pixel_box(box, lineno: int, line: str, canvas: tuple[int, int]):
    W, H = canvas
    where = f"text: line {lineno} ({line.strip()!r})"
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise ValueError(f"{where}: a box must be [x, y, width, height] (4 numbers, LMD's "
                         f"format), got {box!r}")
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: the box's width and height must be positive, got "
                         f"width {w:g}, height {h:g}")
    if x < 0 or y < 0 or x + w > W or y + h > H:
        raise ValueError(f"{where}: the box [x={x:g}, y={y:g}, w={w:g}, h={h:g}] leaves the "
                         f"{W}×{H} canvas")
    return (x / W, y / H, (x + w) / W, (y + h) / H)


def parse_layout(text: str, canvas: int | tuple[int, int] = CANVAS) -> Layout:
    """Read an LLM's layout (LMD's stage-1 answer, Ahmad's notes, §3.3.2) into a :class:`Layout`.

    Accepted lines (in any order, blank lines skipped, markdown ``*emphasis*`` stripped):

    * ``Caption: ...``;
    * ``Objects: [('a red circle', [x, y, w, h]), ...]`` (LMD's own format, one line), or
      ``Objects:`` followed by one object per line, ``- 'a red circle': [x, y, w, h]`` (the
      notes' rendering) or ``('a red circle', [x, y, w, h])``;
    * ``Background prompt: ...``;
    * ``Negative prompt: ...`` (``None`` or nothing means no negative prompt: "").

    Boxes are ``[x, y, width, height]`` in pixels of the ``canvas`` (512 × 512, LMD's), top-left
    corner first; they are returned as fractions ``(x/W, y/H, (x+w)/W, (y+h)/H)``.

    Raises ``ValueError`` starting "text: line N (...)" and saying why for a line that does not
    parse, a box that is not 4 numbers, has a non-positive size or leaves the canvas, and for a
    text with no object.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str (the LLM's answer), got {type(text).__name__}")
    if isinstance(canvas, (int, np.integer)) and not isinstance(canvas, bool):
        canvas = (int(canvas), int(canvas))
    if not (isinstance(canvas, tuple) and len(canvas) == 2 and all(
            isinstance(v, (int, np.integer)) and v > 0 for v in canvas)):
        raise ValueError(f"canvas must be a positive int or a (width, height) pair, got "
                         f"{canvas!r}")
    fields = {"caption": "", "background": "", "negative": ""}
    objects: list[LayoutObject] = []
    in_objects = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = re.match(r"^\s*(caption|objects|background prompt|negative prompt)\s*:(.*)$", line,
                     re.I)
        if m:
            key, rest = _KEYS[m.group(1).lower()], _clean(m.group(2))
            in_objects = key == "objects"
            if key == "objects":
                if rest:
                    objects += _objects_literal(rest, lineno, line, canvas)
                continue
            if key == "negative" and rest.lower() in ("none", "none."):
                rest = ""
            fields[key] = rest
            continue
        om = _OBJECT_LINE.match(_clean(line)) if in_objects else None
        if om:
            box = _literal(om.group("box"), lineno, line)
            objects.append(LayoutObject(om.group("phrase").strip(),
                                        _pixel_box(box, lineno, line, canvas)))
            continue
        if in_objects and line.strip().startswith("("):
            objects += _objects_literal(line.strip().rstrip(","), lineno, line, canvas)
            continue
        hint = ("an object line - 'phrase': [x, y, w, h]" if in_objects else
                "one of 'Caption:', 'Objects:', 'Background prompt:', 'Negative prompt:'")
        raise ValueError(f"text: line {lineno} ({line.strip()!r}) does not parse: expected "
                         f"{hint}")
    if not objects:
        raise ValueError("text: no object found; expected an 'Objects:' line with "
                         "[('phrase', [x, y, w, h]), ...] or object lines - 'phrase': "
                         "[x, y, w, h] after it")
    return Layout(tuple(objects), fields["background"], fields["negative"], fields["caption"])


def _literal(s: str, lineno: int, line: str):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        raise ValueError(f"text: line {lineno} ({line.strip()!r}): {s!r} is not a Python "
                         f"literal (a list of numbers or of ('phrase', [x, y, w, h]) pairs)"
                         ) from None


def _objects_literal(s: str, lineno: int, line: str, canvas) -> list[LayoutObject]:
    val = _literal(s, lineno, line)
    if isinstance(val, tuple) and len(val) == 2 and isinstance(val[0], str):
        val = [val]
    if not isinstance(val, (list, tuple)):
        raise ValueError(f"text: line {lineno} ({line.strip()!r}): the objects must be a list "
                         f"of ('phrase', [x, y, w, h]) pairs, got {type(val).__name__}")
    out = []
    for item in val:
        if not (isinstance(item, (list, tuple)) and len(item) == 2
                and isinstance(item[0], str)):
            raise ValueError(f"text: line {lineno} ({line.strip()!r}): each object must be a "
                             f"('phrase', [x, y, w, h]) pair, got {item!r}")
        out.append(LayoutObject(item[0].strip(), _pixel_box(item[1], lineno, line, canvas)))
    return out


def format_layout(layout: Layout, canvas: int = CANVAS) -> str:
    """The layout written back in LMD's answer format (boxes in pixels of ``canvas``, rounded):
    the inverse of :func:`parse_layout` up to rounding."""
    objs = ", ".join(
        f"({o.phrase!r}, [{round(o.box[0] * canvas)}, {round(o.box[1] * canvas)}, "
        f"{round((o.box[2] - o.box[0]) * canvas)}, {round((o.box[3] - o.box[1]) * canvas)}])"
        for o in layout.objects)
    return (f"Caption: {layout.caption}\nObjects: [{objs}]\n"
            f"Background prompt: {layout.background}\n"
            f"Negative prompt: {layout.negative}")


_TEMPLATE = """You are a planner of picture layouts. For the caption at the end, list every object \
it mentions with a bounding box, then give a short background prompt that describes the scene \
without those objects, and a negative prompt naming what must not appear ("None" if nothing).

Rules:
- The canvas is {W}x{H} pixels; [0, 0] is the top-left corner and [{W}, {H}] the bottom-right.
- Write each box as ('object phrase', [x, y, width, height]) with (x, y) its top-left corner.
- One object per box; boxes stay inside the canvas and should not overlap unless the caption
  asks for it. Keep the colour and other attributes in the object's phrase.
- Answer with exactly four lines: Caption, Objects, Background prompt, Negative prompt.

{examples}
Caption: {caption}
Objects:"""

_EXAMPLES = [
    ("a red circle on the left and a blue square on the right",
     "[('a red circle', [20, 176, 160, 160]), ('a blue square', [332, 176, 160, 160])]",
     "", "None"),
    ("A realistic photo of a gray cat and an orange dog on the grass.",
     "[('a gray cat', [50, 120, 180, 200]), ('an orange dog', [300, 120, 180, 200]), "
     "('grass', [0, 340, 512, 172])]",
     "A realistic photo of a grassy outdoor scene.", "None"),
]


def layout_prompt(caption: str, examples: Sequence[tuple[str, str, str, str]] | None = None,
                  canvas: int = CANVAS) -> str:
    """The text an LLM would receive in LMD's stage 1 (in-context learning: a task description,
    a few worked examples, then the caption; Ahmad's notes, §3.3.2). ``examples``: a list of
    ``(caption, objects, background, negative)`` strings (default: a shapes scene and the
    notes' cat-and-dog example). The wording is diffnotes' own, in the spirit of LMD's template.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption must be a non-empty str, got {caption!r}")
    ex = _EXAMPLES if examples is None else list(examples)
    shots = "".join(f"Caption: {c}\nObjects: {o}\nBackground prompt: {b}\n"
                    f"Negative prompt: {n}\n\n" for c, o, b, n in ex)
    return _TEMPLATE.format(W=canvas, H=canvas, examples=shots, caption=caption.strip())


# ---------------------------------------------------------------------------- boxes on a grid
def _size(latent_size, name: str = "latent_size") -> tuple[int, int]:
    if isinstance(latent_size, (int, np.integer)) and not isinstance(latent_size, bool):
        latent_size = (int(latent_size), int(latent_size))
    if not (isinstance(latent_size, (tuple, list)) and len(latent_size) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
            for v in latent_size)):
        raise ValueError(f"{name} must be a positive int or an (H, W) pair, got "
                         f"{latent_size!r}")
    return int(latent_size[0]), int(latent_size[1])


def box_to_grid(box, size) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` grid indices (end exclusive) of a fractional box on an ``(H, W)``
    grid, with LMD's rounding (its ``scale_proportion``): the corner and the size are rounded
    separately, ``x0 = round(x0·W)``, ``x1 = x0 + round((x1 − x0)·W)`` (the same for y), then
    clipped to the grid. Python's ``round`` sends halves to the even integer (22.5 → 22), so a
    box keeps its size when it is shifted."""
    H, W = _size(size, "size")
    x0, y0, x1, y1 = _check_box(box, "box")
    gx0, gy0 = round(x0 * W), round(y0 * H)
    gx1, gy1 = gx0 + round((x1 - x0) * W), gy0 + round((y1 - y0) * H)
    return max(gx0, 0), max(gy0, 0), min(gx1, W), min(gy1, H)


def box_masks(layout: Layout | Sequence, latent_size) -> torch.Tensor:
    """Boolean masks ``(n_objects, H, W)`` of the layout's boxes on an ``H × W`` grid (a latent,
    or an attention map), with LMD's rounding (:func:`box_to_grid`). ``layout``: a
    :class:`Layout` or a list of fractional boxes. A box too small for the grid may give an
    empty mask."""
    boxes = layout.boxes if isinstance(layout, Layout) else [
        _check_box(b, f"layout[{i}]") for i, b in enumerate(layout)]
    H, W = _size(latent_size)
    out = torch.zeros(len(boxes), H, W, dtype=torch.bool)
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = box_to_grid(b, (H, W))
        out[i, y0:y1, x0:x1] = True
    return out


def canvas_split_boxes(n_objects: int, margin: float = 0.0) -> list[tuple[float, float, float,
                                                                          float]]:
    """Boxes for ``n_objects`` objects side by side: the canvas cut into ``n`` equal vertical
    strips, left to right, each full height, shrunk by ``margin`` (a fraction of the canvas) on
    every side. The rule the binding chapter gives LMD when a prompt has no positions ("a red
    circle and a blue square": the first object on the left)."""
    n = check_int(n_objects, "n_objects", min=1)
    m = check_range(margin, "margin", 0, 0.5 / n, hi_open=True)
    return [(k / n + m, m, (k + 1) / n - m, 1 - m) for k in range(n)]


# ---------------------------------------------------------------------------- shared sampling
def _initial_latent(pipe, generator, latents):
    unet = pipe.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if latents is None:
        x = torch.randn((1, *shape), generator=generator, dtype=unet.dtype,
                        device=generator.device if generator is not None else unet.device)
        x = x * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    else:
        check_tensor(latents, "latents", ndim=(3, 4))
        x = latents if latents.ndim == 4 else latents.unsqueeze(0)
        if x.shape[0] != 1 or x.shape[1] != shape[0]:
            raise ValueError(f"latents must have shape (1, {shape[0]}, h, w) or "
                             f"({shape[0]}, h, w), got {tuple(latents.shape)}")
    return x.to(unet.device, unet.dtype)


def _outputs(pipe, z: torch.Tensor, output_type: str):
    if output_type == "latent":
        return z
    from .inversion import decode_latents
    x = decode_latents(pipe, z).permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return x
    from PIL import Image
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in x]


def _check_output_type(output_type):
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    return output_type


def _phrase_tokens(prompt: str, phrase: str, tokenizer, name: str, occurrence: int = 0
                   ) -> list[int]:
    """Token positions of ``phrase`` (its ``occurrence``-th match) in ``prompt`` without its
    leading articles (LMD's object tokens: "a gray cat" → the tokens of "gray cat"); all of
    them if the phrase is only articles."""
    words = phrase.split()
    core = [w for w in words if w.strip(".,").lower() not in _ARTICLES] or words
    try:
        idx = word_token_indices(prompt, " ".join(words), tokenizer, occurrence=occurrence)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    n_skip = 0
    for w in words:                       # leading articles only ("a red circle")
        if w.strip(".,").lower() in _ARTICLES and len(core) < len(words):
            n_skip += len(word_token_indices(w, w, tokenizer))
        else:
            break
    return idx[n_skip:] or idx


# ---------------------------------------------------------------------------- LMD: energy
def _grid_of(n_query: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    H, W = latent_hw
    f = math.sqrt(H * W / n_query)
    f = round(f)
    return math.ceil(H / f), math.ceil(W / f)


def _topk_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest values along the last axis."""
    return x.topk(k, dim=-1).values.mean(-1)


def token_energy(a: torch.Tensor, b: torch.Tensor, *, fg_top_p: float = 0.2,
                 bg_top_p: float = 0.2, fg_weight: float = 1.0, bg_weight: float = 4.0
                 ) -> torch.Tensor:
    """LMD's energy of one token's attention (Ahmad's notes, eq 3.13):
    ``E = − fg_weight · Topk(a ⊙ b) + ω · Topk(a ⊙ (1 − b))`` over the last axis (pixels u),
    ``a`` the token's map (..., N), ``b`` the box (N,) in {0, 1}, ``Topk`` the mean of the
    ``max(⌊p · count⌋, 1)`` largest values, count = the box's area (p = ``fg_top_p``) or the
    area outside it (p = ``bg_top_p``), ω = ``bg_weight``. Returns (...)."""
    area = float(b.sum())
    k_fg = max(int(area * fg_top_p), 1)
    k_bg = max(int((b.shape[-1] - area) * bg_top_p), 1)
    return (-fg_weight * _topk_mean(a * b, k_fg) + bg_weight * _topk_mean(a * (1 - b), k_bg))


def attention_energy(maps: Sequence[torch.Tensor], boxes, tokens: Sequence[Sequence[int]],
                     latent_hw: tuple[int, int], *, fg_top_p: float = 0.2,
                     bg_top_p: float = 0.2, fg_weight: float = 1.0, bg_weight: float = 4.0,
                     rows: slice | None = None) -> torch.Tensor:
    """LMD's attention energy (Ahmad's notes, eq 3.13; Lian et al. 2023, eq 2), summed over
    objects i, averaged over object i's tokens v ∈ V_i and over the layers:

        E(A, i, v) = − fg_weight · Topk_u(A_uv · b_i) + ω · Topk_u(A_uv · (1 − b_i)),

    with b_i object i's box on the layer's grid (:func:`box_masks`), ω = ``bg_weight`` and
    ``Topk`` the mean of the largest ``⌊p · area⌋`` values (at least 1), p = ``fg_top_p`` of
    the box's area, ``bg_top_p`` of the area outside (LMD's code: 20% each, ω = 4).
    The code writes the first term as 1 − Topk: the same gradient.

    ``maps``: head-averaged cross-attention ``(B, h·w, M)`` per layer; ``boxes``: one fractional
    box per object; ``tokens``: object i's token positions; ``rows``: batch rows to use (all).
    Returns a scalar tensor (differentiable through ``maps``)."""
    boxes = list(boxes)
    if len(tokens) != len(boxes):
        raise ValueError(f"tokens must hold one list per box ({len(boxes)}), got {len(tokens)}")
    total, n_layers = 0.0, 0
    for A in maps:
        if rows is not None:
            A = A[rows]
        h, w = _grid_of(A.shape[1], latent_hw)
        b = box_masks(boxes, (h, w)).reshape(len(boxes), -1).to(A.device, A.dtype)
        layer = 0.0
        for i, idx in enumerate(tokens):
            a = A[..., list(idx)].transpose(-1, -2)                 # (B, |V_i|, hw)
            e = token_energy(a, b[i], fg_top_p=fg_top_p, bg_top_p=bg_top_p,
                             fg_weight=fg_weight, bg_weight=bg_weight)   # (B, |V_i|)
            layer = layer + e.mean(-1).sum()
        total = total + layer
        n_layers += 1
    if n_layers == 0:
        raise ValueError("maps must hold at least one attention map")
    return total / n_layers


def latent_compose(z_comp: torch.Tensor, z_obj: torch.Tensor, mask: torch.Tensor
                   ) -> torch.Tensor:
    """LatentCompose of LMD (Ahmad's notes, §3.3.2; the notes leave it undefined):
    ``z ← z ⊙ (1 − m) + ẑ ⊙ m``, i.e. object i's latent inside its mask (binary ``mask``
    (h, w) or broadcastable), the composite's outside. m ≡ 0 keeps ``z_comp``, m ≡ 1 gives
    ``z_obj`` exactly."""
    m = mask.to(z_comp.device, z_comp.dtype)
    return torch.where(m > 0.5, z_obj, z_comp) if m.dtype != torch.bool else torch.where(
        m, z_obj, z_comp)


def lmd_guidance_layers(unet, latent_hw: tuple[int, int] | None = None) -> list[str]:
    """The cross-attention layers LMD's energy reads: those of the mid block and the decoder at
    the two lowest attention resolutions of the UNet. On Stable Diffusion (64×64 latent) that is
    the mid block (8×8) and ``up_blocks.1`` (16×16), LMD's published choice; on the shapes model
    (16 and 8) every mid and decoder layer. Resolutions come from the layers' block depth."""
    names = attention_layers(unet, "cross")
    res = layer_resolutions(unet, "cross", latent_hw)
    levels = sorted(set(res))[:2]
    return [n for n, r in zip(names, res) if not n.startswith("down_blocks") and r in levels]


def _energy_step(pipe, x, t, cond, layers, boxes, tokens, eta, alpha_bar, ekw, ref=None,
                 ref_tokens=None, ref_weight=0.0):
    """One guidance update x ← x − η √(1 − ᾱ_t) ∇_x E (Ahmad's notes, eq 3.14), E from the
    conditional UNet pass's cross-attention (eq 3.13), plus λ·mean|A − A_ref| when ``ref``."""
    unet = pipe.unet
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        with AttentionCollector(("cross",), layers=layers).attach(unet) as col:
            unet(xg, batch_timesteps(t, xg), encoder_hidden_states=cond)
            maps = [col.by_name()[n] for n in layers if n in col.by_name()]
        hw = (x.shape[-2], x.shape[-1])
        E = attention_energy(maps, boxes, tokens, hw, **ekw)
        if ref is not None and ref_weight:
            E = E + ref_weight * _reference_term(maps, ref, tokens, ref_tokens)
        g, = torch.autograd.grad(E, xg)
    return (x - eta * math.sqrt(1 - alpha_bar) * g).detach(), float(E.detach())


def _reference_term(maps, ref, tokens, ref_tokens):
    """Σ_i mean_{u, v} |A^comp_uv − A^(i)_uv| over the layers' mean (the λ term of E^comp;
    LMD's code takes the mean over pixels, the notes write a sum)."""
    tot = 0.0
    for A, R in zip(maps, ref):               # R: list over objects of (1, hw, |V_i|)
        for i, idx in enumerate(tokens):
            tot = tot + (A[..., list(idx)] - R[i]).abs().mean()
    return tot / max(len(maps), 1)


def lmd(pipe, layout: Layout, *, num_inference_steps: int = 20, guidance_scale: float = 7.5,
        guidance: bool = True, eta: float = 5.0, guidance_steps: float = 0.3,
        fg_top_p: float = 0.2, bg_top_p: float = 0.2, fg_weight: float = 1.0,
        bg_weight: float = 4.0, ref_weight: float = 2.0, compose_ratio: float = 0.5,
        mask: str = "attention", mask_threshold: float = 0.3,
        generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
        output_type: str = "pil", return_details: bool = False):
    """LLM-grounded diffusion, stage 2 (Lian et al. 2023; Ahmad's notes, §3.3.2, eqs 3.13-3.15
    and E^comp), on a :class:`Layout` (stage 1's answer, :func:`parse_layout`).

    1. Per box i: DDIM (Ahmad's notes, eq 1.21) from the shared initial noise z_T with the
       prompt :meth:`Layout.box_prompt` ("[background] with [phrase]"); during the first
       ``guidance_steps`` of the steps, before each step, one update
       z ← z − η √(1 − ᾱ_t) ∇_z E(A^(i), i) (eq 3.14; η = ``eta`` = LMD's ``loss_scale`` 5)
       with E of :func:`attention_energy` on the layers of :func:`lmd_guidance_layers`.
       Its mask m^(i): with ``mask="attention"`` the phrase's cross-attention averaged over
       the steps, divided by its maximum, above ``mask_threshold``, inside the box (the box
       itself if that is empty); with ``mask="box"`` the box.
    2. The scene: DDIM from z_T with :meth:`Layout.prompt`; while the step index is below
       ``compose_ratio`` · N (LMD's ``frozen_step_ratio`` r = 0.5: from T down to rT), every
       object's latent is composed in (:func:`latent_compose`) before the step; during the
       guidance steps the composite takes the update with E^comp = E(A^comp) + λ mean|A^comp −
       A^(i)| (λ = ``ref_weight`` = 2.0, the notes' value).
    With ``guidance=False`` no gradient is taken (the composition alone).

    ``guidance_scale``: classifier-free guidance (Ahmad's notes, eq 1.44) of every generation,
    with the layout's negative prompt as the unconditional text when it has one.
    Returns the images (``output_type`` "pil": a list of one PIL image; "np": (1, H, W, 3)
    array; "latent": (1, C, h, w)); with ``return_details``, ``(images, details)`` where
    details holds the per-box latents ``"object_latents"``, ``"masks"`` (n, h, w), the box
    prompts, and the energies of each guided step.
    Raises ``ValueError`` naming the argument (a phrase not found in its prompt, a bad mask
    mode, fractions outside [0, 1]).
    """
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a Layout (see parse_layout), got "
                         f"{type(layout).__name__}")
    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    gs = check_range(guidance_scale, "guidance_scale", 0)
    eta = check_range(eta, "eta", 0)
    g_frac = check_range(guidance_steps, "guidance_steps", 0, 1)
    r = check_range(compose_ratio, "compose_ratio", 0, 1)
    if mask not in ("attention", "box"):
        raise ValueError(f"mask must be 'attention' or 'box', got {mask!r}")
    thr = check_range(mask_threshold, "mask_threshold", 0, 1)
    check_range(ref_weight, "ref_weight", 0)
    _check_output_type(output_type)
    ekw = dict(fg_top_p=check_range(fg_top_p, "fg_top_p", 0, 1, lo_open=True),
               bg_top_p=check_range(bg_top_p, "bg_top_p", 0, 1, lo_open=True),
               fg_weight=check_range(fg_weight, "fg_weight", 0),
               bg_weight=check_range(bg_weight, "bg_weight", 0))
    tok, unet = pipe.tokenizer, pipe.unet
    n = len(layout.objects)
    box_prompts = [layout.box_prompt(i) for i in range(n)]
    scene = layout.prompt()
    box_tokens = [_phrase_tokens(box_prompts[i], layout.objects[i].phrase, tok,
                                 f"layout.objects[{i}].phrase") for i in range(n)]
    scene_tokens = [_phrase_tokens(scene, o.phrase, tok, f"layout.objects[{i}].phrase",
                                   occurrence=layout.phrases[:i].count(o.phrase))
                    for i, o in enumerate(layout.objects)]
    x_T = _initial_latent(pipe, generator, latents)
    hw = (x_T.shape[-2], x_T.shape[-1])
    ts = pipe_timesteps(pipe, N)
    acl = pipe_alphas_cumprod(pipe).tolist()
    n_guide = fraction_steps(g_frac, N) if guidance and eta > 0 else 0
    n_comp = fraction_steps(r, N)
    layers = lmd_guidance_layers(unet, hw)
    use_cfg = gs != 1.0
    null = encode_prompts(pipe, layout.negative) if use_cfg else None
    boxes = box_masks(layout, hw).to(unet.device)
    details = {"box_prompts": box_prompts, "prompt": scene, "energies": [], "layers": layers}

    # 1. every object alone
    trajs, masks, refs = [], [], []
    for i in range(n):
        cond = encode_prompts(pipe, box_prompts[i])
        eps_model = pipe_eps_model(pipe, cond, null, gs if use_cfg else 1.0)
        x, traj, sal, ref_i, energies = x_T.clone(), [], None, [], []
        with AttentionCollector(("cross",), layers=layers).attach(unet) as col:
            for k, t in enumerate(ts):
                traj.append(x)
                if k < n_guide:
                    col.active = False
                    x, e = _energy_step(pipe, x, t, cond, layers, [layout.boxes[i]],
                                        [box_tokens[i]], eta, acl[t], ekw)
                    energies.append(e)
                    col.active = True
                col.clear()
                with torch.no_grad():
                    eps = eps_model(x, batch_timesteps(t, x))
                maps = [col.by_name()[n] for n in layers if n in col.by_name()]
                c_rows = slice(1, 2) if use_cfg else slice(0, 1)
                if k < n_guide:                  # A^(i) of this step, for E^comp's λ term
                    ref_i.append([[m[c_rows][..., box_tokens[i]].detach()] for m in maps])
                if mask == "attention":
                    s = _saliency(maps, box_tokens[i], hw, c_rows)
                    sal = s if sal is None else sal + s
                a_prev = acl[ts[k + 1]] if k + 1 < len(ts) else 1.0
                x = ddim_step(x, eps, acl[t], a_prev)
        traj.append(x)
        if mask == "attention":
            m = (sal / sal.max().clamp_min(1e-30) > thr) & boxes[i]
            m = m if bool(m.any()) else boxes[i]
        else:
            m = boxes[i]
        trajs.append(traj)
        masks.append(m)
        refs.append(ref_i)
        details["energies"].append(energies)

    # 2. the scene, composed
    cond = encode_prompts(pipe, scene)
    eps_model = pipe_eps_model(pipe, cond, null, gs if use_cfg else 1.0)
    x = x_T.clone()
    scene_e = []
    for k, t in enumerate(ts):
        if k < n_comp:
            for i in range(n):
                x = latent_compose(x, trajs[i][k], masks[i])
        if k < n_guide:
            ref = [[refs[i][k][j][0] for i in range(n)] for j in range(len(layers))]
            x, e = _energy_step(pipe, x, t, cond, layers, layout.boxes, scene_tokens, eta,
                                acl[t], ekw, ref=ref, ref_tokens=box_tokens,
                                ref_weight=ref_weight)
            scene_e.append(e)
        with torch.no_grad():
            eps = eps_model(x, batch_timesteps(t, x))
        a_prev = acl[ts[k + 1]] if k + 1 < len(ts) else 1.0
        x = ddim_step(x, eps, acl[t], a_prev)
    details["energies"].append(scene_e)
    details["masks"] = torch.stack(masks)
    details["object_latents"] = torch.cat([tr[-1] for tr in trajs])
    out = _outputs(pipe, x, output_type)
    if return_details:
        details["object_images"] = _outputs(pipe, details["object_latents"], output_type)
        return out, details
    return out


def _saliency(maps, idx, hw, rows) -> torch.Tensor:
    """The phrase's cross-attention (mean over its tokens and the layers) on the latent grid."""
    acc = None
    for A in maps:
        a = A[rows][0][..., list(idx)].mean(-1).detach().double()
        h, w = _grid_of(A.shape[1], hw)
        a = a.reshape(1, 1, h, w)
        if (h, w) != tuple(hw):
            a = F.interpolate(a, size=hw, mode="bilinear", align_corners=False)
        acc = a[0, 0] if acc is None else acc + a[0, 0]
    return acc.to("cpu") if acc is not None else torch.zeros(hw, dtype=torch.float64)


# ---------------------------------------------------------------------------- Dense Diffusion
def dense_modulation(scores: torch.Tensor, R: torch.Tensor, size_factor: torch.Tensor | float,
                     lam: float) -> torch.Tensor:
    """Dense Diffusion's modulated logits (Kim et al. 2023, eqs 5-7; Ahmad's notes, eq 3.19 with
    the official code's M_pos and M_neg):

        s' = s + λ_t (1 − S) ⊙ [ R ⊙ (max_j s − s) − (1 − R) ⊙ (s − min_j s) ],

    with s = QK^T/√d the scaled logits ``(..., N_q, N_k)``, max/min over the keys of each query
    row (the value range), R the condition map (1 for a positive query-key pair, same shape or
    broadcastable), ``size_factor`` = 1 − S (per query, ``(N_q, 1)``, or a number) and
    ``lam`` = λ_t. A positive pair is lifted towards the row maximum, a negative one pushed
    towards the row minimum; at λ_t (1 − S) = 1 they reach them. Example (one row):
    s = [1, 2, 4], R = [1, 1, 0], λ(1 − S) = 0.5 → [2.5, 3, 2.5]."""
    mx = scores.amax(-1, keepdim=True)
    mn = scores.amin(-1, keepdim=True)
    R = R.to(scores.dtype)
    return scores + lam * size_factor * (R * (mx - scores) - (1 - R) * (scores - mn))


def dense_lambda(t: int, w: float, power: float = 5.0, T: int = 1000) -> float:
    """λ_t = w (t/T)^p (Ahmad's notes, eq 3.18, with t normalised by the T = 1000 training steps
    as in the official code; p = 5): strong at the start of sampling, ~0 near the end."""
    return float(w) * (float(t) / T) ** float(power)


def _masks_tensor(segments, name: str = "segments"):
    """Validate ``segments`` = [(phrase, mask H×W), ...]: returns (phrases, masks (n, H, W)
    float64). Masks: 2-D, binary, not empty, all the same shape, not overlapping."""
    if isinstance(segments, (str, bytes)) or not isinstance(segments, (list, tuple)) \
            or not segments:
        raise ValueError(f"{name} must be a non-empty list of (phrase, mask) pairs, got "
                         f"{segments!r}")
    phrases, masks = [], []
    for i, item in enumerate(segments):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and item[0].strip()):
            raise ValueError(f"{name}[{i}] must be a (phrase, mask) pair with a non-empty "
                             f"phrase, got {type(item).__name__}")
        m = item[1]
        m = m.detach().cpu() if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m))
        if m.ndim != 2:
            raise ValueError(f"{name}[{i}] mask must be 2-D (H, W), got shape {tuple(m.shape)}")
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError(f"{name}[{i}] mask must be binary (bool or 0/1)")
            m = m != 0
        if not bool(m.any()):
            raise ValueError(f"{name}[{i}] mask ({item[0]!r}) is empty")
        if masks and m.shape != masks[0].shape:
            raise ValueError(f"{name}[{i}] mask must have the shape of the first mask "
                             f"{tuple(masks[0].shape)}, got {tuple(m.shape)}")
        phrases.append(item[0].strip())
        masks.append(m)
    M = torch.stack(masks)
    over = M.sum(0) > 1
    if bool(over.any()):
        a, b = [i for i in range(len(masks)) if bool((M[i] & over).any())][:2]
        raise ValueError(f"{name}: masks {a} ({phrases[a]!r}) and {b} ({phrases[b]!r}) overlap "
                         f"in {int((M[a] & M[b]).sum())} pixels; Dense Diffusion's segments "
                         f"must not overlap")
    return phrases, M.double()


def dense_condition_maps(masks: torch.Tensor, token_segment: torch.Tensor, h: int, w: int,
                         size_reg: float = 1.0):
    """The condition maps of one layer on an ``h × w`` query grid (masks resized, nearest):
    ``R_cross`` (h·w, N_k) (Ahmad's notes, eq 3.17: column j is the mask of token j's segment,
    0 for a token in no segment), ``R_self`` (h·w, h·w) (eq 3.21: 1 where both pixels share a
    segment) and the size factor 1 − S ``(h·w, 1)``, S = ``size_reg`` · (area of the query's
    segment)/(h·w) (0 outside every segment)."""
    m = F.interpolate(masks[:, None].double(), size=(h, w), mode="nearest")[:, 0]
    m = m.reshape(m.shape[0], -1)                                        # (n, hw)
    seg = token_segment.to(torch.long)
    cols = torch.zeros(m.shape[1], seg.shape[0], dtype=torch.float64)
    has = seg >= 0
    if bool(has.any()):
        cols[:, has] = m[seg[has]].T
    r_self = (m.T @ m) > 0
    area = m.sum(1)                                                      # (n,)
    S = (m * area[:, None]).sum(0) / (h * w)                             # query's segment area
    return cols, r_self.double(), (1 - size_reg * S)[:, None]


class DenseController(AttentionController):
    """Dense Diffusion's attention modulation as an :class:`AttentionController`: its
    ``edit_scores`` hook applies :func:`dense_modulation` to the logits of the conditional rows
    of every cross-attention layer (with R_cross) and self-attention layer (with R_self),
    scaled by ``factor`` · w (set ``factor`` = (t/T)^p before each step; w = ``w_cross`` or
    ``w_self``). Nothing is changed where the scale is 0."""

    kinds = ("cross", "self")

    def __init__(self, masks: torch.Tensor, token_segment: torch.Tensor, layout: BatchLayout,
                 w_cross: float = 1.0, w_self: float = 0.3, size_reg: float = 1.0):
        self.masks, self.token_segment, self.layout = masks, token_segment, layout
        self.w_cross, self.w_self, self.size_reg = w_cross, w_self, size_reg
        self.factor = 0.0
        self._cache: dict = {}

    def wants(self, kind, height, width):
        return (self.w_cross if kind == "cross" else self.w_self) != 0

    def _maps(self, h, w, device, dtype):
        key = (h, w, device, dtype)
        if key not in self._cache:
            c, s, f = dense_condition_maps(self.masks, self.token_segment, h, w, self.size_reg)
            self._cache[key] = (c.to(device, dtype), s.to(device, dtype), f.to(device, dtype))
        return self._cache[key]

    def edit_scores(self, scores, info):
        lam = self.factor * (self.w_cross if info.kind == "cross" else self.w_self)
        if lam == 0:
            return scores
        R_c, R_s, size = self._maps(info.height, info.width, scores.device, scores.dtype)
        R = R_c if info.kind == "cross" else R_s
        if R.shape[-1] != scores.shape[-1]:
            raise RuntimeError(f"Dense Diffusion: layer {info.name} has {scores.shape[-1]} keys, "
                               f"the condition map {R.shape[-1]}")
        rows = self.layout.cond_rows() if self.layout is not None else slice(None)
        scores[rows] = dense_modulation(scores[rows], R, size, lam)
        return scores


def dense_diffusion(pipe, prompt: str, segments, *, lam: float = 1.0, lam_self: float = 0.3,
                    schedule: str | Callable = "power", power: float = 5.0,
                    window: float = 0.3, size_reg: float = 1.0, background: bool = False,
                    separate_embeddings: bool = True, num_inference_steps: int = 20,
                    guidance_scale: float = 7.5, generator: torch.Generator | None = None,
                    latents: torch.Tensor | None = None, output_type: str = "pil"):
    """Dense Diffusion (Kim et al. 2023; Ahmad's notes, §3.3.3): generate ``prompt`` with each
    segment's phrase steered into its mask by attention modulation, no gradient, no training.

    ``segments``: a list of ``(phrase, mask)``; every phrase occurs in ``prompt``; the masks are
    2-D binary arrays or tensors of one shape (any resolution: they are resized, nearest, to
    every layer's grid), not empty, not overlapping.

    At every DDIM step (Ahmad's notes, eq 1.21) of classifier-free-guided sampling (eq 1.44),
    the controller (:class:`DenseController`) adds to the conditional rows' logits the term of
    :func:`dense_modulation` with R_cross (eq 3.17) in cross-attention and R_self (eq 3.21) in
    self-attention, scaled by λ_t (1 − S): λ_t = ``lam`` · (t/1000)^``power`` for
    cross-attention, ``lam_self`` · (t/1000)^``power`` for self-attention (eq 3.18; the official
    code's w_c = 1, w_s = 0.3, p = 5), during the first ``window`` fraction of the steps (30%
    in the official code), 0 afterwards. ``schedule``: "power" (that rule) or a callable
    ``schedule(t, i, num_steps) -> factor`` replacing (t/1000)^p and the window.
    ``separate_embeddings``: each segment's tokens take the embeddings of its phrase encoded
    alone (the official code), the rest those of the whole prompt.
    ``background``: False (default), eq 3.17 literally: a token in no segment (start, end,
    padding, "and") is pushed down everywhere, and a pixel in no segment has every logit pushed
    towards its row minimum. True: the pixels in no segment form one more segment whose tokens
    are the tokens in no segment, as the official demo's background segment covers the rest of
    the canvas (on the shapes model this places the objects less well: see the chapter).

    With λ_t = 0 (``lam = lam_self = 0``, or a schedule returning 0) the sampler is plain
    sampling of the prompt's embeddings. Returns the images as :func:`lmd` does.
    Raises ``ValueError`` naming the argument: a phrase not in the prompt, masks of the wrong
    shape, empty or overlapping, a negative λ, a window outside [0, 1].
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
    phrases, masks = _masks_tensor(segments)
    w_c = check_range(lam, "lam", 0)
    w_s = check_range(lam_self, "lam_self", 0)
    p = check_range(power, "power", 0)
    win = check_range(window, "window", 0, 1)
    sreg = check_range(size_reg, "size_reg", 0, 1)
    if not (schedule == "power" or callable(schedule)):
        raise ValueError(f"schedule must be 'power' or a callable (t, i, num_steps) -> factor, "
                         f"got {schedule!r}")
    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    gs = check_range(guidance_scale, "guidance_scale", 0)
    _check_output_type(output_type)
    tok, unet = pipe.tokenizer, pipe.unet
    L = tok.model_max_length
    token_segment = torch.full((L,), -1, dtype=torch.long)
    spans = []
    for n_, ph in enumerate(phrases):
        try:                                     # a repeated phrase: its next occurrence
            idx = word_token_indices(prompt, ph, tok, occurrence=phrases[:n_].count(ph))
        except ValueError as e:
            raise ValueError(f"segments[{n_}] phrase: {e}") from None
        if bool((token_segment[idx] >= 0).any()):
            raise ValueError(f"segments[{n_}] phrase {ph!r} shares tokens with another segment's")
        token_segment[idx] = n_
        spans.append(idx)
    if background:
        rest = ~(masks.sum(0) > 0)
        if bool(rest.any()):
            token_segment[token_segment < 0] = len(phrases)
            masks = torch.cat([masks, rest[None].double()])
    cond = encode_prompts(pipe, prompt)
    if separate_embeddings:
        cond = cond.clone()
        for ph, idx in zip(phrases, spans):
            own = encode_prompts(pipe, ph)
            k = len(idx)
            own_idx = word_token_indices(ph, ph, tok, occurrence=0)[:k]
            cond[0, idx[: len(own_idx)]] = own[0, own_idx]
    use_cfg = gs != 1.0
    null = encode_prompts(pipe, "") if use_cfg else None
    x = _initial_latent(pipe, generator, latents)
    ts = pipe_timesteps(pipe, N)
    acl = pipe_alphas_cumprod(pipe).tolist()
    T = int(pipe.scheduler.config.num_train_timesteps)
    layout = BatchLayout(1, use_cfg)
    ctrl = DenseController(masks, token_segment, layout, w_c, w_s, sreg)
    eps_model = pipe_eps_model(pipe, cond, null, gs if use_cfg else 1.0)
    n_win = fraction_steps(win, N)
    if w_c == 0 and w_s == 0:                       # λ_t ≡ 0: nothing to attach
        store = contextlib.nullcontext()
    else:
        store = AttentionStore(kinds=("cross",), rows="all", controller=ctrl, layout=layout)
        store.attach(unet)
    try:
        for i, t in enumerate(ts):
            if schedule == "power":
                ctrl.factor = (float(t) / T) ** p if i < n_win else 0.0
            else:
                ctrl.factor = float(schedule(t, i, N))
            with torch.no_grad():
                eps = eps_model(x, batch_timesteps(t, x))
            a_prev = acl[ts[i + 1]] if i + 1 < len(ts) else 1.0
            x = ddim_step(x, eps, acl[t], a_prev)
    finally:
        if isinstance(store, AttentionStore):
            store.detach()
    return _outputs(pipe, x, output_type)


# ---------------------------------------------------------------------------- SpaText
def __getattr__(name):
    """``spatext`` and ``load_spatext`` come from :mod:`diffnotes.editing.spatext`, imported on
    first use (the SpaText model and its training live there)."""
    if name in ("spatext", "load_spatext"):
        from . import spatext as _sp
        return getattr(_sp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
