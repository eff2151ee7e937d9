"""ViT-L/14 smoke test: one real train step of ``configs/vit_l.py`` on this machine's device(s).

    python benchmarks/vit_l_smoke.py [--batch 2] [--out benchmarks/results/vit_l_smoke.json]

The flagship config as it trains on a pod (remat, scan over blocks, bfloat16 compute, layer-wise
lr decay, the full UMG loss, text trimming), with only what one host needs changed: the global
batch (``--batch``) and the mesh (data-parallel over the local devices instead of ``fsdp=8``).
Random-initialised params; one batch of the embedded synthetic world at 224 px from the real
Grain training pipeline, trimmed as the trainer trims it; the step is
``umg_jax.step.make_train_step``, built as ``umg_jax.train`` builds it
(``benchmarks/accelerator_check.py:build``). Compile (``lower`` + ``compile``) and the step are
timed separately. Peak RSS is the process's high-water mark (``getrusage``): init, compile and
step together. Prints one line and writes a JSON record.
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import resource
import sys
import time

from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/vit_l.py"
GIB = 1024 ** 3


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summary_line(r: dict) -> str:
    """The one printed result line of a ``smoke`` record."""
    finite = "finite" if r["finite"] else "NOT finite"
    return (f"vit_l smoke: 1 step, batch {r['batch']}, loss {r['loss']:.4f} ({finite}), "
            f"grad_norm {r['grad_norm']:.4g}, compile {r['compile_s']:.0f} s, "
            f"step {r['step_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / GIB:.1f} GiB")


def smoke(batch: int) -> dict:
    """Builds, compiles and runs one step of ViT-L/14 at global ``batch``; returns the record."""
    import jax
    import numpy as np
    from accelerator_check import build, compile_step, compiled_bytes

    from umg_jax import config_lib, optim
    from umg_jax.ops import platform as platform_lib

    jax.config.update("jax_threefry_partitionable", True)  # as umg_jax.train does
    devices = jax.local_devices()
    c = config_lib.load_config(str(ROOT / CONFIG))
    c.batch_size = batch
    c.mesh.update(data=-1, fsdp=1, tensor=1)  # fsdp=8 needs 8 devices; params fit one host
    t0 = time.perf_counter()
    parts = build(c, devices)
    jax.block_until_ready(parts["state"])
    build_s = time.perf_counter() - t0
    rss_built = peak_rss_bytes()
    print(f"built state + batch in {build_s:.0f} s (peak RSS {rss_built / GIB:.1f} GiB); "
          "compiling...", flush=True)
    compiled, compile_s = compile_step(parts["step_fn"], parts["state"], parts["batch"])
    rss_compiled = peak_rss_bytes()
    print(f"compiled in {compile_s:.0f} s (peak RSS {rss_compiled / GIB:.1f} GiB); one step...",
          flush=True)
    n_params = optim.count_params(parts["state"].params)
    t0 = time.perf_counter()
    state, metrics = compiled(parts["state"], parts["batch"])
    metrics = jax.device_get(metrics)
    step_s = time.perf_counter() - t0
    del state
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    analysis = compiled.memory_analysis()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__, "config": CONFIG,
        "platform": platform_lib.of_devices(devices), "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "overrides": {"batch_size": batch, "mesh": {"data": -1, "fsdp": 1, "tensor": 1}},
        "model": {"dtype": c.model.dtype, "remat": bool(c.model.remat),
                  "remat_policy": c.model.remat_policy, "scan": bool(c.model.scan),
                  "params": int(n_params)},
        "data": "embedded synthetic world, umg_jax.data.pipeline train=True (224 px)",
        "text_lengths": [int(parts["batch"]["text"].shape[-1]),
                         int(parts["batch"]["tags"].shape[-1])],
        "batch": batch, "loss": scalars["loss"], "grad_norm": scalars["grad_norm"],
        "finite": math.isfinite(scalars["loss"]) and math.isfinite(scalars["grad_norm"]),
        "skipped": int(scalars["skipped"]), "metrics": scalars,
        "build_s": build_s, "compile_s": compile_s, "step_s": step_s,
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_after_build_bytes": rss_built,
        "peak_rss_after_compile_bytes": rss_compiled,
        "compiled_bytes": compiled_bytes(analysis),
        "compiled_memory": None if analysis is None else {
            k: int(getattr(analysis, k)) for k in (
                "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2, help="global batch (a multiple of the "
                    "local device count)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/vit_l_smoke.json"))
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    record = smoke(args.batch)
    print(summary_line(record), flush=True)
    print(f"wrote {write_result(args.out, record)}")
    return 0 if record["finite"] and record["skipped"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
