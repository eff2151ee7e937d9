"""Text slots encoded per distinct text (umg_jax/models/text_slots.py): values and gradients equal
encoding every slot (the plain path, computed independently here), budgets sized by the host,
an overflow poisons instead of answering wrong, the statistics by hand, and the whole UMG loss on
a real pipeline batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umg_jax.models import text_slots

V, LE, E = 12, 6, 5


def _encoder(w):
    """A small non-linear text encoder: ``[N, Le] int32 -> [N, E]``."""
    def encode(tokens):
        x = w["emb"][tokens]  # [N, Le, E]
        return jnp.tanh(x.sum(-2) @ w["proj"]) * (1.0 + (tokens[:, :1] > 0))

    return encode


def _case(seed=0, b=8, n=5, free_p=0.3):
    rng = np.random.default_rng(seed)
    vocab = rng.integers(1, 30, size=(V, LE + 2)).astype(np.int32)  # wider than the batch's Le
    vocab[:, LE:] = 0
    ids = rng.integers(0, V, size=(b, n)).astype(np.int32)
    free = rng.random((b, n)) < free_p
    ids[free] = -1
    valid = rng.random((b, n)) < 0.85
    tokens = vocab[np.clip(ids, 0, None), :LE].copy()
    tokens[free] = rng.integers(1, 30, size=(free.sum(), LE))
    tokens[~valid] = 0
    w = {"emb": jnp.asarray(rng.normal(size=(30, E)), jnp.float32),
         "proj": jnp.asarray(rng.normal(size=(E, E)), jnp.float32)}
    return w, jnp.asarray(tokens), jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(vocab)


def _plain(w, tokens):
    b, n, le = tokens.shape
    return _encoder(w)(tokens.reshape(b * n, le)).reshape(b, n, -1)


def _loss(emb, valid):
    """A weighting that depends on every valid slot, so the gradients check the scatter-adds."""
    wts = jnp.arange(emb.size, dtype=jnp.float32).reshape(emb.shape) / emb.size
    return jnp.sum(jnp.where(valid[..., None], jnp.sin(emb) * wts, 0.0))


@pytest.mark.parametrize("shards, vocab_budget, free_frac", [
    (1, 0, 0.5), (4, 0, 0.5), (2, 8, 0.6), (8, 12, 0.8), (2, 2, 0.1)])
def test_values_and_gradients_equal_every_slot(shards, vocab_budget, free_frac):
    """Budgets as the host sizes them (configured, grown by ``fit`` for a fuller batch)."""
    w, tokens, ids, valid, vocab = _case()
    b, n = ids.shape
    local = b // shards * n
    present, free_max = text_slots.needs(np.asarray(ids), np.asarray(valid), V, shards)
    configured = text_slots.budgets(local, V, shards, vocab_budget, free_frac)
    k, kf = text_slots.fit(int(present.sum()), free_max, configured, V, local, shards)
    assert k >= present.sum() and kf >= free_max and k % shards == 0

    def ours(w):
        emb, stats = text_slots.encode_slots(_encoder(w), tokens, ids, valid, vocab,
                                             shards=shards, k=k, kf=kf)
        return _loss(emb, valid), (emb, stats)

    (l1, (emb, stats)), g1 = jax.jit(jax.value_and_grad(ours, has_aux=True))(w)
    l0, g0 = jax.value_and_grad(lambda w: _loss(_plain(w, tokens), valid))(w)
    np.testing.assert_allclose(np.where(valid[..., None], emb, 0),
                               np.where(valid[..., None], _plain(w, tokens), 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for key in w:
        np.testing.assert_allclose(g1[key], g0[key], rtol=1e-4, atol=1e-5)
    assert np.isfinite(np.asarray(emb)).all()
    # the statistics, by hand
    known = np.asarray(valid) & (np.asarray(ids) >= 0)
    free = np.asarray(valid) & (np.asarray(ids) < 0)
    assert int(stats["text/vocab_distinct"]) == len(set(np.asarray(ids)[known].tolist()))
    assert int(stats["text/free_max"]) == free.reshape(shards, -1).sum(1).max() == free_max
    assert int(stats["text/overflow"]) == 0


def test_a_budget_too_small_poisons_instead_of_answering_wrong():
    w, tokens, ids, valid, vocab = _case(seed=1, free_p=0.9)
    emb, stats = jax.jit(lambda: text_slots.encode_slots(
        _encoder(w), tokens, ids, valid, vocab, shards=2, k=2, kf=8))()
    assert int(stats["text/overflow"]) == 1 and np.isnan(np.asarray(emb)).all()


def test_budgets_and_fit():
    assert text_slots.budgets(40, 12, 4, 0, 0.5) == (12, 24)  # whole vocab; 20 -> 24 rows
    assert text_slots.budgets(40, 13, 4, 0, 0.5) == (16, 24)  # padded to the shards
    assert text_slots.budgets(40, 4600, 8, 1000, 0.01) == (1000, 8)  # at least 8 free rows
    assert text_slots.budgets(6, 4600, 8, 1000, 0.9) == (1000, 6)  # never past the slots
    assert text_slots.fit(900, 5, (1000, 8), 4600, 40, 8) == (1000, 8)  # holds: as configured
    assert text_slots.fit(1500, 9, (1000, 8), 4600, 40, 8) == (2000, 16)  # doubled
    assert text_slots.fit(4600, 90, (1000, 8), 4600, 40, 8) == (4600, 40)  # capped
    with pytest.raises(ValueError, match="shards"):
        w, tokens, ids, valid, vocab = _case()
        text_slots.encode_slots(_encoder(w), tokens, ids, valid, vocab, shards=3, k=12, kf=8)


def test_umg_loss_and_gradients_equal_on_a_pipeline_batch(tmp_path):
    """The whole UMG loss of the tiny model on a real batch of the synthetic world: the id path
    (vocabulary from meta.json) against encoding every slot."""
    from umg_jax import config_lib, sharding
    from umg_jax import step as step_lib
    from umg_jax.data import pipeline, synthetic
    from umg_jax.models import clip

    c = config_lib.load_config("configs/tiny.py")
    c.model.vision.layers = c.model.text.layers = 1
    c.data.num_workers = 0
    synthetic.write_synthetic(str(tmp_path / "d"), 32, split="train")
    path = str(tmp_path / "d")
    batch = next(pipeline.make_iterator(c.data, c.model, batch_size=8, train=True, seed=0,
                                        path=path, process_index=0, process_count=1))
    names = pipeline.text_vocabulary(path)
    vocab = pipeline.text_vocab_tokens(c.data, c.model, names)
    assert (batch["tags_id"] >= 0).any() and (batch["region_text_id"] < 0).any()
    model = clip.build_model(c.model)
    params = clip.init_params(c.model, jax.random.key(0))
    mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])

    def loss(p, cfg, text_vocab):
        fn = step_lib.make_loss_fn(model, cfg, mesh, text_vocab=text_vocab)
        return fn(p, batch)

    plain = c.copy_and_resolve_references()
    plain.loss.update(text_dedup_frac=0.0, free_text_frac=1.0)
    ids = c.copy_and_resolve_references()
    ids.loss.update(text_dedup_frac=0.0, free_text_frac=0.5)
    (l0, m0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, plain, None), has_aux=True))(
        params)
    (l1, m1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, ids, vocab), has_aux=True))(
        params)
    assert int(m1["text/overflow"]) == 0 and "text/overflow" not in m0
    assert int(m1["text/vocab_distinct"]) == len(set(
        np.concatenate([batch[k][batch[k] >= 0] for k in ("tags_id", "region_text_id",
                                                          "mask_text_id")]).tolist()))
    np.testing.assert_allclose(l1, l0, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def test_train_step_on_8_devices_equals_every_slot(tmp_path):
    """The jitted train step on a data-parallel mesh of 8 (free-form rows packed per device):
    its loss and gradient norm equal the every-slot step's, and a budget grown by the host
    (``step.text_budgets`` with the batch's needs) runs as a static argument."""
    from umg_jax import config_lib, optim, sharding
    from umg_jax import step as step_lib
    from umg_jax.data import pipeline, schema, synthetic
    from umg_jax.models import clip

    c = config_lib.load_config("configs/tiny.py")
    c.model.vision.layers = c.model.text.layers = 1
    c.data.num_workers = 0
    c.batch_size = 16
    c.mesh.update(data=8, fsdp=1)
    c.loss.update(text_dedup_frac=0.0, free_text_frac=0.15)
    path = str(tmp_path / "d")
    synthetic.write_synthetic(path, 32, split="train")
    local = next(pipeline.make_iterator(c.data, c.model, batch_size=16, train=True, seed=1,
                                        path=path, process_index=0, process_count=1))
    vocab = pipeline.text_vocab_tokens(c.data, c.model, pipeline.text_vocabulary(path))
    mesh = sharding.make_mesh(c.mesh)
    tx, _ = optim.make_optimizer(c.optim, clip.abstract_params(c.model), c.total_steps)
    state_sh = step_lib.state_shardings(step_lib.abstract_state(c, tx), mesh)
    shapes = schema.batch_shapes_from_config(c)
    needs = step_lib.text_needs(local, c.loss, len(vocab), 8)
    budgets = step_lib.text_budgets(c, len(vocab), 8, needs)
    assert budgets[1] >= needs[0] and budgets[0] >= sum(needs[1:])
    results = []
    for cfg, tv, b in ((c, vocab, budgets), (c.copy_and_resolve_references(), None, None)):
        if tv is None:
            cfg.loss.free_text_frac = 1.0
        fn = step_lib.make_train_step(clip.build_model(cfg.model), tx, cfg, mesh, state_sh,
                                      shapes, None, tv)
        state = jax.jit(lambda k: step_lib.init_state(clip.init_params(c.model, k), tx),
                        out_shardings=state_sh)(jax.random.key(0))
        _, m = fn(state, sharding.put_batch(local, mesh), b)
        results.append(jax.device_get(m))
    ids, plain = results
    assert int(ids["text/overflow"]) == 0 and int(ids["nonfinite"]) == 0
    np.testing.assert_allclose(ids["loss"], plain["loss"], rtol=2e-5)
    np.testing.assert_allclose(ids["grad_norm"], plain["grad_norm"], rtol=2e-4)
