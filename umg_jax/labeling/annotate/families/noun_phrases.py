"""Tags read from the captions: the vocabulary entries a caption mentions (no model, no torch).

A mention is the entry's words in order on word boundaries, the last word optionally plural
("dog" matches "two dogs", "traffic light" matches "traffic lights"; case-insensitive). This is
vocabulary matching, not a parser: phrases outside the vocabulary are not invented.
Options: none.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from umg_jax.labeling.annotate.backend import Tagger


@functools.lru_cache(maxsize=4096)
def _pattern(name: str) -> re.Pattern:
    words = [re.escape(w) for w in name.lower().split()]
    if not words:
        return re.compile(r"(?!x)x")  # an empty name matches nothing
    words[-1] += r"(?:s|es)?"
    return re.compile(r"\b" + r"\s+".join(words) + r"\b")


def mentions(text: str, name: str) -> bool:
    """Whether ``text`` mentions ``name`` (see the module docstring)."""
    return _pattern(name).search(text.lower()) is not None


class NounPhraseTagger(Tagger):
    family = "noun_phrases"

    def tag(self, images: list[np.ndarray], vocab: list[str],
            captions: list[list[str]]) -> np.ndarray:
        """``[N, V] float32``: 1 where a caption of image n mentions entry v, else 0."""
        out = np.zeros((len(images), len(vocab)), np.float32)
        for i, caps in enumerate(captions):
            text = " . ".join(caps)
            for j, name in enumerate(vocab):
                out[i, j] = mentions(text, name)
        return out
