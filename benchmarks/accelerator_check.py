"""Accelerator check: the real UMG train step of tiny and ViT-B/16 on whatever devices are present.

    python benchmarks/accelerator_check.py [--models tiny,b16] [--steps 10] [--warmup 2]
        [--batch tiny=1024,b16=256 | --batch 32] [--out PATH]

Runs ``umg_jax.step.make_train_step`` built as ``umg_jax.train`` builds it (all local devices on a
data-parallel mesh, AdamW of the config, the full UMG loss of the config) in bfloat16
(``model.dtype=bfloat16``; remat / scan as the config has them), on one batch of the embedded
synthetic world from the real Grain pipeline, its text columns trimmed to the real lengths as the
trainer does (``step.text_lengths`` / ``step.trim_text``). The same device batch is fed to every
step (this measures the step, not the input pipeline); every step is synced.

``--batch`` is per device (global = per device x device count): one int for every model, or
``name=size,...``; unnamed models take the default of the platform (accelerators: tiny 1024,
b16 256, sized for an 80-141 GB GPU or a TPU chip; CPU: tiny 32, b16 8).

Per model, one row: device kind and count, img/s (global batch / median step time after
``--warmup`` untimed steps), MFU (analytic model FLOPs ``step.step_flops`` / step time / peak;
the peak is ``metrics.mfu_peak``, as the trainer's: the spec bf16 peak of the device kind from
``umg_jax/accelerators.toml``, measured on CPU, none for an unknown accelerator), the attention
implementation that ran, read from the compiled step's HLO (cuDNN fused attention calls on GPU,
Pallas ``tpu_custom_call`` kernels on TPU, neither: XLA's ops; ``hlo_stats.attention_kernel``)
beside the one each tower was predicted to take (``ops.attention.attention_implementation`` for
the vision tower's token count and the text tower's trimmed caption / element lengths; a row
whose compiled HLO contradicts the prediction is flagged with ``!``), peak device memory
(``memory_stats()["peak_bytes_in_use"]`` where the backend has it, else the compiled step's
``memory_analysis()``: arguments + outputs - aliased + temporaries, per device) and compile time
(``lower`` + ``compile``). Each model runs in its own process, so the device memory peak is that
model's and a model that runs out of memory leaves the other rows intact.

Writes ``benchmarks/results/accelerator_check.json`` (``--out``): date, jax version, platform,
device kind, CPU model, load average and every row.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {"tiny": "configs/tiny.py", "b16": "configs/vit_b16.py"}
# Per-device batch when --batch names no size: accelerators (80-141 GB GPU, TPU chip) and CPU.
DEFAULT_BATCH = {"accelerator": {"tiny": 1024, "b16": 256}, "cpu": {"tiny": 32, "b16": 8}}
GIB = 1024 ** 3


# ------------------------------------------------------------------------- pure helpers ---


def parse_models(spec: str) -> list[str]:
    """``"tiny,b16"`` -> ``["tiny", "b16"]``; ``ValueError`` for an empty list, an unknown name
    or a repeated one."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--models is empty; choose from " + ", ".join(MODELS))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {unknown}; choose from "
                         + ", ".join(MODELS))
    if len(set(names)) != len(names):
        raise ValueError(f"--models names a model twice: {spec!r}")
    return names


def parse_batch(spec: str, models: list[str]) -> dict[str, int]:
    """Per-device batch sizes the user gave: ``""`` -> ``{}`` (all defaults), ``"32"`` -> every
    model 32, ``"tiny=1024,b16=256"`` -> those. ``ValueError`` for a size that is not a positive
    int or a name outside ``models``."""
    spec = spec.strip()
    if not spec:
        return {}

    def size(text: str, what: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"--batch {what}: {text!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"--batch {what}: must be >= 1, got {n}")
        return n

    if "=" not in spec:
        n = size(spec, "size")
        return {m: n for m in models}
    out = {}
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"--batch: {item!r} is not name=size (mix of forms?)")
        if name not in models:
            raise ValueError(f"--batch: {name!r} is not one of the models run "
                             f"({', '.join(models)})")
        out[name] = size(value.strip(), name)
    return out


def default_batch(name: str, platform: str) -> int:
    """Per-device batch of ``name`` when none is given: sized for the platform (``"cpu"`` or an
    accelerator)."""
    return DEFAULT_BATCH["cpu" if platform == "cpu" else "accelerator"][name]


