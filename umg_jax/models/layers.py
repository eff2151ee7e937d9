"""Transformer building blocks shared by both towers (OpenAI CLIP / open_clip layout).

Parameter names follow the PyTorch state dict so that weight conversion is a rename + transpose
(see ``umg_jax/interop/mapping.py``): a block is ``ln_1, attn/{query,key,value,out}, ln_2,
mlp/{c_fc,c_proj}``. Params are always float32; ``dtype`` sets activation / matmul precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umg_jax.ops.attention import attention
from umg_jax.ops.dense import dense
from umg_jax.ops.platform import target_platform
from umg_jax.sharding import constrain_batch

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation ``x * sigmoid(1.702 x)``; needed for parity with OpenAI weights."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    """erf GELU (PyTorch ``nn.GELU()``); flax's default is the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def tanh_gelu(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU: big_vision's ``nn.gelu`` (SigLIP), HF ``gelu_pytorch_tanh``."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu, "gelu_tanh": tanh_gelu}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dtype_of(name: str) -> Dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {name!r}; expected float32, bfloat16 or float16")
    return jnp.dtype(name)


class Dense(nn.Module):
    """``nn.Dense`` / ``nn.DenseGeneral`` on :func:`umg_jax.ops.dense.dense`: the same params
    (float32 ``kernel [*in, *features]``, ``bias [*features]``), the same init (drawn on the
    flattened ``[prod(in), prod(features)]`` kernel, as ``nn.DenseGeneral`` does), and a
    backward that keeps bf16 on XLA:CPU's native path. ``n_in``: trailing input axes contracted
    (``nn.DenseGeneral(axis=(-2, -1))`` is ``n_in=2``)."""

    features: int | tuple[int, ...]
    n_in: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., *in]`` -> ``[..., *features]`` in ``dtype``."""
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        shape = tuple(x.shape[x.ndim - self.n_in:]) + feats

        def flat(init):
            return lambda key, s, dt: init(
                key, (math.prod(s[:self.n_in]), math.prod(s[self.n_in:])), dt).reshape(s)

        kernel = self.param("kernel", flat(self.kernel_init), shape, jnp.float32)
        bias = (self.param("bias", lambda key, s, dt: self.bias_init(key, (math.prod(s),), dt)
                           .reshape(s), feats, jnp.float32) if self.use_bias else None)
        return dense(x, kernel, bias, n_in=self.n_in, dtype=self.dtype)


def layer_norm(eps: float, name: str) -> nn.Module:
    """LayerNorm with params ``{scale, bias}``, computed in float32 whatever the activation dtype
    (PyTorch CLIP's fp16 LayerNorm trick); callers cast the output back."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class Attention(nn.Module):
    """Multi-head attention with per-head ``query/key/value`` kernels ``[D, H, Dh]`` and ``out``
    ``[H, Dh, D]`` (PyTorch ``in_proj_weight`` split into three, reshaped per head)."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32
    init_std: float | None = None
    out_std: float | None = None
    attention: str = "auto"  # "auto": ops.attention's choice for the compile target; or forced

    def setup(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        dh = self.width // self.heads
        std = self.init_std if self.init_std is not None else self.width ** -0.5
        ostd = self.out_std if self.out_std is not None else std
        kw = dict(dtype=self.dtype, kernel_init=nn.initializers.normal(std))
        self.query = Dense((self.heads, dh), **kw, name="query")
        self.key = Dense((self.heads, dh), **kw, name="key")
        self.value = Dense((self.heads, dh), **kw, name="value")
        self.out = Dense(self.width, n_in=2, dtype=self.dtype,
                         kernel_init=nn.initializers.normal(ostd), name="out")

    def __call__(self, xq: jax.Array, xkv: jax.Array, causal: bool = False,
                 key_bias: jax.Array | None = None) -> jax.Array:
        """``xq [B, Nq, D]``, ``xkv [B, Nk, D]``, ``causal``: static, query ``i`` attends keys
        ``0..i`` only; ``key_bias [B, Nk]`` float32 added to every query's logits (ToMe's log
        token size). Returns ``[B, Nq, D]``. Scores and softmax in float32."""
        o = attention(self.query(xq), self.key(xkv), self.value(xkv), causal=bool(causal),
                      key_bias=key_bias,
                      implementation=None if self.attention == "auto" else self.attention)
        return self.out(o)

    def value_path(self, x: jax.Array) -> jax.Array:
        """MaskCLIP's attention replacement for dense features: ``out(value(x))``, ``[B, N, D]``."""
        return self.out(self.value(x))


