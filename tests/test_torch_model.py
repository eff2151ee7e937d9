"""``umg_jax/interop/torch_model.py`` (UMG-CLIP in PyTorch after ``export_torch --format hf``):
parity with the JAX inference API (``umg_jax.inference.UMGModel``) on the same random tiny model,
the bad inputs it refuses, and that it imports no JAX.

One tiny model per module (random init, fixed seed; distinct per-granularity temperatures), one
export, one JAX compile per call shape.
"""

import ast
import json
import pathlib
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from umg_jax import config_lib, inference
from umg_jax.interop import export_torch, mapping
from umg_jax.models import clip

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULE = ROOT / "umg_jax/interop/torch_model.py"
SEG_MODULE = ROOT / "umg_jax/interop/torch_seg.py"
TOL = 1e-4  # max abs diff, float32
LABELS = ["circle", "star", "grass", "sky"]
TEXTS = ["a photo of a circle.", "Two  STARS &amp; a sky!", "grass"]
# log scales per granularity: own values for tags / region / pixel, one above the clamp
SCALES = {"logit_scale": 2.0, "logit_scale_tags": 1.5, "logit_scale_region": 3.0,
          "logit_scale_mask": 9.0, "logit_scale_pixel": 0.5}


def _model_cfg(dense_mode="maskclip"):
    c = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    m = c.model
    m.vision.update(image_size=32, patch_size=8, width=32, layers=2, heads=2)
    m.text.update(width=32, layers=1, heads=2, context_length=16)
    m.embed_dim = 32
    m.dense_mode = dense_mode
    return m


def _params(m, seed=1):
    """Random params without the slow op-by-op Flax init: O(1)-gain matrices, LayerNorms off
    their constant init (a swapped or dropped one shows), small embeddings, ``SCALES``."""
    rng = np.random.default_rng(seed)
    flat = mapping.flatten(clip.abstract_params(m))
    out = {}
    for k, a in flat.items():
        z = rng.normal(size=a.shape).astype(np.float32)
        leaf = k.rsplit("/", 1)[-1]
        if k in SCALES:
            v = np.float32(SCALES[k])
        elif leaf == "scale":
            v = 1 + 0.1 * z
        elif leaf == "bias":
            v = 0.1 * z
        elif leaf == "embedding" or "embedding" in leaf:
            v = 0.02 * z if leaf != "class_embedding" else z * a.shape[0] ** -0.5
        else:  # kernels [in..., out...]: query/key/value [D, H, Dh] read D
            fan_in = a.shape[0] if leaf == "kernel" and len(a.shape) == 3 and \
                "/out/" not in k else np.prod(a.shape[:-1])
            v = z * float(fan_in) ** -0.5
        out[k] = np.asarray(v, np.float32)
    return mapping.unflatten(out)


@pytest.fixture(scope="module")
def tm_mod(torch_mod):
    """The module under test. Without torchvision's C++ ops (this test environment's CPU torch)
    ``roi_align`` runs its Python reference through ``torch.compile``, which takes ~20 s to
    compile; dynamo is switched off for the module so the same reference runs eagerly."""
    import torch._dynamo

    from umg_jax.interop import torch_model

    was = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield torch_model
    torch._dynamo.config.disable = was


@pytest.fixture(scope="module")
def run(tm_mod, tmp_path_factory):
    """``(jax UMGModel, export dir, UMGTorch, params)`` of the maskclip tiny model."""
    m = _model_cfg()
    params = _params(m)
    out = tmp_path_factory.mktemp("export") / "hf"
    export_torch.export_params(params, m, "hf", str(out))
    return inference.UMGModel(params, m), out, tm_mod.UMGTorch.from_export(out), params


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (50, 44, 3), dtype=np.uint8)  # not square, not 32


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------ export
def test_export_writes_umg_config(run):
    jm, out, _, _ = run
    cfg = json.loads((out / "umg_config.json").read_text())
    assert cfg["architecture"] == "hf_clip" and cfg["dense_mode"] == "maskclip"
    assert cfg["image_size"] == 32 and cfg["context_length"] == 16
    assert cfg["tokenizer"]["vocab"] == "vocab.json"  # relative to the export directory
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    assert cfg["log_logit_scales"]["region"] == pytest.approx(3.0)
    assert cfg["log_logit_scales"]["mask"] == pytest.approx(jm.config.logit_scale_max)
    assert cfg["log_logit_scales"]["image"] == pytest.approx(2.0)
    assert set(cfg["extras"]) == {k for k in SCALES if k != "logit_scale"}
    assert cfg["preprocess"]["mean"] == pytest.approx(list(inference.MEAN))


