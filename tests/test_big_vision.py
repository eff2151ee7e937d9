"""Tests of umg_jax/interop/big_vision.py (SigLIP ``.npz`` import) and the SigLIP tower switches.

The reference is open_clip's own ``load_big_vision_weights`` into its SigLIP model (timm vision
tower with MAP pooling, open_clip text tower): random big_vision-named weights go through both
readers and both forward passes. open_clip / timm run erf GELU where big_vision runs the tanh
approximation, so parity is checked with ``--act gelu`` and, for the default ``gelu_tanh``,
against the same torch model with its GELUs switched to ``approximate="tanh"``.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from conftest import torch_peers

from umg_jax.interop import big_vision, import_torch
from umg_jax.models import clip

TOL = 1e-5  # max abs diff, float32

TINY = dict(patch=8, grid=4, width=64, vlayers=2, vheads=4, vmlp=160, twidth=48, tlayers=2,
            theads=3, tmlp=96, vocab=100, context=12)
B16 = dict(patch=16, grid=14, width=768, vlayers=2, vheads=12, vmlp=3072, twidth=768, tlayers=2,
           theads=12, tmlp=3072, vocab=32000, context=64)  # SigLIP B/16-224, 2 layers per tower


def siglip_weights(a: dict, seed: int = 0, img_head: bool = False, scanned: bool = False
                   ) -> dict[str, np.ndarray]:
    """Random weights under big_vision's SigLIP names (anchors.md 3.4), ``params/`` prefixed."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w: dict[str, np.ndarray] = {}

    def mha(pre, d, h):
        for n in ("query", "key", "value"):
            w[f"{pre}{n}/kernel"], w[f"{pre}{n}/bias"] = r(d, h, d // h), r(h, d // h)
        w[f"{pre}out/kernel"], w[f"{pre}out/bias"] = r(h, d // h, d), r(d)

    def mlp(pre, d, hidden):
        w[f"{pre}Dense_0/kernel"], w[f"{pre}Dense_0/bias"] = r(d, hidden), r(hidden)
        w[f"{pre}Dense_1/kernel"], w[f"{pre}Dense_1/bias"] = r(hidden, d), r(d)

    def ln(pre, d):
        w[f"{pre}scale"], w[f"{pre}bias"] = 1 + r(d), r(d)

    def block(pre, d, h, hidden):
        ln(f"{pre}LayerNorm_0/", d)
        mha(f"{pre}MultiHeadDotProductAttention_0/", d, h)
        ln(f"{pre}LayerNorm_1/", d)
        mlp(f"{pre}MlpBlock_0/", d, hidden)

    d, p = a["width"], a["patch"]
    w["img/embedding/kernel"], w["img/embedding/bias"] = r(p, p, 3, d), r(d)
    w["img/pos_embedding"] = r(1, a["grid"] ** 2, d)
    for i in range(a["vlayers"]):
        block(f"img/Transformer/encoderblock_{i}/", d, a["vheads"], a["vmlp"])
    ln("img/Transformer/encoder_norm/", d)
    w["img/MAPHead_0/probe"] = r(1, 1, d)
    mha("img/MAPHead_0/MultiHeadDotProductAttention_0/", d, a["vheads"])
    ln("img/MAPHead_0/LayerNorm_0/", d)
    mlp("img/MAPHead_0/MlpBlock_0/", d, a["vmlp"])
    if img_head:
        w["img/head/kernel"], w["img/head/bias"] = r(d, d), r(d)
    tw = a["twidth"]
    w["txt/Embed_0/embedding"] = r(a["vocab"], tw)
    w["txt/pos_embedding"] = r(1, a["context"], tw)
    for i in range(a["tlayers"]):
        block(f"txt/Encoder_0/encoderblock_{i}/", tw, a["theads"], a["tmlp"])
    ln("txt/Encoder_0/encoder_norm/", tw)
    w["txt/head/kernel"], w["txt/head/bias"] = r(tw, d), r(d)
    w["t"], w["b"] = np.array([2.3], np.float32), np.array([-10.0], np.float32)
    if scanned:  # big_vision's scan layout: one encoderblock scope with a leading layer axis
        for tower, n in (("img/Transformer/", a["vlayers"]), ("txt/Encoder_0/", a["tlayers"])):
            names = {k.split("/", 3)[3] for k in w if k.startswith(f"{tower}encoderblock_")}
            for name in names:
                w[f"{tower}encoderblock/{name}"] = np.stack(
                    [w.pop(f"{tower}encoderblock_{i}/{name}") for i in range(n)])
    return {f"params/{k}": v for k, v in w.items()}


def open_clip_siglip(torch, a: dict, npz: str, tanh: bool = False):
    """open_clip's SigLIP (timm MAP tower + open_clip text) loaded by open_clip's own reader."""
    import timm
    from open_clip.convert import load_big_vision_weights
    from open_clip.model import CustomTextCLIP

    size = a["grid"] * a["patch"]
    tiny = dict(embed_dim=a["width"], depth=a["vlayers"], num_heads=a["vheads"], img_size=size,
                patch_size=a["patch"], mlp_ratio=a["vmlp"] / a["width"])
    orig = timm.create_model
    timm.create_model = functools.partial(orig, **tiny)  # TimmModel passes no size kwargs
    try:
        model = CustomTextCLIP(
            embed_dim=a["width"], init_logit_bias=-10,
            vision_cfg=dict(timm_model_name="vit_base_patch16_siglip_224", timm_pool="map",
                            timm_proj="none", image_size=size),
            text_cfg=dict(context_length=a["context"], vocab_size=a["vocab"], width=a["twidth"],
                          heads=a["theads"], layers=a["tlayers"], mlp_ratio=a["tmlp"] / a["twidth"],
                          no_causal_mask=True, proj_bias=True, pool_type="last",
                          norm_kwargs={"eps": 1e-6}))
    finally:
        timm.create_model = orig
    load_big_vision_weights(model, npz)
    if tanh:
        for mod in model.modules():
            if isinstance(mod, torch.nn.GELU):
                mod.approximate = "tanh"
    return model.eval()


def _inputs(a: dict, seed: int = 1):
    rng = np.random.default_rng(seed)
    s = a["grid"] * a["patch"]
    images = rng.normal(size=(2, s, s, 3)).astype(np.float32)
    tokens = rng.integers(2, a["vocab"], (3, a["context"]))
    tokens[0, 4:] = 1  # SigLIP pads with 1
    return images, tokens


def _torch_forward(torch, model, images, tokens):
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        txt = model.encode_text(torch.from_numpy(tokens)).numpy()
    return img, txt


def _jax_forward(cfg, params, images, tokens):
    out = jax.jit(clip.build_model(cfg).apply)({"params": params}, jnp.asarray(images),
                                                jnp.asarray(tokens, jnp.int32))
    return np.asarray(out["img"]), np.asarray(out["txt"]), np.asarray(out["dense"])


def _sigmoid_logits(img, txt, t, b):
    img = img / np.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
    return np.exp(t) * img @ txt.T + b


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("bv") / "siglip.npz"
    np.savez(path, **siglip_weights(TINY))
    return str(path)


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("arch", ["tiny", "b16"])
def test_import_matches_open_clip(tmp_path, tiny_npz, arch):
    torch = torch_peers()
    a = TINY if arch == "tiny" else B16
    npz = tiny_npz
    if arch == "b16":
        npz = str(tmp_path / "b16.npz")
        np.savez(npz, **siglip_weights(B16, seed=3))
    ref = open_clip_siglip(torch, a, npz)
    params, cfg, report = import_torch.import_source(import_torch.load_source(npz), act="gelu")
    assert report["format"] == "big_vision" and report["act"] == "gelu"
    images, tokens = _inputs(a)
    ti, tt = _torch_forward(torch, ref, images, tokens)
    ji, jt, _ = _jax_forward(cfg, params, images, tokens)
    assert np.abs(ji - ti).max() <= TOL * max(1.0, np.abs(ti).max())
    assert np.abs(jt - tt).max() <= TOL * max(1.0, np.abs(tt).max())
    t, b = float(params["logit_scale"]), float(params["logit_bias"])
    with torch.no_grad():
        ref_logits = (ref.logit_scale.exp() * torch.from_numpy(ti / np.linalg.norm(ti, axis=-1,
                      keepdims=True)) @ torch.from_numpy(tt / np.linalg.norm(tt, axis=-1,
                      keepdims=True)).T + ref.logit_bias).numpy()
    assert np.abs(_sigmoid_logits(ji, jt, t, b) - ref_logits).max() <= TOL * 10
    if arch == "b16":  # the SigLIP B/16 shapes: 768 wide, 12 heads, 64 tokens, 32k vocabulary
        assert (cfg.vision.width, cfg.vision.heads, cfg.text.context_length,
                cfg.text.vocab_size, cfg.vision.image_size) == (768, 12, 64, 32000, 224)


def test_default_activation_is_big_visions_tanh_gelu(tiny_npz):
    """Without --act the import uses tanh GELU (big_vision's nn.gelu): it matches the torch model
    with tanh GELUs and not open_clip's erf ones, so a wrong activation fails here."""
    torch = torch_peers()
    params, cfg, report = import_torch.import_source(import_torch.load_source(tiny_npz))
    assert report["act"] == cfg.act == "gelu_tanh" and cfg.ln_eps == 1e-6
    images, tokens = _inputs(TINY)
    ji, jt, _ = _jax_forward(cfg, params, images, tokens)
    ti, tt = _torch_forward(torch, open_clip_siglip(torch, TINY, tiny_npz, tanh=True), images,
                            tokens)
    assert np.abs(ji - ti).max() <= TOL and np.abs(jt - tt).max() <= TOL
    ei, et = _torch_forward(torch, open_clip_siglip(torch, TINY, tiny_npz), images, tokens)
    assert np.abs(ji - ei).max() > 10 * TOL and np.abs(jt - et).max() > 10 * TOL


def test_scanned_layout_and_params_prefix_read_the_same(tmp_path, tiny_npz):
    plain = big_vision.read_npz(tiny_npz)
    path = tmp_path / "scanned.npz"
    w = siglip_weights(TINY, scanned=True)
    np.savez(path, **{k.removeprefix("params/"): v for k, v in w.items()})  # no prefix either
    scanned = big_vision.read_npz(str(path))
    assert sorted(plain) == sorted(scanned)
    assert all(np.array_equal(plain[k], scanned[k]) for k in plain)


def test_scan_model_layout_gives_the_same_forward(tiny_npz):
    src = import_torch.load_source(tiny_npz)
    params, cfg, _ = import_torch.import_source(src)
    cfg_scan = mlc.ConfigDict(cfg.to_dict())
    cfg_scan.scan = True
    params_scan, _, _ = import_torch.import_source(src, cfg_scan)
    assert params_scan["visual"]["transformer"]["resblocks"]["ln_1"]["scale"].shape[0] == 1
    images, tokens = _inputs(TINY)
    for x, y in zip(_jax_forward(cfg, params, images, tokens),
                    _jax_forward(cfg_scan, params_scan, images, tokens), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_image_head_becomes_a_biased_projection(tmp_path, tiny_npz):
    """An ``img/head`` (out_dim set for the image tower) is the biased ``visual/proj``: the global
    embedding is open_clip's head-less output times the kernel plus the bias."""
    torch = torch_peers()
    path = tmp_path / "head.npz"
    w = siglip_weights(TINY, img_head=True)
    np.savez(path, **w)
    params, cfg, _ = import_torch.import_source(import_torch.load_source(str(path)), act="gelu")
    assert cfg.vision.proj == "bias"
    images, tokens = _inputs(TINY)
    ji, _, dense = _jax_forward(cfg, params, images, tokens)
    ti, _ = _torch_forward(torch, open_clip_siglip(torch, TINY, tiny_npz), images, tokens)
    want = ti @ w["params/img/head/kernel"] + w["params/img/head/bias"]
    assert np.abs(ji - want).max() <= TOL * max(1.0, np.abs(want).max())
    assert dense.shape == (2, TINY["grid"], TINY["grid"], TINY["width"])


def test_dense_map_is_the_map_head_on_each_token(tiny_npz):
    """SigLIP's dense feature of a patch = the MAP head pooling a sequence of that one token."""
    from umg_jax.models.layers import MAPHead

    params, cfg, _ = import_torch.import_source(import_torch.load_source(tiny_npz))
    images, tokens = _inputs(TINY)
    _, _, dense = _jax_forward(cfg, params, images, tokens)
    model = clip.build_model(cfg)

    def tokens_after_ln_post(x):  # the vision tower up to ln_post, via flax's intermediates
        _, state = model.apply({"params": params}, x, method=clip.CLIP.encode_image,
                               capture_intermediates=lambda m, _: m.name == "ln_post",
                               mutable=["intermediates"])
        return state["intermediates"]["visual"]["ln_post"]["__call__"][0]

    h = tokens_after_ln_post(jnp.asarray(images))
    head = MAPHead(TINY["width"], TINY["vheads"], act=cfg.act, ln_eps=cfg.ln_eps,
                   mlp_dim=TINY["vmlp"])
    single = head.apply({"params": params["visual"]["map_head"]},
                        h.reshape(-1, 1, TINY["width"]))
    np.testing.assert_allclose(dense.reshape(-1, TINY["width"]), np.asarray(single), atol=1e-5)


# ------------------------------------------------------------------------------ CLI
def test_cli_writes_an_import_dir_with_the_tokenizer(tmp_path, tiny_npz, spm_model):
    """The import dir names the copied SentencePiece model; ``umg_jax.load`` tokenizes with it
    (pad 1) and normalises pixels to [-1, 1]."""
    from umg_jax import inference

    out = tmp_path / "imp"
    import_torch.main([tiny_npz, "--out", str(out), "--tokenizer", spm_model])
    cfg = import_torch.load_model_config(str(out / "model_config.json"))
    assert cfg.text.tokenizer == str(out.absolute() / "tokenizer.model")
    stored = json.loads((out / "model_config.json").read_text())["text"]["tokenizer"]
    assert stored == "tokenizer.model"  # relative to the dir, which can be moved
    assert (out / "tokenizer.model").read_bytes() == pathlib.Path(spm_model).read_bytes()
    model = inference.load(str(out))
    toks = model.tokenize(["a photo of a cat"])
    assert toks.shape == (1, TINY["context"]) and toks[0, -1] == 1
    np.testing.assert_allclose(model.pixel_mean, 0.5)
    img = np.full((40, 40, 3), 255, np.uint8)
    np.testing.assert_allclose(model.preprocess(img), 1.0, atol=1e-5)


def test_resize_needs_permission_and_keeps_no_class_row(tmp_path, tiny_npz, capsys):
    from umg_jax.models import pos_embed

    params, cfg, _ = import_torch.import_source(import_torch.load_source(tiny_npz))
    cfg.vision.image_size = 6 * TINY["patch"]
    cfg_path = tmp_path / "m.json"
    cfg_path.write_text(cfg.to_json())
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        import_torch.main([tiny_npz, "--config", str(cfg_path), "--out", str(out)])
    assert e.value.code == 2 and "--allow_resize" in capsys.readouterr().err
    assert not out.exists()
    p2, _, report = import_torch.import_source(import_torch.load_source(tiny_npz), cfg,
                                               allow_resize=True)
    assert report["resized"] == "4x4 -> 6x6"
    pos = big_vision.read_npz(tiny_npz)["img/pos_embedding"][0]
    np.testing.assert_array_equal(p2["visual"]["positional_embedding"],
                                  pos_embed.resize(pos, (6, 6), prefix=0))
    torch = torch_peers()
    g = torch.from_numpy(pos.reshape(1, 4, 4, -1)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(g, size=(6, 6), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(p2["visual"]["positional_embedding"],
                               ref.permute(0, 2, 3, 1).reshape(36, -1).numpy(), atol=1e-5)


def _error_exit(capsys, argv, out, match):
    with pytest.raises(SystemExit) as e:
        import_torch.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not pathlib.Path(out).exists()


@pytest.mark.parametrize("case,match", [
    ("truncated", "truncated"),
    ("cls", "img/cls"),
    ("gap", "MAPHead_0"),
    ("not_bv", "not a big_vision"),
    ("missing_block_key", "missing keys"),
])
def test_bad_npz_inputs_give_one_line_and_write_nothing(tmp_path, tiny_npz, capsys, case, match):
    path = tmp_path / f"{case}.npz"
    w = siglip_weights(TINY)
    if case == "truncated":
        path.write_bytes(pathlib.Path(tiny_npz).read_bytes()[:5000])
    else:
        if case == "cls":
            w["params/img/cls"] = np.zeros((1, 1, TINY["width"]), np.float32)
        elif case == "gap":
            w = {k: v for k, v in w.items() if "MAPHead_0" not in k}
        elif case == "not_bv":
            w = {"weights": np.zeros(3, np.float32)}
        elif case == "missing_block_key":
            del w["params/txt/Encoder_0/encoderblock_1/LayerNorm_1/bias"]
        np.savez(path, **w)
    out = tmp_path / "o"
    _error_exit(capsys, [str(path), "--out", str(out)], out, match)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, tiny_npz, capsys):
    _, cfg, _ = import_torch.import_source(import_torch.load_source(tiny_npz))
    cfg.text.width = 96
    cfg.text.mlp_dim = 192
    cfg_path = tmp_path / "m.json"
    cfg_path.write_text(cfg.to_json())
    out = tmp_path / "o"
    _error_exit(capsys, [tiny_npz, "--config", str(cfg_path), "--out", str(out)], out,
                "shape mismatch at txt/")


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu"])
def test_export_to_hf_siglip_model_matches(tmp_path, tiny_npz, act):
    """Export of a SigLIP import: transformers' ``SiglipModel.from_pretrained`` loads it with no
    missing / unexpected keys and computes our embeddings and sigmoid logits."""
    torch = torch_peers()
    import transformers

    from umg_jax.interop import export_torch

    params, cfg, _ = import_torch.import_source(import_torch.load_source(tiny_npz), act=act)
    out = tmp_path / "hf"
    info = export_torch.export_params(params, cfg, "hf", str(out))
    assert info["extras"] == []
    model, load_info = transformers.SiglipModel.from_pretrained(str(out), output_loading_info=True)
    assert not any(load_info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    images, tokens = _inputs(TINY)
    ji, jt, _ = _jax_forward(cfg, params, images, tokens)
    with torch.no_grad():
        px = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        ids = torch.from_numpy(tokens)
        hi = model.get_image_features(pixel_values=px).pooler_output.numpy()
        ht = model.get_text_features(input_ids=ids).pooler_output.numpy()
        logits = model(input_ids=ids, pixel_values=px).logits_per_image.numpy()
    assert np.abs(ji - hi).max() <= TOL and np.abs(jt - ht).max() <= TOL
    want = _sigmoid_logits(ji, jt, float(params["logit_scale"]), float(params["logit_bias"]))
    assert np.abs(logits - want).max() <= 10 * TOL


def test_export_refuses_what_has_no_siglip_model_slot(tmp_path, tiny_npz):
    from umg_jax.interop import export_torch
    from umg_jax.interop.mapping import InteropError

    params, cfg, _ = import_torch.import_source(import_torch.load_source(tiny_npz))
    with pytest.raises(InteropError, match="--format hf"):
        export_torch.export_params(params, cfg, "open_clip", str(tmp_path / "oc"))
    assert not (tmp_path / "oc").exists()
    cfg.text.causal = True  # a half-SigLIP: neither a CLIPModel nor a SiglipModel
    with pytest.raises(InteropError, match="SigLIP-style towers"):
        export_torch.export_params(params, cfg, "hf", str(tmp_path / "half"))
    path = tmp_path / "head.npz"
    np.savez(path, **siglip_weights(TINY, img_head=True))
    params, cfg, _ = import_torch.import_source(import_torch.load_source(str(path)))
    with pytest.raises(InteropError, match="no image projection"):
        export_torch.export_params(params, cfg, "hf", str(tmp_path / "head"))
