"""The Grain pipeline (umg_jax/data/pipeline.py): shapes, determinism, checkpointed state,
per-process sharding, bad-record dropping and counting, worker processes, global batches."""

import json

import ml_collections as mlc
import numpy as np
import pytest

from umg_jax.data import pipeline, records, schema
from umg_jax.data import transforms as T

N = 24  # records in the small data set
S, P, L = 32, 8, 16


def _model_cfg():
    m = mlc.ConfigDict()
    m.vision = mlc.ConfigDict({"image_size": S, "patch_size": P})
    m.text = mlc.ConfigDict({"context_length": L})
    return m


def _data_cfg(**kw):
    from umg_jax.configs import common

    d = common.data_config()
    d.max_tags, d.max_regions, d.max_masks = 2, 3, 3
    d.num_workers = 0
    d.update(kw)
    return d


def _make_record(i, *, bad=None):
    """Record ``i``: its confidence (i + 1) / 1000 identifies it in batches (example_weight)."""
    rng = np.random.default_rng(i)
    h, w = 40, 48
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    m = np.zeros((h, w), np.uint8)
    m[5:25, 8:30] = 1
    rec = {
        "source": f"fixture:{i}",
        "image": records.encode_image(img),
        "height": h, "width": w,
        "captions": [f"picture number {i}"], "tags": ["noise"],
        "regions": [{"box": [8, 5, 30, 25], "caption": None, "tags": ["square"],
                     "category": i % 3}],
        "segments": [{"rle": records.mask_to_rle(m), "caption": "a square", "tags": [],
                      "category": i % 3, "isthing": True, "region": 0}],
        "confidence": (i + 1) / 1000,
    }
    if bad == "image":
        rec["image"] = rec["image"][:20]
    if bad == "box":
        rec["regions"][0]["box"] = [30, 5, 8, 25]
    if bad == "mask":
        rec["segments"][0]["rle"] = records.mask_to_rle(np.ones((10, 10), np.uint8))
    if bad == "text":
        rec["captions"] = [""]
    raw = records.encode_record(rec)
    return b"\x93garbage" if bad == "parse" else raw


def _write(out, recs):
    records.write_shards(recs, str(out), num_shards=2, meta={"name": "fixture", "categories": []})
    return str(out)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("good"), [_make_record(i) for i in range(N)])


def _ids(batch):
    return np.round(batch["example_weight"] * 1000).astype(int) - 1


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_matches_schema(data_dir):
    it = pipeline.make_iterator(_data_cfg(), _model_cfg(), batch_size=4, train=True, seed=0,
                                path=data_dir, process_index=0, process_count=1)
    b = next(it)
    shapes = schema.batch_shapes(batch_size=4, image_size=S, patch_size=P, max_tags=2,
                                 max_regions=3, max_masks=3, context_length=L)
    schema.check_batch(b, shapes)
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert "drop_counts" not in b
    assert b["region_valid"][:, 0].all() and not b["region_valid"][:, 1:].any()


def test_determinism_and_state_restore(data_dir):
    kw = dict(batch_size=5, train=True, path=data_dir, process_index=0, process_count=1)
    a = pipeline.make_iterator(_data_cfg(), _model_cfg(), seed=1, **kw)
    b = pipeline.make_iterator(_data_cfg(), _model_cfg(), seed=1, **kw)
    first = _take(a, 3)
    for x, y in zip(first, _take(b, 3), strict=True):
        _same(x, y)
    c = pipeline.make_iterator(_data_cfg(), _model_cfg(), seed=2, **kw)
    assert not np.array_equal(_ids(next(c)), _ids(first[0]))

    # crosses the epoch boundary (24 records, batches of 5) while checkpointing mid-stream
    state = json.loads(json.dumps(a.get_state()))
    cont = _take(a, 4)
    d = pipeline.make_iterator(_data_cfg(), _model_cfg(), seed=1, **kw)
    d.set_state(state)
    for x, y in zip(cont, _take(d, 4), strict=True):
        _same(x, y)
    # epoch 1 is a permutation of the data set, and epoch 2 is shuffled differently
    ids = np.concatenate([_ids(x) for x in first + cont])  # 35 ids
    assert sorted(ids[:N]) == list(range(N))
    assert not np.array_equal(ids[N:], ids[: len(ids) - N])


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_cover_data_once(data_dir, count):
    seen = []
    for index in range(count):
        it = pipeline.make_iterator(_data_cfg(), _model_cfg(), batch_size=1, train=False, seed=0,
                                    path=data_dir, process_index=index, process_count=count)
        ids = [int(_ids(b)[0]) for b in it]
        # train mode: the first epoch of each process is a permutation of its own part
        tr = pipeline.make_iterator(_data_cfg(), _model_cfg(), batch_size=1, train=True, seed=0,
                                    path=data_dir, process_index=index, process_count=count)
        assert sorted(int(_ids(b)[0]) for b in _take(tr, len(ids))) == sorted(ids)
        seen += ids
    assert sorted(seen) == list(range(N))