def test_export_bundles_sentencepiece_relative(spm_model, tmp_path, tm_mod):
    m = _model_cfg()
    m.text.tokenizer = spm_model
    out = tmp_path / "hf"
    export_torch.export_params(_params(m), m, "hf", str(out))
    cfg = json.loads((out / "umg_config.json").read_text())
    assert cfg["tokenizer"]["file"] == "tokenizer.model"
    assert (out / "tokenizer.model").read_bytes() == pathlib.Path(spm_model).read_bytes()
    t = tm_mod.UMGTorch.from_export(out)  # token ids work, text is refused clearly
    assert t.encode_text(np.array([[5, 6, 1]])).shape == (1, 32)
    with pytest.raises(ValueError, match="CLIP BPE only"):
        t.encode_text(["a cat"])


# ------------------------------------------------------------------------------ parity
def test_preprocess_and_tokens_match(run, image, tmp_path):
    jm, _, tm, _ = run
    want = jm.preprocess(image).transpose(2, 0, 1)
    path = tmp_path / "im.png"
    Image.fromarray(image).save(path)
    for src in (image, Image.fromarray(image), path, str(path)):
        assert _diff(tm.preprocess(src), want) <= 1e-5
    np.testing.assert_array_equal(tm.tokenize(TEXTS).numpy(), jm.tokenize(TEXTS))


def test_towers_match_raw(run, image):
    jm, _, tm, _ = run
    rng = np.random.default_rng(1)
    pv = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    img, dense = jm.encode_image(pv)
    import torch

    t_pv = torch.from_numpy(pv.transpose(0, 3, 1, 2).copy())
    assert _diff(tm.encode_image(t_pv, normalize=False), img) <= TOL
    assert _diff(tm.dense(t_pv, normalize=False), dense) <= TOL
    toks = jm.tokenize(TEXTS)
    assert _diff(tm.encode_text(toks, normalize=False), jm.encode_text(toks)) <= TOL
    assert _diff(tm.encode_text(TEXTS), jm.embed_text(TEXTS)) <= TOL


def test_image_level_api_matches(run, image):
    jm, _, tm, _ = run
    assert _diff(tm.encode_image(image), jm.embed_image(image)) <= TOL
    d = tm.dense(image)
    assert d.shape == (4, 4, 32)
    assert _diff(d, jm.encode_dense(image)) <= TOL


def test_boxes_and_masks_match(run, image):
    jm, _, tm, _ = run
    boxes = [[0, 0, 44, 50], [3.5, 7, 20, 31.25], [30, 40, 44, 50], [10, 2, 11, 3]]
    tb = tm.encode_boxes(image, boxes)
    assert tb.shape == (4, 32)
    assert _diff(tb, jm.encode_boxes(image, boxes)) <= TOL
    rng = np.random.default_rng(2)
    masks = rng.random((3, 50, 44)) > 0.6
    masks[2] = False  # empty: zeros in both
    masks[1, 10:30, 5:25] = True
    tmk = tm.encode_masks(image, masks)
    assert _diff(tmk, jm.encode_masks(image, masks)) <= TOL
    assert float(tmk[2].abs().max()) == 0.0


def test_segmentation_matches(run, image):
    jm, _, tm, _ = run
    t = jm.encode_text_labels(LABELS)
    assert _diff(tm.encode_text_labels(LABELS), t) <= TOL
    logits = np.einsum("hwe,ce->hwc", jm.encode_dense(image), t)
    up = np.asarray(jax.image.resize(jnp.asarray(logits), (50, 44, len(LABELS)), "bilinear"))
    assert _diff(tm.segment_logits(image, LABELS), up) <= TOL
    got = tm.segment(image, LABELS).numpy()
    assert got.dtype == np.int32 and got.shape == (50, 44)
    np.testing.assert_array_equal(got, jm.segment(image, LABELS))


