r"""What works with ``s3://`` paths, against a real S3 server on localhost (moto's server mode).

    python benchmarks/s3_probe.py                      # starts moto in-process on a free port
    python benchmarks/s3_probe.py --endpoint http://127.0.0.1:9000   # an S3 server you run (MinIO)

Probes, each on its own folder of one bucket, and prints one line per component:

1. ``etils.epath`` (what orbax and the project use for files) via fsspec / s3fs, with only the
   environment: ``AWS_ENDPOINT_URL`` + ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
   ``AWS_DEFAULT_REGION`` (botocore reads ``AWS_ENDPOINT_URL``);
2. tensorstore's ``s3`` kvstore with the endpoint in the spec (``"endpoint": URL``);
3. tensorstore's ``s3`` kvstore from the environment only (what orbax gives it: a ``s3://`` path,
   no endpoint): does it honour ``AWS_ENDPOINT_URL``?
4. orbax ``CheckpointManager`` save + restore on ``s3://`` (OCDBT, orbax's default);
5. orbax without OCDBT (``PyTreeCheckpointHandler(use_ocdbt=False)``): where the arrays go;
6. tensorboardX ``SummaryWriter("s3://...")``: events written and read back (its S3 writer takes
   ``S3_ENDPOINT``, else boto3's own resolution, which reads ``AWS_ENDPOINT_URL``).

Exit status 0 when every probe ran (whatever the verdicts); the verdict of each is the finding.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import struct
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "umg-probe"


def start_moto() -> tuple[str, object]:
    """moto's S3 server in a thread of this process on a free port: (endpoint URL, server)."""
    import logging

    import portpicker
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = portpicker.pick_unused_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return f"http://127.0.0.1:{port}", server


def set_env(endpoint: str) -> None:
    """The environment an S3-compatible server needs (moto accepts any key)."""
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_REGION", os.environ["AWS_DEFAULT_REGION"])


def keys(prefix: str) -> list[str]:
    import boto3

    out = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in out.get("Contents", []))


def probe_epath() -> str:
    from etils import epath

    root = epath.Path(f"s3://{BUCKET}/epath")
    (root / "a").mkdir(parents=True, exist_ok=True)
    (root / "a" / "x.json").write_text('{"k": 1}')
    (root / "a" / "y.bin").write_bytes(b"\x00\x01")
    assert (root / "a" / "x.json").read_text() == '{"k": 1}'
    assert sorted(p.name for p in (root / "a").iterdir()) == ["x.json", "y.bin"]
    assert (root / "a").is_dir() and not (root / "missing").exists()
    (root / "a" / "y.bin").rename(root / "a" / "z.bin")
    assert keys("epath/") == ["epath/a/x.json", "epath/a/z.bin"], keys("epath/")
    (root / "a").rmtree()
    assert keys("epath/") == []
    return "works: mkdir, write/read, iterdir, exists, rename, rmtree (AWS_ENDPOINT_URL)"


def probe_tensorstore(endpoint: str | None) -> str:
    import numpy as np
    import tensorstore as ts

    kv = {"driver": "s3", "bucket": BUCKET, "path": f"ts_{'spec' if endpoint else 'env'}/"}
    if endpoint:
        kv.update(endpoint=endpoint, aws_region=os.environ["AWS_DEFAULT_REGION"])
    t = ts.open({"driver": "zarr", "kvstore": kv}, create=True, dtype=ts.float32,
                shape=[4]).result(timeout=15)
    t.write(np.arange(4, dtype=np.float32)).result(timeout=15)
    np.testing.assert_array_equal(t.read().result(timeout=15), np.arange(4))
    how = '"endpoint" in the kvstore spec' if endpoint else "the environment only"
    return f"works with {how}"


def probe_tensorstore_env() -> str:
    try:
        return probe_tensorstore(None)
    except TimeoutError:
        # Seen with TENSORSTORE_CURL_VERBOSE=1: it resolves <bucket>.s3.amazonaws.com (AWS).
        raise TimeoutError("no answer in 15 s: AWS_ENDPOINT_URL is not read; tensorstore "
                           f"asks AWS ({BUCKET}.s3.amazonaws.com)") from None


def probe_orbax_manager() -> str:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    tree = {"w": np.arange(8, dtype=np.float32), "b": {"c": np.ones((2, 3), np.float32)}}
    mgr = ocp.CheckpointManager(f"s3://{BUCKET}/orbax/checkpoints")
    mgr.save(1, args=ocp.args.StandardSave(tree))
    mgr.wait_until_finished()
    mgr.close()
    mgr = ocp.CheckpointManager(f"s3://{BUCKET}/orbax/checkpoints")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    out = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore(abstract))
    jax.tree.map(np.testing.assert_array_equal, out, tree)
    return "works: save + restore"


