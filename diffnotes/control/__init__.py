"""Part IV, structured and multimodal control (issue 14).

- :mod:`.compose`: several condition channels in one model — :class:`Channel` (its own null
  embedding and drop rate q_k(t)), :func:`channel_dropout` (per-channel dropout for training,
  q = u^{1/K}), :func:`compose` (ε_u + Σ w_k d_k − Σ w⁻_k d_k, w⁻ ≥ 0), :class:`SNRSchedule`
  (the clipped SNR^α weight), :func:`composed_eps_model` (all channels in one batched pass);
  the controlled-generation blog, §2.4.

Names of other submodules are loaded on first use (``_NAMED``), so ``import diffnotes.control``
stays cheap. ``compose`` is the exception: the function has its module's name, and importing the
submodule sets the package attribute ``compose`` to the *module*; the submodule is small (torch
and :mod:`diffnotes.guidance` only), so it is imported here and the function put back on top,
which makes ``from diffnotes.control import compose`` the function whatever was imported first.
"""
import importlib

from . import compose as _compose_module

Channel = _compose_module.Channel
channel_dropout = _compose_module.channel_dropout
SNRSchedule = _compose_module.SNRSchedule
composed_eps_model = _compose_module.composed_eps_model
compose = _compose_module.compose          # the function, not the submodule (see above)

#: lazily loaded names: name -> submodule (none yet besides compose's, imported above)
_NAMED: dict = {}

__all__ = ["Channel", "channel_dropout", "compose", "SNRSchedule", "composed_eps_model",
           *_NAMED]


def __getattr__(name):
    if name in _NAMED:
        return getattr(importlib.import_module(f"{__name__}.{_NAMED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
