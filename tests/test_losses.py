"""Every UMG loss term vs a dense single-device reference written the obvious way (values,
accuracies and gradients, with padding, empty masks and duplicate texts), and the whole
``umg_loss`` on 8 devices (two mesh layouts) == on 1 device, for softmax and sigmoid."""

import jax
import jax.numpy as jnp
import loss_case
import ml_collections as mlc
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from umg_jax import sharding
from umg_jax.losses.umg import umg_loss
from umg_jax.ops.roi_align import roi_pool_embed

TERMS = ("image", "tags", "region", "mask", "pixel")


def _mesh(data, fsdp=1, tensor=1):
    devs = jax.devices()[: data * fsdp * tensor]
    return sharding.make_mesh(mlc.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devs)


def _norm(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _same(x, y):
    """Token-row equality ``[N, L], [K, L] -> [N, K]`` bool (numpy)."""
    return (x[:, None, :] == y[None, :, :]).all(-1)


def _dense(anchors, texts, pos, av, tv, log_scale, bias, kind):
    """Full-logits contrastive loss; ``pos`` numpy bool [Na, Nt]. Returns (loss, acc)."""
    valid = av[:, None] & tv[None, :]
    logits = jnp.exp(log_scale) * _norm(anchors) @ _norm(texts).T
    rows = np.flatnonzero(pos.any(1))
    if kind == "softmax":
        cols = np.flatnonzero(pos.any(0))
        row = (logsumexp(logits, axis=1, b=valid) - (logits * pos).sum(1) / np.maximum(
            pos.sum(1), 1))[rows]
        col = (logsumexp(logits, axis=0, b=valid) - (logits * pos).sum(0) / np.maximum(
            pos.sum(0), 1))[cols]
        loss = 0.5 * (row.mean() + col.mean())
    else:
        logits = logits + bias
        z = np.where(pos, 1.0, -1.0)
        loss = jnp.where(valid, -jax.nn.log_sigmoid(z * logits), 0.0).sum(1)[av].sum() / av.sum()
    best = jnp.argmax(jnp.where(valid, logits, -jnp.inf), axis=1)
    acc = jnp.take_along_axis(jnp.asarray(pos), best[:, None], 1)[rows, 0]
    return loss, jnp.mean(acc.astype(jnp.float32))


def _ref_term(term, diff, batch, kind):
    """Reference ``(loss, acc)`` of one term, from plain numpy loops and dense jnp."""
    e = diff["img"].shape[-1]
    s, b = diff["scales"][term], (diff["biases"][term] if kind == "sigmoid" else None)
    nb = batch["text"].shape[0]
    if term == "image":
        tok, v = batch["text"], batch["text_valid"]
        pos = _same(tok, tok) & v[:, None] & v[None, :]
        return _dense(diff["img"], diff["txt"], pos, v, v, s, b, kind)
    if term == "tags":
        tok, v = batch["tags"], batch["tags_valid"]
        ft, fv = tok.reshape(-1, tok.shape[-1]), v.reshape(-1)
        av = v.any(1)
        pos = np.zeros((nb, len(fv)), bool)
        for q in range(tok.shape[1]):  # any of the image's valid tags equals the prompt
            pos |= _same(tok[:, q], ft) & v[:, q, None]
        pos &= fv[None, :]
        return _dense(diff["img"], diff["tags_txt"].reshape(-1, e), pos, av, fv, s, b, kind)
    if term in ("region", "mask"):
        key = "region" if term == "region" else "mask"
        tok = batch[f"{key}_text"].reshape(-1, batch[f"{key}_text"].shape[-1])
        tv = batch[f"{key}_valid"].reshape(-1)
        if term == "region":
            emb = roi_pool_embed(diff["dense"], batch["region_boxes"], 2, 2)  # tested op
            av = tv
        else:
            area = batch["mask_area"]
            tot = area.sum((2, 3))
            emb = (area[..., None] * diff["dense"][:, None]).sum((2, 3)) / np.where(
                tot > 0, tot, 1.0)[..., None]
            emb = jnp.where((tot > 0)[..., None], emb, 1.0)  # not an anchor; avoids 0/|0|
            av = tv & (tot.reshape(-1) > 0)
        pos = _same(tok, tok) & av[:, None] & tv[None, :]
        return _dense(emb.reshape(-1, e), diff[f"{key}_txt"].reshape(-1, e), pos, av, tv, s, b,
                      kind)
    # pixel: every labelled patch among its own image's valid masks
    losses, correct = [], []
    for i in range(nb):
        d = _norm(diff["dense"][i].reshape(-1, e))
        logits = jnp.exp(s) * d @ _norm(diff["mask_txt"][i]).T + (b if kind == "sigmoid" else 0)
        mv, tok = batch["mask_valid"][i], batch["mask_text"][i]
        tgt = batch["pixel_target"][i].reshape(-1)
        keep = np.array([t >= 0 and mv[t] for t in tgt])
        pos = _same(tok, tok)[np.clip(tgt, 0, None)] & mv[None, :]  # [P, M]
        if kind == "softmax":
            per = logsumexp(logits, axis=1, b=mv[None, :]) - (logits * pos).sum(1) / np.maximum(
                pos.sum(1), 1)
        else:
            z = np.where(pos, 1.0, -1.0)
            per = jnp.where(mv[None, :], -jax.nn.log_sigmoid(z * logits), 0.0).sum(1)
        losses.append(per[keep])
        best = jnp.argmax(jnp.where(mv[None, :], logits, -jnp.inf), axis=1)
        correct.append(jnp.take_along_axis(jnp.asarray(pos), best[:, None], 1)[keep, 0])
    return jnp.concatenate(losses).mean(), jnp.concatenate(correct).mean(dtype=jnp.float32)


def _split(outputs):
    diff = {k: outputs[k] for k in loss_case.DIFF_KEYS}
    diff["scales"] = outputs["scales"]
    if outputs["biases"] is not None:
        diff["biases"] = outputs["biases"]
    return diff


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("term", TERMS)
def test_term_matches_reference(term, kind):
    outputs, batch = loss_case.make_case(3, 16, kind)
    cfg = loss_case.loss_cfg(kind)
    for t in TERMS:
        cfg[f"w_{t}"] = 1.0 if t == term else 0.0
    (total, metrics), grads = loss_case.loss_and_grads(outputs, batch, cfg, _mesh(8))
    assert set(metrics) >= {f"loss_{term}", f"acc_{term}"}
    assert not {f"loss_{t}" for t in TERMS if t != term} & set(metrics)

    diff = _split(outputs)
    (ref_loss, ref_acc), ref_grads = jax.jit(jax.value_and_grad(
        lambda d: _ref_term(term, d, batch, kind), has_aux=True))(diff)
    np.testing.assert_allclose(float(metrics[f"loss_{term}"]), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(total), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics[f"acc_{term}"]), float(ref_acc), atol=1e-6)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    nonzero = 0
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = sharding.path_str(path)
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_ref[path]), atol=1e-5,
                                   err_msg=name)
        nonzero += np.abs(np.asarray(g)).max() > 1e-4
    assert nonzero >= 3  # embeddings on both sides + the temperature


