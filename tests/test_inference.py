"""Inference API (umg_jax/inference.py, ``umg_jax.load``) and the demo CLI (umg_jax/demo.py):
loading a workdir, the encoders against hand computations, bad input, the demo picture."""

import json

import numpy as np
import pytest
from conftest import make_tiny_workdir

import umg_jax
from umg_jax import demo
from umg_jax.inference import InputError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_tiny_workdir(tmp_path_factory.mktemp("wd"))


@pytest.fixture(scope="module")
def model(workdir):
    return umg_jax.load(str(workdir))


def _image(seed=0, h=40, w=48):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_load_and_shapes(model):
    assert model.image_size == 32
    img = _image()
    assert model.encode_dense(img).shape == (4, 4, 32)
    assert model.embed_text(["a star", "grass"]).shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(model.embed_image(img)), 1.0, rtol=1e-5)


def test_classify_is_softmax_of_scaled_cosines(model):
    img, labels = _image(1), ["circle", "star", "grass"]
    probs = model.classify(img, labels)
    t = model.encode_text_labels(labels)
    logits = model.logit_scale * (t @ model.embed_image(img))
    ref = np.exp(logits - logits.max())
    ref /= ref.sum()
    np.testing.assert_allclose([probs[k] for k in labels], ref, rtol=1e-5)
    assert model.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_whole_image_box_and_mask_pool_every_cell(model):
    """RoIAlign (2x2 bins, 2 samples) of the full box samples exactly the 4x4 cell centres, and
    the full mask weighs every cell equally: both are the mean of the dense map."""
    img = _image(2, 32, 32)
    dense = model.encode_image(model.preprocess(img)[None])[1][0]
    mean = dense.reshape(-1, dense.shape[-1]).mean(0)
    mean /= np.linalg.norm(mean)
    np.testing.assert_allclose(model.encode_boxes(img, [[0, 0, 32, 32]])[0], mean, atol=1e-5)
    np.testing.assert_allclose(model.encode_masks(img, np.ones((32, 32)))[0], mean, atol=1e-5)


def test_segment_matches_dense_argmax_on_the_grid(model):
    img, labels = _image(3, 32, 32), ["a", "b", "c"]
    seg = model.segment(img, labels)
    assert seg.shape == (32, 32) and seg.dtype == np.int32 and seg.max() < 3
    grid = np.argmax(model.encode_dense(img) @ model.encode_text_labels(labels).T, -1)
    # at each cell centre the upsampled logits equal the cell's own logits
    np.testing.assert_array_equal(seg[4::8, 4::8][1:-1, 1:-1], grid[1:-1, 1:-1])


def test_bad_input(model, tmp_path, workdir):
    img = _image()
    with pytest.raises(InputError, match="empty"):
        model.classify(img, [])
    with pytest.raises(InputError, match="outside"):
        model.encode_boxes(img, [[0, 0, 100, 10]])
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        model.embed_image(str(bad))
    with pytest.raises(InputError, match="not a directory"):
        umg_jax.load(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="step 3 not in"):
        umg_jax.load(str(workdir), step=3)


def test_demo_writes_picture_and_refuses_bad_input(workdir, tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert demo.main(["--workdir", str(workdir), "--synthetic", "0", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert printed.startswith("image:") and "wrote" in printed
    bad = tmp_path / "x.png"
    bad.write_bytes(b"junk")
    assert demo.main(["--workdir", str(workdir), "--image", str(bad), "--labels", "a,b"]) == 2
    good = tmp_path / "ok.png"
    from PIL import Image

    Image.fromarray(_image()).save(good)
    assert demo.main(["--workdir", str(workdir), "--image", str(good), "--labels", " , "]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "--labels is empty" in err
    json.loads((workdir / "config.json").read_text())  # untouched
