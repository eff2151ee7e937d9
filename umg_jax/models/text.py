"""Text tower: causal transformer as in OpenAI CLIP / open_clip.

``token_embedding`` + ``positional_embedding`` -> causal residual blocks -> ``ln_final`` -> the
end-of-text token (the largest id in every CLIP-tokenised row, hence ``argmax``) ->
``text_projection``.

SigLIP's text tower (big_vision) is the same transformer with ``causal=False``, ``pool="last"``
(the embedding is the last position's; rows are padded with ``pad_id`` to the full context, as in
training, since without a causal mask the padding changes every token) and a biased projection.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from umg_jax.models.layers import Dense, Dtype, Transformer, layer_norm


class TextTransformer(nn.Module):
    context_length: int
    vocab_size: int
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
    adapter_dim: int = 0  # bottleneck adapters in every block (PEFT; 0 = off)
    mlp_dim: int = 0  # explicit MLP hidden width; 0 = width * mlp_ratio
    causal: bool = True  # False: SigLIP (bidirectional attention)
    pool: str = "eot"  # "eot": the largest id (CLIP's end-of-text); "last": last position
    proj_bias: bool = False  # True: SigLIP's biased head
    pad_id: int = 0  # id that pads rows to the full context when pool == "last"
    attention: str = "auto"  # attention implementation (layers.Attention)

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens [N, L'] int32``, ``L' <= context_length`` -> ``[N, E] float32`` (unnormalised).

        Shorter sequences use the first ``L'`` positional embeddings; with the causal mask the
        embedding of a text that fits in ``L'`` tokens is the same as at the full context. With
        ``pool="last"`` shorter rows are padded with ``pad_id`` to the full context first.
        """
        if self.pool not in ("eot", "last"):
            raise ValueError(f"text pool must be 'eot' or 'last', got {self.pool!r}")
        if self.pool == "eot" and not self.causal:
            raise ValueError("text pool='eot' needs causal=True (the texts are cut short)")
        n, length = tokens.shape
        if length > self.context_length:
            raise ValueError(f"text has length {length}, more than the model's context "
                             f"{self.context_length}")
        if self.pool == "last" and length < self.context_length:
            tokens = jnp.pad(tokens, ((0, 0), (0, self.context_length - length)),
                             constant_values=self.pad_id)
            length = self.context_length
        x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     param_dtype=jnp.float32, name="token_embedding")(tokens)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                         (self.context_length, self.width), jnp.float32)
        x = (x + pos[:length]).astype(self.dtype)
        x = Transformer(
            width=self.width, layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio,
            act=self.act, ln_eps=self.ln_eps, dtype=self.dtype, causal=self.causal,
            remat=self.remat, remat_policy=self.remat_policy, scan=self.scan,
            adapter_dim=self.adapter_dim, mlp_dim=self.mlp_dim, attention=self.attention,
            name="transformer")(x)
        # ln_final is per token, so pooling first is the same maths on 1/L of the work.
        x = x[:, -1] if self.pool == "last" else x[jnp.arange(n), jnp.argmax(tokens, axis=-1)]
        x = layer_norm(self.ln_eps, "ln_final")(x)
        proj = Dense(self.embed_dim, use_bias=self.proj_bias, dtype=self.dtype,
                     kernel_init=nn.initializers.normal(self.width ** -0.5),
                     name="text_projection")
        return proj(x.astype(self.dtype)).astype(jnp.float32)
