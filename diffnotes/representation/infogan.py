"""A small InfoGAN on one-object shapes (Ahmad's notes, §2.3, eqs 2.18–2.19, and appendix 6.2.1;
Chen et al. 2016).

The generator G(z, c) takes noise z and a structured code c = (c_cat, c_cont): one categorical
code with as many values as the training shapes, and three continuous codes uniform on [−1, 1]
(as many as the scenes' continuous factors x, y and radius). The discriminator D shares its
convolutional trunk with the recognition network Q(c | x) (a categorical head, and a Gaussian
head with unit variance for c_cont). The objective (eq 2.19; Chen et al. 2016, eq 5) is

    min_{G,Q} max_D  V(D, G) − λ L_I(G, Q),   L_I = H(c) + E_{c∼P(c), x∼G(z,c)} log Q(c | x)

with the variational bound L_I ≤ I(c; G(z, c)) of eq 6.6 (corrected), computed by
:mod:`diffnotes.representation.mutual_information` (one implementation).

Train with ``python -m diffnotes.representation.infogan train`` (weights and TRAINING.json go to
``diffnotes/weights/infogan/``); load with :func:`load_infogan`; score with :func:`evaluate`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.shapes import TRAIN_SHAPES
from ..utils import check_int
from . import mutual_information as MI
from .manifold import render_scenes, sample_scene_params

__all__ = ["Generator", "Discriminator", "sample_codes", "info_terms", "train", "load_infogan",
           "evaluate", "shapes_dataset", "RESOLUTION", "N_CAT", "N_CONT", "N_NOISE",
           "WEIGHTS_DIR", "best_matching_accuracy"]

RESOLUTION = 32
N_CAT = len(TRAIN_SHAPES)        # one category per training shape
N_CONT = 3                       # as many continuous codes as continuous factors
N_NOISE = 16
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "infogan"


def shapes_dataset(n: int, seed: int = 0, resolution: int = RESOLUTION) -> tuple[torch.Tensor, dict]:
    """n grey one-object scenes (n, 1, res, res) in [0, 1] with every training shape, and their
    true factors (``sample_scene_params``'s dict)."""
    p = sample_scene_params(n, seed, shapes=TRAIN_SHAPES)
    x = torch.from_numpy(render_scenes(p, resolution)).float().reshape(n, 1, resolution, resolution)
    return x, p


class Generator(nn.Module):
    """G(z, c): (N_NOISE + N_CAT + N_CONT) → 1×32×32 in [0, 1], an MLP (convolutions are several
    times slower on a CPU at this size)."""

    def __init__(self, hidden: int = 512):
        super().__init__()
        n_in = N_NOISE + N_CAT + N_CONT
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden // 2), nn.BatchNorm1d(hidden // 2), nn.LeakyReLU(0.2),
            nn.Linear(hidden // 2, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, RESOLUTION * RESOLUTION), nn.Sigmoid())

    def forward(self, z, c_cat, c_cont):
        h = torch.cat([z, F.one_hot(c_cat, N_CAT).to(z.dtype), c_cont], 1)
        return self.net(h).view(-1, 1, RESOLUTION, RESOLUTION)


class Discriminator(nn.Module):
    """A shared MLP trunk with two heads: D's real/fake logit and Q(c | x) (categorical logits
    and the means of the continuous codes)."""

    def __init__(self, hidden: int = 512):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Flatten(), nn.Linear(RESOLUTION * RESOLUTION, hidden), nn.LeakyReLU(0.2),
            nn.Dropout(0.3), nn.Linear(hidden, hidden // 2), nn.LeakyReLU(0.2))
        self.d_head = nn.Linear(hidden // 2, 1)
        self.q_head = nn.Sequential(nn.Linear(hidden // 2, 128), nn.LeakyReLU(0.2),
                                    nn.Linear(128, N_CAT + N_CONT))

    def forward(self, x):
        h = self.trunk(x)
        q = self.q_head(h)
        return self.d_head(h).squeeze(1), q[:, :N_CAT], q[:, N_CAT:]


def sample_codes(n: int, generator: torch.Generator | None = None):
    """(z, c_cat, c_cont): z ∼ N(0, I), c_cat uniform over N_CAT, c_cont ∼ U[−1, 1]^N_CONT."""
    z = torch.randn(n, N_NOISE, generator=generator)
    c_cat = torch.randint(0, N_CAT, (n,), generator=generator)
    c_cont = torch.rand(n, N_CONT, generator=generator) * 2 - 1
    return z, c_cat, c_cont


def info_terms(q_cat, q_cont, c_cat, c_cont) -> dict:
    """InfoGAN's information terms: the losses −E log Q and the lower bounds L_I of eq 6.6
    (corrected) for the categorical code and for the continuous codes (Q = N(mean, 1))."""
    l_cat = MI.categorical_info_loss(q_cat, c_cat)
    l_cont = MI.gaussian_info_loss(q_cont, torch.zeros_like(q_cont), c_cont)
    h_cat = MI.uniform_entropy(N_CAT)
    h_cont = N_CONT * MI.uniform_entropy(low=-1.0, high=1.0)
    return {"loss_cat": l_cat, "loss_cont": l_cont,
            "bound_cat": h_cat - float(l_cat.detach()), "bound_cont": h_cont - float(l_cont.detach()),
            "entropy_cat": h_cat}


def train(steps: int = 1500, batch_size: int = 64, n_data: int = 8000, seed: int = 0,
          lam_cat: float = 1.0, lam_cont: float = 1.0, out_dir: str | os.PathLike | None = None,
          threads: int = 1, log_every: int = 500, instance_noise: float = 0.3) -> dict:
    """Train the InfoGAN (non-saturating GAN loss, Adam as in Chen et al. 2016: lr 2e-4 for D,
    1e-3 for G and Q) and save ``infogan.safetensors`` and ``TRAINING.json`` in ``out_dir``.

    Stabilisers (a plain run collapsed to one image per category): dropout in D's trunk,
    one-sided label smoothing (real = 0.9), and instance noise N(0, s²) added to every image D
    sees, with s decaying linearly from ``instance_noise`` to 0.05 (Sønderby et al. 2017)."""
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    data, _ = shapes_dataset(n_data, seed=1000 + seed)
    G, D = Generator(), Discriminator()
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(list(G.parameters()) + list(D.q_head.parameters()), lr=1e-3,
                             betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    log = []
    for step in range(steps):
        real = data[torch.randint(0, n_data, (batch_size,), generator=g)]
        z, c_cat, c_cont = sample_codes(batch_size, g)
        fake = G(z, c_cat, c_cont)
        s_noise = instance_noise + (0.05 - instance_noise) * step / max(steps - 1, 1)
        noisy = lambda im: im + s_noise * torch.randn(im.shape, generator=g)
        d_real, _, _ = D(noisy(real))
        d_fake, _, _ = D(noisy(fake.detach()))
        loss_d = bce(d_real, torch.full_like(d_real, 0.9)) + bce(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        d_fake, _, _ = D(noisy(fake))
        _, q_cat, q_cont = D(fake)
        it = info_terms(q_cat, q_cont, c_cat, c_cont)
        loss_g = bce(d_fake, torch.ones_like(d_fake)) + lam_cat * it["loss_cat"] \
            + lam_cont * it["loss_cont"]
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if step % log_every == 0 or step == steps - 1:
            rec = dict(step=step, loss_d=float(loss_d.detach()), loss_g=float(loss_g.detach()),
                       bound_cat=it["bound_cat"], bound_cont=it["bound_cont"],
                       seconds=time.perf_counter() - t0)
            log.append(rec)
            print(json.dumps(rec), flush=True)
    wall = time.perf_counter() - t0
    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    state = {f"G.{k}": v.contiguous() for k, v in G.state_dict().items()}
    state.update({f"D.{k}": v.contiguous() for k, v in D.state_dict().items()})
    save_file({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
              str(out / "infogan.safetensors"))
    record = {"command": f"python -m diffnotes.representation.infogan train --steps {steps} "
                         f"--batch-size {batch_size} --n-data {n_data} --seed={seed}",
              "wall_seconds": round(wall, 1), "threads": threads, "steps": steps,
              "batch_size": batch_size, "n_data": n_data, "lam_cat": lam_cat,
              "lam_cont": lam_cont, "instance_noise": instance_noise, "resolution": RESOLUTION, "shapes": list(TRAIN_SHAPES),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "torch": torch.__version__, "log": log}
    (out / "TRAINING.json").write_text(json.dumps(record, indent=1) + "\n")
    return {"G": G, "D": D, "record": record}


def load_infogan(path: str | os.PathLike | None = None) -> tuple[Generator, Discriminator]:
    """The shipped (G, D) in eval mode. Raises FileNotFoundError naming the training command."""
    from safetensors.torch import load_file

    p = Path(path) if path is not None else WEIGHTS_DIR / "infogan.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found; train it with "
                                f"`python -m diffnotes.representation.infogan train`")
    sd = load_file(str(p))
    G, D = Generator(), Discriminator()
    G.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("G.")})
    D.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("D.")})
    return G.eval(), D.eval()


def best_matching_accuracy(pred, true, n_classes: int | None = None) -> dict:
    """Accuracy of cluster labels ``pred`` against ``true`` under the best one-to-one matching of
    clusters to classes (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``).
    Returns ``{"accuracy", "mapping" (cluster → class), "confusion"}``."""
    from scipy.optimize import linear_sum_assignment

    pred, true = np.asarray(pred, dtype=np.int64), np.asarray(true, dtype=np.int64)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"pred and true must be 1-D of one length, got {pred.shape} and {true.shape}")
    k = int(max(pred.max(), true.max()) + 1) if n_classes is None else check_int(n_classes, "n_classes", 1)
    C = np.zeros((k, k), dtype=np.int64)
    np.add.at(C, (pred, true), 1)
    rows, cols = linear_sum_assignment(-C)
    return {"accuracy": float(C[rows, cols].sum() / len(pred)), "mapping": dict(zip(rows.tolist(), cols.tolist())),
            "confusion": C}


@torch.no_grad()
def evaluate(G: Generator, D: Discriminator, n: int = 3000, seed: int = 7) -> dict:
    """InfoGAN's codes on real scenes against their true factors: Q's categorical prediction vs
    the true shape (best-matching accuracy), MIG / DCI (random forest) / SAP of the codes
    (categorical prediction, 3 continuous means) on (shape, x, y, radius), and the information
    bounds on generated samples."""
    from .disentanglement import dci, mig, sap

    x, p = shapes_dataset(n, seed=seed)
    _, q_cat, q_cont = D(x)
    pred = q_cat.argmax(1).numpy()
    acc = best_matching_accuracy(pred, p["shape"], N_CAT)
    codes = np.c_[pred, q_cont.numpy()]
    factors = np.c_[p["shape"], p["x"], p["y"], p["radius"]]
    disc = [True, False, False, False]
    gg = torch.Generator().manual_seed(seed)
    z, c_cat, c_cont = sample_codes(n, gg)
    _, qc, qm = D(G(z, c_cat, c_cont))
    it = info_terms(qc, qm, c_cat, c_cont)
    return {"cat_accuracy": acc["accuracy"], "confusion": acc["confusion"].tolist(),
            "mig": mig(codes, factors, discrete=disc)["mig"],
            "dci": {k: v for k, v in dci(codes, factors, discrete=disc, method="forest").items()
                    if k in ("disentanglement", "completeness", "informativeness")},
            "sap": sap(codes, factors, discrete=disc)["sap"],
            "bound_cat": it["bound_cat"], "entropy_cat": it["entropy_cat"],
            "bound_cont": it["bound_cont"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m diffnotes.representation.infogan")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the InfoGAN and write diffnotes/weights/infogan/")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--n-data", type=int, default=8000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", default=None)
    e = sub.add_parser("evaluate", help="score the shipped InfoGAN")
    e.add_argument("--n", type=int, default=3000)
    a = ap.parse_args(argv)
    if a.cmd == "train":
        train(a.steps, a.batch_size, n_data=a.n_data, seed=a.seed, out_dir=a.out, threads=a.threads)
    else:
        res = evaluate(*load_infogan(), n=a.n)
        print(json.dumps({k: v for k, v in res.items() if k != "confusion"}, indent=1))


if __name__ == "__main__":
    main()
