"""Region classification: ``coco_boxes`` (ground-truth boxes of COCO val2017 among the 80 names).

Layout, as distributed: ``DATA/annotations/instances_<split>.json`` (or ``DATA/instances_<split>
.json``) and the images in ``DATA/<split>/`` (split ``val2017``).

Protocol (RegionCLIP / CLIPSelf box classification, on this model's dense map): each image's
dense map at the benchmark resolution (``sliding.sliding_dense``: shorter side 448 for patch-14
models, else twice the input size, sides rounded to whole patches; sliding windows of the model's
input size with the window embeddings averaged per cell, or one pass with interpolated position
embeddings with ``--resize_pos``), L2-normalised per cell as ``umg_jax.evaluate``'s region
evaluator, is RoIAlign-pooled over each box (2x2 bins, 2 samples per bin side, aligned), the
pooled vector L2-normalised and classified against the prompt-ensembled 80 category names
(categories in id order). Crowd boxes (``iscrowd=1``) and boxes under 1 px wide or high are
skipped and counted. Metrics, percent: top-1 and mean per-class accuracy over all boxes, small
boxes (``w*h < 32^2``) and large boxes (``w*h > 96^2``); areas are the box's ``w*h`` in original
image pixels, not the annotation's segment ``area`` field that COCO's detection AP uses.
CLIPSelf runs its ViTs at 1024 px with interpolated position embeddings: ``--short_side 1024
--resize_pos``.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from collections import Counter

import numpy as np

from umg_jax.concurrency import map_threaded
from umg_jax.downstream import common
from umg_jax.downstream.common import BenchmarkInputError, BenchModel, Options, TaskResult

DEFAULT_SPLITS = {"coco_boxes": "val2017"}
SMALL, LARGE = 32 ** 2, 96 ** 2  # COCO's area thresholds, applied to the box area w*h


def read_instances(root: pathlib.Path, split: str):
    """``(category names [C] in id order, images [{path, width, height, boxes [R, 4] xywh,
    labels [R]}], skipped counts, json path)``, images in id order, boxless images dropped."""
    name = f"instances_{split}.json"
    found = [p for p in (root / "annotations" / name, root / name) if p.is_file()]
    if not found:
        raise BenchmarkInputError(f"coco_boxes: {name} not found in {str(root / 'annotations')!r}"
                                  f" or {str(root)!r}")
    image_dir = root / split
    if not image_dir.is_dir():
        raise BenchmarkInputError(f"coco_boxes: image folder {str(image_dir)!r} does not exist")
    try:
        d = json.loads(found[0].read_text())
        cats = sorted(d["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in cats]
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
        images = {im["id"]: {"path": image_dir / im["file_name"], "width": im["width"],
                             "height": im["height"], "boxes": [], "labels": []}
                  for im in d["images"]}
        skipped: Counter = Counter()
        for a in d["annotations"]:
            if a.get("iscrowd", 0):
                skipped["crowd box"] += 1
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            if w < 1 or h < 1:
                skipped["box under 1 px"] += 1
                continue
            if a["category_id"] not in cat_index:
                raise BenchmarkInputError(f"coco_boxes: annotation {a.get('id')} has category "
                                          f"{a['category_id']}, not in the category list")
            im = images[a["image_id"]]
            im["boxes"].append([x, y, w, h])
            im["labels"].append(cat_index[a["category_id"]])
    except (ValueError, KeyError, TypeError) as e:
        raise BenchmarkInputError(f"coco_boxes: {str(found[0])!r} is not a COCO instances file "
                                  f"({type(e).__name__}: {e})") from None
    if not names:
        raise BenchmarkInputError(f"coco_boxes: {str(found[0])!r} has an empty category list")
    out = []
    for i in sorted(images):
        im = images[i]
        if im["boxes"]:
            out.append(dict(im, boxes=np.asarray(im["boxes"], np.float32),
                            labels=np.asarray(im["labels"], np.int64)))
    return names, out, dict(skipped), found[0]


def box_metrics(pred: np.ndarray, gt: np.ndarray, area: np.ndarray) -> dict[str, float]:
    """Top-1 and mean per-class accuracy (over classes present) of ``pred`` / ``gt [N]``, for
    all boxes and the small / large ones (``area [N]`` = w*h px); percent. A bucket with no box
    is left out."""
    out = {}
    for suffix, sel in (("", np.ones(len(gt), bool)), ("_small", area < SMALL),
                        ("_large", area > LARGE)):
        if not sel.any():
            continue
        p, g = pred[sel], gt[sel]
        per = [np.mean(p[g == c] == c) for c in np.unique(g)]
        out[f"top1{suffix}"] = common.percent(np.mean(p == g))
        out[f"mean_class_acc{suffix}"] = common.percent(np.mean(per))
        out[f"count{suffix}"] = float(sel.sum())
    return out


@functools.cache
def _pool_fn():
    """Jitted ``(dense [1, gh, gw, E], boxes [1, R, 4] normalised xyxy) -> [1, R, E]`` (one
    compile per grid shape and box bucket)."""
    import jax

    from umg_jax.ops.roi_align import roi_pool_embed

    return jax.jit(lambda f, b: roi_pool_embed(f, b, 2, 2))


def run(model: BenchModel, opts: Options) -> TaskResult:
    from umg_jax.downstream import sliding

    root = pathlib.Path(opts.data)
    if not root.is_dir():
        raise BenchmarkInputError(f"coco_boxes: --data {str(root)!r} is not a directory")
    split = "val2017" if opts.split == "val" else opts.split
    names, images, skipped, path = read_instances(root, split)
    if opts.num_examples is not None:
        images = images[:opts.num_examples]
    if not images:
        raise BenchmarkInputError(f"coco_boxes: no box to classify in {str(path)!r}")
    bb = model.backbone
    templates = common.resolve_templates(opts, common.package_list("imagenet_templates.txt"))
    text = common.class_embeddings(bb, names, templates)
    dense_protocol = sliding.protocol(bb, opts)  # checks the options before any image is read

    def load(im):
        img = common.load_image(im["path"])
        if img.shape[:2] != (im["height"], im["width"]):
            raise BenchmarkInputError(f"coco_boxes: {str(im['path'])!r} is {img.shape[1]}x"
                                      f"{img.shape[0]}, the annotations say {im['width']}x"
                                      f"{im['height']}")
        return img

    pool = _pool_fn()
    preds, gts, areas = [], [], []
    t0 = time.perf_counter()
    decoded = common.progress(map_threaded(load, images, opts.workers), len(images),
                              "coco_boxes")
    for im, dense in zip(images, sliding.sliding_dense(bb, decoded, opts), strict=True):
        x, y, w, h = im["boxes"].T
        # Boxes padded to a power of two: few compiled shapes. Normalised coordinates are
        # those of the resized image too (the resize keeps the aspect ratio, up to rounding).
        r = max(8, 1 << int(np.ceil(np.log2(len(x)))))
        boxes = np.zeros((1, r, 4), np.float32)
        boxes[0, :len(x)] = np.stack([x, y, x + w, y + h], 1) / np.array(
            [im["width"], im["height"]] * 2, np.float32)
        emb = np.array(pool(dense[None], boxes)[0, :len(x)], np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-8)
        preds.append(np.argmax(emb @ text.T, -1))
        gts.append(im["labels"])
        areas.append(w * h)
    seconds = time.perf_counter() - t0
    m = box_metrics(np.concatenate(preds), np.concatenate(gts), np.concatenate(areas))
    return TaskResult(
        task="coco_boxes", metrics=m,
        protocol={"annotations": str(path), "split": split, "num_classes": len(names),
                  "templates": opts.templates, "num_templates": len(templates),
                  **dense_protocol,
                  "dense_map": "whole image at the shorter side above (sides rounded to whole "
                               "patches): sliding windows with per-cell mean of the L2-"
                               "normalised window embeddings, or one pass with interpolated "
                               "position embeddings (--resize_pos)",
                  "box_embedding": "RoIAlign (2x2 bins, sampling 2, aligned) mean over the "
                                   "L2-normalised dense map, L2-normalised",
                  "area": "box w*h in original pixels; small < 32^2, large > 96^2",
                  "skipped": "crowd boxes and boxes under 1 px",
                  "deviation": "CLIPSelf / RegionCLIP run at 1024 px with interpolated "
                               "position embeddings: --short_side 1024 --resize_pos"},
        num_examples=int(m["count"]), images_per_s=len(images) / max(seconds, 1e-9),
        skipped=skipped)


TASKS = {"coco_boxes": run}
