"""Pod dry run (umg_jax/dryrun.py): the real train step compiled for a TPU slice by the TPU
compiler (libtpu, no TPU attached) and for a fake CPU mesh (the stand-in); per-device bytes
against hand counts, compiled FLOPs against the analytic count, the verdict, the roofline, the
largest-batch search and the CLI."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from umg_jax import accelerators, config_lib, dryrun, optim
from umg_jax.models import clip

ROOT = pathlib.Path(__file__).parents[1]
V4 = accelerators.chips()["tpu_v4"]
needs_libtpu = pytest.mark.skipif(not accelerators.tpu_compiler_available(),
                                  reason="libtpu (requirements-tpu.txt) not installed")
# A smaller tiny for the compiles that are not about the loss: the TPU compiler spends ~40 s on
# each of the region / mask contrastive terms of the full tiny step (~170 s in all here).
SMALL = ["--config.model.vision.layers=2", "--config.model.text.layers=2",
         "--config.loss.w_tags=0.0", "--config.loss.w_region=0.0", "--config.loss.w_mask=0.0",
         "--config.loss.w_pixel=0.0", "--config.loss.text_dedup_frac=0.0"]


def _tiny(**mesh):
    c = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    c.mesh.update(mesh)
    return c


def _small(**mesh):
    c = _tiny(**mesh)
    c.model.vision.layers = c.model.text.layers = 2
    c.loss.update(w_tags=0.0, w_region=0.0, w_mask=0.0, w_pixel=0.0, text_dedup_frac=0.0)
    return c


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "umg_jax.dryrun", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def replicated():
    c = _small(data=8, fsdp=1)  # (text de-duplication off: its lax.cond compiles both branches)
    return c, dryrun.analyse(c, chip=V4, devices=jax.devices(), compiler="cpu-standin")


def test_bytes_match_parameter_count(replicated):
    c, r = replicated
    n = optim.count_params(clip.abstract_params(c.model))
    b = r["bytes_per_device"]
    assert b["params"] == 4 * n  # float32, replicated on a pure data-parallel mesh
    assert 2 * 4 * n <= b["opt_state"] <= 2 * 4 * n + 64  # Adam mu + nu (+ step counters)
    assert b["total"] >= b["params"] + b["opt_state"] and r["fits"]
    assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and r["compiler"] == "cpu-standin"


def test_fsdp_splits_the_state(replicated):
    _, full = replicated
    r = dryrun.analyse(_small(data=2, fsdp=4), chip=V4, devices=jax.devices(),
                       compiler="cpu-standin")
    ratio = r["bytes_per_device"]["params"] / full["bytes_per_device"]["params"]
    assert 0.25 <= ratio < 0.26  # all big matrices split 4 ways; norms / biases replicated
    assert r["collective_bytes_per_device"].get("all-gather", 0) > 0  # FSDP gathers weights


def test_compiled_flops_close_to_analytic(replicated):
    _, r = replicated
    f = r["flops_per_step"]
    # analytic = 3 x the towers' forward matmuls; compiled adds the losses' (the chunked loss
    # loop counted as often as it runs) and skips what autodiff does not need (the pixels'
    # gradient, the dense map of an image-only loss): within 10 %
    assert 0.9 <= f["compiled_per_device"] / f["analytic_per_device"] <= 1.1
    assert r["compiled"]["unknown_trip_counts"] == 0


def test_verdict_against_a_small_device(replicated):
    c, _ = replicated
    small = dataclasses.replace(V4, hbm_gib=0.1)
    r = dryrun.analyse(c, chip=small, devices=jax.devices(), compiler="cpu-standin")
    assert not r["fits"] and r["margin_gib"] < 0


def test_roofline_by_hand():
    chip = dataclasses.replace(V4, bf16_tflops=100.0, hbm_gbps=1000.0, ici_gbps=50.0)
    r = dryrun.roofline({"flops": 2e12, "bytes_accessed": 1e10, "ici_traffic_bytes": 1e9}, chip)
    assert r["compute_s"] == pytest.approx(0.02) and r["memory_s"] == pytest.approx(0.01)
    assert r["collective_s"] == pytest.approx(0.02)
    assert r["step_s"] == pytest.approx(0.04) and r["bound"] == "compute"


def test_dry_run_equals_a_real_compile(replicated):
    """Compiling the step on real (allocated) state and batch gives the same memory analysis as
    the abstract dry run."""
    import numpy as np

    from umg_jax import sharding
    from umg_jax import step as step_lib
    from umg_jax.data import schema

    c, r = replicated
    mesh = sharding.make_mesh(c.mesh)
    tx, _ = optim.make_optimizer(c.optim, clip.abstract_params(c.model), c.total_steps)
    state_sh = step_lib.state_shardings(step_lib.abstract_state(c, tx), mesh)
    shapes = schema.batch_shapes_from_config(c)
    fn = step_lib.make_train_step(clip.build_model(c.model), tx, c, mesh, state_sh, shapes)
    state = jax.jit(lambda k: step_lib.init_state(clip.init_params(c.model, k), tx),
                    out_shardings=state_sh)(jax.random.key(0))
    batch = sharding.put_batch({k: np.zeros(s, d) for k, (s, d) in shapes.items()}, mesh)
    mem = fn.lower(state, batch).compile().memory_analysis()
    assert mem.temp_size_in_bytes == r["bytes_per_device"]["temp"]
    assert mem.argument_size_in_bytes == r["bytes_per_device"]["arguments"]


def test_seg_config_compiles_from_shapes_alone(tmp_path, monkeypatch):
    """A dry run of a segmentation-head config reads and writes no data: its vocabulary is
    placeholder shapes (``dryrun.SEG_CLASSES``), not the training set's categories."""
    monkeypatch.setenv("UMG_JAX_CACHE", str(tmp_path / "cache"))
    c = config_lib.load_config(str(ROOT / "configs/seg_tiny.py"))
    c.model.vision.layers = c.model.text.layers = 1
    c.mesh.update(data=8, fsdp=1)
    r = dryrun.analyse(c, chip=V4, devices=jax.devices(), compiler="cpu-standin")
    assert r["bytes_per_device"]["total"] > 0
    assert not (tmp_path / "cache").exists()


