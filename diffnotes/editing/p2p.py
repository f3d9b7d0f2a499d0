"""Prompt-to-Prompt (Hertz et al. 2022): edit a generated image by editing its prompt, and keep
its layout by re-using the source prompt's attention maps.

The source prompt and its edits run as ONE batch from the same initial latent (Ahmad's notes,
§3.2.1, Algorithm 3; Gormley & Chai's lecture, "Algorithm 1 Prompt-to-Prompt image editing";
P2P Algorithm 1). In each attention layer, :class:`P2PController` (an
:class:`diffnotes.attention.AttentionController`, installed through the library's one attention
processor) replaces the edited prompts' probabilities before they multiply the edited prompts'
own values V(P*):

* cross-attention, during the steps of the cross-replace schedule α (Gormley & Chai's lecture,
  "Prompt-to-Prompt: Alpha"; per word if asked): ``Â = α · Edit(M, M*) + (1 − α) · M*``, with

  - :class:`WordSwap` (Ahmad's notes, eq 3.2; P2P §3.2 "Word swap"): ``Edit = M`` (the source
    maps), for prompts with the same number of tokens;
  - :class:`Refine` (Ahmad's notes, eq 3.3; P2P "Adding a new phrase"): ``Edit_{:,j} =
    M_{:,A(j)}`` for target tokens aligned to a source token, ``M*_{:,j}`` for new tokens; A is
    a global alignment of the token sequences (P2P's ``seq_aligner``), written as the mapper
    matrix ``Â = A M`` of Gormley & Chai's lecture ("Attention Swapping");
  - :class:`Reweight` (Ahmad's notes, eq 3.4; P2P "Attention re-weighting"): ``Edit_{:,j} =
    c_j M_{:,j}`` with c ∈ [−2, 2] on the chosen words.

* self-attention, during the first ``self_replace_steps`` of the steps, on the low-resolution
  layers: the edited rows take the source's self-attention maps (P2P's code; not in the seeds).

The schedule follows P2P's equation and code: the SOURCE maps are injected during the FIRST
fraction τ (``cross_replace_steps``) of the denoising steps, and the edited prompt's own maps
are used afterwards (P2P's eq. "Edit(M_t, M*_t, t) = M*_t if t < τ else M_t", t counting down;
Ahmad's notes' prose around eq 3.2 states the reverse, see the errata). As in the official code,
only the conditional rows of the guidance batch are edited.

:class:`LocalBlend` (P2P §3.2, "local editing"): a mask from the chosen words' cross-attention
maps (averaged over layers, heads and the steps so far, max-pooled, normalised, thresholded);
outside it the edited latents are set back to the source's after every step.

Memory does not depend on the number of steps: the controller keeps one small running sum per
layer for :class:`LocalBlend`, and the returned store keeps running sums (see
:class:`diffnotes.attention.AttentionStore`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..attention import (AttentionController, AttentionStore, AttnCall, BatchLayout, _KINDS,
                         attention_resolutions, tokenize_prompt, upsample, word_token_indices)
from ..ddim import ddim_step
from ..utils import batch_timesteps, check_int, check_range, check_tensor
from .common import (encode_prompts, fraction_steps, pipe_alphas_cumprod, pipe_eps_model,
                     pipe_timesteps)

__all__ = ["prompt_to_prompt", "WordSwap", "Refine", "Reweight", "LocalBlend", "P2PController",
           "token_alignment", "refine_mapper", "mapper_matrix", "cross_replace_schedule"]


# ---------------------------------------------------------------------------- token helpers
def _token_ids(prompt: str, tokenizer) -> list[int]:
    """The prompt's token ids with start/end tokens, without padding (truncated to L)."""
    ids = tokenize_prompt(prompt, tokenizer)
    return ids["input_ids"][0, : ids["length"]].tolist()


def token_alignment(source_ids: Sequence, target_ids: Sequence) -> list[int | None]:
    """A(j) for each target token j: the source index it is aligned to, or None for a new token.

    Global alignment (Needleman–Wunsch) with P2P's ``seq_aligner`` scores: match +1, mismatch −1,
    gap 0, ties broken as there (a gap in the source first, then a gap in the target). Aligned
    pairs are equal tokens, in order, and as many as possible (a longest common subsequence):
    "a castle next to a river" → "children drawing of a castle next to a river" gives
    A = [None, None, None, 0, 1, 2, 3, 4, 5] (Ahmad's notes, eq 3.3 and its example; the second
    "a" goes to 4, not to the first "a").
    """
    x, y = list(source_ids), list(target_ids)
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        trace[0][j] = 1
    for i in range(1, n + 1):
        trace[i][0] = 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else (2 if best == up else 3)
    out: list[int | None] = [None] * m
    i, j = n, m
    while i > 0 or j > 0:
        tr = trace[i][j]
        if tr == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif tr == 1:
            j -= 1
        else:
            i -= 1
    return out


