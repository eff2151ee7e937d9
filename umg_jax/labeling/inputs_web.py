"""Web-scale image-text inputs of the labelling tools: WebDataset tar shards and Parquet files.

Two layouts sit beside image folders and record shards (``pseudo_label.list_inputs`` picks one
from the files in ``--images``):

``*.tar``      WebDataset shards as img2dataset writes them: per key ``KEY.jpg`` (or ``.jpeg``,
               ``.png``, ``.webp``), optional ``KEY.txt`` (the caption) and ``KEY.json``. Input
               id ``SHARD.tar/KEY`` (the shard's path relative to ``--images``).
``*.parquet``  one row per image: an image-bytes column (binary, or a ``{bytes, path}`` struct
               as Hugging Face ``datasets`` writes it) named one of :data:`IMAGE_COLUMNS`, and an
               optional caption column (:data:`CAPTION_COLUMNS`). Input id ``FILE.parquet/ROW``.

An item records where its bytes lie (a tar member's offset and size; a Parquet row group and
row), so loading one image reads only that image. A member whose bytes are no image fails in
:func:`load_web` with one of ``pseudo_label.INPUT_ERRORS`` and is skipped and counted like an
unreadable file; a tar that stops parsing part-way gives one ``("error", ...)`` item for the
rest of it, counted the same way. pyarrow is imported only for Parquet inputs.
"""

from __future__ import annotations

import functools
import io
import pathlib
import tarfile

import numpy as np

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_COLUMNS = ("jpg", "image", "img", "png", "webp", "image_bytes", "bytes")
CAPTION_COLUMNS = ("caption", "txt", "text")


def web_files(p: pathlib.Path) -> tuple[str, list[pathlib.Path]] | None:
    """``("tar" | "parquet", files)`` when ``p`` is such a file or a folder holding such files
    (recursive, sorted); None otherwise. A folder holding both is an error."""
    if p.is_file():
        kind = {".tar": "tar", ".parquet": "parquet"}.get(p.suffix.lower())
        return (kind, [p]) if kind else None
    tars = sorted(f for f in p.rglob("*.tar") if f.is_file())
    pqs = sorted(f for f in p.rglob("*.parquet") if f.is_file())
    if tars and pqs:
        raise ValueError(f"--images {p}: holds both .tar and .parquet files; pass one layout")
    if tars:
        return "tar", tars
    return ("parquet", pqs) if pqs else None


def _rel(f: pathlib.Path, root: pathlib.Path) -> str:
    return f.name if root.is_file() else str(f.relative_to(root))


def _nonzero_after(f: pathlib.Path, offset: int) -> bool:
    with open(f, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return True
    return False


def _tar_items(f: pathlib.Path, name: str) -> list[tuple[str, tuple]]:
    """One item per key holding an image: ``("tar", path, (offset, size), caption member or
    None)``; a tar that stops parsing adds an error item for the rest."""
    keys: dict[str, dict[str, tuple[int, int]]] = {}
    error = None
    try:
        with tarfile.open(f, "r:") as t:
            for m in t:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = m.name[: len(m.name) - len(base)] + stem
                keys.setdefault(key, {})["." + ext.lower()] = (m.offset_data, m.size)
            end = t.offset  # where parsing stopped: past it only the end-of-archive zeros
        if _nonzero_after(f, end):  # tarfile ends silently at a torn header
            error = f"ReadError: unparsable data after byte {end}"
    except (tarfile.TarError, OSError, EOFError) as e:  # torn or garbled: keep what parsed
        error = f"{type(e).__name__}: {e}"
    items = []
    for key, members in keys.items():
        img = next((members[e] for e in IMAGE_EXT if e in members), None)
        if img is not None:
            items.append((f"{name}/{key}", ("tar", str(f), img, members.get(".txt"))))
    if error is not None:
        items.append((f"{name}/<after {len(keys)} keys>",
                      ("error", f"{name}: {error}", None, None)))
    return items


def _columns(schema, f) -> tuple[str, str | None]:
    names = list(schema.names)
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    if image is None:
        raise ValueError(f"{f}: no image column (one of {', '.join(IMAGE_COLUMNS)}) among "
                         f"{names}")
    return image, next((c for c in CAPTION_COLUMNS if c in names), None)


def _parquet_items(f: pathlib.Path, name: str) -> list[tuple[str, tuple]]:
    import pyarrow.parquet as pq

    md = pq.ParquetFile(f).metadata
    _columns(md.schema.to_arrow_schema(), f)  # a file without an image column fails at listing
    items, row = [], 0
    for g in range(md.num_row_groups):
        for r in range(md.row_group(g).num_rows):
            items.append((f"{name}/{row}", ("parquet", str(f), (g, r), None)))
            row += 1
    return items


def list_web_inputs(root: pathlib.Path, kind: str,
                    files: list[pathlib.Path]) -> list[tuple[str, tuple]]:
    """``(id, item)`` of every image of ``files`` (a :func:`web_files` answer), in file order
    then member / row order (deterministic: the shards of the annotate run depend on it)."""
    lister = _tar_items if kind == "tar" else _parquet_items
    return [it for f in files for it in lister(f, _rel(f, root))]


def _read(path: str, span: tuple[int, int]) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(span[0])
        data = fh.read(span[1])
    if len(data) != span[1]:
        raise EOFError(f"{path}: member truncated ({len(data)} of {span[1]} bytes)")
    return data


@functools.lru_cache(maxsize=2)
def _row_group(path: str, group: int) -> tuple[list, list | None]:
    """The image and caption columns of one row group (consecutive rows share it)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    image, cap = _columns(pf.schema_arrow, path)
    t = pf.read_row_group(group, columns=[image] + ([cap] if cap else []))
    return t.column(image).to_pylist(), (t.column(cap).to_pylist() if cap else None)


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def load_web(item: tuple) -> tuple[np.ndarray, bytes, list[str], str | None]:
    """``(image [H, W, 3] uint8, encoded bytes, captions, None)`` of a web item; one of
    ``pseudo_label.INPUT_ERRORS`` for an unreadable one."""
    kind, path, where, cap = item
    if kind == "error":
        raise ValueError(f"unreadable tar {path}")
    if kind == "tar":
        data = _read(path, where)
        text = _read(path, cap).decode("utf-8", "replace").strip() if cap else ""
    else:
        images, caps = _row_group(path, where[0])
        data, text = images[where[1]], (caps[where[1]] if caps else None) or ""
        if isinstance(data, dict):  # Hugging Face datasets' Image feature
            data = data.get("bytes")
        if not isinstance(data, bytes | bytearray) or not data:
            raise ValueError(f"{path} row group {where[0]} row {where[1]}: no image bytes")
        data, text = bytes(data), str(text).strip()
    return _decode(data), data, [text] if text else [], None