def _memory(b: int) -> float:
    """1 GiB fixed + 10 MiB per example, 5 % more past 2,048 examples (compilers change plans)."""
    return 2 ** 30 + b * 10 * 2 ** 20 * (1.05 if b > 2048 else 1.0)


@pytest.mark.parametrize("limit", [70, 100, 1000, 5000, 12])
def test_find_max_batch_brackets_the_boundary(monkeypatch, limit):
    """The search on a memory model (a compile per probe is what the other tests check)."""
    calls = []

    def fake_analyse(config, *, chip, devices, compiler, hlo_path=None):
        b = config.batch_size
        calls.append(b)
        total = _memory(b)
        return {"batch_size": b, "bytes_per_device": {"total": total},
                "fits": total <= chip.hbm_bytes, "margin_gib": (chip.hbm_bytes - total) / 2 ** 30}

    monkeypatch.setattr(dryrun, "analyse", fake_analyse)
    chip = dataclasses.replace(V4, hbm_gib=_memory(limit) / 2 ** 30)
    c = _small(data=8, fsdp=1)  # 8 devices x 8 per device: granule 64; config batch 32
    best, probes = dryrun.find_max_batch(c, chip=chip, devices=[None] * 8,
                                         compiler="cpu-standin", log=lambda s: None)
    assert len(probes) == len(calls) <= 8  # every probe compiled once
    if limit < 64:  # not even 8 examples per device fit
        assert not best["fits"] and best["batch_size"] == 64
        return
    truth = max(b for b in range(64, 20000, 64) if _memory(b) <= chip.hbm_bytes)
    assert best["fits"] and best["batch_size"] % 64 == 0
    assert truth - max(64, truth // 32) <= best["batch_size"] <= truth


# libtpu's own words when a program cannot fit (seg_vit_l at 336 per v5e chip, 2026-12-01).
TPU_OOM = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (17.02G) exceeds available HBM (15.75G).")


def test_compile_oom_is_a_probe_that_does_not_fit(monkeypatch):
    """Past some batch the TPU compiler raises instead of returning a memory analysis: the
    search records those probes as not fitting (total >= the figure in the message) and still
    brackets the boundary; other compile errors propagate."""
    oom = dryrun._compile_oom(RuntimeError(TPU_OOM))
    assert oom.required_bytes == int(17.02 * 2 ** 30)
    assert dryrun._compile_oom(RuntimeError("INVALID_ARGUMENT: bad shape")) is None
    limit = 1000

    def fake_analyse(config, *, chip, devices, compiler, hlo_path=None):
        b = config.batch_size
        if b > 1200:  # far past the boundary: the compiler gives up
            raise dryrun._compile_oom(RuntimeError(TPU_OOM))
        total = _memory(b)
        return {"batch_size": b, "bytes_per_device": {"total": total},
                "fits": total <= chip.hbm_bytes, "margin_gib": (chip.hbm_bytes - total) / 2 ** 30}

    monkeypatch.setattr(dryrun, "analyse", fake_analyse)
    chip = dataclasses.replace(V4, hbm_gib=_memory(limit) / 2 ** 30)
    c = _small(data=8, fsdp=1)
    c.batch_size = 4096  # the first probe is refused outright
    best, probes = dryrun.find_max_batch(c, chip=chip, devices=[None] * 8,
                                         compiler="cpu-standin", log=lambda s: None)
    refused = [p for p in probes if "compile_error" in p]
    assert refused and all(not p["fits"] and p["bytes_per_device"]["total"] > chip.hbm_bytes
                           for p in refused)
    truth = max(b for b in range(64, 20000, 64) if _memory(b) <= chip.hbm_bytes)
    assert best["fits"] and truth - max(64, truth // 32) <= best["batch_size"] <= truth


def test_plan_falls_back_to_the_stand_in_without_libtpu(monkeypatch):
    assert dryrun.plan(None, None, None, True)[:2] == ("tpu", dryrun.DEFAULT_TOPOLOGY)
    compiler, topology, chip, n = dryrun.plan("v4:4x4x8", None, None, False)
    assert (compiler, topology, chip.name, n) == ("cpu-standin", "v4:4x4x8", "tpu_v4", 128)
    compiler, topology, chip, n = dryrun.plan(None, 16, "h100", True)
    assert (compiler, topology, chip.name, n) == ("cpu-standin", None, "h100", 16)
    with pytest.raises(ValueError, match="contradicts"):
        dryrun.plan("v5e:2x2", None, "tpu_v4", True)
    with pytest.raises(ValueError, match="not both"):
        dryrun.plan("v5e:2x2", 8, None, True)
    # GPU nodes: XLA:GPU from the CUDA plugin, never a stand-in
    for var in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(var, raising=False)
    compiler, topology, chip, n = dryrun.plan("h200:1x2x8", None, None, False, True)
    assert (compiler, topology, chip.name, n) == ("gpu", "h200:1x2x8", "h200", 16)
    assert chip.hbm_gib == 0.75 * 141  # judged against JAX's default share of the GPU
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95")
    assert dryrun.plan("h100:1x1x8", None, None, False, True)[2].hbm_gib == 0.95 * 80
    with pytest.raises(accelerators.CompilerUnavailable, match="pip install -r requirements-gpu"):
        dryrun.plan("h100:1x1x8", None, None, True, False)


@pytest.mark.parametrize("bad", ["v5e", "v5e:16y16", "tpu9:2x2", "v5e:2x3"])
def test_cli_malformed_topology_exits_2(bad):
    if bad == "v5e:2x3" and not accelerators.tpu_compiler_available():
        pytest.skip("libtpu judges the shape")
    out = _run("--config", "configs/tiny.py", "--topology", bad, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: --topology {bad!r}")


@needs_libtpu
def test_cli_compiles_the_step_with_the_tpu_compiler(tmp_path):
    out = _run("--config", "configs/tiny.py", "--topology", "v5e:2x2", "--json",
               str(tmp_path / "r.json"), *SMALL)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines and all(x.startswith("[TPU compiler]") for x in lines)
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["compiler"] == "tpu" and d["topology"] == "v5e:2x2" and d["chip"] == "tpu_v5e"
    prov = d["provenance"]  # how it was made, read at run time
    assert prov["command"].startswith("python -m umg_jax.dryrun --config configs/tiny.py")
    assert prov["machine"]["cores"] == os.cpu_count() and prov["date"][:4].isdigit()
    r = d["rows"][0]
    assert r["device_kind"] == "TPU v5 lite" and r["devices"] == 4
    b = r["bytes_per_device"]
    assert b["total"] == (b["arguments"] + b["outputs"] - b["aliased"] + b["temp"]
                          + b["generated_code"]) > b["params"] + b["opt_state"]
    assert r["fits"] and r["est_images_per_s"] > 0 and 0 < r["est_mfu"] < 1
    f = r["flops_per_step"]
    assert 0.9 <= f["compiled_per_device"] / f["analytic_per_device"] <= 1.1


def test_cli_stand_in_says_so_on_every_line_and_errors(tmp_path):
    out = _run("--config", "configs/tiny.py", "--devices", "4", "--target", "tpu_v4",
               "--json", str(tmp_path / "r.json"), *SMALL)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines and all("CPU STAND-IN" in x for x in lines)
    assert json.loads((tmp_path / "r.json").read_text())["compiler"] == "cpu-standin"
    bad = _run("--config", "configs/tiny.py", "--devices", "4", "--config.batch_size=6",
               timeout=300)
    assert bad.returncode == 2 and "not divisible" in bad.stderr
    mesh = _run("--config", "configs/tiny.py", "--devices", "4", "--config.mesh.data=3",
                timeout=300)
    assert mesh.returncode == 2
    assert mesh.stderr.strip().splitlines()[-1] == (
        "error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} does not fit 4 devices (4 is not a "
        "multiple of 3)")
    target = _run("--config", "configs/tiny.py", "--devices", "4", "--target", "tpu-v9",
                  timeout=120)
    assert target.returncode == 2 and "unknown --target" in target.stderr


def test_cli_does_not_fit_exit_1_and_sweep():
    out = _run("--config", "configs/tiny.py", "--devices", "4", "--target", "tpu_v5e",
               "--sweep", "batch_size=32,65536", *SMALL)
    assert out.returncode == 1, out.stderr[-2000:]
    rows = [x for x in out.stdout.splitlines() if "batch_size=" in x and "does not fit" not in x]
    assert len(rows) == 2 and " yes " in rows[0] and " NO " in rows[1]
    assert "batch_size=65536: does not fit by" in out.stdout


def test_outputs_go_to_a_bucket(gcs_bucket):
    """``--json`` and ``--hlo_dir`` on a bucket (a real GCS emulator): checked, then written."""
    from umg_jax import storage

    out = f"{gcs_bucket}/dryrun"
    dryrun.check_outputs(f"{out}/r.json", f"{out}/hlo")
    dryrun.write_json(f"{out}/r.json", {"rows": [{"batch_size": 8}]})
    dryrun.write_hlo(f"{out}/hlo/tiny.hlo.txt", "HloModule tiny")
    assert storage.read_json(f"{out}/r.json") == {"rows": [{"batch_size": 8}]}
    assert storage.read_text(f"{out}/hlo/tiny.hlo.txt") == "HloModule tiny"


def test_missing_bucket_exits_2_before_compiling(gcs_bucket):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "umg_jax.dryrun", "--config", "configs/tiny.py",
                        "--devices", "2", "--json", "gs://no-such-bucket-umg/r.json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "no-such-bucket-umg" in err[0]
    assert "compiling" not in r.stderr
