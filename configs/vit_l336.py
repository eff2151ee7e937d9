"""ViT-L/14 UMG-CLIP at 336 px (OpenAI ViT-L/14@336 shapes; positional embeddings are resized
on import)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import ml_collections as mlc  # noqa: E402
import vit_l  # noqa: E402


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    config = vit_l.get_config(arg)
    config.name = "vit_l336"  # run name shown in logs
    config.model.vision.image_size = 336  # 24 x 24 patch grid
    config.batch_size = 16384  # 2.25x the tokens per image of 224 px
    return config
