"""Fourier Domain Adaptation (Ahmad's notes, §5.7, eqs 5.29–5.32; Yang & Soatto 2020).

FDA restyles a source image as the target domain by swapping the low-frequency part of the
Fourier amplitude: with A and P the amplitude and phase of the 2-D DFT (eq 5.29),

    x_{s→t} = F⁻¹( [M_β ∘ A(x_t) + (1 − M_β) ∘ A(x_s),  P(x_s)] )          (eq 5.30)

where M_β is a centred square of the *shifted* spectrum: rows c_h−b … c_h+b and columns
c_w−b … c_w+b (inclusive), b = ⌊β·min(H, W)⌋, c = ⌊size/2⌋ (the paper's released code; the
mask printed in Ahmad's notes is garbled, erratum ``erratum-seg-fda-mask``). β = 0 swaps the DC term alone.

Also the target-domain entropy loss with the Charbonnier penalty ρ(x) = (x² + ε²)^η (eq 5.32).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["fda", "fda_mask", "amplitude_phase", "charbonnier", "entropy_map", "entropy_loss"]


def _check_image(x, name: str):
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be a real tensor, got dtype {x.dtype}")
        shape = tuple(x.shape)
    elif isinstance(x, np.ndarray):
        if np.iscomplexobj(x) or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise TypeError(f"{name} must be a real numeric array, got dtype {x.dtype}")
        shape = x.shape
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if len(shape) not in (2, 3, 4):
        raise ValueError(f"{name} must have shape (H, W), (C, H, W) or (B, C, H, W) (channels "
                         f"first), got shape {shape} of rank {len(shape)}")
    if len(shape) >= 3 and shape[-1] in (1, 3, 4) and shape[-3] not in (1, 3, 4):
        raise ValueError(f"{name} must be channels-first (..., C, H, W); got shape {shape}, which "
                         "looks channels-last (H, W, C): move the channel axis first")
    if min(shape[-2:]) < 1:
        raise ValueError(f"{name} must have H, W >= 1, got shape {shape}")
    return shape


def fda_mask(H: int, W: int, beta: float) -> np.ndarray:
    """M_β in *shifted* coordinates: True on rows c_h−b…c_h+b, cols c_w−b…c_w+b (Ahmad's notes, eq 5.30).

    b = ⌊β·min(H, W)⌋, c_h = ⌊H/2⌋, c_w = ⌊W/2⌋ (after ``fftshift`` the DC term sits at
    (c_h, c_w)). The square is clipped to the array. Returns a bool array (H, W).
    """
    b = int(math.floor(beta * min(H, W)))
    ch, cw = H // 2, W // 2
    M = np.zeros((H, W), dtype=bool)
    M[max(ch - b, 0):ch + b + 1, max(cw - b, 0):cw + b + 1] = True
    return M


def amplitude_phase(x):
    """Amplitude |F(x)| and phase ∠F(x) of the 2-D DFT over the last two axes (Ahmad's notes, eq 5.29).

    ``x``: numpy array or torch tensor (..., H, W). Returns ``(amplitude, phase)`` of the same
    type, unshifted (DC at index [0, 0]).
    """
    if isinstance(x, torch.Tensor):
        X = torch.fft.fft2(x.to(torch.float64) if not x.is_floating_point() else x)  # eq 5.29
        return X.abs(), X.angle()
    X = np.fft.fft2(np.asarray(x, dtype=np.float64), axes=(-2, -1))  # eq 5.29
    return np.abs(X), np.angle(X)


def fda(source, target, beta: float):
    """Source image with the target's low-frequency amplitude (Ahmad's notes, eq 5.30).

    ``source`` and ``target``: the same shape, (H, W), (C, H, W) or (B, C, H, W), channels first,
    both numpy arrays or both torch tensors (float64 recommended). ``beta`` in [0, 0.5]: half-side
    of the swapped square as a fraction of min(H, W), b = ⌊β·min(H, W)⌋. Returns the same type and
    shape as ``source`` (real part of the inverse DFT; the imaginary part is rounding noise since
    the square is symmetric about DC). Differentiable in torch.

    Raises ``ValueError`` for a wrong rank, a channels-last-looking shape, mismatched shapes or
    β outside [0, 0.5]; ``TypeError`` for mixed numpy/torch inputs.
    """
    s_shape = _check_image(source, "source")
    t_shape = _check_image(target, "target")
    if isinstance(source, torch.Tensor) != isinstance(target, torch.Tensor):
        raise TypeError(f"source and target must both be numpy arrays or both torch tensors, got "
                        f"{type(source).__name__} and {type(target).__name__}")
    if s_shape != t_shape:
        raise ValueError(f"source and target must have the same shape, got {s_shape} and {t_shape}")
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise TypeError(f"beta must be a number, got {type(beta).__name__}") from None
    if not (0.0 <= beta <= 0.5):
        raise ValueError(f"beta must lie in [0, 0.5], got {beta}")
    H, W = s_shape[-2:]
    M = np.fft.ifftshift(fda_mask(H, W, beta))  # the centred square, moved to unshifted indices
    if isinstance(source, torch.Tensor):
        dtype = source.dtype if source.is_floating_point() else torch.float64
        Fs = torch.fft.fft2(source.to(dtype))                               # eq 5.29
        At = torch.fft.fft2(target.to(device=source.device, dtype=dtype)).abs()
        Mt = torch.as_tensor(M, device=source.device)
        amp = torch.where(Mt, At, Fs.abs())                                 # eq 5.30, amplitude
        out = torch.fft.ifft2(torch.polar(amp, Fs.angle())).real            # eq 5.30
        return out.to(dtype)
    dtype = source.dtype if np.issubdtype(source.dtype, np.floating) else np.float64
    Fs = np.fft.fft2(np.asarray(source, np.float64), axes=(-2, -1))         # eq 5.29
    At = np.abs(np.fft.fft2(np.asarray(target, np.float64), axes=(-2, -1)))
    amp = np.where(M, At, np.abs(Fs))                                       # eq 5.30, amplitude
    out = np.fft.ifft2(amp * np.exp(1j * np.angle(Fs)), axes=(-2, -1)).real  # eq 5.30
    return out.astype(dtype, copy=False)


def charbonnier(x, eta: float = 2.0, eps: float = 1e-3):
    """Charbonnier penalty ρ(x) = (x² + ε²)^η (Ahmad's notes, after eq 5.32), elementwise.

    η = 0.5 is the classic robust (≈|x|) penalty; FDA trains with η = 2, which weighs
    high-entropy pixels more than low-entropy ones. Works on tensors and arrays.
    """
    if eps < 0 or eta <= 0:
        raise ValueError(f"eta must be positive and eps non-negative, got eta={eta}, eps={eps}")
    return (x ** 2 + eps ** 2) ** eta


def entropy_map(logits: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Per-pixel entropy −⟨p, log p⟩ of p = softmax(logits) over the class axis −3.

    ``logits``: (B, K, H, W) or (K, H, W). Returns (B, H, W) or (H, W). ``normalize`` divides by
    log K (the FDA code does this with log 19 = 2.9444 for Cityscapes), putting it in [0, 1].
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim not in (3, 4):
        raise ValueError(f"logits must have shape (B, K, H, W) or (K, H, W), got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits, dim=-3)
    ent = -(logp.exp() * logp).sum(-3)                                     # eq 5.32, inner term
    if normalize:
        K = logits.shape[-3]
        if K < 2:
            raise ValueError(f"normalize needs K >= 2 classes, got {K}")
        ent = ent / math.log(K)
    return ent


def entropy_loss(logits: torch.Tensor, eta: float = 2.0, eps: float = 1e-3,
                 normalize: bool = False, reduction: str = "mean") -> torch.Tensor:
    """FDA's target entropy loss Σ_pixels ρ(−⟨φ(x_t), log φ(x_t)⟩) (Ahmad's notes, eq 5.32).

    ``logits``: (B, K, H, W) or (K, H, W) network scores on target images; ρ is
    :func:`charbonnier` with exponent ``eta`` and ``eps`` (the paper's 0.001). ``reduction``:
    ``"sum"`` is eq 5.32 as printed, ``"mean"`` what the released code optimises.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    r = charbonnier(entropy_map(logits, normalize), eta, eps)              # eq 5.32
    return r.mean() if reduction == "mean" else r.sum()
