"""The UNet's table of feature and attention shapes, computed, not copied (Ahmad's notes, §1.5.1, Table 1).

Stable Diffusion's UNet configs ship with the package (``diffnotes/configs/sd15_unet.json``,
``sd21_base_unet.json``; no weights). :func:`meta_unet` builds the model on PyTorch's ``meta``
device (shapes and dtypes only, no memory, no arithmetic) and :func:`shape_tables` runs one
forward pass with hooks that note the shape of every block's output and of every attention
layer's queries and keys. The same function works on a real model (the tiny shapes UNet) on the
CPU.

Attention rows hold, for each attention layer: where it sits (down/mid/up), its kind (self =
``attn1``, eq 1.49-1.50; cross = ``attn2``, eqs 1.46-1.48), the query grid ``h × w``, the feature
channels ``C`` it works on, the number of heads and their width, the query and key token counts,
and the shape of its probability matrix ``(B·heads, h·w, M)`` (eq 1.47).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch

__all__ = ["UNET_CONFIGS", "load_unet_config", "meta_unet", "shape_tables", "summarize",
           "NOTES_TABLE_1", "compare_with_notes", "markdown_table"]

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: model name -> shipped UNet config file (under ``diffnotes/configs``).
UNET_CONFIGS = {"sd-1.5": "sd15_unet.json", "sd-2.1-base": "sd21_base_unet.json"}


def load_unet_config(name: str) -> dict:
    """The shipped UNet config of ``name`` (a key of :data:`UNET_CONFIGS`) as a dict.

    Raises ``ValueError`` for an unknown name, listing the known ones."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"name must be one of {sorted(UNET_CONFIGS)}, got {name!r}")
    with open(os.path.join(_HERE, "configs", UNET_CONFIGS[name])) as f:
        cfg = json.load(f)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def meta_unet(config):
    """A ``UNet2DConditionModel`` on the ``meta`` device from a config dict or a name of
    :data:`UNET_CONFIGS` (no weights, no memory: parameters have shapes only)."""
    from diffusers import UNet2DConditionModel

    if isinstance(config, str):
        config = load_unet_config(config)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a model name, got {type(config).__name__}")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _place(name: str) -> str:
    return next((p for p in ("down", "mid", "up") if name.startswith(p)), "other")


