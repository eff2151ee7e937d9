"""Stage ``region_caption``: a phrase for each box (Florence-2 region captioning, BLIP-2 on the
crop).

Policy keys: ``overwrite`` (false: only regions without a phrase, so a second captioner fills
gaps instead of replacing the first one's phrases).
"""

from __future__ import annotations

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, RegionCaptioner
from umg_jax.labeling.annotate.stage import Context

POLICY = {"overwrite": False}


def run(backend: RegionCaptioner, name: str, images: list[np.ndarray], states: list[dict],
        ctx: Context, *, overwrite: bool) -> None:
    todo = [[j for j, r in enumerate(s["regions"]) if overwrite or r["phrase"] is None]
            for s in states]
    boxes = [np.asarray([s["regions"][j]["box"] for j in t], np.float32).reshape(-1, 4)
             for s, t in zip(states, todo, strict=True)]
    out = backend.describe(images, boxes)
    for s, t, phrases in zip(states, todo, out, strict=True):
        if len(phrases) != len(t):
            raise AnnotateError(f"region_caption: backend {name} gave {len(phrases)} phrases "
                                f"for {len(t)} boxes of {s['source']}")
        for j, p in zip(t, phrases, strict=True):
            s["regions"][j]["phrase"] = p.strip() or None
            s["regions"][j]["phrase_by"] = name if p.strip() else None
