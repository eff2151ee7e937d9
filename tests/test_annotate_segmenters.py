"""The ``segment``-stage backends (``families/sam.py``: sam, sam2; ``families/sam3.py``: sam3) on
tiny random models written by their ``write_tiny``: the backend contract, equality with a direct
single-image call of the Hugging Face model + processor, and the errors."""

import numpy as np
import pytest

from umg_jax.labeling.annotate.backend import AnnotateError, backend_class

pytest.importorskip("torch")
pytest.importorskip("transformers")

SIZES = [(40, 56), (64, 64), (30, 90)]
BOXES = [np.zeros((0, 4), np.float32),
         np.array([[5, 5, 40, 50]], np.float32),
         np.array([[0, 0, 20, 20], [10, 5, 80, 25], [30.5, 2, 89, 29]], np.float32)]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, torch_mod):
    from umg_jax.labeling.annotate.families import sam, sam3

    root = tmp_path_factory.mktemp("segmenters")
    dirs = {k: str(root / k) for k in ("sam", "sam2", "sam3")}
    sam.write_tiny(dirs["sam"], kind="sam")
    sam.write_tiny(dirs["sam2"], kind="sam2")
    sam3.write_tiny(dirs["sam3"])
    return dirs


@pytest.fixture(scope="module")
def backends(tiny_dirs):
    return {k: backend_class("segment", k)(d) for k, d in tiny_dirs.items()}


def _reference_boxes(backend, image, boxes, multimask=True):
    """Direct single-image HF call: all ``multimask`` candidates post-processed to the original
    size ``[K, C, H, W]`` bool, and the raw ``iou_scores [K, C]``."""
    torch = pytest.importorskip("torch")
    model, proc = backend.model, backend.processor
    inputs = proc(images=[image], input_boxes=[boxes.tolist()], return_tensors="pt")
    with torch.no_grad():
        res = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                    multimask_output=multimask)
    if backend.family == "sam":
        masks = proc.post_process_masks(res.pred_masks, inputs["original_sizes"],
                                        inputs["reshaped_input_sizes"])[0]
    else:
        masks = proc.post_process_masks(res.pred_masks, inputs["original_sizes"])[0]
    return masks.numpy(), res.iou_scores[0].numpy()


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_box_segmenter_contract_and_reference(backends, images, family):
    seg = backends[family]
    out = seg.segment(images, BOXES)
    assert len(out) == len(images)
    differing = 0
    for img, boxes, (masks, scores) in zip(images, BOXES, out, strict=True):
        h, w = img.shape[:2]
        assert masks.shape == (len(boxes), h, w) and masks.dtype == np.bool_
        assert scores.shape == (len(boxes),) and scores.dtype == np.float32
        assert np.all((scores >= 0) & (scores <= 1))
        if not len(boxes):
            continue
        ref_masks, iou = _reference_boxes(seg, img, boxes)
        assert ref_masks.shape == (len(boxes), 3, h, w)
        best = iou.argmax(-1)  # the candidate SAM's own tools keep
        np.testing.assert_array_equal(masks, ref_masks[np.arange(len(boxes)), best])
        np.testing.assert_allclose(scores, np.clip(iou[np.arange(len(boxes)), best], 0, 1),
                                   rtol=1e-5, atol=1e-6)
        # The choice is visible: count boxes whose candidates are not all the same mask.
        differing += sum(not (ref_masks[k] == ref_masks[k, :1]).all() for k in range(len(boxes)))
    assert differing > 0


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_box_segmenter_batch_size_and_single_mask(tiny_dirs, backends, images, family):
    cls = backend_class("segment", family)
    batched = backends[family].segment(images, BOXES)
    one_by_one = cls(tiny_dirs[family], batch_size=1).segment(images, BOXES)
    for (m1, s1), (m2, s2) in zip(one_by_one, batched, strict=True):
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)
    single = cls(tiny_dirs[family], multimask=False).segment(images[2:], BOXES[2:])[0]
    ref_masks, iou = _reference_boxes(backends[family], images[2], BOXES[2], multimask=False)
    np.testing.assert_array_equal(single[0], ref_masks[:, 0])
    np.testing.assert_allclose(single[1], np.clip(iou[:, 0], 0, 1), rtol=1e-5, atol=1e-6)


