"""Semantic + panoptic segmentation from predicted masks (the mask-decoder head), and the
training-free frozen-backbone baseline, scored with mIoU and PQ on all / seen / unseen classes.

Three predictors, one evaluation pass (``evaluate_segmentation``):

* ``free``: no trained parameters. Semantic map = per-pixel argmax of the frozen dense
  embeddings against the vocabulary; panoptic = that map's connected components for thing
  classes, one segment per stuff class (no ground-truth masks are used, unlike ``panoptic.py``'s
  oracle-mask evaluation).
* ``head``: the decoder's queries, classified by their own class embeddings (Mask2Former
  semantic / panoptic inference).
* ``ensemble``: the decoder's masks, classified by the geometric ensemble of the head's
  probabilities with the frozen backbone's mask-pooled ones (FC-CLIP): ``p_in^(1-a) p_out^a`` on
  classes seen in training, ``p_in^(1-b) p_out^b`` on unseen ones. Its semantic map also mixes
  in the frozen backbone's own per-pixel class probabilities (``seg.pixel_weight``,
  :func:`fuse_pixels`): the head's masks are never taught the pixels of held-out classes (they
  are ignored in its loss), while the frozen map labels every pixel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from scipy import ndimage

from umg_jax.evaluators import metrics
from umg_jax.evaluators.common import DEFAULT_TEMPLATES, encode_batches, normalize
from umg_jax.evaluators.panoptic import panoptic_target
from umg_jax.evaluators.semseg import predict_labels, semantic_target
from umg_jax.ops.mask_pool import mask_pool

VARIANTS = ("free", "head", "ensemble")


def ensemble_probs(head_logits: np.ndarray, frozen_logits: np.ndarray, seen: np.ndarray,
                   alpha: float, beta: float) -> np.ndarray:
    """``head_logits [..., C + 1]`` (last = void), ``frozen_logits [..., C]``, ``seen [C]`` bool
    -> ``[..., C + 1]`` probabilities: the classes' geometric ensemble, renormalised, scaled by
    ``1 - p(void)`` of the head (FC-CLIP's formula)."""
    p_void = jax.nn.softmax(head_logits, -1)[..., -1:]
    p_in = jax.nn.softmax(head_logits[..., :-1], -1)
    p_out = jax.nn.softmax(frozen_logits, -1)
    a = np.where(seen, alpha, beta)
    log = (1 - a) * jnp.log(p_in + 1e-8) + a * jnp.log(p_out + 1e-8)
    return np.asarray(jnp.concatenate([jax.nn.softmax(log, -1) * (1 - p_void), p_void], -1))


def semantic_scores(probs: np.ndarray, mask_prob: np.ndarray) -> np.ndarray:
    """``probs [..., N, C + 1]``, ``mask_prob [..., N, H, W]`` -> ``[..., H, W, C]`` float32
    Mask2Former's semantic scores ``sum_q p(q, c) * mask(q)`` (void excluded)."""
    return np.einsum("...nc,...nhw->...hwc", probs[..., :-1], mask_prob).astype(np.float32)


def pixel_log_probs(dense_emb: np.ndarray, text: np.ndarray, scale: float,
                    size: tuple[int, int]) -> np.ndarray:
    """The frozen backbone's per-pixel class log-probabilities: ``dense_emb [B, gh, gw, E]`` x
    ``text [C, E]`` (both normalised) at ``scale``, logits resized bilinearly to ``size`` ->
    ``[B, H, W, C]`` float32 log-softmax over classes."""
    logits = scale * jnp.einsum("bhwe,ce->bhwc", jnp.asarray(dense_emb), jnp.asarray(text))
    up = jax.image.resize(logits, (logits.shape[0], *size, logits.shape[-1]), "bilinear")
    return np.asarray(jax.nn.log_softmax(up, -1), np.float32)


def fuse_pixels(scores: np.ndarray, pixel_logp: np.ndarray | None, weight: float) -> np.ndarray:
    """``scores [..., C]`` (:func:`semantic_scores`) mixed with ``pixel_logp [..., C]``
    (:func:`pixel_log_probs`): ``(1 - w) log(scores / sum_c scores) + w pixel_logp``, the
    head's per-pixel class distribution and the frozen one's, geometrically. ``weight`` 0 (or
    no ``pixel_logp``) returns ``scores`` unchanged (the argmax is Mask2Former's)."""
    if not weight or pixel_logp is None:
        return scores
    total = np.maximum(scores.sum(-1, keepdims=True), 1e-12)
    return ((1.0 - weight) * np.log(scores / total + 1e-8) + weight * pixel_logp
            ).astype(np.float32)


def pixel_weight(cfg: mlc.ConfigDict, ensemble: bool) -> float:
    """The frozen per-pixel weight of the semantic map: ``cfg.pixel_weight`` (the ``seg``
    section; runs configured before it have none: 0) for the ensemble, 0 for the head alone."""
    return float(cfg.get("pixel_weight", 0.0)) if ensemble else 0.0


def semantic_inference(probs: np.ndarray, mask_prob: np.ndarray,
                       pixel_logp: np.ndarray | None = None, weight: float = 0.0) -> np.ndarray:
    """``probs [N, C + 1]``, ``mask_prob [N, H, W]`` -> ``[H, W]`` int32 argmax over classes of
    :func:`semantic_scores`, fused with the frozen ``pixel_logp [H, W, C]`` at ``weight``
    (:func:`fuse_pixels`)."""
    return fuse_pixels(semantic_scores(probs, mask_prob), pixel_logp, weight
                       ).argmax(-1).astype(np.int32)


def keep_queries(probs: np.ndarray, object_threshold: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which queries ``probs [N, C + 1]`` (last = void) enter the panoptic merge: best class
    not void and its probability > ``object_threshold``. Returns ``(keep [N] bool, score [N],
    label [N])`` (best non-void class and its probability)."""
    score = probs[:, :-1].max(-1)
    label = probs[:, :-1].argmax(-1)
    keep = (probs.argmax(-1) < probs.shape[-1] - 1) & (score > object_threshold)
    return keep, score, label


def panoptic_inference(probs: np.ndarray, mask_prob: np.ndarray, isthing: np.ndarray,
                       object_threshold: float, overlap_threshold: float
                       ) -> tuple[np.ndarray, dict[int, int]]:
    """Mask2Former's panoptic merge: queries whose best non-void class beats
    ``object_threshold`` compete per pixel by ``score * mask``; a query keeps the pixels it wins
    if they are at least ``overlap_threshold`` of its own mask; stuff of one class is one segment.
    Returns ``(seg [H, W]`` ids, -1 = none, ``{id: class})``."""
    keep, score, label = keep_queries(probs, object_threshold)
    seg = np.full(mask_prob.shape[1:], -1, np.int32)
    classes: dict[int, int] = {}
    if not keep.any():
        return seg, classes
    qs = np.nonzero(keep)[0]
    winner = qs[(score[qs, None, None] * mask_prob[qs]).argmax(0)]
    stuff_id: dict[int, int] = {}
    for q in qs:
        own = mask_prob[q] >= 0.5
        region = (winner == q) & own
        if not own.any() or not region.any() or region.sum() / own.sum() < overlap_threshold:
            continue
        c = int(label[q])
        sid = int(q) if isthing[c] else stuff_id.setdefault(c, int(q))
        seg[region] = sid
        classes[sid] = c
    return seg, classes


def free_panoptic(sem: np.ndarray, isthing: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Training-free panoptic from a semantic map ``[H, W]``: each connected component
    (8-connected) of a thing class is an instance, each stuff class one segment."""
    seg = np.full(sem.shape, -1, np.int32)
    classes: dict[int, int] = {}
    nxt = 0
    for c in np.unique(sem):
        region = sem == c
        if isthing[c]:
            lab, n = ndimage.label(region, structure=np.ones((3, 3)))
            for k in range(1, n + 1):
                seg[lab == k] = nxt
                classes[nxt] = int(c)
                nxt += 1
        else:
            seg[region] = nxt
            classes[nxt] = int(c)
            nxt += 1
    return seg, classes


def mask_logit_scale(enc) -> float:
    """The backbone's learned scale for mask <-> text logits (CLIP's if it has no own one)."""
    key = "logit_scale_mask" if "logit_scale_mask" in enc.params else "logit_scale"
    return float(np.exp(min(float(enc.params[key]), enc.config.logit_scale_max)))


def head_predictions(decode, image: np.ndarray, dense_emb: np.ndarray, text: np.ndarray,
                     size: tuple[int, int], seen: np.ndarray, cfg: mlc.ConfigDict, scale: float,
                     ensemble: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The decoder on a batch: ``mask_prob [B, N, H, W]`` (sigmoid, upsampled to ``size``) and
    class probabilities ``{"head": [B, N, C + 1], "ensemble": [B, N, C + 1]}`` (the latter with
    the frozen backbone's mask-pooled ``dense_emb [B, gh, gw, E]`` logits at ``scale``)."""
    mask_logits, cls_logits = map(np.asarray, decode(image, dense_emb, text))
    bsz, n = mask_logits.shape[:2]
    up = jax.image.resize(jnp.asarray(mask_logits), (bsz, n, *size), "bilinear")
    mask_prob = np.asarray(jax.nn.sigmoid(up))
    probs = {"head": np.asarray(jax.nn.softmax(jnp.asarray(cls_logits), -1))}
    if ensemble:
        gh, gw = dense_emb.shape[1:3]
        area = jax.image.resize(jnp.asarray(mask_prob), (bsz, n, gh, gw), "linear")
        pooled = normalize(np.asarray(mask_pool(jnp.asarray(dense_emb), area)))
        probs["ensemble"] = ensemble_probs(cls_logits, scale * pooled @ text.T, seen,
                                           cfg.ensemble_alpha, cfg.ensemble_beta)
    return mask_prob, probs


def make_decode(config: mlc.ConfigDict):
    """Jitted ``decode(seg_params, image, dense, text) -> (mask_logits, class_logits)`` of the
    mask decoder (``config``: the full config); bind the params with ``functools.partial``."""
    from umg_jax.models.mask_decoder import MaskDecoder, class_logits

    decoder = MaskDecoder(config.seg, config.model.embed_dim)

    @jax.jit
    def run(p, image, dense, text):
        out = decoder.apply({"params": p}, image, dense)
        return out["mask_logits"], class_logits(out, text)

    return run


def _scores(cm: np.ndarray, acc: metrics.PanopticAccumulator, seen: np.ndarray) -> dict:
    s = metrics.semseg_scores(cm)
    iou = s["iou"]
    out = {"miou": s["miou"], "pixel_acc": s["pixel_acc"]}
    for name, sel in (("seen", seen), ("unseen", ~seen)):
        v = iou[sel]
        out[f"miou_{name}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    pq = acc.scores()
    out.update({k: pq[k] for k in ("pq", "sq", "rq", "pq_things", "pq_stuff")})
    if seen.any():
        out["pq_seen"] = acc.scores(seen)["pq"]
    if (~seen).any():
        out["pq_unseen"] = acc.scores(~seen)["pq"]
    return out


def evaluate_segmentation(enc, decode, batches: Iterable[dict], categories: Sequence[str],
                          isthing: Sequence[bool], seen: Sequence[bool], cfg: mlc.ConfigDict,
                          variants: Sequence[str] = VARIANTS,
                          templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict[str, float]:
    """``{"<variant>/<metric>": value}`` over ``batches``.

    ``enc``: the frozen backbone (``UMGModel`` protocol, ``evaluators/__init__.py``);
    ``decode(image [B, H, W, 3], dense [B, gh, gw, E], text [C, E]) -> (mask_logits
    [B, N, h, w], class_logits [B, N, C + 1])`` (:func:`make_decode`; ``None`` when only the
    ``free`` variant is asked for); ``seen [C]``: classes of the head's training vocabulary;
    ``cfg``: the ``seg`` config section (thresholds, ensemble exponents, ``pixel_weight``).
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown segmentation variants {unknown}; choose from {VARIANTS}")
    isthing = np.asarray(isthing, bool)
    seen = np.asarray(seen, bool)
    c = len(categories)
    text = np.asarray(enc.encode_text_labels(list(categories), tuple(templates)), np.float32)
    scale = mask_logit_scale(enc)
    cms = {v: np.zeros((c, c), np.int64) for v in variants}
    weight = pixel_weight(cfg, "ensemble" in variants)
    accs = {v: metrics.PanopticAccumulator(c, isthing) for v in variants}
    for b in encode_batches(enc, batches):
        gt = semantic_target(b["segmap"], b["mask_class"])
        hw = gt.shape[1:]
        preds: dict[str, list] = {}
        if "free" in variants:
            sem = predict_labels(b["dense_emb"], text, hw)
            preds["free"] = [(sem[i], *free_panoptic(sem[i], isthing)) for i in range(len(sem))]
        if {"head", "ensemble"} & set(variants):
            mask_prob, probs = head_predictions(
                decode, b["image"], b["dense_emb"], text, hw, seen, cfg, scale,
                ensemble="ensemble" in variants)
            logp = pixel_log_probs(b["dense_emb"], text, scale, hw) if weight else None
            for v in set(variants) & {"head", "ensemble"}:
                w = weight if v == "ensemble" else 0.0
                preds[v] = [(semantic_inference(probs[v][i], mask_prob[i],
                                                None if logp is None else logp[i], w),
                             *panoptic_inference(probs[v][i], mask_prob[i], isthing,
                                                 cfg.object_threshold, cfg.overlap_threshold))
                            for i in range(len(mask_prob))]
        for v, per_image in preds.items():
            for i, (sem, pseg, pcls) in enumerate(per_image):
                cms[v] += metrics.confusion_matrix(sem, gt[i], c)
                gseg, gcls = panoptic_target(b["segmap"][i], b["mask_valid"][i],
                                             b["mask_class"][i])
                accs[v].update(pseg, pcls, gseg, gcls)
    out = {}
    for v in variants:
        out.update({f"{v}/{k}": val for k, val in _scores(cms[v], accs[v], seen).items()})
    return out
