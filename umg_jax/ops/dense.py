"""The maths of every dense layer in the towers, ``y = x @ W + b``, with a hand-written backward
for XLA:CPU.

Why a custom VJP (measured in ``benchmarks/train_step.py``):

- XLA:CPU runs a bf16 dot on its native path (about 2x the float32 rate on AVX512-BF16 cores)
  only when the dot accumulates in float32 (``preferred_element_type=float32``) and its left
  operand is not transposed. A plain Flax ``dtype=bfloat16`` layer meets neither condition. Its
  forward dot returns bf16 and is compiled as ``convert -> f32 dot``. Autodiff's weight gradient
  ``x^T g`` contracts the left operand's leading axis. Both dots then run at the float32 rate with
  the conversions on top, so "bf16" training was slower than float32. Here all three dots use the
  native layouts, and ``x^T`` is materialised behind an ``optimization_barrier``, because XLA
  would otherwise fold the transpose back into a layout change.
- The bias gradient ``sum_M g`` is a dot with a row of ones. Autodiff's ``reduce_sum`` becomes,
  in the whole train step, XLA:CPU's tree ``reduce-window``. That walks the ``[M, N]`` gradient
  column by column and took 15-18 ms per ViT-B MLP layer, against about 0.3 ms for the same sum
  on its own.

The kernel and bias stay float32 and are cast inside. So the weight and bias gradients are
accumulated and returned in float32, whereas PyTorch autocast rounds them to bf16. On other
backends :func:`dense` is the same maths in plain ``jnp``, left to XLA's autodiff.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from umg_jax.ops.platform import target_platform

_BF16, _F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


def copy_swap(x: jax.Array, a: int, b: int) -> jax.Array:
    """``x`` with axes ``a`` and ``b`` swapped, as a real row-major copy. The size-1 axis and the
    barrier keep XLA from folding the transpose into the layout of the next dot's operand, which
    would send that dot to XLA:CPU's slow (upcast) path. The other axes keep their order, so a
    batch-sharded axis partitions without a gather. Also used by ``ops/attention.py``."""
    y = jnp.swapaxes(x, a, b)
    return lax.optimization_barrier(jnp.expand_dims(y, a)).reshape(y.shape)


def _cpu_dense_fwd(x, w, b):
    wc = w.astype(x.dtype)  # cast once; the backward reuses it (weights are read from DRAM)
    y = jnp.dot(x, wc, preferred_element_type=_F32) + b.astype(_F32)
    return y.astype(x.dtype), (x, wc, w, b)  # w, b: only their dtypes (params, alive anyway)


@jax.custom_vjp
def _cpu_dense(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``x [M, K]`` (compute dtype), ``w [K, N]``, ``b [N]`` -> ``[M, N]`` in ``x``'s dtype."""
    return _cpu_dense_fwd(x, w, b)[0]


def _cpu_dense_bwd(res, g):
    x, wc, w, b = res
    g = g.astype(x.dtype)
    dx = lax.dot_general(g, wc, (((1,), (1,)), ((), ())),
                         preferred_element_type=_F32).astype(x.dtype)
    xt = copy_swap(x, 0, 1) if x.dtype == _BF16 else x.T  # f32 needs no copy
    dw = jnp.dot(xt, g, preferred_element_type=_F32).astype(w.dtype)
    db = jnp.dot(jnp.ones((g.shape[0],), g.dtype), g, preferred_element_type=_F32)
    return dx, dw, db.astype(b.dtype)


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, n_in: int = 1,
          dtype=jnp.float32, backend: str | None = None) -> jax.Array:
    """``x @ kernel + bias`` over the last ``n_in`` axes of ``x``, computed in ``dtype`` with
    float32 accumulation.

    Args:
      x: ``[..., K_1..K_n]`` any float dtype (cast to ``dtype``).
      kernel: ``[K_1..K_n, F_1..F_m]``, float32 (cast to ``dtype`` inside; gradient in float32).
      bias: ``[F_1..F_m]`` float32, or None.
      n_in: how many trailing axes of ``x`` are contracted.
      dtype: compute and output dtype (float32, bfloat16 or float16).
      backend: ``"cpu"`` takes the custom VJP; default: the platform the trace is compiled for
        (:func:`umg_jax.ops.platform.target_platform`).

    Returns:
      ``[..., F_1..F_m]`` in ``dtype``.
    """
    in_shape, feats = kernel.shape[:n_in], kernel.shape[n_in:]
    if x.shape[x.ndim - n_in:] != in_shape:
        raise ValueError(f"dense: input {x.shape} does not end in the kernel's input axes "
                         f"{in_shape} (kernel {kernel.shape}, n_in={n_in})")
    k, n = math.prod(in_shape), math.prod(feats)
    lead = x.shape[:x.ndim - n_in]
    x2 = x.astype(dtype).reshape(-1, k)
    w2 = kernel.reshape(k, n)
    b = jnp.zeros((n,), _F32) if bias is None else bias.reshape(n)
    if (backend or target_platform()) == "cpu":
        y = _cpu_dense(x2, w2, b)
    else:
        y = (jnp.dot(x2, w2.astype(dtype), preferred_element_type=_F32) + b).astype(dtype)
    return y.reshape(*lead, *feats)
