"""Keypoints of the captioned-shapes generator (diffnotes.data.shapes): exact, and they move with
the object under every transform the generator applies (shift, scale, colour, background)."""
import numpy as np
import pytest

from diffnotes.data import shapes as S


def _render(shape, center, radius, color="red", background="plain", seed=0):
    img, masks, kps = S.render_objects(
        [dict(shape=shape, color=color, center=center, radius=radius)],
        background=background, seed=seed, keypoints=True)
    return img, masks[0], np.array(list(kps[0].values()))


@pytest.mark.parametrize("shape", S.SHAPES)
def test_keypoints_shift_with_the_object(shape):
    img1, m1, k1 = _render(shape, (24.0, 30.0), 8.0)
    img2, m2, k2 = _render(shape, (31.0, 27.0), 8.0, color="blue", background="stripes", seed=3)
    # an integer shift moves the mask by exactly that many pixels, and the keypoints too
    assert np.array_equal(np.roll(m1, (-3, 7), axis=(0, 1)), m2)
    assert np.allclose(k2 - k1, [7.0, -3.0], atol=1e-12)
    assert len(k1) == len(S.KEYPOINT_NAMES[shape])


@pytest.mark.parametrize("shape", S.SHAPES)
def test_keypoints_scale_with_the_object(shape):
    c = np.array([32.0, 32.0])
    _, ms, ks = _render(shape, tuple(c), 6.0)
    _, ml, kl = _render(shape, tuple(c), 12.0)
    assert np.allclose(kl - c, 2.0 * (ks - c), atol=1e-12)
    assert np.allclose(ks[0], c) and np.allclose(kl[0], c)     # the centre comes first
    # the larger object covers about 4× the area
    assert 3.4 < ml.sum() / ms.sum() < 5.0


@pytest.mark.parametrize("shape", S.SHAPES)
@pytest.mark.parametrize("radius", [6.5, 10.5, 9.3])
def test_keypoints_lie_on_or_inside_the_shape(shape, radius):
    c = (30.3, 33.7)
    _, m, k = _render(shape, c, radius)
    # the inside test of the renderer holds at each point moved a hair towards the centre
    off = (k - np.array(c)) * (1 - 1e-6)
    inside = S._shape_masks(shape, off[:, 0], off[:, 1], np.float64(radius))
    assert inside.all()
    # ... and just outside for the corner/tip points (they are on the boundary)
    out = S._shape_masks(shape, off[1:, 0] * 1.05, off[1:, 1] * 1.05, np.float64(radius))
    assert not out.any()
    # every keypoint is within 2.5 px of a mask pixel centre (a star's tip is thin); the
    # centre's pixel is in the mask
    ys, xs = np.nonzero(m)
    pix = np.stack([xs + 0.5, ys + 0.5], 1)
    d = np.sqrt(((k[:, None, :] - pix[None]) ** 2).sum(-1)).min(1)
    assert d.max() <= 2.5
    assert m[int(np.floor(c[1])), int(np.floor(c[0]))]


def test_star_tips_are_the_farthest_mask_points():
    c = (32.0, 32.0)
    _, m, k = _render("star", c, 10.0)
    ys, xs = np.nonzero(m)
    pix = np.stack([xs + 0.5, ys + 0.5], 1)
    # each tip's nearest mask pixel is farther from the centre than 90% of the mask pixels
    rho = np.linalg.norm(pix - np.array(c), axis=1)
    for tip in k[1:]:
        j = np.argmin(np.linalg.norm(pix - tip, axis=1))
        assert rho[j] >= np.quantile(rho, 0.9)


def test_generated_scenes_carry_keypoints():
    sc = S.generate_scenes(60, seed=5)
    assert sc.keypoints.shape == (60, S.MAX_OBJECTS, S.MAX_KEYPOINTS, 2)
    for i in range(len(sc)):
        for k, o in enumerate(sc.objects[i]):
            names = S.KEYPOINT_NAMES[o["shape"]]
            assert tuple(o["keypoints"]) == names
            pts = np.array(list(o["keypoints"].values()))
            assert np.array_equal(sc.keypoints[i, k, : len(names)], pts)
            assert np.isnan(sc.keypoints[i, k, len(names):]).all()
            assert np.allclose(pts[0], o["center"])
            # the box of the (unoccluded part of the) mask contains the visible keypoints
            x0, y0, x1, y1 = sc.boxes[i, k]
            v = sc.keypoint_visible[i, k, : len(names)]
            assert (pts[v, 0] >= x0 - 2.5).all() and (pts[v, 0] <= x1 + 2.5).all()
            assert (pts[v, 1] >= y0 - 2.5).all() and (pts[v, 1] <= y1 + 2.5).all()
        assert np.isnan(sc.keypoints[i, sc.n_objects[i]:]).all()
    # single-object scenes: every keypoint is visible
    one = sc.n_objects == 1
    first = sc.keypoint_visible[one, 0]
    counts = [len(S.KEYPOINT_NAMES[sc.objects[i][0]["shape"]]) for i in np.nonzero(one)[0]]
    assert all(first[j, :c].all() for j, c in enumerate(counts))


def test_keypoints_do_not_change_the_scenes():
    # the keypoints are computed from the drawn parameters; the images are those of the seed
    a = S.generate_scenes(20, seed=11)
    img, m = S.render_objects([dict(shape="star", color="red")])
    img2, m2, _ = S.render_objects([dict(shape="star", color="red")], keypoints=True)
    assert np.array_equal(img, img2) and np.array_equal(m, m2)
    b = S.generate_scenes(20, seed=11)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.keypoints, b.keypoints,
                                                                  equal_nan=True)


def test_bad_shape_raises():
    with pytest.raises(ValueError, match="shape"):
        S.shape_keypoints("hexagon", (1, 2), 3.0)
