"""ViT-L/14 UMG-CLIP at 224 px, the flagship (OpenAI ViT-L/14 shapes: 427,616,513 parameters).

Continued multi-granularity training from a pretrained CLIP imported from PyTorch:

    python -m umg_jax.interop.import_torch ViT-L-14.pt --config configs/vit_l.py --out /ckpt/init
    python -m umg_jax.train --config configs/vit_l.py --workdir DIR \
        --config.init.checkpoint=/ckpt/init --config.data.path=SHARDS

The paper's hyper-parameters are not public; these follow EVA-CLIP-style continued training.

Pod slices (the TPU compiler's verdict under this config's text profile,
``benchmarks/pod_recipes.py``, README "Pods"): the global batch of 32,768 fits a v5e slice of
256 chips (128 per chip, 15.2 of 16 GiB) and v4, v5p and v6e slices of 256 chips by their
per-chip batches. Name the slice as the config argument and the batch becomes the largest that
fits it when 32,768 does not:

    python -m umg_jax.train --config configs/vit_l.py:v4-64 ...    # batch 29,184 (456 per chip)

GPU nodes the same way (XLA:GPU's verdict within JAX's default 75 % of each GPU's memory,
``benchmarks/pod_recipes.py --gpu``): ``configs/vit_l.py:h100-8`` -> 9,408 (1,176 per GPU),
``:h200-16`` -> 32,768 (2,280 per GPU fits 36,480). A batch whose texts outgrow the profile's
budgets runs with bigger ones (logged once), which such a recipe batch may not fit.
"""

import ml_collections as mlc

from umg_jax.configs import common

# Largest per-chip batch that fits, by TPU generation (the TPU compiler, libtpu 0.0.42.1,
# fsdp 8, 2026-12-08; benchmarks/results/dryrun/vit_l_<gen>_*.json) and per GPU by card
# (XLA:GPU, jax-cuda12-plugin 0.10.2, 2026-12-08, within JAX's default 75 % of the GPU's memory;
# the smaller of one and two 8-GPU hosts: H100 1,176 on one, 1,248 on two; H200 2,352 / 2,280).
PER_CHIP_MAX = {"v4": 456, "v5e": 128, "v5p": 1264, "v6e": 424, "h100": 1176, "h200": 2280}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """``arg``: a TPU slice ``GEN-CHIPS`` (e.g. ``v5e-256``) caps the batch to what fits it."""
    config = mlc.ConfigDict()
    config.name = "vit_l"  # run name shown in logs
    config.seed = 0  # parameter-init seed
    config.batch_size = common.slice_batch(arg, 32768, PER_CHIP_MAX)  # global batch
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
    # The text profile of the dry run (README "Pods"): tags from a 4,585-tag list (RAM's, as
    # UMG-41M's); free-form region / mask phrases fill at most free_text_frac of the element
    # slots of a batch shard, the rest are tag prompts of that list or empty.
    config.data.text_vocab_size = 4585  # dry run only: the data's meta.json text_vocab is read
    config.loss = common.loss_config()
    config.loss.free_text_frac = 0.2  # free-form texts per batch shard / its element slots
    # the global region / mask texts the loss gathers ([32768 x 16, 768] each) in bf16: with
    # bf16 activations, 32,768 fits a v5e-256 slice (benchmarks/results/dryrun/, README "Pods")
    config.loss.exchange_dtype = "bfloat16"
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
