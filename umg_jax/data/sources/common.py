"""What every source shares: the drop report, image checks, box checks."""

from __future__ import annotations

import io
import json
import pathlib
from collections import Counter
from typing import Any

BOX_TOLERANCE_PX = 1.0  # annotation tools round: a box may overhang the image by this much


class BuildError(ValueError):
    """A problem in strict mode, or an unusable input (one line; the CLI exits with 2)."""


class Report:
    """Drops by source id and reason; ``strict`` turns the first drop into a ``BuildError``."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.dropped: list[dict[str, str]] = []
        self.kinds: Counter = Counter()
        self.written = Counter()
        self.total: int | None = None  # inputs to go through, when the source knows (for ETA)

    def drop(self, source: str, kind: str, detail: str) -> None:
        if self.strict:
            raise BuildError(f"{source}: {kind}: {detail}")
        self.dropped.append({"source": source, "kind": kind, "detail": detail})
        self.kinds[kind] += 1

    def count(self, record: dict[str, Any]) -> None:
        self.written["examples"] += 1
        self.written["regions"] += len(record["regions"])
        self.written["masks"] += len(record["segments"])

    def summary(self) -> str:
        w = self.written
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items())) or "none"
        return (f"wrote {w['examples']} examples, {w['regions']} regions, {w['masks']} masks; "
                f"dropped: {drops}")

    def save(self, path: pathlib.Path) -> None:
        path.write_text(json.dumps({"written": dict(self.written), "dropped_by_kind":
                                    dict(self.kinds), "dropped": self.dropped}, indent=1))


def image_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` of encoded image bytes, decoding them fully once so that a truncated
    file is caught at build time, not in training; raises for a bad file."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        width, height = im.size
    return height, width


def read_image(path: pathlib.Path) -> tuple[bytes, int, int]:
    """``(file bytes, height, width)``; the encoded bytes are kept as they are (JPEG stays
    JPEG). Raises ``FileNotFoundError`` / others for a missing or bad file."""
    data = path.read_bytes()
    return (data, *image_size(data))


def check_box(box: list[float], height: int, width: int) -> tuple[list[float] | None, str]:
    """``[x0, y0, x1, y1]`` clipped to the image, or ``(None, why)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    tol = BOX_TOLERANCE_PX
    if not (x1 > x0 and y1 > y0):
        return None, f"degenerate box {[x0, y0, x1, y1]}"
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return None, f"box {[x0, y0, x1, y1]} outside the {width}x{height} image"
    return [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))], ""


def clean_text(text: Any) -> str | None:
    """A stripped caption / phrase, or None when empty or not valid text."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(text, str):
        return None
    text = " ".join(text.split())
    if not text or "\ufffd" in text:
        return None
    return text
