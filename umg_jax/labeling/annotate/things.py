"""Thing / stuff typing of tag names, from the ``stuff_names.txt`` package data (or a file)."""

from __future__ import annotations

import pathlib

_DEFAULT = pathlib.Path(__file__).with_name("stuff_names.txt")


def load_stuff_names(path: str | None = None) -> frozenset[str]:
    """Lower-case stuff names of ``path`` (default: the shipped list); ``#`` lines are comments."""
    text = pathlib.Path(path or _DEFAULT).read_text()
    return frozenset(s.strip().lower() for s in text.splitlines()
                     if s.strip() and not s.lstrip().startswith("#"))


def is_thing(name: str, stuff: frozenset[str]) -> bool:
    """A tag is stuff when its lower-cased name, or its last word ("blue sky"), is listed."""
    words = name.strip().lower().split()
    return " ".join(words) not in stuff and not (words and words[-1] in stuff)
