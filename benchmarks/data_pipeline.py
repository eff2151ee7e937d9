"""Input-pipeline throughput: examples/s of the Grain pipeline (decode, augment, tokenise, pad).

    python benchmarks/data_pipeline.py [--batches 8] [--workers 0,1,2] [--out FILE]

Settings: "tiny" (configs/tiny.py: 64 px, patch 8, L = 32) and "224" (configs/vit_b16.py:
224 px, patch 16, L = 77), both on the embedded synthetic world (boxes and masks), train mode
(random resized crop + flip). For each worker count the first batches (worker start-up, warm
caches) are excluded from the timing. Writes a table to stdout and JSON to
benchmarks/results/data_pipeline.json (``provenance.write_result``: command line, commit, date,
machine).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _settings():
    """The shipped configs' model sections (image size, patch, context length)."""
    from umg_jax.configs import tiny, vit_b16

    return {"tiny": tiny.get_config().model, "224": vit_b16.get_config().model}


def run(batches: int, warmup: int, batch_size: int, workers: list[int], num: int) -> list[dict]:
    from umg_jax.configs import common
    from umg_jax.data import pipeline

    rows = []
    for name, model_cfg in _settings().items():
        data_cfg = common.data_config()
        data_cfg.synthetic_num_train = num
        if "synthetic_image_size" in data_cfg and name == "224":
            data_cfg.synthetic_image_size = 256  # source images larger than the output
        t0 = time.perf_counter()
        path = pipeline.ensure_data(data_cfg, "train")
        gen_s = time.perf_counter() - t0
        for w in workers:
            data_cfg.num_workers = w
            it = pipeline.make_iterator(data_cfg, model_cfg, batch_size=batch_size, train=True,
                                        seed=0, path=path, process_index=0, process_count=1)
            try:
                t0 = time.perf_counter()
                for _ in range(warmup):
                    next(it)
                t1 = time.perf_counter()
                for _ in range(batches):
                    b = next(it)
                t2 = time.perf_counter()
            finally:
                it.close()
            eps = batches * batch_size / (t2 - t1)
            row = {
                "setting": name,
                "image_size": int(model_cfg.vision.image_size),
                "workers": w,
                "batch_size": batch_size,
                "examples_per_s": round(eps, 1),
                "ms_per_example": round(1000 / eps, 2),
                "startup_s": round(t1 - t0, 2),
                "regions_per_example": round(float(b["region_valid"].sum(1).mean()), 2),
                "masks_per_example": round(float(b["mask_valid"].sum(1).mean()), 2),
                "data_gen_s": round(gen_s, 2),
            }
            rows.append(row)
            print(f"  {name:5s} workers={w}: {eps:8.1f} ex/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--num", type=int, default=256, help="synthetic examples to generate")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/data_pipeline.json"))
    args = ap.parse_args()

    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain workers read absl flags
    os.environ.setdefault("UMG_JAX_CACHE", str(pathlib.Path(tempfile.gettempdir()) / "umg_bench"))

    load_before = os.getloadavg()
    rows = run(args.batches, args.warmup, args.batch_size,
               [int(w) for w in args.workers.split(",")], args.num)
    print(f"\n{'setting':8s} {'px':>4s} {'workers':>7s} {'ex/s':>8s} {'ms/ex':>7s} "
          f"{'regions':>7s} {'masks':>6s} {'startup s':>9s}")
    for r in rows:
        print(f"{r['setting']:8s} {r['image_size']:4d} {r['workers']:7d} "
              f"{r['examples_per_s']:8.1f} {r['ms_per_example']:7.2f} "
              f"{r['regions_per_example']:7.2f} {r['masks_per_example']:6.2f} "
              f"{r['startup_s']:9.2f}")
    meta = {"load_avg_before": load_before, "results": rows}
    print(f"wrote {write_result(args.out, meta)}")


if __name__ == "__main__":
    main()
