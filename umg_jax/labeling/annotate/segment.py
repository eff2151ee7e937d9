"""Stage ``segment``: a mask for each box (box-prompted SAM / SAM 2), and masks from text prompts
(SAM 3 concepts) for the image's tags typed as stuff, or for all of its tags: a stuff tag gives
one segment (the union of its masks), a thing tag one segment per instance found.

Policy keys: ``prompts`` ("boxes", the default: one mask per region that has none; "stuff":
text prompts (SAM 3 concepts), one per stuff tag; "tags": text prompts for every tag, things
included, as masks without a box; "boxes+stuff" / "boxes+tags": both), ``threshold`` (0.5,
minimum concept-mask score), ``overwrite`` (false: keep masks an earlier entry made).
"""

from __future__ import annotations

import numpy as np

from umg_jax.data import records
from umg_jax.labeling.annotate.backend import AnnotateError, Segmenter
from umg_jax.labeling.annotate.stage import Context

POLICY = {"prompts": "boxes", "threshold": 0.5, "overwrite": False}


def run(backend: Segmenter, name: str, images: list[np.ndarray], states: list[dict],
        ctx: Context, *, prompts: str, threshold: float, overwrite: bool) -> None:
    if prompts not in ("boxes", "stuff", "tags", "boxes+stuff", "boxes+tags"):
        raise AnnotateError(f"segment: prompts={prompts!r}, expected boxes, stuff, tags, "
                            "boxes+stuff or boxes+tags")
    if "boxes" in prompts:
        todo = [[j for j, r in enumerate(s["regions"]) if overwrite or r["mask"] is None]
                for s in states]
        boxes = [np.asarray([s["regions"][j]["box"] for j in t], np.float32).reshape(-1, 4)
                 for s, t in zip(states, todo, strict=True)]
        for s, im, t, (masks, scores) in zip(states, images, todo,
                                             backend.segment(images, boxes), strict=True):
            if len(masks) != len(t) or masks.shape[1:] != im.shape[:2]:
                raise AnnotateError(f"segment: backend {name} gave masks {masks.shape} for "
                                    f"{len(t)} boxes on a {im.shape[:2]} image")
            for j, m, p in zip(t, masks, scores, strict=True):
                r = s["regions"][j]
                r["mask"], r["mask_score"], r["mask_by"] = (
                    records.mask_to_rle(m.astype(bool)), float(p), name)
    if "stuff" in prompts or "tags" in prompts:
        concepts = [[t["name"] for t in s["tags"]
                     if "tags" in prompts or not ctx.is_thing(t["name"])] for s in states]
        for s, cs, found in zip(states, concepts,
                                backend.segment_concepts(images, concepts, threshold),
                                strict=True):
            # stuff: one segment per concept (the union of its masks); things: one per instance
            merged: dict[int, list[tuple[np.ndarray, float]]] = {}
            for c, m, p in found:
                m = np.asarray(m, bool)
                if c in merged and not ctx.is_thing(cs[c]):
                    prev, q = merged[c][0]
                    merged[c][0] = (prev | m, max(p, q))
                else:
                    merged.setdefault(c, []).append((m, float(p)))
            have = {x["label"] for x in s["concepts"]}
            for c in sorted(merged):
                if cs[c] in have and not overwrite:
                    continue
                s["concepts"] = [x for x in s["concepts"] if x["label"] != cs[c]]
                s["concepts"] += [{"label": cs[c], "isthing": ctx.is_thing(cs[c]),
                                   "score": p, "by": name, "mask": records.mask_to_rle(m)}
                                  for m, p in merged[c]]
