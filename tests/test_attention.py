"""ops.attention: the CPU custom VJP, the TPU Pallas flash path (interpret mode), the GPU
``dot_product_attention`` path (its XLA implementation), the implementation rules, and what a
deviceless TPU compile makes of them, against a float64 numpy reference and plain autodiff."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from umg_jax.ops.attention import (
    attention,
    attention_implementation,
    cudnn_lengths,
    gpu_attention,
)


def _inputs(key, b=2, nq=5, nk=7, h=3, d=4):
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (b, nq, h, d))
    k = jax.random.normal(ks[1], (b, nk, h, d))
    v = jax.random.normal(ks[2], (b, nk, h, d))
    bias = jax.random.normal(ks[3], (b, nk))
    g = jax.random.normal(ks[4], (b, nq, h, d))
    return q, k, v, bias, g


def _np_attention(q, k, v, causal=False, bias=None):
    """float64 numpy reference; ``[B, N, H, Dh]`` layout, causal = ``tril([Nq, Nk])``."""
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", qn, kn) * qn.shape[-1] ** -0.5
    if bias is not None:
        s = s + np.asarray(bias, np.float64)[:, None, None, :]
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, vn)


def _value_and_grads(fn, q, k, v, bias, g, causal, with_bias):
    """``sum(attention * g)`` and its gradients w.r.t. q, k, v, key_bias (float32 out)."""
    def f(q, k, v, bias):
        o = fn(q, k, v, causal=causal, key_bias=bias if with_bias else None)
        return jnp.sum(o.astype(jnp.float32) * g), o

    (val, o), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, bias)
    return [np.asarray(x, np.float32) for x in (val, o, *grads)]


def _close(got, ref, tol):
    """Max abs error within ``tol`` of the reference's scale."""
    err = np.abs(got - ref).max()
    assert err <= tol * max(np.abs(ref).max(), 1.0), (err, np.abs(ref).max())
    return err