def refine_mapper(source: str, target: str, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P's refinement mapper: ``(mapper, alphas)``, two (L,) tensors over the target's token
    positions (L = the tokenizer's padded length): ``mapper[j]`` = A(j) (any index where A(j) is
    None) and ``alphas[j]`` = 1 where token j is aligned, 0 for a new token. Padding positions
    map to themselves with alpha 1, as in P2P's ``seq_aligner.get_refinement_mapper``."""
    L = tokenize_prompt(source, tokenizer)["input_ids"].shape[1]
    a = token_alignment(_token_ids(source, tokenizer), _token_ids(target, tokenizer))
    mapper = torch.arange(L)
    alphas = torch.ones(L, dtype=torch.float64)
    for j, src in enumerate(a):
        mapper[j] = 0 if src is None else src
        alphas[j] = 0.0 if src is None else 1.0
    return mapper, alphas


def mapper_matrix(mapper: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The mapper as the (L, L) matrix of Gormley & Chai's lecture ("Attention Swapping",
    ``Â = A M``): ``M[mapper[j], j] = alphas[j]``. ``A @ M`` equals ``A[..., mapper] * alphas``."""
    L = mapper.shape[0]
    M = torch.zeros(L, L, dtype=torch.float64)
    M[mapper, torch.arange(L)] = alphas.double()
    return M


def _words_list(words, name: str) -> list[str]:
    if isinstance(words, str):
        words = [words]
    if not isinstance(words, (list, tuple)) or not words or not all(
            isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"{name} must be a word or a non-empty list of words, got {words!r}")
    return list(words)


def _word_indices(prompt: str, word: str, tokenizer, name: str) -> list[int]:
    try:
        return word_token_indices(prompt, word, tokenizer)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _check_window(v, name: str) -> tuple[float, float]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be a fraction in [0, 1] or a (start, end) pair, got "
                             f"{v!r}")
        a, b = (check_range(x, name, 0, 1) for x in v)
        if a > b:
            raise ValueError(f"{name} must have start <= end, got {v!r}")
        return a, b
    return 0.0, check_range(v, name, 0, 1)


def cross_replace_schedule(prompts: Sequence[str], tokenizer, num_steps: int,
                           cross_replace_steps=0.8, word_steps: dict | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-word schedule α of Gormley & Chai's lecture ("Prompt-to-Prompt: Alpha"), as
    step windows: ``(start, end)``, two (len(prompts) − 1, L) long tensors; token j of edit k
    takes the source's maps at steps ``start[k, j] <= i < end[k, j]`` (α = 1) and its own maps
    otherwise (α = 0). A fraction τ means the window [0, ⌊τ N⌋): the FIRST steps (P2P's code,
    ``get_time_words_attention_alpha``). ``cross_replace_steps``: a fraction, a (start, end)
    pair, or a dict {word: fraction or pair} with an optional ``"default_"`` entry (P2P's
    convention); ``word_steps`` (an edit's own per-word schedule) overrides it per word.
    """
    if isinstance(cross_replace_steps, dict):
        per_word = dict(cross_replace_steps)
        default = per_word.pop("default_", 1.0)
    else:
        per_word, default = {}, cross_replace_steps
    per_word.update(word_steps or {})
    a, b = _check_window(default, "cross_replace_steps")
    L = tokenize_prompt(prompts[0], tokenizer)["input_ids"].shape[1]
    n = len(prompts) - 1
    start = torch.full((n, L), fraction_steps(a, num_steps), dtype=torch.long)
    end = torch.full((n, L), fraction_steps(b, num_steps), dtype=torch.long)
    for word, v in per_word.items():
        wa, wb = _check_window(v, f"cross_replace_steps[{word!r}]")
        found = False
        for k, p in enumerate(prompts[1:]):
            try:
                idx = word_token_indices(p, word, tokenizer)
            except ValueError:
                continue
            found = True
            start[k, idx], end[k, idx] = fraction_steps(wa, num_steps), fraction_steps(wb, num_steps)
        if not found:
            raise ValueError(f"cross_replace_steps: word {word!r} is in none of the edited "
                             f"prompts {list(prompts[1:])}")
    return start, end


# ---------------------------------------------------------------------------- the edits
class _Edit:
    """An edit of the cross-attention maps: ``prepare`` once per run, then ``cross(src, rep)``
    maps the source's probabilities (heads, q, M) and the edits' (K, heads, q, M) to the
    edited maps Edit(M, M*) (K, heads, q, M), before the α schedule mixes them with M*."""

    def __init__(self, word_steps: dict | None = None):
        if word_steps is not None and not isinstance(word_steps, dict):
            raise TypeError(f"word_steps must be a dict {{word: fraction or (start, end)}} or "
                            f"None, got {type(word_steps).__name__}")
        for w, v in (word_steps or {}).items():
            _check_window(v, f"word_steps[{w!r}]")
        self.word_steps = dict(word_steps or {})

    def prepare(self, prompts: Sequence[str], tokenizer) -> None:
        pass

    def cross(self, src: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class WordSwap(_Edit):
    """Word swap (Ahmad's notes, eq 3.2; P2P §3.2): the edited prompts take the source's
    cross-attention maps, token for token, while the schedule injects them. The prompts must
    have the same number of tokens (else ``ValueError``: use :class:`Refine`)."""

    def prepare(self, prompts, tokenizer):
        n0 = len(_token_ids(prompts[0], tokenizer))
        for k, p in enumerate(prompts[1:], 1):
            nk = len(_token_ids(p, tokenizer))
            if nk != n0:
                raise ValueError(
                    f"prompts: WordSwap needs prompts with the same number of tokens, but "
                    f"prompts[0] {prompts[0]!r} has {n0} and prompts[{k}] {p!r} has {nk}; use "
                    f"Refine() for prompts that add or remove words")

    def cross(self, src, rep):
        return src.unsqueeze(0).expand_as(rep)


class Refine(_Edit):
    """Refinement, adding words (Ahmad's notes, eq 3.3; P2P "Adding a new phrase"): target token
    j takes the source map of its aligned token A(j) (:func:`token_alignment`), new tokens keep
    their own maps (alphas 0 in :func:`refine_mapper`); not renormalised, as in P2P's code."""

    def prepare(self, prompts, tokenizer):
        maps = [refine_mapper(prompts[0], p, tokenizer) for p in prompts[1:]]
        self.mapper = torch.stack([m for m, _ in maps])         # (K, L)
        self.alphas = torch.stack([a for _, a in maps])         # (K, L)

    def cross(self, src, rep):
        out = torch.empty_like(rep)
        for k in range(rep.shape[0]):
            a = self.alphas[k].to(rep.device, rep.dtype)
            out[k] = src[..., self.mapper[k].to(src.device)] * a + rep[k] * (1 - a)
        return out


class Reweight(_Edit):
    """Attention re-weighting (Ahmad's notes, eq 3.4; P2P "Attention re-weighting"): the maps of
    ``words`` (tokens of the edited prompts) are multiplied by ``scale`` c ∈ [−2, 2] (one
    number, or one per word), on top of the source's maps, or of ``base``'s edit (a
    :class:`WordSwap` or :class:`Refine`, as P2P's ``prev_controller``)."""

    def __init__(self, words, scale, base: _Edit | None = None, word_steps: dict | None = None):
        super().__init__(word_steps)
        self.words = _words_list(words, "words")
        scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(self.words)
        if len(scales) != len(self.words):
            raise ValueError(f"scale must be one number or one per word ({len(self.words)}), "
                             f"got {scale!r}")
        self.scales = [check_range(c, "scale", -2, 2) for c in scales]
        if base is not None and not isinstance(base, (WordSwap, Refine)):
            raise TypeError(f"base must be a WordSwap, a Refine or None, got "
                            f"{type(base).__name__}")
        self.base = base

    def prepare(self, prompts, tokenizer):
        if self.base is not None:
            self.base.prepare(prompts, tokenizer)
        L = tokenize_prompt(prompts[0], tokenizer)["input_ids"].shape[1]
        eq = torch.ones(len(prompts) - 1, L, dtype=torch.float64)
        for k, p in enumerate(prompts[1:]):
            for w, c in zip(self.words, self.scales):
                eq[k, _word_indices(p, w, tokenizer, "words")] = c
        self.equalizer = eq

    def cross(self, src, rep):
        base = self.base.cross(src, rep) if self.base is not None else \
            src.unsqueeze(0).expand_as(rep)
        return base * self.equalizer.to(rep.device, rep.dtype)[:, None, None, :]


class LocalBlend:
    """Local editing (P2P §3.2 and code): after each step, the edited latents are set to
    ``z_src + mask · (z_edit − z_src)``, so outside the mask they follow the source.

    The mask of edit k is the union of the source's and edit k's masks; a prompt's mask is the
    sum over its tokens of ``words`` of the cross-attention maps (conditional rows, before the
    edit, averaged over heads, layers — bilinearly resized to the largest selected layer — and
    the steps so far), max-pooled 3×3, resized (nearest) to the latent, divided by its maximum,
    and thresholded at ``threshold``. ``words``: one word / a list (looked up in every prompt,
    skipped where absent) or a list of lists, one per prompt. ``res``: the layer resolutions to
    use (None: all; P2P uses SD's 16×16 layers).
    """

    def __init__(self, words, threshold: float = 0.3, res: int | Sequence[int] | None = None):
        if isinstance(words, (list, tuple)) and words and all(
                isinstance(w, (list, tuple)) for w in words):
            self.per_prompt = [_words_list(w, "words") for w in words]
            self.words = None
        else:
            self.words, self.per_prompt = _words_list(words, "words"), None
        self.threshold = check_range(threshold, "threshold", 0, 1)
        if res is not None:
            res = [res] if isinstance(res, int) else list(res)
            for r in res:
                check_int(r, "res", min=1)
        self.res = res
        self.mask = None

    def prepare(self, prompts, tokenizer):
        L = tokenize_prompt(prompts[0], tokenizer)["input_ids"].shape[1]
        sel = torch.zeros(len(prompts), L, dtype=torch.float64)
        if self.per_prompt is not None:
            if len(self.per_prompt) != len(prompts):
                raise ValueError(f"words must have one list per prompt ({len(prompts)}), got "
                                 f"{len(self.per_prompt)}")
            for k, (p, ws) in enumerate(zip(prompts, self.per_prompt)):
                for w in ws:
                    sel[k, _word_indices(p, w, tokenizer, "words")] = 1
        else:
            for w in self.words:
                found = False
                for k, p in enumerate(prompts):
                    try:
                        sel[k, word_token_indices(p, w, tokenizer)] = 1
                        found = True
                    except ValueError:
                        pass
                if not found:
                    raise ValueError(f"words: word {w!r} is in none of the prompts "
                                     f"{list(prompts)}")
        self.select = sel
        self.sums: dict[str, torch.Tensor] = {}
        self.mask = None

    def wants_layer(self, info: AttnCall) -> bool:
        return self.res is None or info.res in self.res

    def accumulate(self, cond_probs: torch.Tensor, info: AttnCall) -> None:
        """Add one layer's word maps (n, h, w) (running sum over steps: memory flat)."""
        with torch.no_grad():
            sel = self.select.to(cond_probs.device, torch.promote_types(cond_probs.dtype,
                                                                        torch.float32))
            m = torch.einsum("nhqm,nm->nq", cond_probs.to(sel.dtype), sel) / cond_probs.shape[1]
            m = m.reshape(-1, info.height, info.width)
            if info.name in self.sums:
                self.sums[info.name] += m
            else:
                self.sums[info.name] = m.clone()

    def compute_mask(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The (n − 1, 1, H, W) blend mask of the edits (float 0/1), from the sums so far."""
        if not self.sums:
            raise RuntimeError("LocalBlend saw no cross-attention layer; check res=")
        maps = list(self.sums.values())
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        acc = sum(upsample(m, tuple(size)) if m.shape[-2:] != size else m for m in maps)
        acc = (acc / len(maps)).unsqueeze(1)                      # (n, 1, h, w)
        acc = F.max_pool2d(acc, 3, stride=1, padding=1)
        acc = F.interpolate(acc, size=tuple(latent_hw), mode="nearest")
        peak = acc.amax(dim=(2, 3), keepdim=True).clamp_min(1e-30)
        mask = (acc / peak) > self.threshold
        mask = (mask[:1] | mask[1:]).to(acc.dtype)                # source ∪ edit
        self.mask = mask
        return mask

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.compute_mask(x.shape[-2:]).to(x.device, x.dtype)
        src = x[:1]
        return torch.cat([src, src + mask * (x[1:] - src)])


# ---------------------------------------------------------------------------- the controller
class P2PController(AttentionController):
    """Prompt-to-Prompt's attention control for a batch laid out as ``layout`` (prompt 0 the
    source): cross-attention edits by ``edit`` within the windows ``(start, end)`` of
    :func:`cross_replace_schedule`, self-attention replacement at steps ``a <= i < b`` for
    ``self_steps = (a, b)`` on layers of resolution ``<= self_max_res``, and the word maps for
    ``local_blend``."""

    kinds = _KINDS

    def __init__(self, edit: _Edit, layout: BatchLayout, start: torch.Tensor, end: torch.Tensor,
                 self_steps: tuple[int, int], self_max_res: int, local_blend: LocalBlend | None = None):
        self.edit_, self.layout = edit, layout
        self.start, self.end = start, end
        self.self_steps, self.self_max_res = self_steps, self_max_res
        self.local_blend = local_blend

    def wants(self, kind, height, width):
        if kind == "cross":
            return True
        return self.self_steps[1] > self.self_steps[0] and max(height, width) <= self.self_max_res

    def edit(self, probs, info):
        rows = self.layout.cond_rows()
        p = probs[rows]                                             # (n, heads, q, M), a view
        step = info.step
        if info.kind == "cross":
            if self.local_blend is not None and self.local_blend.wants_layer(info):
                self.local_blend.accumulate(p, info)
            on = (self.start <= step) & (step < self.end)           # α_t per edit and token
            if bool(on.any()):
                src, rep = p[0], p[1:]
                a = on.to(device=probs.device, dtype=probs.dtype)[:, None, None, :]
                new = self.edit_.cross(src, rep)
                p[1:] = new * a + rep * (1 - a)                     # exact where α ∈ {0, 1}
        elif self.self_steps[0] <= step < self.self_steps[1]:
            p[1:] = p[0].unsqueeze(0).expand_as(p[1:])
        return probs


# ---------------------------------------------------------------------------- decoding
def _decode_latents(pipe, z: torch.Tensor):
    """PIL images of latents z, decoded by :func:`diffnotes.editing.inversion.decode_latents`
    (the VAE with its scaling factor)."""
    from PIL import Image

    from .inversion import decode_latents

    x = decode_latents(pipe, z).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in x]


# ---------------------------------------------------------------------------- the sampler
def prompt_to_prompt(pipe, prompts: Sequence[str], edit, *, num_inference_steps: int = 50,
                     guidance_scale: float = 7.5, cross_replace_steps=0.8,
                     self_replace_steps: float = 0.4, local_blend: LocalBlend | None = None,
                     generator: torch.Generator | None = None,
                     latents: torch.Tensor | None = None, null_embeddings=None,
                     self_replace_max_res: int | None = None, output_type: str = "pil"):
    """Generate ``prompts[0]`` (the source) and its edits ``prompts[1:]`` in one batch from the
    same initial latent, with Prompt-to-Prompt attention control (P2P Algorithm 1; Ahmad's
    notes, Algorithm 3), by DDIM steps (:func:`diffnotes.ddim.ddim_step`, Ahmad's notes, eq 1.21;
    DDIM eq 12) on the guided ε (Ahmad's notes, eq 1.44).

    Parameters
    ----------
    edit : :class:`WordSwap`, :class:`Refine` or :class:`Reweight`.
    cross_replace_steps : the fraction τ of the first steps with the source's cross-attention
        maps (or a (start, end) pair, or a dict {word: ...} with ``"default_"``), in [0, 1].
    self_replace_steps : the fraction of the first steps with the source's self-attention maps
        (or a (start, end) pair), in [0, 1]; on layers of resolution ``<= self_replace_max_res``
        (default: the lower half of the UNet's attention resolutions — SD's 16 and 8 of 64, the
        layers P2P's code replaces).
    local_blend : a :class:`LocalBlend`, or None.
    generator, latents : the initial latent: ``latents`` (1, C, h, w) or (C, h, w) (e.g. from
        an inversion), else drawn from ``generator``.
    null_embeddings : optional list with one unconditional embedding (1, L, D) per step (null-
        text inversion's output), used instead of the empty prompt's embedding.
    output_type : "pil" (images) or "latent" (the final latents, (n, C, h, w)).

    Returns ``(images, store)``: a list of ``len(prompts)`` PIL images (or the latents) and an
    :class:`diffnotes.attention.AttentionStore` with the cross-attention maps the UNet used
    (after the edit; row k = prompt k), averaged over steps; ``store.blend_mask`` is the last
    local-blend mask (or None).

    Raises ``ValueError`` (naming the argument) for fewer than 2 prompts, WordSwap prompts of
    different token counts, a re-weighted word not in the prompts, schedules outside [0, 1],
    a wrong number of null embeddings or a latent of the wrong shape; ``TypeError`` for an
    unknown edit.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or len(prompts) < 2 \
            or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of at least 2 strings (the source, then its "
                         f"edits), got {prompts!r}")
    prompts = list(prompts)
    if not isinstance(edit, _Edit):
        raise TypeError(f"edit must be WordSwap(), Refine() or Reweight(...), got "
                        f"{type(edit).__name__}")
    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    gs = check_range(guidance_scale, "guidance_scale")
    if local_blend is not None and not isinstance(local_blend, LocalBlend):
        raise TypeError(f"local_blend must be a LocalBlend or None, got "
                        f"{type(local_blend).__name__}")
    if output_type not in ("pil", "latent"):
        raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
    tok = pipe.tokenizer
    for p in prompts:
        tokenize_prompt(p, tok)                                   # warns on truncation
    start, end = cross_replace_schedule(prompts, tok, N, cross_replace_steps, edit.word_steps)
    s0, s1 = _check_window(self_replace_steps, "self_replace_steps")
    edit.prepare(prompts, tok)
    if local_blend is not None:
        local_blend.prepare(prompts, tok)
    unet = pipe.unet
    n = len(prompts)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if latents is None:
        x_T = torch.randn((1, *shape), generator=generator, dtype=unet.dtype,
                          device=generator.device if generator is not None else unet.device)
        x_T = x_T * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    else:
        check_tensor(latents, "latents", ndim=(3, 4))
        x_T = latents if latents.ndim == 4 else latents.unsqueeze(0)
        if x_T.shape[0] != 1 or x_T.shape[1] != shape[0]:
            raise ValueError(f"latents must have shape (1, {shape[0]}, h, w) or "
                             f"({shape[0]}, h, w), got {tuple(latents.shape)}")
    x = x_T.to(unet.device, unet.dtype).expand(n, -1, -1, -1).clone()
    if null_embeddings is not None:
        null_embeddings = list(null_embeddings)
        if len(null_embeddings) != N:
            raise ValueError(f"null_embeddings must hold one (1, L, D) embedding per step "
                             f"({N}), got {len(null_embeddings)}")
        for e in null_embeddings:
            check_tensor(e, "null_embeddings[i]", ndim=3)
    use_cfg = gs != 1.0 or null_embeddings is not None
    unique = list(dict.fromkeys(prompts))       # equal prompts get bitwise equal embeddings
    cond = encode_prompts(pipe, unique)[[unique.index(p) for p in prompts]]
    null = encode_prompts(pipe, "") if use_cfg and null_embeddings is None else None
    ts = pipe_timesteps(pipe, N)
    acl = pipe_alphas_cumprod(pipe).tolist()
    hw = (x.shape[-2], x.shape[-1])
    if self_replace_max_res is None:            # the lower half of the resolutions
        res = attention_resolutions(unet, "self", hw)
        self_replace_max_res = res[len(res) // 2] if res else 0
    else:
        check_int(self_replace_max_res, "self_replace_max_res", min=0)
    layout = BatchLayout(n, use_cfg)
    ctrl = P2PController(edit, layout, start, end, (fraction_steps(s0, N), fraction_steps(s1, N)),
                         self_replace_max_res, local_blend)
    store = AttentionStore(kinds=("cross",), rows="cond" if use_cfg else "all",
                           controller=ctrl, layout=layout)
    store.attach(unet)
    try:
        for i, t in enumerate(ts):
            a_prev = acl[ts[i + 1]] if i + 1 < len(ts) else 1.0
            nul = null_embeddings[i] if null_embeddings is not None else null
            eps_model = pipe_eps_model(pipe, cond, nul, gs if use_cfg else 1.0)
            with torch.no_grad():
                eps = eps_model(x, batch_timesteps(t, x))
            x = ddim_step(x, eps, acl[t], a_prev)
            if local_blend is not None:
                x = local_blend.blend(x)
    finally:
        store.detach()
    store.blend_mask = local_blend.mask if local_blend is not None else None
    if output_type == "latent":
        return x, store
    return _decode_latents(pipe, x), store
