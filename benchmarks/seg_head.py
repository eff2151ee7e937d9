"""Frozen-backbone segmentation: training-free vs a trained mask-decoder head (with / without
the FC-CLIP ensemble, with / without LoRA or adapters in the backbone), on held-out synthetic
data whose classes include ones the head never saw (``seg.holdout`` of configs/seg_tiny.py).

    python benchmarks/seg_head.py --backbone /tmp/umg_tiny [--steps 400] [--out benchmarks/results]

``--backbone``: a trained tiny UMG-CLIP workdir (``python -m umg_jax.train --config
configs/tiny.py --workdir /tmp/umg_tiny``); without it one is trained first (600 steps).
Prints a table (mIoU / PQ on all, seen and held-out classes, PQ on things; trainable
parameters) and writes ``seg_head.json`` to ``--out``. Head runs choose their panoptic
thresholds (and the ensemble's semantic ``pixel_weight``) on the synthetic *validation* split at
the end of training (``seg.calibrate``); the table reports the held-out evaluation split.
``head-plain`` is the recipe before that (Mask2Former's 0.8 / 0.8, unlabeled queries taught
"void", no pixel weight), for the before / after comparison.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = {  # name -> config overrides of configs/seg_tiny.py
    "head": {},
    # the recipe before unlabeled-aware void targets and validation-chosen thresholds:
    # Mask2Former's test thresholds (0.8 / 0.8), unmatched queries on unlabeled pixels -> void
    "head-plain": {"seg.unlabeled_not_void": False, "seg.calibrate": False},
    "head+lora": {"peft.enabled": True, "peft.method": "lora"},
    "head+adapter": {"peft.enabled": True, "peft.method": "adapter",
                     "model.vision.adapter_dim": 32},
}
COLS = ("miou", "miou_seen", "miou_unseen", "pq", "pq_seen", "pq_unseen", "pq_things")


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        config = config[p]
    config[leaf] = value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[3:]))
    ap.add_argument("--backbone", default="", help="trained tiny workdir (default: train one)")
    ap.add_argument("--steps", type=int, default=400, help="segmentation-head training steps")
    ap.add_argument("--num_examples", type=int, default=256, help="held-out examples")
    ap.add_argument("--runs", default=",".join(RUNS), help="subset of " + ",".join(RUNS))
    ap.add_argument("--seeds", default="0", help="head seeds (comma-separated): each run "
                    "is trained once per seed; the table shows the mean, the JSON each")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--workdir", default="", help="keep the runs here (default: a temp dir)")
    ap.add_argument("--png", default=str(ROOT / "docs" / "seg_head.png"),
                    help="picture of the head's predictions ('' = none)")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from umg_jax import checkpoint, config_lib, evaluate, optim, train
    from umg_jax import step as step_lib
    from umg_jax.data import pipeline
    from umg_jax.inference import load

    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="umg_seg-"))
    backbone = args.backbone
    if not backbone:
        backbone = str(root / "backbone")
        train.train(config_lib.load_config(str(ROOT / "configs" / "tiny.py")), backbone)

    base_cfg = config_lib.load_config(str(ROOT / "configs" / "seg_tiny.py"))
    data_dir = pipeline.ensure_data(base_cfg.data, "eval")
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    free = evaluate.evaluate_seg_head(load(backbone), None, base_cfg, data_dir, args.num_examples)
    rows["training-free"] = {k.split("/", 2)[2]: v for k, v in free.items()}
    rows["training-free"].update(trainable=0, seconds=time.perf_counter() - t0)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    for name in rows_runs(args.runs):
        per_seed: dict[str, list[dict]] = {"head": [], "ensemble": []}
        for seed in seeds:
            config = config_lib.load_config(str(ROOT / "configs" / "seg_tiny.py"))
            config.seed = seed
            config.total_steps = args.steps
            config.ckpt.every_steps = args.steps
            config.eval.every_steps = 0
            config.log.tensorboard = False
            config.init.checkpoint = backbone
            for k, v in RUNS[name].items():
                _set(config, k, v)
            wd = root / f"{name}-seed{seed}"
            t0 = time.perf_counter()
            train.train(config, str(wd))  # head runs choose thresholds on the val split
            secs = time.perf_counter() - t0
            abstract = jax.eval_shape(lambda c=config: step_lib.init_params(c, jax.random.key(0)))
            frozen = jax.tree.leaves(optim.param_labels(abstract,
                                                        step_lib.frozen_regexes(config)))
            n_train = sum(optim.count_params(leaf) for leaf, f in
                          zip(jax.tree.leaves(abstract), frozen, strict=True) if not f)
            res = evaluate.run(str(wd), config=config, num_examples=args.num_examples)
            cal = checkpoint.read_seg_calibration(wd)
            thr = ([cal["object_threshold"], cal["overlap_threshold"]] if cal else
                   [config.seg.object_threshold, config.seg.overlap_threshold])
            for v in ("head", "ensemble"):
                r = {k.split("/", 2)[2]: val for k, val in res.items()
                     if k.startswith(f"seg/{v}/")}
                per_seed[v].append(dict(r, trainable=n_train, seconds=secs, seed=seed,
                                        thresholds=thr, calibrated=cal is not None,
                                        pixel_weight=(cal or {}).get(
                                            "pixel_weight", config.seg.get("pixel_weight", 0.0))))
            print(f"{name} seed {seed}: done in {secs:.0f}s (thresholds {thr}, pixel weight "
                  f"{per_seed['ensemble'][-1]['pixel_weight']})", flush=True)
        for v, runs in per_seed.items():
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]
                    if isinstance(runs[0][k], float)}
            rows[f"{name} ({v})"] = dict(mean, trainable=runs[0]["trainable"], seeds=runs)

    head = f"{'run':<26}{'trainable':>11}" + "".join(f"{c:>12}" for c in COLS)
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in rows.items():
        print(f"{name:<26}{r['trainable']:>11,}"
              + "".join(f"{r.get(c, float('nan')):>12.3f}" for c in COLS))
    out = pathlib.Path(args.out)
    payload = {"steps": args.steps, "num_examples": args.num_examples, "backbone": backbone,
               "seeds": seeds, "threshold_choice": "chosen per run on the synthetic validation "
               "split (seg_calibration.json, PQ on seen classes) unless the run says otherwise",
               "holdout": list(base_cfg.seg.holdout), "config": "configs/seg_tiny.py",
               "runs": RUNS, "results": rows}
    print(f"wrote {write_result(out / 'seg_head.json', payload)}")
    if "head" in rows_runs(args.runs) and args.png:
        render(str(root / f"head-seed{seeds[0]}"), base_cfg, data_dir, args.png)
        print(f"wrote {args.png}")
    return 0


def rows_runs(runs: str) -> list[str]:
    return [r.strip() for r in runs.split(",") if r.strip()]


def render(workdir: str, config, data_dir: str, path: str, n: int = 4) -> None:
    """Held-out images, ground-truth panoptic segments, the training-free prediction and the
    head's (ensemble) prediction, segments coloured and labelled with their class."""
    import functools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from umg_jax import checkpoint, evaluate
    from umg_jax.evaluators import segmentation as se
    from umg_jax.evaluators.common import encode_batches
    from umg_jax.evaluators.panoptic import panoptic_target
    from umg_jax.evaluators.semseg import predict_labels
    from umg_jax.inference import load

    model = load(workdir)
    config = config.copy_and_resolve_references()
    checkpoint.apply_seg_calibration(config, workdir)  # the run's own (validation) thresholds
    ckpt, _ = checkpoint.locate(workdir)
    decode = functools.partial(se.make_decode(config), checkpoint.load_seg_params(ckpt, config))
    names, isthing = evaluate.categories(data_dir)
    isthing = np.asarray(isthing)
    seen = np.array([c not in set(config.seg.holdout) for c in names])
    b = encode_batches(model, evaluate.eval_batches(config, data_dir, n, n))[0]
    text = model.encode_text_labels(names)
    hw = b["segmap"].shape[1:]
    up, probs = se.head_predictions(decode, b["image"], b["dense_emb"], text, hw, seen,
                                    config.seg, se.mask_logit_scale(model))
    probs = probs["ensemble"]
    sem_free = predict_labels(b["dense_emb"], text, hw)
    rng = np.random.default_rng(0)
    palette = rng.uniform(0.15, 1.0, size=(256, 3))
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n))
    for i in range(n):
        img = np.clip(b["image"][i] * model.pixel_std + model.pixel_mean, 0, 1)
        gseg, gcls = panoptic_target(b["segmap"][i], b["mask_valid"][i], b["mask_class"][i])
        panels = [("image", None, None), ("ground truth", gseg, gcls),
                  ("training-free", *se.free_panoptic(sem_free[i], isthing)),
                  ("head + ensemble", *se.panoptic_inference(
                      probs[i], up[i], isthing, config.seg.object_threshold,
                      config.seg.overlap_threshold))]
        for ax, (title, seg, cls) in zip(axes[i], panels, strict=True):
            ax.axis("off")
            if i == 0:
                ax.set_title(title, fontsize=9)
            if seg is None:
                ax.imshow(img)
                continue
            rgb = np.where((seg >= 0)[..., None], palette[np.clip(seg, 0, 255) % 256], 0.0)
            ax.imshow(0.35 * img + 0.65 * rgb)
            for sid, c in cls.items():
                ys, xs = np.nonzero(seg == sid)
                if len(ys):
                    label = names[c] + ("" if seen[c] else "*")
                    ax.text(xs.mean(), ys.mean(), label, fontsize=6, ha="center", va="center",
                            color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1,
                                                 "linewidth": 0})
    fig.suptitle("held-out synthetic images; * = class never seen by the head "
                 f"({', '.join(config.seg.holdout)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
