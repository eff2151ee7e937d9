"""The held-out synthetic world written in the benchmarks' real file layouts, so that
``python -m umg_jax.downstream --suite`` runs end to end on the tiny command-1 model with no
download:

    python -m umg_jax.downstream.synthetic_layouts --out /tmp/umg_bench --num 200
    python -m umg_jax.downstream --workdir /tmp/umg_tiny --suite /tmp/umg_bench/suite.json

Writes under ``--out`` (scenes of the ``eval`` split, which training never sees):

* ``folder/val/<shape>/<scene>_<k>.png``: each visible object's box crop, its shape as the class
  (zero-shot classification over the 6 shape names);
* ``folder_seg/val/{images,labels}/<scene>.png``: the scene and its label map (value = category
  id of ``synthetic.CATEGORIES``, 255 where no segment was annotated);
* ``coco_panoptic/annotations/panoptic_val2017{.json,/}`` + ``coco_panoptic/val2017/``: the
  scene's segments in COCO-panoptic format (things and stuff as the generator typed them);
* ``categories.txt`` (for ``folder_seg``) and ``suite.json`` (the three tasks).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
from PIL import Image

from umg_jax.data import records, synthetic


def _scene(index: int) -> tuple[np.ndarray, list[dict], list[tuple[np.ndarray, dict]]]:
    """``(image uint8 [H, W, 3], regions, [(mask bool [H, W], segment)])`` of eval scene
    ``index``."""
    rec = synthetic.generate_record(index, split="eval")
    image = records.decode_image(rec["image"])
    segs = [(records.rle_to_mask(s["rle"]).astype(bool), s) for s in rec["segments"]]
    return image, rec["regions"], segs


def write(out: str | pathlib.Path, num: int) -> pathlib.Path:
    """Writes the layouts of eval scenes ``0 .. num - 1``; returns the suite file's path."""
    out = pathlib.Path(out)
    names = [c["name"] for c in synthetic.CATEGORIES]
    cls_dir = out / "folder" / "val"
    seg_img, seg_lab = out / "folder_seg/val/images", out / "folder_seg/val/labels"
    pan = out / "coco_panoptic"
    pan_png, pan_img = pan / "annotations/panoptic_val2017", pan / "val2017"
    for d in (*(cls_dir / s for s in synthetic.SHAPES), seg_img, seg_lab, pan_png, pan_img):
        d.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        image, regions, segs = _scene(i)
        stem = f"{i:05d}"
        h, w = image.shape[:2]
        for k, r in enumerate(regions):
            x0, y0, x1, y1 = (int(round(v)) for v in r["box"])
            Image.fromarray(image[y0:y1, x0:x1]).save(
                cls_dir / names[r["category"]] / f"{stem}_{k}.png")
        label = np.full((h, w), 255, np.uint8)
        ids = np.zeros((h, w), np.int64)
        seg_info = []
        for j, (m, s) in enumerate(segs, start=1):
            label[m] = s["category"]
            ids[m] = j
            ys, xs = np.nonzero(m)
            seg_info.append({"id": j, "category_id": s["category"], "iscrowd": 0,
                             "area": int(m.sum()),
                             "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                      int(ys.max() - ys.min() + 1)]})
        Image.fromarray(image).save(seg_img / f"{stem}.png")
        Image.fromarray(label).save(seg_lab / f"{stem}.png")
        Image.fromarray(image).save(pan_img / f"{stem}.jpg", quality=95)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(pan_png / f"{stem}.png")
        images.append({"id": i, "file_name": f"{stem}.jpg", "height": h, "width": w})
        annotations.append({"image_id": i, "file_name": f"{stem}.png",
                            "segments_info": seg_info})
    cats = [{"id": c["id"], "name": c["name"], "isthing": int(c["isthing"])}
            for c in synthetic.CATEGORIES]
    (pan / "annotations/panoptic_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": cats}))
    (out / "categories.txt").write_text("\n".join(names) + "\n")
    suite = [{"task": "folder", "data": "folder"},  # class names: the folder names
             {"task": "folder_seg", "data": "folder_seg", "classes": "categories.txt"},
             {"task": "coco_panoptic", "data": "coco_panoptic"}]
    (out / "suite.json").write_text(json.dumps(suite, indent=1))
    return out / "suite.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num", type=int, default=200, help="held-out scenes to write")
    args = ap.parse_args(argv)
    if args.num < 1:
        ap.error("--num must be >= 1")
    path = write(args.out, args.num)
    print(f"wrote {args.num} held-out scenes; run: python -m umg_jax.downstream --workdir RUN "
          f"--suite {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
