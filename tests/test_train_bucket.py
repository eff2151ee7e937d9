"""The trainer with its run directory on a bucket (a GCS emulator on localhost): killed with
SIGKILL while a checkpoint upload is in flight and resumed, it reproduces the uninterrupted local
run bit for bit, on one process and on two processes x 4 CPU devices; an interrupted upload is
never taken for a checkpoint; bad run directories stop the run with one line before anything is
compiled."""

import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_train import OVERRIDES, STEPS, _cli

from umg_jax import checkpoint as ckpt_lib
from umg_jax import config_checks, storage, train
from umg_jax import step as step_lib
from umg_jax.metrics import read_jsonl

ROOT = pathlib.Path(__file__).parents[1]
KILL_AT = 4  # the step whose checkpoint upload the kill interrupts (saves every 2 steps)
EXTRA = ["--config.ckpt.every_steps=2", "--config.log.tensorboard=True"]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """The synthetic data cache, and a persistent XLA cache: the trainer CLIs of this module
    (reference, killed run, resume) compile the same programs, and compiling dominates them."""
    mp = pytest.MonkeyPatch()
    mp.setenv("UMG_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "xla-cache"))
    yield
    mp.undo()


def _losses(workdir) -> dict[int, list[float]]:
    """``{step: [loss of every line logged for it]}`` from a run's metrics.jsonl (a resumed run
    logs again the steps after its checkpoint)."""
    out: dict[int, list[float]] = {}
    for row in read_jsonl(storage.path(workdir) / "metrics.jsonl"):
        if "loss" in row:
            out.setdefault(row["step"], []).append(row["loss"])
    return out


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory):
    """The uninterrupted reference: a local run of the same CLI command on 8 devices."""
    wd = tmp_path_factory.mktemp("local") / "wd"
    proc = _cli(wd, 8, EXTRA)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return _losses(wd)


def _kill_at_commit(monkeypatch, procs: list, step: int, name: str = "commit_success.txt"):
    """Makes the emulator SIGKILL ``procs`` when the object ``checkpoints/<step>/<name>``
    arrives, before it is stored: an upload cut off at that point. Returns the hit list."""
    from gcp_storage_emulator import storage as emulator_storage

    real = emulator_storage.Storage.create_file
    hits = []

    def create_file(self, bucket_name, file_name, *a, **k):
        if f"/checkpoints/{step}/" in file_name and file_name.endswith(name):
            hits.append(file_name)
            for p in procs:
                os.kill(p.pid, signal.SIGKILL)
            raise RuntimeError("killed mid-upload")  # the emulator answers 500; nothing stored
        return real(self, bucket_name, file_name, *a, **k)

    monkeypatch.setattr(emulator_storage.Storage, "create_file", create_file)
    return hits


def _check_interrupted_step_is_not_a_checkpoint(wd: str, killed: int, before: int) -> None:
    """After the kill: step ``killed``'s arrays are in the bucket but, without the commit
    marker, neither orbax (``latest_step``) nor ``locate`` takes it; ``before`` is complete."""
    ckdir = storage.path(wd) / "checkpoints"
    assert (ckdir / str(killed) / "state").is_dir()  # the upload got that far
    assert not (ckdir / str(killed) / "commit_success.txt").exists()
    assert ckpt_lib.finalized_steps(ckdir) == [before]
    src, cfg = ckpt_lib.locate(wd)
    assert os.fspath(src) == f"{wd}/checkpoints/{before}"
    assert os.fspath(cfg) == f"{wd}/config.json"
    with pytest.raises(FileNotFoundError, match=f"step {killed} not in"):
        ckpt_lib.locate(wd, step=killed)
    with ckpt_lib.Checkpointer(wd, every_steps=2, keep=5) as ck:
        assert ck.latest_step() == before
        assert ck.all_steps() == [before]


