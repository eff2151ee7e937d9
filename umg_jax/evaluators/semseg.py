"""Open-vocabulary semantic segmentation without training: per-pixel argmax over the class-text
embeddings of the dense features, bilinearly upsampled to the image; mIoU and pixel accuracy
(conventions in ``metrics.py``). Ground truth: ``mask_class`` of ``segmap``, -1 = ignored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from umg_jax.evaluators import metrics
from umg_jax.evaluators.common import Evaluator


def semantic_target(segmap: np.ndarray, mask_class: np.ndarray) -> np.ndarray:
    """``segmap [B, H, W]`` (mask index, -1) + ``mask_class [B, M]`` -> ``[B, H, W]`` class, -1."""
    idx = np.clip(segmap, 0, None)
    cls = np.take_along_axis(mask_class, idx.reshape(len(idx), -1), 1).reshape(segmap.shape)
    return np.where(segmap >= 0, cls, -1)


def predict_labels(dense_emb: np.ndarray, text: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[B, gh, gw, E]`` x ``[C, E]`` -> ``[B, H, W]`` int32 argmax of the upsampled logits."""
    logits = jnp.einsum("bhwe,ce->bhwc", jnp.asarray(dense_emb), jnp.asarray(text))
    up = jax.image.resize(logits, (logits.shape[0], *size, logits.shape[-1]), "bilinear")
    return np.asarray(jnp.argmax(up, -1), np.int32)


class SemSeg(Evaluator):
    name = "semseg"
    needs = ("segmap", "mask_class")

    def compute(self, enc, batches):
        text = self.class_embeddings(enc)
        c = len(self.categories)
        cm = np.zeros((c, c), np.int64)
        for b in batches:
            gt = semantic_target(b["segmap"], b["mask_class"])
            pred = predict_labels(b["dense_emb"], text, gt.shape[1:])
            cm += metrics.confusion_matrix(pred, gt, c)
        s = metrics.semseg_scores(cm)
        return {"miou": s["miou"], "pixel_acc": s["pixel_acc"]}
