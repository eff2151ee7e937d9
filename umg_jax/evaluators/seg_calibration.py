"""Panoptic thresholds of a segmentation head, chosen on a validation split.

Mask2Former's published test thresholds (object 0.8, overlap 0.8) assume a classifier that is
confident on the objects it keeps. A head on a small or frozen backbone, or the FC-CLIP ensemble
that spreads a query's probability over more classes, rarely reaches 0.8, so every thing query
is dropped (PQ on things 0). The thresholds belong to the trained head: this module scores a
grid of them on a validation split (never the split that is reported) and keeps the best.

The objective is PQ on the head's training vocabulary only (``seen``): the held-out classes of a
zero-shot protocol must not inform any choice. Ties go to the higher thresholds (the grid is
walked from high to low and only a strictly better score replaces the best).

With the FC-CLIP ensemble, the same pass also chooses the semantic map's ``pixel_weight`` (how
much of the frozen backbone's per-pixel class distribution is mixed in,
``segmentation.fuse_pixels``) by mIoU on the seen classes, the pixels of held-out classes
ignored; ties go to the smaller weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import ml_collections as mlc
import numpy as np

from umg_jax.evaluators import metrics
from umg_jax.evaluators.common import DEFAULT_TEMPLATES, encode_batches
from umg_jax.evaluators.panoptic import panoptic_target
from umg_jax.evaluators.segmentation import (
    fuse_pixels,
    head_predictions,
    mask_logit_scale,
    panoptic_inference,
    pixel_log_probs,
    semantic_scores,
)
from umg_jax.evaluators.semseg import semantic_target

OBJECT_GRID = (0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)  # min class probability of a query
OVERLAP_GRID = (0.8, 0.65, 0.5)  # min fraction of its own mask a query keeps
PIXEL_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # ensemble: frozen per-pixel weight


def calibrate_thresholds(enc, decode, batches: Iterable[dict], categories: Sequence[str],
                         isthing: Sequence[bool], seen: Sequence[bool], cfg: mlc.ConfigDict,
                         templates: Sequence[str] = DEFAULT_TEMPLATES,
                         object_grid: Sequence[float] = OBJECT_GRID,
                         overlap_grid: Sequence[float] = OVERLAP_GRID,
                         pixel_grid: Sequence[float] = PIXEL_GRID) -> dict:
    """The ``(object_threshold, overlap_threshold)`` of the grid with the best PQ on the seen
    classes of ``batches`` (a validation split), for the variant the run uses (FC-CLIP ensemble
    when ``cfg.ensemble``, else the head alone); with the ensemble, also the ``pixel_weight`` of
    ``pixel_grid`` with the best mIoU on the seen classes.

    Arguments as :func:`umg_jax.evaluators.segmentation.evaluate_segmentation` (``decode``
    required). Returns ``{"object_threshold", "overlap_threshold", "variant", "objective":
    "pq_seen", "score", "num_images", "grid": [[object, overlap, pq_seen, pq], ...]}``, and
    with the ensemble ``"pixel_weight", "pixel_objective": "miou_seen", "pixel_score",
    "pixel_grid": [[weight, miou_seen], ...]``.
    """
    isthing = np.asarray(isthing, bool)
    seen = np.asarray(seen, bool)
    if not seen.any():
        raise ValueError("calibration needs at least one class of the head's training vocabulary")
    variant = "ensemble" if cfg.ensemble else "head"
    c = len(categories)
    text = np.asarray(enc.encode_text_labels(list(categories), tuple(templates)), np.float32)
    scale = mask_logit_scale(enc)
    grid = [(o, v) for o in object_grid for v in overlap_grid]
    accs = [metrics.PanopticAccumulator(c, isthing) for _ in grid]
    weights = tuple(sorted(pixel_grid)) if variant == "ensemble" else ()
    cms = [np.zeros((c, c), np.int64) for _ in weights]
    n = 0
    for b in encode_batches(enc, batches):
        hw = b["segmap"].shape[1:]
        mask_prob, probs = head_predictions(decode, b["image"], b["dense_emb"], text, hw, seen,
                                            cfg, scale, ensemble=variant == "ensemble")
        gt = None
        if weights:  # held-out classes' pixels are ignored: their labels inform nothing
            gt = semantic_target(b["segmap"], b["mask_class"])
            gt = np.where(np.isin(gt, np.nonzero(~seen)[0]), -1, gt)
        logp = pixel_log_probs(b["dense_emb"], text, scale, hw) if weights else None
        for i in range(len(mask_prob)):
            gseg, gcls = panoptic_target(b["segmap"][i], b["mask_valid"][i], b["mask_class"][i])
            for acc, (o, v) in zip(accs, grid, strict=True):
                acc.update(*panoptic_inference(probs[variant][i], mask_prob[i], isthing, o, v),
                           gseg, gcls)
            if weights:
                scores = semantic_scores(probs[variant][i], mask_prob[i])
                for cm, w in zip(cms, weights, strict=True):
                    sem = fuse_pixels(scores, logp[i], w).argmax(-1)
                    cm += metrics.confusion_matrix(sem, gt[i], c)
        n += len(mask_prob)
    if n == 0:
        raise ValueError("calibration split is empty")
    rows = [[o, v, acc.scores(seen)["pq"], acc.scores()["pq"]]
            for (o, v), acc in zip(grid, accs, strict=True)]
    best = rows[0]
    for r in rows[1:]:
        if r[2] > best[2]:
            best = r
    out = {"object_threshold": best[0], "overlap_threshold": best[1], "variant": variant,
           "objective": "pq_seen", "score": best[2], "num_images": n, "grid": rows}
    if weights:
        prow = []
        for w, cm in zip(weights, cms, strict=True):
            iou = metrics.semseg_scores(cm)["iou"]
            seen_iou = iou[seen]
            prow.append([w, float(np.nanmean(seen_iou)) if np.isfinite(seen_iou).any()
                         else float("nan")])
        pbest = prow[0]
        for r in prow[1:]:  # from the smallest weight up: only a strictly better one replaces
            if r[1] > pbest[1]:
                pbest = r
        out.update(pixel_weight=pbest[0], pixel_objective="miou_seen", pixel_score=pbest[1],
                   pixel_grid=prow)
    return out
