"""Part III, editing: Prompt-to-Prompt, inversion of real images, SDEdit and DiffEdit;
self-attention control (MasaCtrl, Plug-and-Play), layout control (LLM-grounded diffusion, Dense
Diffusion, SpaText), attribute binding (Attend-and-Excite, StructureDiffusion) and appearance
transfer (Cross-Image Attention, Eye-for-an-Eye).

Every function takes a diffusers ``StableDiffusionPipeline`` (the shipped shapes model, the
Stable-Diffusion-layout tiny pipeline, or Stable Diffusion itself) and runs the library's own
samplers (:mod:`diffnotes.ddim`) on an ``eps_model(x, t)`` built by :mod:`.common`; attention
control goes through the one controller of :mod:`diffnotes.attention` (its ``edit_qkv``,
``edit_scores`` and ``edit`` hooks). Layers are chosen by rules on the forward-order list of
attention layers (:func:`diffnotes.attention.attention_layers`), never by a hard-coded name:
nothing depends on one UNet layout.
"""
