"""The sharded contrastive core shared by every granularity: chunked, exact, multi-positive.

``contrastive_loss`` contrasts anchors (image / region / mask embeddings) with texts of the whole
**global** batch. It runs under ``jax.shard_map`` over the batch axes:

* each device keeps its own anchor rows ``[n, E]`` (n = local anchors);
* the text embeddings (with their validity and keys) are **all-gathered** ``[N, E]`` (default:
  one collective instead of ``D`` dependent steps); the ``N x N`` logits are never formed. The
  gathered texts and their cotangent are then the memory floor (~2 N E floats per device); for
  the sigmoid loss ``exchange="ring"`` removes it too: the text blocks travel around a ring of
  ``ppermute`` steps, forward and (custom VJP) backward, so a device holds one ``[N / D, E]``
  block at a time (benchmarks/loss_memory.py: 98 MiB vs 306 MiB all-gather, 4.2 GiB naive, at
  N = 65,536 on 8 devices);
* the texts are processed in chunks of ``chunk_size`` by a ``lax.scan`` whose body is
  ``jax.checkpoint``-ed, so the backward pass recomputes each ``[n, chunk]`` logits block instead
  of storing it. No device ever holds more than one ``[n, chunk]`` block.

Targets are multi-positive: anchor ``i`` and text ``j`` are a positive pair iff the key of text
``j`` is one of anchor ``i``'s keys (keys are in-graph hashes of token rows, see
:func:`token_keys`; two texts with the same tokens are therefore never each other's negatives).
Padded entries (``*_valid`` False) are neither anchors nor negatives.

softmax (CLIP InfoNCE, symmetric): for each valid anchor with at least one positive,
``loss_i = logsumexp_{valid j} l_ij - mean_{j in P(i)} l_ij`` (cross-entropy against uniform
targets over the positives), and the same per text over the anchors (column direction); the loss
is ``(mean over rows + mean over columns) / 2``. Row log-sum-exps are accumulated online in the
scan carry; column statistics are per-chunk scan outputs, combined over devices with ``pmax`` /
``psum``. The running maxima are ``stop_gradient``-ed, exact since logsumexp is shift-invariant.

sigmoid (SigLIP): ``loss = sum_{valid i, valid j} -log sigmoid(z_ij l_ij) / #valid anchors`` with
``z = +1`` on positives and -1 elsewhere, ``l = scale * cos + bias``.

Accuracy: the fraction of valid anchors (with a positive) whose highest-scoring valid text is a
positive (ties with a positive count as correct: duplicate texts score identically).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from umg_jax.sharding import BATCH_AXES

KINDS = ("softmax", "sigmoid")
NEG = -1e30  # finite "minus infinity": keeps exp / max / gradients free of inf - inf
_HASH_PRIMES = (0x9E3779B1, 0x85EBCA77)  # two independent multipliers -> a 64-bit key


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser (uint32 -> uint32, wrapping)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def token_keys(tokens: jax.Array) -> jax.Array:
    """In-graph hash of token rows: ``[..., L] int32`` -> ``[..., 2] int32``.

    Two polynomial hashes (mod 2^32, different multipliers) with murmur finalisation; equal rows
    give equal keys, distinct rows collide with probability ~ L * 2^-64 per pair.
    """
    length = tokens.shape[-1]
    tok = tokens.astype(jnp.uint32)
    keys = []
    for prime in _HASH_PRIMES:
        powers = np.ones(length, np.uint64)
        for k in range(1, length):
            powers[k] = (powers[k - 1] * prime) % (1 << 32)
        h = jnp.sum((tok + jnp.uint32(1)) * jnp.asarray(powers.astype(np.uint32)), axis=-1,
                    dtype=jnp.uint32)
        keys.append(jax.lax.bitcast_convert_type(_fmix32(h), jnp.int32))
    return jnp.stack(keys, axis=-1)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(|x|, eps)`` over the last axis, in float32 (a zero row stays zero, no NaN)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Marks a fresh (device-invariant) constant as varying over ``axes`` (a scan carry that the
    body mixes with per-device values must start varying)."""
    return jax.lax.pcast(x, axes, to="varying")


