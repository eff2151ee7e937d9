"""The weight-free teachers: selective-search style proposals, scored by a umg_jax model.

For users with no detector or SAM (``pseudo_label``'s proposals as backends):
- ``ProposalDetector`` (detect): class-agnostic proposals (Felzenszwalb segments merged
  hierarchically, plus sliding windows) labelled by a umg_jax training workdir or CLIP import
  directory (``"model"``), pooling its dense embeddings under each box (RoIAlign) and scoring
  them against the image's queries. Box precision is low (0.05 on the synthetic world, see the
  README); a real detector (owlv2, grounding_dino) is the better teacher.
  Options: ``max_boxes`` (64, proposals scored per image).
- ``ProposalSegmenter`` (segment): a box's mask is the union of the Felzenszwalb superpixels
  lying mostly inside it (no weights); stuff concepts pick their best proposal mask by the
  teacher's mask pooling (needs ``"model"``). Options: ``inside`` (0.5, fraction of a superpixel
  inside the box for it to join), ``scale`` (32, Felzenszwalb scale: smaller = finer).
"""

from __future__ import annotations

import numpy as np

from umg_jax.data.annotate.backend import AnnotateError, Detector, Segmenter


def _teacher(model: str):
    from umg_jax.inference import InputError, load

    try:
        return load(model)
    except InputError as e:
        raise AnnotateError(f"proposals: {model}: {e}") from None


class _Scored:
    """A umg_jax teacher's ``pseudo_label.Scorer``, rebuilt only when the label set changes
    (its text side is encoded once per set)."""

    def __init__(self, teacher, max_boxes: int, max_masks: int):
        self.teacher, self.max_boxes, self.max_masks, self._scorer = (
            teacher, max_boxes, max_masks, None)

    def __call__(self, names: list[str]):
        from umg_jax.data.pseudo_label import Scorer

        if self._scorer is None or self._scorer.vocab != names:
            self._scorer = Scorer(self.teacher, names, max_boxes=self.max_boxes,
                                  max_masks=self.max_masks)
        return self._scorer


class ProposalDetector(Detector):
    family = "proposals"

    def __init__(self, model: str | None, device: str = "cpu", *, max_boxes: int = 64):
        super().__init__(model, device)
        if not model:
            raise AnnotateError("proposals: the recipe entry needs \"model\": a umg_jax "
                                "workdir or import directory (the teacher that labels them)")
        self.teacher = _teacher(model)
        self.max_boxes = max_boxes
        self._scorer_for = _Scored(self.teacher, max_boxes, 1)

    def detect(self, images: list[np.ndarray], queries: list[list[str]], threshold: float
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        from umg_jax.data.pseudo_label import mask_box, mask_proposals, window_proposals

        empty = (np.zeros((0, 4), np.float32), np.zeros((0,), np.int32),
                 np.zeros((0,), np.float32))
        names = sorted({q for qs in queries for q in qs})
        if not names:
            return [empty for _ in images]
        props = []
        for im in images:
            masks = mask_proposals(im)
            boxes = np.concatenate([np.asarray([mask_box(m) for m in masks], np.float32)
                                    .reshape(-1, 4), window_proposals(*im.shape[:2])])
            props.append(boxes[: self.max_boxes])
        scored = self._scorer_for(names).score(images, props, [np.zeros((0,))] * len(images))
        out = []
        for boxes, qs, (_, box_probs, _, _) in zip(props, queries, scored, strict=True):
            if not qs or not len(boxes):
                out.append(empty)
                continue
            p = box_probs[:, [names.index(q) for q in qs]]
            p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)  # over this image's queries
            lab, sc = p.argmax(-1), p.max(-1)
            keep = sc >= threshold
            out.append((boxes[keep].astype(np.float32), lab[keep].astype(np.int32),
                        sc[keep].astype(np.float32)))
        return out


class ProposalSegmenter(Segmenter):
    family = "proposals"

    def __init__(self, model: str | None = None, device: str = "cpu", *, inside: float = 0.5,
                 scale: float = 32.0, max_masks: int = 24):
        super().__init__(model, device)
        if not 0.0 < inside <= 1.0:
            raise AnnotateError(f"proposals: inside={inside!r} must be in (0, 1]")
        self.inside, self.scale, self.max_masks = float(inside), float(scale), max_masks
        self._scorer_for = _Scored(_teacher(model), 1, max_masks) if model else None

    def segment(self, images: list[np.ndarray], boxes: list[np.ndarray]
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Mask = union of the superpixels with >= ``inside`` of their area in the box (the
        box's largest superpixel when none is); score = fraction of the box the mask covers."""
        from skimage.segmentation import felzenszwalb

        out = []
        for im, bb in zip(images, boxes, strict=True):
            h, w = im.shape[:2]
            masks = np.zeros((len(bb), h, w), bool)
            scores = np.zeros((len(bb),), np.float32)
            if len(bb):
                lab = felzenszwalb(im, scale=self.scale, sigma=0.5, min_size=4)
                size = np.bincount(lab.ravel())
            for k, (x0, y0, x1, y1) in enumerate(np.asarray(bb, np.float32)):
                xa, ya = int(np.clip(np.floor(x0), 0, w - 1)), int(np.clip(np.floor(y0), 0, h - 1))
                xb, yb = int(np.clip(np.ceil(x1), xa + 1, w)), int(np.clip(np.ceil(y1), ya + 1, h))
                inner = np.bincount(lab[ya:yb, xa:xb].ravel(), minlength=len(size))
                frac = inner / np.maximum(size, 1)
                take = frac >= self.inside
                if not take.any():
                    take[np.argmax(inner)] = True
                box = np.zeros((h, w), bool)
                box[ya:yb, xa:xb] = True
                masks[k] = take[lab] & box
                scores[k] = masks[k].sum() / max(box.sum(), 1)
            out.append((masks, scores))
        return out

    def segment_concepts(self, images: list[np.ndarray], concepts: list[list[str]],
                         threshold: float) -> list[list[tuple[int, np.ndarray, float]]]:
        """Each concept's most probable proposal mask (teacher mask pooling, probabilities over
        the image's concepts), kept when its probability reaches ``threshold``."""
        from umg_jax.data.pseudo_label import mask_proposals

        if self._scorer_for is None:
            raise AnnotateError("proposals: concept masks need \"model\" (a umg_jax teacher)")
        names = sorted({c for cs in concepts for c in cs})
        if not names:
            return [[] for _ in images]
        props = [mask_proposals(im, max_masks=self.max_masks) for im in images]
        scored = self._scorer_for(names).score(
            images, [np.zeros((0, 4), np.float32)] * len(images), props)
        out = []
        for cs, masks, (_, _, mask_probs, _) in zip(concepts, props, scored, strict=True):
            found = []
            if cs and len(masks):
                p = mask_probs[:, [names.index(c) for c in cs]]
                p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
                for j in range(len(cs)):
                    i = int(np.argmax(p[:, j]))
                    if p[i, j] >= threshold:
                        found.append((j, masks[i].astype(bool), float(p[i, j])))
            out.append(found)
        return out
