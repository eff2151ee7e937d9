"""Every stage with a real Hugging Face model of every family: the tiny random teachers of
``--write_tiny_teachers`` run both shipped recipes end to end on synthetic scenes through the
command line, and their records train (Grain pipeline)."""

import json

import pytest
from conftest import first_batch

from umg_jax.data import records, transforms
from umg_jax.data.synthetic import write_synthetic
from umg_jax.labeling.annotate import __main__ as cli

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, torch_mod):
    d = tmp_path_factory.mktemp("tiny")
    assert cli.main(["--write_tiny_teachers", str(d / "teachers")]) == 0
    write_synthetic(str(d / "images"), 5, split="eval", num_shards=1, image_size=64)
    return d


@pytest.mark.parametrize("recipe, backends", [
    ("recipe.json", {"florence2", "clip", "owlv2", "sam", "sam3"}),
    ("recipe_alt.json", {"blip2", "siglip", "grounding_dino", "sam2"}),
])
def test_recipe_end_to_end(teachers, recipe, backends, capsys):
    out = teachers / recipe
    argv = ["--images", str(teachers / "images"), "--out", str(out), "--recipe",
            str(teachers / "teachers" / recipe), "--device", "cpu", "--batch_size", "2",
            "--shard_size", "3"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    states = [json.loads(x) for f in sorted(out.glob("*.jsonl"))
              for x in f.read_text().splitlines()]
    assert len(states) == 5
    seen = set()
    for s in states:
        seen |= {c["by"] for c in s["captions"]} | {t["by"] for t in s["tags"]}
        seen |= {r["by"] for r in s["regions"]} | {r["phrase_by"] for r in s["regions"]}
        seen |= {r["mask_by"] for r in s["regions"]} | {x["by"] for x in s["concepts"]}
    seen = {b for x in seen if x for b in x.split("+")}
    assert backends <= seen, seen  # every stage's backend produced something
    recs = list(records.iter_records(str(out)))
    assert recs and sum(len(r["regions"]) for r in recs) > 0
    for r in recs:
        transforms.decode(records.encode_record(r), strict=True)
    batch = first_batch(out, 2, 3)
    assert batch["region_valid"].any() and batch["mask_valid"].any()
    # a second run finds every shard done and rewrites nothing
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith("stats")}
    assert cli.main(argv) == 0
    assert "2 finished shards skipped" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()
            if not p.name.startswith("stats")} == before


@pytest.mark.parametrize("stage, backend, model", [
    ("detect", "owlv2", "sam"), ("segment", "sam", "owlv2"), ("caption", "blip2", "florence2"),
    ("tag", "clip", "grounding_dino"), ("segment", "sam3", "sam2"),
])
def test_wrong_architecture_fails_at_start(teachers, stage, backend, model, capsys):
    r = teachers / f"wrong_{backend}.json"
    r.write_text(json.dumps({"vocab": ["circle"], "stages": [
        {"stage": stage, "backend": backend, "model": f"teachers/{model}"}]}))
    assert cli.main(["--images", str(teachers / "images"), "--out", str(teachers / "o"),
                     "--recipe", str(r), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and str(teachers / "teachers" / model) in err
    assert not (teachers / "o").exists()  # nothing was read or written
