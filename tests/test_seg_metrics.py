"""Segmentation metrics and losses (Ahmad's notes, eqs 5.2–5.4), on the notes' 4×4 example and by brute force."""
import itertools
import math

import numpy as np
import pytest
import torch

from diffnotes.segmentation import metrics as M

B, C, D = 0, 1, 2  # background, cat, dog
# Ahmad's notes, §5.2: the 4×4 ground truth (B, C, D)
GT = np.array([[B, B, C, C],
               [B, D, D, C],
               [B, D, D, C],
               [B, B, C, C]])
# the notes' prediction uses 1, 2, 3 for background, cat, dog
SEED_PRED = np.array([[1, 1, 2, 2],
                      [1, 3, 3, 2],
                      [1, 3, 3, 2],
                      [1, 1, 2, 2]]) - 1
# two mistakes: (1,1) dog → background, (0,2) cat → dog
PRED = GT.copy()
PRED[1, 1] = B
PRED[0, 2] = D


def test_seed_prediction_is_perfect():
    assert M.pixel_accuracy(SEED_PRED, GT) == 1.0
    assert M.mean_iou(SEED_PRED, GT, 3) == 1.0
    assert M.dice(SEED_PRED == D, GT == D) == 1.0


def test_worked_example_by_hand():
    # counts: B 6 px, C 6 px, D 4 px. Prediction: B 7 (6 right), C 5 (5 right), D 4 (3 right).
    assert M.pixel_accuracy(PRED, GT) == 14 / 16
    np.testing.assert_allclose(M.iou_per_class(PRED, GT, 3), [6 / 7, 5 / 6, 3 / 5])
    assert M.mean_iou(PRED, GT, 3) == pytest.approx((6 / 7 + 5 / 6 + 3 / 5) / 3)
    assert M.dice(PRED == D, GT == D) == 2 * 3 / (4 + 4)
    assert M.dice(PRED == B, GT == B) == 2 * 6 / (7 + 6)
    Cm = M.confusion_matrix(PRED, GT, 3)
    np.testing.assert_array_equal(Cm, [[6, 0, 0], [0, 5, 1], [1, 0, 3]])


def test_dice_and_iou_relation_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.random((2, 5, 6)) < rng.random(2)[:, None, None]
        inter, union = (a & b).sum(), (a | b).sum()
        if union == 0:
            continue
        d = M.dice(a, b)
        assert d == pytest.approx(2 * inter / (a.sum() + b.sum()))
        iou = inter / union
        assert d == pytest.approx(2 * iou / (1 + iou))       # Dice = 2J/(1+J)
    assert M.dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_iou_matches_set_definition():
    rng = np.random.default_rng(1)
    p, t = rng.integers(0, 4, (2, 7, 9))
    iou = M.iou_per_class(p, t, 5)
    for c in range(4):
        P, T = set(zip(*np.nonzero(p == c))), set(zip(*np.nonzero(t == c)))
        assert iou[c] == pytest.approx(len(P & T) / len(P | T))
    assert np.isnan(iou[4])
    assert M.mean_iou(p, t, 5) == pytest.approx(iou[:4].mean())


def test_ignore_index():
    t = GT.copy()
    t[0, 2] = 255
    p = PRED
    assert M.pixel_accuracy(p, t, ignore_index=255) == 14 / 15
    np.testing.assert_allclose(M.iou_per_class(p, t, 3, ignore_index=255), [6 / 7, 5 / 5, 3 / 4])


