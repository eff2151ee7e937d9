"""The one data contract of umg-jax: the stored record, the decoded example, and the batch.

Every module that produces or consumes data speaks these three forms; nothing else defines shapes.

1. Record (what an ArrayRecord shard stores; one msgpack-encoded dict per example)
-------------------------------------------------------------------------------
    source      str    where it came from, e.g. "coco/train2017:000000391895.jpg" (carried
                       into every error report)
    image       bytes  encoded PNG or JPEG, RGB
    height      int    image height in pixels
    width       int    image width in pixels
    captions    list[str]   image-level captions (0..n)
    tags        list[str]   image-level tags (0..n)
    regions     list[dict]  region level; each:
                   box       [x0, y0, x1, y1] float, absolute pixels, x0 < x1, y0 < y1
                   caption   str | None     region phrase
                   tags      list[str]
                   category  int            index into the data set's category list, -1 if none
    segments    list[dict]  pixel level (things and stuff); each:
                   rle       {"size": [h, w], "counts": str}  COCO RLE (pycocotools encoding)
                   caption   str | None
                   tags      list[str]
                   category  int            -1 if none
                   isthing   bool
                   region    int            index of the region this segment outlines, -1 if none
    confidence  float  1.0 for human / procedural labels; a pseudo-labeller's score otherwise

   Data-set metadata lives beside the shards in ``meta.json``:
   ``{"name", "categories": [{"id": int, "name": str, "isthing": bool}], "num_examples", ...}``,
   optionally ``"text_vocab": [str]``: the tag names the data set draws from (a tagger's tag
   list; default: the category names). A tag prompt of a vocabulary name travels as an id
   (``*_id`` below), so the train step encodes each distinct vocabulary text once, not per slot.

2. Decoded example (after decode + augmentation, per example, numpy, static shapes)
------------------------------------------------------------------------------------
   Same keys as the batch below without the leading B axis.

3. Batch (global batch B, static shapes; what the model, the losses and evaluators consume)
------------------------------------------------------------------------------------------
   L = context length (77), Le = context of tag / region / mask texts (<= L), T = max tags,
   R = max regions, M = max masks, (gh, gw) = feature grid
   = image_size // patch_size.

    image          [B, H, W, 3]    float32  normalised with the model's mean / std
    text           [B, L]          int32    one image caption per example (drawn at random)
    text_valid     [B]             bool     False when the example has no caption
    tags           [B, T, Le]      int32    image tags, each tokenised as a prompt
    tags_valid     [B, T]          bool
    tags_id        [B, T]          int32    index of the tag in the data set's text vocabulary,
                                            -1 = not in it, or an empty slot (see below)
    region_boxes   [B, R, 4]       float32  normalised (x0, y0, x1, y1) in [0, 1] of the final image
    region_text    [B, R, Le]      int32    region caption, else a prompt from its tags
    region_valid   [B, R]          bool
    region_text_id [B, R]          int32    vocabulary index of a region text that is a tag
                                            prompt, -1 = a free-form phrase or an empty slot
    mask_area      [B, M, gh, gw]  float32  fraction of each feature cell covered by the mask
    mask_text      [B, M, Le]      int32    mask caption, else a prompt from its tags
    mask_valid     [B, M]          bool
    mask_text_id   [B, M]          int32    as region_text_id, for mask texts
    pixel_target   [B, gh, gw]     int32    index into the image's masks of the dominant segment in
                                            each cell, -1 = unlabeled / ignore
   Evaluation fields (always present, cheap; used by evaluators, ignored by the losses):
    region_class   [B, R]          int32    category of each region, -1 = none
    mask_class     [B, M]          int32    category of each mask, -1 = none
    mask_isthing   [B, M]          bool
    segmap         [B, H, W]       int32    per-pixel index into the masks at image resolution,
                                            -1 = unlabeled (panoptic ground truth)
    example_weight [B]             float32  the record's confidence (pseudo labels)
    label          [B]             int32    category of the largest thing mask, -1 if none
                                            (image-level class for zero-shot classification)

Model outputs (``umg_jax.models.clip.CLIP``): ``img [B, E]``, ``txt [B, E]``,
``dense [B, gh, gw, E]`` (all *unnormalised* projections; the losses normalise), and the scalar
parameters ``logit_scale`` (log space) / ``logit_bias``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CONTEXT_LENGTH = 77

# Keys of the batch and their (shape builder, dtype). Shapes use the symbols documented above.
BATCH_KEYS: dict[str, tuple[tuple[str, ...], Any]] = {
    "image": (("B", "H", "W", "3"), np.float32),
    "text": (("B", "L"), np.int32),
    "text_valid": (("B",), np.bool_),
    "tags": (("B", "T", "Le"), np.int32),
    "tags_valid": (("B", "T"), np.bool_),
    "tags_id": (("B", "T"), np.int32),
    "region_boxes": (("B", "R", "4"), np.float32),
    "region_text": (("B", "R", "Le"), np.int32),
    "region_valid": (("B", "R"), np.bool_),
    "region_text_id": (("B", "R"), np.int32),
    "mask_area": (("B", "M", "gh", "gw"), np.float32),
    "mask_text": (("B", "M", "Le"), np.int32),
    "mask_valid": (("B", "M"), np.bool_),
    "mask_text_id": (("B", "M"), np.int32),
    "pixel_target": (("B", "gh", "gw"), np.int32),
    "region_class": (("B", "R"), np.int32),
    "mask_class": (("B", "M"), np.int32),
    "mask_isthing": (("B", "M"), np.bool_),
    "segmap": (("B", "H", "W"), np.int32),
    "example_weight": (("B",), np.float32),
    "label": (("B",), np.int32),
}


def batch_dims(
    *,
    batch_size: int,
    image_size: int,
    patch_size: int,
    max_tags: int,
    max_regions: int,
    max_masks: int,
    context_length: int = CONTEXT_LENGTH,
    element_context_length: int | None = None,
) -> dict[str, int]:
    """The symbol -> size table used by :func:`batch_shapes`."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    g = image_size // patch_size
    return {
        "B": batch_size, "H": image_size, "W": image_size, "3": 3, "4": 4,
        "L": context_length, "Le": min(element_context_length or context_length, context_length),
        "T": max_tags, "R": max_regions, "M": max_masks,
        "gh": g, "gw": g,
    }


