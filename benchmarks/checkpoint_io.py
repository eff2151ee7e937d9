r"""Checkpoint save / restore time of a train state: local disk vs an emulated GCS bucket.

    python benchmarks/checkpoint_io.py                         # vit_b16: params + AdamW state
    python benchmarks/checkpoint_io.py --config tiny --reps 1  # seconds, for a smoke run

The state is the trainer's (``umg_jax.step.abstract_state`` of the config's model and optimizer)
filled with random numbers on the CPU, saved and restored through the project's
``umg_jax.checkpoint.Checkpointer`` (orbax, OCDBT, the trainer's settings; the save time includes
waiting for the asynchronous write to finish). Each repetition writes a fresh run directory and
restores it with a new Checkpointer, into arrays of the same shapes on this host's device; the
restored state is compared with the saved one. Backends:

* ``local``: a directory under ``--local_dir`` (default: the system temp dir);
* ``gcs``: ``gs://`` on gcp-storage-emulator started in this process (objects on local disk),
  reached by orbax's tensorstore through ``TENSORSTORE_GCS_HTTP_URL`` and by gcsfs through
  ``STORAGE_EMULATOR_HOST``. **The emulator is not GCS**: one Python process on this machine,
  no network, no GCS throughput limits or parallelism; the number says what the code path costs
  here, not what a bucket gives;
* ``s3``: ``s3://`` on moto's S3 server, when the Checkpointer accepts it (orbax-checkpoint
  0.12.8 does not write arrays to S3; the row then records the refusal).

Writes ``benchmarks/results/checkpoint_io.json`` (through ``provenance.write_result``: command
line, git commit, date, machine) and prints a table (median over ``--reps``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import peers
from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
GCS_BUCKET = "umg-bench"
S3_BUCKET = "umg-bench-s3"


def start_gcs_emulator(data_dir: str):
    """gcp-storage-emulator on a free port (objects on disk in ``data_dir``), with the
    environment that points gcsfs and tensorstore at it; returns the server."""
    import portpicker
    from gcp_storage_emulator.server import create_server

    # The tests' fix for the emulator (its downloads lack GCS's x-goog-generation header, which
    # tensorstore needs to update orbax's OCDBT manifest): one fix, kept in tests/conftest.py.
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:  # keep 1 CPU device here
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()
    peers.emulator_sends_generations()
    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    server = create_server("127.0.0.1", port, in_memory=False, default_bucket=GCS_BUCKET,
                           data_dir=data_dir)
    server.start()
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    return server


def start_moto():
    """moto's S3 server in this process on a free port, a bucket, and the AWS environment."""
    import logging

    import portpicker
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = portpicker.pick_unused_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    import boto3

    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    return server


def make_state(config_name: str, seed: int):
    """(state, abstract state with this host's device as sharding, bytes): the trainer's train
    state for ``configs/<config_name>.py``, every float leaf random normal."""
    import importlib

    import jax
    import numpy as np

    from umg_jax import optim
    from umg_jax import step as step_lib

    config = importlib.import_module(f"umg_jax.configs.{config_name}").get_config()
    abstract_params = jax.eval_shape(lambda: step_lib.init_params(config, jax.random.key(0)))
    tx, _ = optim.make_optimizer(config.optim, abstract_params, config.total_steps,
                                 freeze=step_lib.frozen_regexes(config))
    abstract = step_lib.abstract_state(config, tx)
    rng = np.random.default_rng(seed)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def fill(s):
        if np.issubdtype(s.dtype, np.floating):
            x = rng.standard_normal(s.shape, dtype=np.float32).astype(s.dtype)
        else:
            x = np.zeros(s.shape, s.dtype)
        return jax.device_put(x, dev)

    state = jax.tree.map(fill, abstract)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          abstract)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return state, target, nbytes


def same(a, b) -> bool:
    import jax
    import numpy as np

    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _files(d):
    """Every file under the directory ``d`` (an epath; its glob has no ``**`` on buckets)."""
    for child in d.iterdir():
        if child.is_dir():
            yield from _files(child)
        else:
            yield child


