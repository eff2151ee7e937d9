"""Open-vocabulary panoptic segmentation on COCO-panoptic-format files: PQ, SQ, RQ (all,
things, stuff), matched at IoU > 0.5 with panopticapi's void and crowd rules
(``metrics.PanopticAccumulator``).

Layouts read (``--data DIR``):

* ``coco_panoptic``: ``annotations/panoptic_val2017.json`` + ``annotations/panoptic_val2017/*.png``
  (the inner zip of ``panoptic_annotations_trainval2017.zip`` unpacked in place; the JSON and PNG
  folder may also sit in ``DIR`` itself) + ``val2017/*.jpg``; ``--split train`` -> ``*train2017``.
* ``ade_panoptic``: Mask2Former's ADE20K panoptic conversion
  (``datasets/prepare_ade20k_pan_seg.py``) inside ``ADEChallengeData2016/``:
  ``ade20k_panoptic_val.json`` + ``ade20k_panoptic_val/*.png`` + ``images/validation/*.jpg``
  (``--split train`` -> ``*_train`` / ``images/training``).

PNG segment id = R + 256 G + 256^2 B, 0 = void; categories, ``isthing`` and ``iscrowd`` from the
JSON. Segments are *predicted*, never taken from the ground truth: the segmentation head
(``sliding.sliding_head_panoptic``: the head's queries on sliding windows at the benchmark
resolution, one Mask2Former panoptic merge per image at the run's thresholds) when the run has
one, else the training-free backbone segments (``segmentation.free_panoptic``: 8-connected
components of each thing class, one segment per stuff class, of the sliding-window label map).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from umg_jax.downstream import common, semantic, sliding
from umg_jax.downstream.common import BenchmarkInputError, BenchModel, Options, TaskResult
from umg_jax.evaluators import metrics


@dataclasses.dataclass
class PanSplit:
    """A panoptic split: images, their ground-truth PNGs and segment lists, the categories."""

    images: list[pathlib.Path]
    pngs: list[pathlib.Path]
    segments: list[list[dict]]  # each annotation's ``segments_info``
    names: list[str]  # category names as prompted
    isthing: np.ndarray  # [C] bool
    cat_index: dict[int, int]  # JSON category id -> index into ``names``
    layout: str
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


def prompt_name(name: str) -> str:
    """A category name as prompted: the first synonym, COCO's ``-merged`` / ``-other`` suffixes
    dropped, ``-`` / ``_`` as spaces (``"wall-other-merged"`` -> ``"wall"``)."""
    n = name.split(",")[0].strip()
    n = re.sub(r"(-merged|-other)+$", "", n)
    return re.sub(r"[-_]+", " ", n).strip()


def read_split(json_path: pathlib.Path, png_dir: pathlib.Path, image_dir: pathlib.Path,
               layout: str) -> PanSplit:
    """The COCO panoptic JSON + PNG folder + image folder; examples sorted by image file."""
    for p in (png_dir, image_dir):
        if not p.is_dir():
            raise BenchmarkInputError(f"missing split folder {p}")
    if not json_path.is_file():
        raise BenchmarkInputError(f"missing panoptic JSON {json_path}")
    try:
        data = json.loads(json_path.read_text())
        cats = data["categories"]
        files = {im["id"]: im["file_name"] for im in data["images"]}
        anns = data["annotations"]
    except (ValueError, KeyError, TypeError) as e:
        raise BenchmarkInputError(f"{json_path} is not a COCO panoptic JSON ({e!r})") from None
    if not cats:
        raise BenchmarkInputError(f"{json_path} has an empty category list")
    raw = [c["name"] for c in cats]
    names = [prompt_name(n) for n in raw]
    if len(set(names)) != len(names):  # cleaning merged two names: prompt the raw ones
        names = raw
    split = PanSplit([], [], [], names, np.array([bool(c.get("isthing", 0)) for c in cats]),
                     {int(c["id"]): i for i, c in enumerate(cats)}, layout)
    rows, no_png, no_image = [], 0, 0
    annotated = set()
    for a in anns:
        annotated.add(a["image_id"])
        png, img = png_dir / a["file_name"], image_dir / files.get(a["image_id"], "")
        if not png.is_file():
            no_png += 1
        elif a["image_id"] not in files or not img.is_file():
            no_image += 1
        else:
            rows.append((img, png, a["segments_info"]))
    no_png += len(set(files) - annotated)
    for img, png, segs in sorted(rows, key=lambda r: r[0].name):
        split.images.append(img)
        split.pngs.append(png)
        split.segments.append(segs)
    split.skipped = {k: v for k, v in (("no label file", no_png), ("no image file", no_image))
                     if v}
    return split


def coco_split(opts: Options) -> PanSplit:
    s = {"val": "val2017", "train": "train2017"}.get(opts.split, opts.split)
    d = opts.data
    ann = d / "annotations" if (d / "annotations" / f"panoptic_{s}.json").is_file() else d
    return read_split(ann / f"panoptic_{s}.json", ann / f"panoptic_{s}", d / s,
                      f"panoptic_{s}.json + panoptic_{s}/*.png + {s}/*.jpg")


def ade_split(opts: Options) -> PanSplit:
    s = {"val": "val", "validation": "val", "train": "train", "training": "train"}.get(
        opts.split, opts.split)
    root = opts.data / "ADEChallengeData2016" if (opts.data / "ADEChallengeData2016").is_dir() \
        else opts.data
    images = {"val": "validation", "train": "training"}.get(s, s)
    return read_split(root / f"ade20k_panoptic_{s}.json", root / f"ade20k_panoptic_{s}",
                      root / "images" / images,
                      f"Mask2Former's ADE20K panoptic conversion: ADEChallengeData2016/"
                      f"ade20k_panoptic_{s}.json + ade20k_panoptic_{s}/*.png + images/{images}")


SPLITS: dict[str, Callable[[Options], PanSplit]] = {"coco_panoptic": coco_split,
                                                    "ade_panoptic": ade_split}


def read_target(split: PanSplit, i: int, hw: tuple[int, int]
                ) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    """Example ``i``'s ground truth: ``(seg [H, W] int64`` segment id, -1 = void, ``{id:
    class}`` of the regular segments, ``{id: class}`` of the crowd ones); ``BenchmarkInputError``
    for a size mismatch, an id missing from the JSON or an unknown category."""
    from PIL import Image

    path = split.pngs[i]
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    except OSError as e:
        raise BenchmarkInputError(f"cannot read panoptic PNG {path}: {e}") from None
    if rgb.shape[:2] != tuple(hw):
        raise BenchmarkInputError(f"panoptic PNG {path} is {rgb.shape[1]}x{rgb.shape[0]} but "
                                  f"its image {split.images[i]} is {hw[1]}x{hw[0]}")
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    cls, crowd = {}, {}
    for s in split.segments[i]:
        cat = int(s["category_id"])
        if cat not in split.cat_index:
            raise BenchmarkInputError(f"{path}: segment {s['id']} has category {cat}, not in the "
                                      f"{len(split.cat_index)}-category list")
        (crowd if s.get("iscrowd", 0) else cls)[int(s["id"])] = split.cat_index[cat]
    unknown = set(np.unique(ids).tolist()) - set(cls) - set(crowd) - {0}
    if unknown:
        raise BenchmarkInputError(f"{path} has segment ids {sorted(unknown)[:5]} that its JSON "
                                  "annotation does not list")
    return np.where(ids == 0, -1, ids), cls, crowd


def _head_predictions(model: BenchModel, images: Iterator[np.ndarray], split: PanSplit,
                      templates: tuple[str, ...], opts: Options
                      ) -> Iterator[tuple[np.ndarray, dict[int, int]]]:
    seg = model.segmenter
    text, _ = semantic.text_embeddings(model, split.names, templates)
    seen = np.array([n in seg.train_labels for n in split.names])
    yield from sliding.sliding_head_panoptic(seg, images, text, split.isthing, seen, opts,
                                             bool(seg.config.seg.ensemble))


def _free_predictions(model: BenchModel, images: Iterator[np.ndarray], split: PanSplit,
                      templates: tuple[str, ...], opts: Options
                      ) -> Iterator[tuple[np.ndarray, dict[int, int]]]:
    from umg_jax.evaluators.segmentation import free_panoptic

    text, scale = semantic.text_embeddings(model, split.names, templates)
    for sem in sliding.sliding_labels(model.backbone, images, text, opts, scale):
        yield free_panoptic(sem, split.isthing)


def predictor_protocol(model: BenchModel, opts: Options) -> dict[str, Any]:
    """How segments were predicted and the thresholds used (fixed before evaluation)."""
    if model.segmenter is not None:
        from umg_jax import checkpoint

        seg = model.segmenter.config.seg
        cal = checkpoint.read_seg_calibration(model.source) if model.source else None
        source = ("the run's validation split (python -m umg_jax.evaluate --calibrate: "
                  f"{checkpoint.SEG_CALIBRATION}, objective {cal.get('objective')}, split "
                  f"{cal.get('split')}); never tuned on an evaluation split" if cal else
                  "the run's config; configs/common.py and configs/seg_*.py keep Mask2Former's "
                  "published test defaults (0.8 / 0.8), never tuned on an evaluation split")
        return {**sliding.protocol(model.backbone, opts),
                "predictor": "segmentation head (Mask2Former panoptic merge) on sliding windows "
                             "at the benchmark resolution",
                "inference": "sliding window: per window, the head's queries whose best "
                             "non-void class beats object_threshold are candidates (window-"
                             "sized masks); candidates of one class from two windows whose "
                             "masks overlap at IoU >= fuse_iou inside the shared area are one "
                             "object (masks and scores averaged); one Mask2Former merge over "
                             "all of an image's candidates at the resized resolution; segment "
                             "map resized to the original size (nearest)",
                "fuse_iou": sliding.FUSE_IOU,
                "object_threshold": float(seg.object_threshold),
                "overlap_threshold": float(seg.overlap_threshold), "mask_threshold": 0.5,
                "ensemble": bool(seg.ensemble), "thresholds_source": source}
    return {"predictor": "training-free: sliding-window label map of the backbone, 8-connected "
                         "components per thing class, one segment per stuff class",
            "thresholds": "none", **sliding.protocol(model.backbone, opts)}


def evaluate(model: BenchModel, opts: Options, task: str, split: PanSplit) -> TaskResult:
    """Predicted panoptic segments over ``split``, scored with PQ / SQ / RQ in percent."""
    n = len(split.images) if opts.num_examples is None else min(opts.num_examples,
                                                                len(split.images))
    if n == 0:
        why = ", ".join(f"{v} {k}" for k, v in split.skipped.items()) or "none found"
        raise BenchmarkInputError(f"{task}: no image with a panoptic label to evaluate ({why})")
    templates = common.resolve_templates(opts, semantic.DENSE_TEMPLATES)
    images = common.read_images([str(p) for p in split.images[:n]], opts.workers)
    preds = (_head_predictions(model, images, split, templates, opts)
             if model.segmenter is not None
             else _free_predictions(model, images, split, templates, opts))
    acc = metrics.PanopticAccumulator(len(split.names), split.isthing)
    t0 = time.perf_counter()
    for i, (pseg, pcls) in enumerate(common.progress(preds, n, task)):
        gseg, gcls, crowd = read_target(split, i, pseg.shape)
        acc.update(pseg, pcls, gseg, gcls, crowd)
    elapsed = time.perf_counter() - t0
    s = acc.scores()
    out = {k: 100 * v for k, v in s.items()}
    return TaskResult(task=task, metrics=out, protocol={
        "layout": split.layout, "num_classes": len(split.names),
        "num_things": int(split.isthing.sum()), "templates": list(templates),
        "class_names": "JSON category names: first synonym, '-merged' / '-other' dropped, "
                       "'-' as space",
        "metrics": "PQ / SQ / RQ in percent, panopticapi rules: IoU > 0.5 with void pixels "
                   "left out of the union, crowd segments neither matched nor missed, a "
                   "prediction more than half on void or same-class crowd not a false "
                   "positive; averaged over categories with TP + FP + FN > 0",
        "paper": semantic.PAPER_NOTE, **predictor_protocol(model, opts),
        **({"seen_classes": sum(c in model.segmenter.train_labels for c in split.names)}
           if model.segmenter is not None else {})}, num_examples=n,
        images_per_s=n / max(elapsed, 1e-9), skipped=dict(split.skipped))


TASKS: dict[str, Callable[[BenchModel, Options], TaskResult]] = common.split_tasks(
    evaluate, SPLITS)