def probe_orbax_no_ocdbt() -> str:
    import numpy as np
    import orbax.checkpoint as ocp

    cwd = os.getcwd()
    scratch = tempfile.mkdtemp(prefix="s3_probe_")
    os.chdir(scratch)  # a relative "s3:" folder would land here
    try:
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
        try:
            ckptr.save(f"s3://{BUCKET}/no_ocdbt/x",
                       args=ocp.args.PyTreeSave({"w": np.arange(8, dtype=np.float32)}))
            err = ""
        except Exception as e:  # noqa: BLE001 (the error is the finding)
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        local = sorted(str(p.relative_to(scratch)) for p in pathlib.Path(scratch).rglob("*")
                       if p.is_file())
    finally:
        os.chdir(cwd)
    remote = [k.removeprefix("no_ocdbt/") for k in keys("no_ocdbt/")]
    return (f"FAILS ({err or 'no error'}): the array data went to a LOCAL folder "
            f"{local[:2]}... ({len(local)} files) while the metadata went to the bucket "
            f"{remote[:3]}...")


def _tfrecords(data: bytes) -> list[bytes]:
    """The payloads of a TFRecord byte string (length, crc, data, crc)."""
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(data[i + 12:i + 12 + n])
        i += 12 + n + 4
    return out


def probe_tensorboardx() -> str:
    import boto3
    from tensorboardX import SummaryWriter
    from tensorboardX.proto import event_pb2

    w = SummaryWriter(f"s3://{BUCKET}/tb/run")
    for step in range(3):
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
    w.close()
    (key,) = keys("tb/run/")
    data = boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
    scalars = []
    for rec in _tfrecords(data):
        ev = event_pb2.Event.FromString(rec)
        scalars += [(ev.step, v.tag, round(v.simple_value, 4)) for v in ev.summary.value]
    assert scalars == [(0, "train/loss", 1.0), (1, "train/loss", 0.5),
                       (2, "train/loss", 0.3333)], scalars
    return (f"works: {key} read back, 3 scalars (endpoint from boto3: S3_ENDPOINT or "
            "AWS_ENDPOINT_URL; each flush re-uploads the whole event file)")


def run(name: str, fn, timeout_s: float) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    fut = pool.submit(fn)
    done, _ = concurrent.futures.wait([fut], timeout=timeout_s)
    try:
        verdict = fut.result() if done else f"FAILS: no answer in {timeout_s:.0f} s"
    except Exception as e:  # noqa: BLE001 (the error is the finding)
        last = traceback.extract_tb(e.__traceback__)[-1]
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        verdict = (f"FAILS: {type(e).__name__}: {msg} "
                   f"({pathlib.Path(last.filename).name}:{last.lineno})")
    pool.shutdown(wait=False)
    return name, verdict, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoint", default="", help="S3 server URL ('' = start moto here)")
    ap.add_argument("--timeout_s", type=float, default=20.0, help="per probe")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    server = None
    endpoint = args.endpoint
    if not endpoint:
        endpoint, server = start_moto()
    set_env(endpoint)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    versions = {}
    for mod in ("etils", "s3fs", "tensorstore", "orbax.checkpoint", "tensorboardX", "boto3",
                "moto"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            versions[mod] = getattr(m, "__version__", "?")
        except ImportError:
            versions[mod] = "not installed"
    print(f"S3 server: {endpoint} ({'moto, in-process' if server else 'given'}); "
          + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    rows = [
        run("etils.epath (s3fs)", probe_epath, args.timeout_s),
        run("tensorstore s3, endpoint in spec", lambda: probe_tensorstore(endpoint),
            args.timeout_s),
        run("tensorstore s3, env only", probe_tensorstore_env, args.timeout_s),
        run("orbax CheckpointManager (OCDBT)", probe_orbax_manager, args.timeout_s),
        run("orbax PyTree, use_ocdbt=False", probe_orbax_no_ocdbt, args.timeout_s),
        run("tensorboardX SummaryWriter", probe_tensorboardx, args.timeout_s),
    ]
    w = max(len(r[0]) for r in rows)
    print()
    for name, verdict, secs in rows:
        print(f"{name:<{w}}  {secs:5.1f}s  {verdict}", flush=True)
    if server is not None:
        server.stop()
    sys.stdout.flush()
    os._exit(0)  # a timed-out tensorstore request may still be retrying in its own threads


if __name__ == "__main__":
    sys.exit(main())
