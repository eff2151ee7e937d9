"""Mask-classification loss of the segmentation head (Mask2Former recipe, no point sampling).

Per image: the ground-truth segments (``segmap`` at the decoder's resolution) are matched
one-to-one to queries by the cost ``w_class * -p(class) + w_bce * BCE + w_dice * dice``; matched
queries learn their segment's mask (sigmoid BCE + dice) and class, unmatched queries learn
"void" (class loss weighted by ``void_weight``), except, with ``seg.unlabeled_not_void``, those
whose mask lies mostly on unlabeled pixels: they get no class loss.

Matching is greedy (repeatedly take the cheapest remaining query/segment pair), in jnp with
static shapes, so it runs inside the jitted, sharded step on any accelerator with no host
round trip. With M <= 8 segments and well-separated costs it equals the Hungarian optimum; the
test suite measures how often it does on random costs (scipy's ``linear_sum_assignment``).

Segments of classes outside the training vocabulary (``class_map == -1``, the held-out
categories of a zero-shot protocol) are not targets and their pixels are ignored in the mask
terms: the head is neither taught them nor penalised for finding them (nor, with
``seg.unlabeled_not_void``, taught to call what it finds there "void").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc

from umg_jax.models.mask_decoder import class_logits


def targets_at(segmap: jax.Array, stride: int) -> jax.Array:
    """``segmap [B, H, W] int32`` -> ``[B, H / s, W / s]``: the mask index at each cell centre
    (nearest sampling keeps targets hard and ignore labels exact)."""
    o = stride // 2
    return segmap[:, o::stride, o::stride]


def pairwise_costs(logits: jax.Array, target: jax.Array, weight: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """Mean sigmoid-BCE and dice loss of every prediction against every target.

    ``logits [N, P]``, ``target [M, P]`` in {0, 1}, ``weight [P]`` (0 = ignored pixel)
    -> ``bce [N, M]``, ``dice [N, M]`` float32.
    """
    wsum = jnp.maximum(weight.sum(), 1.0)
    pos = jax.nn.softplus(-logits)  # -log sigmoid(x)
    neg = jax.nn.softplus(logits)  # -log (1 - sigmoid(x))
    bce = ((pos * weight) @ target.T + (neg * weight) @ (1.0 - target).T) / wsum
    p = jax.nn.sigmoid(logits) * weight
    inter = p @ target.T
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(-1)[:, None] + (target * weight).sum(-1)[None] + 1.0)
    return bce, dice


def greedy_match(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """``cost [N, M]``, ``valid [M]`` -> ``match [M] int32``: the query matched to each valid
    target, -1 for invalid targets (or when N < number of valid targets)."""
    n, m = cost.shape
    big = jnp.float32(1e30)
    c = jnp.where(valid[None], cost, big)

    def body(_, carry):
        c, match = carry
        k = jnp.argmin(c)
        qi, ti = k // m, k % m
        ok = c[qi, ti] < big
        match = jnp.where(ok, match.at[ti].set(qi), match)
        c = jnp.where(ok, c.at[qi].set(big).at[:, ti].set(big), c)
        return c, match

    _, match = jax.lax.fori_loop(0, m, body, (c, jnp.full((m,), -1, jnp.int32)))
    return match


def seg_loss(out: dict[str, jax.Array], text: jax.Array, batch: dict[str, jax.Array],
             class_map: jax.Array, cfg: mlc.ConfigDict) -> tuple[jax.Array, dict]:
    """Total loss and metrics of the decoder outputs on a batch.

    ``out``: ``MaskDecoder`` outputs (``mask_logits [B, N, h, w]``); ``text [C, E]`` the training
    vocabulary's normalised text embeddings; ``batch``: ``segmap [B, H, W]``, ``mask_valid
    [B, M]``, ``mask_class [B, M]`` (data-set category, -1 none); ``class_map [K] int32`` data-set
    category -> training-vocabulary index, -1 = held out.
    """
    logits_m = out["mask_logits"].astype(jnp.float32)
    b, n, h, w = logits_m.shape
    c = text.shape[0]
    seg = targets_at(batch["segmap"], int(cfg.mask_stride)).reshape(b, h * w)
    m = batch["mask_valid"].shape[1]
    cls_ds = batch["mask_class"]
    cls = jnp.where(cls_ds >= 0, class_map[jnp.clip(cls_ds, 0, None)], -1)  # [B, M]
    keep = batch["mask_valid"].astype(bool) & (cls >= 0)  # [B, M] targets
    onehot = (seg[:, None, :] == jnp.arange(m)[None, :, None]).astype(jnp.float32)  # [B, M, P]
    # Pixels that are unlabeled or belong to held-out / invalid segments carry no mask loss.
    weight = jnp.einsum("bmp,bm->bp", onehot, keep.astype(jnp.float32))
    logits_c = class_logits(out, text)  # [B, N, C + 1]
    logp = jax.nn.log_softmax(logits_c, -1)
    flat = logits_m.reshape(b, n, h * w)

    def one(flat_i, tgt_i, w_i, logp_i, cls_i, keep_i):
        bce, dice = pairwise_costs(flat_i, tgt_i, w_i)
        p_cls = jnp.exp(jnp.take(logp_i, jnp.clip(cls_i, 0, None), axis=1))  # [N, M]
        cost = cfg.w_class * -p_cls + cfg.w_bce * bce + cfg.w_dice * dice
        match = greedy_match(jax.lax.stop_gradient(cost), keep_i)
        ok = match >= 0
        q = jnp.clip(match, 0, None)
        bce_m = jnp.where(ok, bce[q, jnp.arange(m)], 0.0).sum()
        dice_m = jnp.where(ok, dice[q, jnp.arange(m)], 0.0).sum()
        # Class target per query: the matched segment's class, else void (index C).
        tgt = jnp.full((n,), c, jnp.int32).at[jnp.where(ok, q, n)].set(
            jnp.where(ok, cls_i, c), mode="drop")
        return bce_m, dice_m, ok.sum(), tgt

    bce_s, dice_s, n_match, tgt = jax.vmap(one)(flat, onehot, weight, logp, cls, keep)
    n_match = jnp.maximum(n_match.sum(), 1)
    ce = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]  # [B, N]
    cw = jnp.where(tgt == c, cfg.void_weight, 1.0)
    if cfg.get("unlabeled_not_void", False):
        # An unmatched query whose mask lies mostly on pixels without a training label (a
        # held-out class, an unannotated object) may have found something real: teaching it
        # "void" would teach the head to reject every class it was not trained on.
        prob = jax.nn.sigmoid(jax.lax.stop_gradient(flat))  # [B, N, P]
        area = prob.sum(-1)  # [B, N] soft mask area, pixels
        frac = jnp.einsum("bnp,bp->bn", prob, 1.0 - weight) / jnp.maximum(area, 1e-6)
        # (an empty mask, under one pixel of area, finds nothing: it stays "void")
        cw = jnp.where((tgt == c) & (frac > 0.5) & (area >= 1.0), 0.0, cw)
    loss_class = (ce * cw).sum() / jnp.maximum(cw.sum(), 1e-6)
    loss_bce = bce_s.sum() / n_match
    loss_dice = dice_s.sum() / n_match
    total = cfg.w_class * loss_class + cfg.w_bce * loss_bce + cfg.w_dice * loss_dice
    fg = tgt < c
    acc = jnp.where(fg, jnp.argmax(logits_c, -1) == tgt, False).sum() / jnp.maximum(fg.sum(), 1)
    return total, {"loss_class": loss_class, "loss_bce": loss_bce, "loss_dice": loss_dice,
                   "acc_matched": acc, "matched_per_image": n_match / b}
