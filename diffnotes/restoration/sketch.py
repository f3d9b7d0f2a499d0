"""The latent edge predictor of sketch-guided diffusion (Voynov et al. 2022, §3.1; Zhu's slides,
*Sketch-Guided Text-to-Image Diffusion Models*, "train a per-pixel MLP").

The predictor E reads the activations of several blocks of the denoising UNet at x_t, upsamples
them to the image's resolution, concatenates them with an encoding of the noise level t, and maps
every pixel's feature vector to an edge probability with a small MLP (1×1 convolutions). It is
trained to output the outline of the objects — here the boundary of the shapes generator's masks —
from noised images; :func:`diffnotes.restoration.posterior.sketch_guidance` then steers sampling
down the gradient of ‖E(features(x_t), t) − e‖² for a target sketch e.

Training (one thread, a few minutes, on the pixel-space shapes model)::

    python -m diffnotes.restoration.sketch train [--minutes 4] [--steps N]

writes ``diffnotes/weights/sketch_edges/`` (safetensors, config.json, TRAINING.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import unet_block_outputs
from ..utils import batch_timesteps, check_int, check_tensor

__all__ = ["EdgePredictor", "default_layers", "unet_features", "block_features",
           "edge_loss_and_eps", "outlines", "edge_f1", "sobel_edges", "train", "evaluate", "load",
           "save", "weights_available", "WEIGHTS_DIR", "main"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "sketch_edges"
T_EMB = 8


def default_layers(unet) -> list[str]:
    """Every down block, the mid block and every up block but the last (whose output is the
    image-resolution decoder state), by name: works on any UNet2DModel / UNet2DConditionModel
    layout."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks) - 1)]
    return names


def unet_features(unet, x: torch.Tensor, t, layers=None, **unet_kwargs):
    """One forward pass of ``unet(x, t, **unet_kwargs)`` with forward hooks on the named blocks
    (:func:`diffnotes.features.unet_block_outputs`, the whole pass): returns ``(features, eps)``,
    ``features`` a list of (B, C_l, h_l, w_l) block outputs in the order of ``layers`` (default:
    :func:`default_layers`) and ``eps`` the UNet's output. Differentiable (no ``no_grad`` here)."""
    layers = list(layers) if layers is not None else default_layers(unet)
    modules = dict(unet.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"layers must name blocks of the UNet, unknown: {missing}; e.g. "
                         f"{default_layers(unet)}")
    return unet_block_outputs(unet, x, batch_timesteps(t, x), None, layers,
                              return_output=True, **unet_kwargs)


