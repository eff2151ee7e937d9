"""ViT-L/14 UMG-CLIP with token merging: half of the patch tokens merged away after block 8.

The 15 blocks after the merge run on 129 instead of 257 tokens; the last block runs on the
restored grid so the region / pixel losses see the full 16 x 16 dense map (see
umg_jax/models/token_merge.py). Scan is off (the token count changes mid-stack). Inference and
evaluation use all tokens.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import vit_l  # noqa: E402


def get_config(arg=None):
    config = vit_l.get_config(arg)
    config.name = "vit_l_merge"  # run name shown in logs
    config.model.scan = False  # token count changes after the merge: no scan over blocks
    config.model.vision.merge_after = 7  # merge after block 8 of 24 (ToMe-style, one round)
    config.model.vision.merge_ratio = 0.5  # remove half of the 256 patch tokens
    return config
