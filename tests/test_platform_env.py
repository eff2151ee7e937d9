"""``umg_jax/host_platforms.py``: the JAX platforms a command pins before its backends start. The
decision on faked hosts (device files, PCI vendor ids, TPU VM variables, installed plugins), and a
real command with ``JAX_PLATFORMS`` unset that starts JAX's backends without libtpu's
``TPU_WORKER_HOSTNAMES`` errors or the CUDA plugin's ``cuInit`` traceback."""

import os
import pathlib
import subprocess
import sys

import pytest

from umg_jax import accelerators, host_platforms

ROOT = pathlib.Path(__file__).parents[1]
NOISE = ("TPU_WORKER_HOSTNAMES", "INVALID_ARGUMENT", "cuInit", "libtpu", "Traceback")
CUDA = {"xla_cuda12"}


@pytest.fixture
def host(tmp_path):
    """An empty fake ``/dev`` and PCI bus; ``add("dev/nvidia0")`` etc. creates files."""
    (tmp_path / "dev").mkdir()
    (tmp_path / "pci").mkdir()

    def add(rel, text=""):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def decide(environ=None, plugins=CUDA):
        return host_platforms.local_platforms(environ or {}, dev_root=str(tmp_path / "dev"),
                                              pci_root=str(tmp_path / "pci"), plugins=plugins)

    return add, decide


def test_plain_host_is_cpu_only(host):
    add, decide = host
    assert decide() == "cpu"
    assert decide(plugins=set()) == "cpu"
    add("pci/0000:00:04.0/vendor", "0x8086\n")  # an Intel device is no TPU
    add("dev/nvidiactl")  # the driver's control file without a GPU
    assert decide() == "cpu"


def test_nvidia_gpu_with_the_cuda_plugin_keeps_cuda(host):
    add, decide = host
    add("dev/nvidia0")
    assert decide() == "cuda,cpu"
    assert decide(plugins={"xla_cuda13"}) == "cuda,cpu"
    # without the plugin JAX prints its own "CUDA-enabled jaxlib is not installed" hint: kept
    assert decide(plugins=set()) is None


@pytest.mark.parametrize("sign", ["dev/accel0", "dev/vfio/0", "pci/0000:00:05.0/vendor"])
def test_any_tpu_device_leaves_jax_alone(host, sign):
    add, decide = host
    add(sign, "0x1ae0\n")
    assert decide() is None


@pytest.mark.parametrize("var", host_platforms.TPU_ENV_VARS)
def test_tpu_vm_variables_leave_jax_alone(host, var):
    _, decide = host
    assert decide({var: "v5litepod-8"}) is None


def test_explicit_choice_other_gpus_and_unknown_plugins_leave_jax_alone(host):
    add, decide = host
    assert decide({"JAX_PLATFORMS": "tpu"}) is None
    assert decide({"JAX_PLATFORMS": ""}) is None  # JAX's own "try everything", asked for
    assert decide(plugins=CUDA | {"xla_rocm7"}) is None
    assert decide(plugins={"metal"}) is None
    add("dev/kfd")  # an AMD GPU (ROCm)
    assert decide() is None


def test_this_host():
    """The real host: the plugin list agrees with accelerators.gpu_compiler_available; pin() in
    the test process (JAX_PLATFORMS set by conftest, backends started) changes nothing."""
    assert ("xla_cuda12" in host_platforms.installed_jax_plugins()) == (
        accelerators.gpu_compiler_available())
    before = os.environ.get("JAX_PLATFORMS")
    assert host_platforms.pin() is None and os.environ.get("JAX_PLATFORMS") == before


# Commands that start JAX's backends (jax.devices) and then stop at once at a bad input (exit 2):
# the dry run's CPU stand-in at an unknown --sweep key, the trainer at a mesh 1 device cannot fill.
COMMANDS = {
    "dryrun": (["umg_jax.dryrun", "--devices", "1", "--sweep", "no_such_key=1"],
               "unknown config key 'no_such_key'"),
    "train": (["umg_jax.train", "--workdir", "{tmp}/w", "--config.mesh.fsdp=3"],
              "does not fit 1 devices"),
}


def _run(command, env, tmp):
    args, _ = COMMANDS[command]
    args = [a.format(tmp=tmp) for a in args]
    return subprocess.run([sys.executable, "-m", args[0], "--config",
                           str(ROOT / "configs/tiny.py"), *args[1:]],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not (accelerators.tpu_compiler_available()
                         or accelerators.gpu_compiler_available()),
                    reason="neither libtpu nor the CUDA plugin installed: nothing to be noisy")
@pytest.mark.skipif(host_platforms.tpu_present(os.environ) or pathlib.Path("/dev/kfd").exists()
                    or bool(list(pathlib.Path("/dev").glob("nvidia[0-9]*"))),
                    reason="needs a host without accelerators")
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_starts_quietly_without_jax_platforms(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    r = _run(command, env, tmp_path)
    assert r.returncode == 2 and COMMANDS[command][1] in r.stderr, r.stderr[-3000:]
    assert not [s for s in r.stderr.splitlines() if any(n in s for n in NOISE)], r.stderr
    # the same command with JAX's "try every platform" (JAX_PLATFORMS="", which pin() respects)
    # is the noisy start the pin prevents: proof that this command does start the backends
    loud = _run(command, dict(env, JAX_PLATFORMS=""), tmp_path)
    assert loud.returncode == 2 and COMMANDS[command][1] in loud.stderr, loud.stderr[-3000:]
    assert any(n in loud.stderr for n in ("cuInit", "TPU_WORKER_HOSTNAMES", "libtpu",
                                          "backend 'tpu'")), loud.stderr[-3000:]


def test_tpu_vm_detection_reads_the_pci_bus(tmp_path):
    """A TPU VM is recognised by its chips (Google's PCI vendor id), so that every host of a
    slice joins jax.distributed; other vendors, an unreadable entry or no bus are not one."""
    assert not host_platforms.tpu_chips_attached(str(tmp_path / "no_bus"))
    for i, vendor in enumerate(["0x8086", "0x10de"]):  # Intel, NVIDIA
        (tmp_path / f"0000:00:0{i}.0").mkdir()
        (tmp_path / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
    (tmp_path / "0000:00:09.0").mkdir()  # no vendor file
    assert not host_platforms.tpu_chips_attached(str(tmp_path))
    (tmp_path / "0000:00:05.0").mkdir()
    (tmp_path / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")
    assert host_platforms.tpu_chips_attached(str(tmp_path))
    assert not host_platforms.tpu_chips_attached()  # this machine has no TPU
