"""The accelerator chip table (``accelerators.toml``) and TPU / GPU topologies for ahead-of-time
compilation.

One table serves three users: the dry run's fit verdict and roofline (HBM, peak, bandwidths),
the trainer's MFU denominator on accelerators (spec peak of the device kind: a short timed matmul
on a TPU or an H100 measures launch overhead, not peak), and ``benchmarks/accelerator_check.py``.
On CPU there is no spec: MFU is measured against ``metrics.measure_peak_flops``.

TPU topologies (``"v5e:16x16"``, ``"v4:4x4x8"``; dimensions count chips) give abstract TPU
devices through libtpu (``pip install "jax[tpu]"``) with no TPU attached, so the real TPU compiler
compiles the real step on this machine (``umg_jax.dryrun``). v4 and v5p are described in megacore
mode (one device per chip, two TensorCores), as JAX runs them.

GPU nodes (``"h100:1x1x8"``, ``"h200:1x2x8"``: slices x hosts x GPUs per host, as JAX's GPU
topologies name them) give abstract GPU devices through the CUDA plugin (``pip install -r
requirements-gpu.txt``) with no GPU and no driver: XLA:GPU compiles for the card described by its
target file in ``umg_jax/gpu_targets/`` (the card's public figures) and the cuDNN / CUDA runtime
versions the installed plugin loads. No device is there to autotune on, so GPU compiles take
:data:`GPU_COMPILE_OPTIONS`.
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
GPU_TARGET_DIR = os.path.join(os.path.dirname(__file__), "gpu_targets")
GPU_INSTALL = "pip install -r requirements-gpu.txt"
# XLA options for a deviceless GPU compile, passed per compile (``compile(compiler_options=)``)
# so that nothing global changes: Triton GEMMs need an autotuning run on a device to pick their
# tiles (without one a real step fails with "Couldn't find output tile sizes"), so matmuls go to
# cuBLAS, with its default algorithm.
GPU_COMPILE_OPTIONS = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0}
# libtpu's own pattern for topology names, plus what this table knows of chips.
_TOPOLOGY = re.compile(r"^([a-zA-Z0-9_ ]+)[=_:]([0-9]+(?:x[0-9]+)*)(_twisted|_untwisted)?$")


class TopologyError(ValueError):
    """A ``--topology`` name that does not parse or names no known chip."""


class CompilerUnavailable(RuntimeError):
    """libtpu (the TPU compiler) or the CUDA plugin (XLA:GPU) is not installed or cannot
    start."""


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
    gpu_target: str | None = None
    compute_capability: str | None = None  # CUDA "major.minor"; GPUs only

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
                       chip_config=v.get("chip_config"), gpu_target=v.get("gpu_target"),
                       compute_capability=v.get("compute_capability"))
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


def _known_topologies() -> str:
    tpu = sorted(c.topology for c in chips().values() if c.topology and c.platform == "tpu")
    gpu = sorted(c.topology for c in chips().values() if c.topology and c.platform == "gpu")
    return (f"TPU slices {', '.join(tpu)} (e.g. v5e:16x16, v4:4x4x8); GPU nodes "
            f"{', '.join(gpu)} as SLICESxHOSTSxGPUS (e.g. h100:1x1x8, h200:1x2x8)")


def topology_chip(name: str) -> Chip:
    """The chip of a topology name such as ``"v5e:16x16"`` or ``"h100:1x2x8"``;
    :class:`TopologyError` (listing the known ones) if the name does not parse, its prefix is
    no chip of the table, or a GPU shape is not ``SLICESxHOSTSxGPUS`` of positive counts."""
    m = _TOPOLOGY.match(name.strip())
    if not m:
        raise TopologyError(f"--topology {name!r} does not parse: expected CHIP:AxB[xC]; known: "
                            f"{_known_topologies()}")
    prefix = m.group(1).strip().lower()
    known = {c.topology: c for c in chips().values() if c.topology}
    if prefix not in known:
        raise TopologyError(f"--topology {name!r}: unknown chip {prefix!r}; known: "
                            f"{_known_topologies()}")
    dims = [int(d) for d in m.group(2).split("x")]
    chip = known[prefix]
    if chip.platform == "gpu" and (len(dims) != 3 or min(dims) < 1 or m.group(3)):
        raise TopologyError(f"--topology {name!r}: a GPU node is {prefix}:SLICESxHOSTSxGPUS "
                            "with counts >= 1, e.g. h100:1x1x8 (one 8-GPU host) or "
                            "h100:1x2x8 (two)")
    if min(dims) < 1:
        raise TopologyError(f"--topology {name!r}: every dimension must be >= 1")
    return chip


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


def gpu_compiler_available() -> bool:
    """True if the CUDA plugin is installed (deviceless GPU compilation possible)."""
    import importlib.util

    return (importlib.util.find_spec("jax_cuda12_plugin") is not None
            and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


def gpu_target_config(chip: Chip) -> str:
    """XLA's ``GpuTargetConfig`` proto text for ``chip``: its card file from
    ``umg_jax/gpu_targets/`` (hardware) plus the platform and the cuDNN and CUDA runtime versions
    the installed CUDA plugin loads (the versions a node installed from requirements-gpu.txt
    runs, and the ones JAX's cuDNN attention rule checks while tracing)."""
    if not chip.gpu_target:
        raise TopologyError(f"{chip.name} has no GPU target description in {GPU_TARGET_DIR}")
    if not gpu_compiler_available():
        raise CompilerUnavailable(f"the CUDA plugin is not installed ({GPU_INSTALL})")
    from jax._src.lib import cuda_versions  # the plugin's own version queries; no driver needed

    if cuda_versions is None:
        raise CompilerUnavailable(f"the CUDA plugin could not be loaded ({GPU_INSTALL})")
    dnn, rt = cuda_versions.cudnn_get_version(), cuda_versions.cuda_runtime_get_version()
    with open(os.path.join(GPU_TARGET_DIR, chip.gpu_target)) as f:
        card = f.read()
    # cuDNN encodes 9.28.0 as 92800, the CUDA runtime 12.9 as 12090
    return (f"{card}\nplatform_name: \"CUDA\"\n"
            f"dnn_version_info {{ major: {dnn // 10000} minor: {dnn // 100 % 100} "
            f"patch: {dnn % 100} }}\n"
            f"runtime_version {{ major: {rt // 1000} minor: {rt % 1000 // 10} }}\n")


def _gpu_devices(name: str, chip: Chip) -> list:
    from jax.experimental import topologies

    shape = _TOPOLOGY.match(name.strip()).group(2)
    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(chip),
                                            topology=shape)
    except (TopologyError, CompilerUnavailable):
        raise
    except Exception as e:  # the plugin reports a bad target or shape as a generic error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TopologyError(f"--topology {name!r}: the CUDA plugin refused it: {msg}") from e
    return list(desc.devices)


