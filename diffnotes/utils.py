"""Small shared helpers: device and dtype choice, seeding, argument checks, image conversion.

Everything here is used by more than one module or chapter. The argument checks raise
``ValueError``/``TypeError`` messages of one shape: the argument's name, what was received and
what was expected.
"""
from __future__ import annotations

import math
import os
import random
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "pick_device", "pick_dtype", "seed_everything", "to_pil", "image_grid",
    "check_tensor", "check_same_shape", "check_timestep", "check_decreasing", "check_finite",
    "gather", "has_gpu",
]


# ---------------------------------------------------------------------------- devices and seeds
def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA if available, then Apple's MPS, then CPU. ``prefer`` forces one (e.g. ``"cpu"``)."""
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """float16 on CUDA (what Stable Diffusion runs in on Colab), float32 elsewhere."""
    device = torch.device(device) if device is not None else pick_device()
    return torch.float16 if device.type == "cuda" else torch.float32


def has_gpu() -> bool:
    """True when CUDA is available (the chapters' "On a GPU" cells check this)."""
    return torch.cuda.is_available()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU ``torch.Generator`` with that seed.

    Library functions take explicit generators; this is for the top of a chapter.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    return torch.Generator().manual_seed(int(seed))


# ---------------------------------------------------------------------------- argument checks
def check_tensor(x, name: str, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Return ``x`` if it is a tensor (with ``ndim`` dimensions if given), else raise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(x.shape)}")
    return x


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` naming both arguments and their shapes unless they match."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} and {name_b} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def check_finite(value, name: str) -> float:
    """A finite real number (a Python or NumPy scalar, or a one-element tensor)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_timestep(t, T: int, name: str = "t") -> torch.Tensor | int:
    """``t`` is an int or an integer tensor of indices into a length-``T`` schedule: 0 <= t < T."""
    if isinstance(t, torch.Tensor):
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer time-step indices, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
            raise ValueError(f"{name} must lie in [0, {T - 1}] (0-based index into a schedule of "
                             f"length {T}), got values in [{int(t.min())}, {int(t.max())}]")
        return t
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    if not 0 <= int(t) < T:
        raise ValueError(f"{name} must lie in [0, {T - 1}] (0-based index into a schedule of "
                         f"length {T}), got {int(t)}")
    return int(t)


def check_decreasing(timesteps: Iterable[int], T: int, name: str = "timesteps") -> list[int]:
    """A non-empty list of integer indices in [0, T), strictly decreasing (high noise first)."""
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.tolist()
    ts = list(timesteps)
    if not ts:
        raise ValueError(f"{name} must not be empty")
    for v in ts:
        check_timestep(v, T, name)
    ts = [int(v) for v in ts]
    bad = [i for i in range(len(ts) - 1) if ts[i + 1] >= ts[i]]
    if bad:
        i = bad[0]
        raise ValueError(f"{name} must be strictly decreasing (high noise first), got "
                         f"{ts[i]} followed by {ts[i + 1]} at position {i}")
    return ts


def gather(values: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped to broadcast against ``like`` (a scalar ``t`` or one per batch row)."""
    out = values.to(device=like.device, dtype=like.dtype)[t]
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        return out.reshape(-1, *([1] * (like.ndim - 1)))
    return out


# ---------------------------------------------------------------------------- images
def to_pil(x):
    """A tensor (C, H, W) or (H, W) in [-1, 1], or an array HWC/HW in [0, 1], to a PIL image."""
    from PIL import Image

    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim == 3:
            x = x.permute(1, 2, 0)
        arr = ((x.numpy() + 1) / 2).clip(0, 1)
    else:
        arr = np.asarray(x, dtype=np.float64).clip(0, 1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"x must be an image of 2 or 3 dimensions, got shape {arr.shape}")
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def image_grid(images: Sequence, rows: int | None = None, cols: int | None = None, pad: int = 2):
    """Paste PIL images (or anything :func:`to_pil` takes) into one grid image."""
    from PIL import Image

    ims = [im if isinstance(im, Image.Image) else to_pil(im) for im in images]
    if not ims:
        raise ValueError("images must not be empty")
    n = len(ims)
    if cols is None:
        cols = math.ceil(n / rows) if rows else min(n, 8)
    rows = math.ceil(n / cols)
    w = max(im.width for im in ims)
    h = max(im.height for im in ims)
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for i, im in enumerate(ims):
        grid.paste(im.convert("RGB"), ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid
