"""The held-out synthetic world in the benchmarks' file layouts: the files hold exactly the
generator's annotations, and the suite they come with runs end to end through the CLI."""

import json

import numpy as np
from conftest import make_tiny_workdir
from PIL import Image

from umg_jax.data import records, synthetic
from umg_jax.downstream import cli, synthetic_layouts

NUM = 3


def test_layouts_hold_the_generators_annotations(tmp_path):
    suite = synthetic_layouts.write(tmp_path, NUM)
    names = [c["name"] for c in synthetic.CATEGORIES]
    pan = json.loads((tmp_path / "coco_panoptic/annotations/panoptic_val2017.json").read_text())
    crops = 0
    for i in range(NUM):
        rec = synthetic.generate_record(i, split="eval")
        crops += len(rec["regions"])
        for k, r in enumerate(rec["regions"]):
            crop = Image.open(tmp_path / "folder/val" / names[r["category"]] / f"{i:05d}_{k}.png")
            x0, y0, x1, y1 = r["box"]
            assert crop.size == (x1 - x0, y1 - y0)
        label = np.asarray(Image.open(tmp_path / f"folder_seg/val/labels/{i:05d}.png"))
        ids = np.asarray(Image.open(
            tmp_path / f"coco_panoptic/annotations/panoptic_val2017/{i:05d}.png"), np.int64)
        ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
        covered = np.zeros(label.shape, bool)
        info = {s["id"]: s for s in pan["annotations"][i]["segments_info"]}
        for s in rec["segments"]:
            m = records.rle_to_mask(s["rle"]).astype(bool)
            assert (label[m] == s["category"]).all()
            (sid,) = np.unique(ids[m])
            assert info[int(sid)]["category_id"] == s["category"]
            assert info[int(sid)]["area"] == m.sum()
            covered |= m
        assert (label[~covered] == 255).all() and (ids[~covered] == 0).all()
    assert crops == sum(1 for _ in (tmp_path / "folder/val").rglob("*.png"))
    thing = {c["name"]: c["isthing"] for c in pan["categories"]}
    assert thing == {c["name"]: int(c["isthing"]) for c in synthetic.CATEGORIES}
    assert [e["task"] for e in json.loads(suite.read_text())] == [
        "folder", "folder_seg", "coco_panoptic"]


def test_suite_runs_on_a_trained_layout(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    make_tiny_workdir(wd)
    suite = synthetic_layouts.write(tmp_path / "bench", NUM)
    assert cli.main(["--workdir", str(wd), "--suite", str(suite)]) == 0
    out = wd / "benchmark" / "7"
    table = (out / "table.md").read_text().splitlines()
    assert table[0].split("|")[3:6] == [" folder top1 ", " folder_seg miou ",
                                        " coco_panoptic pq "]
    crops = sum(len(synthetic.generate_record(i, split="eval")["regions"]) for i in range(NUM))
    assert json.loads((out / "folder.json").read_text())["num_examples"] == crops
    for task in ("folder_seg", "coco_panoptic"):
        assert json.loads((out / f"{task}.json").read_text())["num_examples"] == NUM
