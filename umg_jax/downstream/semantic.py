"""Open-vocabulary semantic segmentation on the data sets' own files: mIoU and pixel accuracy.

Layouts read (``--data DIR``: the folder named first, or any folder above it shown here):

* ``ade150``: ``ADEChallengeData2016/images/validation/*.jpg`` + ``annotations/validation/*.png``
  (``--split train`` -> ``training``); label 0 ("other") ignored, 1..150 -> the 150 classes.
* ``voc20``: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt}``;
  palette PNGs read as indices; 255 (boundary) ignored, 0 (background) excluded, 1..20 -> the 20
  object classes (the open-vocabulary papers' "VOC-20").
* ``context59``: mmsegmentation's Pascal Context layout, ``VOCdevkit/VOC2010/{JPEGImages,
  SegmentationClassContext, ImageSets/SegmentationContext/val.txt}`` (the ``.png`` labels its
  converter writes); 0 (background) ignored, 1..59 -> the 59 classes.
* ``folder_seg``: ``images/*.{jpg,png,...}`` + ``labels/<same stem>.png`` (or under
  ``DIR/<split>/``) with ``--classes``; label value i = class i, 255 ignored.

Predictions: the segmentation head's semantic inference when the run has one, else
sliding-window dense inference of the backbone (``sliding.py``); the confusion matrix and scores
are ``evaluators/metrics.py``'s.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from umg_jax.downstream import common, sliding
from umg_jax.downstream.common import BenchmarkInputError, BenchModel, Options, TaskResult
from umg_jax.evaluators import metrics

DATA = pathlib.Path(__file__).parent / "data"
# Dense tasks' prompt ensemble, fixed a priori (never chosen on an evaluation split): two plain
# templates of OpenAI's 80 and the five "scene" templates MaskCLIP (Zhou et al., ECCV 2022)
# appends to them for segmentation.
DENSE_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "there is a {} in the scene.",
                   "there is the {} in the scene.", "this is a {} in the scene.",
                   "this is the {} in the scene.", "this is one {} in the scene.")
IGNORE = 255  # the datasets' "ignore" / boundary label value
PAPER_NOTE = ("UMG-CLIP's evaluation code is not public; its dense numbers come from a head "
              "trained on top (SAN / FC-CLIP-like). Here: the run's own segmentation head if it "
              "has one, else the training-free dense map; resolution, windows and templates "
              "follow mmsegmentation's slide inference and MaskCLIP")


@dataclasses.dataclass
class SegSplit:
    """A semantic-segmentation split: image / label file pairs and how to read the labels."""

    images: list[pathlib.Path]
    labels: list[pathlib.Path]
    classes: list[str]
    offset: int  # class index = label value - offset
    ignore: tuple[int, ...]  # label values ignored (-1)
    layout: str  # the files read, for the protocol
    ignore_note: str  # the ignore handling, for the protocol
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


def _find_root(data: pathlib.Path, marker: str, parents: Sequence[str]) -> pathlib.Path:
    """The folder holding ``marker``: ``data`` itself or ``data/<p>`` for ``p`` in ``parents``."""
    for cand in (data, *(data / p for p in parents)):
        if (cand / marker).is_dir():
            return cand
    raise BenchmarkInputError(f"{data}: missing folder {marker!r} (looked in {data} and "
                              f"{', '.join(str(data / p) for p in parents)})")


def _need_dir(path: pathlib.Path) -> pathlib.Path:
    if not path.is_dir():
        raise BenchmarkInputError(f"missing split folder {path}")
    return path


def _pair(images: list[pathlib.Path], label_dir: pathlib.Path
          ) -> tuple[list[pathlib.Path], list[pathlib.Path], dict[str, int]]:
    """Keep images whose ``label_dir/<stem>.png`` exists; count the others."""
    ims, labs, missing = [], [], 0
    for im in images:
        lab = label_dir / f"{im.stem}.png"
        if lab.is_file():
            ims.append(im)
            labs.append(lab)
        else:
            missing += 1
    return ims, labs, ({"no label file": missing} if missing else {})


def _listed(root: pathlib.Path, list_file: pathlib.Path, image_dir: str, label_dir: str
            ) -> tuple[list[pathlib.Path], list[pathlib.Path], dict[str, int]]:
    """VOC-style split: ids from ``list_file``, ``<image_dir>/<id>.jpg`` +
    ``<label_dir>/<id>.png``."""
    if not list_file.is_file():
        raise BenchmarkInputError(f"missing split list {list_file}")
    _need_dir(root / image_dir)
    _need_dir(root / label_dir)
    ids = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
    present = [root / image_dir / f"{i}.jpg" for i in ids]
    no_image = sum(not p.is_file() for p in present)
    ims, labs, skipped = _pair([p for p in present if p.is_file()], root / label_dir)
    if no_image:
        skipped["no image file"] = no_image
    return ims, labs, skipped


def ade150_split(opts: Options) -> SegSplit:
    root = _find_root(opts.data, "annotations", ("ADEChallengeData2016",))
    split = {"val": "validation", "train": "training"}.get(opts.split, opts.split)
    img_dir = _need_dir(root / "images" / split)
    ims, labs, skipped = _pair(sorted(img_dir.glob("*.jpg")),
                               _need_dir(root / "annotations" / split))
    return SegSplit(ims, labs, common.read_classes(DATA / "ade150.txt"), 1, (0,),
                    f"ADEChallengeData2016/images/{split}/*.jpg + annotations/{split}/*.png",
                    "label 0 (other) ignored; 1..150 = classes", skipped)


def voc20_split(opts: Options) -> SegSplit:
    root = _find_root(opts.data, "SegmentationClass", ("VOC2012", "VOCdevkit/VOC2012"))
    ims, labs, skipped = _listed(root, root / "ImageSets" / "Segmentation" / f"{opts.split}.txt",
                                 "JPEGImages", "SegmentationClass")
    return SegSplit(ims, labs, common.read_classes(DATA / "voc20.txt"), 1, (0, IGNORE),
                    f"VOC2012/JPEGImages + SegmentationClass (palette indices), "
                    f"ImageSets/Segmentation/{opts.split}.txt",
                    "255 (boundary) ignored; 0 (background) excluded (ignored), 20 classes",
                    skipped)


def context59_split(opts: Options) -> SegSplit:
    root = _find_root(opts.data, "SegmentationClassContext", ("VOC2010", "VOCdevkit/VOC2010"))
    ims, labs, skipped = _listed(
        root, root / "ImageSets" / "SegmentationContext" / f"{opts.split}.txt", "JPEGImages",
        "SegmentationClassContext")
    return SegSplit(ims, labs, common.read_classes(DATA / "context59.txt"), 1, (0, IGNORE),
                    "mmsegmentation layout: VOC2010/JPEGImages + SegmentationClassContext/*.png, "
                    f"ImageSets/SegmentationContext/{opts.split}.txt",
                    "label 0 (background) ignored; 1..59 = classes (255 ignored)", skipped)


def folder_seg_split(opts: Options) -> SegSplit:
    if opts.classes is None:
        raise BenchmarkInputError("folder_seg needs --classes (one class name per line; label "
                                  "value i = line i)")
    classes = common.read_classes(opts.classes)
    root = opts.data / opts.split if (opts.data / opts.split / "images").is_dir() else opts.data
    img_dir = _need_dir(root / "images")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in common.IMAGE_EXTENSIONS)
    ims, labs, skipped = _pair(images, _need_dir(root / "labels"))
    return SegSplit(ims, labs, classes, 0, (IGNORE,), "images/* + labels/<stem>.png",
                    "label value i = class i of --classes; 255 ignored", skipped)


SPLITS: dict[str, Callable[[Options], SegSplit]] = {
    "ade150": ade150_split, "voc20": voc20_split, "context59": context59_split,
    "folder_seg": folder_seg_split}


def read_label(path: pathlib.Path) -> np.ndarray:
    """A single-channel (L / P / I) label PNG -> ``int64 [H, W]`` values (palette indices for
    P); ``BenchmarkInputError`` for an unreadable or RGB file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise BenchmarkInputError(f"label {path} is a {im.mode} image; expected a "
                                          "single-channel (L / P) PNG of class values")
            return np.asarray(im).astype(np.int64)
    except (OSError, UnidentifiedImageError) as e:
        raise BenchmarkInputError(f"cannot read label {path}: {e}") from None


