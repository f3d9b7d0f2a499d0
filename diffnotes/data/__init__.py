"""Procedural data sets: small, deterministic, generated on the fly.

``diffnotes.data.shapes`` makes 64×64 captioned scenes of coloured shapes with per-object masks,
boxes and attributes; it is the training set of the shipped text-to-image model
(``diffnotes.models.load_pipeline("shapes")``) and the ground truth of its evaluations.
"""
