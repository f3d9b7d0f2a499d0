"""Semantic correspondence: the losses of Ahmad's notes §5.8 and the prompt-optimisation method of
Hedlin et al. 2023 ("Unsupervised Semantic Correspondence Using Stable Diffusion").

Losses on point sets (Ahmad's notes, eqs 5.34–5.35): :func:`correspondence_loss`,
:func:`cycle_loss`, :func:`alignment_loss`.

Hedlin et al. 2023 (Ahmad's notes, §5.9, eqs 5.39–5.48): a text embedding ``e`` is optimised
so that the cross-attention map of one of its tokens, on the source image, is a Gaussian at the
query point; the same embedding's map on the target image peaks at the corresponding point.
:func:`optimize_embedding` implements eq 5.46 (an argmin: the notes print argmax), averaging
the loss over random crops; :func:`attention_heatmap` eqs 5.41–5.42 and 5.47 (maps of several
crops put back in place and averaged); :func:`optimize_prompt_correspondence` eq 5.48 (maps of
independently initialised rounds averaged, then the argmax).

Defaults are the official code's (LDM_correspondences, ``eval.py`` / ``optimize_token.py``),
scaled from Stable Diffusion's 512-pixel images and 64-pixel latents to the pipeline at hand:

- time step: ``scheduler.timesteps[-8]`` of a 50-step DDIM grid (t = 141 for T = 1000);
- layers: the first four decoder cross-attention layers in forward order (SD's code takes its
  ``layers=[5, 6, 7, 8]`` among the ≤32² maps: ``up_blocks.1.attentions.0-2`` and
  ``up_blocks.2.attentions.0``, i.e. the decoder's first four);
- σ = 27.98 px on a 512-pixel map = 5.46 % of the image side (3.5 px on a 64-pixel image);
- crops keep 93.17 % of the side, query kept at least 15 % of the crop from its border;
- 129 Adam steps with lr 0.00238, 5 rounds, 20 crops at inference, token 1 (after BOS);
- the embedding starts as ``randn(1, L, D)`` (L, D: the text encoder's length and width).

Difference from the code: the code noises with ``torch.rand_like`` (uniform noise); here the
noise is Gaussian, as the forward process defines it (Ahmad's notes, eq 1.38).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffnotes.attention import AttentionCollector, attention_layers
from diffnotes.features import (_Stop, _check_points, _last_in_forward_order, _parts,
                                as_image_tensor, encode_latents, noised_latents)
from diffnotes.utils import (batch_timesteps, check_int, check_positive, check_range,
                             check_tensor, check_timestep)

__all__ = ["correspondence_loss", "cycle_loss", "alignment_loss", "gaussian_map",
           "crop_box", "crop", "uncrop", "default_layers", "default_timestep", "OFFICIAL",
           "cross_attention_maps", "optimize_embedding", "attention_heatmap",
           "optimize_prompt_correspondence"]

#: the official code's settings at 512 × 512 (LDM_correspondences ``eval.py``)
OFFICIAL = dict(steps=129, lr=0.0023755632081200314, sigma_px_512=27.97853316316864,
                crop_percent=93.16549294381423, rounds=5, inference_crops=20,
                noise_level=-8, ddim_steps=50, token=1, margin=0.15)


# ------------------------------------------------------------------ losses of §5.8
def _pts(x, name):
    check_tensor(x, name, 2)
    return x


def correspondence_loss(T_s, x: torch.Tensor, x_prime: torch.Tensor) -> torch.Tensor:
    """``L_corr = (1/N) sum_i ||T_s(x_i) - x'_i||^2`` (Ahmad's notes, eq 5.34); ``x``, ``x_prime``
    (N, d) points, ``T_s`` a callable on (N, d)."""
    x, x_prime = _pts(x, "x"), _pts(x_prime, "x_prime")
    return ((T_s(x) - x_prime) ** 2).sum(-1).mean()          # eq 5.34


def cycle_loss(T_s, T_t, x: torch.Tensor) -> torch.Tensor:
    """``L_cycle = (1/N) sum_i ||T_t(T_s(x_i)) - x_i||^2`` (Ahmad's notes, §5.8, the cycle-
    consistency loss)."""
    x = _pts(x, "x")
    return ((T_t(T_s(x)) - x) ** 2).sum(-1).mean()


def alignment_loss(phi_s, phi_t, x: torch.Tensor, x_prime: torch.Tensor) -> torch.Tensor:
    """``L_align = (1/N) sum_i ||phi_s(x_i) - phi_t(x'_i)||^2`` (Ahmad's notes, eq 5.35)."""
    x, x_prime = _pts(x, "x"), _pts(x_prime, "x_prime")
    return ((phi_s(x) - phi_t(x_prime)) ** 2).sum(-1).mean()  # eq 5.35


# ------------------------------------------------------------------ maps, crops
def gaussian_map(center, sigma: float, size, dtype=torch.float64) -> torch.Tensor:
    """``M_s(u) = exp(-||u - u_s||^2 / (2 sigma^2))`` over the pixel centres of an (H, W) grid,
    ``center = (x, y)`` in pixels (Ahmad's notes, eq 5.43; peak 1, unnormalised, as the code)."""
    sigma = check_positive(sigma, "sigma")
    H, W = (int(s) for s in size)
    cx, cy = (float(c) for c in center)
    ys = torch.arange(H, dtype=dtype) + 0.5
    xs = torch.arange(W, dtype=dtype) + 0.5
    d2 = (ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2
    return torch.exp(-d2 / (2 * sigma ** 2))                 # eq 5.43


def crop_box(size, fraction: float, generator: torch.Generator, point=None,
             margin: float = 0.15) -> tuple[int, int, int]:
    """A square crop ``(x0, y0, side)`` keeping ``fraction`` of the side of an (H, W) image at a
    uniformly random offset (the crop distribution D of Ahmad's notes, eq 5.46); with ``point``
    the crop keeps it at least ``margin`` of the side away from the border (the code's rule)."""
    H, W = (int(s) for s in size)
    side = max(1, int(round(fraction * min(H, W))))
    lo_x, hi_x, lo_y, hi_y = 0, W - side, 0, H - side
    if point is not None:
        m = margin * side
        lo_x = max(lo_x, math.ceil(point[0] + m - side))
        hi_x = min(hi_x, math.floor(point[0] - m))
        lo_y = max(lo_y, math.ceil(point[1] + m - side))
        hi_y = min(hi_y, math.floor(point[1] - m))
        if lo_x > hi_x:
            lo_x = hi_x = min(max(0, int(round(point[0] - side / 2))), W - side)
        if lo_y > hi_y:
            lo_y = hi_y = min(max(0, int(round(point[1] - side / 2))), H - side)
    x0 = lo_x + int(torch.randint(hi_x - lo_x + 1, (1,), generator=generator))
    y0 = lo_y + int(torch.randint(hi_y - lo_y + 1, (1,), generator=generator))
    return x0, y0, side


def crop(x: torch.Tensor, box, out_size=None) -> torch.Tensor:
    """``C_c``: the (…, side, side) window ``box = (x0, y0, side)`` of x (…, H, W), resized
    bilinearly to ``out_size`` (default: x's own size, as the code resizes crops back)."""
    x0, y0, s = box
    out_size = tuple(x.shape[-2:]) if out_size is None else tuple(out_size)
    w = x[..., y0:y0 + s, x0:x0 + s]
    if tuple(w.shape[-2:]) == out_size:
        return w
    lead = w.shape[:-2]
    w = F.interpolate(w.reshape(-1, 1, s, s), size=out_size, mode="bilinear", align_corners=False)
    return w.reshape(*lead, *out_size)


def uncrop(xc: torch.Tensor, box, size) -> tuple[torch.Tensor, torch.Tensor]:
    """``U_c``: put a crop's map (…, h, w) back at its place in an (H, W) canvas (resized to the
    crop's side); returns ``(canvas, coverage)`` with zeros and coverage 0 outside the crop, so
    that ``crop(U_c(x_c)) = x_c`` for a crop of unchanged size (Ahmad's notes, eq 5.46's
    ``C_c(U_c(x_c)) = x_c``)."""
    x0, y0, s = box
    H, W = (int(v) for v in size)
    lead = xc.shape[:-2]
    if tuple(xc.shape[-2:]) != (s, s):
        xc = F.interpolate(xc.reshape(-1, 1, *xc.shape[-2:]), size=(s, s), mode="bilinear",
                           align_corners=False).reshape(*lead, s, s)
    canvas = xc.new_zeros(*lead, H, W)
    cover = xc.new_zeros(H, W)
    canvas[..., y0:y0 + s, x0:x0 + s] = xc
    cover[y0:y0 + s, x0:x0 + s] = 1
    return canvas, cover


# ------------------------------------------------------------------ attention with gradients
def default_layers(unet) -> list[str]:
    """The first four decoder cross-attention layers in forward order (the official code's
    ``layers=[5, 6, 7, 8]`` on SD; fewer if the decoder has fewer)."""
    return [n for n in attention_layers(unet, "cross") if n.startswith("up_blocks")][:4]


def default_timestep(scheduler) -> int:
    """``timesteps[-8]`` of a 50-step DDIM grid with the scheduler's offset (t = 141 for
    T = 1000, steps_offset 1): the code's ``noise_level=-8``."""
    T = len(scheduler.alphas_cumprod)
    ratio = T // OFFICIAL["ddim_steps"]
    offset = int(getattr(scheduler.config, "steps_offset", 0) or 0)
    return (-OFFICIAL["noise_level"] - 1) * ratio + offset


def cross_attention_maps(pipe, images: torch.Tensor, embedding: torch.Tensor, t: int,
                         layers, out_size, generator=None, per_layer: bool = False
                         ) -> torch.Tensor:
    """Head-averaged cross-attention maps (Ahmad's notes, eqs 5.39–5.40) of ``images``
    (B, 3, H, W) in [0, 1] against ``embedding`` (1|B, L, D) at time step t, each layer's map
    bilinearly upsampled to ``out_size`` and the layers averaged (eq 5.41): (B, L, H', W')
    ((n_layers, B, L, H', W') with ``per_layer``), with the autograd graph to ``embedding``.
    Recorded by :class:`diffnotes.attention.AttentionCollector`; the UNet call stops after the
    last layer it needs."""
    _, unet, _, _, _ = _parts(pipe)
    with torch.no_grad():
        z0 = encode_latents(pipe, images).to(unet.device, unet.dtype)
        zt = noised_latents(pipe, z0, t, generator)
    ctx = embedding.to(unet.dtype)
    ctx = ctx.expand(zt.shape[0], -1, -1) if ctx.shape[0] == 1 else ctx
    modules = dict(unet.named_modules())
    last = _last_in_forward_order(unet, layers)
    collector = AttentionCollector(kinds=("cross",), layers=layers)

    def stop(*_):
        raise _Stop
    h = modules[last].register_forward_hook(stop)
    try:
        with collector.attach(unet):
            try:
                unet(zt, batch_timesteps(t, zt), encoder_hidden_states=ctx)
            except _Stop:
                pass
    finally:
        h.remove()
    maps = collector.by_name()
    out = []
    for n in layers:
        m = maps[n]                                              # (B, h*w, L), eq 5.40
        side = int(round(math.sqrt(m.shape[1])))
        m = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], side, side)
        out.append(F.interpolate(m, size=tuple(out_size), mode="bilinear", align_corners=False))
    out = torch.stack(out)
    return out if per_layer else out.mean(0)                     # eq 5.41


