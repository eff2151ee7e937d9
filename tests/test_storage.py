"""umg_jax.storage against real servers on localhost (a GCS emulator, moto's S3 server) and the
local filesystem: the same calls read and write all three, an append log keeps its history on an
object store, and every bad path gets one clear line."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from umg_jax import storage

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(params=["local", "gs", "s3"])
def root(request, tmp_path):
    """A fresh directory on each store (a unique prefix in the shared test buckets)."""
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("gcs_bucket" if request.param == "gs" else "s3_bucket")
    return f"{bucket}/{request.node.name.replace('[', '-').rstrip(']')}-{os.getpid()}"


def test_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(storage.path("gs://b/x/y")) == "gs://b/x/y"
    assert os.fspath(storage.path("s3://b/x")) == "s3://b/x"
    assert os.fspath(storage.path("run")) == str(tmp_path / "run")
    assert storage.is_remote("gs://b/x") and storage.is_remote("s3://b")
    assert not storage.is_remote(tmp_path) and not storage.is_remote("gs:/b")
    with pytest.raises(storage.StorageError, match="only local paths, gs:// and s3://"):
        storage.path("hdfs://nn/run")
    with pytest.raises(storage.StorageError,
                       match=r"^--tokenizer gs://b/t.model is a bucket path; copy it$"):
        storage.require_local("gs://b/t.model", "--tokenizer", "copy it")
    assert storage.require_local("t.model", "--tokenizer", "x") == tmp_path / "t.model"


def test_files_round_trip_on_every_store(root, tmp_path):
    d = storage.check_writable_dir(f"{root}/run")
    assert os.fspath(d) == os.fspath(storage.path(f"{root}/run"))
    assert not [p.name for p in d.iterdir()] if d.exists() else True  # the probe is gone
    storage.write_text(f"{root}/run/a.txt", "héllo\n")
    storage.write_bytes(f"{root}/run/sub/b.bin", bytes(range(256)))
    storage.write_json(f"{root}/run/c.json", {"x": [1, 2]})
    assert storage.read_text(f"{root}/run/a.txt") == "héllo\n"
    assert storage.read_bytes(f"{root}/run/sub/b.bin") == bytes(range(256))
    assert storage.read_json(f"{root}/run/c.json") == {"x": [1, 2]}
    storage.write_text(f"{root}/run/a.txt", "second")  # a whole-object rewrite
    assert storage.read_text(f"{root}/run/a.txt") == "second"
    assert storage.check_readable(f"{root}/run/c.json", "config") == storage.path(
        f"{root}/run/c.json")
    with pytest.raises(storage.StorageError, match=r"^config .*/run/nope\.json does not exist$"):
        storage.check_readable(f"{root}/run/nope.json", "config")
    with pytest.raises(FileNotFoundError):
        storage.read_text(f"{root}/run/nope.json")

    # A real file for libraries (the bytes, same name), and back through an output directory.
    with storage.local_file(f"{root}/run/sub/b.bin") as f:
        assert isinstance(f, pathlib.Path) and f.name == "b.bin"
        assert f.read_bytes() == bytes(range(256))
    with storage.output_dir(f"{root}/out") as out:
        (out / "deep" / "er").mkdir(parents=True)
        (out / "deep" / "er" / "z.txt").write_text("z")
        (out / "top.txt").write_text("t")
    assert storage.read_text(f"{root}/out/deep/er/z.txt") == "z"
    assert storage.read_text(f"{root}/out/top.txt") == "t"
    # Failing block: nothing uploaded (a local output dir is the target itself, so skip it).
    if storage.is_remote(root):
        with pytest.raises(RuntimeError), storage.output_dir(f"{root}/failed") as out:
            (out / "half.txt").write_text("half")
            raise RuntimeError("boom")
        assert not storage.path(f"{root}/failed/half.txt").exists()

    # copy_tree between stores: out -> local -> back to this store under another name.
    storage.copy_tree(f"{root}/out", tmp_path / "copy")
    assert (tmp_path / "copy" / "deep" / "er" / "z.txt").read_text() == "z"
    storage.copy_tree(tmp_path / "copy", f"{root}/copy2")
    assert storage.read_text(f"{root}/copy2/deep/er/z.txt") == "z"
    assert storage.read_text(f"{root}/copy2/top.txt") == "t"


def test_append_log_keeps_history_across_reopens(root):
    """The metrics log of a resumed run: a second writer (the restarted trainer) appends after
    what the first wrote, also on object stores, which have no append."""
    p = f"{root}/metrics.jsonl"
    with storage.AppendLog(p) as log:
        log.write('{"step": 1}\n')
        log.flush()
        assert storage.read_text(p) == '{"step": 1}\n'
        log.write('{"step": 2}\n')
    with storage.AppendLog(p) as log:
        log.write('{"step": 3}\n')
    assert [json.loads(x)["step"] for x in storage.read_text(p).splitlines()] == [1, 2, 3]
    log = storage.AppendLog(p)
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.write("x")


def test_local_writes_are_atomic(tmp_path):
    """A write that fails half-way leaves the old file and no temporary file behind."""
    p = tmp_path / "d" / "f.json"
    storage.write_json(p, {"a": 1})

    with pytest.raises(TypeError):
        storage.write_json(p, {"a": object()})  # fails while encoding: nothing written
    with pytest.raises(TypeError):
        storage.write_bytes(p, None)  # fails inside the write
    assert json.loads(p.read_text()) == {"a": 1}
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it


def test_missing_bucket_is_one_line(gcs_bucket, s3_bucket):
    for url in ("gs://no-such-bucket/run", "s3://no-such-bucket/run"):
        with pytest.raises(storage.StorageError,
                           match=rf"^bucket {url[:5]}no-such-bucket does not exist .*{url}$"):
            storage.check_writable_dir(url)
        with pytest.raises(storage.StorageError, match="bucket .* does not exist"):
            storage.check_readable(f"{url}/config.json", "config")
    # Checking never creates the bucket (fsspec's makedirs would, on S3).
    assert not storage.path("s3://no-such-bucket").exists()


def test_unwritable_local_directory_is_one_line(tmp_path):
    (tmp_path / "file").write_text("a file, not a directory")
    with pytest.raises(storage.StorageError, match=r"^cannot create directory .*/file/run: "):
        storage.check_writable_dir(tmp_path / "file" / "run")
    # A read-only filesystem (root ignores file permissions, not this).
    with pytest.raises(storage.StorageError, match=r"^(cannot create directory|directory) /sys/"):
        storage.check_writable_dir("/sys/umg-run")


def _check_in_subprocess(url: str, env: dict) -> subprocess.CompletedProcess:
    code = ("import sys; from umg_jax import storage\n"
            "try: storage.check_writable_dir(sys.argv[1])\n"
            "except storage.StorageError as e: print(e); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code, url], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_missing_credentials_are_one_line(tmp_path, s3_bucket):
    """No credentials anywhere the client libraries look (env, config files, metadata servers):
    the real google.auth / botocore lookups fail and the check says what to set. moto's server
    needs credentials like real S3, so the S3 bucket exists but cannot be reached."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "CLOUDSDK_", "STORAGE_EMULATOR"))}
    env.update(HOME=str(tmp_path), NO_GCE_CHECK="True", AWS_EC2_METADATA_DISABLED="true",
               AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"])
    out = _check_in_subprocess("gs://umg-bucket/run", env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stdout.strip() == (
        "no Google Cloud credentials for gs://umg-bucket/run: run `gcloud auth "
        "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a service-account "
        "key (a TPU or GCE VM uses its service account)")
    out = _check_in_subprocess(f"{s3_bucket}/run", env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stdout.strip().startswith(f"no AWS credentials for {s3_bucket}/run: set ")
    # With the dummy credentials the same bucket is writable.
    env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_DEFAULT_REGION="us-east-1")
    out = _check_in_subprocess(f"{s3_bucket}/run", env)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
