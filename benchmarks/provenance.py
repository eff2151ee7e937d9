"""What every ``benchmarks/results/*.json`` records about how it was made
(:mod:`umg_jax.provenance`: command line, git commit, date, load, machine), and the one writer.

Scripts in this folder import it by name (``from provenance import write_result``): Python puts
a script's own folder first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from umg_jax.provenance import provenance


def write_result(path: str | os.PathLike, result: dict[str, Any],
                 argv: list[str] | None = None) -> pathlib.Path:
    """Writes ``{"provenance": ..., **result}`` as indented JSON to ``path`` (folders made)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": provenance(argv), **result}, indent=2,
                               default=str) + "\n")
    return path