def test_sam3_concepts_contract_and_reference(tiny_dirs, backends, images):
    torch = pytest.importorskip("torch")
    seg = backends["sam3"]
    concepts = [["cat"], [], ["a dog", "red car", "tree"]]
    everything = seg.segment_concepts(images, concepts, threshold=0.0)
    all_scores = np.array([s for per in everything for _, _, s in per])
    assert len(everything[1]) == 0 and len(all_scores) > 0
    threshold = float(np.median(all_scores))  # keeps some instances, drops others
    out = seg.segment_concepts(images, concepts, threshold=threshold)
    assert 0 < sum(map(len, out)) < len(all_scores)
    for img, names, found in zip(images, concepts, out, strict=True):
        h, w = img.shape[:2]
        for c, mask, score in found:
            assert 0 <= c < len(names)
            assert mask.shape == (h, w) and mask.dtype == np.bool_
            assert isinstance(score, float) and threshold <= score <= 1
        for c, name in enumerate(names):  # reference: one image, one concept, direct call
            inputs = seg.processor(images=img, text=name, return_tensors="pt")
            with torch.no_grad():
                res = seg.model(**inputs)
            ref = seg.processor.post_process_instance_segmentation(
                res, threshold=threshold, mask_threshold=0.5, target_sizes=[(h, w)])[0]
            mine = [(m, s) for cc, m, s in found if cc == c]
            assert len(mine) == len(ref["scores"])
            for (m, s), rm, rs in zip(mine, ref["masks"], ref["scores"], strict=True):
                np.testing.assert_array_equal(m, rm.bool().numpy())
                assert s == pytest.approx(float(rs), rel=1e-5, abs=1e-6)
    # Other groupings (one image with 3 concepts in a call; one pair per call) give the same.
    cls = type(seg)
    for got in (seg.segment_concepts(images[2:], concepts[2:], threshold)[0],
                cls(tiny_dirs["sam3"], batch_size=1).segment_concepts(
                    images, concepts, threshold)[2]):
        assert [c for c, _, _ in got] == [c for c, _, _ in out[2]]
        for (_, m1, s1), (_, m2, s2) in zip(got, out[2], strict=True):
            np.testing.assert_array_equal(m1, m2)
            assert s1 == pytest.approx(s2, rel=1e-5, abs=1e-6)


def test_prompt_kinds_each_backend_refuses(backends, images):
    with pytest.raises(AnnotateError, match="sam or sam2"):
        backends["sam3"].segment(images, BOXES)
    for family in ("sam", "sam2"):
        with pytest.raises(AnnotateError, match="use sam3"):
            backends[family].segment_concepts(images, [["cat"]] * 3, 0.5)


def test_bad_requests(tiny_dirs, backends, images):
    for family, other in (("sam", "sam2"), ("sam2", "sam3"), ("sam3", "sam")):
        with pytest.raises(AnnotateError) as e:
            backend_class("segment", family)(tiny_dirs[other])
        assert tiny_dirs[other] in str(e.value)
    for family in ("sam", "sam2", "sam3"):
        with pytest.raises(AnnotateError, match="unknown option"):
            backend_class("segment", family)(tiny_dirs[family], bogus=1)
        with pytest.raises(AnnotateError, match="batch_size"):
            backend_class("segment", family)(tiny_dirs[family], batch_size=0)
    with pytest.raises(AnnotateError, match="mask_threshold"):
        backend_class("segment", "sam3")(tiny_dirs["sam3"], mask_threshold=2)
    with pytest.raises(AnnotateError, match="box lists"):
        backends["sam"].segment(images, BOXES[:2])
    with pytest.raises(AnnotateError, match=r"\[K, 4\]"):
        backends["sam2"].segment(images[:1], [np.zeros((2, 3), np.float32)])
    with pytest.raises(AnnotateError, match="concept lists"):
        backends["sam3"].segment_concepts(images, [["cat"]], 0.5)
    with pytest.raises(AnnotateError, match="list of strings"):
        backends["sam3"].segment_concepts(images[:1], ["cat"], 0.5)
