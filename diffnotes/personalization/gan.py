"""Before diffusion: personalizing a GAN (Ahmad's notes, §4.2; notes_editing §17).

A StyleGAN-like generator small enough to read in one sitting and to train on two CPU cores
(Karras et al. 2019), with the personalization tools of the GAN era:

* :class:`Mapping` z → w (pixel-norm, MLP); :class:`Synthesis`: a learned constant 4×4 input,
  blocks (upsample, 3×3 conv, per-pixel noise with a learned per-channel scale, AdaIN from a
  per-layer style ``w_i``) up to 32×32; style mixing (a crossover layer) and truncation
  (``w' = w̄ + ψ (w − w̄)``).
* :func:`adain`: StyleGAN's AdaIN (StyleGAN eq 1) — instance norm per channel, then a style scale
  and bias. Ahmad's notes call it "AdaLN": an erratum (layer norm normalises over all channels
  at once; :func:`layer_norm_modulation` is that operation, for the check).
* :func:`invert` in W (one vector) or W+ (one per layer; Image2StyleGAN, Abdal et al. 2019);
  W+ with equal rows is W bitwise.
* :func:`pti`: pivotal tuning (Roich et al. 2022): the pivot w stays fixed, the generator's
  weights move; optional locality regulariser.
* :func:`ewc_fisher`, :func:`ewc_penalty`, :func:`adapt`: few-shot adaptation with elastic
  weight consolidation (Li et al. 2020, eqs 2–3).

``python -m diffnotes.personalization.gan train`` retrains the shipped weights
(``diffnotes/weights/shapes_gan``); ``... gan evaluate`` writes ``results/gan.json``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffnotes.utils import check_choice, check_int, check_positive, check_range

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "shapes_gan"
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "gan.json"
RESOLUTION = 32
TRAIN_SEED = 31_337          # training scenes; never used for held-out targets
TARGET_SEED = 90_210         # held-out inversion targets


# =========================================================================== building blocks
class EqLinear(nn.Module):
    """Linear layer with StyleGAN's equalized learning rate: weights ~ N(0, 1) scaled by
    ``lr_mul / sqrt(fan_in)`` at run time."""

    def __init__(self, d_in, d_out, bias_init=0.0, lr_mul=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((d_out,), float(bias_init)))
        self.scale, self.lr_mul = lr_mul / math.sqrt(d_in), lr_mul

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqConv(nn.Module):
    """3×3 (or k×k) convolution with equalized learning rate."""

    def __init__(self, c_in, c_out, k=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.scale, self.pad = 1 / math.sqrt(c_in * k * k), k // 2

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.pad)


def adain(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eps: float = 1e-8):
    """AdaIN (StyleGAN eq 1; Huang & Belongie 2017): ``y_s,c · (x_c − μ_c(x)) / σ_c(x) + y_b,c``,
    μ_c and σ_c over the spatial positions of each channel of each sample (instance norm).

    x: (B, C, H, W); scale, bias: (B, C). Ahmad's notes, §4.2, call this "AdaLN" — an erratum:
    layer norm (:func:`layer_norm_modulation`) pools over C as well."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    sigma = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    return scale[:, :, None, None] * (x - mu) / sigma + bias[:, :, None, None]


