"""ViT-B/16 UMG-CLIP (OpenAI CLIP ViT-B/16 shapes: 149,620,737 parameters).

    python -m umg_jax.train --config configs/vit_b16.py --workdir DIR --config.data.path=SHARDS
"""

import ml_collections as mlc

from umg_jax.configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    config = mlc.ConfigDict()
    config.name = "vit_b16"  # run name shown in logs
    config.seed = 0  # parameter-init seed
    config.batch_size = 4096  # global batch
    config.total_steps = 20000  # training steps
    config.model = common.model_config(
        image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
        text_width=512, text_layers=12, text_heads=8, embed_dim=512,
    )
    config.data = common.data_config()
    config.loss = common.loss_config()
    config.optim = common.optim_config()
    config.optim.lr = 1e-5  # continued training from a pretrained CLIP
    config.mesh = common.mesh_config()
    config.train = common.train_config()
    config.init = common.init_config()
    config.eval = common.eval_config()
    config.peft = common.peft_config()
    config.seg = common.seg_config()
    config.ckpt = common.ckpt_config()
    config.log = common.log_config()
    return config
