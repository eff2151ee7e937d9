"""Region classification: ground-truth boxes (RoIAlign) and masks (mask pooling) of the dense
embeddings, classified against the vocabulary; accuracy and mean per-class accuracy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from umg_jax.evaluators.common import Evaluator, normalize
from umg_jax.ops.mask_pool import mask_pool
from umg_jax.ops.roi_align import roi_pool_embed


def _accuracies(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[float, float]:
    acc = float(np.mean(pred == gt))
    per = [np.mean(pred[gt == c] == c) for c in range(num_classes) if (gt == c).any()]
    return acc, float(np.mean(per))


class Region(Evaluator):
    name = "region"
    needs = ("region_boxes", "region_valid", "region_class", "mask_area", "mask_valid",
             "mask_class")

    def __init__(self, categories, templates=None, roi_size: int = 2, sampling_ratio: int = 2):
        super().__init__(categories, *(() if templates is None else (templates,)))
        self.roi_size, self.sampling_ratio = roi_size, sampling_ratio

    def compute(self, enc, batches):
        text = self.class_embeddings(enc)
        out = {}
        for kind, pool in (("box", self._boxes), ("mask", self._masks)):
            preds, gts = [], []
            for b in batches:
                emb, valid, cls = pool(b)
                keep = valid & (cls >= 0)
                preds.append(np.argmax(normalize(emb[keep]) @ text.T, -1))
                gts.append(cls[keep])
            pred, gt = np.concatenate(preds), np.concatenate(gts)
            if gt.size == 0:
                continue
            out[f"{kind}_acc"], out[f"{kind}_mean_class_acc"] = _accuracies(
                pred, gt, len(self.categories))
            out[f"{kind}_count"] = float(gt.size)
        if not out:
            raise ValueError("region: no labelled box or mask (region_class / mask_class >= 0)")
        return out

    def _boxes(self, b):
        emb = roi_pool_embed(jnp.asarray(b["dense_emb"]), jnp.asarray(b["region_boxes"]),
                             self.roi_size, self.sampling_ratio)
        return np.asarray(emb), b["region_valid"].astype(bool), b["region_class"]

    def _masks(self, b):
        emb = mask_pool(jnp.asarray(b["dense_emb"]), jnp.asarray(b["mask_area"]))
        return np.asarray(emb), b["mask_valid"].astype(bool), b["mask_class"]
