"""The MasaCtrl explorer: the start step S and the start layer L of mutual self-attention.

Built on :func:`diffnotes.widgets.explorer`: live sliders in a kernel, a static twin (every
frame precomputed) on the website. Each frame is one
:func:`diffnotes.editing.masactrl.mutual_self_attention` run from the same initial latent: the
source, the edit, and the plain sample of the target prompt (no control) beside them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..utils import check_int, check_tensor
from ._core import explorer
from .p2p import pair_render

__all__ = ["masactrl_explorer"]


def masactrl_explorer(pipe, source_prompt: str, target_prompt: str, latents: torch.Tensor,
                      start_steps: Sequence[int] = (0, 2, 4, 10),
                      start_layers: Sequence[int] | None = None, num_inference_steps: int = 10,
                      guidance_scale: float = 7.5, masks=None, scale: int = 2,
                      title: str = "MasaCtrl: start step and start layer",
                      live: bool | None = None):
    """Sliders over ``start_step`` S and ``start_layer`` L (default: every 2nd layer index from
    0 to the UNet's count, which means "no layer"). S = ``num_inference_steps`` or L = count is
    plain sampling of the target. A frame: source | MasaCtrl edit | plain target. Keep frames
    few (len(start_steps) × len(start_layers) ≲ 20).

    Raises ``ValueError`` for a step or layer out of range, or a latent of the wrong rank."""
    from ..attention import attention_layers
    from ..editing.masactrl import mutual_self_attention

    check_tensor(latents, "latents", ndim=(3, 4))
    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    count = len(attention_layers(pipe.unet, "self"))
    if start_layers is None:
        start_layers = sorted(set(range(0, count + 1, 2)) | {count})
    steps = [check_int(s, "start_steps", min=0) for s in start_steps]
    layers = [check_int(s, "start_layers", min=0) for s in start_layers]
    if any(s > N for s in steps):
        raise ValueError(f"start_steps must lie in [0, {N}], got {steps}")
    if any(s > count for s in layers):
        raise ValueError(f"start_layers must lie in [0, {count}], got {layers}")
    plain = mutual_self_attention(pipe, source_prompt, target_prompt, start_step=N,
                                  num_inference_steps=N, guidance_scale=guidance_scale,
                                  latents=latents)[1]

    def frame(start_step, start_layer):
        ims = mutual_self_attention(pipe, source_prompt, target_prompt, start_step=start_step,
                                    start_layer=start_layer, masks=masks,
                                    num_inference_steps=N, guidance_scale=guidance_scale,
                                    latents=latents)
        return pair_render([ims[0], ims[1], plain],
                           ["source", f"S={start_step} L={start_layer}", "plain target"],
                           scale=scale)

    return explorer(frame, {"start_step": steps, "start_layer": layers}, title=title, live=live)
