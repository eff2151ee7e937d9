"""ViT-L/14 UMG-CLIP with token merging: half of the patch tokens merged away after block 5.

The 19 blocks after the merge run on 129 instead of 257 tokens; the grid is restored after the
last block, so the region / pixel losses see the full 16 x 16 dense map (see
umg_jax/models/token_merge.py). Scan is off (the token count changes mid-stack). Inference and
evaluation use all tokens.
"""

from umg_jax.configs import vit_l


def get_config(arg=None):
    config = vit_l.get_config(arg)
    config.name = "vit_l_merge"  # run name shown in logs
    config.model.scan = False  # token count changes after the merge: no scan over blocks
    config.model.vision.merge_after = 4  # merge after block 5 of 24 (ToMe-style, one round)
    config.model.vision.merge_ratio = 0.5  # remove half of the 256 patch tokens
    return config
