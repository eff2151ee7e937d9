"""ViT-L/14 UMG-CLIP at 336 px (OpenAI ViT-L/14@336 shapes; positional embeddings are resized
on import).

The batch of 16,384 (64 per chip on 256 chips) fits a v5e slice at 14.1 of 16 GiB per chip, with
the Pallas flash-attention kernel in every vision block (577 tokens); 18,432 (72 per chip) still
fits at 15.5 GiB. ``configs/vit_l336.py:GEN-N`` sets the batch for a slice of N chips of a
generation the TPU compiler has searched, or N GPUs of a card XLA:GPU has searched (``h100-8``,
``h200-16``; README "Pods")."""

import ml_collections as mlc

from umg_jax.configs import common, vit_l

# Largest per-chip batch that fits (the TPU compiler, libtpu 0.0.42.1, fsdp 8, 2026-11-30/12-01;
# benchmarks/results/dryrun/vit_l336_*.json, each searched to within one granule of 8 per chip);
# per GPU (XLA:GPU, jax-cuda12-plugin 0.10.2, 2026-12-07, within JAX's default 75 % of the
# GPU's memory): the smaller of one and two 8-GPU hosts (H100 528 on one, 392 on two; H200 712
# on one, 760 on two).
PER_CHIP_MAX = {"v4": 152, "v5e": 72, "v5p": 464, "v6e": 144, "h100": 392, "h200": 712}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    config = vit_l.get_config(arg)
    config.name = "vit_l336"  # run name shown in logs
    config.model.vision.image_size = 336  # 24 x 24 patch grid
    config.batch_size = common.slice_batch(arg, 16384, PER_CHIP_MAX)  # 2.25x the tokens of 224 px
    return config
