"""ops.attention (custom-VJP attention core) against numpy and plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umg_jax.ops.attention import attention


def _inputs(key, b=2, nq=5, nk=7, h=3, d=4):
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (b, nq, h, d))
    k = jax.random.normal(ks[1], (b, nk, h, d))
    v = jax.random.normal(ks[2], (b, nk, h, d))
    bias = jax.random.normal(ks[3], (b, nk))
    g = jax.random.normal(ks[4], (b, nq, h, d))
    return q, k, v, bias, g


def test_forward_matches_numpy():
    q, k, v, bias, _ = _inputs(jax.random.key(0), nq=7)
    mask = np.tril(np.ones((7, 7), bool))
    got = np.asarray(attention(q, k, v, jnp.asarray(mask), bias, backend="cpu"))
    qn, kn, vn, bn = (np.asarray(a, np.float64) for a in (q, k, v, bias))
    s = np.einsum("bqhd,bkhd->bhqk", qn, kn) / 2.0 + bn[:, None, None, :]  # Dh = 4
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhqk,bkhd->bqhd", p, vn), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_mask,with_bias", [(False, False), (True, True)])
def test_gradients_match_plain_autodiff(with_mask, with_bias):
    q, k, v, bias, g = _inputs(jax.random.key(1), nq=7)
    mask = jnp.tril(jnp.ones((7, 7), bool)) if with_mask else None

    def grads(backend):
        def f(q, k, v, bias):
            o = attention(q, k, v, mask, bias if with_bias else None, backend=backend)
            return jnp.sum(o * g)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    ours, plain = grads("cpu"), grads("tpu")
    for a, r in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)
    if not with_bias:
        np.testing.assert_array_equal(np.asarray(ours[1][3]), 0.0)


def test_single_query_and_bfloat16():
    """One query row (the MaskCLIP class token / MAP probe), bf16 close to the f32 result."""
    q, k, v, _, g = _inputs(jax.random.key(2), nq=1)

    def f(q, k, v):
        return jnp.sum(attention(q, k, v, backend="cpu").astype(jnp.float32) * g)

    v32, g32 = jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    v16, g16 = jax.value_and_grad(f, argnums=(0, 1, 2))(*bf)
    assert all(x.dtype == jnp.bfloat16 for x in g16)
    np.testing.assert_allclose(float(v16), float(v32), rtol=3e-2, atol=3e-2)
    for a, r in zip(g16, g32, strict=True):
        a, r = np.asarray(a, np.float32), np.asarray(r)
        assert np.abs(a - r).max() <= 3e-2 * np.abs(r).max() + 1e-3
