"""Models, from exact to real: the analytic mixture, toy networks, shipped small models, and
(on a GPU) Stable Diffusion."""
