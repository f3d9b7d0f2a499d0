"""Part II, representation learning: manifolds and tangent spaces, autoencoders and the score,
disentanglement and InfoGAN (Ahmad's notes, §2 and appendix 6.2.1).

Submodules: :mod:`.manifold`, :mod:`.autoencoders`, :mod:`.score`, :mod:`.disentanglement`,
:mod:`.infogan`, :mod:`.mutual_information` (the variational MI bound, shared with Part V).
"""
from . import autoencoders, disentanglement, manifold, mutual_information, score

__all__ = ["manifold", "autoencoders", "score", "disentanglement", "mutual_information"]
# diffnotes.representation.infogan is imported on its own (it is also a command: python -m ...)