def batch_shapes(**dims: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Returns ``{key: (shape, dtype)}`` of the batch; arguments as :func:`batch_dims`."""
    table = batch_dims(**dims)
    return {k: (tuple(table[s] for s in sym), dt) for k, (sym, dt) in BATCH_KEYS.items()}


def batch_shapes_from_config(config, batch_size: int | None = None):
    """Batch shapes for an ``ml_collections`` config (``config.data`` + ``config.model``)."""
    return batch_shapes(
        batch_size=config.batch_size if batch_size is None else batch_size,
        image_size=config.model.vision.image_size,
        patch_size=config.model.vision.patch_size,
        max_tags=config.data.max_tags,
        max_regions=config.data.max_regions,
        max_masks=config.data.max_masks,
        context_length=config.model.text.context_length,
        element_context_length=config.data.get("element_context_length"),
    )


def check_batch(batch: dict[str, Any], shapes: dict[str, tuple[tuple[int, ...], Any]]) -> None:
    """Raises ``ValueError`` naming the first key whose shape or dtype breaks the contract."""
    missing = sorted(set(shapes) - set(batch))
    if missing:
        raise ValueError(f"batch is missing keys {missing}")
    for key, (shape, dtype) in shapes.items():
        arr = batch[key]
        if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
            raise ValueError(
                f"batch[{key!r}] has shape {tuple(arr.shape)} {arr.dtype}, "
                f"expected {tuple(shape)} {np.dtype(dtype)}"
            )
