"""The guidance-scale explorer: a slider over the guidance scale (with seed and class or prompt).

``guidance_explorer(source, conditions, scales, seeds)`` accepts either

- a :class:`ClassConditional` setup — a conditional ``model(x, t, cond)`` whose batch may mix
  conditions, its null condition, a sample shape and a schedule (``ClassConditional.digits()``
  builds it for the shipped digits UNet); samples come from DDIM (η = 0) with classifier-free
  guidance, ε_u + s (ε_c − ε_u) (Ahmad's notes, eq 1.44), every scale of one (seed, class) computed
  in one batched run, so moving the scale slider costs nothing once a frame is drawn; or
- a diffusers text-to-image pipeline (anything called as ``pipe(prompt, guidance_scale=s,
  generator=g, num_inference_steps=n, num_images_per_prompt=k)`` returning ``.images``), with
  prompts as the conditions — Stable Diffusion on a GPU.

It is built on :func:`diffnotes.widgets.explorer`: live ipywidgets sliders in a kernel, and a
self-contained HTML/JS static twin (every frame precomputed) when the book is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..ddim import ddim_sample
from ..guidance import guided_eps_model
from ..schedules import make_timesteps
from ..utils import check_finite, check_tensor, image_grid, to_pil
from ._core import explorer

__all__ = ["ClassConditional", "guidance_explorer", "sample_scales", "is_pipeline"]


@dataclass
class ClassConditional:
    """A class-conditional ε-model ready for guided sampling.

    Attributes:
        model: ``model(x, t, cond) -> eps``; x (B, *shape), t a (B,) long tensor, cond a batch of
            conditions (for labels, a (B,) long tensor that may contain ``null``).
        null: the unconditional condition (e.g. ``NULL_CLASS``).
        shape: one sample's shape, e.g. (1, 16, 16).
        alphas_cumprod: the model's schedule (T,).
        num_steps: DDIM steps per sample.
        to_image: ``(N, *shape) tensor -> PIL image`` for one frame; default: a row of images.
        class_names: labels shown on the slider (default the conditions themselves).
    """
    model: Callable
    null: Any
    shape: tuple
    alphas_cumprod: torch.Tensor
    num_steps: int = 25
    to_image: Callable | None = None
    class_names: dict = field(default_factory=dict)

    @classmethod
    def digits(cls, unet=None, num_steps: int = 25, size: int = 48) -> "ClassConditional":
        """The shipped digits UNet (``diffnotes.models.digits``), with NULL_CLASS as null; each
        sample is shown enlarged (nearest neighbour) to ``size`` pixels."""
        from ..models import digits as D

        unet = unet if unet is not None else D.load_unet()
        _, ac = D.schedule()

        def model(x, t, y):
            with torch.no_grad():
                return unet(x.to(torch.float32), t, class_labels=y).sample.to(x.dtype)

        def to_image(x):
            ims = [to_pil(xi.clamp(-1, 1)).resize((size, size), 0) for xi in x]
            return image_grid(ims, cols=len(ims))

        return cls(model, D.NULL_CLASS, (1, D.IMAGE_SIZE, D.IMAGE_SIZE), ac, num_steps, to_image)


def is_pipeline(source) -> bool:
    """True for a text-to-image pipeline (called with a prompt), False for a ClassConditional."""
    return not isinstance(source, ClassConditional) and callable(source)


def sample_scales(setup: ClassConditional, cond, scales: Sequence[float], seed: int = 0,
                  n: int = 8, x_T: torch.Tensor | None = None) -> torch.Tensor:
    """Guided DDIM samples of ``cond`` for every scale, from the same ``n`` starting noises.

    All ``len(scales) · n`` chains run as one batch (so every step is one model call on
    2 · len(scales) · n rows). Returns (len(scales), n, *shape). The noise is drawn from a
    generator seeded with ``seed`` unless ``x_T`` ((n, *shape)) is given.
    """
    if not isinstance(setup, ClassConditional):
        raise TypeError(f"setup must be a ClassConditional, got {type(setup).__name__}")
    scales = [check_finite(s, f"scales[{i}]") for i, s in enumerate(scales)]
    if not scales:
        raise ValueError("scales must not be empty")
    if x_T is None:
        x_T = torch.randn((n, *setup.shape), generator=torch.Generator().manual_seed(int(seed)))
    check_tensor(x_T, "x_T")
    n = x_T.shape[0]
    S = len(scales)
    x = x_T.repeat(S, *([1] * (x_T.ndim - 1)))                      # scale-major
    s_rows = torch.tensor(scales, dtype=x.dtype).repeat_interleave(n)
    eps_model = guided_eps_model(setup.model, cond, setup.null, s_rows)
    T = len(setup.alphas_cumprod)
    out = ddim_sample(eps_model, x, make_timesteps(setup.num_steps, T), setup.alphas_cumprod,
                      eta=0.0)
    return out.reshape(S, n, *x_T.shape[1:])


def _default_to_image(x):
    return image_grid([to_pil(xi.clamp(-1, 1)) for xi in x], cols=len(x))


def guidance_explorer(source, conditions: Sequence | None = None,
                      scales: Sequence[float] = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0),
                      seeds: Sequence[int] = (0, 1), n_samples: int = 6,
                      num_inference_steps: int | None = None, title: str | None = None,
                      live: bool | None = None, dpi: int = 80, **pipe_kwargs):
    """A slider over the guidance scale (and seed, and class or prompt) showing the samples.

    Args:
        source: a :class:`ClassConditional` (e.g. ``ClassConditional.digits()``), or a
            text-to-image pipeline called as ``source(prompt, guidance_scale=s, generator=g,
            num_inference_steps=n, num_images_per_prompt=k, **pipe_kwargs)``.
        conditions: class labels (ClassConditional) or prompts (pipeline). Default: classes
            0, 1, 2 / the prompt "a photograph of an astronaut riding a horse".
        scales: guidance scales, diffusers' convention (0 unconditional, 1 conditional).
        seeds: seeds of the starting noise (a slider).
        n_samples: images per frame.
        num_inference_steps: sampler steps (default: the setup's ``num_steps``; 30 for a pipeline).
        live: ``None`` decides as :func:`diffnotes.widgets.explorer` does.
    Returns the live widget or the static twin (:class:`diffnotes.widgets.StaticExplorer`).
    Keep len(scales) · len(seeds) · len(conditions) modest (≤ ~60 frames) for the static twin.
    """
    scales = [check_finite(s, f"scales[{i}]") for i, s in enumerate(scales)]
    seeds = [int(s) for s in seeds]
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if is_pipeline(source):
        prompts = list(conditions) if conditions is not None else \
            ["a photograph of an astronaut riding a horse"]
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"conditions must be prompts (str) for a pipeline, got {bad[0]!r}")
        steps = num_inference_steps or 30
        cache: dict = {}

        def render(scale, seed, prompt):
            key = (scale, seed, prompt)
            if key not in cache:
                out = source(prompt, guidance_scale=float(scale),
                             generator=torch.Generator().manual_seed(seed),
                             num_inference_steps=steps, num_images_per_prompt=n_samples,
                             **pipe_kwargs)
                images = out.images if hasattr(out, "images") else out[0]
                cache[key] = image_grid(list(images), cols=len(images))
            return cache[key]

        params = {"scale": scales, "seed": seeds, "prompt": prompts}
        return explorer(render, params, title=title or "Classifier-free guidance scale",
                        live=live, dpi=dpi)

    if not isinstance(source, ClassConditional):
        raise TypeError("source must be a ClassConditional setup or a text-to-image pipeline, "
                        f"got {type(source).__name__}")
    setup = source
    if num_inference_steps is not None:
        setup = ClassConditional(setup.model, setup.null, setup.shape, setup.alphas_cumprod,
                                 int(num_inference_steps), setup.to_image, setup.class_names)
    classes = list(conditions) if conditions is not None else [0, 1, 2]
    to_image = setup.to_image or _default_to_image
    shown = [setup.class_names.get(c, c) for c in classes]
    batches: dict = {}

    def render(scale, seed, cls):
        k = shown.index(cls)
        if (seed, k) not in batches:          # every scale of this (seed, class) at once
            batches[(seed, k)] = sample_scales(setup, classes[k], scales, seed, n_samples)
        return to_image(batches[(seed, k)][scales.index(scale)])

    params = {"scale": scales, "seed": seeds, "class": shown}
    return explorer(lambda scale, seed, **kw: render(scale, seed, kw["class"]), params,
                    title=title or "Classifier-free guidance scale", live=live, dpi=dpi)
