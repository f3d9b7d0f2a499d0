"""Dense image features for the recognition chapters: diffusion features and a cheap baseline.

Diffusion features (the theme of the book's recognition part): encode the image with the VAE,
noise the latent to a moderate time step t (``z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps``,
Ahmad's notes, eq 1.38), run the UNet once and keep the output of one or more of its blocks
through forward hooks. A denoiser has to know what is where to remove the noise, so its decoder
activations carry object and part information at the latent's resolution.

Everything takes images as float tensors (B, 3, H, W) in [0, 1] or NumPy arrays (B, H, W, 3) in
[0, 1] (what :func:`diffnotes.data.shapes.generate_scenes` returns).

:func:`extract` is the one entry point of the recognition chapters: block outputs or attention
maps (through :class:`diffnotes.attention.AttentionCollector`) at a chosen t, on any UNet
layout. :func:`dense_correspondence` and :func:`match_points` implement the argmax
correspondence of Ahmad's notes, eq 5.33; :func:`ot_match` replaces the argmax by an optimal
transport plan (exact with POT's ``ot.emd``, or entropic Sinkhorn in torch).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from diffnotes.ddpm import q_sample
from diffnotes.utils import (batch_timesteps, check_choice, check_positive, check_tensor,
                             check_timestep)

__all__ = ["as_image_tensor", "diffusion_features", "unet_block_outputs", "random_conv_features",
           "pixel_features", "encode_latents", "noised_latents", "extract", "vae_features",
           "similarity_matrix", "dense_correspondence", "point_similarity", "match_points",
           "cycle_consistency", "ot_match", "SIMILARITIES"]


def as_image_tensor(images, dtype=torch.float32) -> torch.Tensor:
    """(B, 3, H, W) tensor in [0, 1] from such a tensor or a NumPy (B, H, W, 3) array."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be a (B, H, W, 3) array, got shape {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(dtype)
    check_tensor(images, "images", 4)
    if images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    return images.to(dtype)


def _parts(pipe):
    get = (lambda k: pipe[k]) if isinstance(pipe, dict) else (lambda k: getattr(pipe, k))
    return get("vae"), get("unet"), get("text_encoder"), get("tokenizer"), get("scheduler")


class _Stop(Exception):
    pass


def unet_block_outputs(unet, z_t: torch.Tensor, t, encoder_hidden_states: torch.Tensor | None,
                       blocks=("up_blocks.0",), stop_early: bool = True,
                       return_output: bool = False, **unet_kwargs):
    """Run ``unet(z_t, t, encoder_hidden_states, **unet_kwargs)`` once and return the outputs of
    the named submodules (e.g. ``"up_blocks.0"``, ``"mid_block"``) in the order given (the hidden
    state of a down block's ``(hidden, skips)`` tuple).

    With ``stop_early`` the forward pass is abandoned (by an exception caught here) as soon as
    every requested block has produced its output, which skips the rest of the decoder.
    ``encoder_hidden_states=None`` calls an unconditional ``UNet2DModel``. With ``return_output``
    the whole pass runs and ``(outputs, eps)`` is returned, ``eps`` the UNet's own output. No
    ``no_grad`` here: the outputs keep their graph when the caller wants one."""
    modules = dict(unet.named_modules())
    missing = [b for b in blocks if b not in modules]
    if missing:
        raise ValueError(f"blocks must name submodules of the UNet, unknown: {missing}; e.g. "
                         f"{[n for n in modules if n.count('.') == 1][:8]}")
    stop_early = stop_early and not return_output
    store: dict[str, torch.Tensor] = {}
    hooks = []
    for b in blocks:
        def hook(_m, _inp, out, b=b):
            store[b] = out[0] if isinstance(out, tuple) else out
            if stop_early and len(store) == len(set(blocks)):
                raise _Stop  # the rest of the UNet is not needed
        hooks.append(modules[b].register_forward_hook(hook))
    if encoder_hidden_states is not None:
        unet_kwargs["encoder_hidden_states"] = encoder_hidden_states
    out = None
    try:
        out = unet(z_t, t, **unet_kwargs)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    feats = [store[b] for b in blocks]
    if not return_output:
        return feats
    return feats, (out.sample if hasattr(out, "sample") else out)