class MLP(nn.Module):
    """``c_fc`` -> activation -> ``c_proj`` (PyTorch CLIP's ``mlp``)."""

    width: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    fc_std: float | None = None
    proj_std: float | None = None
    hidden: int = 0  # explicit hidden width (SigLIP So400m: 4304); 0 = width * mlp_ratio

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.hidden or int(self.width * self.mlp_ratio)
        fc_std = self.fc_std if self.fc_std is not None else (2 * self.width) ** -0.5
        proj_std = self.proj_std if self.proj_std is not None else self.width ** -0.5
        x = Dense(hidden, dtype=self.dtype, kernel_init=nn.initializers.normal(fc_std),
                  name="c_fc")(x)
        # XLA:CPU: float32 maths on the bf16 tensor (its bf16 elementwise code is 2x slower on
        # the backward than converting around float32 code). TPU / GPU: in the compute dtype; a
        # float32 [B, N, 4D] hidden is the largest activation buffer of a ViT-L step under remat.
        act_dtype = jnp.float32 if target_platform() == "cpu" else self.dtype
        x = get_activation(self.act)(x.astype(act_dtype)).astype(self.dtype)
        return Dense(self.width, dtype=self.dtype, kernel_init=nn.initializers.normal(proj_std),
                     name="c_proj")(x)


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al., 2019): ``down`` -> GELU -> ``up``, added to the
    residual stream after the block. ``up`` starts at zero, so a fresh adapter is the identity
    and training starts exactly at the base model."""

    width: int
    bottleneck: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.bottleneck, dtype=self.dtype,
                  kernel_init=nn.initializers.normal(self.width ** -0.5), name="down")(x)
        return Dense(self.width, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                     name="up")(nn.gelu(h))


class ResidualBlock(nn.Module):
    """Pre-LN residual block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    ``causal``: text-tower causal mask. ``dense_value_path``: this is the last vision block in
    MaskCLIP mode: the class token (index 0) goes through the normal path (its query attends to all
    tokens, exactly as in the plain block), while patch tokens take the value path only, which keeps
    them spatially local. ``return_carry``: ``(x, None)`` output, for ``nn.scan``.
    """

    width: int
    heads: int
    layers: int  # depth of the tower, for the init scale of the residual projections
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    causal: bool = False
    dense_value_path: bool = False
    return_carry: bool = False
    adapter_dim: int = 0  # > 0: a bottleneck Adapter after the block (PEFT); 0 = plain CLIP
    mlp_dim: int = 0  # explicit MLP hidden width; 0 = width * mlp_ratio
    attention: str = "auto"  # attention implementation (see Attention)

    @nn.compact
    def __call__(self, x: jax.Array, _unused: Any = None, key_bias: jax.Array | None = None):
        """``x [B, N, D]`` -> ``[B, N, D]`` (or ``(x, None)`` when ``return_carry``);
        ``key_bias [B, N]``: see :meth:`Attention.__call__`."""
        x = constrain_batch(x)
        proj_std = (self.width ** -0.5) * ((2 * self.layers) ** -0.5)
        ln_1 = layer_norm(self.ln_eps, "ln_1")
        attn = Attention(self.width, self.heads, dtype=self.dtype, out_std=proj_std,
                         attention=self.attention, name="attn")
        ln_2 = layer_norm(self.ln_eps, "ln_2")
        mlp = MLP(self.width, self.mlp_ratio, self.act, dtype=self.dtype, proj_std=proj_std,
                  hidden=self.mlp_dim, name="mlp")
        h = ln_1(x).astype(self.dtype)
        if self.dense_value_path:
            cls = x[:, :1] + attn(h[:, :1], h, False, key_bias)
            patches = x[:, 1:] + attn.value_path(h[:, 1:])
            x = jnp.concatenate([cls, patches.astype(cls.dtype)], axis=1)
        else:
            x = x + attn(h, h, self.causal, key_bias)
        x = x + mlp(ln_2(x).astype(self.dtype))
        if self.adapter_dim:
            x = x + Adapter(self.width, self.adapter_dim, self.dtype, name="adapter")(x)
        return (x, None) if self.return_carry else x


class Transformer(nn.Module):
    """A stack of ``layers`` residual blocks, as a Python loop or an ``nn.scan``.

    Param layout: loop -> ``resblocks_{i}``; scan -> ``resblocks`` with a leading layer axis.
    ``last_separate``: the last block is always its own ``resblocks_{L-1}`` module (scan covers
    blocks ``0..L-2``); the vision tower needs this for its dense (MaskCLIP) last block.
    """

    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    causal: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False
    last_separate: bool = False
    last_dense_value_path: bool = False
    merge_after: int = -1  # token merging after this block (-1: off); see token_merge.py
    merge_r: int = 0  # tokens removed by the merge
    merge_proportional: bool = True  # ToMe proportional attention after the merge
    adapter_dim: int = 0  # bottleneck adapters in every block (0 = off)
    mlp_dim: int = 0  # explicit MLP hidden width; 0 = width * mlp_ratio
    attention: str = "auto"  # attention implementation (see Attention)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, N, D]`` -> ``[B, N, D]``."""
        from umg_jax.models import token_merge

        merging = self.merge_after >= 0 and self.merge_r > 0
        if merging and (self.scan or not self.last_separate
                        or self.merge_after >= self.layers - 1):
            raise ValueError("token merging needs scan=False, a separate last block, and "
                             f"merge_after < layers - 1 (got {self.merge_after})")
        kw = dict(width=self.width, heads=self.heads, layers=self.layers,
                  mlp_ratio=self.mlp_ratio, act=self.act, ln_eps=self.ln_eps, dtype=self.dtype,
                  causal=self.causal, adapter_dim=self.adapter_dim, mlp_dim=self.mlp_dim,
                  attention=self.attention)
        block_cls = ResidualBlock
        if self.remat:
            policy = getattr(jax.checkpoint_policies, self.remat_policy, None)
            if policy is None:
                raise ValueError(f"unknown remat_policy {self.remat_policy!r}")
            block_cls = nn.remat(ResidualBlock, policy=policy, prevent_cse=not self.scan)
        n_stack = self.layers - 1 if self.last_separate else self.layers
        assign = bias = None
        if self.scan and n_stack > 0:
            scanned = nn.scan(block_cls, variable_axes={"params": 0},
                              split_rngs={"params": True}, length=n_stack)
            x, _ = scanned(**kw, return_carry=True, name="resblocks")(x, None)
        else:
            for i in range(n_stack):
                x = block_cls(**kw, name=f"resblocks_{i}")(x, None, bias)
                if merging and i == self.merge_after:
                    x, assign, size = token_merge.bipartite_merge(x, self.merge_r)
                    bias = jnp.log(size) if self.merge_proportional else None
        if self.last_separate:
            x = block_cls(**kw, dense_value_path=self.last_dense_value_path,
                          name=f"resblocks_{self.layers - 1}")(x, None, bias)
        if assign is not None:
            # Restored after the last block: every position takes its merged token's output.
            # With proportional attention this equals running the last block on the restored
            # grid (a token of size s = s identical keys; the dense value path is per token),
            # one full-grid block cheaper.
            x = token_merge.unmerge(x, assign)
        return x


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision ``MAPHead``, SigLIP): a learned ``probe`` query
    attends to all tokens, then ``x + mlp(ln(x))``. Params ``probe [1, 1, D]``, ``attn``,
    ``ln``, ``mlp`` map one-to-one onto big_vision's ``MAPHead_0`` scope."""

    width: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    mlp_dim: int = 0
    attention: str = "auto"  # attention implementation (see Attention)

    def setup(self):
        self.probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, self.width),
                                jnp.float32)
        self.attn = Attention(self.width, self.heads, dtype=self.dtype, attention=self.attention)
        self.ln = layer_norm(self.ln_eps, "ln")
        self.mlp = MLP(self.width, self.mlp_ratio, self.act, dtype=self.dtype,
                       hidden=self.mlp_dim)

    def _finish(self, x: jax.Array) -> jax.Array:
        return x + self.mlp(self.ln(x).astype(self.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, N, D]`` -> pooled ``[B, D]``."""
        q = jnp.broadcast_to(self.probe.astype(self.dtype), (x.shape[0], 1, self.width))
        return self._finish(self.attn(q, x))[:, 0]

    def per_token(self, x: jax.Array) -> jax.Array:
        """The head applied to every token on its own, ``[B, N, D]`` -> ``[B, N, D]``: attention
        over a single key is its value path, so this is MaskCLIP's dense construction with the
        MAP attention as the pooling attention (SigLIP has no class token to take it from)."""
        return self._finish(self.attn.value_path(x))
