"""One loader for every text-to-image model in the book: the shipped tiny model and Stable Diffusion.

``load_pipeline("shapes")`` loads the directory shipped in ``diffnotes/weights/shapes`` with
``diffusers.StableDiffusionPipeline.from_pretrained`` (offline, a few MB).
``load_pipeline("sd-1.5")`` and ``load_pipeline("sd-2.1-base")`` go through the same call with a
Hugging Face Hub repository id; they need the weights (a GPU machine with internet access, e.g.
Colab). Without them the call fails with one :class:`WeightsUnavailableError` that says so.

``load_pipeline("sd-1.5-layout-tiny")`` builds (no files, no download) a randomly initialised
pipeline with Stable Diffusion 1.5's block layout at a tiny width (:mod:`diffnotes.models.sd_tiny`):
it proves that the SD code path runs and that no function hard-codes the shapes model's layout.
With the environment variable ``DIFFNOTES_SIMULATE_GPU=1`` (:func:`diffnotes.utils.simulating_gpu`)
``"sd-1.5"`` and ``"sd-2.1-base"`` return that pipeline (CPU, float32) instead of touching the
Hub, so the chapters' "On a GPU" cells run on every build.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["load_pipeline", "KNOWN_MODELS", "SIMULATED_MODELS", "SHAPES_DIR",
           "WeightsUnavailableError"]

SHAPES_DIR = Path(__file__).resolve().parent.parent / "weights" / "shapes"

#: name → local directory or Hub repository ids (tried in order).
KNOWN_MODELS: dict[str, tuple[str, ...]] = {
    "shapes": (str(SHAPES_DIR),),
    "sd-1.5": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    "sd-2.1-base": ("stabilityai/stable-diffusion-2-1-base",),
    "sd-1.5-layout-tiny": (),     # built from diffnotes/configs/sd15_layout_tiny.json, no files
}
#: the names that :func:`diffnotes.utils.simulating_gpu` replaces by ``"sd-1.5-layout-tiny"``.
SIMULATED_MODELS = ("sd-1.5", "sd-2.1-base")


class WeightsUnavailableError(OSError):
    """The weights of a named model cannot be found or downloaded on this machine."""


def _dtype_kwarg(dtype) -> dict:
    """diffusers ≥ 0.36 takes ``dtype=``; older releases (e.g. on Colab) take ``torch_dtype=``."""
    try:
        from diffusers.utils import deprecation_utils
        new = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    except ImportError:
        new = False
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def _make_scheduler(kind: str, config):
    from diffusers import DDIMScheduler, DDPMScheduler
    if kind == "ddim":
        return DDIMScheduler.from_config(config)
    if kind == "ddpm":
        return DDPMScheduler.from_config(config)
    raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")


class _NoTorchvisionFallbackNotice:
    """Drops transformers' "`XImageProcessor` requires torchvision ...; falling back to ..." notice."""

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not ("requires torchvision" in msg and "falling back to" in msg)


def _sd_pipeline_class():
    """``diffusers.StableDiffusionPipeline``, imported without transformers' torchvision notice.

    Importing it makes transformers (≥ 5) resolve ``CLIPImageProcessor`` and
    ``SiglipImageProcessor``; without torchvision it substitutes their PIL versions and logs one
    "requires torchvision ... falling back to ..." line per class, which then showed up in the
    book's pages. diffnotes never uses an image processor (no safety checker, no feature
    extractor), so exactly that notice, from that one logger and only during this import, is
    dropped; every other message is left alone.
    """
    import logging
    log = logging.getLogger("transformers.utils.import_utils")
    quiet = _NoTorchvisionFallbackNotice()
    log.addFilter(quiet)
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        log.removeFilter(quiet)
    return StableDiffusionPipeline


