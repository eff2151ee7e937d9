"""Does encoding each distinct text once (``loss.free_text_frac < 1``, models/text_slots.py)
leave training where encoding every slot puts it?

    python benchmarks/text_ids.py [--steps 600] [--frac 0.2]

1. **One batch**: the tiny model's UMG loss and gradients on a batch of the synthetic world, by
   the id path and by the every-slot path (largest relative difference of the loss and of any
   gradient leaf), and how many element rows each path encodes.
2. **Whole runs**: ``python -m umg_jax.train --config configs/tiny.py`` for ``--steps`` steps,
   every slot (seeds 0 and 1: the run-to-run noise) and the id path (seed 0), then
   ``python -m umg_jax.evaluate`` on each: held-out metrics side by side, with the wall time.
Writes ``benchmarks/results/text_ids.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLAIN = ["--config.loss.text_dedup_frac=0.0", "--config.loss.free_text_frac=1.0"]


def one_batch(frac: float) -> dict:
    import jax
    import numpy as np

    from umg_jax import config_lib, sharding
    from umg_jax import step as step_lib
    from umg_jax.data import pipeline, synthetic
    from umg_jax.models import clip

    c = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    c.data.num_workers = 0
    c.loss.text_dedup_frac = 0.0
    with tempfile.TemporaryDirectory() as d:
        synthetic.write_synthetic(d, 64, split="train")
        batch = next(pipeline.make_iterator(c.data, c.model, batch_size=c.batch_size, train=True,
                                            seed=0, path=d, process_index=0, process_count=1))
        vocab = pipeline.text_vocab_tokens(c.data, c.model, pipeline.text_vocabulary(d))
    model = clip.build_model(c.model)
    params = clip.init_params(c.model, jax.random.key(0))
    mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
    out = {}
    for name, f, tv in (("every_slot", 1.0, None), ("ids", frac, vocab)):
        cfg = c.copy_and_resolve_references()
        cfg.loss.free_text_frac = f
        fn = step_lib.make_loss_fn(model, cfg, mesh, text_vocab=tv)
        (loss, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)
        out[name] = (float(loss), jax.tree.leaves(grads))
    (l0, g0), (l1, g1) = out["every_slot"], out["ids"]
    diff = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(g1, g0, strict=True)))
    norm = np.sqrt(sum(float(np.sum(b ** 2)) for b in g0))
    # per leaf, relative to the leaf's own norm; leaves whose gradient is zero in exact
    # arithmetic (attention key biases: softmax ignores a shift of every key) hold only float
    # noise (~1e-8 here) and are skipped: under 1e-4 of the global norm
    leaf = max(float(np.linalg.norm(a - b) / np.linalg.norm(b))
               for a, b in zip(g1, g0, strict=True) if np.linalg.norm(b) > 1e-4 * norm)
    c.loss.free_text_frac = frac
    k, kf = step_lib.text_budgets(c, len(vocab), 1)
    slots = c.batch_size * step_lib.element_slots(c)
    return {"loss_every_slot": l0, "loss_ids": l1, "loss_rel_diff": abs(l1 - l0) / abs(l0),
            "grad_rel_diff": diff / norm, "grad_worst_leaf_rel_diff": leaf,
            "element_slots": slots, "element_rows_ids": k + kf, "vocab_size": int(len(vocab))}


def run(workdir: pathlib.Path, overrides: list[str], steps: int) -> dict:
    cmd = [sys.executable, "-m", "umg_jax.train", "--config", "configs/tiny.py", "--workdir",
           str(workdir), f"--config.total_steps={steps}", *overrides]
    print("+ " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    train_s = time.perf_counter() - t0
    subprocess.run([sys.executable, "-m", "umg_jax.evaluate", "--workdir", str(workdir)],
                   cwd=ROOT, check=True)
    evals = sorted((workdir / "eval").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    final = json.loads((workdir / "final_metrics.json").read_text())
    return {"overrides": overrides, "train_s": train_s, "final_loss": final.get("loss"),
            "eval": json.loads(evals[-1].read_text())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600,
                    help="training steps of each run (0: the one-batch comparison alone)")
    ap.add_argument("--frac", type=float, default=0.2, help="loss.free_text_frac of the id path")
    ap.add_argument("--workdir", default="/tmp/umg_text_ids")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/text_ids.json"))
    args = ap.parse_args(argv)
    batch = one_batch(args.frac)
    print(json.dumps(batch, indent=1), flush=True)
    wd = pathlib.Path(args.workdir)
    if args.steps <= 0:  # the batch-level comparison alone
        write_result(args.out, {"steps": 0, "free_text_frac": args.frac, "batch": batch,
                                "runs": None})
        return 0
    runs = {
        "every_slot_seed0": run(wd / "plain0", [*PLAIN, "--config.seed=0"], args.steps),
        "every_slot_seed1": run(wd / "plain1", [*PLAIN, "--config.seed=1"], args.steps),
        "ids_seed0": run(wd / "ids0", ["--config.loss.text_dedup_frac=0.0",
                                       f"--config.loss.free_text_frac={args.frac}",
                                       "--config.seed=0"], args.steps),
    }
    evals = {n: r["eval"].get("results", r["eval"]) for n, r in runs.items()}
    keys = sorted(set.intersection(*(set(e) for e in evals.values())))
    print(f"{'metric':<28} {'every slot s0':>14} {'every slot s1':>14} {'ids s0':>10}")
    for k in keys:
        vals = [evals[n][k] for n in ("every_slot_seed0", "every_slot_seed1", "ids_seed0")]
        if all(isinstance(v, int | float) for v in vals):
            print(f"{k:<28} {vals[0]:>14.4f} {vals[1]:>14.4f} {vals[2]:>10.4f}")
    for n, r in runs.items():
        print(f"{n}: train {r['train_s']:.0f} s, final loss {r['final_loss']}")
    write_result(args.out, {"steps": args.steps, "free_text_frac": args.frac, "batch": batch,
                            "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
