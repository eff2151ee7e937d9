"""Per-image JSON: an image file and a JSON file side by side (``a/b.jpg`` + ``a/b.json``), in
folders (searched recursively) or in ``.tar`` shards (members paired by name), the way large
pseudo-labelled web data sets are distributed.

Accepted JSON fields (all optional):

    {"captions": ["..."] | "caption": "...",
     "tags": ["..."],
     "regions": [{"box": [x0, y0, x1, y1] (absolute pixels) | "bbox": [x, y, w, h],
                  "caption": "...", "tags": ["..."]}],
     "segments": [{"rle": {"size": [h, w], "counts": str} | "polygon": [[x, y, x, y, ...], ...],
                   "caption": "...", "tags": ["..."], "isthing": true, "region": int}],
     "confidence": float}

Categories are the sorted set of the first tags of regions and segments; ``category`` indexes it.
"""

from __future__ import annotations

import json
import pathlib
import tarfile
from collections.abc import Iterator

from umg_jax.data import records
from umg_jax.data.sources.common import Report, check_box, clean_text, image_size

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")


def _pairs(src: pathlib.Path) -> Iterator[tuple[str, bytes | None, bytes | None]]:
    """``(key, image bytes or None, json bytes or None)`` in sorted key order."""
    if src.is_file() and src.suffix == ".tar" or src.is_dir() and any(src.glob("*.tar")):
        tars = [src] if src.is_file() else sorted(src.glob("*.tar"))
        for t in tars:
            with tarfile.open(t) as tf:
                members: dict[str, dict[str, bytes]] = {}
                for m in tf.getmembers():
                    if not m.isfile():
                        continue
                    stem, ext = m.name.rsplit(".", 1) if "." in m.name else (m.name, "")
                    members.setdefault(stem, {})["." + ext.lower()] = tf.extractfile(m).read()
            for stem in sorted(members):
                files = members[stem]
                img = next((files[e] for e in IMAGE_EXT if e in files), None)
                yield f"{t.name}:{stem}", img, files.get(".json")
        return
    stems = sorted({p.with_suffix("") for p in src.rglob("*")
                    if p.suffix.lower() in IMAGE_EXT + (".json",)})
    for stem in stems:
        img = next((stem.with_suffix(e) for e in IMAGE_EXT if stem.with_suffix(e).exists()), None)
        js = stem.with_suffix(".json")
        yield (str(stem.relative_to(src)), img.read_bytes() if img else None,
               js.read_bytes() if js.exists() else None)


def perimage_records(src_dir: str, *, report: Report, name: str = "perimage"
                     ) -> tuple[Iterator[dict], list[dict]]:
    src = pathlib.Path(src_dir)
    if not src.exists():
        raise FileNotFoundError(f"{src_dir} does not exist")
    items = list(_pairs(src))
    names = sorted({(x.get("tags") or [None])[0] for _, _, js in items if js
                    for x in _safe_json(js).get("regions", []) + _safe_json(js).get("segments", [])
                    if (x.get("tags") or [None])[0]})
    categories = [{"id": i, "name": n, "isthing": True} for i, n in enumerate(names)]
    index = {n: i for i, n in enumerate(names)}

    report.total = len(items)

    def gen() -> Iterator[dict]:
        for key, img, js in items:
            source = f"{name}/{key}"
            if img is None:
                report.drop(source, "missing_image", "JSON without an image beside it")
                continue
            if js is None:
                report.drop(source, "missing_json", "image without a JSON beside it")
                continue
            try:
                meta = json.loads(js.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                report.drop(source, "bad_json", f"{type(e).__name__}: {e}")
                continue
            try:
                h, w = image_size(img)
            except Exception as e:  # noqa: BLE001
                report.drop(source, "corrupt_image", f"{type(e).__name__}: {e}")
                continue
            rec = _record(source, img, h, w, meta, index, report)
            report.count(rec)
            yield rec

    return gen(), categories


def _safe_json(js: bytes) -> dict:
    try:
        d = json.loads(js.decode("utf-8"))
        return d if isinstance(d, dict) else {}
    except (UnicodeDecodeError, ValueError):
        return {}


def _texts(values) -> list[str]:
    return [t for t in (clean_text(v) for v in (values or [])) if t]


def _record(source, img, h, w, meta, index, report) -> dict:
    from umg_jax.data.sources.coco import ann_mask

    caps = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
    regions, kept = [], {}  # kept: input region index -> output index
    for i, r in enumerate(meta.get("regions", [])):
        box = r.get("box") or (None if "bbox" not in r else
                               [r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2],
                                r["bbox"][1] + r["bbox"][3]])
        if box is None:
            report.drop(f"{source}:region{i}", "bad_box", "no box / bbox field")
            continue
        box, why = check_box(box, h, w)
        if box is None:
            report.drop(f"{source}:region{i}", "bad_box", why)
            continue
        tags, cap = _texts(r.get("tags")), clean_text(r.get("caption"))
        if cap is None and not tags:
            report.drop(f"{source}:region{i}", "bad_text", "no valid caption or tag")
            continue
        kept[i] = len(regions)
        regions.append({"box": box, "caption": cap, "tags": tags,
                        "category": index.get(tags[0], -1) if tags else -1})
    segments = []
    for i, s in enumerate(meta.get("segments", [])):
        try:
            mask = ann_mask(s["polygon"] if "polygon" in s else s["rle"], h, w)
        except (ValueError, KeyError, TypeError) as e:
            report.drop(f"{source}:segment{i}", "bad_mask", str(e))
            continue
        tags = _texts(s.get("tags"))
        if clean_text(s.get("caption")) is None and not tags:
            report.drop(f"{source}:segment{i}", "bad_text", "no valid caption or tag")
            continue
        segments.append({"rle": records.mask_to_rle(mask), "caption": clean_text(s.get("caption")),
                         "tags": tags, "category": index.get(tags[0], -1) if tags else -1,
                         "isthing": bool(s.get("isthing", True)),
                         "region": kept.get(int(s.get("region", -1)), -1)})
    return {"source": source, "image": img, "height": h, "width": w, "captions": _texts(caps),
            "tags": _texts(meta.get("tags")), "regions": regions, "segments": segments,
            "confidence": float(meta.get("confidence", 1.0))}
