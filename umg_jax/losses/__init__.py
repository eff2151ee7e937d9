"""Multi-granularity contrastive losses (image, tags, region, mask, pixel) and their sharded core.

``umg.umg_loss`` is the entry point of the train step; ``contrastive.contrastive_loss`` is the
chunked ``shard_map`` core every global-batch term uses.
"""

from umg_jax.losses.contrastive import contrastive_loss, token_keys
from umg_jax.losses.umg import umg_loss

__all__ = ["contrastive_loss", "token_keys", "umg_loss"]
