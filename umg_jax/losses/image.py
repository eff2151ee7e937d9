"""Image-level terms: global image embedding <-> caption, and <-> image tag prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from umg_jax.losses.contrastive import contrastive_loss, token_keys


def image_text_loss(img: jax.Array, txt: jax.Array, text: jax.Array, text_valid: jax.Array,
                    log_scale: jax.Array, bias: jax.Array | None, *, kind: str,
                    chunk_size: int, mesh: Mesh, exchange: str = "all_gather",
                    exchange_dtype: str = "float32"
                    ) -> tuple[jax.Array, jax.Array]:
    """CLIP / SigLIP loss between images and their captions over the global batch.

    ``img [B, E]``, ``txt [B, E]`` embeddings; ``text [B, L]`` int32 caption tokens (equal
    captions are positives of each other's images); ``text_valid [B]`` bool (an example without a
    caption is neither an anchor nor a negative). Returns ``(loss, image->text top-1 accuracy)``.
    """
    keys = token_keys(text)  # [B, 2]
    return contrastive_loss(img, text_valid, keys[:, None], text_valid[:, None], txt, text_valid,
                            keys, log_scale, bias, kind=kind, chunk_size=chunk_size, mesh=mesh,
                            exchange=exchange,
                            exchange_dtype=exchange_dtype)


def image_tags_loss(img: jax.Array, tags_txt: jax.Array, tags: jax.Array, tags_valid: jax.Array,
                    log_scale: jax.Array, bias: jax.Array | None, *, kind: str,
                    chunk_size: int, mesh: Mesh, exchange: str = "all_gather",
                    exchange_dtype: str = "float32"
                    ) -> tuple[jax.Array, jax.Array]:
    """Images vs the tag prompts of every image in the global batch, multi-positive.

    ``img [B, E]``; ``tags_txt [B, T, E]`` tag-prompt embeddings; ``tags [B, T, L]`` int32;
    ``tags_valid [B, T]`` bool. An image's positives are all prompts whose tokens equal one of its
    own tags (so the same tag on two images is a positive of both); an image without tags is not
    an anchor. Returns ``(loss, top-1 accuracy)`` (the best-scoring prompt is one of its tags).
    """
    keys = token_keys(tags)  # [B, T, 2]
    return contrastive_loss(img, jnp.any(tags_valid, axis=-1), keys, tags_valid, tags_txt,
                            tags_valid, keys, log_scale, bias, kind=kind, chunk_size=chunk_size,
                            mesh=mesh, exchange=exchange,
                            exchange_dtype=exchange_dtype)
