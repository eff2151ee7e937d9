"""Scaled dot-product attention, ``softmax(q k^T * scale + key_bias) v`` (optionally causal), on
the fastest implementation the target platform offers for the shape.

:func:`attention_implementation` picks one of four, from static shapes and the platform the step
is *compiled for* (:func:`umg_jax.ops.platform.target_platform`; a ``--topology v5e:16x16``
dry run compiles TPU code in a process whose default backend is the CPU):

``"cpu_vjp"`` (XLA:CPU)
  A hand-written backward. Autodiff's backward of the two attention einsums was the slowest part
  of a ViT-B/16 bf16 train step per FLOP: about 49 ms of a 55 ms forward + backward per layer at
  batch 8. The batched dots received operands whose head transpose XLA had folded into a layout.
  XLA:CPU then upcast them to float32, and the ``p^T do`` and ``ds^T q`` dots contracted their
  left operand's leading axis. Here the heads are laid out ``[B, H, N, Dh]`` as real copies,
  behind an ``optimization_barrier``; the transposed operands of the backward dots are
  materialised the same way; and every dot accumulates in float32. That takes 35.6 ms per layer
  in bf16, against 55 ms before (``benchmarks/train_step.py`` has the whole-step numbers). The
  probabilities are kept for the backward in the compute dtype, as autodiff kept them.
``"pallas_flash"`` (TPU)
  JAX's Pallas flash-attention kernel (``jax.experimental.pallas.ops.tpu.flash_attention``):
  scores and probabilities stay in VMEM instead of making ``[B, H, Nq, Nk]`` float32 round trips
  through HBM. Its blocks are 128 tokens, so both lengths are padded up to a multiple of 128 and
  padded keys are masked with segment ids. XLA cannot partition a Pallas call, so under a mesh
  the kernel runs in a ``shard_map``: batch over ``BATCH_AXES``, heads over ``"tensor"`` (each
  where it divides); without a mesh only a single-device program takes it.
``"cudnn"`` (GPU)
  cuDNN's fused flash attention through ``jax.nn.dot_product_attention``; XLA partitions it
  itself (custom partitioning over batch and heads). Odd lengths are padded by one token (see
  :func:`cudnn_lengths`): JAX's training rule refuses them, and whether a call will be
  differentiated is not known when it is traced.
``"xla"``
  The same maths in plain ``jnp``, differentiated and fused by XLA: every shape a kernel refuses
  or is not worth its padding for (see :func:`attention_implementation` for the rules).

Everywhere: scores and softmax in float32, scale ``Dh ** -0.5``, output in ``q``'s dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from umg_jax.ops.dense import copy_swap
from umg_jax.ops.platform import normalise, target_compute_capability, target_platform

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


# ---------------------------------------------------------------------------------------------
# Choice of implementation

IMPLEMENTATIONS = ("cpu_vjp", "xla", "pallas_flash", "cudnn")

# TPU flash kernel: blocks of FLASH_BLOCK tokens (its default BlockSizes, and the lane width its
# segment-id masking needs). Below FLASH_MIN_LEN a sequence would be one block of mostly padding
# and XLA's score tile is small anyway (77 x 77 text: 23 KiB float32 per head). FLASH_MAX_PAD
# bounds the padding: a length of n runs as round_up(n, 128), at most 1.5 n, so the padded
# MXU work stays under 2.25x the real one (ViT-B/16 197 -> 256, ViT-L/14 257 -> 384 and 577 ->
# 640 qualify; 129..170 tokens, e.g. a token-merged ViT-B at 130, run on XLA). Not measured on
# a TPU: attention is a few percent of a ViT's FLOPs, while XLA's [B, H, N, N] float32 score
# round trips through HBM cost more than that padding at these lengths.
FLASH_BLOCK = 128
FLASH_MIN_LEN = 128
FLASH_MAX_PAD = 1.5
# cuDNN flash attention, as JAX 0.10 checks it while tracing
# (jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention; a refusal there is a
# NotImplementedError raised wherever autodiff, remat or scan first trace the rule, so it is
# decided here, before tracing, and never caught):
# - fp16 / bf16 operands;
# - head dim a multiple of 8 and <= 128. JAX allows 256 on Hopper, judging by the *local*
#   backend's first GPU: a deviceless compile for an H100 on a CPU host gets 128, so 128 is the
#   bound that holds everywhere;
# - training with a bias needs even lengths, and JAX always passes a bias operand (zeros(0)
#   when there is none): every differentiated call with an odd length is refused (ViT-L/14's
#   257 tokens, the text tower's 77). cudnn_lengths pads those by one token instead;
# - compute capability >= 8.0: cuDNN's flash kernels are Ampere and later (older GPUs fail at
#   compile time, after JAX's checks);
# - compute capability 10.3 (B300) needs cuDNN >= 9.11: requirements-gpu.txt pins a later
#   cuDNN (9.28 with jax-cuda12-plugin[with-cuda] 0.10.2), so that case is not checked here.
CUDNN_MAX_HEAD_DIM = 128
CUDNN_MIN_COMPUTE_CAPABILITY = (8, 0)



def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _flash_fits(nq: int, nk: int, head_dim: int, dtype) -> bool:
    """The TPU flash kernel takes (and is worth) this shape; see the constants above."""
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return False
    # kernel: head dim <= 128 (one lane tile) or a multiple of 128
    if head_dim > 128 and head_dim % 128:
        return False
    return all(n >= FLASH_MIN_LEN and _round_up(n, FLASH_BLOCK) <= FLASH_MAX_PAD * n
               for n in (nq, nk))


def cudnn_lengths(nq: int, nk: int) -> tuple[int, int]:
    """``(Nq, Nk)`` as the cuDNN path runs them: each rounded up to an even length.

    JAX's cuDNN training rule refuses odd lengths (see the constants above). One padded token
    costs ``~2 / N`` more attention work and a copy of ``q, k, v`` (``[B, N, H, Dh]``), against
    XLA's path, which writes ``[B, H, N, N]`` float32 scores and probabilities to HBM and reads
    them back in the backward. Padded keys are masked (``key_value_seq_lengths``) unless the
    causal mask already hides them; padded query rows are sliced off."""
    return nq + nq % 2, nk + nk % 2


def _cudnn_fits(nq: int, nk: int, head_dim: int, dtype, causal: bool,
                compute_capability: tuple[int, int] | None) -> bool:
    """cuDNN's fused attention takes this shape, once :func:`cudnn_lengths` has padded it."""
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return False
    if compute_capability is not None and compute_capability < CUDNN_MIN_COMPUTE_CAPABILITY:
        return False
    # our causal mask is tril([Nq, Nk]) (top-left aligned); only square is unambiguous
    return not (causal and nq != nk)


