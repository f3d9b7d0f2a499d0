"""E4T, encoder-based domain tuning (Gal et al. 2023; Ahmad's notes, §4.5): an image encoder
predicts a word-embedding *offset* from a coarse class word, and multiplicative weight offsets
of the UNet's attention projections are learned with it; after pre-training on a domain, a new
concept needs only a few tuning steps.

- :class:`ImageEncoder` is E(I) of Ahmad's notes, eqs 4.14–4.15: pooled features of several
  layers of a frozen image backbone, one linear map per layer, the mean, LeakyReLU and a final
  linear map into the text encoder's embedding space (the notes' CLS-token recipe). No CLIP
  weights exist offline, so the backbone is the pipeline's own frozen VAE encoder (its
  ``conv_in``, every down block and the mid block: the "every second layer" hierarchy of a
  small convolutional encoder). The final layer starts at zero, so E(I) = 0 and ⟨d⟩ = ⟨c⟩ at
  initialisation.
- :class:`MultiplicativeLinear` is eq 4.20, W = W0 ⊙ (1 + ΔW), element-wise: ΔW = 0 is the
  identity (bitwise) and a zero of W0 stays zero for any ΔW (unlike LoRA's additive W0 + BA).
  Ahmad's notes, eq 4.21 parametrises ΔW through a small network whose shape the text leaves
  open; here ΔW is a full learned matrix per projection (to_q, to_k, to_v of self- and
  cross-attention), zero at initialisation.
- The loss is eq 4.22: the diffusion loss with ⟨d⟩ = ⟨c⟩ + s·E(I) (eq 4.15, s = 0.1) in place
  of the placeholder, plus λ_r‖E(I)‖² (eq 4.16).
- :func:`pretrain` is the domain pre-training on the generator's single-object scenes of the
  *training* shapes and colours (never a heart, never purple); ``python -m
  diffnotes.personalization.e4t train`` writes ``diffnotes/weights/e4t_shapes``.
- :func:`e4t` tunes the pre-trained encoder and offsets on a concept's images for a few steps
  and writes the concept's embedding ⟨d⟩ (the mean over its images) into a new placeholder
  row of the pipeline, so the ordinary pipeline samples it.

Simplification, stated: the paper's ⟨d⟩_t also depends on UNet features at the current
timestep (Ahmad's notes, eqs 4.17–4.19, garbled there: see the errata); this implementation
uses the image features only, so ⟨d⟩ is one vector per image.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import shapes as S
from ..utils import check_int, check_positive
from .common import (ConceptSet, add_placeholder, diffusion_loss, encode_images, freeze,
                     tensor_bytes, train_loop)

__all__ = ["ImageEncoder", "MultiplicativeLinear", "add_weight_offsets", "remove_weight_offsets",
           "E4TModel", "pretrain", "e4t", "load_pretrained", "domain_dataset", "WEIGHTS_DIR",
           "SCALE", "EVAL_CONFIGS"]

#: s of eq 4.15 (Ahmad's notes: "empirically set to 0.1").
SCALE = 0.1
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "e4t_shapes"
_PROJ = ("to_q", "to_k", "to_v")
#: placeholder used during domain pre-training; its coarse word ⟨c⟩.
_PRETRAIN_TOKEN, _COARSE = "<e4t>", "star"


# ---------------------------------------------------------------------------- the encoder
class ImageEncoder(nn.Module):
    """E(I): (n, 3, H, W) images in [0, 1] → (n, D) embedding offsets (Ahmad's notes,
    eqs 4.14–4.15; the per-layer linear maps, mean, LeakyReLU, final linear of §4.5).

    ``vae``: the frozen backbone (not a submodule: it is neither trained nor saved);
    ``dim``: D, the text encoder's embedding width; ``hidden``: width of h_l.
    """

    def __init__(self, vae, dim: int, hidden: int = 128):
        super().__init__()
        dim, hidden = check_int(dim, "dim", min=1), check_int(hidden, "hidden", min=1)
        self._vae = [vae]
        enc = vae.encoder
        widths = [enc.conv_in.out_channels]
        widths += [blk.resnets[-1].out_channels for blk in enc.down_blocks]
        widths += [enc.mid_block.resnets[-1].out_channels]
        self.proj = nn.ModuleList(nn.Linear(c, hidden) for c in widths)
        self.final = nn.Linear(hidden, dim)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """F_l: the spatial means of the backbone's layers (list of (n, c_l))."""
        enc = self._vae[0].encoder
        x = (2 * images - 1).to(enc.conv_in.weight.dtype)
        h = enc.conv_in(x)
        feats = [h.mean((2, 3))]
        for blk in enc.down_blocks:
            h = blk(h)
            feats.append(h.mean((2, 3)))
        h = enc.mid_block(h)
        feats.append(h.mean((2, 3)))
        return feats

    def head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """E from cached features: mean_l(W_l F_l + b_l) → LeakyReLU → W_final · + b_final."""
        h = torch.stack([p(f.float()) for p, f in zip(self.proj, feats)]).mean(0)
        return self.final(F.leaky_relu(h, 0.2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# ---------------------------------------------------------------------------- weight offsets
class MultiplicativeLinear(nn.Module):
    """``base`` (a frozen ``nn.Linear``) with weight W0 ⊙ (1 + ΔW) (Ahmad's notes, eq 4.20).
    ΔW (``delta``, the shape of W0) starts at zero: the output is then bitwise the base's."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        self.base = base
        base.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros_like(base.weight))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight * (1 + self.delta)

    def forward(self, x):
        return F.linear(x, self.weight, self.base.bias)


def add_weight_offsets(unet, projections=_PROJ, attention=("attn1", "attn2")) -> dict:
    """Wrap every ``attn{1,2}.to_{q,k,v}`` of the UNet in a :class:`MultiplicativeLinear`
    (layout-independent: found by name). Returns ``{module name: wrapper}``.
    Raises ``ValueError`` naming ``projections`` if nothing matches."""
    found = {}
    for name, mod in list(unet.named_modules()):
        if name.rsplit(".", 1)[-1] not in attention:
            continue
        for p in projections:
            lin = getattr(mod, p, None)
            if isinstance(lin, MultiplicativeLinear):
                found[f"{name}.{p}"] = lin
            elif isinstance(lin, nn.Linear):
                w = MultiplicativeLinear(lin)
                setattr(mod, p, w)
                found[f"{name}.{p}"] = w
    if not found:
        raise ValueError(f"projections {projections} matched no attention layer of the UNet")
    return found


def remove_weight_offsets(unet) -> None:
    """Put the plain ``nn.Linear`` layers back (the offsets are dropped)."""
    for name, mod in list(unet.named_modules()):
        for p in _PROJ:
            lin = getattr(mod, p, None)
            if isinstance(lin, MultiplicativeLinear):
                setattr(mod, p, lin.base)


# ---------------------------------------------------------------------------- the model
@dataclass
class E4TModel:
    """The trainable parts: the encoder, the weight offsets, and ⟨c⟩ (the coarse word's row)."""
    encoder: ImageEncoder
    offsets: dict
    coarse: torch.Tensor
    scale: float = SCALE

    def parameters(self):
        return list(self.encoder.parameters()) + [w.delta for w in self.offsets.values()]

    def embedding(self, feats) -> tuple[torch.Tensor, torch.Tensor]:
        """(⟨d⟩ = ⟨c⟩ + s·E(I) of eq 4.15, E(I)), each (n, D)."""
        e = self.encoder.head(feats)
        return self.coarse.to(e.dtype) + self.scale * e, e

    def state_dict(self) -> dict:
        sd = {f"encoder.{k}": v.detach().clone() for k, v in self.encoder.state_dict().items()}
        sd.update({f"delta.{k}": w.delta.detach().clone() for k, w in self.offsets.items()})
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.encoder.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("encoder.")})
        with torch.no_grad():
            for k, w in self.offsets.items():
                if f"delta.{k}" in sd:
                    w.delta.copy_(sd[f"delta.{k}"])


def _token_row(pipe, word: str) -> int:
    ids = pipe.tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"class word must be one token, got {word!r} (ids {ids})")
    return ids[0]


