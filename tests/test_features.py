"""diffnotes.features: extraction at a chosen t (both UNet layouts), eq 5.33's argmax
correspondence, cycle consistency and optimal-transport matching."""
import numpy as np
import pytest
import torch

from diffnotes import features as FT
from diffnotes.attention import AttentionStore, attention_layers

A = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=float)
B = np.array([[3, 6, 9], [2, 5, 8], [1, 4, 7]], dtype=float)
# Ahmad's notes, §5.8, as printed: A (row, col) -> B (row, col), 1-based
PRINTED = {(1, 1): (1, 3), (1, 2): (2, 3), (1, 3): (3, 3), (2, 1): (1, 2), (2, 2): (2, 2),
           (2, 3): (3, 2), (3, 1): (1, 1), (3, 2): (2, 1), (3, 3): (3, 1)}


def test_3x3_example_is_a_counter_clockwise_rotation():
    assert np.array_equal(B, np.rot90(A))          # numpy's rot90 turns counter-clockwise
    assert not np.array_equal(B, np.rot90(A, -1))  # not the clockwise rotation the text names


def test_3x3_example_returns_the_corrected_map():
    C = FT.dense_correspondence(torch.tensor(A)[None], torch.tensor(B)[None], "neg_l1")
    got = {(r + 1, c + 1): tuple(int(v) + 1 for v in C[r, c]) for r in range(3) for c in range(3)}
    assert got == {(r, c): (4 - c, r) for r in range(1, 4) for c in range(1, 4)}
    # the same intensity meets the same intensity; the printed list pairs k with 10 - k
    assert all(A[r - 1, c - 1] == B[R - 1, C_ - 1] for (r, c), (R, C_) in got.items())
    assert got != PRINTED
    assert all(A[r - 1, c - 1] + B[R - 1, C_ - 1] == 10 for (r, c), (R, C_) in PRINTED.items())


def _perm_pair(seed=0, C=8, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    f1 = torch.randn(C, h, w, generator=g, dtype=torch.float64)
    perm = torch.randperm(h * w, generator=g)
    f2 = f1.flatten(1)[:, perm].reshape(C, h, w)      # f2[q] = f1[perm[q]]
    inv = torch.argsort(perm)                         # source p sits at target inv[p]
    truth = torch.stack([inv // w, inv % w], -1).reshape(h, w, 2)
    return f1, f2, truth


@pytest.mark.parametrize("sim", ["cos", "neg_l1"])
def test_random_permutation_is_recovered_by_argmax(sim):
    f1, f2, truth = _perm_pair()
    assert torch.equal(FT.dense_correspondence(f1, f2, sim), truth)
    err, ok = FT.cycle_consistency(f1, f2, sim)
    assert ok.all() and float(err.max()) == 0.0


def test_dot_recovers_a_permutation_of_unit_features_only():
    f1, f2, truth = _perm_pair(1)
    n1, n2 = f1 / f1.norm(dim=0), f2 / f2.norm(dim=0)
    assert torch.equal(FT.dense_correspondence(n1, n2, "dot"), truth)
    # raw Gaussian features: a longer vector can beat the right one under the dot product
    assert not torch.equal(FT.dense_correspondence(f1, f2, "dot"), truth)


@pytest.mark.parametrize("method", ["emd", "sinkhorn"])
def test_random_permutation_is_recovered_by_optimal_transport(method):
    f1, f2, truth = _perm_pair(2)
    match, plan = FT.ot_match(f1, f2, "cos", method=method, reg=0.01, n_iter=500)
    assert torch.equal(match, truth)
    n = plan.shape[0]
    assert torch.allclose(plan.sum(1), torch.full((n,), 1.0 / n, dtype=plan.dtype), atol=1e-6)
    if method == "emd":      # an exact plan of equal sizes is a (scaled) permutation matrix
        assert int((plan > 1e-12).sum()) == n


def test_ot_is_one_to_one_where_argmax_is_not():
    # two sources both nearest to one target: argmax sends both there, OT sends one elsewhere
    f1 = torch.tensor([[1.0, 0.9], [0.0, 0.1]], dtype=torch.float64)[:, None, :]   # (2, 1, 2)
    f2 = torch.tensor([[1.0, -1.0], [0.05, 0.2]], dtype=torch.float64)[:, None, :]
    arg = FT.dense_correspondence(f1, f2, "cos")[0, :, 1]
    assert arg.tolist() == [0, 0]
    ot, _ = FT.ot_match(f1, f2, "cos")
    assert sorted(ot[0, :, 1].tolist()) == [0, 1]


def test_cosine_is_invariant_to_positive_per_pixel_scaling():
    g = torch.Generator().manual_seed(3)
    f1 = torch.randn(6, 4, 5, generator=g, dtype=torch.float64)
    f2 = torch.randn(6, 4, 5, generator=g, dtype=torch.float64)
    s = torch.rand(1, 4, 5, generator=g, dtype=torch.float64) * 10 + 0.01
    assert torch.equal(FT.dense_correspondence(f1, f2 * s, "cos"),
                       FT.dense_correspondence(f1, f2, "cos"))
    assert torch.allclose(FT.similarity_matrix(f1 * s, f2, "cos"),
                          FT.similarity_matrix(f1, f2, "cos"), atol=1e-12)
    assert not torch.equal(FT.dense_correspondence(f1, f2 * s, "dot"),
                           FT.dense_correspondence(f1, f2, "dot"))


def test_match_points_follows_a_shift_at_image_resolution():
    # features = the position itself: a shift of the image by (dx, dy) pixels shifts them
    H = W = 32
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")

    def feats(ox, oy):
        return torch.stack([xx + ox / 4, yy + oy / 4]).double()   # 4 image pixels per cell
    pts = torch.tensor([[10.0, 14.0], [22.0, 6.0]], dtype=torch.float64)   # feature-cell centres
    out = FT.match_points(feats(0, 0), feats(-4, -8), pts, (H, W), similarity="neg_l1")
    # the answer is a pixel centre next to the shifted point (the upsampled map peaks there)
    assert torch.allclose(out, pts + torch.tensor([4.0, 8.0], dtype=torch.float64), atol=0.51)


def test_bad_inputs_raise():
    f1 = torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match="f2"):
        FT.dense_correspondence(f1, torch.randn(5, 3, 3))
    with pytest.raises(ValueError, match="similarity"):
        FT.dense_correspondence(f1, f1, "l2")
    with pytest.raises(ValueError, match="points"):
        FT.match_points(f1, f1, [[40.0, 3.0]], (32, 32))
    with pytest.raises(ValueError, match="points"):
        FT.match_points(f1, f1, [[3.0, -0.5]], (32, 32))
    with pytest.raises(ValueError, match="f2"):
        FT.ot_match(f1, torch.randn(2, 3, 3))


# ------------------------------------------------------------------ extraction on both layouts
def _images(n=2, seed=0):
    from diffnotes.data.shapes import generate_scenes
    return generate_scenes(n, seed=seed).images


def _blocks(pipe):
    return ("mid_block", "up_blocks.1")


def test_extract_block_equals_a_forward_hook(pipe):
    x = _images()
    g = torch.Generator().manual_seed(5)
    got = FT.extract(pipe, x, 300, layers=_blocks(pipe), generator=g)
    # the same computation by hand, with a plain forward hook on the full UNet
    z0 = pipe.vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2).double() * 2 - 1
                         ).latent_dist.mean * pipe.vae.config.scaling_factor
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5), dtype=z0.dtype)
    ab = pipe.scheduler.alphas_cumprod[300].double()
    zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    from diffnotes.editing.common import encode_prompts
    ctx = encode_prompts(pipe, "").expand(2, -1, -1)
    store = {}
    mods = dict(pipe.unet.named_modules())
    hooks = [mods[b].register_forward_hook(
        lambda m, i, o, b=b: store.__setitem__(b, o[0] if isinstance(o, tuple) else o))
        for b in _blocks(pipe)]
    with torch.no_grad():
        pipe.unet(zt, torch.full((2,), 300), encoder_hidden_states=ctx)
    for h in hooks:
        h.remove()
    for b in _blocks(pipe):
        assert got[b].dtype == torch.float64
        assert torch.allclose(got[b], store[b], atol=1e-10, rtol=0), b
    # the noise argument and the generator agree; the same seed gives the same features
    again = FT.extract(pipe, x, 300, layers=_blocks(pipe), noise=eps)
    assert all(torch.equal(again[b], got[b]) for b in _blocks(pipe))


