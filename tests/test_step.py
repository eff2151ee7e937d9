"""umg_jax/step.py: de-duplicated text encoding equals the plain path (values and gradients)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from umg_jax import config_lib
from umg_jax import step as step_lib
from umg_jax.models import clip

ROOT = pathlib.Path(__file__).parents[1]


def _toy():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(50, 7)).astype(np.float32))

    def encode(t, w=w):  # a nonlinear stand-in for the text tower, [..., Le] -> [..., 7]
        return jnp.tanh(jnp.take(w, t, axis=0).sum(-2) * 0.3 + w[t[..., 0]])

    vocab = rng.integers(1, 50, size=(10, 6))
    tokens = jnp.asarray(vocab[rng.integers(0, 10, size=(64, 10))]).at[0, :3].set(0)
    return w, encode, tokens


def test_dedup_equals_plain_values_and_gradients():
    w, encode, tokens = _toy()
    target = jnp.asarray(np.random.default_rng(1).normal(size=(64, 10, 7)), jnp.float32)

    def loss(w, frac):
        out = step_lib.encode_deduplicated(lambda t: encode(t, w), tokens, frac)
        return jnp.sum((out - target) ** 2)

    plain, g_plain = jax.value_and_grad(loss)(w, 0.0)
    dedup, g_dedup = jax.jit(jax.value_and_grad(lambda w: loss(w, 0.2)))(w)  # K = 128 < 640
    np.testing.assert_allclose(float(dedup), float(plain), rtol=1e-6)
    # float32 summation order differs (gradients of repeated texts are summed first)
    np.testing.assert_allclose(np.asarray(g_dedup), np.asarray(g_plain), rtol=1e-4, atol=1e-4)


def test_too_many_distinct_texts_take_the_plain_path():
    _, encode, _ = _toy()
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 50, size=(64, 10, 6)))
    got = jax.jit(lambda t: step_lib.encode_deduplicated(encode, t, 0.2))(tokens)  # 640 > 128
    np.testing.assert_allclose(np.asarray(got), np.asarray(encode(tokens)), atol=1e-6)


def test_model_outputs_with_dedup_on_real_batch():
    c = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    c.model.vision.update(image_size=32, patch_size=8, width=32, layers=1, heads=2)
    c.model.text.update(width=32, layers=1, heads=2, context_length=16)
    c.model.embed_dim = 32
    model = clip.build_model(c.model)
    params = clip.init_params(c.model, jax.random.key(0))
    rng = np.random.default_rng(3)
    phrases = rng.integers(1, 400, size=(5, 8))
    batch = {"image": jnp.zeros((32, 32, 32, 3)), "text": jnp.ones((32, 16), jnp.int32)}
    for f, n in (("tags", 4), ("region_text", 8), ("mask_text", 8)):
        batch[f] = jnp.asarray(phrases[rng.integers(0, 5, size=(32, n))], jnp.int32)
    ref = step_lib.model_outputs(model, params, batch, c.loss)
    c.loss.text_dedup_frac = 0.2  # K = 128 slots for 640 texts, 5 distinct
    got = jax.jit(lambda p, b: step_lib.model_outputs(model, p, b, c.loss))(params, batch)
    for k in ("tags_txt", "region_txt", "mask_txt"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-6)


def test_text_lengths_round_up_to_two_buckets_per_octave():
    batch = {"text": np.zeros((2, 77), np.int32), "tags": np.zeros((2, 3, 32), np.int32),
             "region_text": np.zeros((2, 4, 32), np.int32)}
    assert step_lib.text_lengths(batch) == (8, 8)  # nothing but padding: the smallest bucket
    batch["text"][1, :20] = 5
    batch["region_text"][0, 2, :9] = 5
    assert step_lib.text_lengths(batch) == (24, 12)
    batch["text"][0, :70] = 5
    batch["tags"][1, 0, :31] = 5
    assert step_lib.text_lengths(batch) == (77, 32)  # capped at the arrays' lengths
    trimmed = step_lib.trim_text(batch, (64, 16))
    assert trimmed["text"].shape == (2, 64) and trimmed["tags"].shape == (2, 3, 16)
    assert trimmed["region_text"].shape == (2, 4, 16) and batch["text"].shape == (2, 77)


def test_trimmed_batch_gives_the_same_loss_and_gradients(tmp_path, monkeypatch):
    """A real synthetic batch: cutting the all-padding columns (CLIP causal tower) changes
    neither the loss nor the gradients; a last-token (SigLIP) tower is never trimmed."""
    import ml_collections as mlc

    from umg_jax import sharding
    from umg_jax.data import pipeline
    from umg_jax.losses import umg

    monkeypatch.setenv("UMG_JAX_CACHE", str(tmp_path))
    c = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    c.model.vision.update(image_size=32, patch_size=8, width=32, layers=1, heads=2)
    c.model.text.update(width=32, layers=2, heads=2)
    c.model.embed_dim = 32
    c.data.update(synthetic_num_train=16, synthetic_num_eval=8, synthetic_image_size=40)
    it = pipeline.make_iterator(c.data, c.model, batch_size=8, train=True, seed=0)
    batch = next(it)
    lengths = step_lib.text_lengths(batch)
    assert lengths[1] < batch["tags"].shape[-1]  # the synthetic phrases are short
    model = clip.build_model(c.model)
    params = clip.init_params(c.model, jax.random.key(0))

    mesh = sharding.make_mesh(mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))

    def loss(p, b):
        out = step_lib.model_outputs(model, p, b, c.loss)
        return umg.umg_loss(out, b, c.loss, mesh)[0]

    f = jax.jit(jax.value_and_grad(loss))
    full, g_full = f(params, jax.tree.map(jnp.asarray, batch))
    cut, g_cut = f(params, jax.tree.map(jnp.asarray, step_lib.trim_text(batch, lengths)))
    np.testing.assert_allclose(float(cut), float(full), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_cut), jax.tree.leaves(g_full), strict=True):
        # float32 sums over differently shaped arrays: equal up to summation order
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-6 * max(1.0, float(np.abs(b).max())))
    assert step_lib.trim_enabled(c)
    c.model.text.update(causal=False, pool="last")
    assert not step_lib.trim_enabled(c)
