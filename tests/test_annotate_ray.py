"""``--engine ray`` (umg_jax/labeling/annotate/run_ray.py) against the local engine, its
independent reference: both shipped tiny-teacher recipes, a driver SIGKILLed mid-run then rerun,
an actor that dies mid-batch, every input failing, a stage raising a bug; and the recipe's
scheduling keys. One Ray cluster (2 CPUs) for the whole module."""

import importlib.abc
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import annotate_fakes as fk
import pytest
import ray
from PIL import Image

from umg_jax.data import records, transforms
from umg_jax.data.synthetic import write_synthetic
from umg_jax.labeling.annotate import __main__ as cli
from umg_jax.labeling.annotate.backend import AnnotateError
from umg_jax.labeling.annotate.recipe import load_recipe

TESTS = pathlib.Path(__file__).parent
ROOT = TESTS.parent
PYTHONPATH = os.pathsep.join([str(TESTS), str(ROOT)])  # the workers import the test backends
ME = "test_annotate_ray:"


class SlowTagger(fk.Tagger):
    """The fake tagger, with test hooks. ``die_once``: the first call of any actor creates that
    file and kills its process (an actor dying mid-batch). ``hold``: after ``hold_after`` calls
    of one process, wait while that file exists (so a driver can be killed mid-run)."""

    def __init__(self, model, device="cpu", die_once=None, hold=None, hold_after=0):
        super().__init__(model, device)
        self.die_once, self.hold, self.hold_after, self.calls = die_once, hold, hold_after, 0

    def tag(self, images, vocab, captions):
        if self.die_once and not os.path.exists(self.die_once):
            open(self.die_once, "w").close()
            os._exit(1)
        self.calls += 1
        while self.hold and self.calls > self.hold_after and os.path.exists(self.hold):
            time.sleep(0.05)
        return super().tag(images, vocab, captions)


class BuggyTagger(fk.Tagger):
    def tag(self, images, vocab, captions):
        raise TypeError("a bug in the tagger")


class _ShimBeforeTransformers(importlib.abc.MetaPathFinder):
    """Applies this environment's torchvision shim (the ``torch_mod`` fixture's) just before a
    worker first imports transformers; workers that never load a model skip torch."""

    def find_spec(self, name, path=None, target=None):
        if name == "transformers":
            sys.meta_path.remove(self)
            import torch_shim

            torch_shim.import_torch()
        return None


def shim_torch_on_import() -> None:
    """The cluster's ``worker_process_setup_hook``."""
    sys.meta_path.insert(0, _ShimBeforeTransformers())


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             runtime_env={"env_vars": {"PYTHONPATH": PYTHONPATH},
                          "worker_process_setup_hook": "test_annotate_ray.shim_torch_on_import"})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _rounded(x, digits: int = 6):
    """``x`` (parsed JSON) with every float rounded to ``digits`` decimals."""
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v, digits) for v in x]
    return x


def _files(d: pathlib.Path) -> dict[str, object]:
    """Every output file's bytes, but the per-image JSON lines parsed with their scores rounded:
    a teacher's float32 score can differ by an ulp with the thread count (a Ray actor runs
    with one), while the records (ArrayRecord shards, ``meta.json``) must be byte-equal."""
    out: dict[str, object] = {}
    for p in sorted(d.iterdir()):
        if not p.is_file() or p.name.startswith("stats-"):
            continue
        out[p.name] = ([_rounded(json.loads(line)) for line in p.read_text().splitlines()]
                       if p.suffix == ".jsonl" else p.read_bytes())
    return out


def _assert_same(local: pathlib.Path, other: pathlib.Path) -> None:
    """Byte-equal files, and the decoded records equal per image id, each id once."""
    a = {r["source"]: r for r in records.iter_records(str(local))}
    b = list(records.iter_records(str(other)))
    assert len({r["source"] for r in b}) == len(b)  # no duplicates
    assert a == {r["source"]: r for r in b}
    assert _files(local) == _files(other)


def _images(d: pathlib.Path, n: int) -> pathlib.Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(fk.scene(i)).save(d / f"img{i:02d}.png")
    return d


