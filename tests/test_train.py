"""The trainer (umg_jax/train.py) on a tiny model, 8 fake devices: it learns, writes metrics and
checkpoints, resumes exactly after a crash (also onto another mesh layout), stops on a run of
non-finite losses without touching the last good checkpoint, and refuses bad configs clearly."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import write_import_dir

from umg_jax import checkpoint as ckpt_lib
from umg_jax import config_checks, config_lib, sharding, train
from umg_jax import step as step_lib
from umg_jax.models import clip

ROOT = pathlib.Path(__file__).parents[1]
STEPS = 8


# The test model as --config overrides of configs/tiny.py (also used verbatim by the subprocess
# test, so the CLI and in-process runs train the same thing).
OVERRIDES = {
    "model.vision.image_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32,
    "model.vision.layers": 2, "model.vision.heads": 2, "model.text.width": 32,
    "model.text.layers": 1, "model.text.heads": 2, "model.text.context_length": 16,
    "model.embed_dim": 32, "batch_size": 8, "total_steps": STEPS, "optim.warmup_steps": 2,
    "data.synthetic_num_train": 24, "data.synthetic_num_eval": 8, "data.max_tags": 2,
    "data.max_regions": 3, "data.max_masks": 3, "data.synthetic_image_size": 40,
    "ckpt.every_steps": 3, "ckpt.keep": 5, "ckpt.async_save": True, "log.every_steps": 2,
    "log.tensorboard": False,
}


def _config(tmp_root, **over):
    c = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    for k, v in {**OVERRIDES, **over}.items():
        target = c
        *parents, leaf = k.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = v
    return c


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("UMG_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _final_params(workdir, config):
    ck = ckpt_lib.Checkpointer(workdir, every_steps=1, keep=5)
    step = ck.latest_step()
    ck.close()
    abstract = clip.abstract_params(config.model)
    params = ckpt_lib.restore_params_only(pathlib.Path(workdir) / "checkpoints" / str(step),
                                          abstract)
    return step, jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("full")
    mp = pytest.MonkeyPatch()
    mp.setenv("UMG_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    config = _config(tmp)
    last = train.train(config, str(tmp / "wd"))
    mp.undo()
    return tmp / "wd", config, last


def test_run_writes_metrics_checkpoints_and_learns(full_run):
    wd, config, last = full_run
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 3 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses  # it learns, even in 8 steps
    for key in ("loss_image", "loss_region", "loss_mask", "loss_pixel", "acc_region", "lr",
                "examples_per_sec", "data_wait_frac", "grad_norm"):
        assert key in rows[-1], key
    assert json.loads((wd / "final_metrics.json").read_text())["step"] == STEPS
    assert json.loads((wd / "config.json").read_text())["model"]["embed_dim"] == 32
    step, params = _final_params(str(wd), config)
    assert step == STEPS and np.isfinite(params["logit_scale"])


def test_crash_and_resume_reproduces_the_uninterrupted_run(full_run, tmp_path, monkeypatch):
    ref_wd, config, _ = full_run
    real = step_lib.make_train_step
    calls = {"n": 0}

    def crashing(*a, **k):  # the process "dies" in the middle of step 5 (after the save at 3)
        fn = real(*a, **k)

        def wrapped(state, batch, *budgets):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("simulated crash")
            return fn(state, batch, *budgets)

        return wrapped

    monkeypatch.setattr(step_lib, "make_train_step", crashing)
    wd = tmp_path / "wd"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train(config, str(wd))
    monkeypatch.setattr(step_lib, "make_train_step", real)
    # resume on another mesh layout: params now FSDP-sharded over 4 devices x 2 data
    config2 = _config(tmp_path, **{"mesh.data": 2, "mesh.fsdp": 4})
    train.train(config2, str(wd))
    _, ref = _final_params(str(ref_wd), config)
    _, got = _final_params(str(wd), config)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got),
                            strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # a finished run is not re-run
    assert train.train(config, str(wd))["step"] == STEPS


def _cli(workdir, devices, extra=()):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return subprocess.Popen(
        [sys.executable, "-m", "umg_jax.train", "--config", "configs/tiny.py", "--workdir",
         str(workdir), *flags, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def test_sigkill_then_resume_on_four_devices_matches(full_run, tmp_path):
    """kill -9 a CLI run after its step-3 checkpoint, resume it on 4 devices instead of 8: the
    final parameters equal the uninterrupted in-process run's."""
    ref_wd, config, _ = full_run
    wd = tmp_path / "wd"
    proc = _cli(wd, 8, ["--config.ckpt.every_steps=1"])
    # A dead child fails at once; the time limit only catches a hang, with room for a busy
    # 2-core machine.
    deadline = time.time() + 900
    while not (wd / "checkpoints" / "4").is_dir():  # step dirs appear only when complete
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 900 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _cli(wd, 4)
    out, _ = done.communicate(timeout=900)
    assert done.returncode == 0, out[-3000:]
    assert "resumed from" in out
    _, ref = _final_params(str(ref_wd), config)
    step, got = _final_params(str(wd), config)
    assert step == STEPS
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got),
                            strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_nonfinite_losses_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    config = _config(tmp_path, **{"train.max_nonfinite": 2, "total_steps": 12})
    real_put = sharding.put_batch
    n = {"i": 0}

    def poisoned(batch, mesh):
        n["i"] += 1
        if n["i"] >= 5:  # from step 5 on, the images are NaN
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return real_put(batch, mesh)

    monkeypatch.setattr(sharding, "put_batch", poisoned)
    wd = tmp_path / "wd"
    with pytest.raises(train.TrainingError, match="non-finite"):
        train.train(config, str(wd))
    step, params = _final_params(str(wd), config)
    assert step == 3  # the step-6 save never happened, step 3 is intact
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_bad_configs_are_refused_with_one_line(tmp_path):
    with pytest.raises(config_checks.ConfigError, match="not divisible"):
        config_checks.validate(_config(tmp_path, batch_size=6))
    with pytest.raises(config_checks.ConfigError, match="warmup_steps"):
        config_checks.validate(_config(tmp_path, **{"optim.warmup_steps": 50}))
    with pytest.raises(config_checks.ConfigError, match="does not fit 8 devices"):
        config_checks.validate(_config(tmp_path, **{"mesh.data": 3}))
    with pytest.raises(config_checks.ConfigError, match="model.attention='cudnn'"):
        config_checks.validate(_config(tmp_path, **{"model.attention": "cudnn"}))