def test_extract_attention_equals_the_attention_store(pipe):
    x = _images(1, seed=2)
    names = attention_layers(pipe.unet, "cross")[-2:] + attention_layers(pipe.unet, "self")[:1]
    got = FT.extract(pipe, x, 200, layers=names, kind="attention", prompt="a red star")
    assert set(got) == set(names)
    for n, m in got.items():
        assert m.ndim == 3 and m.shape[0] == 1
        assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-10)
    # mid block and first decoder layer: named_modules lists up_blocks before mid_block, the
    # forward pass calls the mid block first; both maps must come back
    cross = attention_layers(pipe.unet, "cross")
    mid = [n for n in cross if n.startswith("mid_block")]
    first_up = [n for n in cross if n.startswith("up_blocks")][:1]
    both = FT.extract(pipe, x, 200, layers=mid + first_up, kind="attention")
    assert set(both) == set(mid + first_up)
    # a prefix selects every cross-attention layer under it
    ups = FT.extract(pipe, x, 200, layers="up_blocks.1", kind="attention", prompt="a red star")
    assert set(ups) == {n for n in attention_layers(pipe.unet, "cross")
                        if n.startswith("up_blocks.1.")}
    # peer: the library's AttentionStore on the same call
    z0 = FT.encode_latents(pipe, x)
    zt = FT.noised_latents(pipe, z0, 200)
    from diffnotes.editing.common import encode_prompts
    with AttentionStore(kinds=("cross", "self")).attach(pipe.unet) as st, torch.no_grad():
        pipe.unet(zt, torch.full((1,), 200), encoder_hidden_states=encode_prompts(pipe, "a red star"))
        for n in names:
            ref = st.layer_map(n)                        # (1, h, w, M)
            assert torch.allclose(got[n], ref.reshape(1, -1, ref.shape[-1]), atol=1e-10), n


def test_extract_bad_arguments(pipe):
    x = _images(1)
    with pytest.raises(ValueError, match="blocks|layers"):
        FT.extract(pipe, x, 100, layers=("no_such_block",))
    with pytest.raises(ValueError, match="kind"):
        FT.extract(pipe, x, 100, kind="resnet")
    with pytest.raises(ValueError, match="t"):
        FT.extract(pipe, x, 5000)
    with pytest.raises(ValueError, match="noise"):
        FT.extract(pipe, x, 100, noise=torch.zeros(1, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="layers"):
        FT.extract(pipe, x, 100, layers=("down_blocks.9",), kind="attention")
