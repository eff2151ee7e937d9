"""The BLIP-2 and Florence-2 caption / region-caption backends on tiny random models written by
each family's ``write_tiny``: the backend contract of ``annotate/backend.py``, batching checked
against direct un-batched calls of the Hugging Face model + processor, Florence-2's box
quantisation against hand-computed bins, and the errors for wrong directories and options."""

import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import torch_peers  # noqa: E402

from umg_jax.labeling.annotate.backend import AnnotateError, backend_class  # noqa: E402
from umg_jax.labeling.annotate.families import blip2, florence2  # noqa: E402

torch = torch_peers()  # before transformers: this environment's torchvision fix
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Florence2ForConditionalGeneration,
    Florence2Processor,
)

NEW = 6  # max_new_tokens everywhere: enough to see different texts, cheap on a CPU
# A box of image 0 (56 x 40) whose bins are hand-computed below, and a full-image box.
BOX = [10.0, 5.5, 30.2, 39.9]
BOXES = [np.array([BOX, [0, 0, 56, 40]], np.float32), np.zeros((0, 4), np.float32),
         np.array([[3, 3, 4, 4]], np.float32)]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 56), (64, 64),
                                                                           (30, 90)]]


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_blip2"))
    blip2.write_tiny(d)
    return d


@pytest.fixture(scope="module")
def florence2_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_florence2"))
    florence2.write_tiny(d)
    return d


@pytest.fixture(scope="module")
def blip2_ref(blip2_dir):
    return (Blip2ForConditionalGeneration.from_pretrained(blip2_dir, local_files_only=True).eval(),
            Blip2Processor.from_pretrained(blip2_dir, local_files_only=True))


@pytest.fixture(scope="module")
def florence2_ref(florence2_dir):
    return (Florence2ForConditionalGeneration.from_pretrained(florence2_dir,
                                                              local_files_only=True).eval(),
            Florence2Processor.from_pretrained(florence2_dir, local_files_only=True))


