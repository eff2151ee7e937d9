"""Encoding the tag / region / mask text slots of a batch with work that grows with the distinct
texts, not with the slots.

A UMG batch holds tens of short texts per image, and most repeat: tags come from a fixed tag
list, and an uncaptioned region or mask is named by a tag prompt. Such texts travel as ids into
the data set's text vocabulary (``schema``: ``tags_id``, ``region_text_id``, ``mask_text_id``;
``meta.json``: ``text_vocab``). Per step:

- **vocabulary texts**: the vocabulary rows present in the global batch are encoded once each
  (``K`` rows; with a budget of the whole vocabulary no presence test is needed) and gathered
  into their slots. Presence is a scatter of ids into a ``[V]`` vector (an all-reduce of V
  booleans), never a sort of the batch's rows;
- **free-form texts** (captions of regions and masks, and tags outside the vocabulary): each
  batch shard packs its own free-form rows into ``Kf`` rows (a sort of the shard's own flags, on
  its own device), encodes them and gathers them back.

Gathers transpose to scatter-adds, so the values and gradients equal encoding every slot, up to
float summation order. ``K`` and ``Kf`` are static: the host measures each batch's needs
(:func:`needs`, agreed over hosts) and picks budgets that hold them (:func:`fit`): the
configured ones, or for a rare fuller batch the next larger ones (another compile, slower, never
wrong). There is no ``lax.cond`` fallback in the step, so its memory and FLOPs are those of the
budgets. Should a batch still overflow (a host bug), the embeddings are NaN: the step skips the
update and reports ``text/overflow``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def budgets(slots_per_shard: int, vocab_size: int, shards: int, vocab_budget: int,
            free_frac: float) -> tuple[int, int]:
    """``(K, Kf)`` as configured: vocabulary rows encoded per step (a multiple of ``shards``; the
    whole vocabulary, padded, when ``vocab_budget`` is 0 or exceeds it) and free-form rows per
    batch shard (``free_frac`` of its slots, rounded up to 8, at least 8, at most all of them)."""
    whole = round_up(max(vocab_size, 1), shards)
    k = whole if vocab_budget <= 0 else min(whole, round_up(vocab_budget, shards))
    kf = min(slots_per_shard, max(8, round_up(math.ceil(free_frac * slots_per_shard), 8)))
    return k, kf


def needs(ids: np.ndarray, valid: np.ndarray, vocab_size: int, shards: int
          ) -> tuple[np.ndarray, int]:
    """What a host's batch needs: ``(present [V] bool, free_max)``, the vocabulary texts it
    holds and the free-form texts of its fullest shard. ``ids``, ``valid``: ``[b, n]`` of this
    host's rows, which make ``shards`` whole batch shards. Over hosts, OR the ``present``
    vectors and take the max of ``free_max`` (an element-wise max does both)."""
    known = valid & (ids >= 0) & (ids < vocab_size)
    present = np.zeros((vocab_size,), bool)
    present[ids[known]] = True
    free = (valid & ~known).reshape(shards, -1)
    return present, int(free.sum(1).max()) if free.size else 0


def fit(distinct: int, free_max: int, configured: tuple[int, int], vocab_size: int,
        slots_per_shard: int, shards: int) -> tuple[int, int]:
    """The budgets for a batch with ``distinct`` vocabulary texts and ``free_max`` free-form
    texts on its fullest shard: the configured ones when they hold it, else each doubled until
    it does (capped at the whole vocabulary / every slot), so few distinct programs compile."""
    k, kf = configured
    whole = round_up(max(vocab_size, 1), shards)
    while k < distinct and k < whole:
        k = min(whole, round_up(2 * k, shards))
    while kf < free_max and kf < slots_per_shard:
        kf = min(slots_per_shard, 2 * kf)
    return k, kf


def encode_slots(encode: Callable[[jax.Array], jax.Array], tokens: jax.Array, ids: jax.Array,
                 valid: jax.Array, vocab: jax.Array, *, shards: int, k: int, kf: int
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Embeddings of every text slot, encoding each vocabulary text once and each free-form
    text once per slot.

    Args:
      encode: the text tower, ``[N, Le] int32 -> [N, E]``.
      tokens: ``[B, n, Le] int32``, every slot's tokens.
      ids: ``[B, n] int32``, vocabulary id of each slot's text, -1 when free-form.
      valid: ``[B, n] bool``; invalid slots get some finite embedding (losses mask them).
      vocab: ``[V, Le0] int32`` (``Le0 >= Le``), the vocabulary's tokens; cut to ``Le`` (a
        trimmed batch: its present rows fit, as they are the batch's own texts).
      shards: batch shards of the mesh (``B % shards == 0``); free-form rows are packed per
        shard, so no row leaves its device.
      k, kf: static budgets (:func:`budgets`, :func:`fit`): vocabulary rows encoded (a multiple
        of ``shards``), free-form rows per shard.

    Returns ``(emb [B, n, E], stats)``; ``stats``: ``text/vocab_distinct`` (vocabulary texts
    present), ``text/free_max`` (free-form texts of the fullest shard), ``text/overflow`` (1 when
    a budget was too small: the embeddings are then NaN), int32 scalars.
    """
    b, n, le = tokens.shape
    v = vocab.shape[0]
    if b % shards or k % shards:
        raise ValueError(f"batch {b} and vocabulary rows {k} must split into {shards} shards")
    local = b // shards * n
    kf = min(kf, local)
    known = valid & (ids >= 0) & (ids < v)
    free = valid & ~known

    present = jnp.zeros((v,), bool).at[jnp.where(known, ids, v)].set(True, mode="drop")
    distinct = present.sum(dtype=jnp.int32)
    free_count = free.reshape(shards, local).sum(1, dtype=jnp.int32)
    overflow = (distinct > k) | (free_count.max() > kf)

    # vocabulary: the present rows packed first (stable, so in id order, as ``row_of`` counts)
    if k >= v:
        sel, row_of = jnp.arange(k) % v, jnp.arange(v)
    else:
        sel = jnp.argsort(~present, stable=True)[:k]
        row_of = jnp.cumsum(present, dtype=jnp.int32) - 1
    vemb = encode(vocab[sel, :le])  # [K, E]
    slot_v = vemb[jnp.clip(row_of[jnp.clip(ids, 0, v - 1)], 0, k - 1)]  # [B, n, E]
    # free-form: each shard packs its own rows (a sort along the unsharded axis)
    fr = free.reshape(shards, local)
    src = jnp.argsort(~fr, axis=1, stable=True)[:, :kf]  # [D, Kf]
    rows = jnp.take_along_axis(tokens.reshape(shards, local, le), src[..., None], axis=1)
    femb = encode(rows.reshape(shards * kf, le)).reshape(shards, kf, -1)
    back = jnp.clip(jnp.cumsum(fr, axis=1, dtype=jnp.int32) - 1, 0, kf - 1)
    slot_f = jnp.take_along_axis(femb, back[..., None], axis=1).reshape(b, n, -1)
    emb = jnp.where(known[..., None], slot_v, slot_f)
    emb = jnp.where(overflow, jnp.nan, emb)  # never a silently wrong embedding
    stats = {"text/vocab_distinct": distinct, "text/free_max": free_count.max(),
             "text/overflow": overflow.astype(jnp.int32)}
    return emb, stats
