"""Open-vocabulary panoptic / semantic segmentation head on a frozen ViT-L/14 UMG-CLIP.

    python -m umg_jax.train --config configs/seg_vit_l.py --workdir DIR \
        --config.init.checkpoint=UMG_VIT_L_WORKDIR --config.data.path=COCO_PANOPTIC_SHARDS

COCO-panoptic shards come from ``python -m umg_jax.data.build coco --panoptic ...``; evaluate
zero-shot on another data set with ``python -m umg_jax.evaluate --workdir DIR --data SHARDS``
(its ``meta.json`` categories are the vocabulary). Not run end to end on this CPU-only machine.

The batch of 64 suits 8-64 chips (it must divide by data x fsdp). Memory is no limit: XLA:GPU
fits 8,320 (1,040 per GPU) on one 8 x H100 host (backbone frozen; README "Pods", GPU nodes).
"""

from umg_jax.configs import vit_l


def get_config(arg=None):
    config = vit_l.get_config(arg)
    config.name = "seg_vit_l"  # run name shown in logs
    config.batch_size = 64  # global batch (segmentation data sets are small)
    config.total_steps = 40000  # decoder steps (Mask2Former-style schedule)
    config.seg.enabled = True  # train the mask decoder on the frozen backbone
    config.seg.num_queries = 100  # queries (>= segments per image)
    config.seg.width = 256  # decoder width
    config.seg.layers = 6  # decoder layers
    config.seg.heads = 8  # decoder attention heads
    config.data.max_masks = 64  # segments per image kept as targets
    config.data.min_mask_frac = 0.0  # keep every segment: panoptic targets must be complete
    config.optim.lr = 1e-4  # Mask2Former's AdamW lr
    config.optim.weight_decay = 0.05  # Mask2Former's decay
    config.optim.layer_decay = 1.0  # only the head trains
    config.optim.warmup_steps = 500  # warmup
    return config
