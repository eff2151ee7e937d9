"""The embedded synthetic world (umg_jax/data/synthetic.py): determinism, label consistency
checked with pycocotools, the CLI, and the property that makes region labels non-trivial."""

import json

import numpy as np
from pycocotools import mask as mask_utils

from umg_jax.data import records, synthetic

N = 40


def _recs(split="train", seed=0, n=N):
    return list(synthetic.generate(n, split=split, seed=seed))


def test_deterministic_and_splits_disjoint():
    a, b = _recs(n=5), _recs(n=5)
    assert [records.encode_record(r) for r in a] == [records.encode_record(r) for r in b]
    ev = _recs("eval", n=5)
    assert all(x["image"] != y["image"] for x, y in zip(a, ev, strict=True))
    assert _recs(seed=1, n=1)[0]["image"] != a[0]["image"]


def test_labels_are_consistent():
    names = [c["name"] for c in synthetic.CATEGORIES]
    for rec in _recs():
        h, w = rec["height"], rec["width"]
        img = records.decode_image(rec["image"])
        assert img.shape == (h, w, 3)
        masks = [records.rle_to_mask(s["rle"]) for s in rec["segments"]]
        stack = np.stack(masks)
        assert stack.sum(0).max() <= 1, "segments overlap"
        assert stack.sum() >= 0.9 * h * w, "most pixels are labelled"
        for s in rec["segments"]:
            assert names[s["category"]] in s["tags"]
            assert synthetic.CATEGORIES[s["category"]]["isthing"] == s["isthing"]
            if s["isthing"]:
                r = rec["regions"][s["region"]]
                # box of the region = bbox of its visible mask (pycocotools' toBbox: x, y, w, h)
                x, y, bw, bh = mask_utils.toBbox({"size": s["rle"]["size"],
                                                  "counts": s["rle"]["counts"].encode()})
                np.testing.assert_allclose(r["box"], [x, y, x + bw, y + bh])
                assert r["caption"] == s["caption"] and names[r["category"]] in r["caption"]
        for shape in {names[r["category"]] for r in rec["regions"]}:
            assert shape in rec["captions"][0]
            assert shape in rec["tags"]


def test_region_labels_need_localisation():
    """Most multi-object scenes hold >= 2 different shapes: the image-level content does not
    tell which box holds which shape."""
    recs = _recs(n=200)
    multi = [r for r in recs if len(r["regions"]) >= 2]
    mixed = [r for r in multi if len({x["category"] for x in r["regions"]}) >= 2]
    assert len(multi) >= 0.5 * len(recs) and len(mixed) >= 0.7 * len(multi)
    cats = np.bincount([x["category"] for r in recs for x in r["regions"]],
                       minlength=len(synthetic.SHAPES))
    assert cats.min() > 0.08 * cats.sum()  # every shape is well represented


def test_cli_writes_shards_meta_and_preview(tmp_path):
    out, png = tmp_path / "w", tmp_path / "p.png"
    assert synthetic.main(["--out", str(out), "--num", "6", "--num_shards", "2",
                           "--preview", str(png)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_examples"] == 6 and meta["categories"] == synthetic.CATEGORIES
    assert len(records.shard_paths(str(out))) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert synthetic.main(["--out", str(out), "--num", "0"]) == 2
