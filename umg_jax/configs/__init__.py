"""Experiment configs (one ``get_config()`` per file) and the shared section defaults (``common``).

A checkout's top-level ``configs/`` is a link to this folder, so ``--config configs/tiny.py`` and,
from an installed wheel, ``--config $(python -m umg_jax.configs tiny)`` name the same file.
"""

import pathlib

DIR = pathlib.Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped configs, sorted (``common`` holds sections, not a config)."""
    return sorted(f.stem for f in DIR.glob("*.py") if not f.stem.startswith("_")
                  and f.stem != "common")


def path(name: str) -> pathlib.Path:
    """The file of config ``name`` (``"tiny"`` or ``"tiny.py"``); ``FileNotFoundError`` names the
    shipped configs when there is no such file."""
    p = DIR / (name if name.endswith(".py") else f"{name}.py")
    if not p.is_file() or p.name.startswith("_") or p.name == "common.py":
        raise FileNotFoundError(f"no shipped config {name!r}; shipped: {', '.join(names())}")
    return p
