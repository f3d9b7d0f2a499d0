"""Part V, recognition: what a text-to-image diffusion model knows about where its words are.

This package imports nothing on purpose: import the submodule you need, e.g.
``from diffnotes.recognition import elbo_align``. Other modules of this part will be added here.

- :mod:`diffnotes.recognition.elbo_align`: ELBO-T2IAlign (the ELBO-T2IAlign paper): the ELBO of
  a class prompt as a measure of how well the model "knows" it, and the calibration of
  cross-attention heatmaps with it (Algorithm 1, eqs 4–7), for zero-shot referring
  segmentation, compositional generation and Prompt-to-Prompt editing.
- :mod:`diffnotes.recognition.eval_elbo_align`: the measurement command behind the chapter
  (``python -m diffnotes.recognition.eval_elbo_align``).
- :mod:`diffnotes.recognition.correspondence`: the correspondence, cycle and alignment losses of
  Ahmad's notes §5.8 and Hedlin et al. 2023's prompt optimisation for unsupervised correspondence.
- :mod:`diffnotes.recognition.keypoints`: StableKeypoints (Hedlin et al. 2024) and the linear
  regression from found to true keypoints.
- :mod:`diffnotes.recognition.label_efficient`: pixel-classifier ensembles on multi-step,
  multi-block diffusion features (Baranchuk et al. 2022).
- :mod:`diffnotes.recognition.diffseg` and :mod:`diffnotes.recognition.nms`: DiffSeg (Tian et al.
  2024) and non-maximum suppression.
- :mod:`diffnotes.recognition.diffewes`: DiffewS's KV-fusion self-attention, mask injection and
  few-shot segmentation model (Ahmad's notes §5.14).
- :mod:`diffnotes.recognition.eval_correspondence`, :mod:`.eval_segmentation`,
  :mod:`.eval_sag`: the measurement commands behind the Part V chapters.
"""
