"""Pseudo-labels close part of the gap: image-only teacher -> pseudo-labels -> UMG retraining.

    python benchmarks/pseudo_label_loop.py [--steps 400] [--reuse /tmp/ablation]

On the synthetic world: (a) train tiny with image-level losses only; pseudo-label the training
images with it (``umg_jax.labeling.pseudo_label``, vocabulary = the category names, captions kept);
(p) retrain tiny with all UMG losses on the pseudo-labels; (b) train tiny with all UMG losses on
the ground-truth labels. All evaluated on the same held-out split. ``--reuse DIR`` takes (a) and
(b) from a ``granularity_ablation.py --workdir DIR`` run (its ``a_image`` and
``c_+region+pixel``). Prints the table, writes ``benchmarks/results/pseudo_label_loop.json``.

``--labeller annotate`` labels with ``python -m umg_jax.labeling.annotate`` instead, with teachers
trained or fitted here: the image-only run (a), exported to a Hugging Face ``CLIPModel``
directory, is the ``clip`` tagger; tags the captions mention are added (``noun_phrases``); (a)
labels the ``proposals`` boxes and each tag picks its proposal masks (``proposals`` backends,
crop scoring, concept assignment, ``"prompts": "tags"``); the filter runs with its defaults. Writes
``benchmarks/results/annotate_loop.json``. Both JSONs carry their provenance (command, commit,
date, machine).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

from provenance import write_result

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


def label_quality(pl_dir: pathlib.Path, gt_dir: str) -> dict[str, float]:
    """Precision / recall of the pseudo masks and boxes against the ground truth of the same
    images: a pseudo entry is correct when it overlaps a ground-truth one of the same category
    with IoU > 0.5 (boxes: regions; masks: segments)."""
    import numpy as np

    from umg_jax.data import records
    from umg_jax.labeling import pseudo_label as pl

    gt = {r["source"]: r for r in records.iter_records(gt_dir)}
    names = {c["id"]: c["name"] for c in records.read_meta(gt_dir)["categories"]}
    pl_names = {c["id"]: c["name"] for c in records.read_meta(str(pl_dir))["categories"]}
    tp = {"box": [0, 0, 0], "mask": [0, 0, 0]}  # correct, predicted, ground truth
    for rec in records.iter_records(str(pl_dir)):
        g = gt.get(rec["source"])
        if g is None:
            continue
        for kind, pk, gk in (("box", "regions", "regions"), ("mask", "segments", "segments")):
            preds, gts = rec.get(pk) or [], [x for x in g.get(gk) or [] if x["category"] >= 0]
            tp[kind][1] += len(preds)
            tp[kind][2] += len(gts)
            used = set()
            for p in preds:
                for j, t in enumerate(gts):
                    if j in used or pl_names[p["category"]] != names[t["category"]]:
                        continue
                    if kind == "box":
                        iou = pl.box_iou(np.asarray([p["box"]]), np.asarray([t["box"]]))[0, 0]
                    else:
                        iou = pl.mask_iou(records.rle_to_mask(p["rle"]),
                                          records.rle_to_mask(t["rle"]))
                    if iou > 0.5:
                        used.add(j)
                        tp[kind][0] += 1
                        break
    return {f"{k}_{m}": v[0] / max(v[i], 1) for k, v in tp.items()
            for m, i in (("precision", 1), ("recall", 2))}


# The annotate recipe of --labeller annotate ("TEACHER" / "TEACHER_HF": run (a) and its export).
ANNOTATE_STAGES = [
    {"stage": "tag", "backend": "clip", "model": "TEACHER_HF", "threshold": 0.5, "max_tags": 2},
    {"stage": "tag", "backend": "noun_phrases"},
    {"stage": "detect", "backend": "proposals", "model": "TEACHER", "threshold": 0.5,
     "max_boxes": 6, "options": {"score": "crop"}},
    # each tag picks its proposal masks (instances; the pseudo_label path). Superpixel masks in
    # the boxes ("boxes+stuff") recovered less (README)
    {"stage": "segment", "backend": "proposals", "model": "TEACHER", "prompts": "tags",
     "threshold": 0.5, "options": {"score": "crop"}},
    {"stage": "filter"},
]


def _annotate(wd_a: pathlib.Path, train_dir: str, vocab: list[str], root: pathlib.Path,
              out: pathlib.Path) -> dict:
    """Exports (a) to HF, writes the recipe, runs the annotate command line; returns counts."""
    import peers

    peers.torch()  # this environment's torchvision shim, before transformers imports it
    from umg_jax.interop.export_torch import main as export_main
    from umg_jax.labeling.annotate.__main__ import main as annotate_main

    hf = root / "teacher_hf"
    if not (hf / "config.json").exists():
        export_main([str(wd_a), "--format", "hf", "--out", str(hf)])
    stages = json.loads(json.dumps(ANNOTATE_STAGES).replace("TEACHER_HF", str(hf))
                        .replace("TEACHER", str(wd_a)))
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps({"vocab": vocab, "stages": stages}, indent=1))
    rc = annotate_main(["--images", train_dir, "--out", str(out), "--recipe", str(recipe),
                        "--device", "cpu", "--batch_size", "16", "--shard_size", "512"])
    if rc:
        raise SystemExit(rc)
    meta = json.loads((out / "meta.json").read_text())
    stats = json.loads((out / "stats-worker-0.json").read_text())
    return {**meta["counts"], "dropped": meta["dropped"],
            "stage_images_per_s": stats["stage_images_per_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--reuse", default="", help="granularity_ablation.py workdir with a / c runs")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="pseudo-label score (probability, or relative score with --assign "
                         "concept)")
    ap.add_argument("--score", choices=("dense", "crop"), default="crop",
                    help="how the teacher labels proposals (umg_jax.labeling.pseudo_label --score)")
    ap.add_argument("--assign", choices=("proposal", "concept"), default="concept",
                    help="who picks: each proposal its class, or each concept its proposals")
    ap.add_argument("--caption_vocab", action=argparse.BooleanOptionalAction, default=True,
                    help="restrict labels to the caption's concepts (pseudo_label option)")
    ap.add_argument("--workdir", default="", help="keep runs here; finished runs are reused")
    ap.add_argument("--labeller", choices=("pseudo_label", "annotate"), default="pseudo_label",
                    help="the pseudo_label tool, or the annotate tool with the recipe above")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/"
                    "pseudo_label_loop.json or annotate_loop.json (per --labeller)")
    args = ap.parse_args(argv)
    args.out = args.out or str(ROOT / "benchmarks/results" / (
        "annotate_loop.json" if args.labeller == "annotate" else "pseudo_label_loop.json"))
    from umg_jax import evaluate, train
    from umg_jax.data import pipeline, synthetic
    from umg_jax.inference import load
    from umg_jax.labeling import pseudo_label as pl

    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="umg_pl_loop-"))
    image_only = {"loss.w_region": 0.0, "loss.w_mask": 0.0, "loss.w_pixel": 0.0}
    runs = {}
    if args.reuse:
        reuse = pathlib.Path(args.reuse)
        wd_a, wd_b = reuse / "a_image", reuse / "c_+region+pixel"
    else:
        wd_a, wd_b = root / "a", root / "b"
        for wd, over in ((wd_a, image_only), (wd_b, {})):
            if not (wd / "config.json").exists():  # --workdir: finished runs are reused
                train.train(_config(args.steps, **over), str(wd))
    cfg = _config(args.steps)
    runs["a_image_only"] = evaluate.run(str(wd_a), config=cfg)
    runs["b_ground_truth"] = evaluate.run(str(wd_b), config=cfg)

    # pseudo-label the training images with the image-only teacher
    train_dir = pipeline.ensure_data(cfg.data, "train")
    vocab = [c["name"] for c in synthetic.CATEGORIES]
    t0 = time.perf_counter()
    if args.labeller == "annotate":
        tag = "annotate"
        pl_dir = root / "annotated"
        counts = _annotate(wd_a, train_dir, vocab, root, pl_dir)
    else:
        scorer = pl.Scorer(load(str(wd_a)), vocab)
        tag = (f"{args.score}_{args.assign}{'_capvocab' if args.caption_vocab else ''}"
               f"_t{args.threshold}")
        pl_dir = root / f"pseudo_{tag}"
        ns = argparse.Namespace(threshold=args.threshold, top_k=6, nms_iou=0.5, mask_iou=0.7,
                                caption_threshold=-1.0, min_area=0.01, batch=16, shard_size=512,
                                teacher=str(wd_a), score=args.score, assign=args.assign,
                                caption_vocab=args.caption_vocab)
        counts = pl.run(pl.list_inputs(train_dir), scorer, vocab, str(pl_dir), ns,
                        log=lambda s: print(s, flush=True))
    label_s = time.perf_counter() - t0
    quality = label_quality(pl_dir, train_dir)
    print("pseudo-label quality vs ground truth (IoU > 0.5, same class): "
          + " ".join(f"{k}={v:.3f}" for k, v in quality.items()), flush=True)
    wd_p = root / f"p_{tag}"
    train.train(_config(args.steps, **{"data.path": str(pl_dir)}), str(wd_p))
    runs["p_pseudo_labels"] = evaluate.run(str(wd_p), config=cfg)

    head = f"{'run':<18}" + "".join(f"{k:>18}" for k in KEYS)
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in runs.items():
        print(f"{name:<18}" + "".join(f"{r[k]:>18.3f}" for k in KEYS))
    gap = {k: (runs["p_pseudo_labels"][k] - runs["a_image_only"][k])
           / max(runs["b_ground_truth"][k] - runs["a_image_only"][k], 1e-9) for k in KEYS}
    print(f"{'gap recovered':<18}" + "".join(f"{100 * gap[k]:>17.0f}%" for k in KEYS))
    write_result(args.out, {
        "steps": args.steps, "labeller": args.labeller,
        **({"recipe": ANNOTATE_STAGES} if args.labeller == "annotate" else {}),
        "threshold": args.threshold, "score": args.score, "assign": args.assign,
        "caption_vocab": args.caption_vocab, "label_quality": quality,
        "pseudo_label_counts": counts, "pseudo_label_seconds": label_s, "runs": runs,
        "gap_recovered": gap})
    print(f"wrote {args.out} (runs in {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
