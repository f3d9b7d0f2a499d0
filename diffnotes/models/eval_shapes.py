"""Quality of the shapes text-to-image model, judged by things that do not depend on the model.

On single-object prompts (``"a large red star on the left"``) the evaluator generates one image
per prompt, records the cross-attention (:mod:`diffnotes.attention`), and asks four questions:

* **colour**: the mean RGB inside the object's region, nearest colour of the generator's palette
  (:data:`diffnotes.data.shapes.COLORS`);
* **shape**: a small classifier (a support-vector machine on the object's mask cropped to its
  box and resized to 16×16) trained in a few seconds on the generator's own renders — blurred a
  little, so that it has seen soft edges like those a VAE decoder produces;
* **position**: the object's centroid, nearest of the generator's left / center / right
  columns (``size`` by area, reported but without a goal);
* **attention faithfulness**: the object noun's cross-attention map averaged over all steps and
  all cross-attention layers (Ahmad's notes, eqs 1.47 and 3.1), upsampled to 64×64,
  min-max normalised and thresholded at ``threshold`` (default 0.5), against the object's mask;
  mean IoU over the sample.

Where the mask comes from. A generated image has no ground-truth mask, and the generator's mask
for the prompted object is not defined either (the prompt fixes the column, not the exact centre
nor the height). So the mask is **segmented from the generated image**: the background colour
is the median of the border pixels (the generator's backgrounds are dark and nearly grey, every
object colour is far from them), foreground = pixels farther from it (RGB distance) than
0.25, or than 90% of the border pixels plus 0.08 on textured backgrounds, then the largest
connected component with its holes filled. The same segmentation is what the shape and colour judges
see, and :func:`judge_accuracy` measures all judges on the generator's own scenes, where the
truth is known.

``python -m diffnotes.models.eval_shapes`` prints the figures for the shipped model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import shapes as S

__all__ = ["GOALS", "single_object_prompts", "segment_object", "judge_color", "judge_position",
           "judge_size", "shape_judge", "judge_shape", "attention_iou", "judge_accuracy",
           "evaluate", "EvalResult", "segment_objects", "judge_scene", "binding_outcome",
           "OUTCOMES", "two_object_prompts", "scene_judge_accuracy"]

#: the issue's goals: fractions correct, and the mean IoU of attention maps.
GOALS = {"color": 0.90, "shape": 0.85, "position": 0.80, "attention_miou": 0.5}

_FG_DIST = 0.25      # least RGB distance from the background colour that counts as object
_CROP = 16           # side of the normalised mask the shape judge sees
_SIZE_AREA = 230.0   # px: between a small (r = 6.5, ~133 px) and a large (r = 10.5, ~346 px) disk


# ---------------------------------------------------------------------------- prompts
def single_object_prompts(n: int, seed: int = 0, shapes=None, colors=None,
                          mention_size: bool = True) -> list[dict]:
    """``n`` single-object prompts covering every (shape, colour) pair of the training concepts
    as evenly as possible, with a random size and a position cycled over left/center/right.

    Returns dicts ``{shape, color, size, position, prompt}``; deterministic for ``seed``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    shapes = tuple(shapes or S.TRAIN_SHAPES)
    colors = tuple(colors or S.TRAIN_COLORS)
    rng = np.random.default_rng(seed)
    pairs = [(s, c) for s in shapes for c in colors]
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(n // len(pairs) + 1)])[:n]
    positions = tuple(S.POSITIONS)
    out = []
    for i, k in enumerate(order):
        shape, color = pairs[k]
        size = str(rng.choice(tuple(S.SIZES)))
        position = positions[(i + int(rng.integers(3))) % 3]
        prompt = S.prompt_for(shape, color, size if mention_size else None, position)
        out.append(dict(shape=shape, color=color, size=size, position=position, prompt=prompt))
    return out


# ---------------------------------------------------------------------------- judges
def _as_hwc(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be a PIL image or an HWC RGB array, got shape {arr.shape}")
    return arr


def segment_object(image) -> np.ndarray:
    """Boolean mask (H, W) of the main object: pixels far (RGB distance, see the module doc) from
    the background colour (median of the border pixels), largest connected component.
    An image without any such pixel gives an all-False mask."""
    from scipy import ndimage

    img = _as_hwc(image)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    # textured backgrounds (stripes, checkers, noise) spread the border's distances: sit above
    # 90% of them (an object may touch the border, so not above all of them)
    thr = max(_FG_DIST, float(np.quantile(np.linalg.norm(border - bg, axis=-1), 0.9)) + 0.08)
    fg = dist > thr
    lab, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(img.shape[:2], dtype=bool)
    sizes = ndimage.sum(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(lab == (1 + int(np.argmax(sizes))))


def judge_color(image, mask: np.ndarray, palette: dict | None = None) -> str:
    """Nearest palette colour (default: every colour of the generator) to the mean RGB of the
    mask's pixels (the eroded mask when large enough, to skip blended edges)."""
    from scipy import ndimage

    img = _as_hwc(image)
    palette = palette or S.COLORS
    if not mask.any():
        return "none"
    inner = ndimage.binary_erosion(mask, iterations=1)
    m = inner if inner.sum() >= 8 else mask
    rgb = img[m].mean(0)
    names = list(palette)
    d = [np.linalg.norm(rgb - np.asarray(palette[c])) for c in names]
    return names[int(np.argmin(d))]


def judge_position(mask: np.ndarray) -> str:
    """Nearest of the generator's column centres (:data:`POSITIONS`) to the mask's centroid."""
    if not mask.any():
        return "none"
    cx = np.nonzero(mask)[1].mean() + 0.5
    names = list(S.POSITIONS)
    return names[int(np.argmin([abs(cx - S.POSITIONS[p]) for p in names]))]


def judge_size(mask: np.ndarray) -> str:
    """``"small"`` or ``"large"`` by area (threshold between the two sizes' areas)."""
    if not mask.any():
        return "none"
    return "large" if mask.sum() > _SIZE_AREA else "small"


def _mask_feature(mask: np.ndarray) -> np.ndarray:
    """The mask cropped to its box, padded to a square, resized to 16×16 (area-averaged)."""
    if not mask.any():
        return np.zeros(_CROP * _CROP)
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    h, w = crop.shape
    s = max(h, w)
    sq = np.zeros((s, s), np.float32)
    sq[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = crop
    t = torch.from_numpy(sq)[None, None]
    return torch.nn.functional.interpolate(t, size=(_CROP, _CROP), mode="area")[0, 0] \
        .numpy().ravel().astype(np.float64)


def _render_set(n: int, seed: int, blur: bool = True):
    """Single-object scenes of the generator (every shape, held-out ones included), with a
    random Gaussian blur (σ in [0, 1.2] px) on half of them; their segmented masks."""
    from scipy import ndimage

    sc = S.generate_scenes(n, seed=seed, min_objects=1, max_objects=1, include_held_out=True,
                           shapes=S.SHAPES)
    rng = np.random.default_rng(seed + 1)
    images = sc.images.astype(np.float64)
    if blur:
        for i in range(n):
            if rng.random() < 0.5:
                sig = rng.uniform(0.3, 1.2)
                images[i] = ndimage.gaussian_filter(images[i], sigma=(sig, sig, 0))
    return sc, images


@functools.lru_cache(maxsize=2)
def shape_judge(n_train: int = 800, seed: int = 12345):
    """The shape classifier: an RBF support-vector machine on :func:`_mask_feature` of the
    segmented masks of ``n_train`` blurred single-object renders of the generator (every shape,
    held-out ones included). Trained once per process (cached; a few seconds). Returns a fitted
    ``sklearn`` classifier whose classes are shape names."""
    from sklearn.svm import SVC

    sc, images = _render_set(n_train, seed)
    X = np.stack([_mask_feature(segment_object(im)) for im in images])
    y = np.array([o[0]["shape"] for o in sc.objects])
    clf = SVC(C=10.0, gamma="scale")
    clf.fit(X, y)
    return clf


def judge_shape(mask: np.ndarray, clf=None) -> str:
    """Shape name predicted by :func:`shape_judge` for a mask (``"none"`` if empty)."""
    if not mask.any():
        return "none"
    clf = clf or shape_judge()
    return str(clf.predict(_mask_feature(mask)[None])[0])


def attention_iou(att_map, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU between a cross-attention map (any (h, w); upsampled bilinearly to the mask's size,
    min-max normalised, thresholded at ``threshold``) and a boolean mask."""
    from ..attention import normalize_map, upsample

    m = torch.as_tensor(np.asarray(att_map.detach().cpu() if isinstance(att_map, torch.Tensor)
                                   else att_map), dtype=torch.float64)
    if m.ndim != 2:
        raise ValueError(f"att_map must be 2-D (h, w), got shape {tuple(m.shape)}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    a = normalize_map(upsample(m, mask.shape)).numpy() >= threshold
    union = (a | mask).sum()
    return float((a & mask).sum() / union) if union else 0.0


def judge_accuracy(n: int = 300, seed: int = 777) -> dict:
    """The judges on the generator's own (blurred) single-object scenes, where the truth is
    known: fraction correct for colour, shape, position and size. A judge that failed here
    could not be trusted on generated images."""
    sc, images = _render_set(n, seed)
    clf = shape_judge()
    hits = {"color": 0, "shape": 0, "position": 0, "size": 0}
    for im, objs in zip(images, sc.objects):
        o = objs[0]
        m = segment_object(im)
        hits["color"] += judge_color(im, m) == o["color"]
        hits["shape"] += judge_shape(m, clf) == o["shape"]
        hits["position"] += judge_position(m) == o["position"]
        hits["size"] += judge_size(m) == o["size"]
    return {k: v / n for k, v in hits.items()}


# ---------------------------------------------------------------------------- scenes of several objects
_MIN_AREA = 24       # px: smaller components are specks of a decoder, not objects


def segment_objects(image, min_area: int = _MIN_AREA) -> list[np.ndarray]:
    """Boolean masks (H, W) of every object: the foreground of :func:`segment_object` (the same
    background colour and threshold), split by nearest palette colour, then into connected
    components of at least ``min_area`` pixels, holes filled, largest first. Touching objects
    of one colour merge into one component; :func:`scene_judge_accuracy` measures how often
    the judges miss on the generator's own scenes."""
    from scipy import ndimage

    img = _as_hwc(image)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    thr = max(_FG_DIST, float(np.quantile(np.linalg.norm(border - bg, axis=-1), 0.9)) + 0.08)
    fg = dist > thr
    # split the foreground by nearest palette colour first, so that two touching objects of
    # different colours stay two objects
    pal = np.asarray(list(S.COLORS.values()))
    nearest = np.argmin(np.linalg.norm(img[..., None, :] - pal, axis=-1), axis=-1)
    masks = []
    for c in range(len(pal)):
        lab, n = ndimage.label(fg & (nearest == c))
        masks += [ndimage.binary_fill_holes(lab == k) for k in range(1, n + 1)]
    masks = [m for m in masks if m.sum() >= min_area]
    return sorted(masks, key=lambda m: -int(m.sum()))


def judge_scene(image, clf=None, min_area: int = _MIN_AREA) -> list[dict]:
    """Every object of a generated (or rendered) scene, judged: a list of ``{mask, area, box,
    color, shape, position}`` (box ``(x0, y0, x1, y1)`` in pixels, end-exclusive, like the
    generator's), largest first. The colour and shape judges are those of the single-object
    evaluation, applied to each component."""
    clf = clf or shape_judge()
    out = []
    for m in segment_objects(image, min_area):
        ys, xs = np.nonzero(m)
        out.append(dict(mask=m, area=int(m.sum()),
                        box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                        color=judge_color(image, m), shape=judge_shape(m, clf),
                        position=judge_position(m)))
    return out


#: the outcomes of :func:`binding_outcome`, in the order they are tested.
OUTCOMES = ("neglect", "binding", "wrong_shape", "correct")


def binding_outcome(found: list[dict], requested: list[dict]) -> str:
    """Classify a generated scene against the requested objects (dicts with ``shape`` and
    ``color``; distinct shapes), in this order:

    * ``"neglect"``: fewer objects found than requested;
    * ``"correct"``: every requested (shape, colour) pair is found;
    * ``"binding"``: every requested shape is found, but some colour sits on the wrong object
      or is repeated (attribute leakage: "a red circle and a blue square" drawn with a blue
      circle, or two red objects);
    * ``"wrong_shape"``: enough objects, but a requested shape is missing (a star drawn for a
      square).
    """
    if len(found) < len(requested):
        return "neglect"
    pairs = {(o["shape"], o["color"]) for o in found}
    if all((r["shape"], r["color"]) in pairs for r in requested):
        return "correct"
    shapes = {o["shape"] for o in found}
    if all(r["shape"] in shapes for r in requested):
        return "binding"
    return "wrong_shape"


def two_object_prompts(n: int, seed: int = 0, shapes=None, colors=None) -> list[dict]:
    """``n`` prompts of two objects without positions, distinct shapes and distinct colours
    (``"a red circle and a blue square"``), every ordered pair of shapes about equally often.

    Returns dicts ``{objects: [{shape, color}, {shape, color}], prompt}``; deterministic."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    shapes = tuple(shapes or S.TRAIN_SHAPES)
    colors = tuple(colors or S.TRAIN_COLORS)
    rng = np.random.default_rng(seed)
    pairs = [(a, b) for a in shapes for b in shapes if a != b]
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(n // len(pairs) + 1)])[:n]
    out = []
    for k in order:
        c1, c2 = rng.choice(len(colors), size=2, replace=False)
        objs = [dict(shape=pairs[k][0], color=colors[c1]), dict(shape=pairs[k][1], color=colors[c2])]
        out.append(dict(objects=objs, prompt=S.caption_objects(objs, False, False)[0]))
    return out


def scene_judge_accuracy(n: int = 200, seed: int = 4242) -> dict:
    """The scene judges on the generator's own two-object scenes (distinct shapes and colours,
    blurred like :func:`_render_set`), where the answer is "correct" every time: the fraction
    of each outcome of :func:`binding_outcome`. ``correct`` is the judges' accuracy; the rest
    is how often they would call a perfect image a failure."""
    from scipy import ndimage

    sc = S.generate_scenes(4 * n, seed=seed, min_objects=2, max_objects=2)
    rng = np.random.default_rng(seed + 1)
    clf = shape_judge()
    counts = dict.fromkeys(OUTCOMES, 0)
    used = 0
    for im, objs in zip(sc.images, sc.objects):
        if len({o["shape"] for o in objs}) < 2 or len({o["color"] for o in objs}) < 2:
            continue
        im = im.astype(np.float64)
        if rng.random() < 0.5:
            sig = rng.uniform(0.3, 1.2)
            im = ndimage.gaussian_filter(im, sigma=(sig, sig, 0))
        counts[binding_outcome(judge_scene(im, clf), objs)] += 1
        used += 1
        if used == n:
            break
    return {k: v / used for k, v in counts.items()}


# ---------------------------------------------------------------------------- the evaluation
@dataclass
class EvalResult:
    """Fractions correct, the attention mean IoU, and one record per generated image."""
    color: float
    shape: float
    position: float
    size: float
    attention_miou: float
    n: int
    records: list
    images: list

    def passes(self) -> dict:
        """Goal name -> bool, for :data:`GOALS`."""
        return {k: getattr(self, k) >= v for k, v in GOALS.items()}

    def summary(self) -> str:
        return (f"n={self.n}: color {self.color:.0%}, shape {self.shape:.0%}, position "
                f"{self.position:.0%}, size {self.size:.0%}, attention mean IoU "
                f"{self.attention_miou:.3f}")


def evaluate(pipe, n: int = 30, seed: int = 0, num_inference_steps: int = 20,
             guidance_scale: float = 4.0, batch_size: int = 10, threshold: float = 0.5,
             progress: bool = True, keep_images: bool = False) -> EvalResult:
    """Generate ``n`` single-object images with ``pipe`` and judge them (see the module doc).

    Images are generated ``batch_size`` prompts at a time, with a generator seeded by ``seed``;
    the cross-attention of every step and every layer is recorded by an
    :class:`~diffnotes.attention.AttentionStore` (prompt rows only) and averaged.
    Returns an :class:`EvalResult`.
    """
    from ..attention import AttentionStore, word_token_indices

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    specs = single_object_prompts(n, seed)
    clf = shape_judge()
    g = torch.Generator().manual_seed(seed)
    records, images = [], []
    cfg = guidance_scale > 1
    batches = [specs[i:i + batch_size] for i in range(0, n, batch_size)]
    for batch in tqdm(batches, disable=not progress, desc="evaluating", leave=False):
        prompts = [b["prompt"] for b in batch]
        store = AttentionStore(kinds=("cross",), rows="cond" if cfg else "all")
        store.attach(pipe.unet)
        try:
            out = pipe(prompts, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, generator=g, output_type="np")
        finally:
            store.detach()
        maps = store.maps("cross")                          # (B, h, w, M): all steps, layers
        for j, (spec, im) in enumerate(zip(batch, out.images)):
            mask = segment_object(im)
            idx = word_token_indices(spec["prompt"], spec["shape"], pipe.tokenizer)
            att = maps[j][..., idx].mean(-1)
            rec = dict(spec, color_pred=judge_color(im, mask), shape_pred=judge_shape(mask, clf),
                       position_pred=judge_position(mask), size_pred=judge_size(mask),
                       iou=attention_iou(att, mask, threshold), area=int(mask.sum()))
            records.append(rec)
            if keep_images:
                images.append(dict(image=im, mask=mask, attention=att.cpu().numpy()))

    def frac(key):
        return float(np.mean([r[f"{key}_pred"] == r[key] for r in records]))

    return EvalResult(color=frac("color"), shape=frac("shape"), position=frac("position"),
                      size=frac("size"), attention_miou=float(np.mean([r["iou"] for r in records])),
                      n=n, records=records, images=images)


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import os
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args()
    from .load import load_pipeline

    t0 = time.perf_counter()
    print("judges on the generator's own scenes:", judge_accuracy())
    res = evaluate(load_pipeline("shapes"), n=args.n, seed=args.seed,
                   num_inference_steps=args.steps, guidance_scale=args.guidance)
    print(res.summary(), f"({time.perf_counter() - t0:.0f} s)")
