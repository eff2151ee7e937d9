"""Dataset builders (umg_jax/data/build.py + sources/): small fixtures written here in the real
COCO / Visual Genome / per-image JSON formats, masks checked against pycocotools' own decoding,
every bad-input kind reported, the output read back by the Grain pipeline."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from umg_jax.data import build, pipeline, records

H, W = 40, 48


def _png(path, seed, h=H, w=W):
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)


def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    d = tmp_path_factory.mktemp("coco")
    (d / "img").mkdir()
    _png(d / "img/1.png", 1)
    _png(d / "img/2.png", 2)
    (d / "img/4.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2, 3, 4)]
    cats = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    dog = np.zeros((H, W), np.uint8)
    dog[20:35, 5:25] = 1
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 2, 20, 15],
         "segmentation": [[10, 2, 30, 2, 30, 17, 10, 17]], "area": 300},
        {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0, "bbox": [5, 20, 20, 15],
         "segmentation": _rle(dog), "area": 300},
        {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 1, "bbox": [0, 0, 5, 5],
         "segmentation": _rle(np.ones((H, W))), "area": 25},
        {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [40, 30, 20, 20],
         "segmentation": [[40, 30, 60, 30, 60, 50]], "area": 200},  # box outside
        {"id": 14, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 5, 5],
         "segmentation": [[1, 1, 6, 6]], "area": 10},  # polygon with 2 points
        {"id": 15, "image_id": 99, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 5, 5],
         "segmentation": [[1, 1, 6, 1, 6, 6]], "area": 10},  # unknown image
    ]
    inst = {"images": images, "annotations": anns, "categories": cats}
    (d / "instances.json").write_text(json.dumps(inst))
    caps = {"images": images, "annotations": [
        {"id": 1, "image_id": 1, "caption": "A cat  above a dog."},
        {"id": 2, "image_id": 1, "caption": "two animals"},
        {"id": 3, "image_id": 2, "caption": "   "}]}
    (d / "captions.json").write_text(json.dumps(caps))
    # panoptic: image 1 with a cat (id 5), a dog (id 7) and grass stuff (id 9); image 2's PNG is
    # the wrong size
    (d / "pan").mkdir()
    ids = np.full((H, W), 9, np.int64)
    ids[2:17, 10:30] = 5
    ids[20:35, 5:25] = 7
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(d / "pan/1.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(d / "pan/2.png")
    pcats = [{"id": 1, "name": "cat", "isthing": 1}, {"id": 3, "name": "dog", "isthing": 1},
             {"id": 100, "name": "grass", "isthing": 0}]
    pan = {"images": images, "categories": pcats, "annotations": [
        {"image_id": 1, "file_name": "1.png", "segments_info": [
            {"id": 5, "category_id": 1, "bbox": [10, 2, 20, 15], "iscrowd": 0},
            {"id": 7, "category_id": 3, "bbox": [5, 20, 20, 15], "iscrowd": 0},
            {"id": 9, "category_id": 100, "bbox": [0, 0, W, H], "iscrowd": 0}]},
        {"image_id": 2, "file_name": "2.png", "segments_info": []}]}
    (d / "panoptic.json").write_text(json.dumps(pan))
    return d


def _run(*argv):
    return build.main([str(a) for a in argv])


def test_coco_instances_and_captions(coco, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run("coco", "--images", coco / "img", "--captions", coco / "captions.json",
                "--instances", coco / "instances.json", "--out", out, "--num_shards", 2) == 0
    recs = {r["source"].rsplit(":", 1)[1]: r for r in records.iter_records(str(out))}
    assert sorted(recs) == ["1", "2"]
    r1 = recs["1"]
    assert r1["captions"] == ["A cat above a dog.", "two animals"]
    assert [x["tags"] for x in r1["regions"]] == [["cat"], ["dog"]]
    assert r1["regions"][0]["box"] == [10, 2, 30, 17]
    ref = COCO(str(coco / "instances.json"))
    for seg, ann_id in zip(r1["segments"], (10, 11), strict=True):
        np.testing.assert_array_equal(records.rle_to_mask(seg["rle"]),
                                      ref.annToMask(ref.anns[ann_id]))
    assert recs["2"]["captions"] == [] and recs["2"]["regions"] == []
    report = json.loads((out / "build_report.json").read_text())
    assert report["dropped_by_kind"] == {"bad_box": 1, "bad_mask": 1, "bad_text": 1,
                                         "corrupt_image": 1, "missing_image": 1,
                                         "unknown_image": 1}
    assert {"source": "coco/3.png:3", "kind": "missing_image",
            "detail": "image file not found"} in report["dropped"]
    meta = records.read_meta(str(out))
    assert [c["name"] for c in meta["categories"]] == ["cat", "dog"]
    assert "wrote 2 examples, 2 regions, 2 masks" in capsys.readouterr().out


def test_coco_panoptic_segments_and_pipeline(coco, tmp_path):
    out = tmp_path / "out"
    assert _run("coco", "--images", coco / "img", "--panoptic", coco / "panoptic.json",
                "--panoptic_dir", coco / "pan", "--out", out) == 0
    recs = list(records.iter_records(str(out)))
    assert len(recs) == 1  # image 2: PNG size mismatch, 3 missing, 4 corrupt
    segs = recs[0]["segments"]
    assert [(s["tags"], s["isthing"]) for s in segs] == [(["cat"], True), (["dog"], True),
                                                       (["grass"], False)]
    grass = records.rle_to_mask(segs[2]["rle"])
    assert grass.sum() == H * W - 15 * 20 - 15 * 20
    assert [r["category"] for r in recs[0]["regions"]] == [0, 1]  # things -> regions
    report = json.loads((out / "build_report.json").read_text())
    assert report["dropped_by_kind"]["size_mismatch"] == 1
    # the pipeline reads the built data set
    import ml_collections as mlc

    from umg_jax.configs import common

    d = common.data_config()
    m = mlc.ConfigDict({"vision": {"image_size": 32, "patch_size": 8},
                        "text": {"context_length": 16}})
    it = pipeline.make_iterator(d, m, batch_size=1, train=False, seed=0, path=str(out),
                                process_index=0, process_count=1)
    b = next(it)
    assert b["mask_valid"][0].sum() == 3 and b["region_valid"][0].sum() == 2


def test_strict_stops_with_one_line(coco, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run("coco", "--images", coco / "img", "--instances", coco / "instances.json",
                "--out", out, "--strict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: coco:ann15: unknown_image")
    assert not out.exists()


def test_vg_and_perimage(tmp_path):
    (tmp_path / "vg").mkdir()
    _png(tmp_path / "vg/7.jpg", 7)
    regions = [{"id": 7, "regions": [
        {"region_id": 1, "x": 2, "y": 3, "width": 10, "height": 8, "phrase": "a red ball"},
        {"region_id": 2, "x": 2, "y": 3, "width": 10, "height": 8, "phrase": ""},
        {"region_id": 3, "x": 40, "y": 3, "width": 30, "height": 8, "phrase": "far away"}]},
        {"id": 8, "regions": []}]
    (tmp_path / "regions.json").write_text(json.dumps(regions))
    out = tmp_path / "vg_out"
    assert _run("vg", "--images", tmp_path / "vg", "--regions", tmp_path / "regions.json",
                "--out", out) == 0
    (r,) = records.iter_records(str(out))
    assert r["regions"] == [{"box": [2, 3, 12, 11], "caption": "a red ball", "tags": [],
                             "category": -1}]
    kinds = json.loads((out / "build_report.json").read_text())["dropped_by_kind"]
    assert kinds == {"bad_text": 1, "bad_box": 1, "missing_image": 1}

    # per-image JSON, as a folder and as a tar shard
    src = tmp_path / "pi"
    (src / "a").mkdir(parents=True)
    _png(src / "a/x.png", 3)
    mask = np.zeros((H, W), np.uint8)
    mask[5:15, 5:20] = 1
    (src / "a/x.json").write_text(json.dumps({
        "caption": "a thing", "tags": ["thing"],
        "regions": [{"bbox": [5, 5, 15, 10], "caption": "the thing", "tags": ["thing"]}],
        "segments": [{"rle": _rle(mask), "tags": ["thing"], "region": 0},
                     {"polygon": [[0, 0, 1, 1]], "tags": ["x"]}],
        "confidence": 0.7}))
    _png(src / "a/y.png", 4)  # no JSON beside it
    out = tmp_path / "pi_out"
    assert _run("perimage", "--src", src, "--out", out) == 0
    (r,) = records.iter_records(str(out))
    assert r["captions"] == ["a thing"] and r["confidence"] == 0.7
    assert r["regions"][0]["box"] == [5, 5, 20, 15]
    np.testing.assert_array_equal(records.rle_to_mask(r["segments"][0]["rle"]), mask)
    kinds = json.loads((out / "build_report.json").read_text())["dropped_by_kind"]
    assert kinds == {"bad_mask": 1, "missing_json": 1}
    tar = tmp_path / "shard.tar"
    with tarfile.open(tar, "w") as tf:
        for name in ("a/x.png", "a/x.json"):
            data = (src / name).read_bytes()
            info = tarfile.TarInfo(name.split("/")[1])
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out2 = tmp_path / "tar_out"
    assert _run("perimage", "--src", tar, "--out", out2) == 0
    (r2,) = records.iter_records(str(out2))
    assert r2["regions"] == r["regions"] and r2["segments"] == r["segments"]


def test_cutout_composites_masks_equal_pasted_alpha(tmp_path):
    """Composites of RGBA cut-outs: each segment equals the visible, thresholded alpha of its
    cut-out, recomputed here independently by pasting in the same order."""
    from umg_jax.data.sources import cutouts

    stamps = tmp_path / "stamps" / "animals"
    stamps.mkdir(parents=True)
    yy, xx = np.mgrid[0:40, 0:40]
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 < 18 ** 2)
    for name, colour in (("lion", (200, 150, 40)), ("frog", (40, 200, 60))):
        rgba = np.zeros((40, 40, 4), np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = np.where(disc, 255, 0)
        Image.fromarray(rgba).save(stamps / f"{name}.png")
        (stamps / f"{name}.txt").write_text(f"A {name}.\nfr.utf8=Un {name}.\n")
    Image.fromarray(np.zeros((40, 40, 4), np.uint8)).save(stamps / "empty.png")  # no caption
    out = tmp_path / "out"
    assert _run("cutouts", "--stamps", tmp_path / "stamps", "--num", 6, "--size", 64,
                "--out", out) == 0
    report = _dropped_kinds(out)
    assert report == {"missing_caption": 1}
    recs = list(records.iter_records(str(out)))
    assert len(recs) == 6
    meta = records.read_meta(str(out))
    assert [c["name"] for c in meta["categories"]] == ["frog", "lion"]
    stamp_list = cutouts.load_stamps(str(tmp_path / "stamps"), cutouts.Report())
    for i, rec in enumerate(recs):
        # independent re-composition: paste solid alpha in order, later covers earlier
        rng = np.random.default_rng([0, i])
        cutouts._background(rng, 64, [])
        owner = np.full((64, 64), -1)
        for k in range(int(rng.integers(1, 4))):
            st = stamp_list[int(rng.integers(len(stamp_list)))]
            side = rng.uniform(0.25, 0.6) * 64
            w = h = max(4, int(40 * side / 40))
            a = np.asarray(Image.fromarray(st["rgba"]).resize((w, h), Image.BILINEAR))[..., 3]
            x, y = int(rng.integers(0, 64 - w + 1)), int(rng.integers(0, 64 - h + 1))
            owner[y:y + h, x:x + w][a > 127] = k
        visible = [owner == k for k in range(owner.max() + 1) if (owner == k).sum() >= 16]
        assert len(visible) == len(rec["segments"])
        for m, seg in zip(visible, rec["segments"], strict=True):
            np.testing.assert_array_equal(records.rle_to_mask(seg["rle"]), m)
            assert seg["caption"] in ("A lion.", "A frog.") and seg["tags"][0] == "animals"
        assert rec["captions"][0].startswith("a photo of a ")


def _dropped_kinds(out):
    return json.loads((out / "build_report.json").read_text())["dropped_by_kind"]


def test_tfds_source_with_a_tiny_builder(tmp_path):
    """A TFDS builder defined here (uint8 Tensor image: preparing Image features needs TF),
    prepared in array_record format, read back through the spec."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyUmg(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(20, 30, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "objects": tfds.features.Sequence({
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(names=["cat", "dog"])}),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                yield i, {"image": np.full((20, 30, 3), 40 * i, np.uint8),
                          "caption": f"picture {i}",
                          "objects": {"bbox": np.array([[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1]],
                                                       np.float32), "label": [i % 2, 1]}}

    b = TinyUmg(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    b.download_and_prepare()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"image": "image", "captions": "caption", "boxes": "objects/bbox",
                                "box_labels": "objects/label"}))
    out = tmp_path / "out"
    assert _run("tfds", "--dir", b.data_dir, "--spec", spec, "--out", out) == 0
    recs = sorted(records.iter_records(str(out)), key=lambda r: r["source"])
    assert [r["captions"] for r in recs] == [["picture 0"], ["picture 1"], ["picture 2"]]
    # yxyx normalised (0.1, 0.2, 0.5, 0.6) on a 30 x 20 image -> x 6..18, y 2..10
    np.testing.assert_allclose(recs[1]["regions"][0]["box"], [6, 2, 18, 10], atol=1e-4)
    assert [r["tags"] for r in recs[1]["regions"]] == [["dog"], ["dog"]]
    assert records.decode_image(recs[2]["image"])[0, 0].tolist() == [80, 80, 80]
    assert [c["name"] for c in records.read_meta(str(out))["categories"]] == ["cat", "dog"]


def test_non_utf8_text_is_dropped(tmp_path):
    src = tmp_path / "pi"
    src.mkdir()
    _png(src / "a.png", 1)
    (src / "a.json").write_bytes(b'{"caption": "caf\xe9"}')  # latin-1, not UTF-8
    _png(src / "b.png", 2)
    (src / "b.json").write_text(json.dumps({"caption": "fine", "regions": [
        {"box": [1, 1, 5, 5], "caption": "\ufffd broken", "tags": []}]}))
    out = tmp_path / "out"
    assert _run("perimage", "--src", src, "--out", out) == 0
    (rec,) = records.iter_records(str(out))
    assert rec["captions"] == ["fine"] and rec["regions"] == []  # no caption, no tags: dropped
    assert _dropped_kinds(out) == {"bad_json": 1, "bad_text": 1}
