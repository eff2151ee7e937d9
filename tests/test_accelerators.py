"""accelerators: the chip table, device-kind lookup and TPU topologies for deviceless compiles."""

import pytest

from umg_jax import accelerators as A

needs_libtpu = pytest.mark.skipif(not A.tpu_compiler_available(),
                                  reason="libtpu (requirements-tpu.txt) not installed")


def test_table_is_complete_and_unambiguous():
    chips = A.chips()
    assert {"tpu_v4", "tpu_v5e", "tpu_v5p", "tpu_v6e", "a100_40g", "a100_80g", "h100", "h200",
            "b200"} <= set(chips)
    kinds = [k.lower() for c in chips.values() for k in c.device_kinds]
    assert len(kinds) == len(set(kinds))  # one chip per device kind
    for c in chips.values():
        assert c.platform in ("tpu", "gpu")
        assert c.bf16_tflops > 0 and c.hbm_gib > 0 and c.hbm_gbps > 0 and c.ici_gbps > 0
        assert (c.topology is not None) == (c.platform == "tpu")
    # a few spec figures, against the vendors' pages cited in accelerators.toml
    assert (chips["tpu_v5e"].bf16_tflops, chips["tpu_v5e"].hbm_gib) == (197.0, 16.0)
    assert (chips["tpu_v4"].bf16_tflops, chips["tpu_v4"].hbm_gib) == (275.0, 32.0)
    assert chips["h100"].peak_flops == 989e12


def test_device_kind_lookup():
    assert A.chip_for_device_kind("TPU v5 lite").name == "tpu_v5e"
    assert A.chip_for_device_kind("tpu v4").name == "tpu_v4"
    assert A.chip_for_device_kind("NVIDIA H100 80GB HBM3").name == "h100"
    assert A.chip_for_device_kind("cpu") is None


@pytest.mark.parametrize("name,chip,n", [("v5e:16x16", "tpu_v5e", 256), ("v4:4x4x8", "tpu_v4", 128),
                                         ("v5p:8x8x8", "tpu_v5p", 512), ("v6e:2x2", "tpu_v6e", 4)])
def test_topology_names(name, chip, n):
    assert A.topology_chip(name).name == chip and A.topology_size(name) == n


@pytest.mark.parametrize("bad", ["", "v5e", "v5e:", "v5e:16by16", "v9:2x2", "16x16"])
def test_bad_topology_names(bad):
    with pytest.raises(A.TopologyError):
        A.topology_chip(bad)


@needs_libtpu
def test_topology_devices_one_per_chip():
    """v4 in megacore mode, as JAX runs it: one device per chip (libtpu's default config gives
    one per TensorCore, i.e. twice as many devices with half the HBM each)."""
    import os

    had = "TPU_WORKER_HOSTNAMES" in os.environ
    devs = A.topology_devices("v4:2x2x1")
    # libtpu's start-up variables are not left behind: a trainer started from this process
    # would take the host for a TPU VM and initialise multi-host
    assert ("TPU_WORKER_HOSTNAMES" in os.environ) == had
    assert len(devs) == 4 and {d.device_kind for d in devs} == {"TPU v4"}
    assert A.chip_for_devices(devs).name == "tpu_v4"
    assert A.spec_peak_flops(devs) == 4 * 275e12
    with pytest.raises(A.TopologyError, match="libtpu refused"):
        A.topology_devices("v5e:2x3")