def blip2_reference(ref, image, prompt=None):
    """One image through the HF model the documented way (greedy), the prompt cut off."""
    model, proc = ref
    inputs = proc(images=Image.fromarray(image), text=prompt, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    # image tokens and BOS are special tokens: decoding drops them; the prompt is plain text
    text = proc.batch_decode(ids, skip_special_tokens=True)[0]
    if prompt:
        assert text.startswith(prompt)
        text = text[len(prompt):]
    return text.strip()


def florence2_reference(ref, image, prompt):
    model, proc = ref
    inputs = proc(images=Image.fromarray(image), text=prompt, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=NEW, num_beams=1, do_sample=False)
    return proc.batch_decode(ids, skip_special_tokens=True)[0].strip()


def check_contract(out, counts):
    assert isinstance(out, list) and [len(o) for o in out] == counts
    assert all(isinstance(t, str) and t == t.strip() for o in out for t in o)


@pytest.mark.parametrize("write,name", [(blip2.write_tiny, "blip2"),
                                        (florence2.write_tiny, "florence2")])
def test_write_tiny_is_small_and_complete(write, name, tmp_path, blip2_dir, florence2_dir):
    d = {"blip2": blip2_dir, "florence2": florence2_dir}[name]
    files = set(os.listdir(d))
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files
    assert sum(os.path.getsize(os.path.join(d, f)) for f in files) < 2_000_000
    write(str(tmp_path))  # seeded: a second write gives the same weights
    with open(os.path.join(d, "model.safetensors"), "rb") as a, \
            open(tmp_path / "model.safetensors", "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_blip2_caption_batched_equals_unbatched(blip2_dir, blip2_ref, images, prompt):
    cap = blip2.Blip2Captioner(blip2_dir, prompt=prompt, max_new_tokens=NEW, batch_size=2)
    out = cap.caption(images)
    check_contract(out, [1, 1, 1])
    assert [o[0] for o in out] == [blip2_reference(blip2_ref, im, prompt) for im in images]
    if prompt is None:  # the tiny model's text depends on the image (the prompt dominates it)
        assert len({o[0] for o in out}) > 1


def test_blip2_region_one_phrase_per_box(blip2_dir, blip2_ref, images):
    reg = blip2.Blip2RegionCaptioner(blip2_dir, max_new_tokens=NEW, batch_size=2)
    out = reg.describe(images, BOXES)
    check_contract(out, [2, 0, 1])
    # BOX covers pixels x 10..30, y 5..39 (floor / ceil of its edges)
    assert out[0][0] == blip2_reference(blip2_ref, images[0][5:40, 10:31])
    assert out[0][1] == blip2_reference(blip2_ref, images[0])
    assert out[2][0] == blip2_reference(blip2_ref, images[2][3:4, 3:4])
    assert reg.describe([], []) == []
    assert reg.describe(images[:1], [np.zeros((0, 4), np.float32)]) == [[]]


def test_blip2_crop_box(images):
    im = images[0]  # 40 x 56
    # context 0.5 grows BOX by 10.1 px in x and 17.2 px in y per side, then clips to the image
    assert blip2.crop_box(im, np.array(BOX), 0.5).shape == (40, 41, 3)
    np.testing.assert_array_equal(blip2.crop_box(im, np.array(BOX), 0.5), im[0:40, 0:41])
    assert blip2.crop_box(im, np.array([5, 5, 5, 5])).shape == (1, 1, 3)  # degenerate box
    assert blip2.crop_box(im, np.array([70, 50, 90, 60])).shape == (1, 1, 3)  # outside


def test_florence2_caption_batched_equals_unbatched(florence2_dir, florence2_ref, images):
    cap = florence2.Florence2Captioner(florence2_dir, max_new_tokens=NEW, num_beams=1,
                                       batch_size=2)
    out = cap.caption(images)
    check_contract(out, [1, 1, 1])
    assert [o[0] for o in out] == [florence2_reference(florence2_ref, im, "<CAPTION>")
                                   for im in images]
    detailed = florence2.Florence2Captioner(florence2_dir, task="<DETAILED_CAPTION>",
                                            max_new_tokens=NEW, batch_size=3)  # beam search
    check_contract(detailed.caption(images), [1, 1, 1])


def test_florence2_region_prompt_quantisation(florence2_dir):
    reg = florence2.Florence2RegionCaptioner(florence2_dir)
    # floor(x * 1000 / W), floor(y * 1000 / H) for W, H = 56, 40: 178.57, 137.5, 539.29, 997.5
    assert reg.region_prompt(np.array(BOX), 56, 40) == \
        "<REGION_TO_DESCRIPTION><loc_178><loc_137><loc_539><loc_997>"
    # the right / bottom edge (bin 1000) is clipped to the last bin
    assert reg.region_prompt(np.array([0, 0, 56, 40]), 56, 40) == \
        "<REGION_TO_DESCRIPTION><loc_0><loc_0><loc_999><loc_999>"
    # each location is one token, as in the real vocabulary
    ids = reg.processor.tokenizer("<loc_178><loc_999>", add_special_tokens=False).input_ids
    assert reg.processor.tokenizer.convert_ids_to_tokens(ids) == ["<loc_178>", "<loc_999>"]


def test_florence2_region_one_phrase_per_box(florence2_dir, florence2_ref, images):
    reg = florence2.Florence2RegionCaptioner(florence2_dir, max_new_tokens=NEW, num_beams=1,
                                             batch_size=2)
    out = reg.describe(images, BOXES)
    check_contract(out, [2, 0, 1])
    ref = florence2_reference(florence2_ref, images[0],
                              "<REGION_TO_DESCRIPTION><loc_178><loc_137><loc_539><loc_997>")
    assert out[0][0] == ref
    # image 2 is 90 x 30: box (3, 3, 4, 4) -> bins 33, 100, 44, 133
    assert out[2][0] == florence2_reference(
        florence2_ref, images[2], "<REGION_TO_DESCRIPTION><loc_33><loc_100><loc_44><loc_133>")
    assert reg.describe([], []) == []


def _first_step_scores(captioner, images):
    """``caption(images)`` through the captioner's own path, with the model's ``generate`` also
    returning the first decoding step's raw ``[B, vocab]`` logits (before the logits processors,
    which set forced / suppressed tokens to -inf), float32."""
    seen = {}
    generate = captioner.model.generate

    def with_scores(*args, **kw):
        r = generate(*args, **kw, output_logits=True, return_dict_in_generate=True)
        seen["scores"] = r.logits[0].float().numpy()
        return r.sequences

    captioner.model.generate = with_scores
    out = captioner.caption(images)
    return out, seen["scores"]


@pytest.mark.parametrize("mod,cls", [(blip2, "Blip2Captioner"), (florence2, "Florence2Captioner")])
def test_bfloat16_matches_float32(mod, cls, blip2_dir, florence2_dir, images):
    """``dtype="bfloat16"`` casts the model (every float parameter bf16) and its first-step
    logits stay those of float32 up to bf16 rounding (compared as numbers: a greedy token could
    flip at a near-tie, so generated texts are not compared)."""
    d = blip2_dir if mod is blip2 else florence2_dir
    make = getattr(mod, cls)
    bf16 = make(d, dtype="bfloat16", max_new_tokens=1, num_beams=1)
    floats = [p for p in bf16.model.parameters() if p.is_floating_point()]
    assert floats and all(str(p.dtype) == "torch.bfloat16" for p in floats)
    out, s16 = _first_step_scores(bf16, images[:1])
    check_contract(out, [1])
    _, s32 = _first_step_scores(make(d, max_new_tokens=1, num_beams=1), images[:1])
    cos = (s16 * s32).sum() / np.linalg.norm(s16) / np.linalg.norm(s32)
    assert np.isfinite(s32).all() and cos > 0.99, cos
    assert np.abs(s16 - s32).max() < 0.1 * np.abs(s32).max()


def test_backend_names():
    assert backend_class("caption", "blip2") is blip2.Blip2Captioner
    assert backend_class("caption", "florence2") is florence2.Florence2Captioner
    assert backend_class("region_caption", "blip2") is blip2.Blip2RegionCaptioner
    assert backend_class("region_caption", "florence2") is florence2.Florence2RegionCaptioner


CLASSES = [blip2.Blip2Captioner, blip2.Blip2RegionCaptioner, florence2.Florence2Captioner,
           florence2.Florence2RegionCaptioner]


@pytest.mark.parametrize("cls", CLASSES)
def test_other_family_dir_is_refused(cls, blip2_dir, florence2_dir):
    other = florence2_dir if cls.family == "blip2" else blip2_dir
    with pytest.raises(AnnotateError, match="expected model_type") as e:
        cls(other)
    assert other in str(e.value)


@pytest.mark.parametrize("cls", CLASSES)
def test_dir_without_config_is_refused(cls, tmp_path):
    with pytest.raises(AnnotateError, match="no config.json") as e:
        cls(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    with pytest.raises(AnnotateError, match="needs \"model\""):
        cls(None)


@pytest.mark.parametrize("cls", CLASSES)
def test_unknown_option_is_refused(cls, blip2_dir):
    with pytest.raises(AnnotateError, match="unknown option.*temperature"):
        cls(blip2_dir, temperature=0.7)  # raised before the directory is even looked at


@pytest.mark.parametrize("cls,options", [
    (blip2.Blip2Captioner, {"max_new_tokens": 0}),
    (blip2.Blip2Captioner, {"prompt": 3}),
    (blip2.Blip2RegionCaptioner, {"context": -0.1}),
    (florence2.Florence2Captioner, {"task": "<OD>"}),
    (florence2.Florence2RegionCaptioner, {"task": "<CAPTION>"}),
    (florence2.Florence2Captioner, {"dtype": "int8"}),
    (florence2.Florence2RegionCaptioner, {"batch_size": 1.5}),
])
def test_bad_option_value_is_refused(cls, options, blip2_dir, florence2_dir):
    d = blip2_dir if cls.family == "blip2" else florence2_dir
    with pytest.raises(AnnotateError, match=next(iter(options))):
        cls(d, **options)
