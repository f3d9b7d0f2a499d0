"""diffnotes.recognition.correspondence: the §5.8 losses (worked values), the Gaussian target,
crops, and Hedlin et al.'s prompt optimisation (eq 5.46 as an argmin) on both UNet layouts."""
import math

import pytest
import torch

from diffnotes.attention import attention_layers
from diffnotes.recognition import correspondence as C

R90 = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)


def rot(x):
    return x @ R90.T


def test_losses_vanish_where_they_should():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, generator=g, dtype=torch.float64)
    A = torch.randn(2, 2, generator=g, dtype=torch.float64) + 2 * torch.eye(2, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)

    def Ts(p):
        return p @ A.T + b

    def Tt(p):
        return (p - b) @ torch.linalg.inv(A).T
    assert float(C.correspondence_loss(Ts, x, Ts(x))) == 0.0
    assert float(C.cycle_loss(Ts, Tt, x)) < 1e-12
    W = torch.randn(2, 5, generator=g, dtype=torch.float64)

    def phi_s(p):
        return torch.tanh(p @ W)

    def phi_t(p):                     # phi_t = phi_s o T_s^{-1}
        return phi_s(Tt(p))
    assert float(C.alignment_loss(phi_s, phi_t, x, Ts(x))) < 1e-24


def test_cycle_loss_of_two_quarter_turns_is_four():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # T_t(T_s(x)) = -x, so each point is off by |2x|^2 = 4
    assert float(C.cycle_loss(rot, rot, x)) == pytest.approx(4.0, abs=1e-12)


def test_gaussian_target_values():
    M = C.gaussian_map((10.5, 20.5), 3.0, (32, 32))
    assert float(M.max()) == 1.0 and float(M[20, 10]) == 1.0
    assert float(M[20, 13]) == pytest.approx(math.exp(-0.5), abs=1e-12)        # 0.606531
    assert float(M[26, 10]) == pytest.approx(0.135335283, abs=1e-9)            # 2 sigma
    with pytest.raises(ValueError, match="sigma"):
        C.gaussian_map((1, 1), 0.0, (4, 4))


def test_crop_uncrop_round_trip_and_crop_averaging_keeps_the_peak():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 20, generator=g, dtype=torch.float64)
    for _ in range(5):
        box = C.crop_box((20, 20), 0.7, g)
        xc = C.crop(x, box, out_size=(box[2], box[2]))
        canvas, cover = C.uncrop(xc, box, (20, 20))
        assert torch.equal(C.crop(canvas, box, out_size=(box[2], box[2])), xc)   # C(U(x)) = x
        assert float(cover.sum()) == box[2] ** 2
    # the average of uncropped copies of a single-peak map keeps its argmax when every crop
    # holds the peak (the query kept inside, the code's margin rule)
    M = C.gaussian_map((30.5, 22.5), 4.0, (64, 64))
    acc, cov = torch.zeros(64, 64, dtype=torch.float64), torch.zeros(64, 64, dtype=torch.float64)
    for _ in range(10):
        box = C.crop_box((64, 64), 0.9317, g, point=(30.5, 22.5))
        x0, y0, s = box
        assert x0 + 0.15 * s <= 30.5 <= x0 + s - 0.15 * s
        canvas, c = C.uncrop(C.crop(M, box), box, (64, 64))
        acc, cov = acc + canvas, cov + c
    avg = acc / cov.clamp_min(1)
    assert int(avg.argmax()) == int(M.argmax())


def test_official_defaults_scaled(pipe):
    # noise_level = -8 of a 50-step DDIM grid with offset 1: t = 141
    assert C.default_timestep(pipe.scheduler) == 141
    ups = [n for n in attention_layers(pipe.unet, "cross") if n.startswith("up_blocks")]
    assert C.default_layers(pipe.unet) == ups[:4]
    if len(ups) == 9:      # SD's layout: the code's layers [5, 6, 7, 8]
        assert [n.split(".transformer")[0] for n in C.default_layers(pipe.unet)] == [
            "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",
            "up_blocks.2.attentions.0"]


def _image(pipe):
    from diffnotes.data.shapes import render_objects
    img, _ = render_objects([dict(shape="star", color="red", center=(30, 28))])
    return img[None]