def shape_tables(unet, height: int | None = None, width: int | None = None, batch: int = 1,
                 seq_len: int = 77, dtype=None) -> tuple[list[dict], list[dict]]:
    """Run one forward pass of ``unet`` with shape hooks; return ``(features, attention)``.

    ``height, width``: the latent size (default ``unet.config.sample_size``, 64 for SD = 512
    pixels / 8). Inputs are zeros on the model's device (``meta`` for :func:`meta_unet`): a latent
    ``(batch, in_channels, height, width)`` and text embeddings ``(batch, seq_len,
    cross_attention_dim)`` (eq 1.40: 77 × 768 for SD 1.x).

    ``features``: one row per stage (``conv_in``, ``down_blocks.i``, ``mid_block``,
    ``up_blocks.i``, ``conv_out``) with its output ``shape`` (C, H, W).
    ``attention``: one row per attention layer in forward order, keys ``layer, place, kind,
    res, channels, heads, head_dim, query_tokens, key_tokens, key_dim, probs_shape``.
    """
    cfg = unet.config
    height = int(height or cfg.sample_size)
    width = int(width or height)
    for nm, v in (("height", height), ("width", width), ("batch", batch), ("seq_len", seq_len)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    p = next(unet.parameters())
    dev, dtype = p.device, dtype or p.dtype
    x = torch.zeros(batch, cfg.in_channels, height, width, device=dev, dtype=dtype)
    ctx = torch.zeros(batch, seq_len, cfg.cross_attention_dim, device=dev, dtype=dtype)

    features, attention, handles = [], [], []

    def feat_hook(name):
        def hook(mod, args, out):
            o = out[0] if isinstance(out, tuple) else out
            features.append({"stage": name, "shape": tuple(o.shape[1:])})
        return hook

    def attn_hook(name):
        def hook(mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            n_q = hs.shape[1] if hs.ndim == 3 else hs.shape[2] * hs.shape[3]
            f = int(round((height * width / n_q) ** 0.5))
            kind = "cross" if enc is not None else "self"
            n_k = enc.shape[1] if enc is not None else n_q
            heads = mod.heads
            attention.append(OrderedDict(
                layer=name, place=_place(name), kind=kind, res=(height // f, width // f),
                channels=int(mod.query_dim), heads=int(heads),
                head_dim=int(mod.inner_dim // heads), query_tokens=int(n_q),
                key_tokens=int(n_k), key_dim=int(enc.shape[-1]) if enc is not None
                else int(hs.shape[-1]),
                probs_shape=(batch * heads, int(n_q), int(n_k))))
        return hook

    from diffusers.models.attention_processor import Attention

    stages = [("conv_in", unet.conv_in)]
    stages += [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    stages += [("mid_block", unet.mid_block)]
    stages += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    stages += [("conv_out", unet.conv_out)]
    try:
        for name, mod in stages:
            handles.append(mod.register_forward_hook(feat_hook(name)))
        for name, mod in unet.named_modules():
            if isinstance(mod, Attention):
                handles.append(mod.register_forward_pre_hook(attn_hook(name), with_kwargs=True))
        with torch.no_grad():
            unet(x, torch.zeros((), dtype=torch.long, device=dev), ctx)
    finally:
        for h in handles:
            h.remove()
    return features, attention


def summarize(attention: list[dict]) -> list[dict]:
    """Group attention rows by (place, resolution), in forward order, like Table 1 of Ahmad's notes:
    keys ``place, res, channels, heads, layers`` (transformer blocks in the group),
    ``self_shape`` and ``cross_shape`` (probability-matrix shapes, ``None`` if absent)."""
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in attention:
        key = (r["place"], r["res"])
        g = groups.setdefault(key, dict(place=r["place"], res=r["res"], channels=r["channels"],
                                        heads=r["heads"], head_dim=r["head_dim"], layers=0,
                                        self_shape=None, cross_shape=None))
        g[f"{r['kind']}_shape"] = r["probs_shape"]
        if r["kind"] == "self":
            g["layers"] += 1
    return list(groups.values())


#: Table 1 of Ahmad's notes (§1.5.1), transcribed: (row label, place, resolution side, channels,
#: self-attention matrix, cross-attention matrix); matrices as printed, "B ×" dropped.
NOTES_TABLE_1 = [
    ("Before Down Layer 1", "down", 64, 320, (4096, 4096), (4096, 77)),
    ("After Down Layer 1", "down", 32, 320, (1024, 1024), (1024, 77)),
    ("Down Layer 2", "down", 16, 640, (256, 256), (256, 77)),
    ("Down Layer 3", "down", 8, 1280, None, None),
    ("Mid Layer", "mid", 8, 1280, (64, 64), (64, 77)),
    ("Up Layer 1", "up", 16, 640, (256, 256), (256, 77)),
    ("Up Layer 2", "up", 32, 320, (1024, 1024), (1024, 77)),
    ("Up Layer 3", "up", 64, 320, (4096, 4096), (4096, 77)),
]


def compare_with_notes(summary: list[dict]) -> list[dict]:
    """Row-by-row comparison of a :func:`summarize` table (SD at 512×512, batch 1) with
    :data:`NOTES_TABLE_1`. Returns one dict per row of that table: ``label, notes_channels, channels,
    notes_self, self, notes_cross, cross, heads, agrees`` where matrices are compared per head
    (the notes omit the head dimension: the real matrix is ``(B·heads) × N × M``)."""
    by_key = {(g["place"], g["res"][0]): g for g in summary}
    out = []
    for label, place, res, ch, s_self, s_cross in NOTES_TABLE_1:
        g = by_key.get((place, res))
        row = dict(label=label, place=place, res=f"{res}×{res}", notes_channels=ch,
                   notes_self=s_self, notes_cross=s_cross)
        if g is None:
            row.update(channels=None, heads=None, self=None, cross=None)
        else:
            row.update(channels=g["channels"], heads=g["heads"],
                       self=tuple(g["self_shape"][1:]) if g["self_shape"] else None,
                       cross=tuple(g["cross_shape"][1:]) if g["cross_shape"] else None)
        row["agrees"] = (row["self"] == s_self and row["cross"] == s_cross
                         and (g is None or row["channels"] == ch))
        out.append(row)
    return out


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (for ``IPython.display.Markdown``)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(col, v):
        if v is None:
            return "—"
        if isinstance(v, tuple) and col in ("res", "shape"):
            return "×".join(str(a) for a in v)
        if isinstance(v, tuple):
            return "[" + " × ".join(str(a) for a in v) + "]"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
