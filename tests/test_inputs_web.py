"""Web-scale inputs (umg_jax/labeling/inputs_web.py): WebDataset tar shards written the way
img2dataset writes them (``tarfile``) and Parquet files (``pyarrow``), each with a corrupt member,
through ``pseudo_label.list_inputs`` / ``load_input`` against the images that were written, and
one local annotate run over each (records keep the input bytes and the caption)."""

import io
import json
import pathlib
import subprocess
import sys
import tarfile

import annotate_fakes as fk
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from umg_jax.data import records
from umg_jax.labeling.annotate import __main__ as cli
from umg_jax.labeling.pseudo_label import INPUT_ERRORS, list_inputs, load_input

FAKE = "annotate_fakes:"


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(fk.scene(i)).save(buf, format="PNG")
    return buf.getvalue()


def _add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def _write_tars(d: pathlib.Path) -> dict[str, tuple[bytes, str]]:
    """Two shards; per key .jpg (PNG bytes are fine for PIL) + .txt + .json, as img2dataset;
    shard 1 holds a corrupt image and a key with a caption only. Returns id -> (bytes, caption)."""
    d.mkdir(parents=True)
    want = {}
    for s in range(2):
        with tarfile.open(d / f"{s:05d}.tar", "w") as t:
            for k in range(2):
                key, i = f"{s:05d}{k:04d}", 2 * s + k
                data = _png(i)
                _add(t, f"{key}.jpg", data)
                _add(t, f"{key}.txt", f"caption {i}".encode())
                _add(t, f"{key}.json", json.dumps({"key": key, "caption": f"caption {i}"}).encode())
                want[f"{s:05d}.tar/{key}"] = (data, f"caption {i}")
            if s == 1:
                _add(t, "bad0.jpg", b"\xff\xd8 not a jpeg")
                _add(t, "bad0.txt", b"broken")
                _add(t, "lonely.txt", b"no image with this key")
    return want


def _write_parquet(d: pathlib.Path) -> dict[str, tuple[bytes, str]]:
    """Two files, the second in two row groups and with a corrupt image and an empty caption."""
    d.mkdir(parents=True)
    want = {}
    rows0 = [(_png(0), "caption 0"), (_png(1), "caption 1")]
    rows1 = [(_png(2), "caption 2"), (b"garbage", "broken"), (_png(3), "")]
    pq.write_table(pa.table({"jpg": [r[0] for r in rows0], "caption": [r[1] for r in rows0]}),
                   d / "a.parquet")
    pq.write_table(pa.table({"jpg": [r[0] for r in rows1], "caption": [r[1] for r in rows1],
                             "other": [1, 2, 3]}), d / "b.parquet", row_group_size=2)
    for name, rows in (("a.parquet", rows0), ("b.parquet", rows1)):
        for i, r in enumerate(rows):
            want[f"{name}/{i}"] = r
    return want


@pytest.mark.parametrize("layout", ["tar", "parquet"])
def test_list_and_load(tmp_path, layout):
    want = (_write_tars if layout == "tar" else _write_parquet)(tmp_path / "in")
    items = list_inputs(str(tmp_path / "in"))
    ids = [i for i, _ in items]
    assert ids == sorted(ids) or layout == "parquet"  # tars: file then member order
    bad = {"tar": "00001.tar/bad0", "parquet": "b.parquet/1"}[layout]
    assert set(ids) == set(want) | ({bad} if layout == "tar" else set())
    assert "00001.tar/lonely" not in ids  # a caption without an image is no input
    for sid, item in items:
        if sid == bad:
            with pytest.raises(INPUT_ERRORS):
                load_input(item)
            continue
        img, data, caps, src = load_input(item)
        assert data == want[sid][0] and src is None
        np.testing.assert_array_equal(img, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        assert caps == ([want[sid][1]] if want[sid][1] else [])
    # a single file is an input too; ids keep its name
    one = tmp_path / "in" / ("00000.tar" if layout == "tar" else "a.parquet")
    assert [i for i, _ in list_inputs(str(one))] == [i for i in ids if i.startswith(one.name)]


def test_torn_tar_and_bad_parquet(tmp_path):
    want = _write_tars(tmp_path / "in")
    shard = tmp_path / "in" / "00000.tar"
    with tarfile.open(shard) as t:
        cut = t.getmember("000000001.jpg").offset + 100  # inside the second key's first header
    shard.write_bytes(shard.read_bytes()[:cut])
    items = dict(list_inputs(str(tmp_path / "in")))
    # the first key survives; the rest of the shard is one unreadable item; shard 1 is intact
    assert [k for k in items if k.startswith("00000.tar/")] == ["00000.tar/000000000",
                                                                 "00000.tar/<after 1 keys>"]
    assert load_input(items["00000.tar/000000000"])[1] == want["00000.tar/000000000"][0]
    with pytest.raises(INPUT_ERRORS, match="unreadable tar 00000.tar: ReadError"):
        load_input(items["00000.tar/<after 1 keys>"])
    assert {k for k in items if k.startswith("00001.tar/")} == \
        {k for k in want if k.startswith("00001.tar/")} | {"00001.tar/bad0"}
    # a member whose data is cut short is unreadable, not a short image
    item = items["00001.tar/000010001"]
    with pytest.raises(INPUT_ERRORS, match="truncated"):
        load_input(("tar", item[1], (item[2][0], item[2][1] + 10 ** 6), None))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "pq" / "x.parquet")
    with pytest.raises(ValueError, match="no image column"):
        list_inputs(str(tmp_path / "pq"))


@pytest.mark.parametrize("layout", ["tar", "parquet"])
def test_annotate_local_run(tmp_path, layout, capsys):
    want = (_write_tars if layout == "tar" else _write_parquet)(tmp_path / "in")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"vocab": ["red", "green", "sky"], "stages": [
        {"stage": "tag", "backend": FAKE + "Tagger", "threshold": 0.5},
        {"stage": "detect", "backend": FAKE + "Detector", "threshold": 0.4, "queries": "vocab"},
        {"stage": "filter"}]}))
    out = tmp_path / "out"
    assert cli.main(["--images", str(tmp_path / "in"), "--out", str(out), "--recipe",
                     str(recipe), "--shard_size", "2", "--batch_size", "2"]) == 0
    assert "1 unreadable" in capsys.readouterr().out
    recs = {r["source"]: r for r in records.iter_records(str(out))}
    good = {k: v for k, v in want.items() if v[0] != b"garbage"}
    assert set(recs) == set(good)
    for sid, (data, cap) in good.items():
        assert recs[sid]["image"] == data  # the input's own bytes, not a re-encode
        if cap:  # the input caption is the record's caption (no captioner in the recipe)
            assert recs[sid]["captions"] == [cap]
        assert recs[sid]["regions"]  # the red square, at least
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["unreadable"] == 1 and meta["num_examples"] == len(good)


def test_imports_need_neither_ray_nor_pyarrow():
    code = ("import sys, umg_jax, umg_jax.labeling.inputs_web, umg_jax.labeling.pseudo_label, "
            "umg_jax.labeling.annotate.run_ray; "
            "print(sorted({'ray', 'pyarrow', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
