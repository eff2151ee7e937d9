"""UMG training from a big_vision SigLIP B/16-224 (English WebLI, 32k SentencePiece vocabulary),
with the sigmoid loss it was pre-trained with.

    python -m umg_jax.interop.import_torch webli_en_b16_224_63724782.npz \
        --config configs/siglip_b16.py --tokenizer cased_tokens.model --out /ckpt/siglip
    python -m umg_jax.train --config configs/siglip_b16.py --workdir DIR \
        --config.init.checkpoint=/ckpt/siglip \
        --config.model.text.tokenizer=/ckpt/siglip/tokenizer.model --config.data.path=SHARDS

Dense features: SigLIP has no class token; the region / pixel terms use its MAP head applied to
each patch token alone (umg_jax/models/vit.py).
"""

import ml_collections as mlc

from umg_jax.configs import common, vit_b16


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    config = vit_b16.get_config(arg)  # every section but the model and the loss as for B/16
    config.name = "siglip_b16"  # run name shown in logs
    config.batch_size = 16384  # global batch
    config.model = common.siglip_towers(common.model_config(
        image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
        text_width=768, text_layers=12, text_heads=12, embed_dim=768, context_length=64,
        vocab_size=32000,
    ))
    config.model.remat = True  # activations of 12 blocks x 16k images
    config.model.scan = True  # constant compile time in depth
    config.model.dtype = "bfloat16"  # bf16 matmuls on accelerators, params + loss in float32
    config.loss.kind = "sigmoid"  # SigLIP's loss (uses model.logit_bias_init)
    config.loss.exchange = "ring"  # text blocks travel a ppermute ring (memory flat in devices)
    config.optim.warmup_steps = 1000  # lr 1e-5 as B/16: continued training from a pretrained SigLIP
    return config
