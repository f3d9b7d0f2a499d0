"""Several condition channels in one model: per-channel dropout in training, channel-wise
composition of the guidance directions at sampling time.

The controlled-generation blog, §2.4 ("Multi-condition guidance"): §2.4.1 sets up the channels
(text, layout, segmentation, depth, a reference image, …; a channel is a condition *type* with
its own encoder and its own null state, not a count of prompts), §2.4.2 "Training with Multiple
Channels: Per-Channel Dropout", §2.4.3 "Inference: Channel-Wise Guidance and Composition".

- :class:`Channel`: name, encoder, its own learned null embedding ∅_k, a drop rate q_k(t);
- :func:`channel_dropout`: independent keep masks m_k ~ Bernoulli(1 − q_k(t)) per row and channel,
  c̃_k = c_k where m_k = 1 (and the channel is available), else ∅_k; with one all-dropped
  rate u and equal rates, q = u^{1/K} (blog §2.4.2);
- :func:`compose`: ε_total = ε_u + Σ_k w_k(t) d_k − Σ_k w⁻_k(t) d_k, d_k = ε(c_k) − ε_u, with
  w⁻_k ≥ 0 (blog §2.4.3, corrected; Liu et al. 2022's conjunction and negation; with one
  channel, classifier-free guidance, Ho & Salimans 2022, in diffusers' convention);
- :class:`SNRSchedule`: w_k(t) = w̄_k · min(SNR(t)^α, max_factor), the blog's SNR^α clipped;
- :func:`composed_eps_model`: a conditional ``model(x, t, conds)`` as a composed
  ``eps_model(x, t)`` for any sampler, all K + 1 passes in one batched call.

The sum ε_u + Σ w_k d_k is the same code as :func:`diffnotes.guidance.multi_cfg` (one
implementation, ``diffnotes.guidance._sum_of_deltas``); the replacement by the null is the
same code as :func:`diffnotes.guidance.drop_conditions`.

Two errata of the blog are fixed here (see the book's errata page): the negative channels carry
an explicit minus *and* "negative weights" (applying both turns a negative prompt positive), and
the SNR^α schedule, meant to "avoid late oversharpening", grows without bound at low noise.

Bad input raises ``ValueError`` (or ``TypeError`` for the wrong kind of object) naming the
argument: a channel without a null embedding, two channels sharing one null, u outside (0, 1),
a rate outside [0, 1], weights or negative weights of the wrong length, a negative w⁻, deltas
of a shape other than ε_u's, a schedule without t or ``alphas_cumprod``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..guidance import (_check_scale, _expand_cond, _replace_dropped, _sum_of_deltas,
                        condition_dropout_mask, uniform_drop_rate)
from ..utils import batch_timesteps, check_callable, check_finite, check_range, check_tensor

__all__ = ["Channel", "channel_dropout", "compose", "SNRSchedule", "composed_eps_model"]


# ----------------------------------------------------------------------------- channels
class Channel(nn.Module):
    """One condition channel (the controlled-generation blog, §2.4.1–2.4.2): a name, an encoder,
    its **own** null embedding ∅_k and a drop rate q_k(t) for per-channel dropout.

    Args:
        name: a non-empty string, unique among the channels of a model.
        encoder: ``encoder(c) -> embedding`` (an ``nn.Module`` is registered as a submodule, so
            its parameters train with the channel), or ``None`` when the conditions arrive
            already encoded.
        null_embedding: ∅_k with the shape of **one row** of the encoded condition (a (D,)
            vector, an (L, D) token sequence, …). A floating tensor becomes a learned
            ``nn.Parameter`` of this channel (a copy: two channels built from the same tensor
            get two distinct parameters; pass an ``nn.Parameter`` to keep it as it is). An int
            (or integer tensor) is a fixed null label (e.g. the digits UNet's ``NULL_CLASS``),
            stored as a buffer. Required: ``None`` raises ``ValueError``.
        dropout: q_k(t) in [0, 1], a number or a callable ``q(t)`` of the (B,) time steps
            returning a number or a (B,) tensor (e.g. higher dropout at high noise, blog §2.4.2).

    Raises ``ValueError`` naming ``name``, ``null_embedding`` or ``dropout``; ``TypeError`` for
    an encoder that cannot be called.
    """

    def __init__(self, name: str, encoder: Callable | None, null_embedding, dropout=0.1):
        super().__init__()
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if encoder is not None:
            check_callable(encoder, "encoder", "encoder(c)")
        if null_embedding is None:
            raise ValueError(f"null_embedding of channel {name!r} must be given: every channel "
                             f"needs its own null state ∅_k (the blog, §2.4.2), got None")
        self.name = name
        self.encoder = encoder
        if isinstance(null_embedding, bool):
            raise TypeError(f"null_embedding must be a tensor or an int label, got bool")
        if isinstance(null_embedding, int):
            null_embedding = torch.tensor(null_embedding, dtype=torch.long)
        if not isinstance(null_embedding, torch.Tensor):
            raise TypeError(f"null_embedding must be a tensor or an int label, got "
                            f"{type(null_embedding).__name__}")
        if null_embedding.is_floating_point():
            if not bool(torch.isfinite(null_embedding).all()):
                raise ValueError(f"null_embedding of channel {name!r} must be finite")
            p = null_embedding if isinstance(null_embedding, nn.Parameter) else \
                nn.Parameter(null_embedding.detach().clone())
            self.null_embedding = p
        else:
            self.register_buffer("null_embedding", null_embedding.detach().clone())
        if callable(dropout):
            self.dropout = dropout
        else:
            self.dropout = check_range(dropout, "dropout", 0, 1)

    def extra_repr(self) -> str:
        q = self.dropout if not callable(self.dropout) else "q(t)"
        return f"name={self.name!r}, null={tuple(self.null_embedding.shape)}, dropout={q}"

    def encode(self, c):
        """The channel's embedding of a condition batch: ``encoder(c)``, or ``c`` unchanged."""
        return c if self.encoder is None else self.encoder(c)

    def drop_rate(self, t=None):
        """q_k(t): a float, or a (B,) float64 tensor for a callable rate and (B,) time steps.
        Raises ``ValueError`` naming ``t`` if the rate depends on t and none is given, and naming
        ``dropout`` if the callable returns a value outside [0, 1]."""
        if not callable(self.dropout):
            return self.dropout
        if t is None:
            raise ValueError(f"t must be given: channel {self.name!r} has a time-dependent "
                             f"dropout q(t)")
        q = self.dropout(t)
        if isinstance(q, torch.Tensor) and q.ndim > 0:
            q = q.detach().to("cpu", torch.float64)
            if not bool(((q >= 0) & (q <= 1)).all()):
                raise ValueError(f"dropout of channel {self.name!r} must return rates in "
                                 f"[0, 1], got values in [{float(q.min())}, {float(q.max())}]")
            return q
        return check_range(q, f"dropout of channel {self.name!r}", 0, 1)


def _check_channels(channels) -> list:
    """A non-empty list of :class:`Channel` with unique names and distinct null embeddings."""
    if isinstance(channels, Channel):
        channels = [channels]
    if not isinstance(channels, (list, tuple, nn.ModuleList)) or not len(channels):
        raise ValueError(f"channels must be a non-empty list of Channel, got {channels!r}")
    channels = list(channels)
    for k, ch in enumerate(channels):
        if not isinstance(ch, Channel):
            raise TypeError(f"channels[{k}] must be a Channel, got {type(ch).__name__}")
    names = [ch.name for ch in channels]
    if len(set(names)) != len(names):
        raise ValueError(f"channels must have distinct names, got {names}")
    for i in range(len(channels)):
        for j in range(i):
            a, b = channels[i].null_embedding, channels[j].null_embedding
            if a is b or (a.numel() and b.numel() and a.data_ptr() == b.data_ptr()):
                raise ValueError(f"channels {names[j]!r} and {names[i]!r} share one null "
                                 f"embedding: each channel needs its own (the blog, §2.4.2)")
    return channels


def channel_dropout(batch_conditions, channels, u: float | None = None,
                    generator: torch.Generator | None = None, *, t=None,
                    available: torch.Tensor | None = None, encode: bool = True):
    """Per-channel dropout for training (the controlled-generation blog, §2.4.2).

    For every row and channel, an independent keep mask m_k ~ Bernoulli(1 − q_k(t)); the
    condition is c̃_k = c_k if m_k = 1 and the channel is available, else the channel's own null
    ∅_k (the loss is then E‖ε − ε_θ(x_t, t; c̃_1, …, c̃_K)‖²). The masks are independent, so the
    all-dropped (unconditional) rate is Π_k q_k. With ``u`` given, every channel gets the equal
    rate q = u^{1/K} (:func:`diffnotes.guidance.uniform_drop_rate`) and the all-dropped rate is
    u; e.g. u = 0.1 and K = 3 give q = 0.4642: each channel is dropped 46 % of the time and a row
    sees all three only (1 − q)³ = 15.4 % of the time. Without ``u``, each channel's
    ``drop_rate(t)``.

    Args:
        batch_conditions: K condition batches in the order of ``channels`` (or a dict by channel
            name), each with the batch size B as first dimension; passed through each
            channel's encoder first (``encode=True``).
        channels: K :class:`Channel` with distinct names and distinct null embeddings.
        u: the target all-dropped rate, in the open interval (0, 1) (the blog suggests 0.1–0.2).
        generator: a seeded ``torch.Generator`` (the masks are drawn on the CPU).
        t: the rows' time steps (an int or (B,)), needed for time-dependent rates.
        available: (K,) or (B, K) bool; an unavailable channel is always null.
    Returns ``(conditions, keep)``: the K encoded condition batches (a list, or a dict when
    ``batch_conditions`` is one) with dropped rows replaced by the null (a learned null receives
    the gradient of exactly the rows it replaced), and the (B, K) bool mask (True = kept).
    Raises ``ValueError`` naming ``u``, ``channels``, ``batch_conditions`` or ``t``.
    """
    channels = _check_channels(channels)
    K = len(channels)
    names = [ch.name for ch in channels]
    as_dict = isinstance(batch_conditions, Mapping)
    if as_dict:
        if set(batch_conditions) != set(names):
            raise ValueError(f"batch_conditions must have one entry per channel {names}, got "
                             f"keys {list(batch_conditions)}")
        conds = [batch_conditions[n] for n in names]
    elif isinstance(batch_conditions, (list, tuple)):
        conds = list(batch_conditions)
        if len(conds) != K:
            raise ValueError(f"batch_conditions must have one entry per channel ({K}), got "
                             f"{len(conds)}")
    else:
        raise TypeError(f"batch_conditions must be a list or a dict of condition batches, got "
                        f"{type(batch_conditions).__name__}")
    if u is not None:
        u = check_range(u, "u", 0, 1, lo_open=True, hi_open=True)
    encoded = [ch.encode(c) if encode else c for ch, c in zip(channels, conds)]
    for k, c in enumerate(encoded):
        check_tensor(c, f"batch_conditions[{k}] (encoded)")
    B = encoded[0].shape[0]
    for k, c in enumerate(encoded):
        if c.shape[0] != B:
            raise ValueError(f"batch_conditions[{k}] must have batch size {B}, got shape "
                             f"{tuple(c.shape)}")
    if t is not None and isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] != B:
        raise ValueError(f"t must be a number or hold one time step per row ({B}), got shape "
                         f"{tuple(t.shape)}")
    if u is not None:
        rates: Any = [uniform_drop_rate(u, K)] * K
    else:
        qs = [ch.drop_rate(t) for ch in channels]
        if any(isinstance(q, torch.Tensor) for q in qs):
            rates = torch.stack([q.reshape(-1).expand(B) if isinstance(q, torch.Tensor)
                                 else torch.full((B,), q, dtype=torch.float64) for q in qs], 1)
        else:
            rates = qs
    keep = condition_dropout_mask(B, rates, generator, available)
    out = _replace_dropped(encoded, [ch.null_embedding for ch in channels], keep)
    return (dict(zip(names, out)) if as_dict else out), keep


