r"""Pod-scale dry run: compile the real train step for a TPU slice with the TPU compiler, or for a
GPU node with XLA:GPU, here, with no TPU or GPU attached, and say whether it fits and how fast it
could run.

    python -m umg_jax.dryrun --config configs/vit_l.py --topology v5e:16x16
    python -m umg_jax.dryrun --config configs/vit_l.py --topology v4:4x4x8 \
        --sweep batch_size=8192,16384,32768 --sweep mesh.fsdp=1,8 --json sweep.json
    python -m umg_jax.dryrun --config configs/vit_l.py --topology v6e:16x16 --max_batch
    python -m umg_jax.dryrun --config configs/vit_l.py --topology h100:1x1x8   # one 8-GPU host
    python -m umg_jax.dryrun --config configs/vit_l.py --topology h200:1x2x8 --max_batch
    python -m umg_jax.dryrun --config configs/tiny.py --devices 8 --target tpu_v4   # CPU stand-in

The step is the one ``umg_jax.train`` runs (``umg_jax.step.make_train_step``), lowered with the
real shardings on abstract inputs (``jax.ShapeDtypeStruct``: nothing is allocated) onto the
topology's devices (``umg_jax.accelerators.topology_devices``, libtpu's deviceless topologies;
dimensions count chips, v4 / v5p in megacore mode as JAX runs them) and compiled by libtpu.
GPU nodes (``h100``, ``h200``, ``a100``, ``b200``; ``CARD:SLICESxHOSTSxGPUS`` as JAX's GPU
topologies name them) compile with XLA:GPU from the CUDA plugin (``pip install -r
requirements-gpu.txt``) for the card described in ``umg_jax/gpu_targets/``, with no device to
autotune on: matmuls go to cuBLAS with its default algorithm (``accelerators.GPU_COMPILE_OPTIONS``,
passed to this compile only).
Every backend-dependent choice (``umg_jax.ops``: dense layers, fused attention) follows the
devices compiled for, so the TPU compile takes the TPU path and the GPU compile the GPU path.

Per device it reports:
- HBM from the compiler's memory analysis (TPU or GPU): arguments, outputs, temporaries,
  aliasing (donated state) and generated code; total = arguments + outputs - aliased +
  temporaries + code;
- compiled FLOPs and HBM bytes accessed, and collective bytes per kind, read from the compiled
  HLO with loops counted as often as they run (``umg_jax.hlo_stats``: dots, convolutions,
  Pallas kernels, cuBLAS and cuDNN calls; XLA's own cost analysis counts a scanned layer once and
  is given beside them);
- the fused attention kernels in the compiled program (``fused_attention``: TPU
  ``tpu_custom_call`` Pallas kernels, GPU ``__cudnn$fmha*`` calls; none = XLA's attention);
- analytic model FLOPs (``step.step_flops``);
- the fit verdict against the chip's HBM (``umg_jax/accelerators.toml``; on a GPU the part
  JAX's allocator takes, 75 % unless ``XLA_CLIENT_MEM_FRACTION`` says otherwise, read from this
  process's environment as the node's would give it), and a roofline step
  time: ``max(FLOPs / peak, bytes / HBM bandwidth) + collective traffic / ICI bandwidth`` (no
  overlap of communication, full peak on every matmul: a bound, not a promise; on GPUs the
  interconnect is NVLink, also for the traffic that crosses hosts: optimistic for 2+ hosts).

Without libtpu, or with ``--devices N``, N fake CPU devices stand in for the chips (XLA:CPU's
buffer assignment, which upcasts bf16 dots: pessimistic), and every printed line says so.
Compiling ViT-L/14 for 256 chips takes 4-5 minutes per row on an idle 2-core machine (measured
231-293 s on 2026-11-30; up to 11 minutes when other work shares the cores; tiny: ~1 min), and
``--max_batch`` compiles 3-8 rows.
Exit status: 0 all rows fit, 1 a row does not fit, 2 a bad request (config, topology, flags,
a compiler that is not installed).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from umg_jax import provenance  # the checkout as this run starts (provenance._AT_START)

DEFAULT_TOPOLOGY = "v5e:16x16"  # the most common pod slice (256 chips of 16 GiB)
GiB = 1024 ** 3


# Flags are defined only when the module runs as a program, so that importing it (tests,
# other tools) never clashes with another module's absl flags of the same name.
def _define_flags() -> None:
    global _CONFIG, _TOPOLOGY, _DEVICES, _TARGET, _SWEEP, _JSON, _MAX_BATCH, _CLIP, _HLO_DIR
    global _BREAKDOWN
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_l.py.",
                                              lock_config=True)
    _TOPOLOGY = flags.DEFINE_string(
        "topology", None, f"TPU slice to compile for, GENERATION:AxB[xC] in chips (v4:4x4x8, "
        f"v5e:16x16, v5p:8x8x8, v6e:16x16), or a GPU node CARD:SLICESxHOSTSxGPUS (h100:1x1x8, "
        f"h200:1x2x8, a100:1x1x8, b200:1x1x8); default {DEFAULT_TOPOLOGY} unless --devices.")
    _DEVICES = flags.DEFINE_integer(
        "devices", None, "CPU stand-in: compile for this many fake CPU devices instead of a TPU "
        "topology (XLA:CPU's memory figures, pessimistic).")
    _TARGET = flags.DEFINE_string(
        "target", None, "Chip whose HBM / peak the CPU stand-in is judged against (a name of "
        "umg_jax/accelerators.toml: tpu_v4, tpu_v5e, tpu_v5p, tpu_v6e, h100, ...); default: "
        "the topology's chip, else tpu_v5e.")
    _SWEEP = flags.DEFINE_multi_string(
        "sweep", [], "key=v1,v2,... over config keys (batch_size, mesh.fsdp, model.remat, ...); "
        "several --sweep flags form a grid.")
    _JSON = flags.DEFINE_string("json", None,
                                "Write the results as JSON to this path (local, gs:// or s3://).")
    _HLO_DIR = flags.DEFINE_string(
        "hlo_dir", None, "Also write each row's compiled HLO text to DIR/<row>.hlo.txt (local, "
        "gs:// or s3://; to see what the compiler did: fusions, collectives, the fused "
        "attention kernel).")
    _MAX_BATCH = flags.DEFINE_bool(
        "max_batch", False, "Search the largest global batch that fits (a few compiles: two "
        "probes fit a line to memory vs batch, then the prediction is checked).")
    _BREAKDOWN = flags.DEFINE_bool(
        "breakdown", False, "Also group each row's compiled FLOPs and HBM bytes by model part "
        "(image tower, caption text, element text, loss, optimizer, other: from the ops' "
        "metadata) and list the top fusions by bytes and by FLOPs.")
    _CLIP = flags.DEFINE_bool(
        "clip_baseline", False, "Also compile the CLIP-only step (image <-> caption loss) of each "
        "row and report the UMG / CLIP ratio of compiled FLOPs (doubles the compile time).")


def _shard_bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                   for a in jax.tree.leaves(tree)))


SEG_CLASSES = 133  # a segmentation head's training vocabulary in a dry run: COCO panoptic's


def text_profile(config, mesh) -> dict | None:
    """The text profile a dry run compiles for, ``None`` on the every-slot path
    (``loss.free_text_frac`` 1.0: every element text distinct, the worst case): the vocabulary
    size (``data.text_vocab_size``, standing for the data's ``meta.json`` ``text_vocab``), the
    step's budgets ``(K, Kf)`` and the element texts it encodes against its slots."""
    from umg_jax import sharding
    from umg_jax import step as step_lib

    if (step_lib.seg_enabled(config) or not step_lib.text_ids_enabled(config.loss)
            or not step_lib.element_text_fields(config.loss)):
        return None
    v = int(config.data.get("text_vocab_size", 0) or 0)
    if v <= 0:
        raise ValueError("loss.free_text_frac < 1 encodes the data's text vocabulary: give the "
                         "dry run its size, data.text_vocab_size")
    shards = sharding.batch_size_divisor(mesh)
    k, kf = step_lib.text_budgets(config, v, shards)
    slots = config.batch_size * step_lib.element_slots(config)
    return {"vocab_size": v, "vocab_rows": k, "free_rows_per_shard": kf, "shards": shards,
            "element_rows": k + shards * kf, "element_slots": slots,
            "free_text_frac": float(config.loss.free_text_frac)}


def compile_step(config, devices, seg_classes: int = SEG_CLASSES):
    """Lowers and compiles the train step of ``config`` for ``devices`` (abstract or real). A
    segmentation-head config gets a vocabulary of ``seg_classes`` placeholder classes: the dry
    run needs shapes alone and reads no data.

    Returns ``(compiled, abstract_state, abstract_batch, mesh, compile_seconds)``.
    """
    import jax
    import numpy as np

    from umg_jax import accelerators, config_checks, optim, sharding
    from umg_jax import step as step_lib
    from umg_jax.data import schema
    from umg_jax.models import clip

    config_checks.validate(config, num_devices=len(devices))
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    model = clip.build_model(config.model)
    tx, _ = optim.make_optimizer(
        config.optim, jax.eval_shape(lambda: step_lib.init_params(config, jax.random.key(0))),
        config.total_steps, freeze=step_lib.frozen_regexes(config))
    abstract = step_lib.abstract_state(config, tx)
    state_sh = step_lib.state_shardings(abstract, mesh)
    shapes = schema.batch_shapes_from_config(config)
    vocab = (step_lib.vocabulary_shapes(config, seg_classes) if step_lib.seg_enabled(config)
             else None)
    profile = text_profile(config, mesh)
    text_vocab = None
    if profile:  # placeholder tokens: the step's shapes depend on the vocabulary's size alone
        text_vocab = np.zeros((profile["vocab_size"], shapes["tags"][0][-1]), np.int32)
    step_fn = step_lib.make_train_step(model, tx, config, mesh, state_sh, shapes, vocab,
                                       text_vocab)
    batch_sh = sharding.batch_sharding(mesh)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, state_sh)
    abstract_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh)
                      for k, (s, d) in shapes.items()}
    t0 = time.perf_counter()
    compiled = step_fn.lower(abstract_state, abstract_batch).compile(
        compiler_options=accelerators.compile_options(devices) or None)
    return compiled, abstract_state, abstract_batch, mesh, time.perf_counter() - t0