def test_forward_matches_numpy():
    q, k, v, bias, _ = _inputs(jax.random.key(0), nq=7)
    got = np.asarray(attention(q, k, v, causal=True, key_bias=bias, backend="cpu"))
    np.testing.assert_allclose(got, _np_attention(q, k, v, True, bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal,with_bias", [(False, False), (True, True)])
def test_gradients_match_plain_autodiff(causal, with_bias):
    q, k, v, bias, g = _inputs(jax.random.key(1), nq=7)

    def grads(**kw):
        return _value_and_grads(lambda *a, **k: attention(*a, **k, **kw), q, k, v, bias, g,
                                causal, with_bias)

    ours, plain = grads(backend="cpu"), grads(implementation="xla")
    for a, r in zip(ours, plain, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
    if not with_bias:
        np.testing.assert_array_equal(ours[-1], 0.0)


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


@pytest.mark.parametrize("nq,nk,causal,with_bias,dtype", [
    (130, 130, True, False, jnp.float32),  # padded 130 -> 256; the causal mask hides the padding
    (130, 200, False, True, jnp.float32),  # Nq != Nk, padded keys masked by segment ids, ab
    (200, 200, True, True, jnp.bfloat16),  # everything at once, in bf16
])
def test_tpu_flash_path_matches_reference_in_interpret_mode(nq, nk, causal, with_bias, dtype):
    q, k, v, bias, g = _inputs(jax.random.key(3), b=1, nq=nq, nk=nk, h=2, d=32)
    with pltpu.force_tpu_interpret_mode():
        got = _value_and_grads(lambda *a, **k: attention(*a, **k, implementation="pallas_flash"),
                               *(x.astype(dtype) for x in (q, k, v)), bias, g, causal, with_bias)
    # gradients: plain autodiff of the XLA path in float32 (the forward is also checked there)
    ref = _value_and_grads(lambda *a, **k: attention(*a, **k, implementation="xla"),
                           q, k, v, bias, g, causal, with_bias)
    np.testing.assert_allclose(ref[1], _np_attention(q, k, v, causal, bias if with_bias else None),
                               rtol=1e-5, atol=1e-5)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    for a, r in zip(got, ref, strict=True):
        _close(a, r, tol)
    if not with_bias:
        np.testing.assert_array_equal(got[-1], 0.0)


@pytest.mark.parametrize("nq,nk,causal,with_bias,pad", [
    (9, 9, False, True, False),  # the wrapper as it is
    (9, 9, True, True, False),
    (9, 9, False, False, True),  # both odd, padded: keys masked by key_value_seq_lengths
    (9, 9, True, False, True),  # causal: the padded key comes after every real query, no mask
    (9, 9, False, True, True),
    (1, 7, False, False, True),  # single query (MaskCLIP class token)
    (8, 7, False, False, True),  # only the keys padded
])
def test_gpu_path_with_xla_implementation_matches_reference(nq, nk, causal, with_bias, pad):
    """The ``dot_product_attention`` wrapper (layout, scale, causal, key bias broadcast, and
    with ``pad``: what the cuDNN path does to odd lengths, one padded token masked or hidden by
    the causal mask, padded query rows sliced off), run on its XLA implementation (no GPU here):
    forward vs numpy, value and gradients (incl. the key bias's) vs the CPU custom VJP."""
    q, k, v, bias, g = _inputs(jax.random.key(4), nq=nq, nk=nk, d=8)

    def wrapped(*a, **kw):
        return gpu_attention(*a, **kw, implementation="xla", pad_to_even=pad)

    got = _value_and_grads(wrapped, q, k, v, bias, g, causal, with_bias)
    ref = _value_and_grads(lambda *a, **kw: attention(*a, **kw, backend="cpu"),
                           q, k, v, bias, g, causal, with_bias)
    want = _np_attention(q, k, v, causal, bias if with_bias else None)
    np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-5)
    for a, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_cudnn_lengths():
    assert cudnn_lengths(257, 257) == (258, 258)  # ViT-L/14 at 224 px
    assert cudnn_lengths(77, 77) == (78, 78)  # CLIP text
    assert cudnn_lengths(1, 197) == (2, 198)
    assert cudnn_lengths(256, 64) == (256, 64)


BF16, F32, F16 = jnp.bfloat16, jnp.float32, jnp.float16


@pytest.mark.parametrize("platform,nq,nk,dh,dtype,causal,key_bias,want", [
    ("cpu", 197, 197, 64, BF16, False, False, "cpu_vjp"),
    ("cpu", 77, 77, 64, F32, True, True, "cpu_vjp"),
    # TPU: lengths >= 128 padded to a multiple of 128 by at most 1.5x
    ("tpu", 197, 197, 64, BF16, False, False, "pallas_flash"),  # ViT-B/16
    ("tpu", 257, 257, 64, BF16, False, False, "pallas_flash"),  # ViT-L/14 224 px (-> 384)
    ("tpu", 577, 577, 64, F32, False, False, "pallas_flash"),  # ViT-L/14 336 px
    ("tpu", 128, 128, 32, BF16, True, False, "pallas_flash"),
    ("tpu", 171, 171, 64, BF16, False, False, "pallas_flash"),  # 256 <= 1.5 * 171
    ("tpu", 170, 170, 64, BF16, False, False, "xla"),  # 256 > 1.5 * 170
    ("tpu", 130, 130, 64, BF16, False, False, "xla"),  # token-merged: 2x padding
    ("tpu", 127, 127, 64, BF16, False, False, "xla"),
    ("tpu", 77, 77, 64, BF16, True, False, "xla"),  # text tower
    ("tpu", 1, 197, 64, BF16, False, False, "xla"),  # MaskCLIP class token / MAP probe
    ("tpu", 197, 197, 64, BF16, False, True, "xla"),  # key bias
    ("tpu", 197, 197, 64, F16, False, False, "xla"),
    ("tpu", 197, 197, 192, BF16, False, False, "xla"),  # > 128, not a multiple of 128
    ("tpu", 197, 197, 256, BF16, False, False, "pallas_flash"),
    # GPU: cuDNN for fp16 / bf16, Dh % 8 == 0 and <= 128, square if causal, no key bias, any
    # length (odd ones padded to even)
    ("gpu", 197, 197, 64, BF16, False, False, "cudnn"),
    ("gpu", 257, 257, 64, BF16, False, False, "cudnn"),  # ViT-L/14: 257 -> 258
    ("cuda", 77, 77, 64, F16, True, False, "cudnn"),
    ("gpu", 1, 197, 32, BF16, False, False, "cudnn"),
    ("gpu", 197, 197, 64, F32, False, False, "xla"),
    ("gpu", 197, 197, 36, BF16, False, False, "xla"),
    ("gpu", 197, 197, 256, BF16, False, False, "xla"),
    ("gpu", 8, 16, 64, BF16, True, False, "xla"),
    ("gpu", 197, 197, 64, BF16, False, True, "xla"),
])
def test_attention_implementation_rules(platform, nq, nk, dh, dtype, causal, key_bias, want):
    assert attention_implementation(nq, nk, dh, dtype, platform=platform, causal=causal,
                                    key_bias=key_bias) == want


@pytest.mark.parametrize("cc,want", [((9, 0), "cudnn"), ((8, 0), "cudnn"), ((10, 0), "cudnn"),
                                     ((7, 5), "xla"), ((7, 0), "xla"), (None, "cudnn")])
def test_cudnn_needs_ampere_or_later(cc, want):
    """cuDNN's flash kernels are Ampere (8.0) and later: a T4 (7.5) or V100 (7.0) takes XLA;
    an unknown capability is taken as able."""
    assert attention_implementation(257, 257, 64, BF16, platform="gpu",
                                    compute_capability=cc) == want


@pytest.fixture(scope="module")
def tpu_mesh():
    """A ``(data 2, fsdp 1, tensor 2)`` mesh of abstract v5e devices (deviceless compile)."""
    from umg_jax import accelerators

    if not accelerators.tpu_compiler_available():
        pytest.skip("libtpu not installed")
    try:
        devs = accelerators.topology_devices("v5e:2x2")
    except accelerators.CompilerUnavailable as e:
        pytest.skip(str(e))
    return Mesh(np.array(devs).reshape(2, 1, 2), ("data", "fsdp", "tensor"))


def _lower(mesh, fn, *shapes):
    """``fn`` jitted and lowered for ``shapes`` ((shape, dtype) pairs, batch-sharded over
    data x fsdp when ``mesh`` is given), traced under the mesh's abstract mesh as the train
    step is."""
    def struct(shape, dtype):
        if mesh is None:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=NamedSharding(mesh, P(("data", "fsdp"))))

    args = [struct(*s) for s in shapes]
    if mesh is None:
        return jax.jit(fn).lower(*args)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.jit(fn).lower(*args)


def _attention_step(causal):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, causal=causal).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def test_tpu_mesh_compiles_the_flash_kernel_per_device(tpu_mesh):
    qkv = [((4, 200, 4, 64), jnp.bfloat16)] * 3
    hlo = _lower(tpu_mesh, _attention_step(True), *qkv).compile().as_text()
    calls = [ln for ln in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in ln]
    assert len(calls) == 3, len(calls)  # forward, dk/dv and dq kernels
    # in the shard_map: batch 4 / data 2, heads 4 / tensor 2, 200 tokens padded to 256
    assert all(re.search(r"bf16\[2,2,256,64\]", ln) for ln in calls)
    short = [((4, 64, 4, 64), jnp.bfloat16)] * 3  # below the threshold: XLA
    assert "tpu_custom_call" not in _lower(tpu_mesh, _attention_step(False),
                                           *short).compile().as_text()


