"""DiffSeg (Ahmad's notes, §5.13, eqs 5.63-5.68): the official aggregation weights and anchor grid,
the KL conventions, a block-diagonal attention tensor split into its blocks, and the model
plumbing on both UNet layouts."""
import math

import numpy as np
import pytest
import torch

from diffnotes.attention import attention_layers, layer_resolutions
from diffnotes.recognition import diffseg as ds

SD_RES = [64, 64, 32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]   # SD 1.x, forward order


def test_official_weights_and_grid():
    w = ds.aggregation_weights(SD_RES, "official")
    per_res = {r: float(w[[i for i, x in enumerate(SD_RES) if x == r]].sum()) for r in (64, 32, 16, 8)}
    # notes E10 / get_weight_rato: [64, 32, 16, 8] / 120
    assert [per_res[r] for r in (64, 32, 16, 8)] == pytest.approx(
        [0.533333333, 0.266666667, 0.133333333, 0.066666667], abs=1e-9)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-15)
    # eq 5.65 read literally: R_k proportional to the layer's resolution
    wn = ds.aggregation_weights(SD_RES, "notes")
    assert torch.allclose(wn, torch.tensor(SD_RES, dtype=torch.float64) / sum(SD_RES))
    assert float(wn[6]) == pytest.approx(8 / 568) and float(w[6]) == pytest.approx(8 / 120)
    g = ds.anchor_grid(16, 64)
    rows, cols = (g // 64).unique().tolist(), (g % 64).unique().tolist()
    assert rows == cols == list(range(1, 62, 4)) and len(g) == 256
    # the code's formula, transcribed, at another size
    M, size = 5, 16
    seg = (size - 1) // (M - 1)
    start = (size - 1 - seg * (M - 1)) // 2
    ref = np.linspace(start, seg * (M - 1) + start, M).astype(int)
    assert (ds.anchor_grid(M, size) // size).unique().tolist() == ref.tolist()


def test_kl_conventions():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([0.9, 0.1], dtype=torch.float64)
    kl_pq = float((p * (p / q).log()).sum())
    kl_qp = float((q * (q / p).log()).sum())
    assert kl_pq == pytest.approx(0.510826, abs=1e-6) and kl_qp == pytest.approx(0.368064, abs=1e-6)
    assert float(ds.sym_kl(p, q, "paper")) == pytest.approx(kl_pq + kl_qp, abs=1e-12)   # 0.878890
    assert float(ds.sym_kl(p, q, "code")) == pytest.approx((kl_pq + kl_qp) / 2, abs=1e-12)
    assert float(ds.sym_kl(p, p)) == 0.0
    g = torch.Generator().manual_seed(0)
    P = torch.rand(5, 7, generator=g, dtype=torch.float64).softmax(1)
    Q = torch.rand(4, 7, generator=g, dtype=torch.float64).softmax(1)
    pair = ds._pairwise_sym_kl(P, Q, "paper")
    assert torch.allclose(pair, ds.sym_kl(P[:, None], Q[None], "paper"), atol=1e-12)
    assert torch.allclose(pair.T, ds._pairwise_sym_kl(Q, P, "paper"), atol=1e-12)


def _block_attention(R=16, eps=1e-3):
    reg = torch.zeros(R, R, dtype=torch.long)
    reg[:, 8:] = 1
    reg[10:, :8] = 2
    lab = reg.flatten()
    N = R * R
    same = (lab[:, None] == lab[None, :]).double()
    return (1 - eps) * same / same.sum(1, keepdim=True) + eps / N, reg, eps


@pytest.mark.parametrize("refine", [False, True])
def test_block_diagonal_attention_is_split_into_its_blocks(refine):
    A, reg, eps = _block_attention()
    labels, props = ds.diffseg([A], num_points=8, kl_threshold=(0.9, 0.9, 0.9), refine=refine,
                               return_proposals=True)
    assert len(props) == 3
    # the exact partition, up to the names of the segments
    pairs = {(int(a), int(b)) for a, b in zip(labels.flatten(), reg.flatten())}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3


def test_cross_block_divergence_closed_form_and_threshold_conventions():
    A, reg, eps = _block_attention()
    lab = reg.flatten()
    N = len(lab)
    i, j = 0, int((lab == 1).nonzero()[0])
    a, b, e = int((lab == 0).sum()), int((lab == 1).sum()), eps / N
    pa, qb = (1 - eps) / a + e, (1 - eps) / b + e
    closed = a * (pa - e) * math.log(pa / e) + b * (qb - e) * math.log(qb / e)
    assert float(ds.sym_kl(A[i], A[j], "paper")) == pytest.approx(closed, rel=1e-12)
    # a threshold between D/2 and D merges the two blocks in one convention only
    tau = 0.75 * closed
    anchors = torch.tensor([i, j])
    assert len(ds.merge_attention(A, anchors, [tau, tau], "paper")) == 2
    assert len(ds.merge_attention(A, anchors, [tau, tau], "code")) == 1


def test_aggregation_rows_are_distributions_and_tile_queries():
    g = torch.Generator().manual_seed(1)
    m16 = torch.rand(256, 256, generator=g, dtype=torch.float64).softmax(1)
    m8 = torch.rand(64, 64, generator=g, dtype=torch.float64).softmax(1)
    A = ds.aggregate_attention([m16, m8, m8])
    assert A.shape == (256, 256)
    assert torch.allclose(A.sum(1), torch.ones(256, dtype=torch.float64), atol=1e-12)
    # a single coarse layer: the four fine queries of one coarse cell share one row
    A8 = ds.aggregate_attention([m8], out_res=16).reshape(16, 16, 256)
    assert torch.equal(A8[2, 4], A8[3, 5])
    # a constant map stays constant after upsampling
    Ac = ds.aggregate_attention([torch.full((64, 64), 1 / 64, dtype=torch.float64)], out_res=16)
    assert torch.allclose(Ac, torch.full_like(Ac, 1 / 256))


def test_threshold_monotone():
    g = torch.Generator().manual_seed(2)
    A = (3 * torch.randn(64, 64, generator=g, dtype=torch.float64)).softmax(1)
    counts = [len(ds.merge_attention(A, ds.anchor_grid(4, 8), (tau, tau)))
              for tau in (1e-6, 0.5, 1e6)]
    assert counts[0] >= counts[1] >= counts[2] == 1
    assert counts[0] == 16


def test_bad_input():
    A, _, _ = _block_attention()
    for bad in (0.0, -1.0, (0.9, 0.0), float("nan")):
        with pytest.raises(ValueError, match="kl_threshold"):
            ds.merge_attention(A, ds.anchor_grid(4, 16), bad)
        with pytest.raises(ValueError, match="kl_threshold"):
            ds.diffseg([A], kl_threshold=bad)
    with pytest.raises(ValueError, match="kl_convention"):
        ds.merge_attention(A, ds.anchor_grid(4, 16), 0.9, "half")
    with pytest.raises(ValueError, match="maps"):
        ds.aggregate_attention([torch.zeros(10, 10)])
    with pytest.raises(ValueError, match="num_points"):
        ds.anchor_grid(20, 16)


def test_model_maps_any_layout(pipe):
    size = 8 * pipe.vae_scale_factor              # an 8 x 8 latent keeps the test fast
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64)
    maps, res = ds.self_attention_maps(pipe, x, t=300)
    assert res == layer_resolutions(pipe.unet, "self", latent_hw=(8, 8))
    assert len(res) == len(attention_layers(pipe.unet, "self"))
    for m, r in zip(maps, res):
        assert m.shape == (1, r * r, r * r)
        assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-10)
    labels = ds.diffseg([m[0] for m in maps], num_points=4, kl_threshold=0.01, out_size=size)
    assert labels.shape == (size, size) and labels.dtype == torch.long
    # the recorder is gone afterwards: the UNet's output is unchanged
    before = dict(pipe.unet.attn_processors)
    ds.self_attention_maps(pipe, x, t=300)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == \
        {k: type(v) for k, v in before.items()}


