"""What a PyTorch / big_vision checkpoint is, and the architecture its weights imply.

``detect_format`` tells the key layout (``classic`` OpenAI/open_clip, ``hf`` transformers) and
refuses layouts our ViT CLIP cannot represent (ResNet CLIP, timm towers); big_vision SigLIP
``.npz`` files have their own reader (``big_vision.py``).
``infer_arch`` reads widths, depths, patch, grid, embed, vocab and context from tensor shapes.
Attention heads are not visible in fused classic weights: they come from an HF ``config.json``,
else head dim 64 is assumed (every OpenAI / open_clip ViT).
"""

from __future__ import annotations

import math
import re

import ml_collections as mlc
import numpy as np

from umg_jax.configs import common
from umg_jax.interop.big_vision import is_big_vision
from umg_jax.interop.mapping import InteropError

HEAD_DIM = 64  # OpenAI / open_clip ViTs (open_clip's head_width default)


def strip_prefixes(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes the ``module.`` prefix of DDP training checkpoints."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_format(sd: dict[str, np.ndarray]) -> str:
    """``"classic"`` or ``"hf"``; raises InteropError for anything we cannot import."""
    keys = list(sd)
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in keys):
        raise InteropError("this is a ResNet CLIP state dict (visual.layer1 / visual.attnpool "
                           "keys); only ViT CLIP towers can be imported")
    if any(k.startswith("visual.trunk.") for k in keys):
        raise InteropError("this is an open_clip timm-tower state dict (visual.trunk.* keys, "
                           "e.g. SigLIP/ConvNeXt); only classic ViT CLIP towers can be imported")
    if is_big_vision(keys):
        raise InteropError("big_vision (SigLIP) names in a state dict; import the original .npz")
    if "visual.conv1.weight" in sd:
        return "classic"
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        return "hf"
    raise InteropError("unrecognised state dict: neither OpenAI/open_clip (visual.conv1.weight) "
                       f"nor HF CLIPModel keys; first keys: {', '.join(sorted(keys)[:5])}")


def _n_blocks(keys, pattern: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise InteropError(f"layer indices of {pattern!r} are not contiguous: {sorted(idx)}")
    return len(idx)


def _heads(width: int, where: str) -> int:
    if width % HEAD_DIM:
        raise InteropError(f"cannot infer the {where} heads (width {width} is not a multiple of "
                           f"{HEAD_DIM}); pass --config")
    return width // HEAD_DIM


def infer_arch(sd: dict[str, np.ndarray], fmt: str, hf_config: dict | None = None) -> dict:
    """Keyword arguments of ``configs/common.py:model_config`` (without ``act``) plus
    ``vision_mlp_ratio`` / ``text_mlp_ratio``, read from tensor shapes."""
    try:
        if fmt == "classic":
            conv = sd["visual.conv1.weight"]
            vpos = sd["visual.positional_embedding"]
            proj = sd["visual.proj"]  # [D, E]
            tok = sd["token_embedding.weight"]
            tpos = sd["positional_embedding"]
            vfc = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"]
            tfc = sd["transformer.resblocks.0.mlp.c_fc.weight"]
            n_v = _n_blocks(sd, r"^visual\.transformer\.resblocks\.(\d+)\.")
            n_t = _n_blocks(sd, r"^transformer\.resblocks\.(\d+)\.")
            embed = proj.shape[1]
        else:
            conv = sd["vision_model.embeddings.patch_embedding.weight"]
            vpos = sd["vision_model.embeddings.position_embedding.weight"]
            tok = sd["text_model.embeddings.token_embedding.weight"]
            tpos = sd["text_model.embeddings.position_embedding.weight"]
            vfc = sd["vision_model.encoder.layers.0.mlp.fc1.weight"]
            tfc = sd["text_model.encoder.layers.0.mlp.fc1.weight"]
            n_v = _n_blocks(sd, r"^vision_model\.encoder\.layers\.(\d+)\.")
            n_t = _n_blocks(sd, r"^text_model\.encoder\.layers\.(\d+)\.")
            embed = sd["visual_projection.weight"].shape[0]  # [E, D]
    except KeyError as e:
        raise InteropError(f"cannot infer the architecture: missing key {e.args[0]}") from None
    width, _, patch, _ = conv.shape
    grid = math.isqrt(vpos.shape[0] - 1)
    if grid * grid != vpos.shape[0] - 1:
        raise InteropError(f"positional embedding has {vpos.shape[0]} rows: not a square grid "
                           "plus a class slot")
    twidth = tok.shape[1]
    if hf_config is not None:
        v_heads = int(hf_config["vision_config"]["num_attention_heads"])
        t_heads = int(hf_config["text_config"]["num_attention_heads"])
    else:
        v_heads, t_heads = _heads(width, "vision"), _heads(twidth, "text")
    return dict(
        image_size=grid * patch, patch_size=patch, vision_width=width, vision_layers=n_v,
        vision_heads=v_heads, text_width=twidth, text_layers=n_t, text_heads=t_heads,
        embed_dim=embed, context_length=tpos.shape[0], vocab_size=tok.shape[0],
        vision_mlp_ratio=vfc.shape[0] / width, text_mlp_ratio=tfc.shape[0] / twidth)


def model_config_from_arch(arch: dict, act: str, ln_eps: float) -> mlc.ConfigDict:
    """A ``config.model`` section (configs/common.py defaults) for an inferred architecture."""
    kw = {k: v for k, v in arch.items() if not k.endswith("mlp_ratio")}
    m = common.model_config(act=act, **kw)
    m.ln_eps = ln_eps
    m.vision.mlp_ratio = arch["vision_mlp_ratio"]
    m.text.mlp_ratio = arch["text_mlp_ratio"]
    return m


def arch_of_config(m: mlc.ConfigDict) -> dict:
    """The ``infer_arch`` fields of a ``config.model`` section, for comparisons."""
    v, t = m.vision, m.text
    return dict(
        image_size=v.image_size, patch_size=v.patch_size, vision_width=v.width,
        vision_layers=v.layers, vision_heads=v.heads, text_width=t.width, text_layers=t.layers,
        text_heads=t.heads, embed_dim=m.embed_dim, context_length=t.context_length,
        vocab_size=t.vocab_size, vision_mlp_ratio=v.mlp_ratio, text_mlp_ratio=t.mlp_ratio)
