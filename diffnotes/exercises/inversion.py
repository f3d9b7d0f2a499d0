"""Checkers for the chapter "Editing real images" (exact inversion, SDEdit, DiffEdit).

* ``"edict_step"``: ``fn(x, y, eps_fn, alpha_bar_t, alpha_bar_prev, p) -> (x_prev, y_prev)``,
  one EDICT denoising step (Wallace et al. 2023, §3): two η = 0 DDIM steps (DDIM eq 12,
  :func:`diffnotes.ddim.ddim_step`), each sequence stepped with the other's ε, then the two
  mixings with weight ``p`` — the loop body of :func:`diffnotes.editing.inversion.edict_sample`.
  ``eps_fn(z)`` is the noise prediction at this step (the time step is fixed).
* ``"bdia_step"``: ``fn(z_before, z, eps, alpha_bar_before, alpha_bar_t, alpha_bar_next, gamma)
  -> z_next``, BDIA's update (Zhang et al. 2024) z_next = D_{t→next}(z) + γ (z_before −
  D_{t→before}(z)) with D the η = 0 DDIM step with the given ε (the loop body of
  :func:`diffnotes.editing.inversion.bdia_sample`).
* ``"diffedit_threshold"``: ``fn(diff_map, threshold_ratio) -> mask``, DiffEdit's binarisation
  (Couairon et al. 2023, §3.1, as diffusers implements it): clamp to [0, ρ·mean], divide by
  ρ·mean, keep > 0.5, as a float 0/1 tensor (:func:`diffnotes.editing.diffedit.threshold_map`).
* ``"sdedit_t0"``: ``fn(strength, T) -> int``, SDEdit's starting index t₀ = ⌈s·T⌉ − 1 (0-based,
  at least 0) for strength s ∈ (0, 1] (:func:`diffnotes.editing.sdedit.strength_timestep`).
"""
from __future__ import annotations

import torch

from ..ddim import ddim_step
from ..editing.diffedit import threshold_map
from ..editing.sdedit import strength_timestep
from . import register


def edict_step_reference(x, y, eps_fn, alpha_bar_t, alpha_bar_prev, p):
    """One EDICT step (Wallace et al. 2023, §3), as in ``edict_sample``'s loop."""
    x_inter = ddim_step(x, eps_fn(y), alpha_bar_t, alpha_bar_prev)
    y_inter = ddim_step(y, eps_fn(x_inter), alpha_bar_t, alpha_bar_prev)
    x_new = p * x_inter + (1 - p) * y_inter
    y_new = p * y_inter + (1 - p) * x_new
    return x_new, y_new


def _levels(g):
    a = torch.rand(2, generator=g, dtype=torch.float64).sort().values * 0.9 + 0.05
    return float(a[0]), float(a[1])           # ᾱ_t < ᾱ_prev (less noise after the step)


def _edict_inputs(g):
    d = 6
    W = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    b = torch.randn(d, generator=g, dtype=torch.float64)

    def eps_fn(z):                              # a smooth, fixed "network" of the step
        return torch.tanh(z @ W + b)
    a_t, a_prev = _levels(g)
    x = torch.randn(3, d, generator=g, dtype=torch.float64)
    y = x + 0.1 * torch.randn(3, d, generator=g, dtype=torch.float64)
    p = float(0.8 + 0.19 * torch.rand(1, generator=g, dtype=torch.float64))
    return dict(x=x, y=y, eps_fn=eps_fn, alpha_bar_t=a_t, alpha_bar_prev=a_prev, p=p)


def bdia_step_reference(z_before, z, eps, alpha_bar_before, alpha_bar_t, alpha_bar_next, gamma):
    """BDIA's update (Zhang et al. 2024), as in ``bdia_sample``'s loop."""
    return ddim_step(z, eps, alpha_bar_t, alpha_bar_next) + gamma * (
        z_before - ddim_step(z, eps, alpha_bar_t, alpha_bar_before))


def _bdia_inputs(g):
    a = torch.rand(3, generator=g, dtype=torch.float64).sort().values * 0.9 + 0.05
    r = lambda: torch.randn(2, 5, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(z_before=r(), z=r(), eps=r(), alpha_bar_before=float(a[0]),
                alpha_bar_t=float(a[1]), alpha_bar_next=float(a[2]),
                gamma=float(torch.rand(1, generator=g, dtype=torch.float64)))


def _diffedit_inputs(g):
    d = torch.rand(8, 8, generator=g, dtype=torch.float64) ** 3
    d[torch.randint(0, 8, (1,), generator=g), torch.randint(0, 8, (1,), generator=g)] += 20.0
    return dict(diff_map=d, threshold_ratio=float(2 + 2 * torch.rand(1, generator=g)))


def _sdedit_inputs(g):
    T = int(torch.randint(50, 1001, (1,), generator=g))
    s = float(torch.rand(1, generator=g, dtype=torch.float64)) * 0.999 + 0.001
    if int(torch.randint(0, 4, (1,), generator=g)) == 0:
        s = float(torch.randint(1, 11, (1,), generator=g)) / 10      # 0.1 … 1.0 exactly
    return dict(strength=s, T=T)


register("edict_step", edict_step_reference, _edict_inputs, rtol=1e-9, atol=1e-12,
         doc="one EDICT step: two coupled DDIM steps and two mixings, Wallace et al. 2023, §3")
register("bdia_step", bdia_step_reference, _bdia_inputs, rtol=1e-9, atol=1e-12,
         doc="BDIA's update z_next = D(z→next) + γ (z_before − D(z→before)), Zhang et al. 2024")
register("diffedit_threshold", lambda diff_map, threshold_ratio: threshold_map(
    diff_map, threshold_ratio), _diffedit_inputs, rtol=0, atol=0,
    doc="DiffEdit's mask: clamp to [0, ρ·mean], rescale, threshold 0.5 (Couairon et al. 2023)")
register("sdedit_t0", lambda strength, T: strength_timestep(strength, T), _sdedit_inputs,
         rtol=0, atol=0, doc="SDEdit's t0 = ceil(s·T) − 1 (0-based) for strength s in (0, 1]")