@torch.no_grad()
def diffusion_features(pipe, images, t: int = 200, blocks=("up_blocks.0",), prompt: str = "",
                       generator: torch.Generator | None = None, batch_size: int = 64,
                       out_size: int | None = None) -> torch.Tensor:
    """UNet decoder features of images noised to time step ``t`` (one UNet call per image).

    Args:
        pipe: a diffusers pipeline, or a dict, with ``vae, unet, text_encoder, tokenizer,
            scheduler`` (e.g. ``diffnotes.models.load.load_pipeline("shapes")``).
        images: (B, 3, H, W) in [0, 1] or (B, H, W, 3) NumPy in [0, 1].
        t: 0-based time step index (diffusers convention); moderate t (100-300) keeps the layout
            and asks the UNet for semantics.
        blocks: UNet submodules whose outputs are kept; several are resized to the largest and
            concatenated along channels.
        prompt: conditioning caption (default "", i.e. the unconditional branch).
        generator: for the noise (the same generator state gives the same features).
        out_size: resize the result to (out_size, out_size) if given.
    Returns:
        float32 (B, C, h, w) features.
    Raises:
        ValueError on a bad image shape, time step or block name.
    """
    vae, unet, text_encoder, tokenizer, scheduler = _parts(pipe)
    x = as_image_tensor(images)
    T = len(scheduler.alphas_cumprod)
    t = check_timestep(t, T, "t")
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    ctx = text_encoder(ids.to(text_encoder.device))[0]
    sf = getattr(vae.config, "scaling_factor", 1.0)
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = (x[i:i + batch_size] * 2 - 1).to(device=vae.device, dtype=vae.dtype)
        z0 = vae.encode(xb).latent_dist.mean * sf
        eps = torch.randn(z0.shape, generator=generator, dtype=z0.dtype,
                          device=generator.device if generator is not None else "cpu"
                          ).to(z0.device)
        zt = q_sample(z0, t, scheduler.alphas_cumprod, eps)  # forward process, in latent space
        feats = unet_block_outputs(unet, zt, batch_timesteps(t, zt),
                                   ctx.expand(zt.shape[0], -1, -1), blocks)
        size = max(f.shape[-1] for f in feats) if out_size is None else out_size
        feats = [f if f.shape[-1] == size else
                 F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
                 for f in feats]
        out.append(torch.cat(feats, dim=1).float())
    return torch.cat(out)


def pixel_features(images, patch: int = 4) -> torch.Tensor:
    """Mean colour of each ``patch`` x ``patch`` cell: (B, 3, H/patch, W/patch)."""
    x = as_image_tensor(images)
    return F.avg_pool2d(x, patch)


@torch.no_grad()
def random_conv_features(images, generator: torch.Generator, channels: int = 32,
                         patch: int = 4) -> torch.Tensor:
    """Fixed random features plus colour: a random 5x5 conv (He-scaled), ReLU, average-pooled to
    ``patch`` x ``patch`` cells, concatenated with the cells' mean colour.
    Returns (B, channels + 3, H/patch, W/patch)."""
    x = as_image_tensor(images)
    w = torch.randn(channels, 3, 5, 5, generator=generator) * (2 / 75) ** 0.5
    b = 0.1 * torch.randn(channels, generator=generator)
    h = F.relu(F.conv2d(x * 2 - 1, w, b, padding=2))
    return torch.cat([F.avg_pool2d(h, patch), F.avg_pool2d(x, patch)], dim=1)


# ================================================================== extraction at a chosen t
def encode_latents(pipe, images) -> torch.Tensor:
    """VAE latents ``z_0`` (mean of the posterior, times the VAE's scaling factor) of images in
    [0, 1], on the VAE's device and dtype (Ahmad's notes, eq 1.37)."""
    vae = _parts(pipe)[0]
    x = as_image_tensor(images, dtype=vae.dtype).to(vae.device)
    sf = getattr(vae.config, "scaling_factor", 1.0)
    return vae.encode(x * 2 - 1).latent_dist.mean * sf


