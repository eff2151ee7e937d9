"""Cost of the image tower with 0 / 25 / 50 % of the patch tokens merged away.

    python benchmarks/token_merge.py [--models tiny,b16] [--steps 3] [--quality_steps 0]

For each model: XLA cost-analysis FLOPs and the median time of one image-tower forward + backward
(loss = sum of squares of the global and dense embeddings) with ``model.vision.merge_ratio`` 0,
0.25, 0.5 (merge after block ``int(L * merge_at)``, default ``L // 6``; the grid is restored
after the last block). With
``--quality_steps N`` it also trains the tiny model N steps at 0 % and 50 % and evaluates both on
held-out synthetic data (the five tasks); add ``--wallclock_s S`` to give both runs the same
training time instead (the schedule is still that of N steps); ``--models ''`` skips the tower
timings (quality only). Prints a table, writes ``--out`` (default
``benchmarks/results/token_merge.json``) through ``provenance.write_result``: everything in it
comes from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {"tiny": ("configs/tiny.py", 32), "b16": ("configs/vit_b16.py", 8)}
RATIOS = (0.0, 0.25, 0.5)


MERGE_AT = 1 / 6  # default --merge_at: merge after block int(L * merge_at)


def _model_cfg(name: str, ratio: float, merge_at: float):
    from umg_jax import config_lib

    c = config_lib.load_config(str(ROOT / MODELS[name][0]))
    m = c.model
    m.scan, m.remat, m.dtype = False, False, "float32"
    m.vision.merge_after = int(m.vision.layers * merge_at) if ratio > 0 else -1
    m.vision.merge_ratio = ratio
    return c


def tower_cost(name: str, ratio: float, steps: int, merge_at: float) -> dict:
    import jax
    import jax.numpy as jnp

    from umg_jax.models import clip

    m = _model_cfg(name, ratio, merge_at).model
    batch = MODELS[name][1]
    params = clip.init_params(m, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (batch, m.vision.image_size,
                                                   m.vision.image_size, 3))
    model = clip.build_model(m)

    def loss(p, x):
        out = model.apply({"params": p}, x, method=clip.CLIP.encode_image)
        return jnp.sum(out["img"] ** 2) + jnp.sum(out["dense"] ** 2)

    fn = jax.jit(jax.value_and_grad(loss))
    compiled = fn.lower(params, images).compile()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, images))
        if i:
            times.append(time.perf_counter() - t0)
    return {"flops": float(cost.get("flops", 0.0)), "step_s": statistics.median(times),
            "batch": batch, "merge_after": m.vision.merge_after}


def quality(steps: int, merge_at: float, budget_s: float = 0.0) -> dict:
    from umg_jax import evaluate, train

    out = {}
    root = pathlib.Path(tempfile.mkdtemp(prefix="umg_merge-"))
    for ratio in (0.0, 0.5):
        c = _model_cfg("tiny", ratio, merge_at)
        c.total_steps = steps
        c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 10)
        c.ckpt.every_steps = steps
        c.log.tensorboard = False
        c.train.time_budget_s = budget_s  # equal wall-clock comparison when > 0
        wd = root / f"r{ratio}"
        t0 = time.perf_counter()
        train.train(c, str(wd))
        res = evaluate.run(str(wd), config=c)
        res["train_seconds"] = time.perf_counter() - t0
        res["merge_after"] = c.model.vision.merge_after
        res["steps_done"] = json.loads((wd / "final_metrics.json").read_text())["step"]
        out[str(ratio)] = res
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,b16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quality_steps", type=int, default=0)
    ap.add_argument("--train_step", action="store_true",
                    help="also time the whole UMG train step at 0 %% and 50 %%")
    ap.add_argument("--dedup", type=float, default=0.0,
                    help="with --train_step: loss.text_dedup_frac of both runs (0 = off)")
    ap.add_argument("--phrases", type=int, default=0,
                    help="with --train_step: tag / region / mask texts from this many phrases")
    ap.add_argument("--lengths", default="",
                    help="with --train_step: caption,element text lengths, batch trimmed as the "
                    "trainer does (data.trim_text); '' = every token column used")
    ap.add_argument("--wallclock_s", type=float, default=0.0,
                    help="with --quality_steps: stop each run after this many seconds instead")
    ap.add_argument("--merge_at", type=float, default=MERGE_AT,
                    help="merge after block int(layers * this) (0 = after the first block)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/token_merge.json"))
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    load_before = os.getloadavg()
    rows = []
    for name in models:
        base = None
        for r in RATIOS:
            c = tower_cost(name, r, args.steps, args.merge_at)
            base = base or c
            row = {"model": name, "ratio": r, **c, "flops_ratio": c["flops"] / base["flops"],
                   "speedup": base["step_s"] / c["step_s"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<6}{'removed':>9}{'GFLOP':>10}{'FLOP ratio':>12}{'step s':>9}{'speedup':>9}")
    for r in rows:
        print(f"{r['model']:<6}{100 * r['ratio']:>8.0f}%{r['flops'] / 1e9:>10.1f}"
              f"{r['flops_ratio']:>12.2f}{r['step_s']:>9.3f}{r['speedup']:>9.2f}")
    payload = {"merge_at": args.merge_at, "load_avg_before": load_before, "rows": rows}
    if args.train_step:
        # the whole UMG train step (both towers, all losses, AdamW), 0 % vs 50 % merged
        from train_step import time_ours

        steps_rows = []
        for name in models:
            b = MODELS[name][1]
            layers = _model_cfg(name, 0.0, args.merge_at).model.vision.layers
            dd = {"loss.text_dedup_frac": args.dedup}
            lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else None
            base = time_ours(name, b, args.steps, umg=True, overrides=dd, phrases=args.phrases,
                             lengths=lengths)
            half = time_ours(name, b, args.steps, umg=True, phrases=args.phrases, overrides={
                **dd, "model.vision.merge_after": int(layers * args.merge_at),
                "model.vision.merge_ratio": 0.5},
                lengths=lengths)
            steps_rows.append({"model": name, "batch": b, "step_s_0": base["step_s"],
                               "step_s_50": half["step_s"], "text_dedup_frac": args.dedup,
                               "phrases": args.phrases, "lengths": lengths,
                               "merge_after": int(layers * args.merge_at),
                               "speedup": base["step_s"] / half["step_s"]})
            print(f"{name}: full UMG train step {base['step_s']:.3f}s -> {half['step_s']:.3f}s "
                  f"at 50 % merged ({base['step_s'] / half['step_s']:.2f}x)", flush=True)
        key = "train_step" + ("_dedup" if args.dedup else "") + ("_trim" if args.lengths else "")
        payload[key] = steps_rows
    if args.quality_steps:
        payload["quality"] = q = quality(args.quality_steps, args.merge_at, args.wallclock_s)
        keys = ("retrieval/i2t_r1", "region/box_acc", "region/mask_acc", "semseg/miou",
                "panoptic/pq", "train_seconds", "steps_done")
        print("\nquality after", args.quality_steps, "steps (tiny):")
        for ratio, res in q.items():
            print(f"  {float(ratio):.0%} removed: " + " ".join(f"{k}={res[k]:.3f}" for k in keys))
    print(f"wrote {write_result(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
