"""The segmentation head's panoptic inference on sliding windows
(``umg_jax/downstream/sliding.py``: ``sliding_head_panoptic``, ``merge_candidates``) and its
benchmark path (``umg_jax/downstream/panoptic.py``).

On one window the merge must be Mask2Former's (``segmentation.panoptic_inference``) exactly. A
fake head whose queries are the image's colours (one query per palette colour, its mask the
pixels of that colour, its class the colour's) makes the multi-window answer known by hand: an
object cut by a window border is one instance, stuff of one class is one segment.
"""

import dataclasses
import json
import math
import pathlib
import types

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from conftest import make_tiny_workdir
from test_benchmark_dense import PAN_NAMES, write_coco_panoptic

from umg_jax import inference
from umg_jax.downstream import common, panoptic, sliding
from umg_jax.downstream.common import BenchmarkInputError, BenchModel, Options
from umg_jax.evaluators import segmentation as se

ROOT = pathlib.Path(__file__).parents[1]
# person (thing), car (thing), grass (stuff), sky (stuff)
PALETTE = np.array([[230, 30, 30], [30, 30, 230], [30, 200, 30], [230, 230, 30]], np.uint8)
ISTHING = np.array([True, True, False, False])


def _partition(seg: np.ndarray, classes: dict[int, int]) -> set[tuple[int, frozenset]]:
    """A segment map as a set of ``(class, pixels)`` (ids do not matter)."""
    assert set(np.unique(seg).tolist()) - {-1} == set(classes)
    return {(classes[s], frozenset(np.flatnonzero(seg == s).tolist())) for s in classes}


# ------------------------------------------------------------------- one window = Mask2Former
@pytest.mark.parametrize("seed", range(4))
def test_merge_on_one_window_is_panoptic_inference(seed):
    """Random queries of one window (smooth masks, some classes above the object threshold,
    some void, duplicates of a stuff class): the candidates' merge is bit for bit
    ``panoptic_inference``, ids included, at two overlap thresholds."""
    rng = np.random.default_rng(seed)
    n, c, s = 12, 4, 24
    logits = 4 * rng.normal(size=(n, c + 1)).astype(np.float32)
    logits[:3, 2] += 8  # three confident "grass" (stuff) queries
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
    low = rng.normal(size=(n, 4, 4)).astype(np.float32) * 6
    mask_prob = np.asarray(jax.nn.sigmoid(jax.image.resize(jnp.asarray(low), (n, s, s),
                                                           "bilinear")))
    kept = 0
    for overlap in (0.8, 0.3):
        want = se.panoptic_inference(probs, mask_prob, ISTHING, 0.5, overlap)
        cands = sliding.window_candidates(probs, mask_prob, 0, 0, 0, 0.5)
        got = sliding.merge_candidates(cands, (s, s), ISTHING, overlap)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1]
        kept += len(want[1])
    assert kept > 0  # not the trivial empty case
    # the same window at an offset inside a larger image: the same segments, shifted
    cands = sliding.window_candidates(probs, mask_prob, 0, 5, 7, 0.5)
    seg, cls = sliding.merge_candidates(cands, (s + 9, s + 8), ISTHING, 0.3)
    want = se.panoptic_inference(probs, mask_prob, ISTHING, 0.5, 0.3)
    np.testing.assert_array_equal(seg[5:5 + s, 7:7 + s], want[0])
    assert (np.delete(seg, np.s_[5:5 + s], 0) == -1).all() and cls == want[1]


def test_resize_nearest_is_torch_nearest_exact(torch_mod):
    import torch.nn.functional as F

    seg = np.random.default_rng(0).integers(-1, 9, (7, 11)).astype(np.int32)
    for size in ((7, 11), (16, 23), (4, 5), (13, 3)):
        ref = F.interpolate(torch_mod.as_tensor(seg, dtype=torch_mod.float32)[None, None],
                            size=size, mode="nearest-exact")[0, 0].numpy().astype(np.int32)
        np.testing.assert_array_equal(sliding.resize_nearest(seg, size), ref)


