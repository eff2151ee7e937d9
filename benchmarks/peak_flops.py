"""The CPU MFU denominator against numpy: is ``metrics.measure_peak_flops`` the host's matmul rate?

    python benchmarks/peak_flops.py [--n 1024] [--repeats 5]

On CPU the trainer measures its MFU peak (``metrics.mfu_peak``): every local device multiplies
its own ``[n, n]`` pair. With fake devices sharing the cores, the sum over devices should come
out near what numpy's BLAS does with one matmul of the same size on the same cores. This used to
be a test; a timing comparison failed on a fresh clone of a busy machine, so it is measured here.
On TPU / GPU the peak comes from ``umg_jax/accelerators.toml`` and nothing is timed. Prints a
table, writes ``benchmarks/results/peak_flops.json``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np
from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]


def numpy_rate(n: int, repeats: int, dtype=np.float32) -> float:
    """Best-of-``repeats`` FLOP/s of one ``[n, n] @ [n, n]`` numpy matmul."""
    a = np.ones((n, n), dtype)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="matrix size")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs (best kept)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/peak_flops.json"))
    args = ap.parse_args(argv)
    if args.n < 64 or args.repeats < 1:
        ap.error("--n must be >= 64 and --repeats >= 1")
    import jax

    from umg_jax import metrics

    ours = {dt: metrics.measure_peak_flops(args.n, args.repeats, dt)
            for dt in ("float32", "bfloat16")}
    ref = numpy_rate(args.n, args.repeats)
    rows = [("numpy float32 (one matmul)", ref, 1.0)]
    rows += [(f"measure_peak_flops {dt} ({jax.device_count()} device(s))", v, v / ref)
             for dt, v in ours.items()]
    print(f"{'what':<48} {'GFLOP/s':>9} {'/ numpy':>8}")
    for name, rate, ratio in rows:
        print(f"{name:<48} {rate / 1e9:>9.0f} {ratio:>8.2f}")
    f32_ratio = ours["float32"] / ref
    print(f"float32 within 3x of numpy: {'yes' if 1 / 3 < f32_ratio < 3 else 'NO'} "
          f"(OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')!r} slows numpy here)")
    write_result(args.out, {"n": args.n, "devices": jax.device_count(), "numpy_float32": ref,
                            "measured": ours, "float32_over_numpy": f32_ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
