"""Autograders for the chapters' exercises.

A student writes a function and calls ``check("ddim_step", my_ddim_step)``. The checker draws
random inputs (seeded, so a failure can be reproduced), runs the student's function and the
library's reference on them, and reports the first property that fails: the type, the shape, or
the first element whose value differs beyond the tolerance, with the input that exposed it.

Checkers live in topic modules of this package (``part1.py``, ``guidance.py``, ...), each
calling :func:`register`; they are discovered on the first call to :func:`check`.

Besides the one-line verdict, a :class:`CheckResult` lists the checker's *properties*, each
passed or failed — ``runs``, ``number of outputs``, ``types``, ``shape`` and ``values, case k``
for every case — which the classroom autograder (:mod:`diffnotes.classroom`) turns into partial
credit. The autograder never trusts a submission's process with the verdict: the submission only
records (:func:`record`) its function's outputs on the checker's inputs, as plain data (JSON), and a
clean process calls :func:`check` on :func:`replay` of that data. So the student's self-check and
the grade are the same function on the same cases, and cannot disagree.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["check", "register", "available", "CheckResult", "Checker", "Property",
           "property_names", "record", "replay"]


@dataclass
class Checker:
    """A registered exercise: the reference, how to draw its inputs, and the tolerance."""

    name: str
    reference: Callable[..., Any]
    make_inputs: Callable[[torch.Generator], dict]
    rtol: float = 1e-6
    atol: float = 1e-8
    doc: str = ""
    module: str = ""          # the topic module that registered it (graders import only that)


@dataclass
class CheckResult:
    """The verdict of :func:`check`: truthy when every case passed; ``message`` says why not."""

    name: str
    passed: bool
    message: str
    cases: int = 0
    details: dict = field(default_factory=dict)
    properties: list = field(default_factory=list)   # list[Property], see property_names()

    @property
    def score(self) -> float:
        """The fraction of :attr:`properties` that passed (1.0 when it passed)."""
        if not self.properties:
            return float(self.passed)
        return sum(p.passed for p in self.properties) / len(self.properties)

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.message}"


@dataclass
class Property:
    """One gradable property of a checker's verdict; ``message`` says why it failed."""

    name: str
    passed: bool
    message: str = ""


#: The stages a case goes through, in order; a case that fails at one fails every later one.
STAGES = ("runs", "number of outputs", "types", "shape", "values")


def property_names(cases: int = 5) -> list[str]:
    """The properties a checker reports for ``cases`` cases, in order (one point each)."""
    return list(STAGES[:-1]) + [f"values, case {k}" for k in range(cases)]


_REGISTRY: dict[str, Checker] = {}
_LOADED = False


def register(name: str, reference: Callable, make_inputs: Callable, rtol: float = 1e-6,
             atol: float = 1e-8, doc: str = "") -> None:
    """Register a checker: ``make_inputs(generator) -> kwargs`` and ``reference(**kwargs)``."""
    import sys
    module = sys._getframe(1).f_globals.get("__name__", "")
    _REGISTRY[name] = Checker(name, reference, make_inputs, rtol, atol, doc, module)


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


def _stage_error(stage, name, message, case, details=None):
    return stage, CheckResult(name, False, message, case, details or {})


def _compare_one(name, what, g, w, kw, case, rtol, atol):
    w_t = torch.as_tensor(w, dtype=torch.float64)
    try:
        g_t = torch.as_tensor(g.detach() if isinstance(g, torch.Tensor) else np.asarray(g),
                              dtype=torch.float64)
    except Exception:
        return _stage_error("types", name, f"{what} has type {type(g).__name__}; expected a "
                            f"tensor or number (case {case})", case)
    if tuple(g_t.shape) != tuple(w_t.shape):
        return _stage_error("shape", name, f"shape: {what} has shape {tuple(g_t.shape)}, "
                            f"expected {tuple(w_t.shape)} (case {case}; inputs: "
                            f"{_fmt_inputs(kw)})", case)
    bad = ~torch.isclose(g_t, w_t, rtol=rtol, atol=atol, equal_nan=False)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0]) if g_t.ndim else ()
        return _stage_error(
            "values", name,
            f"value: {what}{list(idx) if idx else ''} is {g_t[idx].item():.6g}, expected "
            f"{w_t[idx].item():.6g} (|diff| {abs(g_t[idx] - w_t[idx]).item():.3g} > "
            f"atol {atol:g} + rtol {rtol:g}·|expected|; case {case}; inputs: "
            f"{_fmt_inputs(kw)})", case,
            {"index": idx, "got": g_t[idx].item(), "expected": w_t[idx].item(), "inputs": kw})
    return None


