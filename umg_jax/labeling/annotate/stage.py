"""What the stage modules share: the per-image annotation state and the stage context.

The state of one image is a JSON-able dict, filled in by the stages in recipe order and written
as that image's line of the shard's ``.jsonl`` (what each stage produced, with provenance)::

    id, source, height, width
    captions  [{"text", "by"}]                      by = "input" or the backend name
    tags      [{"name", "score", "by"}]             unique names, best score kept
    regions   [{"box": [x0, y0, x1, y1] px, "label", "score", "by", "isthing",
                "phrase", "phrase_by", "mask": RLE | None, "mask_score", "mask_by"}]
    concepts  [{"label", "isthing", "score", "by", "mask": RLE}]   text-prompted masks (SAM 3):
                                                     stuff, or things with "prompts" "tags"
    dropped   {reason: count}                        what the filter removed
"""

from __future__ import annotations

import dataclasses
from typing import Any

from umg_jax.labeling.annotate.things import is_thing


@dataclasses.dataclass(frozen=True)
class Context:
    """Run-wide inputs of the stages: the tag vocabulary and the stuff names."""

    vocab: tuple[str, ...]
    stuff: frozenset[str]

    def is_thing(self, name: str) -> bool:
        return is_thing(name, self.stuff)


def new_state(sid: str, source: str, height: int, width: int,
              captions: list[str]) -> dict[str, Any]:
    """An image's state before any stage ran."""
    return {"id": sid, "source": source, "height": int(height), "width": int(width),
            "captions": [{"text": c, "by": "input"} for c in captions],
            "tags": [], "regions": [], "concepts": [], "dropped": {}}


def caption_texts(state: dict[str, Any]) -> list[str]:
    return [c["text"] for c in state["captions"]]


def add_tag(state: dict[str, Any], name: str, score: float, by: str) -> None:
    """Adds a tag, or raises an existing one's score (and credits both backends)."""
    for t in state["tags"]:
        if t["name"] == name:
            if score > t["score"]:
                t["score"] = float(score)
            if by not in t["by"].split("+"):
                t["by"] += f"+{by}"
            return
    state["tags"].append({"name": name, "score": float(score), "by": by})


def drop(state: dict[str, Any], reason: str, n: int = 1) -> None:
    if n:
        state["dropped"][reason] = state["dropped"].get(reason, 0) + n