def attention_implementation(nq: int, nk: int, head_dim: int, dtype, *, platform: str,
                             causal: bool = False, key_bias: bool = False,
                             compute_capability: tuple[int, int] | None = None) -> str:
    """Which implementation :func:`attention` takes for a shape; pure (static shapes only).

    Args:
      nq, nk: query and key lengths. head_dim: ``Dh``. dtype: compute dtype of ``q, k, v``.
      platform: ``"cpu"``, ``"tpu"`` or ``"gpu"`` (``"cuda"`` / ``"rocm"`` accepted): the platform
        the step is compiled for.
      causal: a causal (``tril``) mask. key_bias: a ``[B, Nk]`` key bias is passed.
      compute_capability: ``(major, minor)`` of the GPU compiled for; None = unknown (taken as
        able: Ampere or later).

    Returns one of :data:`IMPLEMENTATIONS`, by these rules:

    - cpu: ``"cpu_vjp"``, always (the tuned custom VJP).
    - tpu: ``"pallas_flash"`` if there is no key bias, the dtype is bf16 / f32, ``Dh <= 128`` or a
      multiple of 128, and both lengths are ``>= FLASH_MIN_LEN`` (128) with padding to a multiple
      of 128 of at most ``FLASH_MAX_PAD`` (1.5x) the length; else ``"xla"``. So: text towers (77
      and shorter), single-query calls (MaskCLIP class token, MAP probe), tiny models and 129..170
      tokens take XLA.
    - gpu: ``"cudnn"`` if there is no key bias, the dtype is fp16 / bf16, ``Dh`` is a multiple of 8
      and ``<= 128``, a causal call is square and the compute capability is 8.0 or more (or
      unknown); else ``"xla"`` (float32 towers take XLA). Any lengths: odd ones run padded to
      even (:func:`cudnn_lengths`).
    - a key bias (token merging's proportional attention) takes ``"xla"`` on TPU and GPU: either
      kernel needs it as a dense ``[B, H or 1, Nq, Nk]`` array in HBM (the TPU kernel saves it for
      the backward in float32; cuDNN rounds it to the compute dtype) and writes its gradient at
      that size: the N^2 traffic the kernels exist to avoid. The TPU path still takes one when
      forced with ``attention(..., implementation="pallas_flash")``.
    - any other platform: ``"xla"``.
    """
    platform = normalise(platform)
    dtype = jnp.dtype(dtype)
    if platform == "cpu":
        return "cpu_vjp"
    if key_bias:
        return "xla"
    if platform == "tpu" and _flash_fits(nq, nk, head_dim, dtype):
        return "pallas_flash"
    if platform == "gpu" and _cudnn_fits(nq, nk, head_dim, dtype, causal, compute_capability):
        return "cudnn"
    return "xla"


# ---------------------------------------------------------------------------------------------
# XLA (any platform)

