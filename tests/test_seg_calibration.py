"""umg_jax/evaluators/seg_calibration.py: thresholds chosen on a validation split, by hand."""

import ml_collections as mlc
import numpy as np
import pytest
from test_seg_eval import ISTHING, _FakeEncoder, _scene

from umg_jax.evaluators import seg_calibration as sc

CFG = mlc.ConfigDict({"ensemble": False, "ensemble_alpha": 0.4, "ensemble_beta": 0.8,
                      "object_threshold": 0.8, "overlap_threshold": 0.8})
ENSEMBLE_CFG = mlc.ConfigDict(dict(CFG.to_dict(), ensemble=True))


def _unsure_decoder():
    """Perfect masks; the two thing queries say class 0 with probability e^.2 / (e^.2 + 1) =
    0.550 (class 1 the rest), the stuff query is sure, query 3 is void."""
    batch = _scene()
    logits = np.where(batch["segmap"][0][None] == np.arange(4)[:, None, None], 20.0, -20.0)
    cls = np.full((4, 4), -30.0, np.float32)
    cls[0, :2] = cls[1, :2] = [0.2, 0.0]
    cls[2, 2] = cls[3, 3] = 30.0

    def decode(image, dense, text):
        return logits[None].astype(np.float32), cls[None]

    return batch, decode


def test_unsure_things_need_a_lower_object_threshold():
    batch, decode = _unsure_decoder()
    r = sc.calibrate_thresholds(_FakeEncoder(), decode, [batch], ["a", "b", "c"], ISTHING,
                                [True, True, True], CFG)
    rows = {(o, v): (pq_seen, pq) for o, v, pq_seen, pq in r["grid"]}
    # At 0.8 / 0.7 / 0.6 both instances of "a" are dropped: PQ(a) = 0, PQ(c) = 1 ("b" absent).
    for o in (0.8, 0.7, 0.6):
        assert rows[(o, 0.8)][0] == pytest.approx(0.5)
    # From 0.5 down (0.550 > 0.5) every segment is found exactly: PQ 1.
    for o in (0.5, 0.4, 0.0):
        assert rows[(o, 0.5)][0] == pytest.approx(1.0)
    # Ties go to the highest thresholds.
    assert (r["object_threshold"], r["overlap_threshold"]) == (0.5, 0.8)
    assert r["score"] == pytest.approx(1.0) and r["num_images"] == 1
    assert r["variant"] == "head" and r["objective"] == "pq_seen"
    assert len(r["grid"]) == len(sc.OBJECT_GRID) * len(sc.OVERLAP_GRID)


def test_held_out_classes_do_not_inform_the_choice():
    batch, decode = _unsure_decoder()
    # "a" held out: only "c" is scored, and it is found at every threshold: a tie, so the
    # highest thresholds stay although PQ over all classes would prefer 0.5.
    r = sc.calibrate_thresholds(_FakeEncoder(), decode, [batch], ["a", "b", "c"], ISTHING,
                                [False, True, True], CFG)
    assert (r["object_threshold"], r["overlap_threshold"]) == (0.8, 0.8)
    pq_all = {(o, v): pq for o, v, _, pq in r["grid"]}
    assert pq_all[(0.5, 0.8)] > pq_all[(0.8, 0.8)]
    with pytest.raises(ValueError, match="at least one class"):
        sc.calibrate_thresholds(_FakeEncoder(), decode, [batch], ["a", "b", "c"], ISTHING,
                                [False] * 3, CFG)
    with pytest.raises(ValueError, match="empty"):
        sc.calibrate_thresholds(_FakeEncoder(), decode, [], ["a", "b", "c"], ISTHING,
                                [True] * 3, CFG)


def _half_mask_decoder():
    """Sure classes; the stuff query's mask covers only the left half of the "c" region (the
    right half is covered by no query), so the head alone labels those pixels by its tiny
    leftovers: "a", the class with the most query probability."""
    batch, _ = _unsure_decoder()
    seg = batch["segmap"][0]
    logits = np.where(seg[None] == np.arange(4)[:, None, None], 20.0, -20.0)
    logits[2][:, 4:] = -20.0
    cls = np.full((4, 4), -30.0, np.float32)
    cls[0, 0] = cls[1, 0] = cls[2, 2] = cls[3, 3] = 30.0

    def decode(image, dense, text):
        return logits[None].astype(np.float32), cls[None]

    return batch, decode


def test_pixel_weight_chosen_on_seen_classes():
    batch, decode = _half_mask_decoder()
    r = sc.calibrate_thresholds(_FakeEncoder(), decode, [batch], ["a", "b", "c"], ISTHING,
                                [True, True, True], ENSEMBLE_CFG)
    miou = dict(r["pixel_grid"])
    assert sorted(miou) == sorted(sc.PIXEL_GRID) and r["pixel_objective"] == "miou_seen"
    # Weight 0: the uncovered "c" pixels (columns 4-7 outside the "a" instances) go to "a";
    # the frozen map (exact one-hot features) labels them all.
    assert miou[0.0] < 1.0
    assert miou[0.1] == pytest.approx(1.0)
    assert r["pixel_weight"] == 0.1  # every positive weight is perfect: the smallest wins
    # The head alone (no ensemble): no pixel weight is chosen.
    r = sc.calibrate_thresholds(_FakeEncoder(), decode, [batch], ["a", "b", "c"], ISTHING,
                                [True, True, True], CFG)
    assert "pixel_weight" not in r


def test_pixel_weight_ignores_held_out_pixels():
    batch, decode = _half_mask_decoder()
    # "c" held out: the pixels the frozen map fixes are its own, so they are ignored and every
    # weight ties at a perfect "a"; the smallest (0: masks only) stays.
    r = sc.calibrate_thresholds(_FakeEncoder(), decode, [batch], ["a", "b", "c"], ISTHING,
                                [True, True, False], ENSEMBLE_CFG)
    assert r["pixel_weight"] == 0.0
    assert all(m == pytest.approx(1.0) for _, m in r["pixel_grid"])
