"""Quality of the shipped shapes text-to-image model (diffnotes.models.eval_shapes).

The judges are checked first on the generator's own scenes (where the truth is known), then the
shipped weights are loaded with ``load_pipeline("shapes")`` and scored on a seeded sample of
single-object prompts against the issue's goals: ≥ 90% colour, ≥ 85% shape, ≥ 80% position, and
a mean IoU ≥ 0.5 between each noun's cross-attention map and the object's segmented mask. The
weights shipped today meet all four.
"""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffnotes.models import eval_shapes as ev  # noqa: E402


def test_judges_are_right_on_the_generators_own_scenes():
    acc = ev.judge_accuracy(n=150, seed=2024)
    assert acc["color"] >= 0.97 and acc["shape"] >= 0.95 and acc["position"] >= 0.97, acc


def test_prompts_cover_every_training_pair():
    from diffnotes.data.shapes import TRAIN_COLORS, TRAIN_SHAPES

    specs = ev.single_object_prompts(len(TRAIN_SHAPES) * len(TRAIN_COLORS), seed=0)
    assert {(s["shape"], s["color"]) for s in specs} == {
        (s, c) for s in TRAIN_SHAPES for c in TRAIN_COLORS}
    assert all(s["shape"] in s["prompt"].split() and s["position"] in s["prompt"] for s in specs)
    assert specs == ev.single_object_prompts(len(specs), seed=0)          # deterministic


def test_attention_iou_and_segmentation_helpers():
    from diffnotes.data.shapes import render_object

    img, mask = render_object("star", "blue", "large", "left", background="stripes", seed=1)
    seg = ev.segment_object(img)
    assert (seg & mask).sum() / (seg | mask).sum() > 0.95
    assert ev.judge_color(img, seg) == "blue" and ev.judge_position(seg) == "left"
    assert ev.attention_iou(mask.astype(float), mask) == 1.0
    shifted = np.roll(mask, 20, axis=1).astype(float)
    assert ev.attention_iou(shifted, mask) < 0.2
    coarse = torch.nn.functional.avg_pool2d(torch.from_numpy(mask[None].astype(float)), 4)[0]
    assert ev.attention_iou(coarse, mask) > 0.7                         # a 16×16 map upsampled
    with pytest.raises(ValueError, match="att_map"):
        ev.attention_iou(np.zeros((2, 4, 4)), mask)


@pytest.fixture(scope="module")
def shipped_result():
    from diffnotes.models.load import load_pipeline

    pipe = load_pipeline("shapes")               # from_pretrained on the shipped directory
    # 90 prompts (18 per training shape): with 30, one prompt moves the score by 3.3 points and
    # the spread between seeds (83%-90% for the same weights) straddles the shape goal.
    res = ev.evaluate(pipe, n=90, seed=0, num_inference_steps=20, guidance_scale=7.5,
                      batch_size=15, progress=False)
    print(res.summary())
    return res


@pytest.mark.slow
def test_shipped_model_meets_every_quality_goal(shipped_result):
    """Measured 2026-11-22 on the weights shipped (59 min of training on 2 CPU cores): colour
    100%, shape 94%, position 100%, attention mean IoU 0.61 on 90 prompts; goals 90%, 85%, 80%,
    0.5. (The previous weights, trained without the object-weighted loss: shape 26%.)"""
    res = shipped_result
    for key in ("color", "shape", "position", "attention_miou"):
        assert getattr(res, key) >= ev.GOALS[key], f"{key} below {ev.GOALS[key]}: {res.summary()}"
