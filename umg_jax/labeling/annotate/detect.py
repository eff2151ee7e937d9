"""Stage ``detect``: boxes for the image's thing tags from an open-vocabulary detector (OWLv2,
Grounding DINO) or the weight-free proposals, then class-aware NMS.

Policy keys: ``threshold`` (0.1, minimum detector score), ``nms_iou`` (0.5, class-aware NMS
among this stage's boxes and those already present), ``max_boxes`` (20 per image, by score),
``queries`` ("things": the image's tags typed as things, the default; "tags": all of its tags;
"vocab": the whole vocabulary, for images without tags).
"""

from __future__ import annotations

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Detector
from umg_jax.labeling.annotate.stage import Context
from umg_jax.labeling.pseudo_label import nms

POLICY = {"threshold": 0.1, "nms_iou": 0.5, "max_boxes": 20, "queries": "things"}


def image_queries(state: dict, ctx: Context, queries: str) -> list[str]:
    if queries == "vocab":
        return list(ctx.vocab)
    names = [t["name"] for t in state["tags"]]
    return names if queries == "tags" else [n for n in names if ctx.is_thing(n)]


def run(backend: Detector, name: str, images: list[np.ndarray], states: list[dict],
        ctx: Context, *, threshold: float, nms_iou: float, max_boxes: int, queries: str) -> None:
    if queries not in ("things", "tags", "vocab"):
        raise AnnotateError(f"detect: queries={queries!r}, expected things, tags or vocab")
    qs = [image_queries(s, ctx, queries) for s in states]
    dets = backend.detect(images, qs, threshold)
    for s, q, (boxes, labels, scores) in zip(states, qs, dets, strict=True):
        old = s["regions"]
        h, w = s["height"], s["width"]
        boxes = np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0, [w, h, w, h])
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # degenerate after clip
        new = [{"box": [float(v) for v in b], "label": q[int(c)], "score": float(p), "by": name,
                "isthing": ctx.is_thing(q[int(c)]), "phrase": None, "phrase_by": None,
                "mask": None, "mask_score": None, "mask_by": None}
               for b, c, p, k in zip(boxes, labels, scores, ok, strict=True) if k]
        regs = old + new
        if not regs:
            continue
        names = sorted({r["label"] for r in regs})
        keep = nms(np.asarray([r["box"] for r in regs], np.float32),
                   np.asarray([r["score"] for r in regs], np.float32),
                   np.asarray([names.index(r["label"]) for r in regs]), nms_iou)
        s["regions"] = [regs[i] for i in sorted(keep[:max_boxes])]
