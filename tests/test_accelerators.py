"""accelerators: the chip table, device-kind lookup and TPU / GPU topologies for deviceless
compiles."""

import importlib.metadata
import os
import re

import pytest

from umg_jax import accelerators as A

needs_libtpu = pytest.mark.skipif(not A.tpu_compiler_available(),
                                  reason="libtpu (requirements-tpu.txt) not installed")
needs_cuda = pytest.mark.skipif(not A.gpu_compiler_available(),
                                reason="the CUDA plugin (requirements-gpu.txt) not installed")
GPU_NODES = {"h100": "h100", "h200": "h200", "a100": "a100_80g", "b200": "b200"}


def test_table_is_complete_and_unambiguous():
    chips = A.chips()
    assert {"tpu_v4", "tpu_v5e", "tpu_v5p", "tpu_v6e", "a100_40g", "a100_80g", "h100", "h200",
            "b200"} <= set(chips)
    kinds = [k.lower() for c in chips.values() for k in c.device_kinds]
    assert len(kinds) == len(set(kinds))  # one chip per device kind
    for c in chips.values():
        assert c.platform in ("tpu", "gpu")
        assert c.bf16_tflops > 0 and c.hbm_gib > 0 and c.hbm_gbps > 0 and c.ici_gbps > 0
        assert (c.topology is not None) == (c.platform == "tpu" or c.gpu_target is not None)
        assert c.gpu_target is None or c.platform == "gpu"
        assert (c.compute_capability is not None) == (c.platform == "gpu")
    # a few spec figures, against the vendors' pages cited in accelerators.toml
    assert (chips["tpu_v5e"].bf16_tflops, chips["tpu_v5e"].hbm_gib) == (197.0, 16.0)
    assert (chips["tpu_v4"].bf16_tflops, chips["tpu_v4"].hbm_gib) == (275.0, 32.0)
    assert chips["h100"].peak_flops == 989e12


def test_device_kind_lookup():
    assert A.chip_for_device_kind("TPU v5 lite").name == "tpu_v5e"
    assert A.chip_for_device_kind("tpu v4").name == "tpu_v4"
    assert A.chip_for_device_kind("NVIDIA H100 80GB HBM3").name == "h100"
    assert A.chip_for_device_kind("cpu") is None
    # PCIe / NVL parts are slower than the SXM parts: their own peaks for MFU
    pcie = A.chip_for_device_kind("NVIDIA H100 PCIe")
    nvl = A.chip_for_device_kind("NVIDIA H200 NVL")
    assert (pcie.name, pcie.peak_flops, pcie.hbm_gbps) == ("h100_pcie", 756e12, 2000.0)
    assert (nvl.name, nvl.peak_flops) == ("h200_nvl", 835e12)


@pytest.mark.parametrize("name,chip,n", [("v5e:16x16", "tpu_v5e", 256), ("v4:4x4x8", "tpu_v4", 128),
                                         ("v5p:8x8x8", "tpu_v5p", 512), ("v6e:2x2", "tpu_v6e", 4)])
def test_topology_names(name, chip, n):
    assert A.topology_chip(name).name == chip and A.topology_size(name) == n


@pytest.mark.parametrize("name,chip,n", [("h100:1x1x8", "h100", 8), ("h100:1x2x8", "h100", 16),
                                         ("h200:1x1x8", "h200", 8), ("a100:1x1x4", "a100_80g", 4),
                                         ("b200:1x1x8", "b200", 8)])
def test_gpu_node_names(name, chip, n):
    assert A.topology_chip(name).name == chip and A.topology_size(name) == n


@pytest.mark.parametrize("bad", ["", "v5e", "v5e:", "v5e:16by16", "v9:2x2", "16x16",
                                 "h800:1x1x8", "a100_40g:1x1x8"])
def test_unknown_topology_names_list_the_known_ones(bad):
    with pytest.raises(A.TopologyError) as e:
        A.topology_chip(bad)
    assert all(k in str(e.value) for k in ("v5e", "v6e", "h100", "h200", "a100", "b200"))


@pytest.mark.parametrize("bad", ["v5e:0x4", "h100:8", "h100:1x8", "h100:1x0x8", "h100:1x1x8x1",
                                 "h100:1x1x8_twisted"])
def test_bad_shapes(bad):
    with pytest.raises(A.TopologyError, match=">= 1|SLICESxHOSTSxGPUS"):
        A.topology_chip(bad)


