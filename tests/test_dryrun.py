"""Pod dry run (umg_jax/dryrun.py): the real train step compiled for a fake mesh, per-device
bytes against hand counts, FLOPs against the analytic count, the verdict and the CLI."""

import pathlib
import subprocess
import sys

import pytest

from umg_jax import config_lib, dryrun, optim
from umg_jax.models import clip

ROOT = pathlib.Path(__file__).parents[1]
V4 = {"hbm_gib": 32, "bf16_tflops": 275}


def _tiny(**mesh):
    c = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    c.mesh.update(mesh)
    return c


@pytest.fixture(scope="module")
def replicated():
    c = _tiny(data=8, fsdp=1)
    # Text de-duplication is a lax.cond: XLA's static count includes both (rematerialised)
    # branches, which is not the model's FLOPs; the analytic formula is checked without it.
    c.loss.text_dedup_frac = 0.0
    return c, dryrun.analyse(c, target=V4)


def test_bytes_match_parameter_count(replicated):
    c, r = replicated
    n = optim.count_params(clip.abstract_params(c.model))
    b = r["bytes_per_device"]
    assert b["params"] == 4 * n  # float32, replicated on a pure data-parallel mesh
    assert 2 * 4 * n <= b["opt_state"] <= 2 * 4 * n + 64  # Adam mu + nu (+ step counters)
    assert b["total"] >= b["params"] + b["opt_state"] and r["fits"]
    assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}


def test_fsdp_splits_the_state(replicated):
    _, full = replicated
    r = dryrun.analyse(_tiny(data=2, fsdp=4), target=V4)
    ratio = r["bytes_per_device"]["params"] / full["bytes_per_device"]["params"]
    assert 0.25 <= ratio < 0.26  # all big matrices split 4 ways; norms / biases replicated
    assert r["collective_bytes_per_device"].get("all-gather", 0) > 0  # FSDP gathers weights


def test_xla_flops_close_to_analytic(replicated):
    _, r = replicated
    f = r["flops_per_step"]
    # analytic = matmuls only; XLA also counts elementwise ops and the losses: within 15 %
    assert 1.0 <= f["xla_per_device"] / f["analytic_per_device"] <= 1.15


def test_verdict_against_a_small_device(replicated):
    c, _ = replicated
    r = dryrun.analyse(c, target={"hbm_gib": 0.1, "bf16_tflops": 1})
    assert not r["fits"] and r["margin_gib"] < 0


def test_cli_table_and_errors(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "umg_jax.dryrun", "--config", "configs/tiny.py", "--devices", "4",
         "--json", str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "per-device memory" in out.stdout and "yes" in out.stdout
    assert (tmp_path / "r.json").read_text().startswith("{")
    bad = subprocess.run(
        [sys.executable, "-m", "umg_jax.dryrun", "--config", "configs/tiny.py", "--devices", "4",
         "--config.batch_size=6"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not divisible" in bad.stderr
    mesh = subprocess.run(
        [sys.executable, "-m", "umg_jax.dryrun", "--config", "configs/tiny.py", "--devices", "4",
         "--config.mesh.data=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert mesh.returncode == 2
    assert mesh.stderr.strip().splitlines()[-1] == (
        "error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} does not fit 4 devices (4 is not a "
        "multiple of 3)")


def test_dry_run_equals_a_real_compile(replicated):
    """Compiling the step on real (allocated) state and batch gives the same memory analysis as
    the abstract dry run."""
    import jax
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
    assert mem.temp_size_in_bytes == r["bytes_per_device"]["temp_xla"]
    assert mem.argument_size_in_bytes == r["bytes_per_device"]["arguments_xla"]


def test_cli_does_not_fit_exit_1_and_sweep(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "umg_jax.dryrun", "--config", "configs/tiny.py", "--devices", "4",
         "--target", "tpu-v5e", "--sweep", "batch_size=32,65536"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]
    rows = [x for x in out.stdout.splitlines() if x.startswith("batch_size=") and ":" not in x]
    assert len(rows) == 2 and " yes " in rows[0] and " NO " in rows[1]
    assert "batch_size=65536: does not fit by" in out.stdout
