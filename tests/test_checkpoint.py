"""umg_jax/checkpoint.py: sharded round trip, restore onto 4 of 8 devices, keep-last-K,
keep-best, interrupted save (SIGKILL of a subprocess mid-save), params-only restore."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from umg_jax import checkpoint as ck

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mesh(n: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), ("data",))


def _state(mesh: Mesh, seed: int = 0) -> dict:
    """A train-state-like pytree: sharded params, Adam state, a step counter."""
    rng = np.random.default_rng(seed)
    row = NamedSharding(mesh, P("data", None))
    rep = NamedSharding(mesh, P())
    params = {"w": jax.device_put(rng.normal(size=(16, 8)).astype(np.float32), row),
              "b": jax.device_put(rng.normal(size=(8,)).astype(np.float32), rep)}
    opt = optax.adam(1e-3).init(params)
    return {"params": params, "opt_state": opt, "step": jax.device_put(np.int32(7), rep)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_sharded_with_data_state(tmp_path):
    mesh = _mesh(8)
    state = _state(mesh)
    grain_bytes = b'{"version": 2, "last_seen_indices": {"0": 41}}'
    with ck.Checkpointer(tmp_path, every_steps=5, keep=3) as c:
        assert c.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            c.restore(None, _abstract(state))
        assert not c.save(3, state, grain_bytes, {"note": "x"})  # not a multiple of 5
        assert c.save(5, state, grain_bytes, {"note": "five", "nan_skips": 2})
        state2 = jax.tree.map(lambda x: x + 1, state)
        assert c.save(10, state2, {"next_index": 12}, {"note": "ten"})
        assert not c.save(10, state2, None, {}, force=True)  # never rewrites a step
        c.wait()
        assert c.all_steps() == [5, 10]
        restored, data, meta = c.restore(5, _abstract(state))
        _assert_tree_equal(restored, state)
        assert data == grain_bytes and meta == {"note": "five", "nan_skips": 2}
        assert restored["params"]["w"].sharding.is_equivalent_to(
            state["params"]["w"].sharding, 2)
        assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
        restored, data, meta = c.restore(None, _abstract(state))
        _assert_tree_equal(restored, state2)
        assert data == {"next_index": 12} and meta["note"] == "ten"
    with pytest.raises(TypeError, match="data_state"):
        ck.Checkpointer(tmp_path / "b", every_steps=1, keep=1).save(1, state, [1, 2])


def test_restore_onto_four_devices(tmp_path):
    state = _state(_mesh(8))  # w [16, 8] rows over 8 devices
    with ck.Checkpointer(tmp_path, every_steps=1, keep=1, async_save=False) as c:
        c.save(1, state, None, {})
    mesh4 = _mesh(4)
    rep = NamedSharding(mesh4, P())
    for spec, shard_shape in ((P("data", None), (4, 8)), (P(None, "data"), (16, 2))):
        target = NamedSharding(mesh4, spec)
        abstract = jax.tree.map(
            lambda x, t=target: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=t if x.shape == (16, 8) else rep), state)
        with ck.Checkpointer(tmp_path, every_steps=1, keep=1) as c:
            restored, data, _ = c.restore(None, abstract)
        _assert_tree_equal(restored, state)
        assert data is None
        for x in (restored["params"]["w"], restored["opt_state"][0].mu["w"]):
            assert len(x.sharding.device_set) == 4 and x.sharding.spec == spec
            assert x.addressable_shards[0].data.shape == shard_shape


def test_keep_last_k(tmp_path):
    state = _state(_mesh(2))
    with ck.Checkpointer(tmp_path, every_steps=2, keep=2) as c:
        for s in range(11):
            c.save(s, state, None, {"s": s})
        c.wait()
        assert c.all_steps() == [8, 10]
        assert c.save(11, state, None, {}, force=True)
        c.wait()
        assert c.all_steps() == [10, 11]
    on_disk = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                     if p.name.isdigit())
    assert on_disk == [10, 11]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_keep_best(tmp_path, mode):
    state = _state(_mesh(2))
    accs = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4}
    if mode == "min":
        accs = {k: -v for k, v in accs.items()}
    with ck.Checkpointer(tmp_path, every_steps=1, keep=1, keep_best_metric="eval/acc",
                         best_mode=mode) as c:
        for s, a in accs.items():
            metrics = {"eval/acc": a, "loss": 1.0} if s != 4 else {"loss": 1.0}
            c.save(s, state, None, {}, metrics=metrics)
        c.wait()
        assert c.all_steps() == [2, 5]
        assert c.best_step() == 2
    # Metrics are read back from disk by a new manager (resume keeps the best).
    with ck.Checkpointer(tmp_path, every_steps=1, keep=1, keep_best_metric="eval/acc",
                         best_mode=mode) as c:
        c.save(6, state, None, {}, metrics={"eval/acc": 0.5 if mode == "max" else -0.5})
        c.wait()
        assert c.all_steps() == [2, 6] and c.best_step() == 2


_CHILD = textwrap.dedent("""
    import sys, time
    import jax, numpy as np
    from orbax.checkpoint._src.path import atomicity
    from umg_jax import checkpoint as ck

    workdir = sys.argv[1]
    state = {"w": np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024), "step": np.int32(1)}
    c = ck.Checkpointer(workdir, every_steps=1, keep=3)
    c.save(1, jax.tree.map(jax.numpy.asarray, state), b"iter-1", {"step": 1})
    c.wait()

    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def hanging_finalize(self, *a, **k):
        if self.get_final().name == "2":  # everything written, not yet renamed: kill here
            print("IN_FINALIZE", flush=True)
            time.sleep(600)
        return await real_finalize(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = hanging_finalize

    state2 = {"w": -np.ones((64, 1024), np.float32), "step": np.int32(2)}
    c.save(2, jax.tree.map(jax.numpy.asarray, state2), b"iter-2", {"step": 2})
    c.wait()
    print("NOT_KILLED", flush=True)
""")


def test_interrupted_save_keeps_previous(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "IN_FINALIZE", (line, proc.stderr.read() if proc.poll() else "")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckdir = tmp_path / "checkpoints"
    names = sorted(p.name for p in ckdir.iterdir())
    assert "1" in names and "2" not in names
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names  # partial step 2

    rep = NamedSharding(_mesh(1), P())
    abstract = {"w": jax.ShapeDtypeStruct((64, 1024), jnp.float32, sharding=rep),
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}
    with ck.Checkpointer(tmp_path, every_steps=1, keep=3) as c:
        assert c.latest_step() == 1 and c.all_steps() == [1]
        state, data, meta = c.restore(None, abstract)
        np.testing.assert_array_equal(
            np.asarray(state["w"]), np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024))
        assert int(state["step"]) == 1 and data == b"iter-1" and meta == {"step": 1}
        # The interrupted step can be saved again; the temp directory is gone.
        assert c.save(2, {"w": jnp.zeros((64, 1024)), "step": jnp.int32(2)}, None, {})
        c.wait()
        assert c.all_steps() == [1, 2]
    assert not any("tmp" in p.name for p in ckdir.iterdir())


def test_restore_params_only(tmp_path):
    mesh = _mesh(8)
    state = _state(mesh)
    abstract_params = _abstract(state["params"])
    ck.save_params(tmp_path / "imported", state["params"])
    params = ck.restore_params_only(tmp_path / "imported", abstract_params)
    _assert_tree_equal(params, state["params"])
    assert params["w"].sharding.spec == P("data", None)
    # From a training checkpoint step directory: params only, the optimizer state is not needed.
    with ck.Checkpointer(tmp_path / "run", every_steps=1, keep=1) as c:
        c.save(3, state, None, {})
    params = ck.restore_params_only(tmp_path / "run" / "checkpoints" / "3", abstract_params)
    _assert_tree_equal(params, state["params"])
    with pytest.raises(FileNotFoundError):
        ck.restore_params_only(tmp_path / "missing", abstract_params)


def test_round_trip_partitioned_optimizer_state(tmp_path):
    """optim.make_optimizer's state (partition with MaskedNode holes, MultiSteps, layer decay)
    inside a flax TrainState survives save / restore with the same tree structure."""
    import ml_collections as mlc
    import orbax.checkpoint as ocp
    from flax.training import train_state

    from umg_jax import optim

    o = mlc.ConfigDict(dict(lr=1e-3, warmup_steps=1, end_lr_frac=0.0, b1=0.9, b2=0.98,
                            eps=1e-6, weight_decay=0.1, grad_clip=1.0, layer_decay=0.8,
                            grad_accum=2, freeze=("text/.*",)))
    params = {"visual": {"transformer": {"resblocks_0": {"w": jnp.ones((2, 3))}}},
              "text": {"w": jnp.arange(3.0)}, "logit_scale": jnp.float32(1.0)}
    tx, _ = optim.make_optimizer(o, params, 10)
    st = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    grads = jax.tree.map(jnp.ones_like, params)
    st = st.apply_gradients(grads=grads)
    with ck.Checkpointer(tmp_path, every_steps=1, keep=1) as c:
        c.save(1, st, None, {})
        restored, _, _ = c.restore(1, jax.tree.map(ocp.utils.to_shape_dtype_struct, st))
    assert jax.tree.structure(restored) == jax.tree.structure(st)
    _assert_tree_equal(restored, st)
    assert int(restored.step) == 1


_MP_CHILD = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=60)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from umg_jax import checkpoint as ck

    sh = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    local = np.arange(8, dtype=np.float32).reshape(4, 2)[2 * pid: 2 * pid + 2]
    state = {"w": jax.make_array_from_process_local_data(sh, local, (4, 2))}
    with ck.Checkpointer(workdir, every_steps=1, keep=2) as c:
        c.save(1, state, f"iterator-of-{pid}".encode() * (pid + 1), {"note": "mp"})
        c.wait()
        abstract = {"w": jax.ShapeDtypeStruct((4, 2), np.float32, sharding=sh)}
        restored, data, meta = c.restore(None, abstract)
    rows = sorted(np.asarray(s.data).ravel().tolist() for s in restored["w"].addressable_shards)
    print("RESULT", pid, data.decode(), meta["note"], rows, flush=True)
""")


