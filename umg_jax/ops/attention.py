"""Scaled dot-product attention, ``softmax(q k^T * scale + bias) v``, with a hand-written
backward for XLA:CPU.

Autodiff's backward of the two attention einsums was the slowest part of a ViT-B/16 bf16 train
step per FLOP: about 49 ms of a 55 ms forward + backward per layer at batch 8. The batched dots
received operands whose head transpose XLA had folded into a layout. XLA:CPU then upcast them to
float32, and the ``p^T do`` and ``ds^T q`` dots contracted their left operand's leading axis.

Here the heads are laid out ``[B, H, N, Dh]`` as real copies, behind an
``optimization_barrier``; the transposed operands of the backward dots are materialised the
same way; and every dot accumulates in float32. That takes 35.6 ms per layer in bf16, against
55 ms before (``benchmarks/train_step.py`` has the whole-step numbers). Scores, softmax and the
softmax gradient stay in float32; the probabilities are kept for the backward in the compute
dtype, as autodiff kept them. On other backends :func:`attention` is the same maths in plain
``jnp``, differentiated by XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from umg_jax.ops.dense import copy_swap

_F32 = jnp.float32


def _bdot(a: jax.Array, b: jax.Array, ca: int, cb: int) -> jax.Array:
    """Batched over the leading ``[B, H]`` axes, contracting ``a``'s axis ``ca`` with ``b``'s
    axis ``cb``; float32 out."""
    return lax.dot_general(a, b, (((ca,), (cb,)), ((0, 1), (0, 1))), preferred_element_type=_F32)


def _probs(s, mask, key_bias):
    """Scaled float32 scores ``[B, H, Nq, Nk]`` -> probabilities (key bias, mask, softmax)."""
    if key_bias is not None:
        s = s + key_bias[:, None, None, :]
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(_F32).min)
    return jax.nn.softmax(s, axis=-1)


def _cpu_forward(q, k, v, mask, key_bias, scale: float):
    qh, kh, vh = (copy_swap(x, 1, 2) for x in (q, k, v))
    p = _probs(_bdot(qh, kh, 3, 3) * scale, mask, key_bias).astype(q.dtype)
    o = _bdot(p, vh, 3, 2).astype(q.dtype)  # [B, H, Nq, Dh]
    return jnp.swapaxes(o, 1, 2), (qh, kh, vh, p, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _cpu_attention(q, k, v, mask, key_bias, scale: float):
    return _cpu_forward(q, k, v, mask, key_bias, scale)[0]


def _cpu_fwd(q, k, v, mask, key_bias, scale):
    o, res = _cpu_forward(q, k, v, mask, key_bias, scale)
    return o, (*res, mask, key_bias)


def _cpu_bwd(scale, res, g):
    qh, kh, vh, p, o, mask, key_bias = res
    dt = qh.dtype
    do = copy_swap(g.astype(dt), 1, 2)  # [B, H, Nq, Dh]
    dp = _bdot(do, vh, 3, 3)  # [B, H, Nq, Nk]
    dv = _bdot(copy_swap(p, 2, 3), do, 3, 2)  # [B, H, Nk, Dh]
    # softmax backward; rowsum(p * dp) = rowsum(do * o), the cheaper [.., Dh] form
    delta = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1, keepdims=True)
    ds = p.astype(_F32) * (dp - delta)
    dsc = (ds * scale).astype(dt)
    dq = _bdot(dsc, kh, 3, 2)
    dk = _bdot(copy_swap(dsc, 2, 3), qh, 3, 2)
    grads = tuple(jnp.swapaxes(x, 1, 2).astype(dt) for x in (dq, dk, dv))
    dbias = None if key_bias is None else ds.sum(axis=(1, 2)).astype(key_bias.dtype)
    dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    return (*grads, dmask, dbias)


_cpu_attention.defvjp(_cpu_fwd, _cpu_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              key_bias: jax.Array | None = None, backend: str | None = None) -> jax.Array:
    """Multi-head attention core.

    Args:
      q: ``[B, Nq, H, Dh]`` in the compute dtype.
      k, v: ``[B, Nk, H, Dh]``, same dtype.
      mask: ``[Nq, Nk]`` bool, True = attend; or None.
      key_bias: ``[B, Nk]`` float32 added to every query's logits (ToMe's log token size).
      backend: ``"cpu"`` takes the custom VJP; default ``jax.default_backend()``.

    Returns:
      ``[B, Nq, H, Dh]`` in ``q``'s dtype. Scores and softmax are computed in float32, scaled by
      ``Dh ** -0.5``.
    """
    scale = q.shape[-1] ** -0.5
    if (backend or jax.default_backend()) == "cpu":
        return _cpu_attention(q, k, v, mask, key_bias, scale)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_F32) * scale
    p = _probs(s, mask, key_bias).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=_F32).astype(q.dtype)
