"""tools/tpu_pod.sh and tools/slurm_gpu.sh: the exact commands of ``--dry_run`` (run with bash in
a subprocess), one-line exit-2 errors for bad flags, the TPU install archive, and the generated
sbatch script: valid bash, the right #SBATCH / srun / env, run against stand-in ``srun`` /
``scancel`` / ``scontrol`` (requeue before the time limit), and the trainer's own
``_maybe_init_distributed`` joining two processes from the Slurm environment the script gives."""

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "tools" / "tpu_pod.sh"
SLURM = ROOT / "tools" / "slurm_gpu.sh"
HEAD = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                      text=True, check=True).stdout.strip()


def _guard_path() -> str:
    """PATH with ``gcloud`` / ``sbatch`` / ``srun`` that fail the test if a launcher calls them
    (only ``--dry_run`` may run here)."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="launcher_guard_"))
    for name in ("gcloud", "sbatch", "srun", "scancel", "scontrol"):
        (d / name).write_text(f"#!/bin/sh\necho 'test: {name} was called' >&2\nexit 99\n")
        (d / name).chmod(0o755)
    return f"{d}:{os.environ['PATH']}"


GUARD_PATH = _guard_path()


def sh(script, *args, cwd=None, env=None):
    env = env or dict(os.environ, PATH=GUARD_PATH)
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


def dry(script, *args, **kw) -> list[list[str]]:
    """The commands ``--dry_run`` prints, one argv per line."""
    args = list(args)
    cut = args.index("--") if "--" in args else len(args)  # before the module's arguments
    r = sh(script, *args[:cut], "--dry_run", *args[cut:], **kw)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines()]


GC = ["gcloud", "compute", "tpus", "tpu-vm"]
WHERE = ["--zone=us-west4-a"]
ENV = "cd && . umg-venv/bin/activate && cd umg-jax"
CP = "https://www.googleapis.com/auth/cloud-platform"


def remote(cmd: list[str], worker: str = "all") -> str:
    """The shell command of a ``gcloud ... ssh`` line (checked: valid bash)."""
    assert cmd[:5] == GC + ["ssh"] and cmd[5] == "umg-pod", cmd
    assert cmd[6:-1] == WHERE + [f"--worker={worker}"], cmd
    assert cmd[-1].startswith("--command=")
    body = cmd[-1].removeprefix("--command=")
    r = subprocess.run(["bash", "-n", "-c", body], capture_output=True, text=True)
    assert r.returncode == 0, (body, r.stderr)
    return body


# ----------------------------------------------------------------------------- tpu_pod.sh

def test_tpu_create_reuses_or_creates():
    assert dry(TPU, "create") == [
        GC + ["describe", "umg-pod"] + WHERE + ["--format=value(state)"],
        GC + ["create", "umg-pod"] + WHERE + ["--accelerator-type=v5litepod-256",
                                              "--version=v2-alpha-tpuv5-lite", f"--scopes={CP}"]]
    where = ["--zone=us-central2-b", "--project=my-proj"]
    assert dry(TPU, "create", "--name", "pod-2", "--zone=us-central2-b", "--project", "my-proj",
               "--accelerator_type=v4-128", "--runtime_version", "tpu-ubuntu2204-base",
               "--service_account", "sa@p.iam.gserviceaccount.com", "--scopes=", "--spot") == [
        GC + ["describe", "pod-2"] + where + ["--format=value(state)"],
        GC + ["create", "pod-2"] + where + ["--accelerator-type=v4-128",
                                            "--version=tpu-ubuntu2204-base",
                                            "--service-account=sa@p.iam.gserviceaccount.com",
                                            "--spot"]]
    assert dry(TPU, "create", "--preemptible")[1][-1] == "--preemptible"


def test_tpu_install_ships_the_commit(tmp_path):
    cmds = dry(TPU, "install", "--commit", "HEAD")  # resolved to the full hash
    tarball = f"/tmp/umg-jax-{HEAD}.tar.gz"
    assert cmds[0] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "--prefix=umg-jax/",
                       "-o", tarball, HEAD]
    assert cmds[1] == GC + ["scp", tarball, "umg-pod:"] + WHERE + ["--worker=all"]
    assert remote(cmds[2]) == (
        "sudo sh -c 'echo always > /sys/kernel/mm/transparent_hugepage/enabled'"
        f" && cd && rm -rf umg-jax && tar -xzf umg-jax-{HEAD}.tar.gz"
        " && { test -x ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
        " && cd && ~/.local/bin/uv venv --seed --allow-existing --python 3.12 umg-venv"
        f" && {ENV} && pip install -r requirements.txt -r requirements-tpu.txt"
        " && pip install --no-deps -e . && python -c 'import umg_jax'")
    assert len(cmds) == 3
    # The printed archive command, run here: the workers get the project at that commit.
    out = tmp_path / "a.tar.gz"
    subprocess.run(cmds[0][:7] + [str(out), HEAD], check=True)
    with tarfile.open(out) as t:
        names = set(t.getnames())
    for f in ("requirements.txt", "requirements-tpu.txt", "pyproject.toml", "umg_jax/train.py",
              "tools/tpu_pod.sh" if "tools/tpu_pod.sh" in _committed() else "tools/test.sh"):
        assert f"umg-jax/{f}" in names


def _committed() -> set[str]:
    return set(subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True,
                              text=True, check=True).stdout.split())


def test_tpu_install_from_git_url():
    cmds = dry(TPU, "install", "--repo_url", "https://example.org/umg-jax.git", "--commit",
               "abc123", "--venv", "/opt/venv", "--python=3.11", "--remote_dir", "src dir")
    assert len(cmds) == 1
    assert remote(cmds[0]) == (
        "sudo sh -c 'echo always > /sys/kernel/mm/transparent_hugepage/enabled'"
        " && cd && rm -rf 'src dir' && git clone -q https://example.org/umg-jax.git 'src dir'"
        " && git -C 'src dir' checkout -q --detach abc123"
        " && { test -x ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
        " && cd && ~/.local/bin/uv venv --seed --allow-existing --python 3.11 /opt/venv"
        " && cd && . /opt/venv/bin/activate && cd 'src dir'"
        " && pip install -r requirements.txt -r requirements-tpu.txt"
        " && pip install --no-deps -e . && python -c 'import umg_jax'")


def test_tpu_mount():
    (cmd,) = dry(TPU, "mount", "--data_bucket", "gs://my-data/coco/train/")
    body = remote(cmd)
    get, mnt = body.split("; } && ")
    assert get.startswith("command -v gcsfuse >/dev/null || {")
    assert "apt-get install -y -qq gcsfuse" in get
    assert mnt == ('sudo mkdir -p /mnt/umg-data && sudo chown "$USER" /mnt/umg-data'
                   " && { mountpoint -q /mnt/umg-data || gcsfuse --implicit-dirs -o ro"
                   " --only-dir=coco/train my-data /mnt/umg-data; }")
    (cmd,) = dry(TPU, "mount", "--data_bucket=gs://my-data", "--mount_point", "/data")
    assert remote(cmd).endswith("gcsfuse --implicit-dirs -o ro my-data /data; }")


def test_tpu_train_and_resume_are_one_command_on_every_host():
    args = ("--workdir", "gs://b/runs/vit l", "--config", "configs/vit_b16.py", "--",
            "--config.batch_size=4096", "--config.data.path=/mnt/umg-data/coco", "--x=it's")
    train, resume = dry(TPU, "train", *args), dry(TPU, "resume", *args)
    assert train == resume and len(train) == 1
    body = remote(train[0])
    assert body.startswith(ENV + " && ")
    # Two levels of quoting (local shell, remote shell) give back the exact words.
    assert shlex.split(body.removeprefix(ENV + " && ")) == [
        "python", "-m", "umg_jax.train", "--config=configs/vit_b16.py",
        "--workdir=gs://b/runs/vit l", "--config.batch_size=4096",
        "--config.data.path=/mnt/umg-data/coco", "--x=it's"]
    (cmd,) = dry(TPU, "train", "--workdir=gs://b/r", "--detach", "--log", "t.log")
    assert remote(cmd) == (
        f"cd && nohup bash -c '{ENV} && python -m umg_jax.train --config=configs/vit_l.py"
        " --workdir=gs://b/r' > t.log 2>&1 < /dev/null &")


def test_tpu_eval_export_delete_status():
    (cmd,) = dry(TPU, "eval", "--workdir", "gs://b/r", "--", "--num_examples", "1000")
    assert remote(cmd, worker="0") == (
        f"{ENV} && JAX_PLATFORMS=cpu python -m umg_jax.evaluate --workdir=gs://b/r"
        " --num_examples 1000")
    (cmd,) = dry(TPU, "export", "--workdir", "gs://b/r/", "--eval_worker", "3", "--platforms", "")
    assert remote(cmd, worker="3") == (
        f"{ENV} && python -m umg_jax.interop.export_torch gs://b/r/ --format=open_clip"
        " --out=gs://b/r/export-open_clip")
    (cmd,) = dry(TPU, "export", "--workdir", "gs://b/r", "--export_format", "hf",
                 "--export_out", "gs://c/hf")
    assert remote(cmd, worker="0").endswith(
        "JAX_PLATFORMS=cpu python -m umg_jax.interop.export_torch gs://b/r --format=hf"
        " --out=gs://c/hf")
    assert dry(TPU, "delete") == [GC + ["delete", "umg-pod"] + WHERE + ["--quiet"]]
    assert dry(TPU, "status") == [GC + ["describe", "umg-pod"] + WHERE]


@pytest.mark.parametrize("args, message", [
    ((), "missing subcommand"),
    (("launch",), "unknown subcommand 'launch'"),
    (("train", "--workdir", "gs://b/r", "--zonee", "x"), "unknown flag --zonee"),
    (("create", "--zone"), "--zone needs a value"),
    (("create", "extra"), "unexpected argument 'extra'"),
    (("create", "--spot=yes"), "--spot takes no value"),
    (("create", "--spot", "--preemptible"), "exclude each other"),
    (("create", "--accelerator_type", "256"), "--accelerator_type '256'"),
    (("create", "--name", "My_Pod"), "--name 'My_Pod'"),
    (("train",), "train needs --workdir"),
    (("train", "--workdir", "/tmp/run"), "share no disk"),
    (("resume", "--workdir", "runs/x"), "share no disk"),
    (("mount",), "mount needs --data_bucket"),
    (("mount", "--data_bucket", "my-data"), "--data_bucket 'my-data'"),
    (("mount", "--data_bucket", "gs://data", "--mount_point", "data"), "an absolute path"),
    (("export", "--workdir", "gs://b/r", "--export_format", "pt"), "open_clip or hf"),
    (("eval", "--workdir", "gs://b/r", "--eval_worker", "w1"), "a worker index"),
    (("install", "--commit", "no-such-commit"), "not a commit"),
])
def test_tpu_bad_flags_exit_2(args, message):
    r = sh(TPU, *args, "--dry_run")
    assert r.returncode == 2, r
    assert r.stdout == ""  # nothing run or printed
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_help_lists_every_flag(script):
    r = sh(script, "--help")
    assert r.returncode == 0 and r.stderr == ""
    text = script.read_text()
    flags = set(re.findall(r"^\s+(--[a-z_]+)\) ", text, re.M))  # the set_flag cases
    flags |= set(re.findall(r"^\s+(--[a-z_]+)\) [A-Z_]+=1 ;;", text, re.M))  # booleans
    assert len(flags) >= 15
    for f in flags:
        assert re.search(rf"^  {f}\b", r.stdout, re.M), f


# ----------------------------------------------------------------------------- slurm_gpu.sh

def _sbatch(tmp_path, *args) -> tuple[list[list[str]], str]:
    script = tmp_path / "job.sbatch"
    cmds = dry(SLURM, "--script", str(script), *args, cwd=tmp_path)
    return cmds, script.read_text()


def test_slurm_script(tmp_path):
    cmds, text = _sbatch(tmp_path, "--workdir", "gs://b/runs/vit_l", "--nodes", "4",
                         "--gpus_per_node=4", "--cpus_per_task", "48", "--partition", "gpu",
                         "--account=proj", "--time", "12:00:00", "--env", "NCCL_DEBUG=INFO",
                         "--env", "A=b c", "--repo_dir", "/shared/umg-jax", "--", "--config.x=1")
    assert cmds == [["sbatch", str(tmp_path / "job.sbatch")]]
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    assert re.findall(r"^#SBATCH (.*)$", text, re.M) == [
        "--job-name=umg-jax", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=4",
        "--cpus-per-task=48", "--mem=0", "--exclusive", "--time=12:00:00", "--partition=gpu",
        "--account=proj", "--output=slurm-%x-%j.out", "--open-mode=append", "--requeue",
        "--signal=B:USR1@300"]
    (srun,) = [line for line in text.splitlines() if line.startswith("srun ")]
    assert shlex.split(srun) == [
        "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=48", "python",
        "-m", "umg_jax.train", "--config=configs/vit_l.py", "--workdir=gs://b/runs/vit_l",
        "--config.x=1", "&"]
    assert re.findall(r"^(cd|\.|export) (.*)$", text, re.M) == [
        ("cd", "/shared/umg-jax"), (".", "/shared/umg-jax/.venv/bin/activate"),
        ("export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"), ("export", "NCCL_DEBUG=INFO"),
        ("export", "'A=b c'")]

    _, text = _sbatch(tmp_path, "--workdir", "/shared/runs/x", "--no_requeue")
    sb = re.findall(r"^#SBATCH (.*)$", text, re.M)
    assert "--no-requeue" in sb and not any(s.startswith("--signal") for s in sb)
    assert "--cpus-per-task" not in text  # left to the cluster unless given
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in text


@pytest.mark.parametrize("args, message", [
    ((), "--workdir is required"),
    (("--workdir", "runs/x"), "share no working directory"),
    (("--workdir", "/r", "--nodes", "0"), "--nodes '0'"),
    (("--workdir", "/r", "--gpus_per_node", "x"), "--gpus_per_node 'x'"),
    (("--workdir", "/r", "--env", "1A=b"), "--env '1A=b'"),
    (("--workdir", "/r", "--repo_dir", "rel"), "--repo_dir 'rel'"),
    (("--workdir", "/r", "--grace_s", "5m"), "--grace_s '5m'"),
    (("--workdir", "/r", "--nodez", "2"), "unknown flag --nodez"),
    (("--workdir", "/r", "--nodes"), "--nodes needs a value"),
    (("--workdir", "/r", "train"), "unexpected argument 'train'"),
])
def test_slurm_bad_flags_exit_2(tmp_path, args, message):
    r = sh(SLURM, *args, "--dry_run", cwd=tmp_path)
    assert r.returncode == 2, r
    assert r.stdout == "" and list(tmp_path.iterdir()) == []  # nothing written or submitted
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr


def _stand_ins(tmp_path, srun_exit: int, ticks: int) -> dict:
    """``srun`` / ``scancel`` / ``scontrol`` that record their calls; the fake trainer saves on
    SIGTERM (like umg_jax.train) and otherwise exits with ``srun_exit`` after a while."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    log.mkdir()
    (bin_ / "srun").write_text(f"""#!/bin/bash
echo "$@" > {log}/srun.args
echo "$JAX_LOCAL_DEVICE_IDS" > {log}/srun.env
echo $$ > {log}/srun.pid
trap 'echo saved > {log}/saved; exit 0' TERM
for i in $(seq {ticks}); do sleep 0.05; done
exit {srun_exit}
""")
    (bin_ / "scancel").write_text(f"""#!/bin/bash
echo "$@" > {log}/scancel.args
kill -TERM "$(cat {log}/srun.pid)"
""")
    (bin_ / "scontrol").write_text(f'#!/bin/bash\necho "$@" > {log}/scontrol.args\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node[1-2]")
    return {"env": env, "log": log}


def _launch(tmp_path, srun_exit, ticks):
    s = _stand_ins(tmp_path, srun_exit, ticks)
    _sbatch(tmp_path, "--workdir", "gs://b/r", "--gpus_per_node", "2", "--repo_dir",
            str(tmp_path), "--venv", str(tmp_path / "venv"))
    p = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=s["env"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while not (s["log"] / "srun.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    return p, s["log"]


def test_slurm_script_requeues_before_the_time_limit(tmp_path):
    p, log = _launch(tmp_path, srun_exit=0, ticks=400)
    time.sleep(0.2)
    p.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 0, out
    assert (log / "saved").exists()  # the trainers got SIGTERM and saved
    assert (log / "scancel.args").read_text().split() == ["--signal=TERM", "4242"]
    assert (log / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert (log / "srun.env").read_text().strip() == "0,1"
    assert (log / "srun.args").read_text().split() == [
        "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m", "umg_jax.train",
        "--config=configs/vit_l.py", "--workdir=gs://b/r"]


def test_slurm_script_passes_the_trainers_status(tmp_path):
    p, log = _launch(tmp_path, srun_exit=3, ticks=30)
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)  # preemption: the batch shell waits for the trainers
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 3, out
    assert "SIGTERM: waiting" in out
    assert not (log / "scontrol.args").exists() and not (log / "saved").exists()


_INIT = """
import sys
from absl import flags
import jax
from umg_jax import train
train._define_flags()
flags.FLAGS(["train"])
train._maybe_init_distributed()
print(jax.process_count(), jax.process_index(), jax.local_device_count(), jax.device_count())
jax.distributed.shutdown()
"""


def test_slurm_env_initializes_the_trainers_processes(tmp_path):
    """The Slurm variables srun sets for 2 nodes x 1 task, plus the script's
    JAX_LOCAL_DEVICE_IDS: ``umg_jax.train._maybe_init_distributed`` joins both processes."""
    import portpicker

    port = portpicker.pick_unused_port()
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(SLURM_JOB_ID="77", SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID="0",
                   SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="2",
                   JAX_COORDINATOR_PORT=str(port), JAX_LOCAL_DEVICE_IDS="0,1",
                   JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-c", _INIT], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["2", str(i), "2", "4"], out
