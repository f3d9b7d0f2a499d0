"""Guidance: steering a diffusion model towards a condition at sampling time.

Ahmad's notes, §1.4 (eqs 1.27–1.36) and eq 1.44 of §1.5.1; the controlled-generation blog, §2
(the unified view, classifier guidance, classifier-free guidance, multi-condition guidance with
per-channel dropout).

All rules are written on ε-predictions. With ε = −√(1−ᾱ_t) ∇ log p_t (Zhu's slides, "SDE-based
Generative Models: DDPM and SDE point of views"), adding ``scale · ∇ log p_t(y | x_t)`` to the
score is subtracting ``scale · √(1−ᾱ_t) ∇ log p_t(y | x_t)``
from ε:

- :func:`classifier_guidance`: ε − s √(1−ᾱ_t) ∇ log p_φ(y | x_t) (Ahmad's notes, eq 1.30, corrected)
- :func:`cfg`: ε_u + s (ε_c − ε_u)                               (Ahmad's notes, eq 1.44)
- :func:`multi_cfg`: ε_u + Σ_k s_k (ε_k − ε_u)                    (the blog, §2.4.3)

**Two conventions for the guidance weight.** ``scale`` here is diffusers' ``guidance_scale``:
``scale = 0`` is the unconditional model, ``scale = 1`` the conditional one. Ho & Salimans
(and Ahmad's notes, eq 1.36) write (w + 1) ε_c − w ε_u, whose w is ``scale − 1``
(:func:`scale_from_ho_salimans`, :func:`ho_salimans_from_scale`). Both describe the same
target: the score of p_t(x) · p_t(y | x)^scale.

Bad input (NaN or infinite scales, ε tensors of different shapes, a ``scales`` list whose length
differs from ``eps_conds``) raises ``ValueError`` naming the argument.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .utils import (batch_timesteps, check_callable, check_finite, check_int, check_range,
                    check_same_shape, check_tensor)

__all__ = [
    "cfg", "classifier_guidance", "multi_cfg", "guided_eps_model", "classifier_grad",
    "classifier_guided_eps_model", "scale_from_ho_salimans", "ho_salimans_from_scale",
    "condition_dropout_mask", "drop_conditions", "uniform_drop_rate",
    "mixture_cond_model", "product_mixture_cond_model", "tilted_log_density",
    "histogram_density", "grid_density", "total_variation", "mixture_guided_eps",
]


# ----------------------------------------------------------------------------- argument checks
def _check_scale(scale, name: str, like: torch.Tensor):
    """A finite number, or a finite tensor that broadcasts against ``like``.

    A 1-D tensor with one entry per batch row (length ``like.shape[0]``) is taken as a per-row
    scale and reshaped to (B, 1, …, 1).
    """
    if isinstance(scale, torch.Tensor):
        if scale.dtype == torch.bool or scale.dtype.is_complex:
            raise TypeError(f"{name} must be a real number or a real tensor, got dtype {scale.dtype}")
        if not bool(torch.isfinite(scale).all()):
            bad = scale[~torch.isfinite(scale)].flatten()[0].item()
            raise ValueError(f"{name} must be finite, got a tensor containing {bad}")
        if scale.ndim == 0:
            return float(scale)
        s = scale.to(dtype=like.dtype, device=like.device)
        if s.ndim == 1 and like.ndim > 1 and s.shape[0] == like.shape[0]:
            return s.reshape(-1, *([1] * (like.ndim - 1)))
        try:
            torch.broadcast_shapes(s.shape, like.shape)
        except RuntimeError:
            raise ValueError(f"{name} must be a number, a ({like.shape[0]},) tensor (one per "
                             f"row) or broadcast against shape {tuple(like.shape)}, got shape "
                             f"{tuple(s.shape)}") from None
        return s
    return check_finite(scale, name)


def _check_eps_pair(a, b, name_a, name_b):
    check_tensor(a, name_a)
    check_tensor(b, name_b)
    check_same_shape(a, b, name_a, name_b)


def _noise_level(alpha_bar_t, like: torch.Tensor):
    """√(1−ᾱ_t) for ᾱ_t in (0, 1]: a float, or for a (B,) tensor one value per row of ``like``,
    shaped (B, 1, …, 1)."""
    if isinstance(alpha_bar_t, torch.Tensor) and alpha_bar_t.ndim > 0:
        a = alpha_bar_t.to(dtype=like.dtype, device=like.device)
        if not bool(((a > 0) & (a <= 1)).all()):
            raise ValueError(f"alpha_bar_t must lie in (0, 1], got values in "
                             f"[{float(a.min())}, {float(a.max())}]")
        if a.ndim == 1 and like.ndim > 1:
            if a.shape[0] != like.shape[0]:
                raise ValueError(f"alpha_bar_t must be a number or hold one value per batch "
                                 f"row ({like.shape[0]}), got shape {tuple(a.shape)}")
            a = a.reshape(-1, *([1] * (like.ndim - 1)))
        return (1 - a).sqrt()
    return math.sqrt(1 - check_range(alpha_bar_t, "alpha_bar_t", 0, 1, lo_open=True))


def _check_eps_list(eps_uncond, eps_conds) -> list:
    """``eps_conds`` (a list of tensors or a stacked (K, …) tensor) as a list of tensors, each of
    ``eps_uncond``'s shape."""
    check_tensor(eps_uncond, "eps_uncond")
    if isinstance(eps_conds, torch.Tensor):
        if eps_conds.ndim != eps_uncond.ndim + 1:
            raise ValueError(f"eps_conds must be a list of tensors or a stacked tensor of shape "
                             f"(K, {', '.join(map(str, eps_uncond.shape))}), got shape "
                             f"{tuple(eps_conds.shape)}")
        eps_conds = list(eps_conds)
    if not isinstance(eps_conds, (list, tuple)):
        raise TypeError(f"eps_conds must be a list or tuple of tensors, got "
                        f"{type(eps_conds).__name__}")
    for k, e in enumerate(eps_conds):
        _check_eps_pair(eps_uncond, e, "eps_uncond", f"eps_conds[{k}]")
    return list(eps_conds)


