"""Visual Genome ``region_descriptions*.json``: boxes with phrases -> region captions.

Layout: ``[{"id": image_id, "regions": [{"x", "y", "width", "height", "phrase", ...}]}]`` and an
images folder with ``<image_id>.jpg`` (or ``--vg_image_pattern``). VG has no image captions or
categories: records carry regions only (their phrases), tags empty, category -1.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

from umg_jax.data.sources.common import Report, check_box, clean_text, read_image


def vg_records(images_dir: str, regions_json: str, *, report: Report,
               image_pattern: str = "{id}.jpg", name: str = "vg"
               ) -> tuple[Iterator[dict], list[dict]]:
    with open(regions_json, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{regions_json}: expected a list of {{'id', 'regions'}} entries")

    report.total = len(entries)

    def gen() -> Iterator[dict]:
        for e in sorted(entries, key=lambda e: int(e["id"])):
            iid = int(e["id"])
            fname = image_pattern.format(id=iid)
            source = f"{name}/{fname}:{iid}"
            try:
                data, h, w = read_image(pathlib.Path(images_dir) / fname)
            except FileNotFoundError:
                report.drop(source, "missing_image", "image file not found")
                continue
            except Exception as ex:  # noqa: BLE001
                report.drop(source, "corrupt_image", f"{type(ex).__name__}: {ex}")
                continue
            regions = []
            for r in e.get("regions", []):
                where = f"{source}:region{r.get('region_id')}"
                phrase = clean_text(r.get("phrase"))
                if phrase is None:
                    report.drop(where, "bad_text", "empty or invalid phrase")
                    continue
                box, why = check_box([r["x"], r["y"], r["x"] + r["width"],
                                      r["y"] + r["height"]], h, w)
                if box is None:
                    report.drop(where, "bad_box", why)
                    continue
                regions.append({"box": box, "caption": phrase, "tags": [], "category": -1})
            rec = {"source": source, "image": data, "height": h, "width": w, "captions": [],
                   "tags": [], "regions": regions, "segments": [], "confidence": 1.0}
            report.count(rec)
            yield rec

    return gen(), []
