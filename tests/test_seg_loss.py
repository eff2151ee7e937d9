"""umg_jax/losses/segmentation.py: pairwise mask costs, matching, the mask-classification loss."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from umg_jax.losses import segmentation as seg


def _cfg(**over):
    c = mlc.ConfigDict({"mask_stride": 2, "w_class": 2.0, "w_bce": 5.0, "w_dice": 5.0,
                        "void_weight": 0.1})
    c.update(over)
    return c


def test_pairwise_costs_match_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 30)).astype(np.float32)
    t = (rng.random((3, 30)) > 0.5).astype(np.float32)
    w = (rng.random(30) > 0.2).astype(np.float32)
    bce, dice = map(np.asarray, seg.pairwise_costs(jnp.asarray(x), jnp.asarray(t), jnp.asarray(w)))
    for n, m in itertools.product(range(5), range(3)):
        p = 1 / (1 + np.exp(-x[n].astype(np.float64)))
        ref_bce = -(w * (t[m] * np.log(p) + (1 - t[m]) * np.log(1 - p))).sum() / w.sum()
        ref_dice = 1 - (2 * (w * p * t[m]).sum() + 1) / ((w * p).sum() + (w * t[m]).sum() + 1)
        assert bce[n, m] == pytest.approx(ref_bce, rel=1e-5)
        assert dice[n, m] == pytest.approx(ref_dice, rel=1e-5)


def test_greedy_match_is_optimal_on_separated_costs_and_respects_validity():
    # Separated costs (each target has one clearly best, distinct query): greedy == Hungarian.
    rng = np.random.default_rng(1)
    for _ in range(20):
        n, m = 8, 5
        perm = rng.permutation(n)[:m]
        cost = rng.uniform(1.0, 2.0, size=(n, m)).astype(np.float32)
        cost[perm, np.arange(m)] = rng.uniform(0.0, 0.1, size=m)
        got = np.asarray(seg.greedy_match(jnp.asarray(cost), jnp.ones(m, bool)))
        rows, cols = linear_sum_assignment(cost)
        assert dict(zip(cols, rows, strict=True)) == dict(enumerate(got))
    valid = jnp.array([True, False, True])
    got = np.asarray(seg.greedy_match(jnp.zeros((4, 3)), valid))
    assert got[1] == -1 and got[0] != got[2] and min(got[0], got[2]) >= 0
    # Fewer queries than targets: the extra target stays unmatched.
    got = np.asarray(seg.greedy_match(jnp.zeros((2, 3)), jnp.ones(3, bool)))
    assert sorted(got.tolist()) == [-1, 0, 1]


def test_greedy_match_cost_close_to_hungarian_on_random_costs():
    rng = np.random.default_rng(2)
    ratios = []
    for _ in range(50):
        cost = rng.random((16, 8)).astype(np.float32)
        got = np.asarray(seg.greedy_match(jnp.asarray(cost), jnp.ones(8, bool)))
        rows, cols = linear_sum_assignment(cost)
        assert len(set(got.tolist())) == 8  # one-to-one
        ratios.append(cost[got, np.arange(8)].sum() / cost[rows, cols].sum())
    assert min(ratios) >= 1.0 - 1e-6
    assert np.mean(ratios) < 1.5  # greedy is a heuristic; far-off totals would mean a bug


def _batch_and_perfect_outputs(holdout_class: int | None = None):
    """Two 8x8 images with two segments each, and decoder outputs that predict them exactly."""
    segmap = np.full((2, 8, 8), -1, np.int32)
    segmap[0, :4] = 0
    segmap[0, 4:] = 1
    segmap[1, :, :4] = 0
    segmap[1, :, 4:6] = 1
    batch = {"segmap": jnp.asarray(segmap), "mask_valid": jnp.ones((2, 2), bool),
             "mask_class": jnp.array([[0, 1], [2, 1]], jnp.int32)}
    e = 3  # one-hot text embeddings: class c == axis c
    text = jnp.eye(e)
    tgt = seg.targets_at(batch["segmap"], 2)  # [2, 4, 4]
    n = 4
    logits = np.full((2, n, 4, 4), -20.0, np.float32)
    cls = np.zeros((2, n, e), np.float32)
    for b in range(2):
        for m in range(2):
            logits[b, m][np.asarray(tgt[b]) == m] = 20.0
            cls[b, m, int(batch["mask_class"][b, m])] = 1.0
    void = jnp.array([0.0, 0.0, 0.0, 1.0])  # void lives on a 4th axis
    text4 = jnp.concatenate([text, jnp.zeros((e, 1))], 1)
    cls4 = np.concatenate([cls, np.zeros((2, n, 1), np.float32)], -1)
    cls4[:, 2:, 3] = 1.0  # unmatched queries look like void
    out = {"mask_logits": jnp.asarray(logits), "class_emb": jnp.asarray(cls4),
           "void_emb": void, "log_scale": jnp.log(jnp.float32(30.0))}
    cmap = np.arange(3, dtype=np.int32)
    if holdout_class is not None:
        cmap[holdout_class] = -1
        cmap[cmap > holdout_class] -= 1
    return out, text4, batch, jnp.asarray(cmap)


def test_perfect_prediction_has_near_zero_loss_and_full_accuracy():
    out, text, batch, cmap = _batch_and_perfect_outputs()
    total, m = seg.seg_loss(out, text, batch, cmap, _cfg())
    assert float(m["acc_matched"]) == 1.0
    assert float(m["matched_per_image"]) == 2.0
    assert float(m["loss_bce"]) < 1e-6 and float(m["loss_dice"]) < 0.02
    assert float(m["loss_class"]) < 1e-3
    # Swapping two queries' masks breaks the prediction: the loss must notice.
    bad = dict(out, mask_logits=out["mask_logits"][:, ::-1])
    assert float(seg.seg_loss(bad, text, batch, cmap, _cfg())[0]) > float(total) + 1.0


def test_held_out_class_is_neither_target_nor_penalised():
    out, text, batch, cmap = _batch_and_perfect_outputs(holdout_class=2)
    text = jnp.delete(text, 2, axis=0)  # vocabulary without the held-out class
    _, m = seg.seg_loss(out, text, batch, cmap, _cfg())
    assert float(m["matched_per_image"]) == 1.5  # image 1's class-2 segment is not a target
    # Whatever the decoder predicts on the held-out segment's pixels costs nothing.
    logits = np.asarray(out["mask_logits"]).copy()
    tgt = np.asarray(seg.targets_at(batch["segmap"], 2))
    logits[1, 3][tgt[1] == 0] = 20.0
    a = seg.seg_loss(out, text, batch, cmap, _cfg())[1]
    b = seg.seg_loss(dict(out, mask_logits=jnp.asarray(logits)), text, batch, cmap, _cfg())[1]
    assert float(a["loss_bce"]) == pytest.approx(float(b["loss_bce"]), abs=1e-7)


def test_empty_images_give_zero_mask_gradients_and_push_queries_to_void():
    out, text, batch, cmap = _batch_and_perfect_outputs()
    batch = dict(batch, mask_valid=jnp.zeros((2, 2), bool))  # nothing to match anywhere

    def loss(o):
        return seg.seg_loss(o, text, batch, cmap, _cfg())[0]

    g = jax.grad(loss)(dict(out))
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))
    # No target anywhere: the mask logits carry no loss at all.
    np.testing.assert_array_equal(np.asarray(g["mask_logits"]), 0.0)
    # Every query's class target is void. Queries 2, 3 already predict void (tiny gradient);
    # queries 0, 1 predict a class and get most of the push; a step down the gradient lowers
    # the loss.
    gc = np.abs(np.asarray(g["class_emb"]))
    assert gc[:, :2].max() > 10 * gc[:, 2:].max()
    step = jax.tree.map(lambda x, d: x - 1e-2 * d, dict(out), g)
    assert float(loss(step)) < float(loss(dict(out)))


def test_a_query_on_unlabeled_pixels_is_not_taught_void():
    """Image 1's class-2 segment is held out. Query 3 covers it and says class 0; query 2 is
    empty and also says class 0. Plain recipe: both are pushed to void. With
    ``unlabeled_not_void`` query 3 gets no class gradient at all (it may have found a class
    the head was not trained on), query 2 is still pushed to void."""
    out, text, batch, cmap = _batch_and_perfect_outputs(holdout_class=2)
    text = jnp.delete(text, 2, axis=0)
    logits = np.asarray(out["mask_logits"]).copy()
    tgt = np.asarray(seg.targets_at(batch["segmap"], 2))
    logits[1, 3] = np.where(tgt[1] == 0, 20.0, -20.0)  # the held-out segment's pixels
    cls = np.asarray(out["class_emb"]).copy()
    cls[1, 2:] = [1.0, 0.0, 0.0, 0.0]  # both unmatched queries say class 0
    out = dict(out, mask_logits=jnp.asarray(logits), class_emb=jnp.asarray(cls))

    def grads(**over):
        g = jax.grad(lambda o: seg.seg_loss(o, text, batch, cmap, _cfg(**over))[0])(out)
        return np.abs(np.asarray(g["class_emb"]))[1]

    plain, aware = grads(), grads(unlabeled_not_void=True)
    assert plain[3].max() > 1e-3 and plain[2].max() > 1e-3
    np.testing.assert_array_equal(aware[3], 0.0)
    assert aware[2].max() > 1e-3
