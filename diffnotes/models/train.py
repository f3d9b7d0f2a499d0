"""Train the shipped tiny text-to-image model: ``python -m diffnotes.models.train shapes``.

Two stages, like Stable Diffusion (Gormley & Chai's lecture, slides "LDM: Autoencoder" and
"LDM: with DDPM"; Ahmad's notes, §1.5):

(a) the ``AutoencoderKL`` on images alone: reconstruction (MSE + L1) plus a small KL term;
    afterwards ``scaling_factor`` is set to 1/std of the latents (SD's 0.18215 was chosen the
    same way);
(b) the ``CLIPTextModel`` and the ``UNet2DConditionModel`` jointly, on frozen VAE latents
    ``z0 = scaling_factor · E(x)``, with the ε-loss of eq 1.41,
    ``E ||ε − ε_θ(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, c)||²``, and 10% of captions replaced by the empty
    prompt so that classifier-free guidance (eq 1.44) works at sampling time.
    Each sample's term is weighted by Min-SNR-γ (Hang et al. 2023; ``--min-snr-gamma``), and
    latent pixels near an object weigh 1 + λ (``--object-weight``); both in :func:`eps_loss`.
    An auxiliary token-level attention term (as in TokenCompose, Wang et al. 2024) asks each
    object noun's cross-attention map to lie on that object's mask; ``--attn-weight 0`` turns it
    off. It makes the attention maps, which the editing chapters use as an instrument, sharp.

(a') (``--decoder-steps``, 0 to skip) the decoder alone, on the frozen encoder's latents, so the
    latent space the UNet learns does not move.

``--init-from DIR`` continues training an earlier run's weights; its TRAINING.json is embedded and
``total_wall_time_s`` adds up the runs.

The loop uses Hugging Face Accelerate (``Accelerator``, ``prepare``, ``backward``), so the same
code runs on one CPU, several CPU processes or several GPUs:
``torchrun --standalone --nproc_per_node 2 -m diffnotes.models.train shapes`` (or
``accelerate launch -m diffnotes.models.train shapes``). On a busy shared CPU, two one-thread
processes were ~5× faster per step than one process with two threads (which spin at barriers).
It writes a ``StableDiffusionPipeline`` directory (safetensors) and ``TRAINING.json`` (wall
time, CPU time, steps, threads, date, command, and every setting: ``asdict`` of the run's
:class:`TrainConfig`).

The defaults are the shipped recipe, :data:`SHIPPED`: ``python -m diffnotes.models.train shapes``
with no options retrains what ships (all stages in one run; see :data:`SHIPPED` for how that
differs from the two runs that made the shipped weights). Options override single settings.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffnotes.attention import AttentionCollector, RecordingAttnProcessor
from diffnotes.ddpm import q_sample
from diffnotes.utils import check_range

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "weights" / "shapes"


# ------------------------------------------------------------------------- attention recording
def _install_recorder(unet, collector: AttentionCollector):
    """diffnotes.attention's recording processor on cross-attention (attn2), handing the
    head-averaged softmax(QK^T/√d) (eq 1.47) with its graph to ``collector``; PyTorch's fused
    scaled-dot-product attention on self-attention (attn1), whose 256×256 maps at 16×16 are the
    costliest part of a training step on a CPU (~30% fewer seconds per sample than the plain
    processor)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    procs = {}
    for name in unet.attn_processors:
        procs[name] = (RecordingAttnProcessor(collector, name[: -len(".processor")])
                       if name.endswith("attn2.processor") else AttnProcessor2_0())
    unet.set_attn_processor(procs)


