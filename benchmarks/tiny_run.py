"""The tiny UMG-CLIP of the README's command 1, trained and measured end to end on this machine.

    python benchmarks/tiny_run.py [--workdir /tmp/umg_tiny] [--suite_num 200]

Runs, each as its own command line exactly as a user types it (so the numbers are those of the
shipped tools, not of a copy): ``python -m umg_jax.train --config configs/tiny.py --workdir W``
(skipped when ``W`` already holds a finished run), ``python -m umg_jax.evaluate --workdir W``
(the held-out split: zero-shot, retrieval, region, mIoU, PQ with the ground-truth masks as
proposals), then ``python -m umg_jax.downstream.synthetic_layouts`` and ``python -m
umg_jax.downstream --suite`` (the benchmark suite on held-out scenes written in the data sets'
layouts; PQ there from predicted segments). Writes ``benchmarks/results/tiny_run.json``: the
training's final metrics and wall time, the evaluation's metrics and every suite task's record.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> float:
    """Runs ``python -m ...`` in the repository root; its wall time in seconds."""
    print("+ python " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/umg_tiny")
    ap.add_argument("--suite_dir", default="/tmp/umg_bench")
    ap.add_argument("--suite_num", type=int, default=200, help="held-out scenes of the suite")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/tiny_run.json"))
    args = ap.parse_args(argv)
    wd = pathlib.Path(args.workdir)
    final = wd / "final_metrics.json"
    train_s = None
    if not final.exists():
        train_s = _run(["-m", "umg_jax.train", "--config", "configs/tiny.py", "--workdir", str(wd)])
    train_metrics = json.loads(final.read_text())
    eval_s = _run(["-m", "umg_jax.evaluate", "--workdir", str(wd)])
    evals = sorted((wd / "eval").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    evaluation = json.loads(evals[-1].read_text())
    _run(["-m", "umg_jax.downstream.synthetic_layouts", "--out", args.suite_dir,
          "--num", str(args.suite_num)])
    suite_s = _run(["-m", "umg_jax.downstream", "--workdir", str(wd), "--suite",
                    str(pathlib.Path(args.suite_dir) / "suite.json")])
    bench = sorted((wd / "benchmark").glob("*/"), key=lambda p: p.stat().st_mtime)[-1]
    suite = {p.stem: json.loads(p.read_text()) for p in sorted(bench.glob("*.json"))}
    result = {"workdir": str(wd), "config": "configs/tiny.py",
              "train": {"seconds": train_s, "reused_existing_run": train_s is None,
                        "final_metrics": train_metrics},
              "evaluate": {"seconds": eval_s, **evaluation},
              "suite": {"seconds": suite_s, "num_scenes": args.suite_num, "tasks": suite,
                        "table_md": (bench / "table.md").read_text()}}
    print(f"wrote {write_result(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
