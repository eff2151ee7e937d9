"""The weight-free teachers: selective-search style proposals, scored by a umg_jax model.

For users with no detector or SAM (``pseudo_label``'s proposals as backends):
- ``ProposalDetector`` (detect): class-agnostic proposals (Felzenszwalb segments merged
  hierarchically, plus sliding windows) labelled by a umg_jax training workdir or CLIP import
  directory (``"model"``), pooling its dense embeddings under each box (RoIAlign) and scoring
  them against the image's queries (or encoding each crop: ``score``). Box precision is low
  (0.05-0.09 on the synthetic world, see the README); a real detector (owlv2, grounding_dino) is
  the better teacher.
  Options: ``max_boxes`` (64, proposals scored per image), ``score`` ("dense": pool the
  teacher's dense map, fast; "crop": the teacher's image embedding of each crop, better for an
  image-level teacher), ``assign`` ("concept": each query picks the proposals relatively best
  for it, score = p / the query's best p, so background-like queries cannot take every box;
  "proposal": each proposal takes its most probable query). The stage's ``threshold`` applies to
  that score.
- ``ProposalSegmenter`` (segment): a box's mask is the union of the Felzenszwalb superpixels
  lying mostly inside it (no weights); text-prompted concepts pick their proposal masks
  (Felzenszwalb segments merged hierarchically) by the teacher (needs ``"model"``), with the
  detector's ``score`` and ``assign``. Options: ``inside`` (0.5, fraction of a superpixel inside
  the box for it to join), ``scale`` (32, Felzenszwalb scale: smaller = finer), ``max_masks``
  (24 proposals per image), ``score``, ``assign``.
"""

from __future__ import annotations

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Detector, Segmenter


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
        from umg_jax.labeling.pseudo_label import Scorer

        if self._scorer is None or self._scorer.vocab != names:
            self._scorer = Scorer(self.teacher, names, max_boxes=self.max_boxes,
                                  max_masks=self.max_masks)
        return self._scorer

    def probs(self, names: list[str], images: list[np.ndarray], boxes: list[np.ndarray],
              masks: list[np.ndarray], mode: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image ``(box probs [K, V], mask probs [M, V])`` over ``names``: pooled from the
        teacher's dense map (``mode`` "dense") or from its embedding of each crop ("crop")."""
        scorer = self(names)
        if mode == "crop":
            return scorer.score_crops(images, boxes, masks)
        return [(bp, mp) for _, bp, mp, _ in scorer.score(images, boxes, masks)]


def _check_modes(score: str, assign: str) -> None:
    if score not in ("dense", "crop"):
        raise AnnotateError(f"proposals: score={score!r}, expected 'dense' or 'crop'")
    if assign not in ("concept", "proposal"):
        raise AnnotateError(f"proposals: assign={assign!r}, expected 'concept' or 'proposal'")


def _label(probs: np.ndarray, cols: list[int], assign: str) -> tuple[np.ndarray, np.ndarray]:
    """``probs [K, V]`` over the batch's names -> per proposal ``(query index, score)`` among
    this image's queries (columns ``cols``, renormalised), per ``assign``."""
    from umg_jax.labeling.pseudo_label import assign_concepts

    p = probs[:, cols]
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
    if assign == "concept":
        return assign_concepts(p, None)
    return p.argmax(-1), p.max(-1)


class ProposalDetector(Detector):
    family = "proposals"

    def __init__(self, model: str | None, device: str = "cpu", *, max_boxes: int = 64,
                 score: str = "dense", assign: str = "concept"):
        super().__init__(model, device)
        _check_modes(score, assign)
        self.score_mode, self.assign = score, assign
        if not model:
            raise AnnotateError("proposals: the recipe entry needs \"model\": a umg_jax "
                                "workdir or import directory (the teacher that labels them)")
        self.teacher = _teacher(model)
        self.max_boxes = max_boxes
        self._scorer_for = _Scored(self.teacher, max_boxes, 1)

    def detect(self, images: list[np.ndarray], queries: list[list[str]], threshold: float
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        from umg_jax.labeling.pseudo_label import mask_box, mask_proposals, window_proposals

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
        box_probs = [bp for bp, _ in self._scorer_for.probs(
            names, images, props, [np.zeros((0,))] * len(images), self.score_mode)]
        out = []
        for boxes, qs, bp in zip(props, queries, box_probs, strict=True):
            if not qs or not len(boxes):
                out.append(empty)
                continue
            lab, sc = _label(bp, [names.index(q) for q in qs], self.assign)
            keep = sc >= threshold
            out.append((boxes[keep].astype(np.float32), lab[keep].astype(np.int32),
                        sc[keep].astype(np.float32)))
        return out


class ProposalSegmenter(Segmenter):
    family = "proposals"

    def __init__(self, model: str | None = None, device: str = "cpu", *, inside: float = 0.5,
                 scale: float = 32.0, max_masks: int = 24, score: str = "dense",
                 assign: str = "concept"):
        super().__init__(model, device)
        _check_modes(score, assign)
        self.score_mode, self.assign = score, assign
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
        """Proposal masks labelled with the image's concepts by the teacher (``score``,
        ``assign`` as the detector), kept when their score reaches ``threshold``; a concept
        may take several proposals (instances), a proposal goes to one concept."""
        from umg_jax.labeling.pseudo_label import mask_proposals

        if self._scorer_for is None:
            raise AnnotateError("proposals: concept masks need \"model\" (a umg_jax teacher)")
        names = sorted({c for cs in concepts for c in cs})
        if not names:
            return [[] for _ in images]
        props = [mask_proposals(im, max_masks=self.max_masks) for im in images]
        mask_probs = [mp for _, mp in self._scorer_for.probs(
            names, images, [np.zeros((0, 4), np.float32)] * len(images), props,
            self.score_mode)]
        out = []
        for cs, masks, mp in zip(concepts, props, mask_probs, strict=True):
            found = []
            if cs and len(masks):
                lab, sc = _label(mp, [names.index(c) for c in cs], self.assign)
                for i in np.argsort(-sc, kind="stable"):
                    if sc[i] >= threshold:
                        found.append((int(lab[i]), masks[i].astype(bool), float(sc[i])))
            out.append(found)
        return out
