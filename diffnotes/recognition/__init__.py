"""Part V, recognition (2): what a text-to-image diffusion model knows about where its words are.

This package imports nothing on purpose: import the submodule you need, e.g.
``from diffnotes.recognition import elbo_align``. Other modules of this part will be added here.

- :mod:`diffnotes.recognition.elbo_align`: ELBO-T2IAlign (the ELBO-T2IAlign paper): the ELBO of
  a class prompt as a measure of how well the model "knows" it, and the calibration of
  cross-attention heatmaps with it (Algorithm 1, eqs 4–7), for zero-shot referring
  segmentation, compositional generation and Prompt-to-Prompt editing.
- :mod:`diffnotes.recognition.eval_elbo_align`: the measurement command behind the chapter
  (``python -m diffnotes.recognition.eval_elbo_align``).
"""
