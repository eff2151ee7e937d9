"""Token merging (umg_jax/models/token_merge.py): merge / unmerge by hand, reduction 0 is the plain
model exactly, the dense grid keeps its shape, gradients flow, inference runs all tokens."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umg_jax import config_lib
from umg_jax.models import clip, token_merge

ROOT = pathlib.Path(__file__).parents[1]


def test_merge_by_hand():
    # class token + 4 patches: A = {p0, p2}, B = {p1, p3}; p2 is a copy of p3 -> merged into it
    x = jnp.array([[[9.0, 9], [1, 0], [0, 1], [1, 1], [1, 1.01]]])
    merged, assign, size = token_merge.bipartite_merge(x, r=1)
    assert merged.shape == (1, 4, 2)
    np.testing.assert_array_equal(size[0], [1, 1, 1, 2])
    np.testing.assert_allclose(merged[0, 0], [9, 9])  # class token untouched
    np.testing.assert_allclose(merged[0, 1], [1, 0])  # p0 kept
    np.testing.assert_allclose(merged[0, 2], [0, 1])  # p1 (B)
    np.testing.assert_allclose(merged[0, 3], [1, 1.005])  # mean of p2 and p3
    np.testing.assert_array_equal(assign[0], [1, 2, 3, 3])
    full = token_merge.unmerge(merged, assign)
    np.testing.assert_allclose(full[0], [[9, 9], [1, 0], [0, 1], [1, 1.005], [1, 1.005]])
    same, ident, ones = token_merge.bipartite_merge(x, r=0)
    np.testing.assert_array_equal(ones, 1.0)
    np.testing.assert_array_equal(same, x)
    np.testing.assert_array_equal(token_merge.unmerge(same, ident), x)
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        token_merge.num_merged(16, 0.6)


def test_proportional_attention_makes_merging_duplicates_exact():
    # p0 (set A) is an exact copy of p1 (set B): merging them and adding log(size 2) to the merged
    # key's logits gives every query the same attention output as the full token set.
    from umg_jax.models.layers import Attention

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 8)).astype(np.float32)
    x[0, 1] = x[0, 2]
    merged, assign, size = token_merge.bipartite_merge(jnp.asarray(x), r=1)
    np.testing.assert_array_equal(size[0], [1, 1, 2, 1])  # rows: cls, p2 (kept A), p1+p0, p3
    attn = Attention(8, 2)
    p = attn.init(jax.random.key(0), x, x)
    full = attn.apply(p, x, x)
    prop = attn.apply(p, merged, merged, None, jnp.log(size))
    plain = attn.apply(p, merged, merged)
    got = token_merge.unmerge(prop, assign)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(token_merge.unmerge(plain, assign)), np.asarray(full),
                           atol=1e-4)  # without the bias the duplicate counts once



@pytest.mark.parametrize("dense_value_path", [True, False])
def test_last_block_on_merged_tokens_equals_it_on_the_restored_grid(dense_value_path):
    # The stack runs its last block on the merged tokens and restores the grid after it; with
    # proportional attention that must equal restoring first and running the last block on the
    # full grid (the reference below, block by block).
    from umg_jax.models.layers import ResidualBlock, Transformer

    kw = dict(width=16, heads=2, layers=3)
    stack = Transformer(**kw, last_separate=True, last_dense_value_path=dense_value_path,
                        merge_after=0, merge_r=4)
    x = jax.random.normal(jax.random.key(0), (2, 1 + 9, 16))
    p = stack.init(jax.random.key(1), x)["params"]
    got = stack.apply({"params": p}, x)

    def block(i, h, bias=None, dvp=False):
        return ResidualBlock(**kw, dense_value_path=dvp).apply(
            {"params": p[f"resblocks_{i}"]}, h, None, bias)

    h, assign, size = token_merge.bipartite_merge(block(0, x), 4)
    h = token_merge.unmerge(block(1, h, jnp.log(size)), assign)
    ref = block(2, h, dvp=dense_value_path)
    assert got.shape == ref.shape == (2, 10, 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=2e-5)

def _cfg(ratio, after=0):
    c = config_lib.load_config(str(ROOT / "configs/tiny.py")).model
    c.vision.update(image_size=32, patch_size=8, width=32, layers=3, heads=2,
                    merge_after=after, merge_ratio=ratio)
    c.text.update(width=32, layers=1, heads=2, context_length=16)
    c.embed_dim = 32
    return c


def _encode(cfg, params, images):
    return clip.build_model(cfg).apply({"params": params}, images, method=clip.CLIP.encode_image)


def test_zero_ratio_is_the_plain_model_and_merging_keeps_the_grid():
    plain = _cfg(0.0, after=-1)
    params = clip.init_params(plain, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    ref = _encode(plain, params, images)
    zero = _encode(_cfg(0.0), params, images)
    for k in ("img", "dense"):
        np.testing.assert_array_equal(np.asarray(ref[k]), np.asarray(zero[k]))
    half = _encode(_cfg(0.5), params, images)
    assert half["dense"].shape == ref["dense"].shape == (2, 4, 4, 32)
    assert not np.allclose(half["img"], ref["img"])  # fewer tokens -> a different embedding
    # the merged model has exactly the plain model's parameters
    assert jax.tree.structure(clip.init_params(_cfg(0.5), jax.random.key(0))) == \
        jax.tree.structure(params)


def test_gradients_flow_through_the_merge():
    cfg = _cfg(0.5)
    params = clip.init_params(cfg, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

    def loss(p):
        out = _encode(cfg, p, images)
        return jnp.sum(out["dense"] ** 2) + jnp.sum(out["img"] ** 2)

    g = jax.jit(jax.grad(loss))(params)
    blk = g["visual"]["transformer"]["resblocks_1"]["attn"]["query"]["kernel"]  # after the merge
    assert np.isfinite(np.asarray(blk)).all() and np.abs(np.asarray(blk)).max() > 0
    first = g["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]  # before it
    assert np.abs(np.asarray(first)).max() > 0
    # The gradient is the loss's derivative: central differences along a random direction of
    # the vision tower's params (small enough that the merge's matching does not change).
    leaves, tree = jax.tree.flatten(params["visual"])
    keys = jax.random.split(jax.random.key(2), len(leaves))
    d = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    norm = float(jnp.sqrt(sum(jnp.sum(x * x) for x in d)))
    d = jax.tree.unflatten(tree, [x / norm for x in d])
    f = jax.jit(lambda t: loss(dict(params, visual=jax.tree.map(
        lambda p, u: p + t * u, params["visual"], d))))
    eps = 1e-2
    numeric = (float(f(eps)) - float(f(-eps))) / (2 * eps)
    analytic = float(sum(jnp.sum(a * b) for a, b in zip(
        jax.tree.leaves(g["visual"]), jax.tree.leaves(d), strict=True)))
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=2e-2)


def test_scan_refused_and_inference_runs_all_tokens():
    cfg = _cfg(0.5)
    cfg.scan = True
    with pytest.raises(ValueError, match="scan=False"):
        clip.init_params(cfg, jax.random.key(0))
    from umg_jax.inference import UMGModel

    cfg = _cfg(0.5)
    params = clip.init_params(cfg, jax.random.key(0))
    m = UMGModel(params, cfg)
    x = np.asarray(jax.random.normal(jax.random.key(1), (1, 32, 32, 3)))
    ref = _encode(_cfg(0.0, after=-1), params, x)
    np.testing.assert_allclose(m.encode_image(x)[0], np.asarray(ref["img"]), atol=1e-5)  # jit
