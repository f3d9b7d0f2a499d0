"""The losses of ``python -m diffnotes.models.train shapes``, checked by brute force (float64)."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from diffnotes.models.train import _probs3, attention_mask_loss, eps_loss


def _pair(B=3, C=4, H=6, W=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
            torch.randn(B, C, H, W, generator=g, dtype=torch.float64))


def test_unweighted_eps_loss_is_the_per_sample_mse():
    eps, noise = _pair()
    ab = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    want = F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))
    torch.testing.assert_close(eps_loss(eps, noise, ab), want)


def test_object_weight_matches_a_pixel_by_pixel_loop():
    eps, noise = _pair(B=2)
    cover = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    cover[0, 0, 2, 3] = 1                      # one object pixel: its 3×3 neighbourhood counts
    cover[1, 0, 0, 0] = 1                      # at the corner: a 2×2 neighbourhood
    lam = 3.0
    got = eps_loss(eps, noise, torch.tensor([0.5, 0.5], dtype=torch.float64), cover, lam)
    for b in range(2):
        num = den = 0.0
        for i in range(6):
            for j in range(6):
                near = any(cover[b, 0, y, x] > 0 for y in range(max(0, i - 1), min(6, i + 2))
                           for x in range(max(0, j - 1), min(6, j + 2)))
                w = 1 + lam * near
                num += w * ((eps[b, :, i, j] - noise[b, :, i, j]) ** 2).sum().item()
                den += w * eps.shape[1]
        assert got[b].item() == pytest.approx(num / den, rel=1e-12)


def test_object_weight_keeps_the_scale_and_moves_the_loss_to_objects():
    eps, noise = _pair(B=1)
    ab = torch.tensor([0.5], dtype=torch.float64)
    cover = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    cover[0, 0, 3, 3] = 1
    uniform = torch.ones_like(eps)                      # equal error everywhere: same loss
    assert eps_loss(uniform, 0 * uniform, ab, cover, 4.0).item() == pytest.approx(1.0)
    only_bg = eps.clone()
    only_bg[..., 2:5, 2:5] = noise[..., 2:5, 2:5]       # errors only away from the object
    assert eps_loss(only_bg, noise, ab, cover, 4.0) < eps_loss(only_bg, noise, ab, cover, 0.0)
    with pytest.raises(ValueError, match="cover must have shape"):
        eps_loss(eps, noise, ab, cover[:, :, :4], 4.0)


def test_min_snr_gamma_factor():
    eps, noise = _pair(B=2)
    # SNR = ᾱ/(1−ᾱ): 10 for ᾱ = 10/11 (weight γ/SNR = 0.5 at γ = 5), 1 for ᾱ = 1/2 (weight 1)
    ab = torch.tensor([10 / 11, 0.5], dtype=torch.float64)
    plain = eps_loss(eps, noise, ab)
    torch.testing.assert_close(eps_loss(eps, noise, ab, min_snr_gamma=5.0),
                               plain * torch.tensor([0.5, 1.0], dtype=torch.float64))


def test_attention_mask_loss_prefers_maps_inside_the_mask():
    B, HW, M, K = 1, 16, 5, 1
    mask = torch.zeros(B, K, HW, dtype=torch.float64)
    mask[0, 0, :4] = 1
    tok = torch.tensor([[2]])
    valid = torch.ones(B, K, dtype=torch.float64)

    def maps_with(pixels):
        p = torch.full((B, HW, M), 0.01, dtype=torch.float64)
        p[0, pixels, 2] = 0.96
        return [p]

    inside = attention_mask_loss(maps_with(slice(0, 4)), mask, mask, tok, valid)
    outside = attention_mask_loss(maps_with(slice(8, 12)), mask, mask, tok, valid)
    assert inside < outside
    assert attention_mask_loss(maps_with(slice(0, 4)), mask, mask, tok, 0 * valid).item() == 0.0


def test_object_count_probs_parser():
    assert _probs3("0.6,0.25,0.15") == (0.6, 0.25, 0.15)
    for bad in ("0.5,0.5", "a,b,c", "-1,1,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="object-count-probs"):
            _probs3(bad)
