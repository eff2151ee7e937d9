"""Our SigLIP-tower params -> a Hugging Face ``SiglipModel`` state dict and config (export only).

HF's SigLIP encoder layers, embeddings and final norms carry the same names as its CLIPModel, so
those rows come from ``mapping.py`` (``hf`` layout). What differs is written here: the biased
patch embedding, the MAP head (``vision_model.head``, a ``torch.nn.MultiheadAttention`` with fused
q/k/v), the text head (``text_model.head``, biased) and the ``(1,)`` ``logit_scale`` /
``logit_bias``. There is no image projection in ``SiglipModel``: models with ``vision.proj`` other
than ``"none"`` are refused.
"""

from __future__ import annotations

import ml_collections as mlc
import numpy as np

from umg_jax.interop.mapping import (
    HF_ACTS,
    InteropError,
    count_layers,
    expand_rows,
    kind_of,
    to_torch,
)

# Leaves of CLIPModel's table that SigLIP names differently (handled below).
_CLIP_ONLY = {"visual/proj/kernel", "text/text_projection/kernel", "logit_scale", "logit_bias"}
_HEAD = "visual/map_head/"


def _linear(prefix: str, canonical: dict, flax: str, sd: dict) -> None:
    sd[f"{prefix}.weight"] = to_torch("linear", canonical[f"{flax}/kernel"])
    sd[f"{prefix}.bias"] = to_torch("copy", canonical[f"{flax}/bias"])


def to_hf_siglip(canonical: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical flat params (unstacked layers) -> ``SiglipModel`` state dict (numpy float32).
    Raises InteropError for any leaf without a place, so nothing is dropped silently."""
    if "visual/proj/kernel" in canonical:
        raise InteropError("SiglipModel has no image projection; only vision.proj='none' "
                           "SigLIP towers can be exported to it")
    sd: dict[str, np.ndarray] = {}
    used = set()
    for r in expand_rows(count_layers(canonical, "visual"), count_layers(canonical, "text")):
        if r.flax in canonical and r.flax not in _CLIP_ONLY and r.hf is not None:
            sd[r.hf] = to_torch(kind_of(r, "hf"), canonical[r.flax])
            used.add(r.flax)
    sd["vision_model.embeddings.patch_embedding.bias"] = to_torch("copy",
                                                                  canonical["visual/conv1/bias"])
    sd["vision_model.head.probe"] = to_torch("copy", canonical[f"{_HEAD}probe"])
    attn = f"{_HEAD}attn/"
    sd["vision_model.head.attention.in_proj_weight"] = np.concatenate(
        [to_torch("heads_in", canonical[f"{attn}{n}/kernel"]) for n in ("query", "key", "value")])
    sd["vision_model.head.attention.in_proj_bias"] = np.concatenate(
        [to_torch("heads_bias", canonical[f"{attn}{n}/bias"]) for n in ("query", "key", "value")])
    sd["vision_model.head.attention.out_proj.weight"] = to_torch(
        "heads_out", canonical[f"{attn}out/kernel"])
    sd["vision_model.head.attention.out_proj.bias"] = to_torch("copy", canonical[f"{attn}out/bias"])
    sd["vision_model.head.layernorm.weight"] = to_torch("copy", canonical[f"{_HEAD}ln/scale"])
    sd["vision_model.head.layernorm.bias"] = to_torch("copy", canonical[f"{_HEAD}ln/bias"])
    _linear("vision_model.head.mlp.fc1", canonical, f"{_HEAD}mlp/c_fc", sd)
    _linear("vision_model.head.mlp.fc2", canonical, f"{_HEAD}mlp/c_proj", sd)
    _linear("text_model.head", canonical, "text/text_projection", sd)
    for k in ("logit_scale", "logit_bias"):
        sd[k] = np.asarray(canonical[k], np.float32).reshape(1)
    used |= {"visual/conv1/bias", "text/text_projection/kernel", "text/text_projection/bias",
             "logit_scale", "logit_bias"} | {k for k in canonical if k.startswith(_HEAD)}
    left = sorted(k for k in canonical if k not in used)
    if left:
        raise InteropError(f"param {left[0]} {tuple(np.shape(canonical[left[0]]))} has no "
                           f"SiglipModel name ({len(left)} such params)")
    return sd


def hf_siglip_config(m: mlc.ConfigDict) -> dict:
    """``transformers.SiglipConfig`` dict for a ``config.model`` with SigLIP towers."""
    v, t = m.vision, m.text
    common = dict(hidden_act=HF_ACTS[m.act], layer_norm_eps=float(m.ln_eps),
                  attention_dropout=0.0)
    hidden = lambda tw: int(tw.get("mlp_dim", 0) or tw.width * tw.mlp_ratio)  # noqa: E731
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "dtype": "float32",
        "text_config": dict(
            model_type="siglip_text_model", vocab_size=t.vocab_size, hidden_size=t.width,
            intermediate_size=hidden(t), num_attention_heads=t.heads, num_hidden_layers=t.layers,
            max_position_embeddings=t.context_length, projection_size=m.embed_dim,
            pad_token_id=int(t.get("pad_id", 1)), bos_token_id=None, eos_token_id=1, **common),
        "vision_config": dict(
            model_type="siglip_vision_model", hidden_size=v.width, intermediate_size=hidden(v),
            num_attention_heads=v.heads, num_hidden_layers=v.layers, image_size=v.image_size,
            patch_size=v.patch_size, num_channels=3, **common),
    }


def is_siglip(m: mlc.ConfigDict) -> bool:
    """The model has big_vision SigLIP towers (``configs/common.py:siglip_towers``)."""
    from umg_jax.models.clip import SIGLIP_TOWERS, tower_switches

    return all(tower_switches(m, tower)[k] == want for tower, sw in SIGLIP_TOWERS.items()
               for k, want in sw.items())