def _fit(pipe, images) -> torch.Tensor:
    from .lora import fit_images
    return fit_images(pipe, images)


class _EmbeddingSwap:
    """A forward hook on the token-embedding table: at the positions holding ``token_id`` the
    output is replaced by one vector per sample (``vectors`` (B, D)), keeping the graph."""

    def __init__(self, pipe, token_id: int):
        self.token_id, self.vectors = token_id, None
        self.handle = pipe.text_encoder.get_input_embeddings().register_forward_hook(self)

    def __call__(self, module, inputs, out):
        if self.vectors is None:
            return out
        mask = (inputs[0] == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.vectors[:, None, :].to(out.dtype), out)

    def remove(self):
        self.handle.remove()


def _build(pipe, coarse_word: str) -> E4TModel:
    freeze(pipe.unet, pipe.vae, pipe.text_encoder)
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(0)
        enc = ImageEncoder(pipe.vae, dim)
    offsets = add_weight_offsets(pipe.unet)
    row = pipe.text_encoder.get_input_embeddings().weight[_token_row(pipe, coarse_word)]
    return E4TModel(encoder=enc, offsets=offsets, coarse=row.detach().clone())


def _train(pipe, model: E4TModel, token_id: int, images: torch.Tensor, captions: list,
           steps: int, lr: float, batch_size: int, reg_weight: float, seed: int, progress: bool,
           desc: str, delta_lr: float | None = None):
    """The loop of eq 4.22 on (images, captions) that contain the placeholder ``token_id``."""
    from .common import encode_text

    lat = encode_images(pipe, images)
    feats = model.encoder.features(images.to(pipe.vae.dtype))
    swap = _EmbeddingSwap(pipe, token_id)
    gen = torch.Generator().manual_seed(seed)
    acp = pipe.scheduler.alphas_cumprod
    n = len(lat)
    reg_log = []

    def loss_fn(step):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        d, e = model.embedding([f[idx] for f in feats])
        swap.vectors = d
        cond = encode_text(pipe, [captions[i] for i in idx.tolist()], grad=True)
        reg = (e ** 2).sum(1).mean()                                       # eq 4.16
        reg_log.append(float(reg.detach()))
        return diffusion_loss(pipe.unet, lat[idx], cond, acp, generator=gen) + reg_weight * reg
    groups = [dict(params=list(model.encoder.parameters()), lr=lr),
              dict(params=[w.delta for w in model.offsets.values()], lr=delta_lr or lr)]
    try:
        res = train_loop(groups, loss_fn, steps, lr, desc=desc, progress=progress)
    finally:
        swap.remove()
    res.extra["reg"] = reg_log
    return res


