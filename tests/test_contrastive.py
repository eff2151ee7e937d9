"""The sharded chunked contrastive core vs a dense single-device reference written the obvious
way (positives from token-row equality in numpy, not from the hash)."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from umg_jax import sharding
from umg_jax.losses.contrastive import contrastive_loss, token_keys


def _mesh(data, fsdp=1, tensor=1, n=None):
    devs = jax.devices()[: n or data * fsdp * tensor]
    return sharding.make_mesh(mlc.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devs)


def _case(seed, b=16, k=2, t=3):
    """Anchors [b, E] with up to k positive keys each, texts [b, t, E] (tags-like)."""
    rng = np.random.default_rng(seed)
    e = 6
    a = rng.normal(size=(b, e)).astype(np.float32)
    tx = rng.normal(size=(b, t, e)).astype(np.float32)
    ttok = np.zeros((b, t, 4), np.int32)
    ttok[..., :2] = rng.integers(0, 3, size=(b, t, 2))  # 9 distinct texts -> many duplicates
    tv = rng.uniform(size=(b, t)) < 0.8
    atok = ttok[:, :k]  # each anchor's positives: its own first k texts
    akv = tv[:, :k].copy()
    av = rng.uniform(size=b) < 0.85
    return a, av, atok, akv, tx, tv, ttok


def _reference(a, av, atok, akv, tx, tv, ttok, log_scale, bias, kind):
    """Full logits on one device; positives by comparing token rows."""
    e = a.shape[-1]
    t_flat, tv_flat, ttok_flat = tx.reshape(-1, e), tv.reshape(-1), ttok.reshape(-1, 4)
    pos = np.zeros((a.shape[0], t_flat.shape[0]), bool)
    for i in range(a.shape[0]):
        for j in range(t_flat.shape[0]):
            pos[i, j] = av[i] and tv_flat[j] and any(
                akv[i, q] and (atok[i, q] == ttok_flat[j]).all() for q in range(atok.shape[1]))
    valid = av[:, None] & tv_flat[None, :]
    an = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    tn = t_flat / jnp.linalg.norm(t_flat, axis=-1, keepdims=True)
    logits = jnp.exp(log_scale) * an @ tn.T
    rows = [i for i in range(a.shape[0]) if pos[i].any()]
    if kind == "softmax":
        row = [logsumexp(logits[i][valid[i]]) - logits[i][pos[i]].mean() for i in rows]
        cols = [j for j in range(t_flat.shape[0]) if pos[:, j].any()]
        col = [logsumexp(logits[:, j][valid[:, j]]) - logits[:, j][pos[:, j]].mean()
               for j in cols]
        loss = 0.5 * (jnp.mean(jnp.stack(row)) + jnp.mean(jnp.stack(col)))
    else:
        logits = logits + bias
        z = np.where(pos, 1.0, -1.0)
        per = jnp.where(valid, -jax.nn.log_sigmoid(z * logits), 0.0).sum(1)
        loss = per[av].sum() / av.sum()
    return loss, (logits, pos, valid, rows)


def _reference_acc(logits, pos, valid, rows):
    best = [np.argmax(np.where(valid[i], np.asarray(logits[i]), -np.inf)) for i in rows]
    return np.mean([pos[i, j] for i, j in zip(rows, best, strict=True)])


def _ours(case, log_scale, bias, kind, chunk, mesh, exchange="all_gather"):
    a, av, atok, akv, tx, tv, ttok = case

    def f(a, tx, log_scale, bias):
        return contrastive_loss(a, av, token_keys(atok), akv, tx, tv, token_keys(ttok),
                                log_scale, bias, kind=kind, chunk_size=chunk, mesh=mesh,
                                exchange=exchange)

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
    return fn(a, tx, log_scale, bias)


@pytest.mark.parametrize("kind,mesh_shape,chunk,exchange", [
    ("softmax", (8, 1, 1), 5, "all_gather"), ("sigmoid", (8, 1, 1), 5, "all_gather"),
    ("softmax", (2, 2, 2), 48, "all_gather"), ("sigmoid", (1, 1, 1), 7, "all_gather"),
    # ring: 6 texts per device in chunks of 5 (padded); a ring over data x fsdp; one device
    ("sigmoid", (8, 1, 1), 5, "ring"), ("sigmoid", (4, 2, 1), 2, "ring"),
    ("sigmoid", (1, 1, 1), 7, "ring")])
def test_matches_dense_reference(kind, mesh_shape, chunk, exchange):
    case = _case(1)
    mesh = _mesh(*mesh_shape)
    log_scale, bias = jnp.float32(np.log(7.0)), jnp.float32(-2.0)
    (loss, acc), grads = _ours(case, log_scale, bias, kind, chunk, mesh, exchange)
    a, av, atok, akv, tx, tv, ttok = case
    ref_fn = lambda a, tx, s, b: _reference(a, av, atok, akv, tx, tv, ttok, s, b, kind)[0]
    ref_loss = ref_fn(a, tx, log_scale, bias)
    ref_grads = jax.grad(ref_fn, argnums=(0, 1, 2, 3))(a, tx, log_scale, bias)
    ref_acc = _reference_acc(*_reference(a, av, atok, akv, tx, tv, ttok, log_scale, bias,
                                         kind)[1])
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(acc), ref_acc, atol=1e-6)
    names = ("anchors", "texts", "log_scale", "bias")
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        if kind == "softmax" and name == "bias":
            continue  # softmax ignores the bias
        np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=1e-5, err_msg=name)
    assert np.abs(np.asarray(grads[0])).max() > 1e-3  # gradients are not trivially zero


def test_token_keys_equal_iff_rows_equal():
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 4, size=(200, 5)).astype(np.int32)
    keys = np.asarray(token_keys(jnp.asarray(tok)))
    same_rows = (tok[:, None] == tok[None]).all(-1)
    same_keys = (keys[:, None] == keys[None]).all(-1)
    np.testing.assert_array_equal(same_keys, same_rows)
    # a swap of two tokens changes the key
    assert not (np.asarray(token_keys(jnp.asarray([[1, 2, 0]]))) ==
                np.asarray(token_keys(jnp.asarray([[2, 1, 0]])))).all()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_nothing_valid_gives_zero_not_nan(kind):
    a, av, atok, akv, tx, tv, ttok = _case(2)
    case = (a, np.zeros_like(av), atok, akv, tx, tv, ttok)
    (loss, acc), grads = _ours(case, jnp.float32(1.0), jnp.float32(0.0), kind, 5, _mesh(8))
    assert float(loss) == 0.0 and float(acc) == 0.0
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_ring_refuses_softmax_and_unknown_exchange():
    case = _case(0)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        _ours(case, jnp.float32(1.0), None, "softmax", 5, _mesh(8), exchange="ring")
    with pytest.raises(ValueError, match="loss.exchange"):
        _ours(case, jnp.float32(1.0), jnp.float32(0.0), "sigmoid", 5, _mesh(8), exchange="x")


def test_bad_arguments():
    case = _case(3)
    with pytest.raises(ValueError, match="not one of"):
        _ours(case, jnp.float32(1.0), None, "hinge", 5, _mesh(8))
    with pytest.raises(ValueError, match="logit bias"):
        _ours(case, jnp.float32(1.0), None, "sigmoid", 5, _mesh(8))
    with pytest.raises(ValueError, match="not divisible"):
        a, av, atok, akv, tx, tv, ttok = case
        _ours((a[:12], av[:12], atok[:12], akv[:12], tx[:12], tv[:12], ttok[:12]),
              jnp.float32(1.0), None, "softmax", 5, _mesh(8))
