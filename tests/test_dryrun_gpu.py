"""Dry run for GPU nodes (umg_jax/dryrun.py with XLA:GPU): the real train step compiled for 8
H100s with no GPU and no driver, the cuDNN attention calls in its HLO, compiled FLOPs against
the CPU stand-in's and the analytic count, and the bad-input exits.

The CLI runs in a subprocess with neither ``JAX_PLATFORMS`` nor ``XLA_FLAGS`` set, as a user
runs it: the dry run sets what the deviceless GPU compile needs itself, for its own compile.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from umg_jax import accelerators, config_lib, dryrun

ROOT = pathlib.Path(__file__).parents[1]
H100 = accelerators.chips()["h100"]
pytestmark = pytest.mark.skipif(not accelerators.gpu_compiler_available(),
                                reason="the CUDA plugin (requirements-gpu.txt) not installed")


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK")}
    return subprocess.run([sys.executable, "-m", "umg_jax.dryrun", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_h100(tmp_path_factory):
    """The whole tiny step in bf16 (attention eligible for cuDNN) for one 8 x H100 host."""
    tmp = tmp_path_factory.mktemp("gpu")
    out = _run("--config", "configs/tiny.py", "--topology", "h100:1x1x8",
               "--config.model.dtype=bfloat16", "--json", str(tmp / "r.json"),
               "--hlo_dir", str(tmp / "hlo"))
    return out, tmp


def test_tiny_step_compiles_for_an_h100_node(tiny_h100):
    out, tmp = tiny_h100
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines and all(x.startswith("[GPU compiler]") for x in lines)
    assert "Traceback" not in out.stderr  # the CUDA plugin never tried to open a GPU
    d = json.loads((tmp / "r.json").read_text())
    assert (d["compiler"], d["topology"], d["chip"], d["devices"]) == (
        "gpu", "h100:1x1x8", "h100", 8)
    assert d["compile_options"] == accelerators.GPU_COMPILE_OPTIONS and d["cudnn"]
    r = d["rows"][0]
    assert r["device_kind"] == "NVIDIA H100 80GB HBM3" and r["mesh"]["data"] == 8
    b = r["bytes_per_device"]
    assert b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temp"]
    assert b["params"] + b["opt_state"] < b["total"] < H100.hbm_bytes and r["fits"]
    # the GPU roofline has a compute term now that cuBLAS / cuDNN calls are counted
    assert r["compiled"]["custom_calls"]["__cublas$lt$matmul"] > 0
    assert r["roofline"]["compute_s"] > 0 and 0 < r["est_mfu"] < 1


def test_cudnn_attention_in_the_compiled_step(tiny_h100):
    out, tmp = tiny_h100
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp / "r.json").read_text())["rows"][0]
    calls = r["fused_attention"]
    assert calls.get("__cudnn$fmhaSoftmax", 0) > 0 and calls.get(
        "__cudnn$fmhaSoftmaxBackward", 0) > 0, calls
    assert r["fused_attention_calls"] == sum(calls.values())
    hlo = (tmp / "hlo" / "tiny.hlo.txt").read_text()
    assert 'custom_call_target="__cudnn$fmhaSoftmaxBackward"' in hlo


def test_gpu_flops_match_the_cpu_stand_in_and_the_analytic_count():
    """The same small step compiled for 8 H100s (cuBLAS / cuDNN calls) and for 8 fake CPUs
    (dot / convolution instructions): two independent readings of the same matmuls. The GPU's
    cuDNN attention adds its flash backward's recomputed scores (and pads 65 patch tokens to
    66): a few percent more."""
    c = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    c.mesh.update(data=8, fsdp=1)
    c.model.dtype = "bfloat16"
    c.model.vision.layers = c.model.text.layers = 2
    c.loss.update(w_tags=0.0, w_region=0.0, w_mask=0.0, w_pixel=0.0, text_dedup_frac=0.0)
    gpu = dryrun.analyse(c, chip=H100, devices=accelerators.topology_devices("h100:1x1x8"),
                         compiler="gpu")
    cpu = dryrun.analyse(c, chip=H100, devices=jax.devices(), compiler="cpu-standin")
    g, f = gpu["compiled"]["flops"], cpu["compiled"]["flops"]
    assert gpu["fused_attention_calls"] > 0 and cpu["fused_attention_calls"] == 0
    assert 1.0 <= g / f <= 1.05, (g, f)
    analytic = gpu["flops_per_step"]["analytic_per_device"]
    assert 0.9 <= g / analytic <= 1.15


def test_unknown_card_or_node_shape_exits_2_with_the_known_ones():
    for bad in ("h900:1x1x8", "h100:8"):
        out = _run("--config", "configs/tiny.py", "--topology", bad, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: --topology {bad!r}")
        assert ("h100" in last and "h200" in last and "v5e" in last) or "SLICESxHOSTSxGPUS" in last


def test_missing_cuda_plugin_is_one_line_with_the_install_command():
    code = ("import sys; from absl import app; from umg_jax import accelerators, dryrun; "
            "accelerators.gpu_compiler_available = lambda: False; dryrun._define_flags(); "
            "app.run(dryrun.main, argv=['dryrun', '--config', 'configs/tiny.py', "
            "'--topology', 'h100:1x1x8'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --topology h100:1x1x8 needs the CUDA plugin for XLA:GPU: "
        "pip install -r requirements-gpu.txt"]


@pytest.mark.parametrize("name", ["tiny_lora", "tiny_adapter", "seg_tiny"])
def test_the_other_tiny_configs_compile_for_an_h100_node(name):
    """Every shipped tiny config's step compiles for 8 H100s (in bf16, so that attention is
    eligible for cuDNN) and finds cuDNN's attention in its HLO (the big configs:
    ``benchmarks/gpu_compile.py``). The segmentation head's frozen backbone runs forward only."""
    c = config_lib.load_config(str(ROOT / f"configs/{name}.py"))
    c.model.dtype = "bfloat16"
    c.batch_size = 64
    r = dryrun.analyse(c, chip=H100, devices=accelerators.topology_devices("h100:1x1x8"),
                       compiler="gpu")
    assert r["fits"] and r["fused_attention"].get("__cudnn$fmhaSoftmax", 0) > 0, r
    assert ("__cudnn$fmhaSoftmaxBackward" in r["fused_attention"]) == (name != "seg_tiny")
