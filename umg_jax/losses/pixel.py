"""Pixel level: mask-pooled embeddings <-> mask texts (global batch), and per-patch
classification against the texts of the masks of the same image."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from umg_jax.losses.contrastive import NEG, contrastive_loss, l2_normalize, token_keys
from umg_jax.ops.mask_pool import mask_pool


def mask_loss(dense: jax.Array, mask_area: jax.Array, mask_txt: jax.Array, mask_text: jax.Array,
              mask_valid: jax.Array, log_scale: jax.Array, bias: jax.Array | None, *, kind: str,
              chunk_size: int, mesh: Mesh, exchange: str = "all_gather",
              exchange_dtype: str = "float32"
              ) -> tuple[jax.Array, jax.Array]:
    """Mask-text contrastive loss, like the region loss with area-weighted mask pooling.

    ``dense [B, gh, gw, E]``; ``mask_area [B, M, gh, gw]`` float32; ``mask_txt [B, M, E]``;
    ``mask_text [B, M, L]`` int32; ``mask_valid [B, M]`` bool. A valid mask whose area is zero on
    the grid is not an anchor (its text stays a negative for the others).
    Returns ``(loss, mask->text top-1 accuracy)``.
    """
    emb = mask_pool(dense, mask_area)  # [B, M, E]
    nonempty = mask_area.sum(axis=(2, 3)) > 1e-6
    keys = token_keys(mask_text)  # [B, M, 2]
    return contrastive_loss(emb, mask_valid & nonempty, keys[..., None, :], mask_valid[..., None],
                            mask_txt, mask_valid, keys, log_scale, bias, kind=kind,
                            chunk_size=chunk_size, mesh=mesh, exchange=exchange,
                            exchange_dtype=exchange_dtype)


def pixel_loss(dense: jax.Array, mask_txt: jax.Array, mask_text: jax.Array,
               mask_valid: jax.Array, pixel_target: jax.Array, log_scale: jax.Array,
               bias: jax.Array | None, *, kind: str) -> tuple[jax.Array, jax.Array]:
    """Per-patch classification of each labelled patch among its own image's mask texts.

    ``dense [B, gh, gw, E]``; ``mask_txt [B, M, E]``; ``mask_text [B, M, L]`` int32;
    ``mask_valid [B, M]`` bool; ``pixel_target [B, gh, gw]`` int32 mask index, -1 = ignore
    (a target pointing at an invalid mask is ignored too).

    softmax: cross-entropy over the image's valid masks, uniform targets over the masks whose
    text equals the target's; sigmoid: per-patch sum of ``-log sigmoid(+-l)`` over the valid
    masks. Mean over labelled patches of the global batch. Row-local (no cross-image terms), so
    plain ``jnp`` under jit keeps it split over the batch. Returns ``(loss, patch accuracy)``.
    """
    b, gh, gw, e = dense.shape
    m = mask_txt.shape[1]
    d = l2_normalize(dense.reshape(b, gh * gw, e))
    t = l2_normalize(mask_txt)
    logits = jnp.exp(log_scale) * jnp.einsum("bpe,bme->bpm", d, t)
    if kind == "sigmoid":
        if bias is None:
            raise ValueError("the sigmoid loss needs a logit bias (set model.logit_bias_init)")
        logits = logits + bias
    target = pixel_target.reshape(b, gh * gw)
    safe_t = jnp.clip(target, 0, m - 1)
    keys = token_keys(mask_text)  # [B, M, 2]
    t_keys = jnp.take_along_axis(keys, safe_t[..., None], axis=1)  # [B, P, 2]
    t_ok = jnp.take_along_axis(mask_valid, safe_t, axis=1)
    labelled = (target >= 0) & (target < m) & t_ok  # [B, P]
    valid = mask_valid[:, None, :] & labelled[..., None]  # [B, P, M]
    pos = jnp.all(keys[:, None, :, :] == t_keys[:, :, None, :], axis=-1) & valid
    lm = jnp.where(valid, logits, NEG)
    if kind == "softmax":
        mx = jax.lax.stop_gradient(lm.max(axis=-1, keepdims=True))
        se = jnp.where(valid, jnp.exp(lm - mx), 0.0).sum(-1)
        lse = mx[..., 0] + jnp.log(jnp.where(se > 0, se, 1.0))
        npos = pos.sum(-1)
        per = lse - jnp.where(pos, logits, 0.0).sum(-1) / jnp.maximum(npos, 1)
    elif kind == "sigmoid":
        z = jnp.where(pos, 1.0, -1.0)
        per = jnp.where(valid, -jax.nn.log_sigmoid(z * logits), 0.0).sum(-1)
    else:
        raise ValueError(f"loss kind {kind!r} is not one of ('softmax', 'sigmoid')")
    count = jnp.maximum(labelled.sum(dtype=jnp.float32), 1.0)
    loss = jnp.where(labelled, per, 0.0).sum() / count
    correct = labelled & (jnp.where(pos, logits, NEG).max(-1) >= lm.max(-1))
    return loss, correct.sum(dtype=jnp.float32) / count