def test_flash_without_a_mesh_on_several_devices_takes_xla(tpu_mesh):
    """A plain ``jax.jit`` over several TPU devices, no mesh in context (e.g. evaluating sharded
    params): a Pallas call there fails to compile ("cannot be automatically partitioned"), so
    the automatic choice falls back to XLA; forced, the kernel is refused."""
    sh = NamedSharding(tpu_mesh, P(("data", "fsdp")))
    qkv = [jax.ShapeDtypeStruct((4, 256, 4, 64), jnp.bfloat16, sharding=sh)] * 3

    def step(**kw):
        return jax.jit(lambda q, k, v: attention(q, k, v, backend="tpu", **kw)).lower(*qkv)

    assert "tpu_custom_call" not in step().compile().as_text()
    with pytest.raises(Exception, match="automatically partitioned"):
        step(implementation="pallas_flash").compile()


def test_cpu_custom_vjps_follow_the_compile_target_not_the_host(tpu_mesh):
    """``dense`` / ``attention`` lowered for TPU devices on this CPU host take no CPU custom VJP
    (its ``optimization_barrier``); lowered for the CPU, they do."""
    from umg_jax.ops.dense import dense

    def dense_step(x, w):
        return jax.grad(lambda x, w: jnp.sum(dense(x, w, dtype=jnp.bfloat16)
                                             .astype(jnp.float32)), argnums=(0, 1))(x, w)

    xw = [((8, 16), jnp.bfloat16), ((16, 32), jnp.float32)]
    qkv = [((4, 64, 4, 16), jnp.bfloat16)] * 3
    for fn, shapes in ((dense_step, xw), (_attention_step(False), qkv)):
        assert "optimization_barrier" in _lower(None, fn, *shapes).as_text()
        assert "optimization_barrier" not in _lower(tpu_mesh, fn, *shapes).as_text()