def _check_scales(scales, n: int, like: torch.Tensor, name: str = "scales") -> list:
    """One guidance weight per condition (``n``), each as :func:`_check_scale` takes it."""
    if isinstance(scales, torch.Tensor):
        scales = list(scales) if scales.ndim > 0 else [scales]
    if not isinstance(scales, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple with one weight per condition, got "
                        f"{type(scales).__name__}")
    if len(scales) != n:
        raise ValueError(f"{name} must have one weight per entry of eps_conds ({n}), got "
                         f"{len(scales)}")
    return [_check_scale(w, f"{name}[{k}]", like) for k, w in enumerate(scales)]


def _check_finite_scale(s, name: str):
    """A guidance weight known before the model runs: a finite number or a finite tensor."""
    if isinstance(s, torch.Tensor):
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{name} must be finite, got a tensor containing non-finite values")
        return s
    return check_finite(s, name)


# ----------------------------------------------------------------------------- conventions
def scale_from_ho_salimans(w: float) -> float:
    """diffusers' ``guidance_scale`` for Ho & Salimans' weight w: scale = w + 1.

    Ho & Salimans (2022, eq 6) and Ahmad's notes (eq 1.36) write ε̃ = (w + 1) ε_c − w ε_u; eq 1.44 and
    diffusers write ε_u + scale (ε_c − ε_u). Expanding the second, (scale) ε_c − (scale − 1) ε_u,
    shows the two agree when scale = w + 1. So w = 0 (no guidance in Ho & Salimans' terms) is
    the plain conditional model, scale 1.
    """
    return check_finite(w, "w") + 1.0


def ho_salimans_from_scale(scale: float) -> float:
    """Ho & Salimans' w for a diffusers ``guidance_scale``: w = scale − 1 (see above)."""
    return check_finite(scale, "scale") - 1.0


