"""Attribute binding and neglect: Attend-and-Excite (Chefer et al. 2023) and StructureDiffusion
(Feng et al. 2023, "Training-Free Structured Diffusion Guidance").

Two failure modes of text-to-image models on prompts with several objects (Ahmad's notes, §3.5):
*catastrophic neglect* (an object of the prompt is missing) and *attribute binding* (a colour
sits on the wrong object, or on both).

**Attend-and-Excite** (Ahmad's notes, §3.5.1, eq 3.27; Chefer et al. 2023, §3 and
Algorithm 1) changes the latent, not the model. At denoising step ``i`` the conditional UNet
pass runs with gradients; its cross-attention probabilities at one resolution are averaged over
heads and layers into ``A_t ∈ R^{P×P×M}``. The start token's column is dropped and the
remaining text tokens are re-normalised by a softmax of ``100·A_t`` (the official code's
temperature); each subject token's map is smoothed by a 3×3 Gaussian, and

    L = max_s L_s,    L_s = max(0, 1 − max_{ij} (G * A^s_t)_{ij})        (eq 3.27)

is lowered by one gradient step on the latent, ``z_t ← z_t − α_i ∇_{z_t} L``, with the step size
``α_i = scale_factor · sqrt(linspace(1, 0.5, N)_i)`` of the official code (diffusers:
``step_size = scale_factor * np.sqrt(scale_range[i])``), for the first ``max_iter_to_alter``
steps. At the *threshold steps* (``{0: 0.05, 10: 0.5, 20: 0.8}``: step index → minimum smoothed
maximum) the update is repeated until every subject reaches the threshold or
``max_refinement_steps`` updates were made (iterative latent refinement). Then an ordinary
guided DDIM step (:func:`diffnotes.ddim.ddim_step`, DDIM eq 12; guidance Ahmad's notes, eq 1.44)
is taken from the updated latent.

Which tokens enter the re-normalising softmax (``softmax_tokens``):

* ``"prompt"`` (default; the paper and the official code, ``attention[:, :, 1:last_idx]``):
  the prompt's own tokens, start token, end token and padding excluded;
* ``"diffusers"``: diffusers' pipeline slices ``[:, :, 1:-1]``, which keeps the end token and
  all padding but the last position inside the softmax (a deviation; see the errata);
* ``"none"``: no re-normalisation: the raw probability ``A_t`` of the subject token.

Layer rule (``attention_res=None``): the cross-attention layers at the UNet's second-coarsest
attention resolution, encoder, middle and decoder alike. On Stable Diffusion (64, 32, 16, 8 for
a 64×64 latent) that is the 16×16 layers the paper uses (latent/4); on the shapes model (16, 8)
the 16×16 layers (diffusers' default ``attn_res=(16, 16)``); on the SD-1.5-layout tiny pipeline
(40, 20, 10, 5) the 10×10 layers.

Smoothing: the official code's (and diffusers') kernel ``exp(−((x − μ)/(2σ))²)``, normalised,
with reflect padding; the textbook ``exp(−(x − μ)²/(2σ²))`` is ``kernel_form="textbook"``. With
σ = 0.5 the two differ a lot (centre 0.332 against 0.619; :func:`gaussian_kernel`).

**StructureDiffusion** (Ahmad's notes, §3.5.2, eq 3.28; Zhu's slides, *Training-Free Structured
Diffusion Guidance*; Feng et al. 2023, §3): the noun phrases of the prompt (a rule-based
chunker, :func:`noun_phrases`) are encoded separately; each phrase's token embeddings are
written into the phrase's positions of the full prompt's sequence (sequence alignment; the other
positions keep the full prompt's embedding), and every cross-attention layer uses the full
prompt's keys with the mean of the values,

    O = M · (1/(k+1)) Σ_{i=0..k} V_i,   M = softmax(Q K_p^T / sqrt d)        (eq 3.28)

(V_0 = V_p from the full prompt, V_i from phrase i), on the conditional rows of the guidance
batch, through the attention controller's :meth:`~diffnotes.attention.AttentionController.
edit_qkv` hook. The loss printed with it in Ahmad's notes (eq 3.29) is not part of the method,
which is training-free and optimises nothing (see the errata).

Shape-guided inside-outside attention (Zhu's slides, *Shape-Guided Diffusion with
Inside-Outside Attention*) needs an object mask given with the prompt; it is a masked-attention
edit of the layout family (:mod:`diffnotes.editing.layout`'s Dense Diffusion modulates the same
logits with segment masks), not a binding method for prompts alone, so it is not here.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import (AttentionCollector, AttentionController, AttentionStore, BatchLayout,
                         attention_layers, attention_resolutions, layer_resolutions,
                         prompt_words, tokenize_prompt, word_token_indices)
from ..ddim import ddim_step
from ..utils import batch_timesteps, check_choice, check_int, check_range, check_tensor
from .common import encode_prompts, pipe_alphas_cumprod, pipe_eps_model, pipe_timesteps

__all__ = ["attend_and_excite", "structure_diffusion", "gaussian_kernel", "smooth_map",
           "max_attention_per_token", "ae_loss", "step_sizes", "attention_resolutions",
           "default_attention_res", "softmax_columns", "noun_phrases", "phrase_token_spans",
           "aligned_phrase_embeddings", "StructureController", "AE_THRESHOLDS"]

#: the paper's and the official code's refinement schedule: step index -> minimum maximum
AE_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}
#: the official code multiplies the probabilities by 100 before the re-normalising softmax
SOFTMAX_SCALE = 100.0
_SOFTMAX_TOKENS = ("prompt", "diffusers", "none")


# ---------------------------------------------------------------------------- A&E pieces
def gaussian_kernel(sigma: float = 0.5, size: int = 3, form: str = "official",
                    dtype=torch.float64) -> torch.Tensor:
    """The (size, size) smoothing kernel of Attend-and-Excite, normalised to sum 1.

    ``form="official"``: the official code's and diffusers' ``GaussianSmoothing``, a product of
    ``exp(−((x − μ)/(2σ))²)`` over the two axes (σ = 0.5: centre 0.331911, edge 0.122103,
    corner 0.044919); ``form="textbook"``: ``exp(−(x − μ)²/(2σ²))`` (0.619347, 0.083819,
    0.011344). μ = (size − 1)/2. The official form is computed in float32 like the official
    code's (so its float64 copy is bitwise diffusers' kernel cast to float64)."""
    sigma = check_range(sigma, "smoothing_sigma", 0, lo_open=True)
    size = check_int(size, "size", min=1)
    form = check_choice(form, "kernel_form", ("official", "textbook"))
    if form == "official":           # computed in float32, as the official code does
        x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-((x / (2 * sigma)) ** 2))
    else:
        x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    k = g[:, None] * g[None, :]
    return (k / torch.sum(k)).to(dtype)


def smooth_map(m: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve maps ``(..., h, w)`` with ``kernel`` (size × size) after reflect padding of
    size // 2 (the official code's ``F.pad(..., mode="reflect")`` then ``conv2d``)."""
    lead, (h, w) = m.shape[:-2], m.shape[-2:]
    p = kernel.shape[-1] // 2
    x = m.reshape(-1, 1, h, w)
    if p:
        x = F.pad(x, (p, p, p, p), mode="reflect")
    y = F.conv2d(x, kernel.to(x.device, x.dtype)[None, None])
    return y.reshape(*lead, h, w)


