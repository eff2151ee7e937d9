"""Pseudo-labels close part of the gap: image-only teacher -> pseudo-labels -> UMG retraining.

    python benchmarks/pseudo_label_loop.py [--steps 400] [--reuse /tmp/ablation]

On the synthetic world: (a) train tiny with image-level losses only; pseudo-label the training
images with it (``umg_jax.data.pseudo_label``, vocabulary = the category names, captions kept);
(p) retrain tiny with all UMG losses on the pseudo-labels; (b) train tiny with all UMG losses on
the ground-truth labels. All evaluated on the same held-out split. ``--reuse DIR`` takes (a) and
(b) from a ``granularity_ablation.py --workdir DIR`` run (its ``a_image`` and
``c_+region+pixel``). Prints the table, writes ``benchmarks/results/pseudo_label_loop.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYS = ("zeroshot/top1", "retrieval/i2t_r1", "region/box_acc", "region/mask_acc", "semseg/miou",
        "panoptic/pq")


def _config(steps: int, **over):
    from umg_jax import config_lib

    c = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    c.total_steps = steps
    c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 10)
    c.ckpt.every_steps = steps
    c.log.tensorboard = False
    for k, v in over.items():
        node = c
        *ps, leaf = k.split(".")
        for p in ps:
            node = node[p]
        node[leaf] = v
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--reuse", default="", help="granularity_ablation.py workdir with a / c runs")
    ap.add_argument("--threshold", type=float, default=0.3, help="pseudo-label probability")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pseudo_label_loop.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from umg_jax import evaluate, train
    from umg_jax.data import pipeline, synthetic
    from umg_jax.data import pseudo_label as pl
    from umg_jax.inference import load

    root = pathlib.Path(tempfile.mkdtemp(prefix="umg_pl_loop-"))
    image_only = {"loss.w_region": 0.0, "loss.w_mask": 0.0, "loss.w_pixel": 0.0}
    runs = {}
    if args.reuse:
        reuse = pathlib.Path(args.reuse)
        wd_a, wd_b = reuse / "a_image", reuse / "c_+region+pixel"
    else:
        wd_a, wd_b = root / "a", root / "b"
        train.train(_config(args.steps, **image_only), str(wd_a))
        train.train(_config(args.steps), str(wd_b))
    cfg = _config(args.steps)
    runs["a_image_only"] = evaluate.run(str(wd_a), config=cfg)
    runs["b_ground_truth"] = evaluate.run(str(wd_b), config=cfg)

    # pseudo-label the training images with the image-only teacher
    train_dir = pipeline.ensure_data(cfg.data, "train")
    vocab = [c["name"] for c in synthetic.CATEGORIES]
    t0 = time.perf_counter()
    scorer = pl.Scorer(load(str(wd_a)), vocab)
    pl_dir = root / "pseudo"
    ns = argparse.Namespace(threshold=args.threshold, top_k=6, nms_iou=0.5, mask_iou=0.7,
                            caption_threshold=-1.0, min_area=0.01, batch=16, shard_size=512,
                            teacher=str(wd_a))
    counts = pl.run(pl.list_inputs(train_dir), scorer, vocab, str(pl_dir), ns,
                    log=lambda s: print(s, flush=True))
    label_s = time.perf_counter() - t0
    wd_p = root / "p"
    train.train(_config(args.steps, **{"data.path": str(pl_dir)}), str(wd_p))
    runs["p_pseudo_labels"] = evaluate.run(str(wd_p), config=cfg)

    head = f"{'run':<18}" + "".join(f"{k:>18}" for k in KEYS)
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in runs.items():
        print(f"{name:<18}" + "".join(f"{r[k]:>18.3f}" for k in KEYS))
    gap = {k: (runs["p_pseudo_labels"][k] - runs["a_image_only"][k])
           / max(runs["b_ground_truth"][k] - runs["a_image_only"][k], 1e-9) for k in KEYS}
    print(f"{'gap recovered':<18}" + "".join(f"{100 * gap[k]:>17.0f}%" for k in KEYS))
    pathlib.Path(args.out).write_text(json.dumps(
        {"steps": args.steps, "threshold": args.threshold, "pseudo_label_counts": counts,
         "pseudo_label_seconds": label_s, "runs": runs, "gap_recovered": gap}, indent=1))
    print(f"wrote {args.out} (runs in {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
