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


def _parse_capability(text: str) -> tuple[int, int] | None:
    """``"9.0"`` -> ``(9, 0)``; None if it does not parse."""
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def target_compute_capability() -> tuple[int, int] | None:
    """``(major, minor)`` CUDA compute capability of the GPU the current trace is compiled for;
    None when unknown (not a GPU, or a device kind the chip table lacks).

    Under an abstract mesh only the device kind is known (``AbstractDevice`` carries no
    capability): it is looked up in the chip table (``umg_jax/accelerators.toml``). Without a
    mesh, the default device's own ``compute_capability`` (real and deviceless CUDA devices
    have one)."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if dev is not None and getattr(dev, "device_kind", None):
        from umg_jax import accelerators

        chip = accelerators.chip_for_device_kind(dev.device_kind)
        cc = chip.compute_capability if chip is not None else None
        return _parse_capability(cc) if cc else None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return _parse_capability(cc) if cc else None
