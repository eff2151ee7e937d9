"""Static-shape, differentiable pooling ops on dense feature maps (pure ``jnp``)."""

from umg_jax.ops.mask_pool import mask_pool
from umg_jax.ops.roi_align import roi_align, roi_pool_embed

__all__ = ["mask_pool", "roi_align", "roi_pool_embed"]
