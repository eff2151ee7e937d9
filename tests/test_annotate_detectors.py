"""The Hugging Face detect and tag backends of ``umg_jax.labeling.annotate`` (OWLv2, Grounding DINO,
CLIP/SigLIP tagger) on tiny random models written by each family's ``write_tiny``: the backend
contract, batching against single-image reference runs of the model + processor, the box frame,
the tag scores against a hand computation, and refusing a wrong model directory or option."""

import re

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from umg_jax.labeling.annotate.backend import AnnotateError, backend_class  # noqa: E402
from umg_jax.labeling.annotate.families import clip_tagger, grounding_dino, owlv2  # noqa: E402

SIZES = [(40, 56), (64, 64), (30, 90)]
QUERIES = [["cat", "dog"], [], ["car", "red tree", "person"]]


@pytest.fixture(scope="module")
def torch(torch_mod):
    return torch_mod


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, torch_mod):
    """One tiny model directory per family, written once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, write in [("owlv2", owlv2.write_tiny),
                        ("gdino", grounding_dino.write_tiny),
                        ("mm_gdino", lambda d: grounding_dino.write_tiny(
                            d, kind="mm-grounding-dino")),
                        ("clip", lambda d: clip_tagger.write_tiny(d, kind="clip")),
                        ("siglip", lambda d: clip_tagger.write_tiny(d, kind="siglip")),
                        ("siglip2", lambda d: clip_tagger.write_tiny(d, kind="siglip2"))]:
        out[name] = str(root / name)
        write(out[name])
    return out


@pytest.fixture(scope="module")
def owl(dirs):
    return owlv2.Owlv2Detector(dirs["owlv2"], batch_size=8)


@pytest.fixture(scope="module")
def gdino(dirs):
    return grounding_dino.GroundingDinoDetector(dirs["gdino"], text_threshold=0.5)


def check_contract(results, images, queries, threshold):
    assert len(results) == len(images)
    for (boxes, labels, scores), im, q in zip(results, images, queries, strict=True):
        h, w = im.shape[:2]
        k = len(scores)
        assert boxes.dtype == np.float32 and boxes.shape == (k, 4)
        assert labels.dtype == np.int32 and labels.shape == (k,)
        assert scores.dtype == np.float32 and scores.shape == (k,)
        if not q:
            assert k == 0
            continue
        assert np.all((labels >= 0) & (labels < len(q)))
        assert np.all(scores >= threshold) and np.all(scores <= 1)
        assert np.all(boxes[:, 0::2] >= 0) and np.all(boxes[:, 0::2] <= w)
        assert np.all(boxes[:, 1::2] >= 0) and np.all(boxes[:, 1::2] <= h)
        assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])


def test_registry():
    assert backend_class("detect", "owlv2") is owlv2.Owlv2Detector
    assert backend_class("detect", "grounding_dino") is grounding_dino.GroundingDinoDetector
    assert backend_class("tag", "clip") is backend_class("tag", "siglip") is clip_tagger.ClipTagger


# ------------------------------------------------------------------------------------- OWLv2


def owl_reference(det, torch, image, queries, threshold):
    """One image, straight through the HF model and the processor's post-processing."""
    inputs = det.processor(images=[image], text=[queries], return_tensors="pt")
    with torch.inference_mode():
        out = det.model(**inputs)
    r = det.processor.post_process_grounded_object_detection(
        out, threshold=threshold, target_sizes=[image.shape[:2]])[0]
    return (owlv2.clip_boxes(r["boxes"].numpy(), *image.shape[:2]), r["labels"].numpy(),
            r["scores"].numpy(), out)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_owlv2_batch_matches_single_image_reference(owl, torch, images, threshold):
    res = owl.detect(images, QUERIES, threshold)
    check_contract(res, images, QUERIES, threshold)
    if threshold == 0.0:  # every patch of an image with queries is a candidate
        assert [len(r[2]) for r in res] == [16, 0, 16]
    for (boxes, labels, scores), im, q in zip(res, images, QUERIES, strict=True):
        if not q:
            continue
        rb, rl, rs, _ = owl_reference(owl, torch, im, q, threshold)
        np.testing.assert_array_equal(labels, rl)
        np.testing.assert_allclose(scores, rs, atol=1e-5)
        np.testing.assert_allclose(boxes, rb, atol=1e-3)


