"""Extended Textual Inversion (XTI) in the P+ space: one embedding of the new word per
cross-attention layer (Ahmad's notes, §4.4.2, eq 4.4; Voynov et al. 2023, "P+: Extended Textual
Conditioning in Text-to-Image Generation", eq 2).

Plain conditioning hands every cross-attention layer the same text embedding ``c = τ(y)``
(Ahmad's notes, eqs 1.46–1.48). P+ hands layer ``l`` its own ``c_l = τ(y_l)``, where ``y_l`` is
the *whole* prompt in which only the new word's token differs: its embedding row is ``e_l``. XTI
learns ``e_1 … e_n`` (``n`` = the UNet's number of cross-attention layers, counted by
:func:`diffnotes.attention.attention_layers`: 16 on Stable Diffusion 1.5, 7 on the shipped shapes
UNet) with the denoising loss

    L_XTI = E ‖ε − ε_θ(z_t, t, c_1, …, c_n)‖²                       (Ahmad's notes, eq 4.4)

Every layer still sees the full prompt: the notes' reading that "p_2 = 'red' goes to the first
layer, p_3 = 'cat' to the second" is not the method (erratum). As in the official code, the
``n`` embeddings are ``n`` new tokens ``<p>``, ``<p>_1``, … of the tokenizer (rows of the
text encoder's table), and layer ``l``'s prompt uses token ``l``.

Per-layer conditioning is applied by :class:`PerLayerConditioning`, an
:class:`~diffnotes.attention.AttentionController` whose ``edit_qkv`` hook recomputes a cross-
attention layer's keys and values ``K = W_K c_l``, ``V = W_V c_l`` from that layer's own
conditioning (on the prompt rows only; the unconditional rows of a guidance batch keep the null
text). With every ``c_l = c`` the UNet's output is bitwise its ordinary output (tested).

- :func:`layer_conditioning` encodes a list of per-layer prompts; :func:`per_layer_unet` and
  :func:`sample_per_layer` run the UNet / the pipeline with it;
- :func:`mix_plus` is P+ style mixing (layers ``< k`` from A, the rest from B);
- :func:`extended_textual_inversion` trains the per-layer embeddings;
- :func:`coarse_fine_experiment` is the source's "red cube / green lizard" experiment on the
  shapes model ("red square" into one subset of layers, "green circle" into the other).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..attention import AttentionController, AttentionStore, attention_layers, layer_resolutions
from ..utils import check_int, check_positive
from .common import (ConceptSet, add_placeholder, diffusion_loss, encode_images, freeze,
                     tensor_bytes, train_loop)

__all__ = ["PerLayerConditioning", "cross_layers", "coarse_fine_split", "layer_conditioning",
           "per_layer_unet", "sample_per_layer", "mix_plus", "PlusEmbedding",
           "extended_textual_inversion", "coarse_fine_experiment", "EVAL_CONFIGS"]


def cross_layers(unet) -> list[str]:
    """The UNet's cross-attention layers in forward order (the ``n`` of P+): 16 on SD 1.5."""
    names = attention_layers(unet, "cross")
    if not names:
        raise ValueError("unet has no cross-attention layer; P+ needs text cross-attention")
    return names


