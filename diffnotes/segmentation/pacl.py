"""Patch Aligned Contrastive Learning (PACL; Mukhoti et al., CVPR 2023), Ahmad's notes, §5.4.

CLIP aligns one image vector with one text vector. PACL keeps the vision encoder's patch
embeddings and lets each text choose which patches speak for the image: a softmax over the
patch-text cosines (eq 5.15) weights the patches, their weighted sum (eq 5.16) is compared with
the text (eq 5.17), and an InfoNCE loss over the texts of a batch (eq 5.18) trains the two
projections. At test time every patch takes the class whose text embedding it is closest to,
which is zero-shot segmentation.

Shapes: patch embeddings ``(B, T, D)`` (B images, T patches, D the shared embedding width, i.e.
already projected by e_v), text embeddings ``(K, D)`` (already projected by e_t).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffnotes.utils import check_finite, check_tensor

__all__ = ["patch_text_similarity", "patch_weights", "pacl_logits", "pacl_loss", "pacl_segment",
           "train_pacl"]

_EPS = 1e-12


def _check_pair(patch_emb, text_emb, text_name: str = "text_emb"):
    check_tensor(patch_emb, "patch_emb", 3)
    check_tensor(text_emb, text_name, 2)
    if patch_emb.shape[-1] != text_emb.shape[-1]:
        raise ValueError(f"patch_emb and {text_name} must share the embedding width D, got "
                         f"patch_emb of shape {tuple(patch_emb.shape)} (D={patch_emb.shape[-1]}) "
                         f"and {text_name} of shape {tuple(text_emb.shape)} "
                         f"(D={text_emb.shape[-1]})")
    if patch_emb.shape[1] == 0:
        raise ValueError(f"patch_emb must hold at least one patch, got shape "
                         f"{tuple(patch_emb.shape)}")


def _check_temperature(temperature):
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        temperature = temperature.detach()
    v = check_finite(temperature, "temperature")
    if v <= 0:
        raise ValueError(f"temperature must be > 0, got {v}")


def patch_text_similarity(patch_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine between every patch and every text, Ahmad's notes, eq 5.14.

    ``s[b, k, t] = <e_v(f_v(x_b))_t, e_t(f_t(y_k))> / (|.| |.|)``.

    Args:
        patch_emb: (B, T, D) projected patch embeddings.
        text_emb: (K, D) projected text embeddings.
    Returns:
        (B, K, T) cosines in [-1, 1].
    Raises:
        TypeError if an argument is not a tensor; ValueError on a wrong rank or mismatched D.
    """
    return _similarity(patch_emb, text_emb, "text_emb")


def _similarity(patch_emb, text_emb, text_name):
    _check_pair(patch_emb, text_emb, text_name)
    p = F.normalize(patch_emb, dim=-1, eps=_EPS)
    q = F.normalize(text_emb, dim=-1, eps=_EPS)
    return torch.einsum("btd,kd->bkt", p, q)  # eq 5.14


def patch_weights(patch_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Softmax over the patches of the patch-text cosines, Ahmad's notes, eq 5.15.

    ``a[b, k, t] = exp(s[b, k, t]) / sum_t' exp(s[b, k, t'])`` (no temperature, as in Ahmad's
    notes and the paper). Returns (B, K, T); each (b, k) row sums to 1. Raises like
    :func:`patch_text_similarity`.
    """
    s = patch_text_similarity(patch_emb, text_emb)
    return torch.softmax(s, dim=-1)  # eq 5.15


def pacl_logits(patch_emb: torch.Tensor, text_emb: torch.Tensor,
                temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Image-text compatibilities of PACL, Ahmad's notes, eqs 5.14-5.17, divided by a temperature.

    For image i and text j: the weights ``a_ij = softmax_t(cos(p_it, q_j))`` (eq 5.15) pool
    image i's patch embeddings into ``v_ij = sum_t a_ijt p_it`` (eq 5.16, the embeddings
    themselves, not their unit vectors), and ``logits[i, j] = cos(v_ij, q_j) / temperature``
    (eq 5.17). Each text pools the patches of every image with its own weights, so the pooled
    vector depends on the pair.

    Args:
        patch_emb: (B, T, D) projected patch embeddings of B images.
        text_emb: (B', D) projected text embeddings of B' texts.
        temperature: > 0 (a float or a one-element tensor; a tensor that requires grad is kept
            in the graph, so it can be learned as in CLIP).
    Returns:
        (B, B') logits.
    Raises:
        ValueError on a wrong rank, mismatched D, or a non-positive / non-finite temperature.
    """
    _check_temperature(temperature)
    a = patch_weights(patch_emb, text_emb)                       # (B, B', T), eq 5.15
    v = torch.einsum("bkt,btd->bkd", a, patch_emb)               # eq 5.16
    q = F.normalize(text_emb, dim=-1, eps=_EPS)
    phi = (F.normalize(v, dim=-1, eps=_EPS) * q.unsqueeze(0)).sum(-1)  # eq 5.17
    return phi / temperature


