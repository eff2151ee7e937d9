"""How a recorded result was made: the command line, the git commit of the checkout (and whether
it had uncommitted changes; none for an installed wheel), the date, the load and the machine, all
read at run time, never typed. ``dryrun --json`` and the repository's benchmark scripts record it.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the checkout, when there is one


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpuinfo() -> str:
    try:
        return pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# CPU features that change XLA:CPU's speed a lot (native bf16 dots, AMX tiles): recorded with the
# model name because cloud VMs of one model name expose different ones.
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """Which of ``CPU_FLAGS`` this CPU reports (Linux; empty elsewhere)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in CPU_FLAGS if f in have]
    return []


def machine() -> dict[str, Any]:
    """The host: OS, CPU model and features, core count, memory, Python, and the versions of the
    JAX stack."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = None
    return {"os": platform.platform(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
            "cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "python": platform.python_version(),
            **{p: version(p) for p in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin")}}


def _git_state() -> tuple[str | None, bool | None]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return _git("rev-parse", "HEAD"), (bool(status) if status is not None else None)


# The checkout as the run found it: a long run's result is written after later commits may have
# landed, and the code that ran is the code of its start.
_AT_START = _git_state()


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """``{"command", "git_commit", "git_dirty", "date", "load_avg", "machine"}`` for this run
    (the commit and dirty flag as the process found them when it started, i.e. imported this
    module; ``git_at_end`` too when the checkout changed while it ran; ``load_avg``: the 1 / 5 /
    15-minute load averages when the result is written; the 5 and 15 minute ones span the run,
    and other jobs on the machine inflate timings)."""
    argv = sys.argv if argv is None else argv
    commit, dirty = _AT_START
    end = _git_state()
    return {"command": " ".join(shlex.quote(a) for a in ["python", *argv]),
            "git_commit": commit, "git_dirty": dirty,
            **({"git_at_end": {"commit": end[0], "dirty": end[1]}} if end != _AT_START else {}),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg")
            else None,
            "machine": machine()}