def _target_fields(chip) -> dict[str, float]:
    """The numeric fields of a card's target file; each must carry its source (a comment on its
    line or on the line above)."""
    with open(os.path.join(A.GPU_TARGET_DIR, chip.gpu_target)) as f:
        lines = f.read().splitlines()
    fields = {}
    for prev, line in zip([""] + lines[:-1], lines, strict=True):
        m = re.match(r"\s*(\w+): ([\d.]+|\"[^\"]*\")", line)
        if m:
            assert "#" in line or prev.strip().startswith("#"), f"unsourced: {line}"
            if not m.group(2).startswith('"'):
                fields[m.group(1)] = float(m.group(2))
    return fields


# dense BF16 FLOP per SM per clock: 4 Tensor Cores x 512 FMA (Hopper), x 256 (Ampere), twice
# Hopper's (Blackwell); the NVIDIA architecture whitepapers
BF16_PER_SM_CLOCK = {"h100": 4096, "h200": 4096, "a100_80g": 2048, "b200": 8192}


@pytest.mark.parametrize("chip", sorted(GPU_NODES.values()))
def test_gpu_target_files_agree_with_the_table(chip):
    """The target files and accelerators.toml quote the same datasheet figures; the clock is
    the one at which SMs x per-SM rate gives the datasheet's dense BF16 peak."""
    c = A.chips()[chip]
    f = _target_fields(c)
    assert f["memory_bandwidth"] == c.hbm_gbps * 1e9
    assert f["device_memory_size"] == c.hbm_bytes
    sm_peak = f["core_count"] * BF16_PER_SM_CLOCK[chip] * f["clock_rate_ghz"] * 1e9
    assert sm_peak == pytest.approx(c.peak_flops, rel=0.01)
    assert f["threads_per_warp"] == 32 and f["threads_per_block_limit"] == 1024
    with open(os.path.join(A.GPU_TARGET_DIR, c.gpu_target)) as fh:
        cc = re.search(r"cuda_compute_capability \{ major: (\d+) minor: (\d+) \}", fh.read())
    assert c.compute_capability == f"{cc.group(1)}.{cc.group(2)}"


@needs_cuda
def test_gpu_target_config_takes_the_installed_libraries():
    text = A.gpu_target_config(A.chips()["h100"])
    major, minor = importlib.metadata.version("nvidia-cudnn-cu12").split(".")[:2]
    assert f"dnn_version_info {{ major: {major} minor: {int(minor)} " in text
    major, minor = importlib.metadata.version("nvidia-cuda-runtime-cu12").split(".")[:2]
    assert f"runtime_version {{ major: {major} minor: {int(minor)} }}" in text
    assert 'platform_name: "CUDA"' in text


@needs_cuda
@pytest.mark.parametrize("node", ["h100:1x1x8", "h200:1x2x8", "a100:1x1x8", "b200:1x1x8"])
def test_gpu_topology_devices(node):
    """Abstract GPUs of the named card, one per GPU of the node; the card's device kind is the
    table's (so MFU / fit verdicts find it)."""
    devs = A.topology_devices(node)
    assert len(devs) == A.topology_size(node)
    assert A.chip_for_devices(devs).name == GPU_NODES[node.split(":")[0]]
    assert {d.platform for d in devs} == {"gpu"}
    assert A.compile_options(devs) == A.GPU_COMPILE_OPTIONS


def test_missing_cuda_plugin_names_the_install(monkeypatch):
    monkeypatch.setattr(A, "gpu_compiler_available", lambda: False)
    with pytest.raises(A.CompilerUnavailable, match="pip install -r requirements-gpu.txt"):
        A.topology_devices("h100:1x1x8")
    import jax

    assert A.compile_options(jax.devices()) == {}


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


def test_jax_gpu_memory_fraction():
    """What JAX's GPU allocator may take: 75 % by default (docs.jax.dev, "GPU memory
    allocation"), the environment's fraction, all of it with the platform allocator."""
    f = A.jax_gpu_memory_fraction
    assert f({}) == 0.75
    assert f({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"}) == 0.9
    assert f({"XLA_CLIENT_MEM_FRACTION": "0.95", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}) == 0.95
    assert f({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}) == 1.0
    for bad in ("lots", "0", "1.5"):
        with pytest.raises(ValueError, match="XLA_CLIENT_MEM_FRACTION"):
            f({"XLA_CLIENT_MEM_FRACTION": bad})
    h100, v5e = A.chips()["h100"], A.chips()["tpu_v5e"]
    assert A.jax_usable(h100, {}).hbm_gib == 60 and A.jax_usable(h100, {}).peak_flops == 989e12
    assert A.jax_usable(v5e, {}) == v5e