# ------------------------------------------------------------------ the real XLA:GPU compiler ---


@pytest.fixture(scope="module")
def gpu_mesh():
    """A data-parallel mesh of 8 abstract H100s (deviceless XLA:GPU compile, no GPU here)."""
    from umg_jax import accelerators

    if not accelerators.gpu_compiler_available():
        pytest.skip("the CUDA plugin (requirements-gpu.txt) is not installed")
    devs = accelerators.topology_devices("h100:1x1x8")
    return Mesh(np.array(devs).reshape(8, 1, 1), ("data", "fsdp", "tensor"))


def _gpu_hlo(mesh, fn, *shapes) -> str:
    from umg_jax import accelerators

    return _lower(mesh, fn, *shapes).compile(
        compiler_options=accelerators.compile_options(list(mesh.devices.flat))).as_text()


@pytest.mark.parametrize("n,causal", [(257, False), (77, True), (64, False)])
def test_cudnn_training_compiles_at_any_length_for_an_h100_node(gpu_mesh, n, causal):
    """JAX's cuDNN training rule refuses odd lengths (ViT-L/14's 257 tokens, CLIP's 77-token
    captions) with a NotImplementedError at trace time; padded to even they compile to cuDNN's
    fused forward and backward kernels, at the padded length."""
    from umg_jax.ops.platform import target_compute_capability

    with jax.sharding.use_abstract_mesh(gpu_mesh.abstract_mesh):
        assert target_compute_capability() == (9, 0)  # from the chip table, by device kind
    hlo = _gpu_hlo(gpu_mesh, _attention_step(causal), *[((8, n, 4, 64), jnp.bfloat16)] * 3)
    fwd = [ln for ln in hlo.splitlines() if 'custom_call_target="__cudnn$fmhaSoftmax"' in ln]
    assert fwd and "__cudnn$fmhaSoftmaxBackward" in hlo
    pad = n + n % 2
    assert all(re.search(rf"bf16\[1,4,{pad},64\]", ln) for ln in fwd), fwd[0][:300]


def test_model_attention_knob_forces_xla(gpu_mesh):
    """``model.attention="xla"`` (layers.Attention(attention="xla")) keeps cuDNN out of a GPU
    compile; ``"auto"`` takes it."""
    from umg_jax.models.layers import Attention

    def step(attention):
        layer = Attention(64, 2, dtype=jnp.bfloat16, attention=attention)
        x0 = jnp.zeros((1, 9, 64), jnp.bfloat16)
        params = layer.init(jax.random.key(0), x0, x0)

        def loss(x):
            return jnp.sum(layer.apply(params, x, x).astype(jnp.float32))
        return jax.grad(loss)

    x = [((8, 9, 64), jnp.bfloat16)]
    assert "__cudnn$fmha" in _gpu_hlo(gpu_mesh, step("auto"), *x)
    assert "__cudnn$fmha" not in _gpu_hlo(gpu_mesh, step("xla"), *x)