def roofline(costs: dict, chip) -> dict:
    """Step-time bound from compiled per-device costs and the chip's spec.

    ``costs``: ``{"flops", "bytes_accessed", "ici_traffic_bytes"}`` per device. Compute and HBM
    traffic overlap (max of the two); collectives are added on top (no overlap with compute, all
    of the chip's ICI / NVLink bandwidth). Returns seconds and which term bounds the step.
    """
    compute = costs["flops"] / chip.peak_flops
    memory = costs["bytes_accessed"] / (chip.hbm_gbps * 1e9)
    comm = costs["ici_traffic_bytes"] / (chip.ici_gbps * 1e9)
    step = max(compute, memory) + comm
    bound = max((compute, "compute"), (memory, "memory"), (comm, "collectives"))[1]
    return {"compute_s": compute, "memory_s": memory, "collective_s": comm, "step_s": step,
            "bound": bound}


def clip_only(config):
    """The same config with only the image <-> caption loss (CLIP's step, for the FLOP ratio)."""
    c = config.copy_and_resolve_references()
    c.loss.update(w_tags=0.0, w_region=0.0, w_mask=0.0, w_pixel=0.0)
    return c


class CompileOOM(Exception):
    """The compiler itself refused the program: its buffers cannot fit the device memory (libtpu
    raises RESOURCE_EXHAUSTED instead of returning a memory analysis). ``required_bytes``: the
    figure the message names (a lower bound on the total), 0 if none."""

    def __init__(self, message: str, required_bytes: int):
        super().__init__(message)
        self.required_bytes = required_bytes


