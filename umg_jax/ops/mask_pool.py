"""Area-weighted mean pooling of a feature map under soft masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mask_pool(features: jax.Array, mask_area: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Mean of the features under each mask, weighted by the covered fraction of each cell.

    Args:
      features: ``[B, gh, gw, E]`` feature map.
      mask_area: ``[B, M, gh, gw]`` float32 fraction of each feature cell covered by each mask
        (``batch["mask_area"]``).
      eps: total areas below this count as empty.

    Returns:
      ``[B, M, E]``; an empty mask (total area < eps) gives zeros (and zero gradients), never NaN.
    """
    if features.ndim != 4 or mask_area.ndim != 4:
        raise ValueError(f"features must be [B, gh, gw, E] and mask_area [B, M, gh, gw], got "
                         f"{features.shape} and {mask_area.shape}")
    b, gh, gw, _ = features.shape
    if mask_area.shape[0] != b or mask_area.shape[2:] != (gh, gw):
        raise ValueError(f"mask_area {mask_area.shape} does not match features {features.shape}")
    area = mask_area.astype(features.dtype)
    total = area.sum(axis=(2, 3))  # [B, M]
    summed = jnp.einsum("bmhw,bhwe->bme", area, features)
    denom = jnp.where(total >= eps, total, 1.0)
    return jnp.where((total >= eps)[..., None], summed / denom[..., None], 0.0)
