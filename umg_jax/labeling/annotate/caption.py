"""Stage ``caption``: image captions from a captioner (BLIP-2, Florence-2).

Policy keys: ``when`` ("missing": only images that have no caption yet, the default, since
web alt-text is the better caption when present; "always": add one to every image).
"""

from __future__ import annotations

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Captioner
from umg_jax.labeling.annotate.stage import Context

POLICY = {"when": "missing"}


def run(backend: Captioner, name: str, images: list[np.ndarray], states: list[dict],
        ctx: Context, *, when: str) -> None:
    if when not in ("missing", "always"):
        raise AnnotateError(f"caption: when={when!r}, expected 'missing' or 'always'")
    idx = [i for i, s in enumerate(states) if when == "always" or not s["captions"]]
    if not idx:
        return
    for i, caps in zip(idx, backend.caption([images[i] for i in idx]), strict=True):
        for c in caps:
            if c.strip() and c.strip() not in [x["text"] for x in states[i]["captions"]]:
                states[i]["captions"].append({"text": c.strip(), "by": name})
