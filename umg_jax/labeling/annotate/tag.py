"""Stage ``tag``: image tags over the recipe's vocabulary (CLIP / SigLIP zero-shot, or the
entries the captions mention).

Policy keys: ``threshold`` (0.3, minimum backend score), ``max_tags`` (10 per backend call,
highest scores first).
"""

from __future__ import annotations

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Tagger
from umg_jax.labeling.annotate.stage import Context, add_tag, caption_texts

POLICY = {"threshold": 0.3, "max_tags": 10}


def run(backend: Tagger, name: str, images: list[np.ndarray], states: list[dict],
        ctx: Context, *, threshold: float, max_tags: int) -> None:
    if not ctx.vocab:
        raise AnnotateError("tag: the recipe has no vocabulary (\"vocab\": a file or a list)")
    scores = np.asarray(backend.tag(images, list(ctx.vocab),
                                    [caption_texts(s) for s in states]), np.float32)
    if scores.shape != (len(images), len(ctx.vocab)):
        raise AnnotateError(f"tag: backend {name} returned scores {scores.shape}, expected "
                            f"{(len(images), len(ctx.vocab))}")
    for s, row in zip(states, scores, strict=True):
        for j in np.argsort(-row, kind="stable")[:max_tags]:
            if row[j] >= threshold:
                add_tag(s, ctx.vocab[j], float(row[j]), name)
