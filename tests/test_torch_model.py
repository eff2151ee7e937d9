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


def test_copied_module_runs_without_jax(run, image, tmp_path):
    """The file alone, copied elsewhere, with jax / flax / umg_jax made unimportable, loads the
    export and gives the same dense map."""
    _, out, tm, _ = run
    shutil.copy(MODULE, tmp_path / "serving_umg.py")
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "want.npy", tm.dense(image).numpy())
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
import serving_umg
m = serving_umg.UMGTorch.from_export({str(out)!r})
got = m.dense(np.load({str(tmp_path / "image.npy")!r})).numpy()
assert np.abs(got - np.load({str(tmp_path / "want.npy")!r})).max() == 0.0
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
