"""Metric cores of the evaluators: numpy, no model, accumulable over batches.

Conventions (documented because references differ):
- mIoU averages the IoU of the classes that occur in the ground truth or the prediction
  (union > 0) over the evaluated pixels; ignored pixels (ground truth < 0) count nowhere.
- PQ follows Kirillov et al. / the COCO panoptic API: a predicted and a ground-truth segment of the
  same category match when IoU > 0.5, where the predicted area overlapping unlabeled ground-truth
  pixels is left out of the union; an unmatched prediction more than half on unlabeled pixels is
  not a false positive (pixels on a crowd region of the prediction's own category count as
  unlabeled there; crowd segments are never matched nor missed). PQ / SQ / RQ are averaged over
  the categories that occur in the ground truth or the prediction, separately for things and
  stuff.
"""

from __future__ import annotations

import numpy as np


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
    """``logits [N, C]``, ``labels [N]`` int -> ``{k: fraction with the label in the top k}``."""
    if len(labels) == 0:
        raise ValueError("no labelled examples to score")
    order = np.argsort(-logits, axis=1)
    return {k: float(np.mean((order[:, :min(k, logits.shape[1])] == labels[:, None]).any(1)))
            for k in ks}


def retrieval_recall(img: np.ndarray, txt: np.ndarray, txt_to_img: np.ndarray,
                     ks=(1, 5, 10)) -> dict[str, float]:
    """Image <-> text recall@k with several captions per image.

    ``img [N, E]``, ``txt [M, E]`` (L2-normalised), ``txt_to_img [M]`` int: the image of each text.
    i2t: an image is a hit when any of its texts is among its k most similar texts; t2i: a text
    is a hit when its image is among its k most similar images.
    """
    sim = img @ txt.T  # [N, M]
    out = {}
    rank_t = np.argsort(-sim, axis=1)  # texts by similarity, per image
    rank_i = np.argsort(-sim.T, axis=1)  # images by similarity, per text
    for k in ks:
        owner = txt_to_img[rank_t[:, :k]]
        out[f"i2t_r{k}"] = float(np.mean((owner == np.arange(len(img))[:, None]).any(1)))
        out[f"t2i_r{k}"] = float(np.mean((rank_i[:, :k] == txt_to_img[:, None]).any(1)))
    return out


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64 counts (rows: ground truth, cols: prediction); ``gt < 0`` ignored."""
    keep = gt >= 0
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    if g.size and (g.max() >= num_classes or p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"class index out of range [0, {num_classes})")
    return np.bincount(g * num_classes + p, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def semseg_scores(cm: np.ndarray) -> dict[str, float]:
    """mIoU (classes with union > 0), pixel accuracy, and per-class IoU (NaN if absent)."""
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    total = cm.sum()
    return {"miou": float(np.nanmean(iou)) if (union > 0).any() else float("nan"),
            "pixel_acc": float(inter.sum() / total) if total else float("nan"),
            "iou": iou}


class PanopticAccumulator:
    """Sums of matched IoU, TP, FP, FN per category over images; :meth:`scores` gives PQ."""

    def __init__(self, num_classes: int, isthing: np.ndarray):
        self.isthing = np.asarray(isthing, bool)
        if self.isthing.shape != (num_classes,):
            raise ValueError(f"isthing has shape {self.isthing.shape}, expected ({num_classes},)")
        self.iou = np.zeros(num_classes)
        self.tp = np.zeros(num_classes, np.int64)
        self.fp = np.zeros(num_classes, np.int64)
        self.fn = np.zeros(num_classes, np.int64)

    def update(self, pred_seg: np.ndarray, pred_cls: dict[int, int], gt_seg: np.ndarray,
               gt_cls: dict[int, int], gt_crowd: dict[int, int] | None = None) -> None:
        """One image. ``pred_seg`` / ``gt_seg [H, W]`` int segment ids (``< 0`` = none /
        unlabeled); ``pred_cls`` / ``gt_cls``: segment id -> category. ``gt_crowd``: crowd
        segments of ``gt_seg`` (id -> category, not in ``gt_cls``): never matched nor missed,
        and, as in panopticapi, a prediction's pixels on a crowd region of its own category
        count like unlabeled ones in the false-positive test."""
        gt_crowd = gt_crowd or {}
        void = gt_seg < 0
        pairs, counts = np.unique(np.stack([gt_seg.ravel(), pred_seg.ravel()]), axis=1,
                                  return_counts=True)
        inter = {(int(g), int(p)): int(c) for (g, p), c in zip(pairs.T, counts, strict=True)}
        gt_area = {s: int((gt_seg == s).sum()) for s in gt_cls}
        pred_area = {s: int((pred_seg == s).sum()) for s in pred_cls}
        pred_void = {s: int((void & (pred_seg == s)).sum()) for s in pred_cls}
        gt_hit, pred_hit = set(), set()
        for (g, p), n in inter.items():
            if g < 0 or p < 0 or g not in gt_cls or p not in pred_cls:
                continue
            if gt_cls[g] != pred_cls[p]:
                continue
            union = gt_area[g] + pred_area[p] - pred_void[p] - n
            iou = n / union if union else 0.0
            if iou > 0.5:
                c = gt_cls[g]
                self.iou[c] += iou
                self.tp[c] += 1
                gt_hit.add(g)
                pred_hit.add(p)
        for g, c in gt_cls.items():
            if g not in gt_hit and gt_area[g] > 0:
                self.fn[c] += 1
        for p, c in pred_cls.items():
            if p in pred_hit or pred_area[p] == 0:
                continue
            on_crowd = sum(inter.get((g, p), 0) for g, cg in gt_crowd.items() if cg == c)
            if (pred_void[p] + on_crowd) / pred_area[p] > 0.5:
                continue  # mostly on unlabeled / same-class crowd pixels: not a false positive
            self.fp[c] += 1

    def scores(self, classes: np.ndarray | None = None) -> dict[str, float]:
        """PQ / SQ / RQ (all, things, stuff) averaged over the categories that occur, restricted
        to ``classes`` (bool ``[C]``) when given."""
        out = {}
        seen = (self.tp + self.fp + self.fn) > 0
        if classes is not None:
            seen = seen & np.asarray(classes, bool)
        denom = self.tp + 0.5 * self.fp + 0.5 * self.fn
        pq = np.where(seen, self.iou / np.maximum(denom, 1e-9), np.nan)
        sq = np.where(self.tp > 0, self.iou / np.maximum(self.tp, 1), 0.0)
        rq = np.where(seen, self.tp / np.maximum(denom, 1e-9), np.nan)
        for name, sel in (("", np.ones_like(seen)), ("_things", self.isthing),
                          ("_stuff", ~self.isthing)):
            m = seen & sel
            for key, arr in (("pq", pq), ("sq", sq), ("rq", rq)):
                out[key + name] = float(arr[m].mean()) if m.any() else float("nan")
        return out
