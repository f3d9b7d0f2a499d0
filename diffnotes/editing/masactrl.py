"""MasaCtrl (Cao et al. 2023): mutual self-attention control, with and without masks.

Key-value injection (Ahmad's notes, §3.2.3, eq 3.6): in a self-attention layer the target's
queries attend to a reference image's keys and values,

    KVInject(Q_t, K_s, V_s) = softmax(Q_t K_s^T / sqrt d) V_s,       Q_t = W_Q f_t, K_s = W_K f_s,

so the target keeps asking "where" with its own features but reads "what" from the source.
MasaCtrl (Ahmad's notes, eq 3.7) turns self-attention into this *mutual* self-attention for the
target from denoising step S on (``start_step``, counted from 0; the official code's
``step in range(S, 50)``, i.e. ``>=`` where the notes print ``>``) and on the self-attention
layers with index ``>= start_layer`` in forward order
(:func:`diffnotes.attention.attention_layers`). Only the self-attention layers at the resolutions of
the controlled layers go through the library's recording processor (:func:`layer_resolutions`);
the others keep their original (fused) processor.

Layer rule (the library's, documented): the control acts on **the last ⌊3·count/8⌋ self-attention
layers** (at least one), i.e. ``start_layer = count − max(1, ⌊3·count/8⌋)``. On Stable Diffusion's
16 self-attention layers this is 10 (``up_blocks.2`` and ``up_blocks.3``, the 32² and 64² decoder
layers: MasaCtrl's published ``start_layer=10``); on the shapes model's 7 layers it is 5 (the two
16×16 decoder layers ``up_blocks.1``, again the highest-resolution decoder block).

Mask-guided variant (MasaCtrl §3.3, official ``MutualSelfAttentionControlMask``): a source mask
M_s and a target mask M_t (the object). The notes' eqs 3.8-3.10 multiply one and the same
attention output by M and by 1 − M and add the two, which collapses to the unmasked result
(``A V M + A V (1 − M) = A V``; see :func:`printed_masked_attention` and the errata). The
corrected equations restrict the *keys* with the source mask and blend the two outputs with the
*target* mask:

    f_fg = softmax(Q K_s^T/sqrt d + log M_s) V_s        (foreground queries read foreground keys)
    f_bg = softmax(Q K_s^T/sqrt d + log(1 − M_s)) V_s   (background reads background)
    f    = M_t ⊙ f_fg + (1 − M_t) ⊙ f_bg

(:func:`masked_mutual_attention_blend`). With binary masks this equals one softmax with the
logit bias 0 where M_t(i) = M_s(j) and −∞ elsewhere (:func:`mask_logit_bias`,
:func:`masked_mutual_attention`), which is what the controller does through the ``edit_scores``
hook (a query whose side has no key in the source keeps all keys). Masks are either given (two
(h, w) arrays at the latent resolution, 1 = object) or found from the cross-attention maps of an
object word in each prompt (MasaCtrl's "Auto" variant: the maps of the cross-attention layers at
the UNet's attention resolution closest to a quarter of the latent side — SD: 16 of 64, the official
code's 16×16 — summed
over the steps so far, min-max normalised and thresholded at ``mask_threshold`` = 0.1).

Batch and outputs follow :func:`diffnotes.editing.p2p.prompt_to_prompt`: source and target run as
ONE classifier-free-guidance batch ``[src_u, tgt_u, src_c, tgt_c]`` from the same initial latent
(the inverted z_T for a real image: ``latents=`` from
:func:`diffnotes.editing.inversion.ddim_invert_image`); in each half the target row reads the
source row's K and V (as the official code does for the unconditional and conditional halves).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..attention import (AttentionController, AttentionStore, BatchLayout, attention_layers,
                         attention_resolutions, layer_resolutions, tokenize_prompt,
                         word_token_indices)
from ..ddim import ddim_step
from ..utils import batch_timesteps, check_int, check_range, check_tensor
from .common import (edit_outputs, encode_prompts, pipe_alphas_cumprod, pipe_eps_model,
                     pipe_timesteps)

__all__ = ["mutual_self_attention", "MasaCtrlController", "default_start_layer",
           "kv_injection", "mask_logit_bias", "masked_mutual_attention",
           "masked_mutual_attention_blend", "printed_masked_attention", "resize_mask",
           "mask_resolution"]


# ---------------------------------------------------------------------------- the equations
def kv_injection(q: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor,
                 scale: float | None = None) -> torch.Tensor:
    """softmax(Q K_ref^T · scale) V_ref (Ahmad's notes, eq 3.6; MasaCtrl eq 4): (..., N_q, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k_ref.transpose(-1, -2) * scale, dim=-1) @ v_ref


def mask_logit_bias(mask_s: torch.Tensor, mask_t: torch.Tensor) -> torch.Tensor:
    """The logit bias (N_t, N_s) of the corrected masked mutual attention for binary masks
    (flattened, 1 = object): 0 where query i and key j lie on the same side (M_t(i) = M_s(j)),
    −∞ elsewhere; a query whose side has no key in the source gets 0 for every key (it reads
    all keys, instead of a softmax over nothing)."""
    ms, mt = mask_s.reshape(-1) > 0.5, mask_t.reshape(-1) > 0.5
    allowed = mt[:, None] == ms[None, :]
    allowed |= ~allowed.any(-1, keepdim=True)
    bias = torch.zeros(allowed.shape, dtype=torch.float64, device=allowed.device)
    return bias.masked_fill(~allowed, float("-inf"))


def masked_mutual_attention(q, k_s, v_s, mask_s, mask_t, scale: float | None = None):
    """Corrected masked mutual self-attention as one softmax: softmax(Q K_s^T·scale + B) V_s with
    B = :func:`mask_logit_bias` (equal to :func:`masked_mutual_attention_blend` for binary
    masks)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k_s.transpose(-1, -2) * scale + mask_logit_bias(mask_s, mask_t).to(q.dtype)
    return torch.softmax(s, dim=-1) @ v_s


def masked_mutual_attention_blend(q, k_s, v_s, mask_s, mask_t, scale: float | None = None):
    """The corrected equations in MasaCtrl's own form (official ``MutualSelfAttentionControlMask``):
    f_fg = softmax(S + log M_s) V_s, f_bg = softmax(S + log(1 − M_s)) V_s, f = M_t f_fg +
    (1 − M_t) f_bg (the correction of Ahmad's notes, eqs 3.8-3.10). Masks flattened (N,)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k_s.transpose(-1, -2) * scale
    ms = (mask_s.reshape(-1) > 0.5).to(s.device)
    mt = mask_t.reshape(-1, 1).to(s.dtype).to(s.device)
    f_fg = torch.softmax(s.masked_fill(~ms, float("-inf")), -1) @ v_s
    f_bg = torch.softmax(s.masked_fill(ms, float("-inf")), -1) @ v_s
    return f_fg * mt + f_bg * (1 - mt)


def printed_masked_attention(q, k_s, v_s, mask, scale: float | None = None):
    """Ahmad's notes, eqs 3.8-3.10 as printed: f_fg = softmax(Q K_s^T/sqrt d) V_s · M, f_bg =
    softmax(Q K_s^T/sqrt d) V_s · (1 − M), f = f_bg + f_fg. It equals the unmasked
    :func:`kv_injection` (the erratum): kept only to show the collapse."""
    a = kv_injection(q, k_s, v_s, scale)
    m = mask.reshape(-1, 1).to(a.dtype)
    return a * m + a * (1 - m)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A binary (h, w) mask at another grid ``size``: area average then > 0.5 when shrinking,
    nearest when growing (the official code resizes with nearest)."""
    m = mask.reshape(1, 1, *mask.shape[-2:]).double()
    if tuple(size) == tuple(m.shape[-2:]):
        return (m[0, 0] > 0.5).double()
    mode = "area" if size[0] <= m.shape[-2] and size[1] <= m.shape[-1] else "nearest"
    return (F.interpolate(m, size=tuple(size), mode=mode)[0, 0] > 0.5).double()


def default_start_layer(count: int) -> int:
    """MasaCtrl's layer rule: ``count − max(1, ⌊3·count/8⌋)`` (the last 3/8 of the self-attention
    layers in forward order; 10 of Stable Diffusion's 16, 5 of the shapes model's 7)."""
    return count - max(1, (3 * count) // 8)


def mask_resolution(unet, latent_hw) -> int:
    """The resolution of the cross-attention layers the automatic masks are read from: the UNet's
    attention resolution closest to a quarter of the latent side, ties to the larger (SD 1.5: 16
    of 64, MasaCtrl's 16×16 maps; the shapes model: 8 of 16)."""
    res = attention_resolutions(unet, "self", latent_hw)        # largest first
    goal = max(latent_hw) / 4
    return min(res, key=lambda r: (abs(r - goal), -r))


# ---------------------------------------------------------------------------- the controller
class MasaCtrlController(AttentionController):
    """Mutual self-attention for a batch laid out as ``layout`` (prompt 0 the source, prompt 1
    the target): at steps ``>= start_step`` on self-attention layers with index ``>= start_layer``
    the target rows (both guidance halves) take the source row's K and V (``edit_qkv``); with
    masks, the logits of the target rows get :func:`mask_logit_bias` (``edit_scores``).

    ``masks``: None, a pair of binary (h, w) tensors ``(M_s, M_t)``, or ``"auto"`` with
    ``mask_tokens = (source token indices, target token indices)``: the masks are then made from
    the cross-attention maps of those tokens (conditional rows, heads and tokens averaged) at the
    layers of resolution ``mask_res``, summed over the steps before the current one. Before any
    map has been seen (step 0) the control runs unmasked. ``self.masks`` holds the last masks.
    """

    def __init__(self, layout: BatchLayout, start_step: int, start_layer: int, masks=None,
                 mask_tokens=None, mask_res: int | None = None, mask_threshold: float = 0.1,
                 self_res: set | None = None):
        self.layout = layout
        self.self_res = self_res   # resolutions of the controlled layers (None: all)
        self.start_step, self.start_layer = start_step, start_layer
        self.auto = isinstance(masks, str) and masks == "auto"
        self.given = None if (masks is None or self.auto) else tuple(masks)
        self.kinds = ("self", "cross") if self.auto else ("self",)
        self.mask_tokens, self.mask_res, self.mask_threshold = mask_tokens, mask_res, mask_threshold
        self._done = None           # summed maps of the finished steps (2, h, w)
        self._cur = None            # of the current step
        self._cur_step = -1
        self._cache: dict = {}
        self.masks = self.given
        # without masks only the keys and values change: the attention itself stays fused
        self.hooks = (("edit_qkv", "edit_scores", "edit") if (self.auto or self.given is not None)
                      else ("edit_qkv",))

    # -- which rows
    def _pairs(self):
        """(source row, target row) in each guidance half."""
        n = self.layout.n_prompts
        halves = [0, n] if self.layout.cfg else [0]
        return [(h, h + 1) for h in halves]

    def active(self, info) -> bool:
        return info.kind == "self" and info.step >= self.start_step \
            and info.index >= self.start_layer

    def wants(self, kind, height, width):
        if kind == "cross":
            return self.auto and max(height, width) == self.mask_res
        return self.self_res is None or max(height, width) in self.self_res

    def edit_qkv(self, q, k, v, info):
        if not self.active(info):
            return q, k, v
        k, v = k.clone(), v.clone()
        for s, t in self._pairs():
            k[t], v[t] = k[s], v[s]                     # the target reads K_s, V_s (eq 3.6)
        return q, k, v

    # -- masks
    def _advance(self, step: int) -> None:
        if step != self._cur_step:
            if self._cur is not None:
                self._done = self._cur if self._done is None else self._done + self._cur
            self._cur, self._cur_step, self._cache = None, step, {}

    def _layer_masks(self, info):
        key = (info.height, info.width)
        if key in self._cache:
            return self._cache[key]
        out = None
        if self.given is not None:
            out = tuple(resize_mask(m, key) for m in self.given)
        elif self.auto and self._done is not None:
            ms = []
            for m in self._done:
                lo, hi = m.min(), m.max()
                m = (m - lo) / (hi - lo) if float(hi - lo) > 1e-12 else torch.zeros_like(m)
                ms.append((m > self.mask_threshold).double())
            self.masks = tuple(ms)
            out = tuple(resize_mask(m, key) for m in ms)
        self._cache[key] = out
        return out

    def edit_scores(self, s, info):
        if not self.active(info) or (self.given is None and not self.auto):
            return s
        self._advance(info.step)
        masks = self._layer_masks(info)
        if masks is None:
            return s
        bias = mask_logit_bias(*masks).to(s.device, s.dtype)
        for _, t in self._pairs():
            s[t] = s[t] + bias
        return s

    def edit(self, probs, info):
        if info.kind != "cross" or not self.auto:
            return probs
        self._advance(info.step)
        rows = self.layout.cond_rows()
        p = probs[rows]                                 # (n, heads, q, M)
        maps = torch.stack([p[r, :, :, self.mask_tokens[r]].mean((0, 2)) for r in (0, 1)])
        maps = maps.reshape(2, info.height, info.width).double()
        self._cur = maps if self._cur is None else self._cur + maps
        return probs


# ---------------------------------------------------------------------------- shared sampler
def _initial_latent(pipe, latents, generator):
    unet = pipe.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if latents is None:
        x_T = torch.randn((1, *shape), generator=generator, dtype=unet.dtype,
                          device=generator.device if generator is not None else unet.device)
        return x_T * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    check_tensor(latents, "latents", ndim=(3, 4))
    x_T = latents if latents.ndim == 4 else latents.unsqueeze(0)
    if x_T.shape[0] != 1 or x_T.shape[1] != shape[0]:
        raise ValueError(f"latents must have shape (1, {shape[0]}, h, w) or ({shape[0]}, h, w), "
                         f"got {tuple(latents.shape)}")
    return x_T


def _pair_sample(pipe, prompts: Sequence[str], ctrl, x_T, N: int, gs: float, hooks=(),
                 return_trajectory: bool = False):
    """DDIM (Ahmad's notes, eq 1.21; DDIM eq 12) of ``prompts`` as one guided batch from x_T with
    ``ctrl`` attached (the batch layout of :func:`diffnotes.editing.p2p.prompt_to_prompt`).
    ``hooks``: callables ``f(store) -> handle`` installed for the run (removed after)."""
    unet = pipe.unet
    n = len(prompts)
    use_cfg = gs != 1.0
    unique = list(dict.fromkeys(prompts))          # equal prompts: bitwise equal embeddings
    cond = encode_prompts(pipe, unique)[[unique.index(p) for p in prompts]]
    null = encode_prompts(pipe, "") if use_cfg else None
    ts = pipe_timesteps(pipe, N)
    acl = pipe_alphas_cumprod(pipe).tolist()
    x = x_T.to(unet.device, unet.dtype).expand(n, -1, -1, -1).clone()
    eps_model = pipe_eps_model(pipe, cond, null, gs)
    store = AttentionStore(kinds=("self",), self_max_res=1, controller=ctrl, layout=ctrl.layout)
    store.attach(unet)
    handles = [h(store) for h in hooks]
    traj = [x]
    try:
        for i, t in enumerate(ts):
            a_prev = acl[ts[i + 1]] if i + 1 < len(ts) else 1.0
            with torch.no_grad():
                eps = eps_model(x, batch_timesteps(t, x))
            x = ddim_step(x, eps, acl[t], a_prev)
            if return_trajectory:
                traj.append(x)
    finally:
        for h in handles:
            h.remove()
        store.detach()
    return x, (traj if return_trajectory else None)


def _finish(pipe, x, traj, output_type, return_latents, return_trajectory):
    if output_type == "latent":
        images = x
    else:
        from .inversion import decode_latents
        imgs = decode_latents(pipe, x).permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            images = imgs
        else:
            from PIL import Image
            images = [Image.fromarray((a * 255).round().astype("uint8")) for a in imgs]
    return edit_outputs(images, x, traj, return_latents, return_trajectory)


def _check_output_type(output_type):
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")


def _check_prompt(p, name):
    if not isinstance(p, str):
        raise ValueError(f"{name} must be a str, got {type(p).__name__}")
    return p


def _check_masks(masks, hw, source_prompt, target_prompt, tokenizer):
    """(kind, given masks or None, token indices or None)."""
    if masks is None:
        return None, None
    if isinstance(masks, (tuple, list)) and len(masks) == 2 and all(isinstance(m, str)
                                                                    for m in masks):
        try:
            src = word_token_indices(source_prompt, masks[0], tokenizer)
        except ValueError as e:
            raise ValueError(f"masks: {e}") from None
        try:
            tgt = word_token_indices(target_prompt, masks[1], tokenizer)
        except ValueError as e:
            raise ValueError(f"masks: {e}") from None
        return "auto", (src, tgt)
    if not (isinstance(masks, (tuple, list)) and len(masks) == 2):
        raise ValueError(f"masks must be None, a pair of (h, w) masks (source, target) or a pair "
                         f"of words (source word, target word), got {type(masks).__name__}")
    out = []
    for name, m in zip(("masks[0]", "masks[1]"), masks):
        m = torch.as_tensor(m)
        if m.ndim == 4 and m.shape[:2] == (1, 1):
            m = m[0, 0]
        if tuple(m.shape) != tuple(hw):
            raise ValueError(f"{name} must have the latent's shape {tuple(hw)}, got "
                             f"{tuple(m.shape)}")
        m = m.double()
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError(f"{name} must be binary (0 = background, 1 = object)")
        out.append(m)
    return tuple(out), None


def mutual_self_attention(pipe, source_prompt: str, target_prompt: str, *, start_step: int = 4,
                          start_layer: int | None = None, masks=None,
                          num_inference_steps: int = 50, guidance_scale: float = 7.5,
                          latents: torch.Tensor | None = None,
                          generator: torch.Generator | None = None, output_type: str = "pil",
                          mask_threshold: float = 0.1, return_latents: bool = False,
                          return_trajectory: bool = False):
    """Generate ``source_prompt`` and its MasaCtrl edit ``target_prompt`` in one batch from the
    same initial latent (MasaCtrl Algorithm 1; Ahmad's notes, §3.2.3, eqs 3.6-3.7 with the
    corrected eqs 3.8-3.10), by DDIM steps on the guided ε (Ahmad's notes, eq 1.44).

    Parameters
    ----------
    start_step : S, the first denoising step (0-based) with mutual self-attention, in
        [0, num_inference_steps] (= num_inference_steps: never, plain sampling). MasaCtrl: 4 of 50.
    start_layer : L, the first self-attention layer (forward order) with mutual self-attention,
        in [0, count] (count: never); default :func:`default_start_layer` (10 of SD's 16).
    masks : None (unmasked); a pair ``(M_s, M_t)`` of binary (h, w) tensors at the latent
        resolution (1 = object); or a pair of words ``(source word, target word)``: masks from the
        cross-attention maps of those words (MasaCtrl's automatic masks, ``mask_threshold``).
    latents, generator : the initial latent z_T (e.g. ``ddim_invert_image(pipe, image,
        source_prompt, N)[-1]`` for a real image), else drawn from ``generator``.
    output_type : "pil" (a list [source, target] of images), "np" ((2, H, W, 3) array in [0, 1])
        or "latent" ((2, C, h, w)).
    return_latents / return_trajectory : also return the final latents / the list of latents
        (as :func:`diffnotes.editing.common.edit_outputs`).

    Raises ``ValueError`` naming the argument for ``start_step`` or ``start_layer`` out of
    range, masks of the wrong shape (or not binary), a mask word not in its prompt, a wrong
    latent shape or ``output_type``.
    """
    _check_prompt(source_prompt, "source_prompt")
    _check_prompt(target_prompt, "target_prompt")
    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    gs = check_range(guidance_scale, "guidance_scale")
    S = check_int(start_step, "start_step", min=0)
    if S > N:
        raise ValueError(f"start_step must lie in [0, num_inference_steps={N}], got {S}")
    count = len(attention_layers(pipe.unet, "self"))
    if start_layer is None:
        start_layer = default_start_layer(count)
    L = check_int(start_layer, "start_layer", min=0)
    if L > count:
        raise ValueError(f"start_layer must lie in [0, {count}] (the UNet has {count} "
                         f"self-attention layers), got {L}")
    check_range(mask_threshold, "mask_threshold", 0, 1)
    _check_output_type(output_type)
    tok = pipe.tokenizer
    for p in (source_prompt, target_prompt):
        tokenize_prompt(p, tok)
    x_T = _initial_latent(pipe, latents, generator)
    hw = tuple(x_T.shape[-2:])
    given, tokens = _check_masks(masks, hw, source_prompt, target_prompt, tok)
    layout = BatchLayout(2, gs != 1.0)
    res = layer_resolutions(pipe.unet, "self", hw)
    ctrl = MasaCtrlController(layout, S, L, masks=given, mask_tokens=tokens,
                              mask_res=mask_resolution(pipe.unet, hw),
                              mask_threshold=mask_threshold,
                              self_res=set(res[L:]) if S < N else set())
    x, traj = _pair_sample(pipe, [source_prompt, target_prompt], ctrl, x_T, N, gs,
                           return_trajectory=return_trajectory)
    return _finish(pipe, x, traj, output_type, return_latents, return_trajectory)
