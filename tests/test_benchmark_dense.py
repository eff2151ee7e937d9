"""Dense benchmark tasks (umg_jax/downstream/{sliding,semantic,panoptic}.py) on tiny fixture trees
in each data set's real layout.

A fake backbone whose dense embedding at a pixel decreases with the distance of that pixel's
colour to each colour of a 4-colour palette (patch size 1: translation-equivariant, window-size
independent) makes every prediction known: the label map is the image's colour map. The
fixtures' labels differ from it in hand-chosen places, so mIoU / pixel accuracy / PQ are counted
by hand here and checked against torchmetrics. The real tiny model runs once per path (sliding,
resized position embeddings, segmentation head) to check the plumbing.
"""

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from conftest import make_tiny_workdir
from PIL import Image

from umg_jax import inference
from umg_jax.downstream import common, panoptic, semantic, sliding
from umg_jax.downstream.common import BenchmarkInputError, BenchModel, Options
from umg_jax.evaluators import metrics

ROOT = pathlib.Path(__file__).parents[1]
PALETTE = np.array([[230, 30, 30], [30, 200, 30], [30, 30, 230], [230, 230, 30]], np.uint8)
H, W = 32, 40


# ----------------------------------------------------------------------------- fake model ---
class _FakeModel:
    """``apply`` -> dense ``[B, h/p, w/p, 4]`` = 1 / (1 + squared distance) of each patch's mean
    colour (normalised space) to each palette colour."""

    def __init__(self, patch: int):
        self.patch = patch
        self.palette = (PALETTE / 255.0 - inference.MEAN) / inference.STD

    def apply(self, variables, x, method=None):
        b, h, w, _ = x.shape
        p = self.patch
        cells = x.reshape(b, h // p, p, w // p, p, 3).mean((2, 4))
        dist = ((cells[..., None, :] - jnp.asarray(self.palette, x.dtype)) ** 2).sum(-1)
        dense = 1 / (1 + dist)  # positive: beats the zero text embedding of unknown names
        return {"img": dense.mean((1, 2)), "dense": dense}


class _FakeBackbone:
    """The :class:`umg_jax.inference.UMGModel` surface the dense tasks use; ``vocab`` maps a
    class name to its palette colour (other names get a zero text embedding)."""

    def __init__(self, patch: int = 1, size: int = 32):
        self.model = _FakeModel(patch)
        self.params = {"logit_scale": np.float32(np.log(10.0))}
        self.config = mlc.ConfigDict({"vision": {"patch_size": patch}, "logit_scale_max": 100.0,
                                      "embed_dim": len(PALETTE)})
        self.image_size = size
        self.pixel_mean, self.pixel_std = inference.MEAN, inference.STD
        self.vocab: dict[str, int] = {}

    def encode_text_labels(self, labels, templates=()):
        eye = np.eye(len(PALETTE), dtype=np.float32)
        return np.stack([eye[self.vocab[n]] if n in self.vocab else np.zeros(len(PALETTE),
                                                                              np.float32)
                         for n in labels])


@pytest.fixture(scope="module")
def fake():
    return _FakeBackbone()


def _opts(data, **kw):
    # short side = the images' own: no resizing, so the label map is exactly the colour map
    return Options(data=pathlib.Path(data), short_side=kw.pop("short_side", H), batch_size=4,
                   workers=2, **kw)


# ------------------------------------------------------------------------- sliding window ---
def test_window_starts_cover_and_end_flush():
    assert sliding.window_starts(32, 32, 21) == [0]
    assert sliding.window_starts(64, 32, 21) == [0, 21, 32]
    assert sliding.window_starts(74, 32, 21) == [0, 21, 42]
    for n in (32, 33, 50, 97):
        s = sliding.window_starts(n, 32, 21)
        assert s[0] == 0 and s[-1] == n - 32
        assert all(b - a <= 21 for a, b in zip(s, s[1:], strict=False))
    assert sliding.resized_size((480, 640), 448) == (448, 597)
    assert sliding.resized_size((500, 300), 64) == (107, 64)


def test_sliding_window_equals_full_image_on_an_equivariant_model(fake):
    """Per-pixel logits that depend only on the pixel: every window sees the same logits at a
    pixel, so their average is the whole-image map (odd stride, ragged sizes, 3 images sharing
    batches)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, s + (3,), dtype=np.uint8)
              for s in ((45, 70), (33, 32), (50, 41))]
    text = np.eye(4, dtype=np.float32)[[2, 0, 3, 1, 0]]  # 5 "classes", two alike
    for stride in (2 / 3, 0.3):
        for img in images:
            opts = Options(data=pathlib.Path("."), short_side=min(img.shape[:2]), batch_size=3,
                           window_stride=stride)
            got = next(iter(sliding.sliding_logits(fake, [img], text, opts, 10.0)))
            x = sliding.prepare(img, img.shape[:2], fake)
            dense = np.array(fake.model.apply(None, jnp.asarray(x[None]))["dense"][0])
            dense /= np.linalg.norm(dense, axis=-1, keepdims=True)
            np.testing.assert_allclose(got, 10.0 * dense @ text.T, rtol=1e-5, atol=1e-5)
        # all three in one stream: batches mix windows of different images
        opts = Options(data=pathlib.Path("."), short_side=32, batch_size=3,
                       window_stride=stride)
        labels = list(sliding.sliding_labels(fake, images, text, opts, 10.0))
        assert [lab.shape for lab in labels] == [im.shape[:2] for im in images]


@pytest.mark.parametrize("patch", [1, 2])
def test_sliding_dense_map_equals_whole_image_on_an_equivariant_model(patch):
    """The stitched dense map (for box pooling): windows on whole-patch offsets, so each cell
    of every window is the whole image's cell; sides are rounded to whole patches."""
    fake = _FakeBackbone(patch=patch, size=16)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in ((22, 37), (16, 16))]
    opts = Options(data=pathlib.Path("."), short_side=16, batch_size=3, window_stride=0.4)
    got = list(sliding.sliding_dense(fake, images, opts))
    for img, d in zip(images, got, strict=True):
        size = sliding.patch_size_of(img.shape[:2], 16, patch, 16)
        assert d.shape == (size[0] // patch, size[1] // patch, 4)
        x = sliding.prepare(img, size, fake)
        want = np.array(fake.model.apply(None, jnp.asarray(x[None]))["dense"][0])
        want /= np.linalg.norm(want, axis=-1, keepdims=True)
        np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-6)


