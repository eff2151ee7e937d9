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


def test_retrieval_ties_and_duplicate_captions_by_hand():
    """Exact ties have one answer. Texts 0 and 1 are one caption written for images 0 and 1 (a
    synthetic-world duplicate): a ranking by argsort puts text 0 first for image 1 too, so the
    old metric scored image 1 a miss or a hit depending on the texts' index order (or, when the
    copies differed by float noise, on that noise); as one gallery item it is correct for both."""
    img = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1, 0], [0, 0.6, 0.8]])
    cap = np.array([0.8, 0.6, 0])
    txt = np.array([cap, cap, [0, 1, 0], [0, 1, 0], [0, 0, 1]])
    owner = np.array([0, 1, 2, 3, 3])
    tid = np.array([7, 7, 1, 2, 3])  # texts 2 and 3 are different captions embedded alike
    r = metrics.retrieval_recall(img, txt, owner, ks=(1, 2), txt_id=tid)
    # i2t over the distinct texts {cap, t2, t3, t4}: images 0, 1 find cap first (hits); image 2
    # ties t2 (its own) with t3 (image 3's): 1/2 at k=1, 1 at k=2; image 3 finds t4 (0.8) first
    assert r["i2t_r1"] == (1 + 1 + 0.5 + 1) / 4 and r["i2t_r2"] == 1.0
    # t2i: each copy of cap scores images 0 and 1 alike (0.8): a tie of its image with a wrong
    # one (1/2 at k=1); t2 finds image 2; t3 finds image 2 (1) before its image 3 (0.6): k=2;
    # t4 finds image 3
    assert r["t2i_r1"] == (0.5 + 0.5 + 1 + 0 + 1) / 5 and r["t2i_r2"] == 1.0
    # the answer does not depend on the order of the texts nor of the images
    perm = np.array([4, 1, 3, 0, 2])
    assert metrics.retrieval_recall(img, txt[perm], owner[perm], (1, 2), tid[perm]) == r
    ip = np.array([3, 1, 0, 2])
    assert metrics.retrieval_recall(img[ip], txt, np.argsort(ip)[owner], (1, 2), tid) == r
    # without txt_id the copies of cap are two texts: images 0 and 1 each tie their own copy
    # with the other's
    plain = metrics.retrieval_recall(img, txt, owner, ks=(1, 2))
    assert plain["i2t_r1"] == (0.5 + 0.5 + 0.5 + 1) / 4 and plain["i2t_r2"] == 1.0
    # image 0: one better wrong text, then a tie of w=3 wrong and c=2 correct ones. k=1: miss;
    # k=2: 1 - C(3,1)/C(5,1) = 2/5; k=3: 1 - C(3,2)/C(5,2) = 7/10; k=4: 1 - C(3,3)/C(5,3) = 9/10;
    # k=5: 1. Image 1 finds its text [0, 1] first.
    img2 = np.array([[1.0, 0], [0, 1.0]])
    txt2 = np.array([[0.9, 0], [0.5, 0], [0.5, 0], [0.5, 0], [0.5, 0], [0.5, 0], [0, 1]])
    own2 = np.array([1, 0, 0, 1, 1, 1, 1])
    two = metrics.retrieval_recall(img2, txt2, own2, ks=(1, 2, 3, 4, 5))
    assert [two[f"i2t_r{k}"] for k in (1, 2, 3, 4, 5)] == pytest.approx(
        [(0 + 1) / 2, (0.4 + 1) / 2, (0.7 + 1) / 2, (0.9 + 1) / 2, 1.0], abs=1e-15)
    # a constant model is at chance, neither 0 (pessimistic) nor 1 (optimistic)
    flat = metrics.retrieval_recall(np.ones((8, 2)), np.ones((8, 2)), np.arange(8), ks=(1, 4))
    assert flat == pytest.approx({"i2t_r1": 1 / 8, "t2i_r1": 1 / 8, "i2t_r4": 0.5,
                                  "t2i_r4": 0.5}, abs=1e-15)


def _expected_hits_by_enumeration(sim, correct, k):
    """Mean over every order of the gallery consistent with ``sim`` (ties permuted) of
    'a correct item in the first k': the definition, computed the slow way."""
    import itertools

    hits = []
    for order in itertools.permutations(range(len(sim))):
        ranked = sorted(range(len(sim)), key=lambda g: (-sim[g], order.index(g)))
        hits.append(any(correct[g] for g in ranked[:k]))
    return float(np.mean(hits))


