"""Pseudo-annotation (umg_jax/labeling/pseudo_label.py): proposals, NMS by hand, a fake teacher
whose answer is known, output readable by the pipeline, resume, thresholds, bad input."""

import argparse
import os
import pathlib

import numpy as np
import pytest
from conftest import first_batch
from PIL import Image

from umg_jax import inference
from umg_jax.data import records, transforms
from umg_jax.labeling import pseudo_label as pl

VOCAB = ["red", "blue"]


def _scene(seed=0, h=48, w=48):
    """Blue background with a red square."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 2] = 200
    rng = np.random.default_rng(seed)
    y, x = rng.integers(4, 20, 2)
    img[y:y + 20, x:x + 20] = [220, 0, 0]
    return img


class FakeTeacher:
    """Dense features: each cell's embedding is e_red or e_blue by its dominant colour; the text
    of "red" is e_0 and of "blue" e_1. Images arrive 'preprocessed' as raw [S, S, 3] floats."""

    logit_scale = 50.0
    image_size = 32
    pixel_mean, pixel_std = inference.MEAN, inference.STD

    def preprocess(self, img):
        return np.asarray(Image.fromarray(img).resize((32, 32), Image.NEAREST), np.float32)

    def encode_image(self, x):
        cells = x.reshape(len(x), 4, 8, 4, 8, 3).mean((2, 4))  # [B, 4, 4, 3]
        red = (cells[..., 0] > cells[..., 2]).astype(np.float32)
        dense = np.stack([red, 1 - red], -1)
        return dense.mean((1, 2)), dense

    def encode_text_labels(self, labels, templates=()):
        return np.eye(2)[[VOCAB.index(x) for x in labels]]

    def tokenize(self, texts):
        return np.array([[1 if "red" in t else 0] for t in texts])

    def encode_text(self, toks):
        return np.eye(2)[1 - np.asarray(toks)[:, 0]]


def _args(**kw):
    a = dict(threshold=0.5, top_k=6, nms_iou=0.5, mask_iou=0.7, caption_threshold=0.2,
             min_area=0.01, batch=4, shard_size=3, teacher="fake", score="dense",
             caption_vocab=True)
    a.update(kw)
    return argparse.Namespace(**a)


def test_proposals_and_nms_by_hand():
    img = _scene()
    masks = pl.mask_proposals(img)
    assert len(masks) >= 2 and masks.dtype == bool
    assert any(pl.mask_iou(m, np.all(img == [220, 0, 0], -1)) > 0.9 for m in masks)
    wins = pl.window_proposals(48, 48)
    assert wins.min() >= 0 and wins[:, 2].max() <= 48 and len(wins) == 1 + 4 + 1 + 9 + 4
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30]], float)
    # IoU(box0, box1) = 81 / 119 = 0.68 > 0.5: box1 suppressed; box2 has another label
    keep = pl.nms(boxes, np.array([0.9, 0.8, 0.7, 0.6]), np.array([0, 0, 1, 0]), 0.5)
    assert keep.tolist() == [0, 2, 3]


@pytest.mark.parametrize("score,assign", [("dense", "proposal"), ("crop", "concept")])
def test_fake_teacher_labels_the_red_square(tmp_path, score, assign):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(5):
        Image.fromarray(_scene(i)).save(d / f"{i}.png")
    (d / "5.png").write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")  # reported and skipped
    items = pl.list_inputs(str(d))
    out = tmp_path / "out"
    counts = pl.run(items, pl.Scorer(FakeTeacher(), VOCAB), VOCAB, str(out),
                    _args(score=score, assign=assign), log=lambda s: None)
    assert counts["examples"] == 5 and counts["unreadable"] == 1
    assert len(records.shard_paths(str(out))) == 2
    for rec in records.iter_records(str(out)):
        truth = np.all(records.decode_image(rec["image"]) == [220, 0, 0], -1)
        red = [r for r in rec["regions"] if r["tags"] == ["red"]]
        assert red, rec["regions"]
        x0, y0, x1, y1 = red[0]["box"]
        ys, xs = np.nonzero(truth)
        assert abs(x0 - xs.min()) <= 6 and abs(y1 - ys.max() - 1) <= 6
        assert {"red", "blue"} <= set(rec["tags"]) and len(set(rec["tags"])) == len(rec["tags"])
        assert rec["captions"] and 0 < rec["confidence"] <= 1
        linked = [g for g in rec["segments"] if g["region"] >= 0]
        assert all(rec["regions"][g["region"]]["tags"] == g["tags"] for g in linked)
        transforms.decode(records.encode_record(rec), strict=True)  # valid record
    meta = records.read_meta(str(out))
    assert [c["name"] for c in meta["categories"]] == VOCAB and meta["num_examples"] == 5
    # the output feeds the training pipeline
    b = first_batch(out, 2, 2)
    assert b["region_valid"].sum() >= 2 and b["mask_valid"].sum() >= 2

    # resume: finished shards are not rewritten, a missing one is redone
    first = sorted(records.shard_paths(str(out)))
    mtime = os.path.getmtime(first[0])
    os.remove(first[1])
    counts = pl.run(items, pl.Scorer(FakeTeacher(), VOCAB), VOCAB, str(out),
                    _args(score=score, assign=assign), log=lambda s: None)
    assert counts["skipped_shards"] == 1 and counts["examples"] == 3 - 1  # the corrupt one
    assert os.path.getmtime(first[0]) == mtime and pathlib.Path(first[1]).exists()

    # a higher threshold never keeps more
    hi = pl.run(items, pl.Scorer(FakeTeacher(), VOCAB), VOCAB, str(tmp_path / "hi"),
                _args(threshold=0.999), log=lambda s: None)
    lo = pl.run(items, pl.Scorer(FakeTeacher(), VOCAB), VOCAB, str(tmp_path / "lo"),
                _args(threshold=0.3), log=lambda s: None)
    assert hi["regions"] <= lo["regions"] and hi["masks"] <= lo["masks"]


def test_captions_from_shards_are_filtered(tmp_path):
    img = _scene(3)
    recs = [{"source": "s:0", "image": records.encode_image(img), "height": 48, "width": 48,
             "captions": ["a red square", "blue only"], "tags": [], "regions": [],
             "segments": []}]
    src = tmp_path / "src"
    records.write_shards(recs, str(src))
    out = tmp_path / "out"
    pl.run(pl.list_inputs(str(src)), pl.Scorer(FakeTeacher(), VOCAB), VOCAB, str(out),
           _args(caption_threshold=0.5), log=lambda s: None)
    (rec,) = records.iter_records(str(out))
    # image embedding leans blue (most cells): only the "blue" caption survives
    assert rec["captions"] == ["blue only"] and rec["source"] == "s:0"


def test_cli_bad_input(tmp_path, capsys):
    vocab = tmp_path / "v.txt"
    vocab.write_text("\n\n")
    assert pl.main(["--images", str(tmp_path), "--teacher", str(tmp_path), "--vocab",
                    str(vocab), "--out", str(tmp_path / "o")]) == 2
    vocab.write_text("red\n")
    assert pl.main(["--images", str(tmp_path / "none"), "--teacher", str(tmp_path), "--vocab",
                    str(vocab), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "imgs").mkdir()
    Image.fromarray(_scene()).save(tmp_path / "imgs" / "a.png")
    assert pl.main(["--images", str(tmp_path / "imgs"), "--teacher", str(tmp_path / "nope"),
                    "--vocab", str(vocab), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and "does not exist" in err and "--teacher" in err


def test_template_caption():
    assert pl.template_caption(["apple", "b", "c"]) == "a photo of an apple, a b and a c."
    assert pl.template_caption([]) == "a photo."


def test_caption_candidates_and_restrict():
    vocab = ["circle", "cross", "star", "traffic light"]
    got = pl.caption_candidates(["two red circles and a cross.", "crosses at a traffic light"],
                                vocab)
    assert got.tolist() == [True, True, False, True]
    assert pl.caption_candidates(["a photo."], vocab) is None
    assert pl.caption_candidates([], vocab) is None
    assert pl.caption_candidates(["starfish"], vocab) is None  # whole words only
    p = np.array([[0.5, 0.2, 0.3, 0.0]])
    r = pl.restrict(p, np.array([False, True, True, False]))
    np.testing.assert_allclose(r, [[0.0, 0.4, 0.6, 0.0]])


def test_crop_scoring_labels_the_red_square():
    img = _scene(3)
    red = np.all(img == [220, 0, 0], -1)
    blue = ~red
    box = np.array([pl.mask_box(red), [0, 0, 48, 48]], np.float32)
    scorer = pl.Scorer(FakeTeacher(), VOCAB)
    (bp, mp), = scorer.score_crops([img], [box], [np.stack([red, blue])])
    assert bp.shape == (2, 2) and mp.shape == (2, 2)
    assert bp[0].argmax() == 0 and mp[0].argmax() == 0  # the red square's crop is "red"
    assert mp[1].argmax() == 1  # the background mask (red blanked to the mean) is "blue"


def test_concepts_pick_their_proposals_even_under_a_dominant_background():
    # classes: sky, circle, star. Every proposal's argmax is "sky"; the circle is proposal 0.
    probs = np.array([[0.70, 0.28, 0.02], [0.90, 0.05, 0.05], [0.95, 0.03, 0.02]])
    label, score = pl.assign_concepts(probs, np.array([True, True, False]))
    assert label.tolist() == [1, 0, 0]
    np.testing.assert_allclose(score, [1.0, 0.90 / 0.95, 1.0])
    # "star" is not a concept of this image: it picks nothing even where it is relatively best
    label, _ = pl.assign_concepts(probs, np.array([True, False, False]))
    assert label.tolist() == [0, 0, 0]
    assert pl.assign_concepts(np.zeros((0, 3)), None)[0].shape == (0,)


def test_output_on_a_bucket_equals_local(tmp_path, gcs_bucket, capsys):
    """``--out gs://...`` (a real GCS emulator): the same shard bytes and meta.json as a local
    run, finished shards skipped on a rerun; a bucket that does not exist is one line, exit 2."""
    from umg_jax import storage

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.fromarray(_scene(i)).save(d / f"{i}.png")
    items = pl.list_inputs(str(d))

    def label(out):
        return pl.run(items, pl.Scorer(FakeTeacher(), VOCAB), VOCAB, out, _args(),
                      log=lambda s: None)

    label(str(tmp_path / "local"))
    remote = f"{gcs_bucket}/pseudo"
    label(remote)
    local = sorted(records.shard_paths(str(tmp_path / "local")))
    shards = sorted(records.shard_paths(remote))
    assert [os.path.basename(p) for p in shards] == [os.path.basename(p) for p in local]
    for r, lp in zip(shards, local, strict=True):
        assert storage.read_bytes(r) == pathlib.Path(lp).read_bytes()
    assert records.read_meta(remote) == records.read_meta(str(tmp_path / "local"))
    assert label(remote)["skipped_shards"] == len(shards)

    vocab = tmp_path / "v.txt"
    vocab.write_text("red\n")
    assert pl.main(["--images", str(d), "--teacher", str(tmp_path), "--vocab", str(vocab),
                    "--out", "gs://no-such-bucket-umg/pl"]) == 2
    assert "no-such-bucket-umg" in capsys.readouterr().err
