"""Test-session setup shared by every test module.

- 8 fake CPU devices, so that mesh / shard_map code runs on the CPU (set before jax is imported);
  the local backend pinned to the CPU although libtpu is installed (TPU-compiler tests).
- absl flags marked parsed (Grain workers read absl flags; pytest never calls absl.app.run).
- ``torch_peers()`` / the ``torch_mod`` fixture: torch with this environment's torchvision shim
  (``tests/torch_shim.py``), applied lazily, so the JAX-only tests never import torch.
"""

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# libtpu is installed for the TPU-compiler tests (deviceless topologies): keep the local backend
# the CPU (no attempt to open a TPU on this host) and let both pytest workers load libtpu.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


def torch_peers():
    """Imports torch with this environment's torchvision shim applied once
    (``tests/torch_shim.py``); returns the torch module. Skips the calling test when torch is not
    installed."""
    pytest.importorskip("torch")
    from torch_shim import import_torch

    return import_torch()


def first_batch(path, batch_size: int, max_tags: int) -> dict:
    """The first eval batch the Grain pipeline makes of the record shards in ``path`` (32 px
    images, patch 8, context 16, at most 4 regions and 4 masks): proof that a tool's output
    trains."""
    import ml_collections as mlc

    from umg_jax.data import pipeline

    d = mlc.ConfigDict({"max_tags": max_tags, "max_regions": 4, "max_masks": 4,
                        "crop_scale": (0.6, 1), "flip": False, "min_region_frac": 0.0,
                        "strict": True, "num_workers": 0})
    m = mlc.ConfigDict({"vision": {"image_size": 32, "patch_size": 8},
                        "text": {"context_length": 16}})
    return next(pipeline.make_iterator(d, m, batch_size=batch_size, train=False, seed=0,
                                       path=str(path), process_index=0, process_count=1))


@pytest.fixture(scope="session")
def torch_mod():
    return torch_peers()


def write_import_dir(directory, model_cfg, params):
    """The layout ``umg_jax.interop.import_torch`` writes (``params/`` + ``model_config.json``)
    for ``params`` of ``model_cfg``, in a new ``directory``; returns its path as a string (the
    value of ``config.init.checkpoint``)."""
    from umg_jax import checkpoint

    directory.mkdir()
    checkpoint.save_params(directory / "params", params)
    (directory / "model_config.json").write_text(model_cfg.to_json())
    return str(directory)


def make_tiny_workdir(wd):
    """A training-workdir layout (full ``config.json`` + ``checkpoints/7/state``) holding random
    params of a very small model; for tests of everything that loads a trained model."""
    import pathlib

    import jax
    import numpy as np

    from umg_jax import checkpoint, config_lib
    from umg_jax.models import clip

    c = config_lib.load_config(str(pathlib.Path(__file__).parents[1] / "configs/tiny.py"))
    c.model.vision.update(image_size=32, patch_size=8, width=32, layers=2, heads=2)
    c.model.text.update(width=32, layers=1, heads=2, context_length=16)
    c.model.embed_dim = 32
    c.data.update(max_tags=2, max_regions=4, max_masks=6)
    c.eval.update(batch_size=8, num_examples=16)
    (wd / "config.json").write_text(c.to_json_best_effort())
    params = clip.init_params(c.model, jax.random.key(1))
    with checkpoint.Checkpointer(wd, every_steps=1, keep=1, async_save=False) as ck:
        ck.save(7, {"params": params, "step": np.int32(7)})
    return wd


SPM_TEXTS = ["a photo of a cat", "a photo of a dog", "two people riding bicycles down a street",
             "the quick brown fox jumps over the lazy dog", "red car next to a blue house"]


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    """A tiny SentencePiece model trained here (SigLIP's id layout: pad 0, eos 1, unk 2)."""
    import io

    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TEXTS * 20), model_writer=buf, vocab_size=40, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", minloglevel=3)
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    path.write_bytes(buf.getvalue())
    return str(path)


