"""``python -m umg_jax.downstream`` (umg_jax/downstream: cli, classification, retrieval, regions).

Tiny fixture trees in each real layout (ImageFolder, CIFAR pickles, Karpathy JSON, COCO
instances JSON). Known-answer tests plug a fake backbone, whose embeddings are set by the
images' colours and the class names in the prompts, through the real task functions, so that
top-1 / top-5 / recall / R@K are exactly hand-computable; the tiny random model checks the real
path against ``umg_jax.load``'s own encoders and the CLI's files; bad input exits 2.
"""

import json
import pickle
import re

import ml_collections as mlc
import numpy as np
import pytest
from conftest import make_tiny_workdir
from PIL import Image

from umg_jax.downstream import classification, cli, common, regions, retrieval
from umg_jax.downstream.common import BenchmarkInputError, BenchModel, Options
from umg_jax.evaluators.common import normalize

E = 1024  # fake embedding width (>= every code used)


# ------------------------------------------------------------------ the known-answer fake ---
def colour(code: int) -> tuple[int, int, int]:
    """An RGB colour carrying ``code`` (three base-12 digits, 20 grey levels apart, so that
    resampling a uniform patch cannot change it)."""
    return tuple(10 + 20 * ((code // 12 ** i) % 12) for i in range(3))


def decode(x: np.ndarray) -> np.ndarray:
    """``[..., 3]`` pixels in [0, 1] -> ``[...]`` codes."""
    d = np.rint((x * 255 - 10) / 20).astype(np.int64)
    return d[..., 0] + 12 * d[..., 1] + 144 * d[..., 2]


def ranked(code: int) -> np.ndarray:
    """The fake image embedding of ``code``: weight 2^-k on dimension code + k (k < 6), so the
    classes rank code, code+1, ..., code+5, then the rest (0)."""
    v = np.zeros(E, np.float32)
    for k in range(6):
        v[code + k] = 2.0 ** -k
    return v / np.linalg.norm(v)


class FakeBackbone:
    """Image size, normalisation and ``preprocess`` of a backbone; the encoders are patched."""

    image_size = 8
    pixel_mean = np.zeros(3, np.float32)
    pixel_std = np.ones(3, np.float32)
    cell = 8  # px per dense-grid cell
    config = mlc.ConfigDict({"vision": {"patch_size": 8}, "embed_dim": E})

    def preprocess(self, img):  # the whole image, unresized (fixtures are image_size square)
        assert img.shape[:2] == (self.image_size, self.image_size)
        return img.astype(np.float32) / 255.0


def fake_encode_images(backbone, x):
    """Global: :func:`ranked` of the code at the image centre; dense: one-hot of the code at
    each cell centre."""
    b, s = x.shape[:2]
    c = backbone.cell
    img = np.stack([ranked(k) for k in decode(x[:, s // 2, s // 2])])
    cells = decode(x[:, c // 2::c, c // 2::c])
    return img, np.eye(E, dtype=np.float32)[cells]


def fake_encode_texts(backbone, texts, batch_size=256):
    """One-hot of the ``<n>`` in ``cls<n>`` of each text."""
    return np.eye(E, dtype=np.float32)[[int(re.search(r"cls(\d+)", t)[1]) for t in texts]]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(common, "encode_images", fake_encode_images)
    monkeypatch.setattr(common, "encode_texts", fake_encode_texts)
    return BenchModel(backbone=FakeBackbone(), segmenter=None, step=None, source="fake")


def save(path, code, size=(12, 16), rect=None):
    """A ``size`` (h, w) image of ``colour(code)``; ``rect = (x0, y0, x1, y1, code)`` paints a
    rectangle of another code."""
    a = np.zeros((*size, 3), np.uint8)
    a[:] = colour(code)
    if rect is not None:
        x0, y0, x1, y1, c = rect
        a[y0:y1, x0:x1] = colour(c)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def names_file(path, n):
    path.write_text("# fake names\n" + "".join(f"cls{i}\n" for i in range(n)))
    return path


# ------------------------------------------------------------------ fixture layouts ---
# Folder tree (label <- folder, image code -> predicted ranking code, code+1, ...):
#   cls0: 0, 0   both right;   cls1: 1 (right), 0 (true class 2nd: top-5 only)
#   cls2: 2 right;  cls3: 0 (4th: top-5);  cls4: no image;  cls5: 0 (6th: miss)
#   cls6: 2 (5th: top-5);  cls7: 1 (7th: miss)
FOLDER = {0: [0, 0], 1: [1, 0], 2: [2], 3: [0], 4: [], 5: [0], 6: [2], 7: [1]}
# top-1 4/9; top-5 7/9; recall per class present (0,1,2,3,5,6,7): 1, .5, 1, 0, 0, 0, 0 -> 2.5/7
FOLDER_EXPECT = {"top1": 400 / 9, "top5": 700 / 9, "mean_per_class_recall": 250 / 7}


def write_folder(root):
    for c, codes in FOLDER.items():
        (root / f"cls{c}").mkdir(parents=True)
        for i, code in enumerate(codes):
            save(root / f"cls{c}" / f"{i}.jpg" if i % 2 else root / f"cls{c}" / f"{i}.png",
                 code)
    return root


def write_cifar(root, images, labels, ten=True):
    d = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    d.mkdir(parents=True)
    data = np.stack(images).transpose(0, 3, 1, 2).reshape(len(images), -1)  # CHW rows
    key = b"labels" if ten else b"fine_labels"
    with open(d / ("test_batch" if ten else "test"), "wb") as f:
        pickle.dump({b"data": data, key: list(labels), b"batch_label": b"testing batch 1"}, f)
    return root


def cifar_images(codes):
    return [np.tile(np.array(colour(c), np.uint8), (32, 32, 1)) for c in codes]


def write_karpathy(root, coco=True):
    """img0 code 0: 'cls0', 'cls2'; img1 code 1: 'cls3'; img2 code 4: 'cls9', 'cls4'; and a
    train image that must be left out."""
    entries = []
    for i, (code, caps, split) in enumerate([(0, ["cls0 a", "cls2 b"], "test"),
                                             (1, ["cls3 c"], "test"), (4, ["cls9", "cls4"], "test"),
                                             (0, ["cls1"], "train")]):
        e = {"filename": f"im{i}.jpg", "split": split, "imgid": i,
             "sentences": [{"raw": c, "tokens": c.split()} for c in caps]}
        if coco:
            e["filepath"] = "val2014"
        entries.append(e)
        save(root / ("val2014" if coco else "flickr30k-images") / f"im{i}.jpg", code)
    name = "dataset_coco.json" if coco else "dataset_flickr30k.json"
    (root / name).write_text(json.dumps({"images": entries, "dataset": "x"}))
    return root


# COCO boxes (fake image 160 px, 8-px cells, background code 143 is no class). Categories have
# ids 1, 3, 5, 7, 9 -> indices 0..4 = cls0..cls4; the painted code is what the box predicts.
BOX_IMAGES = [  # (file, [(bbox xywh, category id, painted code)], extra annotations)
    ("a.png", [([8, 8, 112, 112], 3, 1),      # large (12544 px), cls1, right
               ([128, 128, 24, 24], 7, 2)]),  # small (576), cls3, predicted cls2: wrong
    ("b.png", [([16, 16, 48, 64], 1, 0)]),    # medium (3072), cls0, right
    ("c.png", [([0, 0, 16, 16], 9, 4),        # small (256), cls4, right
               ([80, 80, 40, 40], 3, 3)]),    # medium (1600), cls1, predicted cls3: wrong
]
# all: 3/5 right; per class: cls0 1, cls1 1/2, cls3 0, cls4 1 -> 2.5/4
BOX_EXPECT = {"top1": 60.0, "mean_class_acc": 62.5, "count": 5.0,
              "top1_small": 50.0, "mean_class_acc_small": 50.0, "count_small": 2.0,
              "top1_large": 100.0, "mean_class_acc_large": 100.0, "count_large": 1.0}


def write_coco(root, size=160, paint=True):
    images, anns = [], []
    for i, (name, boxes) in enumerate(BOX_IMAGES):
        a = np.zeros((size, size, 3), np.uint8)
        a[:] = colour(143)
        for (x, y, w, h), cat, code in boxes:
            if paint:
                a[y:y + h, x:x + w] = colour(code)
            anns.append({"id": len(anns) + 1, "image_id": i + 10, "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h / 2, "iscrowd": 0})
        (root / "val2017").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / "val2017" / name)
        images.append({"id": i + 10, "file_name": name, "width": size, "height": size})
    images.append({"id": 99, "file_name": "none.jpg", "width": size, "height": size})  # no box
    anns += [{"id": 90, "image_id": 11, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 1,
              "iscrowd": 1},  # crowd: skipped
             {"id": 91, "image_id": 11, "category_id": 1, "bbox": [0, 0, 0.5, 20], "area": 1,
              "iscrowd": 0}]  # under 1 px: skipped
    cats = [{"id": 2 * k + 1, "name": f"cls{k}", "supercategory": "x"} for k in range(5)]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": cats[::-1]}))  # any order
    return root


# ------------------------------------------------------------------ known answers (fake) ---
def test_folder_known_answer(fake, tmp_path):
    root = write_folder(tmp_path / "tree" / "val")
    r = common.get_task("folder")(fake, Options(data=tmp_path / "tree", batch_size=4))
    assert r.num_examples == 9 and r.images_per_s > 0
    assert r.metrics == pytest.approx(FOLDER_EXPECT, abs=1e-4)
    assert r.protocol["num_classes"] == 8 and r.protocol["num_templates"] == 80
    # --classes renames the sorted folders; --num_examples takes the first images in order
    r = classification.run_folder(fake, Options(data=root, classes=names_file(
        tmp_path / "n.txt", 8), num_examples=4, batch_size=3, templates="default"))
    assert r.num_examples == 4 and r.metrics["top1"] == 75.0  # cls0 0, 0; cls1 1, 0
    assert r.protocol["num_templates"] == 3


def test_imagenet_wnid_order(fake, tmp_path):
    """Folders are wnids; the label is the wnid's index among the 1000 sorted ones."""
    wnids = common.package_list("imagenet_wnids.txt")
    assert len(wnids) == 1000 and wnids == sorted(wnids) and wnids[0] == "n01440764"
    for idx, code in ((0, 0), (1, 1), (999, 999), (999, 998)):
        save(tmp_path / "val" / wnids[idx] / f"x{code}.JPEG", code)
    r = classification.run_imagenet(fake, Options(data=tmp_path, classes=names_file(
        tmp_path / "n.txt", 1000), batch_size=3, templates="default"))
    # 0, 1, 999 right; the code-998 image of class 999 has it 2nd
    assert r.metrics == pytest.approx({"top1": 75.0, "top5": 100.0,
                                       "mean_per_class_recall": (1 + 1 + 0.5) / 3 * 100})
    assert r.protocol["num_templates"] == 3 and r.protocol["num_classes"] == 1000


def test_cifar_known_answer(fake, tmp_path):
    codes, labels = [3, 3, 5, 0, 9], [3, 2, 5, 9, 9]  # code c ranks c..c+5 first
    write_cifar(tmp_path, cifar_images(codes), labels)
    r = classification.TASKS["cifar10"](fake, Options(data=tmp_path, split="test", classes=
                                        names_file(tmp_path / "n.txt", 10), batch_size=2))
    # top-1: 3, 5, 9 right (3/5); top-5: + none (label 2 vs code 3: rank > 5; 9 vs 0: 10th)
    # recall: class 3 1, 2 0, 5 1, 9 1/2 -> 2.5 / 4
    assert r.metrics == pytest.approx({"top1": 60.0, "top5": 60.0,
                                       "mean_per_class_recall": 62.5})
    assert r.protocol["num_templates"] == 18
    write_cifar(tmp_path / "c100", cifar_images([7, 8]), [7, 9], ten=False)  # parent given
    r = classification.TASKS["cifar100"](fake, Options(
        data=tmp_path / "c100", classes=names_file(tmp_path / "m.txt", 100), batch_size=2))
    assert r.metrics["top1"] == 50.0 and r.metrics["top5"] == 100.0


def test_cifar_pickle_is_restricted(tmp_path):
    """The CIFAR reader rebuilds arrays only: a pickle naming another callable is refused."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8),
                                                 b"labels": [print]}))
    with pytest.raises(BenchmarkInputError, match="not allowed"):
        classification._read_cifar_batch(d / "test_batch", b"labels")


@pytest.mark.parametrize("task", ["coco_retrieval", "flickr30k"])
def test_retrieval_known_answer(fake, tmp_path, task):
    write_karpathy(tmp_path, coco=task == "coco_retrieval")
    r = retrieval.TASKS[task](fake, Options(data=tmp_path, split="test", batch_size=2))
    # i2t: img1's best text is 'cls2' (img0's, .5) before its own 'cls3' (.25): R@1 2/3.
    # t2i: 'cls2' (img0's) scores img1 .5 > img0 .25: R@1 4/5; all found within 5.
    assert r.metrics == pytest.approx({"i2t_r1": 200 / 3, "i2t_r5": 100.0, "i2t_r10": 100.0,
                                       "t2i_r1": 80.0, "t2i_r5": 100.0, "t2i_r10": 100.0},
                                      abs=1e-4)
    assert r.num_examples == 3 and r.protocol["num_captions"] == 5
    r = retrieval.TASKS[task](fake, Options(data=tmp_path, split="test", num_examples=2,
                                            batch_size=2))  # images 0, 1 and their 3 captions
    assert r.protocol["num_captions"] == 3 and r.metrics["i2t_r1"] == 50.0


def test_coco_boxes_known_answer(fake, tmp_path):
    write_coco(tmp_path)
    fake.backbone.image_size = 160
    r = regions.run(fake, Options(data=tmp_path, split="val", batch_size=2, short_side=160))
    assert r.metrics == pytest.approx(BOX_EXPECT)
    assert r.skipped == {"crowd box": 1, "box under 1 px": 1}
    assert r.num_examples == 5 and r.protocol["split"] == "val2017"
    # at the benchmark resolution (2x the input: 3 x 3 sliding windows per image) the boxes are
    # pooled from the stitched map of the whole image: same answers
    r = regions.run(fake, Options(data=tmp_path, split="val", batch_size=2))
    assert r.protocol["short_side"] == 320 and r.metrics == pytest.approx(BOX_EXPECT)


def test_box_metrics_by_hand():
    pred, gt = np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])
    m = regions.box_metrics(pred, gt, np.array([100.0, 5000, 10000, 20000]))
    assert m["top1"] == 75.0 and m["mean_class_acc"] == pytest.approx(100 * 2.5 / 3)
    assert m["top1_small"] == 100.0 and m["count_small"] == 1
    assert m["top1_large"] == 50.0 and m["mean_class_acc_large"] == 50.0
    m = regions.box_metrics(pred[:1], gt[:1], np.array([5000.0]))  # no small / large box
    assert set(m) == {"top1", "mean_class_acc", "count"}


def test_package_data_and_templates(tmp_path):
    assert len(common.package_list("imagenet_classes.txt")) == 1000
    assert common.package_list("imagenet_classes.txt")[:2] == ["tench", "goldfish"]
    t = common.package_list("imagenet_templates.txt")
    assert len(t) == 80 and all(x.count("{}") == 1 for x in t)
    assert common.package_list("cifar10_classes.txt")[0] == "airplane"
    assert len(common.package_list("cifar100_classes.txt")) == 100
    assert len(common.package_list("cifar_templates.txt")) == 18
    f = tmp_path / "t.txt"
    f.write_text("a {} here\n# comment\nthe {}\n")
    assert common.resolve_templates(Options(data=tmp_path, templates=str(f)), ()) == (
        "a {} here", "the {}")
    f.write_text("no slot\n")
    with pytest.raises(BenchmarkInputError, match="exactly one"):
        common.resolve_templates(Options(data=tmp_path, templates=str(f)), ())


def test_clip_preprocess_matches_torchvision(torch_mod):
    """Shorter side -> size (bicubic) + centre crop, as open_clip's eval transform."""
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    size = 24
    mean, std = np.array([0.4, 0.5, 0.6], np.float32), np.array([0.2, 0.3, 0.25], np.float32)
    ref_t = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                       T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    for h, w in ((37, 53), (61, 29), (24, 24)):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        ours = common.clip_preprocess(img, size, mean, std)
        ref = ref_t(Image.fromarray(img)).numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


# ------------------------------------------------------------------ the real tiny model ---
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_tiny_workdir(tmp_path_factory.mktemp("wd"))


@pytest.fixture(scope="module")
def model(workdir):
    return cli.load_model(str(workdir))


@pytest.fixture
def loaded(monkeypatch, model):
    """The CLI gets the module's loaded model (one compile per module; the loading itself is
    tested through the CLI in test_cli_cifar_equals_reference)."""
    monkeypatch.setattr(cli, "load_model", lambda workdir, step=None: model)
    return model


def test_text_and_image_encoders_equal_umg_load(model):
    bb = model.backbone
    names, templates = ["circle", "red star", "grass"], ("a photo of a {}.", "a {}.")
    np.testing.assert_allclose(common.class_embeddings(bb, names, templates, batch_size=4),
                               bb.encode_text_labels(names, templates), atol=1e-5)
    x = np.stack([bb.preprocess(np.full((32, 40, 3), 40 * i, np.uint8)) for i in range(3)])
    img, dense = common.encode_images(bb, x)
    ref_img, ref_dense = bb.encode_image(x)
    np.testing.assert_allclose(img, normalize(ref_img), atol=1e-5)
    np.testing.assert_allclose(dense, normalize(ref_dense), atol=1e-5)
    assert model.step == 7 and model.segmenter is None


def test_cli_cifar_equals_reference(workdir, model, tmp_path, capsys):
    """The CLI on CIFAR-10 (package names, 18 templates) equals top-1 / top-5 computed with
    ``umg_jax.load``'s encoders; the JSON holds metrics, protocol, model, step and date."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    labels = [0, 1, 2, 3, 4, 5]
    write_cifar(tmp_path, images, labels)
    assert cli.main(["--workdir", str(workdir), "--task", "cifar10", "--data", str(tmp_path),
                     "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"cifar10/top1\s+\d", out) and "cifar10/images_per_s" in out
    rec = json.loads((workdir / "benchmark" / "7" / "cifar10.json").read_text())
    assert rec["step"] == 7 and rec["model"] == str(workdir) and rec["date"]
    assert rec["num_examples"] == 6 and rec["protocol"]["split"] == "test"
    bb = model.backbone
    text = bb.encode_text_labels(common.package_list("cifar10_classes.txt"),
                                 common.package_list("cifar_templates.txt"))
    emb = bb.encode_image(np.stack([common.clip_preprocess(i, 32, bb.pixel_mean, bb.pixel_std)
                                    for i in images]))[0]
    logits = emb @ text.T
    order = np.argsort(-logits, 1)
    top1 = np.mean(order[:, 0] == labels) * 100
    top5 = np.mean([lab in o[:5] for lab, o in zip(labels, order, strict=True)]) * 100
    assert rec["metrics"]["top1"] == pytest.approx(top1, abs=1e-3)
    assert rec["metrics"]["top5"] == pytest.approx(top5, abs=1e-3)


def test_cli_suite_table_and_whole_image_boxes(workdir, loaded, tmp_path, capsys):
    """A suite of folder + coco_retrieval + coco_boxes on the tiny model: each JSON, one
    markdown table in the paper's column order (table.md). coco_boxes with whole-image boxes
    equals the class of the mean of the normalised dense cells (RoIAlign samples every cell
    centre of the 4x4 grid exactly)."""
    write_folder(tmp_path / "tree")
    write_karpathy(tmp_path / "karpathy")
    coco = write_coco(tmp_path / "coco", size=32, paint=False)
    d = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    for a in d["annotations"]:
        if a["id"] < 90:  # not the crowd / thin boxes, still skipped
            a["bbox"] = [0, 0, 32, 32]
    (coco / "annotations" / "instances_val2017.json").write_text(json.dumps(d))
    for i, name in enumerate(("a.png", "b.png", "c.png")):  # distinct random images
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
                        ).save(coco / "val2017" / name)
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([
        {"task": "coco_boxes", "data": "coco", "batch_size": 2},
        {"task": "folder", "data": "tree", "batch_size": 4},
        {"task": "coco_retrieval", "data": "karpathy", "batch_size": 4}]))
    assert cli.main(["--workdir", str(workdir), "--suite", str(suite)]) == 0
    out = capsys.readouterr().out
    table = (workdir / "benchmark" / "7" / "table.md").read_text()
    assert table in out
    header = table.splitlines()[0]
    assert header.index("folder top1") < header.index("coco_retrieval i2t_r1") < header.index(
        "coco_boxes top1")
    for task in ("folder", "coco_retrieval", "coco_boxes"):
        rec = json.loads((workdir / "benchmark" / "7" / f"{task}.json").read_text())
        assert rec["images_per_s"] > 0 and rec["metrics"]
    rec = json.loads((workdir / "benchmark" / "7" / "coco_boxes.json").read_text())
    bb = loaded.backbone
    names = [f"cls{k}" for k in range(5)]
    text = bb.encode_text_labels(names, common.package_list("imagenet_templates.txt"))
    preds, gts = [], []
    for name, boxes in BOX_IMAGES:
        img = np.asarray(Image.open(coco / "val2017" / name).convert("RGB"))
        dense = bb.encode_image(bb.preprocess(img)[None])[1][0]
        dense = dense / np.linalg.norm(dense, axis=-1, keepdims=True)
        mean = dense.reshape(-1, dense.shape[-1]).mean(0)
        p = int(np.argmax(mean @ text.T))
        for _, cat, _ in boxes:
            preds.append(p)
            gts.append((cat - 1) // 2)
    preds, gts = np.array(preds), np.array(gts)
    assert rec["metrics"]["top1"] == pytest.approx(np.mean(preds == gts) * 100, abs=1e-3)
    assert rec["metrics"]["count"] == 5 and "top1_small" not in rec["metrics"]


# ------------------------------------------------------------------ bad input -> exit 2 ---
def _fails(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert message in err, err


def test_bad_input_before_loading(tmp_path, capsys):
    wd = str(tmp_path / "no_run")  # never loaded: each case fails first
    _fails(capsys, ["--workdir", wd, "--task", "nope", "--data", str(tmp_path)], "unknown task")
    _fails(capsys, ["--workdir", wd, "--task", "folder", "--data", str(tmp_path / "x")],
           "does not exist")
    _fails(capsys, ["--workdir", wd, "--task", "folder"], "no data folder")
    (tmp_path / "s.json").write_text(json.dumps([{"task": "folder", "data": ".", "bogus": 1}]))
    _fails(capsys, ["--workdir", wd, "--suite", str(tmp_path / "s.json")], "unknown option")
    (tmp_path / "s.json").write_text(json.dumps([{"task": "folder", "data": "."}] * 2))
    _fails(capsys, ["--workdir", wd, "--suite", str(tmp_path / "s.json")], "twice")
    _fails(capsys, ["--workdir", wd, "--task", "folder", "--data", str(tmp_path)],
           "is not a directory")  # the run dir itself


def test_bad_input_after_loading(workdir, loaded, tmp_path, capsys):
    wd = str(workdir)
    _fails(capsys, ["--workdir", wd, "--task", "imagenet", "--data", str(tmp_path)],
           "split folder")
    tree = write_folder(tmp_path / "tree")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    _fails(capsys, ["--workdir", wd, "--task", "folder", "--data", str(tree), "--classes",
                    str(tmp_path / "empty.txt")], "is empty")
    (tree / "cls4" / "broken.jpg").write_bytes(b"not a jpeg")
    _fails(capsys, ["--workdir", wd, "--task", "folder", "--data", str(tree)],
           "cannot read image")
    _fails(capsys, ["--workdir", wd, "--task", "cifar10", "--data", str(tmp_path)],
           "test_batch")
    (tmp_path / "im" / "dogs").mkdir(parents=True)
    _fails(capsys, ["--workdir", wd, "--task", "imagenet", "--data", str(tmp_path / "im"),
                    "--split", "."], "not an ImageNet-1k wnid")
    kp = write_karpathy(tmp_path / "kp")
    (kp / "val2014" / "im2.jpg").unlink()
    _fails(capsys, ["--workdir", wd, "--task", "coco_retrieval", "--data", str(kp)],
           "1 of 3 test images are missing")
    _fails(capsys, ["--workdir", wd, "--task", "flickr30k", "--data", str(kp)],
           "dataset_flickr30k.json not found")
    _fails(capsys, ["--workdir", wd, "--task", "coco_boxes", "--data", str(kp)],
           "instances_val2017.json not found")


def _example_classes():
    """``tf.train.Example`` and friends built with google.protobuf from feature.proto's field
    numbers: an encoder independent of umg_jax's hand-written parser."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="ex.proto", package="t", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto
    rep, opt = T.LABEL_REPEATED, T.LABEL_OPTIONAL
    for name, typ in (("BytesList", T.TYPE_BYTES), ("FloatList", T.TYPE_FLOAT),
                      ("Int64List", T.TYPE_INT64)):
        f.message_type.add(name=name).field.add(name="value", number=1, label=rep, type=typ)
    feat = f.message_type.add(name="Feature")
    feat.oneof_decl.add(name="kind")
    for i, (name, typ) in enumerate((("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                     ("int64_list", "Int64List")), 1):
        feat.field.add(name=name, number=i, label=opt, type=T.TYPE_MESSAGE,
                       type_name=f".t.{typ}", oneof_index=0)
    feats = f.message_type.add(name="Features")
    entry = feats.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=opt, type=T.TYPE_STRING)
    entry.field.add(name="value", number=2, label=opt, type=T.TYPE_MESSAGE, type_name=".t.Feature")
    feats.field.add(name="feature", number=1, label=rep, type=T.TYPE_MESSAGE,
                    type_name=".t.Features.FeatureEntry")
    f.message_type.add(name="Example").field.add(name="features", number=1, label=opt,
                                                 type=T.TYPE_MESSAGE, type_name=".t.Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Example"))


def test_tfrecord_example_parser_against_protobuf(tmp_path):
    from tensorboardX.record_writer import RecordWriter

    from umg_jax.downstream import tfrecord

    Example = _example_classes()
    ex = Example()
    ex.features.feature["image"].bytes_list.value.extend([b"\x89PNG..", b""])
    ex.features.feature["label"].int64_list.value.extend([999, -3, 2 ** 40])
    ex.features.feature["score"].float_list.value.extend([0.5, -1.25])
    ex.features.feature["empty"].int64_list.SetInParent()
    raw = ex.SerializeToString()
    assert tfrecord.parse_example(raw) == {"image": [b"\x89PNG..", b""],
                                           "label": [999, -3, 2 ** 40],
                                           "score": [0.5, -1.25], "empty": []}
    w = RecordWriter(str(tmp_path / "a.tfrecord"))  # framing with real CRCs (tensorboardX)
    for r in (raw, b"", b"xyz"):
        w.write(r)
    w.close()
    idx = tfrecord.index(tmp_path / "a.tfrecord")
    assert [tfrecord.read(tmp_path / "a.tfrecord", o, n) for o, n in idx] == [raw, b"", b"xyz"]
    data = (tmp_path / "a.tfrecord").read_bytes()
    (tmp_path / "cut.tfrecord").write_bytes(data[:-6])
    with pytest.raises(tfrecord.TFRecordError, match="past the end"):
        tfrecord.index(tmp_path / "cut.tfrecord")
    with pytest.raises(tfrecord.TFRecordError):
        tfrecord.parse_example(b"\x0a\x05ab")  # a length running past the message


@pytest.mark.parametrize("fmt", ["array_record", "tfrecord"])
def test_imagenet_from_tfds(fake, tmp_path, fmt):
    """A TFDS ``imagenet2012`` data_dir (a uint8 Tensor image, as preparing Image features needs
    TensorFlow): array_record read through ``as_data_source``; tfrecord (TFDS's default, the
    same serialized Examples re-framed with tensorboardX's TFRecord writer) through umg_jax's
    reader. Its labels are wnid indices."""
    tfds = pytest.importorskip("tensorflow_datasets")
    wnids = common.package_list("imagenet_wnids.txt")
    examples = [(0, 0), (5, 5), (999, 997), (7, 8)]  # (label, painted code)

    class Imagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("5.1.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(12, 16, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=wnids)}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for i, (label, code) in enumerate(examples):
                yield i, {"image": np.tile(np.array(colour(code), np.uint8), (12, 16, 1)),
                          "label": label}

    b = Imagenet2012(data_dir=str(tmp_path), file_format="array_record")
    b.download_and_prepare()
    vdir = tmp_path / "imagenet2012" / "5.1.0"
    if fmt == "tfrecord":
        from array_record.python.array_record_module import ArrayRecordReader
        from tensorboardX.record_writer import RecordWriter

        for f in sorted(vdir.glob("*.array_record-*")):
            reader = ArrayRecordReader(str(f))
            w = RecordWriter(str(f).replace(".array_record-", ".tfrecord-"))
            for raw in reader.read_all():
                w.write(raw)
            w.close()
            reader.close()
            f.unlink()
        info = json.loads((vdir / "dataset_info.json").read_text())
        info["fileFormat"] = "tfrecord"
        (vdir / "dataset_info.json").write_text(json.dumps(info))
    r = classification.run_imagenet(fake, Options(data=tmp_path, classes=names_file(
        tmp_path / "n.txt", 1000), batch_size=3, templates="default"))
    # TFDS shuffles on disk, but each example's label travels with its image:
    # 0 and 5 right; 999 is 3rd for code 997; 7 misses for code 8
    assert r.num_examples == 4
    assert r.metrics == pytest.approx({"top1": 50.0, "top5": 75.0,
                                       "mean_per_class_recall": 50.0})
    assert r.protocol["split"] == "validation"
