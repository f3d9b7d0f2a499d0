"""Autograders for the chapters' exercises.

A student writes a function and calls ``check("ddim_step", my_ddim_step)``. The checker draws
random inputs (seeded, so a failure can be reproduced), runs the student's function and the
library's reference on them, and reports the first property that fails: the type, the shape, or
the first element whose value differs beyond the tolerance, with the input that exposed it.

Checkers live in topic modules of this package (``part1.py``, ``guidance.py``, ...), each
calling :func:`register`; they are discovered on the first call to :func:`check`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["check", "register", "available", "CheckResult", "Checker"]


@dataclass
class Checker:
    """A registered exercise: the reference, how to draw its inputs, and the tolerance."""

    name: str
    reference: Callable[..., Any]
    make_inputs: Callable[[torch.Generator], dict]
    rtol: float = 1e-6
    atol: float = 1e-8
    doc: str = ""


@dataclass
class CheckResult:
    """The verdict of :func:`check`: truthy when every case passed; ``message`` says why not."""

    name: str
    passed: bool
    message: str
    cases: int = 0
    details: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.message}"


_REGISTRY: dict[str, Checker] = {}
_LOADED = False


def register(name: str, reference: Callable, make_inputs: Callable, rtol: float = 1e-6,
             atol: float = 1e-8, doc: str = "") -> None:
    """Register a checker: ``make_inputs(generator) -> kwargs`` and ``reference(**kwargs)``."""
    _REGISTRY[name] = Checker(name, reference, make_inputs, rtol, atol, doc)


def _load() -> None:
    global _LOADED
    if not _LOADED:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
        _LOADED = True


def available() -> list[str]:
    """The names :func:`check` accepts."""
    _load()
    return sorted(_REGISTRY)


def _as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _fmt_inputs(kw: dict) -> str:
    parts = []
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            parts.append(f"{k}=tensor{tuple(v.shape)}" if v.numel() > 4 else f"{k}={v.tolist()}")
        elif callable(v):
            parts.append(f"{k}=<function>")
        else:
            parts.append(f"{k}={v!r}")
    return ", ".join(parts)


def _compare(name, got, want, kw, case, rtol, atol) -> CheckResult | None:
    got_l, want_l = _as_list(got), _as_list(want)
    if len(got_l) != len(want_l):
        return CheckResult(name, False, f"returned {len(got_l)} value(s), expected "
                           f"{len(want_l)} (case {case}; inputs: {_fmt_inputs(kw)})", case)
    for j, (g, w) in enumerate(zip(got_l, want_l)):
        what = f"output {j}" if len(want_l) > 1 else "the output"
        w_t = torch.as_tensor(w, dtype=torch.float64)
        try:
            g_t = torch.as_tensor(g.detach() if isinstance(g, torch.Tensor) else np.asarray(g),
                                  dtype=torch.float64)
        except Exception:
            return CheckResult(name, False, f"{what} has type {type(g).__name__}; expected a "
                               f"tensor or number (case {case})", case)
        if tuple(g_t.shape) != tuple(w_t.shape):
            return CheckResult(name, False, f"shape: {what} has shape {tuple(g_t.shape)}, "
                               f"expected {tuple(w_t.shape)} (case {case}; inputs: "
                               f"{_fmt_inputs(kw)})", case)
        bad = ~torch.isclose(g_t, w_t, rtol=rtol, atol=atol, equal_nan=False)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0]) if g_t.ndim else ()
            return CheckResult(
                name, False,
                f"value: {what}{list(idx) if idx else ''} is {g_t[idx].item():.6g}, expected "
                f"{w_t[idx].item():.6g} (|diff| {abs(g_t[idx] - w_t[idx]).item():.3g} > "
                f"atol {atol:g} + rtol {rtol:g}·|expected|; case {case}; inputs: "
                f"{_fmt_inputs(kw)})", case,
                {"index": idx, "got": g_t[idx].item(), "expected": w_t[idx].item(), "inputs": kw})
    return None


def check(name: str, fn: Callable, cases: int = 5, seed: int = 0, verbose: bool = True,
          raise_on_fail: bool = False) -> CheckResult:
    """Run ``fn`` against the reference checker ``name`` on ``cases`` random inputs.

    Prints a one-line verdict (``verbose``) and returns a :class:`CheckResult` (truthy when it
    passed). ``raise_on_fail=True`` turns a failure into an ``AssertionError`` for graders.
    """
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {sorted(_REGISTRY)}, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    c = _REGISTRY[name]
    result = None
    for case in range(cases):
        g = torch.Generator().manual_seed(seed * 1000 + case)
        kw = c.make_inputs(g)
        want = c.reference(**kw)
        try:
            got = fn(**{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                        for k, v in kw.items()})
        except Exception as e:  # the student's error, reported, not re-raised
            result = CheckResult(name, False, f"raised {type(e).__name__}: {e} (case {case}; "
                                 f"inputs: {_fmt_inputs(kw)})", case)
            break
        result = _compare(name, got, want, kw, case, c.rtol, c.atol)
        if result is not None:
            break
    if result is None:
        result = CheckResult(name, True, f"matches the reference on {cases} random cases "
                             f"(rtol {c.rtol:g}, atol {c.atol:g})", cases)
    if verbose:
        print(("✅ " if result.passed else "❌ ") + repr(result))
    if raise_on_fail and not result.passed:
        raise AssertionError(repr(result))
    return result