def _compile_oom(e: Exception) -> CompileOOM | None:
    """:class:`CompileOOM` for a compiler out-of-memory error, else None. Parses e.g. "the
    total memory required for HLO temporaries (17.02G) exceeds available HBM (15.75G)" (XLA's
    G = GiB)."""
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg or "memory" not in msg.lower():
        return None
    m = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", msg)
    scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    need = int(float(m.group(1)) * scale[m.group(2)]) if m else 0
    line = next((ln for ln in msg.splitlines() if "RESOURCE_EXHAUSTED" in ln), msg)
    return CompileOOM(line.strip()[:300], need)


def oom_row(config, chip, e: CompileOOM) -> dict:
    """The probe row of a batch the compiler refused: does not fit, its total at least what
    the message names (or the HBM size)."""
    total = max(e.required_bytes, chip.hbm_bytes + 1)
    return {"batch_size": int(config.batch_size), "bytes_per_device": {"total": total},
            "fits": False, "margin_gib": (chip.hbm_bytes - total) / GiB,
            "compile_error": str(e)}


def analyse(config, *, chip, devices, compiler: str, clip_baseline: bool = False,
            hlo_path: str | None = None, breakdown: bool = False) -> dict:
    """Compiles the train step of ``config`` for ``devices`` and measures it against ``chip``.

    ``compiler``: ``"tpu"`` (libtpu, abstract TPU devices), ``"gpu"`` (XLA:GPU, abstract GPU
    devices) or ``"cpu-standin"`` (fake CPU devices). Returns one JSON-able row (see the module
    docstring).
    """
    import jax

    from umg_jax import hlo_stats
    from umg_jax import step as step_lib

    try:
        compiled, a_state, a_batch, mesh, seconds = compile_step(config, devices)
    except Exception as e:  # noqa: BLE001  (the compiler's error type varies across jax versions)
        oom = _compile_oom(e)
        if oom is None:
            raise
        raise oom from None
    mem = compiled.memory_analysis()
    xla = compiled.cost_analysis() or {}
    if isinstance(xla, list):  # older jax returned one dict per partition
        xla = xla[0] if xla else {}
    text = compiled.as_text()
    if hlo_path:
        write_hlo(hlo_path, text)
    costs = hlo_stats.program_costs(text)
    parts = hlo_stats.breakdown(text, step_lib.PARTS) if breakdown else None
    del text
    n = len(devices)
    code = int(getattr(mem, "generated_code_size_in_bytes", 0) or 0) if compiler == "tpu" else 0
    total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes + code)
    params_b = _shard_bytes(a_state.params)
    profile = text_profile(config, mesh)
    analytic = step_lib.step_flops(config, element_rows=profile and profile["element_rows"])
    roof = roofline(costs, chip)
    row = {
        "compiler": compiler, "chip": chip.name, "devices": n,
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "batch_size": int(config.batch_size),
        "per_device_batch": config.batch_size / math.prod(mesh.shape[a]
                                                          for a in ("data", "fsdp")),
        "remat": bool(config.model.remat), "scan": bool(config.model.scan),
        "dtype": config.model.dtype, "compile_s": seconds,
        "text_profile": profile or {"element_rows": "every slot",
                                    "free_text_frac": float(config.loss.get("free_text_frac",
                                                                            1.0))},
        "bytes_per_device": {
            "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
            "aliased": int(mem.alias_size_in_bytes), "temp": int(mem.temp_size_in_bytes),
            "generated_code": code, "total": total,
            "params": params_b, "opt_state": _shard_bytes(a_state.opt_state),
            "batch": _shard_bytes(a_batch)},
        "hbm_bytes": chip.hbm_bytes, "fits": total <= chip.hbm_bytes,
        "margin_gib": (chip.hbm_bytes - total) / GiB,
        "flops_per_step": {"analytic_total": analytic, "analytic_per_device": analytic / n,
                           "compiled_per_device": costs["flops"]},
        "compiled": {k: costs[k] for k in ("flops", "bytes_accessed", "ici_traffic_bytes",
                                           "unknown_trip_counts", "while_loops",
                                           "custom_calls")},
        "xla_cost_analysis": {"flops": float(xla.get("flops", 0.0)),
                              "bytes_accessed": float(xla.get("bytes accessed", 0.0)),
                              "note": "loop bodies counted once"},
        "collective_bytes_per_device": costs["collective_bytes"],
        "fused_attention": hlo_stats.fused_attention_calls(costs["custom_calls"]),
        "fused_attention_calls": int(sum(
            hlo_stats.fused_attention_calls(costs["custom_calls"]).values())),
        "roofline": roof, "est_step_time_s": roof["step_s"],
        "est_images_per_s": config.batch_size / roof["step_s"] if roof["step_s"] else 0.0,
        "est_mfu": analytic / n / roof["step_s"] / chip.peak_flops if roof["step_s"] else 0.0,
    }
    if parts:
        row["breakdown"] = parts
    del compiled
    jax.clear_caches()  # one compiled ViT-L step holds GBs of host memory; rows add up
    if clip_baseline:
        row.update(clip_baseline_costs(config, devices, costs["flops"]))
    return row


