"""Attention maps of a diffusers UNet, recorded online while it runs.

Every transformer block of a Stable-Diffusion-style UNet has a self-attention layer (``attn1``:
queries, keys and values from the image features, Ahmad's notes, eqs 1.49-1.50) and a
cross-attention layer (``attn2``: queries from the image, keys and values from the text, Ahmad's
notes, eqs 1.46-1.48). Both compute the probabilities

    A = softmax(Q K^T / sqrt(d))      (Ahmad's notes, eq 1.47; Vaswani et al. 2017, eq 1; Gormley &
                                       Chai's lecture, the matrix-form "Cross Attention" slide)

of shape ``(B * heads, h * w, M)``; row ``i * w + j`` is latent pixel ``(i, j)`` (diffusers
flattens row-major) and column ``m`` is key token ``m`` (a prompt token for cross-attention, a
pixel for self-attention).

:class:`AttentionStore` installs a :class:`RecordingAttnProcessor` on the layers it records. The
processor computes exactly what diffusers' default ``AttnProcessor`` computes (the same calls in
the same order), and hands ``A`` averaged over heads to the store, which keeps a running sum per
layer. Memory therefore does not grow with the number of denoising steps. Per-step maps are kept
only when asked (``store_steps=True``) and only for layers at or below ``step_max_res``.

Word helpers map a prompt's words to token positions (words that the tokenizer splits into
several tokens included, for CLIP's BPE tokenizer as for a word-level one), and
:func:`upsample` / :func:`overlay` turn a map into a heatmap over the generated image.

Conventions: maps returned to the reader are ``(B, h, w, M)`` tensors (or ``(h, w)`` for one
word of one row), float32 (float64 when the model runs in float64).
"""
from __future__ import annotations

import math
import string
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .utils import check_choice, check_int, check_range

__all__ = [
    "RecordingAttnProcessor", "AttentionStore", "AttentionCollector", "LayerInfo",
    "AttentionController", "AttnCall", "BatchLayout", "attention_layers", "layer_resolutions",
    "attention_resolutions",
    "tokenize_prompt", "prompt_words", "word_token_indices",
    "upsample", "normalize_map", "overlay", "generate_with_attention",
]

_KINDS = ("cross", "self")


def _check_kinds(kinds) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in _KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {_KINDS}, got {kinds!r}")
    return kinds


def _check_rows(rows):
    if not (rows in ("all", "cond", "uncond") or (
            isinstance(rows, (list, tuple)) and all(isinstance(r, int) for r in rows))):
        raise ValueError(f"rows must be 'all', 'cond', 'uncond' or a list of ints, got {rows!r}")
    return rows