def test_batch_of_pixel_values_matches_single_images(run, image):
    _, _, tm, _ = run
    import torch

    other = np.flip(image, 0).copy()
    pv = torch.stack([tm.preprocess(image), tm.preprocess(other)])
    assert _diff(tm.dense(pv)[1], tm.dense(other)) <= 1e-6
    boxes = [[0, 0, 32, 32], [4, 4, 20, 12]]
    out = tm.encode_boxes(pv, boxes)  # pixels of the 32 x 32 input
    assert out.shape == (2, 2, 32)
    assert tm.segment(pv, LABELS).shape == (2, 32, 32)


def test_logit_scales_match(run):
    jm, _, tm, params = run
    temps = jm.model.apply({"params": params}, method=clip.CLIP.temperatures)
    for g, s in temps["scales"].items():
        assert tm.logit_scales[g] == pytest.approx(float(np.exp(s)), rel=1e-6)
    assert tm.logit_scales["image"] == pytest.approx(jm.logit_scale, rel=1e-6)
    assert tm.logit_biases is None
    assert len({round(v, 4) for v in tm.logit_scales.values()}) == 5


def test_plain_dense_mode_matches(tm_mod, tmp_path, image):
    m = _model_cfg("plain")
    params = _params(m)
    export_torch.export_params(params, m, "hf", str(tmp_path / "hf"))
    tm = tm_mod.UMGTorch.from_export(tmp_path / "hf")
    assert tm.dense_mode == "plain"
    assert _diff(tm.dense(image), inference.UMGModel(params, m).encode_dense(image)) <= TOL


# ------------------------------------------------------------------------------ bad input
def _copy(src, dst, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def test_plain_hf_clip_loads_with_warning(run, tm_mod, tmp_path, image):
    _, out, tm, _ = run
    d = _copy(out, tmp_path / "plain", drop=("umg_config.json", "umg_extras.safetensors"))
    with pytest.warns(UserWarning, match="default MaskCLIP construction"):
        plain = tm_mod.UMGTorch.from_export(d)
    assert _diff(plain.dense(image), tm.dense(image)) <= 1e-6  # same construction, same weights
    assert list(plain.logit_scales.values()) == [pytest.approx(np.exp(2.0), rel=1e-6)] * 5


def test_mismatched_extras_refused(run, tm_mod, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, out, _, _ = run
    d = _copy(out, tmp_path / "bad")
    extras = load_file(str(d / "umg_extras.safetensors"))
    extras["logit_scale_region"] = np.array(1.0, np.float32)
    save_file(extras, str(d / "umg_extras.safetensors"))
    with pytest.raises(ValueError, match="does not match umg_config.json"):
        tm_mod.UMGTorch.from_export(d)
    (d / "umg_extras.safetensors").unlink()
    with pytest.raises(ValueError, match="is missing"):
        tm_mod.UMGTorch.from_export(d)


def test_unrunnable_configs_refused(run, tm_mod, tmp_path):
    _, out, _, _ = run
    d = _copy(out, tmp_path / "odd")
    cfg = json.loads((d / "umg_config.json").read_text())
    for change, match in (({"dense_mode": "clipself"}, "unknown dense_mode"),
                          ({"vision": {**cfg["vision"], "pool": "map"}}, "no place in a CLIP"),
                          ({"token_merge_at_inference": True}, "merges tokens"),
                          ({"image_size": 64}, "different exports"),
                          ({"architecture": "open_clip"}, "--format hf")):
        (d / "umg_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            tm_mod.UMGTorch.from_export(d)
    hf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**hf, "model_type": "siglip"}))
    with pytest.raises(ValueError, match="model_type='siglip'"):
        tm_mod.UMGTorch.from_export(d)
    (d / "open_clip_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is an open_clip export"):
        tm_mod.UMGTorch.from_export(d)


