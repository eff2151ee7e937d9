r"""Evaluates a checkpoint on all granularities: ``python -m umg_jax.evaluate --workdir DIR``.

    python -m umg_jax.evaluate --workdir /tmp/umg_tiny                     # held-out synthetic
    python -m umg_jax.evaluate --workdir /tmp/umg_tiny --data /data/coco_val --step 4000
    python -m umg_jax.evaluate --workdir DIR --evaluators region,semseg --num_examples 1000

Runs the evaluators of ``umg_jax/evaluators`` (zero-shot classification, image<->text retrieval,
region classification, open-vocabulary semantic segmentation, panoptic quality) on a data set of
ArrayRecord shards (any the builders or the synthetic world write; the vocabulary is its
``meta.json`` category list), writes ``DIR/eval/<step>/metrics.json`` and prints a table.
``DIR`` may be local or on a bucket (``gs://``, ``s3://``); the data set is read from local
disk (Grain reads ArrayRecord through local paths: mount a bucket with Cloud Storage FUSE).
The model config comes from the workdir (``config.json``), the data / eval settings from
``--config`` when given, else from the workdir's config too. A segmentation-head run
(``configs/seg_*.py``) is evaluated with ``evaluators/segmentation.py`` instead: mIoU and PQ of the
training-free baseline, the head, and the head + ensemble, on all / seen / held-out classes,
at the panoptic thresholds the run chose on its validation split (``--calibrate``, also run at
the end of a head's training: ``seg_calibration.json``), else at its config's.
Exit status 2 on bad input.

Inside training, ``make_hooks(config)`` returns the same evaluation as a function of the params
(``config.eval.every_steps``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator

import ml_collections as mlc
import numpy as np

ALL = ("zeroshot", "retrieval", "region", "semseg", "panoptic")
DATA_HINT = ("Grain reads ArrayRecord shards through local paths: copy the data set to local "
             "disk or mount the bucket with Cloud Storage FUSE (gcsfuse) and pass the mount")


class EvalError(ValueError):
    """Bad request (one line; exit status 2)."""


def eval_batches(config: mlc.ConfigDict, data_dir: str, num_examples: int, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Up to ``num_examples`` held-out examples (in order, no augmentation) as numpy batches of
    the schema contract, read by this process alone. The last batch is cut to what is left, so
    the examples evaluated do not depend on ``batch_size``."""
    from umg_jax.data import pipeline

    it = pipeline.make_iterator(config.data, config.model, batch_size=batch_size, train=False,
                                seed=0, process_index=0, process_count=1, path=data_dir)
    seen = 0
    try:
        for batch in it:
            if seen >= num_examples:
                break
            take = min(batch_size, num_examples - seen)
            yield batch if take == batch_size else {k: v[:take] for k, v in batch.items()}
            seen += take
    finally:
        if hasattr(it, "close"):
            it.close()


def categories(data_dir: str) -> tuple[list[str], list[bool]]:
    """Category names (the vocabulary) and their thing/stuff flags, from ``meta.json``."""
    from umg_jax.data import records

    cats = records.read_meta(data_dir).get("categories") or []
    if not cats:
        raise EvalError(f"{data_dir}/meta.json lists no categories: nothing to classify against")
    return [c["name"] for c in cats], [bool(c.get("isthing", True)) for c in cats]


def evaluate_model(model, config: mlc.ConfigDict, data_dir: str, names=ALL,
                   num_examples: int | None = None) -> dict[str, float]:
    """Runs the evaluators ``names`` for an encoder (``umg_jax.inference.UMGModel``)."""
    from umg_jax import evaluators

    n = int(num_examples or config.eval.num_examples)
    bs = min(int(config.eval.batch_size), n)
    names_, isthing = categories(data_dir)
    evs = evaluators.make_evaluators(list(names), names_, isthing)
    # One pass over the data feeds every evaluator (images are encoded once per batch).
    batches = evaluators.encode_batches(model, eval_batches(config, data_dir, n, bs))
    if not batches:
        raise EvalError(f"{data_dir} has fewer than {bs} examples (one evaluation batch)")
    results: dict[str, float] = {}
    for ev in evs.values():
        results.update(ev.run(model, batches))
    results["num_examples"] = float(min(n, len(batches) * bs))
    return results