# ---------------------------------------------------------------------------- the processor
class RecordingAttnProcessor:
    """diffusers ``AttnProcessor`` that also hands the attention probabilities to a store.

    ``__call__`` is line for line the computation of ``diffusers.models.attention_processor.
    AttnProcessor`` (so outputs are equal to it bit for bit): Q = W_Q f, K = W_K c, V = W_V c
    (Ahmad's notes, eq 1.48; c = f for self-attention, eq 1.50), A = softmax(QK^T/sqrt d) (eq 1.47,
    via ``attn.get_attention_scores``), out = W_O (A V). Only the extra line
    ``self.store._record(...)`` differs; it does not touch the output.

    Attention control: if the store has a controller (:class:`AttentionController`, e.g.
    Prompt-to-Prompt's), the probabilities pass through ``controller.edit(A, info)`` between the
    softmax and ``A V``; the store then records the edited ``A`` (what the layer really used).
    Without a controller nothing changes (the output is bitwise diffusers').
    """

    def __init__(self, store: "AttentionStore", name: str, fallback=None):
        self.store = store
        self.name = name
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        is_cross = encoder_hidden_states is not None
        if self.fallback is not None and not getattr(self.store, "_handles", self.store._wants)(
                is_cross, hidden_states.shape[1] if hidden_states.ndim == 3
                else hidden_states.shape[2] * hidden_states.shape[3]):
            # a layer the store does not record (e.g. self-attention above self_max_res): run
            # the processor that was there before, untouched
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)                                    # Q = W_Q f  (1.48)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)                              # K = W_K c  (1.48)
        value = attn.to_v(encoder_hidden_states)                            # V = W_V c  (1.48)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        call = self.store._call(self.name, attn, query.shape[1], key.shape[1], is_cross)
        if call is None:                                                   # no control here
            attention_probs = attn.get_attention_scores(query, key, attention_mask)  # eq 1.47
        else:                                                              # attention control
            c = self.store.controller
            if _overrides(c, "edit_qkv"):
                query, key, value = self.store._edit_qkv(c, attn, query, key, value, call)
                if (attention_mask is None and not _overrides(c, "edit_scores")
                        and not _overrides(c, "edit")
                        and not self.store._wants(is_cross, query.shape[1])):
                    # only q, k, v change and nothing is recorded: PyTorch's fused attention,
                    # as diffusers' default AttnProcessor2_0 computes it (eq 1.47)
                    h = attn.heads
                    hidden_states = F.scaled_dot_product_attention(
                        *(x.view(x.shape[0] // h, h, *x.shape[1:]) for x in (query, key, value)),
                        scale=attn.scale)
                    return self._finish(attn, hidden_states.flatten(0, 1), residual,
                                        input_ndim, batch_size, channel if input_ndim == 4
                                        else None, height if input_ndim == 4 else None,
                                        width if input_ndim == 4 else None)
            if _overrides(c, "edit_scores"):
                attention_probs = _scores_then_softmax(attn, query, key, attention_mask,
                                                       lambda s: self.store._edit_scores(
                                                           c, attn, s, call))
            else:
                attention_probs = attn.get_attention_scores(query, key, attention_mask)
            attention_probs = self.store._edit(c, attn, attention_probs, call)
        self.store._record(self.name, attn, attention_probs, is_cross)
        hidden_states = torch.bmm(attention_probs, value)                  # A V  (1.47)
        return self._finish(attn, hidden_states, residual, input_ndim, batch_size,
                            *((channel, height, width) if input_ndim == 4 else (None,) * 3))

    @staticmethod
    def _finish(attn, hidden_states, residual, input_ndim, batch_size, channel, height, width):
        """Heads merged, W_O, the residual: the tail of diffusers' ``AttnProcessor``."""
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _overrides(controller, method: str) -> bool:
    """Whether ``controller`` uses its hook ``method``: those named in its ``hooks`` attribute
    when it sets one (a controller whose hooks depend on its options, e.g. MasaCtrl with or
    without masks), else those it defines itself. The base class's hooks are identities and are
    skipped, so a controller that only edits probabilities costs nothing more."""
    hooks = getattr(controller, "hooks", None)
    if hooks is not None:
        return method in hooks
    own = getattr(type(controller), method, None)
    base = getattr(AttentionController, method)
    return own is not None and own is not base


def _scores_then_softmax(attn, query, key, attention_mask, edit):
    """``attn.get_attention_scores`` split in two so a controller can edit the logits
    S = QK^T/sqrt(d) (+ mask) before the softmax (Ahmad's notes, eq 1.47). The operations are
    diffusers' own, in its order: with ``edit`` the identity the result is bitwise the same."""
    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    if attention_mask is None:
        base = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype,
                           device=query.device)
        beta = 0
    else:
        base, beta = attention_mask, 1
    scores = torch.baddbmm(base, query, key.transpose(-1, -2), beta=beta, alpha=attn.scale)
    if attn.upcast_softmax:
        scores = scores.float()
    scores = edit(scores)
    return scores.softmax(dim=-1).to(dtype)


# ---------------------------------------------------------------------------- attention control
@dataclass(frozen=True)
class BatchLayout:
    """Which rows of a UNet batch hold what: ``n_prompts`` prompts, and with ``cfg`` the
    classifier-free-guidance batch ``cat([uncond rows, cond rows])`` of
    :func:`diffnotes.guidance.guided_eps_model` (Ahmad's notes, eq 1.44): row ``k`` is prompt
    ``k``'s unconditional pass, row ``n_prompts + k`` its conditional pass."""

    n_prompts: int
    cfg: bool = True

    @property
    def batch(self) -> int:
        return 2 * self.n_prompts if self.cfg else self.n_prompts

    def cond_rows(self) -> slice:
        return slice(self.n_prompts, 2 * self.n_prompts) if self.cfg else slice(0, self.n_prompts)

    def uncond_rows(self) -> slice | None:
        return slice(0, self.n_prompts) if self.cfg else None


@dataclass
class LayerInfo:
    """One recorded attention layer: ``name`` (module path, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``), ``kind`` ("cross"/"self"),
    ``place`` ("down"/"mid"/"up"), query grid ``height`` × ``width``, ``heads``, ``keys`` (number
    of key tokens), ``order`` (position in the forward pass)."""

    name: str
    kind: str
    place: str
    height: int
    width: int
    heads: int
    keys: int
    order: int

    @property
    def res(self) -> int:
        """The larger side of the query grid (16 for a 16×16 layer)."""
        return max(self.height, self.width)


@dataclass
class AttnCall(LayerInfo):
    """What a controller is told about one attention call: the layer's :class:`LayerInfo`
    (``order`` is −1 for a layer the store does not record), plus ``batch`` (rows B of the
    UNet batch), ``step`` (index of the UNet call since the store was reset, one per denoising
    step), ``layout`` (the store's :class:`BatchLayout`, or None), and ``index`` / ``count``: the
    layer's position among the UNet's ``count`` attention layers of its kind in forward order
    (down blocks, mid block, up blocks; :func:`attention_layers`), the number that rules such as
    "the last 60% of the decoder" are stated in."""

    batch: int = 0
    step: int = 0
    layout: "BatchLayout | None" = None
    index: int = -1
    count: int = 0


class AttentionController:
    """Base class of every attention edit (Prompt-to-Prompt, MasaCtrl, Plug-and-Play, Dense
    Diffusion, cross-image attention, attention losses...).

    Give one to :class:`AttentionStore` (``controller=``). Every attention layer of a kind in
    ``kinds`` for which :meth:`wants` is true then runs through three hooks, in this order
    (Ahmad's notes, eqs 1.47-1.50; all tensors are split by head, ``(B, heads, N, ·)``, rows of
    the UNet batch first):

    1. :meth:`edit_qkv` ``(q, k, v, info) -> (q, k, v)``: the projected queries ``(B, heads,
       N_q, d)``, keys and values ``(B, heads, N_k, d)`` before anything is computed from them
       (MasaCtrl and cross-image attention read keys and values of another row; Plug-and-Play
       injects queries and keys). ``k`` and ``v`` may come back with another ``N_k``
       (concatenated keys), equal for both.
    2. :meth:`edit_scores` ``(s, info) -> s``: the logits ``S = QK^T/sqrt(d)`` ``(B, heads, N_q,
       N_k)`` before the softmax (Dense Diffusion's modulation, masked attention).
    3. :meth:`edit` ``(A, info) -> A``: the probabilities ``A = softmax(S)``, before they
       multiply the values (Prompt-to-Prompt's edits).

    ``info`` is an :class:`AttnCall` (layer name, kind, place, query grid, heads, the layer's
    ``index`` among the UNet's layers of its kind in forward order and their ``count``, the
    batch, the step, the store's :class:`BatchLayout`). A hook that a subclass does not define
    is not called (``edit_scores`` then costs nothing: diffusers' fused score computation runs);
    a controller may also list the hooks it uses in ``hooks`` (e.g. ``("edit_qkv",)``) when that
    depends on its options. A controller that uses ``edit_qkv`` alone, on a layer the store does
    not record, gets PyTorch's fused attention after its edit (as diffusers' default processor).
    Each hook must return tensors of the shapes it was given (``edit_qkv``: see above). The
    base class changes nothing. Editing in place is allowed.
    """

    kinds: tuple[str, ...] = _KINDS
    hooks: tuple[str, ...] | None = None     # None: the hooks the subclass defines

    def wants(self, kind: str, height: int, width: int) -> bool:
        """Whether layers of this kind and query grid go through the hooks (the others keep
        their original processor, e.g. PyTorch's fused attention)."""
        return kind in self.kinds

    def edit_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: AttnCall):
        return q, k, v

    def edit_scores(self, scores: torch.Tensor, info: AttnCall) -> torch.Tensor:
        return scores

    def edit(self, probs: torch.Tensor, info: AttnCall) -> torch.Tensor:
        return probs