def block_features(feats, size, t, T: int = 1000) -> torch.Tensor:
    """Upsample each block's output to ``size`` (bilinear), concatenate along channels and append
    a sinusoidal encoding of t/T (``T_EMB`` channels): the per-pixel input of the MLP."""
    B = feats[0].shape[0]
    ups = [F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False)
           for f in feats]
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    tt = (tt.expand(B) if tt.numel() == 1 else tt).to(ups[0].device) / T
    freqs = 2 ** torch.arange(T_EMB // 2, dtype=torch.float32, device=tt.device) * math.pi
    emb = torch.cat([torch.sin(tt[:, None] * freqs), torch.cos(tt[:, None] * freqs)], 1)
    ups.append(emb[:, :, None, None].expand(B, T_EMB, *size))
    return torch.cat(ups, dim=1)


class EdgePredictor(nn.Module):
    """The latent edge predictor (LEP): a per-pixel MLP (1×1 convolutions) from the concatenated
    block features (plus the noise-level encoding) to one edge probability per pixel.

    Args:
        in_channels: the total feature channels (without the t encoding).
        hidden: the MLP's hidden widths (Voynov et al. use (512, 256, 128, 64) on Stable
            Diffusion's 9,324 channels; the tiny pixel model needs far less).
        layers: the UNet blocks it reads (names, stored with the weights).
    """

    def __init__(self, in_channels: int, hidden=(64, 32), layers=()):
        super().__init__()
        self.in_channels, self.hidden, self.layers = int(in_channels), tuple(hidden), list(layers)
        dims = [self.in_channels + T_EMB, *self.hidden]
        mods = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Conv2d(a, b, 1), nn.ReLU()]
        mods.append(nn.Conv2d(dims[-1], 1, 1))
        self.mlp = nn.Sequential(*mods)

    @classmethod
    def for_unet(cls, unet, layers=None, hidden=(64, 32), generator=None):
        """A fresh predictor sized for ``unet``'s blocks (channels found by one dry run)."""
        layers = list(layers) if layers is not None else default_layers(unet)
        p = next(unet.parameters())
        s = unet.config.sample_size
        s = s if isinstance(s, int) else s[0]
        x = torch.zeros(1, unet.config.in_channels, s, s, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            kw = {}
            if hasattr(unet.config, "cross_attention_dim") and "Cross" in "".join(
                    unet.config.down_block_types):
                kw["encoder_hidden_states"] = torch.zeros(1, 1, unet.config.cross_attention_dim,
                                                          dtype=p.dtype, device=p.device)
            feats, _ = unet_features(unet, x, 0, layers, **kw)
        if generator is not None:
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=generator)))
        return cls(sum(f.shape[1] for f in feats), hidden, layers)

    def forward(self, feats, size, t) -> torch.Tensor:
        """Edge probabilities (B, 1, *size) in [0, 1] from the block outputs ``feats``."""
        return torch.sigmoid(self.mlp(block_features(feats, size, t)))

    def predict(self, unet, x, t, **unet_kwargs):
        """(edges, eps) for x_t: one UNet pass through the hooked blocks."""
        feats, eps = unet_features(unet, x, t, self.layers, **unet_kwargs)
        return self(feats, tuple(x.shape[-2:]), t), eps

    def config(self) -> dict:
        return dict(in_channels=self.in_channels, hidden=list(self.hidden), layers=self.layers)


def edge_loss_and_eps(predictor: EdgePredictor, unet, x: torch.Tensor, t: int,
                      target: torch.Tensor, **unet_kwargs):
    """L = ‖E(features(x_t), t) − e‖² per sample (B,) and the UNet's ε at x_t, from one pass
    (Voynov et al. 2022, eq 3's loss; differentiable in x)."""
    dtype = next(unet.parameters()).dtype
    edges, eps = predictor.predict(unet, x.to(dtype), t, **unet_kwargs)
    L = (edges - target.to(edges)).pow(2).flatten(1).sum(1)
    return L.to(x.dtype), eps.to(x.dtype)


# ---------------------------------------------------------------------------- ground truth
def outlines(masks) -> torch.Tensor:
    """The outline of each scene: the pixels of an object mask with a 4-neighbour outside it
    (mask minus its erosion), for all objects together. ``masks`` bool (N, K, H, W) (or
    (N, H, W)); returns float (N, 1, H, W) in {0, 1}."""
    m = torch.as_tensor(masks)
    if m.ndim == 3:
        m = m[:, None]
    m = m.float()
    cross = torch.minimum(
        torch.minimum(F.pad(m, (0, 0, 1, 0))[..., :-1, :], F.pad(m, (0, 0, 0, 1))[..., 1:, :]),
        torch.minimum(F.pad(m, (1, 0, 0, 0))[..., :, :-1], F.pad(m, (0, 1, 0, 0))[..., :, 1:]))
    edge = (m - torch.minimum(m, cross)).amax(1, keepdim=True)
    return (edge > 0).float()


def sobel_edges(x: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """A model-independent judge: edges of images (B, 3, H, W) in [−1, 1] where the Sobel gradient
    magnitude of the grey image exceeds ``threshold`` (float (B, 1, H, W) in {0, 1})."""
    g = x.float().mean(1, keepdim=True)
    kx = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float32) / 4
    gx = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kx[None, None])
    gy = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kx.T[None, None])
    return ((gx ** 2 + gy ** 2).sqrt() > threshold).float()


