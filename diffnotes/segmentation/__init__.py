"""Segmentation (Ahmad's notes, §5.2–5.7): metrics and losses, the Ising/Potts graph cut, FDA, and
the unsupervised methods PACL, PiCIE and STEGO.

This package imports nothing on purpose: import the submodule you need, e.g.
``from diffnotes.segmentation import metrics, ising, fda``.

- :mod:`diffnotes.segmentation.metrics`: pixel accuracy, IoU, Dice, pixel cross-entropy and the
  Hungarian-matched mIoU of unsupervised segmentation (eqs 5.2–5.4).
- :mod:`diffnotes.segmentation.ising`: Ising and Potts energies, exact binary MAP by
  max-flow/min-cut, alpha-expansion for K labels, a Gibbs sampler (eqs 5.5–5.11).
- :mod:`diffnotes.segmentation.fda`: Fourier Domain Adaptation and its entropy loss
  (eqs 5.29–5.32).
- :mod:`diffnotes.segmentation.pacl`, :mod:`~diffnotes.segmentation.picie`,
  :mod:`~diffnotes.segmentation.stego`: the unsupervised and open-vocabulary methods (§5.4–5.6).
"""