# ---------------------------------------------------------------------------- the collector
class AttentionCollector:
    """The attention probabilities of the current UNet call, kept with their autograd graph, for
    a loss on attention maps (``diffnotes.models.train``'s attention/mask loss, Attend-and-Excite,
    LMD's attention energy).

    Fed by :class:`RecordingAttnProcessor` like an :class:`AttentionStore`: while ``active``,
    ``maps`` gains, in forward order, each recorded layer's head-averaged probabilities, shape
    ``(B, h*w, M)``, not detached, and ``names`` the layer's name. Empty both
    (:meth:`clear`) before each call. :meth:`attach` installs the recording processor on the
    layers of ``kinds`` (only those named in ``layers`` when given); every other layer keeps its
    processor. A collector edits nothing (it has no controller).
    """

    controller = None

    def __init__(self, kinds: Sequence[str] = ("cross",), active: bool = True,
                 layers: Iterable[str] | None = None):
        self.kinds = _check_kinds(kinds)
        self.active = active
        self.layers = None if layers is None else {str(n) for n in layers}
        self.maps: list[torch.Tensor] = []
        self.names: list[str] = []
        self._unet = self._saved = None

    def clear(self) -> None:
        self.maps, self.names = [], []

    def by_name(self) -> dict[str, torch.Tensor]:
        """The maps of the current call by layer name."""
        return dict(zip(self.names, self.maps))

    def _call(self, *args, **kwargs) -> None:      # the processor asks for a controller's call
        return None

    def _wants(self, is_cross: bool, n_query: int) -> bool:
        return ("cross" if is_cross else "self") in self.kinds

    def _record(self, name: str, attn, probs: torch.Tensor, is_cross: bool) -> None:
        if self.active and self._wants(is_cross, probs.shape[1]) and (
                self.layers is None or name in self.layers):
            bh, n_q, n_k = probs.shape
            self.maps.append(probs.view(bh // attn.heads, attn.heads, n_q, n_k).mean(1))
            self.names.append(name)

    def attach(self, unet) -> "AttentionCollector":
        if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
            raise TypeError(f"unet must be a diffusers model with attention processors, got "
                            f"{type(unet).__name__}")
        if self._unet is not None:
            raise RuntimeError("this AttentionCollector is already attached; call detach() first")
        self._saved = dict(unet.attn_processors)
        new = {}
        for key, proc in self._saved.items():
            name = key[: -len(".processor")]
            keep = _kind_of_name(key) in self.kinds and (self.layers is None or name in self.layers)
            new[key] = RecordingAttnProcessor(self, name, fallback=proc) if keep else proc
        unet.set_attn_processor(new)
        self._unet = unet
        return self

    def detach(self) -> None:
        if self._unet is not None:
            self._unet.set_attn_processor(self._saved)
            self._unet = self._saved = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()
        return False


# ---------------------------------------------------------------------------- the store
def _place(name: str) -> str:
    for p in ("down", "mid", "up"):
        if name.startswith(p):
            return p
    return "other"


def _kind_of_name(name: str) -> str | None:
    if ".attn1" in name:
        return "self"
    if ".attn2" in name:
        return "cross"
    return None


_PLACE_ORDER = {"down": 0, "mid": 1, "up": 2, "other": 3}


def attention_layers(unet, kind: str = "self") -> list[str]:
    """Names of ``unet``'s attention layers of ``kind`` ("self" = ``attn1``, "cross" =
    ``attn2``) in the order a forward pass calls them: down blocks, the mid block, up blocks
    (diffusers registers ``up_blocks`` before ``mid_block``, so ``attn_processors`` is not in
    call order). Layer rules of the editing methods are stated on this list: e.g. MasaCtrl's
    "layers 10-15 of Stable Diffusion's 16" is ``names[10:]``. Names lack ``.processor``."""
    kind = check_choice(kind, "kind", _KINDS)
    if not hasattr(unet, "attn_processors"):
        raise TypeError(f"unet must be a diffusers model with attention processors, got "
                        f"{type(unet).__name__}")
    names = [k[: -len(".processor")] for k in unet.attn_processors if _kind_of_name(k) == kind]
    return sorted(names, key=lambda n: _PLACE_ORDER[_place(n)])   # stable: keeps module order


def layer_resolutions(unet, kind: str = "self", latent_hw=None) -> list[int]:
    """The query-grid side of each layer of :func:`attention_layers` ``(unet, kind)``, in the
    same (forward) order, from the layer's block and the latent size (default: the UNet's
    ``sample_size``): down block b runs at the latent side halved b times (rounded up, as the
    stride-2 convolutions round), the mid block at the last down block's grid, up block b at
    down block ``len(up_blocks) − 1 − b``'s. Layer rules by resolution ("the 16×16 maps",
    "decoder layers at ≥ half the latent side") are stated on this list."""
    H = int(max(latent_hw)) if latent_hw is not None else int(unet.config.sample_size)
    n_down = len(unet.config.down_block_types)
    n_up = len(unet.config.up_block_types)
    out = []
    for name in attention_layers(unet, kind):
        part, _, rest = name.partition(".")
        k = (int(rest.split(".")[0]) if part == "down_blocks" else
             n_up - 1 - int(rest.split(".")[0]) if part == "up_blocks" else n_down - 1)
        side = H
        for _ in range(k):
            side = math.ceil(side / 2)
        out.append(side)
    return out


def attention_resolutions(unet, kind: str = "cross", latent_hw=None) -> list[int]:
    """The distinct query-grid sides of the UNet's attention layers of ``kind``, largest first
    (Stable Diffusion's 64×64 latent: 64, 32, 16, 8)."""
    return sorted(set(layer_resolutions(unet, kind, latent_hw)), reverse=True)


class AttentionStore:
    """Running sums of attention probabilities per layer, filled by :class:`RecordingAttnProcessor`.

    Parameters
    ----------
    kinds : which layers to record, a subset of ``("cross", "self")``.
    rows : batch rows to keep: ``"all"``, ``"cond"`` (the second half of the batch: the
        prompt rows of a classifier-free-guidance batch ``cat([uncond, cond])``, Ahmad's notes,
        eq 1.44), ``"uncond"`` (the first half), or a list of row indices.
    store_steps : also keep each step's map, for layers with ``max(h, w) <= step_max_res``.
    step_max_res : see ``store_steps``.
    self_max_res : self-attention layers above this resolution are not recorded (a 64×64 layer
        of Stable Diffusion would need 4096² floats per layer).
    controller : an :class:`AttentionController` that may edit the probabilities of every row
        before they multiply the values (the store then records the edited maps); its layers
        get the recording processor too, whether recorded or not.
    layout : a :class:`BatchLayout` handed to the controller with each call.

    Memory: one ``(len(rows), h*w, M)`` tensor per recorded layer, whatever the number of steps
    (plus ``steps × (len(rows), h*w, M)`` for the low-resolution layers when ``store_steps``).
    A *step* is one call of the UNet's ``forward`` (one denoising step of a pipeline, which
    batches the guided and unguided rows into one call). Use as a context manager or with
    :meth:`attach` / :meth:`detach`.

    Raises ``ValueError`` on unknown ``kinds``/``rows`` and ``TypeError`` if ``attach`` is given
    something without ``attn_processors``.
    """

    def __init__(self, kinds: Sequence[str] = ("cross",), rows="all", store_steps: bool = False,
                 step_max_res: int = 16, self_max_res: int = 32, controller=None,
                 layout: BatchLayout | None = None):
        self.kinds, self.rows = _check_kinds(kinds), _check_rows(rows)
        if controller is not None and not (hasattr(controller, "edit")
                                           and hasattr(controller, "wants")):
            raise TypeError(f"controller must be an AttentionController (with edit and wants), "
                            f"got {type(controller).__name__}")
        if layout is not None and not isinstance(layout, BatchLayout):
            raise TypeError(f"layout must be a BatchLayout or None, got {type(layout).__name__}")
        self.controller, self.layout = controller, layout
        self.store_steps = store_steps
        self.step_max_res = check_int(step_max_res, "step_max_res", min=1)
        self.self_max_res = check_int(self_max_res, "self_max_res", min=1)
        self._unet = None
        self._saved = None
        self._hook = None
        self._index: dict[str, tuple[int, int]] = {}
        self.reset()

    # -- lifecycle
    def reset(self) -> None:
        """Forget everything recorded (keeps the attachment)."""
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.step_maps: dict[str, dict[int, torch.Tensor]] = {}
        self.info: dict[str, LayerInfo] = {}
        self.step = -1            # index of the current UNet call; -1 before the first
        self.timesteps: list = []  # the timestep of each UNet call
        self._latent_hw: tuple[int, int] | None = None

    def attach(self, unet) -> "AttentionStore":
        """Install recording processors on ``unet``'s recorded layers (others are untouched)."""
        if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
            raise TypeError(f"unet must be a diffusers model with attention processors, got "
                            f"{type(unet).__name__}")
        if self._unet is not None:
            raise RuntimeError("this AttentionStore is already attached; call detach() first")
        saved = dict(unet.attn_processors)
        ctrl_kinds = tuple(getattr(self.controller, "kinds", ())) if self.controller else ()
        new = {}
        for key, proc in saved.items():
            kind = _kind_of_name(key)
            new[key] = (RecordingAttnProcessor(self, key[: -len(".processor")], fallback=proc)
                        if kind in self.kinds or kind in ctrl_kinds else proc)
        unet.set_attn_processor(new)
        self._index = {}
        for kind in _KINDS:
            names = attention_layers(unet, kind)
            self._index.update({n: (i, len(names)) for i, n in enumerate(names)})
        self._saved, self._unet = saved, unet
        self._hook = unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        return self

    def detach(self) -> None:
        """Put the processors back as they were before :meth:`attach`."""
        if self._unet is None:
            return
        self._unet.set_attn_processor(self._saved)
        self._hook.remove()
        self._unet = self._saved = self._hook = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()
        return False

    def _pre_forward(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.step += 1
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self._latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        if isinstance(t, torch.Tensor):
            t = t.flatten()[0].item() if t.numel() and t.device.type != "meta" else None
        self.timesteps.append(t)

    # -- recording (called by the processor)
    def _grid(self, n_query: int) -> tuple[int, int]:
        if self._latent_hw is not None:
            H, W = self._latent_hw
            f = math.sqrt(H * W / n_query)
            if abs(f - round(f)) < 1e-9 and round(f) > 0:
                f = round(f)
                return math.ceil(H / f), math.ceil(W / f)
        s = math.isqrt(n_query)
        if s * s != n_query:
            raise RuntimeError(f"cannot infer the query grid of {n_query} tokens; run the UNet "
                               f"with the store attached so it sees the latent size")
        return s, s

    def _wants(self, is_cross: bool, n_query: int) -> bool:
        if ("cross" if is_cross else "self") not in self.kinds:
            return False
        if is_cross:
            return True
        h, w = self._grid(n_query)
        return max(h, w) <= self.self_max_res

    def _handles(self, is_cross: bool, n_query: int) -> bool:
        """Whether the recording processor runs this call (recorded, or wanted by the
        controller); otherwise the layer's original processor does."""
        if self._wants(is_cross, n_query):
            return True
        c = self.controller
        if c is None:
            return False
        kind = "cross" if is_cross else "self"
        if kind not in getattr(c, "kinds", _KINDS):
            return False
        h, w = self._grid(n_query)
        return bool(c.wants(kind, h, w))

    def _call(self, name: str, attn, n_q: int, n_k: int, is_cross: bool) -> "AttnCall | None":
        """The :class:`AttnCall` for this layer call if the controller edits it, else None."""
        c = self.controller
        kind = "cross" if is_cross else "self"
        if c is None or kind not in getattr(c, "kinds", _KINDS):
            return None
        h, w = self._grid(n_q)
        if not c.wants(kind, h, w):
            return None
        heads = attn.heads
        order = self.info[name].order if name in self.info else -1
        index, count = self._index.get(name, (-1, 0))
        return AttnCall(name, kind, _place(name), h, w, heads, n_k, order, 0,
                        max(self.step, 0), self.layout, index, count)

    @staticmethod
    def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.shape[0] // heads, heads, *x.shape[1:])

    def _edit_qkv(self, c, attn, q, k, v, call: AttnCall):
        h = attn.heads
        call.batch = q.shape[0] // h
        out = c.edit_qkv(self._split(q, h), self._split(k, h), self._split(v, h), call)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise RuntimeError(f"controller.edit_qkv must return (q, k, v), got "
                               f"{type(out).__name__}")
        q2, k2, v2 = out
        if q2.shape != self._split(q, h).shape or k2.shape[:2] != (call.batch, h) \
                or k2.shape[-1] != k.shape[-1] or v2.shape[:3] != k2.shape[:3]:
            raise RuntimeError(f"controller.edit_qkv changed shapes: q {tuple(q.shape)} -> "
                               f"{tuple(q2.shape)}, k -> {tuple(k2.shape)}, v -> "
                               f"{tuple(v2.shape)} (split by head)")
        return (q2.reshape(q.shape), k2.reshape(-1, *k2.shape[2:]),
                v2.reshape(-1, *v2.shape[2:]))

    def _edit_scores(self, c, attn, scores, call: AttnCall):
        h = attn.heads
        call.batch = scores.shape[0] // h
        out = c.edit_scores(self._split(scores, h), call)
        if not isinstance(out, torch.Tensor) or out.shape != self._split(scores, h).shape:
            raise RuntimeError(f"controller.edit_scores must return a tensor of shape "
                               f"{tuple(self._split(scores, h).shape)}, got "
                               f"{getattr(out, 'shape', type(out).__name__)}")
        return out.reshape(scores.shape)

    def _edit(self, c, attn, probs: torch.Tensor, call: AttnCall) -> torch.Tensor:
        """Hand ``probs`` (B*heads, h*w, M) to the controller as (B, heads, h*w, M)."""
        if not _overrides(c, "edit"):
            return probs
        heads = attn.heads
        bh, n_q, n_k = probs.shape
        call.batch = bh // heads
        call.keys = n_k
        out = c.edit(probs.view(bh // heads, heads, n_q, n_k), call)
        if not isinstance(out, torch.Tensor) or out.shape != (bh // heads, heads, n_q, n_k):
            raise RuntimeError(f"controller.edit must return a tensor of shape "
                               f"{(bh // heads, heads, n_q, n_k)}, got "
                               f"{getattr(out, 'shape', type(out).__name__)}")
        return out.reshape(bh, n_q, n_k)

    def _select_rows(self, p: torch.Tensor) -> torch.Tensor:
        B = p.shape[0]
        if self.rows == "all":
            return p
        if self.rows in ("cond", "uncond"):
            if B % 2:
                raise ValueError(f"rows={self.rows!r} needs an even batch [uncond, cond], got "
                                 f"batch size {B}")
            return p[B // 2:] if self.rows == "cond" else p[: B // 2]
        return p[list(self.rows)]

    def _record(self, name: str, attn, probs: torch.Tensor, is_cross: bool) -> None:
        kind = "cross" if is_cross else "self"
        if kind not in self.kinds:
            return
        heads = attn.heads
        bh, n_q, n_k = probs.shape
        if name not in self.info:
            h, w = self._grid(n_q)
            self.info[name] = LayerInfo(name, kind, _place(name), h, w, heads, n_k,
                                        len(self.info))
        info = self.info[name]
        if kind == "self" and info.res > self.self_max_res:
            return
        with torch.no_grad():
            p = probs.detach().reshape(bh // heads, heads, n_q, n_k)
            acc = torch.promote_types(p.dtype, torch.float32)
            p = self._select_rows(p.to(acc).mean(1))                     # mean over heads
            if name in self.sums:
                self.sums[name] += p                                     # running sum
                self.counts[name] += 1
            else:
                self.sums[name] = p.clone()
                self.counts[name] = 1
            if self.store_steps and info.res <= self.step_max_res:
                self.step_maps.setdefault(name, {})[max(self.step, 0)] = p.clone()

    # -- reading
    @property
    def num_steps(self) -> int:
        """Number of UNet calls seen since the last :meth:`reset`."""
        return self.step + 1

    def layers(self, kind: str | None = None, res: int | None = None,
               place: str | None = None) -> list[LayerInfo]:
        """The recorded layers (forward order), filtered by ``kind``, ``res`` and ``place``."""
        out = [i for i in sorted(self.info.values(), key=lambda i: i.order) if i.name in self.sums]
        if kind is not None:
            out = [i for i in out if i.kind == kind]
        if res is not None:
            out = [i for i in out if i.res == res]
        if place is not None:
            out = [i for i in out if i.place == place]
        return out

    def resolutions(self, kind: str = "cross") -> list[int]:
        """The distinct layer resolutions recorded for ``kind``, largest first."""
        return sorted({i.res for i in self.layers(kind)}, reverse=True)

    def nbytes(self) -> int:
        """Bytes held by the store's tensors (running sums and any per-step maps)."""
        n = sum(t.numel() * t.element_size() for t in self.sums.values())
        n += sum(t.numel() * t.element_size() for d in self.step_maps.values()
                 for t in d.values())
        return n

    def stored_steps(self, name: str | None = None) -> list[int]:
        """Step indices with per-step maps (for layer ``name``, or any layer)."""
        if name is not None:
            return sorted(self.step_maps.get(name, {}))
        return sorted({s for d in self.step_maps.values() for s in d})

    def layer_map(self, name: str, steps=None) -> torch.Tensor:
        """One layer's map ``(B, h, w, M)`` averaged over all steps (running sum / count), or
        over ``steps`` (a ``(start, stop)`` range or a list of step indices; needs per-step
        storage). Raises ``KeyError`` for an unknown layer, ``ValueError`` for steps not stored."""
        if name not in self.sums:
            raise KeyError(f"name must be a recorded layer, got {name!r}; recorded: "
                           f"{[i.name for i in self.layers()]}")
        info = self.info[name]
        if steps is None:
            m = self.sums[name] / self.counts[name]                     # online mean
        else:
            wanted = _step_list(steps, self.num_steps)
            have = self.step_maps.get(name, {})
            missing = [s for s in wanted if s not in have]
            if missing:
                raise ValueError(
                    f"steps {missing[:5]} of layer {name!r} were not stored; record with "
                    f"AttentionStore(store_steps=True, step_max_res>={info.res})")
            m = torch.stack([have[s] for s in wanted]).mean(0)
        return m.reshape(m.shape[0], info.height, info.width, m.shape[-1])

    def maps(self, kind: str = "cross", res: int | None = None, steps=None,
             place: str | None = None, layers: Iterable[str] | None = None,
             size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Attention maps averaged over steps and layers: ``(B, h, w, M)``.

        Layers: those of ``kind`` at resolution ``res`` (e.g. 16) and ``place`` ("down"/"mid"/
        "up"), or the names in ``layers``. Layers of different resolutions are upsampled
        bilinearly to ``size`` (default: the largest) before averaging (cross-attention only;
        self-attention maps of different resolutions have different keys, so pick one ``res``).
        Steps: all (running sums), or ``steps`` = ``(start, stop)`` / list of step indices.
        Raises ``ValueError`` when nothing matches.
        """
        check_choice(kind, "kind", _KINDS)
        if layers is not None:
            names = list(layers)
            bad = [n for n in names if n not in self.sums]
            if bad:
                raise ValueError(f"layers {bad} were not recorded; recorded: "
                                 f"{[i.name for i in self.layers()]}")
            infos = [self.info[n] for n in names]
        else:
            infos = self.layers(kind, res, place)
        if not infos:
            raise ValueError(f"no recorded {kind}-attention layer matches res={res!r}, "
                             f"place={place!r}; recorded resolutions: {self.resolutions(kind)} "
                             f"(did the UNet run with the store attached?)")
        hw = {(i.height, i.width) for i in infos}
        if size is None:
            size = max(hw, key=lambda s: s[0] * s[1])
        elif isinstance(size, int):
            size = (size, size)
        if kind == "self" and (len(hw) > 1 or (next(iter(hw)) != tuple(size))):
            raise ValueError(f"self-attention maps cannot be averaged across resolutions or "
                             f"resized; pick one res (recorded: {self.resolutions('self')})")
        acc = None
        for i in infos:
            m = self.layer_map(i.name, steps)
            if (i.height, i.width) != tuple(size):
                m = upsample(m.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1)
            acc = m if acc is None else acc + m
        return acc / len(infos)

    def word_map(self, word: str, prompt: str, tokenizer, row: int = 0, res: int | None = None,
                 steps=None, place: str | None = None, size=None) -> torch.Tensor:
        """The cross-attention map ``(h, w)`` of ``word`` in ``prompt``: :meth:`maps` at batch
        row ``row``, averaged over the word's tokens (:func:`word_token_indices`)."""
        idx = word_token_indices(prompt, word, tokenizer)
        m = self.maps("cross", res=res, steps=steps, place=place, size=size)
        if not 0 <= row < m.shape[0]:
            raise ValueError(f"row must lie in [0, {m.shape[0] - 1}], got {row}")
        return m[row][..., idx].mean(-1)


def _step_list(steps, num_steps: int) -> list[int]:
    if isinstance(steps, tuple) and len(steps) == 2 and all(
            isinstance(s, (int, type(None))) for s in steps):
        out = list(range(num_steps))[slice(*steps)]
    elif isinstance(steps, range):
        out = list(steps)
    else:
        try:
            out = [int(s) for s in steps]
        except TypeError:
            raise TypeError(f"steps must be a (start, stop) tuple, a range or a list of ints, "
                            f"got {type(steps).__name__}") from None
    if not out:
        raise ValueError(f"steps {steps!r} selects no step (the store saw {num_steps} steps)")
    return out


# ---------------------------------------------------------------------------- words and tokens
_PUNCT = string.punctuation + "“”‘’"


def prompt_words(prompt: str) -> list[str]:
    """The prompt's words: whitespace-separated, lower-cased, surrounding punctuation removed."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return [w for w in (c.strip(_PUNCT).lower() for c in prompt.split()) if w]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, truncation=False,
                          verbose=False)["input_ids"])


def _max_length(tokenizer) -> int:
    L = getattr(tokenizer, "model_max_length", None)
    return int(L) if L is not None and L < 10**6 else 10**6


def tokenize_prompt(prompt: str, tokenizer, max_length: int | None = None) -> dict:
    """Tokenize like a diffusers pipeline: start/end tokens, padded to ``max_length``
    (default ``tokenizer.model_max_length``, 77 for CLIP), truncated with a warning.

    Returns ``{"input_ids": (1, L) long tensor, "tokens": list of L strings, "length": number
    of non-padding tokens incl. start/end, "truncated": the removed text or ""}``.
    Warns (``UserWarning``) when the prompt is longer than ``max_length``, as diffusers does.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    L = max_length or _max_length(tokenizer)
    full = _ids(tokenizer, prompt, True)
    enc = tokenizer(prompt, padding="max_length", max_length=L, truncation=True,
                    return_tensors="pt")
    ids = enc["input_ids"]
    truncated = ""
    if len(full) > L:
        n_special = len(_ids(tokenizer, "", True))
        kept = L - n_special
        content = _ids(tokenizer, prompt, False)
        truncated = tokenizer.decode(content[kept:])
        warnings.warn(f"The following part of your input was truncated because the text encoder "
                      f"can only handle sequences up to {L} tokens: {truncated!r}", UserWarning,
                      stacklevel=2)
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    return {"input_ids": ids, "tokens": tokens, "length": min(len(full), L),
            "truncated": truncated}


def _chunk_core(chunk: str) -> tuple[str, str, str]:
    core = chunk.strip(_PUNCT)
    if not core:
        return chunk, "", ""
    i = chunk.find(core)
    return chunk[:i], core, chunk[i + len(core):]


def word_token_indices(prompt: str, word: str, tokenizer, occurrence: int | None = None,
                       max_length: int | None = None) -> list[int]:
    """Positions of ``word``'s tokens in the tokenized ``prompt`` (start token = position 0).

    Works for CLIP's BPE tokenizer (a word may become several tokens: all are returned) and for
    word-level tokenizers. ``word`` may be several words ("red circle"); matching ignores case
    and surrounding punctuation. Every occurrence is returned unless ``occurrence`` (0-based)
    picks one.

    Raises ``ValueError`` naming the word and listing the prompt's words when the word is not in
    the prompt, or when it falls in the part removed by truncation to ``max_length``.
    """
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word must be a non-empty str, got {word!r}")
    target = prompt_words(word)
    words = prompt_words(prompt)
    chunks = prompt.split()
    # tokenize chunk by chunk and record the span of each chunk's core (word without punctuation)
    spans, ids = [], []
    for c in chunks:
        pre, core, post = _chunk_core(c)
        a, b, d = (_ids(tokenizer, s, False) if s else [] for s in (pre, core, post))
        whole = _ids(tokenizer, c, False)
        if a + b + d != whole:                 # tokenizer merges across punctuation: take all
            a, b, d = [], whole, []
        if core.strip(_PUNCT):
            spans.append((core.lower(), len(ids) + len(a), len(ids) + len(a) + len(b)))
        ids += whole
    full = _ids(tokenizer, prompt, True)
    offset = _find_sub(full, ids)
    if offset is None:
        raise RuntimeError("the tokenizer does not tokenize this prompt word by word; cannot map "
                           "words to tokens")
    matches = [k for k in range(len(spans) - len(target) + 1)
               if [s[0] for s in spans[k:k + len(target)]] == target]
    if not matches:
        raise ValueError(f"word {word!r} is not in the prompt {prompt!r}; the prompt's words "
                         f"are {words}")
    if occurrence is not None:
        if not 0 <= occurrence < len(matches):
            raise ValueError(f"occurrence must lie in [0, {len(matches) - 1}] for word {word!r}, "
                             f"got {occurrence}")
        matches = [matches[occurrence]]
    L = max_length or _max_length(tokenizer)
    n_suffix = len(full) - offset - len(ids)
    last_kept = L - n_suffix                   # positions >= this are cut by truncation
    out = []
    for k in matches:
        for s in spans[k:k + len(target)]:
            out += [offset + j for j in range(s[1], s[2])]
    kept = [i for i in out if i < last_kept]
    if not kept:
        raise ValueError(f"word {word!r} lies beyond the {L}-token limit of the text encoder "
                         f"(positions {out}), so truncation removed it")
    return kept


def _find_sub(seq: list, sub: list) -> int | None:
    if not sub:
        return 1 if seq else None
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return None


# ---------------------------------------------------------------------------- images
def upsample(maps: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear"
             ) -> torch.Tensor:
    """Resize maps ``(..., h, w)`` to ``(..., H, W)`` (bilinear, ``align_corners=False``)."""
    if not isinstance(maps, torch.Tensor):
        maps = torch.as_tensor(np.asarray(maps))
    if maps.ndim < 2:
        raise ValueError(f"maps must have at least 2 dimensions (..., h, w), got shape "
                         f"{tuple(maps.shape)}")
    if isinstance(size, int):
        size = (size, size)
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:])
    if not x.dtype.is_floating_point:
        x = x.float()
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    y = F.interpolate(x, size=tuple(size), mode=mode, **kw)
    return y.reshape(*lead, *size)


def normalize_map(m, eps: float = 1e-12):
    """Min-max scale a map to [0, 1] (a constant map becomes zeros)."""
    m = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).double()
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if float(hi - lo) > eps else torch.zeros_like(m)


def _image_array(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(image, torch.Tensor):
        x = image.detach().double().cpu()
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim == 3 and x.shape[0] in (1, 3):
            x = x.permute(1, 2, 0)
        image = x.numpy()
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"image must be PIL, HWC/HW array or CHW tensor, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, -1)
    return arr.clip(0, 1)


def overlay(image, heatmap, alpha: float = 0.5, cmap: str = "jet", normalize: bool = True
            ) -> np.ndarray:
    """Blend a heatmap ``(h, w)`` (any size; upsampled bilinearly) over ``image``.

    ``image``: PIL, HWC array in [0, 1] or CHW tensor in [0, 1]. Returns an HWC float array in
    [0, 1]: ``(1 - alpha) * image + alpha * cmap(normalized heatmap)``.
    """
    import matplotlib

    alpha = check_range(alpha, "alpha", 0, 1)
    img = _image_array(image)
    h = torch.as_tensor(np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor)
                                   else heatmap), dtype=torch.float64)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (h, w), got shape {tuple(h.shape)}")
    h = upsample(h, img.shape[:2])
    h = normalize_map(h) if normalize else h.clamp(0, 1)
    colors = matplotlib.colormaps[cmap](h.numpy())[..., :3]
    return (1 - alpha) * img + alpha * colors


# ---------------------------------------------------------------------------- pipelines
def generate_with_attention(pipe, prompt: str, num_inference_steps: int = 20,
                            guidance_scale: float = 7.5, generator=None,
                            kinds: Sequence[str] = ("cross",), store_steps: bool = False,
                            step_max_res: int = 16, **pipe_kwargs):
    """Run a diffusers text-to-image pipeline once and record its attention.

    Keeps only the prompt rows when the pipeline uses classifier-free guidance
    (``guidance_scale > 1``, Ahmad's notes, eq 1.44). Returns ``(image, store)``: the first PIL image
    and the :class:`AttentionStore` (detached from the UNet again).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    tokenize_prompt(prompt, pipe.tokenizer)          # warns if the prompt will be truncated
    rows = "cond" if guidance_scale > 1 else "all"
    store = AttentionStore(kinds=kinds, rows=rows, store_steps=store_steps,
                           step_max_res=step_max_res)
    store.attach(pipe.unet)
    try:
        out = pipe(prompt, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=generator, **pipe_kwargs)
    finally:
        store.detach()
    return out.images[0], store
