"""Label-efficient segmentation (Ahmad's notes, §5.12; Baranchuk et al. 2022): pixel features of
any layout, the MLP widths, majority voting, and a perfect score on separable toy features."""
import pytest
import torch

from diffnotes.recognition import label_efficient as le


def _toy(n_img=3, K=4, D=6, size=8, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (n_img, size, size), generator=g)
    centres = 3 * torch.randn(K, D, generator=g)
    feats = centres[labels].permute(0, 3, 1, 2) + noise * torch.randn(n_img, D, size, size,
                                                                       generator=g)
    return feats, labels


def test_separable_features_are_segmented_perfectly():
    f_train, y_train = _toy(seed=0)
    f_test, y_test = _toy(seed=0)
    g = torch.Generator().manual_seed(1)
    f_test = f_test + 0.1 * torch.randn(f_test.shape, generator=g)   # fresh noise, same classes
    models = le.train_ensemble(f_train, y_train, 4, n_models=3, steps=60, batch_size=64,
                               generator=torch.Generator().manual_seed(0))
    pred = le.predict(models, f_test)
    assert pred.shape == y_test.shape
    assert torch.equal(pred, y_test)      # 100% pixel accuracy


def test_widths_and_softmax():
    assert [m.out_features for m in le.PixelMLP(10, 6).layers if hasattr(m, "out_features")] == [128, 32, 6]
    assert [m.out_features for m in le.PixelMLP(10, 34).layers if hasattr(m, "out_features")] == [256, 128, 34]
    net = le.PixelMLP(5, 3).eval()
    p = net(torch.randn(7, 5)).softmax(-1)
    assert torch.allclose(p.sum(-1), torch.ones(7))


def test_majority_vote_matches_torch_mode():
    assert le.majority_vote(torch.tensor([[0], [1], [1]])).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    votes = torch.randint(0, 4, (6, 500), generator=g)            # many ties
    assert torch.equal(le.majority_vote(votes), torch.mode(votes, dim=0).values)
    assert le.majority_vote(torch.tensor([[2, 0], [1, 3]])).tolist() == [1, 0]   # ties: smallest


def test_bad_input():
    f, y = _toy()
    with pytest.raises(ValueError, match="labels"):
        le.train_ensemble(f, y[:, :4], 4, n_models=1, steps=1)
    with pytest.raises(ValueError, match="labels"):
        le.train_ensemble(f, y[:2], 4, n_models=1, steps=1)
    with pytest.raises(ValueError, match="labels"):
        le.train_ensemble(f, y + 4, 4, n_models=1, steps=1)
    models = le.train_ensemble(f, y, 4, n_models=1, steps=1)
    with pytest.raises(ValueError, match="features"):
        le.predict(models, f[:, :3])
    with pytest.raises(ValueError, match="num_classes"):
        le.train_ensemble(f, y, 1, n_models=1, steps=1)


def test_pixel_features_any_layout(pipe):
    size = 8 * pipe.vae_scale_factor              # an 8 x 8 latent keeps the test fast
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0),
                   dtype=torch.float64)
    blocks = le.decoder_blocks(pipe.unet)
    f = le.pixel_features(pipe, x, timesteps=(50, 150), blocks=blocks, out_size=16)
    modules = dict(pipe.unet.named_modules())
    C = sum(modules[b].resnets[-1].out_channels for b in blocks)
    assert f.shape == (1, 2 * C, 16, 16)            # D = |t| * sum_i C_i
    # one noise draw shared by the time steps: with t equal twice the halves agree exactly
    f2 = le.pixel_features(pipe, x, timesteps=(150, 150), blocks=blocks, out_size=16)
    assert torch.equal(f2[:, :C], f2[:, C:])
    assert torch.equal(f2[:, :C], f[:, C:])