def test_bad_boxes_masks_labels_refused(run, image):
    _, _, tm, _ = run
    for box in ([0, 0, 45, 10], [-1, 0, 5, 5], [5, 5, 5, 9], [0, 0, 10, 51]):
        with pytest.raises(ValueError, match="outside the 44x50 image"):
            tm.encode_boxes(image, [box])
    with pytest.raises(ValueError, match="masks are"):
        tm.encode_masks(image, np.ones((1, 32, 32), bool))
    with pytest.raises(ValueError, match="label list is empty"):
        tm.segment(image, [])
    with pytest.raises(ValueError, match="empty label"):
        tm.segment(image, ["sky", " "])


# ------------------------------------------------------------------------------ imports
ALLOWED = {"torch", "torchvision", "safetensors", "transformers", "numpy", "PIL"}


def test_module_imports_no_jax():
    tree = ast.parse(MODULE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add(node.module.split(".")[0])
    assert roots - ALLOWED - set(sys.stdlib_module_names) == set()
    assert not roots & {"jax", "jaxlib", "flax", "umg_jax", "optax", "ml_collections"}


def test_copied_module_runs_without_jax(run, image, seg_run, scene, tmp_path):
    """torch_model.py and torch_seg.py alone, copied elsewhere, with jax / flax / umg_jax made
    unimportable, load the exports and give the same dense map and segmentation."""
    _, out, tm, _ = run
    _, ts, seg_out, _ = seg_run
    for f in (MODULE, SEG_MODULE):
        shutil.copy(f, tmp_path / f.name)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "want.npy", tm.dense(image).numpy())
    np.save(tmp_path / "scene.npy", scene)
    np.save(tmp_path / "want_pan.npy",
            ts.predict(scene, SEG_LABELS, isthing=SEG_THING)["panoptic"].numpy())
    code = f"""
import sys
sys.path = [p for p in sys.path if p not in ("", ".", {str(ROOT)!r})]
sys.path.insert(0, {str(tmp_path)!r})
for name in ("jax", "jaxlib", "flax", "umg_jax", "optax", "orbax"):
    sys.modules[name] = None  # any import of these raises ImportError
import numpy as np, torch
lib = torch.library.Library("torchvision", "DEF")  # this environment's torchvision shim
for s in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
          "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
    lib.define(s)
import torch_model, torch_seg
m = torch_model.UMGTorch.from_export({str(out)!r})
got = m.dense(np.load({str(tmp_path / "image.npy")!r})).numpy()
assert np.abs(got - np.load({str(tmp_path / "want.npy")!r})).max() == 0.0
s = torch_seg.UMGTorchSegmenter.from_export({str(seg_out)!r})
got = s.predict(np.load({str(tmp_path / "scene.npy")!r}), {SEG_LABELS!r}, isthing={SEG_THING!r})
assert (got["panoptic"].numpy() == np.load({str(tmp_path / "want_pan.npy")!r})).all()
assert not any(k.split(".")[0] in ("jax", "flax", "umg_jax") and sys.modules[k] is not None
               for k in sys.modules)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_umg_jax_import_does_not_import_torch():
    code = ("import sys, umg_jax, umg_jax.interop; "
            "assert not {'torch', 'transformers'} & set(sys.modules), 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_warnings_clean_on_full_export(run, tm_mod):
    _, out, _, _ = run
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tm_mod.UMGTorch.from_export(out)


# ------------------------------------------------------------------------------ workdir runs
# Command-1-sized tiny models (configs/tiny_adapter.py, configs/seg_tiny.py at their own sizes),
# random params, saved as training workdirs and exported by the CLI, as a user would.


def _workdir(wd, config, params):
    from umg_jax import checkpoint

    wd.mkdir()
    (wd / "config.json").write_text(config.to_json_best_effort())
    with checkpoint.Checkpointer(wd, every_steps=1, keep=1, async_save=False) as ck:
        ck.save(7, {"params": params, "step": np.int32(7)})
    return wd


def _seg_params(config, seed=3):
    """Random decoder params (the :func:`_params` rules; a sharp class temperature and sharp
    masks, so that the random head's label maps are not one class)."""
    from umg_jax.models import mask_decoder

    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: mask_decoder.init_params(config, jax.random.key(0)))
    out = {}
    for k, a in mapping.flatten(abstract).items():
        z = rng.normal(size=a.shape).astype(np.float32)
        leaf = k.rsplit("/", 1)[-1]
        if leaf == "scale":
            v = 1 + 0.1 * z
        elif leaf == "bias":
            v = 0.1 * z
        elif leaf == "log_scale":
            v = np.float32(4.0)
        else:  # kernels, queries, positions, void: unit-gain
            v = z * float(np.prod(a.shape[:-1]) if a.ndim > 1 else 1) ** -0.5
            if k.endswith(("query/kernel", "key/kernel", "value/kernel")):
                v = z * float(a.shape[0]) ** -0.5
            if k in ("queries", "query_pos"):
                v = z  # flax's init: distinct queries
            if k == "mask_mlp_1/kernel":
                v = 4 * v  # decisive masks: queries own different parts of the image
        out[k] = np.asarray(v, np.float32)
    return mapping.unflatten(out)


