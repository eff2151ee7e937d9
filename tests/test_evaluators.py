"""Evaluators (umg_jax/evaluators): metric cores against torchmetrics and hand-computed cases, and
each evaluator end to end with a fake encoder whose embeddings make the answer known."""

import numpy as np
import pytest

from umg_jax import evaluators
from umg_jax.evaluators import metrics
from umg_jax.evaluators.panoptic import merge_stuff
from umg_jax.evaluators.semseg import semantic_target

# ------------------------------------------------------------------------ metric cores ---


def test_topk_and_retrieval_by_hand():
    logits = np.array([[3.0, 2, 1], [1, 3, 2], [1, 2, 3]])
    acc = metrics.topk_accuracy(logits, np.array([0, 2, 0]), (1, 2))
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    eye = np.eye(4)
    r = metrics.retrieval_recall(eye, eye, np.arange(4))
    assert r["i2t_r1"] == r["t2i_r1"] == 1.0
    # two captions per image: texts 0, 1 belong to image 0, texts 2, 3 to image 1
    img = np.array([[1.0, 0], [0, 1]])
    txt = np.array([[1.0, 0], [0, 1], [0.6, 0.8], [0.8, 0.6]])
    r = metrics.retrieval_recall(img, txt, np.array([0, 0, 1, 1]), ks=(1, 2))
    # image 0's nearest text is its own (1, 0); image 1's nearest is (0, 1), image 0's: miss
    assert r["i2t_r1"] == 0.5 and r["i2t_r2"] == 1.0
    # texts 0 and 2 find their image first, texts 1 and 3 the other one
    assert r["t2i_r1"] == 0.5 and r["t2i_r2"] == 1.0


def test_miou_matches_torchmetrics(torch_mod):
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.default_rng(0)
    c = 5
    gt = rng.integers(-1, c, (3, 17, 19))
    pred = np.where(rng.random(gt.shape) < 0.6, np.clip(gt, 0, None), rng.integers(0, c, gt.shape))
    ours = metrics.semseg_scores(metrics.confusion_matrix(pred, gt, c))
    ref = MulticlassJaccardIndex(num_classes=c, average="none", ignore_index=-1)(
        torch_mod.as_tensor(pred), torch_mod.as_tensor(gt)).numpy()
    np.testing.assert_allclose(ours["iou"], ref, rtol=1e-6)
    np.testing.assert_allclose(ours["miou"], ref.mean(), rtol=1e-6)
    assert ours["pixel_acc"] == pytest.approx(np.mean(pred[gt >= 0] == gt[gt >= 0]))


def _pq_case(rng, h=24, w=24):
    """Random panoptic GT / prediction as (segment map, {id: class}) with things and stuff."""
    def one():
        seg = np.zeros((h, w), np.int64)
        cls = {0: 3}  # stuff background, class 3
        for k in range(1, 4):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            seg[y:y + rng.integers(4, 9), x:x + rng.integers(4, 9)] = k
            cls[k] = int(rng.integers(0, 3))  # thing classes 0..2
        return seg, cls
    return one(), one()


def test_pq_matches_torchmetrics(torch_mod):
    from torchmetrics.detection import PanopticQuality

    rng = np.random.default_rng(1)
    isthing = np.array([True, True, True, False])
    for trial in range(4):
        (gs, gc), (ps, pc) = _pq_case(rng)
        if trial == 0:
            ps, pc = gs.copy(), dict(gc)  # perfect prediction
        acc = metrics.PanopticAccumulator(4, isthing)
        acc.update(ps, pc, gs, gc)
        ours = acc.scores()

        def to_tm(seg, cls):
            cat = np.vectorize(cls.get)(seg)
            inst = np.where(isthing[cat], seg, 0)
            return torch_mod.as_tensor(np.stack([cat, inst], -1)[None])

        pq = PanopticQuality(things={0, 1, 2}, stuffs={3}, return_sq_and_rq=True,
                             return_per_class=True)
        ref = pq(to_tm(ps, pc), to_tm(gs, gc)).numpy()  # [C, 3]: pq, sq, rq per class
        seen = (acc.tp + acc.fp + acc.fn) > 0
        np.testing.assert_allclose(ours["pq"], ref[seen, 0].mean(), rtol=1e-5, err_msg=trial)
        np.testing.assert_allclose(ours["rq"], ref[seen, 2].mean(), rtol=1e-5)
        if trial == 0:
            assert ours["pq"] == ours["sq"] == ours["rq"] == 1.0


def test_pq_void_pixels_by_hand():
    gt = np.full((4, 10), -1)
    gt[:, :5] = 0  # one thing of class 0, 20 px; the right half is unlabeled
    pred = np.zeros((4, 10), np.int64)  # one predicted segment over everything (40 px)
    acc = metrics.PanopticAccumulator(1, np.array([True]))
    acc.update(pred, {0: 0}, gt, {0: 0})
    # IoU = 20 / (20 + 40 - 20 void - 20) = 1: the void half is not counted against it
    assert acc.scores()["pq"] == 1.0
    acc = metrics.PanopticAccumulator(1, np.array([True]))
    other = np.where(np.arange(10)[None] < 2, 0, 1).repeat(4, 0)  # 8 px on the thing, 32 px else
    acc.update(other, {0: 0, 1: 0}, gt, {0: 0})
    # seg 1: 12 px on the thing, 20 on void: IoU = 12 / (20 + 32 - 20 - 12) = 0.6 -> match;
    # seg 0 (8 px, no void) is a false positive: PQ = 0.6 / (1 + 0.5 * 1) = 0.4
    s = acc.scores()
    assert (acc.tp[0], acc.fp[0], acc.fn[0]) == (1, 1, 0)
    assert s["pq"] == pytest.approx(0.4) and s["sq"] == pytest.approx(0.6)