def _positives(a_keys, a_keys_valid, a_valid, t_keys, t_valid):
    """``[n, K, 2], [n, K], [n], [C, 2], [C]`` -> positive mask ``[n, C]`` bool."""
    eq = ((a_keys[:, :, None, 0] == t_keys[None, None, :, 0])
          & (a_keys[:, :, None, 1] == t_keys[None, None, :, 1]) & a_keys_valid[:, :, None])
    return jnp.any(eq, axis=1) & a_valid[:, None] & t_valid[None, :]


def contrastive_loss(
    anchors: jax.Array,
    anchor_valid: jax.Array,
    anchor_keys: jax.Array,
    anchor_keys_valid: jax.Array,
    texts: jax.Array,
    text_valid: jax.Array,
    text_keys: jax.Array,
    log_scale: jax.Array,
    bias: jax.Array | None,
    *,
    kind: str,
    chunk_size: int,
    mesh: Mesh,
    axes: tuple[str, ...] = BATCH_AXES,
    exchange: str = "all_gather",
    exchange_dtype: str = "float32",
) -> tuple[jax.Array, jax.Array]:
    """Global-batch contrastive loss between anchors and texts, sharded over ``axes``.

    Every array has the (global) batch as its leading axis and is split over ``axes``:

    Args:
      anchors: ``[B, *A, E]`` unnormalised anchor embeddings (``*A`` e.g. ``()`` or ``(R,)``).
      anchor_valid: ``[B, *A]`` bool.
      anchor_keys: ``[B, *A, K, 2]`` int32 keys of each anchor's positive texts.
      anchor_keys_valid: ``[B, *A, K]`` bool.
      texts: ``[B, *T, E]`` unnormalised text embeddings.
      text_valid: ``[B, *T]`` bool.
      text_keys: ``[B, *T, 2]`` int32 (:func:`token_keys` of the text tokens).
      log_scale: scalar float32, log of the logit scale (``logits = exp(log_scale) * cos``).
      bias: scalar logit bias (sigmoid only; ``None`` = 0).
      kind: ``"softmax"`` or ``"sigmoid"``.
      chunk_size: texts per scan step.
      mesh: the device mesh; ``axes`` are its batch axes.
      exchange: ``"all_gather"`` or ``"ring"`` (sigmoid only, :func:`_ring_sigmoid`).
      exchange_dtype: dtype of the normalised texts all-gathered from every device (and of their
        cotangent): ``"bfloat16"`` halves the loss's largest buffers at pod scale (global
        region / mask texts x E); logits stay float32. ``"all_gather"`` only.

    Returns:
      ``(loss, accuracy)`` float32 scalars, replicated; 0 when there is no valid anchor.
    """
    if kind not in KINDS:
        raise ValueError(f"loss kind {kind!r} is not one of {KINDS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if kind == "sigmoid" and bias is None:
        raise ValueError("the sigmoid loss needs a logit bias (set model.logit_bias_init)")
    if exchange not in ("all_gather", "ring"):
        raise ValueError(f"loss.exchange must be 'all_gather' or 'ring', got {exchange!r}")
    if exchange == "ring" and kind != "sigmoid":
        raise ValueError("loss.exchange='ring' is implemented for the sigmoid loss only (the "
                         "softmax loss needs global column statistics; use 'all_gather')")
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    if anchors.shape[0] % shards:
        raise ValueError(f"batch {anchors.shape[0]} is not divisible by the {shards} shards of "
                         f"mesh axes {axes}")
    bias = jnp.zeros((), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    log_scale = jnp.asarray(log_scale, jnp.float32)
    # Fixed text-chunk size from the global text count (static under jit).
    n_text = int(np.prod(texts.shape[:-1]))
    chunk = min(chunk_size, n_text)
    row = P(axes)
    if exchange == "ring":
        chunk = min(chunk_size, n_text // shards)
        fn = functools.partial(_ring_sigmoid, chunk=chunk, axes=axes, shards=shards)
    else:
        fn = functools.partial(_local_loss, kind=kind, chunk=chunk, axes=axes,
                               exchange_dtype=jnp.dtype(exchange_dtype))
    return jax.shard_map(
        fn, mesh=mesh,
        in_specs=(row, row, row, row, row, row, row, P(), P()),
        out_specs=(P(), P()),
    )(anchors, anchor_valid.astype(bool), anchor_keys.astype(jnp.int32),
      anchor_keys_valid.astype(bool), texts, text_valid.astype(bool),
      text_keys.astype(jnp.int32), log_scale, bias)


def _flat_local(anchors, a_valid, a_keys, a_keys_valid, texts, t_valid, t_keys):
    """This device's rows flattened: normalised anchors ``[n, E]``, ``[n]``, keys ``[n, K, 2]``,
    ``[n, K]``; normalised texts ``[c, E]``, ``[c]``, keys ``[c, 2]``."""
    e = anchors.shape[-1]
    k = a_keys.shape[-2]
    return (l2_normalize(anchors.reshape(-1, e)), a_valid.reshape(-1),
            a_keys.reshape(-1, k, 2), a_keys_valid.reshape(-1, k),
            l2_normalize(texts.reshape(-1, e)), t_valid.reshape(-1), t_keys.reshape(-1, 2))


def _pad_to_chunks(t, tv, tk, chunk: int):
    """Texts ``[c, E]``, ``[c]``, ``[c, 2]`` padded (invalid rows) to a multiple of ``chunk``."""
    pad = -t.shape[0] % chunk
    if pad:
        t = jnp.pad(t, ((0, pad), (0, 0)))
        tv = jnp.pad(tv, (0, pad))
        tk = jnp.pad(tk, ((0, pad), (0, 0)))
    return t, tv, tk


def _local_loss(anchors, a_valid, a_keys, a_keys_valid, texts, t_valid, t_keys, log_scale, bias,
                *, kind: str, chunk: int, axes: tuple[str, ...],
                exchange_dtype: jnp.dtype = jnp.dtype(jnp.float32)):
    a, av, ak, akv, t, tv, tk = _flat_local(anchors, a_valid, a_keys, a_keys_valid, texts,
                                            t_valid, t_keys)
    n, e = a.shape
    t = t.astype(exchange_dtype)  # the gathered [N, E] and its cotangent live in this dtype

    gather = lambda x: jax.lax.all_gather(x, axes, axis=0, tiled=True)
    t, tv, tk = gather(t), gather(tv), gather(tk)
    n_text = t.shape[0]
    t, tv, tk = _pad_to_chunks(t, tv, tk, chunk)
    n_chunks = t.shape[0] // chunk
    xs = (t.reshape(n_chunks, chunk, e), tv.reshape(n_chunks, chunk),
          tk.reshape(n_chunks, chunk, 2))
    scale = jnp.exp(log_scale)
    sg = jax.lax.stop_gradient

    def block(tc, tvc, tkc):
        logits = scale * (a @ tc.astype(jnp.float32).T)
        if kind == "sigmoid":
            logits = logits + bias
        valid = av[:, None] & tvc[None, :]
        pos = _positives(ak, akv, av, tkc, tvc)
        return logits, valid, pos

    if kind == "softmax":

        def body(carry, x):
            m, s, ps, pc, mp = carry
            logits, valid, pos = block(*x)
            lm = jnp.where(valid, logits, NEG)
            m_new = jnp.maximum(m, sg(lm.max(axis=1)))
            s = (s * jnp.exp(m - m_new)
                 + jnp.where(valid, jnp.exp(lm - m_new[:, None]), 0.0).sum(axis=1))
            ps = ps + jnp.where(pos, logits, 0.0).sum(axis=1)
            pc = pc + pos.sum(axis=1, dtype=jnp.float32)
            mp = jnp.maximum(mp, sg(jnp.where(pos, logits, NEG).max(axis=1)))
            # Column statistics of this chunk over the local anchors.
            cm = sg(lm.max(axis=0))
            cs = jnp.where(valid, jnp.exp(lm - cm[None, :]), 0.0).sum(axis=0)
            cps = jnp.where(pos, logits, 0.0).sum(axis=0)
            cpc = pos.sum(axis=0, dtype=jnp.float32)
            return (m_new, s, ps, pc, mp), (cm, cs, cps, cpc)

        init = (jnp.full((n,), NEG), jnp.zeros((n,)), jnp.zeros((n,)), jnp.zeros((n,)),
                jnp.full((n,), NEG))
        init = tuple(_varying(x, axes) for x in init)
        (m, s, ps, pc, mp), cols = jax.lax.scan(jax.checkpoint(body), init, xs)
        row_has = av & (pc > 0) & (s > 0)
        lse = m + jnp.log(jnp.where(s > 0, s, 1.0))
        row_loss = jnp.where(row_has, lse - ps / jnp.maximum(pc, 1.0), 0.0)
        rows_sum = jax.lax.psum(row_loss.sum(), axes)
        rows_n = jax.lax.psum(row_has.sum(dtype=jnp.float32), axes)

        cm, cs, cps, cpc = (c.reshape(-1)[:n_text] for c in cols)
        gm = sg(jax.lax.pmax(cm, axes))
        cs = jax.lax.psum(cs * jnp.exp(cm - gm), axes)
        cps = jax.lax.psum(cps, axes)
        cpc = jax.lax.psum(cpc, axes)
        col_has = (cpc > 0) & (cs > 0)
        col_lse = gm + jnp.log(jnp.where(cs > 0, cs, 1.0))
        col_loss = jnp.where(col_has, col_lse - cps / jnp.maximum(cpc, 1.0), 0.0)
        cols_n = col_has.sum(dtype=jnp.float32)
        loss = 0.5 * (rows_sum / jnp.maximum(rows_n, 1.0)
                      + col_loss.sum() / jnp.maximum(cols_n, 1.0))
    else:

        def body(carry, x):
            m, ls, pc, mp = carry
            logits, valid, pos = block(*x)
            z = jnp.where(pos, 1.0, -1.0)
            ls = ls + jnp.where(valid, -jax.nn.log_sigmoid(z * logits), 0.0).sum(axis=1)
            pc = pc + pos.sum(axis=1, dtype=jnp.float32)
            m = jnp.maximum(m, sg(jnp.where(valid, logits, NEG).max(axis=1)))
            mp = jnp.maximum(mp, sg(jnp.where(pos, logits, NEG).max(axis=1)))
            return (m, ls, pc, mp), None

        init = (jnp.full((n,), NEG), jnp.zeros((n,)), jnp.zeros((n,)), jnp.full((n,), NEG))
        init = tuple(_varying(x, axes) for x in init)
        (m, ls, pc, mp), _ = jax.lax.scan(jax.checkpoint(body), init, xs)
        rows_sum = jax.lax.psum(jnp.where(av, ls, 0.0).sum(), axes)
        loss = rows_sum / jnp.maximum(jax.lax.psum(av.sum(dtype=jnp.float32), axes), 1.0)
        row_has = av & (pc > 0)

    correct = row_has & (mp >= m)
    acc = (jax.lax.psum(correct.sum(dtype=jnp.float32), axes)
           / jnp.maximum(jax.lax.psum(row_has.sum(dtype=jnp.float32), axes), 1.0))
    return loss, acc


# ------------------------------------------------------------------------ sigmoid over a ring ---


def _ring_sigmoid(anchors, a_valid, a_keys, a_keys_valid, texts, t_valid, t_keys, log_scale,
                  bias, *, chunk: int, axes: tuple[str, ...], shards: int):
    """The sigmoid loss with the texts passed around a ring of ``ppermute`` steps.

    Device ``d`` starts with its own text block and, at each of ``D`` steps, scores its anchors
    against the block it holds (in chunks), then hands the block to device ``d + 1``. Nothing is
    all-gathered: one ``[N / D, E]`` block (plus the one arriving) is in flight, so memory does
    not grow with the device count. The backward pass (``jax.custom_vjp``) runs the ring again,
    the block travelling with an accumulator of its gradient, which is home after ``D`` steps
    (big_vision's chunked-sigmoid idea; autodiff through the forward ring would store every
    visited block). Values and gradients equal the all-gather path.
    """
    a, av, ak, akv, t, tv, tk = _flat_local(anchors, a_valid, a_keys, a_keys_valid, texts,
                                            t_valid, t_keys)
    t, tv, tk = _pad_to_chunks(t, tv, tk, chunk)
    scale = _varying(jnp.exp(log_scale), axes)
    b = _varying(bias, axes)
    ring = _make_ring(chunk, axes, shards)
    ls, m, mp, pc = ring(a, t, b, scale, av, ak, akv, tv, tk)
    sg = jax.lax.stop_gradient
    m, mp, pc = sg(m), sg(mp), sg(pc)
    loss = (jax.lax.psum(jnp.where(av, ls, 0.0).sum(), axes)
            / jnp.maximum(jax.lax.psum(av.sum(dtype=jnp.float32), axes), 1.0))
    row_has = av & (pc > 0)
    correct = row_has & (mp >= m)
    acc = (jax.lax.psum(correct.sum(dtype=jnp.float32), axes)
           / jnp.maximum(jax.lax.psum(row_has.sum(dtype=jnp.float32), axes), 1.0))
    return loss, acc


def _make_ring(chunk: int, axes: tuple[str, ...], shards: int):
    """``ring(a, t, bias, scale, av, ak, akv, tv, tk) -> (row_loss [n], row_max [n],
    row_max_positive [n], positives [n])`` with a custom VJP for ``a, t, bias, scale``."""
    perm = [(j, (j + 1) % shards) for j in range(shards)]
    shift = lambda x: jax.lax.ppermute(x, axes, perm)  # noqa: E731

    def chunks(x):
        return x.reshape(-1, chunk, *x.shape[1:])

    def stats(a, t, bias, scale, av, ak, akv, tv, tk):
        n = a.shape[0]

        def visit(carry, _):
            (ls, m, mp, pc), (tb, tvb, tkb) = carry

            def body(c, x):
                ls, m, mp, pc = c
                tc, tvc, tkc = x
                logits = scale * (a @ tc.T) + bias
                valid = av[:, None] & tvc[None, :]
                pos = _positives(ak, akv, av, tkc, tvc)
                z = jnp.where(pos, 1.0, -1.0)
                ls = ls + jnp.where(valid, -jax.nn.log_sigmoid(z * logits), 0.0).sum(axis=1)
                m = jnp.maximum(m, jnp.where(valid, logits, NEG).max(axis=1))
                mp = jnp.maximum(mp, jnp.where(pos, logits, NEG).max(axis=1))
                pc = pc + pos.sum(axis=1, dtype=jnp.float32)
                return (ls, m, mp, pc), None

            acc, _ = jax.lax.scan(body, (ls, m, mp, pc), (chunks(tb), chunks(tvb), chunks(tkb)))
            return (acc, (shift(tb), shift(tvb), shift(tkb))), None

        init = tuple(_varying(x, axes) for x in (jnp.zeros((n,)), jnp.full((n,), NEG),
                                                  jnp.full((n,), NEG), jnp.zeros((n,))))
        (out, _), _ = jax.lax.scan(visit, (init, (t, tv, tk)), None, length=shards)
        return out

    @jax.custom_vjp
    def ring(a, t, bias, scale, av, ak, akv, tv, tk):
        return stats(a, t, bias, scale, av, ak, akv, tv, tk)

    def fwd(a, t, bias, scale, av, ak, akv, tv, tk):
        return stats(a, t, bias, scale, av, ak, akv, tv, tk), (a, t, bias, scale, av, ak, akv,
                                                                tv, tk)

    def bwd(res, cts):
        a, t, bias, scale, av, ak, akv, tv, tk = res
        g = cts[0]  # only the row losses carry gradient (the maxima / counts are not smooth)

        def visit(carry, _):
            (da, db, ds), (tb, tvb, tkb, dtb) = carry

            def body(c, x):
                da, db, ds = c
                tc, tvc, tkc = x
                cos = a @ tc.T
                logits = scale * cos + bias
                valid = av[:, None] & tvc[None, :]
                pos = _positives(ak, akv, av, tkc, tvc)
                z = jnp.where(pos, 1.0, -1.0)
                # d/dl of -log sigmoid(z l) = -z sigmoid(-z l)
                dl = jnp.where(valid, -z * jax.nn.sigmoid(-z * logits), 0.0) * g[:, None]
                da = da + scale * (dl @ tc)
                dtc = scale * (dl.T @ a)
                return (da, db + dl.sum(), ds + (dl * cos).sum()), dtc

            (da, db, ds), dtc = jax.lax.scan(body, (da, db, ds),
                                             (chunks(tb), chunks(tvb), chunks(tkb)))
            dtb = dtb + dtc.reshape(tb.shape)
            nxt = (shift(tb), shift(tvb), shift(tkb), shift(dtb))
            return ((da, db, ds), nxt), None

        zero = lambda x: _varying(jnp.zeros(x.shape, x.dtype), axes)  # noqa: E731
        init = ((zero(a), zero(bias), zero(scale)), (t, tv, tk, zero(t)))
        ((da, db, ds), (_, _, _, dt)), _ = jax.lax.scan(visit, init, None, length=shards)
        return (da, dt, db, ds, None, None, None, None, None)

    ring.defvjp(fwd, bwd)
    return ring
