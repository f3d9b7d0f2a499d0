"""The Attend-and-Excite explorer: the step scale and the refinement threshold.

Built on :func:`diffnotes.widgets.explorer` (live sliders in a kernel, a static twin with every
frame precomputed on the website), modelled on :mod:`diffnotes.widgets.p2p`. Each frame is one
batched :func:`diffnotes.editing.binding.attend_and_excite` run of a few prompts from fixed
initial latents, shown above their plain samples (scale 0, the same latents), with the judged
outcome of each image and the number of refinement updates.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..utils import check_range, check_tensor
from ._core import explorer
from .p2p import pair_render

__all__ = ["ae_explorer", "ae_frame"]


def ae_frame(pipe, specs: Sequence[dict], latents: torch.Tensor, scale_factor: float,
             threshold: float, softmax_tokens: str = "diffusers", num_inference_steps: int = 10,
             max_iter_to_alter: int = 5, scale: int = 2, plain=None):
    """One frame: the A&E images of ``specs`` (two-object prompt dicts of
    :func:`diffnotes.models.eval_shapes.two_object_prompts`) with ``scale_factor`` and the
    threshold schedule {0: threshold, N/2: threshold} (``threshold`` 0: no refinement), in a
    row, labelled with the judged outcome; above them the plain samples (``plain``, or
    computed). Returns ``(image, outcomes)``."""
    from PIL import Image

    from ..editing.binding import attend_and_excite
    from ..models import eval_shapes as ev

    prompts = [s["prompt"] for s in specs]
    words = [[o["shape"] for o in s["objects"]] for s in specs]
    N = num_inference_steps
    thr = {0: threshold, N // 2: threshold}
    ims, tr = attend_and_excite(pipe, prompts, words, thresholds=thr, scale_factor=scale_factor,
                                max_iter_to_alter=max_iter_to_alter,
                                softmax_tokens=softmax_tokens, num_inference_steps=N,
                                latents=latents, output_type="np")
    if plain is None:
        plain, _ = attend_and_excite(pipe, prompts, words, thresholds={0: 0.0}, scale_factor=0,
                                     max_iter_to_alter=0, num_inference_steps=N,
                                     latents=latents, output_type="np")
    clf = ev.shape_judge()
    outcomes = [ev.binding_outcome(ev.judge_scene(im, clf), s["objects"])
                for im, s in zip(ims, specs)]
    base = [ev.binding_outcome(ev.judge_scene(im, clf), s["objects"])
            for im, s in zip(plain, specs)]
    to_pil = [Image.fromarray((a * 255).round().astype("uint8")) for a in list(plain) + list(ims)]
    n = len(specs)
    refined = sum(tr["refined"].values())
    top = pair_render(to_pil[:n], [f"plain: {o}" for o in base], scale=scale, colors=None)
    bottom = pair_render(to_pil[n:], [f"A&E: {o}" for o in outcomes], scale=scale, colors=None)
    out = Image.new("RGB", (top.width, top.height + bottom.height + 14), (255, 255, 255))
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height + 14))
    from PIL import ImageDraw
    ImageDraw.Draw(out).text((2, top.height + 1), f"scale {scale_factor:g}, threshold "
                             f"{threshold:g}: {refined} refinement updates", fill=(0, 0, 0))
    return out.quantize(colors=64), outcomes


def ae_explorer(pipe, specs: Sequence[dict], latents: torch.Tensor,
                scales: Sequence[float] = (0.0, 1.0, 5.0, 20.0),
                thresholds: Sequence[float] = (0.0, 0.8, 0.99),
                softmax_tokens: str = "diffusers", num_inference_steps: int = 10,
                max_iter_to_alter: int = 5, title: str = "Attend-and-Excite: step scale and "
                "threshold", live: bool | None = None):
    """Sliders over A&E's ``scale_factor`` and refinement ``threshold`` (len(scales) ×
    len(thresholds) frames: keep it ≲ 20), on the prompts ``specs`` from ``latents``
    (B, C, h, w). Raises ``ValueError`` for a threshold outside [0, 1], a negative scale, or
    latents of the wrong rank."""
    from ..editing.binding import attend_and_excite

    scales = [check_range(s, "scales", 0) for s in scales]
    thresholds = [check_range(t, "thresholds", 0, 1) for t in thresholds]
    check_tensor(latents, "latents", ndim=4)
    prompts = [s["prompt"] for s in specs]
    words = [[o["shape"] for o in s["objects"]] for s in specs]
    plain, _ = attend_and_excite(pipe, prompts, words, thresholds={0: 0.0}, scale_factor=0,
                                 max_iter_to_alter=0, num_inference_steps=num_inference_steps,
                                 latents=latents, output_type="np")

    def frame(scale, threshold):
        return ae_frame(pipe, specs, latents, scale, threshold, softmax_tokens,
                        num_inference_steps, max_iter_to_alter, plain=plain)[0]

    return explorer(frame, {"scale": scales, "threshold": thresholds}, title=title, live=live)