@pytest.mark.parametrize("kind,exchange", [("softmax", "all_gather"), ("sigmoid", "all_gather"),
                                           ("sigmoid", "ring")])
def test_sharded_equals_single_device(kind, exchange):
    outputs, batch = loss_case.make_case(5, 16, kind)
    cfg = loss_case.loss_cfg(kind, chunk_size=7)
    results = [loss_case.loss_and_grads(outputs, batch, cfg, _mesh(1))]  # the all-gather path
    cfg.exchange = exchange
    results += [loss_case.loss_and_grads(outputs, batch, cfg, m)
                for m in (_mesh(8), _mesh(2, 2, 2))]
    (t1, m1), g1 = results[0]
    assert {f"loss_{t}" for t in TERMS} <= set(m1)
    expected = sum(float(cfg[f"w_{t}"]) * float(m1[f"loss_{t}"]) for t in TERMS)
    np.testing.assert_allclose(float(t1), expected, rtol=1e-6)
    for (t, m), g in results[1:]:
        np.testing.assert_allclose(float(t), float(t1), rtol=1e-5)
        for k in m1:
            np.testing.assert_allclose(float(m[k]), float(m1[k]), rtol=1e-5, err_msg=k)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g1),
                                strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                       err_msg=sharding.path_str(path))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_bfloat16_exchange_is_close_to_float32(kind):
    """``loss.exchange_dtype="bfloat16"`` gathers the normalised texts in bf16: every term and
    gradient within bf16 rounding of the float32 exchange (8 devices), and not bit-equal (the
    knob does something)."""
    outputs, batch = loss_case.make_case(5, 16, kind)
    cfg = loss_case.loss_cfg(kind, chunk_size=7)
    (t32, m32), g32 = loss_case.loss_and_grads(outputs, batch, cfg, _mesh(8))
    cfg.exchange_dtype = "bfloat16"
    (t16, m16), g16 = loss_case.loss_and_grads(outputs, batch, cfg, _mesh(8))
    np.testing.assert_allclose(float(t16), float(t32), rtol=2e-2)
    for t in TERMS:
        np.testing.assert_allclose(float(m16[f"loss_{t}"]), float(m32[f"loss_{t}"]), rtol=2e-2)
    diffs = []
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(float(np.abs(b).max()), 1e-6)
        assert float(np.abs(a - b).max()) <= 3e-2 * scale
        diffs.append(float(np.abs(a - b).max()))
    assert max(diffs) > 0 or float(t16) != float(t32)


def test_metrics_and_errors():
    outputs, batch = loss_case.make_case(0, 8, "sigmoid")
    (total, metrics), _ = loss_case.loss_and_grads(outputs, batch, loss_case.loss_cfg("sigmoid"),
                                                   _mesh(8))
    np.testing.assert_allclose(float(metrics["scale_region"]), 7.0, rtol=1e-6)  # exp(log 7)
    np.testing.assert_allclose(float(metrics["bias_mask"]), -2.5)
    assert np.isfinite(float(total))
    with pytest.raises(ValueError, match="logit_bias_init"):
        umg_loss({**outputs, "biases": None}, batch, loss_case.loss_cfg("sigmoid"), _mesh(8))
    out = {k: v for k, v in outputs.items() if k != "region_txt"}
    with pytest.raises(KeyError, match="region_txt"):
        umg_loss(out, batch, loss_case.loss_cfg("sigmoid"), _mesh(8))
    with pytest.raises(ValueError, match="not one of"):
        umg_loss(outputs, batch, loss_case.loss_cfg("hinge"), _mesh(8))
