"""The tiny text-to-image model trained on captioned shapes: Stable Diffusion's parts, shrunk.

Same classes as Stable Diffusion 1.x (Ahmad's notes, §1.5; Gormley & Chai's lecture, the "Latent
Diffusion Model" and "LDM" slides), only smaller:

* ``AutoencoderKL``: 64×64×3 image ↔ 16×16×4 latent (eq 1.37 encoder E, eq 1.42 decoder D);
* ``CLIPTextModel`` (causal self-attention, no padding mask, as in CLIP) with a word-level
  tokenizer that adds ``<|startoftext|>``/``<|endoftext|>`` and pads with ``<|endoftext|>`` to a
  fixed length (:data:`MAX_LENGTH`, the analogue of SD's 77; eq 1.40);
* ``UNet2DConditionModel`` with self- and cross-attention at 16×16 and 8×8 (eqs 1.46–1.50);
* ``DDIMScheduler`` with SD's scaled-linear schedule (β from 0.00085 to 0.012, T = 1000).

This module only builds the (untrained) parts; ``diffnotes.models.train`` trains them and
``diffnotes.models.load.load_pipeline("shapes")`` loads the shipped weights.
"""
from __future__ import annotations


from diffnotes.data.shapes import VOCABULARY

__all__ = ["MAX_LENGTH", "SPECIAL_TOKENS", "EXTRA_WORDS", "vocabulary", "make_tokenizer",
           "make_vae", "make_text_encoder", "make_unet", "make_scheduler", "make_components",
           "VAE_CONFIG", "TEXT_CONFIG", "UNET_CONFIG", "SCHEDULER_CONFIG"]

#: fixed token length of every prompt (SD uses 77); longer prompts are truncated with a warning.
MAX_LENGTH = 32
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
SPECIAL_TOKENS = (BOS, EOS, UNK)
#: words in the vocabulary that training captions never use (spare slots for later chapters,
#: e.g. a new word to personalise, and common prompt words).
EXTRA_WORDS = ("of", "with", "photo", "picture", "image", "top", "bottom", "at", "big",
               "tiny", "shape", "object", "background", "sks")

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    act_fn="silu", scaling_factor=1.0,  # replaced by 1/std of the latents after training
)

TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", projection_dim=64,
)

UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def vocabulary() -> list[str]:
    """Token strings in id order: the special tokens, every caption word (held-out included),
    then :data:`EXTRA_WORDS`."""
    words = list(SPECIAL_TOKENS)
    for w in tuple(VOCABULARY) + EXTRA_WORDS:
        if w not in words:
            words.append(w)
    return words


def make_tokenizer(max_length: int = MAX_LENGTH):
    """A CLIP-like word-level tokenizer (``transformers.PreTrainedTokenizerFast``).

    Lower-cases, splits on whitespace and punctuation, maps unknown words to ``<|unk|>``, wraps
    the ids as ``<|startoftext|> … <|endoftext|>`` and (with ``padding="max_length"``) pads with
    ``<|endoftext|>`` like SD 1.x's tokenizer. ``model_max_length = max_length``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if not isinstance(max_length, int) or max_length < 3:
        raise ValueError(f"max_length must be an int >= 3, got {max_length!r}")
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
        model_max_length=max_length, padding_side="right", truncation_side="right",
        model_input_names=["input_ids", "attention_mask"])


def make_vae():
    """Untrained tiny ``AutoencoderKL``: 64×64×3 ↔ 16×16×4 (Ahmad's notes, eqs 1.37 and 1.42)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(**VAE_CONFIG)


def make_text_encoder(tokenizer=None):
    """Untrained small ``CLIPTextModel`` sized to the word-level tokenizer's vocabulary (eq 1.40)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    tokenizer = tokenizer or make_tokenizer()
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **TEXT_CONFIG)
    return CLIPTextModel(cfg)


def make_unet():
    """Untrained ``UNet2DConditionModel`` with cross-attention at 16×16 and 8×8 (eq 1.41's ε_θ)."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**UNET_CONFIG)


def make_scheduler(kind: str = "ddim"):
    """``"ddim"`` (default) or ``"ddpm"`` scheduler with SD's scaled-linear schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler
    if kind == "ddim":
        return DDIMScheduler(**SCHEDULER_CONFIG)
    if kind == "ddpm":
        cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"}
        return DDPMScheduler(**cfg)
    raise ValueError(f"kind must be 'ddim' or 'ddpm', got {kind!r}")


def make_components() -> dict:
    """Untrained ``dict(vae, text_encoder, tokenizer, unet, scheduler)``."""
    tokenizer = make_tokenizer()
    return dict(vae=make_vae(), text_encoder=make_text_encoder(tokenizer), tokenizer=tokenizer,
                unet=make_unet(), scheduler=make_scheduler("ddim"))
