"""The shipped digits models: a class-conditional UNet and a noise-conditional classifier.

Data: scikit-learn's 8×8 handwritten digits (1797 images, bundled with scikit-learn, no
download), scaled to [-1, 1], at their native ``IMAGE_SIZE = 8``. A fixed, seeded, stratified
80/20 split gives the train and test sets. For figures, :func:`upsample` enlarges images
bilinearly (16×16 or more looks like the familiar blurry digits).

Why 8×8 and not the data upsampled to 16×16: bilinearly upsampled digits fill only a 64-dim
linear subspace of the 256 pixels, so a 16×16 denoiser must also learn to strip the noise off
the 192 empty directions, and under a CPU budget of minutes it does not quite: a 16×16 UNet
trained for 412 steps left visible speckle in many samples (DDIM 50 steps, CFG scale 3: the
classifier recognised 84 % of them), while the 8×8 model has no empty directions to learn.

- The UNet (a small ``diffusers.UNet2DModel``) predicts ε (Ahmad's notes, eq 1.8) under DDPM's linear
  schedule (β from 1e-4 to 0.02, T = 1000). It is class-conditional through
  ``num_class_embeds = 11``: classes 0–9 and ``NULL_CLASS = 10`` for "no label". During training
  the label is replaced by the null class with probability ``p_uncond`` (label dropout, Ho &
  Salimans' classifier-free guidance; Ahmad's notes, §1.4; the controlled-generation
  blog, §2.4), so one network gives both
  ε(x_t, t, y) and ε(x_t, t).
- The classifier p(y | x_t, t) is a small CNN with a timestep embedding, trained on
  x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (eq 1.2) for t uniform in [0, T) (with 20 % of each batch at
  t < 50 so that it stays sharp on clean digits), for classifier guidance
  (Ahmad's notes, eq 1.30). At t = 0 it is an ordinary digit classifier, used to score samples.

Retrain (the weights in ``diffnotes/weights/digits/`` were made by these commands)::

    python -m diffnotes.models.digits train-unet          # 1000 steps of 96
    python -m diffnotes.models.digits train-classifier    # 800 steps of 128

(one thread each; on a 2-core CPU shared with other jobs they took 20.5 and 7.7 minutes of wall
time, 3.8 and 0.6 minutes of CPU time).

Each command records its wall time, steps, threads, date and command line in
``diffnotes/weights/digits/TRAINING.json``.

The models are tiny: on a busy CPU ``torch.set_num_threads(1)`` makes them much faster (one
batched forward of 16 rows: 0.02 CPU-seconds with one thread against 0.7 with two, measured
while the machine was loaded).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ddim import ddim_sample
from ..ddpm import ddpm_loss, q_sample
from ..guidance import cfg
from ..schedules import alphas_cumprod as _cumprod
from ..schedules import make_betas, make_timesteps
from ..utils import batch_timesteps, check_finite, check_int, check_tensor

__all__ = ["IMAGE_SIZE", "NUM_CLASSES", "NULL_CLASS", "T", "WEIGHTS_DIR", "schedule",
           "load_digits_data", "build_unet", "load_unet", "digits_eps_model",
           "digits_cond_uncond", "NoiseConditionalClassifier", "build_classifier",
           "load_classifier", "classifier_accuracy", "sample_digits", "upsample"]

IMAGE_SIZE = 8
NUM_CLASSES = 10
NULL_CLASS = 10
T = 1000

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "digits"
UNET_DIR = WEIGHTS_DIR / "unet"
CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "classifier.safetensors"
CLASSIFIER_CONFIG = WEIGHTS_DIR / "classifier.json"
TRAINING_LOG = WEIGHTS_DIR / "TRAINING.json"

SPLIT_SEED = 0
TEST_FRACTION = 0.2


# ---------------------------------------------------------------------------- schedule, data
def schedule():
    """``(betas, alphas_cumprod)`` of the digits models: DDPM's linear schedule, T = 1000.

    β_t linear from 1e-4 to 0.02 (Ho et al. 2020), ᾱ_t = ∏_{s≤t} (1 − β_s) (Ahmad's notes,
    below eq 1.2). Both float64 tensors of shape (1000,).
    """
    betas = make_betas("linear", T=T)
    return betas, _cumprod(betas)


@lru_cache(maxsize=1)
def _all_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1   # [0,16] → [-1,1]
    if IMAGE_SIZE != 8:
        # bilinear weights are convex, so the result stays in [-1, 1]
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                              stratify=d.target)
    return x.clamp(-1, 1), y, torch.as_tensor(sorted(tr)), torch.as_tensor(sorted(te))


def load_digits_data(split: str = "train"):
    """The digits as ``(x, y)``: x float32 (N, 1, S, S) in [-1, 1] with S = ``IMAGE_SIZE``,
    y long (N,) in 0…9.

    ``split`` is ``"train"`` (1437 images), ``"test"`` (360) or ``"all"`` (1797); the split is a
    fixed stratified 80/20 one (``random_state=0``). Returns fresh tensors (safe to modify).
    Raises ``ValueError`` for another ``split``.
    """
    x, y, tr, te = _all_digits()
    if split == "train":
        return x[tr].clone(), y[tr].clone()
    if split == "test":
        return x[te].clone(), y[te].clone()
    if split == "all":
        return x.clone(), y.clone()
    raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def upsample(x: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Bilinear enlargement of (B, 1, S, S) images to (B, 1, size, size), for figures.

    Bilinear weights are convex, so values stay in [-1, 1]. Raises ``ValueError`` for a
    non-4-D ``x`` or a ``size`` < 1.
    """
    x = check_tensor(x, "x", ndim=4)
    size = check_int(size, "size", min=1)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------- the UNet
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(32, 48, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=32, num_class_embeds=NUM_CLASSES + 1,
)


