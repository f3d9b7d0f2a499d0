"""Train the shipped tiny text-to-image model: ``python -m diffnotes.models.train shapes``.

Two stages, like Stable Diffusion (seed 004; seed 000 §1.5):

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

(a') optionally (``--decoder-steps``) the decoder alone, on the frozen encoder's latents, so the
    latent space the UNet learns does not move.

``--init-from DIR`` continues training an earlier run's weights; its TRAINING.json is embedded and
``total_wall_time_s`` adds up the runs.

The loop uses Hugging Face Accelerate (``Accelerator``, ``prepare``, ``backward``), so the same
code runs on one CPU, several CPU processes or several GPUs:
``torchrun --standalone --nproc_per_node 2 -m diffnotes.models.train shapes`` (or
``accelerate launch -m diffnotes.models.train shapes``). On a busy shared CPU, two one-thread
processes were ~5× faster per step than one process with two threads (which spin at barriers).
It writes a ``StableDiffusionPipeline`` directory (safetensors) and ``TRAINING.json`` (wall
time, CPU time, steps, threads, date, command).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "weights" / "shapes"


# ------------------------------------------------------------------------- attention recording
class _AttnStore:
    """Collects head-averaged cross-attention probabilities during one UNet call."""

    def __init__(self):
        self.active = False
        self.maps: list[torch.Tensor] = []


class _RecordingCrossAttnProcessor:
    """Plain (non-SDPA) attention that also stores softmax(QK^T/√d) (eq 1.47) head-averaged,
    shape (B, HW, M), when ``store.active``."""

    def __init__(self, store: _AttnStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        p = attn.get_attention_scores(q, k, None)              # (B·heads, HW, M), eq 1.47
        if self.store.active:
            self.store.maps.append(p.view(b, attn.heads, n, -1).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(p, v))
        out = attn.to_out[1](attn.to_out[0](out))
        return out


def _install_recorder(unet, store):
    """Recording processors on cross-attention (attn2); PyTorch's fused scaled-dot-product
    attention on self-attention (attn1), whose 256×256 maps at 16×16 are the costliest part of
    a training step on a CPU (~30% fewer seconds per sample than the plain processor)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    procs = {}
    for name in unet.attn_processors:
        procs[name] = _RecordingCrossAttnProcessor(store) if name.endswith("attn2.processor") \
            else AttnProcessor2_0()
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
    store = _AttnStore()
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
        ab = acp[t].view(B, 1, 1, 1)
        z0 = z0 * args.scaling_factor
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise                            # eq 1.38
        store.maps = []
        store.active = args.attn_weight > 0
        hidden = text_encoder(ids)[0]
        eps = unet(zt, t, hidden).sample
        store.active = False
        cover = (m16.float().sum(1) > 0.01).float().view(B, 1, *z0.shape[-2:])
        per_sample = eps_loss(eps, noise, ab.view(B), cover, args.object_weight, args.min_snr_gamma)
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


# ------------------------------------------------------------------------- entry point
def train_shapes(args) -> dict:
    """The whole run: data, stage (a) or a reused VAE, optional decoder stage, stage (b), save,
    and the TRAINING.json record (command, wall and CPU time, threads, steps) it returns."""
    from accelerate import Accelerator
    from diffnotes.models import shapes as M

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
            torch=torch.__version__, vae_steps=vae_steps, vae_batch_size=args.vae_batch_size, vae_crop=args.vae_crop,
            unet_steps=steps, batch_size=args.batch_size, n_scenes=args.n_scenes,
            lr=args.lr, vae_lr=args.vae_lr, kl_weight=args.kl_weight, cond_drop=args.cond_drop,
            attn_weight=args.attn_weight, textured_fraction=args.textured_fraction, ema_decay=args.ema_decay,
            min_snr_gamma=args.min_snr_gamma, object_weight=args.object_weight, object_count_probs=args.object_count_probs,
            scaling_factor=sf, seed=args.seed, total_size_bytes=size,
            decoder_steps=decoder_steps, decoder_lr=args.decoder_lr,
            vae_from=args.vae_from, vae_record=vae_record, init_from=args.init_from,
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


def _probs3(text: str) -> tuple[float, float, float]:
    try:
        v = tuple(float(x) for x in text.split(","))
    except ValueError:
        v = ()
    if len(v) != 3 or min(v) < 0 or sum(v) <= 0:
        raise argparse.ArgumentTypeError(
            f"--object-count-probs must be three non-negative numbers like 0.6,0.25,0.15, got {text!r}")
    return v


def build_parser():
    """The command-line options of ``python -m diffnotes.models.train shapes``."""
    p = argparse.ArgumentParser(prog="python -m diffnotes.models.train",
                                description="Train the shipped tiny text-to-image model.")
    p.add_argument("model", choices=["shapes"], help="which model to train")
    p.add_argument("--minutes", type=float, default=40.0, help="total wall-time budget")
    p.add_argument("--vae-fraction", type=float, default=0.18,
                   help="fraction of the budget the VAE stage may use at most")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=100000, help="max UNet+text steps (time also caps)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--vae-crop", type=int, default=32, help="train the VAE on random crops")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the per-dim KL")
    p.add_argument("--cond-drop", type=float, default=0.1, help="empty-caption probability (CFG)")
    p.add_argument("--attn-weight", type=float, default=0.1,
                   help="weight of the noun-attention/mask loss (0 disables)")
    p.add_argument("--decoder-steps", type=int, default=0,
                   help="extra decoder-only steps on the frozen encoder's latents (0: none)")
    p.add_argument("--decoder-fraction", type=float, default=0.35,
                   help="fraction of the budget the decoder stage may use at most")
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--n-scenes", type=int, default=8000)
    p.add_argument("--object-count-probs", type=_probs3, default=None,
                   help="probabilities of 1, 2, 3 objects per scene, e.g. 0.6,0.25,0.15 "
                        "(default: the generator's 0.5,0.3,0.2)")
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="extra ε-loss weight λ on latent pixels covered by an object (0 = off)")
    p.add_argument("--min-snr-gamma", type=float, default=5.0,
                   help="Min-SNR-γ loss weighting of the ε-loss (0: plain, unweighted eq 1.41)")
    p.add_argument("--textured-fraction", type=float, default=1.0,
                   help="fraction of scenes drawn with textured=True (the rest plain)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a busy shared CPU, 2 threads spin at barriers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="force CPU even if a GPU is present")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--checkpoint-dir", default=None, help="save EMA checkpoints here")
    p.add_argument("--init-from", default=None,
                   help="pipeline directory to continue training from (UNet, text encoder, VAE)")
    p.add_argument("--vae-from", default=None,
                   help="pipeline/checkpoint directory whose trained VAE to reuse (skips stage a)")
    p.add_argument("--checkpoint-minutes", type=float, default=8.0)
    return p


def main(argv=None):
    """Entry point: validate the options, then :func:`train_shapes`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    for name in ("minutes", "lr", "vae_lr"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.cond_drop < 1:
        raise ValueError(f"--cond-drop must be in [0, 1), got {args.cond_drop}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return train_shapes(args)


if __name__ == "__main__":
    main()
