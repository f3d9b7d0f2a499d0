"""Part I, restoration: inverse problems y = A x + σ_y n solved with a diffusion prior (Zhu's slides).

Every solver takes an ``eps_model(x, t)`` callable like the samplers (any model: the analytic
Gaussian mixture, whose exact posterior :meth:`diffnotes.models.gmm.GaussianMixture.posterior`
gives the truth, the shipped pixel-space shapes model, or a public model on a GPU), an
``operator`` from :mod:`.operators`, the measurement ``y`` and ``sigma_y``.

- :mod:`.operators`: inpainting, super-resolution, blur, colourisation, denoising and dense
  matrices, each with ``A``, ``A_T``, ``A_pinv`` and (where a method needs it) the SVD;
- :mod:`.posterior`: guided posterior sampling — :func:`ilvr`, :func:`repaint`, :func:`dps`,
  :func:`adir`, :func:`sketch_guidance`;
- :mod:`.linear`: linear inverse problems in closed form — :func:`ddrm`, :func:`ddnm`,
  :func:`ddnm_plus`, :func:`diffpir`, :func:`dmps`;
- :mod:`.conditional`: conditional restoration — :func:`ccdf` (SDEdit's special case) and the
  SR3/Palette model;
- :mod:`.evaluate`: the shared measurement protocol (``python -m diffnotes.restoration.evaluate``).

The names are loaded on first use, so ``import diffnotes.restoration`` stays cheap.
"""
import importlib

_NAMED = {
    "ilvr": "posterior", "repaint": "posterior", "dps": "posterior", "adir": "posterior",
    "sketch_guidance": "posterior",
    "ddrm": "linear", "ddnm": "linear", "ddnm_plus": "linear", "diffpir": "linear",
    "dmps": "linear",
    "ccdf": "conditional",
}

__all__ = list(_NAMED)


def __getattr__(name):
    if name in _NAMED:
        return getattr(importlib.import_module(f"{__name__}.{_NAMED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
