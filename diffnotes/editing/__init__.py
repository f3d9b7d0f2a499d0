"""Part III, editing: Prompt-to-Prompt, inversion of real images, SDEdit and DiffEdit.

Every function takes a diffusers ``StableDiffusionPipeline`` (the shipped shapes model, the
Stable-Diffusion-layout tiny pipeline, or Stable Diffusion itself) and runs the library's own
samplers (:mod:`diffnotes.ddim`) on an ``eps_model(x, t)`` built by :mod:`.common`; attention
control goes through :mod:`diffnotes.attention`'s processors. Nothing depends on one UNet layout.
"""
