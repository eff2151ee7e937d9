"""Reads collective traffic out of a compiled (SPMD-partitioned) HLO module's text.

Ops inside ``while`` bodies are counted ``known_trip_count`` times (scanned layers, chunked loss
loops); ops in called computations (fusions, calls, conditionals) once per call site.
"""

from __future__ import annotations

import collections
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
                "pred": 1, "s64": 8, "u64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(")
_OP = re.compile(r"=\s*(.*?)\s+([a-z\-]+)\(")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLEE = re.compile(r"(?:body|calls|to_apply|branch_computations|true_computation|"
                     r"false_computation)=\{?%([\w.\-]+)")


def shape_bytes(type_str: str) -> int:
    """Bytes of every array in an HLO result type such as ``(f32[8,64]{1,0}, bf16[2])``."""
    total = 0
    for dtype, dims in _SHAPE.findall(type_str):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in text.splitlines():
        s = line.strip()
        m = _COMP_HEAD.match(s)
        if m and s.endswith("{"):
            current = m.group(1)
            comps[current] = []
            if s.startswith("ENTRY"):
                entry = current
        elif s == "}":
            current = None
        elif current is not None:
            comps[current].append(s)
    return comps, entry


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """``{collective kind: result bytes per device per step}`` (async ``-start`` ops included,
    ``-done`` ops not double counted)."""
    comps, entry = _computations(hlo_text)
    memo: dict[str, collections.Counter] = {}

    def visit(name: str, depth: int = 0) -> collections.Counter:
        if name in memo:
            return memo[name]
        out: collections.Counter = collections.Counter()
        memo[name] = out  # guards against cycles
        for s in comps.get(name, []):
            m = _OP.search(s)
            if m:
                rtype, op = m.group(1), m.group(2)
                base = op[:-6] if op.endswith("-start") else op
                if base in COLLECTIVES and not op.endswith("-done"):
                    out[base] += shape_bytes(rtype)
            mult = 1
            t = _TRIP.search(s)
            if t and " while(" in s:
                mult = int(t.group(1))
            for callee in _CALLEE.findall(s):
                if callee in comps and depth < 50:
                    for k, v in visit(callee, depth + 1).items():
                        out[k] += mult * v
        return out

    if entry is None:
        return {}
    return dict(visit(entry))
