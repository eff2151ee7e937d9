"""Test-session setup shared by every test module.

- 8 fake CPU devices, so that mesh / shard_map code runs on the CPU (set before jax is imported).
- absl flags marked parsed (Grain workers read absl flags; pytest never calls absl.app.run).
- The torchvision op-schema shim: PyPI's torchvision 0.28 beside the local CPU torch 2.13 fails at
  import with "operator torchvision::nms does not exist"; defining the two schemas first fixes it.
  Applied lazily, only if torch is importable, so the JAX-only tests never import torch.
"""

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])

_TV_SHIM = []


def torch_peers():
    """Imports torch with the torchvision shim applied once; returns the torch module.

    Skips the calling test when torch is not installed.
    """
    torch = pytest.importorskip("torch")
    if not _TV_SHIM:
        lib = torch.library.Library("torchvision", "DEF")
        for schema in (
            "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        ):
            lib.define(schema)
        _TV_SHIM.append(lib)  # keep the library object alive
    return torch


@pytest.fixture(scope="session")
def torch_mod():
    return torch_peers()