def time_backend(root: str, state, target, reps: int) -> dict:
    """Save and restore ``reps`` times under ``root`` (a fresh run directory each time)."""
    import jax

    from umg_jax import checkpoint as ckpt_lib
    from umg_jax import storage

    saves, restores = [], []
    for r in range(reps):
        workdir = f"{root.rstrip('/')}/rep{r}"
        ck = ckpt_lib.Checkpointer(workdir, every_steps=1, keep=1)
        t0 = time.perf_counter()
        ck.save(1, state, meta={"step": 1}, force=True)
        ck.wait()
        saves.append(time.perf_counter() - t0)
        ck.close()
        ck = ckpt_lib.Checkpointer(workdir, every_steps=1, keep=1)
        t0 = time.perf_counter()
        restored, _, meta = ck.restore(None, target)
        jax.block_until_ready(restored)
        restores.append(time.perf_counter() - t0)
        ck.close()
        if meta != {"step": 1} or not same(restored, state):
            raise AssertionError(f"restored state differs from the saved one ({workdir})")
        del restored
    files = list(_files(storage.path(f"{root.rstrip('/')}/rep0")))
    return {"save_s": statistics.median(saves), "restore_s": statistics.median(restores),
            "save_all_s": saves, "restore_all_s": restores, "files_per_checkpoint": len(files),
            "largest_file_mib": max(p.stat().length for p in files) / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="vit_b16", help="configs/<name>.py")
    ap.add_argument("--backends", default="local,gcs,s3", help="comma-separated subset")
    ap.add_argument("--reps", type=int, default=3, help="save + restore repetitions")
    ap.add_argument("--local_dir", default="", help="local checkpoint root ('' = temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/checkpoint_io.json"))
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    bad = set(backends) - {"local", "gcs", "s3"}
    if bad or args.reps < 1:
        ap.error(f"unknown backends {sorted(bad)}" if bad else "--reps must be >= 1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_before = os.getloadavg()
    import umg_jax.storage  # noqa: F401 - its fsspec settings before any bucket filesystem

    state, target, nbytes = make_state(args.config, seed=0)
    print(f"{args.config}: train state {nbytes / 2**20:.0f} MiB "
          f"({sum(1 for _ in __import__('jax').tree.leaves(state))} arrays)", flush=True)
    scratch = tempfile.mkdtemp(prefix="ckpt_io_", dir=args.local_dir or None)
    servers, rows = [], []
    try:
        for b in backends:
            if b == "local":
                root = os.path.join(scratch, "local")
            elif b == "gcs":
                servers.append(start_gcs_emulator(os.path.join(scratch, "gcs_emulator")))
                root = f"gs://{GCS_BUCKET}/ckpt_io"
            else:
                servers.append(start_moto())
                root = f"s3://{S3_BUCKET}/ckpt_io"
            print(f"{b}: {root} ...", flush=True)
            try:
                res = time_backend(root, state, target, args.reps)
                res.update(save_mib_s=nbytes / 2**20 / res["save_s"],
                           restore_mib_s=nbytes / 2**20 / res["restore_s"])
            except Exception as e:  # noqa: BLE001 - a backend that cannot is a finding
                res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            rows.append({"backend": b, "root": root, **res})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    note = ("gcs = gcp-storage-emulator in this process (objects on the local disk), s3 = moto: "
            "emulators are not GCS / S3; these times are the code path on this machine, not "
            "bucket throughput. The emulator reads a whole object for every ranged GET "
            "(gcp_storage_emulator/handlers/objects.py: download), and an OCDBT restore reads "
            "ranges of data files of up to 400 MiB, so its restore time is mostly the emulator")
    head = (f"{'backend':<8}{'save s':>9}{'restore s':>11}{'save MiB/s':>12}{'restore MiB/s':>15}"
            f"{'files':>7}{'largest MiB':>13}")
    print(f"\n{args.config}, {nbytes / 2**20:.0f} MiB, median of {args.reps}\n{head}\n"
          + "-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<8}  not supported: {r['error']}")
        else:
            print(f"{r['backend']:<8}{r['save_s']:>9.2f}{r['restore_s']:>11.2f}"
                  f"{r['save_mib_s']:>12.0f}{r['restore_mib_s']:>15.0f}"
                  f"{r['files_per_checkpoint']:>7}{r['largest_file_mib']:>13.0f}")
    print(f"note: {note}")
    record = {"config": args.config, "state_bytes": nbytes, "reps": args.reps,
              "load_avg_before": load_before, "rows": rows, "note": note}
    print(f"wrote {write_result(args.out, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