def evaluate_seg_head(model, seg_params, config: mlc.ConfigDict, data_dir: str,
                      num_examples: int | None = None, decode=None) -> dict[str, float]:
    """The segmentation head (``seg_params``; ``None``: only the training-free baseline) on the
    frozen backbone ``model``: mIoU / PQ on all, seen and held-out (``seg.holdout``) classes,
    for the variants of ``umg_jax.evaluators.segmentation``. ``decode``: a cached
    ``make_decode(config)`` (compiled once across calls)."""
    import functools

    from umg_jax.evaluators import segmentation as seg_eval

    batches, names, isthing, seen = _seg_inputs(config, data_dir, num_examples)
    if seg_params is None:
        fn, variants = None, ("free",)
    else:
        fn = functools.partial(decode or seg_eval.make_decode(config), seg_params)
        variants = seg_eval.VARIANTS
    results = seg_eval.evaluate_segmentation(model, fn, batches, names, isthing, seen,
                                             config.seg, variants)
    return {f"seg/{k}": v for k, v in results.items()}


def _seg_inputs(config: mlc.ConfigDict, data_dir: str, num_examples: int | None):
    """``(batches, names, isthing, seen)`` of a head evaluation on ``data_dir``: the examples
    (``config.eval``), the category names and thing flags, and which names the head trained on
    (not in ``seg.holdout``)."""
    n = int(num_examples or config.eval.num_examples)
    bs = min(int(config.eval.batch_size), n)
    names, isthing = categories(data_dir)
    holdout = set(config.seg.holdout)
    return (eval_batches(config, data_dir, n, bs), names, isthing,
            [name not in holdout for name in names])


def calibrate_seg(workdir: str, *, config: mlc.ConfigDict | None = None, data: str = "",
                  step: int | None = None, num_examples: int | None = None, log=print) -> dict:
    """Chooses a segmentation-head run's panoptic thresholds (and, with the FC-CLIP ensemble,
    the semantic map's ``pixel_weight``) on the validation split
    (``data`` or ``config.data.val_path``, default the synthetic validation split; never the
    evaluation split) and writes them to ``workdir/seg_calibration.json``, which every later
    load of the run applies (``checkpoint.apply_seg_calibration``). Returns the file's content
    (``evaluators/seg_calibration.py``)."""
    import functools

    from umg_jax import checkpoint, storage
    from umg_jax.data import pipeline
    from umg_jax.evaluators import seg_calibration
    from umg_jax.evaluators import segmentation as seg_eval
    from umg_jax.inference import InputError, load
    from umg_jax.step import seg_enabled

    ckpt_dir, cfg_file = checkpoint.locate(workdir, step)
    if config is None:
        if cfg_file is None or cfg_file.name != "config.json":
            raise EvalError(f"{workdir} has no training config.json: pass --config")
        config = checkpoint.read_run_config(cfg_file)
    if not seg_enabled(config):
        raise EvalError(f"{workdir}: --calibrate applies to segmentation-head runs "
                        "(configs/seg_*.py) only")
    try:
        data_dir = data or pipeline.ensure_data(config.data, "val")
        model = load(workdir, step)
        seg_params = checkpoint.load_seg_params(ckpt_dir, config)
    except (FileNotFoundError, InputError) as e:
        raise EvalError(str(e)) from None
    batches, names, isthing, seen = _seg_inputs(config, data_dir, num_examples)
    decode = functools.partial(seg_eval.make_decode(config), seg_params)
    res = seg_calibration.calibrate_thresholds(model, decode, batches, names, isthing, seen,
                                               config.seg)
    res.update(split=str(data_dir), step=ckpt_dir.name,
               config_thresholds=[float(config.seg.object_threshold),
                                  float(config.seg.overlap_threshold)])
    storage.write_json(storage.path(workdir) / checkpoint.SEG_CALIBRATION, res, indent=1)
    pixel = (f"; pixel_weight {res['pixel_weight']} (mIoU on seen classes "
             f"{res['pixel_score']:.3f})" if "pixel_weight" in res else "")
    log(f"seg thresholds from the validation split ({res['num_images']} images, PQ on seen "
        f"classes {res['score']:.3f}): object {res['object_threshold']}, overlap "
        f"{res['overlap_threshold']}{pixel} -> "
        f"{storage.path(workdir) / checkpoint.SEG_CALIBRATION}")
    return res


def make_hooks(config: mlc.ConfigDict) -> dict[str, Callable]:
    """``{"umg" or "seg": fn(params) -> metrics}`` for the trainer (held-out split of
    ``config.data``)."""
    from umg_jax.data import pipeline
    from umg_jax.inference import UMGModel

    data_dir = pipeline.ensure_data(config.data, "eval")
    holder: dict = {}

    from umg_jax import step as step_lib

    def hook(params) -> dict[str, float]:
        clip_params = step_lib.effective_params(params, config)  # LoRA merged when PEFT is on
        if "model" not in holder:  # compile once, re-use across evaluations
            holder["model"] = UMGModel(clip_params, config.model)
        holder["model"].params = clip_params
        if step_lib.seg_enabled(config):
            from umg_jax.evaluators.segmentation import make_decode

            holder.setdefault("decode", make_decode(config))
            return evaluate_seg_head(holder["model"], params["seg"], config, data_dir,
                                     decode=holder["decode"])
        return evaluate_model(holder["model"], config, data_dir)

    return {"seg" if step_lib.seg_enabled(config) else "umg": hook}


