"""Open-vocabulary mask decoder on a frozen UMG-CLIP backbone (the PEFT segmentation head).

A light Mask2Former-style head (FC-CLIP / SAN family):

* pixel features ``[B, h, w, D]`` at ``1 / mask_stride`` of the image: the frozen dense
  embeddings (bilinearly upsampled) plus a small strided-conv stem on the raw image, which gives
  the masks the boundaries that a 14-16 px patch grid cannot;
* ``num_queries`` learned queries that cross-attend to the frozen dense map (grid resolution,
  learned position embedding), self-attend, and go through an MLP, ``layers`` times;
* per query: a mask ``[h, w]`` (dot product of its mask embedding with the pixel features) and a
  class embedding ``[E]`` in CLIP's joint space (from the query plus the pixel features pooled
  under its own mask, ``seg.pool_pixels``), classified against any vocabulary's text
  embeddings (plus a learned "void" embedding), so new categories need no retraining.

The backbone is not part of this module: it consumes ``dense [B, gh, gw, E]`` (L2-normalised)
from ``CLIP.encode_image`` and the ``image`` the backbone saw.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


class _Block(nn.Module):
    """Pre-norm decoder layer: cross-attention to the feature map, self-attention, MLP."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, q: jax.Array, qpos: jax.Array, mem: jax.Array) -> jax.Array:
        attn = lambda name: nn.MultiHeadDotProductAttention(  # noqa: E731
            num_heads=self.heads, qkv_features=self.width, out_features=self.width, name=name)
        h = nn.LayerNorm(name="ln_cross")(q)
        q = q + attn("cross")(h + qpos, mem)
        h = nn.LayerNorm(name="ln_self")(q)
        q = q + attn("self")(h + qpos, h + qpos)
        h = nn.LayerNorm(name="ln_mlp")(q)
        h = nn.Dense(4 * self.width, name="fc")(h)
        return q + nn.Dense(self.width, name="proj")(nn.gelu(h))


class MaskDecoder(nn.Module):
    """``(image [B, H, W, 3], dense [B, gh, gw, E]) -> {"mask_logits": [B, N, h, w] float32,
    "class_emb": [B, N, E] float32 (L2-normalised), "void_emb": [E], "log_scale": []}`` with
    ``h, w = H // mask_stride, W // mask_stride``."""

    config: mlc.ConfigDict  # the ``config.seg`` section (configs/common.py:seg_config)
    embed_dim: int  # E, the backbone's joint embedding size

    @nn.compact
    def __call__(self, image: jax.Array, dense: jax.Array) -> dict[str, jax.Array]:
        c = self.config
        b, hh, ww, _ = image.shape
        _, gh, gw, e = dense.shape
        s = int(c.mask_stride)
        d = int(c.width)
        h, w = hh // s, ww // s
        dense = dense.astype(jnp.float32)

        # ---- pixel features at 1/s: upsampled frozen dense map + a conv stem on the pixels
        pix = nn.Dense(d, name="pix_in")(dense)
        pix = jax.image.resize(pix, (b, h, w, d), "bilinear")
        if c.stem_channels:
            x = image.astype(jnp.float32)
            ch = int(c.stem_channels)
            for i in range(int(math.log2(s))):  # stride-2 convs down to 1/s
                x = nn.gelu(nn.Conv(ch, (3, 3), strides=2, name=f"stem_{i}")(x))
            pix = pix + nn.Dense(d, name="stem_out")(x)
        pix = pix + nn.Conv(d, (3, 3), name="pix_mix")(nn.gelu(nn.LayerNorm(name="ln_pix")(pix)))
        pix = nn.LayerNorm(name="ln_pix_out")(pix)

        # ---- queries attend to the frozen dense map at grid resolution
        pos = self.param("mem_pos", nn.initializers.normal(0.02), (gh * gw, d))
        mem = nn.Dense(d, name="mem_in")(dense).reshape(b, gh * gw, d) + pos
        n = int(c.num_queries)
        q0 = self.param("queries", nn.initializers.normal(1.0), (n, d))
        qpos = self.param("query_pos", nn.initializers.normal(1.0), (n, d))
        q = jnp.broadcast_to(q0, (b, n, d))
        for i in range(int(c.layers)):
            q = _Block(d, int(c.heads), name=f"layer_{i}")(q, qpos, mem)
        q = nn.LayerNorm(name="ln_out")(q)

        # ---- heads
        m = nn.Dense(d, name="mask_mlp_0")(q)
        m = nn.Dense(d, name="mask_mlp_1")(nn.gelu(m))
        mask_logits = jnp.einsum("bnd,bhwd->bnhw", m, pix) / math.sqrt(d)
        if c.get("pool_pixels", True):
            # The class also sees the full-resolution pixel features under the query's own
            # (soft) mask: shape cues the patch grid the queries attend to cannot resolve.
            w = jax.nn.sigmoid(jax.lax.stop_gradient(mask_logits))
            pooled = jnp.einsum("bnhw,bhwd->bnd", w, pix) / (w.sum((2, 3))[..., None] + 1.0)
            q = q + nn.Dense(d, name="pool_proj")(pooled)
        class_emb = _normalize(nn.Dense(e, name="class_proj")(q))
        void = _normalize(self.param("void_emb", nn.initializers.normal(1.0), (e,)))
        log_scale = self.param("log_scale", nn.initializers.constant(math.log(1 / 0.07)), ())
        return {"mask_logits": mask_logits, "class_emb": class_emb, "void_emb": void,
                "log_scale": jnp.minimum(log_scale, math.log(100.0))}


def class_logits(out: dict[str, jax.Array], text: jax.Array) -> jax.Array:
    """``[B, N, C + 1]``: scaled cosine similarity of each query with the ``text [C, E]``
    embeddings (L2-normalised) and, last, with the void embedding."""
    t = jnp.concatenate([text, out["void_emb"][None]], 0)
    return jnp.exp(out["log_scale"]) * jnp.einsum("bne,ce->bnc", out["class_emb"], t)


def check_config(c: mlc.ConfigDict, image_size: int) -> None:
    """Raises ``ValueError`` for a decoder config that cannot work with ``image_size``."""
    s = int(c.mask_stride)
    if s < 1 or s & (s - 1):
        raise ValueError(f"seg.mask_stride must be a power of two, got {s}")
    if image_size % s:
        raise ValueError(f"seg.mask_stride {s} does not divide the image size {image_size}")
    if c.width % c.heads:
        raise ValueError(f"seg.width {c.width} is not divisible by seg.heads {c.heads}")
    if c.num_queries < 1:
        raise ValueError("seg.num_queries must be >= 1")


def init_params(config: mlc.ConfigDict, rng: jax.Array):
    """Decoder params for the full config (``config.seg`` + the model's sizes)."""
    m = config.model
    check_config(config.seg, m.vision.image_size)
    g = m.vision.image_size // m.vision.patch_size
    image = jnp.zeros((1, m.vision.image_size, m.vision.image_size, 3), jnp.float32)
    dense = jnp.zeros((1, g, g, m.embed_dim), jnp.float32)
    return MaskDecoder(config.seg, m.embed_dim).init(rng, image, dense)["params"]
