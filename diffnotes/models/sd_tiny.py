"""``"sd-1.5-layout-tiny"``: Stable Diffusion 1.5's block layout at a width that runs on a CPU.

What it is for: proving that the book's Stable Diffusion code path runs (the chapters' "On a GPU"
cells execute on it on every build, with ``DIFFNOTES_SIMULATE_GPU=1``) and that no library
function hard-codes the layout of the tiny shapes model (16×16 and 8×8 attention maps, its layer
indices, its 32 tokens). It is randomly initialised: its pictures are noise-like and mean nothing.

The parts are those of SD 1.5, shrunk in width only:

* ``UNet2DConditionModel``: ``diffnotes/configs/sd15_unet.json`` with widths, heads and norm
  groups replaced (``diffnotes/configs/sd15_layout_tiny.json``: channels 8, 16, 32, 32 instead
  of 320, 640, 1280, 1280; one head instead of 8), so the same down/up block types,
  ``layers_per_block=2`` and attention in the same places: 16 transformer blocks, each with one
  self-attention (``attn1``) and one cross-attention (``attn2``) layer — 6 in the down path, 1 in
  the middle, 9 in the up path; 4 latent channels; latent ``sample_size`` 40, so the default image
  is 320×320 and the attention maps are 40×40, 20×20, 10×10 and 5×5 (SD's are 64, 32, 16, 8);
* ``AutoencoderKL`` with 4 blocks (scale factor 8, like SD's) and 4 latent channels;
* ``CLIPTextModel`` with 77 positions (SD's) and width 32 (SD's is 768);
* a CLIP-style tokenizer that needs no downloaded files: the word-level mechanism of the shapes
  model's tokenizer (:func:`diffnotes.models.shapes.make_tokenizer`: lower-case, split on
  whitespace and punctuation, ``<|startoftext|> … <|endoftext|>``, padded with
  ``<|endoftext|>``) with ``model_max_length`` 77 and a WordPiece fallback to letters, so any
  word gets tokens of its own (an unknown word becomes several tokens, as in CLIP's BPE);
* ``DDIMScheduler`` (or ``DDPMScheduler``) with SD's scaled-linear schedule.

Every call of :func:`make_pipeline` returns a fresh pipeline with the same weights (built from the
configs under a fixed seed; the caller's global random state is left as it was).
"""
from __future__ import annotations