def decode_label(raw: np.ndarray, split: SegSplit, path: pathlib.Path) -> np.ndarray:
    """Label values -> ``int32 [H, W]`` class index, -1 where ignored; ``BenchmarkInputError``
    for values outside the class list."""
    ignored = np.isin(raw, split.ignore)
    cls = raw - split.offset
    bad = ~ignored & ((cls < 0) | (cls >= len(split.classes)))
    if bad.any():
        vals = sorted(set(np.unique(raw[bad]).tolist()))[:5]
        raise BenchmarkInputError(
            f"label {path} has values {vals} outside the {len(split.classes)}-class list "
            f"(valid: {split.offset}..{split.offset + len(split.classes) - 1}, ignored: "
            f"{list(split.ignore)})")
    return np.where(ignored, -1, cls).astype(np.int32)


def load_target(split: SegSplit, i: int, hw: tuple[int, int]) -> np.ndarray:
    """Class map of example ``i``; ``BenchmarkInputError`` if its size differs from ``hw``."""
    lab = decode_label(read_label(split.labels[i]), split, split.labels[i])
    if lab.shape != tuple(hw):
        raise BenchmarkInputError(f"label {split.labels[i]} is {lab.shape[1]}x{lab.shape[0]} "
                                  f"but its image {split.images[i]} is {hw[1]}x{hw[0]}")
    return lab


