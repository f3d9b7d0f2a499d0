"""diffnotes.representation.autoencoders: eqs 2.13–2.17 (corrected), exactly."""
import pytest
import torch

from diffnotes.representation import autoencoders as A


def test_cae_penalty_of_linear_encoder_is_frobenius_norm():
    torch.manual_seed(0)
    m = A.Autoencoder(12, 3, hidden=()).double()
    x = torch.randn(7, 12, dtype=torch.float64)
    W = m.encoder[0].weight
    closed = A.contractive_penalty(m.encoder, x, "closed")
    jac = A.contractive_penalty(m.encoder, x, "jacobian")
    assert abs(float(closed) - float((W ** 2).sum())) < 1e-12
    assert abs(float(jac) - float((W ** 2).sum())) < 1e-12


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_cae_closed_form_one_layer_equals_torch_func(act):
    torch.manual_seed(1)
    m = A.Autoencoder(10, 4, hidden=(), encoder_activation=act).double()
    x = torch.randn(6, 10, dtype=torch.float64)
    a = A.contractive_penalty(m.encoder, x, "closed")
    b = A.contractive_penalty(m.encoder, x, "jacobian")
    assert abs(float(a) - float(b)) < 1e-12


def test_cae_two_layer_explicit_equals_torch_func_and_has_gradients():
    torch.manual_seed(2)
    m = A.Autoencoder(9, 2, hidden=(5,), activation="softplus").double()
    x = torch.randn(4, 9, dtype=torch.float64)
    a = A.contractive_penalty(m.encoder, x, "auto")
    b = A.contractive_penalty(m.encoder, x, "jacobian")
    assert abs(float(a) - float(b)) < 1e-12
    ga = torch.autograd.grad(a, m.encoder[0].weight)[0]
    gb = torch.autograd.grad(A.contractive_penalty(m.encoder, x, "jacobian"), m.encoder[0].weight)[0]
    assert torch.allclose(ga, gb, atol=1e-12)


def test_plain_linear_ae_recovers_pca():
    g = torch.Generator().manual_seed(0)
    D, d, N = 8, 2, 2000
    basis = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    scales = torch.tensor([3.0, 2.0, 0.3, 0.2, 0.1, 0.1, 0.05, 0.05], dtype=torch.float64)
    X = (torch.randn(N, D, generator=g, dtype=torch.float64) * scales) @ basis.T + 1.0
    torch.manual_seed(0)
    m = A.Autoencoder(D, d, hidden=()).double()
    A.train_autoencoder(m, X, "plain", steps=1500, batch_size=256, lr=1e-2, seed=0)
    _, U = A.pca_basis(X, d)
    from diffnotes.representation.manifold import principal_angles
    ang = principal_angles(m.decoder[0].weight.detach(), U)
    assert float(ang.max()) < 0.05                         # radians
    # and the reconstruction error reaches PCA's (the sum of the dropped variances)
    mu = X.mean(0)
    pca_err = float((((X - mu) - (X - mu) @ U @ U.T) ** 2).sum(1).mean())
    assert float(A.reconstruction_loss(m, X)) < pca_err * 1.02


def test_denoising_loss_targets_clean_input():
    torch.manual_seed(0)
    m = A.Autoencoder(6, 2).double()
    x = torch.rand(5, 6, dtype=torch.float64)
    xt = A.corrupt(x, "gaussian", 0.3, torch.Generator().manual_seed(0))
    loss = A.denoising_loss(m, x, x_tilde=xt)
    assert torch.allclose(loss, ((x - m(xt)) ** 2).sum(1).mean())
    # the printed eq 2.17 (x̃ − g(f(x))) is a different quantity
    assert not torch.allclose(loss, ((xt - m(x)) ** 2).sum(1).mean())


def test_masking_corruption():
    x = torch.ones(2000, 10, dtype=torch.float64)
    xt = A.corrupt(x, "mask", 0.25, torch.Generator().manual_seed(0))
    assert set(xt.unique().tolist()) <= {0.0, 1.0}
    assert abs(float((xt == 0).double().mean()) - 0.25) < 0.01


def test_bad_input():
    m = A.Autoencoder(6, 2)
    with pytest.raises(ValueError, match="level"):
        A.corrupt(torch.zeros(2, 6), "gaussian", 0.0)
    with pytest.raises(ValueError, match="level"):
        A.corrupt(torch.zeros(2, 6), "gaussian", -0.1)
    with pytest.raises(ValueError, match="kind"):
        A.corrupt(torch.zeros(2, 6), "salt")
    with pytest.raises(ValueError, match="x"):
        A.reconstruction_loss(m, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="lam"):
        A.contractive_loss(m, torch.zeros(2, 6), lam=-1.0)
    with pytest.raises(ValueError, match="closed"):
        A.contractive_penalty(A.Autoencoder(6, 2, hidden=(4, 4)).encoder, torch.zeros(2, 6), "closed")


def test_code_motion_is_governed_by_encoder_jacobian():
    # "the norm ‖J_g(h)‖ is large" should read J_f(x): h(x + δ) − h(x) ≈ J_f(x) δ
    torch.manual_seed(3)
    m = A.Autoencoder(8, 3, hidden=(6,)).double()
    x = torch.randn(1, 8, dtype=torch.float64)
    delta = 1e-6 * torch.randn(1, 8, dtype=torch.float64)
    Jf = A.encoder_jacobian(m.encoder, x)[0]                # (d, D) = (3, 8)
    dh = (m.encode(x + delta) - m.encode(x))[0]
    assert torch.allclose(dh, Jf @ delta[0], atol=1e-11)
    Jg = A.decoder_jacobian(m.decoder, m.encode(x))[0]      # (D, d) = (8, 3): cannot act on δ
    assert Jg.shape == (8, 3)
