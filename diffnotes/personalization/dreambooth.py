"""DreamBooth: fine-tune the whole denoiser on a few images captioned with a rare identifier,
with a class-specific prior-preservation loss (Ahmad's notes §4.3, eqs 4.1–4.2; Ruiz et al. 2023,
eqs 1–2).

Eq 4.1 (DreamBooth eq 1, in ε-prediction form) is the denoising loss on the instance images x with
the prompt c = "a [V] [class]"; eq 4.2 (DreamBooth eq 2) adds λ times the same loss on images
x_pr that the *frozen* model generated from the class prompt c_pr = "a [class]":

.. math:: \\mathcal L = \\mathbb E\\big[\\|\\varepsilon - \\hat\\varepsilon_\\theta(z_t, t, c)\\|^2
          + \\lambda \\|\\varepsilon' - \\hat\\varepsilon_\\theta(z'_{t'}, t', c_{pr})\\|^2\\big].

λ = 0 gives eq 4.1 exactly; the paper uses λ = 1 (the notes leave λ unstated). Errata of the
notes: the identifier [V] is an existing rare token, not a learned pseudo-word (the weights are
learned); the class prompt is c_pr = "a dog", not "dogs".

On the shapes model the rare token is ``"sks"`` (the convention of diffusers' example; it is a
word of the shapes vocabulary that no training caption uses), and the instance prompt of a
concept is ``"a sks <class word>"`` with the class word of
:class:`~diffnotes.personalization.common.ConceptSet` (``"a sks star"`` for the heart, whose
nearest training shape is the star; ``"a sks blue circle"`` for purple), see
:func:`dreambooth_prompts`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..ddpm import q_sample
from ..utils import check_int, check_positive
from .common import (ConceptSet, diffusion_loss, encode_text, freeze, tensor_bytes, train_loop,
                     TrainResult)
from .textual_inversion import _check_known, prepare_images

__all__ = ["prior_preservation_loss", "dreambooth_loss", "dreambooth_prompts",
           "generate_class_images", "dreambooth", "DreamBoothResult", "EVAL_CONFIGS",
           "EVAL_SETTINGS"]

RARE_TOKEN = "sks"


def prior_preservation_loss(pred: torch.Tensor, target: torch.Tensor, class_pred: torch.Tensor,
                            class_target: torch.Tensor, prior_loss_weight: float = 1.0
                            ) -> torch.Tensor:
    """Eq 4.2 of Ahmad's notes (DreamBooth eq 2) from predictions: mean‖target − pred‖² +
    λ mean‖class_target − class_pred‖² (each mean over its own batch and pixels, as diffusers'
    ``train_dreambooth.py`` reduces it; w_t = 1). λ = 0 is eq 4.1. Shapes: ``pred``/``target``
    (B, ...), ``class_pred``/``class_target`` (B', ...). Raises ``ValueError`` naming
    ``prior_loss_weight`` if negative, or a tensor whose shape does not match its pair."""
    lam = check_positive(prior_loss_weight, "prior_loss_weight", allow_zero=True)
    if pred.shape != target.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got "
                         f"{tuple(target.shape)}")
    if class_pred.shape != class_target.shape:
        raise ValueError(f"class_target must have class_pred's shape {tuple(class_pred.shape)}, "
                         f"got {tuple(class_target.shape)}")
    inst = ((pred - target) ** 2).mean()
    prior = ((class_pred - class_target) ** 2).mean()
    return inst + lam * prior


def dreambooth_loss(unet, latents: torch.Tensor, cond: torch.Tensor,
                    class_latents: torch.Tensor | None, class_cond: torch.Tensor | None,
                    alphas_cumprod: torch.Tensor, prior_loss_weight: float = 1.0,
                    generator: torch.Generator | None = None, t=None, noise=None, class_t=None,
                    class_noise=None, class_target: torch.Tensor | None = None,
                    return_terms: bool = False):
    """The DreamBooth objective (Ahmad's notes, eq 4.2; DreamBooth eq 2) on one batch: the
    denoising loss (eq 1.8, :func:`~diffnotes.personalization.common.diffusion_loss`) of the
    instance latents (B, C, h, w) under ``cond`` (B, L, D), plus ``prior_loss_weight`` λ times the
    same loss on ``class_latents`` (B', C, h, w) under ``class_cond``. The two halves are
    separate UNet calls, so λ = 0 returns eq 4.1's value bitwise (also when the class batch is
    ``None``). ``t``/``noise``/``class_t``/``class_noise`` fix the draws (default from
    ``generator``, instance first). ``class_target`` replaces ε' as the prior term's target
    (e.g. the frozen model's own prediction, for which the term is 0 at θ = θ₀).
    Returns the scalar loss, or ``(loss, instance_term, prior_term)`` with ``return_terms``."""
    lam = check_positive(prior_loss_weight, "prior_loss_weight", allow_zero=True)
    inst = diffusion_loss(unet, latents, cond, alphas_cumprod, generator=generator, t=t,
                          noise=noise)
    if class_latents is None:
        if lam != 0:
            raise ValueError("class_latents must be given when prior_loss_weight > 0, got None")
        prior = torch.zeros((), dtype=inst.dtype)
        return (inst, inst, prior) if return_terms else inst
    if class_target is None:
        prior = diffusion_loss(unet, class_latents, class_cond, alphas_cumprod,
                               generator=generator, t=class_t, noise=class_noise)
    else:
        B = class_latents.shape[0]
        T = len(alphas_cumprod)
        ct = class_t if class_t is not None else torch.randint(0, T, (B,), generator=generator)
        cn = class_noise if class_noise is not None else torch.randn(
            class_latents.shape, generator=generator, dtype=class_latents.dtype)
        x = q_sample(class_latents, ct, alphas_cumprod.to(class_latents.dtype), cn)
        pred = unet(x, ct, encoder_hidden_states=class_cond).sample
        if class_target.shape != pred.shape:
            raise ValueError(f"class_target must have shape {tuple(pred.shape)}, got "
                             f"{tuple(class_target.shape)}")
        prior = ((pred - class_target) ** 2).mean()
    loss = inst + lam * prior
    return (loss, inst, prior) if return_terms else loss


def dreambooth_prompts(concept: ConceptSet, rare_token: str = RARE_TOKEN):
    """``(instance_prompts, class_prompts, placeholder)`` of a concept: its captions with the
    placeholder replaced by ``"<rare> <class word>"`` for a held-out shape or colour (``"a sks
    star"``, ``"a sks blue circle"``) and its own ``"a sks star"`` for an instance; the class
    prompts are ``concept.class_captions`` (``"a star"``); ``placeholder`` is what evaluation
    prompts put in the concept's place (``"sks star"``, ``"sks blue"``, ``"sks"``)."""
    if not isinstance(concept, ConceptSet):
        raise TypeError(f"concept must be a ConceptSet, got {type(concept).__name__}")
    if concept.kind == "instance":
        ph = rare_token
        inst = [" ".join(ph if w == concept.placeholder else w for w in c.split())
                for c in concept.captions]
    else:
        ph = f"{rare_token} {concept.class_word}"
        inst = [" ".join(ph if w == concept.placeholder else w for w in c.split())
                for c in concept.captions]
    return inst, list(concept.class_captions), ph


def generate_class_images(pipe, class_prompts: Sequence[str], num_class_images: int,
                          num_inference_steps: int = 20, guidance_scale: float = 4.0,
                          seed: int = 0, batch_size: int = 20) -> np.ndarray:
    """x_pr of eq 4.2: ``num_class_images`` images (N, H, W, 3) in [0, 1] that the (still frozen)
    pipeline generates from the class prompts, cycled; deterministic for ``seed``."""
    num_class_images = check_int(num_class_images, "num_class_images", min=1)
    prompts = [class_prompts[i % len(class_prompts)] for i in range(num_class_images)]
    g = torch.Generator().manual_seed(int(seed))
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            out.append(pipe(prompts[i:i + batch_size], num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, generator=g, output_type="np").images)
    return np.concatenate(out).astype(np.float32)


class DreamBoothResult(TrainResult):
    """A :class:`~diffnotes.personalization.common.TrainResult` with the loss terms per step
    (``extra["instance"]``, ``extra["prior"]``) and the class images (``extra["class_images"]``)."""


def _as_prompts(p, n, name):
    if isinstance(p, str):
        return [p] * n
    if p is None or not isinstance(p, (list, tuple)) or not p or \
            not all(isinstance(x, str) for x in p):
        raise ValueError(f"{name} must be a string or a list of strings, got {p!r}")
    if len(p) not in (1, n):
        raise ValueError(f"{name} must be one string or one per image ({n}), got {len(p)}")
    return list(p) * (n // len(p))


def dreambooth(pipe, images, instance_prompt, class_prompt, prior_loss_weight: float = 1.0,
               num_class_images: int = 20, train_text_encoder: bool = False, *,
               steps: int = 200, lr: float = 1e-4, batch_size: int = 4,
               class_batch_size: int | None = None, class_images=None,
               class_inference_steps: int = 20, class_guidance_scale: float = 4.0,
               weight_decay: float = 1e-2, max_grad_norm: float | None = 1.0, seed: int = 0,
               progress: bool = True) -> DreamBoothResult:
    """Fine-tune ``pipe``'s UNet (and its text encoder with ``train_text_encoder``) in place on
    ``images`` captioned ``instance_prompt``, with the prior-preservation loss on
    ``num_class_images`` images the frozen model generates from ``class_prompt`` first (Ahmad's
    notes, eqs 4.1–4.2; DreamBooth eqs 1–2; ``prior_loss_weight`` λ, 1 in the paper; λ = 0 is eq
    4.1 and generates no class images).

    ``images``: a :class:`~diffnotes.personalization.common.ConceptSet` or an array (n, H, W, 3) /
    tensor (n, 3, H, W) in [0, 1] of the pipeline's size; ``instance_prompt`` / ``class_prompt``:
    a string or one per image (see :func:`dreambooth_prompts`: ``"a sks star"``, ``"a star"``);
    the identifier (``sks``) is an existing word, not a new token. ``class_images`` skips the
    generation (N, H, W, 3). Each step draws ``batch_size`` instance and ``class_batch_size``
    (default the same) class latents with replacement; AdamW on all UNet parameters. With
    ``train_text_encoder=False`` the text encoder (and the VAE) stay bitwise unchanged.

    Returns a :class:`DreamBoothResult`. Raises ``ValueError`` naming ``images``,
    ``instance_prompt``, ``class_prompt``, ``prior_loss_weight``, ``num_class_images``,
    ``steps``, ``lr``, ``batch_size``.
    """
    lam = check_positive(prior_loss_weight, "prior_loss_weight", allow_zero=True)
    steps = check_int(steps, "steps", min=1)
    lr = check_positive(lr, "lr")
    batch_size = check_int(batch_size, "batch_size", min=1)
    class_batch_size = check_int(class_batch_size or batch_size, "class_batch_size", min=1)
    if not isinstance(train_text_encoder, bool):
        raise TypeError(f"train_text_encoder must be a bool, got {train_text_encoder!r}")
    latents = prepare_images(pipe, images)
    n = latents.shape[0]
    inst_prompts = _as_prompts(instance_prompt, n, "instance_prompt")
    cls_prompts = _as_prompts(class_prompt, n, "class_prompt")
    _check_known(pipe, inst_prompts, "instance_prompt")
    _check_known(pipe, cls_prompts, "class_prompt")
    class_latents = None
    if lam > 0:
        if class_images is None:
            num_class_images = check_int(num_class_images, "num_class_images", min=1)
            class_images = generate_class_images(pipe, sorted(set(cls_prompts), key=cls_prompts.index),
                                                 num_class_images, class_inference_steps,
                                                 class_guidance_scale, seed=seed + 1)
            cls_per_image = [sorted(set(cls_prompts), key=cls_prompts.index)[
                i % len(set(cls_prompts))] for i in range(num_class_images)]
        else:
            cls_per_image = [cls_prompts[i % n] for i in range(len(class_images))]
        class_latents = prepare_images(pipe, np.asarray(class_images), "class_images")
    freeze(pipe.unet, pipe.vae, pipe.text_encoder)
    params = list(pipe.unet.parameters())
    if train_text_encoder:
        params += list(pipe.text_encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    ac = pipe.scheduler.alphas_cumprod.to(latents.device)
    g = torch.Generator().manual_seed(int(seed))
    if not train_text_encoder:            # the conditions never change: encode once
        inst_cond_all = encode_text(pipe, inst_prompts)
        cls_cond_all = encode_text(pipe, cls_per_image) if class_latents is not None else None
    terms = dict(instance=[], prior=[])
    pipe.unet.train()

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(n, (batch_size,), generator=g)
        if train_text_encoder:
            cond = encode_text(pipe, [inst_prompts[i] for i in idx], grad=True)
        else:
            cond = inst_cond_all[idx]
        cl = cc = None
        if class_latents is not None:
            cidx = torch.randint(len(class_latents), (class_batch_size,), generator=g)
            cl = class_latents[cidx]
            cc = encode_text(pipe, [cls_per_image[i] for i in cidx], grad=True) \
                if train_text_encoder else cls_cond_all[cidx]
        loss, a, b = dreambooth_loss(pipe.unet, latents[idx], cond, cl, cc, ac, lam,
                                     generator=g, return_terms=True)
        terms["instance"].append(float(a.detach()))
        terms["prior"].append(float(b.detach()))
        return loss

    try:
        res = train_loop(params, loss_fn, steps, lr, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, desc="dreambooth", progress=progress)
    finally:
        pipe.unet.eval()
        freeze(pipe.unet, pipe.text_encoder)
    out = DreamBoothResult(losses=res.losses, seconds=res.seconds,
                           trained_parameters=res.trained_parameters,
                           extra=dict(terms, class_images=class_images,
                                      class_prompts=None if class_latents is None else
                                      cls_per_image))
    return out


# ---------------------------------------------------------------------------- measured
#: settings of the stored measurement (λ = 1 as in the paper; the no-prior row sets λ = 0).
EVAL_SETTINGS = dict(steps=200, lr=1e-4, batch_size=4, num_class_images=20)


def _eval(concept: ConceptSet, progress: bool = False, prior_loss_weight: float = 1.0):
    from .evaluate import pipeline_sampler, protocol_pipeline, Tuned

    pipe = protocol_pipeline()
    inst, cls, ph = dreambooth_prompts(concept)
    torch.manual_seed(0)
    res = dreambooth(pipe, concept, inst, cls, prior_loss_weight=prior_loss_weight, seed=0,
                     progress=progress, **EVAL_SETTINGS)
    size = tensor_bytes(pipe.unet.state_dict())
    return Tuned(sample=pipeline_sampler(pipe, progress=False), placeholder=ph,
                 trained_parameters=res.trained_parameters, file_bytes=size,
                 train_seconds=res.seconds,
                 extra=dict(EVAL_SETTINGS, prior_loss_weight=prior_loss_weight,
                            instance_prompt=inst[0], class_prompt=cls[0],
                            first_loss=float(np.mean(res.losses[:20])),
                            final_loss=float(np.mean(res.losses[-20:])),
                            final_prior_term=float(np.mean(res.extra["prior"][-20:]))))


def _eval_dreambooth(concept, progress=False):
    return _eval(concept, progress, 1.0)


def _eval_dreambooth_no_prior(concept, progress=False):
    return _eval(concept, progress, 0.0)


EVAL_CONFIGS = {"dreambooth": _eval_dreambooth, "dreambooth_no_prior": _eval_dreambooth_no_prior}