def clip_baseline_costs(config, devices, umg_flops: float) -> dict:
    """Compiles the CLIP-only step of ``config`` (same batch and model) and returns its compiled
    FLOPs per device and the UMG / CLIP ratio."""
    import jax

    from umg_jax import hlo_stats

    base, *_ = compile_step(clip_only(config), devices)
    base_flops = hlo_stats.program_costs(base.as_text())["flops"]
    del base
    jax.clear_caches()
    return {"clip_only_compiled_flops_per_device": base_flops,
            "umg_over_clip_flops": umg_flops / base_flops if base_flops else None}


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1")
    return type(current)(text) if current is not None else text


def _set(config, key: str, value) -> None:
    node = config
    for part in key.split(".")[:-1]:
        node = node[part]
    node[key.split(".")[-1]] = value


def sweep_configs(config, sweeps: list[str]):
    """Yields ``(overrides, config)`` for the grid of ``key=v1,v2`` sweeps."""
    axes = []
    for s in sweeps:
        if "=" not in s:
            raise ValueError(f"--sweep {s!r}: expected key=v1,v2,...")
        key, values = s.split("=", 1)
        node = config
        for part in key.split(".")[:-1]:
            node = node[part]
        leaf = key.split(".")[-1]
        if leaf not in node:
            raise ValueError(f"--sweep {s!r}: unknown config key {key!r}")
        axes.append([(key, _parse_value(v, node[leaf])) for v in values.split(",")])
    for combo in itertools.product(*axes) if axes else [()]:
        c = config.copy_and_resolve_references()
        for key, value in combo:
            _set(c, key, value)
        yield dict(combo), c


