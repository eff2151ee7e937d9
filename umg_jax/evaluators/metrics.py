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

import math

import numpy as np


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
    """``logits [N, C]``, ``labels [N]`` int -> ``{k: fraction with the label in the top k}``."""
    if len(labels) == 0:
        raise ValueError("no labelled examples to score")
    order = np.argsort(-logits, axis=1)
    return {k: float(np.mean((order[:, :min(k, logits.shape[1])] == labels[:, None]).any(1)))
            for k in ks}


def retrieval_recall(img: np.ndarray, txt: np.ndarray, txt_to_img: np.ndarray,
                     ks=(1, 5, 10), txt_id: np.ndarray | None = None) -> dict[str, float]:
    """Image <-> text recall@k with several captions per image, defined for ties.

    ``img [N, E]``, ``txt [M, E]`` (L2-normalised), ``txt_to_img [M]`` int: the image of each
    text; ``txt_id [M]`` int (optional): texts with the same id are the same text (e.g. the same
    caption written for two images), which must have bit-identical embeddings (encode each
    distinct text once); default: every text is its own.

    i2t: the queries are the images that own a text; the gallery the distinct texts (a text
    written for several images is one gallery item, correct for each of them); a query is a hit
    when a correct text is among its k most similar. t2i: the queries are the M texts; the
    gallery the N images (images without a text are distractors); a hit when the text's image is
    among its k most similar.

    Ties: a query scores the expected hit over all orders of the items tied with its best correct
    item (McSherry & Najork, ECIR 2008): with ``a`` items strictly more similar than it and
    ``w`` wrong and ``c`` correct items at exactly its similarity, the hit at k is 0 if
    ``a >= k``, else ``1 - C(w, r) / C(w + c, r)`` with ``r = k - a``. A ranking by sort order
    (``topk`` / ``argsort``, as CLIP_benchmark does) resolves such ties by index or by float noise
    instead; the optimistic rule (a tie counts as a hit) scores a constant model 1, the
    pessimistic one 0: the expectation scores it at chance. Similarities are float64 dot products
    of the embeddings, in fixed chunks of queries against the whole gallery.
    """
    img = np.asarray(img)
    txt = np.asarray(txt)
    txt_to_img = np.asarray(txt_to_img)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"img {img.shape} and txt {txt.shape} must be [N, E] and [M, E]")
    if txt_to_img.shape != (len(txt),) or not np.issubdtype(txt_to_img.dtype, np.integer):
        raise ValueError(f"txt_to_img must be [M={len(txt)}] int, got {txt_to_img.shape} "
                         f"{txt_to_img.dtype}")
    if len(txt) == 0 or len(img) == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if txt_to_img.min() < 0 or txt_to_img.max() >= len(img):
        raise ValueError(f"txt_to_img holds image indices outside [0, {len(img)})")
    if not (np.isfinite(img).all() and np.isfinite(txt).all()):
        raise ValueError("retrieval embeddings hold NaN or inf")
    if txt_id is None:
        txt_id = np.arange(len(txt))
    txt_id = np.asarray(txt_id)
    if txt_id.shape != (len(txt),):
        raise ValueError(f"txt_id must be [M={len(txt)}], got {txt_id.shape}")
    _, first, group = np.unique(txt_id, return_index=True, return_inverse=True)
    group = group.reshape(-1)
    gallery = txt[first]  # [U, E] one row per distinct text
    if not np.array_equal(gallery[group], txt):
        raise ValueError("texts with the same txt_id have different embeddings: encode each "
                         "distinct text once")
    img64, gal64 = img.astype(np.float64), gallery.astype(np.float64)
    # i2t: image q's correct gallery items are the distinct texts written for it
    owner = np.zeros((len(img), len(gallery)), bool)
    owner[txt_to_img, group] = True
    queries = np.nonzero(owner.any(1))[0]
    i2t = np.concatenate([_tie_hits(img64[q] @ gal64.T, owner[q], ks)
                          for q in np.array_split(queries, _chunks(len(queries)))])
    # t2i, per distinct text (a text's similarities do not depend on its duplicates)
    t2i = np.zeros((len(txt), len(ks)))
    for u in np.array_split(np.arange(len(gallery)), _chunks(len(gallery))):
        rows = np.nonzero(np.isin(group, u))[0]
        correct = np.zeros((len(rows), len(img)), bool)
        correct[np.arange(len(rows)), txt_to_img[rows]] = True
        sim = (gal64[u] @ img64.T)[np.searchsorted(u, group[rows])]
        t2i[rows] = _tie_hits(sim, correct, ks)
    out = {}
    for n, k in enumerate(ks):
        out[f"i2t_r{k}"] = float(i2t[:, n].mean())
        out[f"t2i_r{k}"] = float(t2i[:, n].mean())
    return out


def _chunks(n: int, size: int = 512) -> int:
    """How many query chunks of at most ``size`` (bounds the ``[chunk, gallery]`` matrices)."""
    return max(1, -(-n // size))


def _tie_hits(sim: np.ndarray, correct: np.ndarray, ks) -> np.ndarray:
    """``[Q, len(ks)]`` expected hits of ``Q`` queries (``sim [Q, G]``, ``correct [Q, G]`` bool,
    one correct item at least per query) over the orders of the items tied with each query's
    best correct item (see :func:`retrieval_recall`)."""
    best = np.where(correct, sim, -np.inf).max(1, keepdims=True)
    above = (sim > best).sum(1)  # all wrong: best is the highest correct similarity
    tied = sim == best
    wrong, right = (tied & ~correct).sum(1), (tied & correct).sum(1)
    out = np.zeros((len(sim), len(ks)))
    for n, k in enumerate(ks):
        r = k - above
        out[:, n] = (r > wrong).astype(np.float64)  # every tied order puts a correct one in
        for q in np.nonzero((r > 0) & (r <= wrong))[0]:  # some orders do not
            total = math.comb(int(wrong[q] + right[q]), int(r[q]))
            out[q, n] = (total - math.comb(int(wrong[q]), int(r[q]))) / total
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
