"""Which platform the code being traced is compiled for.

Backend-dependent choices (the CPU custom VJPs of ``ops/dense.py`` and ``ops/attention.py``, the
fused attention kernel on TPU / GPU) must follow the devices a step is *compiled for*, not the
host's default backend: ``python -m umg_jax.dryrun --topology v5e:16x16`` compiles for TPU devices
in a process whose ``jax.default_backend()`` is ``"cpu"``.

The train step (``step.make_train_step``) traces the model under its mesh's abstract mesh
(``jax.sharding.use_abstract_mesh``), whose ``abstract_device`` names the platform of the mesh's
devices. Code traced without a mesh (inference, tests) runs on the default device, whose platform
is then the target.
"""

from __future__ import annotations

import jax

PLATFORMS = ("cpu", "tpu", "gpu")


def normalise(platform: str) -> str:
    """``"cuda"`` / ``"rocm"`` -> ``"gpu"``; others unchanged (lower case)."""
    p = platform.lower()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def of_devices(devices) -> str:
    """Platform of a non-empty sequence of devices (all alike), normalised."""
    devices = list(devices)
    if not devices:
        raise ValueError("no devices")
    kinds = {normalise(d.platform) for d in devices}
    if len(kinds) != 1:
        raise ValueError(f"devices of several platforms: {sorted(kinds)}")
    return kinds.pop()


def target_platform() -> str:
    """``"cpu"``, ``"tpu"`` or ``"gpu"``: the platform the current trace is compiled for.

    The abstract mesh in context (``jax.sharding.use_abstract_mesh`` / ``jax.set_mesh``) decides;
    without one, the first default device's platform.
    """
    mesh = jax.sharding.get_abstract_mesh()
    dev = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if dev is not None and getattr(dev, "platform", None):
        return normalise(dev.platform)
    return normalise(jax.devices()[0].platform)
