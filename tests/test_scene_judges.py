"""Judges of scenes with several objects (diffnotes.models.eval_shapes): the outcome rules on
hand-made lists, and the judges on the generator's own two-object scenes, where the truth is
known (every scene must come out "correct")."""
import numpy as np
import pytest

from diffnotes.data import shapes as S
from diffnotes.models import eval_shapes as E


def _o(shape, color):
    return dict(shape=shape, color=color)


REQ = [_o("circle", "red"), _o("square", "blue")]


@pytest.mark.parametrize("found, outcome", [
    ([_o("circle", "red")], "neglect"),
    ([], "neglect"),
    ([_o("square", "blue"), _o("circle", "red")], "correct"),
    ([_o("circle", "red"), _o("square", "blue"), _o("star", "green")], "correct"),
    ([_o("circle", "blue"), _o("square", "red")], "binding"),          # swapped
    ([_o("circle", "red"), _o("square", "red")], "binding"),           # repeated
    ([_o("circle", "red"), _o("star", "blue")], "wrong_shape"),
])
def test_binding_outcome_rules(found, outcome):
    assert E.binding_outcome(found, REQ) == outcome


def test_two_object_prompts_are_distinct_and_parse_back():
    specs = E.two_object_prompts(40, seed=3)
    assert specs == E.two_object_prompts(40, seed=3)
    for sp in specs:
        a, b = sp["objects"]
        assert a["shape"] != b["shape"] and a["color"] != b["color"]
        assert sp["prompt"] == f"a{'n' if a['color'][0] in 'aeiou' else ''} {a['color']} " \
            f"{a['shape']} and a{'n' if b['color'][0] in 'aeiou' else ''} {b['color']} {b['shape']}"
    with pytest.raises(ValueError, match="n must"):
        E.two_object_prompts(0)


def test_judge_scene_finds_rendered_objects_and_boxes():
    sc = S.generate_scenes(12, seed=5, min_objects=2, max_objects=3, textured=False)
    hits = 0
    for i in range(len(sc)):
        found = E.judge_scene(sc.images[i])
        hits += E.binding_outcome(found, sc.objects[i]) == "correct"
        for o in found:                 # every found box is a component's tight box
            x0, y0, x1, y1 = o["box"]
            ys, xs = np.nonzero(o["mask"])
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
    assert hits >= 10


def test_scene_judges_are_accurate_on_generator_scenes():
    acc = E.scene_judge_accuracy(n=100)
    assert abs(sum(acc.values()) - 1) < 1e-12
    assert acc["correct"] >= 0.9
