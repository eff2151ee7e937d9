"""Vision tower: ViT exactly as OpenAI CLIP / open_clip build it, plus dense patch embeddings.

``conv1`` (patch embedding, no bias) -> prepend ``class_embedding`` -> add ``positional_embedding``
(incl. the class slot) -> ``ln_pre`` -> residual blocks -> ``ln_post`` -> ``proj``.
The global embedding is the projected class token. The dense embedding is the projected patch
tokens of the last block, which in ``dense_mode="maskclip"`` takes the value path only
(MaskCLIP, Zhou et al. 2022; CLIPSelf): plain CLIP patch tokens of the last layer are dominated by
global context and localise poorly, the value path keeps them local.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from umg_jax.models import token_merge
from umg_jax.models.layers import Dtype, Transformer, layer_norm


class PatchEmbed(nn.Module):
    """Stride-``p`` convolution without bias, written as patchify + matmul (same maths, same
    speed on XLA). Param ``kernel [p, p, 3, D]`` = PyTorch
    ``conv1.weight.transpose(2, 3, 1, 0)``."""

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, 3]`` -> ``[B, H/p, W/p, D]``."""
        p = self.patch_size
        b, h, w, c = x.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width),
                            jnp.float32)
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, h // p, w // p, p * p * c).astype(self.dtype)
        return jnp.dot(x, kernel.reshape(p * p * c, self.width).astype(self.dtype))


class VisionTransformer(nn.Module):
    """``encode`` returns the global embedding ``[B, E]`` and dense embeddings
    ``[B, gh, gw, E]``."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False
    dense_mode: str = "maskclip"
    merge_after: int = -1  # token merging after this block (-1: off), see token_merge.py
    merge_ratio: float = 0.0  # fraction of patch tokens removed (<= 0.5)
    merge_proportional: bool = True  # log-size attention bias on merged tokens (ToMe)
    adapter_dim: int = 0  # bottleneck adapters in every block (PEFT; 0 = off)

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``images [B, H, W, 3] float32`` (normalised) -> ``(img [B, E], dense [B, gh, gw, E])``,
        both float32 and unnormalised."""
        if self.dense_mode not in ("maskclip", "plain"):
            raise ValueError(f"dense_mode must be 'maskclip' or 'plain', got {self.dense_mode!r}")
        x = PatchEmbed(self.patch_size, self.width, self.dtype, name="conv1")(images)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        scale = self.width ** -0.5
        cls = self.param("class_embedding", nn.initializers.normal(scale), (d,), jnp.float32)
        pos = self.param("positional_embedding", nn.initializers.normal(scale),
                         (gh * gw + 1, d), jnp.float32)
        if pos.shape[0] != gh * gw + 1:
            raise ValueError(f"positional_embedding has {pos.shape[0]} rows for a {gh}x{gw} grid")
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        x = (x + pos.astype(x.dtype)).astype(self.dtype)
        x = layer_norm(self.ln_eps, "ln_pre")(x).astype(self.dtype)
        x = Transformer(
            width=self.width, layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio,
            act=self.act, ln_eps=self.ln_eps, dtype=self.dtype, remat=self.remat,
            remat_policy=self.remat_policy, scan=self.scan, last_separate=True,
            last_dense_value_path=self.dense_mode == "maskclip",
            merge_after=self.merge_after,
            merge_r=token_merge.num_merged(gh * gw, self.merge_ratio) if self.merge_after >= 0
            else 0, merge_proportional=self.merge_proportional, adapter_dim=self.adapter_dim,
            name="transformer")(x)
        x = layer_norm(self.ln_eps, "ln_post")(x)
        proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=nn.initializers.normal(scale), name="proj")
        x = proj(x.astype(self.dtype)).astype(jnp.float32)
        return x[:, 0], x[:, 1:].reshape(b, gh, gw, self.embed_dim)
