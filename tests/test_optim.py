"""umg_jax/optim.py: decay mask, schedule (vs open_clip's), AdamW + clipping (vs torch),
freezing, layer-wise lr decay and gradient accumulation."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from umg_jax import optim
from umg_jax.config_lib import load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _cfg(**kw) -> mlc.ConfigDict:
    o = load_config(str(CONFIGS / "tiny.py")).optim
    o.warmup_steps = 2
    o.update(kw)
    return o


def _tree(scan: bool, seed: int = 0) -> dict:
    """A small params tree with the model's naming (vision: 3 scanned + separate last block,
    text: 2 unscanned blocks)."""
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731

    def block(*lead):
        return {"attn": {"query": {"kernel": r(*lead, 4, 2, 2), "bias": r(*lead, 2, 2)}},
                "ln_1": {"scale": r(*lead, 4), "bias": r(*lead, 4)},
                "mlp": {"c_fc": {"kernel": r(*lead, 4, 8), "bias": r(*lead, 8)}}}

    visual = {"conv1": {"kernel": r(2, 2, 3, 4)}, "class_embedding": r(4),
              "positional_embedding": r(5, 4), "ln_pre": {"scale": r(4), "bias": r(4)},
              "ln_post": {"scale": r(4), "bias": r(4)}, "proj": {"kernel": r(4, 3)},
              "transformer": {"resblocks_3": block()}}
    if scan:
        visual["transformer"]["resblocks"] = block(3)
    else:
        visual["transformer"].update({f"resblocks_{i}": block() for i in range(3)})
    text = {"token_embedding": {"embedding": r(10, 4)}, "positional_embedding": r(6, 4),
            "ln_final": {"scale": r(4), "bias": r(4)}, "text_projection": {"kernel": r(4, 3)},
            "transformer": {f"resblocks_{i}": block() for i in range(2)}}
    return {"visual": visual, "text": text, "logit_scale": jnp.float32(2.0),
            "logit_scale_region": jnp.float32(2.0), "logit_bias": jnp.float32(-10.0)}


def _paths_where(mask_tree) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(mask_tree)[0]
    return {optim.path_str(p) for p, v in flat if v}


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_on_model_params(scan):
    from umg_jax.models import clip

    cfg = load_config(str(CONFIGS / "tiny.py"))
    cfg.model.scan = scan
    cfg.model.logit_bias_init = -10.0  # also create logit_bias / logit_bias_{g}
    params = clip.abstract_params(cfg.model)
    paths = optim.flat_paths(params)
    decayed = _paths_where(optim.decay_mask(params))
    # In this model exactly the matmul / conv weights are called "kernel".
    assert decayed == {p for p in paths if p.endswith("/kernel")}
    assert "text/token_embedding/embedding" not in decayed
    assert {"logit_scale", "logit_bias", "logit_scale_region", "logit_bias_pixel"} <= set(paths)
    if scan:
        assert "visual/transformer/resblocks/ln_1/scale" in paths


def test_schedule_matches_open_clip_and_hand_values():
    from open_clip_train.scheduler import cosine_lr

    class _Opt:  # cosine_lr writes the lr into param_groups
        param_groups = [{}]

    ref = cosine_lr(_Opt(), base_lr=3e-4, warmup_length=5, steps=40)
    ours = optim.warmup_cosine(3e-4, 5, 40)
    for s in range(40):
        np.testing.assert_allclose(float(ours(s)), ref(s), rtol=1e-5, atol=1e-12)

    sched = optim.warmup_cosine(1.0, 4, 12, end_lr_frac=0.1)
    hand = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 8: 0.1 + 0.5 * 0.9, 12: 0.1, 30: 0.1,
            6: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4))}
    for s, v in hand.items():
        np.testing.assert_allclose(float(sched(s)), v, rtol=1e-6)
    with pytest.raises(ValueError, match="must exceed warmup"):
        optim.warmup_cosine(1.0, 10, 10)


def test_adamw_clip_mask_match_torch(torch_mod):
    torch = torch_mod
    params = _tree(scan=False)
    o = _cfg(lr=0.05, warmup_steps=2, weight_decay=0.3, grad_clip=0.5, b2=0.98, eps=1e-6)
    total = 10
    tx, sched = optim.make_optimizer(o, params, total)
    state = tx.init(params)
    update = jax.jit(tx.update)
    leaves, treedef = jax.tree.flatten(params)
    decay = jax.tree.leaves(optim.decay_mask(params))
    tp = [torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in leaves]
    topt = torch.optim.AdamW(
        [{"params": [t for t, d in zip(tp, decay, strict=True) if d], "weight_decay": 0.3},
         {"params": [t for t, d in zip(tp, decay, strict=True) if not d], "weight_decay": 0.0}],
        lr=0.05, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(1)
    p = params
    for step in range(4):
        g = [rng.normal(size=x.shape).astype(np.float32) for x in leaves]
        grads = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in g])
        upd, state = update(grads, state, p)
        p = optax.apply_updates(p, upd)
        for t, gi in zip(tp, g, strict=True):
            t.grad = torch.tensor(gi, dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(tp, 0.5)
        for group in topt.param_groups:
            group["lr"] = 0.05 * (step + 1) / 2 if step < 2 else 0.05 * 0.5 * (
                1 + np.cos(np.pi * (step - 2) / (total - 2)))
        np.testing.assert_allclose(float(sched(step)), topt.param_groups[0]["lr"], rtol=1e-6)
        topt.step()
    for ours, ref in zip(jax.tree.leaves(p), tp, strict=True):
        np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_freeze_no_state_and_unchanged(accum):
    params = _tree(scan=True)
    tx, _ = optim.make_optimizer(_cfg(freeze=("text/.*", "logit_bias"), grad_accum=accum),
                                 params, 20)
    state = tx.init(params)
    # Built from abstract params too (the trainer shapes the sharded state with eval_shape).
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx_abs, _ = optim.make_optimizer(_cfg(freeze=("text/.*", "logit_bias"), grad_accum=accum),
                                     abstract, 20)
    assert jax.tree.structure(jax.eval_shape(tx_abs.init, abstract)) == jax.tree.structure(state)
    frozen = optim.param_labels(params, ("text/.*", "logit_bias"))
    n_train = sum(x.size for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen),
                                         strict=True) if not f)
    n_all = optim.count_params(params)
    assert 0 < n_train < n_all
    # Adam mu + nu (+ MultiSteps' accumulator) over the trainable leaves only.
    per_param = 2 if accum == 1 else 3
    assert optim.count_float_elements(state) == per_param * n_train

    step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(
        *tx.update(g, s, p)))
    p = params
    for i in range(2 * accum):
        grads = jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.1 * (i + 1)), params)
        p, state = step(p, state, grads)
    for x0, x1, f in zip(jax.tree.leaves(params), jax.tree.leaves(p), jax.tree.leaves(frozen),
                         strict=True):
        if f:
            np.testing.assert_array_equal(np.asarray(x0), np.asarray(x1))
        else:
            assert not np.allclose(np.asarray(x0), np.asarray(x1))


def test_freeze_regex_must_match():
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.make_optimizer(_cfg(freeze=("txt/.*",)), _tree(False), 20)
    with pytest.raises(ValueError, match="every parameter"):
        optim.make_optimizer(_cfg(freeze=(".*",)), _tree(False), 20)


def test_layer_decay_multipliers_hand_computed():
    d = 0.5
    m = optim.layer_decay_multipliers(_tree(scan=True), d)
    v, t = m["visual"], m["text"]
    # vision: L = 4 (scanned blocks 0..2 + resblocks_3) -> top = 5
    assert v["conv1"]["kernel"] == d ** 5 and v["ln_pre"]["scale"] == d ** 5
    assert v["class_embedding"] == d ** 5 and v["positional_embedding"] == d ** 5
    scanned = v["transformer"]["resblocks"]["attn"]["query"]["kernel"]
    assert scanned.shape == (3, 1, 1, 1)
    np.testing.assert_allclose(scanned.ravel(), [d ** 4, d ** 3, d ** 2])
    assert v["transformer"]["resblocks"]["ln_1"]["bias"].shape == (3, 1)
    assert v["transformer"]["resblocks_3"]["mlp"]["c_fc"]["kernel"] == d
    assert v["ln_post"]["scale"] == 1.0 and v["proj"]["kernel"] == 1.0
    # text: L = 2 -> top = 3
    assert t["token_embedding"]["embedding"] == d ** 3
    assert t["transformer"]["resblocks_0"]["ln_1"]["scale"] == d ** 2
    assert t["transformer"]["resblocks_1"]["attn"]["query"]["bias"] == d
    assert t["ln_final"]["bias"] == 1.0 and t["text_projection"]["kernel"] == 1.0
    assert m["logit_scale"] == 1.0
    # The unscanned layout gets the same per-block values.
    u = optim.layer_decay_multipliers(_tree(scan=False), d)["visual"]["transformer"]
    for i in range(3):
        assert u[f"resblocks_{i}"]["mlp"]["c_fc"]["bias"] == d ** (4 - i)


def test_layer_decay_scales_updates_per_layer_slice():
    params = _tree(scan=True)
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.3, params)
    outs = {}
    for d in (1.0, 0.5):
        tx, _ = optim.make_optimizer(_cfg(layer_decay=d, warmup_steps=0), params, 10)
        outs[d], _ = jax.jit(tx.update)(grads, tx.init(params), params)
    base = outs[1.0]["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"]
    dec = outs[0.5]["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"]
    for i, mult in enumerate([0.5 ** 4, 0.5 ** 3, 0.5 ** 2]):
        np.testing.assert_allclose(np.asarray(dec[i]), mult * np.asarray(base[i]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(outs[0.5]["logit_scale"]),
                               np.asarray(outs[1.0]["logit_scale"]), rtol=1e-6)


def test_multisteps_equals_mean_gradient_step():
    params = _tree(scan=False)
    rng = np.random.default_rng(3)
    g1, g2 = (jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
              for _ in range(2))
    tx2, _ = optim.make_optimizer(_cfg(grad_accum=2), params, 10)
    s = tx2.init(params)
    update = jax.jit(tx2.update)
    u1, s = update(g1, s, params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u1))
    u2, s = update(g2, s, params)
    tx1, _ = optim.make_optimizer(_cfg(grad_accum=1), params, 10)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    ref, _ = jax.jit(tx1.update)(mean, tx1.init(params), params)
    for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_count_params_abstract():
    tree = {"a": jax.ShapeDtypeStruct((3, 4), jnp.float32), "b": jnp.zeros((5,)),
            "c": jnp.float32(1.0)}
    assert optim.count_params(tree) == 18


@pytest.mark.parametrize("accum", [1, 2])
def test_weight_decay_only_on_trainable_kernels(accum):
    """Zero gradients: Adam's step is 0, so the update is exactly ``-lr * wd * p`` on decayed
    trainable leaves and 0 elsewhere (checks the mask inside the freeze partition)."""
    params = _tree(scan=True)
    o = _cfg(freeze=("text/.*",), weight_decay=0.25, lr=0.1, warmup_steps=2, grad_accum=accum)
    tx, sched = optim.make_optimizer(o, params, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(accum):
        upd, state = update(zeros, state, params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), u in zip(flat, jax.tree.leaves(upd), strict=True):
        name = optim.path_str(path)
        decayed = name.endswith("/kernel") and not name.startswith("text/")
        expect = -float(sched(0)) * 0.25 * np.asarray(p) if decayed else np.zeros(p.shape)
        np.testing.assert_allclose(np.asarray(u), expect, rtol=1e-6, atol=1e-9, err_msg=name)
