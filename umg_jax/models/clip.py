"""UMG-CLIP two-tower model: CLIP's towers and temperatures, plus dense features and one learned
temperature per granularity.

Outputs (all unnormalised float32; the losses normalise):
  ``img [B, E]`` global image embedding, ``dense [B, gh, gw, E]`` patch embeddings in the joint
  space, ``txt [N, E]`` text embeddings, ``scales {granularity: log-scale}`` (clamped to
  ``logit_scale_max``), ``biases {granularity: bias}`` or ``None``.

Params: ``visual/...``, ``text/...``, ``logit_scale`` (CLIP's, used for the image level) and, when
``granularity_scales`` is on, ``logit_scale_{tags,region,mask,pixel}`` (FG-CLIP uses separate
temperatures for global and region terms; the paper is silent, so it is a switch). With a logit
bias (sigmoid loss): ``logit_bias`` and ``logit_bias_{...}`` likewise.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from umg_jax.models.layers import dtype_of, get_activation
from umg_jax.models.text import TextTransformer
from umg_jax.models.vit import VisionTransformer

GRANULARITIES = ("image", "tags", "region", "mask", "pixel")

# Tower switches (``config.model.{vision,text}``) with CLIP's values: the defaults for configs
# written before a switch existed, and what export to a CLIP layout requires.
CLIP_TOWERS = {
    "vision": {"class_token": True, "ln_pre": True, "patch_bias": False, "pool": "cls",
               "proj": "plain"},
    "text": {"causal": True, "pool": "eot", "proj_bias": False},
}
# The same switches in big_vision's SigLIP (configs/common.py:siglip_towers; the image head may
# be "bias" or "none", so ``proj`` is not part of what makes a SigLIP).
SIGLIP_TOWERS = {
    "vision": {"class_token": False, "ln_pre": False, "patch_bias": True, "pool": "map"},
    "text": {"causal": False, "pool": "last", "proj_bias": True},
}


def tower_switches(m: mlc.ConfigDict, tower: str) -> dict:
    """``{switch: value}`` of ``m[tower]`` for every switch in ``CLIP_TOWERS[tower]``."""
    return {k: m[tower].get(k, d) for k, d in CLIP_TOWERS[tower].items()}


class CLIP(nn.Module):
    config: mlc.ConfigDict  # the ``config.model`` section (configs/common.py:model_config)

    def setup(self):
        m = self.config
        get_activation(m.act)  # fail early on a bad name
        dtype = dtype_of(m.dtype)
        common = dict(act=m.act, ln_eps=m.ln_eps, dtype=dtype, remat=m.remat,
                      remat_policy=m.remat_policy, scan=m.scan,
                      attention=m.get("attention", "auto"))
        v, t = m.vision, m.text
        self.visual = VisionTransformer(
            image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
            heads=v.heads, embed_dim=m.embed_dim, mlp_ratio=v.mlp_ratio,
            dense_mode=m.dense_mode, merge_after=v.get("merge_after", -1),
            merge_ratio=v.get("merge_ratio", 0.0),
            merge_proportional=v.get("merge_proportional", True),
            adapter_dim=v.get("adapter_dim", 0), mlp_dim=v.get("mlp_dim", 0),
            **tower_switches(m, "vision"), **common)
        self.text = TextTransformer(
            context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
            layers=t.layers, heads=t.heads, embed_dim=m.embed_dim, mlp_ratio=t.mlp_ratio,
            adapter_dim=t.get("adapter_dim", 0), mlp_dim=t.get("mlp_dim", 0),
            pad_id=t.get("pad_id", 0), **tower_switches(m, "text"), **common)
        init = nn.initializers.constant(m.logit_scale_init)
        own = GRANULARITIES[1:] if m.get("granularity_scales", False) else ()
        self.logit_scale = self.param("logit_scale", init, (), jnp.float32)
        self.extra_scales = {g: self.param(f"logit_scale_{g}", init, (), jnp.float32) for g in own}
        if m.logit_bias_init is not None:
            binit = nn.initializers.constant(m.logit_bias_init)
            self.logit_bias = self.param("logit_bias", binit, (), jnp.float32)
            self.extra_biases = {g: self.param(f"logit_bias_{g}", binit, (), jnp.float32)
                                 for g in own}

    def encode_image(self, images: jax.Array) -> dict[str, jax.Array]:
        """``images [B, H, W, 3]`` -> ``{"img": [B, E], "dense": [B, gh, gw, E]}``."""
        img, dense = self.visual(images)
        return {"img": img, "dense": dense}

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """``tokens [..., L] int32`` -> ``[..., E]``; leading axes are flattened and restored."""
        lead = tokens.shape[:-1]
        out = self.text(tokens.reshape(-1, tokens.shape[-1]))
        return out.reshape(*lead, out.shape[-1])

    def temperatures(self) -> dict[str, dict[str, jax.Array] | None]:
        """``{"scales": {g: clamped log scale}, "biases": {g: bias} | None}`` for every
        granularity ``g`` in ``GRANULARITIES`` (shared params where there is no own one)."""
        cap = self.config.logit_scale_max
        scales = {g: jnp.minimum(self.extra_scales.get(g, self.logit_scale), cap)
                  for g in GRANULARITIES}
        biases = None
        if self.config.logit_bias_init is not None:
            biases = {g: self.extra_biases.get(g, self.logit_bias) for g in GRANULARITIES}
        return {"scales": scales, "biases": biases}

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict:
        """Both towers: ``images [B, H, W, 3]``, ``tokens [..., L]`` -> img, dense, txt, scales,
        biases."""
        return {**self.encode_image(images), "txt": self.encode_text(tokens),
                **self.temperatures()}


def build_model(model_cfg: mlc.ConfigDict) -> CLIP:
    return CLIP(model_cfg)


def dummy_inputs(model_cfg: mlc.ConfigDict, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Zero image ``[batch, S, S, 3]`` and token ``[batch, L]`` arrays for ``init``."""
    s = model_cfg.vision.image_size
    return (jnp.zeros((batch, s, s, 3), jnp.float32),
            jnp.zeros((batch, model_cfg.text.context_length), jnp.int32))


def init_params(model_cfg: mlc.ConfigDict, rng: jax.Array) -> dict:
    """Random float32 params of the model (the ``params`` collection)."""
    return build_model(model_cfg).init(rng, *dummy_inputs(model_cfg))["params"]


def abstract_params(model_cfg: mlc.ConfigDict) -> dict:
    """Shapes/dtypes of the params without allocating them (``jax.eval_shape``)."""
    return jax.eval_shape(lambda r: init_params(model_cfg, r), jax.random.key(0))
