"""Region level: RoIAlign-pooled box embeddings <-> region texts of the whole global batch."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from umg_jax.losses.contrastive import contrastive_loss, token_keys
from umg_jax.ops.roi_align import roi_pool_embed


def region_loss(dense: jax.Array, region_boxes: jax.Array, region_txt: jax.Array,
                region_text: jax.Array, region_valid: jax.Array, log_scale: jax.Array,
                bias: jax.Array | None, *, kind: str, chunk_size: int, mesh: Mesh,
                exchange: str = "all_gather",
                exchange_dtype: str = "float32",
                roi_size: int, sampling_ratio: int) -> tuple[jax.Array, jax.Array]:
    """Region-text contrastive loss.

    ``dense [B, gh, gw, E]`` patch embeddings; ``region_boxes [B, R, 4]`` normalised boxes;
    ``region_txt [B, R, E]`` region-text embeddings; ``region_text [B, R, L]`` int32 tokens;
    ``region_valid [B, R]`` bool. Each valid region's embedding is the mean of the
    ``roi_size x roi_size`` RoIAlign bins; negatives are all other valid region texts of the
    global batch, except texts equal to its own (multi-positive). Returns
    ``(loss, region->text top-1 accuracy)``.
    """
    emb = roi_pool_embed(dense, region_boxes, roi_size, sampling_ratio)  # [B, R, E]
    keys = token_keys(region_text)  # [B, R, 2]
    return contrastive_loss(emb, region_valid, keys[..., None, :], region_valid[..., None],
                            region_txt, region_valid, keys, log_scale, bias, kind=kind,
                            chunk_size=chunk_size, mesh=mesh, exchange=exchange,
                            exchange_dtype=exchange_dtype)