# ----------------------------------------------------------------------------- schedules
class SNRSchedule:
    """The SNR-aware weight factor of the controlled-generation blog, §2.4.3, clipped:
    w_k(t) = w̄_k · clip(SNR(t)^α, min_factor, max_factor), SNR(t) = ᾱ_t / (1 − ᾱ_t).

    The blog prints w̄_k SNR(t)^α (α in [0.3, 0.7]) "to weaken guidance at high noise and avoid
    late oversharpening". The first half holds; the second is backwards: SNR rises as the noise
    falls, so the printed weight is largest at the last steps and unbounded. With DDPM's linear
    schedule, w̄ = 5 and α = ½ it is 0.032 at t = 999, 0.29 at t = 750, 1.45 at t = 500, 5.22 at
    t = 250 and 500 at t = 0 (SNR = 9999), a hundred times the nominal weight. Clipping at
    ``max_factor = 1`` keeps the weakening at high noise and never exceeds w̄, reached where
    SNR ≥ 1 (t ≤ 258 on that schedule). ``max_factor=None`` is the blog's unbounded form (for
    showing the problem). The blog's other form, w̄ σ^{-β} with σ = √((1−ᾱ)/ᾱ), is
    SNR^{β/2}: ``SNRSchedule(alpha=beta / 2)``.

    ``schedule(t, alphas_cumprod)`` with t an int or a (B,) tensor returns a float or a (B,)
    float64 tensor. Raises ``ValueError`` for α < 0, bounds that are not ordered, or t outside
    the schedule.
    """

    def __init__(self, alpha: float = 0.5, max_factor: float | None = 1.0,
                 min_factor: float = 0.0):
        self.alpha = check_range(alpha, "alpha", 0, None)
        self.min_factor = check_range(min_factor, "min_factor", 0, None)
        self.max_factor = None if max_factor is None else \
            check_range(max_factor, "max_factor", self.min_factor, None)

    def __repr__(self) -> str:
        return (f"SNRSchedule(alpha={self.alpha}, max_factor={self.max_factor}, "
                f"min_factor={self.min_factor})")

    def __call__(self, t, alphas_cumprod: torch.Tensor):
        ac = _check_alphas_cumprod(alphas_cumprod)
        idx = _check_t(t, len(ac))
        a = ac[idx]
        f = (a / (1 - a)) ** self.alpha
        f = f.clamp(min=self.min_factor, max=self.max_factor)
        return float(f) if f.ndim == 0 else f