def edge_f1(pred: torch.Tensor, target: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """F1 of two binary edge maps (B, 1, H, W) with a ``tolerance``-pixel slack (a predicted edge
    counts when a target edge lies within the (2·tol+1)² window, and vice versa), per image."""
    k = 2 * tolerance + 1
    dil = lambda e: F.max_pool2d(e, k, stride=1, padding=tolerance)  # noqa: E731
    p, t = pred.float(), target.float()
    prec = (p * dil(t)).flatten(1).sum(1) / p.flatten(1).sum(1).clamp_min(1)
    rec = (t * dil(p)).flatten(1).sum(1) / t.flatten(1).sum(1).clamp_min(1)
    return 2 * prec * rec / (prec + rec).clamp_min(1e-12)


# ---------------------------------------------------------------------------- training
def train(unet, steps: int = 200, batch: int = 16, minutes: float | None = None, seed: int = 0,
          lr: float = 3e-3, hidden=(64, 32), layers=None, progress: bool = True):
    """Train an :class:`EdgePredictor` on ``unet``'s features: scenes of the shapes generator
    (never the held-out seed), x_t = q-sample at t uniform in [0, 1000), target = the outline of
    the masks, MSE loss (Voynov et al. 2022, §3.1), Adam. Stops after ``steps`` or ``minutes``.
    Returns ``(predictor, log)``."""
    from tqdm.auto import tqdm

    from ..ddpm import q_sample
    from ..models import pixel_shapes as P

    steps = check_int(steps, "steps", min=1)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pred = EdgePredictor.for_unet(unet, layers, hidden)
    opt = torch.optim.Adam(pred.parameters(), lr=lr)
    ac = P.alphas_cumprod()
    pool_x, pool_e = None, None
    t0, log = time.time(), []
    bar = tqdm(range(steps), disable=not progress, desc="sketch edges", leave=False)
    for it in bar:
        if it % 50 == 0:                                              # a fresh pool of scenes
            s = 424_242 + it
            assert s != P.TEST_SEED
            pool_x, sc = P.scenes(256, seed=s, textured=bool(it % 100))
            pool_e = outlines(sc.masks32)
        idx = torch.randint(0, len(pool_x), (batch,), generator=g)
        x0, e = pool_x[idx], pool_e[idx]
        t = torch.randint(0, len(ac), (batch,), generator=g)
        xt = q_sample(x0, t, ac.float(), torch.randn(x0.shape, generator=g))
        with torch.no_grad():
            feats, _ = unet_features(unet, xt, t, pred.layers)
        out = pred(feats, tuple(x0.shape[-2:]), t)
        loss = F.mse_loss(out, e)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:                               # cosine decay
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (it + 1) / steps))
        if it % 10 == 0 or it == steps - 1:
            log.append(dict(step=it, loss=float(loss.detach())))
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if minutes is not None and time.time() - t0 > 60 * minutes:
            break
    return pred, log