# ------------------------------------------------------------------------------ fake head ---
class _FakeBackbone:
    """The ``UMGModel`` surface ``common.encode_images`` and the head use; dense = pixels."""

    def __init__(self, size: int):
        self.image_size = size
        self.pixel_mean, self.pixel_std = inference.MEAN, inference.STD
        self.params = {"logit_scale": np.float32(np.log(10.0))}
        self.config = mlc.ConfigDict({"vision": {"patch_size": 1}, "logit_scale_max": 100.0,
                                      "embed_dim": 3})
        self.model = self

    def apply(self, variables, x, method=None):
        return {"img": x.mean((1, 2)), "dense": x}


def _fake_segmenter(size: int = 32) -> types.SimpleNamespace:
    """Query q of every window = palette colour q: mask logit +20 on the window's pixels of that
    colour, -20 elsewhere; class logits 10 x one-hot(q) (void last)."""
    colours = (PALETTE / 255.0 - inference.MEAN) / inference.STD

    def decode(params, image, dense, text):
        image = np.asarray(image)
        idx = ((image[..., None, :] - colours) ** 2).sum(-1).argmin(-1)  # [B, S, S]
        q = np.arange(len(PALETTE))
        masks = np.where(idx[:, None] == q[:, None, None], 20.0, -20.0).astype(np.float32)
        cls = np.broadcast_to(10 * np.eye(len(PALETTE), len(PALETTE) + 1, dtype=np.float32),
                              (len(image), len(PALETTE), len(PALETTE) + 1))
        return masks, cls

    seg = mlc.ConfigDict({"object_threshold": 0.8, "overlap_threshold": 0.8,
                          "ensemble_alpha": 0.4, "ensemble_beta": 0.8, "ensemble": False})
    return types.SimpleNamespace(backbone=_FakeBackbone(size), seg_params=None, decode=decode,
                                 config=mlc.ConfigDict({"seg": seg}), train_labels=set())


def _scene():
    """32 x 52 (windows at x = 0 and 20, shared columns 20-31): grass everywhere; sky patches at
    the top left (window A only) and top right (window B only); person 1 in A only, person 2 in
    B only; a car across the border (columns 14-40). Returns ``(colour map, expected
    partition)``: one car, two persons, one grass, one sky segment (both patches)."""
    cm = np.full((32, 52), 2)
    cm[0:6, 0:12] = 3
    cm[0:6, 40:52] = 3
    cm[10:18, 2:9] = 0
    cm[10:18, 44:51] = 0
    cm[20:28, 14:41] = 1
    ids = np.where(cm == 0, 0, cm + 10)
    ids[10:18, 44:51] = 1
    want = {(int(cm[ids == i][0]), frozenset(np.flatnonzero(ids == i).tolist()))
            for i in np.unique(ids)}
    return cm, want


def _run_fake(seg, cm, **kw):
    opts = Options(data=pathlib.Path("."), short_side=cm.shape[0], batch_size=3, **kw)
    return list(sliding.sliding_head_panoptic(seg, [PALETTE[cm]], np.eye(4, dtype=np.float32),
                                              ISTHING, np.zeros(4, bool), opts, False))


def test_objects_across_windows_are_one_instance_and_stuff_one_segment(monkeypatch):
    seg = _fake_segmenter()
    cm, want = _scene()
    assert sliding.window_starts(52, 32, sliding.window_stride(seg.backbone, Options(
        data=pathlib.Path(".")))) == [0, 20]
    (pseg, pcls), = _run_fake(seg, cm)
    assert pseg.shape == cm.shape
    assert _partition(pseg, pcls) == want
    # an object wholly inside the shared columns, seen whole by both windows: one instance
    cm2 = np.full((32, 52), 2)
    cm2[8:20, 22:30] = 0
    (pseg, pcls), = _run_fake(seg, cm2)
    assert sorted(pcls.values()) == [0, 2]
    assert (pseg[8:20, 22:30] == pseg[10, 25]).all() and pcls[int(pseg[10, 25])] == 0
    # without fusing the two windows' car queries, they split the shared columns (first one
    # wins the ties) and the second fails the overlap rule: the car's right part is lost
    monkeypatch.setattr(sliding, "FUSE_IOU", 2.0)
    (pseg, pcls), = _run_fake(seg, cm)
    car = [s for s, c in pcls.items() if c == 1]
    assert len(car) == 1 and set(np.unique(pseg[20:28, 32:41]).tolist()) == {-1}
    assert (pseg[20:28, 14:32] == car[0]).all()


