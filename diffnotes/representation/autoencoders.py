"""Plain, contractive and denoising autoencoders (Ahmad's notes, §2.2, eqs 2.12–2.17).

An autoencoder is an encoder f: ℝ^D → ℝ^d and a decoder g: ℝ^d → ℝ^D with x′ = g(f(x)) (eq 2.12).

- plain (eq 2.13): L_rec = ‖x − g(f(x))‖²;
- contractive (eq 2.14; Rifai et al. 2011, eq 2): L_CAE = L_rec + λ ‖J_f(x)‖_F², the **squared**
  Frobenius norm Σ_ij (∂h_j/∂x_i)² (eq 2.15 prints it without the square). Computed exactly:
  in closed form for a one-layer encoder h = s(Wx + b) (Σ_j (s′_j)² Σ_i W_ji²; ‖W‖_F² when s is
  the identity), by ``torch.func`` otherwise;
- denoising (eq 2.17 corrected; Vincent et al. 2008, §2.3): x̃ ∼ q_D(x̃ | x), Gaussian
  (x̃ = x + σε) or masking (each component set to 0 with probability p), and
  L_DAE = ‖x − g(f(x̃))‖²: reconstruct the *clean* x from the corrupted x̃ (the notes print
  ‖x̃ − g(f(x))‖², which trains a plain autoencoder on the clean input with a noisy target).

Every loss averages over the batch the per-example sum over the D components.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..utils import check_choice, check_int, check_positive, check_range, check_tensor

__all__ = ["Autoencoder", "mlp", "reconstruction_loss", "encoder_jacobian", "contractive_penalty",
           "contractive_loss", "corrupt", "denoising_loss", "train_autoencoder", "pca_basis",
           "decoder_jacobian", "tangent_angles", "encoder_sensitivity"]

_ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "relu": nn.ReLU,
         "elu": nn.ELU}


def mlp(sizes: Sequence[int], activation: str = "softplus", last_activation: str | None = None
        ) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (none after the last,
    unless ``last_activation``)."""
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[k], sizes[k + 1]))
        if k < len(sizes) - 2:
            layers.append(_ACTS[activation]())
    if last_activation is not None:
        layers.append(_ACTS[last_activation]())
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """Encoder f (``D → hidden… → d``) and decoder g (``d → …hidden → D``), MLPs.

    ``hidden=()`` gives the linear autoencoder (f(x) = Wx + b, g(h) = Vh + c); a one-layer
    sigmoid encoder (Rifai et al.'s CAE) is ``hidden=(), encoder_activation="sigmoid"``."""

    def __init__(self, D: int, d: int, hidden: Sequence[int] = (128,), activation: str = "softplus",
                 encoder_activation: str | None = None, decoder_activation: str | None = None):
        super().__init__()
        D, d = check_int(D, "D", 1), check_int(d, "d", 1)
        check_choice(activation, "activation", tuple(_ACTS))
        self.D, self.d = D, d
        self.encoder = mlp([D, *hidden, d], activation, encoder_activation)
        self.decoder = mlp([d, *reversed(tuple(hidden)), D], activation, decoder_activation)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _check_x(model, x, name="x"):
    check_tensor(x, name, ndim=2)
    D = getattr(model, "D", None)
    if D is not None and x.shape[1] != D:
        raise ValueError(f"{name} must have shape (B, {D}), got {tuple(x.shape)}")
    return x


