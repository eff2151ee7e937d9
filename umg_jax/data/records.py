"""Record io: the stored form of an example (``schema.py`` form 1) in ArrayRecord shards.

One record = one msgpack-encoded dict. Images stay encoded (PNG / JPEG bytes) and masks are COCO
RLE (pycocotools), so a shard costs about what the source images cost. A data set directory holds
``<prefix>-<i>-of-<n>.array_record`` shards and ``meta.json`` (name, categories, counts).

Writing is atomic per directory: shards and meta go to a temporary sibling directory that is
renamed into place at the end, so a reader never sees half a data set and an interrupted build
leaves the previous one intact.

The writers also take ``gs://`` / ``s3://`` directories (``umg_jax.storage``): ArrayRecord needs
a local file, so the shards are written locally and uploaded (``meta.json`` last). Readers
(:class:`RecordSource`, Grain) need local paths: a bucket is read through a Cloud Storage FUSE
mount.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import numpy as np

SHARD_SUFFIX = ".array_record"
META_FILE = "meta.json"
FUSE_HINT = ("Grain reads ArrayRecord shards through local paths: mount the bucket with Cloud "
             "Storage FUSE (gcsfuse) and use the mount, or copy the shards to local disk")


# ------------------------------------------------------------------------------- codecs ---


def encode_record(record: dict[str, Any]) -> bytes:
    """dict of the schema's record form -> msgpack bytes (numpy scalars/arrays become lists)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"cannot encode {type(o).__name__} in a record")

    return msgpack.packb(record, default=default, use_bin_type=True)


