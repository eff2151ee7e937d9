"""ops.dense (custom-VJP dense maths) and models.layers.Dense against plain autodiff and Flax."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umg_jax.models.layers import Dense
from umg_jax.ops.dense import dense


def _case(key, lead=(2, 5), k_shape=(6,), feats=(4, 3)):
    kx, kw, kb, kg = jax.random.split(key, 4)
    x = jax.random.normal(kx, lead + k_shape, jnp.float32)
    w = jax.random.normal(kw, k_shape + feats, jnp.float32) * 0.3
    b = jax.random.normal(kb, feats, jnp.float32)
    g = jax.random.normal(kg, lead + feats, jnp.float32)
    return x, w, b, g


def _value_and_grads(backend, dtype, x, w, b, g, n_in, use_bias=True):
    def f(x, w, b):
        y = dense(x, w, b if use_bias else None, n_in=n_in, dtype=dtype, backend=backend)
        return jnp.sum(y.astype(jnp.float32) * g)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, w, b)


@pytest.mark.parametrize("n_in,k_shape", [(1, (6,)), (2, (3, 4))])
@pytest.mark.parametrize("use_bias", [True, False])
def test_float32_matches_plain_autodiff(n_in, k_shape, use_bias):
    x, w, b, g = _case(jax.random.key(0), k_shape=k_shape)
    ours = _value_and_grads("cpu", jnp.float32, x, w, b, g, n_in, use_bias)
    plain = _value_and_grads("tpu", jnp.float32, x, w, b, g, n_in, use_bias)
    for a, r in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5)
    # hand-computed: the bias gradient is the cotangent summed over the leading axes
    if use_bias:
        np.testing.assert_allclose(np.asarray(ours[1][2]), np.asarray(g).sum((0, 1)), rtol=1e-5)
    else:
        np.testing.assert_array_equal(np.asarray(ours[1][2]), 0.0)


def test_bfloat16_close_to_float32_and_gradients_stay_float32():
    x, w, b, g = _case(jax.random.key(1), lead=(4, 16), k_shape=(64,), feats=(32,))
    (v16, g16) = _value_and_grads("cpu", jnp.bfloat16, x, w, b, g, 1)
    (v32, g32) = _value_and_grads("tpu", jnp.float32, x, w, b, g, 1)
    assert g16[1].dtype == jnp.float32 and g16[2].dtype == jnp.float32  # param grads in f32
    assert g16[0].dtype == jnp.float32  # the input's own dtype (cast happens inside)
    np.testing.assert_allclose(float(v16), float(v32), rtol=2e-2)
    for a, r in zip(g16, g32, strict=True):
        a, r = np.asarray(a, np.float32), np.asarray(r)
        assert np.abs(a - r).max() <= 2e-2 * np.abs(r).max()


def _dot_operand_types(hlo: str) -> list[tuple[str, str, str]]:
    """``(output dims, lhs type, rhs type)`` of every dot in a compiled HLO module."""
    types = {}
    for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo):
        types.setdefault(m.group(1), m.group(2))
    for m in re.finditer(r"\b(\w+)\[[\d,]*\](?:\{[\d,]*\})? %([\w.\-]+)", hlo):
        types.setdefault(m.group(2), m.group(1))  # fused-computation parameters
    return [(dims, types.get(a, "?"), types.get(b, "?")) for dims, a, b in re.findall(
        r"\[([\d,]*)\](?:\{[\d,]*\})? dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


def test_bfloat16_backward_keeps_every_dot_in_bfloat16():
    """The point of the custom VJP: XLA:CPU upcasts a bf16 dot to f32 unless it accumulates in
    f32 with an untransposed left operand; autodiff's weight gradient breaks that."""
    if jax.default_backend() != "cpu":
        pytest.skip("the custom path is CPU-only")
    x, w, b, g = _case(jax.random.key(2), lead=(8, 32), k_shape=(64,), feats=(128,))
    xb = x.astype(jnp.bfloat16)

    def grads(backend):
        def f(x, w, b, g):
            y = dense(x, w, b, dtype=jnp.bfloat16, backend=backend).astype(jnp.float32)
            return jnp.sum(y * g)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(xb, w, b, g).compile().as_text()

    # dx [256, 64] and dw [64, 128]; the forward dot is dead code for a linear loss, and the
    # bias gradient is a [1, 128] ones-row product (a memory-bound GEMV; f32 is fine there)
    ours = {d: t for d, *t in _dot_operand_types(grads("cpu"))}
    assert ours.pop("256,64") == ["bf16", "bf16"] and ours.pop("64,128") == ["bf16", "bf16"]
    assert list(ours) == ["1,128"], ours
    plain = {d: t for d, *t in _dot_operand_types(grads("tpu"))}  # plain autodiff: upcast
    assert "f32" in plain["64,128"], plain


@pytest.mark.parametrize("features,n_in,flax_mod", [
    (7, 1, lambda: nn.Dense(7)),
    ((2, 3), 1, lambda: nn.DenseGeneral((2, 3))),
    (5, 2, lambda: nn.DenseGeneral(5, axis=(-2, -1))),
])
def test_dense_module_equals_flax(features, n_in, flax_mod):
    """Same param names, shapes and init draws as flax's Dense / DenseGeneral (so checkpoints and
    the PyTorch weight mapping are unchanged), and the same outputs."""
    x = jax.random.normal(jax.random.key(3), (2, 4, 6) if n_in == 1 else (2, 4, 2, 3))
    ours = Dense(features, n_in=n_in, kernel_init=nn.initializers.normal(0.5),
                 bias_init=nn.initializers.normal(0.1))
    ref = flax_mod().copy(kernel_init=nn.initializers.normal(0.5),
                          bias_init=nn.initializers.normal(0.1))
    p_ours = ours.init(jax.random.key(4), x)
    p_ref = ref.init(jax.random.key(4), x)
    assert jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_ref)
    for a, r in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
    np.testing.assert_allclose(np.asarray(ours.apply(p_ours, x)),
                               np.asarray(ref.apply(p_ref, x)), rtol=1e-5, atol=1e-5)


def test_shape_error():
    with pytest.raises(ValueError, match="does not end in the kernel's input axes"):
        dense(jnp.ones((2, 5)), jnp.ones((4, 3)))
