"""Evaluators (big_vision style): each is built from the vocabulary and options and has
``run(encoder, batches) -> {"<name>/<metric>": value}``.

The encoder protocol (``umg_jax.inference.UMGModel`` implements it): ``encode_image(images
[B, S, S, 3] normalised) -> (img [B, E], dense [B, gh, gw, E])``, ``encode_text(tokens [N, L])
-> [N, E]``, ``encode_text_labels(labels, templates) -> [C, E]`` (normalised). Batches follow
``umg_jax/data/schema.py``; :func:`common.encode_batches` encodes them once for all evaluators.
"""

from __future__ import annotations

from collections.abc import Sequence

from umg_jax.evaluators.common import Evaluator, encode_batches
from umg_jax.evaluators.panoptic import Panoptic
from umg_jax.evaluators.region import Region
from umg_jax.evaluators.retrieval import Retrieval
from umg_jax.evaluators.semseg import SemSeg
from umg_jax.evaluators.zeroshot import ZeroShot

NAMES = ("zeroshot", "retrieval", "region", "semseg", "panoptic")


def make_evaluators(names: Sequence[str], categories: Sequence[str],
                    isthing: Sequence[bool] | None = None) -> dict[str, Evaluator]:
    """``{name: evaluator}`` for ``names`` (subset of :data:`NAMES`) over the vocabulary."""
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown evaluators {unknown}; choose from {NAMES}")
    if not categories:
        raise ValueError("the vocabulary (category list) is empty")
    build = {
        "zeroshot": lambda: ZeroShot(categories, isthing),
        "retrieval": lambda: Retrieval(categories),
        "region": lambda: Region(categories),
        "semseg": lambda: SemSeg(categories),
        "panoptic": lambda: Panoptic(categories,
                                     isthing if isthing is not None else [True] * len(categories)),
    }
    return {n: build[n]() for n in names}


__all__ = ["NAMES", "Evaluator", "Panoptic", "Region", "Retrieval", "SemSeg", "ZeroShot",
           "encode_batches", "make_evaluators"]
