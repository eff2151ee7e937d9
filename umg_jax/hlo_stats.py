"""Per-step costs read out of a compiled (SPMD-partitioned) HLO module's text: matmul FLOPs, HBM
bytes accessed and collective traffic, per device, with loops counted as often as they run.

Why not ``compiled.cost_analysis()``: XLA's cost analysis counts a ``while`` body once, so a
scanned 24-layer tower (``model.scan``) and the chunked contrastive loss are undercounted by
their trip counts (ViT-L at 32k: 14.8 compiled vs 143.8 analytic TFLOP per device). Here every
instruction is weighted by the trip counts of the loops around it. The TPU compiler does not
annotate ``known_trip_count``: the count is read from the loop condition (``i < N`` against a
constant, how ``lax.scan`` / ``fori_loop`` lower); a loop whose count cannot be read counts once
and is reported in ``unknown_trip_counts``.

- FLOPs: ``dot`` and ``convolution`` (the TPU compiler writes matmuls as convolutions) with
  XLA's own formula (valid kernel positions per spatial dimension, group counts); elementwise
  work is not counted (model FLOPs are matmuls). Pallas kernels (``tpu_custom_call``, e.g. the
  flash attention) count with the ``cost_estimate`` they carry (FLOPs and bytes accessed).
  GPU library calls count from their operand shapes and backend config: cuBLAS GEMMs
  (``__cublas$gemm``, ``__cublas$lt$matmul*``) as ``2 x batch x M x N x K`` from the config's dot
  dimension numbers; cuDNN convolutions (``__cudnn$conv*``, forward and both gradients) with the
  convolution formula on the forward shapes; cuDNN fused attention (``__cudnn$fmha*``) as its
  GEMMs, ``2 x B x H x Nq x Nk x Dh`` each: the forward's two (``Q K^T``, ``P V``), the
  backward's four gradient GEMMs plus the ``Q K^T`` a flash backward recomputes. A causal or
  padding mask is counted as the full product, as XLA's own attention computes it.
- Bytes accessed: operands + result of every instruction that runs on its own (fusions count at
  their call site, as XLA's cost analysis does, so traffic inside a fusion is not counted; an
  operand a fusion only slices counts as its slices, an in-place dynamic-update-slice as its
  update);
  arrays the TPU compiler placed in on-chip memory (layout ``S(1)`` / ``S(2)``) are not HBM
  traffic and are skipped. A cuBLAS / cuDNN call reads its operands and writes its results, less
  the scratch workspace it returns last (``s8`` / ``u8``: not traffic of the model).
- Collectives: result bytes per kind (async ``-start`` ops included, ``-done`` not double
  counted), and an interconnect traffic estimate: all-gather / permute / all-to-all move their
  result, reduce-scatter its operand, all-reduce twice its size (reduce-scatter + all-gather).
  A collective inside a fusion (the TPU compiler's async collective fusions, which spread one
  collective over the iterations of the loop it overlaps) counts once per program.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
                "pred": 1, "s64": 8, "u64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1,
                "s4": 1, "u4": 1, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_COMP_HEAD = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(")
_INSTR = re.compile(r"^(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OPERAND = re.compile(r"%([\w.\-]+)")
# Pallas kernels carry their own cost in the custom call's backend config.
_COST_ESTIMATE = re.compile(r'"cost_estimate":\{"flops":"(\d+)"[^}]*?"bytes_accessed":"(\d+)"')
# Ops that move no data of their own (views, bookkeeping) or whose cost is their callees'.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
         "add-dependency", "get-dimension-size", "domain"}


def shape_bytes(type_str: str, hbm_only: bool = False) -> int:
    """Bytes of every array in an HLO result type such as ``(f32[8,64]{1,0}, bf16[2])``.
    ``hbm_only``: skip arrays whose layout puts them in another memory space (``S(1)``: the TPU's
    on-chip VMEM, ``S(2)``: SMEM), which are not HBM traffic."""
    total = 0
    for dtype, dims, layout in _SHAPE.findall(type_str):
        if dtype not in _DTYPE_BYTES:
            continue
        if hbm_only and layout:
            space = _MEMORY_SPACE.search(layout)
            if space and space.group(1) != "0":
                continue
        total += math.prod(int(d) for d in filter(None, dims.split(","))) * _DTYPE_BYTES[dtype]
    return total


def _dims(type_str: str) -> tuple[int, ...]:
    m = _SHAPE.search(type_str)
    return tuple(int(d) for d in filter(None, m.group(2).split(","))) if m else ()


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    op: str
    operands: list[str]
    attrs: str
    line: str


def _split_args(rest: str) -> tuple[str, str]:
    """``"a, b), attr=..."`` -> (``"a, b"``, ``"attr=..."``): the operand list up to its closing
    parenthesis (nested parentheses in operand types are skipped)."""
    depth = 1
    for i, ch in enumerate(rest):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return rest[:i], rest[i + 1:]
    return rest, ""


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str | None]:
    """``({computation: [Instr]}, entry name)`` of an HLO module's text."""
    comps: dict[str, list[Instr]] = {}
    entry = None
    current = None
    for line in text.splitlines():
        s = line.strip()
        m = _COMP_HEAD.match(s)
        if m and s.endswith("{") and " = " not in s.split("(")[0]:
            current = m.group(1)
            comps[current] = []
            if s.startswith("ENTRY"):
                entry = current
            continue
        if s == "}":
            current = None
            continue
        if current is None:
            continue
        m = _INSTR.match(s)
        if m:
            args, attrs = _split_args(m.group(4))
            comps[current].append(Instr(m.group(1), m.group(2), m.group(3),
                                        _OPERAND.findall(args), attrs, s))
    return comps, entry