def softmax_columns(n_tokens: int, n_keys: int, softmax_tokens: str = "prompt") -> slice | None:
    """The key columns that enter the re-normalising softmax: ``slice(1, n_tokens − 1)`` for
    ``"prompt"`` (the prompt's tokens; ``n_tokens`` counts start and end), ``slice(1, n_keys − 1)``
    for ``"diffusers"``, None for ``"none"`` (no softmax)."""
    softmax_tokens = check_choice(softmax_tokens, "softmax_tokens", _SOFTMAX_TOKENS)
    if softmax_tokens == "none":
        return None
    return slice(1, n_tokens - 1) if softmax_tokens == "prompt" else slice(1, n_keys - 1)


def max_attention_per_token(maps: torch.Tensor, subjects: Sequence[Sequence[int]], n_tokens: int,
                            softmax_tokens: str = "prompt", kernel: torch.Tensor | None = None,
                            softmax_scale: float = SOFTMAX_SCALE) -> torch.Tensor:
    """The smoothed maximum ``max_ij (G * A^s)_ij`` of each subject (Ahmad's notes, §3.5.1):
    ``maps`` (h, w, M) (one prompt, averaged over heads and layers), ``subjects`` a list of
    token-index lists (a subject of several tokens, a BPE-split word, takes the mean of its
    tokens' maps), ``n_tokens`` the prompt's length with start and end tokens. Re-normalised by
    ``softmax(softmax_scale · A)`` over :func:`softmax_columns`. Returns (S,)."""
    cols = softmax_columns(n_tokens, maps.shape[-1], softmax_tokens)
    if cols is None:
        a, off = maps, 0
    else:
        a, off = torch.softmax(maps[..., cols] * softmax_scale, dim=-1), cols.start
    out = []
    for idx in subjects:
        m = a[..., [j - off for j in idx]].mean(-1)
        if kernel is not None:
            m = smooth_map(m, kernel)
        out.append(m.max())
    return torch.stack(out)