def _setup(pipe, t, layers, sigma, size):
    _, unet, _, _, scheduler = _parts(pipe)
    t = default_timestep(scheduler) if t is None else t
    t = check_timestep(t, len(scheduler.alphas_cumprod), "t")
    layers = default_layers(unet) if layers is None else list(layers)
    known = set(attention_layers(unet, "cross"))
    bad = [n for n in layers if n not in known]
    if not layers or bad:
        raise ValueError(f"layers must name cross-attention layers of the UNet, unknown: {bad}; "
                         f"e.g. {default_layers(unet)}")
    sigma = OFFICIAL["sigma_px_512"] / 512 * size[1] if sigma is None else \
        check_positive(sigma, "sigma")
    return t, layers, sigma


def optimize_embedding(pipe, image, point, *, t: int | None = None, layers=None,
                       steps: int = OFFICIAL["steps"], lr: float = OFFICIAL["lr"],
                       sigma: float | None = None,
                       crop_fraction: float = OFFICIAL["crop_percent"] / 100,
                       token: int = OFFICIAL["token"], generator: torch.Generator | None = None,
                       progress: bool = False, callback=None) -> torch.Tensor:
    """``e* = argmin_e E_c sum_u ||C_c(M''(u; e, I_s)) - C_c(M_s(u))||^2`` (Ahmad's notes,
    eq 5.46, corrected from argmax; Hedlin et al. 2023, eq 4 with crops): Adam on a randomly
    initialised text embedding (1, L, D), the model frozen. Each step takes one random crop of
    the source image (the query kept inside), resized back to the image size, and the MSE of
    token ``token``'s map (eq 5.42) against the Gaussian (eq 5.43) cropped the same way, summed
    over the chosen layers' maps (the code's per-layer loss). ``callback(dict(i=, loss=, e=))``.
    Returns the optimised embedding (detached)."""
    x = as_image_tensor(image)
    if x.shape[0] != 1:
        raise ValueError(f"image must hold one image, got {x.shape[0]}")
    size = tuple(x.shape[-2:])
    p = _check_points(point, size, "point")[0].tolist()
    steps = check_int(steps, "steps", 1)
    lr = check_positive(lr, "lr")
    crop_fraction = check_range(crop_fraction, "crop_fraction", 0.1, 1.0)
    _, unet, text_encoder, _, _ = _parts(pipe)
    t, layers, sigma = _setup(pipe, t, layers, sigma, size)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    L = pipe.tokenizer.model_max_length
    D = unet.config.cross_attention_dim
    token = check_int(token, "token", 0)
    if token >= L:
        raise ValueError(f"token must be < {L} (the embedding's length), got {token}")
    # the embedding is optimised in float32 (cast to the UNet's dtype in each call)
    e = torch.randn(1, L, D, generator=g, dtype=torch.float64 if unet.dtype == torch.float64
                    else torch.float32).to(unet.device).requires_grad_(True)
    opt = torch.optim.Adam([e], lr=lr)
    target = gaussian_map(p, sigma, size, dtype=e.dtype).to(unet.device)
    req = [q.requires_grad for q in unet.parameters()]
    unet.requires_grad_(False)
    try:
        for i in tqdm(range(steps), disable=not progress, desc="Hedlin et al."):
            box = crop_box(size, crop_fraction, g, p, OFFICIAL["margin"])
            xc = crop(x, box).to(unet.dtype)
            m = cross_attention_maps(pipe, xc, e, t, layers, size, g, per_layer=True)[:, 0]
            tc = crop(target, box)
            loss = ((m[:, token] - tc) ** 2).mean(dim=(-2, -1)).sum()   # eq 5.46 (per layer)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if callback is not None:
                callback(dict(i=i, loss=loss.item(), e=e.detach()))
    finally:
        for q, r in zip(unet.parameters(), req):
            q.requires_grad_(r)
    return e.detach()