def test_prompt_optimisation_is_an_argmin_and_leaves_the_model_alone(pipe):
    x = _image(pipe)
    before = [p.detach().clone() for p in pipe.unet.parameters()]
    losses, grads = [], []
    e = C.optimize_embedding(pipe, x, (30.0, 20.0), steps=4, lr=0.05, crop_fraction=1.0,
                             generator=torch.Generator().manual_seed(0),
                             callback=lambda d: losses.append(d["loss"]))
    assert losses[-1] < losses[0]                       # eq 5.46 minimises
    assert all(torch.equal(a, b) for a, b in zip(before, pipe.unet.parameters()))
    assert not any(p.requires_grad and p.grad is not None for p in pipe.unet.parameters())
    e0 = torch.randn(e.shape, generator=torch.Generator().manual_seed(0), dtype=e.dtype)
    assert not torch.equal(e, e0)
    M = C.attention_heatmap(pipe, x, e, crops=3)
    assert M.shape == (64, 64) and torch.isfinite(M).all()


def test_zero_steps_keep_the_random_start(pipe):
    x = _image(pipe)
    e = C.optimize_embedding(pipe, x, (30.0, 20.0), steps=1, lr=1e-300,
                             generator=torch.Generator().manual_seed(3), crop_fraction=1.0)
    e0 = torch.randn(e.shape, generator=torch.Generator().manual_seed(3), dtype=e.dtype)
    assert torch.allclose(e, e0, atol=1e-250, rtol=0)


def test_correspondence_runs_and_bad_inputs_raise(pipe):
    x = _image(pipe)
    uv = C.optimize_prompt_correspondence(pipe, x, x, (30.0, 20.0), rounds=1, steps=2,
                                          inference_crops=2)
    assert uv.shape == (2,) and 0 <= float(uv[0]) <= 64 and 0 <= float(uv[1]) <= 64
    with pytest.raises(ValueError, match="point"):
        C.optimize_prompt_correspondence(pipe, x, x, (70.0, 20.0), rounds=1, steps=1)
    with pytest.raises(ValueError, match="layers"):
        C.optimize_embedding(pipe, x, (3.0, 3.0), steps=1, layers=["up_blocks.9.attn2"])
    with pytest.raises(ValueError, match="rounds"):
        C.optimize_prompt_correspondence(pipe, x, x, (3.0, 3.0), rounds=0)


def test_the_crop_objective_must_be_minimised_not_maximised():
    # eq 5.46 over maps M in [0, 1]^(H x W): per pixel (m - g)^2 is minimised at m = g and
    # maximised at m = 0 where g > 1/2, m = 1 elsewhere (brute force over a grid of m)
    Ms = C.gaussian_map((20.5, 11.5), 3.0, (32, 32))
    m = torch.linspace(0, 1, 101, dtype=torch.float64)
    cost = (m[:, None, None] - Ms[None]) ** 2                       # (101, H, W)
    M_min = m[cost.argmin(0)]
    M_max = m[cost.argmax(0)]
    q = int(Ms.argmax())
    assert int(M_min.argmax()) == q                                 # argmin: peaks at the query
    assert float(M_max.flatten()[q]) == 0.0                         # argmax: empty at the query
    assert float((M_max.flatten() == 1).float().mean()) > 0.9       # and lit everywhere else


def test_one_unet_evaluation_per_step_at_a_fixed_t(pipe):
    # not a denoising chain: each optimisation step calls the UNet once, at the same t
    calls = []
    h = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: calls.append(int((a[1] if len(a) > 1 else kw["timestep"]).reshape(-1)[0])),
        with_kwargs=True)
    try:
        C.optimize_embedding(pipe, _image(pipe), (30.0, 20.0), steps=3, crop_fraction=1.0)
    finally:
        h.remove()
    assert calls == [141, 141, 141]


def test_explorer_static_twin_has_every_frame(pipe):
    from diffnotes.data.shapes import render_objects
    from diffnotes.widgets import StaticExplorer
    from diffnotes.widgets.correspondence import correspondence_explorer
    a, _, ka = render_objects([dict(shape="square", color="red", center=(28, 30))], keypoints=True)
    b, _, kb = render_objects([dict(shape="square", color="blue", center=(36, 33))],
                              background="noise", keypoints=True)
    ka, kb = list(ka[0].values()), list(kb[0].values())
    blocks = ("mid_block", "up_blocks.0")
    ex = correspondence_explorer(pipe, a, b, ka, kb, timesteps=(300,), blocks=blocks,
                                 live=False)
    assert isinstance(ex, StaticExplorer) and len(ex.frames) == 2
    with pytest.raises(ValueError, match="blocks"):
        correspondence_explorer(pipe, a, b, ka, kb, blocks=("up_blocks.9",), live=False)
    with pytest.raises(ValueError, match="kp_source"):
        correspondence_explorer(pipe, a, b, ka[:2], kb, live=False)