def compiled_bytes(memory_analysis) -> int | None:
    """Per-device bytes the compiled step needs at once, from ``Compiled.memory_analysis()``:
    arguments + outputs - outputs aliased to (donated) arguments + temporaries. None when the
    backend gives no analysis."""
    if memory_analysis is None:
        return None
    m = memory_analysis
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def vision_tokens(model_cfg) -> int:
    """Tokens the vision tower attends over: the patch grid, plus the class token if any."""
    v = model_cfg.vision
    return (v.image_size // v.patch_size) ** 2 + int(v.get("class_token", True))


def attention_plan(model_cfg, lengths: tuple[int, int], platform: str) -> dict[str, dict]:
    """The attention implementation each tower's shapes take on ``platform``: ``{"vision",
    "caption", "element"}`` -> ``{"n", "head_dim", "causal", "impl"}``; ``impl`` is what
    ``umg_jax.ops.attention.attention_implementation`` answers ("cpu_vjp", "xla",
    "pallas_flash", "cudnn"), or "unknown" where that function does not exist. The shapes are
    those of the towers' blocks; MaskCLIP's last vision block also runs a one-query call for the
    class token, which may take another implementation."""
    import jax.numpy as jnp

    try:
        from umg_jax.ops.attention import attention_implementation
    except ImportError:
        attention_implementation = None
    dtype = jnp.dtype(model_cfg.dtype)
    v, t = model_cfg.vision, model_cfg.text
    # ToMe's proportional attention adds a key bias after the merge (training only).
    merge = v.get("merge_after", -1) >= 0 and v.get("merge_ratio", 0.0) > 0
    key_bias = merge and v.get("merge_proportional", True)
    towers = {
        "vision": (vision_tokens(model_cfg), v.width // v.heads, False, key_bias),
        "caption": (lengths[0], t.width // t.heads, bool(t.get("causal", True)), False),
        "element": (lengths[1], t.width // t.heads, bool(t.get("causal", True)), False),
    }
    out = {}
    for name, (n, dh, causal, bias) in towers.items():
        impl = "unknown"
        if attention_implementation is not None:
            impl = attention_implementation(n, n, dh, dtype, platform=platform, causal=causal,
                                            key_bias=bias)
        out[name] = {"n": n, "head_dim": dh, "causal": causal, "impl": impl}
    return out


def compiled_attention(hlo_text: str) -> dict:
    """The attention that a compiled step runs, from its HLO: ``{"impl": "cudnn" |
    "pallas_flash" | "xla", "calls": {custom-call target: count per step}}``."""
    from umg_jax import hlo_stats

    calls = hlo_stats.program_costs(hlo_text)["custom_calls"]
    return {"impl": hlo_stats.attention_kernel(calls),
            "calls": hlo_stats.fused_attention_calls(calls)}


def attention_mismatch(plan: dict[str, dict], ran: str) -> bool:
    """True when the compiled step's attention (``ran``) contradicts the predicted ``plan``
    (``attention_plan``): a kernel ran that no tower was predicted to take, or none ran where
    one was predicted. ``"cpu_vjp"`` is XLA's ops in the HLO."""
    predicted = {"xla" if p["impl"] == "cpu_vjp" else p["impl"] for p in plan.values()}
    if "unknown" in predicted:
        return False
    if ran == "xla":
        return predicted != {"xla"}
    return ran not in predicted


def flops_str(flops: float) -> str:
    """``9.89e14`` -> ``"989 TF/s"``, ``5.3e10`` -> ``"53 GF/s"``."""
    return f"{flops / 1e12:.0f} TF/s" if flops >= 1e12 else f"{flops / 1e9:.0f} GF/s"


def format_table(rows: list[dict]) -> str:
    """The printed table: one line per model row (``run_model`` rows, or ``{"model", "error"}``)."""
    head = (f"{'model':<6}{'devices':<26}{'batch/dev':>10}{'global':>8}{'text L':>8}"
            f"{'img/s':>10}{'MFU':>7}  {'peak FLOP/s':<28}{'attn vision':<14}"
            f"{'attn text':<20}{'attn ran':<15}{'peak mem':<30}{'compile':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<6}error: {r['error']}")
            continue
        dev = f"{r['device_kind']} x{r['num_devices']}"
        att = r["attention"]
        text = f"{att['caption']['impl']} / {att['element']['impl']}"
        lens = "{}/{}".format(*r["text_lengths"])
        peak = (f"{flops_str(r['peak_flops'])} ({r['peak_source']})" if r["peak_flops"]
                else r["peak_source"])
        mfu = f"{100 * r['mfu']:>6.1f}%" if r["mfu"] is not None else f"{'n/a':>7}"
        mem = (f"{r['memory_bytes'] / GIB:.2f} GiB ({r['memory_source']})"
               if r["memory_bytes"] is not None else "n/a")
        ran = r.get("attention_ran")
        ran = ("n/a" if ran is None else ran["impl"]
               + (" !" if attention_mismatch(att, ran["impl"]) else ""))
        lines.append(f"{r['model']:<6}{dev:<26}{r['per_device_batch']:>10}{r['global_batch']:>8}"
                     f"{lens:>8}{r['img_s']:>10.1f}{mfu}  {peak:<28}"
                     f"{att['vision']['impl']:<14}{text:<20}{ran:<15}{mem:<30}"
                     f"{r['compile_s']:>7.1f}s")
    return "\n".join(lines)


# ----------------------------------------------------------- the real step, as the trainer ---


def load_model_config(name: str, per_device_batch: int, num_devices: int):
    """``configs/<model>.py`` for the check: bf16, the global batch, a data-parallel mesh over
    the devices; everything else (loss, optimizer, remat, scan, text trimming) as configured."""
    from umg_jax import config_lib

    c = config_lib.load_config(str(ROOT / MODELS[name]))
    c.batch_size = per_device_batch * num_devices
    c.model.dtype = "bfloat16"
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c


def synthetic_batch(config) -> tuple[dict, tuple[int, int] | None]:
    """One host batch of this process (``batch_size / process_count`` rows, the batch contract
    of ``umg_jax.data.schema``) from the embedded synthetic world through the training
    pipeline (generated on first use, ~10 s), trimmed as the trainer trims it. Returns the
    batch and the ``(caption, element)`` token lengths (None when trimming is off)."""
    import jax

    from umg_jax import step as step_lib
    from umg_jax.data import pipeline

    config.data.read_threads = max(2, min(16, os.cpu_count() or 2))  # one big batch, decoded once
    it = pipeline.make_iterator(config.data, config.model,
                                batch_size=config.batch_size // jax.process_count(),
                                train=True, seed=config.seed)
    host = next(it)
    if hasattr(it, "close"):
        it.close()
    lengths = None
    if step_lib.trim_enabled(config):
        lengths = step_lib.text_lengths(host)
        host = step_lib.trim_text(host, lengths)
    return host, lengths


def build(config, devices) -> dict:
    """Mesh, jitted train step, initial state and device batch, built as ``umg_jax.train.train``
    builds them (random init). Returns ``{"mesh", "step_fn", "state", "batch", "lengths"}``."""
    import jax

    from umg_jax import config_checks, optim, sharding
    from umg_jax import step as step_lib
    from umg_jax.data import schema
    from umg_jax.models import clip

    config_checks.validate(config, num_devices=len(devices))
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    model = clip.build_model(config.model)
    abstract_params = jax.eval_shape(lambda: step_lib.init_params(config, jax.random.key(0)))
    tx, _ = optim.make_optimizer(config.optim, abstract_params, config.total_steps,
                                 freeze=step_lib.frozen_regexes(config))
    state_sh = step_lib.state_shardings(step_lib.abstract_state(config, tx), mesh)
    step_fn = step_lib.make_train_step(model, tx, config, mesh, state_sh,
                                       schema.batch_shapes_from_config(config))
    state = jax.jit(lambda r: step_lib.init_state(step_lib.init_params(config, r), tx),
                    out_shardings=state_sh)(jax.random.key(config.seed))
    host, lengths = synthetic_batch(config)
    batch = sharding.put_batch(host, mesh)
    return {"mesh": mesh, "step_fn": step_fn, "state": state, "batch": batch,
            "lengths": lengths}


def compile_step(step_fn, state, batch) -> tuple[object, float]:
    """Ahead-of-time ``lower`` + ``compile`` of the step; returns the compiled step and the
    seconds it took (tracing included)."""
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    return compiled, time.perf_counter() - t0


def device_peak_bytes(devices) -> int | None:
    """Largest ``peak_bytes_in_use`` over ``devices`` (this process's peak so far), or None when
    the backend keeps no memory statistics (XLA:CPU)."""
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def run_model(name: str, per_device_batch: int | None, steps: int, warmup: int) -> dict:
    """Builds, compiles and times model ``name`` on all local devices; returns its row."""
    import jax
    import numpy as np

    from umg_jax import metrics
    from umg_jax import step as step_lib
    from umg_jax.ops import platform as platform_lib

    jax.config.update("jax_threefry_partitionable", True)  # as umg_jax.train does
    devices = jax.local_devices()
    plat = platform_lib.of_devices(devices)
    per_device_batch = per_device_batch or default_batch(name, plat)
    c = load_model_config(name, per_device_batch, len(devices))
    print(f"{name}: {len(devices)} x {devices[0].device_kind}, global batch {c.batch_size}, "
          "building...", flush=True)
    parts = build(c, devices)
    batch_arrays = parts["batch"]
    lengths = (batch_arrays["text"].shape[-1], batch_arrays["tags"].shape[-1])  # after trimming
    attention = attention_plan(c.model, lengths, plat)
    compiled, compile_s = compile_step(parts["step_fn"], parts["state"], parts["batch"])
    print(f"{name}: compiled in {compile_s:.1f} s, text lengths {lengths}", flush=True)
    ran = compiled_attention(compiled.as_text())
    if attention_mismatch(attention, ran["impl"]):
        print(f"{name}: attention predicted {attention}, the compiled step runs {ran}",
              file=sys.stderr, flush=True)
    state, batch = parts["state"], parts["batch"]
    times, out = [], {}
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, out = compiled(state, batch)
        jax.block_until_ready(out["loss"])  # sync every step (bounded dispatch queue)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = step_lib.step_flops(c, parts["lengths"])
    peak, source = metrics.mfu_peak(devices, c.model.dtype)  # the trainer's MFU denominator
    analysis = compiled.memory_analysis()
    memory, mem_source = device_peak_bytes(devices), "device peak"
    if memory is None:
        memory, mem_source = compiled_bytes(analysis), "compiled estimate"
    loss = float(np.asarray(out["loss"]))
    row = {
        "model": name, "config": MODELS[name], "platform": plat,
        "device_kind": devices[0].device_kind, "num_devices": len(devices),
        "per_device_batch": per_device_batch, "global_batch": c.batch_size,
        "dtype": c.model.dtype, "remat": bool(c.model.remat), "scan": bool(c.model.scan),
        "data": "synthetic (umg_jax.data.pipeline, train=True), one batch reused",
        "text_lengths": list(lengths), "trimmed": parts["lengths"] is not None,
        "steps": steps, "warmup": warmup, "step_times_s": times, "step_s": step_s,
        "img_s": c.batch_size / step_s, "flops_per_step": flops, "peak_flops": peak,
        "peak_source": source, "mfu": metrics.mfu(flops, step_s, peak) if peak else None,
        "attention": attention, "attention_ran": ran,
        "attention_mismatch": attention_mismatch(attention, ran["impl"]),
        "memory_bytes": memory, "memory_source": mem_source,
        "compiled_memory": None if analysis is None else {
            k: int(getattr(analysis, k)) for k in (
                "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes")},
        "compiled_bytes": compiled_bytes(analysis), "compile_s": compile_s,
        "loss": loss, "grad_norm": float(np.asarray(out["grad_norm"])),
        "skipped": int(np.asarray(out["skipped"])),
    }
    print(f"{name}: {row['img_s']:.1f} img/s, step {1e3 * step_s:.0f} ms, loss {loss:.4f}",
          flush=True)
    return row


# ------------------------------------------------------------------------------- driver ---


def _run_child(name: str, args: argparse.Namespace, batch: int | None) -> dict:
    """Runs one model in a fresh process (own device-memory peak; an OOM stays in its row)."""
    with tempfile.TemporaryDirectory() as tmp:
        row_out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--models", name,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--row_out", row_out]
        if batch is not None:
            cmd += ["--batch", str(batch)]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, check=False)
        if proc.returncode == 0 and os.path.exists(row_out):
            with open(row_out) as f:
                return json.load(f)
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-15:]
    print(f"{name}: failed (exit {proc.returncode}):\n  " + "\n  ".join(tail), file=sys.stderr)
    return {"model": name, "error": tail[-1][:200] if tail else f"exit {proc.returncode}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,b16", help="comma list of " + ", ".join(MODELS))
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    ap.add_argument("--batch", default="",
                    help="per-device batch: one int for every model, or name=size,...; default "
                    "tiny=1024,b16=256 on accelerators, tiny=32,b16=8 on CPU")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/accelerator_check.json"))
    ap.add_argument("--row_out", default="", help=argparse.SUPPRESS)  # child: one model's row
    args = ap.parse_args(argv)
    try:
        models = parse_models(args.models)
        batches = parse_batch(args.batch, models)
    except ValueError as e:
        ap.error(str(e))
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.row_out:  # child process: exactly one model
        row = run_model(models[0], batches.get(models[0]), args.steps, args.warmup)
        with open(args.row_out, "w") as f:
            json.dump(row, f)
        return 0
    # The parent never touches a device: a GPU backend here would hold memory the children need.
    rows = [_run_child(m, args, batches.get(m)) for m in models]
    print("\n" + format_table(rows))
    ok = [r for r in rows if "error" not in r]
    payload = {
        "platform": ok[0]["platform"] if ok else None,
        "device_kind": ok[0]["device_kind"] if ok else None,
        "num_devices": ok[0]["num_devices"] if ok else None, "rows": rows,
    }
    print(f"wrote {write_result(args.out, payload)}")
    return 0 if ok and len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
