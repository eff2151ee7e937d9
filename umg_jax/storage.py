"""Where files live: local paths, ``gs://`` and ``s3://`` buckets alike, through ``etils.epath``
(what orbax and grain use; gcsfs / s3fs underneath), with no URL handling of our own.

* ``path(p)``: an ``epath.Path`` (local paths made absolute; bucket URLs kept as they are).
* ``check_writable_dir`` / ``check_readable``: the checks a CLI runs before any compile; they
  raise :class:`StorageError` with one line naming the path and the fix (bucket missing, no
  credentials, unwritable directory, missing input).
* Whole-object reads and writes (``read_text`` ... ``write_json``; local writes are atomic),
  :class:`AppendLog` (an append-only log that also works where objects cannot be appended to),
  ``local_file`` / ``output_dir`` for libraries that need real files, ``copy_tree``.

Object stores have no directories and no append: a "directory" is a key prefix (nothing to
create; creating one on S3 via fsspec would even create the *bucket*), and opening an object in
append mode overwrites it. Against emulators (``STORAGE_EMULATOR_HOST`` for GCS,
``AWS_ENDPOINT_URL`` for S3) the same code runs unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from etils import epath

PathLike = str | os.PathLike

_REMOTE = ("gs://", "s3://")
_COPY_CHUNK = 16 << 20  # bytes per read when streaming a file between stores


class StorageError(RuntimeError):
    """A path that cannot be used; the message is one line naming the path (and the fix). CLIs
    print ``error: <message>`` and exit with status 2."""


def _setup_fsspec() -> None:
    """Process-wide fsspec settings for the bucket filesystems (before any is instantiated):

    * no directory-listing cache: tensorstore (orbax's array writer) and other processes write
      into the same prefixes behind gcsfs' / s3fs' back, and a cached listing then reports
      objects that exist as missing;
    * against a GCS emulator, no lookup of the bucket layout (a control-plane API the emulator
      lacks; gcsfs logs a credentials warning on every call otherwise)."""
    import fsspec.config

    for protocol in ("gcs", "gs", "s3"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    logging.getLogger("gcsfs").addFilter(_EmulatorNoise())


class _EmulatorNoise(logging.Filter):
    """Drops gcsfs' "Could not determine bucket type ... credentials" warnings, which an emulator
    always triggers (it has no storage-layout API) when gcsfs was imported before us."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (os.environ.get("STORAGE_EMULATOR_HOST")
                    and "bucket type" in record.getMessage())


_setup_fsspec()


# ------------------------------------------------------------------------------ paths ---


def is_remote(p: PathLike) -> bool:
    """Whether ``p`` is a bucket URL (``gs://`` or ``s3://``)."""
    return os.fspath(p).startswith(_REMOTE)


def path(p: PathLike) -> epath.Path:
    """``p`` as an ``epath.Path``: bucket URLs as they are, local paths absolute (``~``
    expanded). Any other ``scheme://`` is a :class:`StorageError` (it would otherwise become a
    local folder named ``scheme:``)."""
    s = os.fspath(p)
    if is_remote(s):
        return epath.Path(s)
    if "://" in s:
        raise StorageError(f"{s}: only local paths, gs:// and s3:// are supported")
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def require_local(p: PathLike, what: str, hint: str) -> pathlib.Path:
    """``p`` as an absolute local ``pathlib.Path``; a :class:`StorageError`
    ``"<what> <p> is a bucket path; <hint>"`` for ``gs://`` / ``s3://``."""
    if is_remote(p):
        raise StorageError(f"{what} {os.fspath(p)} is a bucket path; {hint}")
    return pathlib.Path(path(p))


def _bucket(p: PathLike) -> str:
    """``gs://bucket`` of ``gs://bucket/a/b``."""
    scheme, rest = os.fspath(p).split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


# ------------------------------------------------------------------------------ checks ---


def _check_credentials(p: PathLike) -> None:
    """StorageError when the client library would find no credentials for ``p``'s store.
    Emulators (``STORAGE_EMULATOR_HOST``) need none for GCS; S3 servers (and moto) always do."""
    s = os.fspath(p)
    if s.startswith("gs://"):
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return
        import google.auth
        import google.auth.exceptions

        try:
            google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError:
            raise StorageError(
                f"no Google Cloud credentials for {s}: run `gcloud auth application-default "
                "login` or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key (a TPU or "
                "GCE VM uses its service account)") from None
    elif s.startswith("s3://"):
        import botocore.session

        if botocore.session.get_session().get_credentials() is None:
            raise StorageError(
                f"no AWS credentials for {s}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or run where an instance role provides them")


def _check_bucket(p: PathLike) -> None:
    bucket = _bucket(p)
    try:
        found = epath.Path(bucket).exists()
    except PermissionError as e:
        raise StorageError(f"no access to bucket {bucket} ({os.fspath(p)}): {_short(e)}") from None
    if not found:
        raise StorageError(f"bucket {bucket} does not exist (or these credentials cannot see it): "
                           f"create it or fix the path {os.fspath(p)}")


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200]}" if msg else type(e).__name__


def check_writable_dir(p: PathLike) -> epath.Path:
    """Makes sure ``p`` can hold a run's files: creates it (local; bucket prefixes need nothing)
    and writes then deletes a probe object. Returns ``path(p)``.

    Raises :class:`StorageError` for: a bucket that does not exist, missing credentials, a
    directory that cannot be created or written."""
    ep = path(p)
    if is_remote(ep):
        _check_credentials(ep)
        _check_bucket(ep)
    else:
        try:
            ep.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create directory {ep}: {_short(e)}; choose a writable "
                               "path") from None
    probe = ep / f".write-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except FileNotFoundError as e:  # the bucket vanished, or a local dir that cannot hold files
        raise StorageError(f"cannot write into {ep}: {_short(e)}") from None
    except OSError as e:
        raise StorageError(f"directory {ep} is not writable: {_short(e)}; choose a writable path "
                           "or fix its permissions") from None
    return ep


