"""Plug-and-Play diffusion features (Tumanyan et al. 2023): text-driven image-to-image
translation by injecting the guidance image's decoder features and self-attention.

Ahmad's notes, §3.4.1 and Algorithm 4 (the same algorithm is Zhu's slides, *Plug-and-Play
Diffusion Features for Text-Driven Image-to-Image Translation*, Algorithm 1): invert the guidance
image I^G by DDIM (eq 3.22; Ahmad's notes, eq 1.26), x*_T = x^G_T, and at every step t

    z^G, f^4_t, {A^l_t} = ε_θ(x^G_t, ∅, t);  x^G_{t-1} = DDIM-samp(x^G_t, z^G)          (3.23)
    z*  = ε̂_θ(x*_t, P, t; f^4_t if t > τ_f, {A^l_t} if t > τ_A)                           (3.26)
    x*_{t-1} = DDIM-samp(x*_t, z*)

Choices of this implementation (documented, with the official ``pnp-diffusers`` values):

* **One batch.** The guidance branch runs in the same UNet call as the target: the guided batch
  ``[g_u, t_u, g_c, t_c]`` of :func:`diffnotes.editing.masactrl.mutual_self_attention` with the
  guidance prompt ``source_prompt`` (default ``""``, Algorithm 4's ∅). With ``source_prompt=""``
  the guidance row's guided ε is ε_θ(x^G_t, ∅, t) exactly (its two halves are bitwise equal), so
  the guidance trajectory is Algorithm 4's line 3 — it re-denoises x^G_T (the official code loads
  the stored inversion latents instead; with an exact inversion the two agree).
* **Features** (f^4_t): the residual-branch output of one decoder ResNet — a torch forward hook
  on its ``conv2`` (the output before the shortcut is added, as the official code injects it),
  during the first ``feature_steps`` fraction of the steps (``⌊τ_f N⌋`` steps; official
  ``pnp_f_t = 0.8``). Rule: **the decoder ResNet at position ⌊n/3⌋ of the n decoder ResNets in
  forward order** (SD 1.5: 4 of 12 = ``up_blocks[1].resnets[1]``, the paper's layer 4; the shapes
  model: 1 of 4 = ``up_blocks[0].resnets[1]``, at the lowest decoder resolution).
* **Self-attention** ({A^l_t}): the target's queries and keys are replaced by the guidance row's
  (so its attention matrix is A^G while it keeps its own values), through the controller's
  ``edit_qkv`` hook, during the first ``attention_steps`` fraction (official ``pnp_attn_t =
  0.5``), on **the last half of the self-attention layers** in forward order (``index >= count −
  ⌊count/2⌋``; SD 1.5: 8 of 16 = ``up_blocks[1].attentions[1, 2]``, ``up_blocks[2]``,
  ``up_blocks[3]``, the official layers; the shapes model: 4-6 of 7).
* Both guidance halves of the target are injected from the matching half of the guidance row
  (the official code injects its single ∅ row into both).
"""
from __future__ import annotations

from ..attention import (AttentionController, BatchLayout, attention_layers, layer_resolutions,
                         tokenize_prompt)
from ..utils import check_int, check_range, check_tensor
from .common import fraction_steps
from .masactrl import _check_output_type, _check_prompt, _finish, _pair_sample

__all__ = ["plug_and_play", "PnPController", "decoder_resnets", "default_feature_layer",
           "default_attention_layer", "injection_steps"]


def decoder_resnets(unet) -> list[str]:
    """Module paths of the UNet's decoder ResNets in forward order (``up_blocks.b.resnets.r``)."""
    return [f"up_blocks.{b}.resnets.{r}" for b, ub in enumerate(unet.up_blocks)
            for r in range(len(ub.resnets))]