def test_bucket_run_killed_mid_upload_resumes_bit_equal(gcs_bucket, local_losses, monkeypatch):
    wd = f"{gcs_bucket}/run1"
    proc = _cli(wd, 8, EXTRA)
    hits = _kill_at_commit(monkeypatch, [proc], KILL_AT)
    out, _ = proc.communicate(timeout=600)
    assert hits and proc.returncode == -signal.SIGKILL, out[-3000:]
    monkeypatch.undo()
    _check_interrupted_step_is_not_a_checkpoint(wd, KILL_AT, KILL_AT - 2)

    proc = _cli(wd, 8, EXTRA)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {wd}/checkpoints/{KILL_AT - 2}" in out
    got = _losses(wd)
    assert sorted(got) == sorted(local_losses) and max(got) == STEPS
    for step, losses in got.items():  # steps logged twice (before the kill, after) agree too
        assert losses == [local_losses[step][0]] * len(losses), step
    assert len(got[KILL_AT]) == 2  # metrics.jsonl kept the history of the killed run
    root = storage.path(wd)
    assert storage.read_json(root / "final_metrics.json")["step"] == STEPS
    assert storage.read_json(root / "config.json")["model"]["embed_dim"] == 32
    assert [p.name for p in (root / "tensorboard").iterdir()]  # tensorboardX wrote events there
    assert ckpt_lib.finalized_steps(root / "checkpoints")[-1] == STEPS