def text_embeddings(model: BenchModel, classes: Sequence[str], templates: Sequence[str]
                    ) -> tuple[np.ndarray, float]:
    """``([C, E] float32`` prompt-ensembled label embeddings, the mask logit scale)."""
    from umg_jax.evaluators.segmentation import mask_logit_scale

    if not classes:
        raise BenchmarkInputError("the class list is empty")
    text = np.asarray(model.backbone.encode_text_labels(list(classes), tuple(templates)),
                      np.float32)
    return text, mask_logit_scale(model.backbone)


def scores(cm: np.ndarray) -> dict[str, float]:
    """Confusion matrix -> ``{"miou", "pixel_acc"}`` in percent (``metrics.semseg_scores``)."""
    s = metrics.semseg_scores(cm)
    return {"miou": 100 * s["miou"], "pixel_acc": 100 * s["pixel_acc"]}


def evaluate(model: BenchModel, opts: Options, task: str, split: SegSplit) -> TaskResult:
    """Predictions over ``split`` (the run's segmentation head if it has one, else the
    backbone's sliding-window label maps), scored by one confusion matrix."""
    if not split.classes:
        raise BenchmarkInputError(f"{task}: the class list is empty")
    n = len(split.images) if opts.num_examples is None else min(opts.num_examples,
                                                                len(split.images))
    if n == 0:
        why = ", ".join(f"{v} {k}" for k, v in split.skipped.items()) or "none found"
        raise BenchmarkInputError(f"{task}: no image with a label to evaluate ({why})")
    templates = common.resolve_templates(opts, DENSE_TEMPLATES)
    text, scale = text_embeddings(model, split.classes, templates)
    c = len(split.classes)
    cm = np.zeros((c, c), np.int64)
    t0 = time.perf_counter()
    images = common.read_images([str(p) for p in split.images[:n]], opts.workers)
    if model.segmenter is not None:  # the head's semantic inference (Mask2Former's)
        from umg_jax.evaluators.segmentation import pixel_weight

        seg = model.segmenter
        seen = np.array([c in seg.train_labels for c in split.classes])
        preds = (s.argmax(-1).astype(np.int32) for s in sliding.sliding_head_scores(
            seg, images, text, seen, opts, bool(seg.config.seg.ensemble)))
        how = {"predictor": "segmentation head (Mask2Former semantic inference: sum over "
                            "queries of class probability x mask probability, FC-CLIP "
                            "ensemble when the run uses it, mixed with the frozen "
                            "per-pixel log-probabilities at pixel_weight) per sliding window, "
                            "scores averaged", "seen_classes": int(seen.sum()),
               "pixel_weight": pixel_weight(seg.config.seg, bool(seg.config.seg.ensemble)),
               **sliding.protocol(model.backbone, opts)}
    else:
        preds = sliding.sliding_labels(model.backbone, images, text, opts, scale)
        how = {"predictor": "backbone dense embeddings (MaskCLIP map), training-free",
               **sliding.protocol(model.backbone, opts)}
    for i, pred in enumerate(common.progress(preds, n, task)):
        cm += metrics.confusion_matrix(pred, load_target(split, i, pred.shape), c)
    elapsed = time.perf_counter() - t0
    return TaskResult(task=task, metrics=scores(cm), protocol={
        "layout": split.layout, "ignore": split.ignore_note, "num_classes": c,
        "templates": list(templates),
        "metrics": "mIoU over classes with union > 0 and pixel accuracy, one confusion matrix "
                   "over the split, ignored pixels excluded (mmsegmentation's convention)",
        "paper": PAPER_NOTE, **how}, num_examples=n,
        images_per_s=n / max(elapsed, 1e-9), skipped=dict(split.skipped))


TASKS: dict[str, Callable[[BenchModel, Options], TaskResult]] = common.split_tasks(
    evaluate, SPLITS)