# ---------------------------------------------------------------------------- pre-training
def domain_dataset(n: int = 600, seed: int = 0):
    """The domain: ``n`` single-object scenes of the *training* shapes and colours (plain and
    textured backgrounds), captioned with the pre-training placeholder in place of the shape word
    (``"a small red <e4t> on the left"`` or just ``"a <e4t>"``). Returns (images (n, 64, 64, 3),
    captions, shapes)."""
    n = check_int(n, "n", min=1)
    rng = np.random.default_rng(seed)
    ims, caps, shapes = [], [], []
    for i in range(n):
        o = dict(shape=S.TRAIN_SHAPES[rng.integers(len(S.TRAIN_SHAPES))],
                 color=S.TRAIN_COLORS[rng.integers(len(S.TRAIN_COLORS))],
                 size=list(S.SIZES)[rng.integers(2)], position=list(S.POSITIONS)[rng.integers(3)])
        bg = "plain" if rng.random() < 0.7 else S.BACKGROUNDS[rng.integers(1, len(S.BACKGROUNDS))]
        im, _ = S.render_objects([dict(o, cy=float(rng.uniform(*S._Y_RANGE)))], background=bg,
                                 seed=int(rng.integers(2**31)))
        ims.append(im)
        shapes.append(o["shape"])
        if rng.random() < 0.5:
            caps.append(f"a {o['size']} {o['color']} {_PRETRAIN_TOKEN} "
                        f"{S.POSITION_PHRASES[o['position']]}")
        else:
            caps.append(f"a {_PRETRAIN_TOKEN}")
    return np.stack(ims).astype(np.float32), caps, shapes


