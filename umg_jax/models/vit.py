"""Vision tower: ViT exactly as OpenAI CLIP / open_clip build it, plus dense patch embeddings.

``conv1`` (patch embedding, no bias) -> prepend ``class_embedding`` -> add ``positional_embedding``
(incl. the class slot) -> ``ln_pre`` -> residual blocks -> ``ln_post`` -> ``proj``.
The global embedding is the projected class token. The dense embedding is the projected patch
tokens of the last block, which in ``dense_mode="maskclip"`` takes the value path only
(MaskCLIP, Zhou et al. 2022; CLIPSelf): plain CLIP patch tokens of the last layer are dominated by
global context and localise poorly, the value path keeps them local.

SigLIP towers (big_vision) are the same transformer with other choices, each a switch:
``class_token=False`` (the positional table has no class row), ``ln_pre=False``,
``patch_bias=True``, ``pool="map"`` (a :class:`~umg_jax.models.layers.MAPHead` pools the tokens
after ``ln_post``; the dense map is that head applied to each token alone, the MaskCLIP
construction with the MAP attention as the pooling attention) and ``proj="bias"`` / ``"none"``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from umg_jax.models import token_merge
from umg_jax.models.layers import Dense, Dtype, MAPHead, Transformer, layer_norm
from umg_jax.ops.dense import dense


class PatchEmbed(nn.Module):
    """Stride-``p`` convolution without bias, written as patchify + matmul (same maths, same
    speed on XLA). Param ``kernel [p, p, 3, D]`` = PyTorch
    ``conv1.weight.transpose(2, 3, 1, 0)``."""

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32
    use_bias: bool = False  # big_vision / SigLIP patch embeddings have a bias

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
        x = x.reshape(b, h // p, w // p, p * p * c)
        bias = (self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
                if self.use_bias else None)
        return dense(x, kernel.reshape(p * p * c, self.width), bias, dtype=self.dtype)


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
    mlp_dim: int = 0  # explicit MLP hidden width; 0 = width * mlp_ratio
    class_token: bool = True  # False: SigLIP (no class token, no class row in the posemb)
    ln_pre: bool = True  # False: SigLIP (no LayerNorm before the blocks)
    patch_bias: bool = False  # True: SigLIP (biased patch embedding)
    pool: str = "cls"  # "cls": class token (CLIP); "map": attention-pooling head (SigLIP)
    proj: str = "plain"  # "plain": Dense without bias; "bias": with bias; "none": identity
    attention: str = "auto"  # attention implementation (layers.Attention)

    def _check(self):
        if self.dense_mode not in ("maskclip", "plain"):
            raise ValueError(f"dense_mode must be 'maskclip' or 'plain', got {self.dense_mode!r}")
        if self.pool not in ("cls", "map"):
            raise ValueError(f"vision pool must be 'cls' or 'map', got {self.pool!r}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("vision pool='cls' needs class_token=True")
        if self.pool == "map" and self.dense_mode != "maskclip":
            raise ValueError("vision pool='map' defines its dense map by the MAP head's value "
                             "path (MaskCLIP-style); set dense_mode='maskclip'")
        if self.proj not in ("plain", "bias", "none"):
            raise ValueError(f"vision proj must be 'plain', 'bias' or 'none', got {self.proj!r}")
        if self.proj == "none" and self.embed_dim != self.width:
            raise ValueError(f"vision proj='none' needs embed_dim == width, got {self.embed_dim} "
                             f"and {self.width}")
        if self.merge_after >= 0 and not self.class_token:
            raise ValueError("token merging needs a class token (class_token=True)")

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``images [B, H, W, 3] float32`` (normalised) -> ``(img [B, E], dense [B, gh, gw, E])``,
        both float32 and unnormalised."""
        self._check()
        x = PatchEmbed(self.patch_size, self.width, self.dtype, self.patch_bias,
                       name="conv1")(images)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        scale = self.width ** -0.5
        n_cls = int(self.class_token)
        # Creation order fixes the init RNG streams: class_embedding first, as always.
        if self.class_token:
            cls = self.param("class_embedding", nn.initializers.normal(scale), (d,), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        pos = self.param("positional_embedding", nn.initializers.normal(scale),
                         (gh * gw + n_cls, d), jnp.float32)
        if pos.shape[0] != gh * gw + n_cls:
            raise ValueError(f"positional_embedding has {pos.shape[0]} rows for a {gh}x{gw} grid")
        x = (x + pos.astype(x.dtype)).astype(self.dtype)
        if self.ln_pre:
            x = layer_norm(self.ln_eps, "ln_pre")(x).astype(self.dtype)
        x = Transformer(
            width=self.width, layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio,
            act=self.act, ln_eps=self.ln_eps, dtype=self.dtype, remat=self.remat,
            remat_policy=self.remat_policy, scan=self.scan, last_separate=True,
            last_dense_value_path=self.dense_mode == "maskclip" and self.pool == "cls",
            merge_after=self.merge_after,
            merge_r=token_merge.num_merged(gh * gw, self.merge_ratio) if self.merge_after >= 0
            else 0, merge_proportional=self.merge_proportional, adapter_dim=self.adapter_dim,
            mlp_dim=self.mlp_dim, attention=self.attention, name="transformer")(x)
        x = layer_norm(self.ln_eps, "ln_post")(x).astype(self.dtype)
        if self.pool == "map":  # [pooled, per-token], laid out like [class, patches]
            head = MAPHead(self.width, self.heads, self.mlp_ratio, self.act, self.ln_eps,
                           self.dtype, self.mlp_dim, attention=self.attention, name="map_head")
            x = jnp.concatenate([head(x)[:, None], head.per_token(x)], axis=1)
        if self.proj != "none":
            x = Dense(self.embed_dim, use_bias=self.proj == "bias", dtype=self.dtype,
                      kernel_init=nn.initializers.normal(scale), name="proj")(x)
        x = x.astype(jnp.float32)
        return x[:, 0], x[:, 1:].reshape(b, gh, gw, self.embed_dim)