def save(pred: EdgePredictor, out: Path, info: dict) -> None:
    """Write the predictor's safetensors, its config and ``TRAINING.json`` (``info``) to ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in pred.state_dict().items()},
              str(out / "edge_predictor.safetensors"))
    (out / "config.json").write_text(json.dumps(pred.config(), indent=1) + "\n")
    (out / "TRAINING.json").write_text(json.dumps(info, indent=1) + "\n")


def weights_available(path=None) -> bool:
    """True when the shipped edge predictor (safetensors + config.json) is on disk."""
    p = Path(path) if path is not None else WEIGHTS_DIR
    return (p / "edge_predictor.safetensors").is_file() and (p / "config.json").is_file()


def load(path=None) -> EdgePredictor:
    """The shipped predictor (``diffnotes/weights/sketch_edges/``), eval mode, gradients off."""
    from safetensors.torch import load_file

    p = Path(path) if path is not None else WEIGHTS_DIR
    if not weights_available(p):
        raise FileNotFoundError(f"no edge predictor in {p}; train it with "
                                "`python -m diffnotes.restoration.sketch train`")
    cfg = json.loads((p / "config.json").read_text())
    pred = EdgePredictor(cfg["in_channels"], cfg["hidden"], cfg["layers"])
    pred.load_state_dict(load_file(str(p / "edge_predictor.safetensors")))
    pred.eval().requires_grad_(False)
    return pred


def evaluate(unet, pred, n: int = 32, scales=(0.0, 0.5, 1.0, 2.0), steps: int = 50,
             seed: int = 0) -> dict:
    """Sketch guidance on the outlines of ``n`` held-out scenes: for each scale, the edge F1
    (1-px tolerance) between the Sobel edges of the samples and the target outline, and the
    predictor's own loss at t = 0 on the samples. ``f1_true_images`` is the judge on the true
    images (how well Sobel edges recover the outlines at all)."""
    from ..models import pixel_shapes as P
    from .posterior import default_timesteps, sketch_guidance

    x, sc = P.scenes(n)
    target = outlines(sc.masks32)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(x.shape, generator=g)
    rows = []
    for s in scales:
        t0 = time.time()
        out = sketch_guidance(P.eps_model(unet), None, target, alphas_cumprod=P.alphas_cumprod(),
                              timesteps=default_timesteps(1000, steps), x_T=x_T, predictor=pred,
                              unet=unet, scale=s, generator=torch.Generator().manual_seed(seed + 1),
                              progress=False).clamp(-1, 1)
        with torch.no_grad():
            L, _ = edge_loss_and_eps(pred, unet, out, 0, target)
        rows.append(dict(scale=float(s), f1=float(edge_f1(sobel_edges(out), target).mean()),
                         edge_loss=float(L.mean()), seconds=time.time() - t0))
        print(json.dumps(rows[-1]), flush=True)
    return dict(n=n, steps=steps, seed=seed, rows=rows,
                f1_true_images=float(edge_f1(sobel_edges(x), target).mean()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m diffnotes.restoration.sketch",
                                description="train the latent edge predictor of sketch guidance")
    sub = p.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("evaluate")
    ev.add_argument("--n", type=int, default=32)
    ev.add_argument("--steps", type=int, default=50)
    ev.add_argument("--threads", type=int, default=1)
    tr = sub.add_parser("train")
    tr.add_argument("--steps", type=int, default=200)
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--minutes", type=float, default=4.0)
    tr.add_argument("--threads", type=int, default=1)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", default=str(WEIGHTS_DIR))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ..models import pixel_shapes as P

    unet = P.load()
    if a.cmd == "evaluate":
        t_wall = time.time()
        rec = evaluate(unet, load(), n=a.n, steps=a.steps)
        rec.update(command="python -m diffnotes.restoration.sketch " + " ".join(
            argv if argv is not None else sys.argv[1:]), wall_seconds=time.time() - t_wall,
            threads=a.threads,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        out = Path(__file__).resolve().parent / "results" / "sketch_guidance.json"
        out.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"wrote {out}")
        return
    t_wall, t_cpu = time.time(), time.process_time()
    pred, log = train(unet, steps=a.steps, batch=a.batch, minutes=a.minutes, seed=a.seed)
    info = dict(command="python -m diffnotes.restoration.sketch " + " ".join(
        argv if argv is not None else sys.argv[1:]),
        wall_seconds=time.time() - t_wall, cpu_seconds=time.process_time() - t_cpu,
        threads=a.threads, steps=log[-1]["step"] + 1 if log else 0, batch=a.batch,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        settings=dict(lr=3e-3, hidden=list(pred.hidden), layers=pred.layers, loss="mse",
                      t="uniform [0, 1000)", target="outline of the masks (32x32)",
                      unet="diffnotes/weights/pixel_shapes"),
        machine=platform.machine(), torch=torch.__version__, loss_log=log)
    save(pred, Path(a.out), info)
    print(f"wrote {a.out} (final loss {log[-1]['loss']:.4f})")


if __name__ == "__main__":
    main()