def test_retrieval_tie_rule_matches_enumeration():
    rng = np.random.default_rng(3)
    for _ in range(6):
        img = np.eye(3)[rng.integers(0, 3, 4)].astype(np.float64)  # few values: many ties
        txt = np.eye(3)[rng.integers(0, 3, 6)].astype(np.float64)
        owner = rng.integers(0, 4, 6)
        got = metrics.retrieval_recall(img, txt, owner, ks=(1, 2, 3))
        sim = img @ txt.T
        for k in (1, 2, 3):
            i2t = [_expected_hits_by_enumeration(sim[i], owner == i, k)
                   for i in range(4) if (owner == i).any()]
            t2i = [_expected_hits_by_enumeration(sim[:, j], np.arange(4) == owner[j], k)
                   for j in range(6)]
            assert got[f"i2t_r{k}"] == pytest.approx(np.mean(i2t), abs=1e-12)
            assert got[f"t2i_r{k}"] == pytest.approx(np.mean(t2i), abs=1e-12)


def test_retrieval_matches_torchmetrics_hit_rate_without_ties(torch_mod):
    from torchmetrics.functional.retrieval import retrieval_hit_rate

    rng = np.random.default_rng(4)
    img = rng.normal(size=(12, 6)).astype(np.float32)
    owner = np.concatenate([np.arange(12), rng.integers(0, 12, 14)])  # several captions each
    txt = (img[owner] + rng.normal(size=(26, 6))).astype(np.float32)
    got = metrics.retrieval_recall(img, txt, owner)
    sim = torch_mod.as_tensor(img.astype(np.float64) @ txt.T.astype(np.float64))
    own = torch_mod.as_tensor(owner)
    for k in (1, 5, 10):
        i2t = np.mean([float(retrieval_hit_rate(sim[i], own == i, top_k=k)) for i in range(12)])
        t2i = np.mean([float(retrieval_hit_rate(sim[:, j], torch_mod.arange(12) == owner[j],
                                                top_k=k)) for j in range(26)])
        assert got[f"i2t_r{k}"] == pytest.approx(i2t, abs=1e-12)
        assert got[f"t2i_r{k}"] == pytest.approx(t2i, abs=1e-12)


def test_retrieval_bad_input():
    txt = np.array([[1.0, 0], [0, 1]])
    with pytest.raises(ValueError, match="different embeddings"):
        metrics.retrieval_recall(txt, txt, np.array([0, 1]), txt_id=np.array([5, 5]))
    with pytest.raises(ValueError, match="outside"):
        metrics.retrieval_recall(txt, txt, np.array([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.retrieval_recall(txt * np.nan, txt, np.array([0, 1]))


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


class NoisyTextEncoder:
    """Token 5 -> e0, token 7 -> e2, plus 1e-6 * (row position in the call) on e1: copies of one
    caption encoded at different positions differ, as float rounding makes them differ when a
    batch's shape or composition changes."""

    def encode_text(self, tokens):
        tokens = np.asarray(tokens)
        emb = np.where(tokens[:, :1] == 5, np.eye(3)[0], np.eye(3)[2])
        return emb + 1e-6 * np.arange(len(tokens))[:, None] * np.eye(3)[1]


def test_retrieval_duplicate_captions_independent_of_batches():
    """Images 0 and 1 carry the same caption (tokens [5, 5]). Encoded per row, the copy at the
    later position scored higher for image 0 (a miss: it is image 1's); encoded once, the
    caption is one text that both images retrieve first, whatever the batches."""
    enc = NoisyTextEncoder()
    assert not np.array_equal(*enc.encode_text([[5, 5], [5, 5]]))  # the noise is there
    s = 1 / np.sqrt(1.01)
    img = np.array([[s, 0.1 * s, 0], [s, 0, 0.1 * s], [0, 0, 1.0]])
    toks = np.array([[5, 5], [5, 5], [7, 7]])

    def batch(rows):
        return {"img_emb": img[rows], "text": toks[rows], "text_valid": np.ones(len(rows), bool)}

    ev = evaluators.make_evaluators(["retrieval"], CATS)["retrieval"]
    one = ev.run(enc, [batch([0, 1, 2])])
    # i2t: every image finds its caption first; t2i: the caption scores images 0 and 1 alike
    # (a tie: 1/2 each), the other caption finds image 2
    assert one["retrieval/i2t_r1"] == 1.0
    assert one["retrieval/t2i_r1"] == pytest.approx((0.5 + 0.5 + 1) / 3, abs=1e-15)
    assert ev.run(enc, [batch([0]), batch([1, 2])]) == one
    assert ev.run(enc, [batch([0, 1]), batch([2])]) == one


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        evaluators.make_evaluators(["semseg"], [])
    with pytest.raises(ValueError, match="unknown evaluators"):
        evaluators.make_evaluators(["nope"], CATS)
    b = _batch()
    del b["segmap"]
    with pytest.raises(ValueError, match="missing"):
        evaluators.make_evaluators(["semseg"], CATS)["semseg"].run(FakeEncoder(), [b])