def test_bad_records_dropped_and_counted(tmp_path, caplog):
    kinds = {3: "parse", 5: "image", 8: "box", 11: "mask", 14: "text"}
    recs = [_make_record(i, bad=kinds.get(i)) for i in range(16)]
    path = _write(tmp_path / "bad", recs)
    it = pipeline.make_iterator(_data_cfg(), _model_cfg(), batch_size=1, train=False, seed=0,
                                path=path, process_index=0, process_count=1)
    with caplog.at_level("WARNING", logger="umg_jax.data"):
        batches = list(it)
    ids = [int(_ids(b)[0]) for b in batches]
    # parse / image drop the record; box / mask / text drop only the bad part (eval order is
    # the storage order: records interleaved over the shards)
    assert sorted(ids) == [i for i in range(16) if i not in (3, 5)]
    assert pipeline.drop_counts(it) == {"parse": 1, "image": 1, "box": 1, "mask": 1, "text": 1}
    by_id = dict(zip(ids, batches, strict=True))
    assert not by_id[8]["region_valid"].any() and by_id[8]["mask_valid"][0, 0]
    assert not by_id[11]["mask_valid"].any() and by_id[11]["region_valid"][0, 0]
    assert not by_id[14]["text_valid"][0] and by_id[13]["text_valid"][0]
    log = caplog.text
    # source ids; an unparsable record is named by data set + index
    assert "dropped record fixture:5" in log and "dropped record bad#" in log

    # the counts are part of the iterator state
    it2 = pipeline.make_iterator(_data_cfg(), _model_cfg(), batch_size=1, train=False, seed=0,
                                 path=path, process_index=0, process_count=1)
    _take(it2, 12)  # past both dropped records (storage positions 9 and 10)
    state = it2.get_state()
    it3 = pipeline.make_iterator(_data_cfg(), _model_cfg(), batch_size=1, train=False, seed=0,
                                 path=path, process_index=0, process_count=1)
    it3.set_state(state)
    assert pipeline.drop_counts(it3) == pipeline.drop_counts(it2)
    assert pipeline.drop_counts(it3)["parse"] == 1
    list(it3)
    assert pipeline.drop_counts(it3) == pipeline.drop_counts(it)

    strict = pipeline.make_iterator(_data_cfg(strict=True), _model_cfg(), batch_size=1,
                                    train=False, seed=0, path=path, process_index=0,
                                    process_count=1)
    with pytest.raises(T.BadRecordError, match="bad box in record fixture:8"):  # first in order
        list(strict)


def test_one_worker_gives_the_same_stream(data_dir):
    kw = dict(batch_size=4, train=True, seed=3, path=data_dir, process_index=0, process_count=1)
    ref = _take(pipeline.make_iterator(_data_cfg(), _model_cfg(), **kw), 3)
    it = pipeline.make_iterator(_data_cfg(num_workers=1), _model_cfg(), **kw)
    try:
        got = _take(it, 2)
        state = it.get_state()
    finally:
        it.close()
    for x, y in zip(ref, got, strict=False):
        _same(x, y)
    # the state of a worker pipeline restores into a new worker pipeline
    it = pipeline.make_iterator(_data_cfg(num_workers=1), _model_cfg(), **kw)
    try:
        it.set_state(state)
        _same(next(it), ref[2])
    finally:
        it.close()


def test_global_batches_on_mesh(data_dir):
    import jax

    from umg_jax import sharding

    mesh_cfg = mlc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    mesh = sharding.make_mesh(mesh_cfg)
    it = pipeline.make_iterator(_data_cfg(), _model_cfg(), batch_size=8, train=True, seed=0,
                                path=data_dir, process_index=0, process_count=1)
    local = pipeline.make_iterator(_data_cfg(), _model_cfg(), batch_size=8, train=True, seed=0,
                                   path=data_dir, process_index=0, process_count=1)
    g = next(pipeline.global_batches(it, mesh))
    ref = next(local)
    assert isinstance(g["image"], jax.Array) and g["image"].shape == (8, S, S, 3)
    assert len(g["image"].sharding.device_set) == len(jax.devices())
    np.testing.assert_array_equal(np.asarray(g["region_boxes"]), ref["region_boxes"])


def test_ensure_data(tmp_path, monkeypatch):
    monkeypatch.setenv("UMG_JAX_CACHE", str(tmp_path / "cache"))
    cfg = _data_cfg(synthetic_num_train=4, synthetic_num_eval=2)
    path = pipeline.ensure_data(cfg, "train")
    assert path.startswith(str(tmp_path / "cache" / "synthetic"))
    assert records.shard_paths(path)
    mtime = max(p.stat().st_mtime_ns for p in __import__("pathlib").Path(path).iterdir())
    assert pipeline.ensure_data(cfg, "train") == path  # reused, not regenerated
    assert max(p.stat().st_mtime_ns for p in __import__("pathlib").Path(path).iterdir()) == mtime
    eval_path = pipeline.ensure_data(cfg, "eval")
    val_path = pipeline.ensure_data(cfg, "val")  # thresholds are chosen here, never on eval
    assert len({path, eval_path, val_path}) == 3
    srcs = [{r["source"] for r in records.iter_records(p)} for p in (eval_path, val_path)]
    assert srcs[0].isdisjoint(srcs[1]) and all(len(x) == 2 for x in srcs)

    cfg.path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.ensure_data(cfg, "train")
    (tmp_path / "empty").mkdir()
    cfg.path = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards"):
        pipeline.ensure_data(cfg, "train")
    # real training data and no validation shards: no split to choose thresholds on
    cfg.path = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="data.val_path"):
        pipeline.ensure_data(cfg, "val")