def topology_devices(name: str) -> list:
    """Abstract devices of a topology (one per TPU chip or GPU), for ahead-of-time compilation.

    Raises :class:`TopologyError` for a bad name, :class:`CompilerUnavailable` without libtpu
    (TPU) or the CUDA plugin (GPU). Call it with the local backend pinned to the CPU
    (``jax.config.update("jax_platforms", "cpu")`` before any backend starts): the CUDA plugin
    would otherwise try to open a GPU through a driver that a CPU host lacks.
    """
    chip = topology_chip(name)
    n = topology_size(name)
    if chip.platform == "gpu":
        devices = _gpu_devices(name, chip)
    else:
        devices = _tpu_devices(name, chip, n)
    if len(devices) != n:
        raise TopologyError(f"--topology {name!r}: expected {n} devices, the compiler gave "
                            f"{len(devices)}")
    return devices


def _tpu_devices(name: str, chip: Chip, n: int) -> list:
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
    return list(desc.devices)


# JAX's GPU allocator takes this fraction of a GPU's memory when neither XLA_CLIENT_MEM_FRACTION
# nor XLA_PYTHON_CLIENT_MEM_FRACTION is set (jax 0.10: "JAX will preallocate 75% of the total GPU
# memory", docs.jax.dev "GPU memory allocation"); a step needing more fails on the node.
JAX_GPU_MEM_FRACTION = 0.75


def jax_gpu_memory_fraction(environ=None) -> float:
    """Fraction of a GPU's memory a JAX process may use, as the same environment would give it
    on the node: ``XLA_CLIENT_MEM_FRACTION`` (or its old name ``XLA_PYTHON_CLIENT_MEM_FRACTION``),
    all of it with ``XLA_PYTHON_CLIENT_ALLOCATOR=platform``, else :data:`JAX_GPU_MEM_FRACTION`."""
    env = os.environ if environ is None else environ
    if env.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
        return 1.0
    text = env.get("XLA_CLIENT_MEM_FRACTION") or env.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if not text:
        return JAX_GPU_MEM_FRACTION
    try:
        fraction = float(text)
    except ValueError:
        raise ValueError(f"XLA_CLIENT_MEM_FRACTION={text!r} is not a number") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"XLA_CLIENT_MEM_FRACTION={text!r} must be in (0, 1]")
    return fraction


def jax_usable(chip: Chip, environ=None) -> Chip:
    """``chip`` with ``hbm_gib`` the memory a JAX process may use of it: for a GPU,
    :func:`jax_gpu_memory_fraction` of its HBM; a TPU's HBM is all usable."""
    if chip.platform != "gpu":
        return chip
    return dataclasses.replace(chip, hbm_gib=chip.hbm_gib * jax_gpu_memory_fraction(environ))


def compile_options(devices: Sequence) -> dict:
    """XLA options a compile for ``devices`` needs: :data:`GPU_COMPILE_OPTIONS` for GPUs (the
    dry run compiles deviceless), none otherwise."""
    return dict(GPU_COMPILE_OPTIONS) if devices and devices[0].platform == "gpu" else {}
