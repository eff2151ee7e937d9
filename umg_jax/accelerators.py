"""The accelerator chip table (``accelerators.toml``) and TPU topologies for ahead-of-time
compilation.

One table serves three users: the dry run's fit verdict and roofline (HBM, peak, bandwidths),
the trainer's MFU denominator on accelerators (spec peak of the device kind: a short timed matmul
on a TPU or an H100 measures launch overhead, not peak), and ``benchmarks/accelerator_check.py``.
On CPU there is no spec: MFU is measured against ``metrics.measure_peak_flops``.

TPU topologies (``"v5e:16x16"``, ``"v4:4x4x8"``; dimensions count chips) give abstract TPU
devices through libtpu (``pip install "jax[tpu]"``) with no TPU attached, so the real TPU compiler
compiles the real step on this machine (``umg_jax.dryrun``). v4 and v5p are described in megacore
mode (one device per chip, two TensorCores), as JAX runs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import tomllib
from collections.abc import Sequence

TABLE_FILE = os.path.join(os.path.dirname(__file__), "accelerators.toml")
# libtpu's own pattern for topology names, plus what this table knows of chips.
_TOPOLOGY = re.compile(r"^([a-zA-Z0-9_ ]+)[=_:]([0-9]+(?:x[0-9]+)*)(_twisted|_untwisted)?$")


class TopologyError(ValueError):
    """A ``--topology`` name that does not parse or names no known chip."""


class CompilerUnavailable(RuntimeError):
    """libtpu (the TPU compiler) is not installed or cannot start."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Spec figures of one accelerator chip (one JAX device); see ``accelerators.toml``."""

    name: str
    platform: str  # "tpu" or "gpu"
    device_kinds: tuple[str, ...]
    bf16_tflops: float
    hbm_gib: float
    hbm_gbps: float
    ici_gbps: float
    topology: str | None = None
    chip_config: str | None = None

    @property
    def peak_flops(self) -> float:
        """Dense bf16 matmul peak, FLOP/s."""
        return self.bf16_tflops * 1e12

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * 1024 ** 3)


@functools.cache
def chips() -> dict[str, Chip]:
    """``{name: Chip}`` from the package's ``accelerators.toml``."""
    with open(TABLE_FILE, "rb") as f:
        raw = tomllib.load(f)
    return {name: Chip(name=name, platform=v["platform"],
                       device_kinds=tuple(v["device_kinds"]), bf16_tflops=float(v["bf16_tflops"]),
                       hbm_gib=float(v["hbm_gib"]), hbm_gbps=float(v["hbm_gbps"]),
                       ici_gbps=float(v["ici_gbps"]), topology=v.get("topology"),
                       chip_config=v.get("chip_config"))
            for name, v in raw.items()}


def chip_for_device_kind(kind: str) -> Chip | None:
    """The table entry whose ``device_kinds`` holds ``kind`` (case-insensitive), else None."""
    k = kind.strip().lower()
    for chip in chips().values():
        if any(k == d.lower() for d in chip.device_kinds):
            return chip
    return None


def chip_for_devices(devices: Sequence) -> Chip | None:
    """The chip of a set of devices (all of one kind), or None for CPUs and unknown kinds."""
    kinds = {d.device_kind for d in devices}
    if len(kinds) != 1:
        raise ValueError(f"devices of several kinds: {sorted(kinds)}")
    return chip_for_device_kind(kinds.pop())


def spec_peak_flops(devices: Sequence) -> float | None:
    """Sum of the spec bf16 peaks of ``devices`` (FLOP/s) on known accelerators; None on CPU or
    for a device kind the table lacks (the caller then measures, or reports no MFU)."""
    chip = chip_for_devices(devices)
    return None if chip is None else chip.peak_flops * len(devices)


def topology_chip(name: str) -> Chip:
    """The chip of a topology name such as ``"v5e:16x16"``; :class:`TopologyError` if the name does
    not parse or its prefix is not a TPU generation of the table."""
    m = _TOPOLOGY.match(name.strip())
    if not m:
        raise TopologyError(f"--topology {name!r} does not parse: expected GENERATION:AxB[xC], "
                            "e.g. v5e:16x16, v4:4x4x8, v5p:8x8x8, v6e:16x16")
    prefix = m.group(1).strip().lower()
    known = {c.topology: c for c in chips().values() if c.topology}
    if prefix not in known:
        raise TopologyError(f"--topology {name!r}: unknown TPU generation {prefix!r}; known: "
                            f"{', '.join(sorted(known))}")
    return known[prefix]


def topology_size(name: str) -> int:
    """Number of chips (= devices) of a topology name."""
    topology_chip(name)
    dims = _TOPOLOGY.match(name.strip()).group(2)
    return math.prod(int(d) for d in dims.split("x"))


@contextlib.contextmanager
def _libtpu_env(chip: Chip, n: int):
    """The environment libtpu reads when it starts (inside the first topology call), set for
    that call only: a plain host lacks a TPU VM's worker list and accelerator type (libtpu logs
    warnings without them), and a second process would stop at libtpu's lock file. Restored
    afterwards, so that child processes (a trainer started by a test) do not mistake this host
    for a TPU VM (``TPU_WORKER_HOSTNAMES`` makes ``umg_jax.train`` initialise multi-host)."""
    cores = n * (2 if chip.chip_config == "megacore" else 1)
    prefix = {"v5e": "v5litepod", "v4": "v4", "v5p": "v5p", "v6e": "v6e"}[chip.topology]
    size = cores if prefix in ("v4", "v5p") else n  # v4 / v5p types count TensorCores
    env = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost",
           "TPU_SKIP_MDS_QUERY": "1", "TPU_STDERR_LOG_LEVEL": "3", "TPU_MIN_LOG_LEVEL": "3",
           "TPU_ACCELERATOR_TYPE": f"{prefix}-{size}"}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tpu_compiler_available() -> bool:
    """True if libtpu is installed (deviceless TPU compilation possible)."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
    """Abstract TPU devices of a topology (one per chip), for ahead-of-time compilation.

    Raises :class:`TopologyError` for a bad name, :class:`CompilerUnavailable` without libtpu.
    """
    chip = topology_chip(name)
    n = topology_size(name)
    if not tpu_compiler_available():
        raise CompilerUnavailable("libtpu is not installed (pip install -r requirements-tpu.txt "
                                  "or 'jax[tpu]' at the pinned jax version)")
    from jax.experimental import topologies

    try:
        with _libtpu_env(chip, n):
            desc = topologies.get_topology_desc(platform="tpu", topology_name=name.strip(),
                                                chip_config_name=chip.chip_config)
    except Exception as e:  # libtpu reports a bad shape as a generic runtime error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "lockfile" in msg or "plugin" in msg.lower():
            raise CompilerUnavailable(f"libtpu could not start: {msg}") from e
        raise TopologyError(f"--topology {name!r}: libtpu refused it: {msg}") from e
    devices = list(desc.devices)
    if len(devices) != n:
        raise TopologyError(f"--topology {name!r}: expected {n} chips, libtpu gave "
                            f"{len(devices)} devices")
    return devices
