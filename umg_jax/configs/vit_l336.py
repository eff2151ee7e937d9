"""ViT-L/14 UMG-CLIP at 336 px (OpenAI ViT-L/14@336 shapes; positional embeddings are resized
on import).

The batch of 16,384 (64 per chip on 256 chips) fits a v5e slice: 18,432 (72 per chip) fits at
13.7 of 16 GiB per chip under ``vit_l``'s text profile, with the Pallas flash-attention kernel in
every vision block (577 tokens). ``configs/vit_l336.py:GEN-N`` sets the batch for a slice of N
chips of a generation the TPU compiler has fitted, or N GPUs of a card XLA:GPU has searched
(``h100-8``, ``h200-16``; README "Pods"); other generations are refused until compiled."""

import ml_collections as mlc

from umg_jax.configs import common, vit_l

# Per-chip batch that fits (the TPU compiler, libtpu 0.0.42.1, fsdp 8, 2026-12-08: one compile
# per generation at this batch, not searched; benchmarks/results/dryrun/vit_l336_<gen>_*.json);
# per GPU (XLA:GPU, jax-cuda12-plugin 0.10.2, 2026-12-08, searched, within JAX's default 75 % of
# the GPU's memory): the smaller of one and two 8-GPU hosts (H100 688 on one, 664 on two; H200
# 896 on one, 1,112 on two).
PER_CHIP_MAX = {"v4": 152, "v5e": 72, "h100": 664, "h200": 896}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    config = vit_l.get_config(arg)
    config.name = "vit_l336"  # run name shown in logs
    config.model.vision.image_size = 336  # 24 x 24 patch grid
    config.batch_size = common.slice_batch(arg, 16384, PER_CHIP_MAX)  # 2.25x the tokens of 224 px
    return config
