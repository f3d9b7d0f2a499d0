"""diffnotes.representation.disentanglement: MIG, DCI, SAP on codes with known answers; β-VAE."""
import numpy as np
import pytest
import torch

from diffnotes.representation import disentanglement as Dn


def _factors(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    return np.c_[rng.uniform(0, 1, n), rng.uniform(-2, 2, n), rng.uniform(5, 9, n)]


def _rotation(k, angle=0.6):
    c, s = np.cos(angle), np.sin(angle)
    R = np.eye(k)
    R[:2, :2] = [[c, -s], [s, c]]
    return R


def test_perfect_code_scores_one():
    v = _factors()
    z = np.c_[3 * v[:, 2] + 1, -v[:, 0], 0.5 * v[:, 1]]          # permuted, rescaled, flipped
    m = Dn.mig(z, v)
    assert m["mig"] > 0.97                                       # plug-in MI bias only
    d = Dn.dci(z, v)
    assert d["disentanglement"] > 1 - 1e-9 and d["completeness"] > 1 - 1e-9
    assert d["informativeness"] > 1 - 1e-9
    assert Dn.sap(z, v)["sap"] > 1 - 1e-3


def test_rotated_code_scores_less():
    v = _factors()
    vs = (v - v.mean(0)) / v.std(0)
    z = vs @ _rotation(3).T
    perfect = vs
    for metric, key in ((Dn.mig, "mig"), (Dn.sap, "sap")):
        assert metric(z, v)[key] < metric(perfect, v)[key] - 0.2
    d = Dn.dci(z, v)
    assert d["disentanglement"] < 0.8 and d["completeness"] < 0.8
    assert d["informativeness"] > 1 - 1e-9                      # a rotation loses no information


def test_categorical_factor_and_forest():
    rng = np.random.default_rng(1)
    n = 3000
    v = np.c_[rng.integers(0, 5, n), rng.uniform(0, 1, n)]
    z = np.c_[v[:, 1] * 2, v[:, 0] + 0.0]
    assert Dn.mig(z, v, discrete=[True, False])["mig"] > 0.97
    assert Dn.sap(z, v, discrete=[True, False])["sap"] > 0.97
    d = Dn.dci(z, v, discrete=[True, False], method="forest")
    assert d["disentanglement"] > 0.9 and d["informativeness"] > 0.95
    noise = rng.normal(size=(n, 2))
    assert Dn.mig(noise, v, discrete=[True, False])["mig"] < 0.05


def test_beta_vae_loss_and_kl():
    torch.manual_seed(0)
    m = Dn.BetaVAE(16, 3, hidden=(8,)).double()
    x = torch.rand(5, 16, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    out = Dn.beta_vae_loss(m, x, 4.0, g)
    assert torch.allclose(out["loss"], out["recon"] + 4.0 * out["kl"])
    mu, logvar = m.encode(x)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert torch.allclose(out["kl"], kl, atol=1e-12)


def test_bad_input():
    v = _factors(100)
    with pytest.raises(ValueError, match="factors"):
        Dn.mig(np.zeros((99, 3)), v)
    with pytest.raises(ValueError, match="factors"):
        Dn.dci(np.zeros((100, 3)), v[:50])
    with pytest.raises(ValueError, match="factors"):
        Dn.sap(np.zeros((100, 3)), v[:10])
    with pytest.raises(ValueError, match="beta"):
        Dn.beta_vae_loss(Dn.BetaVAE(4, 2, (4,)), torch.rand(2, 4), beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        Dn.train_beta_vae(torch.rand(8, 4), beta=-0.5, steps=1)
    with pytest.raises(ValueError, match="discrete"):
        Dn.mig(np.zeros((100, 3)), v, discrete=[True])