def pretrain(pipe, n_images: int = 600, steps: int = 1500, lr: float = 1e-3,
             batch_size: int = 16, reg_weight: float = 1e-3, seed: int = 0,
             progress: bool = True) -> tuple[E4TModel, object]:
    """Domain pre-training (Ahmad's notes, eq 4.22): the encoder and the weight offsets on
    :func:`domain_dataset`. Changes ``pipe`` (adds ``<e4t>``, wraps the attention projections).
    Returns (model, TrainResult)."""
    ims, caps, _ = domain_dataset(n_images, seed=seed)
    tok = add_placeholder(pipe, _PRETRAIN_TOKEN, initializer=_COARSE)[0]
    torch.manual_seed(seed)
    model = _build(pipe, _COARSE)
    res = _train(pipe, model, tok, _fit(pipe, ims), caps, steps, lr, batch_size, reg_weight,
                 seed, progress, desc="E4T pre-training", delta_lr=lr * 0.1)
    return model, res


def load_pretrained(pipe, coarse_word: str, path=WEIGHTS_DIR) -> E4TModel:
    """An :class:`E4TModel` on ``pipe`` with the shipped pre-trained encoder and offsets when
    they fit the pipeline (the shapes model), else freshly initialised (E = 0, ΔW = 0: e.g. on
    ``"sd-1.5-layout-tiny"``, where nothing was pre-trained)."""
    from safetensors.torch import load_file

    model = _build(pipe, coarse_word)
    f = Path(path) / "e4t.safetensors"
    if f.exists():
        sd = load_file(str(f))
        ours = model.state_dict()
        if set(sd) == set(ours) and all(sd[k].shape == ours[k].shape for k in sd):
            model.load_state_dict(sd)
    return model


# ---------------------------------------------------------------------------- per concept
def e4t(pipe, images, prompt: str | list, placeholder: str, class_word: str, steps: int = 30,
        lr: float = 3e-4, batch_size: int = 5, reg_weight: float = 1e-3, pretrained=WEIGHTS_DIR,
        seed: int = 0, progress: bool = True):
    """Fast per-concept tuning (Ahmad's notes, §4.5, eqs 4.15, 4.20, 4.22): start from the
    pre-trained encoder and offsets (``pretrained``, a directory, or None for a fresh start),
    add ``placeholder`` to the tokenizer, tune both for ``steps`` steps on ``images`` (n, 64, 64,
    3) in [0, 1] (a :class:`ConceptSet`, an array or a tensor) captioned ``prompt`` (one string
    or one per image; each must contain ``placeholder``), then write the mean ⟨d⟩ over the
    images into the placeholder's row. ``pipe`` is changed in place (offsets stay in its UNet).

    Returns ``(model, TrainResult)``; ``TrainResult.extra['embedding']`` is ⟨d⟩ (D,).
    Raises ``ValueError`` naming ``images``, ``prompt``, ``placeholder``, ``steps`` or ``lr``.
    """
    steps = check_int(steps, "steps", min=1)
    lr = check_positive(lr, "lr")
    x = _fit(pipe, images)
    n = len(x)
    caps = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(caps) != n:
        raise ValueError(f"prompt must be one string or one per image ({n}), got {len(caps)}")
    if not all(placeholder in c.split() for c in caps):
        raise ValueError(f"prompt must contain the placeholder {placeholder!r}, got {caps[0]!r}")
    tok = add_placeholder(pipe, placeholder, initializer=class_word)[0]
    torch.manual_seed(seed)
    model = load_pretrained(pipe, class_word, pretrained) if pretrained else _build(pipe, class_word)
    res = _train(pipe, model, tok, x, caps, steps, lr, batch_size, reg_weight, seed, progress,
                 desc="E4T tuning")
    with torch.no_grad():
        d, _ = model.embedding(model.encoder.features(x.to(pipe.vae.dtype)))
        d = d.mean(0)
        pipe.text_encoder.get_input_embeddings().weight[tok] = d.to(
            pipe.text_encoder.get_input_embeddings().weight.dtype)
    res.extra["embedding"] = d
    return model, res