def decode_record(raw: bytes) -> dict[str, Any]:
    """msgpack bytes -> record dict (raises on malformed input)."""
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 92) -> bytes:
    """``[H, W, 3] uint8`` RGB -> PNG (lossless, default) or JPEG bytes."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
    buf = io.BytesIO()
    if fmt.lower() in ("jpg", "jpeg"):
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    elif fmt.lower() == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"image format must be 'png' or 'jpeg', got {fmt!r}")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> ``[H, W, 3] uint8`` RGB (grey / RGBA / palette converted)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """``[H, W]`` bool / 0-1 mask -> COCO RLE ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a [H, W] mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> ``[H, W] uint8`` 0/1."""
    from pycocotools import mask as mask_utils

    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE (COCO iscrowd annotations)
        coded = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        coded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str)
                 else counts}
    return mask_utils.decode(coded).astype(np.uint8)


# --------------------------------------------------------------------------- shards ---


def shard_paths(directory: str) -> list[str]:
    """Sorted ArrayRecord shard paths in ``directory`` (local or ``gs://`` / ``s3://``; empty
    when there are none)."""
    from umg_jax import storage

    if storage.is_remote(directory):
        d = storage.path(directory)
        return sorted(str(p) for p in d.glob(f"*{SHARD_SUFFIX}")) if d.is_dir() else []
    return sorted(glob.glob(os.path.join(directory, f"*{SHARD_SUFFIX}")))


def read_meta(directory: str) -> dict[str, Any]:
    """``meta.json`` of a data set directory, local or on a bucket (``{}`` when absent)."""
    from umg_jax import storage

    p = storage.path(directory) / META_FILE
    return storage.read_json(p) if p.exists() else {}


def write_shards(
    records: Iterable[bytes | dict[str, Any]],
    out_dir: str,
    *,
    num_shards: int = 1,
    prefix: str = "data",
    meta: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> list[str]:
    """Writes records round-robin into ``num_shards`` shards + ``meta.json``, atomically.

    Args:
      records: encoded records (bytes) or record dicts (encoded here).
      out_dir: target directory; replaced as a whole when it exists and ``overwrite``. On a
        bucket (``gs://``, ``s3://``) the data set is written locally and uploaded, ``meta.json``
        last; a bucket directory that already holds shards or ``meta.json`` is refused
        (``FileExistsError``): objects cannot be swapped in atomically.
      meta: data-set metadata; ``num_examples`` is filled in.
    Returns the shard paths.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    from umg_jax import storage

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if storage.is_remote(out_dir):
        return _upload_shards(records, out_dir, num_shards=num_shards, prefix=prefix, meta=meta)
    out = pathlib.Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        names = [f"{prefix}-{i:05d}-of-{num_shards:05d}{SHARD_SUFFIX}" for i in range(num_shards)]
        # group_size:1 -> each record is its own chunk group: true random access for Grain.
        writers = [ArrayRecordWriter(str(tmp / n), "group_size:1") for n in names]
        n = 0
        try:
            for rec in records:
                raw = rec if isinstance(rec, bytes) else encode_record(rec)
                writers[n % num_shards].write(raw)
                n += 1
        finally:
            for w in writers:
                w.close()
        if n == 0:
            raise ValueError(f"no records to write to {out}")
        meta = dict(meta or {})
        meta["num_examples"] = n
        meta["num_shards"] = num_shards
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it private; a data set is meant to be shared
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return [str(out / n) for n in names]


def check_bucket_target(out_dir: str) -> None:
    """For a bucket ``out_dir``: ``FileExistsError`` when it already holds a data set (shards or
    ``meta.json``), which :func:`write_shards` cannot replace atomically there. Local: nothing to
    check (a local data set is replaced by a rename)."""
    from umg_jax import storage

    if storage.is_remote(out_dir) and (
            shard_paths(out_dir) or (storage.path(out_dir) / META_FILE).exists()):
        raise FileExistsError(f"{out_dir} already holds a data set; objects on a bucket cannot be "
                              "replaced atomically: remove it first or choose another --out")


def _upload_shards(records: Iterable[bytes | dict[str, Any]], out_dir: str, *, num_shards: int,
                   prefix: str, meta: dict[str, Any] | None) -> list[str]:
    """:func:`write_shards` to a bucket directory: a local build, then the shards, then
    ``meta.json`` (a reader that waits for ``meta.json`` sees the whole set)."""
    from umg_jax import storage

    dst = storage.path(out_dir)
    check_bucket_target(out_dir)
    storage.check_writable_dir(dst)
    with tempfile.TemporaryDirectory(prefix="umg_shards_") as tmp:
        local = pathlib.Path(tmp) / "data"
        paths = write_shards(records, str(local), num_shards=num_shards, prefix=prefix,
                             meta=meta)
        storage.copy_tree(local, dst, last=META_FILE)
    return [str(dst / os.path.basename(p)) for p in paths]


def write_shard_file(records: Iterable[bytes | dict[str, Any]], path: str) -> int:
    """Writes one shard file atomically (temporary name, renamed when complete); returns the
    record count. For writers that add shards one by one (resumable jobs). ``path`` on a bucket:
    written locally, then uploaded as one object (an object appears whole or not at all)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from umg_jax import storage

    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="umg_shard_") as tmp:
            local = pathlib.Path(tmp) / os.path.basename(str(path))
            n = write_shard_file(records, str(local))
            if n:
                storage.write_bytes(path, local.read_bytes())
        return n
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    n = 0
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    try:
        for rec in records:
            writer.write(rec if isinstance(rec, bytes) else encode_record(rec))
            n += 1
    finally:
        writer.close()
    if n == 0:
        tmp.unlink(missing_ok=True)
        return 0
    tmp.rename(target)
    return n


def write_meta(directory: str, meta: dict[str, Any]) -> None:
    """Writes ``meta.json`` atomically (a local rename; one object write on a bucket)."""
    from umg_jax import storage

    if storage.is_remote(directory):
        storage.write_text(storage.path(directory) / META_FILE, json.dumps(meta, indent=1))
        return
    p = pathlib.Path(directory) / META_FILE
    tmp = p.with_name(f".{META_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.rename(p)


class RecordSource:
    """Random access over the records of several shards (a Grain ``RandomAccessDataSource``).

    ``source[i]`` -> encoded record bytes; ``len(source)`` -> total records.
    """

    def __init__(self, paths: Sequence[str]):
        if not paths:
            raise FileNotFoundError("RecordSource needs at least one shard path")
        import grain

        from umg_jax import storage

        self.paths = list(paths)
        remote = [p for p in self.paths if storage.is_remote(p)]
        if remote:  # one clear line instead of ArrayRecord's error on a URL
            storage.require_local(remote[0], "ArrayRecord shard", FUSE_HINT)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        return self._source[index]

    def __repr__(self) -> str:
        return f"RecordSource({len(self.paths)} shards, {len(self)} records)"


def iter_records(directory: str) -> Iterable[dict[str, Any]]:
    """Decoded records of a data set directory, in storage order (for tools and tests)."""
    src = RecordSource(shard_paths(directory))
    for i in range(len(src)):
        yield decode_record(src[i])