def reconstruction_loss(model: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """L_rec = mean_b ‖x_b − g(f(x_b))‖² (Ahmad's notes, eq 2.13)."""
    x = _check_x(model, x)
    return ((x - model(x)) ** 2).sum(1).mean()


def encoder_jacobian(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J_f(x) = ∂f/∂x for each row of x (B, D): (B, d, D), by ``torch.func`` (differentiable)."""
    check_tensor(x, "x", ndim=2)

    def f(v):
        return encoder(v[None])[0]

    return torch.func.vmap(torch.func.jacrev(f))(x)


def decoder_jacobian(decoder: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """J_g(h) (B, D, d) for each code h (B, d): the learned tangent space at g(h) (eq 2.10)."""
    check_tensor(h, "h", ndim=2)
    return torch.func.vmap(torch.func.jacfwd(lambda v: decoder(v[None])[0]))(h)


def _one_layer(encoder):
    """(linear, activation name or None) if ``encoder`` is Linear or Linear + elementwise act."""
    mods = list(encoder.children()) if isinstance(encoder, nn.Sequential) else [encoder]
    if len(mods) == 1 and isinstance(mods[0], nn.Linear):
        return mods[0], None
    if len(mods) == 2 and isinstance(mods[0], nn.Linear) and isinstance(mods[1], (nn.Sigmoid, nn.Tanh)):
        return mods[0], "sigmoid" if isinstance(mods[1], nn.Sigmoid) else "tanh"
    return None


def _two_layer(encoder):
    """(linear, activation, linear) if ``encoder`` is Linear, elementwise activation, Linear."""
    mods = list(encoder.children()) if isinstance(encoder, nn.Sequential) else []
    if len(mods) == 3 and isinstance(mods[0], nn.Linear) and isinstance(mods[2], nn.Linear) \
            and isinstance(mods[1], tuple(_ACTS.values())):
        return mods[0], mods[1], mods[2]
    return None


def contractive_penalty(encoder: nn.Module, x: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """mean_b ‖J_f(x_b)‖_F² = mean_b Σ_ij (∂h_j/∂x_i)² (Ahmad's notes, eq 2.15 with the square
    of eq 2.14; Rifai et al. 2011, eq 1).

    ``method``: ``"closed"`` for a one-layer encoder h = s(Wx + b) with s the identity
    (‖W‖_F², independent of x), the sigmoid (Σ_j (h_j (1 − h_j))² ‖W_j‖²) or tanh
    (Σ_j (1 − h_j²)² ‖W_j‖²); ``"jacobian"`` by ``torch.func`` for any encoder; ``"auto"``
    (closed form when it applies; for Linear–activation–Linear, J = W₂ diag(s′) W₁ explicitly)."""
    check_choice(method, "method", ("auto", "closed", "jacobian"))
    check_tensor(x, "x", ndim=2)
    one = _one_layer(encoder)
    if method == "closed" and one is None:
        raise ValueError("method='closed' needs a one-layer encoder (Linear, optionally followed "
                         "by Sigmoid or Tanh); use method='jacobian'")
    if method != "jacobian" and one is not None:
        lin, act = one
        w2 = (lin.weight ** 2).sum(1)                                   # (d,) = Σ_i W_ji²
        if act is None:
            return w2.sum() * torch.ones((), dtype=x.dtype)
        h = torch.sigmoid(lin(x)) if act == "sigmoid" else torch.tanh(lin(x))
        ds = h * (1 - h) if act == "sigmoid" else 1 - h ** 2
        return (ds ** 2 * w2).sum(1).mean()
    two = _two_layer(encoder) if method != "jacobian" else None
    if two is not None:                        # f = W2 s(W1 x + b1) + b2: J = W2 diag(s') W1
        l1, act, l2 = two
        a = l1(x)
        with torch.enable_grad():
            a_ = a if a.requires_grad else a.detach().requires_grad_(True)
            ds = torch.autograd.grad(act(a_).sum(), a_, create_graph=a.requires_grad)[0]
        J = (l2.weight[None] * ds[:, None, :]) @ l1.weight              # (B, d, D)
        return (J ** 2).sum((1, 2)).mean()
    J = encoder_jacobian(encoder, x)
    return (J ** 2).sum((1, 2)).mean()


def contractive_loss(model: Autoencoder, x: torch.Tensor, lam: float = 0.1,
                     method: str = "auto") -> torch.Tensor:
    """L_CAE = L_rec + λ ‖J_f(x)‖_F² (Ahmad's notes, eq 2.14; Rifai et al. 2011, eq 2)."""
    lam = check_positive(lam, "lam", allow_zero=True)
    return reconstruction_loss(model, x) + lam * contractive_penalty(model.encoder, x, method)


def corrupt(x: torch.Tensor, kind: str = "gaussian", level: float = 0.1,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """x̃ ∼ q_D(x̃ | x) (Ahmad's notes, eq 2.16): ``"gaussian"``: x + σε with σ = ``level`` > 0;
    ``"mask"``: each component set to 0 independently with probability ``level`` ∈ (0, 1)
    (Vincent et al. 2008's masking noise)."""
    check_tensor(x, "x")
    check_choice(kind, "kind", ("gaussian", "mask"))
    if kind == "gaussian":
        sigma = check_positive(level, "level")
        return x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    p = check_range(level, "level", 0, 1, lo_open=True, hi_open=True)
    keep = torch.rand(x.shape, generator=generator, dtype=x.dtype) >= p
    return x * keep


def denoising_loss(model: Autoencoder, x: torch.Tensor, kind: str = "gaussian", level: float = 0.1,
                   generator: torch.Generator | None = None,
                   x_tilde: torch.Tensor | None = None) -> torch.Tensor:
    """L_DAE = mean_b ‖x_b − g(f(x̃_b))‖² with x̃ ∼ q_D(x̃ | x) (Ahmad's notes, eq 2.17 corrected:
    the clean x is the target, the corrupted x̃ the input; Vincent et al. 2008, eq 3).
    ``x_tilde`` may be given (then ``kind``/``level`` are unused)."""
    x = _check_x(model, x)
    xt = corrupt(x, kind, level, generator) if x_tilde is None else x_tilde
    return ((x - model(xt)) ** 2).sum(1).mean()


def train_autoencoder(model: Autoencoder, data: torch.Tensor, kind: str = "plain", steps: int = 2000,
                      batch_size: int = 128, lr: float = 2e-3, lam: float = 0.1,
                      corruption: str = "gaussian", level: float = 0.1, seed: int = 0,
                      weight_decay: float = 0.0) -> dict:
    """Train ``model`` in place with Adam on ``data`` (N, D) with one of the losses:
    ``"plain"`` (eq 2.13), ``"contractive"`` (eq 2.14, weight ``lam``) or ``"denoising"``
    (eq 2.17 corrected, ``corruption`` at ``level``). Seeded. Returns ``{"losses", "seconds"}``."""
    check_choice(kind, "kind", ("plain", "contractive", "denoising"))
    data = _check_x(model, data, "data")
    steps, batch_size = check_int(steps, "steps", 1), check_int(batch_size, "batch_size", 1)
    if kind == "denoising":
        corrupt(data[:1], corruption, level)                      # validates corruption/level
    if kind == "contractive":
        check_positive(lam, "lam", allow_zero=True)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (min(batch_size, data.shape[0]),), generator=g)
        x = data[idx]
        if kind == "plain":
            loss = reconstruction_loss(model, x)
        elif kind == "contractive":
            loss = contractive_loss(model, x, lam)
        else:
            loss = denoising_loss(model, x, corruption, level, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"losses": np.array(losses), "seconds": time.perf_counter() - t0}


def pca_basis(X: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), orthonormal basis (D, d)) of the top-d principal subspace of X (N, D): the
    closed-form optimum of the linear autoencoder with squared error (Baldi & Hornik 1989)."""
    check_tensor(X, "X", ndim=2)
    d = check_int(d, "d", 1)
    mu = X.mean(0)
    _, _, Vh = torch.linalg.svd(X - mu, full_matrices=False)
    return mu, Vh[:d].T


# ------------------------------------------------------------------------------- measurements
def tangent_angles(model: Autoencoder, x: torch.Tensor, tangents) -> np.ndarray:
    """Principal angles (degrees, (N, k) ascending) between the decoder's tangent space at the
    code of each scene, span J_g(f(x_i)), and the generator's true tangents (N, D, k)."""
    from .manifold import principal_angles

    check_tensor(x, "x", ndim=2)
    T = torch.as_tensor(np.asarray(tangents), dtype=torch.float64)
    if T.ndim != 3 or T.shape[:2] != x.shape:
        raise ValueError(f"tangents must be (N, D, k) with (N, D) = {tuple(x.shape)}, got "
                         f"{tuple(T.shape)}")
    with torch.no_grad():
        h = model.encode(x)
    Jg = decoder_jacobian(model.decoder, h).detach().double()
    return np.degrees(np.stack([principal_angles(Jg[i], T[i]).numpy() for i in range(len(x))]))


def encoder_sensitivity(model: Autoencoder, x: torch.Tensor, tangents, n_dirs: int = 16,
                        seed: int = 0) -> dict:
    """How far the encoder moves under tangent against normal perturbations of equal size:
    mean ‖J_f(x) u‖ over random unit u in the true tangent space, and over random unit u in its
    normal space (eq 2.11: a good representation feels the first, not the second).
    Returns ``{"tangent", "normal", "ratio"}`` (medians over scenes; ratio = tangent / normal)."""
    from .manifold import project_normal, project_tangent, tangent_basis

    check_tensor(x, "x", ndim=2)
    T = torch.as_tensor(np.asarray(tangents), dtype=torch.float64)
    Jf = encoder_jacobian(model.encoder, x).detach().double()                 # (N, d, D)
    g = torch.Generator().manual_seed(seed)
    tan, nor = [], []
    for i in range(len(x)):
        U = tangent_basis(T[i])
        v = torch.randn(n_dirs, x.shape[1], generator=g, dtype=torch.float64)
        vt, vn = project_tangent(v, U), project_normal(v, U)
        vt, vn = vt / vt.norm(dim=1, keepdim=True), vn / vn.norm(dim=1, keepdim=True)
        tan.append(float((Jf[i] @ vt.T).norm(dim=0).mean()))
        nor.append(float((Jf[i] @ vn.T).norm(dim=0).mean()))
    tan, nor = np.array(tan), np.array(nor)
    return {"tangent": float(np.median(tan)), "normal": float(np.median(nor)),
            "ratio": float(np.median(tan / nor))}