def eps_loss(eps, noise, alpha_bar, cover=None, object_weight=0.0, min_snr_gamma=0.0):
    """Per-sample ε-loss of eq 1.41, ‖ε̂ − ε‖² averaged over the latent, with two weightings.

    * ``object_weight`` λ > 0: each latent pixel weighs w = 1 + λ·d, where d is ``cover``
      (B, 1, h, w; 1 where an object is) dilated by one pixel, and the average is Σw·err / Σw.
      Objects cover 3–17% of an image (touching 5–25% of the latent pixels), so without it the
      background carries most of the loss and outlines (shape) are learnt last.
    * ``min_snr_gamma`` γ > 0: each sample times min(SNR_t, γ)/SNR_t, SNR_t = ᾱ_t/(1 − ᾱ_t)
      (Min-SNR-γ, Hang et al. 2023), so low-noise steps, which only polish texture, weigh less.
    """
    err = (eps - noise).pow(2)
    if object_weight > 0:
        if cover is None or cover.shape != (err.shape[0], 1, *err.shape[-2:]):
            raise ValueError(f"cover must have shape {(err.shape[0], 1, *err.shape[-2:])}, "
                             f"got {None if cover is None else tuple(cover.shape)}")
        w = 1 + object_weight * F.max_pool2d(cover.float(), 3, stride=1, padding=1)
        per_sample = (err * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * err.shape[1])
    else:
        per_sample = err.mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        snr = alpha_bar / (1 - alpha_bar)
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    return per_sample


def attention_mask_loss(maps, masks16, masks8, token_idx, valid):
    """Token-level attention loss averaged over cross-attention layers.

    maps: list of (B, HW, M) probabilities; masks16/8: (B, K, 256)/(B, K, 64) soft masks;
    token_idx: (B, K) long token positions of each object's noun; valid: (B, K) bool.
    Per object: (1 − mass of the noun's map inside the mask)² + BCE(map, mask) per pixel.
    """
    if not valid.any():
        return maps[0].sum() * 0.0
    total = 0.0
    for p in maps:
        B, n, M = p.shape
        masks = masks16 if n == masks16.shape[-1] else masks8
        a = torch.gather(p, 2, token_idx[:, None, :].expand(B, n, token_idx.shape[1]))
        a = a.permute(0, 2, 1)                                  # (B, K, HW)
        inside = (a * masks).sum(-1) / (a.sum(-1) + 1e-6)
        l_token = (1.0 - inside) ** 2
        l_pixel = F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), masks, reduction="none").mean(-1)
        total = total + ((l_token + l_pixel) * valid).sum() / valid.sum()
    return total / len(maps)


# ------------------------------------------------------------------------- helpers
def _synced_progress(accelerator, step_fraction: float, time_fraction: float) -> float:
    p = torch.tensor([max(step_fraction, time_fraction)], dtype=torch.float64)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast
        p = broadcast(p.to(accelerator.device), from_process=0).cpu()
    return float(p.item())


def _lr_at(progress: float, base: float, warmup: float = 0.03) -> float:
    if progress < warmup:
        return base * progress / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))))


@torch.no_grad()
def _ema_update(ema_params, params, decay):
    for e, p in zip(ema_params, params):
        e.lerp_(p.detach(), 1.0 - decay)


def _concat_scenes(parts):
    from diffnotes.data.shapes import ShapeScenes
    return ShapeScenes(images=np.concatenate([p.images for p in parts]),
                       masks=np.concatenate([p.masks for p in parts]),
                       boxes=np.concatenate([p.boxes for p in parts]),
                       n_objects=np.concatenate([p.n_objects for p in parts]),
                       captions=sum((p.captions for p in parts), []),
                       noun_index=np.concatenate([p.noun_index for p in parts]),
                       objects=sum((p.objects for p in parts), []))


