"""What the editing tests share besides the two-layout ``pipe`` fixture of conftest.py: seeded
initial latents and plain guided DDIM sampling (the reference every exact no-op is compared
with)."""
import torch

from diffnotes.ddim import ddim_sample
from diffnotes.editing.common import (encode_prompts, pipe_alphas_cumprod, pipe_eps_model,
                                      pipe_timesteps)


def noise_latents(pipe, seed: int = 0, n: int = 1) -> torch.Tensor:
    """``n`` float64 initial latents of the pipeline's UNet, from a generator seeded ``seed``."""
    u = pipe.unet.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, u.in_channels, u.sample_size, u.sample_size), generator=g,
                       dtype=torch.float64)


def plain_sample(pipe, prompt, xT, steps: int, gs: float = 7.5, cond=None):
    """Guided DDIM sampling of ``prompt`` (or of the embeddings ``cond``) from ``xT`` with the
    library's sampler: ``(x_0, trajectory)``."""
    cond = encode_prompts(pipe, prompt) if cond is None else cond
    eps = pipe_eps_model(pipe, cond, encode_prompts(pipe, ""), gs)
    with torch.no_grad():
        return ddim_sample(eps, xT, pipe_timesteps(pipe, steps), pipe_alphas_cumprod(pipe))
