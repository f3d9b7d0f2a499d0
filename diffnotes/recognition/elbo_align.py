"""ELBO-T2IAlign (the ELBO-T2IAlign paper, Zhou et al.): how well does a text-to-image diffusion
model know where each word of a caption is, and how can its ELBO calibrate the answer?

Pixel-text alignment is p_θ(c_i | x_k), the probability of class c_i at pixel k. By Bayes' rule
(the paper's eq 1) it mixes the model's likelihood p_θ(x_k | c_i) with the prior p(c_i), and it
fails in three ways (:func:`bayes_posterior`): a rare or small class (small prior), a confused or
out-of-distribution class (small likelihood), or both. The paper reads the alignment off the
cross-attention of one denoising pass (eq 3) and calibrates it class by class with the ELBO of
the class prompt (eqs 4–7, Algorithm 1):

1. :func:`elbo_loss` — ELB_λ(x, c) = ½ E_{t,ε}[−λ′(t) ‖ε_θ(z_t, t, c) − ε‖²] (eq 4), with the
   same noise ε for every class at a given t; for models trained on other objectives,
   ELB ≈ ½ E[L_ω / ω(t)] (eq 6) with Table I's ω(t) (:func:`omega`); the official code's
   unweighted ε-MSE is ``weighting="unweighted"``.
2. :func:`alignment_scores` — S = γ^{minmax(ELB)} (eq 5): the best-explained class gets S = 1,
   the worst γ.
3. :func:`attention_alignment` — per-class heatmaps from cross-attention averaged over layers
   and collection steps, min–max normalised (eqs 5–6 of Algorithm 1), optionally refined with
   self-attention (step 9), through :class:`diffnotes.attention.AttentionStore`.
4. :func:`calibrate` — A[c_i] ← A[c_i]^{1/S_i} (eq 7).
5. :func:`elbo_t2ialign` — all of Algorithm 1, with the readout as an explicit switch: the
   paper's softmax over classes (step 11), or the official code's argmax with a background
   threshold.

Generation and editing (the paper's §IV-B): :func:`compositional_weights` and
:func:`elbo_reweighted_sample` (ELBO-based re-weighting of the noun phrases at every step,
through a cross-attention :class:`PhraseReweight` controller instead of the paper's Compel
prompt weighting), and :func:`elbo_p2p` (Prompt-to-Prompt with ELBO-calibrated source maps).

Time: the continuous t ∈ [0, 1] of the paper is the DDPM index i ∈ {0, …, T−1} as t = (i+1)/T,
with α_t = √ᾱ_i and σ_t = √(1 − ᾱ_i) (variance-preserving), so λ_i = ln(ᾱ_i / (1 − ᾱ_i)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..attention import (AttentionController, AttentionStore, BatchLayout, upsample,
                         word_token_indices)
from ..ddim import ddim_step
from ..ddpm import q_sample
from ..editing.common import encode_prompts, pipe_alphas_cumprod, pipe_eps_model, pipe_timesteps
from ..utils import batch_timesteps, check_choice, check_int, check_range, check_tensor

__all__ = [
    "bayes_posterior", "FAILURE_CASES", "log_snr", "lambda_prime", "rf_lambda", "omega",
    "OBJECTIVES", "WEIGHTINGS", "objective_loss", "table_one", "elbo_timesteps",
    "COLLECT_TIMESTEPS", "elbo_loss", "alignment_scores", "calibrate", "AlignmentMaps",
    "attention_maps", "attention_alignment", "elbo_t2ialign", "readout_labels",
    "compositional_weights", "phrase_weights", "PhraseReweight", "elbo_reweighted_sample", "ELBOCalibratedSwap",
    "elbo_p2p",
]

# ---------------------------------------------------------------------------- eq 1: Bayes' rule
#: The paper's three failure cases of eq 1 (priors, likelihoods) as in the study notes' examples:
#: rare class, confused class, both. Each gives p(c_1 | x) < 1/2 although c_1 is the true class.
FAILURE_CASES = {
    "rare or small class": ((0.1, 0.9), (0.5, 0.2)),
    "confused or out-of-distribution class": ((0.5, 0.5), (0.3, 0.6)),
    "both": ((0.3, 0.7), (0.3, 0.5)),
}


def bayes_posterior(priors, likelihoods) -> np.ndarray:
    """p(c_i | x) = p(c_i) p(x | c_i) / Σ_j p(c_j) p(x | c_j) (the ELBO-T2IAlign paper, eq 1).

    ``priors`` and ``likelihoods``: sequences of equal length ≥ 1, non-negative, with a positive
    evidence Σ_j p(c_j) p(x | c_j). Raises ``ValueError`` naming the argument otherwise."""
    p = np.asarray(priors, dtype=np.float64)
    lik = np.asarray(likelihoods, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or not np.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"priors must be a non-empty 1-D sequence of non-negative numbers, "
                         f"got {priors!r}")
    if lik.shape != p.shape or not np.isfinite(lik).all() or (lik < 0).any():
        raise ValueError(f"likelihoods must be non-negative numbers, one per prior "
                         f"({p.size}), got {likelihoods!r}")
    joint = p * lik
    if joint.sum() <= 0:
        raise ValueError("priors and likelihoods give zero evidence sum_j p(c_j) p(x|c_j)")
    return joint / joint.sum()


# ---------------------------------------------------------------------------- λ(t) and Table I
def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """λ_i = 2 ln(α/σ) = ln(ᾱ_i / (1 − ᾱ_i)) of a variance-preserving schedule (the paper's
    §III, "Preliminary of Conditional Diffusion Models", below eq 2), float64."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if ac.ndim != 1 or ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
        raise ValueError("alphas_cumprod must be a 1-D tensor of at least 2 values in (0, 1)")
    return torch.log(ac) - torch.log1p(-ac)