@pytest.fixture(scope="module")
def scene():
    """A 50 x 44 image with regions of flat colour and noise (not square, not the model size)."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (50, 44, 3), dtype=np.uint8)
    img[:20] = [90, 150, 230]
    img[30:, :30] = [60, 170, 60]
    img[5:15, 5:15] = [220, 40, 40]
    return img


@pytest.fixture(scope="module")
def adapter_run(tm_mod, tmp_path_factory):
    """``(umg_jax.load(wd), UMGTorch of its --format hf export, export dir)`` of a random
    configs/tiny_adapter.py run (adapters in both towers, non-zero ``up``)."""
    import umg_jax

    c = config_lib.load_config(str(ROOT / "configs/tiny_adapter.py"))
    tmp = tmp_path_factory.mktemp("adapter")
    wd = _workdir(tmp / "wd", c, _params(c.model, seed=4))
    out = tmp / "hf"
    export_torch.main([str(wd), "--format", "hf", "--out", str(out)])
    return umg_jax.load(str(wd)), tm_mod.UMGTorch.from_export(out), out


def test_adapter_export_matches(adapter_run, scene):
    import copy

    jm, tm, out = adapter_run
    cfg = json.loads((out / "umg_config.json").read_text())
    assert cfg["adapters"] == {"act": "gelu_tanh", "dims": {"vision": 32, "text": 32}}
    assert len(tm.adapters["vision"]) == 4 and len(tm.adapters["text"]) == 3
    assert _diff(tm.encode_image(scene), jm.embed_image(scene)) <= TOL
    assert _diff(tm.dense(scene), jm.encode_dense(scene)) <= TOL
    assert _diff(tm.encode_text(TEXTS), jm.embed_text(TEXTS)) <= TOL
    boxes = [[0, 0, 44, 50], [3.5, 7, 20, 31.25], [30, 40, 44, 50]]
    assert _diff(tm.encode_boxes(scene, boxes), jm.encode_boxes(scene, boxes)) <= TOL
    masks = np.zeros((2, 50, 44), bool)
    masks[0, 10:30, 5:25] = masks[1, 30:] = True
    assert _diff(tm.encode_masks(scene, masks), jm.encode_masks(scene, masks)) <= TOL
    np.testing.assert_array_equal(tm.segment(scene, LABELS).numpy(), jm.segment(scene, LABELS))
    # the adapters matter: without them the towers give other embeddings
    plain = copy.copy(tm)
    plain.adapters, plain._label_cache = {}, {}
    assert _diff(plain.encode_image(scene), jm.embed_image(scene)) > 1e-3
    assert _diff(plain.encode_text(TEXTS), jm.embed_text(TEXTS)) > 1e-3


def test_adapter_export_refusals(adapter_run, tm_mod, tmp_path):
    from safetensors.numpy import load_file, save_file

    jm, _, out = adapter_run
    with pytest.raises(mapping.InteropError, match="--format hf"):
        export_torch.export_params(jm.params, jm.config, "open_clip", str(tmp_path / "oc"))
    assert not (tmp_path / "oc").exists()
    d = _copy(out, tmp_path / "bad")
    sd = load_file(str(d / "umg_adapters.safetensors"))
    key = "text_model.encoder.layers.2.adapter.up.weight"
    save_file({**sd, key: sd[key][:, :16].copy()}, str(d / "umg_adapters.safetensors"))
    with pytest.raises(ValueError, match=r"layers.2.adapter.up.weight is \(128, 16\)"):
        tm_mod.UMGTorch.from_export(d)
    save_file({**sd, "text_model.encoder.layers.9.adapter.up.bias": sd[key][0].copy()},
              str(d / "umg_adapters.safetensors"))
    with pytest.raises(ValueError, match="no listed adapter uses"):
        tm_mod.UMGTorch.from_export(d)
    (d / "umg_adapters.safetensors").unlink()
    with pytest.raises(ValueError, match="umg_adapters.safetensors is missing"):
        tm_mod.UMGTorch.from_export(d)
    save_file(sd, str(d / "umg_adapters.safetensors"))
    cfg = json.loads((d / "umg_config.json").read_text())
    (d / "umg_config.json").write_text(json.dumps({**cfg, "adapters": None}))
    with pytest.raises(ValueError, match="lists none"):
        tm_mod.UMGTorch.from_export(d)


def test_adapter_export_of_scanned_layers(adapter_run, tmp_path):
    """A scanned (stacked) param tree exports the same adapters file as the per-block one."""
    from safetensors.numpy import load_file

    jm, _, out = adapter_run
    m = config_lib.load_config(str(ROOT / "configs/tiny_adapter.py")).model
    m.scan = True
    canonical = mapping.to_canonical(mapping.flatten(jm.params))
    stacked = mapping.to_model_layout(canonical, mapping.flatten(clip.abstract_params(m)))
    assert any("/resblocks/adapter/" in k for k in stacked)
    export_torch.export_params(mapping.unflatten(stacked), m, "hf", str(tmp_path / "hf"))
    want = load_file(str(out / "umg_adapters.safetensors"))
    got = load_file(str(tmp_path / "hf/umg_adapters.safetensors"))
    assert got.keys() == want.keys() and len(got) == 4 * (4 + 3)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# ------------------------------------------------------------------------------ seg head
SEG_LABELS = ["circle", "star", "grass", "sky", "water"]
SEG_THING = [True, True, False, False, False]


@pytest.fixture(scope="module")
def seg_run(tm_mod, tmp_path_factory):
    """``(umg_jax.load_segmenter(wd), UMGTorchSegmenter of the export, export dir, wd)`` of a
    random configs/seg_tiny.py run (low panoptic thresholds: random queries are unsure)."""
    import umg_jax
    from umg_jax.interop import torch_seg

    c = config_lib.load_config(str(ROOT / "configs/seg_tiny.py"))
    c.seg.update(object_threshold=0.0, overlap_threshold=0.2)
    tmp = tmp_path_factory.mktemp("seg")
    params = {"base": _params(c.model, seed=6), "seg": _seg_params(c)}
    wd = _workdir(tmp / "wd", c, params)
    (wd / "seg_vocab.json").write_text(json.dumps({"names": ["circle", "grass", "sky"],
                                                   "holdout": ["star", "water"]}))
    out = tmp / "hf"
    export_torch.main([str(wd), "--format", "hf", "--out", str(out)])
    return umg_jax.load_segmenter(str(wd)), torch_seg.UMGTorchSegmenter.from_export(out), out, wd


def test_seg_export_writes_head(seg_run):
    js, ts, out, _ = seg_run
    cfg = json.loads((out / "umg_config.json").read_text())["seg_head"]
    assert cfg["file"] == "umg_seg_head.safetensors" and (out / cfg["file"]).is_file()
    assert cfg["train_labels"] == ["circle", "grass", "sky"]
    assert (cfg["num_queries"], cfg["width"], cfg["mask_stride"]) == (16, 128, 4)
    assert cfg["object_threshold"] == 0.0 and cfg["ensemble"] is True
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(js.seg_params))
    assert sum(p.numel() for p in ts.decoder.parameters()) == n


@pytest.fixture(scope="module")
def seg_jax(seg_run, scene):
    """umg_jax's decoder outputs on ``scene``: ``(mask_logits [N, h, w], class_logits
    [N, C + 1], mask_prob [N, H, W], {"head" | "ensemble": [N, C + 1]})``."""
    from umg_jax.evaluators import segmentation as se

    js = seg_run[0]
    bb = js.backbone
    text = bb.encode_text_labels(SEG_LABELS)
    pv = bb.preprocess(scene)[None]
    dense = inference._normalize(bb.encode_image(pv)[1])
    mask_logits, cls_logits = map(np.asarray, js.decode(js.seg_params, pv, dense, text))
    seen = np.array([lab in js.train_labels for lab in SEG_LABELS])
    mask_prob, probs = se.head_predictions(
        lambda *a: js.decode(js.seg_params, *a), pv, dense, text, scene.shape[:2], seen,
        js.config.seg, se.mask_logit_scale(bb))
    return mask_logits[0], cls_logits[0], mask_prob[0], {k: v[0] for k, v in probs.items()}


def test_seg_head_beside_open_clip_state_dict(seg_run, tmp_path):
    """``--format open_clip`` to a ``.pt`` writes the head beside it, named after the file."""
    js, _, out, _ = seg_run
    head = export_torch.SegHead(js.seg_params, js.config.seg, ["circle"])
    export_torch.export_params(js.backbone.params, js.backbone.config, "open_clip",
                               str(tmp_path / "umg.pt"), seg=head)
    cfg = json.loads((tmp_path / "umg_umg_config.json").read_text())["seg_head"]
    assert cfg["file"] == "umg_umg_seg_head.safetensors" and cfg["train_labels"] == ["circle"]
    assert (tmp_path / cfg["file"]).read_bytes() == (out / "umg_seg_head.safetensors").read_bytes()


def test_calibrated_thresholds_travel_to_the_torch_side(seg_run, scene, tmp_path):
    """A run's ``seg_calibration.json`` (thresholds chosen on its validation split) sets the
    thresholds of both ``load_segmenter`` and the export's ``UMGTorchSegmenter``."""
    import shutil

    import umg_jax
    from umg_jax import checkpoint
    from umg_jax.interop import torch_seg

    wd = tmp_path / "wd"
    shutil.copytree(seg_run[3], wd)
    (wd / checkpoint.SEG_CALIBRATION).write_text(json.dumps(
        {"object_threshold": 0.3, "overlap_threshold": 0.65, "pixel_weight": 0.5}))
    export_torch.main([str(wd), "--format", "hf", "--out", str(tmp_path / "hf")])
    ts = torch_seg.UMGTorchSegmenter.from_export(tmp_path / "hf")
    js = umg_jax.load_segmenter(str(wd))
    for c in (ts.config, js.config.seg):
        assert (c["object_threshold"], c["overlap_threshold"]) == (0.3, 0.65)
        assert c["pixel_weight"] == 0.5
    assert seg_run[0].config.seg.object_threshold == 0.0  # the uncalibrated run's own
    assert seg_run[0].config.seg.pixel_weight == 0.0
    # The semantic map mixes in the frozen per-pixel probabilities on both sides alike.
    want = js.predict(scene, SEG_LABELS, isthing=SEG_THING)["semantic"]
    got = ts.predict(scene, SEG_LABELS, isthing=SEG_THING)["semantic"].numpy()
    np.testing.assert_array_equal(got, want)
    masks_only = seg_run[0].predict(scene, SEG_LABELS, isthing=SEG_THING)["semantic"]
    assert (want != masks_only).any()  # the weight changes the map