def _compare(name, got, want, kw, case, rtol, atol):
    """``None`` when ``got`` matches, else ``(stage, CheckResult)``: the message is about the first
    output that differs, the stage the earliest stage at which any output fails."""
    got_l, want_l = _as_list(got), _as_list(want)
    if len(got_l) != len(want_l):
        return _stage_error("number of outputs", name, f"returned {len(got_l)} value(s), expected "
                            f"{len(want_l)} (case {case}; inputs: {_fmt_inputs(kw)})", case)
    fails = []
    for j, (g, w) in enumerate(zip(got_l, want_l)):
        what = f"output {j}" if len(want_l) > 1 else "the output"
        f = _compare_one(name, what, g, w, kw, case, rtol, atol)
        if f is not None:
            fails.append(f)
    if not fails:
        return None
    return min((f[0] for f in fails), key=STAGES.index), fails[0][1]


def _checker(name: str) -> Checker:
    if name not in _REGISTRY:
        _load()
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def _cases(c: Checker, cases: int, seed: int):
    """The checker's cases: ``(case, inputs, reference output)``, the same for every caller."""
    for case in range(cases):
        g = torch.Generator().manual_seed(seed * 1000 + case)
        kw = c.make_inputs(g)
        yield case, kw, c.reference(**kw)


def _fresh(kw: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _error_type(e: BaseException) -> str:
    return getattr(e, "recorded_type", None) or type(e).__name__


def check(name: str, fn: Callable, cases: int = 5, seed: int = 0, verbose: bool = True,
          raise_on_fail: bool = False) -> CheckResult:
    """Run ``fn`` against the reference checker ``name`` on ``cases`` random inputs.

    Prints a one-line verdict (``verbose``) about the first case that fails, and returns a
    :class:`CheckResult` (truthy when it passed) whose ``properties`` grade every case (see
    :func:`property_names`). ``raise_on_fail=True`` turns a failure into an ``AssertionError``.
    """
    c = _checker(name)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    first = None                       # the first failing case's CheckResult: the message
    failed_at: dict[str, CheckResult] = {}   # stage -> first case that failed at that stage
    values_ok: list[str] = []        # per case: "" when it matched, else why not
    for case, kw, want in _cases(c, cases, seed):
        try:
            got = fn(**_fresh(kw))
        except Exception as e:  # the student's error, reported, not re-raised
            stage, res = _stage_error("runs", name, f"raised {_error_type(e)}: {e} (case {case}; "
                                      f"inputs: {_fmt_inputs(kw)})", case)
        else:
            verdict = _compare(name, got, want, kw, case, c.rtol, c.atol)
            stage, res = verdict if verdict is not None else (None, None)
        values_ok.append("" if res is None else res.message)
        if res is not None:
            failed_at.setdefault(stage, res)
            if first is None:
                first = res
    props = []
    for i, stage in enumerate(STAGES[:-1]):
        earlier = [failed_at[s] for s in STAGES[:i + 1] if s in failed_at]
        bad = min(earlier, key=lambda r: r.cases) if earlier else None
        props.append(Property(stage, bad is None, bad.message if bad is not None else ""))
    for k, why in enumerate(values_ok):
        props.append(Property(f"values, case {k}", not why, why))
    if first is None:
        result = CheckResult(name, True, f"matches the reference on {cases} random cases "
                             f"(rtol {c.rtol:g}, atol {c.atol:g})", cases)
    else:
        result = first
    result.properties = props
    if verbose:
        print(("✅ " if result.passed else "❌ ") + repr(result))
    if raise_on_fail and not result.passed:
        raise AssertionError(repr(result))
    return result


# ------------------------------------------------------------------ outputs as data (grading)
#: The largest number of values one recorded output may hold.
MAX_RECORDED_VALUES = 1_000_000


def _encode_one(v) -> dict:
    """One output as JSON data, converted exactly as :func:`check` converts it to compare."""
    try:
        t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else np.asarray(v),
                            dtype=torch.float64)
    except Exception:
        return {"type": type(v).__name__}
    if t.numel() > MAX_RECORDED_VALUES:
        return {"type": f"{type(v).__name__} of {t.numel()} values (too large to record)"}
    return {"shape": list(t.shape), "data": t.reshape(-1).tolist()}


