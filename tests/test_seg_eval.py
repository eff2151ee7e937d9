"""umg_jax/evaluators/segmentation.py: ensemble, semantic / panoptic inference, the evaluation."""

import math

import ml_collections as mlc
import numpy as np
import pytest

from umg_jax.evaluators import segmentation as se

ISTHING = np.array([True, True, False])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_ensemble_probs_hand_computed():
    head = np.array([[2.0, 0.0, -1.0, 0.5]])  # 3 classes + void
    frozen = np.array([[0.0, 3.0, 1.0]])
    seen = np.array([True, False, True])
    got = se.ensemble_probs(head, frozen, seen, alpha=0.4, beta=0.8)
    p_in, p_out = _softmax(head[0, :3]), _softmax(frozen[0])
    a = np.array([0.4, 0.8, 0.4])
    geo = p_in ** (1 - a) * p_out ** a
    void = _softmax(head[0])[3]
    ref = np.concatenate([geo / geo.sum() * (1 - void), [void]])
    np.testing.assert_allclose(got[0], ref, rtol=1e-5)
    assert got.sum() == pytest.approx(1.0, abs=1e-6)


def _two_queries():
    mask = np.zeros((3, 4, 6), np.float32)
    mask[0, :, :3] = 0.9
    mask[1, :, 3:] = 0.9
    mask[2] = 0.6  # a low-confidence query covering everything
    probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.02, 0.9, 0.05, 0.03],
                      [0.3, 0.2, 0.1, 0.4]])
    return probs, mask


def test_semantic_inference_sums_queries():
    probs, mask = _two_queries()
    sem = se.semantic_inference(probs, mask)
    assert (sem[:, :3] == 0).all() and (sem[:, 3:] == 1).all()


def test_panoptic_inference_thresholds_things_and_stuff():
    probs, mask = _two_queries()
    seg, cls = se.panoptic_inference(probs, mask, ISTHING, 0.5, 0.8)
    assert sorted(cls.values()) == [0, 1]  # the void-ish third query is dropped
    assert len(np.unique(seg)) == 2 and (seg >= 0).all()
    # Two stuff queries of the same class become one segment.
    probs2 = probs.copy()
    probs2[:2] = [0.02, 0.03, 0.9, 0.05]
    seg2, cls2 = se.panoptic_inference(probs2, mask, ISTHING, 0.5, 0.8)
    assert list(cls2.values()) == [2] and (seg2 == next(iter(cls2))).all()
    # A query that keeps too little of its own mask is dropped (overlap threshold).
    mask3 = mask.copy()
    mask3[1, :, 2:] = 0.95  # query 1 now also claims column 2, which query 0 wins... partly
    mask3[0, :, :3] = 0.99
    seg3, cls3 = se.panoptic_inference(probs, mask3, ISTHING, 0.5, 0.9)
    assert set(cls3) == {0}


def test_free_panoptic_splits_thing_components_and_merges_stuff():
    sem = np.full((6, 6), 2)
    sem[0:2, 0:2] = 0
    sem[4:6, 4:6] = 0
    sem[0:2, 4:6] = 1
    seg, cls = se.free_panoptic(sem, ISTHING)
    assert sorted(cls.values()) == [0, 0, 1, 2]
    assert len(np.unique(seg)) == 4 and (seg >= 0).all()


class _FakeEncoder:
    """Dense features = the class one-hot stored in the image's channels, 2x2-pooled."""

    params = {"logit_scale": np.float32(math.log(50.0))}
    config = mlc.ConfigDict({"logit_scale_max": math.log(100.0)})

    def encode_image(self, images):
        b, h, w, c = images.shape
        dense = images.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))
        return dense.mean((1, 2)), dense

    def encode_text_labels(self, labels, templates):
        return np.eye(len(labels), dtype=np.float32)


def _scene():
    seg = np.full((1, 8, 8), 2, np.int32)
    seg[0, :4, :4] = 0
    seg[0, :4, 6:] = 1
    mask_class = np.array([[0, 0, 2]], np.int32)
    cls_map = mask_class[0][seg[0]]
    image = np.eye(3, dtype=np.float32)[cls_map][None]
    batch = {"image": image, "segmap": seg, "mask_class": mask_class,
             "mask_valid": np.ones((1, 3), bool)}
    return batch