def _causal_mask(nq: int, nk: int) -> jax.Array:
    """``[Nq, Nk]`` bool, True = attend: query ``i`` sees keys ``0..i``."""
    return jnp.tril(jnp.ones((nq, nk), bool))


def _xla_attention(q, k, v, causal: bool, key_bias, scale: float) -> jax.Array:
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_F32) * scale
    mask = _causal_mask(q.shape[1], k.shape[1]) if causal else None
    p = _probs(s, mask, key_bias).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=_F32).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# TPU: Pallas flash attention

def _pad_tokens(x: jax.Array, n: int, axis: int) -> jax.Array:
    """Zero-pads ``axis`` of ``x`` up to length ``n``."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad) if n != x.shape[axis] else x


def _flash_local(q, k, v, key_bias, *, causal: bool, scale: float) -> jax.Array:
    """The kernel on local (per-device) arrays: ``[b, Nq, h, Dh]`` in and out."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, nq, h, _ = q.shape
    nk = k.shape[1]
    pq, pk = _round_up(nq, FLASH_BLOCK), _round_up(nk, FLASH_BLOCK)
    # kernel layout [B, H, N, Dh]
    qt = _pad_tokens(jnp.swapaxes(q, 1, 2), pq, 2)
    kt, vt = (_pad_tokens(jnp.swapaxes(x, 1, 2), pk, 2) for x in (k, v))
    segments = None
    # Padded keys must get no weight, unless the causal mask already hides them from every real
    # query (query i sees keys <= i < nq <= nk). Padded queries are sliced off; their rows get a
    # zero cotangent and so add nothing to dk, dv.
    if pk != nk and not (causal and nq <= nk):
        segments = fa.SegmentIds(q=jnp.ones((b, pq), jnp.int32),
                                 kv=jnp.broadcast_to(jnp.arange(pk) < nk, (b, pk)).astype(
                                     jnp.int32))
    ab = None
    if key_bias is not None:
        # the kernel adds ab before multiplying by sm_scale: pass key_bias / scale
        kb = _pad_tokens(key_bias.astype(_F32) * (1.0 / scale), pk, 1)
        ab = jnp.broadcast_to(kb[:, None, None, :], (b, h, pq, pk))
    o = fa.flash_attention(qt, kt, vt, ab, segments, causal=causal, sm_scale=scale)
    return jnp.swapaxes(o[:, :, :nq], 1, 2).astype(q.dtype)


def _manual_specs(mesh, b: int, h: int) -> tuple[P, P] | None:
    """``(q/k/v/out spec over [B, N, H, Dh], key-bias spec over [B, N])`` for the kernel's
    ``shard_map``: batch over the mesh's ``BATCH_AXES`` (the longest prefix whose size divides
    ``B``), heads over ``"tensor"`` if it divides ``H``. None: no mesh, or traced inside a
    ``shard_map`` already (some axes manual), where the kernel is called as it is."""
    from umg_jax.sharding import BATCH_AXES

    if mesh.empty:
        return None
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    batch = []
    for a in (a for a in BATCH_AXES if a in sizes):
        if b % (math.prod(sizes[x] for x in batch) * sizes[a]):
            break
        batch.append(a)
    bspec = tuple(batch) or None
    hspec = "tensor" if "tensor" in sizes and h % sizes["tensor"] == 0 else None
    return P(bspec, None, hspec, None), P(bspec, None)


def _kernel_can_be_placed() -> bool:
    """A Pallas call can be partitioned only by hand (``shard_map`` over the mesh in context):
    without a mesh, only a single-device program is sure to compile. A plain ``jax.jit`` on a
    multi-chip host (evaluating FSDP-sharded params, say) fails with "Mosaic kernels cannot be
    automatically partitioned", so it takes XLA instead."""
    return not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1


def tpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                        key_bias: jax.Array | None = None) -> jax.Array:
    """Attention on the Pallas TPU flash kernel (any lengths: padded to multiples of 128).

    ``q [B, Nq, H, Dh]``, ``k, v [B, Nk, H, Dh]`` bf16 or f32, ``key_bias [B, Nk]`` float32 or
    None -> ``[B, Nq, H, Dh]`` in ``q``'s dtype. Under a mesh in context
    (``jax.sharding.get_abstract_mesh()``) the kernel runs per device in a ``shard_map``.
    Runs on the CPU only in Pallas interpret mode (``pltpu.force_tpu_interpret_mode()``).
    """
    fn = functools.partial(_flash_local, causal=causal, scale=q.shape[-1] ** -0.5)
    mesh = jax.sharding.get_abstract_mesh()
    specs = _manual_specs(mesh, q.shape[0], q.shape[2])
    if specs is None:
        return fn(q, k, v, key_bias)
    spec, bias_spec = specs
    # check_vma=False: the Pallas call's outputs carry no varying-axes annotation
    if key_bias is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh,
                             in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3 + (bias_spec,), out_specs=spec,
                         check_vma=False)(q, k, v, key_bias)