def pacl_loss(patch_emb: torch.Tensor, text_emb: torch.Tensor,
              temperature: float | torch.Tensor = 1.0, symmetric: bool = False) -> torch.Tensor:
    """InfoNCE over the texts of a batch, Ahmad's notes, eq 5.18 (image i's caption is text i).

    ``L = mean_i -log( exp(phi_ii / tau) / sum_j exp(phi_ij / tau) )`` with ``phi`` from
    :func:`pacl_logits`. ``symmetric=True`` adds the text-to-image direction (softmax over the
    images of each text) and averages the two, as CLIP and the PACL paper train.

    Args:
        patch_emb: (B, T, D); text_emb: (B, D), the matching captions in the same order.
        temperature: > 0.
    Returns:
        scalar loss.
    Raises:
        ValueError on a wrong rank, mismatched D, B != B' or a bad temperature.
    """
    _check_pair(patch_emb, text_emb)
    if patch_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"text_emb must hold one caption per image: patch_emb has "
                         f"B={patch_emb.shape[0]} images but text_emb has shape "
                         f"{tuple(text_emb.shape)}")
    logits = pacl_logits(patch_emb, text_emb, temperature)
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, target)  # eq 5.18, softmax over texts j
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def pacl_segment(patch_emb: torch.Tensor, class_emb: torch.Tensor,
                 return_scores: bool = False):
    """Zero-shot patch labels: each patch takes the class text it is most similar to (§5.4).

    The inference step of Ahmad's notes takes a softmax over the classes of the cosines of eq 5.14 and the
    argmax; the softmax is monotone, so the label is the argmax of the cosine.

    Args:
        patch_emb: (B, T, D); class_emb: (K, D), one text embedding per class.
        return_scores: also return the (B, K, T) class probabilities (softmax over K).
    Returns:
        (B, T) long labels in [0, K) (and the probabilities if asked).
    Raises:
        ValueError on a wrong rank or mismatched D.
    """
    s = _similarity(patch_emb, class_emb, "class_emb")  # (B, K, T), eq 5.14
    labels = s.argmax(dim=1)
    if return_scores:
        return labels, torch.softmax(s, dim=1)
    return labels


# ----------------------------------------------------------------------------- a small trainer
def train_pacl(patch_feats: torch.Tensor, text_feats: torch.Tensor, generator: torch.Generator,
               dim: int = 64, steps: int = 300, batch_size: int = 32, lr: float = 3e-3,
               temperature: float = 0.1, symmetric: bool = True, progress: bool = True):
    """Learn the projections e_v (patches) and e_t (texts) of PACL on frozen encoders.

    Args:
        patch_feats: (N, T, Cv) frozen patch features f_v(x) of N images.
        text_feats: (N, Ct) frozen caption features f_t(y), row n the caption of image n.
        generator: draws the initial weights and the mini-batches.
        dim: width D of the shared embedding space.
    Returns:
        ``(e_v, e_t, losses)``: two ``torch.nn.Module`` (e_v a two-layer MLP with a linear skip,
        e_t linear) and the list of training losses (eq 5.18, symmetric by default).
    """
    from tqdm.auto import tqdm

    check_tensor(patch_feats, "patch_feats", 3)
    check_tensor(text_feats, "text_feats", 2)
    if patch_feats.shape[0] != text_feats.shape[0]:
        raise ValueError(f"text_feats must have one row per image: patch_feats has "
                         f"N={patch_feats.shape[0]}, text_feats shape {tuple(text_feats.shape)}")
    _check_temperature(temperature)
    cv, ct = patch_feats.shape[-1], text_feats.shape[-1]
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        e_v = _Residual(cv, dim)
        e_t = torch.nn.Linear(ct, dim)
    opt = torch.optim.Adam(list(e_v.parameters()) + list(e_t.parameters()), lr=lr)
    n = patch_feats.shape[0]
    losses = []
    for _ in tqdm(range(steps), desc="PACL", disable=not progress):
        idx = torch.randperm(n, generator=generator)[:batch_size]
        loss = pacl_loss(e_v(patch_feats[idx]), e_t(text_feats[idx]), temperature, symmetric)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return e_v, e_t, losses


class _Residual(torch.nn.Module):
    """Linear map plus a small MLP branch, applied to the last dimension."""

    def __init__(self, c_in: int, dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(c_in, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(c_in, dim), torch.nn.ReLU(),
                                       torch.nn.Linear(dim, dim))

    def forward(self, x):
        return self.linear(x) + self.mlp(x)