def lambda_prime(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """dλ/dt on the grid t_i = (i + 1)/T of a discrete schedule (central differences inside,
    one-sided at the ends; torch.gradient), float64; negative for a schedule whose ᾱ falls."""
    lam = log_snr(alphas_cumprod)
    T = lam.numel()
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    return torch.gradient(lam, spacing=(t,))[0]


def rf_lambda(t):
    """λ(t) = 2 ln((1 − t)/t) and λ′(t) = −2/(t(1 − t)) of rectified flow (α = 1 − t, σ = t)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if bool(((t <= 0) | (t >= 1)).any()):
        raise ValueError("t must lie in (0, 1)")
    return 2 * (torch.log1p(-t) - torch.log(t)), -2 / (t * (1 - t))


#: Table I's objectives (name: what the network estimates).
OBJECTIVES = {"score": "∇ ln q(z_t|x)", "flow": "u = ε − x", "x": "x", "eps": "ε",
              "v": "α ε − σ x"}
#: ``weighting`` choices of :func:`elbo_loss`: the code's plain ε-MSE, eq 4's −λ′, or eq 6
#: with one of Table I's objectives.
WEIGHTINGS = ("unweighted", "lambda_prime") + tuple(OBJECTIVES)


def omega(objective: str, alpha, sigma, lam, dlam):
    """ω(t) of Table I (the ELBO-T2IAlign paper) for ``objective`` in :data:`OBJECTIVES`, from
    α_t, σ_t, λ(t) and λ′(t) (numbers, tensors or sympy expressions):

    score −1/(σ² λ′); flow −σ² λ′/4; x −1/(λ′ e^λ); eps −1/λ′; v −(α² + σ²)²/(α² λ′)."""
    check_choice(objective, "objective", tuple(OBJECTIVES))
    if objective == "score":
        return -1 / (sigma ** 2 * dlam)
    if objective == "flow":
        return -(sigma ** 2 * dlam) / 4
    if objective == "x":
        if isinstance(lam, torch.Tensor):
            e = lam.exp()
        elif isinstance(lam, (int, float, np.floating)):
            e = math.exp(lam)
        else:                                                   # a sympy expression
            import sympy as sp
            e = sp.exp(lam)
        return -1 / (dlam * e)
    if objective == "eps":
        return -1 / dlam
    return -(alpha ** 2 + sigma ** 2) ** 2 / (alpha ** 2 * dlam)


def objective_loss(objective: str, eps_hat, eps, z, alpha, sigma):
    """‖f̂ − f‖² (mean over all but the first axis) of ``objective``'s target f, with f̂ from an
    ε-prediction ε̂ at z = α x + σ ε: x̂ = (z − σ ε̂)/α; score −ε/σ; flow u = ε − x (rectified
    flow's target); v = α ε − σ x. ``alpha``/``sigma``: numbers or (B,) tensors."""
    check_choice(objective, "objective", tuple(OBJECTIVES))
    a = torch.as_tensor(alpha, dtype=eps.dtype, device=eps.device).reshape(-1, *[1] * (eps.ndim - 1))
    s = torch.as_tensor(sigma, dtype=eps.dtype, device=eps.device).reshape(-1, *[1] * (eps.ndim - 1))
    x = (z - s * eps) / a
    x_hat = (z - s * eps_hat) / a
    if objective == "eps":
        d = eps_hat - eps
    elif objective == "x":
        d = x_hat - x
    elif objective == "score":
        d = -eps_hat / s + eps / s
    elif objective == "flow":
        d = (eps_hat - x_hat) - (eps - x)
    else:
        d = (a * eps_hat - s * x_hat) - (a * eps - s * x)
    return d.pow(2).flatten(1).mean(1)


def table_one(schedule: str = "rf"):
    """Table I checked with sympy: for each objective, L_obj / ω(t) divided by −λ′(t) ‖ε̂ − ε‖²
    (eq 6 against eq 4), simplified, for ``schedule`` "rf" (α = 1 − t, σ = t), "vp_cosine"
    (α = cos(πt/2), σ = sin(πt/2)) or "generic" (α(t), σ(t) undetermined functions).
    Returns ``{objective: (ω(t) expression, ratio)}``; a ratio of 1 is an exact row."""
    import sympy as sp

    check_choice(schedule, "schedule", ("rf", "vp_cosine", "generic"))
    t = sp.symbols("t", positive=True)
    if schedule == "rf":
        a, s = 1 - t, t
    elif schedule == "vp_cosine":
        a, s = sp.cos(sp.pi * t / 2), sp.sin(sp.pi * t / 2)
    else:
        a, s = sp.Function("alpha", positive=True)(t), sp.Function("sigma", positive=True)(t)
    lam = 2 * sp.log(a / s)
    dlam = sp.diff(lam, t)
    # scalar errors: δ = ε̂ − ε; every objective's error is a multiple k·δ (x̂ − x = −σ/α δ)
    k = {"eps": 1, "x": -s / a, "score": -1 / s, "flow": 1 + s / a, "v": a + s ** 2 / a}
    out = {}
    for obj in OBJECTIVES:
        w = omega(obj, a, s, lam, dlam)
        ratio = sp.simplify((k[obj] ** 2 / w) / (-dlam))
        out[obj] = (sp.simplify(w), ratio)
    return out


# ---------------------------------------------------------------------------- time steps
#: the official code's attention-collection steps (``collect_timesteps=[[20,201,20]]``): 10
#: steps in t ∈ [0, 0.2].
COLLECT_TIMESTEPS = tuple(range(20, 201, 20))
_RANGES = {"small": (0.0, 0.2), "middle": (0.4, 0.6), "large": (0.7, 0.9)}


def elbo_timesteps(n: int = 20, strategy: str = "even", T: int = 1000,
                   generator: torch.Generator | None = None) -> list[int]:
    """``n`` ELBO time-step indices (increasing) by Table VII's strategies: ``"even"`` over
    [0, 1] (the code's ``range(1, T, T // n)``: 1, 51, …, 951 for n = 20), ``"small"`` /
    ``"middle"`` / ``"large"`` evenly in [0, 0.2] / [0.4, 0.6] / [0.7, 0.9], ``"random"``
    uniform on {1, …, T−1} (seeded ``generator``)."""
    n = check_int(n, "n", min=1)
    T = check_int(T, "T", min=2)
    check_choice(strategy, "strategy", ("even", "random") + tuple(_RANGES))
    if n > T - 1:
        raise ValueError(f"n must be at most T - 1 = {T - 1}, got {n}")
    if strategy == "even":
        return list(range(1, T, max(T // n, 1)))[:n]
    if strategy == "random":
        g = generator or torch.Generator().manual_seed(0)
        return sorted(int(v) for v in torch.randperm(T - 1, generator=g)[:n] + 1)
    lo, hi = _RANGES[strategy]
    ts = np.linspace(max(lo * T, 1), hi * T, n).round().astype(int)
    return sorted(int(v) for v in np.clip(ts, 1, T - 1))


def _check_timesteps(timesteps, T: int, name: str = "timesteps") -> list[int]:
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.tolist()
    if isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool):
        timesteps = [timesteps]
    try:
        ts = list(timesteps)
    except TypeError:
        raise ValueError(f"{name} must be a non-empty list of ints in [0, {T - 1}], got "
                         f"{timesteps!r}") from None
    if not ts or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                     or not 0 <= int(v) < T for v in ts):
        raise ValueError(f"{name} must be a non-empty list of ints in [0, {T - 1}], got {ts!r}")
    return [int(v) for v in ts]


# ---------------------------------------------------------------------------- eq 4 / eq 6
def _latents(pipe, image_or_latents) -> torch.Tensor:
    """Latents (1, C, h, w) on the UNet's device/dtype: a tensor of the UNet's latent shape is
    taken as latents, anything else is encoded with
    :func:`diffnotes.editing.inversion.encode_image` (the VAE mean × its scaling factor)."""
    from ..editing.inversion import encode_image

    u = pipe.unet
    s = u.config.sample_size
    if isinstance(image_or_latents, torch.Tensor) and image_or_latents.ndim in (3, 4) \
            and image_or_latents.shape[-3] == u.config.in_channels \
            and tuple(image_or_latents.shape[-2:]) == ((s, s) if isinstance(s, int) else tuple(s)):
        z = image_or_latents if image_or_latents.ndim == 4 else image_or_latents[None]
        return z.to(u.device, u.dtype)
    return encode_image(pipe, image_or_latents)


def _to_eps(pipe, out: torch.Tensor, z: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
    """The model's output as an ε-prediction (v-prediction: ε = σ z + α v; sample: (z − α x̂)/σ)."""
    kind = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        return s * z + a * out
    if kind == "sample":
        return (z - a * out) / s
    raise ValueError(f"unsupported prediction_type {kind!r}")


def _noise(noise, generator, n_t: int, z0: torch.Tensor) -> torch.Tensor:
    shape = (n_t, *z0.shape[1:])
    if noise is None:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        return torch.randn(shape, generator=g, dtype=torch.float32).to(z0.device, z0.dtype)
    check_tensor(noise, "noise")
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape} (one ε per time step, shared by every "
                         f"prompt), got {tuple(noise.shape)}")
    return noise.to(z0.device, z0.dtype)


def elbo_loss(pipe, image_or_latents, prompts: Sequence[str], timesteps=None,
              weighting: str = "unweighted", noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None, reduction: str = "mean",
              batch_size: int = 64) -> torch.Tensor:
    """ELB_λ(x, c) of each prompt (the ELBO-T2IAlign paper, eq 4; eq 6 with Table I's ω(t)):
    a loss, smaller = the prompt explains the image better.

    For every t in ``timesteps`` one ε is drawn (or taken from ``noise``, shape (n_t, C, h, w))
    and shared by every prompt (as the official code does: the differences between classes are
    then not blurred by noise), z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε (:func:`diffnotes.ddpm.q_sample`,
    eq 2), and the UNet's ε̂ (v-predictions converted) gives, per t:

    * ``"unweighted"``: mean((ε̂ − ε)²), the official code's loss (no −λ′ weight);
    * ``"lambda_prime"``: ½ (−λ′(t)) mean((ε̂ − ε)²), eq 4 (:func:`lambda_prime`);
    * an objective of Table I (``"eps"``, ``"x"``, ``"v"``, ``"score"``, ``"flow"``):
      ½ L_obj / ω(t), eq 6 (:func:`objective_loss`, :func:`omega`) — equal to
      ``"lambda_prime"`` for every row except ``"flow"``, which is exact only for rectified
      flow.

    ``reduction="mean"`` averages over t (a uniform t on the grid); ``"none"`` returns
    (n_prompts, n_t). ``image_or_latents``: an image (encoded with the VAE) or latents
    (1, C, h, w). Default ``timesteps``: :func:`elbo_timesteps` (20, even). Returns float64.

    Raises ``ValueError`` naming ``prompts`` (empty), ``timesteps`` (outside [0, T−1]),
    ``weighting``, ``reduction`` or ``noise`` (wrong shape).
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts \
            or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    check_choice(weighting, "weighting", WEIGHTINGS)
    check_choice(reduction, "reduction", ("mean", "none"))
    batch_size = check_int(batch_size, "batch_size", min=1)
    ac = pipe_alphas_cumprod(pipe)
    T = ac.numel()
    ts = _check_timesteps(elbo_timesteps(20, T=T) if timesteps is None else timesteps, T)
    z0 = _latents(pipe, image_or_latents)
    eps = _noise(noise, generator, len(ts), z0)
    unique = list(dict.fromkeys(prompts))
    emb = encode_prompts(pipe, unique)
    N, n_t = len(unique), len(ts)
    zt = torch.cat([q_sample(z0, t, ac.to(z0.device), eps[j:j + 1]) for j, t in enumerate(ts)])
    # every (prompt, t) pair, prompt-major
    pi = torch.arange(N).repeat_interleave(n_t)
    ti = torch.arange(n_t).repeat(N)
    acz = ac.to(z0.device)
    a_all = acz[ts].sqrt()
    s_all = (1 - acz[ts]).sqrt()
    err = torch.empty(N * n_t, dtype=torch.float64)
    tt = torch.tensor(ts, dtype=torch.long, device=z0.device)
    for b in range(0, N * n_t, batch_size):
        sl = slice(b, min(b + batch_size, N * n_t))
        x = zt[ti[sl]]
        a, s = a_all[ti[sl]].to(x.dtype), s_all[ti[sl]].to(x.dtype)
        with torch.no_grad():
            out = pipe.unet(x, tt[ti[sl]], encoder_hidden_states=emb[pi[sl]]).sample
        shp = (-1, *[1] * (x.ndim - 1))
        e_hat = _to_eps(pipe, out, x, a.reshape(shp), s.reshape(shp)).double()
        e = eps[ti[sl]].double()
        if weighting in ("unweighted", "lambda_prime"):
            err[sl] = (e_hat - e).pow(2).flatten(1).mean(1).cpu()
        else:
            err[sl] = objective_loss(weighting, e_hat, e, x.double(), a.double(),
                                     s.double()).cpu()
    err = err.reshape(N, n_t)
    if weighting == "lambda_prime":
        err = 0.5 * (-lambda_prime(ac))[ts] * err
    elif weighting != "unweighted":
        lam = log_snr(ac)[ts]
        dlam = lambda_prime(ac)[ts]
        a64, s64 = ac[ts].sqrt(), (1 - ac[ts]).sqrt()
        err = 0.5 * err / omega(weighting, a64, s64, lam, dlam)
    err = err[[unique.index(p) for p in prompts]]
    return err.mean(1) if reduction == "mean" else err


# ---------------------------------------------------------------------------- eq 5 and eq 7
def _check_gamma(gamma) -> float:
    return check_range(gamma, "gamma", 0, 1, lo_open=True)


def alignment_scores(elbos, gamma: float = 1 / 3) -> torch.Tensor:
    """S = γ^{minmax(ELB)} (the ELBO-T2IAlign paper, eq 5), float64, one per class: the class
    with the smallest loss gets S = 1, the largest S = γ. Equal losses give S ≡ 1 (the min–max
    of a constant vector is taken as 0; the official code adds 1e-10 to the denominator
    instead). γ ∈ (0, 1]; γ = 1 gives S ≡ 1 (no calibration). Invariant under a·ELB + b, a > 0.

    Raises ``ValueError`` naming ``gamma`` or ``elbos`` (empty, not 1-D, not finite)."""
    g = _check_gamma(gamma)
    e = torch.as_tensor(elbos, dtype=torch.float64).detach().cpu()
    if e.ndim != 1 or e.numel() == 0 or not bool(torch.isfinite(e).all()):
        raise ValueError(f"elbos must be a non-empty 1-D sequence of finite numbers, got "
                         f"{elbos!r}")
    lo, hi = e.min(), e.max()
    norm = torch.zeros_like(e) if float(hi - lo) == 0 else (e - lo) / (hi - lo)
    return torch.tensor(g, dtype=torch.float64) ** norm


def calibrate(maps: torch.Tensor, scores) -> torch.Tensor:
    """A[c_i] ← A[c_i]^{1/S_i} (the ELBO-T2IAlign paper, eq 7; Algorithm 1, step 7): ``maps``
    (N, ...) in [0, 1] (min–max normalised), ``scores`` (N,) in (0, 1]. A monotone map of each
    class's values that fixes 0 and 1; S = 1 leaves a map unchanged."""
    check_tensor(maps, "maps")
    S = torch.as_tensor(scores, dtype=torch.float64)
    if S.ndim != 1 or S.numel() != maps.shape[0] or not bool(((S > 0) & (S <= 1)).all()):
        raise ValueError(f"scores must hold one value in (0, 1] per map ({maps.shape[0]}), got "
                         f"{scores!r}")
    if bool((maps < 0).any()) or bool((maps > 1 + 1e-12).any()):
        raise ValueError("maps must lie in [0, 1] (min-max normalise them first)")
    e = (1 / S).to(maps.device, maps.dtype).reshape(-1, *[1] * (maps.ndim - 1))
    return maps.clamp(0, 1) ** e


def _minmax(m: torch.Tensor) -> torch.Tensor:
    """Min–max per leading index (N, ...) → [0, 1]; a constant map becomes 0."""
    flat = m.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    rng = hi - lo
    out = torch.where(rng > 0, (flat - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                      torch.zeros_like(flat))
    return out.reshape(m.shape)


# ---------------------------------------------------------------------------- attention (eq 3)
@dataclass
class AlignmentMaps:
    """What one image's attention gives, before any calibration.

    ``cross`` (N, h, w): each class's cross-attention, averaged over the class's tokens, the
    layers (resized bilinearly to the largest) and the collection steps, min–max normalised
    (Algorithm 1, steps 5–6). ``self_all`` / ``self_up`` (h_s w_s, h_s w_s): self-attention of
    the largest-resolution layers, all of them / the decoder's (None without refinement).
    ``image_hw``: the image size the heatmaps are upsampled to."""

    classes: list[str]
    cross: torch.Tensor
    self_all: torch.Tensor | None
    self_up: torch.Tensor | None
    self_hw: tuple[int, int] | None
    image_hw: tuple[int, int]
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)

    def heatmaps(self, scores=None, self_attention: bool = True) -> torch.Tensor:
        """Per-class heatmaps (N, H, W) in [0, 1]: calibrate with ``scores`` (eq 7, skipped
        if None), refine with self-attention (Algorithm 1, step 9: A ← W_up (W_all A), the
        official code's product of two aggregated self-attention matrices), upsample
        bilinearly to the image (step 8) and min–max normalise each class."""
        A = self.cross.double()
        if scores is not None:
            A = calibrate(A, scores)
        if self_attention:
            if self.self_all is None:
                raise ValueError("self_attention: these maps were collected without "
                                 "self-attention (self_attention=False)")
            hs, ws = self.self_hw
            if tuple(A.shape[-2:]) != (hs, ws):
                A = upsample(A, (hs, ws))
            flat = A.flatten(1).T                                     # (hw, N)
            flat = self.self_up.double() @ (self.self_all.double() @ flat)
            A = flat.T.reshape(-1, hs, ws)
        H = upsample(A, self.image_hw)
        return _minmax(H)


def _class_tokens(caption: str, classes, tokenizer, name: str = "classes") -> list[list[int]]:
    """Token positions of each class in the caption; ``ValueError`` naming ``name`` for an empty
    list or a class that is not a word (or phrase) of the caption."""
    if isinstance(classes, str) or not isinstance(classes, (list, tuple)) or not classes \
            or not all(isinstance(c, str) and c.strip() for c in classes):
        raise ValueError(f"{name} must be a non-empty list of words of the caption, got "
                         f"{classes!r}")
    out = []
    for c in classes:
        try:
            out.append(word_token_indices(caption, c, tokenizer))
        except ValueError as e:
            raise ValueError(f"{name}: {c!r} is not a word of the caption {caption!r} ({e})") \
                from None
    return out


def attention_maps(pipe, image, caption: str, classes: Sequence[str],
                   collect_timesteps=COLLECT_TIMESTEPS, self_attention: bool = True,
                   generator: torch.Generator | None = None, latents=None) -> AlignmentMaps:
    """Collect an image's cross- (and self-) attention for ``caption`` (the ELBO-T2IAlign
    paper, eq 3 and Algorithm 1, steps 1–6): for each t in ``collect_timesteps`` the latent is
    noised (:func:`diffnotes.ddpm.q_sample`) and one conditional UNet pass runs with a
    :class:`diffnotes.attention.AttentionStore` attached (running sums over the steps).

    Layer rule (stated on :func:`diffnotes.attention.attention_layers`): every cross-attention
    layer, averaged with equal weights after bilinear resizing to the largest (the paper's
    text; the official code weights resolutions [1,1,10,15,10,1,1] or by a Gaussian over the
    layer index, see the errata); self-attention from the layers at the largest resolution
    (SD's 64×64, the shapes model's 16×16), as the code does.
    ``latents`` (1, C, h, w) may be given instead of encoding ``image`` again.
    Raises ``ValueError`` naming ``classes`` or ``collect_timesteps``."""
    import time

    t0 = time.perf_counter()
    idx = _class_tokens(caption, classes, pipe.tokenizer)
    ac = pipe_alphas_cumprod(pipe)
    ts = _check_timesteps(collect_timesteps, ac.numel(), "collect_timesteps")
    z0 = _latents(pipe, image if latents is None else latents)
    g = generator if generator is not None else torch.Generator().manual_seed(1)
    eps = _noise(None, g, len(ts), z0)
    cond = encode_prompts(pipe, caption)
    h, w = z0.shape[-2:]
    kinds = ("cross", "self") if self_attention else ("cross",)
    store = AttentionStore(kinds=kinds, rows="all", self_max_res=max(h, w))
    store.attach(pipe.unet)
    try:
        for j, t in enumerate(ts):
            zt = q_sample(z0, t, ac.to(z0.device), eps[j:j + 1])
            with torch.no_grad():
                pipe.unet(zt, batch_timesteps(t, zt), encoder_hidden_states=cond)
    finally:
        store.detach()
    m = store.maps("cross")[0].double().cpu()                        # (h, w, M)
    cross = torch.stack([m[..., i].mean(-1) for i in idx])            # (N, h, w)
    cross = _minmax(cross)
    s_all = s_up = hw = None
    if self_attention:
        top = max(i.res for i in store.layers("self"))
        layers = store.layers("self", res=top)
        mats = {i.name: store.layer_map(i.name)[0].reshape(i.height * i.width, -1).double().cpu()
                for i in layers}
        s_all = sum(mats.values()) / len(mats)
        ups = [mats[i.name] for i in layers if i.place == "up"] or list(mats.values())
        s_up = sum(ups) / len(ups)
        hw = (layers[0].height, layers[0].width)
    from ..editing.inversion import _image_side
    f, H, W = _image_side(pipe)
    return AlignmentMaps(list(classes), cross, s_all, s_up, hw, (h * f, w * f),
                         seconds=time.perf_counter() - t0)


def attention_alignment(pipe, image, caption: str, classes: Sequence[str],
                        collect_timesteps=COLLECT_TIMESTEPS, self_attention: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-class heatmaps (N, H, W) in [0, 1] of attention alone (the paper's baseline: Algorithm
    1 without steps 3 and 7): :func:`attention_maps` then :meth:`AlignmentMaps.heatmaps`."""
    return attention_maps(pipe, image, caption, classes, collect_timesteps, self_attention,
                          generator).heatmaps(None, self_attention)


def readout_labels(heatmaps: torch.Tensor, readout: str = "softmax", threshold: float = 0.5):
    """Algorithm 1's last step, two ways. ``"softmax"``: p(c_i | x_k) = softmax_i H[c_i](k)
    (step 11; every pixel belongs to some class). ``"argmax_threshold"`` (the official code):
    label = 1 + argmax_i H[c_i](k), or 0 (background) where max_i H[c_i](k) < ``threshold``.
    Returns probabilities (N, H, W) or a long label map (H, W)."""
    check_choice(readout, "readout", ("softmax", "argmax_threshold"))
    thr = check_range(threshold, "threshold", 0, 1)
    if readout == "softmax":
        return torch.softmax(heatmaps, dim=0)
    v, i = heatmaps.max(0)
    return torch.where(v < thr, torch.zeros_like(i), i + 1)


def elbo_t2ialign(pipe, image, caption: str, classes: Sequence[str], gamma: float = 1 / 3,
                  readout: str = "softmax", threshold: float = 0.5, *,
                  timesteps=None, collect_timesteps=COLLECT_TIMESTEPS,
                  weighting: str = "unweighted", template: str = "a {}",
                  self_attention: bool = True, generator: torch.Generator | None = None,
                  elbo_batch_size: int = 64, return_details: bool = False):
    """ELBO-T2IAlign, Algorithm 1 of the ELBO-T2IAlign paper, on one image.

    1. z_0 from the VAE; 2. ELB_λ of each class prompt ``template.format(class)`` (:func:`elbo_loss`,
    eq 4; the code's prompt is "a photo of {class}", the shapes model's vocabulary has "a {}");
    3. S = γ^{minmax(ELB)} (eq 5); 4. cross-attention of ``caption`` per class, min–max
    normalised (eqs 3, 5–6), calibrated A^{1/S_i} (eq 7), refined with self-attention and
    upsampled (eqs 8–9); 5. the readout: ``"softmax"`` (the paper's step 11: class
    probabilities (N, H, W)) or ``"argmax_threshold"`` (the official code: a label map (H, W),
    0 = background where the largest heatmap is below ``threshold``, k = classes[k − 1]).

    ``timesteps``: ELBO time steps (default :func:`elbo_timesteps` (20)); ``weighting``
    as in :func:`elbo_loss`. ``generator``: the ELBO noise, then the collection noise (default:
    seeds 0 and 1, as :func:`elbo_loss` and :func:`attention_maps` use alone, so γ = 1 gives
    exactly :func:`attention_alignment`). ``elbo_batch_size``: UNet batch of the ELBO passes
    (lower it on a small GPU). With ``return_details`` returns a dict with ``output``,
    ``heatmaps``, ``scores`` (S), ``elbos`` and ``maps`` (:class:`AlignmentMaps`).

    Raises ``ValueError`` naming ``classes`` (empty, or a class not in the caption), ``gamma``
    (outside (0, 1]), ``readout``, ``threshold`` or ``timesteps`` (outside [0, T−1]).
    """
    _class_tokens(caption, classes, pipe.tokenizer)               # validates classes
    g_ = _check_gamma(gamma)
    check_choice(readout, "readout", ("softmax", "argmax_threshold"))
    check_range(threshold, "threshold", 0, 1)
    if not isinstance(template, str) or "{}" not in template:
        raise ValueError(f"template must be a str with one '{{}}', got {template!r}")
    z0 = _latents(pipe, image)
    elbos = elbo_loss(pipe, z0, [template.format(c) for c in classes], timesteps,
                      weighting, generator=generator, batch_size=elbo_batch_size)
    S = alignment_scores(elbos, g_)
    maps = attention_maps(pipe, None, caption, classes, collect_timesteps, self_attention,
                          generator, latents=z0)
    H = maps.heatmaps(S, self_attention)
    out = readout_labels(H, readout, threshold)
    if return_details:
        return dict(output=out, heatmaps=H, scores=S, elbos=elbos, maps=maps)
    return out


# ---------------------------------------------------------------------------- generation (§IV-B)
def compositional_weights(pipe, latents: torch.Tensor, t: int, prompt: str,
                          phrases: Sequence[str], base: float = 1.2, decimals: int | None = 2
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ELBO-based weights of the paper's compositional generation (§IV-B; the official
    code): d_i = mean((ε_θ(z_t, t, prompt) − ε_θ(z_t, t, phrase_i))²), a per-step ELBO gap
    of each noun phrase against the full prompt, and w_i = base^{minmax(d)} rounded to
    ``decimals`` (the code's round(1.2 ** norm, 2)): the phrase the full prompt explains worst
    gets the largest weight ``base``. Returns ``(weights, d)``, float64, (P,) each.
    Raises ``ValueError`` naming ``phrases`` (empty, or a phrase not in the prompt), ``base``
    (< 1) or ``t``."""
    if isinstance(phrases, str) or not isinstance(phrases, (list, tuple)) or not phrases:
        raise ValueError(f"phrases must be a non-empty list of phrases of the prompt, got "
                         f"{phrases!r}")
    _class_tokens(prompt, list(phrases), pipe.tokenizer, "phrases")
    b = check_range(base, "base", 1)
    T = pipe_alphas_cumprod(pipe).numel()
    t = _check_timesteps([t], T, "t")[0]
    check_tensor(latents, "latents", ndim=4)
    emb = encode_prompts(pipe, [prompt, *phrases])
    x = latents.expand(len(phrases) + 1, -1, -1, -1)
    with torch.no_grad():
        out = pipe.unet(x, batch_timesteps(t, x), encoder_hidden_states=emb).sample.double()
    d = (out[1:] - out[:1]).pow(2).flatten(1).mean(1).cpu()
    return phrase_weights(d, b, decimals), d


def phrase_weights(gaps, base: float = 1.2, decimals: int | None = 2) -> torch.Tensor:
    """w_i = base^{minmax(gaps)}, rounded to ``decimals`` (the official code's
    ``round(1.2 ** norm, 2)``): gaps [0, .5, 1] give [1.0, 1.1, 1.2]. Equal gaps give 1."""
    b = check_range(base, "base", 1)
    d = torch.as_tensor(gaps, dtype=torch.float64)
    if d.ndim != 1 or d.numel() == 0:
        raise ValueError(f"gaps must be a non-empty 1-D sequence, got {gaps!r}")
    lo, hi = d.min(), d.max()
    norm = torch.zeros_like(d) if float(hi - lo) == 0 else (d - lo) / (hi - lo)
    w = torch.tensor(b, dtype=torch.float64) ** norm
    if decimals is not None:
        w = torch.round(w, decimals=check_int(decimals, "decimals", min=0))
    return w


class PhraseReweight(AttentionController):
    """Cross-attention re-weighting of chosen tokens in the conditional rows: probabilities of
    token m are multiplied by ``weights[m]`` (P2P's attention re-weighting, Ahmad's notes, eq
    3.4, applied to the prompt's own maps). ``active = False`` turns it off (the weights'
    own estimation pass). Weights ≡ 1 leave every probability bitwise unchanged."""

    kinds = ("cross",)

    def __init__(self, n_tokens: int, layout: BatchLayout):
        self.weights = torch.ones(n_tokens, dtype=torch.float64)
        self.layout = layout
        self.active = True

    def edit(self, probs, info):
        if not self.active or probs.shape[0] != self.layout.batch:
            return probs
        rows = self.layout.cond_rows()
        w = self.weights.to(probs.device, probs.dtype)
        probs[rows] = probs[rows] * w
        return probs


def elbo_reweighted_sample(pipe, prompt: str, phrases: Sequence[str], *,
                           num_inference_steps: int = 20, guidance_scale: float = 7.5,
                           base: float = 1.2, generator: torch.Generator | None = None,
                           latents: torch.Tensor | None = None, return_weights: bool = False):
    """DDIM sampling (η = 0, DDIM eq 12) of ``prompt`` with the paper's ELBO-based re-weighting
    of its noun ``phrases`` at every step (§IV-B): :func:`compositional_weights` from the
    current z_t, then the guided ε (Ahmad's notes, eq 1.44) with the phrases' cross-attention
    multiplied by their weights (:class:`PhraseReweight`; the paper re-weights the prompt
    embedding with Compel instead — see the errata). ``base = 1`` is plain sampling.
    Returns images (B=1, H, W, 3) float in [0, 1] (and the (steps, P) weights)."""
    from ..editing.inversion import decode_latents

    N = check_int(num_inference_steps, "num_inference_steps", min=1)
    gs = check_range(guidance_scale, "guidance_scale")
    b = check_range(base, "base", 1)
    idx = _class_tokens(prompt, list(phrases), pipe.tokenizer, "phrases") if phrases else []
    if not phrases:
        raise ValueError(f"phrases must be a non-empty list of phrases of the prompt, got "
                         f"{phrases!r}")
    unet = pipe.unet
    s = unet.config.sample_size
    if latents is None:
        x = torch.randn((1, unet.config.in_channels, s, s), generator=generator,
                        dtype=torch.float32).to(unet.device, unet.dtype)
        x = x * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
    else:
        check_tensor(latents, "latents", ndim=4)
        x = latents.to(unet.device, unet.dtype)
    cond = encode_prompts(pipe, prompt)
    null = encode_prompts(pipe, "")
    ts = pipe_timesteps(pipe, N)
    acl = pipe_alphas_cumprod(pipe).tolist()
    layout = BatchLayout(1, cfg=gs != 1.0)
    ctrl = PhraseReweight(cond.shape[1], layout)
    store = AttentionStore(kinds=("cross",), rows="all", controller=ctrl, layout=layout)
    history = []
    eps_model = pipe_eps_model(pipe, cond, null if gs != 1.0 else None, gs)
    store.attach(unet)
    try:
        for i, t in enumerate(ts):
            if b > 1:                      # the weights' own pass runs without the controller
                store.detach()
                w, _ = compositional_weights(pipe, x, t, prompt, list(phrases), b)
                store.attach(unet)
                wt = torch.ones(cond.shape[1], dtype=torch.float64)
                for k, toks in enumerate(idx):
                    wt[toks] = w[k]
                ctrl.weights = wt
                history.append(w)
            with torch.no_grad():
                eps = eps_model(x, batch_timesteps(t, x))
            x = ddim_step(x, eps, acl[t], acl[ts[i + 1]] if i + 1 < len(ts) else 1.0)
    finally:
        store.detach()
    img = decode_latents(pipe, x).permute(0, 2, 3, 1).double().cpu().numpy()
    if return_weights:
        return img, (torch.stack(history) if history else torch.ones(0, len(phrases)))
    return img


# ---------------------------------------------------------------------------- editing (§IV-B)
def _p2p_edit_base():
    from ..editing.p2p import WordSwap
    return WordSwap


class ELBOCalibratedSwap(_p2p_edit_base()):
    """Prompt-to-Prompt word swap with ELBO-calibrated source maps (the paper's editing
    experiment, §IV-B): while the schedule injects the source's cross-attention, the columns of
    the source ``words`` are M_{:,j} · Â_j^{1/S_j − 1}, Â_j the min–max normalised column: the
    calibrated heatmap Â^{1/S} (eq 7) scaled by the source cross-attention, Â^{1/S}·M/Â. With
    S ≡ 1 this is :class:`diffnotes.editing.p2p.WordSwap` exactly."""

    def __init__(self, words: Sequence[str], scores, word_steps: dict | None = None):
        super().__init__(word_steps)
        if isinstance(words, str) or not words:
            raise ValueError(f"words must be a non-empty list of source words, got {words!r}")
        S = torch.as_tensor(scores, dtype=torch.float64)
        if S.shape != (len(words),) or not bool(((S > 0) & (S <= 1)).all()):
            raise ValueError(f"scores must hold one value in (0, 1] per word, got {scores!r}")
        self.words, self.scores = list(words), S

    def prepare(self, prompts, tokenizer):
        super().prepare(prompts, tokenizer)
        self.cols = _class_tokens(prompts[0], self.words, tokenizer, "words")

    def cross(self, src, rep):
        out = src.clone()
        for toks, s in zip(self.cols, self.scores.tolist()):
            if s == 1.0:
                continue
            col = src[..., toks]                                    # (heads, q, k)
            lo = col.amin(dim=-2, keepdim=True)
            hi = col.amax(dim=-2, keepdim=True)
            a = ((col - lo) / (hi - lo).clamp_min(1e-30)).clamp(0, 1)
            out[..., toks] = col * a ** (1 / s - 1)
        return out.unsqueeze(0).expand_as(rep)


def elbo_p2p(pipe, prompts: Sequence[str], words: Sequence[str], gamma: float = 1 / 3, *,
             num_inference_steps: int = 20, guidance_scale: float = 7.5,
             cross_replace_steps=0.8, self_replace_steps: float = 0.4,
             generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             template: str = "a {}", elbo_steps: int = 10):
    """The paper's editing experiment with Prompt-to-Prompt (:func:`diffnotes.editing.p2p.
    prompt_to_prompt`): generate the source (prompt 0), score its ``words`` with the ELBO on the
    generated latent (:func:`elbo_loss`, :func:`alignment_scores`), then edit with
    :class:`ELBOCalibratedSwap`. Returns ``(images, store, scores)``; γ = 1 is a plain word
    swap. Raises ``ValueError`` naming ``words`` or ``gamma``."""
    from ..editing.p2p import prompt_to_prompt

    g_ = _check_gamma(gamma)
    _class_tokens(prompts[0], list(words), pipe.tokenizer, "words")
    unet = pipe.unet
    s = unet.config.sample_size
    if latents is None:
        latents = torch.randn((1, unet.config.in_channels, s, s), generator=generator,
                              dtype=torch.float32).to(unet.device, unet.dtype)
    kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
              cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps,
              latents=latents)
    z, _ = prompt_to_prompt(pipe, [prompts[0], prompts[0]], _p2p_edit_base()(),
                            output_type="latent", **kw)
    T = pipe_alphas_cumprod(pipe).numel()
    elb = elbo_loss(pipe, z[:1], [template.format(w) for w in words],
                    elbo_timesteps(elbo_steps, T=T))
    S = alignment_scores(elb, g_)
    images, store = prompt_to_prompt(pipe, list(prompts), ELBOCalibratedSwap(words, S), **kw)
    return images, store, S