def coarse_fine_split(unet, latent_hw=None) -> tuple[list[int], list[int]]:
    """Layer indices (into :func:`cross_layers`) of the *coarse* layers (the lowest query
    resolutions: every layer whose side is below the highest) and the *fine* ones (the highest
    resolution). On the shapes UNet (16, 8, 8, 8, 8, 16, 16): coarse = the five 8×8 layers, fine
    = the two 16×16 ones. On SD 1.5 (64², 32², 16², 8²): coarse = the 8² and 16² layers, fine =
    32² and 64² (the split of P+'s Fig. 3 is by resolution, as here)."""
    res = layer_resolutions(unet, "cross", latent_hw)
    levels = sorted(set(res))
    if len(levels) == 1:
        raise ValueError("the UNet has cross-attention at one resolution only; no coarse/fine "
                         "split")
    cut = levels[len(levels) // 2]          # SD: {8,16} coarse, {32,64} fine; shapes: {8}|{16}
    coarse = [i for i, r in enumerate(res) if r < cut]
    fine = [i for i, r in enumerate(res) if r >= cut]
    return coarse, fine


class PerLayerConditioning(AttentionController):
    """Controller that gives each cross-attention layer its own text conditioning (P+).

    ``layer_cond``: ``{layer name: (n, L, D) tensor}`` for some or all layers of
    :func:`cross_layers` (missing layers keep the UNet's ``encoder_hidden_states``). In each
    listed layer, ``edit_qkv`` recomputes ``K = W_K c_l`` and ``V = W_V c_l`` (Ahmad's notes, eq
    1.48) with the layer's own projections. Rows: if the UNet batch has ``n`` rows all are
    replaced; with ``2n`` rows (classifier-free guidance, ``cat([uncond, cond])``) only the
    second half (the prompt rows). Gradients flow to ``c_l``.
    Raises ``ValueError`` naming ``layer_cond`` for an unknown layer or mismatched shapes.
    """

    kinds = ("cross",)
    hooks = ("edit_qkv",)

    def __init__(self, unet, layer_cond: dict):
        names = set(cross_layers(unet))
        if not isinstance(layer_cond, dict) or not layer_cond:
            raise ValueError(f"layer_cond must be a non-empty dict {{layer name: (n, L, D)}}, "
                             f"got {type(layer_cond).__name__}")
        bad = [k for k in layer_cond if k not in names]
        if bad:
            raise ValueError(f"layer_cond has unknown layers {bad[:3]}; expected names of "
                             f"attention_layers(unet, 'cross')")
        shapes = {tuple(v.shape) for v in layer_cond.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"layer_cond tensors must all have one shape (n, L, D), got {shapes}")
        self.layer_cond = layer_cond
        self.n = next(iter(shapes))[0]
        self.modules = {k: unet.get_submodule(k) for k in layer_cond}

    def edit_qkv(self, q, k, v, info):
        c = self.layer_cond.get(info.name)
        if c is None:
            return q, k, v
        attn = self.modules[info.name]
        B, h = k.shape[:2]
        if B not in (self.n, 2 * self.n):
            raise ValueError(f"layer_cond has {self.n} rows; the UNet batch has {B} rows "
                             f"(expected {self.n} or {2 * self.n} with guidance)")
        c = c.to(k.dtype)
        if attn.norm_cross:
            c = attn.norm_encoder_hidden_states(c)
        kl = attn.head_to_batch_dim(attn.to_k(c))
        vl = attn.head_to_batch_dim(attn.to_v(c))
        kl, vl = (x.view(x.shape[0] // h, h, *x.shape[1:]) for x in (kl, vl))
        if B == self.n:
            return q, kl, vl
        return q, torch.cat([k[:self.n], kl]), torch.cat([v[:self.n], vl])


def _store(controller):
    # a store that records nothing (self layers only, above any resolution) so that the
    # cross-attention layers run diffusers' fused attention after the controller's edit
    return AttentionStore(kinds=("self",), self_max_res=1, controller=controller)


def per_layer_unet(unet, x, t, layer_cond: dict, encoder_hidden_states: torch.Tensor):
    """``unet(x, t, encoder_hidden_states).sample`` with per-layer conditioning ``layer_cond``
    (:class:`PerLayerConditioning`) on the cross-attention layers it names."""
    with _store(PerLayerConditioning(unet, layer_cond)).attach(unet):
        return unet(x, t, encoder_hidden_states=encoder_hidden_states).sample


def _encode(pipe, prompts: Sequence[str], grad: bool = False) -> torch.Tensor:
    tok = pipe.tokenizer(list(prompts), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    with torch.set_grad_enabled(grad):
        emb = pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]
    return emb.to(pipe.unet.dtype)


def layer_conditioning(pipe, layer_prompts: Sequence, grad: bool = False) -> dict:
    """Encode per-layer prompts: ``layer_prompts[l]`` (a string or a list of ``n`` strings) is
    layer ``l``'s prompt (layers of :func:`cross_layers`, forward order). Returns ``{name: (n,
    L, D)}``. Raises ``ValueError`` naming ``layer_prompts`` if its length is not the number of
    layers. The text encoder runs once on all layers' prompts (batched)."""
    names = cross_layers(pipe.unet)
    if len(layer_prompts) != len(names):
        raise ValueError(f"layer_prompts must hold one prompt (list) per cross-attention layer "
                         f"({len(names)}), got {len(layer_prompts)}")
    lists = [[p] if isinstance(p, str) else list(p) for p in layer_prompts]
    n = len(lists[0])
    if any(len(p) != n for p in lists):
        raise ValueError("layer_prompts: every layer needs the same number of prompts")
    emb = _encode(pipe, [p for ps in lists for p in ps], grad=grad)
    return {name: emb[i * n:(i + 1) * n] for i, name in enumerate(names)}


def sample_per_layer(pipe, layer_prompts: Sequence, seed: int = 0, num_inference_steps: int = 20,
                     guidance_scale: float = 4.0, output_type: str = "np", **kwargs):
    """Generate with the pipeline and per-layer prompts (P+ sampling): the pipeline runs as
    usual (its ``prompt_embeds`` = the first layer's), the controller swaps each cross-attention
    layer's keys and values for its own prompt's. Returns the pipeline's images."""
    cond = layer_conditioning(pipe, layer_prompts)
    first = next(iter(cond.values()))
    g = torch.Generator().manual_seed(int(seed))
    neg = _encode(pipe, [""] * first.shape[0])
    with torch.no_grad(), _store(PerLayerConditioning(pipe.unet, cond)).attach(pipe.unet):
        return pipe(prompt_embeds=first, negative_prompt_embeds=neg,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    generator=g, output_type=output_type, **kwargs).images


def mix_plus(plus_a: Sequence, plus_b: Sequence, k: int) -> list:
    """P+ style mixing: ``plus_a[:k] + plus_b[k:]`` (layers before ``k`` from A, the rest from
    B; Ahmad's notes, §4.4.2, "P+_mix"; P+ §5.3). ``k = n`` gives A, ``k = 0`` gives B. Works on
    lists of per-layer prompts or embeddings. Raises ``ValueError`` naming ``k`` or the lists."""
    if len(plus_a) != len(plus_b):
        raise ValueError(f"plus_a and plus_b must have one entry per layer each, got "
                         f"{len(plus_a)} and {len(plus_b)}")
    k = check_int(k, "k", min=0)
    if k > len(plus_a):
        raise ValueError(f"k must lie in [0, {len(plus_a)}], got {k}")
    return list(plus_a[:k]) + list(plus_b[k:])


@dataclass
class PlusEmbedding:
    """Learned P+ embeddings: ``tokens[l]`` is layer ``l``'s token (``<p>``, ``<p>_1``, …),
    ``embeddings`` (n, D) their rows, ``layers`` the cross-attention layer names."""
    placeholder: str
    tokens: list
    token_ids: list
    embeddings: torch.Tensor
    layers: list
    losses: list
    seconds: float

    def layer_prompts(self, prompt: str) -> list[str]:
        """Layer ``l``'s prompt: ``prompt`` with the placeholder replaced by token ``l``."""
        if self.placeholder not in prompt.split():
            raise ValueError(f"prompt must contain the placeholder {self.placeholder!r}, got "
                             f"{prompt!r}")
        return [" ".join(t if w == self.placeholder else w for w in prompt.split())
                for t in self.tokens]

    def state_dict(self) -> dict:
        return {t: self.embeddings[i].clone() for i, t in enumerate(self.tokens)}


def _check_images(images):
    if isinstance(images, ConceptSet):
        return images.images, list(images.captions)
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise ValueError(f"images must be a ConceptSet or an array (n, H, W, 3) with n >= 1, got "
                         f"shape {arr.shape}")
    return arr, None


def extended_textual_inversion(pipe, images, placeholder: str = "<heart>",
                               initializer: str | None = "star", steps: int = 100,
                               lr: float = 5e-3, captions: Sequence[str] | None = None,
                               batch_size: int = 4, seed: int = 0, progress: bool = True
                               ) -> PlusEmbedding:
    """Learn one embedding of ``placeholder`` per cross-attention layer (XTI; Ahmad's notes,
    eq 4.4; P+ eq 2) on ``images`` (a :class:`ConceptSet`, or (n, H, W, 3) in [0, 1] with
    ``captions`` that contain the placeholder).

    Adds ``n`` tokens (:func:`~diffnotes.personalization.common.add_placeholder` with
    ``num_vectors = n``, every row set to ``initializer``'s embedding), then ``steps`` AdamW
    steps on the embedding table, restoring every other row after each step (only the ``n`` new
    rows change; UNet and text encoder are frozen). Each step: a batch of latents, uniform t,
    layer ``l``'s caption uses token ``l``, the UNet runs with :class:`PerLayerConditioning`.
    Defaults: the official XTI trains 500 steps at lr 5e-3 (batch 8) on SD; the shapes chapter
    uses fewer. Raises ``ValueError`` naming ``images``, ``captions``, ``placeholder``,
    ``initializer``, ``steps`` or ``lr``.
    """
    arr, caps = _check_images(images)
    if caps is None:
        if captions is None or len(captions) != len(arr):
            raise ValueError(f"captions must give one caption per image ({len(arr)}), got "
                             f"{None if captions is None else len(captions)}")
        caps = list(captions)
    if any(placeholder not in c.split() for c in caps):
        raise ValueError(f"captions must contain the placeholder {placeholder!r}: {caps[:2]}")
    steps = check_int(steps, "steps", min=1)
    lr = check_positive(lr, "lr")
    batch_size = check_int(batch_size, "batch_size", min=1)
    unet, enc = pipe.unet, pipe.text_encoder
    names = cross_layers(unet)
    n = len(names)
    ids = add_placeholder(pipe, placeholder, initializer, num_vectors=n)
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    freeze(unet, enc)
    table = enc.get_input_embeddings().weight
    table.requires_grad_(True)
    frozen = table.detach().clone()
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[ids] = False
    with torch.no_grad():
        z0 = encode_images(pipe, arr)
    ac = pipe.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(int(seed))
    plus = PlusEmbedding(placeholder, tokens, ids, table[ids].detach().clone(), names, [], 0.0)

    def loss_fn(step):
        idx = torch.randint(0, len(arr), (min(batch_size, len(arr)),), generator=g)
        prompts = [caps[i] for i in idx.tolist()]
        lp = [[plus.layer_prompts(p)[l] for p in prompts] for l in range(n)]
        cond = layer_conditioning(pipe, lp, grad=True)
        ctrl = PerLayerConditioning(unet, cond)
        with _store(ctrl).attach(unet):
            return diffusion_loss(unet, z0[idx], cond[names[0]], ac, generator=g)

    def restore(step):
        with torch.no_grad():
            table[keep] = frozen[keep]

    t0 = time.perf_counter()
    res = train_loop([table], loss_fn, steps, lr, weight_decay=0.0, after_step=restore,
                     desc="P+ (XTI)", progress=progress)
    table.requires_grad_(False)
    plus.embeddings = table[ids].detach().clone()
    plus.losses, plus.seconds = res.losses, time.perf_counter() - t0
    return plus


def coarse_fine_experiment(pipe, prompt_a: str = "a red square", prompt_b: str = "a green circle",
                           n: int = 40, seed: int = 0, num_inference_steps: int = 20,
                           guidance_scale: float = 4.0) -> dict:
    """The coarse/fine experiment of P+ (Ahmad's notes, §4.4.2; P+ §4, Fig. 3): ``prompt_a``
    into the coarse layers and ``prompt_b`` into the fine ones, and the reverse, ``n`` samples
    each (seeds shared), judged by ``diffnotes.models.eval_shapes`` (largest object's shape and
    colour). Returns ``{"coarse=A, fine=B": {"shape_from_coarse": …, "color_from_coarse": …,
    "shape_from_fine": …, "color_from_fine": …, "n": n}, "coarse=B, fine=A": …, "images": …}``:
    the fractions of samples whose shape (colour) is the one of the coarse (fine) prompt."""
    from .evaluate import judge_images

    n = check_int(n, "n", min=1)
    coarse, fine = coarse_fine_split(pipe.unet)
    L = len(cross_layers(pipe.unet))
    words = {}
    for p in (prompt_a, prompt_b):
        w = p.split()
        words[p] = dict(color=w[-2], shape=w[-1])
    out, images = {}, {}
    for name, (pc, pf) in {"coarse=A, fine=B": (prompt_a, prompt_b),
                           "coarse=B, fine=A": (prompt_b, prompt_a)}.items():
        lp = [[pc if l in coarse else pf] * n for l in range(L)]
        ims = sample_per_layer(pipe, lp, seed=seed, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale)
        j = judge_images(ims)
        out[name] = dict(
            shape_from_coarse=float(np.mean([x["shape"] == words[pc]["shape"] for x in j])),
            shape_from_fine=float(np.mean([x["shape"] == words[pf]["shape"] for x in j])),
            color_from_coarse=float(np.mean([x["color"] == words[pc]["color"] for x in j])),
            color_from_fine=float(np.mean([x["color"] == words[pf]["color"] for x in j])), n=n)
        images[name] = ims
    out["layers"] = dict(coarse=coarse, fine=fine,
                         resolutions=layer_resolutions(pipe.unet, "cross"))
    out["images"] = images
    return out


# ---------------------------------------------------------------------------- protocol
def _plus_sampler(pipe, plus: PlusEmbedding):
    from .evaluate import PROTOCOL

    def sample(prompts, seed):
        out = []
        g_seed = int(seed)
        for i in range(0, len(prompts), 20):
            chunk = list(prompts[i:i + 20])
            lp = [[(plus.layer_prompts(p)[l] if plus.placeholder in p.split() else p)
                   for p in chunk] for l in range(len(plus.layers))]
            out.append(sample_per_layer(pipe, lp, seed=g_seed + i,
                                        num_inference_steps=PROTOCOL["num_inference_steps"],
                                        guidance_scale=PROTOCOL["guidance_scale"]))
        return np.concatenate(out).astype(np.float32)
    return sample


def _eval_xti(concept: ConceptSet, progress: bool = False):
    from .evaluate import new_placeholder, protocol_pipeline, Tuned

    pipe = protocol_pipeline()
    ph = new_placeholder(concept, pipe)
    caps = [" ".join(ph if w == concept.placeholder else w for w in c.split())
            for c in concept.captions]
    init = {"shape": concept.class_word, "color": concept.class_word,
            "instance": concept.class_word}[concept.kind]
    plus = extended_textual_inversion(pipe, concept.images, placeholder=ph, initializer=init,
                                      captions=caps, steps=60, lr=2e-2, seed=0,
                                      progress=progress)
    return Tuned(sample=_plus_sampler(pipe, plus), placeholder=ph,
                 trained_parameters=int(plus.embeddings.numel()),
                 file_bytes=tensor_bytes(plus.state_dict()), train_seconds=plus.seconds,
                 extra=dict(layers=len(plus.layers), steps=60, lr=2e-2,
                            final_loss=float(np.mean(plus.losses[-10:]))))


EVAL_CONFIGS = {"extended_textual_inversion": _eval_xti}
