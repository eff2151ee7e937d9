"""Zero-shot image classification: the image embedding against prompt-ensembled class names.

The image-level label is the batch's ``label`` (category of the largest thing in the image, -1 =
none, those images are skipped). Since the label is always a thing, the candidates are the data
set's thing categories (``isthing``); stuff names would only add answers that are never right.
"""

from __future__ import annotations

import numpy as np

from umg_jax.evaluators import metrics
from umg_jax.evaluators.common import Evaluator


class ZeroShot(Evaluator):
    name = "zeroshot"
    needs = ("label",)

    def __init__(self, categories, isthing=None, templates=None):
        super().__init__(categories, *(() if templates is None else (templates,)))
        self.isthing = np.ones(len(self.categories), bool) if isthing is None \
            else np.asarray(isthing, bool)

    def compute(self, enc, batches):
        text = self.class_embeddings(enc)
        img = np.concatenate([b["img_emb"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches]).astype(np.int64)
        keep = labels >= 0
        if not keep.any():
            raise ValueError("zeroshot: no example has an image-level label (label >= 0)")
        logits = np.where(self.isthing[None], img[keep] @ text.T, -np.inf)
        acc = metrics.topk_accuracy(logits, labels[keep], (1, 5))
        return {"top1": acc[1], "top5": acc[5], "count": float(keep.sum())}