def test_seg_head_logits_match(seg_run, seg_jax, scene):
    _, ts, _, _ = seg_run
    mask_logits, cls_logits, mask_prob, probs = seg_jax
    got = ts.head_outputs(scene, SEG_LABELS)
    assert got["mask_logits"].shape == (16, 16, 16)
    assert _diff(got["mask_logits"], mask_logits) <= TOL
    assert _diff(got["class_logits"], cls_logits) <= TOL
    assert _diff(got["mask_prob"], mask_prob) <= TOL
    for k in ("head", "ensemble"):
        assert _diff(got[k], probs[k]) <= TOL, k
    assert _diff(got["ensemble"], got["head"]) > 1e-3  # the ensemble changes the probabilities
    from umg_jax.evaluators import segmentation as se

    js = seg_run[0]
    bb = js.backbone
    dense = inference._normalize(bb.encode_image(bb.preprocess(scene)[None])[1])
    want = se.pixel_log_probs(dense, bb.encode_text_labels(SEG_LABELS), se.mask_logit_scale(bb),
                              scene.shape[:2])[0]
    assert got["pixel_logp"].shape == want.shape
    assert _diff(got["pixel_logp"], want) <= 10 * TOL  # log-probs near -scale: larger values


def _near_ties(p, mask_prob, object_threshold, eps=1e-5):
    """``[H, W]`` bool: pixels where the panoptic merge decides on a float32 near-tie (umg_jax's
    values): the two best ``score * mask`` of the kept queries within ``eps``, or a kept query's
    mask within ``eps`` of 0.5. Two correct float32 implementations may differ there."""
    score = p[:, :-1].max(-1)
    keep = (p.argmax(-1) < p.shape[-1] - 1) & (score > object_threshold)
    prod = np.sort(score[keep, None, None] * mask_prob[keep], axis=0)
    tie = prod[-1] - prod[-2] < eps if keep.sum() > 1 else np.zeros(mask_prob.shape[1:], bool)
    return tie | (np.abs(mask_prob[keep] - 0.5) < eps).any(0)


