"""TFRecord files and ``tf.train.Example`` protos without TensorFlow (TFDS's default format).

A TFRecord file is a sequence of ``uint64 length | uint32 masked crc32c(length) | data |
uint32 masked crc32c(data)`` (little endian). :func:`index` scans the headers once (12 bytes
read and a seek per record) so records can be read in any order from threads; the CRCs are not
verified (pure-Python CRC32C would take longer than the evaluation), but a length that runs past
the end of the file or a proto that does not parse is an error naming the file.

``tf.train.Example`` (tensorflow/core/example/{example,feature}.proto): ``Example{features=1}``,
``Features{map<string, Feature> feature=1}``, ``Feature{oneof: BytesList bytes_list=1,
FloatList float_list=2, Int64List int64_list=3}``, each list ``repeated value=1`` (numbers packed
or not). :func:`parse_example` decodes that wire format into ``{key: list}``.
"""

from __future__ import annotations

import pathlib
import struct
from typing import Any


class TFRecordError(ValueError):
    """A TFRecord file or Example proto that cannot be read (names the file)."""


def index(path: str | pathlib.Path) -> list[tuple[int, int]]:
    """``(data offset, data length)`` of every record of one file, in order."""
    out = []
    size = pathlib.Path(path).stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                raise TFRecordError(f"{path}: truncated record header at byte {pos}")
            (n,) = struct.unpack("<Q", head[:8])
            if pos + 12 + n + 4 > size:
                raise TFRecordError(f"{path}: record at byte {pos} claims {n} bytes, past the "
                                    "end of the file (truncated or not a TFRecord file)")
            out.append((pos + 12, n))
            pos += 12 + n + 4
            f.seek(pos)
    return out


def read(path: str | pathlib.Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise TFRecordError("varint runs past the end of the message")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise TFRecordError("varint longer than 64 bits")


def _fields(buf: bytes):
    """``(field number, wire type, value)`` of a message: ints for varints, bytes for
    length-delimited, raw bytes for fixed32 / fixed64."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise TFRecordError("length-delimited field runs past the end of the message")
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        else:
            raise TFRecordError(f"unsupported wire type {wt}")
        yield num, wt, v


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf: bytes) -> list[Any]:
    for kind, _, lst in _fields(buf):
        vals: list[Any] = []
        for num, wt, v in _fields(lst):
            if num != 1:
                continue
            if kind == 1:  # bytes
                vals.append(bytes(v))
            elif kind == 2:  # float: packed (wt 2) or one fixed32 (wt 5) each, 4 bytes apiece
                vals.extend(struct.unpack(f"<{len(v) // 4}f", v))
            elif kind == 3:  # int64: packed varints or one varint each
                if wt == 2:
                    j = 0
                    while j < len(v):
                        x, j = _varint(v, j)
                        vals.append(_signed64(x))
                else:
                    vals.append(_signed64(v))
        return vals
    return []  # an empty Feature


def parse_example(buf: bytes) -> dict[str, list[Any]]:
    """A serialized ``tf.train.Example`` -> ``{feature key: list of bytes / float / int}``."""
    out: dict[str, list[Any]] = {}
    for num, wt, features in _fields(buf):
        if num != 1 or wt != 2:
            continue
        for fnum, fwt, entry in _fields(features):
            if fnum != 1 or fwt != 2:
                continue
            key, value = None, b""
            for enum, _, ev in _fields(entry):
                if enum == 1:
                    key = bytes(ev).decode("utf-8")
                elif enum == 2:
                    value = ev
            if key is None:
                raise TFRecordError("map entry without a key")
            out[key] = _feature(value)
    return out