def test_cli_help_and_config_error_exit_status(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PATH": "/usr/bin:/bin",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "umg_jax.train", "--help"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
    assert "--workdir" in out.stdout and "--show_config" in out.stdout  # absl exits 1 on --help
    out = subprocess.run([sys.executable, "-m", "umg_jax.train", "--config", "configs/tiny.py",
                          "--show_config"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("--config.optim.lr="))
    assert "peak learning rate" in line
    out = subprocess.run(
        [sys.executable, "-m", "umg_jax.train", "--config", "configs/tiny.py",
         "--workdir", str(tmp_path / "wd"), "--config.batch_size=3"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: batch_size 3")
    # Every documented override parses on the command line (a knob named like a Python keyword,
    # e.g. init.from, would not).
    out = subprocess.run(
        [sys.executable, "-m", "umg_jax.train", "--config", "configs/seg_tiny.py",
         "--workdir", str(tmp_path / "wd"), f"--config.init.checkpoint={tmp_path / 'nope'}"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: init.checkpoint" in out.stderr.strip().splitlines()[-1]


def test_init_from_params_checkpoint(tmp_path):
    """``init.checkpoint`` (the layout ``umg_jax.interop.import_torch`` writes) sets the starting
    params: with a zero learning rate they come out of training unchanged."""
    config = _config(tmp_path, **{"total_steps": 3, "optim.warmup_steps": 1, "optim.lr": 0.0,
                                  "ckpt.every_steps": 3})
    start = clip.init_params(config.model, jax.random.key(42))
    config.init.checkpoint = write_import_dir(tmp_path / "imported", config.model, start)
    train.train(config, str(tmp_path / "wd"))
    _, got = _final_params(str(tmp_path / "wd"), config)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_starts_from_a_siglip_import_with_its_tokenizer(tmp_path, spm_model):
    """A big_vision SigLIP import (SentencePiece tokenizer, MAP pooling, sigmoid loss) trains from
    ``init.checkpoint``; a config whose model computes something else is refused first. The import
    dir is moved before training and the workdir after: both hold their tokenizer."""
    import shutil

    from test_big_vision import TINY, siglip_weights

    import umg_jax
    from umg_jax.interop import import_torch

    np.savez(tmp_path / "s.npz", **siglip_weights(TINY))
    import_torch.main([str(tmp_path / "s.npz"), "--out", str(tmp_path / "a" / "imp"),
                       "--tokenizer", spm_model])
    shutil.move(tmp_path / "a", tmp_path / "b")
    imp = tmp_path / "b" / "imp"
    config = _config(tmp_path, **{"total_steps": 2, "optim.warmup_steps": 1,
                                  "ckpt.every_steps": 2, "loss.kind": "sigmoid"})
    config.model = ckpt_lib.read_model_config(imp / "model_config.json")
    assert config.model.text.tokenizer == str(imp / "tokenizer.model")
    config.init.checkpoint = str(imp)
    bad = config.copy_and_resolve_references()
    bad.model.text.pad_id = 0
    with pytest.raises(config_checks.ConfigError, match="model.text.pad_id is 0 but"):
        config_checks.validate(bad, 8)
    bad.model.text.pad_id, bad.model.text.tokenizer = 1, ""
    with pytest.raises(config_checks.ConfigError, match="SentencePiece"):
        config_checks.validate(bad, 8)
    last = train.train(config, str(tmp_path / "c" / "wd"))
    assert np.isfinite(last["loss"])
    shutil.move(tmp_path / "c", tmp_path / "d")
    model = umg_jax.load(str(tmp_path / "d" / "wd"))
    assert model.config.text.tokenizer == str(tmp_path / "d" / "wd" / "tokenizer.model")
    assert model.tokenize(["a photo of a cat"])[0, -1] == 1  # SigLIP pad id, from its copy


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    config = _config(tmp_path, **{"train.time_budget_s": 1e-6, "total_steps": 40,
                                  "ckpt.every_steps": 40})
    last = train.train(config, str(tmp_path / "wd"))
    step, _ = _final_params(str(tmp_path / "wd"), config)
    assert step == 2 < 40  # first sync point (log.every_steps = 2), saved although not due
    assert json.loads((tmp_path / "wd" / "final_metrics.json").read_text())["step"] == 2
    assert "loss" in last
