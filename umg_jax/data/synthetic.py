"""The embedded multi-granularity world: procedural scenes with all three granularities of labels.

    python -m umg_jax.data.synthetic --out /tmp/world --num 1000 [--preview world.png]

Every scene is two *stuff* areas (sky or wall above a horizon; grass, water or sand below), with 1-4
*things* painted over them: shape (circle, square, triangle, star, cross, ring) x colour (6) x
texture (solid, striped, dotted) x size, later objects occluding earlier ones. Each example holds

- image captions that mention the objects, their counts and positions, and the stuff;
- image tags (the shapes and stuff present);
- one region per visible thing: its box (of the visible part), a phrase ("a large red striped
  star") and tags (shape, colour);
- panoptic segments: every thing instance (visible mask) and each stuff area, with tags/caption.

Why this is enough to separate the granularities: scenes hold several objects of different
shapes and colours at random places, so an image embedding that knows *which* shapes are present
still cannot say which box holds which one. Region classification (box -> shape) and the dense
per-pixel labels need localised features, which only the region and pixel losses train.

Deterministic: example ``i`` of split ``s`` depends only on ``(seed, s, i)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from umg_jax.data import records

VERSION = 2  # bump when the rendering or meta.json changes (invalidates cached data sets)

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
STUFF = ("sky", "wall", "grass", "water", "sand")
TOP_STUFF, BOTTOM_STUFF = ("sky", "wall"), ("grass", "water", "sand")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
    "yellow": (235, 215, 40), "purple": (150, 50, 190), "orange": (245, 140, 30),
}
TEXTURES = ("solid", "striped", "dotted")
CATEGORIES = [{"id": i, "name": n, "isthing": True} for i, n in enumerate(SHAPES)] + [
    {"id": len(SHAPES) + i, "name": n, "isthing": False} for i, n in enumerate(STUFF)
]
_CAT = {c["name"]: c["id"] for c in CATEGORIES}
_SPLIT_OFFSET = {"train": 0, "eval": 1_000_003, "test": 2_000_029, "val": 3_000_017}
_NUMBERS = ("no", "one", "two", "three", "four", "five")
_PLURAL = {"cross": "crosses"}


# ------------------------------------------------------------------------------ render ---


def stuff_texture(name: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """``[h, w, 3] float32`` in [0, 255] for a stuff class."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = rng.normal(0, 1, (h, w)).astype(np.float32)
    if name == "sky":
        base = np.stack([120 + 60 * y / h, 170 + 50 * y / h, 235 + 0 * y], -1)
        base += 12 * noise[..., None]
    elif name == "wall":
        brick_h = rng.integers(5, 8)
        row = (y // brick_h).astype(int)
        xs = x + (row % 2) * brick_h
        mortar = ((y % brick_h) < 1) | ((xs % (2 * brick_h)) < 1)
        base = np.where(mortar[..., None], [200, 195, 185], [165, 75, 55]).astype(np.float32)
        base += 10 * noise[..., None]
    elif name == "grass":
        base = np.stack([60 + 0 * y, 140 + 30 * noise, 50 + 0 * y], -1)
        base += 8 * noise[..., None]
    elif name == "water":
        phase = rng.uniform(0, 6.3)
        waves = np.sin(x / 3.0 + 2 * np.sin(y / 4.0) + phase)
        base = np.stack([30 + 10 * waves, 110 + 25 * waves, 170 + 20 * waves], -1)
        base += 6 * noise[..., None]
    elif name == "sand":
        base = np.stack([220 + 0 * y, 195 + 0 * y, 140 + 0 * y], -1) + 14 * noise[..., None]
    else:
        raise ValueError(f"unknown stuff {name!r}")
    return base.astype(np.float32)


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float,
                angle: float) -> np.ndarray:
    """``[h, w] bool`` of a shape with centre (cx, cy), radius r (pixels), rotation angle."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = x + 0.5 - cx, y + 0.5 - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated frame
    d = np.sqrt(dx * dx + dy * dy)
    if shape == "circle":
        return d <= r
    if shape == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if shape == "triangle":  # apex up in the rotated frame
        return (v <= 0.6 * r) & (v >= -r + 1.6 * r * np.abs(u) / (1.15 * r) - 0.0)
    if shape == "star":
        theta = np.arctan2(v, u)
        return d <= r * (0.55 + 0.45 * np.cos(5 * theta))
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if shape == "ring":
        return (d <= r) & (d >= 0.55 * r)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, colour: np.ndarray, h: int, w: int, rng: np.random.Generator):
    """``[h, w, 3]`` object fill: the colour, with stripes / dots in a darker shade."""
    fill = np.broadcast_to(colour, (h, w, 3)).astype(np.float32).copy()
    if kind == "solid":
        return fill
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "striped":
        a = rng.uniform(0, np.pi)
        on = np.sin((np.cos(a) * x + np.sin(a) * y) * 1.3) > 0
    else:  # dotted
        on = (np.sin(x * 1.4) > 0.45) & (np.sin(y * 1.4) > 0.45)
    fill[on] = fill[on] * 0.45
    return fill


def _position(cx: float, cy: float, w: int, h: int) -> str:
    col = ("left", "", "right")[min(int(3 * cx / w), 2)]
    row = ("top", "", "bottom")[min(int(3 * cy / h), 2)]
    if not col and not row:
        return "in the center"
    return "at the " + " ".join(p for p in (row, col) if p)


def _count_phrase(n: int, noun: str) -> str:
    if n == 1:
        return f"a {noun}"
    return f"{_NUMBERS[n] if n < len(_NUMBERS) else n} {_PLURAL.get(noun, noun + 's')}"


def generate_record(index: int, *, split: str = "train", seed: int = 0,
                    image_size: int = 80) -> dict[str, Any]:
    """Scene ``index`` of ``split`` as a record dict (``schema.py`` form 1)."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_OFFSET[split], index])
    h = w = int(image_size)

    top, bottom = rng.choice(TOP_STUFF), rng.choice(BOTTOM_STUFF)
    horizon = int(rng.uniform(0.3, 0.6) * h)
    image = np.empty((h, w, 3), np.float32)
    image[:horizon] = stuff_texture(top, horizon, w, rng)
    image[horizon:] = stuff_texture(bottom, h - horizon, w, rng)
    owner = np.full((h, w), -1, np.int32)  # which object is visible at each pixel

    objects = []
    for k in range(int(rng.integers(1, 5))):
        shape = str(rng.choice(SHAPES))
        colour = str(rng.choice(list(COLOURS)))
        texture = str(rng.choice(TEXTURES))
        r = rng.uniform(0.12, 0.24) * h
        cx, cy = rng.uniform(r * 0.7, w - r * 0.7), rng.uniform(r * 0.7, h - r * 0.7)
        full = _shape_mask(shape, h, w, cx, cy, r, rng.uniform(-0.4, 0.4))
        fill = _texture(texture, np.asarray(COLOURS[colour], np.float32), h, w, rng)
        image[full] = fill[full]
        owner[full] = k
        objects.append({"shape": shape, "colour": colour, "texture": texture, "r": r,
                        "full_area": int(full.sum())})
    image += rng.normal(0, 4, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)

    regions, segments, visible = [], [], []
    for k, o in enumerate(objects):
        m = owner == k
        area = int(m.sum())
        if area < 12 or area < 0.3 * o["full_area"]:
            continue  # mostly hidden: unlabeled, like an occluded object nobody annotates
        ys, xs = np.nonzero(m)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        size = "large" if o["r"] > 0.18 * h else "small"
        tex = "" if o["texture"] == "solid" else o["texture"] + " "
        phrase = f"a {size} {o['colour']} {tex}{o['shape']}"
        o.update(cx=float(xs.mean()), cy=float(ys.mean()), phrase=phrase)
        visible.append(o)
        segments.append({
            "rle": records.mask_to_rle(m), "caption": phrase, "tags": [o["shape"]],
            "category": _CAT[o["shape"]], "isthing": True, "region": len(regions),
        })
        regions.append({"box": box, "caption": phrase, "tags": [o["shape"], o["colour"]],
                        "category": _CAT[o["shape"]]})
    for name, m in ((top, (owner < 0) & (np.arange(h)[:, None] < horizon)),
                    (bottom, (owner < 0) & (np.arange(h)[:, None] >= horizon))):
        if m.sum() >= 12:
            segments.append({"rle": records.mask_to_rle(m), "caption": f"the {name}",
                             "tags": [name], "category": _CAT[name], "isthing": False,
                             "region": -1})

    scene = f"on {bottom} under the {top}" if top == "sky" else f"on {bottom} by a {top}"
    captions = []
    if visible:
        counts: dict[str, int] = {}
        for o in visible:
            counts[o["shape"]] = counts.get(o["shape"], 0) + 1
        listed = [_count_phrase(n, s) for s, n in counts.items()]
        listing = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
        captions.append(f"{listing} {scene}.")
        captions.append("; ".join(f"{o['phrase']} {_position(o['cx'], o['cy'], w, h)}"
                                  for o in visible) + ".")
        n = len(visible)
        listing = ", ".join(f"{o['colour']} {o['shape']}" for o in visible)
        captions.append(f"{_count_phrase(n, 'object')}: {listing}, {top} and {bottom}.")
    else:
        captions.append(f"an empty scene of {bottom} under the {top}." if top == "sky"
                        else f"an empty scene of {bottom} by a {top}.")
    tags = sorted({o["shape"] for o in visible}) + [top, bottom]
    return {
        "source": f"synthetic/{split}:{index}",
        "image": records.encode_image(image),
        "height": h, "width": w,
        "captions": captions, "tags": tags,
        "regions": regions, "segments": segments,
        "confidence": 1.0,
    }


