"""The evaluation CLI (umg_jax/evaluate.py) on a tiny checkpoint and a small synthetic set."""

import json

import pytest
from conftest import make_tiny_workdir

from umg_jax import evaluate
from umg_jax.data import synthetic


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    wd = make_tiny_workdir(tmp_path_factory.mktemp("wd"))
    data = tmp_path_factory.mktemp("data") / "eval"
    synthetic.write_synthetic(str(data), 16, split="eval", num_shards=2, image_size=40)
    return wd, data


def test_cli_writes_metrics_and_table(setup, capsys):
    wd, data = setup
    assert evaluate.main(["--workdir", str(wd), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    for key in ("zeroshot/top1", "retrieval/i2t_r1", "region/box_acc", "region/mask_acc",
                "semseg/miou", "panoptic/pq"):
        assert key in out
    saved = json.loads((wd / "eval" / "7" / "metrics.json").read_text())
    assert saved["results"]["num_examples"] == 16
    assert 0.0 <= saved["results"]["semseg/pixel_acc"] <= 1.0


def test_trainer_hook_equals_cli(setup):
    """The in-training hook evaluates exactly what the CLI does."""
    from umg_jax import checkpoint

    wd, data = setup
    cfg = checkpoint.read_model_config(wd / "config.json")
    import ml_collections as mlc

    config = mlc.ConfigDict(json.loads((wd / "config.json").read_text()))
    config.data.eval_path = str(data)
    params = checkpoint.load_params(wd / "checkpoints" / "7", cfg)
    hook = evaluate.make_hooks(config)["umg"]
    got = hook(params)
    ref = evaluate.run(str(wd), config=config, data=str(data))
    for k, v in got.items():
        assert v == pytest.approx(ref[k], abs=1e-6), k


def test_two_evaluations_of_one_checkpoint_are_equal(setup, tmp_path_factory):
    """Evaluation is deterministic: the same checkpoint evaluated twice, and with other eval batch
    sizes, gives the same metrics, exactly. The 32 held-out scenes include captions written for
    several of them (synthetic duplicates), whose retrieval ties once depended on which copy the
    sort put first."""
    import ml_collections as mlc

    from umg_jax.data import records

    wd, _ = setup
    data = tmp_path_factory.mktemp("dups") / "eval"
    synthetic.write_synthetic(str(data), 32, split="eval", num_shards=2, image_size=40)
    firsts = [r["captions"][0] for r in records.iter_records(str(data))]
    assert len(set(firsts)) < len(firsts)  # the case under test is there
    config = mlc.ConfigDict(json.loads((wd / "config.json").read_text()))
    config.eval.num_examples = 32
    runs = []
    for bs in (8, 8, 32):
        config.eval.batch_size = bs
        res = evaluate.run(str(wd), config=config, data=str(data))
        res.pop("eval_seconds")
        runs.append(res)
    assert runs[0]["num_examples"] == 32
    assert runs[1] == runs[0]  # twice, same settings: every metric equal
    # another batch size: equal too. Texts are encoded once per distinct caption whatever the
    # batches; the image tower runs per batch, and XLA's rounding may depend on the batch shape
    # (a bigger model's embeddings moved by ~1e-7 between 32 and 64), so this holds only while
    # no two candidates are that close: true of this model and data, checked here
    assert runs[2] == runs[0]


def test_the_examples_evaluated_do_not_depend_on_the_batch_size(setup):
    """12 examples at eval batch 8: one whole batch and 4 of the second, not 16."""
    import ml_collections as mlc

    wd, data = setup
    config = mlc.ConfigDict(json.loads((wd / "config.json").read_text()))
    config.data.eval_path = str(data)
    seen = [len(b["image"]) for b in evaluate.eval_batches(config, str(data), 12, 8)]
    assert seen == [8, 4]
    config.eval.update(num_examples=12, batch_size=8)
    res = evaluate.run(str(wd), config=config, data=str(data))
    assert res["num_examples"] == 12


def test_bad_input_exit_2(setup, tmp_path, capsys):
    wd, data = setup
    assert evaluate.main(["--workdir", str(tmp_path / "nope")]) == 2
    assert evaluate.main(["--workdir", str(wd), "--data", str(data), "--evaluators", "x"]) == 2
    assert evaluate.main(["--workdir", str(wd), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "unknown evaluators" in err
