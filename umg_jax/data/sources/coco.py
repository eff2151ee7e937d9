"""COCO: ``captions_*.json`` + ``instances_*.json`` + ``panoptic_*.json`` (+ PNGs), any subset.

Mapping onto the schema (images joined by id, processed in id order):

- captions -> image ``captions``;
- instances (``iscrowd`` 0) -> one region per object (box, tags ``[category]``, no caption) and
  one thing segment per object (polygon or RLE mask decoded with pycocotools) linked to it;
  ``iscrowd`` groups are skipped (they are not single objects);
- panoptic -> the pixel level: every segment of the PNG (``id = R + 256 G + 256^2 B``) becomes a
  segment with ``isthing`` from the category; when instances are not given, panoptic things also
  give the regions. When both are given, panoptic supplies the segments and instances the regions.
- image ``tags``: the category names present.

The category list (``meta.json``) is the panoptic categories when given (things + stuff), else the
instance categories, ordered by COCO id; record ``category`` fields index it.
"""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np

from umg_jax.data import records
from umg_jax.data.sources.common import Report, check_box, clean_text, read_image


def _load(path: str | None) -> dict | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _polygon_rle(seg: list, h: int, w: int) -> dict:
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects(seg, h, w)
    return mask_utils.merge(rles)


def ann_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """Instance segmentation (polygons, compressed or uncompressed RLE) -> ``[h, w] uint8``."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        if not seg or any(len(p) < 6 or len(p) % 2 for p in seg):
            raise ValueError("polygon with fewer than 3 points")
        return mask_utils.decode(_polygon_rle(seg, h, w)).astype(np.uint8)
    if isinstance(seg, dict):
        if [int(v) for v in seg["size"]] != [h, w]:
            raise ValueError(f"RLE size {seg['size']} != image {[h, w]}")
        return records.rle_to_mask(seg)
    raise ValueError(f"unknown segmentation type {type(seg).__name__}")


def coco_records(images_dir: str, *, captions: str | None = None, instances: str | None = None,
                 panoptic: str | None = None, panoptic_dir: str | None = None,
                 report: Report, name: str = "coco") -> tuple[Iterator[dict], list[dict]]:
    """``(records, categories)`` from any subset of the three COCO annotation files."""
    if not (captions or instances or panoptic):
        raise ValueError("give at least one of captions / instances / panoptic")
    if panoptic and not panoptic_dir:
        raise ValueError("panoptic annotations need --panoptic_dir (the PNG folder)")
    cap, ins, pan = _load(captions), _load(instances), _load(panoptic)
    cats_src = (pan or ins or {}).get("categories", [])
    cats_sorted = sorted(cats_src, key=lambda c: c["id"])
    categories = [{"id": i, "name": c["name"], "isthing": bool(c.get("isthing", 1))}
                  for i, c in enumerate(cats_sorted)]
    index = {c["id"]: i for i, c in enumerate(cats_sorted)}
    if ins and pan:  # instance category ids must exist in the panoptic list
        for c in ins.get("categories", []):
            if c["id"] not in index:
                raise ValueError(f"instance category {c['id']} ({c['name']}) is not among the "
                                 "panoptic categories")
    if not categories and (ins or pan):
        raise ValueError("the annotation files list no categories")

    images: dict[int, dict] = {}
    for src in (cap, ins, pan):
        for im in (src or {}).get("images", []):
            images.setdefault(int(im["id"]), im)
    by_image: dict[str, dict[int, list]] = {"cap": defaultdict(list), "ins": defaultdict(list),
                                             "pan": {}}
    for key, src in (("cap", cap), ("ins", ins)):
        for a in (src or {}).get("annotations", []):
            iid = int(a["image_id"])
            if iid not in images:
                report.drop(f"{name}:ann{a.get('id')}", "unknown_image",
                            f"annotation for image id {iid}, which no file lists")
                continue
            by_image[key][iid].append(a)
    for a in (pan or {}).get("annotations", []):
        iid = int(a["image_id"])
        if iid not in images:
            report.drop(f"{name}:panoptic:{a.get('file_name')}", "unknown_image",
                        f"panoptic annotation for image id {iid}, which no file lists")
            continue
        by_image["pan"][iid] = a

    report.total = len(images)

    def gen() -> Iterator[dict]:
        for iid in sorted(images):
            im = images[iid]
            source = f"{name}/{im['file_name']}:{iid}"
            try:
                data, h, w = read_image(pathlib.Path(images_dir) / im["file_name"])
            except FileNotFoundError:
                report.drop(source, "missing_image", "image file not found")
                continue
            except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
                report.drop(source, "corrupt_image", f"{type(e).__name__}: {e}")
                continue
            if "height" in im and (int(im["height"]), int(im["width"])) != (h, w):
                report.drop(source, "size_mismatch",
                            f"file is {w}x{h}, annotations say {im['width']}x{im['height']}")
                continue
            rec = _one_image(source, data, h, w, by_image["cap"].get(iid, []),
                             by_image["ins"].get(iid, []), by_image["pan"].get(iid),
                             panoptic_dir, index, categories, report)
            if rec is not None:
                report.count(rec)
                yield rec

    return gen(), categories


def _one_image(source, data, h, w, caps, anns, pan, panoptic_dir, index, categories,
               report) -> dict | None:
    captions = []
    for a in caps:
        t = clean_text(a.get("caption"))
        if t is None:
            report.drop(f"{source}:caption{a.get('id')}", "bad_text", "empty or invalid caption")
        else:
            captions.append(t)
    regions, segments = [], []
    for a in anns:
        if a.get("iscrowd", 0):
            continue
        where = f"{source}:ann{a.get('id')}"
        c = index.get(a["category_id"])
        if c is None:
            report.drop(where, "unknown_category", f"category id {a['category_id']}")
            continue
        x, y, bw, bh = a["bbox"]
        box, why = check_box([x, y, x + bw, y + bh], h, w)
        if box is None:
            report.drop(where, "bad_box", why)
            continue
        try:
            mask = ann_mask(a["segmentation"], h, w) if "segmentation" in a else None
        except (ValueError, KeyError, TypeError) as e:
            report.drop(where, "bad_mask", str(e))
            continue
        tag = categories[c]["name"]
        regions.append({"box": box, "caption": None, "tags": [tag], "category": c})
        if mask is not None and mask.any() and pan is None:
            segments.append({"rle": records.mask_to_rle(mask), "caption": None, "tags": [tag],
                             "category": c, "isthing": True, "region": len(regions) - 1})
    if pan is not None:
        pan_segments = _panoptic(source, pan, panoptic_dir, h, w, index, categories, report)
        if pan_segments is None:
            return None
        for s, box in pan_segments:
            if s["isthing"] and not anns and box is not None:
                regions.append({"box": box, "caption": None, "tags": list(s["tags"]),
                                "category": s["category"]})
                s["region"] = len(regions) - 1
            segments.append(s)
    tags = sorted({t for x in regions + segments for t in x["tags"]})
    return {"source": source, "image": data, "height": h, "width": w, "captions": captions,
            "tags": tags, "regions": regions, "segments": segments, "confidence": 1.0}


def _panoptic(source, ann, panoptic_dir, h, w, index, categories, report):
    from PIL import Image

    png = pathlib.Path(panoptic_dir) / ann["file_name"]
    try:
        with Image.open(png) as im:
            rgb = np.asarray(im.convert("RGB"), np.int64)
    except FileNotFoundError:
        report.drop(source, "missing_panoptic_png", str(png))
        return None
    except Exception as e:  # noqa: BLE001
        report.drop(source, "corrupt_panoptic_png", f"{type(e).__name__}: {e}")
        return None
    if rgb.shape[:2] != (h, w):
        report.drop(source, "size_mismatch",
                    f"panoptic PNG is {rgb.shape[1]}x{rgb.shape[0]}, image is {w}x{h}")
        return None
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    out = []
    for s in ann.get("segments_info", []):
        c = index.get(s["category_id"])
        where = f"{source}:segment{s['id']}"
        if c is None:
            report.drop(where, "unknown_category", f"category id {s['category_id']}")
            continue
        mask = ids == s["id"]
        if not mask.any():
            report.drop(where, "bad_mask", "segment id not present in the PNG")
            continue
        x, y, bw, bh = s.get("bbox", (0, 0, 0, 0))
        box, _ = check_box([x, y, x + bw, y + bh], h, w) if bw > 0 and bh > 0 else (None, "")
        name = categories[c]["name"]
        out.append(({"rle": records.mask_to_rle(mask), "caption": None, "tags": [name],
                     "category": c, "isthing": categories[c]["isthing"], "region": -1}, box))
    return out