def test_logit_resize_is_torch_bilinear(torch_mod):
    """The final logit resize equals PyTorch's bilinear ``align_corners=False`` (mmseg's)."""
    import torch.nn.functional as F

    x = np.random.default_rng(2).normal(size=(7, 9, 5)).astype(np.float32)
    for size in ((7, 9), (16, 11), (4, 5), (13, 3)):
        ref = F.interpolate(torch_mod.as_tensor(x).permute(2, 0, 1)[None], size=size,
                            mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(sliding.resize_bilinear(x, size), ref, rtol=1e-5, atol=1e-6)


def test_resize_pos_embedding_square_rectangular_and_identity():
    """The square case is what the import resizes (checked against torch's bicubic in
    test_interop); a rectangle keeps the class row; the same grid is the identity."""
    from umg_jax.models import pos_embed

    pos = np.random.default_rng(1).normal(size=(1 + 4 * 4, 8)).astype(np.float32)
    rect = pos_embed.resize(pos, (5, 7), 1)
    assert rect.shape == (1 + 35, 8) and rect.dtype == np.float32
    np.testing.assert_array_equal(rect[0], pos[0])
    np.testing.assert_allclose(pos_embed.resize(pos, (4, 4), 1), pos, atol=1e-6)
    # separable: a 5x7 resize is the 5x5 resize's rows combined with the 7x7 resize's columns
    sq5, sq7 = pos_embed.resize(pos, (5, 5), 1), pos_embed.resize(pos, (7, 7), 1)
    g = pos[1:].reshape(4, 4, 8).astype(np.float64)
    mh, mw = pos_embed.cubic_matrix(4, 5), pos_embed.cubic_matrix(4, 7)
    np.testing.assert_allclose(rect[1:].reshape(5, 7, 8), np.einsum("ij,jkd,lk->ild", mh, g, mw),
                               rtol=1e-5, atol=1e-6)
    assert sq5.shape == (26, 8) and sq7.shape == (50, 8)
    with pytest.raises(ValueError, match="square"):
        pos_embed.resize(pos[:-1], (5, 5), 1)


# ---------------------------------------------------------------------------- fixtures ---
def _colour_map() -> np.ndarray:
    """``[H, W]`` palette index painted in the image (= the fake model's prediction)."""
    m = np.zeros((H, W), np.int64)
    m[:, 20:] = 1
    m[8:16, 4:12] = 2
    return m


def _semantic_gt() -> np.ndarray:
    """Ground truth: the colour map, except rows 0-3 of the right half are class 3 (predicted
    1) and rows 28-31 are ignored (-1)."""
    g = _colour_map()
    g[:4, 20:] = 3
    g[28:] = -1
    return g


# Hand count over the 1,120 labelled pixels: (gt 0, pred 0) 496, (2, 2) 64, (1, 1) 480,
# (3, 1) 80. IoU: 1, 480 / 560, 1, 0 -> mIoU 5/7; pixel accuracy 1040 / 1120 = 13/14.
MIOU, PIXEL_ACC = 100 * 5 / 7, 100 * 13 / 14


def _image(colour_map: np.ndarray) -> np.ndarray:
    return PALETTE[colour_map]


def _save(path: pathlib.Path, arr: np.ndarray, mode: str | None = None, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode)
    if palette is not None:
        im.putpalette(palette)
    if path.suffix == ".jpg":
        im.save(path, quality=98)
    else:
        im.save(path)


def _encode(gt: np.ndarray, offset: int, ignore: int) -> np.ndarray:
    return np.where(gt < 0, ignore, gt + offset)


def _pairs():
    """Two examples: the map and its mirror image (same confusion matrix)."""
    return [(_colour_map(), _semantic_gt()), (_colour_map()[:, ::-1], _semantic_gt()[:, ::-1])]


def write_ade(root: pathlib.Path) -> pathlib.Path:
    base = root / "ADEChallengeData2016"
    for i, (cm, gt) in enumerate(_pairs()):
        stem = f"ADE_val_{i + 1:08d}"
        _save(base / "images/validation" / f"{stem}.jpg", _image(cm))
        _save(base / "annotations/validation" / f"{stem}.png", _encode(gt, 1, 0), "L")
    return root


def write_voc(root: pathlib.Path) -> pathlib.Path:
    base = root / "VOCdevkit/VOC2012"
    pal = [0, 0, 0] + [v for i in range(1, 256) for v in (i, 255 - i, (7 * i) % 256)]
    ids = []
    for i, (cm, gt) in enumerate(_pairs()):
        ids.append(f"2007_{i:06d}")
        lab = _encode(gt, 1, 255)
        lab[30:] = 0  # background: excluded like the 255 boundary
        _save(base / "JPEGImages" / f"{ids[-1]}.jpg", _image(cm))
        _save(base / "SegmentationClass" / f"{ids[-1]}.png", lab, "P", pal)
    (base / "ImageSets/Segmentation").mkdir(parents=True)
    (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return root


def write_context(root: pathlib.Path) -> pathlib.Path:
    base = root / "VOCdevkit/VOC2010"
    ids = []
    for i, (cm, gt) in enumerate(_pairs()):
        ids.append(f"2008_{i:06d}")
        _save(base / "JPEGImages" / f"{ids[-1]}.jpg", _image(cm))
        _save(base / "SegmentationClassContext" / f"{ids[-1]}.png", _encode(gt, 1, 0), "L")
    (base / "ImageSets/SegmentationContext").mkdir(parents=True)
    (base / "ImageSets/SegmentationContext/val.txt").write_text("\n".join(ids) + "\n")
    return root


def write_folder(root: pathlib.Path) -> pathlib.Path:
    for i, (cm, gt) in enumerate(_pairs()):
        _save(root / "images" / f"im{i}.png", _image(cm))
        _save(root / "labels" / f"im{i}.png", _encode(gt, 0, 255), "L")
    (root / "classes.txt").write_text("# folder_seg classes\nred\ngreen\nblue\nyellow\n")
    return root


SEMANTIC = {  # task -> (fixture writer, class names painted in palette order)
    "ade150": (write_ade, ("wall", "building", "sky", "floor")),
    "voc20": (write_voc, ("aeroplane", "bicycle", "bird", "boat")),
    "context59": (write_context, ("aeroplane", "bag", "bed", "bedclothes")),
    "folder_seg": (write_folder, ("red", "green", "blue", "yellow")),
}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("dense")
    out = {task: writer(base / task) for task, (writer, _) in SEMANTIC.items()}
    out["coco_panoptic"] = write_coco_panoptic(base / "coco")
    out["ade_panoptic"] = write_ade_panoptic(base / "ade_pan")
    return out


def _run(task, fake, data, vocab, **kw):
    fake.vocab = {n: i for i, n in enumerate(vocab)}
    opts = _opts(data, **kw)
    if task == "folder_seg":
        opts = dataclasses.replace(opts, classes=data / "classes.txt")
    return common.get_task(task)(BenchModel(fake, None, None, "fake"), opts)


# --------------------------------------------------------------------------- semantic ---
@pytest.mark.parametrize("task", list(SEMANTIC))
def test_semantic_tasks_read_their_layout_and_score_by_hand(task, fake, trees):
    r = _run(task, fake, trees[task], SEMANTIC[task][1])
    assert r.task == task and r.num_examples == 2 and r.skipped == {}
    assert r.metrics["miou"] == pytest.approx(MIOU, abs=1e-6)
    assert r.metrics["pixel_acc"] == pytest.approx(PIXEL_ACC, abs=1e-6)
    assert r.images_per_s > 0
    assert r.protocol["num_classes"] == {"ade150": 150, "voc20": 20, "context59": 59,
                                         "folder_seg": 4}[task]
    assert r.protocol["templates"] == list(semantic.DENSE_TEMPLATES)
    json.dumps(r.protocol)


def test_semantic_scores_match_torchmetrics(torch_mod):
    from torchmetrics.classification import MulticlassJaccardIndex

    pred = np.stack([p for p, _ in _pairs()])
    gt = np.stack([g for _, g in _pairs()])
    ours = semantic.scores(metrics.confusion_matrix(pred, gt, 4))
    ref = MulticlassJaccardIndex(num_classes=4, average="macro", ignore_index=-1)(
        torch_mod.as_tensor(pred), torch_mod.as_tensor(gt))
    assert ours["miou"] == pytest.approx(100 * float(ref), abs=1e-4)
    assert ours["miou"] == pytest.approx(MIOU, abs=1e-6)


def test_class_lists_ship_with_the_package():
    for name, n in (("ade150", 150), ("voc20", 20), ("context59", 59)):
        names = common.read_classes(semantic.DATA / f"{name}.txt")
        assert len(names) == n == len(set(names))
    assert common.read_classes(semantic.DATA / "ade150.txt")[:3] == ["wall", "building", "sky"]
    assert common.read_classes(semantic.DATA / "context59.txt")[-1] == "wood"


def test_num_examples_and_missing_labels_are_counted(fake, trees, tmp_path):
    r = _run("folder_seg", fake, trees["folder_seg"], SEMANTIC["folder_seg"][1], num_examples=1)
    assert r.num_examples == 1 and r.metrics["miou"] == pytest.approx(MIOU, abs=1e-6)
    d = write_folder(tmp_path / "f")
    _save(d / "images/extra.png", _image(_colour_map()))  # no labels/extra.png
    r = _run("folder_seg", fake, d, SEMANTIC["folder_seg"][1])
    assert r.skipped == {"no label file": 1} and r.num_examples == 2
    for p in (d / "labels").iterdir():
        p.unlink()
    with pytest.raises(BenchmarkInputError, match=r"no image with a label .*3 no label file"):
        _run("folder_seg", fake, d, SEMANTIC["folder_seg"][1])


def test_semantic_bad_input(fake, trees, tmp_path):
    names = SEMANTIC["folder_seg"][1]
    with pytest.raises(BenchmarkInputError, match="missing folder 'annotations'"):
        _run("ade150", fake, tmp_path, SEMANTIC["ade150"][1])
    (tmp_path / "ADEChallengeData2016/annotations/validation").mkdir(parents=True)
    with pytest.raises(BenchmarkInputError, match="missing split folder .*images/validation"):
        _run("ade150", fake, tmp_path, SEMANTIC["ade150"][1])
    with pytest.raises(BenchmarkInputError, match="missing split list .*val.txt"):
        (tmp_path / "VOC2012/SegmentationClass").mkdir(parents=True)
        _run("voc20", fake, tmp_path, SEMANTIC["voc20"][1])
    # label PNG of the wrong size
    d = write_folder(tmp_path / "size")
    _save(d / "labels/im1.png", np.zeros((H - 2, W), np.uint8), "L")
    with pytest.raises(BenchmarkInputError, match=r"im1.png is 40x30 but its image .* is 40x32"):
        _run("folder_seg", fake, d, names)
    # label value outside the class list
    d = write_folder(tmp_path / "ids")
    bad = _encode(_semantic_gt(), 0, 255)
    bad[0, 0] = 7
    _save(d / "labels/im0.png", bad, "L")
    with pytest.raises(BenchmarkInputError, match=r"values \[7\] outside the 4-class list"):
        _run("folder_seg", fake, d, names)
    # RGB label
    _save(d / "labels/im0.png", _image(_colour_map()))
    with pytest.raises(BenchmarkInputError, match="is a RGB image; expected a single-channel"):
        _run("folder_seg", fake, d, names)
    # empty or missing class list
    (d / "classes.txt").write_text("# nothing\n\n")
    with pytest.raises(BenchmarkInputError, match="is empty"):
        _run("folder_seg", fake, d, names)
    with pytest.raises(BenchmarkInputError, match="folder_seg needs --classes"):
        common.get_task("folder_seg")(BenchModel(fake, None, None, "f"), _opts(d))
    with pytest.raises(BenchmarkInputError, match="smaller than the model's input size"):
        _run("folder_seg", fake, trees["folder_seg"], names, short_side=16)
    with pytest.raises(BenchmarkInputError, match="must hold exactly one"):
        tf = tmp_path / "t.txt"
        tf.write_text("a photo\n")
        _run("folder_seg", fake, trees["folder_seg"], names, templates=str(tf))


# --------------------------------------------------------------------------- panoptic ---
# Categories (JSON order): person (thing, id 1), car (thing, id 3), sky (stuff, id 187),
# grass (stuff, id 193); painted in palette colours 0, 1, 2, 3.
CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
              {"id": 187, "name": "sky-other-merged", "isthing": 0},
              {"id": 193, "name": "grass-merged", "isthing": 0}]
PAN_NAMES = ("person", "car", "sky", "grass")


def _panoptic_scene():
    """``(colour map [H, W], gt ids [H, W], segments_info)``.

    Painted: sky (rows 0-15) with persons A (rows 2-9, cols 2-9) and B (rows 2-9, cols 20-27),
    grass (rows 16-31) with a car (rows 20-27, cols 10-25). Ground truth: sky, person A, a
    *crowd* person region exactly on B, grass with rows 28-31 void, and the car split into two
    instances (cols 10-21 and 22-25)."""
    cm = np.full((H, W), 2, np.int64)
    cm[16:] = 3
    cm[2:10, 2:10] = 0
    cm[2:10, 20:28] = 0
    cm[20:28, 10:26] = 1
    ids = np.where(cm == 2, 10, 0)
    ids[2:10, 2:10] = 11
    ids[2:10, 20:28] = 12
    ids[16:28] = 13
    ids[20:28, 10:22] = 14
    ids[20:28, 22:26] = 15
    segs = [{"id": 10, "category_id": 187, "iscrowd": 0}, {"id": 11, "category_id": 1},
            {"id": 12, "category_id": 1, "iscrowd": 1}, {"id": 13, "category_id": 193},
            {"id": 14, "category_id": 3, "iscrowd": 0}, {"id": 15, "category_id": 3}]
    return cm, ids, segs


# Hand count. sky: pred = gt (512 px) IoU 1. grass: pred 512 px, gt 352 + 160 void under the
# prediction -> union 512 + 352 - 160 - 352 = 352, IoU 1. person: A matched (IoU 1); B is
# unmatched but wholly on a same-class crowd region: not a false positive. car: the predicted
# 128-px car vs car 1 (96 px): IoU 96 / 128 = 0.75, matched; car 2 missed (FN).
# PQ per class: 1, 0.75 / 1.5 = 0.5, 1, 1; SQ: 1, 0.75, 1, 1; RQ: 1, 2/3, 1, 1.
PQ = {"pq": 87.5, "sq": 93.75, "rq": 100 * 11 / 12, "pq_things": 75.0, "sq_things": 87.5,
      "rq_things": 100 * 5 / 6, "pq_stuff": 100.0, "sq_stuff": 100.0, "rq_stuff": 100.0}


def _write_panoptic(json_path, png_dir, image_dir, stem_fmt):
    cm, ids, segs = _panoptic_scene()
    images, anns = [], []
    for i, (c, g) in enumerate(((cm, ids), (cm[:, ::-1], ids[:, ::-1]))):
        stem = stem_fmt.format(i + 1)
        _save(image_dir / f"{stem}.jpg", _image(c))
        rgb = np.stack([g % 256, (g // 256) % 256, g // 65536], -1)
        _save(png_dir / f"{stem}.png", rgb)
        images.append({"id": i + 1, "file_name": f"{stem}.jpg", "height": H, "width": W})
        anns.append({"image_id": i + 1, "file_name": f"{stem}.png", "segments_info": segs})
    json_path.write_text(json.dumps({"images": images, "annotations": anns,
                                     "categories": CATEGORIES}))


def write_coco_panoptic(root: pathlib.Path) -> pathlib.Path:
    _write_panoptic(root / "annotations/panoptic_val2017.json",
                    root / "annotations/panoptic_val2017", root / "val2017", "{:012d}")
    return root


def write_ade_panoptic(root: pathlib.Path) -> pathlib.Path:
    base = root / "ADEChallengeData2016"
    _write_panoptic(base / "ade20k_panoptic_val.json", base / "ade20k_panoptic_val",
                    base / "images/validation", "ADE_val_{:08d}")
    return root


def test_panoptic_accumulator_crowd_rule_by_hand():
    """Direct hand case: a prediction on a crowd region of its own class is no false positive,
    of another class it is."""
    gt = np.zeros((4, 4), np.int64)
    gt[:, 2:] = 1  # crowd person region
    pred = np.zeros((4, 4), np.int64)
    pred[:, 2:] = 5
    for crowd_cls, fp in ((0, 0), (1, 1)):
        acc = metrics.PanopticAccumulator(2, np.array([True, True]))
        acc.update(pred, {0: 1, 5: 0}, gt, {0: 1}, {1: crowd_cls})
        assert acc.tp.tolist() == [0, 1] and acc.fp.tolist() == [fp, 0]
        assert acc.fn.tolist() == [0, 0]
    # without the crowd annotation it would count
    acc = metrics.PanopticAccumulator(2, np.array([True, True]))
    acc.update(pred, {0: 1, 5: 0}, np.where(gt == 1, -1, 0), {0: 1})
    assert acc.fp.tolist() == [0, 0]  # on void: not a false positive either


@pytest.mark.parametrize("task", ["coco_panoptic", "ade_panoptic"])
def test_panoptic_tasks_read_their_layout_and_score_by_hand(task, fake, trees):
    r = _run(task, fake, trees[task], PAN_NAMES)
    assert r.num_examples == 2 and r.skipped == {}
    for k, v in PQ.items():
        assert r.metrics[k] == pytest.approx(v, abs=1e-6), k
    assert r.protocol["predictor"].startswith("training-free")
    assert r.protocol["num_things"] == 2
    json.dumps(r.protocol)


def test_panoptic_names_are_cleaned():
    assert [panoptic.prompt_name(c["name"]) for c in CATEGORIES] == list(PAN_NAMES)
    assert panoptic.prompt_name("wall-other-merged") == "wall"
    assert panoptic.prompt_name("building, edifice") == "building"
    assert panoptic.prompt_name("playingfield") == "playingfield"


def test_panoptic_bad_input(fake, tmp_path):
    with pytest.raises(BenchmarkInputError, match="missing split folder"):
        _run("coco_panoptic", fake, tmp_path, PAN_NAMES)
    d = write_coco_panoptic(tmp_path / "c")
    js = d / "annotations/panoptic_val2017.json"
    data = json.loads(js.read_text())
    good = json.dumps(data)
    data["annotations"][0]["segments_info"] = data["annotations"][0]["segments_info"][:-1]
    js.write_text(json.dumps(data))
    with pytest.raises(BenchmarkInputError, match=r"segment ids \[15\] that its JSON"):
        _run("coco_panoptic", fake, d, PAN_NAMES)
    data = json.loads(good)
    data["annotations"][0]["segments_info"][0]["category_id"] = 99
    js.write_text(json.dumps(data))
    with pytest.raises(BenchmarkInputError, match="category 99, not in the 4-category list"):
        _run("coco_panoptic", fake, d, PAN_NAMES)
    js.write_text(good)
    png = d / "annotations/panoptic_val2017/000000000002.png"
    _save(png, np.zeros((H, W + 2, 3), np.uint8))
    with pytest.raises(BenchmarkInputError, match="is 42x32 but its image"):
        _run("coco_panoptic", fake, d, PAN_NAMES)
    png.unlink()
    r = _run("coco_panoptic", fake, d, PAN_NAMES)
    assert r.skipped == {"no label file": 1} and r.num_examples == 1
    data = json.loads(good)
    data["categories"] = []
    js.write_text(json.dumps(data))
    with pytest.raises(BenchmarkInputError, match="empty category list"):
        _run("coco_panoptic", fake, d, PAN_NAMES)


# ----------------------------------------------------------------- the real tiny model ---
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    wd = make_tiny_workdir(tmp_path_factory.mktemp("wd"))
    return inference.load(str(wd))


def test_real_model_sliding_and_resized_positions(tiny, trees):
    names = SEMANTIC["folder_seg"][1]
    opts = Options(data=trees["folder_seg"], classes=trees["folder_seg"] / "classes.txt",
                   batch_size=8, workers=2)
    r = common.get_task("folder_seg")(BenchModel(tiny, None, 7, "tiny"), opts)
    assert 0 <= r.metrics["miou"] <= 100 and 0 <= r.metrics["pixel_acc"] <= 100
    assert r.protocol["short_side"] == 64 and r.protocol["window_stride_px"] == 21
    # whole image with interpolated position embeddings: an image already at the model's input
    # size keeps its embeddings, so it equals one sliding window
    text, scale = semantic.text_embeddings(BenchModel(tiny, None, 7, "t"), names, ("{}",))
    img = _image(_colour_map())[:32, :32]
    one = dataclasses.replace(opts, short_side=32)
    a = next(sliding.sliding_logits(tiny, [img], text, one, scale))
    b = next(sliding.sliding_logits(tiny, [img], text, dataclasses.replace(one, resize_pos=True),
                                    scale))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    c = next(sliding.sliding_logits(tiny, [_image(_colour_map())], text,
                                    dataclasses.replace(opts, resize_pos=True), scale))
    assert c.shape == (H, W, 4) and np.isfinite(c).all()


def test_segmentation_head_predicts_the_panoptic_segments(tiny, trees):
    """A run with a head: its segments (random decoder here), its thresholds in the protocol."""
    from umg_jax import config_lib
    from umg_jax.models import mask_decoder

    c = config_lib.load_config(str(ROOT / "configs/seg_tiny.py"))
    c.model = mlc.ConfigDict(tiny.config.to_dict())
    c.seg.update(num_queries=6, width=32, layers=1, heads=2, stem_channels=16, ensemble=False)
    seg = inference.Segmenter(tiny, mask_decoder.init_params(c, jax.random.key(0)), c,
                              ["person"])
    r = common.get_task("coco_panoptic")(BenchModel(tiny, seg, 7, "seg"),
                                         Options(data=trees["coco_panoptic"], workers=2))
    assert r.protocol["predictor"].startswith("segmentation head")
    assert r.protocol["object_threshold"] == 0.8 and r.protocol["overlap_threshold"] == 0.8
    for k in ("pq", "sq", "rq"):
        assert math.isnan(r.metrics[k]) or 0 <= r.metrics[k] <= 100
    d = trees["folder_seg"]
    r = common.get_task("folder_seg")(BenchModel(tiny, seg, 7, "seg"),
                                      Options(data=d, classes=d / "classes.txt", workers=2))
    assert r.protocol["predictor"].startswith("segmentation head")
    assert 0 <= r.metrics["miou"] <= 100 and r.num_examples == 2
    # one window (image at the input size): the sliding scores are the head's own semantic
    # inference, with and without the FC-CLIP ensemble
    s = tiny.image_size
    img = np.random.default_rng(3).integers(0, 256, (s, s, 3), dtype=np.uint8)
    labels = ["person", "sky", "grass"]
    text = tiny.encode_text_labels(labels, inference.DEFAULT_TEMPLATES)
    for ens in (False, True):
        got = next(sliding.sliding_head_scores(seg, [img], text, np.array([1, 0, 0], bool),
                                               Options(data=d, short_side=s), ens))
        want = seg.predict(img, labels, ensemble=ens)["semantic"]
        np.testing.assert_array_equal(got.argmax(-1), want)
    with pytest.raises(BenchmarkInputError, match="resize_pos"):
        next(sliding.sliding_head_scores(seg, [img], text, np.zeros(3, bool),
                                         Options(data=d, resize_pos=True), False))