def test_owlv2_boxes_in_original_pixel_frame(owl, torch, images):
    """Non-square 30x90 image: pred_boxes are cxcywh normalised on the zero-padded 90x90 square,
    so both axes scale by 90 (not 30 and 90)."""
    im, q = images[2], QUERIES[2]
    (boxes, labels, scores), = owl.detect([im], [q], 0.0)
    *_, out = owl_reference(owl, torch, im, q, 0.0)
    cx, cy, bw, bh = out.pred_boxes[0].numpy().T
    side = max(im.shape[:2])
    hand = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) * side
    hand = owlv2.clip_boxes(hand, *im.shape[:2])
    logits = out.logits[0].numpy()
    np.testing.assert_allclose(boxes, hand, atol=1e-3)
    np.testing.assert_array_equal(labels, logits.argmax(1))
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits.max(1))), atol=1e-5)


def test_owlv2_zero_query_batch_and_padding_mask(owl, images):
    assert all(len(r[2]) == 0 for r in owl.detect(images, [[], [], []], 0.0))
    # a one-query image batched with a three-query one never gets labels 1 or 2
    res = owl.detect(images[:1] + images[2:], [["cat"], QUERIES[2]], 0.0)
    assert len(res[0][2]) == 16 and np.all(res[0][1] == 0)


# ------------------------------------------------------------------------------ Grounding DINO


def test_grounding_dino_contract(gdino, images):
    for threshold in (0.0, 0.9):
        res = gdino.detect(images, QUERIES, threshold)
        check_contract(res, images, QUERIES, threshold)
        if threshold == 0.0:
            assert len(res[0][2]) > 0 and len(res[2][2]) > 0


def test_grounding_dino_batch_matches_single_image_reference(gdino, torch):
    """Two equal-size images (no pixel padding) with 2 and 1 queries (text padding) in one
    batch == each image alone through model + processor, labels from the hand-known token
    positions of each prompt."""
    rng = np.random.default_rng(1)
    ims = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    queries = [["Cat", "red car"], ["dog"]]
    # "[CLS] cat . red car . [SEP]" / "[CLS] dog . [SEP]": the token positions of each query
    positions = [[[1], [3, 4]], [[1]]]
    tt = gdino.text_threshold
    res = gdino.detect(ims, queries, 0.3)
    check_contract(res, ims, queries, 0.3)
    for (boxes, labels, scores), im, q, pos in zip(res, ims, queries, positions, strict=True):
        prompt = ". ".join(x.lower() for x in q) + "."
        inputs = gdino.processor(images=[im], text=prompt, return_tensors="pt")
        with torch.inference_mode():
            out = gdino.model(**inputs)
        r = gdino.processor.post_process_grounded_object_detection(
            out, inputs["input_ids"], threshold=0.3, text_threshold=tt,
            target_sizes=[im.shape[:2]])[0]
        probs = torch.sigmoid(out.logits[0]).numpy()
        ref_scores = probs.max(1)
        per_query = np.stack([probs[:, p].max(1) for p in pos], 1)  # [Q, len(q)]
        keep = (ref_scores > 0.3) & (per_query.max(1) > tt)
        assert keep.sum() > 0
        np.testing.assert_allclose(scores, ref_scores[keep], atol=1e-5)
        np.testing.assert_array_equal(labels, per_query.argmax(1)[keep])
        # the processor's own boxes and phrases for the same boxes (it keeps score > 0.3)
        kept_by_proc = keep[ref_scores > 0.3]
        ref_boxes = grounding_dino.clip_boxes(r["boxes"].numpy()[kept_by_proc], *im.shape[:2])
        np.testing.assert_allclose(boxes, ref_boxes, atol=1e-3)
        phrases = [p for p, k in zip(r["text_labels"], kept_by_proc, strict=True) if k]
        for label, phrase in zip(labels, phrases, strict=True):
            assert set(q[label].lower().split()) & set(re.findall(r"[a-z]+", phrase))


