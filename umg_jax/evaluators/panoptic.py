"""Panoptic quality from given masks + open-vocabulary labels.

The masks are the ground-truth segments (``segmap`` / ``mask_*``; "oracle masks", as in
open-vocabulary panoptic evaluations that isolate recognition from mask proposal): each is
classified by its mask-pooled dense embedding against the vocabulary; masks whose predicted
category is *stuff* are merged per category (stuff has no instances), things stay instances.
The prediction is then scored against the ground truth with PQ / SQ / RQ (``metrics.py``).
A mask decoder's own proposals can be scored with the same ``metrics.PanopticAccumulator``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from umg_jax.evaluators import metrics
from umg_jax.evaluators.common import Evaluator, normalize
from umg_jax.ops.mask_pool import mask_pool


def merge_stuff(pred_cls: np.ndarray, isthing: np.ndarray) -> np.ndarray:
    """``pred_cls [M]`` -> segment id per mask: things keep their index, masks predicted as the
    same stuff category share the id of the first of them."""
    ids = np.arange(len(pred_cls))
    first: dict[int, int] = {}
    for m, c in enumerate(pred_cls):
        if not isthing[c]:
            ids[m] = first.setdefault(int(c), m)
    return ids


def panoptic_target(segmap: np.ndarray, valid: np.ndarray, mask_class: np.ndarray
                    ) -> tuple[np.ndarray, dict[int, int]]:
    """One image's ground truth: ``segmap [H, W]`` (mask index, -1), ``valid [M]``,
    ``mask_class [M]`` -> ``(gt_seg [H, W]`` (-1 where unlabeled or not a valid, classed mask),
    ``{mask index: category}``)."""
    ok = valid.astype(bool) & (mask_class >= 0)
    keep = np.nonzero(ok)[0]
    gt_seg = np.where(np.isin(segmap, keep), segmap, -1)
    return gt_seg, {int(m): int(mask_class[m]) for m in keep}


class Panoptic(Evaluator):
    name = "panoptic"
    needs = ("segmap", "mask_area", "mask_valid", "mask_class")

    def __init__(self, categories, isthing, templates=None):
        super().__init__(categories, *(() if templates is None else (templates,)))
        self.isthing = np.asarray(isthing, bool)
        if len(self.isthing) != len(self.categories):
            raise ValueError("panoptic: isthing must have one entry per category")

    def compute(self, enc, batches):
        text = self.class_embeddings(enc)
        acc = metrics.PanopticAccumulator(len(self.categories), self.isthing)
        for b in batches:
            emb = np.asarray(mask_pool(jnp.asarray(b["dense_emb"]), jnp.asarray(b["mask_area"])))
            pred_all = np.argmax(normalize(emb) @ text.T, -1)
            for i in range(len(emb)):
                gt_seg, gt_cls = panoptic_target(b["segmap"][i], b["mask_valid"][i],
                                                 b["mask_class"][i])
                ids = merge_stuff(pred_all[i], self.isthing)
                pred_seg = np.where(gt_seg >= 0, ids[np.clip(gt_seg, 0, None)], -1)
                pred_cls = {int(ids[m]): int(pred_all[i, m]) for m in gt_cls}
                acc.update(pred_seg, pred_cls, gt_seg, gt_cls)
        return acc.scores()