def test_two_processes_each_restore_their_data_state(tmp_path):
    """Multi-host: every process's iterator state is gathered into the one checkpoint and each
    process gets its own back (2 processes x 2 CPU devices on localhost, gloo)."""
    portpicker = pytest.importorskip("portpicker")
    port = str(portpicker.pick_unused_port())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-c", _MP_CHILD, str(i), port, str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-2000:]
            outs.append([ln for ln in out.splitlines() if ln.startswith("RESULT")][0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert outs[0] == "RESULT 0 iterator-of-0 mp [[0.0, 1.0], [2.0, 3.0]]"
    assert outs[1] == "RESULT 1 iterator-of-1iterator-of-1 mp [[4.0, 5.0], [6.0, 7.0]]"


def test_async_save_survives_donation(tmp_path):
    """The trainer donates the state to the next step right after ``save`` returns: deleting the
    device buffers then must not corrupt the checkpoint being written in the background."""
    state = _state(_mesh(8), seed=5)
    expected = jax.tree.map(np.asarray, state)
    abstract = _abstract(state)
    with ck.Checkpointer(tmp_path, every_steps=1, keep=1, async_save=True) as c:
        assert c.save(1, state, None, {})
        for x in jax.tree.leaves(state):
            x.delete()
        c.wait()
        restored, _, _ = c.restore(1, abstract)
    _assert_tree_equal(restored, expected)


def test_stored_paths_resolve_against_their_directory(tmp_path, monkeypatch):
    """Relative names resolve inside the directory; an old absolute path is kept while it exists
    and falls back to the file of the same name inside the (moved) directory."""
    d = tmp_path / "moved"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(b"spm")
    elsewhere = tmp_path / "elsewhere.model"
    elsewhere.write_bytes(b"other")
    gone = tmp_path / "old_place" / "tokenizer.model"
    assert ck.resolve_stored_path("tokenizer.model", d) == str(d / "tokenizer.model")
    assert ck.resolve_stored_path(str(elsewhere), d) == str(elsewhere)  # old dir, still there
    assert ck.resolve_stored_path(str(gone), d) == str(d / "tokenizer.model")  # old dir, moved
    assert ck.resolve_stored_path("/nowhere/x.model", d) == "/nowhere/x.model"  # reported later
    assert ck.resolve_stored_path("x.model", d) == str(d / "x.model")
    monkeypatch.chdir(tmp_path)  # a cwd-relative path written by an older run still works
    assert ck.resolve_stored_path("elsewhere.model", d) == "elsewhere.model"
    # Read through read_model_config: both file layouts (import dir, workdir config.json).
    model = {"vision": {}, "text": {"tokenizer": str(gone)}}
    (d / "model_config.json").write_text(json.dumps(model))
    (d / "config.json").write_text(json.dumps({"model": model}))
    for name in ("model_config.json", "config.json"):
        assert ck.read_model_config(d / name).text.tokenizer == str(d / "tokenizer.model")
    assert ck.read_run_config(d / "config.json").model.text.tokenizer == str(d / "tokenizer.model")
    # Writing: the file is copied in and named relative to the directory.
    out = tmp_path / "out"
    out.mkdir()
    m = ck.bundle_model_files({"text": {"tokenizer": str(elsewhere)}}, out)
    assert m["text"]["tokenizer"] == "tokenizer.model"
    assert (out / "tokenizer.model").read_bytes() == b"other"
    for spec in ("clip", "", "/nowhere/x.model"):  # no file: left as named
        assert ck.bundle_model_files({"text": {"tokenizer": spec}}, out)["text"]["tokenizer"] \
            == spec


@pytest.mark.parametrize("store", ["gs", "s3"])
def test_params_and_configs_on_buckets(store, request, tmp_path):
    """Params checkpoints, an import-directory layout and the files its config names, on a
    bucket (real local servers): written, located and read back like local ones. s3:// params
    go through a local copy (orbax-checkpoint 0.12.8 writes arrays only to local / gs://)."""
    from umg_jax import storage

    bucket = request.getfixturevalue("gcs_bucket" if store == "gs" else "s3_bucket")
    d = f"{bucket}/ckpt-test-{os.getpid()}/imp"
    state = _state(_mesh(8))
    abstract_params = _abstract(state["params"])
    ck.save_params(f"{d}/params", state["params"])
    tok = tmp_path / "spm.model"
    tok.write_bytes(b"spm bytes")
    model = ck.bundle_model_files({"vision": {}, "text": {"tokenizer": str(tok)}}, d)
    storage.write_json(f"{d}/model_config.json", model)
    assert storage.read_bytes(f"{d}/tokenizer.model") == b"spm bytes"

    src, cfg = ck.locate(d)
    assert (os.fspath(src), os.fspath(cfg)) == (f"{d}/params", f"{d}/model_config.json")
    assert ck.read_model_config(cfg).text.tokenizer == f"{d}/tokenizer.model"
    params = ck.restore_params_only(src, abstract_params)
    _assert_tree_equal(params, state["params"])
    assert params["w"].sharding.spec == P("data", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.restore_params_only(f"{bucket}/nothing", abstract_params)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ck.locate(f"{bucket}/nothing")


def test_training_checkpoints_on_gcs_and_refused_on_s3(gcs_bucket, s3_bucket):
    """A Checkpointer on gs:// (tensorstore's GCS driver, commit-marker atomicity) saves and
    restores like a local one; on s3:// it is refused with one line saying what to do."""
    from umg_jax import storage

    state = _state(_mesh(8))
    wd = f"{gcs_bucket}/ckpt-run-{os.getpid()}"
    with ck.Checkpointer(wd, every_steps=1, keep=2) as c:
        c.save(1, state, b"grain", {"note": "one"})
        c.save(2, jax.tree.map(lambda x: x + 1, state), {"i": 2}, {"note": "two"})
        c.save(3, state, None, {"note": "three"})
        c.wait()
        assert c.all_steps() == [2, 3]  # keep=2 deleted step 1 from the bucket
        restored, data, meta = c.restore(2, _abstract(state))
    _assert_tree_equal(restored, jax.tree.map(lambda x: x + 1, state))
    assert data == {"i": 2} and meta == {"note": "two"}
    assert (storage.path(wd) / "checkpoints" / "3" / "commit_success.txt").exists()
    assert ck.finalized_steps(f"{wd}/checkpoints") == [2, 3]
    assert os.fspath(ck.locate(wd)[0]) == f"{wd}/checkpoints/3"
    with pytest.raises(storage.StorageError, match=(
            rf"^cannot keep training checkpoints in {s3_bucket}/r/checkpoints: orbax-checkpoint "
            r"\S+ writes arrays only to local paths and gs://; use a gs:// workdir or a "
            r"filesystem every host mounts")):
        ck.Checkpointer(f"{s3_bucket}/r", every_steps=1, keep=1)
