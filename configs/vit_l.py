"""ViT-L/14 UMG-CLIP at 224 px, the flagship (OpenAI ViT-L/14 shapes: 427,616,513 parameters).

Continued multi-granularity training from a pretrained CLIP imported from PyTorch:

    python -m umg_jax.interop.import_torch ViT-L-14.pt --config configs/vit_l.py --out /ckpt/init
    python -m umg_jax.train --config configs/vit_l.py --workdir DIR \
        --config.init.checkpoint=/ckpt/init --config.data.path=SHARDS

The paper's hyper-parameters are not public; these follow EVA-CLIP-style continued training.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402
import ml_collections as mlc  # noqa: E402


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    config = mlc.ConfigDict()
    config.name = "vit_l"  # run name shown in logs
    config.seed = 0  # parameter-init seed
    config.batch_size = 32768  # global batch
    config.total_steps = 20000  # training steps
    config.model = common.model_config(
        image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
        text_width=768, text_layers=12, text_heads=12, embed_dim=768,
    )
    config.model.remat = True  # activations of 24 L/14 blocks do not fit at 32k otherwise
    config.model.scan = True  # constant compile time in depth
    config.model.dtype = "bfloat16"  # bf16 matmuls on accelerators, params + loss in float32
    config.data = common.data_config()
    config.data.max_regions = 16  # UMG-41M has a handful of regions per image
    config.data.max_masks = 16
    config.loss = common.loss_config()
    config.optim = common.optim_config()
    config.optim.lr = 2e-5  # small peak lr for continued training
    config.optim.weight_decay = 0.05  # EVA-CLIP
    config.optim.layer_decay = 0.9  # layer-wise lr decay (EVA-CLIP style)
    config.optim.warmup_steps = 1000
    config.mesh = common.mesh_config()
    config.train = common.train_config()
    config.init = common.init_config()
    config.eval = common.eval_config()
    config.peft = common.peft_config()
    config.seg = common.seg_config()
    config.ckpt = common.ckpt_config()
    config.log = common.log_config()
    config.mesh.fsdp = 8  # shard params / optimizer state 8 ways
    return config