# ---------------------------------------------------------------------------------------------
# GPU: cuDNN through jax.nn.dot_product_attention

def gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                  key_bias: jax.Array | None = None, implementation: str | None = "cudnn",
                  pad_to_even: bool | None = None) -> jax.Array:
    """Attention through ``jax.nn.dot_product_attention`` (same ``[B, N, H, Dh]`` layout).

    ``implementation="cudnn"`` needs a GPU with cuDNN (or a deviceless GPU compile), fp16 / bf16
    and ``Dh % 8 == 0``; ``"xla"`` runs anywhere (the tests' check of this wrapper).
    ``pad_to_even`` (default: for ``"cudnn"``): run odd lengths padded to
    :func:`cudnn_lengths`, the padded keys masked through ``key_value_seq_lengths`` (unless
    the causal mask hides them from every real query) and the padded query rows sliced off.
    ``key_bias [B, Nk]`` float32 is added to every query's logits (broadcast to
    ``[B, 1, Nq, Nk]``; cuDNN reads it in ``q``'s dtype). Returns ``[B, Nq, H, Dh]`` in ``q``'s
    dtype; logits and softmax in float32.
    """
    b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    if pad_to_even is None:
        pad_to_even = implementation == "cudnn"
    pq, pk = cudnn_lengths(nq, nk) if pad_to_even else (nq, nk)
    q = _pad_tokens(q, pq, 1)
    k, v = (_pad_tokens(x, pk, 1) for x in (k, v))
    kv_lengths = None
    if pk != nk and not (causal and nq <= nk):
        kv_lengths = jnp.full((b,), nk, jnp.int32)
    bias = None
    if key_bias is not None:
        bdt = q.dtype if implementation == "cudnn" else _F32
        # cuDNN wants the bias at the full [.., Nq, Nk] size
        kb = _pad_tokens(key_bias.astype(bdt), pk, 1)
        bias = jnp.broadcast_to(kb[:, None, None, :], (b, 1, pq, pk))
    o = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal,
                                     scale=q.shape[-1] ** -0.5,
                                     key_value_seq_lengths=kv_lengths,
                                     implementation=implementation)
    return o[:, :nq].astype(q.dtype)


# ---------------------------------------------------------------------------------------------

def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
              key_bias: jax.Array | None = None, backend: str | None = None,
              implementation: str | None = None) -> jax.Array:
    """Multi-head attention core.

    Args:
      q: ``[B, Nq, H, Dh]`` in the compute dtype.
      k, v: ``[B, Nk, H, Dh]``, same dtype.
      causal: static; query ``i`` attends keys ``0..i`` only (``tril`` of ``[Nq, Nk]``).
      key_bias: ``[B, Nk]`` float32 added to every query's logits (ToMe's log token size); has a
        gradient.
      backend: the platform to choose for (``"cpu"``, ``"tpu"``, ``"gpu"``); default: the
        platform the trace is compiled for (:func:`umg_jax.ops.platform.target_platform`).
      implementation: force one of :data:`IMPLEMENTATIONS` (tests, benchmarks); default
        :func:`attention_implementation`, except that its ``"pallas_flash"`` becomes ``"xla"``
        when traced without a mesh on a multi-device host (the kernel needs a mesh to be placed;
        trace under ``jax.set_mesh`` / ``jax.sharding.use_abstract_mesh`` to get it there).

    Returns:
      ``[B, Nq, H, Dh]`` in ``q``'s dtype. Scores and softmax are computed in float32, scaled by
      ``Dh ** -0.5``.
    """
    causal = bool(causal)
    scale = q.shape[-1] ** -0.5
    platform = normalise(backend or target_platform())
    impl = implementation or attention_implementation(
        q.shape[1], k.shape[1], q.shape[-1], q.dtype, platform=platform, causal=causal,
        key_bias=key_bias is not None,
        compute_capability=target_compute_capability() if platform == "gpu" else None)
    if implementation is None and impl == "pallas_flash" and not _kernel_can_be_placed():
        impl = "xla"
    if impl == "cpu_vjp":
        mask = _causal_mask(q.shape[1], k.shape[1]) if causal else None
        return _cpu_attention(q, k, v, mask, key_bias, scale)
    if impl == "pallas_flash":
        return tpu_flash_attention(q, k, v, causal=causal, key_bias=key_bias)
    if impl == "cudnn":
        return gpu_attention(q, k, v, causal=causal, key_bias=key_bias)
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r}; "
                         f"expected one of {IMPLEMENTATIONS}")
    return _xla_attention(q, k, v, causal, key_bias, scale)
