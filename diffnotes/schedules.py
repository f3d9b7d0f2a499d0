"""Noise schedules: β_t, ᾱ_t and the signal-to-noise ratio.

Indexing follows diffusers: ``betas[t]`` for ``t = 0 … T-1`` is β_{t+1} of Ahmad's notes, so
``alphas_cumprod[t]`` is ᾱ_{t+1} = ∏_{s≤t} (1 − β_s) (Ahmad's notes, eq 1.2; Zhu's slides, "DDPM: Forward
Diffusion Process", misprint the upper limit of the product as T, see the errata).
"""
from __future__ import annotations

import math

import torch

__all__ = ["make_betas", "alphas_cumprod", "snr", "make_timesteps"]

_DEFAULTS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def make_betas(kind: str = "linear", T: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None, dtype=torch.float64) -> torch.Tensor:
    """β_0 … β_{T−1} for a named schedule.

    - ``"linear"``: DDPM's, β from ``beta_start`` (1e-4) to ``beta_end`` (0.02) linearly.
    - ``"scaled_linear"``: Stable Diffusion's, √β linear from √0.00085 to √0.012, squared.
    - ``"cosine"``: Nichol & Dhariwal's ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, with
      β capped at 0.999 (diffusers' ``"squaredcos_cap_v2"``).

    Returns a float64 tensor of shape (T,). Raises ``ValueError`` for an unknown ``kind``, a
    ``T`` < 1, or β outside (0, 1).
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    if kind in _DEFAULTS:
        lo, hi = _DEFAULTS[kind]
        lo = lo if beta_start is None else float(beta_start)
        hi = hi if beta_end is None else float(beta_end)
        for name, v in (("beta_start", lo), ("beta_end", hi)):
            if not 0 < v < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {v}")
        if kind == "linear":
            betas = torch.linspace(lo, hi, T, dtype=torch.float64)
        else:
            betas = torch.linspace(lo ** 0.5, hi ** 0.5, T, dtype=torch.float64) ** 2
    elif kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("beta_start and beta_end do not apply to kind='cosine'")
        f = lambda s: math.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)],
                             dtype=torch.float64)
    else:
        raise ValueError(f"kind must be 'linear', 'scaled_linear' or 'cosine', got {kind!r}")
    return betas.to(dtype)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) (Ahmad's notes, below eq 1.2). Raises if any β lies outside (0, 1)."""
    betas = torch.as_tensor(betas)
    if betas.ndim != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        bad = betas[~((betas > 0) & (betas < 1))][0].item()
        raise ValueError(f"betas must lie in (0, 1), got a value {bad}")
    return torch.cumprod(1 - betas, dim=0)


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
    ac = torch.as_tensor(alphas_cumprod)
    if not bool(((ac > 0) & (ac <= 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1]")
    return ac / (1 - ac)


def make_timesteps(num_steps: int, T: int = 1000, spacing: str = "leading",
                   steps_offset: int = 0) -> list[int]:
    """A decreasing grid of ``num_steps`` indices in [0, T), as diffusers' schedulers make it.

    ``"leading"`` (DDIM's and Stable Diffusion's): ``range(0, T, T // n)`` reversed, plus
    ``steps_offset`` (1 for Stable Diffusion, giving 981, 961, …, 1 for 50 steps).
    ``"trailing"``: ``round(arange(T, 0, -T/n)) - 1``, which starts at T − 1.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
    if spacing == "leading":
        ratio = T // num_steps
        ts = [i * ratio + steps_offset for i in range(num_steps)][::-1]
    elif spacing == "trailing":
        ratio = T / num_steps
        ts = [int(round(T - i * ratio)) - 1 for i in range(num_steps)]
    else:
        raise ValueError(f"spacing must be 'leading' or 'trailing', got {spacing!r}")
    if ts[0] >= T:
        raise ValueError(f"steps_offset={steps_offset} pushes the first time step past T-1={T - 1}")
    return ts
