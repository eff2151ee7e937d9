"""The wheel: built from the source tree, installed into a fresh virtual environment outside the
repository (no editable install reaching in), it holds every package file and data file, and its
commands run from another directory: train a few steps on the shipped tiny config, evaluate and
export that run, and the downstream / deprecated benchmark commands start.

The fresh environment gets the test environment's third-party packages through a ``.pth`` line
naming its site-packages directory; a directory added that way does not run its own ``.pth``
files, so the editable install's finder (``__editable__.umg_jax-*.pth``) stays inactive."""

import importlib.util
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# A very small model and run as --config overrides of the shipped tiny config (as test_train.py)
OVERRIDES = {
    "model.vision.image_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32,
    "model.vision.layers": 1, "model.vision.heads": 2, "model.text.width": 32,
    "model.text.layers": 1, "model.text.heads": 2, "model.text.context_length": 16,
    "model.embed_dim": 32, "batch_size": 8, "total_steps": 3, "optim.warmup_steps": 1,
    "data.synthetic_num_train": 16, "data.synthetic_num_eval": 8, "data.max_tags": 2,
    "data.max_regions": 3, "data.max_masks": 3, "data.synthetic_image_size": 40,
    "data.num_workers": 0, "ckpt.every_steps": 3, "ckpt.keep": 1, "ckpt.async_save": False,
    "log.every_steps": 1, "log.tensorboard": False, "log.peak_flops": 0,
    "eval.batch_size": 8, "eval.num_examples": 8,
}
# what the wheel must carry besides modules (pyproject.toml [tool.setuptools.package-data])
DATA_FILES = ["umg_jax/configs/tiny.py", "umg_jax/configs/common.py", "umg_jax/accelerators.toml",
              "umg_jax/gpu_targets/h100_sxm.txtpb", "umg_jax/downstream/data/imagenet_classes.txt",
              "umg_jax/downstream/data/SOURCES.md", "umg_jax/labeling/annotate/stuff_names.txt",
              "umg_jax/data/bpe_simple_vocab_16e6.txt.gz"]
TOP_LEVEL = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE")


def _package_files(root: pathlib.Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / "umg_jax").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(python of the fresh venv, temp dir, wheel path, source copy)``. The wheel is built from
    a copy of the tree, so that building writes nothing (build/, egg-info) into the repo."""
    assert importlib.util.find_spec("setuptools"), (
        "the wheel is built without build isolation: pip install 'setuptools>=64' (the build "
        "backend of pyproject.toml)")
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in TOP_LEVEL:
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "umg_jax", src / "umg_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                        str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("umg_jax-*.whl")

    venv = tmp / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, cwd=tmp).stdout.strip()
    r = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", purelib,
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # third-party packages of this environment, after the venv's own (umg_jax from the wheel)
    peers = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                           *site.getsitepackages()])
    (pathlib.Path(purelib) / "test_env_packages.pth").write_text("\n".join(peers) + "\n")
    return python, tmp, wheel, src


def _env(tmp) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                UMG_JAX_CACHE=str(tmp / "cache"), PYTHONNOUSERSITE="1")


def _run(python, tmp, *args, timeout=600):
    r = subprocess.run([str(python), *args], cwd=tmp, env=_env(tmp), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_holds_every_package_file(installed):
    _, _, wheel, src = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in DATA_FILES:
        assert f in names, f
    for pattern in ("umg_jax/gpu_targets/", "umg_jax/downstream/data/"):
        shipped = {f for f in names if f.startswith(pattern)}
        assert shipped == {f for f in _package_files(src) if f.startswith(pattern)}, pattern
    missing = _package_files(src) - names
    assert not missing, f"not in the wheel (pyproject.toml package-data?): {sorted(missing)}"
    assert not [n for n in names if n.split("/")[0] not in ("umg_jax",)
                and not n.split("/")[0].endswith(".dist-info")]  # no tests/, configs/, ...


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    python, tmp, _, _ = installed
    out = _run(python, tmp, "-c", "import umg_jax, umg_jax.configs, sys; "
               "print(umg_jax.__file__); print(umg_jax.configs.__file__); "
               "print(any('__editable__' in m for m in sys.modules))").stdout.split()
    assert out[2] == "False"
    for f in out[:2]:
        assert pathlib.Path(f).is_relative_to(tmp / "v"), f
        assert not pathlib.Path(f).is_relative_to(ROOT), f


def test_commands_run_from_the_wheel(installed):
    python, tmp, _, _ = installed
    cfg = _run(python, tmp, "-m", "umg_jax.configs", "tiny").stdout.strip()
    assert pathlib.Path(cfg).is_relative_to(tmp / "v") and cfg.endswith("umg_jax/configs/tiny.py")
    wd = tmp / "W"
    r = _run(python, tmp, "-m", "umg_jax.train", "--config", cfg, "--workdir", str(wd),
             *[f"--config.{k}={v}" for k, v in OVERRIDES.items()])
    assert (wd / "checkpoints" / "3").is_dir(), r.stdout[-2000:]
    r = _run(python, tmp, "-m", "umg_jax.evaluate", "--workdir", str(wd))
    assert "retrieval" in r.stdout + r.stderr, r.stdout[-2000:]
    _run(python, tmp, "-m", "umg_jax.interop.export_torch", str(wd), "--format", "hf", "--out",
         str(tmp / "hf"))
    assert (tmp / "hf" / "config.json").is_file() and list((tmp / "hf").glob("*.safetensors"))
    assert "--workdir" in _run(python, tmp, "-m", "umg_jax.downstream", "--help").stdout
    old = _run(python, tmp, "-m", "umg_jax.benchmark", "--help")
    assert "--workdir" in old.stdout and "python -m umg_jax.downstream" in old.stderr