# ----------------------------------------------------------------------------- the rules
def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance: ε_u + scale · (ε_c − ε_u) (Ahmad's notes, eq 1.44; the
    controlled-generation blog, §2.3).

    ``scale`` is diffusers' ``guidance_scale``: 0 gives ε_u, 1 gives ε_c, larger values
    extrapolate past the conditional prediction. In Ho & Salimans' convention (Ahmad's
    notes, eq 1.36: (w + 1) ε_c − w ε_u) the same rule has w = scale − 1.

    Shapes: ``eps_uncond`` and ``eps_cond`` any identical shape (B, …); ``scale`` a number, a
    (B,) tensor (one scale per row) or a tensor broadcasting against ε. Returns ε's shape.
    Raises ``ValueError`` for different shapes or a non-finite scale, ``TypeError`` for
    non-tensors.
    """
    _check_eps_pair(eps_uncond, eps_cond, "eps_uncond", "eps_cond")
    s = _check_scale(scale, "scale", eps_uncond)
    return eps_uncond + s * (eps_cond - eps_uncond)  # eq 1.44


def classifier_guidance(eps: torch.Tensor, grad_log_prob: torch.Tensor, alpha_bar_t,
                        scale) -> torch.Tensor:
    """Classifier guidance: ε − scale · √(1−ᾱ_t) · ∇_x log p_φ(y | x_t) (Ahmad's notes, eq 1.30).

    Ahmad's notes print the factor as √(1−λ) (and 1/√(1−σ̄_t) in eq 1.28); both mean √(1−ᾱ_t), as in
    Dhariwal & Nichol's Algorithm 2 (see the errata). With ε = −√(1−ᾱ_t) ∇ log p_t(x), this is
    the ε of the score ∇ log p_t(x) + scale · ∇ log p_t(y | x).

    Shapes: ``eps`` and ``grad_log_prob`` identical (B, …); ``alpha_bar_t`` a number in (0, 1]
    or a (B,) tensor (one per row); ``scale`` as in :func:`cfg`. Raises ``ValueError`` for
    different shapes, ᾱ outside (0, 1] or a non-finite scale.
    """
    _check_eps_pair(eps, grad_log_prob, "eps", "grad_log_prob")
    s = _check_scale(scale, "scale", eps)
    sigma = _noise_level(alpha_bar_t, eps)                  # √(1−ᾱ_t)
    return eps - s * sigma * grad_log_prob  # eq 1.30


def multi_cfg(eps_uncond: torch.Tensor, eps_conds: Sequence[torch.Tensor],
              scales: Sequence) -> torch.Tensor:
    """Multi-condition guidance: ε_u + Σ_k scales[k] · (ε_k − ε_u) (the controlled-generation
    blog, §2.4.3).

    Each ε_k is the model with condition k switched on and every other channel null. Weights
    may be negative: a negative weight pushes away from condition k (a "negative prompt" in the
    composable-diffusion sense of Liu et al. 2022). The blog writes the negative channels with
    an explicit minus *and* says they "use negative weights"; here there is one weight per
    condition and its sign says which (see the errata).

    With one condition this is :func:`cfg`. Shapes: every tensor identical (B, …);
    ``scales`` a sequence of numbers (or per-row tensors) with ``len(eps_conds)`` entries.
    Raises ``ValueError`` if the lengths differ, shapes differ or a scale is not finite.
    """
    eps_conds = _check_eps_list(eps_uncond, eps_conds)
    scales = _check_scales(scales, len(eps_conds), eps_uncond)
    return _sum_of_deltas(eps_uncond, [e - eps_uncond for e in eps_conds], scales)


def _sum_of_deltas(eps_u: torch.Tensor, deltas: Sequence[torch.Tensor],
                   weights: Sequence) -> torch.Tensor:
    """ε_u + Σ_k w_k d_k with d_k = ε_k − ε_u (the controlled-generation blog, §2.4.3; the
    conjunction of Liu et al. 2022): the one implementation that :func:`multi_cfg` and
    :func:`diffnotes.control.compose.compose` share. Arguments already checked: ``deltas`` and
    ``weights`` of equal length, each weight a number or a tensor broadcasting against ε_u."""
    out = eps_u.clone()
    for d, w in zip(deltas, weights):
        out = out + w * d  # blog §2.4.3: ε_u + Σ w_k d_k
    return out


# ----------------------------------------------------------------------------- batched models
def _expand_cond(c, B: int, name: str, device) -> Any:
    """One condition as a batch of B rows: an int/float → (B,), a 0-d tensor → (B,), a tensor
    with first dimension 1 → expanded to B, a tensor with first dimension B → unchanged."""
    if isinstance(c, bool):
        raise TypeError(f"{name} must be a number or a tensor, got bool")
    if isinstance(c, int):
        return torch.full((B,), c, dtype=torch.long, device=device)
    if isinstance(c, float):
        return torch.full((B,), c, dtype=torch.float32, device=device)
    if isinstance(c, torch.Tensor):
        c = c.to(device)
        if c.ndim == 0:
            return c.reshape(1).expand(B)
        if c.shape[0] == B:
            return c
        if c.shape[0] == 1:
            return c.expand(B, *c.shape[1:])
        raise ValueError(f"{name} must have batch size 1 or {B} (the batch of x), got shape "
                         f"{tuple(c.shape)}")
    raise TypeError(f"{name} must be an int, a float or a tensor (use cat_conds for other "
                    f"kinds of condition), got {type(c).__name__}")


def guided_eps_model(model: Callable, cond, null, scale=1.0, *,
                     cat_conds: Callable | None = None) -> Callable:
    """Wrap a conditional ``model(x, t, cond)`` into a guided ``eps_model(x, t)``.

    Every step runs the unconditional and the conditional passes as **one** batched forward
    call: x, t and the conditions are concatenated along the batch, ``model`` is called once,
    and the output is split and combined with :func:`cfg` (one condition) or :func:`multi_cfg`
    (a list of conditions). ``model`` must accept a batch whose rows carry different
    conditions: for the digits UNet, class labels including ``NULL_CLASS``; for the analytic
    mixture (:func:`mixture_cond_model`), per-row labels with −1 for "none".

    Args:
        model: ``model(x, t, cond) -> eps`` with x (B, …), t a (B,) long tensor, cond a batch.
        cond: one condition, or a list/tuple of conditions (multi-condition guidance; then
            ``scale`` is a list of the same length). A condition is an int (the same label for
            every row), a 0-d tensor, or a tensor with batch size 1 or B.
        null: the unconditional ("dropped") condition, in the same form.
        scale: diffusers' guidance scale(s); may be negative in the multi-condition case.
        cat_conds: how to concatenate a list of condition batches (default ``torch.cat``).
    Returns ``eps_model(x, t)``. Raises at construction for a non-finite scale or mismatched
    lengths, and at call time for a condition whose batch size is neither 1 nor B.
    """
    check_callable(model, "model", "model(x, t, cond)")
    multi = isinstance(cond, (list, tuple))
    conds = list(cond) if multi else [cond]
    if multi:
        if not isinstance(scale, (list, tuple)):
            raise TypeError(f"scale must be a list with one weight per condition when cond is "
                            f"a list, got {type(scale).__name__}")
        if len(scale) != len(conds):
            raise ValueError(f"scale must have one weight per condition ({len(conds)}), got "
                             f"{len(scale)}")
        if not conds:
            raise ValueError("cond must not be an empty list")
        scales = list(scale)
    else:
        scales = [scale]
    for k, s in enumerate(scales):
        _check_finite_scale(s, f"scale[{k}]" if multi else "scale")
    cat = cat_conds or (lambda cs: torch.cat(cs, dim=0))
    n = len(conds) + 1

    def eps_model(x: torch.Tensor, t) -> torch.Tensor:
        check_tensor(x, "x")
        B, t = x.shape[0], batch_timesteps(t, x)
        batch_conds = [_expand_cond(null, B, "null", x.device)] + \
            [_expand_cond(c, B, f"cond[{k}]" if multi else "cond", x.device)
             for k, c in enumerate(conds)]
        out = model(torch.cat([x] * n, dim=0), torch.cat([t] * n, dim=0), cat(batch_conds))
        if out.shape[0] != n * B:
            raise ValueError(f"model returned batch size {out.shape[0]}, expected {n * B} "
                             f"({n} passes of {B} rows)")
        parts = list(out.chunk(n, dim=0))
        if multi:
            return multi_cfg(parts[0], parts[1:], scales)
        return cfg(parts[0], parts[1], scales[0])

    return eps_model


# ----------------------------------------------------------------------------- classifiers
def classifier_grad(classifier: Callable, x: torch.Tensor, t, y) -> torch.Tensor:
    """∇_x log p_φ(y | x_t, t) by backpropagation: ``classifier(x, t) -> logits`` (B, C).

    ``y`` is an int or a (B,) long tensor. Returns a tensor of x's shape. Works under
    ``torch.no_grad()`` (it enables gradients locally). Raises ``ValueError`` if the logits are
    not (B, C) or y is out of range.
    """
    check_tensor(x, "x")
    B = x.shape[0]
    y = _expand_cond(y, B, "y", x.device) if not isinstance(y, torch.Tensor) or y.ndim == 0 \
        else y.to(x.device)
    t = batch_timesteps(t, x)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = classifier(xg, t)
        if logits.ndim != 2 or logits.shape[0] != B:
            raise ValueError(f"classifier(x, t) must return logits of shape ({B}, C), got "
                             f"{tuple(logits.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
            raise ValueError(f"y must be a class index in [0, {logits.shape[1] - 1}], got "
                             f"{y.tolist()}")
        logp = torch.log_softmax(logits.float() if logits.dtype == torch.float16 else logits,
                                 dim=1).gather(1, y.long().reshape(-1, 1)).sum()
        (g,) = torch.autograd.grad(logp, xg)
    return g.to(x.dtype)


def classifier_guided_eps_model(eps_model: Callable, classifier: Callable | None, y,
                                alphas_cumprod: torch.Tensor, scale, *,
                                grad_fn: Callable | None = None) -> Callable:
    """An ``eps_model(x, t)`` with classifier guidance (Ahmad's notes, eq 1.30; Dhariwal & Nichol).

    ``eps_model`` is the unguided model (usually unconditional). The gradient comes from
    :func:`classifier_grad` on ``classifier(x, t)``, or from ``grad_fn(x, t, y)`` if given
    (e.g. the analytic mixture's exact ``grad_log_class_posterior``). ``y`` is an int or a (B,)
    tensor of labels; ``scale`` a number or a (B,) tensor (one per row). Each call runs the model
    once and the classifier forward and backward once.
    """
    if classifier is None and grad_fn is None:
        raise ValueError("classifier and grad_fn cannot both be None")
    check_tensor(alphas_cumprod, "alphas_cumprod", ndim=1)
    _check_finite_scale(scale, "scale")
    grad = grad_fn or (lambda x, t, y_: classifier_grad(classifier, x, t, y_))

    def guided(x, t):
        t = batch_timesteps(t, x)
        e = eps_model(x, t)
        g = grad(x, t, y).to(e.dtype)
        a = alphas_cumprod.to(x.device)[t].to(e.dtype)
        return classifier_guidance(e, g, a, scale)

    return guided


# ----------------------------------------------------------------------------- condition dropout
def uniform_drop_rate(u: float, K: int) -> float:
    """The per-channel drop rate q that makes all K channels drop together with rate u:
    q^K = u, so q = u^{1/K} (the controlled-generation blog, §2.4.2)."""
    u, K = check_range(u, "u", 0, 1), check_int(K, "K", min=1)
    return u ** (1.0 / K)


def condition_dropout_mask(batch_size: int, drop_probs: Sequence[float],
                           generator: torch.Generator | None = None,
                           available: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel keep masks m_k ~ Bernoulli(1 − q_k), independent across channels and rows
    (the controlled-generation blog, §2.4.2). Returns a (B, K) bool tensor, True = keep the condition.

    ``available`` (optional, (B, K) or (K,) bool): a channel that is unavailable for a row is
    always dropped. Raises ``ValueError`` for a rate outside [0, 1] or a bad ``available``.
    """
    batch_size = check_int(batch_size, "batch_size", min=0)
    if isinstance(drop_probs, torch.Tensor) and drop_probs.ndim > 0:
        q_t = _check_rate_tensor(drop_probs, batch_size)
    else:
        if isinstance(drop_probs, (int, float)) or isinstance(drop_probs, torch.Tensor):
            drop_probs = [drop_probs]
        q = [check_range(v, f"drop_probs[{k}]", 0, 1) for k, v in enumerate(drop_probs)]
        if not q:
            raise ValueError("drop_probs must list one rate per channel")
        q_t = torch.tensor(q, dtype=torch.float64)
    u = torch.rand(batch_size, q_t.shape[-1], generator=generator, dtype=torch.float64)
    keep = u >= q_t                      # P(keep) = 1 − q_k
    if available is not None:
        available = torch.as_tensor(available, dtype=torch.bool)
        try:
            keep = keep & available.expand_as(keep)
        except RuntimeError:
            raise ValueError(f"available must have shape ({len(q)},) or ({batch_size}, "
                             f"{len(q)}), got {tuple(available.shape)}") from None
    return keep


def _check_rate_tensor(q: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Drop rates as a tensor: (K,) one per channel, or (B, K) one per row and channel (rates
    q_k(t) that depend on each row's time step). Returned as float64."""
    if q.dtype == torch.bool or q.dtype.is_complex:
        raise TypeError(f"drop_probs must hold real rates, got dtype {q.dtype}")
    q = q.detach().to("cpu", torch.float64)
    if q.ndim > 2 or q.shape[-1] == 0 or (q.ndim == 2 and q.shape[0] != batch_size):
        raise ValueError(f"drop_probs must have shape (K,) or ({batch_size}, K) with K >= 1, got "
                         f"{tuple(q.shape)}")
    if not bool(((q >= 0) & (q <= 1)).all()):
        raise ValueError(f"drop_probs must lie in [0, 1], got values in [{float(q.min())}, "
                         f"{float(q.max())}]")
    return q


def drop_conditions(conds: Sequence[torch.Tensor], nulls: Sequence, drop_probs: Sequence[float],
                    generator: torch.Generator | None = None,
                    available: torch.Tensor | None = None):
    """Replace each channel's condition by its own null, row by row, with rates ``drop_probs``
    (the controlled-generation blog, §2.4.2: c̃_k = c_k if m_k = 1 and the channel is available, else ∅_k).

    Args: ``conds`` K tensors of batch B (labels (B,) or embeddings (B, …)); ``nulls`` K null
    conditions (a number or a tensor broadcasting against one row of the condition). Returns
    ``(new_conds, keep)`` with ``keep`` the (B, K) mask.
    """
    if len(conds) != len(nulls) or len(conds) != len(drop_probs):
        raise ValueError(f"conds, nulls and drop_probs must have the same length, got "
                         f"{len(conds)}, {len(nulls)} and {len(drop_probs)}")
    if not conds:
        raise ValueError("conds must not be empty")
    B = check_tensor(conds[0], "conds[0]").shape[0]
    keep = condition_dropout_mask(B, drop_probs, generator, available)
    return _replace_dropped(conds, nulls, keep), keep


def _replace_dropped(conds: Sequence[torch.Tensor], nulls: Sequence,
                     keep: torch.Tensor) -> list:
    """c̃_k = c_k where ``keep[:, k]``, else the channel's own null ∅_k (the controlled-generation
    blog, §2.4.2): the one replacement :func:`drop_conditions` and
    :func:`diffnotes.control.compose.channel_dropout` share. A null that is a tensor keeps its
    autograd graph (a learned null embedding receives the gradient of the rows it replaced)."""
    B = keep.shape[0]
    out = []
    for k, (c, n) in enumerate(zip(conds, nulls)):
        check_tensor(c, f"conds[{k}]")
        if c.shape[0] != B:
            raise ValueError(f"conds[{k}] must have batch size {B}, got shape {tuple(c.shape)}")
        m = keep[:, k].to(c.device).reshape(-1, *([1] * (c.ndim - 1)))
        out.append(torch.where(m, c, torch.as_tensor(n, dtype=c.dtype, device=c.device)))
    return out


# ----------------------------------------------------------------------------- exact models
def mixture_cond_model(gmm, null: int = -1) -> Callable:
    """The analytic mixture as ``model(x, t, y)`` with per-row labels; ``y == null`` rows get
    the unconditional ε. Exact (float64): the reference for every guidance rule."""
    def model(x, t, y):
        y = torch.as_tensor(y, dtype=torch.long)
        if y.ndim == 0:
            y = y.expand(x.shape[0])
        if not isinstance(t, float) and (not isinstance(t, torch.Tensor) or t.ndim == 0):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long)  # a float t is ᾱ itself
        out = gmm.eps(x, t)
        is_c = y != null
        if bool(is_c.any()):
            t_c = t if isinstance(t, float) else t[is_c]
            out[is_c] = gmm.eps(x[is_c], t_c, y[is_c])
        return out.to(x.dtype)
    return model


def product_mixture_cond_model(gmms: Sequence, null: int = -1) -> Callable:
    """A factorised model: x = (x^(1), …, x^(K)) with independent blocks, block k drawn from the
    mixture ``gmms[k]`` whose label is channel k. ``model(x, t, c)`` takes c of shape (B, K),
    ``null`` meaning "channel off". Because the blocks and their noise are independent, the
    channels are conditionally independent given x_t, and multi-condition guidance is exact
    (the assumption of the controlled-generation blog, §2.4.3, holds)."""
    dims = [g.D for g in gmms]
    models = [mixture_cond_model(g, null) for g in gmms]

    def model(x, t, c):
        c = torch.as_tensor(c, dtype=torch.long)
        if c.ndim != 2 or c.shape[1] != len(gmms):
            raise ValueError(f"c must have shape (B, {len(gmms)}), got {tuple(c.shape)}")
        blocks = x.split(dims, dim=1)
        return torch.cat([m(b, t, c[:, k]) for k, (m, b) in enumerate(zip(models, blocks))], 1)
    return model


# ----------------------------------------------------------------------------- tilted densities
def tilted_log_density(gmm, x: torch.Tensor, y: int, scale: float) -> torch.Tensor:
    """log p_0(x) + scale · log p_0(y | x), unnormalised: the "tilted" distribution that
    guidance with this scale is often said to sample. Equals scale · log p(x | y) +
    (1 − scale) · log p(x) up to a constant."""
    scale = check_finite(scale, "scale")
    logp = gmm.log_prob(x, 1.0)
    return logp + scale * torch.log(gmm.class_posterior(x, 1.0)[:, y])


def _edges(box, bins):
    (x0, x1), (y0, y1) = box
    return (torch.linspace(x0, x1, bins + 1, dtype=torch.float64),
            torch.linspace(y0, y1, bins + 1, dtype=torch.float64))


def histogram_density(samples: torch.Tensor, box, bins: int) -> torch.Tensor:
    """The fraction of 2-D ``samples`` in each of bins × bins cells of ``box`` ((x0, x1), (y0,
    y1)); samples outside the box are counted in no cell (so the total may be < 1)."""
    check_tensor(samples, "samples", ndim=2)
    if samples.shape[1] != 2:
        raise ValueError(f"samples must have shape (N, 2), got {tuple(samples.shape)}")
    ex, ey = _edges(box, bins)
    h, _ = torch.histogramdd(samples.double(), bins=[ex, ey])
    return h / samples.shape[0]


def grid_density(log_density: Callable, box, bins: int, sub: int = 4) -> torch.Tensor:
    """The probability of each of bins × bins cells of ``box`` under exp(log_density),
    normalised over the box, by a midpoint rule with sub × sub points per cell."""
    ex, ey = _edges(box, bins)
    n = bins * sub
    hx, hy = (ex[-1] - ex[0]) / n, (ey[-1] - ey[0]) / n
    gx = ex[0] + hx * (torch.arange(n, dtype=torch.float64) + 0.5)
    gy = ey[0] + hy * (torch.arange(n, dtype=torch.float64) + 0.5)
    X, Y = torch.meshgrid(gx, gy, indexing="ij")
    lp = log_density(torch.stack([X.flatten(), Y.flatten()], 1)).reshape(n, n)
    p = torch.exp(lp - lp.max())
    p = p.reshape(bins, sub, bins, sub).sum((1, 3))
    return p / p.sum()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """½ Σ |p − q| between two discrete distributions of the same shape."""
    check_same_shape(p, q, "p", "q")
    return 0.5 * float((p - q).abs().sum())


def mixture_guided_eps(gmm, y: int, scale) -> Callable:
    """Exact guided ``eps_model(x, t)`` for the analytic mixture: ε_u + scale (ε_y − ε_u), both
    ε from one evaluation of the per-component terms (fast; equal to
    ``guided_eps_model(mixture_cond_model(gmm), y, -1, scale)``). ``scale`` may be a (B,) tensor.
    """
    def eps_model(x, t):
        diff, var, ll = gmm._component_terms(x, t)
        comp = -diff / var                                        # ∇ log p_t(x | c), (B, K, D)
        r = torch.softmax(ll + gmm.weights.log(), dim=1)          # p_t(c | x)
        s_u = (r[:, :, None] * comp).sum(1)
        s_c = comp[:, y]
        a = gmm._alpha_bar(t, x)
        sig = (1 - a).sqrt()
        return cfg(-sig * s_u, -sig * s_c, scale).to(x.dtype)    # ε = −√(1−ᾱ) ∇ log p
    return eps_model


# ----------------------------------------------------------------------------- self-attention guidance
__all__ += ["gaussian_blur_2d", "sag_mask", "sag_degrade", "sag_combine", "sag_layer",
            "self_attention_guidance", "sag_sample"]


def gaussian_blur_2d(x: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with a normalised ``kernel_size`` kernel of
    standard deviation ``sigma`` (pixels), reflect padding: the blur of self-attention guidance
    (Hong et al. 2023; diffusers' ``StableDiffusionSAGPipeline`` uses kernel 9, σ = 1). The kernel
    is computed in x's dtype; it sums to 1, so constant images are unchanged."""
    check_tensor(x, "x", ndim=4)
    kernel_size = check_int(kernel_size, "kernel_size", min=1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    sigma = check_finite(sigma, "sigma")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    half = (kernel_size - 1) * 0.5
    pos = torch.linspace(-half, half, kernel_size, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (pos / sigma) ** 2)
    k = k / k.sum()
    k2 = (k[:, None] * k[None, :]).expand(x.shape[1], 1, kernel_size, kernel_size)
    p = kernel_size // 2
    return torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, [p, p, p, p], mode="reflect"), k2, groups=x.shape[1])


def _map_grid(n: int, latent_hw) -> tuple[int, int]:
    """The (h, w) grid of n attention tokens over a latent of size ``latent_hw`` (the latent
    side divided by a power of two, rounded up as the UNet's stride-2 convolutions round)."""
    H, W = latent_hw
    for k in range(12):
        h, w = math.ceil(H / 2 ** k), math.ceil(W / 2 ** k)
        if h * w == n:
            return h, w
    raise ValueError(f"attention with {n} tokens does not tile the latent {H}×{W}")


def sag_mask(attn: torch.Tensor, latent_hw, threshold: float = 1.0) -> torch.Tensor:
    """The blur mask of self-attention guidance (Ahmad's notes, eqs 5.56–5.57; Hong et al. 2023).

    ``attn``: self-attention probabilities, (B, N, N) averaged over heads or (B, heads, N, N);
    row i = query token i. A_t = GAP(A^S): mean over heads, then the *column* sum over queries
    (how much attention key token j receives); M = 1(A_t > ψ) with ψ = ``threshold`` = 1, the
    mean column sum (each softmax row sums to 1). The (h, w) map is reshaped from the N tokens
    and upsampled (nearest) to ``latent_hw``. Returns a float (B, 1, H, W) mask of 0/1.
    """
    check_tensor(attn, "attn", ndim=(3, 4))
    if attn.ndim == 4:
        attn = attn.mean(1)                                   # GAP over heads (5.56)
    B, nq, nk = attn.shape
    if nq != nk:
        raise ValueError(f"attn must be self-attention (B, N, N), got {tuple(attn.shape)}")
    threshold = check_finite(threshold, "threshold")
    h, w = _map_grid(nk, latent_hw)
    m = (attn.sum(1) > threshold).to(attn.dtype)              # M = 1(A_t > ψ)  (5.57)
    m = m.reshape(B, 1, h, w)
    return torch.nn.functional.interpolate(m, size=tuple(latent_hw))   # Upsample (5.56)


def sag_degrade(x0_hat: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, alpha_bar_t,
                kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """The degraded input x̂_t of self-attention guidance (Ahmad's notes, eq 5.58, corrected):
    blur the predicted x̂_0 where the mask is 1, keep it elsewhere, re-noise to level t with the
    model's own ε:  x̄_0 = (1 − M) ⊙ x̂_0 + M ⊙ G_σ(x̂_0),  x̂_t = √ᾱ_t x̄_0 + √(1−ᾱ_t) ε
    (Hong et al. 2023; blurring x̂_0 rather than the noisy x_t, as the authors' and diffusers'
    code do). With M = 0, x̂_t = √ᾱ_t x̂_0 + √(1−ᾱ_t) ε = x_t up to rounding."""
    _check_eps_pair(x0_hat, eps, "x0_hat", "eps")
    check_tensor(mask, "mask")
    a = alpha_bar_t
    if isinstance(a, torch.Tensor) and a.ndim > 0:
        a = a.to(x0_hat.dtype).reshape(-1, *([1] * (x0_hat.ndim - 1)))
        sa, s1a = a.sqrt(), (1 - a).sqrt()
    else:
        a = check_range(float(a), "alpha_bar_t", 0, 1, lo_open=True)
        sa, s1a = math.sqrt(a), math.sqrt(1 - a)
    blurred = gaussian_blur_2d(x0_hat, kernel_size, sigma)
    mixed = blurred * mask + x0_hat * (1 - mask)                       # eq 5.58
    return sa * mixed + s1a * eps                                      # re-noised to level t


def sag_combine(eps: torch.Tensor, eps_ref: torch.Tensor, eps_degraded: torch.Tensor,
                scale) -> torch.Tensor:
    """ε̃ = ε + s (ε_ref − ε_θ(x̂_t)) (Ahmad's notes, eq 5.55, corrected; Hong et al. 2023, eq 16):
    with ``eps = eps_ref`` it is ε_θ(x̂_t) + (1 + s)(ε_θ(x_t) − ε_θ(x̂_t)). The notes print a
    leading ε_θ(x_t), which at s = 0 would give 2ε − ε_θ(x̂_t) instead of ε (see the errata).
    ``eps`` is the prediction the sampler uses (after CFG: ``cfg(ε_u, ε_c, w)``), ``eps_ref`` the
    one whose self-attention made the mask (ε_u with CFG, Hong et al. eq 25)."""
    _check_eps_pair(eps, eps_ref, "eps", "eps_ref")
    _check_eps_pair(eps, eps_degraded, "eps", "eps_degraded")
    s = _check_scale(scale, "scale", eps)
    return eps + s * (eps_ref - eps_degraded)                          # eq 5.55 (corrected)


def sag_layer(unet) -> str:
    """The self-attention layer whose map self-attention guidance reads: the first mid-block
    one, i.e. entry ``n_down`` of :func:`diffnotes.attention.attention_layers` ``(unet, "self")``
    where ``n_down`` is the number of down-block self-attention layers (Stable Diffusion 1.5:
    entry 6 of 16, the 8×8 map; the shapes UNet: entry 2 of 7). Raises ``ValueError`` for a
    UNet without a mid-block self-attention."""
    from .attention import attention_layers
    names = attention_layers(unet, "self")
    mids = [n for n in names if n.startswith("mid_block")]
    if not mids:
        raise ValueError(f"unet has no mid-block self-attention layer (self-attention layers: "
                         f"{names})")
    return mids[0]


def self_attention_guidance(eps_model: Callable, attention: Callable, alphas_cumprod: torch.Tensor,
                            scale=0.75, *, ref_model: Callable | None = None,
                            sigma: float = 1.0, kernel_size: int = 9, threshold: float = 1.0,
                            callback: Callable | None = None) -> Callable:
    """Self-attention guidance (SAG) as an ``eps_model(x, t)`` wrapper (Hong et al., ICCV 2023;
    Ahmad's notes, eqs 5.55–5.58, corrected).

    Each call: (1) ``eps_model(x, t)`` returns ε (the prediction to guide) or a pair
    ``(ε, ε_ref)`` — with classifier-free guidance ε = ``cfg(ε_u, ε_c, w)`` and ε_ref = ε_u;
    without, ε_ref = ε; (2) ``attention()`` returns the self-attention probabilities (B, N, N)
    (or (B, heads, N, N)) of the rows that computed ε_ref in that call (e.g. from an
    :class:`diffnotes.attention.AttentionCollector` on :func:`sag_layer`); (3) the mask
    :func:`sag_mask`, x̂_0 from ε_ref, the degraded x̂_t :func:`sag_degrade`; (4) ``ref_model``
    (default: ``eps_model``'s ε_ref) on x̂_t; (5) :func:`sag_combine`.

    ``scale`` is the SAG scale s (diffusers' ``sag_scale``, paper default 0.75; 0 = the unguided
    sampler, bitwise), ``sigma`` and ``kernel_size`` the blur (paper: 1 and 9), ``threshold`` ψ.
    ``callback(dict(t=, x=, x0_hat=, mask=, x_degraded=, eps=, eps_ref=, eps_degraded=))``
    sees each step. Costs one extra model pass (of the reference rows) per step.
    """
    check_callable(eps_model, "eps_model", "eps_model(x, t)")
    check_callable(attention, "attention", "attention()")
    check_tensor(alphas_cumprod, "alphas_cumprod", ndim=1)
    _check_finite_scale(scale, "scale")
    gaussian_blur_2d(torch.zeros(1, 1, kernel_size, kernel_size), kernel_size, sigma)  # checks
    threshold = check_finite(threshold, "threshold")

    def _split(out):
        return out if isinstance(out, tuple) else (out, out)

    def guided(x, t):
        t = batch_timesteps(t, x)
        eps, eps_ref = _split(eps_model(x, t))
        attn = attention()
        if attn.shape[0] != x.shape[0]:
            raise ValueError(f"attention() must return one map per row of x ({x.shape[0]}), got "
                             f"shape {tuple(attn.shape)}")
        a = alphas_cumprod.to(device=x.device, dtype=x.dtype)[t].reshape(-1, *[1] * (x.ndim - 1))
        x0 = (x - (1 - a).sqrt() * eps_ref) / a.sqrt()                # x̂_0 (eq 1.6)
        mask = sag_mask(attn.to(x.dtype), x.shape[-2:], threshold)
        x_deg = sag_degrade(x0, eps_ref, mask, alphas_cumprod.to(x.dtype)[t.cpu()],
                            kernel_size, sigma)
        eps_deg = (ref_model(x_deg, t) if ref_model is not None
                   else _split(eps_model(x_deg, t))[1])
        out = sag_combine(eps, eps_ref, eps_deg, scale)
        if callback is not None:
            callback(dict(t=int(t[0]), x=x, x0_hat=x0, mask=mask, x_degraded=x_deg, eps=eps,
                          eps_ref=eps_ref, eps_degraded=eps_deg))
        return out

    return guided


def sag_sample(pipe, prompt, *, sag_scale=0.75, guidance_scale: float = 7.5,
               num_inference_steps: int = 50, sigma: float = 1.0, kernel_size: int = 9,
               threshold: float = 1.0, latents: torch.Tensor | None = None,
               generator: torch.Generator | None = None, layer: str | None = None,
               callback: Callable | None = None, progress: bool = False,
               output_type: str = "np"):
    """Text-to-image with self-attention guidance on a diffusers pipeline: DDIM
    (:func:`diffnotes.ddim.ddim_sample`, η = 0) with classifier-free guidance
    (:func:`cfg`, one batched pass of [null; prompt] rows) wrapped in
    :func:`self_attention_guidance`, the self-attention map of the unconditional rows at
    :func:`sag_layer` (or ``layer``) recorded by an :class:`diffnotes.attention.AttentionCollector`.
    The degraded pass runs the unconditional rows only (Hong et al. 2023, eq 25). With
    ``guidance_scale == 1`` there is no CFG: ε_ref = ε_c and the degraded pass uses the prompt.

    ``prompt``: a string or a list (one image each); ``latents`` (B, C, h, w) initial noise
    (default from ``generator``). ``output_type``: ``"latent"`` (x_0), ``"np"`` (B, H, W, 3) in
    [0, 1] or ``"pt"``. ``callback`` as in :func:`self_attention_guidance`.
    """
    from .attention import AttentionCollector
    from .ddim import ddim_sample
    from .editing.common import encode_prompts, pipe_alphas_cumprod, pipe_timesteps

    if not isinstance(prompt, (str, list, tuple)):
        raise TypeError(f"prompt must be a string or a list of strings, got "
                        f"{type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a list of strings, got {prompt!r}")
    if output_type not in ("latent", "np", "pt"):
        raise ValueError(f"output_type must be 'latent', 'np' or 'pt', got {output_type!r}")
    guidance_scale = check_finite(guidance_scale, "guidance_scale")
    unet = pipe.unet
    B = len(prompts)
    u = unet.config
    if latents is None:
        latents = torch.randn((B, u.in_channels, u.sample_size, u.sample_size),
                              generator=generator, dtype=unet.dtype,
                              device=generator.device if generator is not None else "cpu")
    check_tensor(latents, "latents", ndim=4)
    if latents.shape[0] != B:
        raise ValueError(f"latents must have one row per prompt ({B}), got {tuple(latents.shape)}")
    x_T = latents.to(unet.device, unet.dtype)
    cond = encode_prompts(pipe, prompts)
    use_cfg = guidance_scale != 1.0
    null = encode_prompts(pipe, "").expand(B, -1, -1) if use_cfg else None
    name = layer or sag_layer(unet)
    col = AttentionCollector(("self",), layers=[name])

    def eps_model(x, t):
        col.clear()
        if not use_cfg:
            return unet(x, t, encoder_hidden_states=cond).sample
        out = unet(torch.cat([x, x]), torch.cat([t, t]),
                   encoder_hidden_states=torch.cat([null, cond])).sample
        e_u, e_c = out.chunk(2)
        return cfg(e_u, e_c, guidance_scale), e_u

    def ref_model(x, t):
        col.clear()
        return unet(x, t, encoder_hidden_states=null if use_cfg else cond).sample

    def attention():
        if not col.maps:
            raise RuntimeError(f"layer {name!r} recorded no self-attention")
        return col.maps[-1][:B]                       # the unconditional rows come first

    guided = self_attention_guidance(eps_model, attention, pipe_alphas_cumprod(pipe),
                                     sag_scale, ref_model=ref_model, sigma=sigma,
                                     kernel_size=kernel_size, threshold=threshold,
                                     callback=callback)
    col.attach(unet)
    try:
        with torch.no_grad():
            z = ddim_sample(guided, x_T, pipe_timesteps(pipe, num_inference_steps),
                            pipe_alphas_cumprod(pipe), progress=progress)
    finally:
        col.detach()
    if output_type == "latent":
        return z
    vae = pipe.vae
    with torch.no_grad():
        img = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample
    img = (img / 2 + 0.5).clamp(0, 1)
    return img if output_type == "pt" else img.permute(0, 2, 3, 1).float().cpu().numpy()