def batch_granule(config, n_devices: int, per_shard: int = 1) -> int:
    """Global batches must be multiples of this: the data x fsdp shards (mesh -1 resolved),
    times ``per_shard``."""
    sizes = {a: int(config.mesh[a]) for a in ("data", "fsdp", "tensor")}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    for a, s in sizes.items():
        if s == -1:
            sizes[a] = n_devices // fixed
    return sizes["data"] * sizes["fsdp"] * per_shard


def find_max_batch(config, *, chip, devices, compiler: str, log=print,
                   hlo_dir: str | None = None) -> tuple[dict, list]:
    """Largest global batch of ``config`` that fits ``chip`` (per-device batches in multiples
    of 8).

    Memory is close to linear in the per-device batch: two probes (the config's batch, then the
    batch scaled by HBM / its memory, within 0.5x..2x) fit a line, its crossing of the HBM size is
    compiled, and secant and bisection steps alternate until the largest fitting batch is
    bracketed within ~3 % (at most 8 compiles). Returns ``(best fitting row, every probe row)``.
    """
    # Per-device batches in multiples of 8 (the TPU's sublane tile): the compiler's memory is
    # not monotonic in odd sizes (ViT-L on v4: 236 per chip needed more HBM than 256).
    g = batch_granule(config, len(devices), per_shard=8)
    probes: dict[int, dict] = {}

    def probe(b: int) -> dict:
        if b not in probes:
            c = config.copy_and_resolve_references()
            c.batch_size = b
            log(f"  probe batch_size={b} ...")
            hlo = os.path.join(hlo_dir, f"batch{b}.hlo.txt") if hlo_dir else None
            try:
                probes[b] = analyse(c, chip=chip, devices=devices, compiler=compiler,
                                    hlo_path=hlo)
            except CompileOOM as e:  # refused by the compiler: a probe that does not fit
                probes[b] = oom_row(c, chip, e)
                log(f"  batch_size={b}: refused by the compiler ({e})")
                return probes[b]
            r = probes[b]
            log(f"  batch_size={b}: {r['bytes_per_device']['total'] / GiB:.2f} GiB / "
                f"{chip.hbm_gib:g} ({'fits' if r['fits'] else 'does not fit'})")
        return probes[b]

    b0 = max(g, config.batch_size // g * g)
    r0 = probe(b0)
    # Second probe: as if memory were proportional to the batch (within 0.5x..2x).
    ratio = min(max(chip.hbm_bytes / max(r0["bytes_per_device"]["total"], 1), 0.5), 2.0)
    b1 = max(g, int(b0 * ratio) // g * g)
    if b1 == b0:
        b1 = b0 + g if r0["fits"] else max(g, b0 - g)
    probe(b1)
    secant = True
    while len(probes) < 8:
        fitting = sorted(b for b, r in probes.items() if r["fits"])
        failing = sorted(b for b, r in probes.items() if not r["fits"])
        lo = fitting[-1] if fitting else None
        hi = failing[0] if failing else None
        if lo is not None and hi is not None and hi - lo <= max(g, lo // 32):
            break  # bracketed within ~3 %
        if lo is None and hi == g:
            break  # not even the smallest batch fits
        if lo is not None and hi is not None and not secant:
            nxt = (lo + hi) // 2 // g * g  # bisection: progress when the line misleads
        else:
            # The line through the two probes nearest the boundary, aimed at the HBM size.
            (ba, ra), (bb, rb) = sorted(probes.items(),
                                        key=lambda kv: abs(kv[1]["margin_gib"]))[:2]
            ta, tb = ra["bytes_per_device"]["total"], rb["bytes_per_device"]["total"]
            if (tb - ta) * (bb - ba) > 0:
                nxt = int(ba + (chip.hbm_bytes - ta) * (bb - ba) / (tb - ta)) // g * g
            else:  # memory flat in the batch (or noisy): double / halve
                nxt = lo * 2 if hi is None else max(g, hi // 2 // g * g)
        secant = not secant
        if lo is not None:
            nxt = max(nxt, lo + g)
        if hi is not None:
            nxt = min(nxt, hi - g)
        nxt = max(g, nxt)
        if nxt in probes:
            break
        probe(nxt)
    fitting = [b for b, r in probes.items() if r["fits"]]
    if not fitting:
        return probes[min(probes)], list(probes.values())
    return probes[max(fitting)], list(probes.values())


def plan(topology: str | None, devices: int | None, target: str | None,
         libtpu: bool, cuda: bool = False) -> tuple[str, str | None, object, int]:
    """What to compile for: ``(compiler, topology, chip, device count)``.

    ``--devices N`` (CPU stand-in) or ``--topology`` (default :data:`DEFAULT_TOPOLOGY`); without
    libtpu a TPU topology falls back to the CPU stand-in with as many fake devices. A GPU node
    needs the CUDA plugin (``cuda``): ``accelerators.CompilerUnavailable`` without it. The chip is
    the topology's, or ``--target`` for the stand-in (default tpu_v5e); a GPU's HBM is the part
    JAX may use (``accelerators.jax_usable``). ``ValueError`` (incl.
    ``accelerators.TopologyError``) for a bad request.
    """
    from umg_jax import accelerators

    if devices is not None and topology is not None:
        raise ValueError("give --topology (TPU compiler) or --devices (CPU stand-in), not both")
    if devices is not None and devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    topology = None if devices is not None else (topology or DEFAULT_TOPOLOGY)
    chip = accelerators.topology_chip(topology) if topology else None
    n = accelerators.topology_size(topology) if topology else devices
    if target is not None:
        if target not in accelerators.chips():
            raise ValueError(f"unknown --target {target!r}; known: "
                             f"{', '.join(accelerators.chips())}")
        if chip is not None and target != chip.name:
            raise ValueError(f"--target {target} contradicts --topology {topology} "
                             f"({chip.name})")
        chip = accelerators.chips()[target]
    chip = chip or accelerators.chips()["tpu_v5e"]
    if topology and chip.platform == "gpu":
        if not cuda:
            raise accelerators.CompilerUnavailable(
                f"--topology {topology} needs the CUDA plugin for XLA:GPU: "
                f"{accelerators.GPU_INSTALL}")
        # judged against what JAX's GPU allocator may take of it (75 % unless the environment
        # says otherwise): a step that needs more fails on the node
        return "gpu", topology, accelerators.jax_usable(chip), n
    compiler = "tpu" if topology and libtpu else "cpu-standin"
    return compiler, topology, chip, n


TAGS = {"tpu": "[TPU compiler]", "gpu": "[GPU compiler]",
        "cpu-standin": "[CPU STAND-IN, not the TPU compiler]"}


def format_rows(rows: list[dict], where: str, compiler: str) -> str:
    tag = TAGS[compiler]
    head = (f"{'config':<28} {'batch':>7} {'args':>6} {'temp':>6} {'total':>6} {'HBM':>4} "
            f"{'fits':>4} {'TFLOP/dev':>9} {'GB acc':>7} {'coll GB':>7} {'bound':>8} "
            f"{'img/s':>8} {'MFU':>4} {'attn':>5}")
    lines = [f"{tag} per-device GiB on {where}", f"{tag} {head}", f"{tag} " + "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{tag} {r['name']:<28} error: {r['error']}")
            continue
        b = r["bytes_per_device"]
        lines.append(
            f"{tag} {r['name'][:28]:<28} {r['batch_size']:>7} {b['arguments'] / GiB:>6.2f} "
            f"{b['temp'] / GiB:>6.2f} {b['total'] / GiB:>6.2f} {r['hbm_bytes'] / GiB:>4.0f} "
            f"{'yes' if r['fits'] else 'NO':>4} "
            f"{r['compiled']['flops'] / 1e12:>9.2f} {r['compiled']['bytes_accessed'] / 1e9:>7.1f} "
            f"{sum(r['collective_bytes_per_device'].values()) / 1e9:>7.2f} "
            f"{r['roofline']['bound']:>8} {r['est_images_per_s']:>8.0f} "
            f"{100 * r['est_mfu']:>3.0f}% {r.get('fused_attention_calls', 0):>5}")
        tp = r.get("text_profile") or {}
        if tp.get("vocab_size"):
            lines.append(f"{tag}   texts: {tp['element_rows']:,} element rows encoded for "
                         f"{tp['element_slots']:,} slots (vocabulary {tp['vocab_size']:,} -> "
                         f"{tp['vocab_rows']:,} rows; free-form {tp['free_rows_per_shard']} "
                         f"rows x {tp['shards']} shards, free_text_frac "
                         f"{tp['free_text_frac']:g})")
        elif tp:
            lines.append(f"{tag}   texts: every element slot encoded (free_text_frac 1: the "
                         "worst case, every text distinct)")
        if r.get("umg_over_clip_flops"):
            lines.append(f"{tag}   UMG / CLIP-only step, compiled FLOPs: "
                         f"{r['umg_over_clip_flops']:.2f}x")
        if r.get("breakdown"):
            lines += format_breakdown(r["breakdown"], tag)
        if r["compiled"]["unknown_trip_counts"]:
            lines.append(f"{tag}   {r['compiled']['unknown_trip_counts']} loop(s) with an "
                         "unreadable trip count were counted once")
    return "\n".join(lines)


def format_breakdown(b: dict, tag: str, top: int = 5) -> list[str]:
    """Lines of a row's ``--breakdown``: per model part, then the top fusions."""
    lines = [f"{tag}   {'part':<14} {'TFLOP/dev':>9} {'GB acc':>8} {'bytes':>6} {'FLOP/B':>7}"]
    for part, v in b["parts"].items():
        if v["flops"] or v["bytes"]:
            lines.append(f"{tag}   {part:<14} {v['flops'] / 1e12:>9.3f} {v['bytes'] / 1e9:>8.2f} "
                         f"{100 * v['bytes_frac']:>5.1f}% "
                         f"{v['flops'] / v['bytes'] if v['bytes'] else 0:>7.0f}")
    for key, label in (("top_bytes", "by HBM bytes"), ("top_flops", "by FLOPs")):
        lines.append(f"{tag}   top ops {label}:")
        for r in b[key][:top]:
            lines.append(f"{tag}     {r['bytes'] / 1e9:>7.2f} GB {r['flops'] / 1e12:>7.3f} TF "
                         f"{r['part']:<13} {r['op']:<12} {r['op_name'][-70:]}")
    return lines


def write_hlo(path: str, text: str) -> None:
    """Writes one row's compiled HLO text to ``path``: local (folders made as needed),
    ``gs://`` or ``s3://``."""
    from umg_jax import storage

    storage.write_text(path, text)


def write_json(path: str, payload: dict) -> None:
    """Writes the run's results (``--json``) to ``path``: local, ``gs://`` or ``s3://``."""
    from umg_jax import storage

    storage.write_text(path, json.dumps(payload, indent=2, default=str))


def check_outputs(json_path: str | None, hlo_dir: str | None) -> None:
    """Before any compile: the folders ``--json`` and ``--hlo_dir`` write into can be written
    (``storage.StorageError``, one line naming the path: no bucket, no credentials, unwritable)."""
    from umg_jax import storage

    if json_path:
        storage.check_writable_dir(storage.path(json_path).parent)
    if hlo_dir:
        storage.check_writable_dir(hlo_dir)


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    from umg_jax import host_platforms

    host_platforms.pin()  # the platforms this host has, before JAX's backends start
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from umg_jax import accelerators

    if _CONFIG.value is None:
        _fail("--config is required")
    try:
        compiler, topology, chip, n = plan(_TOPOLOGY.value, _DEVICES.value, _TARGET.value,
                                           accelerators.tpu_compiler_available(),
                                           accelerators.gpu_compiler_available())
    except (ValueError, accelerators.CompilerUnavailable) as e:
        _fail(str(e))
    from umg_jax import storage

    try:
        check_outputs(_JSON.value, _HLO_DIR.value)
    except storage.StorageError as e:
        _fail(str(e))
    if compiler == "cpu-standin" and topology:
        print(f"[CPU STAND-IN] libtpu is not installed: falling back to {n} fake CPU devices "
              f"judged as {chip.name} "
              "(pip install -r requirements-tpu.txt for the TPU compiler)", file=sys.stderr)
    import jax

    if compiler == "cpu-standin":
        # Must happen before the backend starts: the tool sets its own fake device count.
        jax.config.update("jax_num_cpu_devices", n)
        devices = jax.devices("cpu")
        if len(devices) != n:
            _fail(f"could not create {n} CPU devices (got {len(devices)})")
    else:
        # The local backend stays the CPU: never try to open a TPU or GPU on this host (a TPU
        # VM's chips may be busy; without a driver the CUDA plugin fails to start; the compile
        # is deviceless anyway).
        jax.config.update("jax_platforms", "cpu")
        try:
            devices = accelerators.topology_devices(topology)
        except accelerators.TopologyError as e:
            _fail(str(e))
        except accelerators.CompilerUnavailable as e:
            _fail(str(e))
    from umg_jax import config_checks

    full = accelerators.chips()[chip.name].hbm_gib
    usable = (f"{chip.hbm_gib:g} GiB each" if chip.hbm_gib == full else
              f"{chip.hbm_gib:g} of {full:g} GiB each: JAX's share, XLA_CLIENT_MEM_FRACTION")
    where = (f"{topology} ({n} x {devices[0].device_kind}, {usable})"
             if compiler != "cpu-standin" else f"{n} fake CPU devices judged as {chip.name} "
             f"({chip.hbm_gib:g} GiB each)")
    tag = {"cpu-standin": "[CPU STAND-IN]"}.get(compiler, TAGS[compiler])
    try:
        grid = list(sweep_configs(_CONFIG.value, _SWEEP.value))
    except (ValueError, KeyError) as e:
        _fail(str(e))
    rows = []
    for overrides, cfg in grid:
        name = ",".join(f"{k}={v}" for k, v in overrides.items()) or cfg.get("name", "config")
        print(f"{tag} compiling {name} for {where} ...", file=sys.stderr, flush=True)
        try:
            if _MAX_BATCH.value:
                r, probes = find_max_batch(
                    cfg, chip=chip, devices=devices, compiler=compiler,
                    log=lambda s: print(f"{tag} {s}", file=sys.stderr, flush=True),
                    hlo_dir=os.path.join(_HLO_DIR.value, name) if _HLO_DIR.value else None)
                if "compile_error" in r:  # nothing fits: not even the smallest compiled
                    raise CompileOOM(r["compile_error"], r["bytes_per_device"]["total"])
                r = dict(r, max_batch_probes=[
                    {"batch_size": p["batch_size"], "total": p["bytes_per_device"]["total"],
                     "fits": p["fits"], "compile_error": "compile_error" in p}
                    for p in probes])
                if _CLIP.value:
                    best = cfg.copy_and_resolve_references()
                    best.batch_size = r["batch_size"]
                    r.update(clip_baseline_costs(best, devices, r["compiled"]["flops"]))
            else:
                hlo = (os.path.join(_HLO_DIR.value, f"{name.replace('/', '_')}.hlo.txt")
                       if _HLO_DIR.value else None)
                r = analyse(cfg, chip=chip, devices=devices, compiler=compiler,
                            clip_baseline=_CLIP.value, hlo_path=hlo,
                            breakdown=_BREAKDOWN.value)
        except CompileOOM as e:  # does not fit (exit 1), with the compiler's own words
            r = {"error": f"does not fit: the compiler refused it ({e})"}
        except (config_checks.ConfigError, ValueError) as e:
            if len(grid) == 1:
                _fail(str(e))
            r = {"error": str(e)}
        rows.append({"name": name, "overrides": overrides, **r})
        print(f"{tag} {name}: compiled in {r.get('compile_s', 0):.0f} s", file=sys.stderr,
              flush=True)
    print(format_rows(rows, where, compiler))
    for r in rows:
        if "error" not in r and not r["fits"]:
            print(f"{tag} {r['name']}: does not fit by {-r['margin_gib']:.2f} GiB per device "
                  f"({r['bytes_per_device']['total'] / GiB:.2f} GiB needed, "
                  f"{r['hbm_bytes'] / GiB:.0f} GiB available)")
    if _JSON.value:
        import importlib.metadata as md

        def version(p):
            try:
                return md.version(p)
            except md.PackageNotFoundError:
                return None

        out = {"compiler": compiler, "topology": topology, "chip": chip.name, "devices": n,
               "config": _CONFIG.value.get("name", None),
               "date": datetime.date.today().isoformat(), "jax": jax.__version__,
               "libtpu": version("libtpu"), "rows": rows}
        if compiler == "gpu":
            out.update({"jax_gpu_mem_fraction": accelerators.jax_gpu_memory_fraction(),
                        "hbm_gib_per_gpu": accelerators.chips()[chip.name].hbm_gib,
                        "jax_cuda12_plugin": version("jax-cuda12-plugin"),
                        "cudnn": version("nvidia-cudnn-cu12"),
                        "cuda_runtime": version("nvidia-cuda-runtime-cu12"),
                        "compile_options": accelerators.GPU_COMPILE_OPTIONS})
        # under ``python -m`` argv[0] is this file's path: the command as the user typed it
        out["provenance"] = provenance.provenance(["-m", "umg_jax.dryrun", *sys.argv[1:]])
        write_json(_JSON.value, out)
    ok = [r for r in rows if "error" not in r]
    if not ok or not all(r["fits"] for r in ok):
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