def test_per_image_matching_is_invariant_to_segment_names():
    from diffnotes.recognition.eval_segmentation import matched_miou_per_image
    g = torch.Generator().manual_seed(4)
    truth = [torch.randint(0, 6, (8, 8), generator=g).numpy() for _ in range(3)]
    renamed = [(t * 5 + 2) % 6 for t in truth]              # a permutation of the names per image
    assert matched_miou_per_image(renamed, truth) == (1.0, 1.0)
    merged = [np.zeros_like(t) for t in truth]              # one segment per image
    miou, acc = matched_miou_per_image(merged, truth)
    # one segment matched to each image's most frequent class
    want = sum(np.bincount(t.ravel(), minlength=6).max() for t in truth) / sum(t.size for t in truth)
    assert acc == pytest.approx(want, abs=1e-12) and miou < 0.5


def test_code_threshold_equals_paper_threshold_doubled():
    g = torch.Generator().manual_seed(5)
    A = (2 * torch.randn(64, 64, generator=g, dtype=torch.float64)).softmax(1)
    anchors = ds.anchor_grid(4, 8)
    for tau in (0.05, 0.3, 1.0):
        code = ds.merge_attention(A, anchors, (tau,) * 3, "code")
        paper = ds.merge_attention(A, anchors, (2 * tau,) * 3, "paper")
        assert torch.equal(code, paper)


def test_explorer_static_twin_and_bad_threshold():
    from diffnotes.widgets import diffseg_explorer
    A, reg, _ = _block_attention()
    img = np.zeros((1, 16, 16, 3))
    ex = diffseg_explorer([A], img, taus=(0.5, 0.9), truth=[reg.numpy()], live=False)
    assert len(ex.frames) == 2 and "data:image/png;base64," in ex.to_html()
    with pytest.raises(ValueError, match="taus"):
        diffseg_explorer([A], img, taus=(0.0,), live=False)
    with pytest.raises(ValueError, match="kl_convention"):
        diffseg_explorer([A], img, kl_convention="half", live=False)