@pytest.mark.parametrize("ensemble", [None, False])
def test_seg_predict_matches(seg_run, seg_jax, scene, ensemble):
    import torch

    js, ts, _, _ = seg_run
    want = js.predict(scene, SEG_LABELS, isthing=SEG_THING, ensemble=ensemble)
    got = ts.predict(scene, SEG_LABELS, isthing=SEG_THING, ensemble=ensemble)
    assert got["semantic"].dtype == got["panoptic"].dtype == torch.int32
    np.testing.assert_array_equal(got["semantic"].numpy(), want["semantic"])
    assert len(np.unique(want["semantic"])) > 1 and len(want["segments"]) > 1  # not trivial
    # Panoptic ids: identical except where umg_jax itself decides on a float32 near-tie (with
    # this seed: one pixel where two queries' score * mask differ by 2e-8).
    ties = _near_ties(seg_jax[3]["ensemble" if ensemble is None else "head"], seg_jax[2],
                      js.config.seg.object_threshold)
    differ = got["panoptic"].numpy() != want["panoptic"]
    assert not (differ & ~ties).any(), np.argwhere(differ & ~ties)[:5]
    assert ties.mean() < 1e-3
    assert got["segments"].keys() == want["segments"].keys()
    for sid, (label, score) in want["segments"].items():
        assert got["segments"][sid][0] == label
        assert got["segments"][sid][1] == pytest.approx(score, abs=TOL)


