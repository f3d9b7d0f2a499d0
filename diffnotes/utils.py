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
    "check_int", "check_positive", "check_range", "check_choice", "check_callable",
    "batch_timesteps",
    "gather", "has_gpu", "simulating_gpu",
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


def simulating_gpu() -> bool:
    """True when the environment variable ``DIFFNOTES_SIMULATE_GPU`` is ``1`` (or ``true``/
    ``yes``/``on``).

    The switch runs the chapters' "On a GPU" cells on a CPU: :func:`has_gpu` returns True and
    ``diffnotes.models.load.load_pipeline("sd-1.5")`` (and ``"sd-2.1-base"``) return the tiny,
    randomly initialised ``"sd-1.5-layout-tiny"`` pipeline (Stable Diffusion 1.5's block layout,
    CPU, float32) instead of downloading weights. :func:`pick_device` and :func:`pick_dtype` are
    not affected (CPU and float32 on a machine without CUDA). Cells use it to keep step counts
    small when simulated. The test of the GPU cells (``tests/test_gpu_cells.py``) sets it.
    """
    return os.environ.get("DIFFNOTES_SIMULATE_GPU", "").strip().lower() in ("1", "true", "yes",
                                                                             "on")


def has_gpu() -> bool:
    """True when CUDA is available, or when :func:`simulating_gpu` (``DIFFNOTES_SIMULATE_GPU=1``).

    The chapters' "On a GPU" cells check this alone: on Colab it is CUDA; under the simulation
    switch the same cells run on the tiny SD-layout pipeline on the CPU."""
    return simulating_gpu() or torch.cuda.is_available()


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


def check_int(value, name: str, min: int | None = None) -> int:
    """An int (a Python or NumPy integer, not a bool), at least ``min`` if given.

    Raises ``ValueError`` with one message whatever is wrong (the type or the value):
    "K must be a positive int, got 0" (``min=1``), "... a non-negative int ..." (``min=0``),
    "... an int >= 3 ..." (another ``min``) or "... an int ..." (no ``min``).
    """
    what = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(min,
                                                                            f"an int >= {min}")
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or (min is not None and value < min)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_positive(value, name: str, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``allow_zero``): "sigma must be a positive number, got 0.0"
    (or "... a non-negative number ...")."""
    v = check_finite(value, name)
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"number, got {v}")
    return v


def check_range(value, name: str, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (as :func:`check_finite`) in the interval from ``lo`` to ``hi``.

    ``lo_open``/``hi_open`` exclude an end. Raises ``ValueError`` "sigma must lie in (0, inf),
    got 0.0"-style messages (``TypeError`` for something that is not a number).
    """
    v = check_finite(value, name)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or \
            (hi is not None and (v >= hi if hi_open else v > hi)):
        interval = (("(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}") + ", "
                    + ("inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")))
        raise ValueError(f"{name} must lie in {interval}, got {v}")
    return v


def check_choice(value, name: str, choices: Sequence):
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if isinstance(value, (list, dict, set)) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_callable(f, name: str, signature: str = ""):
    """``f`` if it can be called, else ``TypeError`` ("model must be callable as
    model(x, t, cond), got int")."""
    if not callable(f):
        how = f" as {signature}" if signature else ""
        raise TypeError(f"{name} must be callable{how}, got {type(f).__name__}")
    return f


def batch_timesteps(t, x: torch.Tensor, T: int | None = None, name: str = "t") -> torch.Tensor:
    """``t`` as the (B,) long tensor on ``x``'s device that a model ``eps_model(x, t)`` receives,
    B = ``x.shape[0]``: an int (or a 0-d / (1,) tensor) is repeated for every row, a (B,) tensor
    is kept. With ``T`` the steps must also lie in [0, T) (:func:`check_timestep`).

    Raises ``TypeError`` for a float or bool ``t``, ``ValueError`` for another shape.
    """
    B = x.shape[0]
    if T is not None:
        t = check_timestep(t, T, name)
    if not isinstance(t, torch.Tensor):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
        return torch.full((B,), int(t), dtype=torch.long, device=x.device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer time-step indices, got dtype {t.dtype}")
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1 or t.shape[0] not in (1, B):
        raise ValueError(f"{name} must be an int or a (B,) tensor with B = {B}, got shape "
                         f"{tuple(t.shape)}")
    return t.to(x.device).long().expand(B)


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
