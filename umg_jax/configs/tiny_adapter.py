"""Tiny UMG-CLIP with bottleneck adapters: the backbone frozen, a 32-wide adapter after every
block of both towers.

    python -m umg_jax.train --config configs/tiny_adapter.py --workdir /tmp/umg_tiny_adapter \
        --config.init.checkpoint=/tmp/umg_tiny        # start from a trained tiny run

Only the adapters (and their Adam moments) train; the start-of-run report lists trainable vs
frozen parameters per module. Adapters start as the identity (zero ``up`` projection). Unlike
LoRA they cannot be folded into CLIP weights: ``umg_jax.interop.export_torch --format hf`` writes
them to ``umg_adapters.safetensors``, which ``interop/torch_model.py`` applies (open_clip refuses).
"""

from umg_jax.configs import tiny


def get_config(arg=None):
    config = tiny.get_config(arg)
    config.name = "tiny_adapter"  # run name shown in logs
    config.peft.enabled = True  # frozen backbone
    config.peft.method = "adapter"  # train bottleneck adapters, not LoRA factors
    config.model.vision.adapter_dim = 32  # bottleneck width in the image tower
    config.model.text.adapter_dim = 32  # bottleneck width in the text tower
    config.optim.lr = 1e-3  # adapters tolerate a larger step than full fine-tuning
    return config
