"""FDA (Ahmad's notes, eqs 5.29–5.32): window convention, what is kept, numpy/torch agreement, loss."""
import math

import numpy as np
import pytest
import torch

from diffnotes.segmentation.fda import (amplitude_phase, charbonnier, entropy_loss, entropy_map,
                                        fda, fda_mask)


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(shape), rng.random(shape) * 0.5 + 0.3


def _loop_fda(src, trg, beta):
    """Independent reference: the FDA paper's recipe with explicit shifts and slicing, per channel."""
    H, W = src.shape[-2:]
    b = int(np.floor(min(H, W) * beta))
    ch, cw = int(np.floor(H / 2.0)), int(np.floor(W / 2.0))
    out = np.empty_like(src)
    for idx in np.ndindex(src.shape[:-2]):
        fs = np.fft.fftshift(np.fft.fft2(src[idx]))
        ft = np.fft.fftshift(np.fft.fft2(trg[idx]))
        amp, pha = np.abs(fs), np.angle(fs)
        amp[ch - b:ch + b + 1, cw - b:cw + b + 1] = np.abs(ft)[ch - b:ch + b + 1, cw - b:cw + b + 1]
        out[idx] = np.real(np.fft.ifft2(np.fft.ifftshift(amp * np.exp(1j * pha))))
    return out


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 15, 20), (2, 3, 9, 12), (17, 11)])
@pytest.mark.parametrize("beta", [0.0, 0.05, 0.1, 0.3])
def test_matches_shift_and_slice_reference(shape, beta):
    s, t = _pair(shape)
    np.testing.assert_allclose(fda(s, t, beta), _loop_fda(s, t, beta), atol=1e-12)


def test_mask_is_centred_square_of_side_2b_plus_1():
    for H, W, beta in [(16, 16, 0.1), (15, 20, 0.2), (7, 9, 0.0), (10, 12, 0.5)]:
        M = fda_mask(H, W, beta)
        b = math.floor(beta * min(H, W))
        rows, cols = np.nonzero(M)
        assert rows.min() == max(H // 2 - b, 0) and rows.max() == min(H // 2 + b, H - 1)
        assert cols.min() == max(W // 2 - b, 0) and cols.max() == min(W // 2 + b, W - 1)
        assert M.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    # the centre of the shifted spectrum is the DC term
    assert np.fft.ifftshift(fda_mask(8, 6, 0.0))[0, 0]


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 15, 21)])
def test_beta_zero_changes_only_the_mean(shape):
    s, t = _pair(shape, 1)
    out = fda(s, t, 0.0)
    diff = out - s
    # the change is one constant per channel ...
    np.testing.assert_allclose(diff, diff.mean((-2, -1), keepdims=True) * np.ones_like(diff), atol=1e-12)
    # ... which sets the (positive) mean to the target's mean
    np.testing.assert_allclose(out.mean((-2, -1)), t.mean((-2, -1)), atol=1e-12)
    # and the mean is real DFT index (0, 0): nothing else of the spectrum moved
    Fo, Fs = np.fft.fft2(out), np.fft.fft2(s)
    Fo[..., 0, 0] = Fs[..., 0, 0] = 0
    np.testing.assert_allclose(Fo, Fs, atol=1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.5])
def test_phase_kept_everywhere_and_amplitude_outside_window(beta):
    s, t = _pair((3, 20, 24), 2)
    out = fda(s, t, beta)
    Ao, Po = amplitude_phase(out)
    As, Ps = amplitude_phase(s)
    At, _ = amplitude_phase(t)
    M = np.broadcast_to(np.fft.ifftshift(fda_mask(20, 24, beta)), Ao.shape)
    # phase: compare unit phasors (angles wrap at ±π); all amplitudes here are > 0
    assert As.min() > 1e-9 and At.min() > 1e-9
    np.testing.assert_allclose(np.exp(1j * Po), np.exp(1j * Ps), atol=1e-9)
    np.testing.assert_allclose(Ao[~M], As[~M], atol=1e-9)
    np.testing.assert_allclose(Ao[M], At[M], atol=1e-9)