def test_merge_stuff_and_semantic_target():
    isthing = np.array([True, False, False])
    np.testing.assert_array_equal(merge_stuff(np.array([0, 1, 0, 1, 2]), isthing),
                                  [0, 1, 2, 1, 4])
    seg = np.array([[[0, 1], [-1, 1]]])
    np.testing.assert_array_equal(semantic_target(seg, np.array([[5, 7]])), [[[5, 7], [-1, 7]]])


# -------------------------------------------------------------------- end to end (fake) ---

C, E, G, S = 4, 8, 4, 16  # classes, embed dim, grid, image side
CATS = ["cat", "dog", "grass", "sky"]
ISTHING = [True, True, False, False]


class FakeEncoder:
    """Class c's text embedding is e_c. Image channel 0 holds each pixel's class (dense features
    = the class embedding of each cell), channel 1 the image's class, channel 2 its index i; the
    image embedding is e_class + 0.5 e_(4 + i) and caption i embeds as e_(4 + i)."""

    def __init__(self, noise=0.0):
        self.noise = noise

    def encode_text_labels(self, labels, templates=()):
        return np.eye(C, E)[[CATS.index(x) for x in labels]]

    def tokenize(self, texts):
        return np.array([[len(t)] for t in texts])

    def encode_text(self, tokens):
        return np.eye(E)[4 + np.asarray(tokens)[:, 0] % 4]

    def encode_image(self, images):
        cls = images[..., 0].astype(int)  # [B, S, S] class per pixel
        cells = cls[:, S // G // 2::S // G, S // G // 2::S // G]  # [B, G, G]
        dense = np.eye(C, E)[cells] + self.noise * np.random.default_rng(0).normal(
            size=(*cells.shape, E))
        g, i = images[:, 0, 0, 1].astype(int), images[:, 0, 0, 2].astype(int)
        return np.eye(E)[g] + 0.5 * np.eye(E)[4 + i % 4], dense


def _batch(b=4):
    """Images where the left half is 'cat' (a thing mask) and the right half 'sky' (stuff)."""
    image = np.zeros((b, S, S, 3), np.float32)
    image[:, :, S // 2:, 0] = 3
    image[..., 2] = np.arange(b)[:, None, None]
    segmap = np.zeros((b, S, S), np.int32)
    segmap[:, :, S // 2:] = 1
    area = np.zeros((b, 3, G, G), np.float32)
    area[:, 0, :, :G // 2] = 1
    area[:, 1, :, G // 2:] = 1
    return {
        "image": image, "label": np.zeros(b, np.int32),
        "text": np.arange(b)[:, None], "text_valid": np.ones(b, bool),
        "region_boxes": np.tile(np.array([[0, 0, 0.5, 1.0], [0.5, 0, 1, 1], [0, 0, 1, 1]],
                                         np.float32), (b, 1, 1)),
        "region_valid": np.tile([True, True, False], (b, 1)),
        "region_class": np.tile([0, 3, -1], (b, 1)).astype(np.int32),
        "mask_area": area, "mask_valid": np.tile([True, True, False], (b, 1)),
        "mask_class": np.tile([0, 3, -1], (b, 1)).astype(np.int32),
        "mask_isthing": np.tile([True, False, False], (b, 1)), "segmap": segmap,
    }


def test_evaluators_end_to_end_known_answers():
    evs = evaluators.make_evaluators(evaluators.NAMES, CATS, ISTHING)
    batches = evaluators.encode_batches(FakeEncoder(), [_batch()])
    res = {}
    for ev in evs.values():
        res.update(ev.run(FakeEncoder(), batches))
    assert res["zeroshot/top1"] == 1.0
    assert res["retrieval/i2t_r1"] == res["retrieval/t2i_r1"] == 1.0
    assert res["region/box_acc"] == 1.0 and res["region/mask_acc"] == 1.0
    assert res["region/box_mean_class_acc"] == 1.0
    assert res["semseg/miou"] == 1.0 and res["semseg/pixel_acc"] == 1.0
    assert res["panoptic/pq"] == 1.0 and res["panoptic/pq_stuff"] == 1.0


def test_evaluators_degrade_with_wrong_features():
    b = _batch()
    b["image"][..., 0] = 1  # every cell looks like 'dog'
    b["image"][..., 1] = 1  # and so does the whole image
    res = evaluators.make_evaluators(["semseg", "panoptic", "region", "zeroshot"], CATS, ISTHING)
    out = {}
    for ev in res.values():
        out.update(ev.run(FakeEncoder(), [b]))
    assert out["semseg/pixel_acc"] == 0.0 and out["semseg/miou"] == 0.0
    assert out["region/mask_acc"] == 0.0 and out["panoptic/pq"] == 0.0
    assert out["zeroshot/top1"] == 0.0 and out["zeroshot/top5"] == 1.0  # 2 thing classes


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        evaluators.make_evaluators(["semseg"], [])
    with pytest.raises(ValueError, match="unknown evaluators"):
        evaluators.make_evaluators(["nope"], CATS)
    b = _batch()
    del b["segmap"]
    with pytest.raises(ValueError, match="missing"):
        evaluators.make_evaluators(["semseg"], CATS)["semseg"].run(FakeEncoder(), [b])
