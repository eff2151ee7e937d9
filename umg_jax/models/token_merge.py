"""Token merging in the image tower, with the full patch grid restored for the dense features.

Reduction (ToMe, Bolya et al. 2023, bipartite soft matching): after block ``merge_after`` the
patch tokens are split alternately into sets A and B; each A token finds its most similar B token
(cosine of the token features); the ``r`` A tokens with the most similar partners are averaged
into them (size-weighted), the other A tokens stay. The class token (the first ``prefix``
tokens) is never merged. One round removes up to half of the patch tokens, which covers the
0-50 % reductions this project uses; shapes are static under jit (``r`` is fixed).

Restoring the grid (the design choice this project needs): UMG-CLIP's region and pixel losses
and its segmentation need a dense ``[gh, gw, E]`` map. The token -> merged-token assignment is
kept, the remaining blocks (the last one included, with the MaskCLIP value path for the patches)
run on the merged tokens, and after the last block every patch position takes its merged token's
output again (an "unmerge" gather). With proportional attention this is exactly what running the
last block on the restored grid would give (a token of size ``s`` is ``s`` identical keys, and the
value path is per token; tested), one full-grid block cheaper. RoIAlign and mask pooling see the
same shapes as without merging.

Proportional attention (ToMe): a merged token stands for ``s`` patches, so the blocks after the
merge add ``log s`` to its attention logits as a key (``model.vision.merge_proportional``);
merging two identical tokens then leaves every attention output unchanged. Merging needs
``model.scan=False`` (a scan cannot change the token count between its iterations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_merged(num_patches: int, ratio: float) -> int:
    """Tokens removed for a reduction ``ratio`` of ``num_patches`` (at most half, one round)."""
    if not 0.0 <= ratio <= 0.5:
        raise ValueError(f"merge ratio must be in [0, 0.5] (one bipartite round), got {ratio}")
    return min(int(round(ratio * num_patches)), num_patches // 2)


def bipartite_merge(x: jax.Array, r: int, prefix: int = 1
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Merges ``r`` patch tokens of ``x [B, N, D]`` into their most similar partners.

    Returns ``(merged [B, N - r, D], assign [B, N - prefix] int32, size [B, N - r] float32)``:
    ``assign[b, p]`` is the row of ``merged`` that holds patch ``p`` (prefix tokens keep rows
    ``0..prefix-1``); ``size`` is how many original tokens each row stands for.
    """
    b, n, d = x.shape
    t = x[:, prefix:]
    n_patch = n - prefix
    if r <= 0:
        return (x, jnp.broadcast_to(jnp.arange(prefix, n, dtype=jnp.int32), (b, n_patch)),
                jnp.ones((b, n), jnp.float32))
    a, bb = t[:, ::2], t[:, 1::2]  # A: even patches, B: odd patches
    na, nb = a.shape[1], bb.shape[1]
    if r > na:
        raise ValueError(f"cannot merge {r} of {n_patch} tokens in one round (max {na})")
    an = a / jnp.linalg.norm(a, axis=-1, keepdims=True).clip(1e-6)
    bn = bb / jnp.linalg.norm(bb, axis=-1, keepdims=True).clip(1e-6)
    sim = jnp.einsum("bid,bjd->bij", an, bn, preferred_element_type=jnp.float32)
    best = jnp.max(sim, axis=-1)  # [B, Na]
    partner = jnp.argmax(sim, axis=-1).astype(jnp.int32)  # [B, Na]
    order = jnp.argsort(-jax.lax.stop_gradient(best), axis=-1).astype(jnp.int32)
    src, keep = order[:, :r], order[:, r:]  # merged A tokens / A tokens that stay
    dst = jnp.take_along_axis(partner, src, axis=1)  # [B, r] their B partners
    # size-weighted average: every token starts with size 1
    onehot = jax.nn.one_hot(dst, nb, dtype=x.dtype)  # [B, r, Nb]
    a_src = jnp.take_along_axis(a, src[..., None], axis=1)  # [B, r, D]
    summed = bb + jnp.einsum("brj,brd->bjd", onehot, a_src)
    size = 1.0 + onehot.sum(1)  # [B, Nb]
    b_new = summed / size[..., None]
    a_keep = jnp.take_along_axis(a, keep[..., None], axis=1)  # [B, Na - r, D]
    merged = jnp.concatenate([x[:, :prefix], a_keep, b_new], axis=1)
    # assignment of every patch to its row in `merged`
    base_b = prefix + na - r
    row_a = jnp.zeros((b, na), jnp.int32)
    row_a = jax.vmap(lambda ra, k, s, dd: ra.at[k].set(prefix + jnp.arange(na - r, dtype=jnp.int32))
                     .at[s].set(base_b + dd))(row_a, keep, src, dst)
    row_b = jnp.broadcast_to(base_b + jnp.arange(nb, dtype=jnp.int32), (b, nb))
    assign = jnp.zeros((b, n_patch), jnp.int32).at[:, 0::2].set(row_a).at[:, 1::2].set(row_b)
    sizes = jnp.concatenate([jnp.ones((b, prefix + na - r), jnp.float32),
                             size.astype(jnp.float32)], axis=1)
    return merged, assign, sizes


def unmerge(merged: jax.Array, assign: jax.Array, prefix: int = 1) -> jax.Array:
    """``merged [B, N', D]`` + ``assign [B, P]`` -> ``[B, prefix + P, D]`` on the full grid."""
    full = jnp.take_along_axis(merged, assign[..., None], axis=1)
    return jnp.concatenate([merged[:, :prefix], full], axis=1)
