"""NMS (Ahmad's notes, §5.13 preamble) against the notes' completed example and a brute force."""
import itertools

import pytest
import torch

from diffnotes.recognition.nms import box_iou, mask_iou, nms, nms_masks


def _brute_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _brute_nms(boxes, scores, T):
    """The unique subset M with: every kept box has no kept higher-ranked box above T, and
    every dropped box has one (the fixed point greedy NMS reaches), found by enumeration."""
    n = len(boxes)
    rank = sorted(range(n), key=lambda i: (-scores[i], i))
    pos = {i: r for r, i in enumerate(rank)}
    iou = [[_brute_iou(boxes[i], boxes[j]) for j in range(n)] for i in range(n)]
    sols = []
    for bits in itertools.product([0, 1], repeat=n):
        M = {i for i in range(n) if bits[i]}
        ok = all(any(pos[j] < pos[i] and iou[i][j] > T for j in M) == (i not in M)
                 for i in range(n))
        if ok:
            sols.append(M)
    assert len(sols) == 1
    return sorted(sols[0], key=lambda i: pos[i])


def test_notes_example_completed():
    # the notes' example stops at "Assume:"; with these boxes IoU(B1, B2) = 81/119
    b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float64)
    s = torch.tensor([0.9, 0.8, 0.75], dtype=torch.float64)
    iou = box_iou(b, b)
    assert iou[0, 1].item() == pytest.approx(81 / 119, abs=1e-12)
    assert iou[0, 2].item() == 0.0
    assert nms(b, s, 0.5).tolist() == [0, 2]


@pytest.mark.parametrize("seed", range(25))
def test_nms_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    xy = torch.randint(0, 8, (n, 2), generator=g).double()
    wh = torch.randint(1, 8, (n, 2), generator=g).double()
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.randint(0, 5, (n,), generator=g).double()   # ties included
    T = float(torch.rand(1, generator=g))
    got = nms(boxes, scores, T).tolist()
    assert got == _brute_nms(boxes.tolist(), scores.tolist(), T)
    for i in range(n):
        for j in range(n):
            assert box_iou(boxes, boxes)[i, j].item() == pytest.approx(
                _brute_iou(boxes[i].tolist(), boxes[j].tolist()), abs=1e-12)


def test_threshold_one_keeps_all_and_duplicates_collapse():
    b = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4], [1, 1, 5, 5]], dtype=torch.float64)
    s = torch.tensor([0.2, 0.7, 0.5], dtype=torch.float64)
    assert sorted(nms(b, s, 1.0).tolist()) == [0, 1, 2]
    assert nms(b[:2], s[:2], 0.5).tolist() == [1]


def test_order_invariance():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(12, 2, generator=g) * 10
    boxes = torch.cat([xy, xy + 1 + 4 * torch.rand(12, 2, generator=g)], 1).double()
    scores = torch.rand(12, generator=g).double()
    perm = torch.randperm(12, generator=g)
    a = set(nms(boxes, scores, 0.3).tolist())
    b = {int(perm[i]) for i in nms(boxes[perm], scores[perm], 0.3).tolist()}
    assert a == b


def test_masks_agree_with_boxes_on_pixel_boxes():
    b = torch.tensor([[0, 0, 4, 4], [1, 1, 5, 5], [3, 0, 8, 3]])
    m = torch.zeros(3, 8, 8, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(b.tolist()):
        m[k, y0:y1, x0:x1] = True
    assert torch.allclose(mask_iou(m, m), box_iou(b, b))
    s = torch.tensor([0.5, 0.9, 0.1])
    assert nms_masks(m, s, 0.3).tolist() == nms(b, s, 0.3).tolist()


def test_bad_input():
    b = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms(b, torch.zeros(2), 1.5)
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.zeros(2, 3), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(b, torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="x_max"):
        box_iou(torch.tensor([[2.0, 0, 1, 1]]), b)
