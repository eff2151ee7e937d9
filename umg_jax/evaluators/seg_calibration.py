"""Panoptic thresholds of a segmentation head, chosen on a validation split.

Mask2Former's published test thresholds (object 0.8, overlap 0.8) assume a classifier that is
confident on the objects it keeps. A head on a small or frozen backbone, or the FC-CLIP ensemble
that spreads a query's probability over more classes, rarely reaches 0.8, so every thing query
is dropped (PQ on things 0). The thresholds belong to the trained head: this module scores a
grid of them on a validation split (never the split that is reported) and keeps the best.

The objective is PQ on the head's training vocabulary only (``seen``): the held-out classes of a
zero-shot protocol must not inform any choice. Ties go to the higher thresholds (the grid is
walked from high to low and only a strictly better score replaces the best).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import ml_collections as mlc
import numpy as np

from umg_jax.evaluators import metrics
from umg_jax.evaluators.common import DEFAULT_TEMPLATES, encode_batches
from umg_jax.evaluators.panoptic import panoptic_target
from umg_jax.evaluators.segmentation import head_predictions, mask_logit_scale, panoptic_inference

OBJECT_GRID = (0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)  # min class probability of a query
OVERLAP_GRID = (0.8, 0.65, 0.5)  # min fraction of its own mask a query keeps


def calibrate_thresholds(enc, decode, batches: Iterable[dict], categories: Sequence[str],
                         isthing: Sequence[bool], seen: Sequence[bool], cfg: mlc.ConfigDict,
                         templates: Sequence[str] = DEFAULT_TEMPLATES,
                         object_grid: Sequence[float] = OBJECT_GRID,
                         overlap_grid: Sequence[float] = OVERLAP_GRID) -> dict:
    """The ``(object_threshold, overlap_threshold)`` of the grid with the best PQ on the seen
    classes of ``batches`` (a validation split), for the variant the run uses (FC-CLIP ensemble
    when ``cfg.ensemble``, else the head alone).

    Arguments as :func:`umg_jax.evaluators.segmentation.evaluate_segmentation` (``decode``
    required). Returns ``{"object_threshold", "overlap_threshold", "variant", "objective":
    "pq_seen", "score", "num_images", "grid": [[object, overlap, pq_seen, pq], ...]}``.
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
    n = 0
    for b in encode_batches(enc, batches):
        hw = b["segmap"].shape[1:]
        mask_prob, probs = head_predictions(decode, b["image"], b["dense_emb"], text, hw, seen,
                                            cfg, scale, ensemble=variant == "ensemble")
        for i in range(len(mask_prob)):
            gseg, gcls = panoptic_target(b["segmap"][i], b["mask_valid"][i], b["mask_class"][i])
            for acc, (o, v) in zip(accs, grid, strict=True):
                acc.update(*panoptic_inference(probs[variant][i], mask_prob[i], isthing, o, v),
                           gseg, gcls)
        n += len(mask_prob)
    if n == 0:
        raise ValueError("calibration split is empty")
    rows = [[o, v, acc.scores(seen)["pq"], acc.scores()["pq"]]
            for (o, v), acc in zip(grid, accs, strict=True)]
    best = rows[0]
    for r in rows[1:]:
        if r[2] > best[2]:
            best = r
    return {"object_threshold": best[0], "overlap_threshold": best[1], "variant": variant,
            "objective": "pq_seen", "score": best[2], "num_images": n, "grid": rows}
