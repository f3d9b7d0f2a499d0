"""LoRA, low-rank adaptation (Hu et al. 2022; Ahmad's notes, §4.5 "Brief overview of LoRA"):
every adapted linear layer keeps its frozen weight W0 and learns W = W0 + (α/r)·B A with
A (r × d_in), B (d_out × r), B = 0 at initialisation (LoRA eq 3: h = W0 x + ΔW x, ΔW = BA).

The conventions are diffusers' and peft's: the adapter is added with ``peft.LoraConfig`` and
``unet.add_adapter`` (peft is a dependency of diffnotes); the trained weights are turned into the diffusers
LoRA state dict (``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))``) and
written by ``StableDiffusionPipeline.save_lora_weights``, as diffusers'
``train_dreambooth_lora.py`` does, so ``pipe.load_lora_weights(directory)`` reads the file.
:class:`LoRALinear` is the same layer written out by hand with peft's parameter names
(``base_layer``, ``lora_A``, ``lora_B``): the chapter's "LoRA layer by hand", and the path
``add_lora(..., use_peft=False)`` takes; its state dict and file are the same.

Placeholder: the concept's captions name it with a new token (``"a <heart>"``, ``"a sks star"``)
initialised at its class word's embedding plus a small fixed random offset (so that
``<heart>`` and ``star`` are distinct inputs, and two concepts from the same class word stay
distinct); the text encoder is frozen, as in diffusers' LoRA DreamBooth script without
``--train_text_encoder``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import check_int, check_positive
from .common import (ConceptSet, add_placeholder, diffusion_loss, encode_images, encode_text,
                     freeze, train_loop)

try:  # pragma: no cover - depends on the environment
    import peft  # noqa: F401
    HAS_PEFT = True
except ImportError:  # pragma: no cover
    HAS_PEFT = False

__all__ = ["lora", "LoRALinear", "add_lora", "lora_layers", "lora_state_dict", "save_lora",
           "load_lora", "set_lora_scale", "merged_delta", "fit_images", "new_token",
           "TARGET_MODULES", "HAS_PEFT", "EVAL_CONFIGS"]

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def fit_images(pipe, images) -> torch.Tensor:
    """Concept images (a ConceptSet, an array (n, H, W, 3) or a tensor (n, 3, H, W) in [0, 1])
    as a (n, 3, H', W') float tensor at the pipeline's image size (bilinear resize when the
    pipeline's size differs: 320 for ``"sd-1.5-layout-tiny"``). Raises ``ValueError`` naming
    ``images`` for zero images, a wrong rank, channel count or value range."""
    from .common import ConceptSet
    from ..editing.inversion import _image_side
    if isinstance(images, ConceptSet):
        images = images.images
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be an array (n, H, W, 3), got shape {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a tensor (n, 3, H, W), got shape {tuple(images.shape)}")
        x = images.detach().float()
    else:
        raise TypeError(f"images must be a ConceptSet, an array or a tensor, got {type(images).__name__}")
    if len(x) == 0:
        raise ValueError("images must hold at least one image, got 0")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"images must be in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    _, H, W = _image_side(pipe)
    if x.shape[-2:] != (H, W):
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False).clamp(0, 1)
    return x



def new_token(pipe, placeholder: str, initializer: str | None, noise: float = 0.25,
              seed: int = 0) -> int:
    """Add ``placeholder`` (:func:`~diffnotes.personalization.common.add_placeholder`) and move
    its row off the initializer's by a fixed random vector of ``noise`` × the row's norm
    (seeded by ``seed``). Returns the token id."""
    tid = add_placeholder(pipe, placeholder, initializer=initializer)[0]
    table = pipe.text_encoder.get_input_embeddings().weight
    g = torch.Generator().manual_seed(int(seed) + sum(map(ord, placeholder)))
    u = torch.randn(table.shape[1], generator=g)
    with torch.no_grad():
        table[tid] += (noise * table[tid].norm() * u / u.norm()).to(table.dtype)
    return tid


# ---------------------------------------------------------------------------- the layer
class LoRALinear(nn.Module):
    """h = W0 x + b + scale · (α/r) · B(A x) (LoRA eq 3), peft's parameter names.

    ``base_layer`` (d_out × d_in, frozen), ``lora_A`` (r × d_in, Kaiming-uniform as peft),
    ``lora_B`` (d_out × r, zeros: the layer starts as the identity edit, bitwise).
    ``scale`` is the sampling-time multiplier (diffusers' ``cross_attention_kwargs={"scale": s}``).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        rank = check_int(rank, "rank", min=1)
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        dev, dt = base_layer.weight.device, base_layer.weight.dtype
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.scaling = self.alpha / rank
        self.scale = 1.0

    @property
    def weight(self):
        return self.base_layer.weight

    def delta(self) -> torch.Tensor:
        """ΔW = (α/r)·B A (d_out × d_in)."""
        return self.scaling * self.lora_B.weight @ self.lora_A.weight

    def forward(self, x):
        out = self.base_layer(x)
        if self.scale == 0:
            return out
        return out + self.lora_B(self.lora_A(x)) * (self.scaling * self.scale)


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(unet, rank: int = 4, target_modules=TARGET_MODULES, alpha: float | None = None,
             use_peft: bool | None = None) -> list[nn.Module]:
    """Add a rank-``rank`` adapter to every linear layer of ``unet`` whose name ends with one of
    ``target_modules`` (peft's matching rule), freeze everything else, return the adapted
    layers. With peft (``use_peft`` default: whether it is installed):
    ``unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
    target_modules=...))``. Raises ``ValueError`` naming ``rank`` (≤ 0) or ``target_modules``
    (no match)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of names, got {target_modules!r}")
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise ValueError(f"target_modules {targets} matched no linear layer of the UNet")
    freeze(unet)
    use_peft = HAS_PEFT if use_peft is None else use_peft
    if use_peft:  # pragma: no cover - needs peft
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=alpha or int(rank),
                                    init_lora_weights="gaussian", target_modules=list(targets)))
        return [m for n, m in unet.named_modules() if hasattr(m, "lora_A") and _matches(n, targets)]
    layers = []
    for n in names:
        parent_name, child = n.rsplit(".", 1)
        parent = unet.get_submodule(parent_name)
        lay = LoRALinear(getattr(parent, child), int(rank), alpha)
        setattr(parent, child, lay)
        layers.append(lay)
    return layers


def lora_layers(unet) -> dict:
    """``{module name: layer}`` of the adapted layers (hand-written or peft's)."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoRALinear)
            or (hasattr(m, "lora_A") and hasattr(m, "base_layer"))}


def _ab(m):
    if isinstance(m, LoRALinear):
        return m.lora_A.weight, m.lora_B.weight, m.scaling
    key = next(iter(m.lora_A))  # pragma: no cover - peft
    return m.lora_A[key].weight, m.lora_B[key].weight, m.scaling[key]  # pragma: no cover


def merged_delta(unet) -> dict:
    """``{module name: ΔW = (α/r)·B A}`` of every adapted layer (what ``fuse_lora`` adds)."""
    out = {}
    for n, m in lora_layers(unet).items():
        A, B, s = _ab(m)
        out[n] = (s * B @ A).detach()
    return out


def set_lora_scale(unet, scale: float) -> None:
    """The sampling-time LoRA scale of every adapted layer (peft's ``set_scale`` on each of its
    adapters, or the hand-written layer's ``scale``); 0 gives the base model."""
    scale = check_positive(scale, "scale", allow_zero=True)
    for m in lora_layers(unet).values():
        if isinstance(m, LoRALinear):
            m.scale = float(scale)
        else:
            for adapter in list(m.scaling):
                m.set_scale(adapter, float(scale))


def lora_state_dict(unet) -> dict:
    """The diffusers LoRA state dict of the UNet's adapters
    (``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))``: keys
    ``<module>.lora.down.weight`` = A, ``<module>.lora.up.weight`` = B)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    if HAS_PEFT and not any(isinstance(m, LoRALinear) for m in unet.modules()):  # pragma: no cover
        from peft.utils import get_peft_model_state_dict
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    sd = {}
    for n, m in lora_layers(unet).items():
        sd[f"{n}.lora_A.weight"] = m.lora_A.weight.detach().clone()
        sd[f"{n}.lora_B.weight"] = m.lora_B.weight.detach().clone()
    return convert_state_dict_to_diffusers(sd)


def save_lora(pipe, directory) -> Path:
    """Write the adapters with ``StableDiffusionPipeline.save_lora_weights`` (file
    ``pytorch_lora_weights.safetensors``, keys prefixed ``unet.``). Returns the file path."""
    from diffusers import StableDiffusionPipeline
    directory = Path(directory)
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=lora_state_dict(pipe.unet),
                                              safe_serialization=True)
    return directory / WEIGHT_NAME


def load_lora(pipe, directory, alpha: float | None = None) -> list:
    """Load a saved LoRA into ``pipe``: ``pipe.load_lora_weights(directory)`` with peft; without
    peft, the same file through ``StableDiffusionPipeline.lora_state_dict`` into hand-written
    layers (rank read from the shapes). Raises ``ValueError`` naming ``directory`` if it holds
    no LoRA weights."""
    from diffusers import StableDiffusionPipeline
    if HAS_PEFT:  # pragma: no cover - needs peft
        pipe.load_lora_weights(str(directory))
        return list(lora_layers(pipe.unet).values())
    if not (Path(directory) / WEIGHT_NAME).exists():
        raise ValueError(f"directory must hold {WEIGHT_NAME}, got {directory}")
    sd = StableDiffusionPipeline.lora_state_dict(str(directory))
    sd = sd[0] if isinstance(sd, tuple) else sd
    mods = sorted({k[len("unet."):].rsplit(".lora.", 1)[0] for k in sd if k.startswith("unet.")})
    layers = []
    freeze(pipe.unet)
    for n in mods:
        A, B = sd[f"unet.{n}.lora.down.weight"], sd[f"unet.{n}.lora.up.weight"]
        parent_name, child = n.rsplit(".", 1)
        parent = pipe.unet.get_submodule(parent_name)
        lay = LoRALinear(getattr(parent, child), A.shape[0], alpha)
        with torch.no_grad():
            lay.lora_A.weight.copy_(A)
            lay.lora_B.weight.copy_(B)
        setattr(parent, child, lay)
        layers.append(lay)
    return layers


# ---------------------------------------------------------------------------- training
def lora(pipe, images, prompt, rank: int = 4, target_modules=TARGET_MODULES, steps: int = 150,
         lr: float = 3e-3, batch_size: int = 5, alpha: float | None = None,
         placeholder: str | None = None, initializer: str | None = None, seed: int = 0,
         progress: bool = True):
    """Fine-tune LoRA adapters of ``pipe.unet`` on a concept (Ahmad's notes, §4.5; LoRA eq 3)
    with the diffusion loss of Ahmad's notes, eq 1.8 (DreamBooth's eq 1 without the prior term).

    ``images``: a :class:`ConceptSet`, an array (n, H, W, 3) or a tensor (n, 3, H, W) in [0, 1]
    (resized to the pipeline's size); ``prompt``: one caption or one per image. ``placeholder``
    (a new word in the prompt, default the ConceptSet's) is added with :func:`new_token` from
    ``initializer`` (default the ConceptSet's class word). Only the LoRA parameters train
    (r(d_in + d_out) per layer). ``pipe`` is changed in place.

    Returns a ``TrainResult`` (``extra['layers']``: number of adapted layers).
    Raises ``ValueError`` naming ``rank``, ``steps``, ``lr``, ``images`` or ``prompt``.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    steps = check_int(steps, "steps", min=1)
    lr = check_positive(lr, "lr")
    batch_size = check_int(batch_size, "batch_size", min=1)
    if isinstance(images, ConceptSet):
        placeholder = placeholder or images.placeholder
        initializer = initializer or images.class_word
    x = fit_images(pipe, images)
    caps = [prompt] * len(x) if isinstance(prompt, str) else list(prompt)
    if len(caps) != len(x) or not all(isinstance(c, str) for c in caps):
        raise ValueError(f"prompt must be one string or one string per image ({len(x)}), got "
                         f"{prompt!r}")
    if placeholder is not None:
        if not all(placeholder in c.split() for c in caps):
            raise ValueError(f"prompt must contain the placeholder {placeholder!r}, got {caps[0]!r}")
        if placeholder not in pipe.tokenizer.get_vocab():
            new_token(pipe, placeholder, initializer, seed=seed)
    freeze(pipe.vae, pipe.text_encoder)
    lat = encode_images(pipe, x)
    cond = encode_text(pipe, caps)
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        layers = add_lora(pipe.unet, rank, target_modules, alpha)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    acp = pipe.scheduler.alphas_cumprod

    def loss_fn(step):
        idx = torch.randint(0, len(lat), (min(batch_size, len(lat)),), generator=gen)
        return diffusion_loss(pipe.unet, lat[idx], cond[idx], acp, generator=gen)
    res = train_loop(params, loss_fn, steps, lr, desc=f"LoRA r={rank}", progress=progress)
    res.extra["layers"] = len(layers)
    return res


def _eval_config(concept: ConceptSet, progress: bool = False, rank: int = 4):
    import tempfile

    from .evaluate import pipeline_sampler, protocol_pipeline, Tuned

    pipe = protocol_pipeline()
    res = lora(pipe, concept, concept.captions, rank=rank, progress=progress)
    with tempfile.TemporaryDirectory() as d:
        f = save_lora(pipe, d)
        size = os.path.getsize(f)
    return Tuned(sample=pipeline_sampler(pipe, progress=progress), placeholder=concept.placeholder,
                 trained_parameters=res.trained_parameters, file_bytes=size + 4 * pipe.text_encoder
                 .get_input_embeddings().weight.shape[1], train_seconds=res.seconds,
                 extra=dict(rank=rank, steps=len(res.losses), layers=res.extra["layers"],
                            final_loss=float(np.mean(res.losses[-10:]))))


EVAL_CONFIGS = {"lora": _eval_config}
