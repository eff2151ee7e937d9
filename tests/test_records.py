"""Record io (umg_jax/data/records.py): codecs against PIL / pycocotools, atomic shard writing."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from umg_jax.data import records


def test_record_round_trip_with_numpy_values():
    rec = {"source": "x:1", "height": np.int64(3), "box": np.array([1.5, 2.0]), "b": b"\x00\x01"}
    out = records.decode_record(records.encode_record(rec))
    assert out == {"source": "x:1", "height": 3, "box": [1.5, 2.0], "b": b"\x00\x01"}


def test_image_codecs_png_lossless_and_jpeg_close():
    img = np.random.default_rng(0).integers(0, 255, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_array_equal(records.decode_image(records.encode_image(img)), img)
    smooth = np.tile(np.linspace(0, 255, 23, dtype=np.uint8)[None, :, None], (17, 1, 3))
    jpg = records.decode_image(records.encode_image(smooth, "jpeg", quality=95))
    assert jpg.shape == smooth.shape and np.abs(jpg.astype(int) - smooth).mean() < 3
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        records.encode_image(img[..., 0])


def test_rle_matches_pycocotools_area_and_uncompressed_counts():
    m = np.zeros((20, 30), np.uint8)
    m[3:11, 5:25] = 1
    rle = records.mask_to_rle(m)
    assert rle["size"] == [20, 30] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(records.rle_to_mask(rle), m)
    assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) == m.sum()
    # uncompressed (iscrowd-style) counts, column-major run lengths written by hand
    col = [0] * 3 + [1] * 8 + [0] * 9  # one column of the box
    runs, flat = [], np.asarray(m).T.reshape(-1)
    prev, n = 0, 0
    for v in flat:
        if v != prev:
            runs.append(n)
            prev, n = v, 0
        n += 1
    runs.append(n)
    assert col == list(m[:, 5])
    np.testing.assert_array_equal(records.rle_to_mask({"size": [20, 30], "counts": runs}), m)


def test_write_shards_atomic_and_meta(tmp_path):
    out = tmp_path / "ds"
    paths = records.write_shards(({"source": f"s:{i}", "i": i} for i in range(7)), str(out),
                                 num_shards=3, meta={"name": "t", "categories": []})
    assert len(paths) == 3 and records.shard_paths(str(out)) == sorted(paths)
    assert records.read_meta(str(out))["num_examples"] == 7
    src = records.RecordSource(records.shard_paths(str(out)))
    assert len(src) == 7
    assert sorted(r["i"] for r in records.iter_records(str(out))) == list(range(7))

    def failing():
        yield {"source": "s:0"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        records.write_shards(failing(), str(out), num_shards=2)
    # the previous data set is intact and no temporary directory is left behind
    assert len(records.RecordSource(records.shard_paths(str(out)))) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with pytest.raises(ValueError, match="no records"):
        records.write_shards(iter(()), str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        records.RecordSource([])
