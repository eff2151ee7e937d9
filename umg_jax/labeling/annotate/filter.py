"""Stage ``filter``: drop what a teacher got wrong in ways that can be checked without labels.

In order, per image:
1. regions whose box covers less than ``min_box_area`` of the image;
2. masks (region masks and concept masks) covering less than ``min_mask_area`` of the image
   (a region keeps its box when only its mask is dropped);
3. duplicate regions: a box whose IoU with a higher-scoring kept box of *any* label exceeds
   ``dup_box_iou`` (the detect stage's NMS is class-aware; this catches one object detected
   under two names);
4. duplicate masks: a thing mask (a region's, or a text-prompted instance) whose IoU with a
   higher-scoring kept one exceeds ``dup_mask_iou`` is dropped (the region keeps its box);
5. phrase disagreement (``phrase_agreement``): "tags" drops a region whose phrase mentions
   neither its label nor any of the image's tags; "label" asks for its own label; "off";
6. the image itself, when ``drop_empty`` and it is left with nothing to train on: no region,
   no concept mask, no caption and no tag. An image that keeps a caption or a tag still trains
   the image level (its tags make a template caption); such caption-only images are counted
   (``caption_only`` in the run's counts and ``meta.json``)

Policy keys and defaults: see :data:`POLICY`. Every drop is counted in the state's ``dropped``.
"""

from __future__ import annotations

import numpy as np

from umg_jax.data import records
from umg_jax.labeling.annotate.backend import AnnotateError
from umg_jax.labeling.annotate.families.noun_phrases import mentions
from umg_jax.labeling.annotate.stage import Context, drop
from umg_jax.labeling.pseudo_label import box_iou, mask_iou

POLICY = {"min_box_area": 0.001, "min_mask_area": 0.0005, "dup_box_iou": 0.9,
          "dup_mask_iou": 0.8, "phrase_agreement": "tags", "drop_empty": True}


def _area(rle: dict) -> float:
    return float(records.rle_to_mask(rle).sum())


def filter_state(s: dict, ctx: Context, *, min_box_area: float, min_mask_area: float,
                 dup_box_iou: float, dup_mask_iou: float, phrase_agreement: str,
                 drop_empty: bool) -> bool:
    """Filters one image's state in place; returns False when the image itself is dropped."""
    if phrase_agreement not in ("tags", "label", "off"):
        raise AnnotateError(f"filter: phrase_agreement={phrase_agreement!r}, expected tags, "
                            "label or off")
    hw = float(s["height"] * s["width"])
    regs = []
    for r in s["regions"]:
        x0, y0, x1, y1 = r["box"]
        if (x1 - x0) * (y1 - y0) < min_box_area * hw:
            drop(s, "small_box")
        else:
            regs.append(r)
    for r in regs:
        if r["mask"] is not None and _area(r["mask"]) < min_mask_area * hw:
            r["mask"] = r["mask_score"] = r["mask_by"] = None
            drop(s, "small_mask")
    small = [x for x in s["concepts"] if _area(x["mask"]) < min_mask_area * hw]
    drop(s, "small_mask", len(small))
    s["concepts"] = [x for x in s["concepts"] if x not in small]

    order = sorted(range(len(regs)), key=lambda i: -regs[i]["score"])
    kept: list[int] = []
    for i in order:
        if kept and box_iou(np.asarray([regs[i]["box"]]),
                            np.asarray([regs[k]["box"] for k in kept])).max() > dup_box_iou:
            drop(s, "duplicate_box")
        else:
            kept.append(i)
    regs = [regs[i] for i in sorted(kept)]

    # thing masks, region masks and text-prompted instances alike, best score first
    things = [(r["mask_score"] or 0.0, 0, i) for i, r in enumerate(regs) if r["mask"] is not None]
    things += [(x["score"], 1, i) for i, x in enumerate(s["concepts"]) if x["isthing"]]
    masks: list[np.ndarray] = []
    dup_concepts = set()
    for _, kind, i in sorted(things, key=lambda t: -t[0]):
        m = records.rle_to_mask(regs[i]["mask"] if kind == 0 else s["concepts"][i]["mask"])
        if not any(mask_iou(m, o) > dup_mask_iou for o in masks):
            masks.append(m)
            continue
        drop(s, "duplicate_mask")
        if kind == 0:
            regs[i]["mask"] = regs[i]["mask_score"] = regs[i]["mask_by"] = None
        else:
            dup_concepts.add(i)
    s["concepts"] = [x for i, x in enumerate(s["concepts"]) if i not in dup_concepts]

    if phrase_agreement != "off":
        tags = [t["name"] for t in s["tags"]]
        ok = []
        for r in regs:
            names = [r["label"]] + (tags if phrase_agreement == "tags" else [])
            if r["phrase"] is None or any(mentions(r["phrase"], n) for n in names):
                ok.append(r)
            else:
                drop(s, "phrase_disagrees")
        regs = ok
    s["regions"] = regs
    if drop_empty and not regs and not s["concepts"] and not s["captions"] and not s["tags"]:
        drop(s, "empty_image")
        return False
    return True


def run(backend: None, name: str, images: list[np.ndarray], states: list[dict], ctx: Context,
        **policy) -> None:
    """Filters every state; a dropped image gets ``state["kept"] = False``."""
    for s in states:
        s["kept"] = filter_state(s, ctx, **policy)