def test_fuse_pixels_hand_computed():
    # Two pixels, two classes. Pixel 0: the head's scores 0.3 / 0.1 (normalised 0.75 / 0.25),
    # the frozen map 0.2 / 0.8. Pixel 1: the head's masks barely cover it (1e-9 / 3e-9).
    scores = np.array([[0.3, 0.1], [1e-9, 3e-9]], np.float32)
    logp = np.log(np.array([[0.2, 0.8], [0.9, 0.1]], np.float32))
    assert se.fuse_pixels(scores, logp, 0.0) is scores  # weight 0: Mask2Former's scores
    assert se.fuse_pixels(scores, None, 0.5) is scores
    fused = se.fuse_pixels(scores, logp, 0.5)
    want = 0.5 * np.log(np.array([[0.75, 0.25], [0.25, 0.75]]) + 1e-8) + 0.5 * logp
    np.testing.assert_allclose(fused, want, rtol=1e-5)
    # 0.75^.5 0.2^.5 = 0.387 < 0.25^.5 0.8^.5 = 0.447; 0.25^.5 0.9^.5 = 0.474 > 0.75^.5 0.1^.5
    assert fused.argmax(-1).tolist() == [1, 0]
    assert se.fuse_pixels(scores, logp, 1.0).argmax(-1).tolist() == logp.argmax(-1).tolist()


def test_pixel_log_probs_and_fused_semantic_inference():
    enc = _FakeEncoder()
    dense = np.eye(3, dtype=np.float32)[np.array([[0, 2], [2, 1]])][None]  # [1, 2, 2, 3]
    text = enc.encode_text_labels(["a", "b", "c"], None)
    logp = se.pixel_log_probs(dense, text, 50.0, (2, 2))  # same size: no resampling
    want = np.log(_softmax(50.0 * dense @ text.T))
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)
    # One query, class "a" at 0.9, its mask on pixel (0, 0): the head alone calls every pixel
    # "a"; at weight 0.5 the frozen map (sure, at scale 50) outvotes it where they disagree.
    probs = np.array([[0.9, 0.05, 0.05, 0.0]], np.float32)
    mask = np.array([[[0.99, 0.01], [0.01, 0.01]]], np.float32)
    assert se.semantic_inference(probs, mask).tolist() == [[0, 0], [0, 0]]
    assert se.semantic_inference(probs, mask, logp[0], 0.5).tolist() == [[0, 2], [2, 1]]


def test_evaluation_of_a_perfect_decoder_scores_one():
    batch = _scene()
    logits = np.where(batch["segmap"][0][None] == np.arange(4)[:, None, None], 20.0, -20.0)
    cls = np.full((4, 4), -10.0, np.float32)
    cls[0, 0] = cls[1, 0] = cls[2, 2] = cls[3, 3] = 10.0  # query 3 is void

    def decode(image, dense, text):
        assert text.shape == (3, 3)
        return logits[None].astype(np.float32), cls[None]

    cfg = mlc.ConfigDict({"ensemble_alpha": 0.4, "ensemble_beta": 0.8,
                          "object_threshold": 0.5, "overlap_threshold": 0.8})
    out = se.evaluate_segmentation(_FakeEncoder(), decode, [batch], ["a", "b", "c"], ISTHING,
                                   [True, False, True], cfg)
    for v in ("head", "ensemble"):
        assert out[f"{v}/miou"] == pytest.approx(1.0)
        assert out[f"{v}/pq"] == pytest.approx(1.0)
        assert out[f"{v}/pq_things"] == pytest.approx(1.0)
        assert math.isnan(out[f"{v}/miou_unseen"])  # class "b" never occurs
    # The training-free baseline sees exact one-hot features too but merges the two touching-free
    # instances only by connectivity: still a valid score in [0, 1].
    assert 0.0 <= out["free/pq"] <= 1.0 and out["free/miou"] > 0.5
    with pytest.raises(ValueError, match="unknown segmentation variants"):
        se.evaluate_segmentation(_FakeEncoder(), decode, [batch], ["a", "b", "c"], ISTHING,
                                 [True] * 3, cfg, variants=("nope",))
