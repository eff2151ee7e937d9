"""Tiny UMG-CLIP with LoRA: the backbone frozen, rank-8 LoRA on attention and MLP kernels.

    python -m umg_jax.train --config configs/tiny_lora.py --workdir /tmp/umg_tiny_lora \
        --config.init.checkpoint=/tmp/umg_tiny        # start from a trained tiny run

Only the LoRA factors (and their Adam moments) train; the start-of-run report lists trainable vs
frozen parameters per module. Export and ``umg_jax.load`` merge the factors into the weights.
"""

from umg_jax.configs import tiny


def get_config(arg=None):
    config = tiny.get_config(arg)
    config.name = "tiny_lora"  # run name shown in logs
    config.peft.enabled = True  # frozen backbone + LoRA
    config.optim.lr = 1e-3  # LoRA factors tolerate a larger step than full fine-tuning
    return config