def layer_norm_modulation(x, scale, bias, eps: float = 1e-8):
    """The operation "AdaLN" would name: normalise each sample over (C, H, W) together, then the
    same per-channel scale and bias. Only for the erratum check; StyleGAN does not use it."""
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    sigma = (x.var(dim=(1, 2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    return scale[:, :, None, None] * (x - mu) / sigma + bias[:, :, None, None]


class StyleLayer(nn.Module):
    """conv (optional) → noise · learned per-channel scale → leaky ReLU → AdaIN(style)."""

    def __init__(self, c_in, c_out, w_dim, conv=True):
        super().__init__()
        self.conv = EqConv(c_in, c_out) if conv else None
        self.noise_strength = nn.Parameter(torch.zeros(c_out))
        self.affine = EqLinear(w_dim, 2 * c_out)
        with torch.no_grad():                      # style scale starts at 1, bias at 0
            self.affine.bias[:c_out] = 1.0

    def forward(self, x, w, noise):
        if self.conv is not None:
            x = self.conv(x)
        x = x + self.noise_strength[None, :, None, None] * noise
        x = F.leaky_relu(x, 0.2)
        s, b = self.affine(w).chunk(2, dim=1)
        return adain(x, s, b)


@dataclass
class GANConfig:
    z_dim: int = 64
    w_dim: int = 64
    mapping_layers: int = 4
    channels: tuple = (64, 64, 32, 16)      # at 4, 8, 16, 32 pixels
    d_channels: tuple = (16, 32, 64, 64)    # discriminator at 32, 16, 8, 4


class Mapping(nn.Module):
    """z (B, z_dim) → w (B, w_dim): pixel-norm then ``mapping_layers`` leaky-ReLU MLP layers
    (StyleGAN §2; lr multiplier 0.01)."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        dims = [cfg.z_dim] + [cfg.w_dim] * cfg.mapping_layers
        self.layers = nn.ModuleList(EqLinear(a, b, lr_mul=0.01) for a, b in zip(dims, dims[1:]))

    def forward(self, z):
        x = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2)
        return x


class Synthesis(nn.Module):
    """ws (B, num_layers, w_dim) → image (B, 3, 32, 32) in about [−1, 1]. Layer 0 modulates the
    learned constant; then two style layers per resolution (the first after a 2× upsample)."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        c = cfg.channels
        self.const = nn.Parameter(torch.randn(1, c[0], 4, 4))
        layers, self.resolutions, self.upsample = [], [], []
        layers.append(StyleLayer(c[0], c[0], cfg.w_dim, conv=False))
        layers.append(StyleLayer(c[0], c[0], cfg.w_dim))
        self.resolutions += [4, 4]
        self.upsample += [False, False]
        for i in range(1, len(c)):
            layers.append(StyleLayer(c[i - 1], c[i], cfg.w_dim))
            layers.append(StyleLayer(c[i], c[i], cfg.w_dim))
            self.resolutions += [4 * 2 ** i] * 2
            self.upsample += [True, False]
        self.layers = nn.ModuleList(layers)
        self.to_rgb = EqConv(c[-1], 3, k=1)
        self.num_layers = len(layers)
        for i, r in enumerate(self.resolutions):   # fixed noise for deterministic generation
            self.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r, generator=torch.Generator()
                                                           .manual_seed(1000 + i)))

    def forward(self, ws, noise_mode: str = "const", generator=None):
        B = ws.shape[0]
        x = self.const.expand(B, -1, -1, -1)
        for i, layer in enumerate(self.layers):
            if self.upsample[i]:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            r = self.resolutions[i]
            if noise_mode == "const":
                n = getattr(self, f"noise_{i}")
            elif noise_mode == "random":
                n = torch.randn(B, 1, r, r, generator=generator, device=ws.device)
            else:
                n = torch.zeros(1, 1, r, r, device=ws.device)
            x = layer(x, ws[:, i], n)
        return self.to_rgb(x)


class Generator(nn.Module):
    """Mapping + synthesis; ``w_avg`` (running mean of w) for truncation."""

    def __init__(self, cfg: GANConfig | None = None):
        super().__init__()
        self.cfg = cfg or GANConfig()
        self.mapping = Mapping(self.cfg)
        self.synthesis = Synthesis(self.cfg)
        self.num_layers = self.synthesis.num_layers
        self.register_buffer("w_avg", torch.zeros(self.cfg.w_dim))

    def forward(self, z, psi: float = 1.0, noise_mode: str = "const", generator=None):
        w = truncate(self.mapping(z), self.w_avg, psi)
        return self.synthesis(broadcast_w(w, self.num_layers), noise_mode, generator)


class Discriminator(nn.Module):
    """32×32 image → logit: conv blocks with average-pool downsampling, minibatch standard
    deviation (one extra channel at 4×4, StyleGAN's anti-collapse feature), linear head.
    ``features(x)`` returns the per-block activations (a feature loss for inversion)."""

    def __init__(self, cfg: GANConfig | None = None):
        super().__init__()
        cfg = cfg or GANConfig()
        c = cfg.d_channels
        self.from_rgb = EqConv(3, c[0], k=1)
        self.blocks = nn.ModuleList(EqConv(c[i], c[i + 1]) for i in range(len(c) - 1))
        self.final_conv = EqConv(c[-1] + 1, c[-1])
        self.fc = EqLinear(c[-1] * 16, c[-1])
        self.out = EqLinear(c[-1], 1)

    def features(self, x):
        feats = []
        x = F.leaky_relu(self.from_rgb(x), 0.2)
        for blk in self.blocks:
            x = F.avg_pool2d(F.leaky_relu(blk(x), 0.2), 2)
            feats.append(x)
        return feats

    def forward(self, x):
        x = self.features(x)[-1]
        g = min(4, x.shape[0])
        if x.shape[0] % g:
            g = 1
        y = x.reshape(g, -1, *x.shape[1:])
        std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))
        std = std.repeat(g)[:, None, None, None].expand(-1, 1, *x.shape[2:])
        x = F.leaky_relu(self.final_conv(torch.cat([x, std], 1)), 0.2)
        x = F.leaky_relu(self.fc(x.flatten(1)), 0.2)
        return self.out(x).squeeze(1)


# =========================================================================== W, W+, mixing
def broadcast_w(w: torch.Tensor, num_layers: int) -> torch.Tensor:
    """W → W+: (B, w_dim) → (B, num_layers, w_dim), every layer's style the same w."""
    return w[:, None, :].expand(-1, num_layers, -1)


def truncate(w: torch.Tensor, w_avg: torch.Tensor, psi: float = 1.0) -> torch.Tensor:
    """Truncation trick (StyleGAN §3; notes_editing §17): ``w' = w̄ + ψ (w − w̄)``, computed as
    ``torch.lerp(w̄, w, ψ)``, which returns w exactly at ψ = 1."""
    if psi == 1.0:
        return w
    return torch.lerp(w_avg.to(w), w, float(psi))


def mix_styles(w1: torch.Tensor, w2: torch.Tensor, crossover: int, num_layers: int):
    """Style mixing (StyleGAN §3.1): layers ``< crossover`` take w1, the rest w2; (B, L, w_dim).
    crossover 0 is w2 everywhere, crossover L is w1 everywhere."""
    crossover = check_int(crossover, "crossover", min=0)
    if crossover > num_layers:
        raise ValueError(f"crossover must be in [0, {num_layers}], got {crossover}")
    layer = torch.arange(num_layers, device=w1.device)[None, :, None]
    return torch.where(layer < crossover, broadcast_w(w1, num_layers), broadcast_w(w2, num_layers))