def _eval_config(concept: ConceptSet, progress: bool = False):
    from .evaluate import pipeline_sampler, protocol_pipeline, Tuned

    pipe = protocol_pipeline()
    model, res = e4t(pipe, concept, concept.captions, concept.placeholder, concept.class_word,
                     progress=progress)
    sd = model.state_dict()
    sd["embedding"] = res.extra["embedding"]
    return Tuned(sample=pipeline_sampler(pipe, progress=progress), placeholder=concept.placeholder,
                 trained_parameters=res.trained_parameters, file_bytes=tensor_bytes(sd),
                 train_seconds=res.seconds,
                 extra=dict(steps=len(res.losses), final_loss=float(np.mean(res.losses[-5:])),
                            pretrained=(WEIGHTS_DIR / "e4t.safetensors").exists()))


def _eval_config_scratch(concept: ConceptSet, progress: bool = False):
    """The same tuning without the domain pre-training (E = 0, ΔW = 0 at the start)."""
    from .evaluate import pipeline_sampler, protocol_pipeline, Tuned

    pipe = protocol_pipeline()
    model, res = e4t(pipe, concept, concept.captions, concept.placeholder, concept.class_word,
                     pretrained=None, progress=progress)
    sd = model.state_dict()
    return Tuned(sample=pipeline_sampler(pipe, progress=progress), placeholder=concept.placeholder,
                 trained_parameters=res.trained_parameters, file_bytes=tensor_bytes(sd),
                 train_seconds=res.seconds, extra=dict(steps=len(res.losses), pretrained=False))


EVAL_CONFIGS = {"e4t": _eval_config, "e4t_scratch": _eval_config_scratch}


def main(argv=None):  # pragma: no cover - a command
    import argparse
    from safetensors.torch import save_file

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description="E4T domain pre-training on the shapes model")
    ap.add_argument("command", choices=["train"])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--n-images", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(WEIGHTS_DIR))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..models.load import load_pipeline

    pipe = load_pipeline("shapes")
    t0 = time.perf_counter()
    model, res = pretrain(pipe, n_images=args.n_images, steps=args.steps,
                          batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "e4t.safetensors"))
    L = res.losses
    (out / "TRAINING.json").write_text(json.dumps(dict(
        command=f"python -m diffnotes.personalization.e4t train --steps {args.steps} "
                f"--n-images {args.n_images} --batch-size {args.batch_size} --threads {args.threads}",
        steps=args.steps, n_images=args.n_images, batch_size=args.batch_size, lr=1e-3, delta_lr=1e-4,
        reg_weight=1e-3, scale=SCALE, threads=args.threads, seconds=round(time.perf_counter() - t0, 1),
        trained_parameters=res.trained_parameters,
        loss_first_100=float(np.mean(L[:100])), loss_last_100=float(np.mean(L[-100:])),
        reg_last_100=float(np.mean(res.extra["reg"][-100:])),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        note="domain = the generator's single-object scenes of the training shapes and colours "
             "(no heart, no purple); coarse word 'star'"), indent=1) + "\n")
    print("done", res.seconds, np.mean(L[:100]), np.mean(L[-100:]))


if __name__ == "__main__":  # pragma: no cover
    main()
