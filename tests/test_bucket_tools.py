"""The tools on runs and outputs in buckets (issue 28, item 1): a tiny run made locally once, copied
to a GCS emulator on localhost (``gcs_bucket``, a real server), then ``umg_jax.load``,
``load_segmenter``, ``demo``, ``evaluate``, ``benchmark`` and ``export_torch`` read it straight
from the bucket, ``import_torch``, ``data.build`` and ``labeling.annotate`` write there; every
output equals the same command's on the local copy. Bad input (a missing bucket, no credentials, an
output that cannot be a directory): one line naming the path, exit status 2."""

import json
import pathlib

import annotate_fakes as fk
import numpy as np
import pytest
from conftest import make_tiny_workdir
from PIL import Image

import umg_jax
from umg_jax import demo, evaluate, storage
from umg_jax.data import build, records, synthetic
from umg_jax.downstream import cli as bench
from umg_jax.downstream import synthetic_layouts
from umg_jax.inference import read_image
from umg_jax.interop import export_torch, import_torch
from umg_jax.labeling.annotate import __main__ as annotate_cli

MISSING = "gs://no-such-bucket-umg"  # a bucket the emulator does not have


def _download(remote: str, local: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``remote`` as ``{relative path: bytes}`` (via a local copy)."""
    storage.copy_tree(remote, local)
    return _files(local)


def _files(d: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _exit2(capsys, fn, argv, *needles):
    """``fn(argv)`` exits with status 2 and one ``error:`` line holding every needle."""
    try:
        rc = fn(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="module")
def run(gcs_bucket, tmp_path_factory):
    """``(local workdir, its copy on the bucket)`` of a tiny random run (step 7)."""
    local = make_tiny_workdir(tmp_path_factory.mktemp("wd"))
    remote = f"{gcs_bucket}/runs/tiny"
    storage.copy_tree(local, remote)
    return local, remote


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "eval"
    synthetic.write_synthetic(str(data), 16, split="eval", num_shards=2, image_size=40)
    return data


# ------------------------------------------------------------------------ reading a run ---
def test_load_and_demo_from_the_bucket(run, tmp_path, capsys):
    local, remote = run
    a, b = umg_jax.load(str(local)), umg_jax.load(remote)
    img = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(a.embed_image(img), b.embed_image(img))
    np.testing.assert_array_equal(a.embed_text(["a star", "grass"]),
                                  b.embed_text(["a star", "grass"]))
    out = f"{remote}/demo/scene0.png"
    assert demo.main(["--workdir", remote, "--synthetic", "0", "--out", out]) == 0
    assert demo.main(["--workdir", str(local), "--synthetic", "0", "--out",
                      str(tmp_path / "scene0.png")]) == 0
    printed = capsys.readouterr().out.splitlines()
    half = len(printed) // 2
    assert printed[0].startswith("image:") and printed[half - 1] == f"wrote {out}"
    assert printed[:half - 1] == printed[half:-1]  # the same analysis
    assert storage.read_bytes(out)[:8] == b"\x89PNG\r\n\x1a\n"
    assert storage.read_bytes(out) == (tmp_path / "scene0.png").read_bytes()


def test_evaluate_reads_the_run_from_the_bucket(run, eval_data):
    local, remote = run
    names = "zeroshot,region,semseg"
    for wd in (remote, str(local)):
        assert evaluate.main(["--workdir", wd, "--data", str(eval_data),
                              "--evaluators", names]) == 0
    got = storage.read_json(f"{remote}/eval/7/metrics.json")
    want = json.loads((local / "eval" / "7" / "metrics.json").read_text())
    for d in (got, want):
        d["results"].pop("eval_seconds")
    assert got == want and want["results"]["num_examples"] == 16


def test_benchmark_reads_the_run_from_the_bucket(run, tmp_path, capsys):
    local, remote = run
    synthetic_layouts.write(tmp_path, 3)
    suite = tmp_path / "one.json"
    suite.write_text(json.dumps([{"task": "folder", "data": "folder", "batch_size": 8}]))
    for wd in (remote, str(local)):
        assert bench.main(["--workdir", wd, "--suite", str(suite)]) == 0
    printed = capsys.readouterr().out
    got = storage.read_json(f"{remote}/benchmark/7/folder.json")
    want = json.loads((local / "benchmark" / "7" / "folder.json").read_text())
    assert got["model"] == remote and want["model"] == str(local)
    for d in (got, want):
        for k in ("model", "date", "images_per_s"):
            d.pop(k)
    assert got == want and want["num_examples"] > 0
    table = storage.read_text(f"{remote}/benchmark/7/table.md")
    assert table in printed and table.splitlines()[2].startswith(f"| {remote} | 7 |")


def test_load_segmenter_from_the_bucket(gcs_bucket, tmp_path):
    """A segmentation-head run (configs/seg_tiny.py layout: params {"base", "seg"} and
    seg_vocab.json) loads from the bucket with the same head and training vocabulary."""
    import jax

    from umg_jax import checkpoint, config_lib
    from umg_jax.models import clip, mask_decoder

    c = config_lib.load_config(str(pathlib.Path(__file__).parents[1] / "configs/seg_tiny.py"))
    wd = tmp_path / "seg"
    wd.mkdir()
    (wd / "config.json").write_text(c.to_json_best_effort())
    (wd / "seg_vocab.json").write_text(json.dumps({"names": ["circle", "grass"]}))
    rng = np.random.default_rng(0)  # random values of the right shapes (a flax init is slow)
    abstract = {"base": clip.abstract_params(c.model),
                "seg": jax.eval_shape(lambda: mask_decoder.init_params(c, jax.random.key(0)))}
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
    with checkpoint.Checkpointer(wd, every_steps=1, keep=1, async_save=False) as ck:
        ck.save(3, {"params": params, "step": np.int32(3)})
    remote = f"{gcs_bucket}/runs/seg"
    storage.copy_tree(wd, remote)
    a, b = umg_jax.load_segmenter(str(wd)), umg_jax.load_segmenter(remote)
    assert b.train_labels == a.train_labels == {"circle", "grass"}
    for x, y in zip(jax.tree.leaves(a.seg_params), jax.tree.leaves(b.seg_params), strict=True):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ export and import ---
def test_export_torch_from_the_bucket_to_local_and_bucket(run, tmp_path, capsys):
    local, remote = run
    export_torch.main([str(local), "--format", "hf", "--out", str(tmp_path / "ref")])
    export_torch.main([remote, "--format", "hf", "--out", str(tmp_path / "from_bucket")])
    out = f"{remote}/export/hf"
    export_torch.main([remote, "--format", "hf", "--out", out])
    printed = capsys.readouterr().out
    assert f"{out}/model.safetensors" in printed
    want = _files(tmp_path / "ref")
    assert "model.safetensors" in want and "umg_config.json" in want
    assert _files(tmp_path / "from_bucket") == want
    assert _download(out, tmp_path / "down") == want


def test_import_torch_to_the_bucket(run, tmp_path, capsys):
    local, remote = run
    hf = tmp_path / "hf"
    export_torch.main([str(local), "--format", "hf", "--out", str(hf)])
    out = f"{remote.rsplit('/', 2)[0]}/imports/tiny"
    import_torch.main([str(hf), "--out", out])
    import_torch.main([str(hf), "--out", str(tmp_path / "imp")])
    assert out in capsys.readouterr().out
    def meta(files):  # orbax names its data files at random: the params compare loaded below
        return {k: v for k, v in files.items() if not k.startswith("params/")}

    got = _download(out, tmp_path / "down")
    assert meta(got) == meta(_files(tmp_path / "imp"))
    assert sorted(meta(got)) == ["import_report.json", "model_config.json"]
    a, b = umg_jax.load(str(tmp_path / "imp")), umg_jax.load(out)
    img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(a.embed_image(img), b.embed_image(img))
    np.testing.assert_array_equal(a.embed_text(["grass"]), b.embed_text(["grass"]))
    np.testing.assert_allclose(b.embed_image(img), umg_jax.load(str(local)).embed_image(img),
                               atol=1e-5)  # the round trip through HF kept the model
    _exit2(capsys, import_torch.main, [str(hf), "--out", out], out, "already exists")


# --------------------------------------------------------------------------- data tools ---
def _perimage_src(d: pathlib.Path) -> pathlib.Path:
    for i in range(5):
        img = np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(img).save(d / f"im{i}.png")
        (d / f"im{i}.json").write_text(json.dumps({
            "caption": f"picture {i}", "tags": ["thing"],
            "regions": [{"bbox": [2, 2, 10, 8], "caption": "a thing", "tags": ["thing"]}]}))
    return d


def test_data_build_to_the_bucket(gcs_bucket, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _perimage_src(src)
    out = f"{gcs_bucket}/data/pi"
    for o in (out, str(tmp_path / "ref")):
        assert build.main(["perimage", "--src", str(src), "--out", o, "--num_shards", "2"]) == 0
    assert out in capsys.readouterr().out
    want = _files(tmp_path / "ref")
    assert sorted(want) == ["build_report.json", "meta.json", "train-00000-of-00002.array_record",
                            "train-00001-of-00002.array_record"]
    assert _download(out, tmp_path / "down") == want
    assert records.read_meta(out)["num_examples"] == 5
    assert [pathlib.Path(p).name for p in records.shard_paths(out)] == sorted(want)[2:]
    # a bucket folder holding a data set is not overwritten object by object
    _exit2(capsys, build.main, ["perimage", "--src", str(src), "--out", out],
           out, "already holds a data set")
    # Grain reads local paths: a clear line, not ArrayRecord's error on a URL
    with pytest.raises(storage.StorageError, match="Cloud Storage FUSE"):
        records.RecordSource(records.shard_paths(out))


def _recipe(d: pathlib.Path) -> str:
    stages = [{"stage": "caption", "backend": "annotate_fakes:Captioner"},
              {"stage": "tag", "backend": "annotate_fakes:Tagger", "threshold": 0.5},
              {"stage": "detect", "backend": "annotate_fakes:Detector", "threshold": 0.4,
               "queries": "vocab"},
              {"stage": "segment", "backend": "annotate_fakes:Segmenter",
               "prompts": "boxes+stuff"},
              {"stage": "filter"}]
    p = d / "recipe.json"
    p.write_text(json.dumps({"vocab": ["red", "green", "sky"], "stages": stages}))
    return str(p)


def test_annotate_bucket_input_and_output_with_resume(gcs_bucket, tmp_path, monkeypatch):
    """Images on the bucket -> annotations on the bucket, interrupted and resumed there, equal to
    the local run; then the annotated record shards on the bucket as the input of a second run."""
    img = tmp_path / "img"
    img.mkdir()
    for i in range(7):  # shards of 3, 3, 1 images; batches of 2
        Image.fromarray(fk.scene(i)).save(img / f"img{i}.png")
    storage.copy_tree(img, f"{gcs_bucket}/annot/img")
    recipe = _recipe(tmp_path)

    def annotate(src, out, *extra):
        return annotate_cli.main(["--images", src, "--out", out, "--recipe", recipe,
                                  "--batch_size", "2", "--shard_size", "3", "--device", "cpu",
                                  *extra])

    def outputs(d):  # the stats files hold timings
        return {k: v for k, v in d.items() if not k.startswith("stats-")}

    assert annotate(str(img), str(tmp_path / "ref")) == 0
    out = f"{gcs_bucket}/annot/out"
    fk.Detector.calls = 0
    monkeypatch.setenv("FAKE_RAISE_AFTER", "3")  # dies in shard 1 after its first batch
    with pytest.raises(KeyboardInterrupt):
        annotate(f"{gcs_bucket}/annot/img", out)
    partial = storage.path(out) / ".annot-00001-of-00003.partial"
    assert storage.read_text(partial).count("\n") == 1  # the finished batch reached the bucket
    monkeypatch.delenv("FAKE_RAISE_AFTER")
    fk.Detector.calls = 0
    assert annotate(f"{gcs_bucket}/annot/img", out) == 0
    assert fk.Detector.calls == 2  # the rest of shard 1, shard 2
    assert outputs(_download(out, tmp_path / "down")) == outputs(_files(tmp_path / "ref"))

    assert annotate(str(tmp_path / "ref"), str(tmp_path / "ref2")) == 0
    assert annotate(out, f"{gcs_bucket}/annot/out2") == 0
    assert outputs(_download(f"{gcs_bucket}/annot/out2", tmp_path / "down2")) == \
        outputs(_files(tmp_path / "ref2"))


def test_sentencepiece_tokenizer_file_on_the_bucket(gcs_bucket, spm_model, run, tmp_path):
    """The SentencePiece file a run names (relative to the run: ``tokenizer.model``) is read from
    the bucket: tokens and text embeddings equal the local run's."""
    import shutil

    from umg_jax.data import tokenizer

    local = tmp_path / "spm_run"
    shutil.copytree(run[0], local)
    cfg = json.loads((local / "config.json").read_text())
    cfg["model"]["text"]["tokenizer"] = "tokenizer.model"  # ids < 40 fit the tiny vocabulary
    (local / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(spm_model, local / "tokenizer.model")
    storage.copy_tree(local, f"{gcs_bucket}/runs/spm")
    a, b = umg_jax.load(str(local)), umg_jax.load(f"{gcs_bucket}/runs/spm")
    assert b._tokenizer.model_path == f"{gcs_bucket}/runs/spm/tokenizer.model"
    np.testing.assert_array_equal(a.tokenize(["a cat"]), b.tokenize(["a cat"]))
    np.testing.assert_array_equal(a.embed_text(["a cat", "a dog"]),
                                  b.embed_text(["a cat", "a dog"]))

    remote = f"{gcs_bucket}/tok/spm.model"
    storage.write_bytes(remote, pathlib.Path(spm_model).read_bytes())
    texts = ["a photo of a cat", "two dogs"]
    got = tokenizer.tokenizer_for(remote, 16, 0)
    assert got.model_path == remote
    np.testing.assert_array_equal(got(texts), tokenizer.tokenizer_for(spm_model, 16, 0)(texts))
    with pytest.raises(FileNotFoundError, match="spm_missing.model"):
        tokenizer.SentencePieceTokenizer(f"{gcs_bucket}/tok/spm_missing.model")
    # an image on the bucket reads like a local one (umg_jax.load(...).classify(path, ...))
    img = np.random.default_rng(3).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "im.png")
    storage.write_bytes(f"{gcs_bucket}/im.png", (tmp_path / "im.png").read_bytes())
    np.testing.assert_array_equal(read_image(f"{gcs_bucket}/im.png"), img)


# ---------------------------------------------------------------------------- bad input ---
def test_missing_bucket_and_bad_outputs_exit_2(run, eval_data, tmp_path, capsys):
    local, _ = run
    gone = f"{MISSING}/run"
    _exit2(capsys, evaluate.main, ["--workdir", gone, "--data", str(eval_data)], MISSING)
    _exit2(capsys, bench.main, ["--workdir", gone, "--task", "folder", "--data",
                                str(tmp_path)], MISSING)
    _exit2(capsys, demo.main, ["--workdir", str(local), "--synthetic", "0", "--out",
                               f"{gone}/demo.png"], MISSING)
    _exit2(capsys, export_torch.main, [str(local), "--format", "hf", "--out", f"{gone}/hf"],
           MISSING, "does not exist")
    _exit2(capsys, import_torch.main, [str(tmp_path), "--out", f"{gone}/imp"], MISSING)
    _exit2(capsys, build.main, ["perimage", "--src", str(tmp_path), "--out", f"{gone}/d"],
           MISSING)
    _exit2(capsys, annotate_cli.main, ["--images", str(tmp_path), "--out", f"{gone}/a",
                                       "--recipe", _recipe(tmp_path)], MISSING)
    # an output folder that cannot be created (a file is in the way; root ignores chmod)
    (tmp_path / "file").write_text("x")
    blocked = str(tmp_path / "file" / "sub")
    _exit2(capsys, demo.main, ["--workdir", str(local), "--synthetic", "0", "--out",
                               f"{blocked}/d.png"], blocked)
    _exit2(capsys, export_torch.main, [str(local), "--format", "hf", "--out", blocked], blocked)
    # data sets are read through local paths: a bucket --data is refused by name
    _exit2(capsys, evaluate.main, ["--workdir", str(local), "--data", f"{gone}/eval"],
           f"{gone}/eval", "Cloud Storage FUSE")


def test_s3_run_load_and_export(s3_bucket, run, tmp_path):
    """The same on s3:// (moto's S3 server): load and export straight from the bucket."""
    local, _ = run
    remote = f"{s3_bucket}/runs/tiny"
    storage.copy_tree(local, remote)
    img = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(umg_jax.load(remote).embed_image(img),
                                  umg_jax.load(str(local)).embed_image(img))
    export_torch.main([remote, "--format", "hf", "--out", f"{s3_bucket}/export/hf"])
    export_torch.main([str(local), "--format", "hf", "--out", str(tmp_path / "ref")])
    assert _download(f"{s3_bucket}/export/hf", tmp_path / "down") == _files(tmp_path / "ref")


def test_no_credentials_exit_2(s3_bucket, run, monkeypatch, capsys):
    local, _ = run
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    out = f"{s3_bucket}/exports/hf"
    _exit2(capsys, export_torch.main, [str(local), "--format", "hf", "--out", out],
           "no AWS credentials", out)
    _exit2(capsys, evaluate.main, ["--workdir", f"{s3_bucket}/runs/tiny"], s3_bucket)
