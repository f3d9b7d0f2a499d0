"""diffnotes: a runnable textbook on how diffusion models represent images.

Part I modules: :mod:`diffnotes.schedules`, :mod:`diffnotes.ddpm`, :mod:`diffnotes.ddim`,
:mod:`diffnotes.derive`, :mod:`diffnotes.guidance`. Models live in :mod:`diffnotes.models`.
"""
__version__ = "0.1.0"
