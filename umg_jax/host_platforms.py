"""Which JAX platforms this host has, named before JAX's backends start.

With libtpu and the CUDA plugin installed (requirements-tpu.txt / -gpu.txt, for the deviceless dry
runs) JAX tries every platform when its backends start; on a host without that hardware libtpu
logs ``INVALID_ARGUMENT`` errors about ``TPU_WORKER_HOSTNAMES`` and the CUDA plugin a ``cuInit``
traceback: alarming and harmless. Every command calls :func:`pin` first, which sets
``JAX_PLATFORMS`` to the platforms present, and only when that cannot hide hardware.

Imports nothing heavy (no jax unless the caller already has it), so commands that may never
start JAX (the torch-based annotator) pay nothing.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Mapping

# libtpu's and a TPU VM's environment: any of them set means "a TPU host", whatever the devices
TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_NAME",
                "TPU_HOST_BOUNDS", "TPU_CHIPS_PER_HOST_BOUNDS", "CLOUD_TPU_TASK_ID")
GOOGLE_PCI_VENDOR = "0x1ae0"  # Cloud TPU chips on a TPU VM's PCI bus
CUDA_PLUGIN_PREFIX = "xla_cuda"  # jax_plugins.xla_cuda12 / xla_cuda13 (the jax[cuda*] wheels)


def installed_jax_plugins() -> set[str]:
    """Names of the PJRT plugins JAX would load (modules of the ``jax_plugins`` namespace package
    and ``jax_plugins`` entry points), found without importing them."""
    import importlib.metadata
    import importlib.util
    import pkgutil

    names = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is None or not spec.submodule_search_locations:
        return names
    return names | {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}


def tpu_chips_attached(pci_root: str = "/sys/bus/pci/devices") -> bool:
    """Whether this host has Cloud TPU chips (a TPU VM): a PCI device of Google's vendor id."""
    for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def tpu_present(environ: Mapping[str, str], dev_root: str = "/dev",
                pci_root: str = "/sys/bus/pci/devices") -> bool:
    """libtpu's own signs of a TPU host: its device files (``/dev/accel*`` on v2-v4,
    ``/dev/vfio/*`` on v5e and later), a TPU VM's environment, or Google's PCI devices."""
    return bool(any(environ.get(k) for k in TPU_ENV_VARS)
                or glob.glob(os.path.join(dev_root, "accel*"))
                or glob.glob(os.path.join(dev_root, "vfio", "*"))
                or tpu_chips_attached(pci_root))


def local_platforms(environ: Mapping[str, str] | None = None, dev_root: str = "/dev",
                    pci_root: str = "/sys/bus/pci/devices",
                    plugins: Iterable[str] | None = None) -> str | None:
    """The ``JAX_PLATFORMS`` value naming the platforms this host has: ``"cpu"``, or
    ``"cuda,cpu"`` with an NVIDIA device and the CUDA plugin; None to leave JAX's own choice.

    None whenever a value could hide hardware: ``JAX_PLATFORMS`` already set (even empty), any
    sign of a TPU (:func:`tpu_present`), an AMD GPU (``/dev/kfd``), an NVIDIA device without the
    CUDA plugin (JAX then says so itself), or a PJRT plugin other than CUDA's installed.
    ``environ`` defaults to ``os.environ``, ``plugins`` to :func:`installed_jax_plugins`.
    """
    environ = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in environ or tpu_present(environ, dev_root, pci_root):
        return None
    if os.path.exists(os.path.join(dev_root, "kfd")):
        return None
    plugins = installed_jax_plugins() if plugins is None else set(plugins)
    cuda = {p for p in plugins if p.startswith(CUDA_PLUGIN_PREFIX)}
    if plugins - cuda:
        return None
    nvidia = bool(glob.glob(os.path.join(dev_root, "nvidia[0-9]*"))
                  or os.path.exists(os.path.join(dev_root, "dxg")))  # dxg: WSL2's GPU device
    if nvidia:
        return "cuda,cpu" if cuda else None
    return "cpu"


def pin() -> str | None:
    """Restricts JAX to the platforms :func:`local_platforms` finds, in ``os.environ`` (read when
    jax is imported; child processes inherit it) and, when jax is already imported, its config.
    Call it first in a command's ``main``. Does nothing once JAX's backends run or when
    ``jax_platforms`` was set another way (``--jax_platforms``, ``jax.config.update``).
    Returns the value set, or None."""
    jax = sys.modules.get("jax")
    if jax is not None:
        from jax._src import xla_bridge

        started = getattr(xla_bridge, "backends_are_initialized", lambda: True)()
        if jax.config.jax_platforms or started:
            return None
    value = local_platforms()
    if value is not None:
        os.environ["JAX_PLATFORMS"] = value
        if jax is not None:
            jax.config.update("jax_platforms", value)
    return value