import json
import string
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["CONFIG_PATH", "load_config", "unet_config", "make_tokenizer", "make_unet",
           "make_vae", "make_text_encoder", "make_scheduler", "make_pipeline"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_PATH = CONFIG_DIR / "sd15_layout_tiny.json"

#: words that get one token each (beyond the shapes vocabulary); any other word is spelled out
#: in WordPiece letter tokens. Common words of the prompts in the book and in SD demos.
COMMON_WORDS = (
    "a an the and or of in on at with without to from by for into over under near next behind "
    "front above below beside between inside outside is are it its this that his her their "
    "photo photograph picture image painting drawing sketch portrait illustration render "
    "style oil watercolor digital art artwork realistic photorealistic detailed highly quality "
    "high resolution 4k 8k hd cinematic lighting light dark bright sunny night day morning "
    "evening sunset sunrise sky cloud clouds sun moon star stars rain snow fog water sea ocean "
    "lake river beach mountain mountains hill forest tree trees flower flowers grass garden "
    "field park city street road house building castle tower bridge room kitchen table chair "
    "bed window door wall floor car bus train boat ship plane bicycle bike cat cats dog dogs "
    "horse horses bird birds fish cow sheep lion tiger bear elephant rabbit mouse monkey "
    "panda fox wolf deer duck owl frog person people man woman men women boy girl child "
    "children baby astronaut robot knight wizard king queen chef doctor teacher soldier "
    "riding sitting standing walking running eating drinking playing holding wearing reading "
    "flying swimming sleeping jumping looking smiling hat glasses shirt dress coat shoes bag "
    "apple apples banana orange fruit bowl cup mug plate bottle glass cake pizza bread coffee "
    "tea book books phone computer lamp clock vase ball box toy teddy guitar piano sofa couch "
    "white black red green blue yellow orange purple pink brown gray grey gold silver colorful "
    "big small large little tall short old new young happy sad cute beautiful wooden metal "
    "stone golden glass fluffy furry shiny one two three four five many some left right top "
    "bottom center middle background foreground close up view side corner"
).split()


@lru_cache(maxsize=1)
def _config_text() -> str:
    return CONFIG_PATH.read_text()


def load_config() -> dict:
    """The tiny pipeline's configs (``diffnotes/configs/sd15_layout_tiny.json``) as a new dict."""
    return json.loads(_config_text())


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def unet_config() -> dict:
    """SD 1.5's UNet config (``sd15_unet.json``) with the tiny model's width overrides applied."""
    cfg = load_config()
    with open(CONFIG_DIR / cfg["unet_base"]) as f:
        base = _strip(json.load(f))
    base.update(cfg["unet_overrides"])
    return base


def vocabulary() -> list[str]:
    """Token strings in id order: special tokens, the shapes vocabulary, :data:`COMMON_WORDS`,
    punctuation, then letters and digits (whole-word and ``##`` continuation forms)."""
    from diffnotes.models import shapes

    words = list(shapes.vocabulary())
    seen = set(words)
    chars = list(string.ascii_lowercase + string.digits)
    for w in list(COMMON_WORDS) + list(string.punctuation) + chars + ["##" + c for c in chars]:
        if w not in seen:
            words.append(w)
            seen.add(w)
    return words


def make_tokenizer(max_length: int | None = None):
    """A CLIP-style tokenizer of 77 positions that needs no downloaded files
    (``transformers.PreTrainedTokenizerFast``).

    The shapes model's mechanism (:func:`diffnotes.models.shapes.make_tokenizer`: NFKC,
    lower-case, whitespace/punctuation split, ``<|startoftext|> $A <|endoftext|>``, padding with
    ``<|endoftext|>`` on the right, truncation on the right), with a WordPiece model instead of a
    plain word-level one: a word in the vocabulary is one token, any other word is spelled as
    ``w ##o ##r ##d`` (several tokens per word, like CLIP's BPE). ``model_max_length`` is 77.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    from diffnotes.models.shapes import BOS, EOS, UNK

    L = int(max_length or load_config()["tokenizer"]["model_max_length"])
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix="##",
                              max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
        model_max_length=L, padding_side="right", truncation_side="right",
        model_input_names=["input_ids", "attention_mask"])


def make_unet():
    """``UNet2DConditionModel`` from :func:`unet_config` (untrained; global RNG for the init)."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_config(unet_config())


def make_vae():
    """``AutoencoderKL`` with 4 blocks (scale factor 8), 4 latent channels (untrained)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_config(_strip(load_config()["vae"]))


def make_text_encoder(tokenizer=None):
    """``CLIPTextModel`` with 77 positions, sized to :func:`make_tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel
    tokenizer = tokenizer or make_tokenizer()
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **_strip(load_config()["text_encoder"]))
    return CLIPTextModel(cfg)


def make_scheduler(kind: str = "ddim"):
    """``"ddim"`` (default) or ``"ddpm"`` scheduler with SD's scaled-linear schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler
    cfg = _strip(load_config()["scheduler"])
    if kind == "ddim":
        return DDIMScheduler(**cfg)
    if kind == "ddpm":
        return DDPMScheduler(**{k: v for k, v in cfg.items() if k != "set_alpha_to_one"})
    raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")


def make_pipeline(scheduler: str = "ddim", device="cpu", dtype=torch.float32):
    """A fresh ``diffusers.StableDiffusionPipeline`` with SD 1.5's block layout (see the module
    docstring), the same random weights on every call, on ``device`` in ``dtype``.

    The modules are built from the configs under the config's fixed ``seed`` (inside
    ``torch.random.fork_rng``, so the caller's global random state is untouched); it takes a
    few hundredths of a second. No safety checker, progress bars off. Default image size
    320×320 (latent 40×40)."""
    from diffusers.utils import logging as dlogging

    from diffnotes.models.load import _sd_pipeline_class   # the import without library notices

    StableDiffusionPipeline = _sd_pipeline_class()
    if scheduler not in ("ddim", "ddpm"):
        raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {scheduler!r}")
    tokenizer = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(load_config()["seed"]))
        unet, vae = make_unet(), make_vae()
        text_encoder = make_text_encoder(tokenizer)
    for m in (unet, vae, text_encoder):
        m.eval()
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=make_scheduler(scheduler), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    finally:
        dlogging.set_verbosity(level)
    pipe.set_progress_bar_config(disable=True)
    device = torch.device(device)
    if dtype != torch.float32 or device.type != "cpu":
        for m in (unet, vae, text_encoder):   # module by module: no diffusers casting warning
            m.to(device=device, dtype=dtype)
    return pipe