def default_feature_layer(unet) -> str:
    """PnP's feature layer by rule: the decoder ResNet at position ⌊n/3⌋ of n (SD: 4 of 12 =
    ``up_blocks.1.resnets.1``)."""
    names = decoder_resnets(unet)
    return names[len(names) // 3]


def default_attention_layer(count: int) -> int:
    """PnP's first injected self-attention layer: ``count − ⌊count/2⌋`` (the last half; SD: 8)."""
    return count - count // 2


def injection_steps(fraction, num_steps: int, name: str) -> int:
    """⌊fraction · N⌋ (the first steps injected), for a fraction in [0, 1] (official
    ``int(n_timesteps * pnp_f_t)``)."""
    return fraction_steps(check_range(fraction, name, 0, 1), num_steps)


class PnPController(AttentionController):
    """Self-attention injection of Plug-and-Play for the batch ``layout`` (prompt 0 the guidance
    branch, prompt 1 the target): at steps ``< attention_steps`` on self-attention layers with
    index ``>= start_layer`` the target rows take the guidance row's queries and keys."""

    kinds = ("self",)

    def __init__(self, layout: BatchLayout, attention_steps: int, start_layer: int,
                 self_res: set | None = None):
        self.layout, self.attention_steps, self.start_layer = layout, attention_steps, start_layer
        self.self_res = self_res   # resolutions of the injected layers (None: all)

    def pairs(self):
        n = self.layout.n_prompts
        return [(h, h + 1) for h in ([0, n] if self.layout.cfg else [0])]

    def wants(self, kind, height, width):
        return kind == "self" and self.attention_steps > 0 and (
            self.self_res is None or max(height, width) in self.self_res)

    def edit_qkv(self, q, k, v, info):
        if info.step >= self.attention_steps or info.index < self.start_layer:
            return q, k, v
        q, k = q.clone(), k.clone()
        for g, t in self.pairs():
            q[t], k[t] = q[g], k[g]                # A*_t = softmax(Q_G K_G^T / sqrt d)
        return q, k, v


def _feature_hook(module, pairs, n_steps: int):
    """``f(store) -> handle``: a forward hook on ``module`` replacing the target rows of its
    output by the guidance rows' while ``store.step < n_steps``."""
    def install(store):
        def hook(mod, inputs, out):
            if store.step < n_steps:
                out = out.clone()
                for g, t in pairs:
                    out[t] = out[g]
                return out
            return None
        return module.register_forward_hook(hook)
    return install


def _resolve_feature_layer(unet, feature_layer) -> str:
    names = decoder_resnets(unet)
    if feature_layer is None:
        return default_feature_layer(unet)
    if isinstance(feature_layer, str):
        if feature_layer not in names:
            raise ValueError(f"feature_layer must be one of the decoder ResNets {names}, got "
                             f"{feature_layer!r}")
        return feature_layer
    i = check_int(feature_layer, "feature_layer", min=0)
    if i >= len(names):
        raise ValueError(f"feature_layer must lie in [0, {len(names) - 1}] (the UNet has "
                         f"{len(names)} decoder ResNets), got {i}")
    return names[i]


def plug_and_play(pipe, image_or_latents, target_prompt: str, *, feature_layer=None,
                  feature_steps=0.8, attention_steps=0.5, source_prompt: str = "",
                  num_inference_steps: int = 50, guidance_scale: float = 7.5,
                  attention_layer: int | None = None, invert: bool = True,
                  output_type: str = "pil", return_latents: bool = False,
                  return_trajectory: bool = False):
    """Translate a guidance image to ``target_prompt`` with Plug-and-Play feature and
    self-attention injection (Tumanyan et al. 2023, Algorithm 1; Ahmad's notes, Algorithm 4,
    eqs 3.22-3.26; Zhu's slides, *Plug-and-Play Diffusion Features ...*).

    Parameters
    ----------
    image_or_latents : the guidance image I^G (PIL, HWC array or (3, H, W) tensor in [0, 1], at
        the model's image size) or its clean latent z_0 (1, C, h, w); inverted by DDIM under
        ``source_prompt`` (:func:`diffnotes.editing.inversion.ddim_invert_image`). With
        ``invert=False`` it is taken as x^G_T itself (a latent (1, C, h, w)).
    feature_layer : the decoder ResNet whose residual features are injected: None (the rule of
        :func:`default_feature_layer`), an index into :func:`decoder_resnets`, or its name.
    feature_steps, attention_steps : τ_f and τ_A as the fraction in [0, 1] of the FIRST steps
        with feature / self-attention injection (0: never).
    attention_layer : the first self-attention layer (forward order) injected; default
        :func:`default_attention_layer` (the last half), in [0, count].
    source_prompt : the guidance branch's prompt (Algorithm 4's ∅ = ``""``).
    output_type : "pil" ([guidance reconstruction, translation]), "np" or "latent".

    Raises ``ValueError`` naming the argument for fractions outside [0, 1], an unknown or
    out-of-range ``feature_layer`` / ``attention_layer``, a latent of the wrong shape.
    """
    _check_prompt(target_prompt, "target_prompt")
    _check_prompt(source_prompt, "source_prompt")
    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    gs = check_range(guidance_scale, "guidance_scale")
    n_feat = injection_steps(feature_steps, N, "feature_steps")
    n_attn = injection_steps(attention_steps, N, "attention_steps")
    unet = pipe.unet
    layer = _resolve_feature_layer(unet, feature_layer)
    count = len(attention_layers(unet, "self"))
    if attention_layer is None:
        attention_layer = default_attention_layer(count)
    A = check_int(attention_layer, "attention_layer", min=0)
    if A > count:
        raise ValueError(f"attention_layer must lie in [0, {count}] (the UNet has {count} "
                         f"self-attention layers), got {A}")
    _check_output_type(output_type)
    for p in (source_prompt, target_prompt):
        tokenize_prompt(p, pipe.tokenizer)
    if invert:
        from .inversion import ddim_invert_image
        x_T = ddim_invert_image(pipe, image_or_latents, source_prompt, N)[-1]
    else:
        check_tensor(image_or_latents, "image_or_latents", ndim=4)
        x_T = image_or_latents
    C = unet.config.in_channels
    if x_T.ndim != 4 or x_T.shape[0] != 1 or x_T.shape[1] != C:
        raise ValueError(f"image_or_latents must give a latent of shape (1, {C}, h, w), got "
                         f"{tuple(x_T.shape)}")
    layout = BatchLayout(2, gs != 1.0)
    res = layer_resolutions(unet, "self", tuple(x_T.shape[-2:]))
    ctrl = PnPController(layout, n_attn, A, set(res[A:]))
    hooks = []
    if n_feat > 0:
        conv2 = unet.get_submodule(layer).conv2
        hooks.append(_feature_hook(conv2, ctrl.pairs(), n_feat))
    x, traj = _pair_sample(pipe, [source_prompt, target_prompt], ctrl, x_T, N, gs, hooks,
                           return_trajectory=return_trajectory)
    return _finish(pipe, x, traj, output_type, return_latents, return_trajectory)
