"""Tests of the captioned-shapes generator (diffnotes.data.shapes)."""
import numpy as np
import pytest

from diffnotes.data import shapes as S


@pytest.fixture(scope="module")
def scenes():
    return S.generate_scenes(300, seed=7)


def test_deterministic_for_a_seed():
    a = S.generate_scenes(40, seed=3)
    b = S.generate_scenes(40, seed=3)
    c = S.generate_scenes(40, seed=4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, c.images)
    # a Generator argument is consumed like a seed
    d = S.generate_scenes(40, seed=np.random.default_rng(3))
    assert d.captions == a.captions


def test_shapes_and_dtypes(scenes):
    n = len(scenes)
    assert scenes.images.shape == (n, 64, 64, 3) and scenes.images.dtype == np.float32
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    assert scenes.masks.shape == (n, S.MAX_OBJECTS, 64, 64) and scenes.masks.dtype == bool
    assert scenes.boxes.shape == (n, S.MAX_OBJECTS, 4)
    assert set(np.unique(scenes.n_objects)) == {1, 2, 3}


def test_masks_match_rendered_pixels(scenes):
    for i in range(len(scenes)):
        for k, obj in enumerate(scenes.objects[i]):
            m = scenes.masks[i, k]
            assert m.sum() > 10, (i, k)
            inside = scenes.images[i][m]
            assert np.allclose(inside, np.float32(obj["rgb"]), atol=1e-6)
            # the box is the mask's bounding box
            x0, y0, x1, y1 = scenes.boxes[i, k]
            ys, xs = np.nonzero(m)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        # empty slots are empty; visible masks do not overlap
        assert not scenes.masks[i, scenes.n_objects[i]:].any()
        assert scenes.masks[i].sum(0).max() <= 1
        # pixels outside every mask are background: no object colour there
        bg = scenes.images[i][~scenes.masks[i].any(0)]
        for obj in scenes.objects[i]:
            assert not np.any(np.all(np.abs(bg - np.float32(obj["rgb"])) < 1e-6, axis=-1))


def test_masks_lie_at_their_positions(scenes):
    for i in range(len(scenes)):
        for k, obj in enumerate(scenes.objects[i]):
            ys, xs = np.nonzero(scenes.masks[i, k])
            third = {"left": 0, "center": 1, "right": 2}[obj["position"]]
            assert int(xs.mean() // (64 / 3)) == third


def test_captions_mention_exactly_the_objects(scenes):
    shape_words, color_words = set(S.SHAPES), set(S.COLORS)
    for i, (cap, objs) in enumerate(zip(scenes.captions, scenes.objects)):
        words = cap.split()
        assert [w for w in words if w in shape_words] == [o["shape"] for o in objs]
        assert [w for w in words if w in color_words] == [o["color"] for o in objs]
        assert words.count("and") == len(objs) - 1
        for k, o in enumerate(objs):
            j = scenes.noun_index[i, k]
            assert words[j] == o["shape"] and o["noun_index"] == j
            assert words[j - 1] == o["color"]
            if words[j + 1:j + 2] == ["on"] or words[j + 1:j + 2] == ["in"]:
                assert " ".join(words[j + 1:j + 4]) == S.POSITION_PHRASES[o["position"]]
            if words[j - 2] in S.SIZES:
                assert words[j - 2] == o["size"]
        assert set(words) <= set(S.VOCABULARY)
        assert (scenes.noun_index[i, len(objs):] == -1).all()


def test_articles_are_english():
    cap, nouns = S.caption_objects([dict(shape="star", color="orange")])
    assert cap == "an orange star" and nouns == [2]
    assert S.prompt_for("circle", "red", "small", "left") == "a small red circle on the left"


def test_held_out_never_appear_unless_asked():
    sc = S.generate_scenes(500, seed=1)
    words = set(" ".join(sc.captions).split())
    assert not words & set(S.HELD_OUT_SHAPES) and not words & set(S.HELD_OUT_COLORS)
    assert all(o["shape"] not in S.HELD_OUT_SHAPES and o["color"] not in S.HELD_OUT_COLORS
               for objs in sc.objects for o in objs)
    sc2 = S.generate_scenes(500, seed=1, include_held_out=True)
    words2 = set(" ".join(sc2.captions).split())
    assert words2 & set(S.HELD_OUT_SHAPES) and words2 & set(S.HELD_OUT_COLORS)
    sc3 = S.generate_scenes(20, seed=1, shapes=["heart"], colors=["purple"], include_held_out=True)
    assert all(c.split().count("heart") == c.split().count("purple") >= 1 for c in sc3.captions)


def test_render_object_matches_generator_geometry():
    img, mask = S.render_object("heart", "purple", "small", "right", background=0.2)
    assert img.shape == (64, 64, 3) and mask.shape == (64, 64)
    assert np.allclose(img[mask], np.float32(S.COLORS["purple"]))
    assert np.allclose(img[~mask], 0.2)
    assert np.nonzero(mask)[1].mean() > 42
    big = S.render_object("square", "red", "large")[1].sum()
    small = S.render_object("square", "red", "small")[1].sum()
    assert big > 2 * small
    # every shape has a distinct silhouette at the same size
    sil = [S.render_object(s, "red")[1] for s in S.SHAPES]
    for a in range(len(sil)):
        for b in range(a + 1, len(sil)):
            assert (sil[a] != sil[b]).sum() > 30


@pytest.mark.parametrize("kwargs, argname", [
    (dict(n=0), "n"),
    (dict(n=5, seed=-1), "seed"),
    (dict(n=5, max_objects=4), "max_objects"),
    (dict(n=5, min_objects=3, max_objects=2), "min_objects"),
    (dict(n=5, shapes=["hexagon"]), "shapes"),
    (dict(n=5, colors=["purple"]), "colors"),
    (dict(n=5, p_mention_size=1.5), "p_mention_size"),
    (dict(n=5, object_count_probs=(1, 0)), "object_count_probs"),
    (dict(n=5, image_size=32), "image_size"),
])
def test_bad_arguments_raise_naming_them(kwargs, argname):
    with pytest.raises(ValueError, match=argname):
        S.generate_scenes(**kwargs)


@pytest.mark.parametrize("kwargs, argname", [
    (dict(shape="hexagon", color="red"), "shape"),
    (dict(shape="circle", color="teal"), "color"),
    (dict(shape="circle", color="red", size="huge"), "size"),
    (dict(shape="circle", color="red", position="top"), "position"),
    (dict(shape="circle", color="red", background="marble"), "background"),
])
def test_render_object_bad_arguments(kwargs, argname):
    with pytest.raises(ValueError, match=argname):
        S.render_object(**kwargs)
