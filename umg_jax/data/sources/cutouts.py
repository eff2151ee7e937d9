"""Cut-out composites: real object photos with alpha, pasted onto backgrounds, with exact labels.

Input layout (that of Debian's ``tuxpaint-stamps-default``, ``/usr/share/tuxpaint/stamps``): RGBA
PNGs in nested folders, each with a text file of the same name beside it whose first plain line
is its English caption (``lion.png`` + ``lion.txt``: "A lion."; lines with ``=`` are
translations and skipped). Tags are the folder names (``animals/mammals/lion.png`` -> tags
``["animals", "mammals"]``) plus the file stem; the category is the stem.

Each composite: a background (a random image of ``--backgrounds``, resized, or a procedural
stuff texture of the synthetic world when none is given), then 1 to ``max_objects`` cut-outs at
random scale and position, later ones occluding earlier ones. Masks are the visible alpha
(> 127) after occlusion, exactly; boxes are the visible masks' boxes; region captions are the
cut-out captions; the image caption lists the objects. Deterministic given the seed.
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Iterator

import numpy as np

from umg_jax.data import records
from umg_jax.data.sources.common import Report, clean_text


def read_caption(txt: pathlib.Path) -> str | None:
    """First plain line of a stamp description file (``key=value`` lines are translations)."""
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        if line.strip() and "=" not in line:
            return clean_text(line)
    return None


def load_stamps(root: str, report: Report) -> list[dict]:
    """``[{"path", "rgba" [h, w, 4] uint8, "caption", "tags", "name"}]`` sorted by path."""
    base = pathlib.Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"cut-out folder {root} does not exist")
    stamps = []
    for png in sorted(base.rglob("*.png")):
        source = f"cutouts/{png.relative_to(base)}"
        caption = read_caption(png.with_suffix(".txt"))
        if caption is None:
            report.drop(source, "missing_caption", "no readable .txt caption beside the image")
            continue
        try:
            from PIL import Image

            with Image.open(png) as im:
                rgba = np.asarray(im.convert("RGBA"))
        except Exception as e:  # noqa: BLE001
            report.drop(source, "corrupt_image", f"{type(e).__name__}: {e}")
            continue
        if (rgba[..., 3] > 127).sum() < 16:
            report.drop(source, "bad_mask", "alpha channel is (nearly) empty")
            continue
        folders = list(png.relative_to(base).parent.parts)
        stamps.append({"path": source, "rgba": rgba, "caption": caption, "name": png.stem,
                       "tags": folders + [png.stem]})
    if not stamps:
        raise FileNotFoundError(f"no usable cut-outs (PNG + .txt caption) under {root}")
    return stamps


def _background(rng, size: int, backgrounds: list[pathlib.Path]) -> np.ndarray:
    if backgrounds:
        from PIL import Image

        with Image.open(backgrounds[int(rng.integers(len(backgrounds)))]) as im:
            return np.asarray(im.convert("RGB").resize((size, size)), np.uint8).copy()
    from umg_jax.data import synthetic

    top, bottom = rng.choice(synthetic.TOP_STUFF), rng.choice(synthetic.BOTTOM_STUFF)
    horizon = int(rng.uniform(0.3, 0.6) * size)
    img = np.empty((size, size, 3), np.float32)
    img[:horizon] = synthetic.stuff_texture(top, horizon, size, rng)
    img[horizon:] = synthetic.stuff_texture(bottom, size - horizon, size, rng)
    return np.clip(img, 0, 255).astype(np.uint8)


def compose(index: int, stamps: list[dict], *, seed: int, size: int, max_objects: int,
            backgrounds: list[pathlib.Path]) -> tuple[dict, list[np.ndarray]]:
    """Composite ``index``: ``(record, visible masks)``; the masks are what the record encodes."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    canvas = _background(rng, size, backgrounds).astype(np.float32)
    owner = np.full((size, size), -1, np.int32)
    placed = []
    for k in range(int(rng.integers(1, max_objects + 1))):
        st = stamps[int(rng.integers(len(stamps)))]
        h0, w0 = st["rgba"].shape[:2]
        side = rng.uniform(0.25, 0.6) * size
        scale = side / max(h0, w0)
        w, h = max(4, int(w0 * scale)), max(4, int(h0 * scale))
        rgba = np.asarray(Image.fromarray(st["rgba"]).resize((w, h), Image.BILINEAR), np.float32)
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        alpha = rgba[..., 3:] / 255.0
        region = canvas[y:y + h, x:x + w]
        canvas[y:y + h, x:x + w] = alpha * rgba[..., :3] + (1 - alpha) * region
        solid = rgba[..., 3] > 127
        owner[y:y + h, x:x + w][solid] = k
        placed.append(st)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    regions, segments, masks, names = [], [], [], []
    for k, st in enumerate(placed):
        m = owner == k
        if m.sum() < 16:
            continue  # hidden behind later cut-outs
        ys, xs = np.nonzero(m)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        segments.append({"rle": records.mask_to_rle(m), "caption": st["caption"],
                         "tags": list(st["tags"]), "category": -1, "isthing": True,
                         "region": len(regions)})
        regions.append({"box": box, "caption": st["caption"], "tags": list(st["tags"]),
                        "category": -1})
        masks.append(m)
        names.append(st["name"])
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    caption = "a photo of " + (" and ".join(f"a {n.replace('_', ' ')}" for n in names)
                               if names else "a background") + "."
    rec = {"source": f"cutouts/composite:{index}", "image": buf.getvalue(), "height": size,
           "width": size, "captions": [caption],
           "tags": sorted({t for r in regions for t in r["tags"]}), "regions": regions,
           "segments": segments, "confidence": 1.0, "_names": names}
    return rec, masks


def cutout_records(stamps_dir: str, *, num: int, report: Report, seed: int = 0, size: int = 224,
                   max_objects: int = 3, backgrounds_dir: str | None = None
                   ) -> tuple[Iterator[dict], list[dict]]:
    """``num`` composites; categories = the cut-out names (file stems), sorted."""
    stamps = load_stamps(stamps_dir, report)
    names = sorted({s["name"] for s in stamps})
    index = {n: i for i, n in enumerate(names)}
    categories = [{"id": i, "name": n, "isthing": True} for i, n in enumerate(names)]
    bgs = []
    if backgrounds_dir:
        bgs = sorted(p for p in pathlib.Path(backgrounds_dir).rglob("*")
                     if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not bgs:
            raise FileNotFoundError(f"no background images in {backgrounds_dir}")

    report.total = num

    def gen() -> Iterator[dict]:
        for i in range(num):
            rec, _ = compose(i, stamps, seed=seed, size=size, max_objects=max_objects,
                             backgrounds=bgs)
            for r, s, n in zip(rec["regions"], rec["segments"], rec.pop("_names"), strict=True):
                r["category"] = s["category"] = index[n]
            report.count(rec)
            yield rec

    return gen(), categories
