"""2-D toy data and a small MLP denoiser, trained in seconds on a CPU.

- :func:`make_dataset`: two moons or a swiss roll from scikit-learn, seeded, centred and scaled
  to unit variance (one scale for both axes, so the shape is kept).
- :class:`ToyMLP`: ``eps_model(x, t)`` — an MLP on (x, sinusoidal embedding of t).
- :func:`train_toy2d`: Algorithm 1 of Ahmad's notes (the ε-loss, eq 1.8) with
  :func:`diffnotes.ddpm.ddpm_loss`, Adam and a cosine learning-rate decay.
- :func:`sliced_wasserstein`: a simple distance between two point clouds, to score samples.
- :func:`load_toy2d`: the shipped weights (``diffnotes/weights/toy2d/<name>.safetensors``), so a
  later chapter need not retrain; ``python -m diffnotes.models.toy2d`` retrains and rewrites
  them (random seed = 0, 2000 steps, the settings of the DDPM chapter).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..ddpm import ddpm_loss
from ..schedules import alphas_cumprod as _cumprod, make_betas
from ..utils import check_tensor

__all__ = ["DATASETS", "make_dataset", "timestep_embedding", "ToyMLP", "train_toy2d",
           "sliced_wasserstein", "load_toy2d", "save_toy2d"]

DATASETS = ("moons", "swiss_roll")


def make_dataset(name: str = "moons", n: int = 4000, seed: int = 0,
                 noise: float | None = None) -> torch.Tensor:
    """``n`` points of a 2-D dataset as a float32 tensor (n, 2), zero mean, unit variance.

    ``"moons"``: :func:`sklearn.datasets.make_moons` (noise 0.05 by default);
    ``"swiss_roll"``: the (x, z) coordinates of :func:`sklearn.datasets.make_swiss_roll`
    (noise 0.3 by default). ``seed`` is scikit-learn's ``random_state``, so the same call gives
    the same points. Raises ``ValueError`` for an unknown ``name`` or ``n < 1``.
    """
    from sklearn.datasets import make_moons, make_swiss_roll

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if name == "moons":
        x, _ = make_moons(n_samples=int(n), noise=0.05 if noise is None else noise,
                          random_state=seed)
    elif name == "swiss_roll":
        x3, _ = make_swiss_roll(n_samples=int(n), noise=0.3 if noise is None else noise,
                                random_state=seed)
        x = x3[:, [0, 2]]
    else:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    x = torch.as_tensor(x, dtype=torch.float32)
    x = x - x.mean(0)
    return x / x.pow(2).sum(1).mean().div(2).sqrt()   # E‖x‖²/2 = 1: unit variance per axis


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of time-step indices (Transformer-style, as in DDPM's UNet).

    ``t``: (B,) tensor of indices (any dtype). Returns (B, dim) float32: [cos(t f_k), sin(t f_k)]
    with f_k = max_period^(−k/(dim/2)).
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ToyMLP(nn.Module):
    """ε_θ(x, t) for 2-D data: an MLP on [x, emb(t)] with SiLU activations.

    Call as ``model(x, t)``: ``x`` (B, 2) of any float dtype, ``t`` an int or a (B,) integer
    tensor of 0-based indices into the schedule (``T`` of them). Returns ε of ``x``'s shape and
    dtype (computed in float32). Raises ``ValueError`` for a wrong ``x`` shape or a ``t`` out of
    range.
    """

    def __init__(self, hidden: int = 128, depth: int = 3, emb_dim: int = 32, T: int = 1000):
        super().__init__()
        self.T, self.emb_dim = T, emb_dim
        layers, d = [], 2 + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        check_tensor(x, "x", ndim=2)
        if x.shape[1] != 2:
            raise ValueError(f"x must have shape (B, 2), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be an int or have shape ({x.shape[0]},), "
                             f"got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(f"t must lie in [0, {self.T - 1}], got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        h = torch.cat([x.to(torch.float32), timestep_embedding(t, self.emb_dim)], dim=1)
        return self.net(h).to(x.dtype)


def train_toy2d(data: torch.Tensor, steps: int = 2000, generator: torch.Generator | None = None,
                progress: bool = True, batch_size: int = 256, lr: float = 5e-3,
                alphas_cumprod: torch.Tensor | None = None, hidden: int = 128):
    """Train a :class:`ToyMLP` on ``data`` (N, 2) with the DDPM ε-loss (Ahmad's notes, Algorithm 1).

    Each step draws a batch of ``batch_size`` rows, one t and one ε per row (through
    :func:`diffnotes.ddpm.ddpm_loss`, eq 1.8), from ``generator``; the weights are initialised
    from it too, so a seeded generator gives the same model. Adam with a cosine decay of the
    learning rate to 5% of ``lr``. ``alphas_cumprod`` defaults to DDPM's linear schedule, T =
    1000. The defaults (2000 steps of 256, lr 5e-3; about 10–15 s on one CPU core) give good
    moons.

    Returns ``(model, losses)``: the model in eval mode and the per-step loss values.
    Raises ``ValueError`` for data that is not (N, 2) or ``steps < 1``.
    """
    check_tensor(data, "data", ndim=2)
    if data.shape[1] != 2 or data.shape[0] < 1:
        raise ValueError(f"data must have shape (N, 2), got {tuple(data.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    ac = _cumprod(make_betas("linear", 1000)) if alphas_cumprod is None else alphas_cumprod
    ac = ac.to(torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = ToyMLP(hidden=hidden, T=len(ac))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / steps)))
    data = data.to(torch.float32)
    losses = []
    model.train()
    for _ in tqdm(range(steps), disable=not progress, desc="training", leave=False):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        loss = ddpm_loss(model, data[idx], ac, generator=generator)   # eq 1.8
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return model, losses


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 1-Wasserstein distance between point clouds ``a`` (N, D) and ``b`` (M, D).

    Projects both on ``n_projections`` random unit directions (from ``generator``), compares
    the sorted projections at the same quantile levels (min(N, M) of them, nearest rank) and averages
    |difference|. 0 for identical clouds; of the order of the data scale for unrelated ones.
    """
    check_tensor(a, "a", ndim=2)
    check_tensor(b, "b", ndim=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same number of columns, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    d = torch.randn(a.shape[1], n_projections, generator=generator, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    pa, pb = a.double() @ d, b.double() @ d
    n = min(a.shape[0], b.shape[0])
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n          # common quantile levels

    def quantiles(p):
        return p.sort(dim=0).values[(q * p.shape[0]).long()]

    return float((quantiles(pa) - quantiles(pb)).abs().mean())


# ------------------------------------------------------------------------------ shipped weights
_TRAIN_SETTINGS = {"n": 4000, "steps": 2000, "seed": 0, "hidden": 128}


def _weights_path(name: str):
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "weights" / "toy2d" / f"{name}.safetensors"


def save_toy2d(model: ToyMLP, name: str) -> str:
    """Write ``model``'s weights to ``diffnotes/weights/toy2d/<name>.safetensors``."""
    from safetensors.torch import save_file

    path = _weights_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={k: str(v) for k, v in _TRAIN_SETTINGS.items()})
    return str(path)


def load_toy2d(name: str = "moons", train_if_missing: bool = True, progress: bool = True):
    """The shipped :class:`ToyMLP` for dataset ``name`` (in eval mode, float32).

    If the weights file is missing and ``train_if_missing``, trains one with the shipped
    settings (random seed = 0, 2000 steps on 4000 points, the other arguments at their
    defaults) instead. Raises ``ValueError`` for an unknown
    ``name`` and ``FileNotFoundError`` if the file is missing and training is off.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    path = _weights_path(name)
    if not path.exists():
        if not train_if_missing:
            raise FileNotFoundError(f"no shipped weights at {path}; run "
                                    "`python -m diffnotes.models.toy2d`")
        st = _TRAIN_SETTINGS
        model, _ = train_toy2d(make_dataset(name, st["n"], seed=st["seed"]), st["steps"],
                               torch.Generator().manual_seed(st["seed"]), progress=progress,
                               hidden=st["hidden"])
        return model
    from safetensors.torch import load_file

    model = ToyMLP(hidden=_TRAIN_SETTINGS["hidden"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()


if __name__ == "__main__":   # python -m diffnotes.models.toy2d: retrain the shipped weights
    torch.set_num_threads(1)
    st = _TRAIN_SETTINGS
    for _name in DATASETS:
        _model, _losses = train_toy2d(make_dataset(_name, st["n"], seed=st["seed"]), st["steps"],
                                      torch.Generator().manual_seed(st["seed"]),
                                      hidden=st["hidden"])
        print(_name, "final loss (mean of last 100):", sum(_losses[-100:]) / 100,
              "->", save_toy2d(_model, _name))