# =========================================================================== data
def training_images(n: int, seed: int = TRAIN_SEED, *, shapes=None, colors=None,
                    include_held_out: bool = False) -> torch.Tensor:
    """``n`` single-object scenes on plain backgrounds, area-downsampled to 32×32, as a float
    tensor (n, 3, 32, 32) in [−1, 1]. Without ``include_held_out`` there are no hearts and
    no purple (the held-out concepts of ``diffnotes.data.shapes``)."""
    from diffnotes.data import shapes as S

    n = check_int(n, "n", min=1)
    sc = S.generate_scenes(n, seed=seed, min_objects=1, max_objects=1, textured=False,
                           shapes=shapes, colors=colors, include_held_out=include_held_out)
    x = torch.from_numpy(sc.images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area")
    return x * 2 - 1


# =========================================================================== training
def d_logistic_loss(real_logits, fake_logits):
    """Discriminator's loss of the non-saturating GAN (Goodfellow et al. 2014, eq 1):
    ``softplus(D(G(z))) + softplus(−D(x))`` = −log(1 − σ(D(G(z)))) − log σ(D(x))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def g_nonsaturating_loss(fake_logits):
    """Generator's non-saturating loss, −log σ(D(G(z))) = softplus(−D(G(z)))."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits, real_images):
    """R1 (Mescheder et al. 2018, eq 9 without γ/2): E ‖∇_x D(x)‖² on real images."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def train(args) -> None:
    """The training loop on Accelerate: non-saturating loss, lazy R1 every 4 steps, style mixing
    regularisation (p = 0.9), Adam (β = (0, 0.99)), EMA of the generator; writes
    ``model.safetensors``, ``config.json`` and ``TRAINING.json`` to ``args.out``."""
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    acc = Accelerator(cpu=True)
    torch.manual_seed(args.seed)
    data = training_images(args.n_train, TRAIN_SEED + args.seed)
    cfg = GANConfig()
    G, D = Generator(cfg), Discriminator(cfg)
    previous = None
    if args.init_from:                         # continue an earlier run (its EMA weights and D)
        G0, D0 = load_gan(args.init_from, with_discriminator=True)
        G.load_state_dict(G0.state_dict())
        D.load_state_dict(D0.state_dict())
        previous = json.loads((Path(args.init_from) / "TRAINING.json").read_text())
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.99))
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    g = torch.Generator().manual_seed(args.seed + 1)
    out = Path(args.out)
    t0, step, last_ckpt = time.time(), 0, time.time()
    hist = {"d": [], "g": [], "r1": []}
    bar = tqdm(desc="gan", mininterval=30)
    L = cfg.z_dim
    B = args.batch_size

    def save(final):
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in G_ema.state_dict().items()}
        sd.update({"D." + k: v.detach().contiguous()
                   for k, v in acc.unwrap_model(D).state_dict().items()})
        save_file(sd, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        wall = time.time() - t0
        entry = dict(
            command=" ".join(["python -m diffnotes.personalization.gan"] + sys.argv[1:]),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            wall_seconds=round(wall, 1), cpu_seconds=round(time.process_time(), 1),
            processes=acc.num_processes, threads_per_process=torch.get_num_threads(),
            steps=step, samples_seen=step * B, finished=final,
            parameters_G=sum(p.numel() for p in G_ema.parameters()),
            parameters_D=sum(p.numel() for p in D.parameters()),
            final_losses_avg200={k: round(float(np.mean(v[-200:])), 4) if v else None
                                 for k, v in hist.items()},
            settings={k: v for k, v in vars(args).items() if k != "func"},
            torch=torch.__version__, python=platform.python_version(),
            machine=platform.machine())
        if previous is not None:
            entry["previous_run"] = previous
            entry["total_wall_seconds"] = round(wall + previous.get(
                "total_wall_seconds", previous["wall_seconds"]), 1)
            entry["total_steps"] = step + previous.get("total_steps", previous["steps"])
        (out / "TRAINING.json").write_text(json.dumps(entry, indent=2) + "\n")

    while time.time() - t0 < args.minutes * 60 and (not args.steps or step < args.steps):
        Graw = acc.unwrap_model(G)
        # ---- discriminator
        real = data[torch.randint(0, len(data), (B,), generator=g)]
        flip = torch.rand(B, generator=g) < 0.5
        real = torch.where(flip[:, None, None, None], real.flip(-1), real)
        with torch.no_grad():
            fake = _sample_mixed(Graw, B, g)
        do_r1 = step % 4 == 0
        real.requires_grad_(do_r1)
        rl = D(real)
        loss_d = d_logistic_loss(rl, D(fake))
        if do_r1:
            r1 = r1_penalty(rl, real)
            loss_d = loss_d + args.r1_gamma / 2 * r1 * 4
            hist["r1"].append(r1.item())
        opt_d.zero_grad(set_to_none=True)
        acc.backward(loss_d)
        opt_d.step()
        # ---- generator
        loss_g = g_nonsaturating_loss(D(_sample_mixed(Graw, B, g)))
        opt_g.zero_grad(set_to_none=True)
        acc.backward(loss_g)
        opt_g.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pr in zip(G_ema.parameters(), Graw.parameters()):
                pe.lerp_(pr.detach(), 1 - decay)
            z = torch.randn(256, L, generator=g)
            G_ema.w_avg.copy_(G_ema.mapping(z).mean(0).lerp(G_ema.w_avg,
                                                             0.9 if step or previous else 0.0))
        hist["d"].append(loss_d.item())
        hist["g"].append(loss_g.item())
        step += 1
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(d=f"{np.mean(hist['d'][-100:]):.3f}",
                            g=f"{np.mean(hist['g'][-100:]):.3f}")
            print(f"step {step} t={time.time() - t0:.0f}s d={np.mean(hist['d'][-100:]):.3f} "
                  f"g={np.mean(hist['g'][-100:]):.3f}", flush=True)
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save(False)
            last_ckpt = time.time()
    bar.close()
    save(True)
    print((out / "TRAINING.json").read_text())


def _sample_mixed(G, B, g, p_mix: float = 0.9):
    """Fakes with style-mixing regularisation: with probability ``p_mix`` two latents and a
    random crossover layer (StyleGAN §3.1)."""
    z1 = torch.randn(B, G.cfg.z_dim, generator=g)
    z2 = torch.randn(B, G.cfg.z_dim, generator=g)
    w1, w2 = G.mapping(z1), G.mapping(z2)
    L = G.num_layers
    cross = torch.where(torch.rand(B, generator=g) < p_mix,
                        torch.randint(1, L, (B,), generator=g), torch.full((B,), L))
    layer = torch.arange(L)[None, :, None]
    ws = torch.where(layer < cross[:, None, None], w1[:, None], w2[:, None])
    return G.synthesis(ws, noise_mode="random", generator=g)



# =========================================================================== loading, judging
def load_gan(path=None, device=None, with_discriminator: bool = False):
    """The shipped generator (EMA weights, eval mode, no gradients) from
    ``diffnotes/weights/shapes_gan`` (no network); with ``with_discriminator`` also ``D``.
    Raises ``FileNotFoundError`` when the weights are missing."""
    from safetensors.torch import load_file

    p = Path(path) if path is not None else WEIGHTS_DIR
    if not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"no GAN weights in {p}; run `python -m "
                                "diffnotes.personalization.gan train`")
    cfg_d = json.loads((p / "config.json").read_text())
    cfg = GANConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_d.items()})
    sd = load_file(str(p / "model.safetensors"))
    G, D = Generator(cfg), Discriminator(cfg)
    G.load_state_dict({k: v for k, v in sd.items() if not k.startswith("D.")})
    D.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("D.")})
    G.eval().requires_grad_(False)
    D.eval().requires_grad_(False)
    if device is not None:
        G, D = G.to(device), D.to(device)
    return (G, D) if with_discriminator else G


def to_hwc(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [−1, 1] → float (B, H, W, 3) in [0, 1] (clipped)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def judge(x: torch.Tensor, clf=None) -> list[dict]:
    """The shapes judges (``diffnotes.models.eval_shapes``) on 32×32 images: each upsampled to
    64×64 (bilinear), segmented (``segment_object``), then ``judge_shape`` (knows hearts),
    ``judge_color``, ``judge_size``, ``judge_position``. Returns one dict per image."""
    from diffnotes.models import eval_shapes as ev

    clf = clf or ev.shape_judge()
    up = F.interpolate(x.detach().float().cpu().clamp(-1, 1), size=(64, 64), mode="bilinear",
                       align_corners=False)
    out = []
    for im in to_hwc(up):
        m = ev.segment_object(im)
        out.append(dict(shape=ev.judge_shape(m, clf), color=ev.judge_color(im, m),
                        size=ev.judge_size(m), position=ev.judge_position(m)))
    return out


@torch.no_grad()
def sample_w(G, n: int, seed: int = 0, psi: float = 1.0) -> torch.Tensor:
    """``n`` codes w = mapping(z), z ~ N(0, I) from ``seed``, truncated with ψ; (n, w_dim)."""
    n = check_int(n, "n", min=1)
    z = torch.randn(n, G.cfg.z_dim, generator=torch.Generator().manual_seed(seed))
    dev = G.w_avg.device
    return truncate(G.mapping(z.to(dev)), G.w_avg, psi)


def generate(G, w: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
    """Images from codes: w (B, w_dim) — the W space — or ws (B, L, w_dim) — W+."""
    if w.ndim == 2:
        w = broadcast_w(w, G.num_layers)
    if w.ndim != 3 or w.shape[1] != G.num_layers:
        raise ValueError(f"w must be (B, w_dim) or (B, {G.num_layers}, w_dim), got "
                         f"{tuple(w.shape)}")
    return G.synthesis(w, noise_mode=noise_mode)


# =========================================================================== inversion
def _check_target(target, name="target") -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.ndim == 3:
        target = target[None]
    if target.ndim != 4 or target.shape[1:] != (3, RESOLUTION, RESOLUTION):
        raise ValueError(f"{name} must be (B, 3, {RESOLUTION}, {RESOLUTION}) in [-1, 1], got "
                         f"{tuple(target.shape)}")
    return target


def reconstruction_loss(x, target, D=None, feature_weight: float = 0.0):
    """Per-image loss (B,): pixel MSE plus ``feature_weight`` × the MSE of the discriminator's
    block features (a stand-in for Image2StyleGAN's VGG perceptual loss, eq 3, offline)."""
    loss = (x - target).pow(2).flatten(1).mean(1)
    if feature_weight and D is not None:
        for fa, fb in zip(D.features(x), D.features(target)):
            loss = loss + feature_weight * (fa - fb).pow(2).flatten(1).mean(1)
    return loss


def invert(G, target: torch.Tensor, space: str = "w", steps: int = 300, lr: float = 0.03,
           D=None, feature_weight: float = 0.0, init: torch.Tensor | None = None,
           progress: bool = True) -> dict:
    """Embed images in the generator's latent space (Image2StyleGAN, Abdal et al. 2019, eq 1):
    ``w* = argmin_w L(G(w), x)`` with Adam from w̄ (the mean code), L = pixel MSE
    (+ ``feature_weight`` × discriminator-feature MSE).

    ``space="w"``: one w (B, w_dim) for every layer; ``space="w+"``: one w_i per layer
    (B, L, w_dim) — Ahmad's notes, §4.2, "W+" (notes_editing §17c). Each image's loss is
    summed, so the images of a batch are inverted independently. target: (B, 3, 32, 32) in
    [−1, 1]. Returns ``{"w": (B, w_dim) or None, "ws": (B, L, w_dim), "images", "mse": (B,),
    "history": per-step mean MSE}``. Raises ``ValueError`` for a bad space, steps or target."""
    from tqdm.auto import tqdm

    space = check_choice(space, "space", ("w", "w+"))
    steps = check_int(steps, "steps", min=0)
    lr = check_positive(lr, "lr")
    target = _check_target(target).to(G.w_avg.device)
    B, L = target.shape[0], G.num_layers
    if init is None:
        init = G.w_avg.detach()[None].expand(B, -1)
    if space == "w+" and init.ndim == 2:
        init = broadcast_w(init, L)
    var = init.detach().clone().contiguous().requires_grad_(True)
    opt = torch.optim.Adam([var], lr=lr)
    hist = []
    for _ in tqdm(range(steps), desc=f"invert {space}", disable=not progress, leave=False):
        loss = reconstruction_loss(generate(G, var), target, D, feature_weight)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        hist.append(float(loss.detach().mean()))
    with torch.no_grad():
        ws = broadcast_w(var, L) if space == "w" else var
        x = generate(G, ws)
        mse = (x.clamp(-1, 1) - target).pow(2).flatten(1).mean(1)
    return dict(w=var.detach() if space == "w" else None, ws=ws.detach().clone(), images=x,
                mse=mse, history=hist)


def psnr(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, on [0, 1] pixels: 10 log10(1 / MSE)."""
    mse = (((x.clamp(-1, 1) - target) / 2).pow(2)).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def pti(G, target: torch.Tensor, pivot: torch.Tensor | None = None, steps: int = 150,
        lr: float = 1e-3, inversion_steps: int = 300, locality_weight: float = 0.0,
        locality_alpha: float = 1.0, D=None, feature_weight: float = 0.0, seed: int = 0,
        progress: bool = True) -> dict:
    """Pivotal tuning inversion (Roich et al. 2022): (1) the pivot ``w_p`` = W inversion of the
    target (or the given ``pivot``, (B, w_dim)); (2) with w_p fixed, tune a copy of the
    generator's weights θ to minimise ``L(G_θ(w_p), x)`` (PTI eq 1 with MSE for LPIPS) plus,
    if ``locality_weight`` > 0, the locality regulariser of PTI eq 2–3:
    ``‖G_θ(w_r) − G_θ*(w_r)‖²`` at ``w_r = w_p + α (w_z − w_p)/‖w_z − w_p‖``.

    One generator copy per image. Returns ``{"pivot": (B, w_dim) (never modified),
    "generators": list of B tuned generators, "images", "mse", "pivot_mse"}``."""
    from tqdm.auto import tqdm

    steps = check_int(steps, "steps", min=0)
    lr = check_positive(lr, "lr")
    locality_weight = check_range(locality_weight, "locality_weight", 0)
    target = _check_target(target).to(G.w_avg.device)
    if pivot is None:
        pivot = invert(G, target, "w", inversion_steps, D=D, feature_weight=feature_weight,
                       progress=progress)["w"]
    if pivot.ndim != 2 or pivot.shape != (target.shape[0], G.cfg.w_dim):
        raise ValueError(f"pivot must be (B, {G.cfg.w_dim}) with B = {target.shape[0]}, got "
                         f"{tuple(pivot.shape)}")
    pivot = pivot.detach()
    g = torch.Generator().manual_seed(seed)
    gens, images = [], []
    for b in tqdm(range(target.shape[0]), desc="PTI", disable=not progress, leave=False):
        Gt = copy.deepcopy(G).train()
        Gt.synthesis.requires_grad_(True)
        opt = torch.optim.Adam(Gt.synthesis.parameters(), lr=lr)
        wp, xb = pivot[b:b + 1], target[b:b + 1]
        for _ in range(steps):
            loss = reconstruction_loss(generate(Gt, wp), xb, D, feature_weight).sum()
            if locality_weight > 0:
                with torch.no_grad():
                    wz = G.mapping(torch.randn(4, G.cfg.z_dim, generator=g).to(wp))
                    d = wz - wp
                    wr = wp + locality_alpha * d / d.norm(dim=1, keepdim=True)
                    ref = generate(G, wr)
                loss = loss + locality_weight * (generate(Gt, wr) - ref).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        Gt.eval().requires_grad_(False)
        gens.append(Gt)
        with torch.no_grad():
            images.append(generate(Gt, wp))
    x = torch.cat(images) if images else target[:0]
    with torch.no_grad():
        mse = (x.clamp(-1, 1) - target).pow(2).flatten(1).mean(1)
        pmse = (generate(G, pivot).clamp(-1, 1) - target).pow(2).flatten(1).mean(1)
    return dict(pivot=pivot, generators=gens, images=x, mse=mse, pivot_mse=pmse)


# =========================================================================== latent edits
@torch.no_grad()
def attribute_direction(G, attribute: str = "size", n: int = 1000, seed: int = 7,
                        positive: str | None = None) -> dict:
    """A latent direction in W for a judged attribute (notes_editing §17e, the InterFaceGAN
    recipe): generate n samples, judge them, regress the indicator ``1[attribute == positive]``
    on w by least squares; d = β / ‖β‖. Returns ``{"direction": (w_dim,), "std": std of w·d,
    "positive", "accuracy": sign agreement on the samples}``."""
    attribute = check_choice(attribute, "attribute", ("size", "color", "shape", "position"))
    w = sample_w(G, n, seed)
    labels = [j[attribute] for j in judge(generate(G, w))]
    if positive is None:
        positive = {"size": "large", "position": "right"}.get(attribute,
                                                             max(set(labels), key=labels.count))
    y = torch.tensor([1.0 if v == positive else -1.0 for v in labels], dtype=torch.float64)
    X = (w.double() - w.double().mean(0)).cpu()
    beta = torch.linalg.lstsq(X, y - y.mean()).solution
    d = (beta / beta.norm()).to(w)
    proj = (w - w.mean(0)) @ d
    acc = float(((proj > 0) == (y > 0).to(proj.device)).float().mean())
    return dict(direction=d, std=float(proj.std()), positive=positive, accuracy=acc)


def edit_codes(ws: torch.Tensor, direction: torch.Tensor, alpha) -> torch.Tensor:
    """w' = w + α d in W (B, w_dim) or added to every row in W+ (B, L, w_dim); α scalar or (B,)."""
    alpha = torch.as_tensor(alpha, dtype=ws.dtype, device=ws.device).reshape(-1)
    a = alpha[:, None] if ws.ndim == 2 else alpha[:, None, None]
    return ws + a * direction.to(ws)


# =========================================================================== EWC adaptation
def ewc_fisher(G, D, n: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Empirical Fisher information of the generator's parameters (Li et al. 2020, eq 2):
    ``F_i = E_z [(∂ log D(G(z)) / ∂θ_i)²]`` with log D = log σ(D logit), the discriminator's
    log-likelihood that a generated image is real, averaged over ``n`` single samples.
    Returns ``{name: tensor}`` over every generator parameter (mapping and synthesis)."""
    from tqdm.auto import tqdm

    n = check_int(n, "n", min=1)
    g = torch.Generator().manual_seed(seed)
    params = dict(G.named_parameters())
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    G.requires_grad_(True)
    try:
        for _ in tqdm(range(n), desc="Fisher", disable=not progress, leave=False):
            z = torch.randn(1, G.cfg.z_dim, generator=g).to(G.w_avg.device)
            ll = F.logsigmoid(D(G(z, noise_mode="random", generator=None)))
            grads = torch.autograd.grad(ll.sum(), list(params.values()), allow_unused=True)
            for (k, _), gr in zip(params.items(), grads):
                if gr is not None:
                    fisher[k] += gr.detach() ** 2 / n
    finally:
        G.requires_grad_(False)
    return fisher


def ewc_penalty(G, fisher: dict, theta_star: dict, lam: float) -> torch.Tensor:
    """EWC regulariser (Li et al. 2020, eq 3): ``λ Σ_i F_i (θ_i − θ*_i)²`` over the parameters
    named in ``fisher``. Zero at θ = θ*, exactly quadratic in θ − θ*; coordinates with F_i = 0
    get no gradient. Raises ``ValueError`` for a negative λ or a missing parameter."""
    lam = check_range(lam, "lam", 0)
    params = dict(G.named_parameters())
    total = None
    for k, f in fisher.items():
        if k not in params or k not in theta_star:
            raise ValueError(f"fisher names parameter {k!r}, which G or theta_star lacks")
        t = (f * (params[k] - theta_star[k]).pow(2)).sum()
        total = t if total is None else total + t
    return lam * total if total is not None else torch.zeros(())


def adapt(G, D, images: torch.Tensor, steps: int = 300, lr: float = 1e-3, ewc_weight: float = 0.0,
          fisher: dict | None = None, r1_gamma: float = 1.0, seed: int = 0,
          progress: bool = True) -> tuple:
    """Few-shot adaptation (Li et al. 2020): fine-tune copies of G and D on a handful of
    ``images`` (N, 3, 32, 32) with the non-saturating loss, R1 and, for G, the EWC penalty
    :func:`ewc_penalty` with weight ``ewc_weight`` around the source weights (``fisher`` from
    :func:`ewc_fisher`, required when ``ewc_weight`` > 0). Returns ``(G_adapted, D_adapted,
    history)``."""
    from tqdm.auto import tqdm

    images = _check_target(images, "images")
    steps = check_int(steps, "steps", min=0)
    ewc_weight = check_range(ewc_weight, "ewc_weight", 0)
    if ewc_weight > 0 and fisher is None:
        raise ValueError("fisher must be given when ewc_weight > 0 (see ewc_fisher)")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    Ga, Da = copy.deepcopy(G).train().requires_grad_(True), copy.deepcopy(D).train().requires_grad_(True)
    theta_star = {k: v.detach().clone() for k, v in G.named_parameters()}
    opt_g = torch.optim.Adam(Ga.parameters(), lr=lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(Da.parameters(), lr=lr, betas=(0.0, 0.99))
    B = min(8, max(4, images.shape[0]))
    hist = {"d": [], "g": [], "ewc": []}
    for step in tqdm(range(steps), desc="adapt", disable=not progress, leave=False):
        real = images[torch.randint(0, images.shape[0], (B,), generator=g)]
        flip = torch.rand(B, generator=g) < 0.5
        real = torch.where(flip[:, None, None, None], real.flip(-1), real).requires_grad_(True)
        z = torch.randn(B, G.cfg.z_dim, generator=g)
        with torch.no_grad():
            fake = Ga(z, noise_mode="random")
        rl = Da(real)
        loss_d = d_logistic_loss(rl, Da(fake)) + r1_gamma / 2 * r1_penalty(rl, real)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        z = torch.randn(B, G.cfg.z_dim, generator=g)
        loss_g = g_nonsaturating_loss(Da(Ga(z, noise_mode="random")))
        pen = ewc_penalty(Ga, fisher, theta_star, ewc_weight) if ewc_weight > 0 else \
            torch.zeros(())
        opt_g.zero_grad(set_to_none=True)
        (loss_g + pen).backward()
        opt_g.step()
        hist["d"].append(loss_d.item()); hist["g"].append(loss_g.item())
        hist["ewc"].append(pen.item())
    Ga.eval().requires_grad_(False)
    Da.eval().requires_grad_(False)
    return Ga, Da, hist


@torch.no_grad()
def adaptation_quality(G, images: torch.Tensor, n: int = 100, seed: int = 123, clf=None) -> dict:
    """How an adapted generator does: the fraction of ``n`` samples the shape judge calls
    hearts, diversity (mean pairwise RMS distance between samples, and the number of distinct
    judged (colour, size, position) triples), and memorisation (mean RMS distance of each sample
    to its nearest few-shot image)."""
    x = generate(G, sample_w(G, n, seed)).clamp(-1, 1)
    j = judge(x, clf)
    flat = x.flatten(1)
    d = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    pair = float(d.sum() / (n * (n - 1)))
    nn_ = float((torch.cdist(flat, images.flatten(1)) / math.sqrt(flat.shape[1])).min(1).values
                .mean())
    return dict(heart_fraction=float(np.mean([r["shape"] == "heart" for r in j])),
                pairwise_rms=pair, nearest_training_rms=nn_,
                distinct_color_size_position=len({(r["color"], r["size"], r["position"])
                                                  for r in j}))


def few_shot_hearts(n: int = 10, seed: int = 2020) -> torch.Tensor:
    """``n`` generator scenes of hearts (training colours, plain backgrounds), 32×32 in [−1, 1]:
    the held-out concept of the adaptation."""
    from diffnotes.data import shapes as S

    return training_images(n, seed, shapes=("heart",), colors=S.TRAIN_COLORS,
                           include_held_out=True)


# =========================================================================== measurement
def held_out_targets(n: int = 40, seed: int = TARGET_SEED):
    """``n`` held-out single-object scenes of the training concepts (never seen in training)
    and their true attributes: ``(x (n, 3, 32, 32), [dict(shape, color, size, position)])``."""
    from diffnotes.data import shapes as S

    sc = S.generate_scenes(n, seed=seed, min_objects=1, max_objects=1, textured=False)
    x = torch.from_numpy(sc.images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area") * 2 - 1
    truth = [{k: o[0][k] for k in ("shape", "color", "size", "position")} for o in sc.objects]
    return x, truth


def edit_success(before: list[dict], after: list[dict], attribute: str, wanted: list[str]):
    """Per image: the judged ``attribute`` became ``wanted`` and the other judged attributes
    (shape, colour; size where not edited) stayed as they were judged before the edit."""
    keep = [a for a in ("shape", "color", "size") if a != attribute]
    return [a[attribute] == w and all(a[k] == b[k] for k in keep)
            for b, a, w in zip(before, after, wanted)]


def tradeoff(G, D, targets: torch.Tensor, direction: dict, strength: float = 3.0,
             inv_steps: int = 300, pti_steps: int = 150, progress: bool = True, clf=None) -> dict:
    """The distortion–editability trade-off (Ahmad's notes, §4.2; Tov et al. 2021): invert the
    targets in W, W+ and with PTI; report reconstruction MSE / PSNR, and apply the size edit
    ``w + α d`` (α = ± ``strength`` × std of w·d, towards the other size) to each code; the
    edit succeeds when the judges see the size changed and shape and colour kept (judged on the
    reconstruction before the edit). Returns ``{method: {...}}``."""
    target = _check_target(targets)
    clf = clf or __import__("diffnotes.models.eval_shapes", fromlist=["x"]).shape_judge()
    d, s = direction["direction"], direction["std"]
    out, t0 = {}, time.time()
    rw = invert(G, target, "w", inv_steps, progress=progress)
    t_w = time.time() - t0
    t0 = time.time()
    rp = invert(G, target, "w+", inv_steps, progress=progress)
    t_wp = time.time() - t0
    t0 = time.time()
    rt = pti(G, target, pivot=rw["w"], steps=pti_steps, progress=progress)
    t_pti = time.time() - t0 + t_w
    for name, res, secs in (("W", rw, t_w), ("W+", rp, t_wp), ("PTI", rt, t_pti)):
        before = judge(res["images"], clf)
        wanted = ["small" if b["size"] == "large" else "large" for b in before]
        sign = torch.tensor([1.0 if w == direction["positive"] else -1.0 for w in wanted])
        alpha = sign * strength * s
        with torch.no_grad():
            if name == "PTI":
                codes = edit_codes(res["pivot"], d, alpha)
                edited = torch.cat([generate(Gt, codes[i:i + 1])
                                    for i, Gt in enumerate(res["generators"])])
            else:
                edited = generate(G, edit_codes(res["ws"], d, alpha))
        after = judge(edited, clf)
        ok = edit_success(before, after, "size", wanted)
        out[name] = dict(mse=float(res["mse"].mean()), psnr=float(psnr(res["images"], target)
                                                                  .mean()),
                         edit_success=float(np.mean(ok)),
                         size_changed=float(np.mean([a["size"] == w
                                                     for a, w in zip(after, wanted)])),
                         kept_shape_color=float(np.mean([a["shape"] == b["shape"] and
                                                         a["color"] == b["color"]
                                                         for a, b in zip(after, before)])),
                         seconds=round(secs, 1), n=int(target.shape[0]),
                         images=res["images"], edited=edited)
    return out


def evaluate_main(args) -> None:
    """``python -m diffnotes.personalization.gan evaluate``: the trade-off on held-out targets,
    the edit on fresh samples, and EWC adaptation to hearts; writes a JSON with its command."""
    from diffnotes.models import eval_shapes as ev

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    G, D = load_gan(with_discriminator=True)
    clf = ev.shape_judge()
    direction = attribute_direction(G, "size", n=1000)
    x, truth = held_out_targets(args.n_targets)
    res = tradeoff(G, D, x, direction, strength=args.strength, inv_steps=args.inversion_steps,
                   pti_steps=args.pti_steps, clf=clf)
    # the edit on the generator's own samples (no inversion): the direction's ceiling
    w = sample_w(G, args.n_targets, seed=999)
    before = judge(generate(G, w), clf)
    wanted = ["small" if b["size"] == "large" else "large" for b in before]
    sign = torch.tensor([1.0 if v == direction["positive"] else -1.0 for v in wanted])
    after = judge(generate(G, edit_codes(w, direction["direction"],
                                          sign * args.strength * direction["std"])), clf)
    samples_ok = float(np.mean(edit_success(before, after, "size", wanted)))
    # EWC adaptation to hearts
    hearts = few_shot_hearts(10)
    fisher = ewc_fisher(G, D, n=args.fisher_samples)
    ada = {"source": adaptation_quality(G, hearts, clf=clf)}
    for name, lam in (("no EWC", 0.0), ("EWC", args.ewc_weight)):
        Ga, _, _ = adapt(G, D, hearts, steps=args.adapt_steps, ewc_weight=lam, fisher=fisher)
        ada[name] = adaptation_quality(Ga, hearts, clf=clf)
        ada[name]["ewc_weight"] = lam
    out = dict(
        command=" ".join(["python -m diffnotes.personalization.gan"] + sys.argv[1:]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=None, n_targets=args.n_targets, edit="size", edit_strength=args.strength,
        direction_accuracy=direction["accuracy"], edit_success_on_samples=samples_ok,
        tradeoff={k: {a: b for a, b in v.items() if a not in ("images", "edited")}
                  for k, v in res.items()},
        adaptation=ada, adapt_steps=args.adapt_steps, fisher_samples=args.fisher_samples,
        inversion_steps=args.inversion_steps, pti_steps=args.pti_steps,
        fisher_total=float(sum(f.sum() for f in fisher.values())))
    out["wall_seconds"] = round(time.time() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffnotes.personalization.gan")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the shipped GAN")
    t.add_argument("--minutes", type=float, default=14.0)
    t.add_argument("--steps", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--r1-gamma", type=float, default=1.0)
    t.add_argument("--ema", type=float, default=0.995)
    t.add_argument("--n-train", type=int, default=20000)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-minutes", type=float, default=3.0)
    t.add_argument("--out", default=str(WEIGHTS_DIR))
    t.add_argument("--init-from", default="", help="continue from this run's weights (a copy)")
    e = sub.add_parser("evaluate", help="measure W / W+ / PTI and EWC; write results/gan.json")
    e.add_argument("--n-targets", type=int, default=40)
    e.add_argument("--strength", type=float, default=3.0)
    e.add_argument("--ewc-weight", type=float, default=1e4)
    e.add_argument("--adapt-steps", type=int, default=60)
    e.add_argument("--inversion-steps", type=int, default=100)
    e.add_argument("--pti-steps", type=int, default=40)
    e.add_argument("--fisher-samples", type=int, default=32)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--out", default=str(RESULTS_PATH))
    args = p.parse_args(argv)
    if args.cmd == "train":
        train(args)
    else:
        evaluate_main(args)


if __name__ == "__main__":
    main()
