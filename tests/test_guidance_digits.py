"""Guidance with the shipped digits models: the class-conditional UNet and the noise-conditional
classifier (diffnotes/weights/digits). These load the shipped weights; they are never skipped."""
import copy

import pytest
import torch

from diffnotes import guidance as G
from diffnotes.ddim import ddim_sample
from diffnotes.models import digits as D
from diffnotes.schedules import make_timesteps

pytestmark = pytest.mark.slow


def _model(digits_unet):
    return lambda x, t, y: digits_unet(x, t, class_labels=y).sample


def test_batched_cfg_equals_two_passes_and_digits_cond_uncond(digits_unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, D.IMAGE_SIZE, D.IMAGE_SIZE, generator=g)
    t = torch.tensor([900, 500, 100, 10])
    y = torch.tensor([3, 8, 0, 7])
    calls = []
    base = _model(digits_unet)

    def model(x_, t_, y_):
        calls.append(y_.clone())
        return base(x_, t_, y_)

    with torch.no_grad():
        out = G.guided_eps_model(model, y, D.NULL_CLASS, 4.0)(x, t)
        eu = D.digits_eps_model(digits_unet, None)(x, t)
        ec = D.digits_eps_model(digits_unet, y)(x, t)
        eu2, ec2 = D.digits_cond_uncond(digits_unet)(x, t, y)
    assert len(calls) == 1 and calls[0].tolist() == [10] * 4 + y.tolist()
    torch.testing.assert_close(out, eu + 4.0 * (ec - eu), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, G.cfg(eu2, ec2, 4.0), rtol=1e-4, atol=1e-4)
    # scale 1 is the conditional model, scale 0 the unconditional one
    with torch.no_grad():
        torch.testing.assert_close(G.guided_eps_model(base, y, D.NULL_CLASS, 1.0)(x, t), ec,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(G.guided_eps_model(base, y, D.NULL_CLASS, 0.0)(x, t), eu,
                                   rtol=1e-4, atol=1e-4)


def test_classifier_grad_matches_finite_differences(digits_clf):
    c64 = copy.deepcopy(digits_clf).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, D.IMAGE_SIZE, D.IMAGE_SIZE, generator=g, dtype=torch.float64) * 0.5
    t = torch.tensor([50, 300, 700])
    y = torch.tensor([2, 5, 9])
    grad = G.classifier_grad(c64, x, t, y)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    h = 1e-5

    def logp(z):
        with torch.no_grad():
            return torch.log_softmax(c64(z, t), 1).gather(1, y[:, None]).sum()

    fd = (logp(x + h * v) - logp(x - h * v)) / (2 * h)
    assert abs(fd.item() - (grad * v).sum().item()) < 1e-6 * max(1.0, abs(fd.item()))


def test_classifier_guidance_raises_classifier_confidence(digits_unet, digits_clf):
    """Classifier guidance on the unconditional model: with scale 10 the classifier (at t = 0)
    agrees with the requested label far more often than without guidance."""
    _, ac = D.schedule()
    g = torch.Generator().manual_seed(2)
    y = torch.arange(10).repeat(2)
    x_T = torch.randn(len(y), 1, D.IMAGE_SIZE, D.IMAGE_SIZE, generator=g)
    ts = make_timesteps(10)
    eps_u = D.digits_eps_model(digits_unet, None)
    out = {}
    for s in (0.0, 10.0):
        x = ddim_sample(G.classifier_guided_eps_model(eps_u, digits_clf, y, ac, s), x_T, ts, ac)
        with torch.no_grad():
            p = torch.softmax(digits_clf(x.clamp(-1, 1), 0), 1)
        out[s] = (p.argmax(1) == y).float().mean().item()
    assert out[0.0] < 0.4 and out[10.0] > out[0.0] + 0.4, out


def test_cfg_raises_accuracy_and_lowers_diversity(digits_unet, digits_clf):
    """CFG on the class-conditional UNet: accuracy (by the classifier) at scale 3 is far above
    the unconditional model's and at least the conditional model's; and the samples of one class
    spread less at scale 5 than at scale 1."""
    _, ac = D.schedule()
    g = torch.Generator().manual_seed(3)
    y = torch.arange(10).repeat_interleave(4)
    x_T = torch.randn(len(y), 1, D.IMAGE_SIZE, D.IMAGE_SIZE, generator=g)
    scales = [0.0, 1.0, 3.0, 5.0]
    s_rows = torch.tensor(scales).repeat_interleave(len(y))
    with torch.no_grad():
        x = ddim_sample(G.guided_eps_model(_model(digits_unet), y.repeat(len(scales)), D.NULL_CLASS,
                                           s_rows), x_T.repeat(len(scales), 1, 1, 1),
                        make_timesteps(15), ac).clamp(-1, 1)
        x = x.reshape(len(scales), len(y), 1, D.IMAGE_SIZE, D.IMAGE_SIZE)
        acc = [(digits_clf(xs, 0).argmax(1) == y).float().mean().item() for xs in x]
    div = [torch.stack([torch.pdist(xs[y == c].flatten(1)).mean() for c in range(10)]).mean().item()
           for xs in x]
    assert acc[0] < 0.35, acc
    assert acc[2] > acc[0] + 0.4 and acc[2] >= acc[1] - 0.05, acc
    assert div[3] < div[1], div


def test_guidance_explorer_with_digits_setup(digits_unet):
    from diffnotes.widgets import StaticExplorer
    from diffnotes.widgets.guidance import ClassConditional, guidance_explorer

    setup = ClassConditional.digits(digits_unet, num_steps=4)
    ex = guidance_explorer(setup, [3], scales=[0.0, 5.0], seeds=[0], n_samples=2, live=False)
    assert isinstance(ex, StaticExplorer) and len(ex.frames) == 2
    a, b = ex.frames.values()
    assert a != b


def test_classifier_grad_bad_label(digits_clf):
    x = torch.zeros(2, 1, D.IMAGE_SIZE, D.IMAGE_SIZE)
    with pytest.raises(ValueError, match="y"):
        G.classifier_grad(digits_clf, x, 10, torch.tensor([1, 12]))