def test_numpy_and_torch_agree_and_types_roundtrip():
    s, t = _pair((2, 3, 13, 18), 3)
    for beta in (0.0, 0.07, 0.2, 0.5):
        out_np = fda(s, t, beta)
        out_t = fda(torch.from_numpy(s), torch.from_numpy(t), beta)
        assert isinstance(out_np, np.ndarray) and isinstance(out_t, torch.Tensor)
        assert out_t.dtype == torch.float64 and out_t.shape == s.shape
        np.testing.assert_allclose(out_t.numpy(), out_np, atol=1e-12)
    out32 = fda(s.astype(np.float32), t.astype(np.float32), 0.1)
    assert out32.dtype == np.float32


def test_torch_is_differentiable():
    s, t = (torch.from_numpy(a).requires_grad_() for a in _pair((3, 8, 8), 4))
    fda(s, t, 0.1).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_self_swap_is_identity_and_half_beta_takes_target_amplitude():
    s, t = _pair((3, 12, 12), 5)
    np.testing.assert_allclose(fda(s, s, 0.3), s, atol=1e-12)
    # β = 0.5 on a square image: every frequency in the window → amplitude of the target
    Ao, _ = amplitude_phase(fda(s, t, 0.5))
    np.testing.assert_allclose(Ao, amplitude_phase(t)[0], atol=1e-9)


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((1, 1, 2, 8, 8))])
def test_wrong_rank_raises(bad):
    with pytest.raises(ValueError, match="source"):
        fda(bad, bad, 0.1)


def test_bad_inputs_raise_naming_the_argument():
    s, t = _pair((3, 8, 8))
    for beta in (-0.01, 0.51, 2.0):
        with pytest.raises(ValueError, match="beta"):
            fda(s, t, beta)
    with pytest.raises(ValueError, match="source and target"):
        fda(s, t[:, :7], 0.1)
    with pytest.raises(ValueError, match="channels-first"):
        fda(np.zeros((32, 32, 3)), np.zeros((32, 32, 3)), 0.1)
    with pytest.raises(TypeError, match="source and target"):
        fda(s, torch.from_numpy(t), 0.1)
    with pytest.raises(TypeError, match="target"):
        fda(s, t.tolist(), 0.1)


def test_entropy_loss_hand_values():
    K = 5
    uniform = torch.zeros(2, K, 3, 4, dtype=torch.float64)
    ent = entropy_map(uniform)
    torch.testing.assert_close(ent, torch.full((2, 3, 4), math.log(K), dtype=torch.float64))
    want = (math.log(K) ** 2 + 1e-6) ** 2.0            # ρ(log K), η = 2, ε = 0.001
    assert abs(entropy_loss(uniform).item() - want) < 1e-12
    assert abs(entropy_loss(uniform, reduction="sum").item() - 24 * want) < 1e-10
    assert abs(entropy_loss(uniform, normalize=True, eta=0.5).item() - math.sqrt(1 + 1e-6)) < 1e-12
    # a near-one-hot prediction has entropy ≈ 0 and loss ≈ ε^(2η)
    sharp = torch.zeros(K, 2, 2, dtype=torch.float64)
    sharp[0] = 60.0
    assert entropy_loss(sharp, eta=1.0).item() == pytest.approx(1e-6, abs=1e-12)
    # a two-class example by hand: p = (0.8, 0.2)
    z = torch.tensor([math.log(0.8), math.log(0.2)], dtype=torch.float64).reshape(2, 1, 1)
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert entropy_loss(z, eta=0.5).item() == pytest.approx(math.sqrt(h * h + 1e-6), rel=1e-12)
    np.testing.assert_allclose(charbonnier(np.array([0.0, 3.0]), 0.5, 4.0), [4.0, 5.0])


def test_entropy_loss_gradient_lowers_entropy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    before = entropy_map(z).mean().item()
    entropy_loss(z).backward()
    with torch.no_grad():
        z2 = z - 0.5 * z.grad
    assert entropy_map(z2).mean().item() < before


def test_entropy_loss_bad_input():
    with pytest.raises(ValueError, match="logits"):
        entropy_loss(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="logits"):
        entropy_loss(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="reduction"):
        entropy_loss(torch.zeros(2, 4, 4), reduction="max")
