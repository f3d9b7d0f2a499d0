"""SR3/Palette: a diffusion model conditioned on the degraded image by concatenation.

Zhu's slides, *Image Super-Resolution via Iterative Refinement*: "the condition is concatenated
with y_t along the channel dimension" (Saharia et al. 2021, SR3, §2.1 and Fig. 2; Palette,
Saharia et al. 2022, uses the same network for colourisation, inpainting, uncropping and JPEG
restoration). The network sees ``cat([x_t, up(y)])`` — 6 channels: the noisy high-resolution
image and the low-resolution input upsampled to its size — and predicts ε; it is trained like
DDPM on (x, y) pairs, so it models p(x | y) directly, without an operator at sampling time.

Here: ×4 super-resolution of the 32×32 shapes scenes (8×8 → 32×32), y = average pooling ×4
(:func:`diffnotes.restoration.operators.super_resolution`), up = bicubic (SR3's), the DDPM
linear schedule of :mod:`diffnotes.models.pixel_shapes` (SR3 itself conditions on a continuous
noise level; not needed for this demonstration) and its UNet layout with ``in_channels = 6``.

Retrain (the weights in ``diffnotes/weights/sr3_shapes/`` were made by this command)::

    torchrun --standalone --nproc_per_node 2 -m diffnotes.restoration.sr3 train --minutes 14

initialised from the shipped pixel model (``--init-from-prior``, the default; see
:func:`build_sr3_unet`), with the loop of :func:`diffnotes.models.pixel_shapes.train_model`
(Accelerate; TRAINING.json next to the weights).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import pixel_shapes as P
from ..utils import check_int, check_tensor

__all__ = ["FACTOR", "WEIGHTS_DIR", "build_sr3_unet", "load_sr3", "condition", "sr3_eps_model",
           "weights_available"]

FACTOR = 4
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "sr3_shapes"


def build_sr3_unet(init_from_prior: bool = False):
    """A fresh ``UNet2DModel`` of the pixel model's layout with 6 input channels (x_t and the
    upsampled low-resolution image).

    ``init_from_prior=True`` starts from the shipped unconditional pixel model: every weight is
    copied, the first convolution's kernels for the 3 new input channels are zero, so the
    network starts as the unconditional denoiser and training only has to teach it to use the
    condition (the zero-initialised extra input channels of later image-conditioned models; SR3
    and Palette train from scratch, which a CPU budget of minutes does not allow)."""
    unet = P.build_unet(in_channels=6)
    if init_from_prior:
        prior = P.load()
        state = prior.state_dict()
        w = state["conv_in.weight"]                                   # (C, 3, 3, 3)
        state["conv_in.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)
        unet.load_state_dict(state)
    return unet


def weights_available(path=None) -> bool:
    """True when the shipped SR3 weights (config.json + safetensors) are on disk."""
    return P.weights_available(path if path is not None else WEIGHTS_DIR)


def load_sr3(device=None, dtype=None, path=None):
    """The shipped SR3 UNet (``UNet2DModel.from_pretrained`` on ``diffnotes/weights/sr3_shapes``);
    eval mode, gradients off. Raises ``FileNotFoundError`` if missing."""
    p = Path(path) if path is not None else WEIGHTS_DIR
    if not weights_available(p):
        raise FileNotFoundError(f"no SR3 weights in {p}; train them with "
                                "`python -m diffnotes.restoration.sr3 train`")
    return P.load(device=device, dtype=dtype, path=p)


def condition(y: torch.Tensor, size: int = P.IMAGE_SIZE, mode: str = "bicubic") -> torch.Tensor:
    """The conditioning image: the low-resolution ``y`` (B, 3, h, w) upsampled to ``size``
    (bicubic as in SR3, clamped to [−1, 1]; ``mode="nearest"`` gives A⁺y of average pooling)."""
    y = check_tensor(y, "y", ndim=4)
    size = check_int(size, "size", min=1)
    if mode == "nearest":
        return F.interpolate(y, size=(size, size), mode="nearest")
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic', 'bilinear' or 'nearest', got {mode!r}")
    return F.interpolate(y, size=(size, size), mode=mode, align_corners=False).clamp(-1, 1)


def sr3_eps_model(unet):
    """``f(x, t, cond) -> ε_θ(cat[x_t, cond], t)`` (SR3's concatenation, Saharia et al. 2021,
    §2.1): ``cond`` (B, 3, 32, 32) is :func:`condition` of the low-resolution input."""
    def f(x, t, cond):
        return P.eps_model(unet, cond=cond)(x, t)
    return f


def _sr3_batch(x_uint8, g):
    x0 = x_uint8.float() / 127.5 - 1.0
    flip = torch.rand(x0.shape[0], generator=g) < 0.5
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    y = F.avg_pool2d(x0, FACTOR)                                   # the operator's A
    return x0, condition(y, x0.shape[-1])


def main(argv=None) -> None:
    """``python -m diffnotes.restoration.sr3 train [--minutes N] ...``."""
    p = argparse.ArgumentParser(prog="python -m diffnotes.restoration.sr3",
                                description="Train the shipped SR3 (×4) model of the scenes.")
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the conditional UNet (ε-loss)")
    P.add_train_arguments(tr, 20.0, WEIGHTS_DIR)
    tr.add_argument("--init-from-prior", action=argparse.BooleanOptionalAction, default=True,
                    help="start from the shipped pixel model, zero kernels for the condition")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    P.train_model(args, build=lambda: build_sr3_unet(args.init_from_prior),
                  make_batch=_sr3_batch, out_dir=Path(args.out), name="restoration.sr3")


if __name__ == "__main__":
    main()
