"""The backend interface of the annotation stages: what a teacher model must do, nothing more.

A recipe names one backend per stage (``{"stage": "detect", "backend": "owlv2", "model": DIR}``).
The stage module (``caption.py``, ``tag.py``, ...) owns the policy (thresholds, NMS, merging into
the image's annotation); the backend, one class in ``families/<family>.py``, only runs its model.
Backends are looked up by name in :data:`BACKENDS` and imported lazily, so ``import umg_jax``
never imports torch.

Conventions shared by every backend:
  images  ``list[np.ndarray]``, each ``[H, W, 3] uint8`` RGB, sizes may differ within a batch.
  boxes   ``np.ndarray [K, 4] float32``, absolute pixels ``x0, y0, x1, y1`` of that image.
  masks   ``np.ndarray [K, H, W] bool`` at the image's own size.
  scores  ``np.ndarray [K] float32`` in [0, 1].
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import numpy as np

STAGES = ("caption", "tag", "detect", "region_caption", "segment", "filter")


class AnnotateError(ValueError):
    """Bad request or bad model directory (one line naming its source; exit status 2)."""


class Backend:
    """Base of every backend. ``model``: a local model directory (loaded with
    ``local_files_only=True``; None for backends without weights), ``device``: ``"cpu"``,
    ``"cuda"``, ``"cuda:1"``... ``options``: the recipe entry's remaining keys; an unknown key is
    an :class:`AnnotateError` (raise it from ``__init__``), never silently ignored."""

    stage: ClassVar[str]
    family: ClassVar[str]

    def __init__(self, model: str | None, device: str = "cpu", **options: Any):
        self.model_dir, self.device = model, device
        if options:
            raise AnnotateError(f"{self.family}: unknown option(s) {sorted(options)}")


class Captioner(Backend):
    stage = "caption"

    def caption(self, images: list[np.ndarray]) -> list[list[str]]:
        """One or more captions per image."""
        raise NotImplementedError


class Tagger(Backend):
    stage = "tag"

    def tag(self, images: list[np.ndarray], vocab: list[str],
            captions: list[list[str]]) -> np.ndarray:
        """``[N, V] float32`` score of every vocabulary entry for every image, in [0, 1]
        (probability-like: the stage compares it with the recipe's threshold)."""
        raise NotImplementedError


class Detector(Backend):
    stage = "detect"

    def detect(self, images: list[np.ndarray], queries: list[list[str]], threshold: float
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image ``(boxes [K, 4] float32 px, labels [K] int32 index into that image's
        queries, scores [K] float32)`` with ``score >= threshold``, before NMS (the stage does
        class-aware NMS). An image with no queries gets empty arrays."""
        raise NotImplementedError


class RegionCaptioner(Backend):
    stage = "region_caption"

    def describe(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[list[str]]:
        """One phrase per box of each image (``len(out[i]) == len(boxes[i])``)."""
        raise NotImplementedError


class Segmenter(Backend):
    stage = "segment"

    def segment(self, images: list[np.ndarray], boxes: list[np.ndarray]
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image ``(masks [K, H, W] bool, scores [K] float32)``: one mask per prompt box
        (the best of the model's candidates), ``K == len(boxes[i])``."""
        raise NotImplementedError

    def segment_concepts(self, images: list[np.ndarray], concepts: list[list[str]],
                         threshold: float) -> list[list[tuple[int, np.ndarray, float]]]:
        """Text-prompted masks (SAM 3): per image a list of ``(concept index, mask [H, W] bool,
        score)`` with ``score >= threshold``. Backends without text prompts raise
        :class:`AnnotateError`."""
        raise AnnotateError(f"{self.family}: no text-prompted (concept) masks; use sam3")


# Recipe name -> "module:Class" (module relative to umg_jax.labeling.annotate.families). Each family
# module also has ``write_tiny(directory, **kw)``: a tiny randomly initialised model directory of
# that family that its backend loads (tests, demo, install check).
BACKENDS: dict[str, dict[str, str]] = {
    "caption": {"blip2": "blip2:Blip2Captioner", "florence2": "florence2:Florence2Captioner"},
    "tag": {"clip": "clip_tagger:ClipTagger", "siglip": "clip_tagger:ClipTagger",
            "noun_phrases": "noun_phrases:NounPhraseTagger"},
    "detect": {"owlv2": "owlv2:Owlv2Detector",
               "grounding_dino": "grounding_dino:GroundingDinoDetector",
               "proposals": "proposals:ProposalDetector"},
    "region_caption": {"florence2": "florence2:Florence2RegionCaptioner",
                       "blip2": "blip2:Blip2RegionCaptioner"},
    "segment": {"sam": "sam:SamSegmenter", "sam2": "sam:Sam2Segmenter",
                "sam3": "sam3:Sam3Segmenter", "proposals": "proposals:ProposalSegmenter"},
}


def backend_class(stage: str, name: str) -> type[Backend]:
    """The backend class for ``stage`` named ``name`` (imports its family module)."""
    if stage not in BACKENDS:
        raise AnnotateError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if name not in BACKENDS[stage]:
        raise AnnotateError(f"stage {stage!r} has no backend {name!r}; choose from "
                            f"{', '.join(BACKENDS[stage])}")
    mod, cls = BACKENDS[stage][name].split(":")
    try:
        module = importlib.import_module(f"umg_jax.labeling.annotate.families.{mod}")
    except ImportError as e:  # torch / transformers missing: say how to get them
        raise AnnotateError(f"backend {name!r} cannot be imported ({e}); the model backends need "
                            "pip install -r requirements-annotate.txt") from None
    return getattr(module, cls)