def generate(num: int, *, split: str = "train", seed: int = 0, start: int = 0,
             image_size: int = 80) -> Iterator[dict[str, Any]]:
    """Records ``start .. start + num - 1`` of ``split``."""
    for i in range(start, start + num):
        yield generate_record(i, split=split, seed=seed, image_size=image_size)


def meta(split: str, seed: int, image_size: int) -> dict[str, Any]:
    return {"name": f"synthetic-{split}", "categories": CATEGORIES, "generator_version": VERSION,
            "seed": seed, "image_size": image_size,
            # every tag the world draws: shapes, stuff and colours (tag prompts travel as ids)
            "text_vocab": [*SHAPES, *STUFF, *COLOURS]}


def write_synthetic(out_dir: str, num: int, *, split: str = "train", seed: int = 0,
                    num_shards: int = 4, image_size: int = 80, progress: bool = False) -> list[str]:
    """Writes ``num`` scenes as ArrayRecord shards + meta.json into ``out_dir`` (atomic)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    it = generate(num, split=split, seed=seed, image_size=image_size)
    if progress:
        it = _with_progress(it, num)
    return records.write_shards(it, out_dir, num_shards=min(num_shards, num), prefix=split,
                                meta=meta(split, seed, image_size))


def _with_progress(it: Iterator[dict], total: int) -> Iterator[dict]:
    from umg_jax.metrics import Progress

    prog = Progress(total)
    for i, rec in enumerate(it, 1):
        yield rec
        if i % 200 == 0 or i == total:
            line = prog.update(i).replace("step ", "scene ")
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def preview(recs: list[dict[str, Any]], path: str, *, scale: int = 3) -> None:
    """Writes a PNG contact sheet: each scene over its panoptic segments with boxes."""
    from PIL import Image, ImageDraw

    tiles = []
    palette = np.random.default_rng(0).integers(40, 255, (64, 3)).astype(np.uint8)
    for rec in recs:
        img = records.decode_image(rec["image"])
        seg = np.zeros_like(img)
        for k, s in enumerate(rec["segments"]):
            seg[records.rle_to_mask(s["rle"]).astype(bool)] = palette[k % len(palette)]
        pair = np.concatenate([img, seg], 1).repeat(scale, 0).repeat(scale, 1)
        im = Image.fromarray(pair)
        draw = ImageDraw.Draw(im)
        for r in rec["regions"]:
            draw.rectangle([v * scale for v in r["box"]], outline=(255, 255, 255))
            draw.text((r["box"][0] * scale + 2, r["box"][1] * scale + 1), r["tags"][0],
                      fill=(255, 255, 255))
        canvas = Image.new("RGB", (im.width, im.height + 14), (255, 255, 255))
        canvas.paste(im, (0, 0))
        ImageDraw.Draw(canvas).text((2, im.height + 1), rec["captions"][0][:60], fill=(0, 0, 0))
        tiles.append(canvas)
    cols = 2
    rows = (len(tiles) + cols - 1) // cols
    tw, th = tiles[0].size
    sheet = Image.new("RGB", (cols * tw, rows * th), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * tw, (i // cols) * th))
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m umg_jax.data.synthetic",
        description="Write N scenes of the embedded synthetic world (images, captions, tags, "
        "boxes with region phrases, panoptic masks) as ArrayRecord shards + meta.json.")
    ap.add_argument("--out", required=True, help="output directory (replaced atomically)")
    ap.add_argument("--num", type=int, required=True, help="number of scenes")
    ap.add_argument("--split", default="train", choices=sorted(_SPLIT_OFFSET),
                    help="train / eval / test draw disjoint scenes")
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--image_size", type=int, default=80, help="square image side in pixels")
    ap.add_argument("--num_shards", type=int, default=4, help="ArrayRecord shards")
    ap.add_argument("--preview", default="", help="also write a PNG contact sheet of 8 scenes")
    args = ap.parse_args(argv)
    if args.num < 1 or args.image_size < 16 or args.num_shards < 1:
        print("error: --num and --num_shards must be >= 1 and --image_size >= 16", file=sys.stderr)
        return 2
    paths = write_synthetic(args.out, args.num, split=args.split, seed=args.seed,
                            num_shards=args.num_shards, image_size=args.image_size, progress=True)
    print(f"wrote {args.num} scenes to {len(paths)} shards in {args.out}")
    if args.preview:
        preview(list(generate(min(8, args.num), split=args.split, seed=args.seed,
                              image_size=args.image_size)), args.preview)
        print(f"preview: {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