def test_seg_bad_input(seg_run, run, tm_mod, scene, tmp_path):
    import torch
    from safetensors.numpy import load_file, save_file

    from umg_jax.interop import torch_seg

    _, ts, out, _ = seg_run
    with pytest.raises(ValueError, match="label list is empty"):
        ts.predict(scene, [])
    with pytest.raises(ValueError, match="isthing has 1 entries for 2 labels"):
        ts.predict(scene, ["sky", "grass"], isthing=[True])
    with pytest.raises(ValueError, match="one image"):
        ts.predict(torch.stack([ts.backbone.preprocess(scene)] * 2), ["sky"])
    with pytest.raises(ValueError, match="no segmentation head"):
        torch_seg.UMGTorchSegmenter.from_export(run[1])
    d = _copy(out, tmp_path / "bad")
    sd = load_file(str(d / "umg_seg_head.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "layer_1.self.out.bias"},
              str(d / "umg_seg_head.safetensors"))
    with pytest.raises(ValueError, match="layer_1.self.out.bias is missing"):
        torch_seg.UMGTorchSegmenter.from_export(d)
    (d / "umg_seg_head.safetensors").unlink()
    with pytest.raises(ValueError, match="umg_seg_head.safetensors is missing"):
        torch_seg.UMGTorchSegmenter.from_export(d)


def test_torch_seg_imports_no_jax():
    """torch_seg.py imports only what torch_model.py may, and torch_model itself (relative in
    the package, by name when copied beside it)."""
    roots = set()
    for node in ast.walk(ast.parse(SEG_MODULE.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots - ALLOWED - set(sys.stdlib_module_names) == {"torch_model"}