def _make_dataset(n: int, seed: int, textured_fraction: float = 1.0, object_count_probs=None):
    """Images (uint8 NCHW), token ids, noun token positions, soft masks at 16×16 and 8×8.
    ``object_count_probs``: probabilities of 1, 2, 3 objects (None: the generator's default)."""
    from diffnotes.data.shapes import generate_scenes
    from diffnotes.models.shapes import make_tokenizer
    tok = make_tokenizer()
    imgs, ids, nouns, valid, m16, m8 = [], [], [], [], [], []
    chunk = 2000
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        # textured scenes draw plain / noise / stripes / checker uniformly; the rest are plain
        n_tex = int(round(m * textured_fraction))
        parts = [generate_scenes(k, seed=seed * 100003 + start + 7919 * j, textured=tex,
                                 object_count_probs=object_count_probs)
                 for j, (k, tex) in enumerate(((n_tex, True), (m - n_tex, False))) if k > 0]
        sc = parts[0] if len(parts) == 1 else _concat_scenes(parts)
        imgs.append(torch.from_numpy((sc.images * 255 + 0.5).astype(np.uint8)).permute(0, 3, 1, 2))
        enc = tok(sc.captions, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt")
        ids.append(enc.input_ids)
        tpos = torch.from_numpy(sc.noun_index + 1)                # +1 for <|startoftext|>
        ok = (torch.from_numpy(sc.noun_index) >= 0) & (tpos < tok.model_max_length - 1)
        nouns.append(torch.where(ok, tpos, torch.zeros_like(tpos)))
        valid.append(ok)
        m = torch.from_numpy(sc.masks).float()                   # (B, K, 64, 64)
        m16.append(F.avg_pool2d(m, 4).flatten(2).half())
        m8.append(F.avg_pool2d(m, 8).flatten(2).half())
    return dict(images=torch.cat(imgs), ids=torch.cat(ids), nouns=torch.cat(nouns),
                valid=torch.cat(valid), m16=torch.cat(m16), m8=torch.cat(m8))


def _infinite(loader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            yield batch
        epoch += 1


# ------------------------------------------------------------------------- stages
class _VAERoundTrip(torch.nn.Module):
    """encode → sample → decode in one forward, so DDP sees one module call."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        post = self.vae.encode(x).latent_dist                  # eq 1.37
        dec = self.vae.decode(post.sample()).sample            # eq 1.42
        return dec, post.kl()


def _set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def _optimizer_step(accelerator, opt, loss):
    """zero_grad, backward through Accelerate, step."""
    opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    opt.step()


def _schedule(accelerator, opt, base_lr, max_steps, deadline, desc):
    """Yield step numbers 1, 2, … until ``max_steps`` or ``deadline``, whichever comes first,
    setting the warm-up + cosine lr before each step and ticking a progress bar after it.
    Rank 0's clock decides, so every process uses the same lr and stops at the same step."""
    from tqdm.auto import tqdm
    t0 = time.time()
    budget = max(deadline - t0, 1e-3)
    bar = tqdm(total=max_steps, desc=desc, mininterval=20, disable=not accelerator.is_main_process)
    step = 0
    while True:
        progress = _synced_progress(accelerator, step / max_steps, (time.time() - t0) / budget)
        if progress >= 1.0:
            break
        _set_lr(opt, _lr_at(progress, base_lr))
        step += 1
        yield step
        bar.update(1)
    bar.close()


def train_vae(vae, data, args, accelerator, deadline, log):
    """Stage (a): reconstruction (MSE + L1) plus a small KL on random crops (eqs 1.37, 1.42).
    Stops at ``args.vae_steps`` or at ``deadline``; returns ``(vae, steps)``."""
    ds = torch.utils.data.TensorDataset(data["images"])
    loader = torch.utils.data.DataLoader(ds, batch_size=args.vae_batch_size, shuffle=True,
                                         drop_last=True, generator=torch.Generator().manual_seed(args.seed))
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    roundtrip = _VAERoundTrip(vae)
    roundtrip, opt, loader = accelerator.prepare(roundtrip, opt, loader)
    roundtrip.train()
    gcrop = torch.Generator().manual_seed(args.seed + 3)
    it = _infinite(loader)
    step = 0
    for step in _schedule(accelerator, opt, args.vae_lr, args.vae_steps, deadline, "vae"):
        (x,) = next(it)
        x = x.float() / 127.5 - 1.0
        if args.vae_crop < x.shape[-1]:                # the VAE is convolutional: train on crops
            i, j = (int(v) for v in torch.randint(0, x.shape[-1] - args.vae_crop + 1, (2,), generator=gcrop))
            x = x[..., i:i + args.vae_crop, j:j + args.vae_crop]
        dec, kl = roundtrip(x)
        rec = F.mse_loss(dec, x) + F.l1_loss(dec, x)
        kl = kl.mean() / x[0].numel()
        loss = rec + args.kl_weight * kl
        _optimizer_step(accelerator, opt, loss)
        if step % 50 == 0 or step == 1:
            log(f"vae step {step} rec {rec.item():.4f} kl/dim {kl.item():.3f} lr {opt.param_groups[0]['lr']:.2e}")
    return accelerator.unwrap_model(roundtrip).vae, step


class _Decode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample                       # eq 1.42


def finetune_decoder(vae, latents, images, args, accelerator, deadline, log):
    """Train only the decoder (and post_quant_conv) on the frozen encoder's latent means, so
    the latent space the UNet learns is unchanged. Random 8×8 latent crops ↔ 32×32 pixels."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    ds = torch.utils.data.TensorDataset(latents, images)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.vae_batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed + 4))
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    dec = _Decode(vae)
    dec, opt, loader = accelerator.prepare(dec, opt, loader)
    dec.train()
    gcrop = torch.Generator().manual_seed(args.seed + 5)
    it = _infinite(loader)
    step = 0
    for step in _schedule(accelerator, opt, args.decoder_lr, args.decoder_steps, deadline, "decoder"):
        z, x = next(it)
        x = x.float() / 127.5 - 1.0
        c = args.vae_crop // 4
        if c < z.shape[-1]:
            i, j = (int(v) for v in torch.randint(0, z.shape[-1] - c + 1, (2,), generator=gcrop))
            z, x = z[..., i:i + c, j:j + c], x[..., 4 * i:4 * (i + c), 4 * j:4 * (j + c)]
        out = dec(z)
        loss = F.mse_loss(out, x) + F.l1_loss(out, x)
        _optimizer_step(accelerator, opt, loss)
        if step % 50 == 0 or step == 1:
            log(f"decoder step {step} rec {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
    vae = accelerator.unwrap_model(dec).vae
    vae.requires_grad_(False)
    vae.eval()
    return vae, step


@torch.no_grad()
def encode_latents(vae, images, batch=256):
    """Latent means E(x) of uint8 images (N, 3, 64, 64), in batches."""
    vae.eval()
    out = []
    for s in range(0, len(images), batch):
        x = images[s:s + batch].float() / 127.5 - 1.0
        out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out)


def train_denoiser(unet, text_encoder, latents, data, empty_ids, scheduler, args, accelerator,
                   deadline, log, checkpoint):
    """Stage (b): the text encoder and UNet jointly on the ε-loss in latent space (eqs 1.38, 1.41),
    weighted as in :func:`eps_loss`, with caption dropout for CFG and the optional
    noun-attention/mask loss (:func:`attention_mask_loss`). Returns the EMA
    models, their weights and the number of steps."""
    ds = torch.utils.data.TensorDataset(latents, data["ids"], data["nouns"], data["valid"],
                                        data["m16"], data["m8"])
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, generator=torch.Generator().manual_seed(args.seed + 1))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    store = AttentionCollector(active=False)
    _install_recorder(unet, store)
    unet, text_encoder, opt, loader = accelerator.prepare(unet, text_encoder, opt, loader)
    unet.train(); text_encoder.train()
    ema_models = [accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)]
    ema = [[p.detach().clone() for p in m.parameters()] for m in ema_models]
    acp = scheduler.alphas_cumprod.to(accelerator.device)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 2 + 1000 * accelerator.process_index)
    it = _infinite(loader)
    t0 = last_ckpt = time.time()
    step = 0
    for step in _schedule(accelerator, opt, args.lr, args.steps, deadline, "unet+text"):
        z0, ids, nouns, valid, m16, m8 = next(it)
        B = z0.shape[0]
        drop = torch.rand(B, generator=g) < args.cond_drop                       # CFG dropout
        ids = torch.where(drop[:, None].to(ids.device), empty_ids.to(ids.device)[None], ids)
        valid = valid & ~drop[:, None].to(valid.device)
        noise = torch.randn(z0.shape, generator=g).to(z0.device)
        t = torch.randint(0, len(acp), (B,), generator=g).to(z0.device)
        z0 = z0 * args.scaling_factor
        zt = q_sample(z0, t, acp, noise)                                         # eq 1.38
        store.maps = []
        store.active = args.attn_weight > 0
        hidden = text_encoder(ids)[0]
        eps = unet(zt, t, hidden).sample
        store.active = False
        cover = (m16.float().sum(1) > 0.01).float().view(B, 1, *z0.shape[-2:])
        per_sample = eps_loss(eps, noise, acp[t], cover, args.object_weight, args.min_snr_gamma)
        loss_eps = per_sample.mean()
        loss = loss_eps
        if args.attn_weight > 0 and store.maps:
            loss_attn = attention_mask_loss(store.maps, m16.float(), m8.float(), nouns, valid.float())
            loss = loss + args.attn_weight * loss_attn
        else:
            loss_attn = torch.zeros(())
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        for e, m in zip(ema, ema_models):
            _ema_update(e, list(m.parameters()), decay)
        if step % 50 == 0 or step == 1:
            log(f"unet step {step} eps {loss_eps.item():.4f} attn {loss_attn.item():.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} elapsed {time.time() - t0:.0f}s")
        if checkpoint is not None and time.time() - last_ckpt > args.checkpoint_minutes * 60:
            checkpoint(ema_models, ema, step)
            last_ckpt = time.time()
    store.maps = []
    return ema_models, ema, step


def _swap_in(models, ema):
    """Copy EMA weights into the models (in place)."""
    with torch.no_grad():
        for m, e in zip(models, ema):
            for p, q in zip(m.parameters(), e):
                p.copy_(q)


def save_pipeline(out, vae, text_encoder, tokenizer, unet, scheduler):
    """Write a ``StableDiffusionPipeline`` directory (safetensors) that ``from_pretrained`` loads."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # transformers 5 records its fast tokenizer as "TokenizersBackend", which transformers 4
    # (e.g. on Colab) does not know; PreTrainedTokenizerFast loads the same tokenizer.json in both.
    for f in (Path(out) / "model_index.json", Path(out) / "tokenizer" / "tokenizer_config.json"):
        f.write_text(f.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    return pipe


# ------------------------------------------------------------------------- the recipe
def _probs3(text: str) -> tuple:
    try:
        v = tuple(float(x) for x in text.split(","))
    except ValueError:
        v = ()
    if len(v) != 3 or min(v) < 0 or sum(v) <= 0:
        raise argparse.ArgumentTypeError(
            f"--object-count-probs must be three non-negative numbers like 0.6,0.25,0.15, got {text!r}")
    return v


def _opt(default, help: str = "", **argparse_kw):
    """A config field with its command-line help (``--name-with-dashes``)."""
    return field(default=default, metadata=dict(help=help, **argparse_kw))


@dataclass
class TrainConfig:
    """Every setting of ``python -m diffnotes.models.train shapes``; the defaults are the shipped
    recipe (:data:`SHIPPED`). Each field is the command-line option ``--field-name``."""

    # budget and step counts (the counts are the shipped run's; the budget stops a slower run)
    minutes: float = _opt(60.0, "total wall-time budget")
    vae_steps: int = _opt(800, "autoencoder steps, stage (a)")
    vae_fraction: float = _opt(0.12, "fraction of the budget the VAE stage may use at most")
    decoder_steps: int = _opt(300, "decoder-only steps on the frozen encoder's latents, "
                                   "stage (a') (0: none)")
    decoder_fraction: float = _opt(0.05, "fraction of the budget the decoder stage may use at most")
    steps: int = _opt(3798, "max UNet+text steps, stage (b) (the time budget also caps)")
    # data
    n_scenes: int = _opt(20000, "number of generated training scenes")
    textured_fraction: float = _opt(0.1, "fraction of scenes drawn with textured=True "
                                         "(the rest plain)")
    object_count_probs: tuple | None = _opt(
        (0.7, 0.2, 0.1), "probabilities of 1, 2, 3 objects per scene, e.g. 0.6,0.25,0.15",
        type=_probs3)
    # stage (a), (a'): the autoencoder
    vae_batch_size: int = _opt(16)
    vae_crop: int = _opt(32, "train the VAE on random crops of this size")
    vae_lr: float = _opt(2e-3)
    kl_weight: float = _opt(1e-3, "weight of the per-dim KL")
    decoder_lr: float = _opt(1e-3)
    # stage (b): text encoder + UNet
    batch_size: int = _opt(32, "per process")
    lr: float = _opt(1e-3)
    ema_decay: float = _opt(0.997)
    cond_drop: float = _opt(0.1, "empty-caption probability (CFG)")
    min_snr_gamma: float = _opt(5.0, "Min-SNR-γ loss weighting of the ε-loss "
                                     "(0: plain, unweighted eq 1.41)")
    object_weight: float = _opt(4.0, "extra ε-loss weight λ on latent pixels near an object "
                                     "(0 = off)")
    attn_weight: float = _opt(0.1, "weight of the noun-attention/mask loss (0 disables)")
    seed: int = _opt(0)
    # where and how it runs (not part of the recipe's numbers)
    threads: int = _opt(1, "torch CPU threads (1: on a busy shared CPU, 2 threads spin at "
                           "barriers)")
    cpu: bool = _opt(False, "force CPU even if a GPU is present")
    out: str = _opt(str(DEFAULT_OUT), "output pipeline directory")
    checkpoint_dir: str | None = _opt(None, "save EMA checkpoints here")
    checkpoint_minutes: float = _opt(10.0)
    init_from: str | None = _opt(None, "pipeline directory to continue training from "
                                       "(UNet, text encoder, VAE)")
    vae_from: str | None = _opt(None, "pipeline/checkpoint directory whose trained VAE to reuse "
                                      "(skips stage a)")


#: The recipe of the shipped ``diffnotes/weights/shapes`` (its TRAINING.json records the runs).
#: The shipped weights came from two commands: an autoencoder run (stages a and a', whose
#: settings are the ``vae_*``/``decoder_*`` ones here, on 12 000 scenes of a slightly different
#: mix), then the UNet and text encoder (stage b, these settings) with ``--vae-from`` that
#: autoencoder, for a 54-minute budget. SHIPPED trains all stages in one run, on one data set,
#: with the same settings, so ``python -m diffnotes.models.train shapes`` alone retrains it
#: (the shipped run used two one-thread processes, ``torchrun --standalone --nproc_per_node 2
#: -m diffnotes.models.train shapes``; ``batch_size`` is per process). Step counts and the
#: learning-rate schedule follow the wall clock too, so a retrain is close to, not bitwise, the
#: shipped weights.
SHIPPED = TrainConfig()


# ------------------------------------------------------------------------- entry point
def train_shapes(cfg: TrainConfig = SHIPPED, argv=None) -> dict:
    """The whole run of ``cfg``: data, stage (a) or a reused VAE, optional decoder stage,
    stage (b), save, and the TRAINING.json record it returns (command line ``argv``, default
    :func:`config_argv`; the config as ``asdict``; wall and CPU time, threads, steps done)."""
    from accelerate import Accelerator
    from diffnotes.models import shapes as M

    args = replace(cfg)               # a copy: the run fills in vae_from, scaling_factor, ...
    args.argv = list(argv) if argv is not None else config_argv(cfg)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    out = Path(args.out)

    def log(msg):
        if accelerator.is_main_process:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t_start, cpu_start = time.time(), time.process_time()
    load_at_start = round(os.getloadavg()[0], 2)   # how busy the machine was (other jobs)
    deadline = t_start + args.minutes * 60
    log(f"threads={torch.get_num_threads()} device={accelerator.device} budget={args.minutes} min")
    data = _make_dataset(args.n_scenes, args.seed, args.textured_fraction, args.object_count_probs)
    log(f"dataset: {args.n_scenes} scenes in {time.time() - t_start:.1f}s")

    comps = M.make_components()
    if args.init_from:                # warm start: continue training an earlier run's weights
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel
        comps["unet"] = UNet2DConditionModel.from_pretrained(args.init_from, subfolder="unet")
        comps["text_encoder"] = CLIPTextModel.from_pretrained(args.init_from, subfolder="text_encoder")
        args.vae_from = args.vae_from or args.init_from
        prev = Path(args.init_from) / "TRAINING.json"
        args.init_record = json.loads(prev.read_text()) if prev.exists() else None
        log(f"unet and text encoder initialised from {args.init_from}")
    vae, text_encoder, tokenizer, unet, scheduler = (comps[k] for k in
                                                     ("vae", "text_encoder", "tokenizer", "unet", "scheduler"))
    vae_record = None
    if args.vae_from:                 # reuse the stage-(a) autoencoder of an earlier run
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae")
        rec_file = Path(args.vae_from) / "vae_record.json"
        vae_record = json.loads(rec_file.read_text()) if rec_file.exists() else None
        vae_steps = vae_record.get("vae_steps", 0) if vae_record else 0
        log(f"vae loaded from {args.vae_from} ({vae_record})")
    else:
        vae_deadline = t_start + args.minutes * 60 * args.vae_fraction
        vae, vae_steps = train_vae(vae, data, args, accelerator, vae_deadline, log)
        vae_record = dict(vae_steps=vae_steps, vae_wall_time_s=round(time.time() - t_start, 1),
                          command=_command_line(args, accelerator))
        if args.checkpoint_dir and accelerator.is_main_process:
            Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            vae.save_pretrained(str(Path(args.checkpoint_dir) / "vae"), safe_serialization=True)
            (Path(args.checkpoint_dir) / "vae_record.json").write_text(json.dumps(vae_record, indent=2))
    vae = vae.float()
    latents = encode_latents(vae, data["images"])
    sf = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=sf)
    args.scaling_factor = sf
    log(f"vae done: {vae_steps} steps; latent std {latents.std():.3f} -> scaling_factor {sf:.4f}")
    decoder_steps = 0
    if args.decoder_steps > 0:        # stage (a'): sharpen the decoder; latents stay the same
        dec_deadline = time.time() + args.minutes * 60 * args.decoder_fraction
        vae, decoder_steps = finetune_decoder(vae, latents, data["images"], args, accelerator,
                                              dec_deadline, log)
    vae.requires_grad_(False)

    empty_ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids[0]

    def checkpoint(models, ema, step):
        if args.checkpoint_dir and accelerator.is_main_process:
            backup = [[p.detach().clone() for p in m.parameters()] for m in models]
            _swap_in(models, ema)
            save_pipeline(args.checkpoint_dir, vae, models[1], tokenizer, models[0], scheduler)
            _swap_in(models, backup)
            log(f"checkpoint (EMA) at step {step} -> {args.checkpoint_dir}")

    models, ema, steps = train_denoiser(unet, text_encoder, latents, data, empty_ids, scheduler,
                                        args, accelerator, deadline, log, checkpoint)
    _swap_in(models, ema)
    unet, text_encoder = models
    from diffusers.models.attention_processor import AttnProcessor
    unet.set_attn_processor(AttnProcessor())
    wall, cpu = time.time() - t_start, time.process_time() - cpu_start
    record = {}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_pipeline(out, vae, text_encoder, tokenizer, unet, scheduler)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        record = dict(
            command=_command_line(args, accelerator),
            date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            wall_time_s=round(wall, 1), process_cpu_time_s=round(cpu, 1),
            threads=torch.get_num_threads(), device=str(accelerator.device),
            num_processes=accelerator.num_processes,
            machine=f"{platform.machine()}, {os.cpu_count()} logical CPUs",
            load_average_at_start=load_at_start,
            torch=torch.__version__, config=asdict(args),          # every setting of the run
            vae_steps=vae_steps, decoder_steps=decoder_steps, unet_steps=steps,  # steps done
            scaling_factor=sf, total_size_bytes=size, vae_record=vae_record,
            init_record=getattr(args, "init_record", None),
            total_wall_time_s=round(wall + _previous_wall(args, vae_record), 1),
            note=("Stage (a) VAE: MSE+L1+KL. Stage (b) text encoder + UNet: eps-loss on "
                  "scaling_factor·E(x), Min-SNR-γ weighted (min_snr_gamma, 0 = unweighted), "
                  "object latents weighted 1 + object_weight, "
                  "10% empty captions (CFG), plus attn_weight × token-level "
                  "cross-attention/mask loss on object nouns. Weights saved are the EMA weights."),
        )
        (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
        log(f"saved to {out} ({size / 1e6:.1f} MB); wall {wall / 60:.1f} min, cpu {cpu / 60:.1f} min")
    return record


def _command_line(args, accelerator) -> str:
    launcher = ("python -m" if accelerator.num_processes == 1 else
                f"torchrun --standalone --nproc_per_node {accelerator.num_processes} -m")
    return f"{launcher} diffnotes.models.train " + " ".join(args.argv)


def _previous_wall(args, vae_record) -> float:
    """Wall time of the earlier run(s) whose weights this run starts from."""
    rec = getattr(args, "init_record", None)
    if args.init_from:
        return float(rec.get("total_wall_time_s", rec.get("wall_time_s", 0))) if rec else 0.0
    if args.vae_from and vae_record:
        return float(vae_record.get("vae_wall_time_s", 0))
    return 0.0


def build_parser():
    """The command-line options of ``python -m diffnotes.models.train shapes``: one per field of
    :class:`TrainConfig`, defaulting to :data:`SHIPPED`."""
    p = argparse.ArgumentParser(prog="python -m diffnotes.models.train",
                                description="Train the shipped tiny text-to-image model.")
    p.add_argument("model", choices=["shapes"], help="which model to train")
    for f in fields(TrainConfig):
        flag, kw = "--" + f.name.replace("_", "-"), dict(f.metadata)
        default = getattr(SHIPPED, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default, **kw)
            continue
        kw.setdefault("type", type(default) if default is not None else str)
        p.add_argument(flag, default=default, **kw)
    return p


def parse_config(argv) -> TrainConfig:
    """The :class:`TrainConfig` of a command line (``["shapes", "--lr", "2e-3"]``), validated."""
    ns = vars(build_parser().parse_args(list(argv)))
    cfg = TrainConfig(**{f.name: ns[f.name] for f in fields(TrainConfig)})
    for name in ("minutes", "lr", "vae_lr"):
        check_range(getattr(cfg, name), f"--{name.replace('_', '-')}", 0, None, lo_open=True)
    check_range(cfg.cond_drop, "--cond-drop", 0, 1, hi_open=True)
    return cfg


def config_argv(cfg: TrainConfig) -> list[str]:
    """The shortest command line of ``cfg``: ``["shapes"]`` and the options that differ from
    :data:`SHIPPED` (``parse_config(config_argv(cfg)) == cfg``)."""
    argv = ["shapes"]
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == getattr(SHIPPED, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag)
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return argv


def main(argv=None):
    """Entry point: the config of the command line (no options: :data:`SHIPPED`), then
    :func:`train_shapes`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return train_shapes(cfg, argv)


if __name__ == "__main__":
    main()
