"""Explorers: live ipywidgets sliders in a kernel, a self-contained static twin on the website.

The mechanism is :func:`explorer` (``_core.py``). The chapters' named explorers are built on it,
one module each, and are importable from here (loaded on first use):

- :func:`ddim_explorer` (``ddim.py``): η and the number of steps of DDIM sampling;
- :func:`guidance_explorer` (``guidance.py``): the guidance scale, per class or prompt;
- :func:`attention_explorer` (``attention.py``): cross-attention per word, step range, resolution;
- :func:`graph_cut_explorer` (``ising.py``): λ and σ of the contrast-sensitive graph cut;
- :func:`sdedit_explorer` (``sdedit.py``): SDEdit's noise strength and mask on one real image;
- :func:`p2p_explorer` (``p2p.py``): Prompt-to-Prompt's cross-replace fraction τ per kind of edit;
- :func:`masactrl_explorer` (``masactrl.py``): MasaCtrl's start step and start layer;
- :func:`layout_explorer` (``layout.py``): the strength λ of the layout methods;
- :func:`ae_explorer` (``binding.py``): Attend-and-Excite's step size and thresholds;
- :func:`appearance_explorer` (``appearance.py``): the attention contrast of Cross-Image Attention;
- :func:`dae_sigma_explorer`, :func:`beta_vae_explorer` (``representation.py``): σ of the
  denoising autoencoder, β of the β-VAE;
- :func:`bayes_explorer` (``elbo_align.py``): priors and likelihoods of the three misalignment
  cases of ELBO-T2IAlign;
- :func:`dps_explorer` (``restoration.py``): DPS's step size ζ;
- :func:`noise_level_explorer` (``restoration_linear.py``): the measurement noise σ_y against
  each closed-form solver's PSNR;
- :func:`ccdf_explorer` (``restoration_conditional.py``): CCDF's starting time t₀;
- :func:`correspondence_explorer` (``correspondence.py``): the time step and layer of the
  features used for correspondence;
- :func:`diffseg_explorer` (``diffseg.py``): DiffSeg's KL merging threshold;
- :func:`sag_explorer` (``sag.py``): the scale and blur of self-attention guidance;
- :func:`gan_explorer` (``gan.py``): the style-mixing crossover layer and the truncation ψ of the
  shipped shapes GAN;
- :func:`plus_mixing_explorer`, :func:`importance_explorer` (``richer_tokens.py``): P+ mixing's
  split layer k; ReVersion's α of the importance sampling of t;
- :func:`ti_explorer` (``dreambooth.py``): Textual Inversion's placeholder row walked from the
  initializer word's embedding to the learned vector.
"""
import importlib

from ._core import StaticExplorer, explorer, is_static, static_explorer, to_png_bytes

_NAMED = {"ddim_explorer": "ddim", "guidance_explorer": "guidance",
          "attention_explorer": "attention", "graph_cut_explorer": "ising",
          "sdedit_explorer": "sdedit", "p2p_explorer": "p2p", "masactrl_explorer": "masactrl",
          "layout_explorer": "layout", "ae_explorer": "binding",
          "appearance_explorer": "appearance", "dae_sigma_explorer": "representation",
          "beta_vae_explorer": "representation", "bayes_explorer": "elbo_align",
          "dps_explorer": "restoration", "noise_level_explorer": "restoration_linear",
          "ccdf_explorer": "restoration_conditional", "correspondence_explorer": "correspondence",
          "diffseg_explorer": "diffseg", "sag_explorer": "sag",
          "gan_explorer": "gan", "plus_mixing_explorer": "richer_tokens",
          "importance_explorer": "richer_tokens", "ti_explorer": "dreambooth"}

__all__ = ["explorer", "static_explorer", "is_static", "StaticExplorer", "to_png_bytes", *_NAMED]


def __getattr__(name):
    if name in _NAMED:
        return getattr(importlib.import_module(f"{__name__}.{_NAMED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
