"""Utilities and the explorer mechanism (live widget and static twin)."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffnotes.utils import (check_decreasing, check_timestep, image_grid, pick_device, pick_dtype,
                             seed_everything, to_pil)
from diffnotes.widgets import StaticExplorer, explorer, static_explorer


def test_seed_everything_reproduces_draws():
    g1 = seed_everything(3)
    a = torch.randn(3), np.random.rand(), torch.randn(2, generator=g1)
    g2 = seed_everything(3)
    b = torch.randn(3), np.random.rand(), torch.randn(2, generator=g2)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_everything(1.5)


def test_device_and_dtype_on_cpu():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype("cpu") == torch.float32
    assert pick_dtype("cuda") == torch.float16


def test_to_pil_and_grid():
    im = to_pil(torch.zeros(3, 8, 8))            # [-1, 1] → 0.5 grey
    assert im.size == (8, 8) and np.asarray(im)[0, 0, 0] == 128
    assert to_pil(np.ones((4, 5))).size == (5, 4)
    grid = image_grid([im] * 5, cols=3, pad=1)
    assert grid.size == (3 * 8 + 2, 2 * 8 + 1)
    with pytest.raises(ValueError, match="images must not be empty"):
        image_grid([])


def test_checks_name_the_argument():
    with pytest.raises(ValueError, match=r"t must lie in \[0, 9\].*got 10"):
        check_timestep(10, 10)
    with pytest.raises(ValueError, match="timesteps must be strictly decreasing"):
        check_decreasing([3, 4], 10)
    with pytest.raises(ValueError, match="timesteps must not be empty"):
        check_decreasing([], 10)


def _render(a, b):
    arr = np.zeros((4, 4, 3))
    arr[..., 0], arr[..., 1] = a, b
    return arr


def test_static_twin_has_every_frame_and_no_external_resources():
    ex = static_explorer(_render, {"a": [0.0, 0.5, 1.0], "b": [0.0, 1.0]}, title="t", progress=False)
    assert isinstance(ex, StaticExplorer) and len(ex.frames) == 6
    html = ex.to_html()
    assert html.count("data:image/png;base64,") == 6 + 1  # six frames + the initial <img>
    assert html.count('type="range"') == 2
    assert not re.search(r"(src|href)=\"https?://", html)   # nothing from a CDN
    # frame (2, 1) is the render of a=1.0, b=1.0
    import io
    px = np.asarray(Image.open(io.BytesIO(ex.frames[(2, 1)])))
    assert px[0, 0, 0] == 255 and px[0, 0, 1] == 255


def test_explorer_static_when_building(monkeypatch):
    monkeypatch.setenv("DIFFNOTES_STATIC", "1")
    assert isinstance(explorer(_render, {"a": [0, 1], "b": [0]}), StaticExplorer)
    live = explorer(_render, {"a": [0, 1], "b": [0]}, live=True)
    import ipywidgets as W
    assert isinstance(live, W.VBox)
    with pytest.raises(ValueError, match="params"):
        explorer(_render, {})
