"""Mesh construction, batch placement and the regex parameter-sharding rules."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from umg_jax import sharding


def _cfg(data=-1, fsdp=1, tensor=1):
    return mlc.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_make_mesh_shapes_and_errors():
    m = sharding.make_mesh(_cfg())
    assert dict(m.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    m = sharding.make_mesh(_cfg(2, -1, 2))
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert list(m.devices.reshape(-1)) == jax.devices()  # process-major order kept
    with pytest.raises(ValueError, match="needs 12 devices but 8"):
        sharding.make_mesh(_cfg(3, 2, 2))
    with pytest.raises(ValueError, match="cannot fill"):
        sharding.make_mesh(_cfg(-1, 3, 1))
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.make_mesh(_cfg(-1, -1, 1))
    assert dict(sharding.make_mesh(_cfg(), jax.devices()[:2]).shape)["data"] == 2


def test_batch_divisibility_and_put_batch():
    mesh = sharding.make_mesh(_cfg(2, 2, 2))
    sharding.check_batch_divisible(12, mesh)
    with pytest.raises(ValueError, match="not divisible by the 4 batch shards"):
        sharding.check_batch_divisible(6, mesh)
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    out = sharding.put_batch({"x": x, "ok": x[:, 0] > 3}, mesh)
    assert out["x"].sharding.spec == P(sharding.BATCH_AXES)
    np.testing.assert_array_equal(np.asarray(out["x"]), x)
    # rows 2k, 2k+1 live on the devices of batch shard k (data-major, then fsdp)
    shard = {d: s.data for s in out["x"].addressable_shards for d in [s.device]}
    np.testing.assert_array_equal(np.asarray(shard[mesh.devices[1, 0, 0]]), x[4:6])
    np.testing.assert_array_equal(np.asarray(shard[mesh.devices[0, 1, 1]]), x[2:4])
    with pytest.raises(ValueError, match="not divisible"):
        sharding.put_batch({"x": x[:6]}, mesh)


def _abstract_params(scan: bool):
    from umg_jax.models import clip

    cfg = mlc.ConfigDict(dict(
        embed_dim=16, act="gelu", ln_eps=1e-5, dtype="float32", remat=False,
        remat_policy="nothing_saveable", scan=scan, logit_scale_init=2.0, logit_scale_max=4.6,
        logit_bias_init=None, granularity_scales=True, dense_mode="maskclip",
        vision=dict(image_size=16, patch_size=8, width=32, layers=3, heads=4, mlp_ratio=4.0),
        text=dict(context_length=8, vocab_size=64, width=32, layers=2, heads=2, mlp_ratio=4.0)))
    return clip.abstract_params(cfg)


def _specs(tree, mesh):
    sh = sharding.param_shardings(tree, mesh, sharding.DEFAULT_RULES)
    return {sharding.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh)}


def test_rules_on_model_params_loop_and_scan():
    mesh = sharding.make_mesh(_cfg(2, 2, 2))
    specs = _specs(_abstract_params(scan=False), mesh)
    blk = "visual/transformer/resblocks_0"
    assert specs[f"{blk}/attn/query/kernel"] == P("fsdp", "tensor", None)  # [D, H, Dh]
    assert specs[f"{blk}/attn/query/bias"] == P("tensor", None)
    assert specs[f"{blk}/attn/out/kernel"] == P("tensor", None, "fsdp")
    assert specs[f"{blk}/mlp/c_fc/kernel"] == P("fsdp", "tensor")
    assert specs[f"{blk}/mlp/c_proj/kernel"] == P("tensor", "fsdp")
    assert specs[f"{blk}/ln_1/scale"] == P()
    assert specs["logit_scale_region"] == P()
    assert specs["text/token_embedding/embedding"] == P("fsdp", None)  # [64, 32]: largest dim
    assert specs["text/text_projection/kernel"] == P("fsdp", None)  # [32, 16]

    specs = _specs(_abstract_params(scan=True), mesh)
    # scanned stack: leading layer axis never split, rules apply per layer
    assert specs["text/transformer/resblocks/attn/key/kernel"] == P(None, "fsdp", "tensor", None)
    assert specs["text/transformer/resblocks/mlp/c_proj/kernel"] == P(None, "tensor", "fsdp")
    assert specs["text/transformer/resblocks/ln_2/bias"] == P()
    assert specs["visual/transformer/resblocks_2/attn/value/kernel"] == P("fsdp", "tensor", None)


def test_rules_apply_to_optimizer_state_and_place_arrays():
    mesh = sharding.make_mesh(_cfg(2, 2, 2))
    abstract = _abstract_params(scan=False)
    state = jax.eval_shape(optax.adam(1e-3).init, abstract)
    specs = _specs({"params": abstract, "opt": state}, mesh)
    key = "visual/transformer/resblocks_1/mlp/c_fc/kernel"
    mu = [k for k in specs if k.startswith("opt") and k.endswith("mu/" + key)]
    assert mu and specs[mu[0]] == specs["params/" + key] == P("fsdp", "tensor")
    # the shardings are usable: params materialise split as specified
    sh = sharding.param_shardings(abstract, mesh)
    zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
                    out_shardings=sh)()
    arr = zeros["visual"]["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"]
    assert arr.addressable_shards[0].data.shape == (arr.shape[0] // 2, arr.shape[1] // 2)


def test_non_divisible_dims_stay_whole_and_bad_rules_fail():
    mesh = sharding.make_mesh(_cfg(1, 2, 4))
    tree = {"a": {"attn": {"query": {"kernel": jax.ShapeDtypeStruct((6, 2, 3), jnp.float32)}}},
            "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32)}
    specs = _specs(tree, mesh)
    assert specs["a/attn/query/kernel"] == P("fsdp", None, None)  # 2 heads % 4: kept whole
    assert specs["odd"] == P(None, None)
    with pytest.raises(ValueError, match="has 2 entries"):
        sharding.param_shardings(tree, mesh, [(r"query/kernel", "fsdp tensor")])
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.param_shardings(tree, mesh, [(r"query/kernel", "model . .")])