def _check_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    ac = check_tensor(alphas_cumprod, "alphas_cumprod", ndim=1).detach().to("cpu", torch.float64)
    if not bool(((ac > 0) & (ac < 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1) (SNR = ᾱ / (1 − ᾱ) must be finite)")
    return ac


def _check_t(t, T: int):
    if isinstance(t, torch.Tensor):
        idx = t.detach().to("cpu").long()
        if idx.ndim > 1:
            raise ValueError(f"t must be an int or a (B,) tensor, got shape {tuple(t.shape)}")
    elif isinstance(t, int) and not isinstance(t, bool):
        idx = torch.tensor(t)
    else:
        raise TypeError(f"t must be an int or a (B,) tensor, got {type(t).__name__}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= T):
        raise ValueError(f"t must lie in [0, {T - 1}], got {idx.tolist()}")
    return idx


# ----------------------------------------------------------------------------- composition
def _check_deltas(eps_u, deltas) -> list:
    check_tensor(eps_u, "eps_u")
    if isinstance(deltas, torch.Tensor):
        if deltas.ndim != eps_u.ndim + 1:
            raise ValueError(f"deltas must be a list of tensors or a stacked tensor of shape "
                             f"(K, {', '.join(map(str, eps_u.shape))}), got shape "
                             f"{tuple(deltas.shape)}")
        deltas = list(deltas)
    if not isinstance(deltas, (list, tuple)):
        raise TypeError(f"deltas must be a list or tuple of tensors, got {type(deltas).__name__}")
    for k, d in enumerate(deltas):
        check_tensor(d, f"deltas[{k}]")
        if tuple(d.shape) != tuple(eps_u.shape):
            raise ValueError(f"deltas[{k}] must have eps_u's shape {tuple(eps_u.shape)}, got "
                             f"{tuple(d.shape)}")
    return list(deltas)


def _check_weight_list(w, n: int, name: str, like: torch.Tensor) -> list:
    if isinstance(w, torch.Tensor):
        w = list(w) if w.ndim > 0 else [w]
    elif isinstance(w, (int, float)) and not isinstance(w, bool):
        w = [w]
    if not isinstance(w, (list, tuple)):
        raise TypeError(f"{name} must be a list with one weight per delta, got "
                        f"{type(w).__name__}")
    if len(w) != n:
        raise ValueError(f"{name} must have one weight per entry of deltas ({n}), got {len(w)}")
    return [_check_scale(v, f"{name}[{k}]", like) for k, v in enumerate(w)]


def _check_nonnegative(ws: list, name: str) -> None:
    for k, v in enumerate(ws):
        low = float(v.min()) if isinstance(v, torch.Tensor) else v
        if low < 0:
            raise ValueError(f"{name}[{k}] must be >= 0: it sits behind the explicit minus of "
                             f"ε_u + Σ w d − Σ w⁻ d, so a negative w⁻ would turn the negative "
                             f"condition back into a positive one; got {low}")


def compose(eps_u: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence,
            negative_weights: Sequence | None = None, schedule: Callable | None = None,
            t=None, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Channel-wise composition (the controlled-generation blog, §2.4.3, corrected):

        ε_total = ε_u + Σ_k w_k(t) d_k − Σ_k w⁻_k(t) d_k,   d_k = ε(c_k) − ε_u,  w⁻_k ≥ 0,

    with ε_u the model with every channel null and ε(c_k) with channel k on and the others null.
    The sum of differences is the conjunction of Liu et al. 2022 (Compositional Visual
    Generation with Composable Diffusion Models), its minus their negation; it is exact when the
    conditions are independent given x_t (the blog's sum-of-experts assumption). With one
    channel and no negative weight it is classifier-free guidance ε_u + w (ε_c − ε_u) (Ho &
    Salimans 2022, eq 6, in diffusers' convention w = their w + 1; Ahmad's notes, eq 1.44),
    bitwise :func:`diffnotes.guidance.cfg`; with all weights 0 it is ε_u, bitwise.

    The blog says negative prompts "use negative weights" *and* subtracts them: here the minus
    is explicit and w⁻ ≥ 0 (a negative w⁻ raises). A channel may carry both a positive and a
    negative weight; its net weight is w_k − w⁻_k, so a negative channel with weight w⁻ equals
    the positive channel with −w⁻ (bitwise). diffusers' ``negative_prompt`` is a different
    rule: it *replaces* ε_u by ε_n, ε_n + s (ε_c − ε_n) = ε_u + s d_c − (s − 1) d_n, i.e. this
    formula with w⁻_n tied to s − 1.

    Args:
        eps_u: (B, …) the unconditional prediction.
        deltas: K tensors of ``eps_u``'s shape (or one stacked (K, B, …) tensor).
        weights: K positive-guide weights w̄_k: numbers, (B,) tensors (one per row) or tensors
            broadcasting against ε.
        negative_weights: K weights w̄⁻_k ≥ 0 (default: none).
        schedule: ``schedule(t, alphas_cumprod) -> factor`` (a number or a (B,) tensor) that
            multiplies every weight, e.g. :class:`SNRSchedule` (the clipped SNR^α).
        t, alphas_cumprod: the step (an int or (B,)) and the schedule's ᾱ, needed with a
            ``schedule``.
    Returns ε_total with ``eps_u``'s shape. Raises ``ValueError`` naming ``weights`` /
    ``negative_weights`` (wrong length, non-finite, negative w⁻), ``deltas[k]`` (shape), ``t``
    or ``alphas_cumprod`` (missing with a schedule).
    """
    deltas = _check_deltas(eps_u, deltas)
    w = _check_weight_list(weights, len(deltas), "weights", eps_u)
    if negative_weights is not None:
        wn = _check_weight_list(negative_weights, len(deltas), "negative_weights", eps_u)
        _check_nonnegative(wn, "negative_weights")
        w = [a - b for a, b in zip(w, wn)]          # net weight w_k − w⁻_k of channel k
    if schedule is not None:
        check_callable(schedule, "schedule", "schedule(t, alphas_cumprod)")
        if t is None:
            raise ValueError("t must be given with a schedule (the weights depend on the step)")
        if alphas_cumprod is None:
            raise ValueError("alphas_cumprod must be given with a schedule")
        f = schedule(t, alphas_cumprod)
        if isinstance(f, torch.Tensor) and f.ndim == 1 and f.shape[0] == 1 and eps_u.shape[0] != 1:
            f = f.reshape(())
        f = _check_scale(f, "schedule(t, alphas_cumprod)", eps_u)
        w = [a * f for a in w]
    return _sum_of_deltas(eps_u, deltas, w)


# ----------------------------------------------------------------------------- batched model
def _null_of(n):
    """A null as the batch-of-one form :func:`diffnotes.guidance._expand_cond` takes: a
    :class:`Channel`'s one-row null embedding gets a leading batch dimension of 1."""
    if isinstance(n, Channel):
        e = n.null_embedding
        return e if e.ndim == 0 else e.unsqueeze(0)
    return n


def composed_eps_model(model: Callable, conds: Sequence, nulls: Sequence, weights: Sequence,
                       negative_weights: Sequence | None = None, *,
                       schedule: Callable | None = None,
                       alphas_cumprod: torch.Tensor | None = None,
                       combine: Callable | None = None) -> Callable:
    """A multi-channel conditional ``model(x, t, conds)`` as a composed ``eps_model(x, t)`` for
    any sampler (the controlled-generation blog, §2.4.3; :func:`compose`).

    Each call evaluates the K + 1 passes of the composition, ε_u (every channel null) and ε(c_k)
    (channel k on, the others null), as **one** batched call of ``model`` on (K + 1)·B rows,
    like :func:`diffnotes.guidance.guided_eps_model`, then returns
    ``compose(ε_u, [ε(c_k) − ε_u], weights, negative_weights, schedule, t, alphas_cumprod)``.
    Cost: K + 1 rows of model evaluation per row of x per step.

    Args:
        model: ``model(x, t, cond) -> eps``; ``cond`` is ``combine([c̃_1, …, c̃_K])``, the K
            channel batches of (K + 1)·B rows each; by default the list itself.
        conds: K conditions in the model's input form (already encoded: use
            ``channel.encode(c)``), each an int, a 0-d tensor or a tensor with batch size 1 or B.
        nulls: K null conditions in the same form, or K :class:`Channel` (their null embedding).
        weights, negative_weights: as in :func:`compose` (K each; w⁻ ≥ 0).
        schedule, alphas_cumprod: as in :func:`compose`.
        combine: how the K channel batches become the model's ``cond`` (e.g.
            ``lambda cs: torch.stack(cs, 1)`` for a (B, K) label tensor, or concatenating
            token sequences for cross-attention).
    Returns ``eps_model(x, t)``. Raises at construction ``ValueError`` naming ``weights``,
    ``negative_weights``, ``nulls``, ``conds`` or ``alphas_cumprod``; at call time for a
    condition whose batch is neither 1 nor B, or a model returning the wrong batch size.
    """
    check_callable(model, "model", "model(x, t, cond)")
    if not isinstance(conds, (list, tuple)) or not conds:
        raise ValueError(f"conds must be a non-empty list with one condition per channel, got "
                         f"{conds!r}")
    K = len(conds)
    if not isinstance(nulls, (list, tuple, nn.ModuleList)) or len(nulls) != K:
        raise ValueError(f"nulls must be a list with one null per channel ({K}), got "
                         f"{nulls!r}")
    if any(isinstance(n, Channel) for n in nulls):
        _check_channels([n for n in nulls if isinstance(n, Channel)])
    for name, ws in (("weights", weights), ("negative_weights", negative_weights)):
        if ws is None:
            continue
        if not isinstance(ws, (list, tuple, torch.Tensor)):
            raise TypeError(f"{name} must be a list with one weight per channel, got "
                            f"{type(ws).__name__}")
        if len(ws) != K:
            raise ValueError(f"{name} must have one weight per channel ({K}), got {len(ws)}")
        for k, v in enumerate(ws):
            if isinstance(v, torch.Tensor):
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"{name}[{k}] must be finite")
            else:
                check_finite(v, f"{name}[{k}]")
    if negative_weights is not None:
        _check_nonnegative([v if isinstance(v, torch.Tensor) else float(v)
                            for v in negative_weights], "negative_weights")
    if schedule is not None:
        check_callable(schedule, "schedule", "schedule(t, alphas_cumprod)")
        if alphas_cumprod is None:
            raise ValueError("alphas_cumprod must be given with a schedule")
        _check_alphas_cumprod(alphas_cumprod)
    nulls = [_null_of(n) for n in nulls]
    cat = combine or (lambda cs: cs)
    n = K + 1

    def eps_model(x: torch.Tensor, t) -> torch.Tensor:
        check_tensor(x, "x")
        B, t = x.shape[0], batch_timesteps(t, x)
        on = [_expand_cond(c, B, f"conds[{k}]", x.device) for k, c in enumerate(conds)]
        off = [_expand_cond(z, B, f"nulls[{k}]", x.device) for k, z in enumerate(nulls)]
        # pass 0: all null; pass j + 1: channel j on, the others null
        per_channel = [torch.cat([on[j] if p == j + 1 else off[j] for p in range(n)], dim=0)
                       for j in range(K)]
        out = model(torch.cat([x] * n, dim=0), torch.cat([t] * n, dim=0), cat(per_channel))
        if out.shape[0] != n * B:
            raise ValueError(f"model returned batch size {out.shape[0]}, expected {n * B} "
                             f"({n} passes of {B} rows)")
        parts = list(out.chunk(n, dim=0))
        eps_u = parts[0]
        return compose(eps_u, [e - eps_u for e in parts[1:]], weights, negative_weights,
                       schedule, t if schedule is not None else None, alphas_cumprod)

    return eps_model
