"""The annotation tool (umg_jax/labeling/annotate/): stage policies and the filter by hand, the run
loop end to end with known-answer backends (tests/annotate_fakes.py, plugged in through the
recipe like a user's own), records through the Grain pipeline, resume after a kill (byte-identical
output), job-array splitting, recipe and CLI errors, and no torch in ``import umg_jax``."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import annotate_fakes as fk
import numpy as np
import pytest
from conftest import first_batch
from PIL import Image

from umg_jax.data import records, transforms
from umg_jax.labeling.annotate import __main__ as cli
from umg_jax.labeling.annotate import detect, stage
from umg_jax.labeling.annotate import filter as filter_stage
from umg_jax.labeling.annotate.backend import AnnotateError
from umg_jax.labeling.annotate.families.noun_phrases import NounPhraseTagger, mentions
from umg_jax.labeling.annotate.recipe import build, load_recipe
from umg_jax.labeling.annotate.run import annotate, worker_shards
from umg_jax.labeling.annotate.things import is_thing, load_stuff_names
from umg_jax.labeling.pseudo_label import list_inputs

TESTS = pathlib.Path(__file__).parent
VOCAB = ["red", "green", "sky"]
FAKE = "annotate_fakes:"
STAGES = [
    {"stage": "caption", "backend": FAKE + "Captioner"},
    {"stage": "tag", "backend": FAKE + "Tagger", "threshold": 0.5},
    {"stage": "tag", "backend": "noun_phrases"},
    {"stage": "detect", "backend": FAKE + "Detector", "threshold": 0.4, "queries": "vocab"},
    {"stage": "region_caption", "backend": FAKE + "RegionCaptioner"},
    {"stage": "segment", "backend": FAKE + "Segmenter", "prompts": "boxes+stuff"},
    {"stage": "filter"},
]


def _images(d: pathlib.Path, n: int = 5, corrupt: bool = True) -> pathlib.Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(fk.scene(i)).save(d / f"img{i}.png")
    if corrupt:
        (d / "img9_corrupt.png").write_bytes(b"not a png")
    return d


def _recipe(d: pathlib.Path, stages=None, **top) -> str:
    p = d / "recipe.json"
    p.write_text(json.dumps({"vocab": VOCAB, "stages": stages or STAGES, **top}))
    return str(p)


def _run(src, out, recipe_path, **kw):
    kw = {"batch_size": 2, "shard_size": 3, "log": lambda s: None, **kw}
    return annotate(list_inputs(str(src)), build(load_recipe(recipe_path), "cpu",
                                                 log=lambda s: None), str(out), **kw)


def _files(d: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.is_file() and not p.name.startswith("stats-")}


def test_mentions_and_noun_phrase_tagger():
    assert mentions("Two dogs on the grass.", "dog")
    assert mentions("a Traffic  Lights", "traffic light")
    assert not mentions("a hotdog", "dog") and not mentions("anything", "")
    s = NounPhraseTagger(None).tag([np.zeros((2, 2, 3), np.uint8)] * 2, ["cat", "red car"],
                                   [["a cat and red cars"], []])
    np.testing.assert_array_equal(s, [[1, 1], [0, 0]])


def test_thing_stuff_typing():
    stuff = load_stuff_names()
    assert {"sky", "grass", "wall"} <= stuff and "dog" not in stuff
    assert not is_thing("Blue sky", stuff) and is_thing("skyscraper", stuff)
    assert is_thing("dining table", stuff)


def test_detect_stage_nms_and_clipping():
    ctx = stage.Context(("red", "sky"), load_stuff_names())

    class D:
        def detect(self, images, queries, threshold):
            assert queries == [["red"]]  # things only: "sky" is stuff
            return [(np.array([[0, 0, 10, 10], [1, 0, 11, 10], [-5, 20, 30, 90],
                               [40, 40, 40, 50]], np.float32),
                     np.zeros(4, np.int32), np.array([0.9, 0.8, 0.7, 0.95], np.float32))]

    s = stage.new_state("a", "a", 30, 20, [])
    stage.add_tag(s, "red", 0.9, "t")
    stage.add_tag(s, "sky", 0.9, "t")
    detect.run(D(), "d", [np.zeros((30, 20, 3), np.uint8)], [s], ctx, threshold=0.1,
               nms_iou=0.5, max_boxes=20, queries="things")
    # box 1 overlaps box 0 at IoU 9/11 (NMS), box 2 clipped to the image, box 3 zero-width
    assert [r["box"] for r in s["regions"]] == [[0, 0, 10, 10], [0, 20, 20, 30]]
    assert all(r["label"] == "red" and r["by"] == "d" for r in s["regions"])


def _region(box, label, score, phrase=None, mask=None):
    return {"box": box, "label": label, "score": score, "by": "x", "isthing": True,
            "phrase": phrase, "phrase_by": None, "mask": mask, "mask_score": 0.9 if mask else None,
            "mask_by": None}


def test_filter_by_hand():
    ctx = stage.Context(("red", "green"), load_stuff_names())
    m = np.zeros((100, 100), bool)
    m[10:30, 10:30] = True
    tiny = np.zeros((100, 100), bool)
    tiny[0, 0] = True
    s = stage.new_state("a", "a", 100, 100, [])
    stage.add_tag(s, "red", 1.0, "t")
    s["regions"] = [
        _region([10, 10, 30, 30], "red", 0.9, "a red block", records.mask_to_rle(m)),
        _region([10, 10, 30, 31], "green", 0.5, "a green block"),      # cross-class duplicate
        _region([0, 0, 2, 2], "red", 0.8),                              # 4 px < 0.001 * 1e4
        _region([50, 50, 80, 80], "red", 0.7, "a cloud"),               # disagrees with tags
        _region([50, 10, 90, 40], "red", 0.6, "red things", records.mask_to_rle(tiny)),
        _region([10, 50, 30, 70], "red", 0.4, None, records.mask_to_rle(m)),  # dup mask
    ]
    s["concepts"] = [{"label": "sky", "isthing": False, "score": 1.0, "by": "x",
                      "mask": records.mask_to_rle(tiny)}]
    kept = filter_stage.filter_state(s, ctx, **filter_stage.POLICY)
    assert kept
    assert [r["box"] for r in s["regions"]] == [[10, 10, 30, 30], [50, 10, 90, 40],
                                                [10, 50, 30, 70]]
    assert s["regions"][1]["mask"] is None and s["regions"][2]["mask"] is None
    assert s["dropped"] == {"small_box": 1, "small_mask": 2, "duplicate_box": 1,
                            "duplicate_mask": 1, "phrase_disagrees": 1}
    assert s["concepts"] == []
    # "label" agreement: the phrase must name the region's own label
    s2 = stage.new_state("b", "b", 100, 100, [])
    stage.add_tag(s2, "green", 1.0, "t")
    s2["regions"] = [_region([0, 0, 50, 50], "red", 0.9, "a green block")]
    pol = dict(filter_stage.POLICY, phrase_agreement="label")
    # its one region goes, but the image keeps a tag: it still trains the image level
    assert filter_stage.filter_state(s2, ctx, **pol)
    assert s2["dropped"] == {"phrase_disagrees": 1} and s2["regions"] == []
    pol["phrase_agreement"] = "tags"
    s2["regions"] = [_region([0, 0, 50, 50], "red", 0.9, "a green block")]
    assert filter_stage.filter_state(s2, ctx, **pol)  # "green" is one of the image's tags
    assert len(s2["regions"]) == 1
    # nothing left (no region, mask, caption or tag): the image goes
    s3 = stage.new_state("c", "c", 100, 100, [])
    s3["regions"] = [_region([0, 0, 1, 1], "red", 0.9)]
    assert not filter_stage.filter_state(s3, ctx, **filter_stage.POLICY)
    assert s3["dropped"] == {"small_box": 1, "empty_image": 1}
    # a caption alone keeps it
    s4 = stage.new_state("d", "d", 100, 100, ["a photo"])
    assert filter_stage.filter_state(s4, ctx, **filter_stage.POLICY)


def test_end_to_end_with_known_answer_backends(tmp_path):
    src = _images(tmp_path / "img")
    out = tmp_path / "out"
    c = _run(src, out, _recipe(tmp_path))
    assert c == {"examples": 5, "caption_only": 0, "regions": 7, "masks": 12, "unreadable": 1,
                 "dropped_images": 0, "skipped_shards": 0, "meta_written": True}
    assert sorted(p.name for p in out.iterdir()) == [
        "annot-00000-of-00002.array_record", "annot-00000-of-00002.jsonl",
        "annot-00001-of-00002.array_record", "annot-00001-of-00002.jsonl", "meta.json",
        "stats-worker-0.json"]
    states = [json.loads(x) for f in sorted(out.glob("*.jsonl"))
              for x in f.read_text().splitlines()]
    assert [s["id"] for s in states] == [f"img{i}.png" for i in range(5)] + ["img9_corrupt.png"]
    assert "error" in states[-1]
    recs = list(records.iter_records(str(out)))
    for i, (s, r) in enumerate(zip(states, recs, strict=False)):
        img = fk.scene(i)
        colours = ["red", "green"] if i % 2 else ["red"]
        assert r["captions"] == ["a photo of " + " and ".join(f"a {c} square" for c in colours)]
        assert sorted(t["name"] for t in s["tags"]) == sorted(colours + ["sky"])
        assert s["tags"][0]["by"] == FAKE + "Tagger+noun_phrases"  # both taggers credited
        # one box per colour: the duplicate went to NMS, the speck and the ghost to the filter
        assert [x["box"] for x in r["regions"]] == [fk.colour_box(img, c) for c in colours]
        assert [x["caption"] for x in r["regions"]] == [f"a {c} block" for c in colours]
        assert s["dropped"] == ({"small_box": 1} if i % 2 else
                                {"small_box": 1, "duplicate_box": 1})
        things = [x for x in r["segments"] if x["isthing"]]
        for seg, c in zip(things, colours, strict=True):
            np.testing.assert_array_equal(records.rle_to_mask(seg["rle"]), fk.colour_mask(img, c))
        (sky,) = [x for x in r["segments"] if not x["isthing"]]
        assert sky["tags"] == ["sky"] and sky["region"] == -1
        np.testing.assert_array_equal(records.rle_to_mask(sky["rle"]), fk.colour_mask(img, "sky"))
        transforms.decode(records.encode_record(r), strict=True)
    meta = records.read_meta(str(out))
    assert meta["num_examples"] == 5 and meta["counts"]["unreadable"] == 1
    assert [(c["name"], c["isthing"]) for c in meta["categories"]] == [
        ("red", True), ("green", True), ("sky", False)]
    assert meta["unreadable"][0].startswith("img9_corrupt.png: ")

    batch = first_batch(out, 4, 3)
    assert batch["region_valid"].sum() == 6 and batch["mask_valid"].sum() == 10


def test_concept_masks_for_every_tag(tmp_path):
    """``"prompts": "tags"``: things get text-prompted masks too (segments without a box)."""
    src = _images(tmp_path / "img", n=2, corrupt=False)
    stages = [{"stage": "tag", "backend": FAKE + "Tagger", "threshold": 0.5},
              {"stage": "segment", "backend": FAKE + "Segmenter", "prompts": "tags"},
              {"stage": "filter"}]
    _run(src, tmp_path / "out", _recipe(tmp_path, stages))
    for i, r in enumerate(records.iter_records(str(tmp_path / "out"))):
        img = fk.scene(i)
        segs = {x["tags"][0]: x for x in r["segments"]}
        assert set(segs) == ({"red", "green", "sky"} if i % 2 else {"red", "sky"})
        assert r["regions"] == [] and all(x["region"] == -1 for x in segs.values())
        assert segs["red"]["isthing"] and not segs["sky"]["isthing"]
        np.testing.assert_array_equal(records.rle_to_mask(segs["red"]["rle"]),
                                      fk.colour_mask(img, "red"))


def test_segment_stage_instances_and_stuff_union():
    """Text-prompted masks: a thing concept keeps one segment per instance, a stuff concept
    becomes one segment; the filter then drops a thing instance duplicating a region mask."""
    from umg_jax.labeling.annotate import segment

    ctx = stage.Context(("red", "sky"), load_stuff_names())
    a, b, c = (np.zeros((20, 20), bool) for _ in range(3))
    a[0:5, 0:5], b[10:15, 10:15], c[15:, :] = True, True, True

    class S:
        def segment_concepts(self, images, concepts, threshold):
            assert concepts == [["red", "sky"]]
            return [[(0, a, 0.9), (0, b, 0.8), (1, c, 0.7), (1, a & False, 0.6)]]

    s = stage.new_state("x", "x", 20, 20, [])
    stage.add_tag(s, "red", 1.0, "t")
    stage.add_tag(s, "sky", 1.0, "t")
    segment.run(S(), "s", [np.zeros((20, 20, 3), np.uint8)], [s], ctx, prompts="tags",
                threshold=0.5, overwrite=False)
    got = [(x["label"], x["isthing"], x["score"]) for x in s["concepts"]]
    assert got == [("red", True, 0.9), ("red", True, 0.8), ("sky", False, 0.7)]
    np.testing.assert_array_equal(records.rle_to_mask(s["concepts"][2]["mask"]), c)
    s["regions"] = [_region([0, 0, 5, 5], "red", 0.5, None, records.mask_to_rle(a))]
    s["regions"][0]["mask_score"] = 0.95  # beats the instance it duplicates
    assert filter_stage.filter_state(s, ctx, **dict(filter_stage.POLICY, min_box_area=0))
    assert [x["score"] for x in s["concepts"]] == [0.8, 0.7]
    assert s["regions"][0]["mask"] is not None and s["dropped"] == {"duplicate_mask": 1}


def test_resume_after_interrupt_is_byte_identical(tmp_path, monkeypatch):
    src = _images(tmp_path / "img", n=7)
    recipe = _recipe(tmp_path)
    _run(src, tmp_path / "ref", recipe)
    fk.Detector.calls = 0
    monkeypatch.setenv("FAKE_RAISE_AFTER", "3")  # dies in shard 1 after its first batch
    with pytest.raises(KeyboardInterrupt):
        _run(src, tmp_path / "res", recipe)
    left = sorted(p.name for p in (tmp_path / "res").iterdir())
    assert left == ["." + "annot-00001-of-00003.partial", "annot-00000-of-00003.array_record",
                    "annot-00000-of-00003.jsonl"]
    monkeypatch.delenv("FAKE_RAISE_AFTER")
    fk.Detector.calls = 0
    logs = []
    c = _run(src, tmp_path / "res", recipe, log=logs.append)
    assert c["skipped_shards"] == 1 and fk.Detector.calls == 2  # the rest of shard 1, shard 2
    assert any("resuming after 1 of 2 batches" in s for s in logs)
    assert any("img/s, ETA" in s and "detect Detector" in s for s in logs), logs
    assert _files(tmp_path / "res") == _files(tmp_path / "ref")


def test_kill_mid_shard_then_resume_cli(tmp_path):
    """A real SIGKILL of the command line tool, then the same command again."""
    src = _images(tmp_path / "img", n=7)
    recipe = _recipe(tmp_path)
    _run(src, tmp_path / "ref", recipe)
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               FAKE_KILL_AFTER="3", FAKE_KILL_FILE=str(tmp_path / "killme"))
    cmd = [sys.executable, "-m", "umg_jax.labeling.annotate", "--images", str(src), "--out",
           str(tmp_path / "res"), "--recipe", recipe, "--batch_size", "2", "--shard_size", "3",
           "--device", "cpu"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t = time.time()
    # A dead child fails at once; the time limit only catches a hang, with room for a busy
    # 2-core machine (torch's import alone has taken over a minute there).
    while not (tmp_path / "killme").exists():
        assert p.poll() is None and time.time() - t < 900, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # killed inside shard 1, after its first batch: that batch is kept for the resume
    assert (tmp_path / "res" / ".annot-00001-of-00003.partial").read_text().count("\n") == 1
    assert not (tmp_path / "res" / "meta.json").exists()
    env.pop("FAKE_KILL_AFTER")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "annotated 4 images" in r.stdout and "1 finished shards skipped" in r.stdout
    assert _files(tmp_path / "res") == _files(tmp_path / "ref")


def test_job_array_split(tmp_path):
    assert worker_shards(5, 2, 0) == [0, 2, 4] and worker_shards(5, 2, 1) == [1, 3]
    src = _images(tmp_path / "img", n=7)
    recipe = _recipe(tmp_path)
    _run(src, tmp_path / "ref", recipe)
    c0 = _run(src, tmp_path / "arr", recipe, num_workers=2, worker_id=1)
    assert not c0["meta_written"] and not (tmp_path / "arr" / "meta.json").exists()
    c1 = _run(src, tmp_path / "arr", recipe, num_workers=2, worker_id=0)
    assert c1["meta_written"] and c0["examples"] + c1["examples"] == 7
    assert _files(tmp_path / "arr") == _files(tmp_path / "ref")


def test_filter_can_drop_images(tmp_path):
    src = _images(tmp_path / "img", n=2, corrupt=False)
    stages = [{"stage": "tag", "backend": FAKE + "Tagger", "threshold": 2.0},  # no tags
              {"stage": "detect", "backend": FAKE + "Detector"}, {"stage": "filter"}]
    c = _run(src, tmp_path / "out", _recipe(tmp_path, stages))
    assert c["examples"] == 0 and c["dropped_images"] == 2
    assert records.shard_paths(str(tmp_path / "out")) == []
    assert records.read_meta(str(tmp_path / "out"))["dropped"] == {"empty_image": 2}


def test_caption_only_images_are_kept_and_counted(tmp_path, capsys):
    """Record inputs with captions, and a detector that finds nothing: every image is kept as a
    caption-only example (it trains the image level), counted in the run and in meta.json."""
    src = tmp_path / "src"
    src.mkdir()
    recs = [{"image": records.encode_image(fk.scene(i)), "height": 100, "width": 100,
             "captions": [f"scene {i}"], "tags": [], "regions": [], "segments": []}
            for i in range(3)]
    records.write_shard_file(recs, str(src / f"in-00000-of-00001{records.SHARD_SUFFIX}"))
    stages = [{"stage": "tag", "backend": FAKE + "Tagger", "threshold": 2.0},
              {"stage": "detect", "backend": FAKE + "Detector", "threshold": 2.0},
              {"stage": "filter"}]
    out = tmp_path / "out"
    assert cli.main(["--images", str(src), "--out", str(out), "--recipe",
                     _recipe(tmp_path, stages)]) == 0
    assert "3 images (3 with captions or tags only)" in capsys.readouterr().out
    got = list(records.iter_records(str(out)))
    assert [r["captions"] for r in got] == [[f"scene {i}"] for i in range(3)]
    assert records.read_meta(str(out))["counts"]["caption_only"] == 3


def test_nothing_annotated_exits_1_and_a_bug_is_not_an_unreadable_image(tmp_path, capsys,
                                                                        monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"x{i}.png").write_bytes(b"not a png")
    r = _recipe(tmp_path, [{"stage": "filter"}])
    assert cli.main(["--images", str(bad), "--out", str(tmp_path / "o1"), "--recipe", r]) == 1
    assert "nothing annotated: 2 inputs unreadable" in capsys.readouterr().err
    # every image left with nothing (no tags, no detections, no captions): status 1 too
    src = _images(tmp_path / "img", n=2, corrupt=False)
    stages = [{"stage": "tag", "backend": FAKE + "Tagger", "threshold": 2.0},
              {"stage": "detect", "backend": FAKE + "Detector"}, {"stage": "filter"}]
    assert cli.main(["--images", str(src), "--out", str(tmp_path / "o2"), "--recipe",
                     _recipe(tmp_path, stages)]) == 1
    assert "2 left with nothing" in capsys.readouterr().err
    # a programming error while reading inputs stops the run instead of skipping every image
    from umg_jax.labeling.annotate import run as run_mod

    def broken(item):
        raise TypeError("a bug")

    monkeypatch.setattr(run_mod, "load_input", broken)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["--images", str(src), "--out", str(tmp_path / "o3"), "--recipe", r])


@pytest.mark.parametrize("recipe, msg", [
    ({"stages": []}, "at least one stage"),
    ({"stages": [{"stage": "paint"}]}, "\"stage\" must be one of"),
    ({"vocab": ["a"], "stages": [{"stage": "tag", "backend": "clip", "threshold": 0.2,
                                  "treshold": 0.3}]}, "unknown key(s) ['treshold']"),
    ({"vocab": ["a"], "stages": [{"stage": "filter"}, {"stage": "tag", "backend": "clip"}]},
     "'tag' after 'filter'"),
    ({"stages": [{"stage": "tag", "backend": "noun_phrases"}]}, "needs a non-empty \"vocab\""),
    ({"vocab": "nope.txt", "stages": [{"stage": "filter"}]}, "vocab file"),
    ({"stages": [{"stage": "detect"}]}, "needs \"backend\""),
    ({"bogus": 1, "stages": [{"stage": "filter"}]}, "unknown key(s) ['bogus']"),
])
def test_recipe_errors(tmp_path, recipe, msg):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(recipe))
    with pytest.raises(AnnotateError) as e:
        load_recipe(str(p))
    assert msg in str(e.value)


def test_cli_bad_input(tmp_path, capsys, torch_mod):  # owlv2 imports transformers
    src = _images(tmp_path / "img", n=1, corrupt=False)

    def err(*argv):
        assert cli.main(list(argv)) == 2
        return capsys.readouterr().err

    ok = ["--images", str(src), "--out", str(tmp_path / "o")]
    assert "--recipe required" in err(*ok)
    assert "does not exist" in err(*ok, "--recipe", str(tmp_path / "none.json"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    r = _recipe(tmp_path, [{"stage": "detect", "backend": "owlv2", "model": "bert"}])
    e = err(*ok, "--recipe", r, "--device", "cpu")
    assert "holds a 'bert' model" in e and str(tmp_path / "bert") in e
    r = _recipe(tmp_path, [{"stage": "detect", "backend": "owlv2", "model": "missing"}])
    assert "no config.json" in err(*ok, "--recipe", r, "--device", "cpu")
    r = _recipe(tmp_path, [{"stage": "detect", "backend": "sam"}])
    assert "has no backend 'sam'" in err(*ok, "--recipe", r)
    r = _recipe(tmp_path, [{"stage": "detect", "backend": FAKE + "Tagger"}])
    assert "is a tag backend" in err(*ok, "--recipe", r)
    r = _recipe(tmp_path, [{"stage": "tag", "backend": "noun_phrases", "options": {"x": 1}}])
    assert "unknown option(s) ['x']" in err(*ok, "--recipe", r)
    r = _recipe(tmp_path, [{"stage": "filter"}])
    assert "outside [0, 2)" in err(*ok, "--recipe", r, "--num_workers", "2", "--worker_id", "2")
    assert "no images found" in err("--images", str(tmp_path / "bert"), "--out", "o",
                                    "--recipe", r)
    assert "torch sees no CUDA" in err(*ok, "--recipe", r, "--device", "cuda") or \
        __import__("torch").cuda.is_available()


def test_umg_jax_imports_without_torch():
    code = ("import sys\nfor m in ('torch', 'transformers', 'torchvision'):\n"
            "    sys.modules[m] = None\n"
            "import umg_jax, umg_jax.labeling.annotate.recipe, umg_jax.labeling.annotate.run\n"
            "from umg_jax.labeling.annotate import __main__\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_proposals_backend_finds_the_red_square(monkeypatch):
    """The weight-free detector: pseudo_label's proposals scored by a teacher (the known-answer
    teacher of test_pseudo_label, which sees red cells as "red")."""
    from test_pseudo_label import FakeTeacher, _scene

    from umg_jax import inference
    from umg_jax.labeling.annotate.families.proposals import ProposalDetector
    from umg_jax.labeling.pseudo_label import box_iou

    monkeypatch.setattr(inference, "load", lambda path: FakeTeacher())
    det = ProposalDetector("teacher-dir")
    img = _scene(3)
    ys, xs = np.nonzero(img[..., 0] > 100)
    truth = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    (boxes, labels, scores), (b2, l2, s2) = det.detect([img, img], [["blue", "red"], []], 0.5)
    assert len(b2) == len(l2) == len(s2) == 0  # no queries, no boxes
    red = labels == 1
    assert red.any() and (scores >= 0.5).all()
    best = boxes[red][np.argmax(scores[red])]
    assert box_iou(best[None], truth)[0, 0] > 0.5
    with pytest.raises(AnnotateError, match="needs \"model\""):
        ProposalDetector(None)


def test_proposals_segmenter_superpixels_and_concepts(monkeypatch):
    from test_pseudo_label import FakeTeacher, _scene

    from umg_jax import inference
    from umg_jax.labeling.annotate.families.proposals import ProposalSegmenter
    from umg_jax.labeling.pseudo_label import mask_iou

    img = fk.scene(1)
    boxes = np.asarray([fk.colour_box(img, "red"), fk.colour_box(img, "green")], np.float32)
    seg = ProposalSegmenter(None)
    ((masks, scores), (m0, s0)) = seg.segment([img, img], [boxes, np.zeros((0, 4), np.float32)])
    for m, c in zip(masks, ("red", "green"), strict=True):  # solid squares: exact masks
        np.testing.assert_array_equal(m, fk.colour_mask(img, c))
    np.testing.assert_allclose(scores, 1.0)
    assert m0.shape == (0, 48, 64) and s0.shape == (0,)
    with pytest.raises(AnnotateError, match="need \"model\""):
        seg.segment_concepts([img], [["sky"]], 0.5)
    monkeypatch.setattr(inference, "load", lambda path: FakeTeacher())
    scene = _scene(2)
    (found,) = ProposalSegmenter("teacher").segment_concepts([scene], [["red", "blue"]], 0.5)
    assert [p for _, _, p in found] == sorted((p for _, _, p in found), reverse=True)
    got = {}
    for j, m, _ in found:  # each concept's best proposal (score 1: concept assignment)
        got.setdefault(j, m)
    assert set(got) == {0, 1} and all(p >= 0.5 for _, _, p in found)
    red = scene[..., 0] > 100
    # the teacher sees 8 px cells, so a concept's best proposal lies inside its region
    assert (got[0] & red).sum() / got[0].sum() > 0.9 and (got[1] & ~red).sum() / got[1].sum() > 0.9
    assert mask_iou(got[1], ~red) > 0.5
