"""Tests of the two-tower model (umg_jax/models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from umg_jax.config_lib import load_config
from umg_jax.models import clip
from umg_jax.models.summary import format_table, param_table

CONFIGS = ["tiny", "vit_b16", "vit_l", "vit_l336", "siglip_b16"]


def _cfg(name):
    return load_config(f"configs/{name}.py")


@pytest.fixture(scope="module")
def tiny():
    cfg = _cfg("tiny")
    params = clip.init_params(cfg.model, jax.random.key(0))
    model = clip.build_model(cfg.model)
    rng = np.random.default_rng(0)
    s = cfg.model.vision.image_size
    images = jnp.asarray(rng.normal(size=(2, s, s, 3)), jnp.float32)
    tokens = np.zeros((3, cfg.model.text.context_length), np.int32)
    for i, n in enumerate([3, 7, 12]):
        tokens[i, 0] = 49406
        tokens[i, 1:n] = rng.integers(1, 49405, n - 1)
        tokens[i, n] = 49407
    return cfg, model, params, images, jnp.asarray(tokens)


@pytest.mark.parametrize("name", CONFIGS)
def test_output_shapes_and_dtypes(name):
    cfg = _cfg(name)
    m = cfg.model
    g = m.vision.image_size // m.vision.patch_size
    model = clip.build_model(m)
    images, tokens = clip.dummy_inputs(m, batch=2)
    params = clip.abstract_params(m)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, images, tokens), params)
    assert out["img"].shape == (2, m.embed_dim) and out["img"].dtype == jnp.float32
    assert out["dense"].shape == (2, g, g, m.embed_dim) and out["dense"].dtype == jnp.float32
    assert out["txt"].shape == (2, m.embed_dim) and out["txt"].dtype == jnp.float32
    assert set(out["scales"]) == set(clip.GRANULARITIES)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_tiny_forward_is_finite(tiny):
    cfg, model, params, images, tokens = tiny
    out = model.apply({"params": params}, images, tokens)
    for k in ("img", "dense", "txt"):
        assert np.isfinite(np.asarray(out[k])).all()
    # Leading axes of texts are flattened and restored.
    many = model.apply({"params": params}, jnp.stack([tokens, tokens]),
                       method=clip.CLIP.encode_text)
    np.testing.assert_allclose(many[1], out["txt"], atol=1e-6)


@pytest.mark.parametrize("name,expected", [("vit_b16", 149_620_737), ("vit_l", 427_616_513)])
def test_parameter_count_equals_openai(name, expected):
    params = clip.abstract_params(_cfg(name).model)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == expected
    table = format_table(param_table(params))
    assert f"{expected:,}" in table.splitlines()[-1]


def test_siglip_b16_parameter_count_equals_hf_siglip():
    """configs/siglip_b16.py = HF ``SiglipModel(SiglipConfig())`` (SigLIP B/16-224): 203,155,970
    parameters (counted with transformers 5.23); no class token, no ln_pre, MAP head."""
    params = clip.abstract_params(_cfg("siglip_b16").model)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 203_155_970
    v = params["visual"]
    assert "class_embedding" not in v and "ln_pre" not in v and "map_head" in v
    assert v["positional_embedding"].shape == (196, 768) and "bias" in v["conv1"]
    assert "bias" in params["text"]["text_projection"]


def test_last_token_pooling_pads_short_rows_to_the_full_context():
    """SigLIP's bidirectional text tower: a row shorter than the context is padded with pad_id,
    so it embeds exactly as the full-length padded row (and padding changes the embedding)."""
    m = _cfg("tiny").model.copy_and_resolve_references()
    m.text.causal, m.text.pool, m.text.proj_bias, m.text.pad_id = False, "last", True, 1
    model = clip.build_model(m)
    params = clip.init_params(m, jax.random.key(1))
    tokens = np.full((2, m.text.context_length), 1, np.int32)
    tokens[:, :4] = [[5, 6, 7, 8], [5, 6, 9, 8]]
    full = model.apply({"params": params}, jnp.asarray(tokens), method=clip.CLIP.encode_text)
    short = model.apply({"params": params}, jnp.asarray(tokens[:, :6]),
                        method=clip.CLIP.encode_text)
    np.testing.assert_allclose(short, full, atol=1e-6)
    other_pad = tokens.copy()
    other_pad[:, 4:] = 0
    moved = model.apply({"params": params}, jnp.asarray(other_pad), method=clip.CLIP.encode_text)
    assert np.abs(np.asarray(moved) - np.asarray(full)).max() > 1e-3


def _text_hidden(model, params, tokens):
    """Output of the text transformer stack [N, L, W] via flax intermediates."""
    _, state = model.apply({"params": params}, tokens, method=clip.CLIP.encode_text,
                           capture_intermediates=True, mutable=["intermediates"])
    return state["intermediates"]["text"]["transformer"]["__call__"][0]


def test_text_pooling_takes_end_of_text_token(tiny):
    cfg, model, params, _, tokens = tiny
    out = model.apply({"params": params}, tokens, method=clip.CLIP.encode_text)
    hidden = _text_hidden(model, params, tokens)
    eot = np.array([3, 7, 12])
    x = np.asarray(hidden)[np.arange(3), eot]
    ln = params["text"]["ln_final"]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mu) / np.sqrt(var + cfg.model.ln_eps) * ln["scale"] + ln["bias"]
    expected = x @ np.asarray(params["text"]["text_projection"]["kernel"])
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_causal_mask_masks_later_tokens(tiny):
    _, model, params, _, tokens = tiny
    changed = tokens.at[2, 9].set(1234)
    h0 = np.asarray(_text_hidden(model, params, tokens))
    h1 = np.asarray(_text_hidden(model, params, changed))
    np.testing.assert_array_equal(h0[2, :9], h1[2, :9])
    assert np.abs(h0[2, 9:] - h1[2, 9:]).max() > 1e-3
    np.testing.assert_array_equal(h0[:2], h1[:2])


def stack_blocks(params, n_visual_stack, n_text):
    """Loop params -> scan layout (visual: blocks 0..L-2 stacked, last separate)."""
    out = jax.tree.map(lambda x: x, params)

    def stack(tower, n):
        tr = dict(out[tower]["transformer"])
        blocks = [tr.pop(f"resblocks_{i}") for i in range(n)]
        tr["resblocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
        out[tower] = {**out[tower], "transformer": tr}

    stack("visual", n_visual_stack)
    stack("text", n_text)
    return out


def test_scan_and_remat_match_loop(tiny):
    cfg, model, params, images, tokens = tiny
    ref = model.apply({"params": params}, images, tokens)
    m = cfg.model.copy_and_resolve_references()
    m.remat = True
    out = clip.build_model(m).apply({"params": params}, images, tokens)
    for k in ("img", "dense", "txt"):
        np.testing.assert_allclose(out[k], ref[k], atol=1e-5, rtol=1e-5)
    m.scan = True
    stacked = stack_blocks(params, m.vision.layers - 1, m.text.layers)
    abstract = clip.abstract_params(m)
    flat_a = traverse_util.flatten_dict(abstract)
    flat_s = traverse_util.flatten_dict(stacked)
    assert {k: v.shape for k, v in flat_a.items()} == {k: v.shape for k, v in flat_s.items()}
    out = clip.build_model(m).apply({"params": stacked}, images, tokens)
    for k in ("img", "dense", "txt"):
        np.testing.assert_allclose(out[k], ref[k], atol=1e-5, rtol=1e-5)
    # Gradients flow through scan + remat.
    g = jax.grad(lambda p: clip.build_model(m).apply({"params": p}, images, tokens)["img"].sum())(
        stacked)
    assert np.abs(np.asarray(g["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"])
                  ).max() > 0


def test_maskclip_dense_keeps_global_embedding(tiny):
    cfg, model, params, images, tokens = tiny
    ref = model.apply({"params": params}, images, tokens)
    m = cfg.model.copy_and_resolve_references()
    m.dense_mode = "plain"
    plain = clip.build_model(m).apply({"params": params}, images, tokens)
    # The class token goes through the exact plain path in both modes.
    np.testing.assert_allclose(ref["img"], plain["img"], atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(ref["dense"]) - np.asarray(plain["dense"])).max() > 1e-3


def test_maskclip_dense_is_local_in_last_block(tiny):
    """In MaskCLIP mode the last block mixes no tokens: perturbing the last block's attention
    query/key weights changes the global embedding but not the dense features."""
    cfg, model, params, images, tokens = tiny
    last = f"resblocks_{cfg.model.vision.layers - 1}"
    p2 = jax.tree.map(lambda x: x, params)
    attn = p2["visual"]["transformer"][last]["attn"]
    attn["query"] = {**attn["query"], "kernel": attn["query"]["kernel"] * 3.0}
    attn["key"] = {**attn["key"], "kernel": attn["key"]["kernel"] * -2.0}
    a = model.apply({"params": params}, images, tokens)
    b = model.apply({"params": p2}, images, tokens)
    np.testing.assert_allclose(a["dense"], b["dense"], atol=1e-6)
    assert np.abs(np.asarray(a["img"]) - np.asarray(b["img"])).max() > 1e-4


def test_bfloat16_compute_keeps_float32_params(tiny):
    cfg, model, params, images, tokens = tiny
    ref = model.apply({"params": params}, images, tokens)
    m = cfg.model.copy_and_resolve_references()
    m.dtype = "bfloat16"
    out = clip.build_model(m).apply({"params": params}, images, tokens)
    assert out["img"].dtype == jnp.float32
    rel = np.abs(np.asarray(out["img"]) - np.asarray(ref["img"])).max() / np.abs(
        np.asarray(ref["img"])).max()
    assert rel < 0.1


def test_custom_vjp_gradients_match_plain_autodiff(tiny, monkeypatch):
    """The towers' custom VJPs (ops/dense.py, ops/attention.py; CPU only) against the plain-jnp
    path under XLA's autodiff (what TPU / GPU run): float32 equal, bf16 pointing the same way,
    param gradients float32."""
    cfg, _, params, images, tokens = tiny

    def grads(dtype):
        m = cfg.model.copy_and_resolve_references()
        m.dtype = dtype
        model = clip.build_model(m)

        def loss(p):
            out = model.apply({"params": p}, images, tokens)
            return jnp.sum(out["img"] @ out["txt"].T) + jnp.sum(out["dense"] ** 2)
        fn = jax.jit(jax.grad(loss))
        barriers = "optimization_barrier" in fn.lower(params).as_text()
        return fn(params), barriers

    (g32, b32), (g16, _) = grads("float32"), grads("bfloat16")
    from umg_jax.ops import attention as attention_ops
    from umg_jax.ops import dense as dense_ops

    with monkeypatch.context() as mp:  # the ops take their path from the compile target
        for mod in (dense_ops, attention_ops):
            mp.setattr(mod, "target_platform", lambda: "tpu")  # 65 tokens: XLA attention
        ref, b_ref = grads("float32")
    assert b32 and not b_ref  # the custom VJPs' barriers on CPU only: two different paths
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))

    def flat(g, tower):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(g[tower])])

    for tower in ("visual", "text"):
        r = flat(ref, tower)
        err32 = np.abs(flat(g32, tower) - r).max() / np.abs(r).max()
        assert err32 < 1e-4, (tower, err32)  # float32: the same maths, summed in another order
        a = flat(g16, tower)
        cos = a @ r / (np.linalg.norm(a) * np.linalg.norm(r))
        assert cos > 0.99, (tower, cos)


def test_logit_scale_clamped_and_granularity_scales(tiny):
    cfg, model, params, images, tokens = tiny
    p2 = {**params, "logit_scale": jnp.float32(10.0)}
    out = model.apply({"params": p2}, images, tokens)
    assert float(out["scales"]["image"]) == pytest.approx(np.log(100.0), abs=1e-6)
    assert "logit_scale_region" in params  # tiny turns per-granularity temperatures on
    assert out["biases"] is None


def test_bad_config_errors():
    cfg = _cfg("tiny")
    m = cfg.model.copy_and_resolve_references()
    m.act = "relu6"
    with pytest.raises(ValueError, match="unknown activation"):
        clip.abstract_params(m)
    m = cfg.model.copy_and_resolve_references()
    m.dense_mode = "fancy"
    with pytest.raises(ValueError, match="dense_mode"):
        clip.abstract_params(m)
    for tower, key, value, match in [("vision", "pool", "cls", "class_token=True"),
                                     ("vision", "pool", "gap", "vision pool"),
                                     ("vision", "proj", "none", "embed_dim == width"),
                                     ("text", "pool", "eot", "causal=True")]:
        m = cfg.model.copy_and_resolve_references()
        m.vision.class_token = key != "pool" or value != "cls"
        m[tower][key] = value
        m.embed_dim = 64  # != the vision width 128
        if tower == "text":
            m.text.causal = False
        with pytest.raises(ValueError, match=match):
            clip.abstract_params(m)