def build_unet():
    """A fresh (untrained) small class-conditional ``diffusers.UNet2DModel`` (≈0.9 M parameters).

    Input and output (B, 1, 8, 8); levels of 32, 48, 64 channels at 8², 4², 2² with
    self-attention at 4²; ``num_class_embeds = 11`` (digit classes 0–9, ``NULL_CLASS = 10``).
    """
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def load_unet(device="cpu", path=None):
    """The shipped trained UNet, via ``UNet2DModel.from_pretrained`` on the local directory
    ``diffnotes/weights/digits/unet/`` (config.json + diffusion_pytorch_model.safetensors).

    Returned in eval mode on ``device``, float32, with gradients off. Never touches a hub.
    Raises ``FileNotFoundError`` if the weights are missing (retrain: see the module docstring).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DModel

    path = Path(path) if path is not None else UNET_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no UNet weights in {path}; run "
                                "`python -m diffnotes.models.digits train-unet`")
    unet = UNet2DModel.from_pretrained(str(path), local_files_only=True,
                                       torch_dtype=torch.float32)
    unet = unet.to(device).eval()
    unet.requires_grad_(False)
    return unet


def _check_y(y, name: str = "y"):
    """Validate a class condition: None (the null class), an int in 0…10, or a (B,) integer
    tensor with values in 0…10. Returns None, an int or a long tensor."""
    if y is None:
        return None
    if isinstance(y, torch.Tensor):
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
        if y.ndim == 0:
            y = y.reshape(1)
        if y.ndim != 1:
            raise ValueError(f"{name} must be an int or a (B,) tensor of labels, got shape "
                             f"{tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > NULL_CLASS):
            raise ValueError(f"{name} must hold labels in [0, {NULL_CLASS}] ({NULL_CLASS} = no "
                             f"label), got values in [{int(y.min())}, {int(y.max())}]")
        return y.long()
    if isinstance(y, np.integer):
        y = int(y)
    if isinstance(y, bool) or not isinstance(y, int):
        raise ValueError(f"{name} must be None, an int in [0, {NULL_CLASS}] or a (B,) long "
                         f"tensor, got {type(y).__name__} {y!r}")
    if not 0 <= y <= NULL_CLASS:
        raise ValueError(f"{name} must be a class in [0, {NUM_CLASSES - 1}] or {NULL_CLASS} "
                         f"(no label), got {y}")
    return int(y)


def _labels(y, batch: int, device, name: str = "y") -> torch.Tensor:
    if y is None:
        y = NULL_CLASS
    if isinstance(y, int):
        return torch.full((batch,), y, dtype=torch.long, device=device)
    if y.shape[0] == 1 and batch != 1:
        return y.to(device).expand(batch)
    if y.shape[0] != batch:
        raise ValueError(f"{name} must hold one label per batch row ({batch}), got shape "
                         f"{tuple(y.shape)}")
    return y.to(device)


def _check_x(x) -> torch.Tensor:
    x = check_tensor(x, "x", ndim=4)
    if tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"x must have shape (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got "
                         f"{tuple(x.shape)}")
    return x


def _unet_eps(unet, x, t, labels):
    dtype = next(unet.parameters()).dtype
    eps = unet(x.to(dtype), t, class_labels=labels).sample
    return eps.to(x.dtype)


def digits_eps_model(unet, y=None):
    """Bind a class to the UNet: returns ``eps_model(x, t) -> ε_θ(x_t, t, y)`` (the ε_θ of
    Ahmad's notes, eq 1.8, conditioned).

    ``y`` is an int in 0…9, a (B,) long tensor of labels (one per batch row; 10 = no label), or
    None for the unconditional model (the null class). ``x`` is (B, 1, 8, 8) of any float
    dtype (the output has x's dtype); ``t`` an int or a (B,) long tensor of indices in [0, 1000).
    Raises ``ValueError`` naming ``y`` for a bad label (float, out of range, wrong shape), and
    naming ``x``/``t`` for bad inputs at call time.
    """
    y = _check_y(y)

    def eps_model(x, t):
        x = _check_x(x)
        return _unet_eps(unet, x, batch_timesteps(t, x, T), _labels(y, x.shape[0], x.device))

    return eps_model


def digits_cond_uncond(unet):
    """Returns ``f(x, t, y) -> (eps_uncond, eps_cond)``: ε_θ(x_t, t, ∅) and ε_θ(x_t, t, y) from
    ONE batched forward pass of 2B rows (null labels for the first half).

    These are the two inputs of classifier-free guidance, ε̃ = ε_u + s (ε_c − ε_u) (Ahmad's
    notes, eq 1.44, diffusers' scale s). ``y``: an int in 0…9 or a (B,) long tensor. Raises
    ``ValueError`` naming ``y`` for a bad label (including None: the conditional pass needs one).
    """
    def cond_uncond(x, t, y):
        if y is None:
            raise ValueError("y must be a class (int or (B,) long tensor) for the conditional "
                             "pass, got None")
        y = _check_y(y)
        x = _check_x(x)
        tb = batch_timesteps(t, x, T)
        labels = torch.cat([_labels(None, x.shape[0], x.device), _labels(y, x.shape[0], x.device)])
        eps = _unet_eps(unet, torch.cat([x, x]), torch.cat([tb, tb]), labels)
        eps_u, eps_c = eps.chunk(2)
        return eps_u, eps_c

    return cond_uncond


def sample_digits(unet, y, guidance_scale: float = 3.0, num_steps: int = 50,
                  generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                  progress: bool = False) -> torch.Tensor:
    """Class-conditional DDIM (η = 0) samples with classifier-free guidance, in [-1, 1].

    ε̃ = ε_u + s (ε_c − ε_u) (Ahmad's notes, eq 1.44, s = ``guidance_scale``; s = 1 is the plain
    conditional model, s = 0 the unconditional one) inside ``ddim_sample`` (eq 1.21) on
    ``make_timesteps(num_steps)``. ``y`` is an int (one sample) or a (B,) long tensor (one
    sample per label). x_T is drawn from ``generator`` unless given. Returns (B, 1, 8, 8),
    clamped to [-1, 1].
    """
    y = _check_y(y)
    s = check_finite(guidance_scale, "guidance_scale")
    B = y.shape[0] if isinstance(y, torch.Tensor) else 1      # an int or None: one sample
    if x_T is None:
        x_T = torch.randn((B, 1, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    x_T = _check_x(x_T)
    _, ac = schedule()
    if s == 1.0 or y is None:
        eps_model = digits_eps_model(unet, y)
    else:
        f = digits_cond_uncond(unet)

        def eps_model(x, t):
            return cfg(*f(x, t, y), s)                                  # eq 1.44

    x0 = ddim_sample(eps_model, x_T, make_timesteps(num_steps, T), ac, eta=0.0,
                     progress=progress)
    return x0.clamp(-1, 1)


# ---------------------------------------------------------------------------- the classifier
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer time steps (Vaswani et al.; DDPM's): (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _Block(nn.Module):
    """conv3×3 → GroupNorm → FiLM by the time embedding → SiLU, twice, with a residual."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.film = nn.Linear(t_dim, 2 * c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.norm1(self.conv1(x))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(h * (1 + scale) + shift)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class NoiseConditionalClassifier(nn.Module):
    """p_φ(y | x_t, t): a small CNN with a sinusoidal timestep embedding (FiLM in every block).

    ``forward(x, t) -> logits`` with x (B, 1, S, S) and t an int or (B,) long tensor in
    [0, 1000); logits (B, 10). Trained on x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (Ahmad's notes, eq 1.2) for t
    uniform, so ∇_x log p_φ(y | x_t, t) is the term classifier guidance adds (Ahmad's notes, eq 1.30).
    Raises ``ValueError`` naming ``x`` or ``t`` for bad shapes / out-of-range steps.
    """

    def __init__(self, channels=(16, 32, 64), t_dim: int = 64, num_classes: int = NUM_CLASSES,
                 image_size: int = IMAGE_SIZE):
        super().__init__()
        self.config = dict(channels=list(channels), t_dim=t_dim, num_classes=num_classes,
                           image_size=image_size)
        self.t_dim = t_dim
        self.image_size = image_size
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(1, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        c_prev = channels[0]
        for i, c in enumerate(channels):
            self.blocks.append(_Block(c_prev, c, t_dim))
            last = i == len(channels) - 1
            self.downs.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            c_prev = c
        self.head = nn.Sequential(nn.GroupNorm(8, c_prev), nn.SiLU(), nn.Flatten(),
                                  nn.Linear(c_prev, num_classes))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x, t):
        x = check_tensor(x, "x", ndim=4)
        if tuple(x.shape[1:]) != (1, self.image_size, self.image_size):
            raise ValueError(f"x must have shape (B, 1, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        t = batch_timesteps(t, x, T)
        dtype = self.conv_in.weight.dtype
        temb = self.t_mlp(timestep_embedding(t, self.t_dim).to(dtype))
        h = self.conv_in(x.to(dtype))
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, temb))
        return self.head(self.pool(h))


def build_classifier(**config) -> NoiseConditionalClassifier:
    """A fresh ``NoiseConditionalClassifier`` (config keys: channels, t_dim, num_classes,
    image_size)."""
    return NoiseConditionalClassifier(**config)


def load_classifier(device="cpu", path=None) -> NoiseConditionalClassifier:
    """The shipped noise-conditional classifier from ``diffnotes/weights/digits/classifier.json``
    (its config) and ``classifier.safetensors``; eval mode, gradients off (input gradients for
    guidance still flow: call ``x.requires_grad_()``). Raises ``FileNotFoundError`` if missing."""
    from safetensors.torch import load_file

    w = Path(path) if path is not None else CLASSIFIER_WEIGHTS
    cfg_path = w.with_suffix(".json")
    if not w.is_file() or not cfg_path.is_file():
        raise FileNotFoundError(f"no classifier weights at {w}; run "
                                "`python -m diffnotes.models.digits train-classifier`")
    config = json.loads(cfg_path.read_text())["config"]
    model = NoiseConditionalClassifier(**config)
    model.load_state_dict(load_file(str(w)))
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def classifier_accuracy(classifier, x: torch.Tensor, y: torch.Tensor, t=0,
                        generator: torch.Generator | None = None, batch_size: int = 512) -> float:
    """Fraction of ``x`` (clean digits or samples, (N, 1, S, S)) that ``classifier`` labels ``y``.

    With ``t > 0`` the images are first noised to level t (eq 1.2) with noise from ``generator``.
    """
    x = check_tensor(x, "x", ndim=4)
    y = _check_y(y)
    y = _labels(y, x.shape[0], x.device)
    _, ac = schedule()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            if (isinstance(t, int) and t > 0) or isinstance(t, torch.Tensor):
                noise = torch.randn(xb.shape, generator=generator, dtype=xb.dtype)
                xb = q_sample(xb, t, ac, noise)
            pred = classifier(xb, t).argmax(1)
            correct += int((pred == y[i:i + batch_size]).sum())
    return correct / x.shape[0]


# ---------------------------------------------------------------------------- training
def _record(key: str, entry: dict) -> None:
    TRAINING_LOG.parent.mkdir(parents=True, exist_ok=True)
    log = json.loads(TRAINING_LOG.read_text()) if TRAINING_LOG.is_file() else {}
    log[key] = entry
    TRAINING_LOG.write_text(json.dumps(log, indent=2, sort_keys=True) + "\n")


def _common_entry(args, wall: float, steps: int) -> dict:
    return dict(
        command="python -m diffnotes.models.digits " + " ".join(sys.argv[1:]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=round(wall, 1), cpu_seconds=round(time.process_time(), 1), steps=steps,
        threads=torch.get_num_threads(),
        batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
    )


def _random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background −1 fills in)."""
    B, _, H, W = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (B,), generator=g)
    dy = torch.randint(0, 2 * p + 1, (B,), generator=g)
    rows = (dy[:, None] + torch.arange(H)[None])[:, :, None].expand(B, H, W)
    cols = (dx[:, None] + torch.arange(W)[None])[:, None, :].expand(B, H, W)
    return xp[torch.arange(B)[:, None, None], 0, rows, cols][:, None]


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def heldout_eps_loss(unet, t: int = 500, n_noise: int = 4, seed: int = 0, y="true") -> float:
    """Mean ‖ε − ε_θ(x_t, t, y)‖² per element on the test digits at one time step (eq 1.8);
    ``y="true"`` conditions on the true labels, None on the null class. Predicting zeros scores
    ≈ 1."""
    x, labels = load_digits_data("test")
    _, ac = schedule()
    g = torch.Generator().manual_seed(seed)
    eps_model = digits_eps_model(unet, labels if isinstance(y, str) else y)
    losses = []
    with torch.no_grad():
        for _ in range(n_noise):
            noise = torch.randn(x.shape, generator=g)
            x_t = q_sample(x, t, ac, noise)
            losses.append(torch.mean((noise - eps_model(x_t, t)) ** 2).item())
    return sum(losses) / len(losses)


def train_unet(args) -> None:
    """``train-unet``: the ε-loss (Ahmad's notes, eq 1.8) with label dropout to NULL_CLASS, EMA weights;
    saves ``weights/digits/unet`` and records time, steps and threads in TRAINING.json."""
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_digits_data("train")
    _, ac = schedule()
    unet = build_unet()
    ema = build_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    budget = args.minutes * 60.0
    total = args.steps if args.steps else 10 ** 9   # re-estimated from the measured step time
    t0 = time.time()
    step = 0
    bar = tqdm(desc="train-unet", total=None, mininterval=5)
    losses = []
    while step < total:
        if not args.steps and step == 30:
            per = (time.time() - t0) / 30
            total = max(60, int(budget / per))
            bar.total = total
        idx = torch.randint(0, len(y_train), (args.batch_size,), generator=g)
        x0 = x_train[idx]
        y = y_train[idx].clone()
        y[torch.rand(args.batch_size, generator=g) < args.p_uncond] = NULL_CLASS   # label dropout
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, total, args.lr, args.warmup)
        eps_model = digits_eps_model(unet, y)
        loss = ddpm_loss(eps_model, x0, ac, generator=g)                           # eq 1.8
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / 100:.4f}")
        if time.time() - t0 > budget * 1.25:
            break
    bar.close()
    wall = time.time() - t0
    ema.eval()
    out = Path(args.out) if args.out else UNET_DIR
    ema.save_pretrained(str(out), safe_serialization=True)
    entry = _common_entry(args, wall, step)
    entry.update(p_uncond=args.p_uncond, ema=args.ema, minutes=args.minutes,
                 final_train_loss_avg100=round(sum(losses[-100:]) / min(100, len(losses)), 5),
                 heldout_eps_loss_t500=round(heldout_eps_loss(ema, 500), 5),
                 parameters=sum(p.numel() for p in ema.parameters()))
    if not args.out:
        _record("unet", entry)
    print(json.dumps(entry, indent=2))


def train_classifier(args) -> None:
    """``train-classifier``: cross-entropy on noised digits x_t = q_sample(x_0, t) (eq 1.2), t uniform
    (part of each batch near t = 0, so it also classifies clean digits); for classifier guidance."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_digits_data("train")
    _, ac = schedule()
    model = build_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    t0 = time.time()
    losses = []
    step = 0
    for step in tqdm(range(args.steps), desc="train-classifier", mininterval=5):
        idx = torch.randint(0, len(y_train), (args.batch_size,), generator=g)
        x0 = _random_shift(x_train[idx], g)
        t = torch.randint(0, T, (args.batch_size,), generator=g)
        # a share of the batch at small t so the clean classifier is sharp
        small = torch.rand(args.batch_size, generator=g) < args.p_clean
        t[small] = torch.randint(0, 50, (int(small.sum()),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = q_sample(x0, t, ac, noise)                                          # eq 1.2
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, args.steps, args.lr, args.warmup)
        loss = F.cross_entropy(model(x_t, t), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if time.time() - t0 > args.minutes * 60:
            break
    wall = time.time() - t0
    model.eval()
    out = Path(args.out) if args.out else CLASSIFIER_WEIGHTS
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    x_te, y_te = load_digits_data("test")
    acc = {str(t): round(classifier_accuracy(model, x_te, y_te, t=t,
                                             generator=torch.Generator().manual_seed(1)), 4)
           for t in (0, 100, 300, 500, 700, 900, 999)}
    entry = _common_entry(args, wall, step + 1)
    entry.update(p_clean=args.p_clean, test_accuracy_by_t=acc,
                 parameters=sum(p.numel() for p in model.parameters()))
    out.with_suffix(".json").write_text(json.dumps(
        {"config": model.config, "note": "NoiseConditionalClassifier config; "
         "weights in classifier.safetensors"}, indent=2) + "\n")
    if not args.out:
        _record("classifier", entry)
    print(json.dumps(entry, indent=2))


def main(argv=None) -> None:
    """``python -m diffnotes.models.digits train-unet | train-classifier [options]``."""
    p = argparse.ArgumentParser(prog="python -m diffnotes.models.digits",
                                description="Train the shipped digits models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("train-unet", help="train the class-conditional UNet (ε-loss)")
    u.add_argument("--steps", type=int, default=1000,
                   help="step count (0: as many as fit in --minutes)")
    u.add_argument("--minutes", type=float, default=70.0,
                   help="wall-time budget when --steps 0, else a safety cap of 1.25× this")
    u.add_argument("--batch-size", type=int, default=96)
    u.add_argument("--lr", type=float, default=2e-3)
    u.add_argument("--warmup", type=int, default=100)
    u.add_argument("--p-uncond", type=float, default=0.15, help="label-dropout rate")
    u.add_argument("--ema", type=float, default=0.997)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--threads", type=int, default=1)
    u.add_argument("--out", default="", help="output dir (default: the shipped weights)")
    c = sub.add_parser("train-classifier", help="train the noise-conditional classifier")
    c.add_argument("--steps", type=int, default=800)
    c.add_argument("--minutes", type=float, default=15.0, help="wall-time cap")
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--lr", type=float, default=2e-3)
    c.add_argument("--warmup", type=int, default=100)
    c.add_argument("--p-clean", type=float, default=0.2,
                   help="share of each batch drawn at t < 50")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", default="", help="output .safetensors (default: the shipped one)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cmd == "train-unet":
        train_unet(args)
    else:
        train_classifier(args)


if __name__ == "__main__":
    main()