@torch.no_grad()
def attention_heatmap(pipe, image, embedding: torch.Tensor, *, t: int | None = None,
                      layers=None, crops: int = OFFICIAL["inference_crops"],
                      crop_fraction: float = OFFICIAL["crop_percent"] / 100,
                      token: int = OFFICIAL["token"], generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """``E_c U_c(M(u; e, I))`` (Ahmad's notes, eq 5.47): token ``token``'s layer-averaged map
    (eqs 5.41–5.42) on ``crops`` random crops of the image, each put back at its place and
    averaged where crops cover the pixel. Returns an (H, W) map of the image's size."""
    x = as_image_tensor(image)
    size = tuple(x.shape[-2:])
    crops = check_int(crops, "crops", 1)
    t, layers, _ = _setup(pipe, t, layers, 1.0, size)
    g = generator if generator is not None else torch.Generator().manual_seed(1)
    unet = _parts(pipe)[1]
    acc = torch.zeros(size, dtype=unet.dtype, device=unet.device)
    cov = torch.zeros(size, dtype=unet.dtype, device=unet.device)
    for _ in range(crops):
        box = crop_box(size, crop_fraction, g) if crops > 1 else (0, 0, min(size))
        m = cross_attention_maps(pipe, crop(x, box).to(unet.dtype), embedding, t, layers, size,
                                 g)[0, token]
        canvas, c = uncrop(m, box, size)                          # U_c
        acc += canvas
        cov += c
    return acc / cov.clamp_min(1)                                 # eq 5.47 (mean over crops)


def optimize_prompt_correspondence(pipe, source, target, point, *, rounds: int = OFFICIAL["rounds"],
                                   t: int | None = None, layers=None,
                                   steps: int = OFFICIAL["steps"], lr: float = OFFICIAL["lr"],
                                   sigma: float | None = None,
                                   crop_fraction: float = OFFICIAL["crop_percent"] / 100,
                                   inference_crops: int = OFFICIAL["inference_crops"],
                                   token: int = OFFICIAL["token"],
                                   generator: torch.Generator | None = None,
                                   progress: bool = False, return_map: bool = False):
    """Hedlin et al. 2023: the point of ``target`` that corresponds to ``point = (x, y)`` (pixels)
    of ``source``: ``u_t = argmax_u E_e M(u; O(e, I_s), I_t)`` (Ahmad's notes, eq 5.48; each
    round an embedding optimised by :func:`optimize_embedding` from a fresh random start, its
    crop-averaged target map by :func:`attention_heatmap`). Defaults: the official code's, scaled
    to the image size (module docstring). Returns the (2,) float64 (x, y) pixel centre, and the
    averaged (H, W) map with ``return_map``."""
    xs, xt = as_image_tensor(source), as_image_tensor(target)
    if xs.shape[0] != 1 or xt.shape[0] != 1:
        raise ValueError(f"source and target must hold one image each, got {xs.shape[0]} and "
                         f"{xt.shape[0]}")
    rounds = check_int(rounds, "rounds", 1)
    _check_points(point, tuple(xs.shape[-2:]), "point")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    total = 0
    for _ in tqdm(range(rounds), disable=not progress, desc="rounds"):
        e = optimize_embedding(pipe, xs, point, t=t, layers=layers, steps=steps, lr=lr,
                               sigma=sigma, crop_fraction=crop_fraction, token=token, generator=g)
        total = total + attention_heatmap(pipe, xt, e, t=t, layers=layers, crops=inference_crops,
                                          crop_fraction=crop_fraction, token=token, generator=g)
    M = (total / rounds).float().cpu() if total.dtype == torch.float16 else (total / rounds).cpu()  # eq 5.48
    H, W = M.shape
    idx = int(M.argmax())
    uv = torch.tensor([idx % W + 0.5, idx // W + 0.5], dtype=torch.float64)
    return (uv, M) if return_map else uv
