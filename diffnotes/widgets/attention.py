"""The attention explorer: pick a word, a range of denoising steps and a resolution; see where
the UNet's cross-attention puts that word on the generated image.

Built on :func:`diffnotes.widgets.explorer`: live ipywidgets sliders in a kernel, a static twin
(every frame precomputed, self-contained HTML and JavaScript) on the website.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..attention import (AttentionStore, generate_with_attention, overlay, prompt_words,
                         word_token_indices)
from ._core import explorer

__all__ = ["attention_explorer", "STOP_WORDS", "step_ranges"]

#: words the explorer skips by default (they rarely own a region of the image).
STOP_WORDS = frozenset({"a", "an", "the", "on", "in", "and", "of", "with", "at", "to"})


def step_ranges(num_steps: int, n_ranges: int = 3) -> dict[str, tuple[int, int] | None]:
    """Labels → ``(start, stop)`` step ranges: ``"all"`` and ``n_ranges`` contiguous thirds (or
    other fractions) of the ``num_steps`` denoising steps, early (noisy) steps first."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(n_ranges, int) or not 1 <= n_ranges <= num_steps:
        raise ValueError(f"n_ranges must be an int in [1, {num_steps}], got {n_ranges!r}")
    out: dict[str, tuple[int, int] | None] = {"all": None}
    edges = np.linspace(0, num_steps, n_ranges + 1).round().astype(int)
    for a, b in zip(edges[:-1], edges[1:]):
        out[f"{a}–{b - 1}"] = (int(a), int(b))
    return out


def _layers_for(store: AttentionStore, res, steps) -> list[str]:
    infos = store.layers("cross", None if res == "all" else res)
    if steps is not None:
        infos = [i for i in infos if i.name in store.step_maps]
    return [i.name for i in infos]


def attention_explorer(pipe=None, prompt: str | None = None, *, store: AttentionStore | None = None,
                       image=None, tokenizer=None, words: Sequence[str] | None = None,
                       n_ranges: int = 3, num_inference_steps: int = 15,
                       guidance_scale: float = 4.0, seed: int = 0, step_max_res: int = 32,
                       scale: int = 2, alpha: float = 0.55, cmap: str = "jet",
                       show_image: bool = True,
                       title: str = "Cross-attention: word, steps, resolution",
                       live: bool | None = None):
    """Sliders over a prompt word, a step range and a resolution; each frame shows the image
    and the word's cross-attention map (Ahmad's notes, eqs 1.47 and 3.1) over it.

    Either give ``pipe`` and ``prompt`` (the explorer generates the image once with seed
    ``seed`` and records every step's cross-attention at resolutions up to ``step_max_res``),
    or an existing ``store`` recorded with ``store_steps=True`` together with its ``image``,
    ``prompt`` and ``tokenizer``. ``words`` default to the prompt's words minus
    :data:`STOP_WORDS`. Step ranges: ``"all"`` (running sums, every layer) and ``n_ranges``
    contiguous ranges; a resolution ``"all"`` averages the layers of every resolution
    (upsampled), for a step range only those whose steps were stored.

    Frames: words × (n_ranges + 1) × (resolutions + 1); keep it ≤ ~60 for the static twin.
    Each frame is the image and the overlay side by side (only the overlay if ``show_image``
    is False), upscaled ``scale`` times.
    Raises ``ValueError`` for a word not in the prompt (naming it and listing the prompt's
    words) or missing arguments.
    """
    if prompt is None or not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {prompt!r}")
    if store is None:
        if pipe is None:
            raise ValueError("give either pipe (to generate) or store, image and tokenizer")
        image, store = generate_with_attention(
            pipe, prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed), store_steps=True,
            step_max_res=step_max_res)
    if image is None:
        raise ValueError("image must be given together with store")
    tokenizer = tokenizer or getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("tokenizer must be given (or a pipe that has one)")
    if words is None:
        words = [w for w in dict.fromkeys(prompt_words(prompt)) if w not in STOP_WORDS]
    words = list(words)
    token_idx = {w: word_token_indices(prompt, w, tokenizer) for w in words}  # validates words
    ranges = step_ranges(store.num_steps, min(n_ranges, store.num_steps))
    if not store.stored_steps():
        ranges = {"all": None}
    res_labels = {"all": "all"} | {f"{r}×{r}": r for r in store.resolutions("cross")}

    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image,
                     dtype=np.float64)
    if img.max() > 1.0:
        img = img / 255.0
    H, W = img.shape[:2]
    cache: dict = {}

    def word_map(word, rlabel, reslabel):
        key = (word, rlabel, reslabel)
        if key not in cache:
            steps, res = ranges[rlabel], res_labels[reslabel]
            names = _layers_for(store, res, steps)
            if not names:
                cache[key] = None
            else:
                m = store.maps("cross", layers=names, steps=steps)
                cache[key] = m[0][..., token_idx[word]].mean(-1)
        return cache[key]

    def render(word, steps, resolution):
        from PIL import Image

        m = word_map(word, steps, resolution)
        if m is None:
            heat = np.zeros((H, W, 3))
        else:
            heat = overlay(img, m, alpha=alpha, cmap=cmap)
        both = np.concatenate([img, np.ones((H, 2, 3)), heat], axis=1) if show_image else heat
        pil = Image.fromarray((both.clip(0, 1) * 255).round().astype(np.uint8))
        return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)

    params = {"word": words, "steps": list(ranges), "resolution": list(res_labels)}
    return explorer(render, params, title=title, live=live)