def _recipe(d: pathlib.Path, tagger: dict) -> str:
    p = d / "recipe.json"
    p.write_text(json.dumps({"vocab": ["red", "green", "sky"], "stages": [
        {"stage": "tag", "threshold": 0.5, **tagger},
        {"stage": "detect", "backend": "annotate_fakes:Detector", "threshold": 0.4,
         "queries": "vocab"},
        {"stage": "filter"}]}))
    return str(p)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, torch_mod):
    d = tmp_path_factory.mktemp("tiny")
    assert cli.main(["--write_tiny_teachers", str(d / "teachers")]) == 0
    write_synthetic(str(d / "images"), 4, split="eval", num_shards=1, image_size=64)
    return d


@pytest.mark.slow  # 7 actors each importing torch + transformers: ~1 min a recipe on 2 cores
@pytest.mark.parametrize("recipe", ["recipe.json", "recipe_alt.json"])
def test_tiny_recipes_equal_local(cluster, teachers, recipe, capsys):
    argv = ["--images", str(teachers / "images"), "--recipe", str(teachers / "teachers" / recipe),
            "--device", "cpu", "--batch_size", "2", "--shard_size", "3"]
    local, ray_out = teachers / f"local-{recipe}", teachers / f"ray-{recipe}"
    assert cli.main(argv + ["--out", str(local)]) == 0
    assert cli.main(argv + ["--out", str(ray_out), "--engine", "ray"]) == 0, \
        capsys.readouterr().err
    _assert_same(local, ray_out)
    recs = list(records.iter_records(str(ray_out)))
    assert recs and sum(len(r["regions"]) for r in recs) > 0
    for r in recs:
        transforms.decode(records.encode_record(r), strict=True)
    stats = json.loads((ray_out / "stats-ray.json").read_text())
    steps = load_recipe(str(teachers / "teachers" / recipe)).steps
    assert set(stats["stages"]) == {f"{s.stage}:{s.name}" for s in steps}
    assert all(v["images"] > 0 and v["images_per_s"] > 0 for v in stats["stages"].values())
    assert stats["images"] == 4 and stats["counts"]["examples"] == len(recs)


def test_driver_killed_then_rerun(cluster, tmp_path, capsys):
    src = _images(tmp_path / "img", 8)
    hold = tmp_path / "hold"
    r = _recipe(tmp_path, {"backend": ME + "SlowTagger",
                           "options": {"hold": str(hold), "hold_after": 2}})
    argv = ["--images", str(src), "--recipe", r, "--batch_size", "1", "--shard_size", "2"]
    assert cli.main(argv + ["--out", str(tmp_path / "local")]) == 0  # no hold file: no wait
    out = tmp_path / "ray"
    hold.touch()
    p = subprocess.Popen([sys.executable, "-m", "umg_jax.labeling.annotate", *argv, "--out",
                          str(out), "--engine", "ray", "--ray_address", cluster],
                         env={**os.environ, "PYTHONPATH": PYTHONPATH},
                         stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "w"))
    try:
        t = time.time()
        while not list(out.glob("*.jsonl")) and time.time() - t < 40 and p.poll() is None:
            time.sleep(0.05)
        assert p.poll() is None and list(out.glob("*.jsonl")), "no shard finished"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        p.kill()
    hold.unlink()
    done = sorted(f.name for f in out.glob("*.jsonl"))
    assert 1 <= len(done) < 4, done  # killed mid-run
    assert cli.main(argv + ["--out", str(out), "--engine", "ray"]) == 0
    assert f"{len(done)} finished shards skipped" in capsys.readouterr().out
    _assert_same(tmp_path / "local", out)


