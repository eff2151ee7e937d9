"""UMG vs CLIP in miniature: what each granularity of supervision buys, on the synthetic world.

    python benchmarks/granularity_ablation.py [--steps 400] [--out benchmarks/results]

Trains the tiny model for the same number of steps with
  (a) image-level losses only (caption + image tags: plain CLIP),
  (b) (a) + region loss (RoIAlign embeddings <-> region phrases),
  (c) (b) + pixel losses (mask-pooled embeddings <-> mask texts, per-patch term),
evaluates all five tasks on the held-out synthetic split and prints the table; writes
``granularity_ablation.json`` (with provenance: command, commit, date, machine) and a bar chart
``granularity_ablation.png`` to ``--out``. With ``--workdir``, runs that finished there before
(a checkpoint at ``--steps``) are evaluated again without retraining (their training time is read
back from ``train_seconds.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {
    "a_image": {"loss.w_region": 0.0, "loss.w_mask": 0.0, "loss.w_pixel": 0.0},
    "b_+region": {"loss.w_mask": 0.0, "loss.w_pixel": 0.0},
    "c_+region+pixel": {},
}
SHOWN = ("zeroshot/top1", "retrieval/i2t_r1", "retrieval/t2i_r1", "region/box_acc",
         "region/mask_acc", "semseg/miou", "panoptic/pq")


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        config = config[p]
    config[leaf] = value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="training steps per variant")
    ap.add_argument("--num_examples", type=int, default=256, help="held-out examples")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--workdir", default="", help="keep the runs here (default: a temp dir); "
                    "finished runs are reused")
    args = ap.parse_args(argv)

    from umg_jax import config_lib, evaluate, train

    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="umg_ablation-"))
    rows = {}
    for name, over in VARIANTS.items():
        config = config_lib.load_config(str(ROOT / "configs" / "tiny.py"))
        config.total_steps = args.steps
        config.optim.warmup_steps = min(config.optim.warmup_steps, args.steps // 10)
        config.ckpt.every_steps = args.steps
        config.log.tensorboard = False
        for k, v in over.items():
            _set(config, k, v)
        wd = root / name
        timing = wd / "train_seconds.json"
        if not ((wd / "checkpoints" / str(args.steps)).is_dir() and timing.is_file()):
            t0 = time.perf_counter()
            train.train(config, str(wd))
            timing.write_text(json.dumps(time.perf_counter() - t0))
        res = evaluate.run(str(wd), config=config, num_examples=args.num_examples)
        res["train_seconds"] = json.loads(timing.read_text())
        rows[name] = res
        print(f"{name}: " + " ".join(f"{k}={res.get(k, float('nan')):.3f}" for k in SHOWN),
              flush=True)

    keys = [k for k in SHOWN if any(k in r for r in rows.values())]
    head = f"{'variant':<18}" + "".join(f"{k:>18}" for k in keys)
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in rows.items():
        print(f"{name:<18}" + "".join(f"{r.get(k, float('nan')):>18.3f}" for k in keys))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"steps": args.steps, "num_examples": args.num_examples, "config": "configs/tiny.py",
               "variants": VARIANTS, "results": rows}
    write_result(out / "granularity_ablation.json", payload)
    _bar_chart(rows, keys, out / "granularity_ablation.png")
    print(f"\nwrote {out / 'granularity_ablation.json'} and .png (runs in {root})")
    return 0


def _bar_chart(rows: dict, keys: list[str], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 3.8))
    x = np.arange(len(keys))
    w = 0.8 / len(rows)
    for i, (name, r) in enumerate(rows.items()):
        ax.bar(x + i * w, [r.get(k, 0.0) for k in keys], w, label=name)
    ax.set_xticks(x + w * (len(rows) - 1) / 2, keys, rotation=15, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("tiny UMG-CLIP on held-out synthetic data: supervision granularity ablation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("UMG_JAX_CACHE", str(pathlib.Path.home() / ".cache" / "umg_jax"))
    sys.exit(main())
