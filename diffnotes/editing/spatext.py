"""SpaText: layout control by extra input channels that carry a spatio-textual map.

Avrahami et al. 2023 (SpaText; Ahmad's notes, §3.3.1, eqs 3.11–3.12) give the user a global
prompt and a sparse segmentation map with a free-form phrase per segment. Each segment's
embedding is painted into the pixels of its mask, zeros elsewhere (Ahmad's notes, eq 3.11):

    ST[j, k] = e_i  if (j, k) ∈ S_i,   0 otherwise,

the map is resized to the latent grid and concatenated to the noisy latent along the channels,
so the UNet sees (C + r) input channels, ε_θ([z_t ; ST], t, τ(t_global)). Only ``conv_in``
changes shape: its weights for the r new channels start at zero, so the untrained model *is*
the base model (:func:`SpaTextModel.from_pipe`; tested bitwise in float64), and fine-tuning
teaches the UNet to read the map.

**How this differs from the paper.** SpaText embeds each training segment with CLIP's *image*
encoder (the segment cropped, other pixels masked) and, at inference, maps the user's phrase
into that space with a DALL·E-2-style prior, P(CLIP_txt(t_local)) → CLIP_img (eq 3.12). Here
there are no CLIP weights and no prior. The segment's embedding is the shipped text encoder's
embedding of its phrase (``"a red circle"``): the mean of the last hidden states over the
phrase's tokens, start and end tokens excluded (:func:`phrase_embeddings`), mapped to r = 16
map channels by a fixed projection, a PCA whitening fitted once on the training phrases
(:meth:`SpaTextModel.from_pipe`; the raw mean states of different phrases are nearly parallel,
cosine up to 0.999, and whitening separates them). Training and inference then use the *same*
embedding space, so no prior is needed; what is lost is the paper's point that image embeddings
of segments come for free from any segmented photograph, with no caption per segment (the
shapes generator knows every object's phrase, so here text costs nothing). The paper
concatenates all d_CLIP channels; here r = 16 < d = 64, and the centre tap of ``conv_in``'s new
weights is the learned linear map from those channels to the UNet's features.

**Resizing.** Ahmad's notes say the map is "downsampled ... by the VQ-VAE's encoder"; it is a
field of embeddings, not an image, so it is resized, not encoded (an erratum of the notes).
Here each mask is area-averaged to the latent grid (:func:`mask_coverage`: the fraction of each
latent cell that the segment covers) and the map is Σ_i coverage_i · e_i (:func:`paint`): a
cell outside every segment is exactly zero, a cell inside segment i is exactly e_i, a border
cell holds the covered fraction of e_i. Segments may not overlap.

**Training** (:func:`train`, ``python -m diffnotes.editing.spatext train``) fine-tunes the
whole shapes UNet (1.08 M parameters, 4.4 MB in float32, within the 10 MB budget; the text
encoder and the VAE stay frozen) on generator scenes and their masks, with the ε-loss of the
base model's recipe (:func:`diffnotes.models.train.eps_loss`). As in the paper, segments smaller
than a threshold are discarded and a random number K of the remaining ones is kept
(:func:`eligible_segments`, :func:`choose_segments`); the paper's threshold is 5% of the image,
but a small shapes object covers 3.2% (a circle of radius 6.5 px in 64×64), so training uses 2%
(``--min-segment-fraction``). For classifier-free guidance, 10% of the samples drop both the
caption and every segment (the unconditional branch at sampling time drops both too), 10% only
the caption and 10% only the segments.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..ddim import ddim_sample
from ..guidance import cfg
from ..utils import check_int, check_range, check_tensor
from .common import encode_prompts, pipe_alphas_cumprod, pipe_timesteps

__all__ = ["SpaTextConvIn", "SpaTextModel", "phrase_embeddings", "mask_coverage", "paint",
           "spatio_textual_map", "eligible_segments", "choose_segments", "spatext_eps_model",
           "spatext", "load_spatext", "object_phrase", "SpaTextConfig", "SHIPPED", "train",
           "evaluate", "load_results", "main", "WEIGHTS_DIR", "RESULTS_FILE"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "spatext"
RESULTS_FILE = Path(__file__).resolve().parent / "results" / "spatext.json"
WEIGHTS_FILE = "spatext_unet.safetensors"


# ---------------------------------------------------------------------------- the model
class SpaTextConvIn(torch.nn.Module):
    """``conv_in`` widened from C to C + d input channels: ``base`` is the UNet's own conv on the
    latent channels, ``extra`` (no bias, same kernel, stride and padding) the new weights on the
    map's channels, zero-initialised. ``forward([z ; ST]) = base(z) + extra(ST)``, which is
    exactly one convolution over the concatenated channels with weights ``[W_base, W_extra]``
    (:meth:`widened_weight`); written as a sum, the zero-initialised model adds exact zeros, so it
    equals the base model bitwise."""

    def __init__(self, base: torch.nn.Conv2d, extra_channels: int):
        super().__init__()
        self.base = base
        self.latent_channels = base.in_channels
        self.extra = torch.nn.Conv2d(extra_channels, base.out_channels, base.kernel_size,
                                     stride=base.stride, padding=base.padding, bias=False,
                                     device=base.weight.device, dtype=base.weight.dtype)
        torch.nn.init.zeros_(self.extra.weight)

    @property
    def in_channels(self) -> int:
        return self.latent_channels + self.extra.in_channels

    def widened_weight(self) -> torch.Tensor:
        """The weights of the one widened convolution, (out, C + d, k, k)."""
        return torch.cat([self.base.weight, self.extra.weight], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.latent_channels
        return self.base(x[:, :c]) + self.extra(x[:, c:])


class SpaTextModel(torch.nn.Module):
    """A copy of a pipeline's UNet whose ``conv_in`` reads C + r channels (:class:`SpaTextConvIn`),
    with the fixed projection of phrase embeddings to the r map channels:
    ``model(z_t, t, text_embeddings, st_map) -> ε`` and ``model.project(e)`` for embeddings e
    (K, d) of :func:`phrase_embeddings`, ``(e − center) @ proj``. Build an untrained one (equal
    to the base model) with :meth:`from_pipe`, or load the shipped shapes weights with
    :func:`load_spatext`."""

    def __init__(self, unet, center: torch.Tensor, proj: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("center", center)
        self.register_buffer("proj", proj)
        self.latent_channels = unet.conv_in.latent_channels

    @property
    def embed_dim(self) -> int:
        """d, the text encoder's hidden size."""
        return int(self.proj.shape[0])

    @property
    def channels(self) -> int:
        """r, the number of map channels the UNet reads."""
        return int(self.proj.shape[1])

    @classmethod
    def from_pipe(cls, pipe, phrases: Sequence[str] | None = None,
                  channels: int | None = None) -> "SpaTextModel":
        """An untrained SpaText model of ``pipe``: its UNet (deep-copied; the pipeline's own UNet
        is not touched) with ``conv_in`` widened by zero weights for r new channels.

        The projection: without ``phrases`` the identity (r = d, the whole embedding, as the
        paper concatenates all of d_CLIP). With ``phrases`` (the training vocabulary of phrases)
        a fixed PCA whitening of their embeddings to r = ``channels`` (default 16) components:
        center = their mean, proj = V_r / (s_r / √(K − 1)) from the SVD of the centred
        embeddings, so each map channel has variance 1 over the phrases. The text encoder's mean
        token states of different phrases are nearly parallel (cosine up to 0.999 for the shapes
        model: one common direction dominates); whitened to 16 channels the largest cosine of
        two distinct colour-shape phrases is 0.76, which a convolution can tell apart."""
        unet = copy.deepcopy(pipe.unet)
        d = int(pipe.text_encoder.config.hidden_size)
        dev, dt = pipe.unet.device, pipe.unet.dtype
        if phrases is None:
            if channels is not None:
                raise ValueError("channels needs phrases (the projection is fitted on them)")
            center = torch.zeros(d, dtype=torch.float64)
            proj = torch.eye(d, dtype=torch.float64)
        else:
            r = check_int(16 if channels is None else channels, "channels", min=1)
            E = phrase_embeddings(pipe, list(phrases), "phrases").to(torch.float64)
            if r > min(len(E) - 1, d):
                raise ValueError(f"channels must be at most {min(len(E) - 1, d)} (phrases - 1 "
                                 f"and the embedding size), got {r}")
            center = E.mean(0)
            _, S, Vt = torch.linalg.svd(E - center, full_matrices=False)
            proj = Vt[:r].T / (S[:r] / (len(E) - 1) ** 0.5)
        unet.conv_in = SpaTextConvIn(unet.conv_in, proj.shape[1])
        return cls(unet, center.to(dev, dt), proj.to(dev, dt))

    @classmethod
    def _like(cls, pipe, channels: int) -> "SpaTextModel":
        """A model with placeholder buffers of r = ``channels`` (for loading a state dict)."""
        unet = copy.deepcopy(pipe.unet)
        d = int(pipe.text_encoder.config.hidden_size)
        unet.conv_in = SpaTextConvIn(unet.conv_in, channels)
        dev, dt = pipe.unet.device, pipe.unet.dtype
        return cls(unet, torch.zeros(d, device=dev, dtype=dt),
                   torch.zeros(d, channels, device=dev, dtype=dt))

    def project(self, e: torch.Tensor) -> torch.Tensor:
        """Phrase embeddings (K, d) → map vectors (K, r): ``(e − center) @ proj``. The empty set
        stays empty (K = 0)."""
        e = e.to(self.proj.device, self.proj.dtype)
        if e.shape[0] == 0:
            return e.new_zeros(0, self.channels)
        return (e - self.center) @ self.proj

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                st: torch.Tensor) -> torch.Tensor:
        if st.shape[0] != x.shape[0] and st.shape[0] == 1:
            st = st.expand(x.shape[0], -1, -1, -1)
        return self.unet(torch.cat([x, st.to(x.dtype)], dim=1), t, encoder_hidden_states=c).sample

    def new_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that did not exist in the base model (the map's ``conv_in`` weights)."""
        return [self.unet.conv_in.extra.weight]


# ---------------------------------------------------------------------------- the map
def object_phrase(color: str, shape: str) -> str:
    """The phrase of one shapes object, as the generator's captions write it: ``"a red circle"``,
    ``"an orange star"``."""
    from ..data.shapes import caption_objects
    return caption_objects([dict(shape=shape, color=color)], False, False)[0]


def phrase_embeddings(pipe, phrases: Sequence[str], name: str = "segments") -> torch.Tensor:
    """Embeddings (K, d) of the segments' phrases: the text encoder's last hidden states averaged
    over the phrase's own tokens (start token, end token and padding excluded), on the UNet's
    device and dtype (:meth:`SpaTextModel.project` maps them to the map's channels). Raises ``ValueError`` naming
    ``name[k]`` for an empty phrase, a word the tokenizer does not know, or a phrase that does
    not fit the tokenizer's length."""
    tok = pipe.tokenizer
    d = int(pipe.text_encoder.config.hidden_size)
    dev, dt = pipe.unet.device, pipe.unet.dtype
    if len(phrases) == 0:
        return torch.zeros(0, d, device=dev, dtype=dt)
    L = tok.model_max_length
    ids, lengths = [], []
    for k, p in enumerate(phrases):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{name}[{k}] must have a non-empty phrase string, got {p!r}")
        raw = tok(p, add_special_tokens=False).input_ids
        if tok.unk_token_id is not None and tok.unk_token_id in raw:
            words = [w for w in p.split() if tok.unk_token_id in
                     tok(w, add_special_tokens=False).input_ids]
            raise ValueError(f"{name}[{k}] has phrase {p!r} with word(s) {words} that the "
                             f"tokenizer does not know")
        if len(raw) > L - 2:
            raise ValueError(f"{name}[{k}] has phrase {p!r} of {len(raw)} tokens; at most "
                             f"{L - 2} fit the tokenizer")
        ids.append(tok(p, padding="max_length", max_length=L, truncation=True,
                       return_tensors="pt").input_ids[0])
        lengths.append(len(raw))
    ids = torch.stack(ids).to(pipe.text_encoder.device)
    with torch.no_grad():
        h = pipe.text_encoder(ids)[0].to(torch.float64)           # (K, L, d)
    pos = torch.arange(L, device=h.device)[None, :]
    n = torch.tensor(lengths, device=h.device)[:, None]
    w = ((pos >= 1) & (pos <= n)).to(h.dtype)                     # the phrase's own tokens
    e = (h * w[..., None]).sum(1) / n.to(h.dtype)
    return e.to(dev, dt)


def mask_coverage(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (..., H, W) resized to the latent grid ``size`` = (h, w) by area averaging: the
    fraction of each latent cell the mask covers, in [0, 1] (1 inside, 0 outside, exactly)."""
    lead = masks.shape[:-2]
    m = masks.reshape(-1, 1, *masks.shape[-2:]).to(torch.float64 if masks.dtype == torch.float64
                                                   else torch.float32)
    out = F.interpolate(m, size=tuple(size), mode="area")
    return out.reshape(*lead, *size)


def paint(embeddings: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """The spatio-textual map of Ahmad's notes, eq 3.11 (SpaText §3.1) on the latent grid:
    ``ST = Σ_i coverage_i · e_i`` for embeddings (..., K, d) and coverages (..., K, h, w), giving
    (..., d, h, w); zero where no segment is, e_i inside segment i."""
    return torch.einsum("...kd,...khw->...dhw", embeddings, coverage.to(embeddings.dtype))


def _image_hw(pipe) -> tuple[tuple[int, int], tuple[int, int]]:
    f = int(getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1)))
    s = pipe.unet.config.sample_size
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return (h * f, w * f), (h, w)


def _check_segments(pipe, segments) -> tuple[list[str], torch.Tensor]:
    """The phrases and the (K, H, W) bool masks of ``segments``, checked."""
    (H, W), _ = _image_hw(pipe)
    if isinstance(segments, (str, dict)) or not isinstance(segments, (list, tuple)):
        raise ValueError(f"segments must be a list of (phrase, mask) pairs, got "
                         f"{type(segments).__name__}")
    phrases, masks = [], []
    for k, seg in enumerate(segments):
        if not isinstance(seg, (list, tuple)) or len(seg) != 2:
            raise ValueError(f"segments[{k}] must be a (phrase, mask) pair, got {seg!r}")
        p, m = seg
        if not isinstance(p, str):
            raise ValueError(f"segments[{k}] must have a phrase string first, got "
                             f"{type(p).__name__}")
        m = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m)
        if m.shape != (H, W):
            raise ValueError(f"segments[{k}] has a mask of shape {tuple(m.shape)}; expected "
                             f"({H}, {W}), the image size of this pipeline")
        if m.dtype != torch.bool:
            if m.is_floating_point() or m.dtype in (torch.int8, torch.int16, torch.int32,
                                                    torch.int64, torch.uint8):
                if not bool(((m == 0) | (m == 1)).all()):
                    raise ValueError(f"segments[{k}] has a mask that is not boolean (values "
                                     f"other than 0 and 1)")
            m = m != 0
        phrases.append(p)
        masks.append(m.cpu())
    M = torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool)
    if len(masks) > 1:
        overlap = M.sum(0) > 1
        if bool(overlap.any()):
            pairs = [(i, j) for i in range(len(masks)) for j in range(i + 1, len(masks))
                     if bool((M[i] & M[j]).any())]
            raise ValueError(f"segments must not overlap: the masks of segments {pairs} share "
                             f"{int(overlap.sum())} pixels")
    return phrases, M


def spatio_textual_map(pipe, segments, model: "SpaTextModel") -> torch.Tensor:
    """The (1, r, h, w) spatio-textual map of ``segments`` (a list of ``(phrase, mask)``, masks
    (H, W) bool at image resolution, not overlapping) on the pipeline's latent grid: each
    phrase's :func:`phrase_embeddings`, projected by ``model`` (:meth:`SpaTextModel.project`),
    painted into its mask's :func:`mask_coverage` (:func:`paint`). No segments: the zero map."""
    phrases, M = _check_segments(pipe, segments)
    _, hw = _image_hw(pipe)
    e = model.project(phrase_embeddings(pipe, phrases))
    cov = mask_coverage(M.to(torch.float64), hw).to(e.device)
    return paint(e, cov)[None]


# ---------------------------------------------------------------------------- training helpers
def eligible_segments(areas: torch.Tensor, image_pixels: int,
                      min_fraction: float = 0.05) -> torch.Tensor:
    """Which segments training may use (SpaText §3.1; Ahmad's notes, §3.3.1): those covering
    at least ``min_fraction`` of the image (pixel count ``areas``, any shape; the paper drops
    segments "smaller than 5%": a segment of exactly 5% is kept, ``area >= 0.05 · H·W``)."""
    check_range(min_fraction, "min_fraction", 0, 1)
    return areas >= min_fraction * image_pixels


def choose_segments(eligible: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each row of ``eligible`` (B, K) bool, keep a random number K' ∈ {1, …, n} of its n
    eligible segments, chosen uniformly without repetition (all-False rows stay all False);
    the random choice of "K segments" in SpaText's training. Returns (B, K) bool."""
    B, K = eligible.shape
    n = eligible.sum(1)
    u = torch.rand(B, generator=generator)
    k = torch.where(n > 0, (u * n).floor().long().clamp(max=(n - 1).clamp_min(0)) + 1, 0)
    score = torch.rand(B, K, generator=generator).masked_fill(~eligible.cpu(), 2.0)
    rank = score.argsort(1).argsort(1)                          # 0 = smallest score
    return (rank < k[:, None]).to(eligible.device) & eligible


# ---------------------------------------------------------------------------- sampling
def spatext_eps_model(model: SpaTextModel, cond: torch.Tensor, st: torch.Tensor,
                      null: torch.Tensor | None = None, guidance_scale: float = 1.0):
    """``eps_model(x, t)`` of a SpaText model, in the way of
    :func:`diffnotes.editing.common.pipe_eps_model`: with ``null`` and a scale, one batched pass
    of [unconditional rows; conditional rows] combined by :func:`diffnotes.guidance.cfg`
    (Ahmad's notes, eq 1.44), where the unconditional branch drops **both** the global prompt
    (``null``) and the segments (a zero map): ε_u = ε_θ([z; 0], t, ∅),
    ε_c = ε_θ([z; ST], t, τ(t_global)), ε = ε_u + s (ε_c − ε_u)."""
    check_tensor(cond, "cond", ndim=3)
    check_tensor(st, "st", ndim=4)
    if null is None and guidance_scale == 1.0:
        def eps_model(x, t):
            B = x.shape[0]
            return model(x, t, cond.expand(B, -1, -1), st.expand(B, -1, -1, -1))
        return eps_model
    if null is None:
        raise ValueError("null must be given when guidance_scale != 1")

    def eps_model(x, t):
        B = x.shape[0]
        c = torch.cat([null.expand(B, -1, -1), cond.expand(B, -1, -1)])
        s = torch.cat([torch.zeros_like(st).expand(B, -1, -1, -1), st.expand(B, -1, -1, -1)])
        out = model(torch.cat([x, x]), torch.cat([t, t]), c, s)
        eu, ec = out.chunk(2)
        return cfg(eu, ec, guidance_scale)
    return eps_model


def spatext(pipe, prompt: str, segments, *, model: SpaTextModel | None = None,
            num_inference_steps: int = 20, guidance_scale: float = 7.5,
            generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
            output_type: str = "pil"):
    """Generate ``prompt`` with each segment's phrase inside its mask (SpaText, Avrahami et al.
    2023; Ahmad's notes, §3.3.1): DDIM (:func:`diffnotes.ddim.ddim_sample`, Ahmad's notes,
    eq 1.21; DDIM eq 12) on the guided ε of :func:`spatext_eps_model`, whose UNet reads the
    latent and the spatio-textual map (eq 3.11, :func:`spatio_textual_map`).

    Parameters
    ----------
    prompt : the global prompt (e.g. ``"a red circle and a blue square"``).
    segments : list of ``(phrase, mask)``; mask an (H, W) bool array at image resolution
        (64×64 for shapes), resized to the latent grid by area; segments may not overlap; an
        empty list gives the zero map.
    model : a :class:`SpaTextModel`; None loads the shipped weights (:func:`load_spatext`).
    generator, latents : the initial latent (1, C, h, w) or (C, h, w), else drawn from
        ``generator`` as :func:`diffnotes.editing.p2p.prompt_to_prompt` draws it.
    output_type : ``"pil"`` (a list with one PIL image), ``"np"`` ((1, H, W, 3) float in [0, 1])
        or ``"latent"`` ((1, C, h, w)).

    Raises ``ValueError`` naming the argument: a mask of the wrong shape or not boolean,
    overlapping masks, a phrase with unknown words, a bad step count, scale or output type.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    gs = check_range(guidance_scale, "guidance_scale")
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    _check_segments(pipe, segments)
    if model is None:
        model = load_spatext(pipe)
    if not isinstance(model, SpaTextModel):
        raise ValueError(f"model must be a SpaTextModel or None, got {type(model).__name__}")
    unet = pipe.unet
    if model.embed_dim != int(pipe.text_encoder.config.hidden_size):
        raise ValueError(f"model projects {model.embed_dim}-dim phrase embeddings but this "
                         f"pipeline's text encoder gives "
                         f"{pipe.text_encoder.config.hidden_size}")
    model.to(unet.device, unet.dtype)
    st = spatio_textual_map(pipe, segments, model)
    C = model.latent_channels
    _, (h, w) = _image_hw(pipe)
    if latents is None:
        x = torch.randn((1, C, h, w), generator=generator, dtype=unet.dtype,
                        device=generator.device if generator is not None else unet.device)
        x = x * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    else:
        check_tensor(latents, "latents", ndim=(3, 4))
        x = latents if latents.ndim == 4 else latents.unsqueeze(0)
        if tuple(x.shape) != (1, C, h, w):
            raise ValueError(f"latents must have shape (1, {C}, {h}, {w}) or ({C}, {h}, {w}), "
                             f"got {tuple(latents.shape)}")
    x = x.to(unet.device, unet.dtype)
    cond = encode_prompts(pipe, prompt)
    null = encode_prompts(pipe, "") if gs != 1.0 else None
    eps_model = spatext_eps_model(model, cond, st.to(unet.device, unet.dtype), null, gs)
    was_training = model.training
    model.eval()
    try:
        z = ddim_sample(eps_model, x, pipe_timesteps(pipe, N), pipe_alphas_cumprod(pipe))
    finally:
        model.train(was_training)
    if output_type == "latent":
        return z
    from .inversion import decode_latents
    img = decode_latents(pipe, z).permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return img
    from PIL import Image
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in img]


def load_spatext(pipe, path: str | os.PathLike | None = None) -> SpaTextModel:
    """The shipped SpaText model of the shapes pipeline (``diffnotes/weights/spatext``, written by
    :func:`train`), on the pipeline's UNet device and dtype. The weights are the whole fine-tuned
    UNet (its ``conv_in`` widened), loaded onto a :meth:`SpaTextModel.from_pipe` of ``pipe``.
    Raises ``ValueError`` for a pipeline whose UNet or text encoder does not match them (e.g.
    the Stable-Diffusion-layout tiny pipeline: build an untrained model with
    ``SpaTextModel.from_pipe(pipe)`` and train it)."""
    from safetensors.torch import load_file
    path = Path(path) if path is not None else WEIGHTS_DIR
    f = path / WEIGHTS_FILE
    if not f.exists():
        raise FileNotFoundError(f"no SpaText weights at {f}; train them with "
                                f"`python -m diffnotes.editing.spatext train`")
    state = load_file(str(f))
    if "proj" not in state or state["proj"].ndim != 2:
        raise ValueError(f"{f} is not a SpaText weights file (no 'proj')")
    model = SpaTextModel._like(pipe, int(state["proj"].shape[1]))
    own = model.state_dict()
    bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if bad or len(state) != len(own):
        raise ValueError(f"pipe does not match the SpaText weights in {path} (trained on the "
                         f"shapes pipeline): {len(bad)} mismatched tensors, e.g. {bad[:2]}; "
                         f"use SpaTextModel.from_pipe(pipe) and train it")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.to(pipe.unet.device, pipe.unet.dtype).eval()


# ---------------------------------------------------------------------------- training
from ..models.train import TrainConfig, _opt  # noqa: E402  (the base recipe's config and fields)


@dataclass
class SpaTextConfig(TrainConfig):
    """Every setting of ``python -m diffnotes.editing.spatext train``: the base model's
    :class:`diffnotes.models.train.TrainConfig` (seed, threads, batch size, learning rate, EMA,
    Min-SNR-γ and object weighting of the ε-loss, scenes) with fine-tuning defaults and the
    segment settings. Only :data:`OPTIONS` are command-line options."""

    minutes: float = _opt(17.0, "wall-time budget of the fine-tuning loop")
    steps: int = _opt(1000, "max fine-tuning steps (the time budget also caps)")
    n_scenes: int = _opt(12000, "generated training scenes")
    textured_fraction: float = _opt(0.1, "fraction of scenes with textured backgrounds")
    object_count_probs: tuple | None = _opt((0.35, 0.45, 0.2), "probabilities of 1, 2, 3 objects")
    batch_size: int = _opt(32)
    lr: float = _opt(2e-4, "learning rate of the base UNet's weights")
    new_lr_mult: float = _opt(5.0, "learning-rate multiplier of the new conv_in weights")
    ema_decay: float = _opt(0.99)
    min_snr_gamma: float = _opt(5.0)
    object_weight: float = _opt(4.0)
    channels: int = _opt(16, "map channels r (PCA whitening of the phrase embeddings)")
    min_segment_fraction: float = _opt(0.02, "drop segments smaller than this fraction of the "
                                             "image (the paper: 0.05)")
    p_drop_both: float = _opt(0.1, "probability of dropping the caption and every segment (CFG)")
    p_drop_caption: float = _opt(0.1, "probability of dropping only the caption")
    p_drop_segments: float = _opt(0.1, "probability of dropping only the segments")
    seed: int = _opt(0)
    threads: int = _opt(1)
    out: str = _opt(str(WEIGHTS_DIR), "output directory")
    init_from: str | None = _opt(None, "directory of an earlier run's SpaText weights to "
                                       "continue from")


#: the command-line options of the training command (the other fields keep their defaults).
OPTIONS = ("minutes", "steps", "n_scenes", "textured_fraction", "object_count_probs",
           "batch_size", "lr", "new_lr_mult", "channels", "ema_decay", "min_snr_gamma", "object_weight",
           "min_segment_fraction", "p_drop_both", "p_drop_caption", "p_drop_segments", "seed",
           "threads", "cpu", "out", "init_from")
#: The defaults. The shipped ``diffnotes/weights/spatext`` came from two commands (its
#: TRAINING.json records both; ``init_record`` is the first): ``python -m
#: diffnotes.editing.spatext train`` (323 steps in its 17-minute budget on a shared CPU), then
#: ``python -m diffnotes.editing.spatext train --init-from diffnotes/weights/spatext --seed 1
#: --n-scenes 6000 --minutes 14 --p-drop-caption 0.2`` (333 more steps, new scenes, captions
#: dropped twice as often so that the map alone must place the objects). Step counts follow the
#: wall clock, so a rerun is close to, not bitwise, the shipped weights.
SHIPPED = SpaTextConfig()
NOTE = ("Fine-tunes the whole shapes UNet (conv_in widened by `channels` zero-initialised input "
        "channels for the spatio-textual map; text encoder and VAE frozen) on the eps-loss of the "
        "base recipe. Segment embeddings: the frozen text encoder's mean phrase-token states, "
        "PCA-whitened to `channels` on the 42 colour-shape phrases (a fixed projection saved with "
        "the weights as center/proj). Saved weights: the EMA weights of the whole model "
        "(float32).")


def _phrase_table(pipe):
    """Embeddings of every colour × shape phrase, and a (V, V) lookup from (colour token id,
    shape token id) to the row (−1: not an object phrase)."""
    from ..data.shapes import COLORS, SHAPES
    tok = pipe.tokenizer
    V = len(tok)
    lut = torch.full((V, V), -1, dtype=torch.long)
    phrases = []
    for c in COLORS:
        for s in SHAPES:
            ci, si = (tok(w, add_special_tokens=False).input_ids[0] for w in (c, s))
            lut[ci, si] = len(phrases)
            phrases.append(object_phrase(c, s))
    return phrase_embeddings(pipe, phrases), lut, phrases


def train(cfg: SpaTextConfig = SHIPPED, argv=None) -> dict:
    """Fine-tune a SpaText model of the shipped shapes pipeline with ``cfg`` and write
    ``spatext_unet.safetensors`` and ``TRAINING.json`` to ``cfg.out``; returns the record.

    Data: the base recipe's scenes (:func:`diffnotes.models.train._make_dataset`: images,
    caption token ids, each object's noun position and its mask area-averaged to the 16×16
    latent, i.e. :func:`mask_coverage`), encoded once by the frozen VAE
    (:func:`diffnotes.models.train.encode_latents`). Each object's phrase is read from its
    caption (the colour word sits just before the noun) and embedded by
    :func:`phrase_embeddings`. Per sample: eligible segments (≥ ``min_segment_fraction`` of the
    image), a random K of them (:func:`choose_segments`), the CFG drops, the map
    (:func:`paint`), then the ε-loss (:func:`diffnotes.models.train.eps_loss`) of
    ε_θ([z_t ; ST], t, τ(caption)). The whole UNet is trained (new weights at ``new_lr_mult``
    × lr), with the EMA, warm-up + cosine schedule and time budget of the base recipe
    (Accelerate: ``Accelerator``, ``prepare``, ``backward``)."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from ..ddpm import q_sample
    from ..models.load import load_pipeline
    from ..models.train import (_ema_update, _infinite, _make_dataset, _schedule, _swap_in,
                                encode_latents, eps_loss)

    args = cfg
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    out = Path(args.out)

    def log(msg):
        if accelerator.is_main_process:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t_start, cpu_start = time.time(), time.process_time()
    load_at_start = round(os.getloadavg()[0], 2)
    pipe = load_pipeline("shapes")
    data = _make_dataset(args.n_scenes, args.seed + 17, args.textured_fraction,
                         args.object_count_probs)
    latents = encode_latents(pipe.vae, data["images"]) * pipe.vae.config.scaling_factor
    raw_table, lut, phrases = _phrase_table(pipe)
    init_record = None
    if args.init_from:                 # continue an earlier run (its projection is kept)
        model = load_spatext(pipe, args.init_from).float()
        prev = Path(args.init_from) / "TRAINING.json"
        init_record = json.loads(prev.read_text()) if prev.exists() else None
        log(f"continuing from {args.init_from}")
    else:
        model = SpaTextModel.from_pipe(pipe, phrases, args.channels).float()
    with torch.no_grad():
        table = model.project(raw_table).float()
    ids, nouns, valid = data["ids"], data["nouns"], data["valid"]
    col = torch.gather(ids, 1, (nouns - 1).clamp_min(0))
    shp = torch.gather(ids, 1, nouns)
    phrase_idx = torch.where(valid, lut[col, shp], -1)
    valid = valid & (phrase_idx >= 0)
    areas = data["m16"].float().sum(-1) * 16                       # pixels at 64×64
    eligible = valid & eligible_segments(areas, 64 * 64, args.min_segment_fraction)
    log(f"data: {args.n_scenes} scenes, {int(eligible.sum())} eligible segments of "
        f"{int(valid.sum())}, in {time.time() - t_start:.0f}s")
    empty_ids = pipe.tokenizer("", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                               return_tensors="pt").input_ids[0]

    from diffusers.models.attention_processor import AttnProcessor2_0
    model.unet.set_attn_processor(AttnProcessor2_0())
    model.train()
    new = set(id(p) for p in model.new_parameters())
    base_params = [p for p in model.parameters() if id(p) not in new]
    opt = torch.optim.AdamW([dict(params=base_params, lr=args.lr),
                             dict(params=model.new_parameters(), lr=args.lr * args.new_lr_mult)],
                            weight_decay=0.0)
    ds = torch.utils.data.TensorDataset(latents, ids, phrase_idx.clamp_min(0), eligible,
                                        data["m16"])
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                         drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed + 1))
    model, opt, loader = accelerator.prepare(model, opt, loader)
    raw = accelerator.unwrap_model(model)
    params = list(raw.parameters())
    ema = [p.detach().clone() for p in params]
    acp = pipe.scheduler.alphas_cumprod.to(accelerator.device)
    g = torch.Generator().manual_seed(args.seed + 2 + 1000 * accelerator.process_index)
    text_encoder = pipe.text_encoder.to(accelerator.device)
    it = _infinite(loader)
    losses, step = [], 0
    deadline = time.time() + args.minutes * 60                   # the loop's budget
    t_loop = time.time()
    for step in _schedule(accelerator, opt, args.lr, args.steps, deadline, "spatext"):
        opt.param_groups[1]["lr"] = opt.param_groups[0]["lr"] * args.new_lr_mult
        z0, cap, pidx, elig, m16 = next(it)
        B = z0.shape[0]
        K = pidx.shape[1]
        keep = choose_segments(elig.cpu(), g).to(z0.device)
        u = torch.rand(B, generator=g).to(z0.device)
        drop_cap = (u < args.p_drop_both) | ((u >= args.p_drop_both) &
                                             (u < args.p_drop_both + args.p_drop_caption))
        drop_seg = (u < args.p_drop_both) | ((u >= args.p_drop_both + args.p_drop_caption) &
                                             (u < args.p_drop_both + args.p_drop_caption
                                              + args.p_drop_segments))
        keep = keep & ~drop_seg[:, None]
        h, w = z0.shape[-2:]
        cov = m16.float().view(B, K, h, w) * keep[..., None, None].float()
        st = paint(table.to(z0.device)[pidx], cov)
        cap = torch.where(drop_cap[:, None], empty_ids.to(cap.device)[None], cap)
        with torch.no_grad():
            hidden = text_encoder(cap)[0]
        noise = torch.randn(z0.shape, generator=g).to(z0.device)
        t = torch.randint(0, len(acp), (B,), generator=g).to(z0.device)
        zt = q_sample(z0, t, acp, noise)                                     # eq 1.38
        eps = model(zt, t, hidden, st)
        cover = (m16.float().sum(1) > 0.01).float().view(B, 1, h, w)
        loss = eps_loss(eps, noise, acp[t], cover, args.object_weight, args.min_snr_gamma).mean()
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema, params, min(args.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 25 == 0 or step == 1:
            log(f"step {step} loss {np.mean(losses[-25:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"elapsed {time.time() - t_loop:.0f}s")
    _swap_in([raw], [ema])
    from diffusers.models.attention_processor import AttnProcessor
    raw.unet.set_attn_processor(AttnProcessor())
    wall, cpu = time.time() - t_start, time.process_time() - cpu_start
    record = {}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in raw.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        size = (out / WEIGHTS_FILE).stat().st_size
        record = dict(
            command="python -m diffnotes.editing.spatext train " + " ".join(
                argv if argv is not None else _config_argv(args)),
            date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            wall_time_s=round(wall, 1), loop_wall_time_s=round(time.time() - t_loop, 1),
            process_cpu_time_s=round(cpu, 1), threads=torch.get_num_threads(),
            device=str(accelerator.device), num_processes=accelerator.num_processes,
            machine=f"{platform.machine()}, {os.cpu_count()} logical CPUs",
            load_average_at_start=load_at_start, torch=torch.__version__,
            steps=step, final_loss=round(float(np.mean(losses[-50:])), 5) if losses else None,
            first_loss=round(float(np.mean(losses[:25])), 5) if losses else None,
            weights_file=WEIGHTS_FILE, weights_bytes=size,
            new_parameters=int(sum(p.numel() for p in raw.new_parameters())),
            trained_parameters=int(sum(p.numel() for p in params)),
            embed_dim=raw.embed_dim, channels=raw.channels, config=asdict(args),
            init_record=init_record,
            total_wall_time_s=round(wall + (float(init_record.get("total_wall_time_s",
                                                                  init_record["wall_time_s"]))
                                            if init_record else 0.0), 1),
            total_steps=step + (int(init_record.get("total_steps", init_record["steps"]))
                                if init_record else 0),
            total_process_cpu_time_s=round(cpu + (float(init_record.get(
                "total_process_cpu_time_s", init_record["process_cpu_time_s"]))
                if init_record else 0.0), 1),
            note=NOTE,
        )
        (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
        log(f"saved {out / WEIGHTS_FILE} ({size / 1e6:.2f} MB); wall {wall / 60:.1f} min, "
            f"final loss {record['final_loss']}")
    return record


def _config_argv(cfg: SpaTextConfig) -> list[str]:
    argv = []
    for name in OPTIONS:
        v, d = getattr(cfg, name), getattr(SHIPPED, name)
        if v == d:
            continue
        if isinstance(v, bool):
            argv.append("--" + name.replace("_", "-"))
        else:
            argv += ["--" + name.replace("_", "-"),
                     ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return argv


# ---------------------------------------------------------------------------- evaluation
def _layouts(n: int, seed: int, min_fraction: float = 0.02):
    """``n`` requested layouts of 1–2 objects taken from generator scenes (held apart from the
    training seed): dicts ``{objects: [{shape, color, size, position, mask, box}], prompt,
    positional_prompt}``; objects whose visible mask covers less than ``min_fraction`` of the
    image (hidden behind another) make the scene be skipped."""
    from ..data.shapes import caption_objects, generate_scenes
    sc = generate_scenes(4 * n, seed=seed, max_objects=2, object_count_probs=(0.5, 0.5, 0.0),
                         textured=False)
    out = []
    for i in range(len(sc)):
        objs = []
        for k, o in enumerate(sc.objects[i]):
            m = sc.masks[i, k]
            objs.append(dict(shape=o["shape"], color=o["color"], size=o["size"],
                             position=o["position"], mask=m, box=tuple(int(v) for v in sc.boxes[i, k])))
        if any(o["mask"].sum() < min_fraction * m.size for o in objs):
            continue
        out.append(dict(objects=objs, prompt=caption_objects(objs, False, False)[0],
                        positional_prompt=caption_objects(objs, True, True)[0]))
        if len(out) == n:
            break
    return out


def _score(found: list[dict], requested: list[dict]) -> list[dict]:
    """Per requested object: IoU with its mask of the best-matching generated object of the same
    colour and shape (0 if none), whether such an object exists, whether its centroid lies in the
    requested box, and the fraction of its pixels inside the box."""
    rows = []
    for r in requested:
        best = None
        for o in found:
            if o["shape"] != r["shape"] or o["color"] != r["color"]:
                continue
            inter = float((o["mask"] & r["mask"]).sum())
            iou = inter / float((o["mask"] | r["mask"]).sum())
            if best is None or iou > best[0]:
                best = (iou, o)
        if best is None:
            rows.append(dict(iou=0.0, found=False, centroid_in_box=False, pixels_in_box=0.0))
            continue
        iou, o = best
        x0, y0, x1, y1 = r["box"]
        ys, xs = np.nonzero(o["mask"])
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        box = np.zeros_like(o["mask"])
        box[y0:y1, x0:x1] = True
        rows.append(dict(iou=iou, found=True, centroid_in_box=bool(x0 <= cx <= x1 and y0 <= cy <= y1),
                         pixels_in_box=float((o["mask"] & box).sum() / o["mask"].sum())))
    return rows


def _plain(pipe, prompt, x, steps, gs):
    from .common import pipe_eps_model
    from .inversion import decode_latents
    eps = pipe_eps_model(pipe, encode_prompts(pipe, prompt), encode_prompts(pipe, ""), gs)
    z = ddim_sample(eps, x, pipe_timesteps(pipe, steps), pipe_alphas_cumprod(pipe))
    return decode_latents(pipe, z).permute(0, 2, 3, 1).float().cpu().numpy()


def load_results(path: str | os.PathLike | None = None) -> dict:
    """The record :func:`evaluate` wrote (default ``diffnotes/editing/results/spatext.json``)."""
    return json.loads(Path(path or RESULTS_FILE).read_text())


def evaluate(n: int = 48, seed: int = 2024, num_inference_steps: int = 20,
             guidance_scale: float = 7.5, pipe=None, model=None, out: str | None = None,
             write: bool = True) -> dict:
    """The layout measurement (``python -m diffnotes.editing.spatext evaluate``): ``n`` layouts
    (:func:`_layouts`), each generated from the same seeded latent by SpaText (the global prompt
    without positions, the masks as segments), by plain sampling with the positional prompt
    (``"a small red circle on the left and ..."``) and by plain sampling with the SpaText prompt
    (no positions: chance level). Every generated scene is judged by
    :func:`diffnotes.models.eval_shapes.judge_scene`; per requested object :func:`_score`.
    Writes the JSON record to ``out`` (default ``diffnotes/editing/results/spatext.json``)
    unless ``write=False`` (a chapter's live re-measurement of a few layouts), and returns it."""
    from ..models.eval_shapes import judge_scene, shape_judge
    from ..models.load import load_pipeline
    t_start = time.time()
    pipe = pipe or load_pipeline("shapes")
    model = model or load_spatext(pipe)
    clf = shape_judge()
    layouts = _layouts(n, seed)
    methods = ("spatext", "plain_positional", "plain_no_position")
    per = {m: [] for m in methods}
    secs = {m: 0.0 for m in methods}
    _, (h, w) = _image_hw(pipe)
    for i, lay in enumerate(layouts):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        x = torch.randn((1, 4, h, w), generator=g)
        segs = [(object_phrase(o["color"], o["shape"]), o["mask"]) for o in lay["objects"]]
        for m in methods:
            t0 = time.time()
            if m == "spatext":
                img = spatext(pipe, lay["prompt"], segs, model=model, latents=x,
                              num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, output_type="np")
            else:
                img = _plain(pipe, lay["positional_prompt"] if m == "plain_positional"
                             else lay["prompt"], x, num_inference_steps, guidance_scale)
            secs[m] += time.time() - t0
            per[m] += _score(judge_scene(img[0], clf), lay["objects"])
    summary = {}
    for m in methods:
        rows = per[m]
        summary[m] = dict(mean_iou=float(np.mean([r["iou"] for r in rows])),
                          found=float(np.mean([r["found"] for r in rows])),
                          centroid_in_box=float(np.mean([r["centroid_in_box"] for r in rows])),
                          pixels_in_box=float(np.mean([r["pixels_in_box"] for r in rows])),
                          seconds_per_image=secs[m] / len(layouts))
    record = dict(
        command="python -m diffnotes.editing.spatext evaluate" + (f" --n {n}" if n != 48 else ""),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), wall_time_s=round(time.time() - t_start, 1),
        threads=torch.get_num_threads(), n_layouts=len(layouts),
        n_objects=len(per["spatext"]), seed=seed, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, methods=summary,
        note=("Layouts of 1-2 objects from generator scenes (seed above; not the training seed); "
              "per requested object: IoU with its mask of the generated object of the same "
              "colour and shape (0 if none), found = such an object exists, centroid_in_box = "
              "its centroid lies in the requested box, pixels_in_box = share of its pixels in "
              "the box (0 if none). Same initial latent for every method; DDIM, CFG."),
    )
    if write:
        path = Path(out) if out else RESULTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------------------- command line
def build_parser():
    p = argparse.ArgumentParser(prog="python -m diffnotes.editing.spatext",
                                description="Train or evaluate the SpaText model of the shapes "
                                            "pipeline.")
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="fine-tune and write diffnotes/weights/spatext")
    byname = {f.name: f for f in fields(SpaTextConfig)}
    for name in OPTIONS:
        f = byname[name]
        flag, kw = "--" + name.replace("_", "-"), dict(f.metadata)
        default = getattr(SHIPPED, name)
        if isinstance(default, bool):
            tr.add_argument(flag, action="store_true", default=default, **kw)
            continue
        if name == "object_count_probs":
            from ..models.train import _probs3
            kw["type"] = _probs3
        kw.setdefault("type", type(default) if default is not None else str)
        tr.add_argument(flag, default=default, **kw)
    ev = sub.add_parser("evaluate", help="measure layout IoU; writes results/spatext.json")
    ev.add_argument("--n", type=int, default=48)
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--out", default=None)
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if ns.cmd == "train":
        cfg = SpaTextConfig(**{k: getattr(ns, k) for k in OPTIONS})
        for k in ("minutes", "lr"):
            check_range(getattr(cfg, k), f"--{k}", 0, None, lo_open=True)
        return train(cfg, argv[1:])
    torch.set_num_threads(ns.threads)
    rec = evaluate(n=ns.n, num_inference_steps=ns.steps, out=ns.out)
    print(json.dumps(rec["methods"], indent=2))
    return rec


if __name__ == "__main__":
    main()