def test_actor_killed_mid_batch(cluster, tmp_path, capsys):
    # the inputs as a WebDataset tar (img2dataset's layout): the ray workers read tar members
    src = tmp_path / "tars"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as t:
        for f in sorted(_images(tmp_path / "img", 4).iterdir()):
            t.add(f, arcname=f"{f.stem}.png")
            cap = f"caption of {f.stem}".encode()
            info = tarfile.TarInfo(f"{f.stem}.txt")
            info.size = len(cap)
            t.addfile(info, io.BytesIO(cap))
    marker = tmp_path / "died"
    r = _recipe(tmp_path, {"backend": ME + "SlowTagger", "options": {"die_once": str(marker)}})
    argv = ["--images", str(src), "--recipe", r, "--batch_size", "2", "--shard_size", "2"]
    assert cli.main(argv + ["--out", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    assert marker.exists()  # an actor died, Ray restarted it and retried its batch
    assert cli.main(argv + ["--out", str(tmp_path / "local")]) == 0  # marker there: no death
    _assert_same(tmp_path / "local", tmp_path / "ray")
    recs = list(records.iter_records(str(tmp_path / "ray")))
    assert len(recs) == 4 and all(r["captions"] == [f"caption of {r['source'][10:]}"]
                                  for r in recs)


def test_failures_exit_status(cluster, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"x{i}.png").write_bytes(b"not a png")
    r = _recipe(tmp_path, {"backend": "annotate_fakes:Tagger"})
    assert cli.main(["--images", str(bad), "--out", str(tmp_path / "o1"), "--recipe", r,
                     "--engine", "ray"]) == 1
    assert "nothing annotated: 2 inputs unreadable" in capsys.readouterr().err
    src = _images(tmp_path / "img", 2)
    r = _recipe(tmp_path, {"backend": ME + "BuggyTagger"})
    with pytest.raises(Exception, match="a bug in the tagger"):
        cli.main(["--images", str(src), "--out", str(tmp_path / "o2"), "--recipe", r,
                  "--engine", "ray"])
    assert not list((tmp_path / "o2").glob("*.jsonl"))
    # a bad backend option fails the actor's construction: a bad request, status 2
    r = _recipe(tmp_path, {"backend": "annotate_fakes:Tagger", "options": {"nope": 1}})
    assert cli.main(["--images", str(src), "--out", str(tmp_path / "o3"), "--recipe", r,
                     "--engine", "ray"]) == 2
    assert "unknown option(s) ['nope']" in capsys.readouterr().err


class CountingTagger(fk.Tagger):
    sizes: list = []

    def tag(self, images, vocab, captions):
        CountingTagger.sizes.append(len(images))
        return super().tag(images, vocab, captions)


def test_stage_batch_size_and_resource_keys(tmp_path):
    """No cluster: ``batch_size`` cuts the engine's batch into model calls, output unchanged;
    the scheduling keys are checked."""
    src = _images(tmp_path / "img", 5)
    outs = []
    for k, extra in enumerate([{}, {"batch_size": 2, "num_gpus": 0.5, "concurrency": [1, 3],
                                    "num_cpus": 0.5}]):
        d = tmp_path / f"r{k}"
        d.mkdir()
        r = _recipe(d, {"backend": ME + "CountingTagger", **extra})
        CountingTagger.sizes = []
        assert cli.main(["--images", str(src), "--out", str(d / "o"), "--recipe", r,
                         "--batch_size", "5"]) == 0
        outs.append((d / "o", list(CountingTagger.sizes)))
    assert outs[0][1] == [5] and outs[1][1] == [2, 2, 1]
    a, b = (list(records.iter_records(str(o))) for o, _ in outs)
    assert a == b
    for bad, msg in [({"batch_size": 0}, "batch_size"), ({"num_gpus": -1}, "num_gpus"),
                     ({"concurrency": [3, 1]}, "concurrency"), ({"num_cpus": 0}, "num_cpus"),
                     ({"concurrency": True}, "concurrency")]:
        r = _recipe(tmp_path, {"backend": "annotate_fakes:Tagger", **bad})
        with pytest.raises(AnnotateError, match=msg):
            load_recipe(r)
    p = tmp_path / "f.json"
    p.write_text(json.dumps({"stages": [{"stage": "filter", "num_gpus": 1}]}))
    with pytest.raises(AnnotateError, match="filter runs on CPUs"):
        load_recipe(str(p))
    assert cli.main(["--images", str(src), "--out", str(tmp_path / "o"), "--recipe",
                     _recipe(tmp_path, {"backend": "annotate_fakes:Tagger"}),
                     "--ray_address", "auto"]) == 2
