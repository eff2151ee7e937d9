"""umg_jax/models/mask_decoder.py and its training on a frozen backbone (configs/seg_tiny.py)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_import_dir

import umg_jax
from umg_jax import checkpoint, config_checks, config_lib, evaluate, optim, train
from umg_jax import step as step_lib
from umg_jax.models import clip, mask_decoder

ROOT = pathlib.Path(__file__).parents[1]


def _cfg(**over):
    c = config_lib.load_config(str(ROOT / "configs/seg_tiny.py"))
    c.model.vision.update(image_size=32, patch_size=8, width=32, layers=2, heads=2)
    c.model.text.update(width=32, layers=1, heads=2, context_length=16)
    c.model.embed_dim = 32
    c.seg.update(num_queries=6, width=32, layers=1, heads=2, stem_channels=16)
    # A 60-step head on a random backbone is far less confident than a trained one: below
    # Mask2Former's 0.8 / 0.8 (configs/seg_tiny.py) it keeps no query at all. These tests check
    # that it learns, not a benchmark number, so they keep permissive panoptic thresholds.
    c.seg.update(object_threshold=0.2, overlap_threshold=0.6)
    c.update(batch_size=8, total_steps=60)
    c.optim.update(warmup_steps=5, lr=3e-3)
    c.data.update(synthetic_num_train=64, synthetic_num_eval=32, max_tags=2, max_regions=3,
                  max_masks=5, synthetic_image_size=40)
    c.ckpt.every_steps = 60
    c.log.update(every_steps=10, tensorboard=False)
    c.eval.update(every_steps=0, num_examples=32, batch_size=16)
    c.update(over)
    return c


def test_output_shapes_and_config_errors():
    c = _cfg()
    p = mask_decoder.init_params(c, jax.random.key(0))
    out = mask_decoder.MaskDecoder(c.seg, 32).apply(
        {"params": p}, jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 4, 4, 32)) / np.sqrt(32))
    assert out["mask_logits"].shape == (2, 6, 8, 8)
    assert out["class_emb"].shape == (2, 6, 32)
    np.testing.assert_allclose(np.linalg.norm(out["class_emb"], axis=-1), 1.0, rtol=1e-5)
    logits = mask_decoder.class_logits(out, jnp.eye(3, 32))
    assert logits.shape == (2, 6, 4)
    for key, value, msg in (("mask_stride", 3, "power of two"), ("mask_stride", 64, "divide"),
                            ("heads", 3, "divisible")):
        bad = _cfg()
        bad.seg[key] = value
        with pytest.raises(config_checks.ConfigError, match=msg):
            config_checks.validate(bad)


def test_train_vocabulary_maps_categories_and_refuses_unknown_holdouts():
    c = _cfg()
    cats = [{"name": n} for n in ("cat", "dog", "sky")]
    c.seg.holdout = ("dog",)
    v = step_lib.train_vocabulary(c, cats)
    assert v["names"] == ["cat", "sky"]
    np.testing.assert_array_equal(v["class_map"], [0, -1, 1])
    assert v["tokens"].shape[:1] == (2,) and v["tokens"].dtype == np.int32
    c.seg.holdout = ("unicorn",)
    with pytest.raises(ValueError, match="unicorn"):
        step_lib.train_vocabulary(c, cats)
    c.seg.holdout = ("cat", "dog", "sky")
    with pytest.raises(ValueError, match="every category"):
        step_lib.train_vocabulary(c, cats)


def test_seg_step_needs_its_vocabulary():
    c = _cfg()
    with pytest.raises(ValueError, match="training vocabulary"):
        step_lib.make_loss_fn(clip.build_model(c.model), c, None)


def test_optimizer_state_only_for_the_decoder():
    c = _cfg()
    params = jax.eval_shape(lambda: step_lib.init_params(c, jax.random.key(0)))
    tx, _ = optim.make_optimizer(c.optim, params, 10, freeze=step_lib.frozen_regexes(c))
    n_state = optim.count_float_elements(jax.eval_shape(tx.init, params))
    n_seg = optim.count_params(params["seg"])
    assert n_state == 2 * n_seg  # Adam mu + nu of the decoder only
    table = optim.trainable_report(params, step_lib.frozen_regexes(c))
    assert table.splitlines()[-1].split()[2] == f"{n_seg:,}"


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    mp = pytest.MonkeyPatch()
    mp.setenv("UMG_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    c = _cfg()
    base = clip.init_params(c.model, jax.random.key(7))
    c.init.checkpoint = write_import_dir(tmp / "backbone", c.model, base)
    c.eval.every_steps = 60  # the trainer's evaluation hook runs once, at the end
    train.train(c, str(tmp / "wd"))
    results = evaluate.run(str(tmp / "wd"))
    mp.undo()
    return tmp / "wd", c, base, results


def test_training_changes_only_the_decoder(seg_run):
    wd, c, base, _ = seg_run
    abstract = jax.eval_shape(lambda: step_lib.init_params(c, jax.random.key(0)))
    got = checkpoint.restore_params_only(wd / "checkpoints" / "60", abstract)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(got["base"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # backbone bit-identical
    init = step_lib.init_params(c, jax.random.key(c.seed), base=base)["seg"]
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(got["seg"]), strict=True)]
    assert min(moved) > 0  # every decoder tensor trained
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    # The backbone loads like any CLIP checkpoint (inference, export).
    m = umg_jax.load(str(wd))
    np.testing.assert_array_equal(np.asarray(m.params["logit_scale"]),
                                  np.asarray(base["logit_scale"]))


def test_head_beats_the_training_free_baseline(seg_run):
    wd, _, _, r = seg_run
    final = json.loads((wd / "final_metrics.json").read_text())
    # the in-training hook and the CLI evaluate the same checkpoint the same way
    assert final["eval/seg/ensemble/miou"] == pytest.approx(r["seg/ensemble/miou"], abs=1e-6)
    # A random backbone: the training-free dense argmax is near chance; the head, trained on
    # 60 tiny steps, must already segment the seen classes better, semantically and panoptically.
    assert r["seg/head/miou_seen"] > r["seg/free/miou_seen"] + 0.1, r
    assert r["seg/head/pq_seen"] > r["seg/free/pq_seen"], r
    for k in ("seg/ensemble/miou", "seg/head/pq_unseen", "seg/free/pq"):
        assert np.isfinite(r[k]), k


def test_segmenter_api(seg_run):
    wd, c, _, _ = seg_run
    s = umg_jax.load_segmenter(str(wd))
    assert set(json.loads((wd / "seg_vocab.json").read_text())["holdout"]) == set(c.seg.holdout)
    img = np.zeros((40, 48, 3), np.uint8)
    img[:20] = [90, 150, 230]
    img[20:] = [60, 170, 60]
    img[5:15, 5:15] = [220, 40, 40]
    labels = ["sky", "grass", "square"]
    out = s.predict(img, labels, isthing=[False, False, True])
    assert out["semantic"].shape == out["panoptic"].shape == (40, 48)
    assert out["semantic"].min() >= 0 and out["semantic"].max() < 3
    for sid, (label, score) in out["segments"].items():
        assert label in labels and 0 <= score <= 1 and (out["panoptic"] == sid).any()
    with pytest.raises(umg_jax.inference.InputError, match="isthing"):
        s.predict(img, labels, isthing=[True])
    with pytest.raises(umg_jax.inference.InputError, match="not a segmentation-head run"):
        umg_jax.load_segmenter(str(wd.parent / "backbone"))


def test_thresholds_are_chosen_on_the_validation_split(seg_run):
    """The finished run chose its panoptic thresholds on the synthetic validation split (not
    the evaluation split); every later load of the run uses them."""
    from umg_jax.evaluators import seg_calibration

    wd, c, _, r = seg_run
    cal = json.loads((wd / checkpoint.SEG_CALIBRATION).read_text())
    assert cal["split"].endswith("/val") and cal["num_images"] == c.eval.num_examples
    assert cal["object_threshold"] in seg_calibration.OBJECT_GRID
    assert cal["overlap_threshold"] in seg_calibration.OVERLAP_GRID
    best = max(row[2] for row in cal["grid"])
    assert cal["score"] == best
    # the ensemble's semantic pixel weight, chosen in the same pass by mIoU on seen classes
    assert cal["pixel_weight"] in seg_calibration.PIXEL_GRID
    assert cal["pixel_score"] == max(m for _, m in cal["pixel_grid"])
    s = umg_jax.load_segmenter(str(wd))
    assert (s.config.seg.object_threshold, s.config.seg.overlap_threshold,
            s.config.seg.pixel_weight) == (cal["object_threshold"], cal["overlap_threshold"],
                                           cal["pixel_weight"])
    # a file without the thresholds is refused, not silently ignored
    (wd / checkpoint.SEG_CALIBRATION).write_text("{}")
    try:
        with pytest.raises(ValueError, match="lacks"):
            checkpoint.read_seg_calibration(wd)
    finally:
        (wd / checkpoint.SEG_CALIBRATION).write_text(json.dumps(cal))


def test_evaluate_cli_calibrates_then_evaluates(seg_run, capsys):
    """``python -m umg_jax.evaluate --workdir W --calibrate`` chooses the thresholds on the
    validation split, stores them, then evaluates the evaluation split at them."""
    wd, c, _, _ = seg_run
    path = wd / checkpoint.SEG_CALIBRATION
    before = json.loads(path.read_text())
    path.unlink()
    try:
        assert evaluate.main(["--workdir", str(wd), "--calibrate", "--num_examples", "16"]) == 0
        cal = json.loads(path.read_text())
        assert cal["split"].endswith("/val") and cal["num_images"] == 16
        assert "seg/ensemble/pq" in capsys.readouterr().out
        # a run that is not a head run is refused with one line (exit 2)
        assert evaluate.main(["--workdir", str(wd.parent / "backbone"), "--calibrate"]) == 2
    finally:
        path.write_text(json.dumps(before))