def _encode(out) -> dict:
    if isinstance(out, (tuple, list)):
        return {"seq": [_encode_one(v) for v in out]}
    return {"one": _encode_one(out)}


def record(name: str, fn: Callable, cases: int = 5, seed: int = 0, sink=None) -> list[dict]:
    """``fn``'s outputs on the checker's ``cases`` inputs, as JSON-able data, one dict a case.

    A case is ``{"case": k, "out": ...}`` or ``{"case": k, "error": [type name, message]}``. With
    ``sink`` (a text file), each case is also written as one JSON line as soon as it is known, so a
    process that dies later still leaves the cases it finished.
    """
    c = _checker(name)
    rows = []
    for case, kw, _want in _cases(c, cases, seed):
        try:
            row = {"case": case, "out": _encode(fn(**_fresh(kw)))}
        except Exception as e:
            row = {"case": case, "error": [type(e).__name__, str(e)[:2000]]}
        rows.append(row)
        if sink is not None:
            import json
            sink.write(json.dumps(row) + "\n")
            sink.flush()
    return rows


class _Opaque:
    """Stands for an output that is not a tensor or number (its type's name is kept)."""


def _decode_one(d) -> Any:
    if not isinstance(d, dict) or "data" not in d:
        name = str(d.get("type", "object")) if isinstance(d, dict) else "object"
        return type(name, (_Opaque,), {})()
    return torch.tensor([float(x) for x in d["data"]], dtype=torch.float64).reshape(d["shape"])


class RecordedError(Exception):
    """An exception raised in the submission's process, replayed under its original name."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.recorded_type = str(type_name)


def replay(rows: list[dict], missing: str = "the grading process ended before this case "
           "(wall-time limit, memory limit or crash)") -> Callable:
    """A function that returns the recorded outputs of :func:`record` in case order.

    ``check(name, replay(rows))`` grades recorded outputs exactly as ``check(name, fn)`` grades
    ``fn``: same inputs, same comparisons, same messages. Cases missing from ``rows`` (the
    process died) raise ``RecordedError("Aborted", missing)``; malformed rows count as missing.
    """
    by_case = {}
    for r in rows if isinstance(rows, list) else []:
        if isinstance(r, dict) and isinstance(r.get("case"), int) and r["case"] not in by_case:
            by_case[r["case"]] = r
    calls = iter(range(10 ** 9))

    def recorded(**_inputs):
        k = next(calls)
        r = by_case.get(k)
        if r is None:
            raise RecordedError("Aborted", missing)
        if "error" in r:
            err = r["error"] if isinstance(r["error"], list) and len(r["error"]) == 2 else ["?", ""]
            raise RecordedError(str(err[0]), str(err[1]))
        out = r.get("out")
        try:
            if isinstance(out, dict) and isinstance(out.get("seq"), list):
                return tuple(_decode_one(d) for d in out["seq"])
            return _decode_one(out.get("one") if isinstance(out, dict) else None)
        except Exception as e:    # malformed data: the submission's process wrote it
            raise RecordedError("InvalidRecord", f"unreadable recorded output ({e})") from None

    return recorded