def format_table(results: dict[str, float]) -> str:
    width = max(len(k) for k in results)
    return "\n".join(f"{k:<{width}}  {v:8.4f}" for k, v in sorted(results.items()))


def run(workdir: str, *, config: mlc.ConfigDict | None = None, data: str = "",
        step: int | None = None, names=ALL, num_examples: int | None = None) -> dict[str, float]:
    """The CLI's work: load, evaluate, write ``workdir/eval/<step>/metrics.json`` (``workdir``
    local or ``gs://`` / ``s3://``; ``storage.StorageError`` when it cannot be read or
    written, raised before the model is loaded)."""
    from umg_jax import checkpoint, storage
    from umg_jax.data import pipeline
    from umg_jax.inference import InputError, load

    unknown = sorted(set(names) - set(ALL))
    if unknown or not names:
        raise EvalError(f"unknown evaluators {unknown} (choose from {', '.join(ALL)})")
    storage.check_bucket_source(workdir)
    try:
        ckpt_dir, cfg_file = checkpoint.locate(workdir, step)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    out = storage.path(workdir) / "eval" / (ckpt_dir.name if ckpt_dir.name.isdigit()
                                            else "import")
    storage.check_writable_dir(storage.path(workdir))  # the results must land: check first
    if data:
        data = str(storage.require_local(data, "--data", DATA_HINT))
        if not os.path.isdir(data):
            raise EvalError(f"--data {data!r} is not a directory")
    given = config is not None
    if not given:
        if cfg_file is None or cfg_file.name != "config.json":
            raise EvalError(f"{workdir} has no training config.json: pass --config")
        try:
            # files it names resolved from the workdir, a head run's calibrated thresholds set
            config = checkpoint.read_run_config(cfg_file)
        except ValueError as e:
            raise EvalError(str(e)) from None
    try:
        model = load(workdir, step)
    except InputError as e:
        raise EvalError(str(e)) from None
    if data:
        data_dir = data
    else:
        data_dir = pipeline.ensure_data(config.data, "eval")
    t0 = time.perf_counter()
    from umg_jax.step import seg_enabled

    if seg_enabled(config):  # a segmentation-head run
        try:
            if given:  # the run's thresholds, as calibrated on its validation split
                config = config.copy_and_resolve_references()  # the caller's stays as it was
                checkpoint.apply_seg_calibration(config, workdir)
            seg_params = checkpoint.load_seg_params(ckpt_dir, config)
        except (FileNotFoundError, ValueError) as e:
            raise EvalError(str(e)) from None
        results = evaluate_seg_head(model, seg_params, config, data_dir, num_examples)
    else:
        results = evaluate_model(model, config, data_dir, names, num_examples)
    results["eval_seconds"] = time.perf_counter() - t0
    storage.write_json(out / "metrics.json",
                       {"step": out.name, "data": str(data_dir), "results": results}, indent=1)
    return results


def main(argv: list[str] | None = None) -> int:
    from umg_jax import host_platforms

    host_platforms.pin()  # the platforms this host has, before JAX's backends start
    import argparse

    from umg_jax import config_lib, storage

    ap = argparse.ArgumentParser(prog="python -m umg_jax.evaluate",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[2:6]))
    ap.add_argument("--workdir", required=True, help="training workdir or import directory "
                    "(local, gs:// or s3://)")
    ap.add_argument("--config", default="", help="configs/x.py for data / eval settings "
                    "(default: the workdir's config.json)")
    ap.add_argument("--data", default="", help="directory of ArrayRecord shards + meta.json "
                    "(default: the held-out split of the config's data)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--evaluators", default=",".join(ALL), help="comma-separated subset of "
                    + ",".join(ALL))
    ap.add_argument("--num_examples", type=int, default=None,
                    help="examples to evaluate (default: config.eval.num_examples)")
    ap.add_argument("--calibrate", action="store_true",
                    help="segmentation-head runs: first choose the panoptic thresholds and the "
                    "ensemble's semantic pixel weight on the validation split (data.val_path, "
                    "default synthetic; --data is then that split) and store them in the "
                    "workdir (seg_calibration.json)")
    args = ap.parse_args(argv)
    try:
        config = config_lib.load_config(args.config) if args.config else None
        if args.calibrate:
            calibrate_seg(args.workdir, config=config, data=args.data, step=args.step,
                          num_examples=args.num_examples)
            args.data = ""
        names = [s.strip() for s in args.evaluators.split(",") if s.strip()]
        results = run(args.workdir, config=config, data=args.data, step=args.step, names=names,
                      num_examples=args.num_examples)
    except (EvalError, FileNotFoundError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
