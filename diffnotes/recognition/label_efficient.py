"""Label-efficient semantic segmentation with diffusion features (Baranchuk et al., ICLR 2022),
Ahmad's notes, §5.12 (eqs 5.59-5.62).

A frozen denoiser's decoder activations, taken at a few noise levels t and a few blocks,
bilinearly upsampled to the image's resolution and concatenated (eqs 5.59-5.60), form a pixel
feature f_p of dimension D = |t| * sum_i C_i. An ensemble of small MLPs (eq 5.61: two hidden
layers with ReLU and batch norm) is trained with the pixel cross-entropy (eq 5.62) on the
pixels of a handful of labelled images; a test pixel takes the majority vote of the members.

As in the official code (``yandex-research/ddpm-segmentation``), and unlike the notes' wording
("noised latent z_T", "reverse diffusion steps"): the image is *forward*-noised to each t
with one noise draw shared by all t (``share_noise``), and the network runs once per t.
Widths follow the code: ``Linear(D, 128)-ReLU-BN-Linear(128, 32)-ReLU-BN-Linear(32, K)`` for
fewer than 30 classes, 256 / 128 otherwise; 10 members; votes by ``torch.mode`` (ties go to
the smallest label).

Blocks are named as diffusers submodules (``"up_blocks.0"``...); the ADM ``output_blocks``
indices of the paper (5, 6, 7, 8, 12) have no one-to-one counterpart in another layout.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffnotes.utils import check_int, check_positive, check_tensor

__all__ = ["decoder_blocks", "pixel_features", "PixelMLP", "train_ensemble", "predict",
           "ensemble_logits", "majority_vote", "DEFAULT_TIMESTEPS"]

#: The paper's noise levels (eq 5.60), of T = 1000.
DEFAULT_TIMESTEPS = (50, 150, 250)


def decoder_blocks(unet) -> tuple[str, ...]:
    """The UNet's decoder blocks (``up_blocks.i``) except the last, full-resolution one when
    there are more than two: the "middle of the decoder" that the paper's ``output_blocks``
    5-8 and 12 stand for, in any layout."""
    n = len(unet.up_blocks)
    keep = range(n) if n <= 2 else range(1, n)
    return tuple(f"up_blocks.{i}" for i in keep)


@torch.no_grad()
def pixel_features(pipe, images, timesteps=DEFAULT_TIMESTEPS, blocks=None, seed: int = 0,
                   out_size: int | None = None) -> torch.Tensor:
    """The pixel features f_p of eqs 5.59-5.60: (B, D, out_size, out_size), D = |t| sum C_i.

    For each t, :func:`diffnotes.features.diffusion_features` (VAE latent forward-noised to t,
    one UNet call, hooked block outputs, bilinear resizing), with a generator seeded ``seed``
    each time, so that every t sees the same noise (the code's ``share_noise``). ``blocks``
    defaults to :func:`decoder_blocks`; ``out_size`` to the image side.
    """
    from diffnotes.features import as_image_tensor, diffusion_features

    x = as_image_tensor(images)
    unet = pipe["unet"] if isinstance(pipe, dict) else pipe.unet
    blocks = decoder_blocks(unet) if blocks is None else tuple(blocks)
    ts = tuple(timesteps)
    if not ts:
        raise ValueError("timesteps must name at least one time step, got an empty sequence")
    size = x.shape[-1] if out_size is None else check_int(out_size, "out_size", 1)
    out = [diffusion_features(pipe, x, t=int(t), blocks=blocks, out_size=size,
                              generator=torch.Generator().manual_seed(seed)) for t in ts]
    return torch.cat(out, dim=1)  # f_p, D = |t| * sum_i C_i (eq 5.60)


class PixelMLP(nn.Module):
    """The pixel classifier of eq 5.61 with the official widths: two hidden layers (128, 32 for
    fewer than 30 classes, else 256, 128), each ReLU then BatchNorm; logits out (the softmax is
    in the loss)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        in_dim = check_int(in_dim, "in_dim", 1)
        num_classes = check_int(num_classes, "num_classes", 2)
        h1, h2 = (128, 32) if num_classes < 30 else (256, 128)
        self.layers = nn.Sequential(nn.Linear(in_dim, h1), nn.ReLU(), nn.BatchNorm1d(h1),
                                    nn.Linear(h1, h2), nn.ReLU(), nn.BatchNorm1d(h2),
                                    nn.Linear(h2, num_classes))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.layers(f)


def _pixels(features: torch.Tensor, name: str = "features") -> torch.Tensor:
    check_tensor(features, name, (2, 4))
    if features.ndim == 4:
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return features


def _check_pair(features, labels):
    check_tensor(features, "features", (2, 4))
    check_tensor(labels, "labels", (1, 3))
    want = (features.shape[0],) if features.ndim == 2 else \
        (features.shape[0],) + tuple(features.shape[2:])
    if tuple(labels.shape) != want:
        raise ValueError(f"labels must have shape {want} for features of shape "
                         f"{tuple(features.shape)} ((N, D) pixels or (B, D, H, W) maps), got "
                         f"{tuple(labels.shape)}")


def train_ensemble(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   n_models: int = 10, steps: int = 300, batch_size: int = 1024,
                   lr: float = 1e-3, generator: torch.Generator | None = None,
                   progress: bool = False) -> list[PixelMLP]:
    """Train ``n_models`` :class:`PixelMLP` on the labelled pixels with the cross-entropy of
    eq 5.62 (Adam, minibatches of pixels drawn at random).

    Args:
        features: (B, D, H, W) maps of the labelled images, or (N, D) pixels.
        labels: (B, H, W) or (N,) integer classes in [0, num_classes).
        generator: initial weights and batches of every member.
    Returns:
        the members, in eval mode.
    Raises:
        ValueError on a features/labels shape mismatch or labels out of range.
    """
    from tqdm.auto import tqdm

    _check_pair(features, labels)
    K = check_int(num_classes, "num_classes", 2)
    n_models = check_int(n_models, "n_models", 1)
    steps = check_int(steps, "steps", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    lr = check_positive(lr, "lr")
    X = _pixels(features).float()
    y = labels.reshape(-1).long()
    if int(y.min()) < 0 or int(y.max()) >= K:
        raise ValueError(f"labels must lie in [0, {K - 1}], got values in "
                         f"[{int(y.min())}, {int(y.max())}]")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    models = []
    for _ in tqdm(range(n_models), desc="pixel MLPs", disable=not progress):
        seed = int(torch.randint(2 ** 31 - 1, (1,), generator=g))
        with torch.random.fork_rng(devices=[]):     # CPU generator only (no CUDA query)
            torch.manual_seed(seed)
            net = PixelMLP(X.shape[1], K)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        net.train()
        for _ in range(steps):
            idx = torch.randint(len(X), (min(batch_size, len(X)),), generator=g)
            loss = F.cross_entropy(net(X[idx]), y[idx])        # eq 5.62 (mean over pixels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(net.eval())
    return models


def majority_vote(votes: torch.Tensor) -> torch.Tensor:
    """Per-position mode over the first dimension (the members' argmaxes); ties go to the
    smallest label, as ``torch.mode`` (what the official code uses)."""
    check_tensor(votes, "votes")
    if votes.ndim < 1 or votes.shape[0] == 0:
        raise ValueError(f"votes must be (M, ...) with M >= 1 members, got {tuple(votes.shape)}")
    K = int(votes.max()) + 1
    counts = F.one_hot(votes.long(), K).sum(0)             # (..., K)
    return counts.argmax(-1)                               # first maximum = smallest label


@torch.no_grad()
def ensemble_logits(models, features: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Every member's logits: (M, N, K) for (N, D) pixels or (B, D, H, W) maps."""
    X = _pixels(features).float()
    return torch.stack([torch.cat([m(X[i:i + chunk]) for i in range(0, len(X), chunk)])
                        for m in models])


@torch.no_grad()
def predict(models, features: torch.Tensor) -> torch.Tensor:
    """Ensemble prediction by majority vote of the members' argmaxes: (B, H, W) for
    (B, D, H, W) maps, (N,) for (N, D) pixels."""
    if not models:
        raise ValueError("models must hold at least one trained PixelMLP, got none")
    check_tensor(features, "features", (2, 4))
    in_dim = models[0].layers[0].in_features
    if features.shape[1] != in_dim:
        raise ValueError(f"features must have D={in_dim} channels (what the models were trained "
                         f"on), got shape {tuple(features.shape)}")
    votes = ensemble_logits(models, features).argmax(-1)   # (M, N)
    lab = majority_vote(votes)
    if features.ndim == 4:
        return lab.reshape(features.shape[0], *features.shape[2:])
    return lab
