"""Known-answer backends for the annotation tests, plugged in through the recipe's
``"module:Class"`` hook exactly as a user's own backend would be.

The images are ``scene()``: a blue background (stuff "sky") with coloured squares; every fake
answers from the pixels, so the right annotation is known by construction."""

from __future__ import annotations

import os
import time

import numpy as np

from umg_jax.labeling.annotate import backend as b

COLOURS = {"red": (220, 0, 0), "green": (0, 200, 0)}
SKY = (0, 0, 200)


def scene(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Sky-blue background, a 16 px red square and (odd seeds) a 12 px green square."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = SKY
    y, x = rng.integers(0, h - 16), rng.integers(0, w // 2 - 16)
    img[y:y + 16, x:x + 16] = COLOURS["red"]
    if seed % 2:
        y, x = rng.integers(0, h - 12), rng.integers(w // 2, w - 12)
        img[y:y + 12, x:x + 12] = COLOURS["green"]
    return img


def colour_mask(img: np.ndarray, name: str) -> np.ndarray:
    rgb = SKY if name == "sky" else COLOURS[name]
    return (img == np.asarray(rgb, np.uint8)).all(-1)


def colour_box(img: np.ndarray, name: str) -> list[float] | None:
    ys, xs = np.nonzero(colour_mask(img, name))
    if not len(xs):
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class Captioner(b.Captioner):
    family = "fake"

    def caption(self, images):
        return [["a photo of " + " and ".join(f"a {c} square" for c in COLOURS
                                              if colour_mask(im, c).any())] for im in images]


class Tagger(b.Tagger):
    """Score = fraction of the image's pixels of that colour, scaled so a square scores 1."""

    family = "fake"

    def tag(self, images, vocab, captions):
        return np.asarray([[min(1.0, 20 * colour_mask(im, v).mean()) if v in COLOURS or v == "sky"
                            else 0.0 for v in vocab] for im in images], np.float32)


class Detector(b.Detector):
    """The true box of each queried colour (score 0.9), plus for red: a shifted duplicate (0.8,
    same label: NMS removes it), the same box again as "green" when green is queried but absent
    (0.5, cross-class duplicate: the filter removes it) and a 1 px speck (0.7, too small).
    ``FAKE_KILL_AFTER=N``: after N calls, write ``FAKE_KILL_FILE`` and sleep (to be killed);
    ``FAKE_RAISE_AFTER=N``: raise KeyboardInterrupt instead."""

    family = "fake"
    calls = 0

    def detect(self, images, queries, threshold):
        Detector.calls += 1
        n = int(os.environ.get("FAKE_KILL_AFTER", "0"))
        if n and Detector.calls > n:
            open(os.environ["FAKE_KILL_FILE"], "w").close()
            time.sleep(600)
        n = int(os.environ.get("FAKE_RAISE_AFTER", "0"))
        if n and Detector.calls > n:
            raise KeyboardInterrupt
        out = []
        for im, qs in zip(images, queries, strict=True):
            boxes, labels, scores = [], [], []
            for i, q in enumerate(qs):
                box = colour_box(im, q) if q in COLOURS else None
                if box is not None:
                    boxes.append(box), labels.append(i), scores.append(0.9)
                if q == "red" and box is not None:
                    boxes.append([box[0] + 1, box[1], box[2] + 1, box[3]])
                    labels.append(i), scores.append(0.8)
                    boxes.append([0, 0, 1, 1]), labels.append(i), scores.append(0.7)
                    if "green" in qs and colour_box(im, "green") is None:
                        boxes.append(box), labels.append(qs.index("green")), scores.append(0.5)
            keep = [k for k, s in enumerate(scores) if s >= threshold]
            out.append((np.asarray(boxes, np.float32).reshape(-1, 4)[keep],
                        np.asarray(labels, np.int32)[keep], np.asarray(scores, np.float32)[keep]))
        return out


class RegionCaptioner(b.RegionCaptioner):
    """Names the colour under the box centre; "a cloud" when that is the sky."""

    family = "fake"

    def describe(self, images, boxes):
        out = []
        for im, bb in zip(images, boxes, strict=True):
            names = []
            for x0, y0, x1, y1 in bb:
                px = im[int((y0 + y1) / 2), int((x0 + x1) / 2)]
                names.append(next((f"a {c} block" for c, rgb in COLOURS.items()
                                   if tuple(px) == rgb), "a cloud"))
            out.append(names)
        return out


class Segmenter(b.Segmenter):
    """Mask = the pixels of the box's majority colour inside the box; a concept's mask = the
    pixels of that colour (score 0.9), when present."""

    family = "fake"

    def segment(self, images, boxes):
        out = []
        for im, bb in zip(images, boxes, strict=True):
            masks = np.zeros((len(bb), *im.shape[:2]), bool)
            for k, (x0, y0, x1, y1) in enumerate(bb.astype(int)):
                inside = np.zeros(im.shape[:2], bool)
                inside[y0:y1, x0:x1] = True
                for c in COLOURS:
                    m = colour_mask(im, c) & inside
                    if m.sum() > masks[k].sum():
                        masks[k] = m
            out.append((masks, np.full((len(bb),), 0.95, np.float32)))
        return out

    def segment_concepts(self, images, concepts, threshold):
        return [[(i, colour_mask(im, c), 0.9) for i, c in enumerate(cs)
                 if (c == "sky" or c in COLOURS) and colour_mask(im, c).any()]
                for im, cs in zip(images, concepts, strict=True)]