def _callees(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{?([^}]*?)\}?(?:,\s|$)", attrs)
    if not m:
        return []
    return _OPERAND.findall(m.group(1)) or [x.strip().lstrip("%") for x in m.group(1).split(",")]


def trip_count(instr: Instr, comps: dict[str, list[Instr]]) -> int | None:
    """Iterations of a ``while``: its ``known_trip_count``, else the constant ``N`` of an
    ``i < N`` loop condition (loops from ``lax.scan`` / ``fori_loop`` count from 0 by 1)."""
    t = _TRIP.search(instr.attrs)
    if t:
        return int(t.group(1))
    cond = _callees(instr.attrs, "condition")
    body = comps.get(cond[0]) if cond else None
    if not body:
        return None
    consts = {}
    for i in body:
        if i.op == "constant" and i.type.startswith(("s32[]", "s64[]", "u32[]")):
            m = re.search(r"constant\((-?\d+)\)", i.line)
            if m:
                consts[i.name] = int(m.group(1))
    for i in body:
        if i.op == "compare" and "direction=LT" in i.attrs and len(i.operands) == 2:
            if i.operands[1] in consts:
                return max(consts[i.operands[1]], 0)
    return None


def _window(attrs: str, n: int) -> dict[str, list]:
    """Per-spatial-dimension window attributes of a convolution (defaults when absent)."""
    out = {"size": [1] * n, "stride": [1] * n, "pad": [(0, 0)] * n, "lhs_dilate": [1] * n,
           "rhs_dilate": [1] * n}
    m = re.search(r"window=\{([^}]*)\}", attrs)
    if not m:
        return out
    for part in m.group(1).split():
        key, _, val = part.partition("=")
        if key == "pad":
            out["pad"] = [tuple(int(x) for x in p.split("_")) for p in val.split("x")]
        elif key in out:
            out[key] = [int(x) for x in val.split("x")]
    return out


