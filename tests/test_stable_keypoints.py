"""diffnotes.recognition.keypoints (StableKeypoints): the localisation and equivariance losses
(exact zeros and their failures), invertible warps, token choice, the regressor, and the whole
method on both UNet layouts."""
import numpy as np
import pytest
import torch

from diffnotes.recognition import keypoints as K
from diffnotes.recognition.correspondence import gaussian_map


def test_localization_loss_is_zero_for_a_gaussian_at_its_peak():
    G = gaussian_map((9.5, 5.5), 1.5, (16, 16))
    assert float(K.localization_loss(G[None, None], 1.5)) < 1e-30
    two = G + gaussian_map((3.5, 12.5), 1.5, (16, 16))
    assert float(K.localization_loss(two[None, None], 1.5)) > 1e-3
    assert torch.equal(K.map_peaks(G[None]), torch.tensor([[9.5, 5.5]], dtype=torch.float64))


def test_warp_and_its_inverse():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 2, 32, 32, dtype=torch.float64)
    x[..., 8:24, 8:24] = torch.rand(1, 2, 16, 16, generator=g, dtype=torch.float64)
    # an integer translation (3 px right, 2 px down) is exact, and so is its inverse
    theta = K.affine_theta(0.0, 1.0, -2 * 3 / 32, -2 * 2 / 32)
    y = K.warp(x, theta)
    assert torch.allclose(y, torch.roll(x, (2, 3), dims=(2, 3)), atol=1e-12)
    assert torch.allclose(K.warp(y, K.invert_theta(theta)), x, atol=1e-12)
    # a random affine of the code's ranges: T^-1(T(X)) ~ X for smooth content (two bilinear
    # resamplings blur by under a pixel)
    blob = gaussian_map((15.0, 17.0), 3.0, (32, 32))[None, None]
    for _ in range(5):
        th = K.random_affine(1, g)
        back = K.warp(K.warp(blob, th), K.invert_theta(th))
        assert (back - blob).abs().max() < 0.06


def test_equivariance_loss_zero_for_an_equivariant_model_and_not_otherwise():
    g = torch.Generator().manual_seed(1)
    img = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    img[..., 10:20, 12:22] = torch.rand(1, 3, 10, 10, generator=g, dtype=torch.float64)

    def model(x):                     # a per-pixel function of the image: equivariant
        return torch.softmax(4 * x, dim=1)
    theta = K.affine_theta(0.0, 1.0, 2 * 4 / 32, -2 * 3 / 32)
    xt = K.warp(img, theta)
    # zero outside the image after warping back is matched by masking with the inside region
    inside = K.warp(K.warp(torch.ones_like(img[:, :1]), theta), K.invert_theta(theta))
    L = K.equivariance_loss(model(img) * inside, model(xt), theta)
    assert float(L) < 1e-24
    # a map that ignores the image (fixed positional bumps) is not equivariant
    fixed = gaussian_map((8.5, 8.5), 2.0, (32, 32))[None, None].expand(1, 3, 32, 32)
    assert float(K.equivariance_loss(fixed, fixed, theta)) > 1e-4


def test_token_choice_prefers_sharp_maps_and_spreads_them():
    maps = [gaussian_map(c, 0.8, (16, 16)) for c in [(2.5, 2.5), (13.5, 2.5), (2.5, 13.5),
                                                      (13.5, 13.5)]]
    g = torch.Generator().manual_seed(2)
    diffuse = [torch.rand(16, 16, generator=g, dtype=torch.float64) + 1 for _ in range(10)]
    # duplicates of the first corner, slightly blurred: sharp but in the same place
    dup = [gaussian_map((2.5, 3.5), 1.0, (16, 16))]
    M = torch.stack(diffuse[:5] + maps[:2] + dup + diffuse[5:] + maps[2:])
    sharp = {5, 6, 13, 14}
    top = K.select_top_tokens(M, 4, min_dist=0.1)
    assert set(top.tolist()) == sharp                      # the duplicate is too close
    fps = K.furthest_point_tokens(M[None].repeat(3, 1, 1, 1), 4, candidates=6)
    assert set(fps.tolist()) == sharp


def test_regressor_recovers_a_linear_map():
    g = torch.Generator().manual_seed(3)
    found = torch.rand(20, 3, 2, generator=g, dtype=torch.float64) * 64
    A = torch.randn(6, 8, generator=g, dtype=torch.float64)
    true = (found.reshape(20, 6) @ A + 1.5).reshape(20, 4, 2)
    W = K.fit_regressor(found, true)
    assert torch.allclose(K.apply_regressor(W, found), true, atol=1e-9)
    with pytest.raises(ValueError, match="true"):
        K.fit_regressor(found, true[:5])


def _images(n=3):
    from diffnotes.data.shapes import generate_scenes
    return generate_scenes(n, seed=4, max_objects=1).images


def test_stable_keypoints_on_both_layouts(pipe):
    x = _images()
    before = [p.detach().clone() for p in pipe.unet.parameters()]
    losses = []
    res = K.stable_keypoints(pipe, x, 3, n_tokens=8, steps=3, batch=2, lr=0.05, top_k=3,
                             generator=torch.Generator().manual_seed(0),
                             callback=lambda d: losses.append(d))
    assert res.keypoints.shape == (3, 3, 2) and res.tokens.shape == (3,)
    assert len(set(res.tokens.tolist())) == 3
    assert ((res.keypoints >= 0) & (res.keypoints <= 64)).all()
    assert all(np.isfinite(d["loss"]) and d["loss"] >= 0 for d in losses)
    assert all(torch.equal(a, b) for a, b in zip(before, pipe.unet.parameters()))
    assert torch.equal(res.find(pipe, x), res.keypoints)
    # no step: the embedding is the random start
    e = K.optimize_keypoint_embedding(pipe, x, n_tokens=8, steps=0,
                                      generator=torch.Generator().manual_seed(5))
    e0 = torch.randn(e.shape, generator=torch.Generator().manual_seed(5), dtype=e.dtype)
    assert torch.equal(e, e0)


def test_bad_arguments(pipe):
    x = _images(1)
    with pytest.raises(ValueError, match="n_keypoints"):
        K.stable_keypoints(pipe, x, 0)
    with pytest.raises(ValueError, match="n_keypoints"):
        K.stable_keypoints(pipe, x, 9, n_tokens=8)
    with pytest.raises(ValueError, match="layers"):
        K.optimize_keypoint_embedding(pipe, x, steps=1, layers=["nope"])


def test_the_method_is_attributed_to_the_keypoints_paper():
    # Ahmad's notes, §5.10 cite the correspondence paper for it; the book cites the CVPR 2024 one
    from pathlib import Path
    doc = " ".join(K.__doc__.split())
    assert "Hedlin et al. 2024" in doc and "Unsupervised Keypoints" in doc
    bib = (Path(__file__).resolve().parents[1] / "book" / "references.bib").read_text()
    entry = bib[bib.index("{hedlin2024keypoints,"):][:400]
    assert "Unsupervised Keypoints from Pretrained Diffusion Models" in entry and "2024" in entry