# ------------------------------------------------------------------ buckets on localhost ---
# Real servers on 127.0.0.1 (no mocks): a GCS emulator in this process and moto's S3 server as a
# subprocess. The variables that point the clients at them are set in os.environ, so the
# subprocesses a test starts (trainer CLIs) inherit them; they are restored afterwards.

GCS_BUCKET = "umg-bucket"  # bucket names have >= 3 characters
S3_BUCKET = "umg-s3"


def _set_env(updates: dict) -> dict:
    """Sets ``updates`` in os.environ; returns the previous values (None: unset) for
    :func:`_restore_env`."""
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    return old


def _restore_env(old: dict) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _forget_filesystems() -> None:
    """Drops the cached gcsfs / s3fs instances (fsspec's instance cache and etils.epath's): an
    s3fs client keeps the endpoint it was created with, and a later fixture's server has another
    port."""
    import fsspec
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
    for protocol in ("gcs", "s3"):
        fsspec.get_filesystem_class(protocol).clear_instance_cache()


def _emulator_sends_generations() -> None:
    """Media downloads of gcp-storage-emulator lack the ``x-goog-generation`` header that GCS
    sends; tensorstore needs it to update an object it read (orbax's OCDBT manifest: "Malformed
    StorageGeneration" on the second write of a checkpoint). Adds it, as GCS does."""
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "sends_generation", False):
        return
    real = objects.download

    def download(request, response, storage, *args, **kwargs):
        real(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    download.sends_generation = True
    objects.download = download  # objects.get (the JSON API's alt=media) calls it by name


def _quiet_disconnects(emulator) -> None:
    """Clients (gcsfs' ranged reads) may close a connection before the emulator has written its
    reply; the emulator's HTTP server then prints a BrokenPipeError traceback each time. Those
    are dropped; any other server error is still printed."""
    httpd = emulator._api._httpd  # the http.server instance its thread serves on
    default = httpd.handle_error

    def handle_error(request, client_address):
        if not isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionResetError):
            default(request, client_address)

    httpd.handle_error = handle_error


@pytest.fixture(scope="module")
def gcs_bucket(tmp_path_factory):
    """``"gs://umg-bucket"`` on a GCS emulator (gcp-storage-emulator, objects on disk under a
    temp dir) listening on a free port, for gcsfs / etils.epath / google-cloud-storage
    (``STORAGE_EMULATOR_HOST``) and orbax's tensorstore (``TENSORSTORE_GCS_HTTP_URL``)."""
    import portpicker
    from gcp_storage_emulator.server import create_server

    import umg_jax.storage  # noqa: F401 - fsspec settings before any bucket filesystem exists

    _emulator_sends_generations()
    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    server = create_server("127.0.0.1", port, in_memory=False, default_bucket=GCS_BUCKET,
                           data_dir=str(tmp_path_factory.mktemp("gcs")))
    server.start()
    _quiet_disconnects(server)
    # gcsfs reads STORAGE_EMULATOR_HOST on every request, so its cached filesystem instance
    # follows a new port; the bucket-layout lookup (an API the emulator lacks) is switched off.
    old = _set_env({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
    _forget_filesystems()
    try:
        yield f"gs://{GCS_BUCKET}"
    finally:
        _restore_env(old)
        _forget_filesystems()
        server.stop()


@pytest.fixture(scope="module")
def s3_bucket():
    """``"s3://umg-s3"`` on moto's S3 server (a ``moto_server`` subprocess on a free port) with
    dummy credentials: ``AWS_ENDPOINT_URL`` points boto3 / s3fs at it."""
    import shutil
    import subprocess
    import time

    import portpicker

    import umg_jax.storage  # noqa: F401 - fsspec settings before any bucket filesystem exists

    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable),
                                                      "moto_server")
    port = portpicker.pick_unused_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    old = _set_env({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"})
    _forget_filesystems()
    try:
        import boto3

        deadline = time.time() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if proc.poll() is not None or time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield f"s3://{S3_BUCKET}"
    finally:
        _restore_env(old)
        _forget_filesystems()
        proc.terminate()
        proc.wait(timeout=30)