def test_fusion_never_joins_two_queries_of_one_window():
    """Two persons of window A, both overlapping one wide person query of window B: the B query
    joins the better match only; A's two stay two instances."""
    s = 8
    m = np.zeros((3, s, s), np.float32)
    m[0, :, 3:6] = 1  # A: columns 3-5
    m[1, :, 6:8] = 1  # A: columns 6-7
    m[2, :, 0:6] = 1  # B (x = 2): image columns 2-7
    probs = np.tile(np.array([[0.9, 0, 0, 0, 0.1]], np.float32), (3, 1))
    low = np.array([[0.5, 0, 0, 0, 0.5]], np.float32)  # below the object threshold
    cands = sliding.window_candidates(probs[:2], m[:2], 0, 0, 0, 0.8) + \
        sliding.window_candidates(np.concatenate([probs[2:], low]), m[[2, 0]], 1, 0, 2, 0.8)
    assert [c.sid for c in cands] == [0, 1, 2]
    # shared columns 2-7: IoU(A0, B) = 3 / 6, IoU(A1, B) = 2 / 6
    assert sliding._fuse(cands, 0.3) == [[0, 2], [1]]
    seg, cls = sliding.merge_candidates(cands, (s, 10), ISTHING, 0.5, fuse_iou=0.3)
    assert cls == {0: 0, 1: 0}
    # fused mask: A0 and B averaged where both cover (1 on columns 3-5, 0.5 on 2 and 6-7), A0
    # alone on 0-1 and B alone on 8-9 (0); score 0.9. A1 (0.9 x 1) beats it on 6-7; it keeps
    # 2-5, 4 of its 6 own columns (>= 0.5)
    assert (seg[:, 2:6] == 0).all() and (seg[:, 6:8] == 1).all()
    assert (seg[:, :2] == -1).all() and (seg[:, 8:] == -1).all()
    assert sliding.merge_candidates(cands, (s, 10), ISTHING, 0.7, fuse_iou=0.3)[1] == {1: 0}


def test_bad_input():
    seg = _fake_segmenter()
    cm, _ = _scene()
    with pytest.raises(BenchmarkInputError, match="resize_pos"):
        _run_fake(seg, cm, resize_pos=True)
    with pytest.raises(ValueError, match="one entry per class"):
        next(sliding.sliding_head_panoptic(seg, [PALETTE[cm]], np.eye(4, dtype=np.float32),
                                           ISTHING[:3], np.zeros(4, bool),
                                           Options(data=pathlib.Path("."), short_side=32),
                                           False))


# ---------------------------------------------------------------------- the real tiny model ---
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return inference.load(str(make_tiny_workdir(tmp_path_factory.mktemp("wd"))))


def _tiny_segmenter(tiny, **seg):
    from umg_jax import config_lib
    from umg_jax.models import mask_decoder

    c = config_lib.load_config(str(ROOT / "configs/seg_tiny.py"))
    c.model = mlc.ConfigDict(tiny.config.to_dict())
    c.seg.update(num_queries=6, width=32, layers=1, heads=2, stem_channels=16, **seg)
    return inference.Segmenter(tiny, mask_decoder.init_params(c, jax.random.key(0)), c,
                               ["person"])


