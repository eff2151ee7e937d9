"""What every ``benchmarks/results/*.json`` records about how it was made: the command line, the
git commit (and whether the tree had uncommitted changes), the date and the machine, all read at
run time, never typed.

Scripts in this folder import it by name (``from provenance import write_result``): Python puts
a script's own folder first on ``sys.path``.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The host: OS, CPU model, core count, Python, and the versions of the JAX stack."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"os": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(),
            **{p: version(p) for p in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin")}}


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """``{"command", "git_commit", "git_dirty", "date", "machine"}`` for this run."""
    argv = sys.argv if argv is None else argv
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"command": " ".join(shlex.quote(a) for a in ["python", *argv]),
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(status) if status is not None else None,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine()}


def write_result(path: str | os.PathLike, result: dict[str, Any],
                 argv: list[str] | None = None) -> pathlib.Path:
    """Writes ``{"provenance": ..., **result}`` as indented JSON to ``path`` (folders made)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": provenance(argv), **result}, indent=2,
                               default=str) + "\n")
    return path