def load_pipeline(name: str = "shapes", device=None, dtype=None, scheduler: str = "ddim"):
    """Load a ``diffusers.StableDiffusionPipeline`` by name.

    Parameters
    ----------
    name : ``"shapes"`` (shipped, offline), ``"sd-1.5"`` or ``"sd-2.1-base"`` (Hub weights), or
        ``"sd-1.5-layout-tiny"`` (SD 1.5's block layout, random weights with a fixed seed, built
        from ``diffnotes/configs/sd15_layout_tiny.json``; default image 320×320, attention maps
        40, 20, 10, 5; see :mod:`diffnotes.models.sd_tiny`).
        With ``DIFFNOTES_SIMULATE_GPU=1`` (:func:`diffnotes.utils.simulating_gpu`),
        ``"sd-1.5"`` and ``"sd-2.1-base"`` return ``"sd-1.5-layout-tiny"`` on the CPU in float32
        (``device`` and ``dtype`` are then ignored: a cell written for a CUDA float16 machine
        runs unchanged); nothing is downloaded.
    device : torch device or string; default :func:`diffnotes.utils.pick_device` for Stable
        Diffusion and ``"cpu"`` for ``"shapes"`` and ``"sd-1.5-layout-tiny"``.
    dtype : torch dtype; default float32 for ``"shapes"`` and ``"sd-1.5-layout-tiny"``,
        :func:`diffnotes.utils.pick_dtype` (float16 on CUDA) for Stable Diffusion.
    scheduler : ``"ddim"`` (default) or ``"ddpm"``; built from the model's own scheduler config
        (SD's scaled-linear schedule, Ahmad's notes, §1.5).

    The safety checker is not loaded (``safety_checker=None``). Progress bars are disabled.

    Raises
    ------
    ValueError : unknown ``name`` (the message lists the known names) or ``scheduler``.
    WeightsUnavailableError (an ``OSError``) : the weights are neither on disk nor downloadable.
    """
    if not isinstance(name, str) or name not in KNOWN_MODELS:
        raise ValueError(f"name must be one of {sorted(KNOWN_MODELS)}, got {name!r}")
    if scheduler not in ("ddim", "ddpm"):
        raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {scheduler!r}")
    StableDiffusionPipeline = _sd_pipeline_class()
    from diffnotes.utils import pick_device, pick_dtype, simulating_gpu

    if name in SIMULATED_MODELS and simulating_gpu():
        name, device, dtype = "sd-1.5-layout-tiny", "cpu", torch.float32
    if name == "sd-1.5-layout-tiny":
        from diffnotes.models import sd_tiny
        return sd_tiny.make_pipeline(scheduler, device=device or "cpu",
                                     dtype=dtype or torch.float32)
    if name == "shapes":
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.float32
        if not (SHAPES_DIR / "model_index.json").exists():
            raise WeightsUnavailableError(
                f"the shipped 'shapes' model is missing from {SHAPES_DIR}; reinstall diffnotes or "
                f"train it with `python -m diffnotes.models.train shapes`")
        pipe = StableDiffusionPipeline.from_pretrained(
            str(SHAPES_DIR), safety_checker=None, requires_safety_checker=False,
            local_files_only=True, **_dtype_kwarg(dtype))
    else:
        device = torch.device(device) if device is not None else pick_device()
        dtype = dtype or pick_dtype(device)
        from diffusers.utils import logging as dlogging

        pipe, errors = None, []
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()    # one clear error below, not a log line per failed try
        try:
            for repo in KNOWN_MODELS[name]:
                try:
                    pipe = StableDiffusionPipeline.from_pretrained(
                        repo, safety_checker=None, requires_safety_checker=False,
                        **_dtype_kwarg(dtype))
                    break
                except Exception as err:  # hub, network, cache and offline-mode errors alike
                    errors.append(f"{repo}: {type(err).__name__}")
        finally:
            dlogging.set_verbosity(level)
        if pipe is None:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
            raise WeightsUnavailableError(
                f"Stable Diffusion weights for {name!r} are not available on this machine "
                f"(tried {', '.join(errors)}{'; HF_HUB_OFFLINE is set' if offline else ''}). "
                f"They need a GPU machine with internet access (e.g. Colab) to download "
                f"{KNOWN_MODELS[name][0]!r} from the Hugging Face Hub. "
                f"Set MODEL='shapes' to use the small model shipped with diffnotes.") from None
    pipe.scheduler = _make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