def check_readable(p: PathLike, what: str) -> epath.Path:
    """``path(p)`` when it exists; else :class:`StorageError` ``"<what> <p> does not exist"``
    (or: the bucket does not exist / no credentials)."""
    ep = path(p)
    if is_remote(ep):
        _check_credentials(ep)
        _check_bucket(ep)
    try:
        found = ep.exists()
    except PermissionError as e:
        raise StorageError(f"{what} {ep}: no access ({_short(e)})") from None
    if not found:
        raise StorageError(f"{what} {ep} does not exist")
    return ep


def check_bucket_source(p: PathLike, what: str = "run directory") -> None:
    """For a ``gs://`` / ``s3://`` ``p``: :func:`check_readable` (bucket, credentials, the path
    itself), before anything is read, since the clients would raise their own errors deep in a
    listing. Local paths: nothing (the readers' own messages name what is missing)."""
    if is_remote(p):
        check_readable(p, what)


# ------------------------------------------------------------------ whole-file reads / writes ---


def read_text(p: PathLike) -> str:
    """The file's text (UTF-8); ``FileNotFoundError`` when missing."""
    return path(p).read_text(encoding="utf-8")


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes the whole file / object. Local: atomically (temporary file + rename in the same
    directory; the parent is created); remote: one object upload (atomic by itself)."""
    ep = path(p)
    if is_remote(ep):
        ep.write_bytes(data)
        return
    parent = pathlib.Path(ep).parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{ep.name}.{uuid.uuid4().hex}.tmp"  # not mkstemp: that one is mode 0600
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, ep)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(p: PathLike, text: str) -> None:
    """:func:`write_bytes` of ``text`` as UTF-8."""
    write_bytes(p, text.encode("utf-8"))


def read_json(p: PathLike) -> Any:
    return json.loads(read_text(p))


def write_json(p: PathLike, obj: Any, indent: int = 2) -> None:
    write_text(p, json.dumps(obj, indent=indent) + "\n")


class AppendLog:
    """An append-only text file that also works on object stores.

    Local: a real file opened for appending. Remote (no append on object stores): the existing
    object is read once at open and kept in memory; ``flush()`` rewrites the whole object, so
    what was written before (earlier runs of a resumed job) is kept. Text reaches a bucket only on
    ``flush()`` / ``close()``. ``durable``: a local ``flush()`` also fsyncs (what survives a
    crash of the machine, not only of the process).
    """

    def __init__(self, p: PathLike, durable: bool = False):
        self.path = path(p)
        self._durable = durable
        self._remote = is_remote(self.path)
        self._file = None
        self._text = ""
        self._dirty = False
        if self._remote:
            with contextlib.suppress(FileNotFoundError):
                self._text = self.path.read_text(encoding="utf-8")
        else:
            pathlib.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
        elif self._remote:
            self._text += text
            self._dirty = True
        else:
            raise ValueError(f"write to closed AppendLog {self.path}")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self._durable:
                os.fsync(self._file.fileno())
        elif self._dirty:
            self.path.write_text(self._text, encoding="utf-8")
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._remote = False  # closed: further writes raise

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------- real files for libraries ---


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[pathlib.Path]:
    """A local path holding ``p``'s bytes, for libraries that need a real file (sentencepiece,
    safetensors, PIL): ``p`` itself when local, a temporary copy (same file name) when remote,
    removed afterwards. ``FileNotFoundError`` when ``p`` does not exist."""
    ep = path(p)
    if not is_remote(ep):
        yield pathlib.Path(ep)
        return
    with tempfile.TemporaryDirectory(prefix="umg-jax-") as d:
        dst = pathlib.Path(d) / ep.name
        _copy_file(ep, epath.Path(dst))
        yield dst


@contextlib.contextmanager
def output_dir(p: PathLike) -> Iterator[pathlib.Path]:
    """A local directory to write ``p``'s contents into: ``p`` itself when local (created); a
    temporary directory when remote, uploaded to ``p`` (:func:`copy_tree`) only when the block
    exits without an exception."""
    ep = path(p)
    if not is_remote(ep):
        pathlib.Path(ep).mkdir(parents=True, exist_ok=True)
        yield pathlib.Path(ep)
        return
    with tempfile.TemporaryDirectory(prefix="umg-jax-") as d:
        yield pathlib.Path(d)
        copy_tree(d, ep)


def _copy_file(src: epath.Path, dst: epath.Path) -> None:
    if not is_remote(dst):
        pathlib.Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)


def copy_tree(src: PathLike, dst: PathLike, last: str | None = None) -> None:
    """Copies every file under ``src`` to the same relative path under ``dst`` (any two of local,
    gs://, s3://); existing files are overwritten. ``last``: the name of a top-level entry copied
    after all the others (the index file, e.g. ``meta.json``, whose presence tells readers that
    the set is complete: uploads are not atomic as a whole). ``FileNotFoundError`` when ``src``
    is not a directory."""
    s, d = path(src), path(dst)
    if not s.is_dir():
        raise FileNotFoundError(f"{s} is not a directory")
    if not is_remote(d):
        pathlib.Path(d).mkdir(parents=True, exist_ok=True)
    for child in sorted(s.iterdir(), key=lambda c: c.name == last):
        if child.is_dir():
            copy_tree(child, d / child.name)
        else:
            _copy_file(child, d / child.name)