@pytest.mark.slow  # gloo collectives between two processes on 2 cores: ~10 s a step here
def test_two_processes_on_a_bucket_resume_exactly(gcs_bucket, monkeypatch):
    """2 processes x 4 CPU devices (loopback), one bucket run directory, 4 steps, saves at 2 and
    4: killed while process 0 commits the last checkpoint (after every step ran uninterrupted),
    resumed from step 2: step 4 is computed again, bit-equal."""
    import portpicker

    wd = f"{gcs_bucket}/run2"

    def launch():
        port = portpicker.pick_unused_port()
        return [_cli(wd, 4, [*EXTRA, "--config.total_steps=4", "--config.log.every_steps=1",
                             f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"]) for i in range(2)]

    procs = launch()
    hits = _kill_at_commit(monkeypatch, procs, 4)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert hits and all(p.returncode == -signal.SIGKILL for p in procs), outs[0][-3000:]
    monkeypatch.undo()
    before = _losses(wd)
    assert sorted(before) == [2, 3, 4]  # the first step's loss is not logged (compile time)
    _check_interrupted_step_is_not_a_checkpoint(wd, 4, 2)

    procs = launch()
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert f"resumed from {wd}/checkpoints/2" in outs[0]
    got = _losses(wd)
    assert got[4] == before[4] * 2, got  # logged before the kill and after the resume
    assert ckpt_lib.finalized_steps(storage.path(wd) / "checkpoints") == [2, 4]
    assert storage.read_json(storage.path(wd) / "final_metrics.json")["step"] == 4


# ------------------------------------------------------------------------- bad input ---


def _tiny(**over):
    from test_train import _config

    return _config(None, **over)


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if the trainer gets as far as building its train step."""
    def refuse(*a, **k):
        raise AssertionError("the train step was built: the check came too late")

    monkeypatch.setattr(step_lib, "make_train_step", refuse)


def _cli_error(workdir, env: dict | None = None, extra=()) -> str:
    """The trainer CLI on ``workdir``; asserts exit status 2 and returns the last stderr line."""
    e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
    e.update(env or {})
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    out = subprocess.run([sys.executable, "-m", "umg_jax.train", "--config", "configs/tiny.py",
                          "--workdir", str(workdir), *flags, *extra], cwd=ROOT, env=e,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "MFU peak" not in out.stdout  # stopped before measuring, building, compiling
    return out.stderr.strip().splitlines()[-1]


def test_missing_bucket_and_credentials_exit_2_with_one_line(gcs_bucket, tmp_path):
    line = _cli_error("gs://no-such-bucket/run")
    assert line == ("error: bucket gs://no-such-bucket does not exist (or these credentials "
                    "cannot see it): create it or fix the path gs://no-such-bucket/run")
    env = {k: "" for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update(HOME=str(tmp_path), NO_GCE_CHECK="True", CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
    line = _cli_error(f"{gcs_bucket}/run", env)
    assert line.startswith(f"error: no Google Cloud credentials for {gcs_bucket}/run: run "
                           "`gcloud auth application-default login`"), line


def test_bad_run_directories_stop_before_compiling(gcs_bucket, s3_bucket, tmp_path,
                                                    monkeypatch, no_compile):
    c = _tiny()
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(storage.StorageError, match=r"^cannot create directory .*/file/run: "):
        train.train(c, tmp_path / "file" / "run")
    with pytest.raises(storage.StorageError,
                       match=r"^bucket s3://no-such-bucket does not exist .*s3://no-such-bucket/r$"):
        train.train(c, "s3://no-such-bucket/r")
    # orbax-checkpoint cannot write arrays to s3:// (its tensorstore specs know gs:// only)
    with pytest.raises(storage.StorageError, match=r"^cannot keep training checkpoints in "
                       rf"{s3_bucket}/run/checkpoints: orbax-checkpoint .* use a gs:// workdir"):
        train.train(c, f"{s3_bucket}/run")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(storage.StorageError, match=rf"^no AWS credentials for {s3_bucket}/x: "):
        train.train(c, f"{s3_bucket}/x")
    # Training records on a bucket: one line with the mount to use instead.
    bad = _tiny(**{"data.path": f"{gcs_bucket}/records"})
    with pytest.raises(config_checks.ConfigError, match=(
            rf"^data.path {gcs_bucket}/records is a bucket path: .* \(gcsfuse --implicit-dirs "
            r"umg-bucket /mnt/umg-bucket\) and pass --config.data.path=/mnt/umg-bucket/...$")):
        train.train(bad, tmp_path / "wd")
    bad = _tiny(**{"init.checkpoint": f"{gcs_bucket}/nothing-here"})
    with pytest.raises(config_checks.ConfigError,
                       match=rf"^init.checkpoint {gcs_bucket}/nothing-here does not exist$"):
        train.train(bad, tmp_path / "wd")


def test_init_checkpoint_from_a_bucket(gcs_bucket):
    """An import directory on a bucket as ``init.checkpoint``: its stored model config is read
    from there (a config for another model is refused) and its params restore from there, the two
    things the trainer does with it."""
    import jax

    from umg_jax.models import clip

    c = _tiny()
    imp = f"{gcs_bucket}/imported"
    params = clip.init_params(c.model, jax.random.key(3))
    ckpt_lib.save_params(f"{imp}/params", params)
    storage.write_text(f"{imp}/model_config.json", c.model.to_json())
    c.init.checkpoint = imp
    config_checks.validate(c)
    bad = _tiny(**{"init.checkpoint": imp, "model.vision.layers": 3})
    with pytest.raises(config_checks.ConfigError, match=(
            rf"^model.vision.layers is 3 but init.checkpoint was made with 2 \({imp}/model_")):
        config_checks.validate(bad)
    src, _ = ckpt_lib.locate(imp)
    got = ckpt_lib.load_params(src, c.model)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got), strict=True):
        assert np.array_equal(np.asarray(a), b)


def test_multiprocess_run_on_unshared_local_dir_is_refused(tmp_path):
    """2 processes on loopback with a local --workdir that process 1 sees as another (empty)
    directory: its own mount namespace with a tmpfs over the path, as on a second host."""
    import portpicker

    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("unshare --mount is not permitted here")
    wd = tmp_path / "wd"
    wd.mkdir()
    port = portpicker.pick_unused_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    cmd = [sys.executable, "-m", "umg_jax.train", "--config", "configs/tiny.py", "--workdir",
           str(wd), *flags, f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
    own_disk = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs tmpfs "{wd}" && exec "$@"', "sh"]
    procs = [subprocess.Popen(pre + cmd + [f"--process_id={i}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, pre in enumerate([[], own_disk])]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 2, out[-2000:] + err[-3000:]
        assert err.strip().splitlines()[-1] == (
            f"error: --workdir {wd} is not shared: process(es) [1] of 2 do not see the files "
            "process 0 writes there (each host has its own local directory); use a bucket "
            "(gs://...) or a filesystem that every host mounts")
        assert "MFU peak" not in out
    assert sorted(x.name for x in wd.iterdir()) == []  # no config, no checkpoints, no marker
