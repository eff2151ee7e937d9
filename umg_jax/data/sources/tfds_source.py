"""Any TFDS data set prepared locally in ``array_record`` format, read without TensorFlow
(``tfds.builder_from_directory(dir).as_data_source()``), mapped onto the schema by a small spec.

Spec (JSON file or dict; feature paths use "/" into nested features, ``objects/bbox``):

    {"image": "image",                 # Image or uint8 Tensor [H, W, 3]            (required)
     "captions": "caption",            # Text or a sequence of Text                  (optional)
     "tags": "labels",                 # ClassLabel / sequence of ClassLabel or Text (optional)
     "boxes": "objects/bbox",          # [N, 4] boxes                                 (optional)
     "box_format": "yxyx_norm",        # tfds BBoxFeature (default) | "xyxy_abs" | "xywh_abs"
     "box_labels": "objects/label",    # ClassLabel per box -> region tags + category (optional)
     "box_captions": "objects/text",   # Text per box -> region captions             (optional)
     "class_names": ["cat", "dog"]}    # when the label feature carries no names      (optional)

Category list (``meta.json``) = the class names of ``box_labels`` (from the ClassLabel feature, else
``class_names``). Sources ids: ``tfds/<dir name>/<split>:<index>``.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from umg_jax.data import records
from umg_jax.data.sources.common import Report, check_box, clean_text

BOX_FORMATS = ("yxyx_norm", "xyxy_abs", "xywh_abs")


def _get(example: dict, path: str | None) -> Any:
    if not path:
        return None
    node: Any = example
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"feature {path!r} not in the example (has {sorted(example)})")
        node = node[part]
    return node


def _feature(features, path: str):
    node = features
    for part in path.split("/"):
        node = node[part]
        if hasattr(node, "feature") and not hasattr(node, "names"):  # Sequence(...)
            node = node.feature
    return node


def _texts(value) -> list[str]:
    if value is None:
        return []
    vals = value if isinstance(value, list | tuple | np.ndarray) and not isinstance(
        value, bytes | str) else [value]
    return [t for t in (clean_text(v) for v in vals) if t]


def tfds_records(builder_dir: str, split: str, spec: dict | str, *, report: Report
                 ) -> tuple[Iterator[dict], list[dict]]:
    """``(records, categories)`` of one split of a prepared TFDS builder directory."""
    import tensorflow_datasets as tfds

    if isinstance(spec, str):
        spec = json.loads(pathlib.Path(spec).read_text())
    if "image" not in spec:
        raise ValueError("the TFDS spec needs an 'image' feature path")
    fmt = spec.get("box_format", "yxyx_norm")
    if fmt not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {fmt!r}")
    builder = tfds.builder_from_directory(builder_dir)
    sources = builder.as_data_source()
    if split not in sources:
        raise ValueError(f"split {split!r} not in {sorted(sources)}")
    source = sources[split]
    names = list(spec.get("class_names") or [])
    if spec.get("box_labels") and not names:
        feat = _feature(builder.info.features, spec["box_labels"])
        names = list(getattr(feat, "names", []) or [])
    categories = [{"id": i, "name": n, "isthing": True} for i, n in enumerate(names)]
    tag_feat = _feature(builder.info.features, spec["tags"]) if spec.get("tags") else None
    tag_names = list(getattr(tag_feat, "names", []) or []) if tag_feat is not None else []
    name = pathlib.Path(builder_dir).parent.name or "tfds"

    report.total = len(source)

    def gen() -> Iterator[dict]:
        for i in range(len(source)):
            sid = f"tfds/{name}/{split}:{i}"
            try:
                ex = source[i]
                image = np.asarray(_get(ex, spec["image"]))
                if image.ndim != 3 or image.shape[-1] != 3:
                    raise ValueError(f"image has shape {image.shape}, expected [H, W, 3]")
                image = image.astype(np.uint8)
                h, w = image.shape[:2]
                captions = _texts(_get(ex, spec.get("captions")))
                raw_tags = _get(ex, spec.get("tags"))
                if tag_names and raw_tags is not None:
                    raw_tags = [tag_names[int(t)] for t in np.atleast_1d(raw_tags)]
                tags = _texts(raw_tags)
                regions = _regions(ex, spec, fmt, h, w, names, sid, report)
            except (KeyError, ValueError, TypeError, IndexError) as e:
                report.drop(sid, "bad_example", f"{type(e).__name__}: {e}")
                continue
            rec = {"source": sid, "image": records.encode_image(image), "height": h, "width": w,
                   "captions": captions, "tags": tags, "regions": regions, "segments": [],
                   "confidence": 1.0}
            report.count(rec)
            yield rec

    return gen(), categories


def _regions(ex, spec, fmt, h, w, names, sid, report) -> list[dict]:
    if not spec.get("boxes"):
        return []
    boxes = np.asarray(_get(ex, spec["boxes"]), np.float32).reshape(-1, 4)
    labels = _get(ex, spec.get("box_labels"))
    labels = np.atleast_1d(np.asarray(labels)) if labels is not None else None
    caps = _get(ex, spec.get("box_captions"))
    out = []
    for k, b in enumerate(boxes):
        if fmt == "yxyx_norm":
            box = [b[1] * w, b[0] * h, b[3] * w, b[2] * h]
        elif fmt == "xywh_abs":
            box = [b[0], b[1], b[0] + b[2], b[1] + b[3]]
        else:
            box = list(b)
        box, why = check_box(box, h, w)
        if box is None:
            report.drop(f"{sid}:box{k}", "bad_box", why)
            continue
        cat = int(labels[k]) if labels is not None else -1
        tags = [names[cat]] if 0 <= cat < len(names) else []
        caption = clean_text(caps[k]) if caps is not None and k < len(caps) else None
        if caption is None and not tags:
            report.drop(f"{sid}:box{k}", "bad_text", "box with neither a label nor a caption")
            continue
        out.append({"box": [float(v) for v in box], "caption": caption, "tags": tags,
                    "category": cat if tags else -1})
    return out
