"""Record bytes -> one example of the batch contract (``schema.py``), in pure numpy.

The journey of one record: :func:`decode` (bytes -> image, boxes, full-resolution masks, texts,
with bad parts counted) -> :func:`sample_crop` (train: random resized crop; eval: the whole image)
-> :func:`resize_image` / :func:`transform_boxes` / :func:`transform_masks` (one crop + flip applied
to all three) -> drop regions / masks that fell out or became too small -> keep the largest
``max_regions`` / ``max_masks`` -> :func:`build_segmap`, :func:`pool_masks`,
:func:`pixel_target` -> tokenise -> pad. :func:`make_example` runs the whole chain;
:class:`ExampleTransform` is its picklable, configured form used by the Grain pipeline.

Bad input (see :data:`KINDS`) and the unit that is dropped for each kind:

    parse   the record does not parse / lacks a field / wrong type     -> the record
    image   the image does not decode, or its size differs from
            ``height`` x ``width``                                     -> the record
    box     a region box that is not finite, degenerate (x1 <= x0 or
            y1 <= y0) or outside the image (by more than 1 px)          -> that region
    mask    a segment whose RLE does not decode, whose size differs
            from the image, or which is empty                           -> that segment
    text    an empty / whitespace-only / non-UTF-8 / non-string
            caption or tag                                              -> that caption / tag

Record-level kinds raise :class:`BadRecordError` (the pipeline turns it into a dropped,
counted record); element-level kinds are dropped here, counted in the example's
``drop_counts [K] int32`` and logged with the source id. With ``strict=True`` every kind raises
:class:`BadRecordError` at its first occurrence.

A region or segment that has no usable text at all (no caption, no tags) is not an error; it is
left out because no loss or evaluator can use it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import numpy as np
from PIL import Image

from umg_jax.data import schema

log = logging.getLogger("umg_jax.data")

KINDS: tuple[str, ...] = ("parse", "image", "box", "mask", "text")
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}

# OpenAI CLIP's image normalisation (on [0, 1] RGB); open_clip uses the same constants for the
# OpenAI-trained models. LAION-trained models also use them, so one pair serves every config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A box may overshoot the image border by this many pixels (float rounding in converters) before
# it counts as "outside the image"; it is clipped either way.
BOX_TOLERANCE_PX = 1.0


class BadRecordError(ValueError):
    """A record (or, in strict mode, a part of it) that cannot be used.

    Attributes: ``kind`` (one of :data:`KINDS`), ``source`` (the record's source id), ``detail``.
    """

    def __init__(self, kind: str, source: str, detail: str):
        if kind not in KIND_INDEX:
            raise ValueError(f"unknown bad-input kind {kind!r}")
        super().__init__(f"bad {kind} in record {source}: {detail}")
        self.kind, self.source, self.detail = kind, source, detail

    def __reduce__(self):  # picklable across Grain worker processes
        return (BadRecordError, (self.kind, self.source, self.detail))


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Everything :func:`make_example` needs; build it with :meth:`from_configs`."""

    image_size: int  # S: output image side
    patch_size: int  # p: feature cell side; grid = S // p
    context_length: int = schema.CONTEXT_LENGTH  # L
    element_context_length: int | None = None  # Le: tags / region / mask texts (None = L)
    max_tags: int = 4  # T
    max_regions: int = 8  # R
    max_masks: int = 8  # M
    train: bool = True  # random crop / flip / caption choice (else resize only, first caption)
    crop_scale: tuple[float, float] = (0.6, 1.0)  # crop area fraction range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect-ratio (w / h) range
    flip: bool = True  # random horizontal flip
    min_region_frac: float = 0.02  # train: drop boxes covering less of the final image
    min_mask_frac: float = 0.002  # train: drop masks covering less of the final image
    prompt_template: str = "a photo of a {}."  # text for a tag
    tag_text_prob: float = 0.5  # train: a region / mask with caption AND tags uses a tag prompt
    mean: tuple[float, float, float] = CLIP_MEAN  # pixel normalisation the model expects
    std: tuple[float, float, float] = CLIP_STD
    strict: bool = False  # raise at the first bad input of any kind
    tokenizer: str = "clip"  # "clip" BPE or a SentencePiece .model (tokenizer.tokenizer_for)
    pad_id: int = 0  # token padding id
    text_vocab: tuple[str, ...] = ()  # tag names whose prompts travel as ids (meta text_vocab)

    @property
    def element_length(self) -> int:
        return min(self.element_context_length or self.context_length, self.context_length)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if "{}" not in self.prompt_template:
            raise ValueError(f"prompt_template {self.prompt_template!r} has no '{{}}'")

    @classmethod
    def from_configs(cls, data_cfg, model_cfg, *, train: bool,
                     text_vocab: tuple[str, ...] | list[str] = ()) -> TransformConfig:
        """From ``config.data`` and ``config.model`` (configs/common.py); ``text_vocab``: the
        data set's (:func:`umg_jax.data.pipeline.text_vocabulary`)."""
        return cls(
            image_size=int(model_cfg.vision.image_size),
            patch_size=int(model_cfg.vision.patch_size),
            context_length=int(model_cfg.text.context_length),
            element_context_length=data_cfg.get("element_context_length"),
            max_tags=int(data_cfg.max_tags),
            max_regions=int(data_cfg.max_regions),
            max_masks=int(data_cfg.max_masks),
            train=train,
            crop_scale=tuple(float(x) for x in data_cfg.crop_scale),
            crop_ratio=tuple(float(x) for x in data_cfg.get("crop_ratio", (3 / 4, 4 / 3))),
            flip=bool(data_cfg.flip),
            min_region_frac=float(data_cfg.min_region_frac),
            min_mask_frac=float(data_cfg.get("min_mask_frac", 0.002)),
            prompt_template=str(data_cfg.get("prompt_template", "a photo of a {}.")),
            tag_text_prob=float(data_cfg.get("tag_text_prob", 0.5)),
            strict=bool(data_cfg.strict),
            mean=tuple(float(x) for x in model_cfg.vision.get("pixel_mean", CLIP_MEAN)),
            std=tuple(float(x) for x in model_cfg.vision.get("pixel_std", CLIP_STD)),
            tokenizer=str(model_cfg.text.get("tokenizer", "clip")),
            pad_id=int(model_cfg.text.get("pad_id", 0)),
            text_vocab=tuple(text_vocab),
        )

    def vocab_texts(self) -> list[str]:
        """The text of each vocabulary id: its name in the prompt template."""
        return [self.prompt_template.format(n) for n in self.text_vocab]


# ----------------------------------------------------------------------------------- decode ---


class _Issues:
    """Per-record bad-input bookkeeping: counts by kind, logs with the source, or raises."""

    def __init__(self, source: str, strict: bool):
        self.source, self.strict = source, strict
        self.counts = np.zeros(len(KINDS), np.int32)

    def bad(self, kind: str, detail: str) -> None:
        if self.strict:
            raise BadRecordError(kind, self.source, detail)
        self.counts[KIND_INDEX[kind]] += 1
        log.warning("dropped bad %s in record %s: %s", kind, self.source, detail)


def _clean_text(value: Any, what: str, issues: _Issues) -> str | None:
    """A usable text or None (reported as kind ``text``). Bytes must be valid UTF-8."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            issues.bad("text", f"{what} is not UTF-8 ({e.reason})")
            return None
    if not isinstance(value, str):
        issues.bad("text", f"{what} is a {type(value).__name__}, not a string")
        return None
    value = value.strip()
    if not value:
        issues.bad("text", f"{what} is empty")
        return None
    return value


def _clean_texts(values: Any, what: str, issues: _Issues) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{what} must be a list, got {type(values).__name__}")
    out = [_clean_text(v, f"{what}[{i}]", issues) for i, v in enumerate(values)]
    return [t for t in out if t is not None]


def _optional_text(value: Any, what: str, issues: _Issues) -> str | None:
    return None if value is None else _clean_text(value, what, issues)


def _check_box(box: Any, height: int, width: int) -> tuple[np.ndarray | None, str]:
    """``[4] float64`` clipped to the image, or (None, reason)."""
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,):
        return None, f"box has shape {b.shape}, expected (4,)"
    if not np.all(np.isfinite(b)):
        return None, f"box {b.tolist()} is not finite"
    x0, y0, x1, y1 = b
    if x1 <= x0 or y1 <= y0:
        return None, f"box {b.tolist()} is degenerate"
    tol = BOX_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return None, f"box {b.tolist()} lies outside the {width}x{height} image"
    c = np.array([max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)])
    if c[2] <= c[0] or c[3] <= c[1]:
        return None, f"box {b.tolist()} is empty inside the image"
    return c, ""


def decode(raw: bytes, *, strict: bool = False) -> dict[str, Any]:
    """Parses and validates one stored record (schema.py, form 1).

    Returns a dict with (R regions and M segments that survived validation; H, W the image):
        source        str
        image         [H, W, 3] uint8
        captions      list[str]               non-empty, stripped
        tags          list[str]
        boxes         [R, 4] float32          absolute pixels (x0, y0, x1, y1), clipped to image
        region_text   list[str | None]        region caption
        region_tags   list[list[str]]
        region_class  [R] int32
        masks         [M, H, W] uint8         0 / 1
        mask_text     list[str | None]
        mask_tags     list[list[str]]
        mask_class    [M] int32
        mask_isthing  [M] bool
        weight        float                   the record's confidence
        drop_counts   [K] int32               element-level bad inputs dropped, K = len(KINDS)

    Raises :class:`BadRecordError` for kinds ``parse`` / ``image`` (and any kind when strict).
    """
    from umg_jax.data import records  # the record codec (kept out of import time)

    try:
        rec = records.decode_record(raw)
        if not isinstance(rec, dict):
            raise TypeError(f"record is a {type(rec).__name__}, not a dict")
    except Exception as e:  # noqa: BLE001 - any codec failure is a "parse" failure
        raise BadRecordError("parse", "<unknown>", f"{type(e).__name__}: {e}") from e
    source = str(rec.get("source", "<no source>"))
    issues = _Issues(source, strict)
    try:
        height, width = int(rec["height"]), int(rec["width"])
        image_bytes = rec["image"]
        captions = _clean_texts(rec.get("captions"), "caption", issues)
        tags = _clean_texts(rec.get("tags"), "tag", issues)
        regions, segments = rec.get("regions") or [], rec.get("segments") or []
        if not isinstance(regions, (list, tuple)) or not isinstance(segments, (list, tuple)):
            raise TypeError("regions / segments must be lists")
        weight = float(rec.get("confidence", 1.0))
    except BadRecordError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise BadRecordError("parse", source, f"{type(e).__name__}: {e}") from e

    try:
        image = records.decode_image(image_bytes)
    except Exception as e:  # noqa: BLE001 - PIL raises several types for corrupt data
        raise BadRecordError("image", source, f"image does not decode: {e}") from e
    if image.shape != (height, width, 3) or image.dtype != np.uint8:
        raise BadRecordError(
            "image", source,
            f"decoded image is {image.shape} {image.dtype}, record says {height}x{width}x3 uint8",
        )

    boxes, region_text, region_tags, region_class = [], [], [], []
    for i, r in enumerate(regions):
        try:
            box, why = _check_box(r["box"], height, width)
            cap = _optional_text(r.get("caption"), f"region[{i}].caption", issues)
            rtags = _clean_texts(r.get("tags"), f"region[{i}].tags", issues)
            cat = int(r.get("category", -1))
        except BadRecordError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BadRecordError("parse", source, f"region[{i}]: {type(e).__name__}: {e}") from e
        if box is None:
            issues.bad("box", f"region[{i}]: {why}")
            continue
        if cap is None and not rtags:
            continue  # nothing to align it with
        boxes.append(box)
        region_text.append(cap)
        region_tags.append(rtags)
        region_class.append(cat)

    masks, mask_text, mask_tags, mask_class, mask_isthing = [], [], [], [], []
    for i, s in enumerate(segments):
        try:
            rle = s["rle"]
            cap = _optional_text(s.get("caption"), f"segment[{i}].caption", issues)
            stags = _clean_texts(s.get("tags"), f"segment[{i}].tags", issues)
            cat = int(s.get("category", -1))
            isthing = bool(s.get("isthing", False))
        except BadRecordError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BadRecordError("parse", source, f"segment[{i}]: {type(e).__name__}: {e}") from e
        try:
            size = [int(v) for v in rle["size"]]
        except Exception as e:  # noqa: BLE001
            issues.bad("mask", f"segment[{i}]: RLE has no valid size ({e})")
            continue
        if size != [height, width]:
            issues.bad("mask", f"segment[{i}]: mask is {size}, image is {[height, width]}")
            continue
        try:
            m = np.asarray(records.rle_to_mask(rle))
        except Exception as e:  # noqa: BLE001 - pycocotools raises several types
            issues.bad("mask", f"segment[{i}]: RLE does not decode ({type(e).__name__}: {e})")
            continue
        if m.shape != (height, width):
            issues.bad("mask", f"segment[{i}]: decoded mask is {m.shape}")
            continue
        if not m.any():
            issues.bad("mask", f"segment[{i}]: mask is empty")
            continue
        if cap is None and not stags:
            continue
        masks.append(m.astype(bool).view(np.uint8))
        mask_text.append(cap)
        mask_tags.append(stags)
        mask_class.append(cat)
        mask_isthing.append(isthing)

    return {
        "source": source,
        "image": image,
        "captions": captions,
        "tags": tags,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "region_text": region_text,
        "region_tags": region_tags,
        "region_class": np.asarray(region_class, np.int32),
        "masks": (np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)),
        "mask_text": mask_text,
        "mask_tags": mask_tags,
        "mask_class": np.asarray(mask_class, np.int32),
        "mask_isthing": np.asarray(mask_isthing, bool),
        "weight": weight,
        "drop_counts": issues.counts,
    }


# ----------------------------------------------------------------------------- geometry ---

# A crop is (x0, y0, cw, ch) in integer pixels of the decoded image.
Crop = tuple[int, int, int, int]


def sample_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Crop:
    """Random-resized-crop window (the Inception / torchvision recipe).

    Area fraction ~ U(scale), log aspect ratio (w / h) ~ U(log ratio); ten tries, then the
    largest centred window within ``ratio``. Returns ``(x0, y0, cw, ch)`` ints inside the image.
    """
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= width and 0 < ch <= height:
            x0 = int(rng.integers(0, width - cw + 1))
            y0 = int(rng.integers(0, height - ch + 1))
            return x0, y0, cw, ch
    in_ratio = width / height
    if in_ratio < ratio[0]:
        cw, ch = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = height, int(round(height * ratio[1]))
    else:
        cw, ch = width, height
    return (width - cw) // 2, (height - ch) // 2, cw, ch


def resize_image(image: np.ndarray, crop: Crop, flip: bool, size: int) -> np.ndarray:
    """``[H, W, 3] uint8`` -> ``[size, size, 3] uint8``: crop, bilinear resize, optional h-flip."""
    x0, y0, cw, ch = crop
    out = Image.fromarray(image).resize(
        (size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)
    )
    arr = np.asarray(out)
    return np.ascontiguousarray(arr[:, ::-1]) if flip else arr


def transform_boxes(boxes: np.ndarray, crop: Crop, flip: bool, size: int) -> np.ndarray:
    """``[R, 4]`` absolute pixels of the source -> ``[R, 4] float32`` pixels of the output image.

    Boxes are clipped to the crop (a box entirely outside gets zero width or height).
    """
    x0, y0, cw, ch = crop
    b = boxes.astype(np.float64).reshape(-1, 4)
    xs = np.clip((b[:, [0, 2]] - x0) * (size / cw), 0, size)
    ys = np.clip((b[:, [1, 3]] - y0) * (size / ch), 0, size)
    if flip:
        xs = size - xs[:, ::-1]
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)


def _nearest_index(start: int, extent: int, limit: int, size: int) -> np.ndarray:
    """Source index of each output pixel's centre for a nearest resample; ``[size] int``."""
    idx = np.floor(start + (np.arange(size) + 0.5) * (extent / size)).astype(np.int64)
    return np.clip(idx, 0, limit - 1)


def transform_masks(masks: np.ndarray, crop: Crop, flip: bool, size: int) -> np.ndarray:
    """``[M, H, W] uint8`` -> ``[M, size, size] uint8``: crop, nearest resample, optional h-flip."""
    _, height, width = masks.shape
    x0, y0, cw, ch = crop
    ys = _nearest_index(y0, ch, height, size)
    xs = _nearest_index(x0, cw, width, size)
    if flip:
        xs = xs[::-1]
    return masks[:, ys[:, None], xs[None, :]]


def normalize(image: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """``[H, W, 3] uint8`` -> ``[H, W, 3] float32``: ``(x / 255 - mean) / std``."""
    scale = np.asarray(std, np.float32) * 255.0
    return (image.astype(np.float32) - np.asarray(mean, np.float32) * 255.0) / scale


def keep_largest(areas: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``areas`` (ties: earlier first), in their original order."""
    order = np.argsort(-np.asarray(areas), kind="stable")[:k]
    return np.sort(order)


def build_segmap(masks: np.ndarray) -> np.ndarray:
    """``[M, S, S] uint8`` -> ``[S, S] int32`` mask index per pixel, -1 where no mask.

    Where masks overlap the smaller one wins (a thing drawn over the stuff around it).
    """
    seg = np.full(masks.shape[1:], -1, np.int32)
    areas = np.count_nonzero(masks.reshape(len(masks), masks.shape[1] * masks.shape[2]), axis=1)
    for i in np.argsort(-areas, kind="stable"):
        seg[masks[i].astype(bool)] = i
    return seg


def pool_masks(masks: np.ndarray, patch: int) -> np.ndarray:
    """``[M, S, S]`` -> ``[M, S/p, S/p] float32``: fraction of each ``p x p`` cell covered."""
    m, s, _ = masks.shape
    g = s // patch
    counts = masks.reshape(m, g, patch, g, patch).sum(axis=(2, 4), dtype=np.int32)
    return counts.astype(np.float32) / np.float32(patch * patch)


def pixel_target(segmap: np.ndarray, num_masks: int, patch: int) -> np.ndarray:
    """``[S, S] int32`` segmap -> ``[S/p, S/p] int32`` dominant mask per cell.

    The mask covering the most pixels of the cell, or -1 when the unlabeled pixels are at least
    as many as that mask's (ties between masks: the lower index).
    """
    s = segmap.shape[0]
    g = s // patch
    if num_masks == 0:
        return np.full((g, g), -1, np.int32)
    cell = (np.arange(s) // patch)[:, None] * g + (np.arange(s) // patch)[None, :]
    # counts[c, k + 1]: pixels of mask k in cell c; column 0 = unlabeled
    counts = np.bincount(
        (cell * (num_masks + 1) + segmap + 1).ravel(), minlength=g * g * (num_masks + 1)
    ).reshape(g * g, num_masks + 1)
    best = counts[:, 1:].argmax(-1)
    best_count = counts[np.arange(g * g), best + 1]
    return np.where(best_count > counts[:, 0], best, -1).astype(np.int32).reshape(g, g)


# ------------------------------------------------------------------------------ example ---


def _pick_tag(tags: list[str], rng: np.random.Generator | None) -> str:
    return tags[0] if rng is None or len(tags) == 1 else tags[int(rng.integers(len(tags)))]


@functools.lru_cache(maxsize=8)
def _vocab_index(vocab: tuple[str, ...]) -> dict[str, int]:
    return {name: i for i, name in enumerate(vocab)}


def _unzip(pairs: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    return [t for t, _ in pairs], [i for _, i in pairs]


def example_keys() -> tuple[str, ...]:
    """Keys of one example: the batch keys plus ``drop_counts``."""
    return (*schema.BATCH_KEYS, "drop_counts")


def make_example(
    raw: bytes,
    rng: np.random.Generator | None,
    cfg: TransformConfig,
    tokenize,
) -> dict[str, np.ndarray]:
    """One stored record -> one example (schema.py form 2, no batch axis).

    Args:
      raw: the record bytes.
      rng: per-example generator (train: crop, flip, caption / tag choice); unused in eval.
      cfg: the transform settings.
      tokenize: ``(list[str], length) -> [N, length] int32`` (``tokenizer.tokenizer_for(...)``).

    Returns the batch keys of ``schema.BATCH_KEYS`` (shapes there, without B) plus
    ``label [] int32`` (category of the largest thing mask in the final image, -1 if none) and
    ``drop_counts [K] int32`` (element-level bad inputs dropped from this record, by KINDS).

    Raises :class:`BadRecordError` for a record that cannot be used (any kind when strict).
    """
    d = decode(raw, strict=cfg.strict)
    train = cfg.train and rng is not None
    S, p = cfg.image_size, cfg.patch_size
    h, w = d["image"].shape[:2]
    crop = sample_crop(rng, h, w, cfg.crop_scale, cfg.crop_ratio) if train else (0, 0, w, h)
    flip = bool(train and cfg.flip and rng.random() < 0.5)

    image = normalize(resize_image(d["image"], crop, flip, S), cfg.mean, cfg.std)

    # Regions: transform, drop what fell out / shrank, keep the largest R.
    boxes = transform_boxes(d["boxes"], crop, flip, S)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (S * S)
    min_frac = cfg.min_region_frac if train else 0.0
    ok = np.flatnonzero((areas > 0) & (areas >= min_frac))
    ridx = ok[keep_largest(areas[ok], cfg.max_regions)]

    # Masks: same crop / flip, nearest resample to S x S.
    masks = transform_masks(d["masks"], crop, flip, S)
    mareas = np.count_nonzero(masks.reshape(masks.shape[0], S * S), axis=1) / (S * S)
    min_mfrac = cfg.min_mask_frac if train else 0.0
    ok = np.flatnonzero((mareas > 0) & (mareas >= min_mfrac))
    midx = ok[keep_largest(mareas[ok], cfg.max_masks)]
    masks = masks[midx]
    segmap = build_segmap(masks)

    # Texts, in one tokeniser call: caption, tags, region texts, mask texts.
    trng = rng if train else None
    caps = d["captions"]
    caption = (caps[int(rng.integers(len(caps)))] if train else caps[0]) if caps else None
    tags = d["tags"]
    if len(tags) > cfg.max_tags:
        tags = [tags[i] for i in np.sort(rng.permutation(len(tags))[: cfg.max_tags])] if train \
            else tags[: cfg.max_tags]
    tag_texts = [cfg.prompt_template.format(t) for t in tags]
    vocab = _vocab_index(cfg.text_vocab)
    tag_ids = [vocab.get(t, -1) for t in tags]

    def element_text(caption: str | None, tags: list[str]) -> tuple[str, int]:
        # UMG-CLIP aligns regions / masks with both their captions and their tags: in training
        # either may be drawn, so that both phrase- and category-style queries work at test time.
        use_tag = caption is None or (
            trng is not None and tags and trng.random() < cfg.tag_text_prob)
        if not use_tag:
            return caption, -1
        tag = _pick_tag(tags, trng)
        return cfg.prompt_template.format(tag), vocab.get(tag, -1)

    region_texts, region_ids = _unzip([element_text(d["region_text"][i], d["region_tags"][i])
                                       for i in ridx])
    mask_texts, mask_ids = _unzip([element_text(d["mask_text"][i], d["mask_tags"][i])
                                   for i in midx])
    # The caption at the full context L; tags / region / mask texts (short phrases) at Le <= L.
    # The text tower is causal, so a text that fits in Le embeds exactly as it would at L.
    L, Le = cfg.context_length, cfg.element_length
    cap_tokens = np.asarray(tokenize([caption or ""], L), np.int32)
    elements = tag_texts + region_texts + mask_texts
    tokens = np.asarray(tokenize(elements + [""], Le), np.int32)
    empty = tokens[-1]  # filler for padded rows
    if cap_tokens.shape != (1, L) or tokens.shape != (len(elements) + 1, Le):
        raise ValueError(f"tokenizer returned {cap_tokens.shape} / {tokens.shape}, expected "
                         f"{(1, L)} / {(len(elements) + 1, Le)}")
    nt, nr, nm = len(tag_texts), len(region_texts), len(mask_texts)

    def padded(rows: np.ndarray, n: int) -> np.ndarray:
        out = np.broadcast_to(empty, (n, Le)).copy()
        out[: len(rows)] = rows
        return out

    def padded_ids(ids: list[int], n: int) -> np.ndarray:
        out = np.full((n,), -1, np.int32)
        out[: len(ids)] = ids
        return out

    T, R, M = cfg.max_tags, cfg.max_regions, cfg.max_masks
    region_boxes = np.zeros((R, 4), np.float32)
    region_boxes[:nr] = boxes[ridx] / S
    region_class = np.full((R,), -1, np.int32)
    region_class[:nr] = d["region_class"][ridx]
    mask_area = np.zeros((M, S // p, S // p), np.float32)
    mask_area[:nm] = pool_masks(masks, p)
    mask_class = np.full((M,), -1, np.int32)
    mask_class[:nm] = d["mask_class"][midx]
    mask_isthing = np.zeros((M,), bool)
    mask_isthing[:nm] = d["mask_isthing"][midx]

    final_areas = mareas[midx]
    things = np.flatnonzero(mask_isthing[:nm] & (mask_class[:nm] >= 0))
    label = int(mask_class[things[np.argmax(final_areas[things])]]) if things.size else -1

    return {
        "image": image,
        "text": cap_tokens[0],
        "text_valid": np.bool_(caption is not None),
        "tags": padded(tokens[:nt], T),
        "tags_valid": np.arange(T) < nt,
        "tags_id": padded_ids(tag_ids, T),
        "region_boxes": region_boxes,
        "region_text": padded(tokens[nt : nt + nr], R),
        "region_valid": np.arange(R) < nr,
        "region_text_id": padded_ids(region_ids, R),
        "mask_area": mask_area,
        "mask_text": padded(tokens[nt + nr : nt + nr + nm], M),
        "mask_valid": np.arange(M) < nm,
        "mask_text_id": padded_ids(mask_ids, M),
        "pixel_target": pixel_target(segmap, nm, p),
        "region_class": region_class,
        "mask_class": mask_class,
        "mask_isthing": mask_isthing,
        "segmap": segmap,
        "example_weight": np.float32(d["weight"]),
        "label": np.int32(label),
        "drop_counts": d["drop_counts"],
    }


class ExampleTransform:
    """Picklable ``(raw bytes, rng) -> example`` for Grain workers (tokenizer built lazily)."""

    def __init__(self, cfg: TransformConfig):
        self.cfg = cfg
        self._tokenizer = None

    def __getstate__(self):
        return {"cfg": self.cfg}

    def __setstate__(self, state):
        self.cfg, self._tokenizer = state["cfg"], None

    def tokenize(self, texts: list[str], context_length: int | None = None) -> np.ndarray:
        if self._tokenizer is None:
            from umg_jax.data import tokenizer

            self._tokenizer = tokenizer.tokenizer_for(self.cfg.tokenizer, self.cfg.context_length,
                                                      self.cfg.pad_id)
        return self._tokenizer(texts, context_length)

    def __call__(self, raw: bytes, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        return make_example(raw, rng, self.cfg, self.tokenize)