def test_grounding_dino_long_prompt_split(gdino, images):
    """25 two-token queries exceed the tiny model's 64-token text: several prompts per image,
    each the same as asking for its own queries alone. The queries are distinct: equal texts
    score equally, and which of them a box is labelled with would depend on how floats round."""
    queries = [f"{c} {w}" for c in ["red", "blue", "green", "small", "big"]
               for w in ["cat", "dog", "car", "tree", "person"]]
    runs = gdino._runs(queries)
    assert len(runs) > 1 and [j for run in runs for j, _ in run] == list(range(len(queries)))
    (boxes, labels, scores), = gdino.detect(images[:1], [queries], 0.0)
    check_contract([(boxes, labels, scores)], images[:1], [queries], 0.0)
    parts = []
    for run in runs:
        idx = [j for j, _ in run]
        (b, lab, s), = gdino.detect(images[:1], [[queries[j] for j in idx]], 0.0)
        parts.append((b, np.asarray(idx, np.int32)[lab], s))
    np.testing.assert_allclose(boxes, np.concatenate([p[0] for p in parts]), atol=1e-3)
    np.testing.assert_array_equal(labels, np.concatenate([p[1] for p in parts]))
    np.testing.assert_allclose(scores, np.concatenate([p[2] for p in parts]), atol=1e-5)


def test_mm_grounding_dino_loads_and_detects(dirs, images):
    det = grounding_dino.GroundingDinoDetector(dirs["mm_gdino"], text_threshold=0.0)
    assert type(det.model).__name__ == "MMGroundingDinoForObjectDetection"
    res = det.detect(images, QUERIES, 0.0)
    check_contract(res, images, QUERIES, 0.0)
    assert len(res[0][2]) > 0


# ---------------------------------------------------------------------------------- tagger


TEMPLATES = ["a photo of a {}.", "the {}"]
VOCAB = ["cat", "dog", "red car", "tree"]


def hand_tag_scores(tagger, torch, images):
    """Scores from get_image_features / get_text_features by hand."""
    model, proc = tagger.model, tagger.processor

    def unit(x):
        x = x.pooler_output if hasattr(x, "pooler_output") else x
        return x / x.norm(dim=-1, keepdim=True)

    pad = dict(padding=True) if tagger.kind == "clip" else dict(padding="max_length")
    with torch.inference_mode():
        text = unit(model.get_text_features(**proc(
            text=[t.format(v) for v in VOCAB for t in TEMPLATES], return_tensors="pt",
            truncation=True, **pad)))
        text = unit(text.reshape(len(VOCAB), len(TEMPLATES), -1).mean(1))
        img = unit(model.get_image_features(**proc(images=images, return_tensors="pt")))
        logits = model.logit_scale.exp() * img @ text.T
        if tagger.kind == "clip":
            return logits.softmax(-1).numpy()
        return torch.sigmoid(logits + model.logit_bias).numpy()


@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2"])
def test_tagger_matches_hand_computation(dirs, torch, images, kind):
    tagger = clip_tagger.ClipTagger(dirs[kind], templates=TEMPLATES, batch_size=2)
    assert tagger.kind == kind and tagger.family == ("clip" if kind == "clip" else "siglip")
    calls = []
    encode = tagger.model.get_text_features
    tagger.model.get_text_features = lambda **kw: calls.append(1) or encode(**kw)
    scores = tagger.tag(images, VOCAB, [[] for _ in images])
    again = tagger.tag(images[:1], VOCAB, [[]])
    assert len(calls) == 1  # the vocabulary is encoded once
    assert scores.dtype == np.float32 and scores.shape == (3, len(VOCAB))
    assert np.all((scores >= 0) & (scores <= 1))
    if kind == "clip":
        np.testing.assert_allclose(scores.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(scores, hand_tag_scores(tagger, torch, images), atol=1e-5)
    np.testing.assert_allclose(again, scores[:1], atol=1e-6)
    assert tagger.tag(images, [], None).shape == (3, 0)


# ------------------------------------------------------------------------ refusals, options


@pytest.mark.parametrize("cls,wrong", [(owlv2.Owlv2Detector, "clip"),
                                       (grounding_dino.GroundingDinoDetector, "owlv2"),
                                       (clip_tagger.ClipTagger, "gdino"),
                                       (clip_tagger.ClipTagger, "owlv2")])
def test_wrong_family_dir_is_refused_with_its_path(dirs, cls, wrong):
    with pytest.raises(AnnotateError, match=dirs[wrong]):
        cls(dirs[wrong])


@pytest.mark.parametrize("cls,name", [(owlv2.Owlv2Detector, "owlv2"),
                                      (grounding_dino.GroundingDinoDetector, "gdino"),
                                      (clip_tagger.ClipTagger, "siglip")])
def test_unknown_option_is_refused(dirs, cls, name):
    with pytest.raises(AnnotateError, match="unknown option.*threshold_x"):
        cls(dirs[name], threshold_x=1)
    with pytest.raises(AnnotateError, match="batch_size"):
        cls(dirs[name], batch_size=0)
