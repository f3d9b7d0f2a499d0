"""Part IV, personalization: teaching a model a new concept from a few images (Ahmad's notes, §4).

The ground truth is the shapes generator's held-out concepts (a heart, the colour purple) and
one specific instance; :mod:`.evaluate` measures every method the same way.

- :mod:`.common`: :func:`concept_images`, :func:`add_placeholder`, the diffusion loss and the
  training loop every method shares;
- :mod:`.textual_inversion` and :mod:`.dreambooth` (§4.3–4.4.1);
- :mod:`.extended` (P+), :mod:`.break_a_scene`, :mod:`.reversion` (§4.4.2–4.4.4);
- :mod:`.e4t`, :mod:`.lora` (peft), :mod:`.custom_diffusion` (§4.5; Zhu's slides, Custom Diffusion);
- :mod:`.gan`: a small StyleGAN-like generator with W/W+ inversion, PTI and EWC (§4.2).

Names are loaded on first use, so ``import diffnotes.personalization`` stays cheap.
"""
import importlib

_NAMED = {
    "concept_images": "common", "add_placeholder": "common", "ConceptSet": "common",
    "evaluate_tuned": "evaluate", "Tuned": "evaluate",
    "textual_inversion": "textual_inversion", "save_textual_inversion": "textual_inversion",
    "dreambooth": "dreambooth", "extended_textual_inversion": "extended",
    "break_a_scene": "break_a_scene", "reversion": "reversion",
    "lora": "lora", "custom_diffusion": "custom_diffusion",
    "merge_custom_diffusion": "custom_diffusion", "e4t": "e4t",
    "load_gan": "gan", "invert": "gan", "pti": "gan", "adapt": "gan", "ewc_penalty": "gan",
}

__all__ = list(_NAMED)


def __getattr__(name):
    if name in _NAMED:
        return getattr(importlib.import_module(f"{__name__}.{_NAMED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