def noised_latents(pipe, z0: torch.Tensor, t: int, generator=None, noise=None) -> torch.Tensor:
    """``z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps`` (Ahmad's notes, eq 1.38; Ho et al. 2020,
    eq 4) with ``eps = noise`` or a draw from ``generator`` (default: a generator seeded 0, so
    the same call gives the same features)."""
    scheduler = _parts(pipe)[4]
    if noise is None:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        noise = torch.randn(z0.shape, generator=g, dtype=z0.dtype,
                            device=g.device).to(z0.device)
    else:
        check_tensor(noise, "noise")
        if tuple(noise.shape) != tuple(z0.shape):
            raise ValueError(f"noise must have the latents' shape {tuple(z0.shape)}, got "
                             f"{tuple(noise.shape)}")
        noise = noise.to(z0.device, z0.dtype)
    ac = scheduler.alphas_cumprod.to(device=z0.device, dtype=z0.dtype)
    return q_sample(z0, t, ac, noise)


def _text(pipe, prompt, batch: int) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        check_tensor(prompt, "prompt", 3)
        ctx = prompt
    else:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string or a (1|B, L, D) embedding tensor, got "
                            f"{type(prompt).__name__}")
        from diffnotes.editing.common import encode_prompts
        ctx = encode_prompts(pipe, prompt)
    unet = _parts(pipe)[1]
    ctx = ctx.to(unet.device, unet.dtype)
    return ctx.expand(batch, -1, -1) if ctx.shape[0] == 1 else ctx


def _attention_names(unet, layers, attn_kind: str) -> list[str]:
    """Attention layer names from exact names or from module prefixes (all attention layers of
    ``attn_kind`` under ``up_blocks.1`` ...), in forward order."""
    from diffnotes.attention import attention_layers
    every = attention_layers(unet, "self") + attention_layers(unet, "cross")
    out = []
    for name in layers:
        if name in every:
            out.append(name)
            continue
        under = [n for n in attention_layers(unet, attn_kind)
                 if n.startswith(name + ".") or name in ("", "all")]
        if not under:
            raise ValueError(f"layers must name attention layers of the UNet or modules that hold "
                             f"some, unknown: {name!r}; e.g. {attention_layers(unet, 'cross')[:3]}")
        out.extend(n for n in under if n not in out)
    return out


def extract(pipe, images, t: int, layers=("up_blocks.0",), kind: str = "block", prompt="",
            generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
            attn_kind: str = "cross") -> dict[str, torch.Tensor]:
    """Diffusion features of ``images`` at time step ``t``: encode with the VAE, noise to
    ``z_t`` (Ahmad's notes, eq 1.38), run the UNet once and keep what ``layers`` name.

    Args:
        pipe: a diffusers text-to-image pipeline (any UNet layout: the shapes model, Stable
            Diffusion) or a dict of its parts.
        images: (B, 3, H, W) in [0, 1] or NumPy (B, H, W, 3).
        t: 0-based time step index (diffusers convention).
        layers: for ``kind="block"``, UNet submodule names (``"up_blocks.0"``, ``"mid_block"``,
            ``"up_blocks.1.resnets.0"`` ...); for ``kind="attention"``, attention layer names
            as :func:`diffnotes.attention.attention_layers` gives them, or module prefixes
            (``"up_blocks.1"``: its layers of ``attn_kind``; ``"all"``: every such layer).
        kind: ``"block"`` (outputs ``(B, C, h, w)``) or ``"attention"`` (head-averaged softmax
            maps ``(B, h*w, n_keys)``, recorded by :class:`diffnotes.attention.AttentionCollector`).
        prompt: a caption (default ``""``, the unconditional branch) or an embedding tensor
            ``(1|B, L, D)`` (an optimised token embedding, as in Hedlin et al. 2023).
        generator, noise: the noise ``eps`` of ``z_t`` (``noise`` wins; default: a generator
            whose seed is 0).
        attn_kind: the kind ("cross"/"self") that module prefixes select.
    Returns:
        ``{name: tensor}`` in the order of ``layers`` (attention: forward order), in the UNet's
        dtype, detached.
    Raises:
        ValueError naming ``images``, ``t``, ``layers``, ``kind`` or ``noise``.
    """
    kind = check_choice(kind, "kind", ("block", "attention"))
    attn_kind = check_choice(attn_kind, "attn_kind", ("cross", "self"))
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one module, got an empty sequence")
    vae, unet, _, _, scheduler = _parts(pipe)
    t = check_timestep(t, len(scheduler.alphas_cumprod), "t")
    with torch.no_grad():
        z0 = encode_latents(pipe, images).to(unet.device, unet.dtype)
        zt = noised_latents(pipe, z0, t, generator, noise)
        ctx = _text(pipe, prompt, zt.shape[0])
        tt = batch_timesteps(t, zt)
        if kind == "block":
            feats = unet_block_outputs(unet, zt, tt, ctx, layers)
            return {name: f.detach() for name, f in zip(layers, feats)}
        from diffnotes.attention import AttentionCollector
        names = _attention_names(unet, layers, attn_kind)
        kinds = sorted({"self" if n.endswith("attn1") else "cross" for n in names})
        modules = dict(unet.named_modules())
        last = _last_in_forward_order(unet, names)
        collector = AttentionCollector(kinds=kinds, layers=names)
        stop = modules[last].register_forward_hook(_stop_hook)   # skip the rest of the UNet
        try:
            with collector.attach(unet):
                try:
                    unet(zt, tt, encoder_hidden_states=ctx)
                except _Stop:
                    pass
        finally:
            stop.remove()
        got = collector.by_name()
    return {n: got[n].detach() for n in names}