def test_cross_entropy_worked_example():
    # logits = log-probabilities: 0.7 on the predicted class, 0.15 on the others
    probs = np.full((3, 4, 4), 0.15)
    np.put_along_axis(probs, PRED[None], 0.7, 0)
    logits = np.log(probs)
    want = 14 * -math.log(0.7) + 2 * -math.log(0.15)               # eq 5.3, a sum
    assert M.pixel_cross_entropy(logits, GT) == pytest.approx(want, rel=1e-12)
    assert M.pixel_cross_entropy(logits, GT, reduction="mean") == pytest.approx(want / 16, rel=1e-12)
    z = torch.tensor(logits)[None].requires_grad_()
    loss = M.pixel_cross_entropy(z, torch.tensor(GT)[None])
    ref = torch.nn.functional.cross_entropy(z, torch.tensor(GT)[None], reduction="sum")
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert z.grad is not None
    # erratum erratum-seg-ce-logits: softmax of probabilities is not the probability
    seed_reading = 14 * -math.log(math.exp(0.7) / (math.exp(0.7) + 2 * math.exp(0.15))) \
        + 2 * -math.log(math.exp(0.15) / (math.exp(0.7) + 2 * math.exp(0.15)))
    assert M.pixel_cross_entropy(probs, GT) == pytest.approx(seed_reading)
    assert abs(seed_reading - want) > 1.0


def test_soft_dice_loss_on_one_hot_equals_dice():
    probs = torch.nn.functional.one_hot(torch.tensor(PRED), 3).permute(2, 0, 1).double()
    per_class = [M.dice(PRED == c, GT == c) for c in range(3)]
    assert M.soft_dice_loss(probs, torch.tensor(GT)).item() == pytest.approx(1 - np.mean(per_class), abs=1e-6)


def _brute_match(p, t, k, n):
    best = -1
    for perm in itertools.permutations(range(k), n):   # perm[c] = cluster given to class c
        best = max(best, sum(((p == perm[c]) & (t == c)).sum() for c in range(n)))
    return best


@pytest.mark.parametrize("k,n", [(3, 3), (4, 4), (5, 3), (6, 4)])
def test_hungarian_matches_brute_force(k, n):
    rng = np.random.default_rng(k * 10 + n)
    for _ in range(20):
        t = rng.integers(0, n, (6, 7))
        p = np.where(rng.random((6, 7)) < 0.6, rng.permutation(k)[t], rng.integers(0, k, (6, 7)))
        mapping = M.hungarian_match(p, t, k, n)
        assert sorted(mapping[mapping >= 0]) == list(range(n))
        got = sum(((p == c) & (t == mapping[c])).sum() for c in range(k) if mapping[c] >= 0)
        assert got == _brute_match(p, t, k, n)


def test_unsupervised_miou_is_permutation_invariant():
    perm = np.array([2, 0, 1])
    clusters = perm[PRED]
    miou, mapping, acc = M.unsupervised_miou(clusters, GT, 3)
    np.testing.assert_array_equal(mapping[perm], [0, 1, 2])
    assert miou == pytest.approx(M.mean_iou(PRED, GT, 3)) and acc == 14 / 16
    # over-clustering: split the background into two clusters; one is left unmatched
    over = clusters.copy()
    over[3, :2] = 3
    miou, mapping, acc = M.unsupervised_miou(over, GT, 3, num_clusters=4)
    assert mapping[3] == -1 and acc == 12 / 16
    assert miou == pytest.approx((4 / 7 + 5 / 6 + 3 / 5) / 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="pred and target"):
        M.mean_iou(GT[:3], GT, 3)
    with pytest.raises(ValueError, match="target labels"):
        M.mean_iou(GT, GT + 1, 3)
    with pytest.raises(ValueError, match="binary"):
        M.dice(GT, GT)
    with pytest.raises(ValueError, match="target must have shape"):
        M.pixel_cross_entropy(np.zeros((3, 4, 5)), GT)
    with pytest.raises(ValueError, match="logits"):
        M.pixel_cross_entropy(np.zeros((4, 4)), GT)
    with pytest.raises(ValueError, match="num_clusters"):
        M.unsupervised_miou(GT, GT, 3, num_clusters=2)
    with pytest.raises(TypeError, match="pred"):
        M.pixel_accuracy(np.full((4, 4), 0.5), GT)