def ae_loss(maxima: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite's loss ``L = max_s max(0, 1 − m_s)`` of the subjects' smoothed maxima
    ``m`` (S,) (Ahmad's notes, eq 3.27; Chefer et al. 2023, §3): m = [0.9, 0.3] gives 0.7."""
    return (1 - maxima).clamp_min(0).max()


def step_sizes(scale_factor: float, num_steps: int) -> np.ndarray:
    """α_i = scale_factor · sqrt(linspace(1, 0.5, N)_i), i = 0 … N − 1 (the official code and
    diffusers: ``scale_factor * np.sqrt(np.linspace(1.0, 0.5, N))``); N = 50 and scale 20:
    α_0 = 20, α_10 = 18.9521, α_20 = 17.8429, α_24 = 17.3793."""
    return float(scale_factor) * np.sqrt(np.linspace(1.0, 0.5, int(num_steps)))


def default_attention_res(unet, latent_hw: tuple[int, int] | None = None) -> int:
    """The layer rule of Attend-and-Excite: the second-coarsest cross-attention resolution
    (Stable Diffusion: 16 of 64, 32, 16, 8 = latent/4, the paper's 16×16 maps; the shapes model:
    16 of 16, 8; the SD-1.5-layout tiny pipeline: 10 of 40, 20, 10, 5); the only one if the UNet
    has a single resolution."""
    res = attention_resolutions(unet, "cross", latent_hw)
    if not res:
        raise ValueError("the UNet has no cross-attention layer")
    return res[-2] if len(res) > 1 else res[0]


def _subject_indices(prompts, token_words, tokenizer) -> list[list[list[int]]]:
    out = []
    for p, words in zip(prompts, token_words):
        if isinstance(words, (str, int)):
            words = [words]
        if not isinstance(words, (list, tuple)) or not words:
            raise ValueError(f"token_words must be a non-empty list of words (or token indices) "
                             f"per prompt, got {words!r}")
        tokenize_prompt(p, tokenizer)                  # warns when the prompt is truncated
        subj = []
        for w in words:
            if isinstance(w, (int, np.integer)) and not isinstance(w, bool):
                L = tokenizer.model_max_length
                if not 0 < int(w) < L:
                    raise ValueError(f"token_words: token index {w} must lie in [1, {L - 1}]")
                subj.append([int(w)])
            elif isinstance(w, str):
                try:
                    subj.append(word_token_indices(p, w, tokenizer))
                except ValueError as e:
                    raise ValueError(f"token_words: {e}") from None
            else:
                raise ValueError(f"token_words must hold words (str) or token indices (int), "
                                 f"got {w!r}")
        out.append(subj)
    return out


def _initial_latents(pipe, n, generator, latents, dtype, device):
    unet = pipe.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if latents is None:
        x = torch.randn((n, *shape), generator=generator, dtype=dtype,
                        device=generator.device if generator is not None else device)
        x = x * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    else:
        check_tensor(latents, "latents", ndim=(3, 4))
        x = latents if latents.ndim == 4 else latents.unsqueeze(0)
        if x.shape[1] != shape[0] or x.shape[0] not in (1, n):
            raise ValueError(f"latents must have shape ({n} or 1, {shape[0]}, h, w), got "
                             f"{tuple(latents.shape)}")
        x = x.expand(n, -1, -1, -1)
    return x.to(device, dtype).clone()


def _outputs(pipe, x, output_type):
    if output_type == "latent":
        return x
    from .inversion import decode_latents
    img = decode_latents(pipe, x).permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return img
    from PIL import Image
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in img]


def _prompt_list(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(
            isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got "
                         f"{prompt!r}")
    return list(prompts)


def attend_and_excite(pipe, prompt, token_words, *, thresholds: dict | None = None,
                      scale_factor: float = 20, max_iter_to_alter: int = 25,
                      smoothing_sigma: float = 0.5, max_refinement_steps: int = 20,
                      attention_res: int | None = None, softmax_tokens: str = "prompt",
                      kernel_form: str = "official", num_inference_steps: int = 50,
                      guidance_scale: float = 7.5, generator: torch.Generator | None = None,
                      latents: torch.Tensor | None = None, output_type: str = "pil"):
    """Generate ``prompt`` with Attend-and-Excite (Ahmad's notes, §3.5.1, eq 3.27; Chefer et al.
    2023, Algorithm 1): before each of the first ``max_iter_to_alter`` guided DDIM steps, one
    gradient step ``z ← z − α_i ∇L`` on the latent (and at the threshold steps, updates until
    every subject's smoothed maximum reaches its threshold, at most ``max_refinement_steps``).

    Parameters
    ----------
    prompt : a prompt, or a list of prompts (one batch; each row is refined on its own).
    token_words : the subject words of the prompt (["circle", "square"]), or token indices
        (ints, position 0 = start token, as diffusers' ``token_indices``); a list per prompt for
        a list of prompts.
    thresholds : {step index: minimum smoothed maximum in [0, 1]} (default the paper's
        ``{0: 0.05, 10: 0.5, 20: 0.8}``); all 0 means no refinement.
    scale_factor : the step size's scale (≥ 0); α_i = scale_factor · sqrt(linspace(1, .5, N)_i).
    attention_res : the maps' resolution (default :func:`default_attention_res`).
    softmax_tokens : "prompt" (paper), "diffusers" or "none" (see the module doc).
    kernel_form : "official" or "textbook" (:func:`gaussian_kernel`).
    generator, latents : the initial latent (``latents`` (B or 1, C, h, w)), else drawn.
    output_type : "pil", "np" (B, H, W, 3 in [0, 1]) or "latent".

    Returns ``(images, trace)``; ``trace`` holds per altered step ``loss`` (B,) before the
    update, ``maxima`` (B, S), ``grad_norm`` and ``latent_norm`` (B,), ``step_size``, the
    refinement iterations ``refined`` {step: n}, ``mass`` (B, M): the mean raw attention of each
    key token at the first pass, and ``attention_res``.

    Raises ``ValueError`` naming the argument for a token word not in the prompt, thresholds
    outside [0, 1] (or a step index outside the steps), a negative ``scale_factor``, and other
    bad values.
    """
    prompts = _prompt_list(prompt)
    n = len(prompts)
    batched = not isinstance(prompt, str)
    if batched and not (isinstance(token_words, (list, tuple)) and len(token_words) == n
                        and all(isinstance(w, (list, tuple)) for w in token_words)):
        raise ValueError(f"token_words must be a list of {n} word lists (one per prompt), got "
                         f"{token_words!r}")
    token_words = token_words if batched else [token_words]
    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    thresholds = dict(AE_THRESHOLDS if thresholds is None else thresholds)
    if not isinstance(thresholds, dict):
        raise ValueError(f"thresholds must be a dict {{step: value}}, got {thresholds!r}")
    for k, v in thresholds.items():
        check_int(k, "thresholds (step index)", min=0)
        check_range(v, f"thresholds[{k}]", 0, 1)
    scale = check_range(scale_factor, "scale_factor", 0)
    max_iter = check_int(max_iter_to_alter, "max_iter_to_alter", min=0)
    max_ref = check_int(max_refinement_steps, "max_refinement_steps", min=0)
    gs = check_range(guidance_scale, "guidance_scale", 0)
    softmax_tokens = check_choice(softmax_tokens, "softmax_tokens", _SOFTMAX_TOKENS)
    output_type = check_choice(output_type, "output_type", ("pil", "np", "latent"))
    kernel = gaussian_kernel(smoothing_sigma, 3, kernel_form)
    tok = pipe.tokenizer
    subjects = _subject_indices(prompts, token_words, tok)
    n_tokens = [tokenize_prompt(p, tok)["length"] for p in prompts]
    unet = pipe.unet
    dtype, device = unet.dtype, unet.device
    x = _initial_latents(pipe, n, generator, latents, dtype, device)
    hw = tuple(x.shape[-2:])
    res = default_attention_res(unet, hw) if attention_res is None else \
        check_int(attention_res, "attention_res", min=1)
    available = attention_resolutions(unet, "cross", hw)
    if res not in available:
        raise ValueError(f"attention_res must be one of the UNet's cross-attention resolutions "
                         f"{available}, got {res}")
    f = max(hw) / res
    grid = (math.ceil(hw[0] / f), math.ceil(hw[1] / f))

    cond = encode_prompts(pipe, prompts)
    null = encode_prompts(pipe, "") if gs != 1.0 else None
    eps_model = pipe_eps_model(pipe, cond, null, gs)
    ts = pipe_timesteps(pipe, N)
    acl = pipe_alphas_cumprod(pipe).tolist()
    alphas = step_sizes(scale, N)
    names = attention_layers(unet, "cross")
    col = AttentionCollector(("cross",), active=False, layers=[
        n for n, r in zip(names, layer_resolutions(unet, "cross", hw)) if r == res])
    trace = dict(loss=[], maxima=[], grad_norm=[], latent_norm=[], step_size=alphas.tolist(),
                 refined={}, mass=None, attention_res=res, steps=[])

    def losses(z, t):
        col.maps = []
        col.active = True
        unet(z, batch_timesteps(t, z), encoder_hidden_states=cond)
        col.active = False
        if not col.maps:
            raise RuntimeError(f"no cross-attention layer at {grid}")
        A = torch.stack(col.maps).mean(0).reshape(n, *grid, -1)     # heads, then layers
        if trace["mass"] is None:
            trace["mass"] = A.detach().mean((1, 2)).cpu().double()
        mx = [max_attention_per_token(A[b], subjects[b], n_tokens[b], softmax_tokens, kernel)
              for b in range(n)]
        return torch.stack([ae_loss(m) for m in mx]), mx

    def grad_step(z, loss, rows, alpha):
        """z − α ∇L on the rows in ``rows`` with a non-zero loss (the others unchanged)."""
        use = rows & (loss.detach() != 0)
        if alpha == 0 or not bool(use.any()):
            return z.detach(), torch.zeros(n, dtype=torch.float64)
        g = torch.autograd.grad(loss[use].sum(), z)[0]
        g = g * use.to(g.dtype)[:, None, None, None]
        return (z - alpha * g).detach(), g.detach().flatten(1).norm(dim=1).cpu().double()

    col.attach(unet)
    try:
        for i, t in enumerate(ts):
            a_prev = acl[ts[i + 1]] if i + 1 < len(ts) else 1.0
            if i < max_iter or i in thresholds:
                with torch.enable_grad():
                    z = x.detach().requires_grad_(True)
                    loss, mx = losses(z, t)
                    every = torch.ones(n, dtype=torch.bool, device=loss.device)
                    if i in thresholds:
                        target = 1.0 - thresholds[i]
                        active = loss.detach() > target
                        it = 0
                        while bool(active.any()) and it < max_ref:
                            z = z.detach().requires_grad_(True)
                            loss, mx = losses(z, t)
                            z, _ = grad_step(z, loss, active, alphas[i])
                            it += 1
                            active = active & (loss.detach() > target)
                        if it:
                            trace["refined"][i] = it
                            z = z.detach().requires_grad_(True)
                            loss, mx = losses(z, t)
                    gn = torch.zeros(n, dtype=torch.float64)
                    if i < max_iter:
                        z, gn = grad_step(z, loss, every, alphas[i])
                    x = z.detach()
                trace["steps"].append(i)
                trace["loss"].append(loss.detach().cpu().double())
                trace["maxima"].append(torch.stack([m.detach() for m in mx]).cpu().double())
                trace["grad_norm"].append(gn)
                trace["latent_norm"].append(x.flatten(1).norm(dim=1).cpu().double())
            with torch.no_grad():
                eps = eps_model(x, batch_timesteps(t, x))
            x = ddim_step(x, eps, acl[t], a_prev)
    finally:
        col.active = False
        col.maps = []
        col.detach()
    return _outputs(pipe, x, output_type), trace


# ---------------------------------------------------------------------------- the chunker
#: words that start a noun phrase and are kept in it (a constituency parser's DT, PRP$, CD)
DETERMINERS = frozenset("a an the this that these those some one two three four five every "
                        "each another his her its their my our your no".split())
#: words that end a noun phrase and belong to none: conjunctions, prepositions, verbs
BOUNDARIES = frozenset(
    "and or but nor with without in on at of to from by for into onto over under above below "
    "behind beside besides between near next beneath inside outside around through across "
    "against along among upon than as while is are was were be being been has have had "
    "sits sitting stands standing lies lying holding holds wearing wears looking looks "
    "there here it which who that's".split())


def noun_phrases(prompt: str, include_determiner: bool = True) -> list[tuple[str, tuple[int, int]]]:
    """The base noun phrases of ``prompt`` by a rule-based chunker: words are split at
    punctuation, conjunctions, prepositions and common verbs (:data:`BOUNDARIES`); a determiner
    (:data:`DETERMINERS`) starts a new phrase; each remaining run of words is a phrase (its last
    word the noun, the words before it modifiers). Returns ``[(text, (start, end))]`` with word
    spans over :func:`diffnotes.attention.prompt_words` (end exclusive); with
    ``include_determiner=False`` a leading determiner is left out of the phrase.

    Enough for the shapes grammar ("a small red circle on the left and a blue square" →
    "a small red circle", "the left", "a blue square") and simple English ("A blue chair and a
    red table in a green room." → "a blue chair", "a red table", "a green room"); no parse
    tree, so nested phrases ("the cat on the mat" as one NP) are not found."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words, breaks = [], []
    for chunk in prompt.split():
        ws = prompt_words(chunk)
        if not ws:
            continue
        words += ws
        breaks += [False] * len(ws)
        if re.search(r"[,;:.!?]$", chunk):            # punctuation ends a phrase
            breaks[-1] = True
    out, cur = [], []

    def flush():
        if cur and any(words[j] not in DETERMINERS for j in cur):
            a = cur[0]
            if not include_determiner:
                while a <= cur[-1] and words[a] in DETERMINERS:
                    a += 1
            out.append((" ".join(words[a:cur[-1] + 1]), (a, cur[-1] + 1)))
        cur.clear()

    for j, w in enumerate(words):
        if w in BOUNDARIES:
            flush()
            continue
        if w in DETERMINERS and cur and any(words[k] not in DETERMINERS for k in cur):
            flush()
        cur.append(j)
        if breaks[j]:
            flush()
    flush()
    return out


def phrase_token_spans(prompt: str, tokenizer, include_determiner: bool = True
                       ) -> list[tuple[str, list[int]]]:
    """The noun phrases of :func:`noun_phrases` with their token positions in the tokenized
    prompt (start token = position 0): "A blue chair and a red table in a green room." with a
    word-level tokenizer and ``include_determiner=False`` → [2, 3], [6, 7], [10, 11]."""
    words = prompt_words(prompt)
    out = []
    for text, (a, b) in noun_phrases(prompt, include_determiner):
        target = words[a:b]
        occ = sum(1 for k in range(a) if words[k:k + len(target)] == target)
        out.append((text, word_token_indices(prompt, text, tokenizer, occurrence=occ)))
    return out


def aligned_phrase_embeddings(pipe, prompt: str, include_determiner: bool = True,
                              drop_whole: bool = False):
    """``(full, phrases, spans)``: the full prompt's embedding (1, L, D) and, for each noun
    phrase, the sequence-aligned embedding (1, L, D): the full prompt's, with the phrase's own
    encoding (its tokens without start and end) written into the phrase's positions (Feng et
    al. 2023, §3; Zhu's slides, "Sequence Alignment"). ``drop_whole``: leave out a phrase
    that is the whole prompt."""
    tok = pipe.tokenizer
    full = encode_prompts(pipe, prompt)
    spans = phrase_token_spans(prompt, tok, include_determiner)
    if drop_whole:
        spans = [(t, s) for t, s in spans if t != " ".join(prompt_words(prompt))]
    if not spans:
        return full, full[:0], []
    enc = encode_prompts(pipe, [t for t, _ in spans])
    phrases = full.expand(len(spans), -1, -1).clone()
    for r, (text, pos) in enumerate(spans):
        m = len(pos)
        phrases[r, pos] = enc[r, 1:1 + m]
    return full, phrases, spans


class StructureController(AttentionController):
    """StructureDiffusion's cross-attention (eq 3.28): for the conditional rows (prompt ``r`` of
    ``layout``), the values become (V_p + Σ_i V_i)/(k_r + 1) with V_i = W_V E_i from the
    aligned phrase embeddings ``phrases[r]`` (k_r, L, D); the keys stay the full prompt's.
    A row without phrases is untouched. The projected phrase values are computed once per layer
    (the embeddings do not change over the steps)."""

    kinds = ("cross",)

    def __init__(self, unet, phrases: Sequence[torch.Tensor], layout: BatchLayout):
        self.unet, self.phrases, self.layout = unet, list(phrases), layout
        self._cache: dict[str, list] = {}

    def wants(self, kind, height, width):
        return kind == "cross"

    def _phrase_values(self, info):
        if info.name not in self._cache:
            attn = self.unet.get_submodule(info.name)
            vals = []
            for E in self.phrases:
                if E.shape[0] == 0:
                    vals.append(None)
                    continue
                v = attn.head_to_batch_dim(attn.to_v(E.to(attn.to_v.weight.dtype)))
                vals.append((v.view(E.shape[0], attn.heads, *v.shape[1:]).sum(0), E.shape[0]))
            self._cache[info.name] = vals
        return self._cache[info.name]

    def edit_qkv(self, q, k, v, info):
        rows = self.layout.cond_rows()
        vals = self._phrase_values(info)
        v = v.clone()
        for r, pv in enumerate(vals):
            if pv is None:
                continue
            s, kr = pv
            row = rows.start + r
            v[row] = (v[row] + s) / (kr + 1)
        return q, k, v


def structure_diffusion(pipe, prompt, *, include_determiner: bool = True,
                        num_inference_steps: int = 50, guidance_scale: float = 7.5,
                        generator: torch.Generator | None = None,
                        latents: torch.Tensor | None = None, output_type: str = "pil"):
    """Generate ``prompt`` (or a list of prompts) with StructureDiffusion (Ahmad's notes,
    §3.5.2, eq 3.28; Zhu's slides, *Training-Free Structured Diffusion Guidance*; Feng et al.
    2023): noun phrases by :func:`noun_phrases`, each encoded separately and sequence-aligned
    (:func:`aligned_phrase_embeddings`), and every cross-attention layer's values averaged over
    the full prompt and the phrases (:class:`StructureController`) on the conditional rows,
    then guided DDIM steps (DDIM eq 12; Ahmad's notes, eq 1.44).

    A prompt that is one noun phrase ("a red circle") gets V_1 = V_p exactly, so the layer is
    plain cross-attention. Returns ``(images, info)`` with ``info["phrases"]``: per prompt the
    ``[(phrase, token positions)]`` used. ``output_type``: "pil", "np" or "latent"."""
    prompts = _prompt_list(prompt)
    n = len(prompts)
    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    gs = check_range(guidance_scale, "guidance_scale", 0)
    output_type = check_choice(output_type, "output_type", ("pil", "np", "latent"))
    for p in prompts:
        tokenize_prompt(p, pipe.tokenizer)
    unet = pipe.unet
    x = _initial_latents(pipe, n, generator, latents, unet.dtype, unet.device)
    fulls, phrases, spans = [], [], []
    for p in prompts:
        f, ph, sp = aligned_phrase_embeddings(pipe, p, include_determiner)
        fulls.append(f)
        phrases.append(ph)
        spans.append(sp)
    cond = torch.cat(fulls)
    use_cfg = gs != 1.0
    null = encode_prompts(pipe, "") if use_cfg else None
    eps_model = pipe_eps_model(pipe, cond, null, gs)
    ts = pipe_timesteps(pipe, N)
    acl = pipe_alphas_cumprod(pipe).tolist()
    layout = BatchLayout(n, use_cfg)
    ctrl = StructureController(unet, phrases, layout)
    store = AttentionStore(kinds=("cross",), rows="cond" if use_cfg else "all",
                           controller=ctrl, layout=layout)
    store.attach(unet)
    try:
        for i, t in enumerate(ts):
            a_prev = acl[ts[i + 1]] if i + 1 < len(ts) else 1.0
            with torch.no_grad():
                eps = eps_model(x, batch_timesteps(t, x))
            x = ddim_step(x, eps, acl[t], a_prev)
    finally:
        store.detach()
    return _outputs(pipe, x, output_type), dict(phrases=spans, store=store)