def _stop_hook(*_):
    raise _Stop


def _last_in_forward_order(unet, names) -> str:
    """The attention layer among ``names`` that a forward pass calls last (down blocks, mid
    block, up blocks; ``named_modules`` lists the up blocks before the mid block)."""
    from diffnotes.attention import attention_layers
    place = {"down": 0, "mid": 1, "up": 2}
    order = sorted(attention_layers(unet, "self") + attention_layers(unet, "cross"),
                   key=lambda n: (place.get(n.split("_")[0], 3), n.split(".")[:-1], n))
    return max(names, key=order.index)


@torch.no_grad()
def vae_features(pipe, images) -> torch.Tensor:
    """The VAE latents ``z_0`` as a feature map (B, 4, H/f, W/f): the baseline "no diffusion"."""
    return encode_latents(pipe, images)


# ================================================================== correspondence
SIMILARITIES = ("cos", "dot", "neg_l1")


def _flat(f: torch.Tensor, name: str) -> torch.Tensor:
    check_tensor(f, name, (3, 4))
    return f if f.ndim == 4 else f[None]


def similarity_matrix(f1: torch.Tensor, f2: torch.Tensor, similarity: str = "cos"
                      ) -> torch.Tensor:
    """All pairwise similarities ``phi(F_1(p), F_2(q))`` of two feature maps (Ahmad's notes,
    eq 5.33's phi): ``f1`` (B, C, h1, w1) or (C, h1, w1), ``f2`` likewise with the same C;
    returns (B, h1*w1, h2*w2) (pixels row-major). ``"cos"``: cosine; ``"dot"``: inner product;
    ``"neg_l1"``: minus the L1 distance."""
    sim = check_choice(similarity, "similarity", SIMILARITIES)
    a, b = _flat(f1, "f1"), _flat(f2, "f2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"f2 must have as many channels as f1 ({a.shape[1]}), got {b.shape[1]}")
    if b.shape[0] != a.shape[0] and b.shape[0] != 1 and a.shape[0] != 1:
        raise ValueError(f"f2 must have f1's batch size ({a.shape[0]}) or 1, got {b.shape[0]}")
    A = a.flatten(2).transpose(1, 2)            # (B, N1, C)
    Bm = b.flatten(2).transpose(1, 2)           # (B, N2, C)
    if sim == "cos":
        A = F.normalize(A, dim=-1, eps=1e-12)
        Bm = F.normalize(Bm, dim=-1, eps=1e-12)
    if sim == "neg_l1":
        return -torch.cdist(A, Bm, p=1)
    return A @ Bm.transpose(1, 2)


def dense_correspondence(f1: torch.Tensor, f2: torch.Tensor, similarity: str = "cos"
                         ) -> torch.Tensor:
    """``C(p) = argmax_q phi(F_1(p), F_2(q))`` for every pixel p of ``f1`` (Ahmad's notes,
    eq 5.33): (B, h1, w1, 2) long tensor of (row, col) in ``f2``'s grid ((h1, w1, 2) for
    unbatched (C, h, w) inputs). Ties go to the first target pixel in row-major order."""
    S = similarity_matrix(f1, f2, similarity)            # (B, N1, N2)
    w2 = f2.shape[-1]
    idx = S.argmax(-1)                                         # eq 5.33
    out = torch.stack([idx // w2, idx % w2], -1).reshape(S.shape[0], *f1.shape[-2:], 2)
    return out if f1.ndim == 4 else out[0]


def _check_points(points, size, name: str) -> torch.Tensor:
    p = torch.as_tensor(np.asarray(points, dtype=np.float64) if not isinstance(points, torch.Tensor)
                        else points, dtype=torch.float64)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"{name} must be (x, y) pairs of shape (P, 2), got {tuple(p.shape)}")
    H, W = size
    bad = ~((p[:, 0] >= 0) & (p[:, 0] <= W) & (p[:, 1] >= 0) & (p[:, 1] <= H))
    if bad.any() or not torch.isfinite(p).all():
        raise ValueError(f"{name} must lie inside the {W}x{H} image (0 <= x <= {W}, "
                         f"0 <= y <= {H}), got {p[bad | ~torch.isfinite(p).all(1)].tolist()}")
    return p


def point_similarity(f1: torch.Tensor, f2: torch.Tensor, points, image_size1, image_size2=None,
                     similarity: str = "cos", upsample: bool = True) -> torch.Tensor:
    """Similarity maps of query points: the feature of ``f1`` (C, h1, w1) at each point (x, y)
    of the source image (pixel units of an image of ``image_size1 = (H, W)``, read bilinearly),
    compared with every pixel of ``f2`` (C, h2, w2) (Ahmad's notes, eq 5.37), bilinearly
    upsampled to ``image_size2`` (default: ``image_size1``) when ``upsample``. Returns
    (P, H2, W2) (or (P, h2, w2))."""
    sim = check_choice(similarity, "similarity", SIMILARITIES)
    check_tensor(f1, "f1", 3)
    check_tensor(f2, "f2", 3)
    if f1.shape[0] != f2.shape[0]:
        raise ValueError(f"f2 must have as many channels as f1 ({f1.shape[0]}), got {f2.shape[0]}")
    size1 = tuple(int(s) for s in image_size1)
    size2 = size1 if image_size2 is None else tuple(int(s) for s in image_size2)
    p = _check_points(points, size1, "points")
    H, W = size1
    grid = torch.stack([p[:, 0] / W * 2 - 1, p[:, 1] / H * 2 - 1], -1).to(f1.device, f1.dtype)
    q = F.grid_sample(f1[None], grid[None, :, None], mode="bilinear", align_corners=False,
                      padding_mode="border")[0, :, :, 0]              # (C, P)
    S = similarity_matrix(q[:, :, None], f2, sim)[0]            # (P, h2*w2)
    S = S.reshape(-1, *f2.shape[-2:])
    if upsample:
        S = F.interpolate(S[None], size=size2, mode="bilinear", align_corners=False)[0]
    return S


def _argmax_xy(maps: torch.Tensor, size) -> torch.Tensor:
    """(P, h, w) maps -> (P, 2) (x, y) pixel-centre coordinates in an image of ``size``."""
    P, h, w = maps.shape
    idx = maps.reshape(P, -1).argmax(-1)
    H, W = size
    return torch.stack([(idx % w + 0.5) * W / w, (idx // w + 0.5) * H / h], -1).double().cpu()


def match_points(f1: torch.Tensor, f2: torch.Tensor, points, image_size1, image_size2=None,
                 similarity: str = "cos") -> torch.Tensor:
    """Where each query point (x, y) of the source image lands in the target image: the argmax
    (Ahmad's notes, eq 5.33) of its similarity map, upsampled to the target image
    (:func:`point_similarity`). Returns (P, 2) (x, y) pixel-centre coordinates, float64.
    Raises ValueError when a point lies outside the source image."""
    size2 = tuple(image_size1) if image_size2 is None else tuple(image_size2)
    S = point_similarity(f1, f2, points, image_size1, size2, similarity)
    return _argmax_xy(S, size2)


def cycle_consistency(f1: torch.Tensor, f2: torch.Tensor, similarity: str = "cos"):
    """Forward-backward check of the argmax map: ``C_21(C_12(p))`` against p for every pixel p
    of ``f1`` (the discrete cycle of Ahmad's notes, §5.8: ``T_t(T_s(x)) = x``).

    Returns ``(error, consistent)``: (…, h1, w1) Euclidean distance in grid cells between p and
    its round trip (float), and the boolean map of pixels that come back exactly."""
    fwd = dense_correspondence(f1, f2, similarity)           # (…, h1, w1, 2) in f2's grid
    bwd = dense_correspondence(f2, f1, similarity)           # (…, h2, w2, 2) in f1's grid
    if fwd.ndim == 3:
        fwd, bwd = fwd[None], bwd[None]
    B, h1, w1, _ = fwd.shape
    b = torch.arange(B)[:, None, None]
    back = bwd[b, fwd[..., 0], fwd[..., 1]]                  # (B, h1, w1, 2)
    rows, cols = torch.meshgrid(torch.arange(h1), torch.arange(w1), indexing="ij")
    err = ((back[..., 0] - rows) ** 2 + (back[..., 1] - cols) ** 2).double().sqrt()
    if f1.ndim == 3:
        err = err[0]
    return err, err == 0


def _sinkhorn(C: torch.Tensor, reg: float, n_iter: int) -> torch.Tensor:
    """Entropic OT plan with uniform marginals, log-domain Sinkhorn (Cuturi 2013, Algorithm 1)."""
    n, m = C.shape
    loga = torch.full((n,), -math.log(n), dtype=C.dtype)
    logb = torch.full((m,), -math.log(m), dtype=C.dtype)
    K = -C / reg
    f = torch.zeros(n, dtype=C.dtype)
    g = torch.zeros(m, dtype=C.dtype)
    for _ in range(n_iter):
        f = loga - torch.logsumexp(K + g[None, :], 1)
        g = logb - torch.logsumexp(K + f[:, None], 0)
    return torch.exp(K + f[:, None] + g[None, :])


def ot_match(f1: torch.Tensor, f2: torch.Tensor, similarity: str = "cos", method: str = "emd",
             reg: float = 0.05, n_iter: int = 200):
    """Correspondence by optimal transport instead of a per-pixel argmax: the plan ``P``
    minimising ``sum P_pq c_pq`` with ``c = -phi`` and uniform marginals (each source pixel
    sends, each target pixel receives, the same mass), so two source pixels cannot both take
    the same target pixel. ``method="emd"``: exact (POT, ``ot.emd``; with equal pixel counts the
    plan is a permutation, Birkhoff's theorem); ``"sinkhorn"``: entropic with regularisation
    ``reg`` times the cost's spread (log-domain Sinkhorn in torch, Cuturi 2013).

    ``f1`` (C, h1, w1), ``f2`` (C, h2, w2). Returns ``(match, plan)``: the (h1, w1, 2) (row,
    col) target of each source pixel (the plan's row argmax) and the (h1*w1, h2*w2) plan."""
    method = check_choice(method, "method", ("emd", "sinkhorn"))
    check_tensor(f1, "f1", 3)
    check_tensor(f2, "f2", 3)
    reg = check_positive(reg, "reg")
    C = -similarity_matrix(f1, f2, similarity)[0].double()
    C = C - C.min()
    if method == "emd":
        import ot
        n, m = C.shape
        plan = torch.from_numpy(ot.emd(np.full(n, 1.0 / n), np.full(m, 1.0 / m),
                                       C.detach().cpu().numpy()))
    else:
        plan = _sinkhorn(C / C.max().clamp_min(1e-12), reg, n_iter)
    w2 = f2.shape[-1]
    idx = plan.argmax(1)
    return torch.stack([idx // w2, idx % w2], -1).reshape(*f1.shape[-2:], 2), plan