def test_real_head_one_window_equals_predict(tiny):
    """An image at the model's input size is one window: the result is the head's own
    ``Segmenter.predict`` panoptic output (random decoder, low thresholds so segments exist),
    with and without the FC-CLIP ensemble."""
    seg = _tiny_segmenter(tiny, object_threshold=0.0, overlap_threshold=0.2)
    s = tiny.image_size
    img = np.random.default_rng(3).integers(0, 256, (s, s, 3), dtype=np.uint8)
    labels = ["person", "sky", "grass"]
    isthing = np.array([True, False, False])
    text = tiny.encode_text_labels(labels, inference.DEFAULT_TEMPLATES)
    found = 0
    for ens in (False, True):
        (got, cls), = sliding.sliding_head_panoptic(
            seg, [img], text, isthing, np.array([1, 0, 0], bool),
            Options(data=pathlib.Path("."), short_side=s, batch_size=4), ens)
        want = seg.predict(img, labels, isthing=isthing, ensemble=ens)
        np.testing.assert_array_equal(got, want["panoptic"])
        assert {k: labels[v] for k, v in cls.items()} == {k: lab for k, (lab, _) in
                                                          want["segments"].items()}
        found += len(cls)
    assert found > 0


def test_benchmark_panoptic_head_runs_at_benchmark_resolution(tiny, tmp_path, monkeypatch):
    data = write_coco_panoptic(tmp_path / "coco")
    seg = _tiny_segmenter(tiny, object_threshold=0.3, overlap_threshold=0.5, ensemble=True)
    opts = Options(data=data, workers=2, batch_size=4)
    r = common.get_task("coco_panoptic")(BenchModel(tiny, seg, 7, "seg"), opts)
    p = r.protocol
    assert p["predictor"].startswith("segmentation head") and "sliding" in p["predictor"]
    assert p["inference"].startswith("sliding window")
    assert (p["short_side"], p["model_input"], p["window"], p["window_stride_px"]) == (
        64, 32, 32, 21)
    assert p["object_threshold"] == 0.3 and p["fuse_iou"] == sliding.FUSE_IOU
    assert p["seen_classes"] == 1 and r.num_examples == 2
    for k in ("pq", "sq", "rq"):
        assert math.isnan(r.metrics[k]) or 0 <= r.metrics[k] <= 100
    assert "published test defaults" in p["thresholds_source"]
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "seg_calibration.json").write_text(json.dumps(
        {"object_threshold": 0.3, "overlap_threshold": 0.5, "objective": "pq_seen",
         "split": "synthetic val"}))
    src = panoptic.predictor_protocol(BenchModel(tiny, seg, 7, str(wd)), opts)
    assert src["thresholds_source"].startswith("the run's validation split")
    assert "synthetic val" in src["thresholds_source"]
    # the 32 x 40 images: resized to 64 x 80 (3 x 4 windows), segments back at 32 x 40
    img = inference.read_image(sorted((data / "val2017").iterdir())[0])
    windows = []
    original = sliding.window_candidates

    def spy(probs, mask_prob, window, y, x, thr):
        windows.append((window, y, x, mask_prob.shape[1:]))
        return original(probs, mask_prob, window, y, x, thr)

    monkeypatch.setattr(sliding, "window_candidates", spy)
    text = tiny.encode_text_labels(list(PAN_NAMES), ("{}",))
    (pseg, pcls), = sliding.sliding_head_panoptic(
        seg, [img], text, np.array([1, 1, 0, 0], bool), np.zeros(4, bool), opts, True)
    assert windows == [(i, y, x, (32, 32)) for i, (y, x) in enumerate(
        (y, x) for y in (0, 21, 32) for x in (0, 21, 42, 48))]
    assert pseg.shape == (32, 40) and pseg.dtype == np.int32
    assert set(np.unique(pseg).tolist()) - {-1} == set(pcls) and len(pcls) > 0
    with pytest.raises(BenchmarkInputError, match="resize_pos"):
        common.get_task("coco_panoptic")(BenchModel(tiny, seg, 7, "seg"),
                                         dataclasses.replace(opts, resize_pos=True))