def _valid_positions(in_size: int, k_size: int, out_size: int, stride: int, pad_lo: int,
                     lhs_dil: int, rhs_dil: int) -> int:
    """(output, kernel) position pairs of one spatial dimension that read a real input element
    (not padding, not a dilation hole): XLA's count for convolution FLOPs."""
    o = np.arange(out_size)[:, None]
    k = np.arange(k_size)[None, :]
    idx = o * stride - pad_lo + k * rhs_dil
    ok = (idx >= 0) & (idx % lhs_dil == 0) & (idx // lhs_dil < in_size)
    return int(ok.sum())


def conv_flops(instr: Instr, types: dict[str, str]) -> float:
    """FLOPs (2 per multiply-add) of a ``convolution`` instruction."""
    m = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", instr.attrs)
    if not m or len(instr.operands) < 2:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    lhs, rhs = (_dims(types.get(o, "")) for o in instr.operands[:2])
    out = _dims(instr.type)
    if len(lhs) != len(lhs_l) or len(rhs) != len(rhs_l) or len(out) != len(out_l):
        return 0.0
    spatial = sorted(c for c in lhs_l if c.isdigit())
    win = _window(instr.attrs, len(spatial))
    valid = 1
    for j, c in enumerate(spatial):
        valid *= _valid_positions(lhs[lhs_l.index(c)], rhs[rhs_l.index(c)], out[out_l.index(c)],
                                  win["stride"][j], win["pad"][j][0], win["lhs_dilate"][j],
                                  win["rhs_dilate"][j])
    fgc = int((re.search(r"feature_group_count=(\d+)", instr.attrs) or [0, 1])[1])
    bgc = int((re.search(r"batch_group_count=(\d+)", instr.attrs) or [0, 1])[1])
    fma = (lhs[lhs_l.index("f")] // fgc) * out[out_l.index("f")] * (lhs[lhs_l.index("b")] // bgc)
    return 2.0 * fma * valid


def gemm_flops(lhs: tuple[int, ...], rhs: tuple[int, ...], lhs_contracting, rhs_contracting,
               lhs_batch=(), rhs_batch=()) -> float:
    """FLOPs (2 per multiply-add) of a general matrix product of arrays of shapes ``lhs`` and
    ``rhs``: batch x M x N x K, M / N the dimensions of each side that are neither batch nor
    contracting."""
    fixed_l, fixed_r = set(lhs_contracting) | set(lhs_batch), set(rhs_contracting) | set(rhs_batch)
    batch = math.prod(lhs[d] for d in lhs_batch)
    k = math.prod(lhs[d] for d in lhs_contracting)
    m = math.prod(n for d, n in enumerate(lhs) if d not in fixed_l)
    n = math.prod(n for d, n in enumerate(rhs) if d not in fixed_r)
    return 2.0 * batch * m * n * k


def _json_ints(text: str, key: str) -> list[int]:
    """The integers of the list ``"key": ["1", "2"]`` in a backend config (JSON, numbers as
    strings); [] if absent."""
    m = re.search(rf'"{key}":\s*\[([^\]]*)\]', text)
    return [int(x.strip().strip('"')) for x in m.group(1).split(",") if x.strip()] if m else []


def _result_arrays(type_str: str) -> list[tuple[str, tuple[int, ...], str]]:
    """``(dtype, dims, text)`` of each array of a result type, a library call's trailing scratch
    workspace (``s8`` / ``u8`` after the real results) removed."""
    arrays = [(d, tuple(int(x) for x in filter(None, dims.split(","))), f"{d}[{dims}]{lay}")
              for d, dims, lay in _SHAPE.findall(type_str)]
    if len(arrays) > 1 and arrays[-1][0] in ("s8", "u8"):
        arrays = arrays[:-1]
    return arrays


def _cublas_flops(instr: Instr, types: dict[str, str]) -> float:
    cfg = instr.attrs[instr.attrs.find('"dot_dimension_numbers"'):]
    lhs, rhs = (_dims(types.get(o, "")) for o in instr.operands[:2])
    return gemm_flops(lhs, rhs, _json_ints(cfg, "lhs_contracting_dimensions"),
                      _json_ints(cfg, "rhs_contracting_dimensions"),
                      _json_ints(cfg, "lhs_batch_dimensions"),
                      _json_ints(cfg, "rhs_batch_dimensions"))


def _cudnn_conv_flops(target: str, instr: Instr, types: dict[str, str]) -> float:
    """A cuDNN convolution carries the forward convolution's window and dim labels; its
    gradients swap which array is an operand and which the result."""
    res = _result_arrays(instr.type)
    if len(instr.operands) < 2 or not res:
        return 0.0
    a, b, out = types.get(instr.operands[0], ""), types.get(instr.operands[1], ""), res[0][2]
    if target.endswith("BackwardInput"):  # (d output, filter) -> d input
        lhs, rhs, out = out, b, a
    elif target.endswith("BackwardFilter"):  # (input, d output) -> d filter
        lhs, rhs, out = a, out, b
    else:  # forward (with a fused bias / activation / side input after the two)
        lhs, rhs = a, b
    fwd = Instr(instr.name, out, "convolution", ["lhs", "rhs"], instr.attrs, instr.line)
    return conv_flops(fwd, {"lhs": lhs, "rhs": rhs})


def _cudnn_fmha_flops(target: str, instr: Instr, types: dict[str, str]) -> float:
    """cuDNN fused attention: operands ``Q [B, Nq, H, Dh], K, V [B, Nk, H, Dv]`` first (JAX's
    BTNH layout), the scores' shape ``[B, H, Nq, Nk]`` in the config."""
    m = re.search(r'"intermediate_tensor_shape":\s*\{[^{}]*?"dimensions":\s*\[([^\]]*)\]',
                  instr.attrs)
    if not m or len(instr.operands) < 3:
        return 0.0
    scores = math.prod(int(x.strip().strip('"')) for x in m.group(1).split(",") if x.strip())
    dqk = (_dims(types.get(instr.operands[0], "")) or (0,))[-1]
    dv = (_dims(types.get(instr.operands[2], "")) or (0,))[-1]
    if "Backward" not in target:
        return 2.0 * scores * (dqk + dv)  # Q K^T, P V
    # dQ = dS K, dK = dS^T Q (Dh); dP = dO V^T, dV = P^T dO (Dv); flash recomputes S = Q K^T
    recompute = dqk if re.search(r'"is_flash_attention":\s*true', instr.attrs) else 0
    return 2.0 * scores * (2 * dqk + 2 * dv + recompute)


def library_call_cost(instr: Instr, types: dict[str, str]) -> tuple[float, float] | None:
    """``(FLOPs, HBM bytes)`` of a cuBLAS or cuDNN custom call (see the module docstring), None
    for any other instruction. Bytes: operands + results, the scratch workspace excluded."""
    if instr.op != "custom-call":
        return None
    m = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
    target = m.group(1) if m else ""
    if target.startswith("__cublas$") and '"dot_dimension_numbers"' in instr.attrs:
        flops = _cublas_flops(instr, types)
    elif target.startswith("__cudnn$conv"):
        flops = _cudnn_conv_flops(target, instr, types)
    elif target.startswith("__cudnn$fmha"):
        flops = _cudnn_fmha_flops(target, instr, types)
    else:
        return None
    nbytes = (sum(shape_bytes(a[2], True) for a in _result_arrays(instr.type))
              + sum(shape_bytes(types.get(o, ""), True) for o in instr.operands))
    return flops, float(nbytes)


# Custom-call targets of fused attention kernels: TPU Pallas kernels (the flash attention is the
# project's only Pallas call) and cuDNN's fused attention (forward and backward).
FUSED_ATTENTION_TARGETS = ("tpu_custom_call", "__cudnn$fmha")


def fused_attention_calls(custom_calls: dict[str, float]) -> dict[str, int]:
    """``{target: count}`` of the fused attention kernels among ``program_costs``'
    ``custom_calls`` (per step, loops weighted); empty when attention ran on XLA's ops."""
    return {t: int(n) for t, n in sorted(custom_calls.items())
            if t.startswith(FUSED_ATTENTION_TARGETS) and n}


def attention_kernel(custom_calls: dict[str, float]) -> str:
    """Which attention implementation a compiled program ran, from its custom calls:
    ``"cudnn"`` (cuDNN fused attention), ``"pallas_flash"`` (a TPU Pallas kernel) or ``"xla"``
    (neither: XLA's own ops; on the CPU also the hand-written VJP)."""
    calls = fused_attention_calls(custom_calls)
    if any(t.startswith("__cudnn$fmha") for t in calls):
        return "cudnn"
    if "tpu_custom_call" in calls:
        return "pallas_flash"
    return "xla"


def dot_flops(instr: Instr, types: dict[str, str]) -> float:
    """FLOPs of a ``dot``: 2 x result elements x contracted size."""
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
    lhs = _dims(types.get(instr.operands[0], "")) if instr.operands else ()
    contracted = math.prod(lhs[int(d)] for d in filter(None, m.group(1).split(","))) if m and lhs \
        else 1
    return 2.0 * math.prod(_dims(instr.type)) * contracted


_SLICES = ("slice", "dynamic-slice")


def _users(instrs: list[Instr]) -> dict[str, list[tuple[Instr, int]]]:
    out: dict[str, list[tuple[Instr, int]]] = collections.defaultdict(list)
    for i in instrs:
        for pos, o in enumerate(i.operands):
            out[o].append((i, pos))
    return out


# Ops that read each input element once into an output of the same shape (a slice taken after
# them reads only the sliced part of their input).
_PASS_THROUGH = ("bitcast", "reshape", "convert", "copy", "negate", "exponential", "tanh",
                 "multiply", "add", "subtract", "divide")


def _elements(type_str: str) -> int:
    return math.prod(_dims(type_str)) if _SHAPE.search(type_str) else 1


def _read_fraction(instr: Instr, users: dict, comps: dict, depth: int = 0) -> float:
    """Fraction of value ``instr`` that its uses inside a fused computation read: the slices
    taken when every use is a (dynamic-)slice, nothing for the buffer a dynamic-update-slice
    writes in place, followed through shape-preserving elementwise ops and nested fusions."""
    uses = users.get(instr.name, [])
    if not uses or depth > 8:
        return 1.0
    n = max(_elements(instr.type), 1)
    total = 0.0
    for u, pos in uses:
        if u.op in _SLICES and pos == 0:
            total += _elements(u.type) / n
        elif u.op == "dynamic-update-slice" and pos == 0:
            continue
        elif u.op in _PASS_THROUGH and _elements(u.type) == n:
            total += _read_fraction(u, users, comps, depth + 1)
        elif u.op == "fusion":
            total += _param_fraction(u, pos, comps, depth + 1)
        elif u.op == "tuple" and u.line.startswith("ROOT"):
            continue  # passed through to the output, aliased in place: not read
        else:
            return 1.0
    return min(total, 1.0)


def _param_fraction(fusion: Instr, pos: int, comps: dict, depth: int = 0) -> float:
    """Fraction of its operand ``pos`` that a fusion reads."""
    callees = _callees(fusion.attrs, "calls")
    body = comps.get(callees[0]) if callees else None
    if not body:
        return 1.0
    for i in body:
        if i.op == "parameter" and re.search(rf"parameter\({pos}\)", i.line):
            return _read_fraction(i, _users(body), comps, depth)
    return 1.0


def _written_bytes(root: Instr, by_name: dict[str, Instr]) -> int:
    """HBM bytes written by a fused computation's root: a dynamic-update-slice writes its update
    (in place), a tuple the sum of its elements."""
    if root.op == "dynamic-update-slice" and len(root.operands) > 1:
        upd = by_name.get(root.operands[1])
        return shape_bytes(upd.type, True) if upd else shape_bytes(root.type, True)
    if root.op == "tuple":
        return sum(_written_bytes(by_name[o], by_name) if o in by_name else 0
                   for o in root.operands)
    if root.op == "parameter" or root.op.removesuffix("-start") in COLLECTIVES:
        return 0  # an input passed through in place; a collective's result is ICI traffic
    if root.op in ("bitcast", "reshape") and root.operands and root.operands[0] in by_name:
        return _written_bytes(by_name[root.operands[0]], by_name)
    return shape_bytes(root.type, True)


def fusion_bytes(instr: Instr, types: dict[str, str], comps: dict[str, list[Instr]]) -> int:
    """HBM bytes a fusion reads and writes: its operands (only the slices it takes of them) and
    its result (only the update of an in-place dynamic-update-slice), as XLA's cost analysis
    counts a fusion. A scan over stacked layers or text chunks slices one row of a big array
    per iteration; counting the whole array each time overstates traffic by the trip count."""
    callees = _callees(instr.attrs, "calls")
    body = comps.get(callees[0]) if callees else None
    if not body:
        return shape_bytes(instr.type, True) + sum(shape_bytes(types.get(o, ""), True)
                                                   for o in instr.operands)
    read = sum(_param_fraction(instr, pos, comps) * shape_bytes(types.get(o, ""), True)
               for pos, o in enumerate(instr.operands))
    root = next((i for i in body if i.line.startswith("ROOT")), body[-1])
    return read + _written_bytes(root, {i.name: i for i in body})


def _traffic(kind: str, instr: Instr, types: dict[str, str]) -> int:
    if kind == "reduce-scatter":
        return sum(shape_bytes(types.get(o, "")) for o in instr.operands)
    return shape_bytes(instr.type) * (2 if kind == "all-reduce" else 1)


def program_costs(hlo_text: str, attribute=None) -> dict:
    """Per-device costs of one execution of the module (loops weighted by their trip counts).

    Returns ``{"flops": float, "bytes_accessed": float, "collective_bytes": {kind: bytes},
    "ici_traffic_bytes": float, "custom_calls": {target: count}, "unknown_trip_counts": int,
    "while_loops": int}``. ``attribute(instr, flops, bytes)``, when given, is called with each
    instruction's own share (loop-weighted; a loop's body instructions each get theirs), so the
    shares add up to the totals.
    """
    comps, entry = parse_module(hlo_text)
    types = {name: {i.name: i.type for i in instrs} for name, instrs in comps.items()}
    unknown = [0]
    loops = [0]
    muted = [0]

    def flops_of(name: str, seen: tuple = ()) -> float:
        """FLOPs inside a fused computation (recursively through nested fusions)."""
        if name in seen or name not in comps:
            return 0.0
        total = 0.0
        for i in comps[name]:
            if i.op == "convolution":
                total += conv_flops(i, types[name])
            elif i.op == "dot":
                total += dot_flops(i, types[name])
            elif i.op == "fusion":
                total += sum(flops_of(c, seen + (name,)) for c in _callees(i.attrs, "calls"))
            elif i.op == "custom-call":  # a library call in a fusion (GPU address computation)
                lib = library_call_cost(i, types[name])
                total += lib[0] if lib else 0.0
        return total

    acc: collections.Counter = collections.Counter()
    coll: collections.Counter = collections.Counter()
    custom: collections.Counter = collections.Counter()
    seen_fused: set[str] = set()

    def fused_collectives(name: str, outer_types: dict[str, str]) -> None:
        """Collectives inside a fusion (the TPU compiler's async collective fusions overlap one
        collective with a loop's compute, its work spread over the iterations): counted once
        per program, not once per iteration."""
        if name in seen_fused or name not in comps:
            return
        seen_fused.add(name)
        for i in comps[name]:
            base = i.op.removesuffix("-start")
            if base in COLLECTIVES and not i.op.endswith("-done"):
                coll[base] += shape_bytes(i.type)
                acc["ici"] += _traffic(base, i, types[name])
            elif i.op == "fusion":
                for c in _callees(i.attrs, "calls"):
                    fused_collectives(c, types[name])

    def visit(name: str, mult: float, depth: int = 0) -> None:
        if name not in comps or depth > 64:
            return
        t = types[name]
        for i in comps[name]:
            base = i.op[:-6] if i.op.endswith("-start") else i.op
            if i.op.endswith("-done"):
                continue
            before = (acc["flops"], acc["bytes"])
            if base in COLLECTIVES:
                coll[base] += mult * shape_bytes(i.type)
                acc["ici"] += mult * _traffic(base, i, t)
            estimate = None
            if i.op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', i.attrs)
                custom[target.group(1) if target else "?"] += mult
                estimate = _COST_ESTIMATE.search(i.attrs)
                if estimate:  # a Pallas kernel states its own cost
                    estimate = (float(estimate.group(1)), float(estimate.group(2)))
                else:  # cuBLAS / cuDNN: from its shapes
                    estimate = library_call_cost(i, t)
            if estimate:
                acc["flops"] += mult * estimate[0]
                acc["bytes"] += mult * estimate[1]
            elif i.op == "convolution":
                acc["flops"] += mult * conv_flops(i, t)
            elif i.op == "dot":
                acc["flops"] += mult * dot_flops(i, t)
            elif i.op == "fusion":
                acc["flops"] += mult * sum(flops_of(c) for c in _callees(i.attrs, "calls"))
                for c in _callees(i.attrs, "calls"):
                    fused_collectives(c, t)
            if estimate:
                pass
            elif i.op == "fusion":
                acc["bytes"] += mult * fusion_bytes(i, t, comps)
            elif i.op in _SLICES:
                acc["bytes"] += mult * 2 * shape_bytes(i.type, True)
            elif i.op == "dynamic-update-slice" and len(i.operands) > 1:
                acc["bytes"] += mult * 2 * shape_bytes(t.get(i.operands[1], ""), True)
            elif i.op not in _FREE:
                acc["bytes"] += mult * (shape_bytes(i.type, True)
                                        + sum(shape_bytes(t.get(o, ""), True) for o in i.operands))
            if attribute is not None and not muted[0]:
                attribute(i, acc["flops"] - before[0], acc["bytes"] - before[1])
            if i.op == "while":
                loops[0] += 1
                n = trip_count(i, comps)
                if n is None:
                    unknown[0] += 1
                    n = 1
                for body in _callees(i.attrs, "body"):
                    visit(body, mult * n, depth + 1)
            elif i.op == "conditional":
                # One branch runs: count the costliest (an upper bound), not their sum.
                branches = (_callees(i.attrs, "branch_computations")
                            or _callees(i.attrs, "true_computation")
                            + _callees(i.attrs, "false_computation"))
                best = None
                for b in branches:
                    sub = program_costs_of(comps, b, types)
                    if best is None or sub["flops"] > best["flops"]:
                        best = sub
                if best:
                    acc["flops"] += mult * best["flops"]
                    acc["bytes"] += mult * best["bytes"]
                    if attribute is not None and not muted[0]:
                        attribute(i, mult * best["flops"], mult * best["bytes"])
                    acc["ici"] += mult * best["ici"]
                    for k, v in best["coll"].items():
                        coll[k] += mult * v
            elif i.op in ("call", "async-start") or (i.op.endswith("-start")
                                                      and base not in COLLECTIVES):
                for c in _callees(i.attrs, "calls") or _callees(i.attrs, "to_apply"):
                    visit(c, mult, depth + 1)

    def program_costs_of(comps_, name, types_):
        saved = (acc.copy(), coll.copy())
        acc.clear()
        coll.clear()
        muted[0] += 1  # a branch's instructions are attributed to its conditional, once
        visit(name, 1.0, 1)
        muted[0] -= 1
        out = {"flops": acc["flops"], "bytes": acc["bytes"], "ici": acc["ici"],
               "coll": dict(coll)}
        acc.clear()
        coll.clear()
        acc.update(saved[0])
        coll.update(saved[1])
        return out

    if entry is not None:
        visit(entry, 1.0)
    return {"flops": float(acc["flops"]), "bytes_accessed": float(acc["bytes"]),
            "collective_bytes": {k: int(v) for k, v in coll.items()},
            "ici_traffic_bytes": float(acc["ici"]), "custom_calls": dict(custom),
            "unknown_trip_counts": unknown[0], "while_loops": loops[0]}


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def breakdown(hlo_text: str, parts: tuple[str, ...], top: int = 10) -> dict:
    """Where a program's FLOPs and HBM bytes go, by model part: an instruction belongs to the
    first of ``parts`` (``jax.named_scope`` names) in its ``op_name`` metadata, else to
    ``"other"`` (copies and layout changes XLA adds, which carry no metadata). Returns
    ``{"parts": {part: {"flops", "bytes", "bytes_frac"}}, "top_bytes": [...], "top_flops":
    [...]}``; each top row: ``{"name", "op", "part", "flops", "bytes", "op_name"}`` (loop-weighted,
    per device, one execution)."""
    rows = []

    def attribute(instr: Instr, flops: float, nbytes: float) -> None:
        if flops or nbytes:
            m = _OP_NAME.search(instr.attrs)
            op_name = m.group(1) if m else ""
            part = next((p for p in parts if p in op_name), "other")
            rows.append({"name": instr.name, "op": instr.op, "part": part, "flops": flops,
                         "bytes": nbytes, "op_name": op_name[:160]})

    totals = program_costs(hlo_text, attribute)
    out: dict[str, dict[str, float]] = {p: {"flops": 0.0, "bytes": 0.0} for p in (*parts, "other")}
    for r in rows:
        out[r["part"]]["flops"] += r["flops"]
        out[r["part"]]["bytes"] += r["bytes"]
    for v in out.values():
        v["bytes_frac"] = v["bytes"] / totals["bytes_accessed"] if totals["bytes_accessed"] else 0
    return {"parts": out,
            "top_bytes": sorted(rows, key=lambda r: -r["bytes"])[:top],
            "top_flops": sorted(rows, key=lambda r: -r["flops"])[:top]}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """``{collective kind: result bytes per device per step}`` (loops weighted)."""
    return program_costs(hlo_text)["collective_bytes"]
