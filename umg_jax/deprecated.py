"""Old ``python -m`` names that forward to their new modules for one release."""

from __future__ import annotations

import importlib
import sys


def forward(old: str, new: str) -> int:
    """Runs ``main()`` of module ``new`` for the command-line name ``old``, after one line on
    stderr that names the new command; returns its exit status."""
    command = new.removesuffix(".__main__").removesuffix(".cli")
    print(f"warning: python -m {old} is deprecated and will be removed in the next release; "
          f"use python -m {command}", file=sys.stderr)
    status = importlib.import_module(new).main()
    return 0 if status is None else int(status)
