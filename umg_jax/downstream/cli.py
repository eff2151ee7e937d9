"""``python -m umg_jax.downstream``: the paper's evaluation table on the benchmarks' own files.

    python -m umg_jax.downstream --workdir RUN --task imagenet --data /data/imagenet
    python -m umg_jax.downstream --workdir RUN --task folder --data my_tree --classes names.txt
    python -m umg_jax.downstream --workdir RUN --suite suite.json

One task writes ``RUN/benchmark/<step>/<task>.json`` (metrics, protocol, counts, images/s, model,
step, date) and prints one line per metric. ``--suite`` runs a JSON list of
``{"task": ..., "data": ..., <any option below>}`` (relative paths are read from the suite
file's folder), writes each task's JSON and prints one markdown table in the paper's column
order, also saved as ``RUN/benchmark/<step>/table.md``. ``RUN`` is any training workdir or
import directory ``umg_jax.load`` accepts, local or on a bucket (``gs://``, ``s3://``: read from
there, results written there); a segmentation-head run also loads its head. The data sets (and
``--classes``) are read from local disk; a suite file may be on a bucket.
Bad input (missing folder, unreadable image, empty class list, unknown task): one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import sys
from typing import Any

from umg_jax import storage
from umg_jax.downstream import common
from umg_jax.downstream.common import BenchmarkInputError, BenchModel, Options, TaskResult

# What --help says of each task: layout under --data, split, metrics.
TASK_HELP = {
    "imagenet": "DATA/val/<wnid>/*.JPEG (ILSVRC2012 ImageFolder); 1000 OpenAI names, 80 "
                "templates; top1/top5/mean_per_class_recall",
    "cifar10": "DATA[/cifar-10-batches-py]/test_batch (python pickle); split test|train; "
               "18 CLIP templates",
    "cifar100": "DATA[/cifar-100-python]/test (python pickle, fine labels); split test|train",
    "folder": "DATA[/<split>]/<class>/*.jpg; names from --classes (one per sorted folder) or "
              "the folder names",
    "coco_retrieval": "DATA/dataset_coco.json (Karpathy) + DATA/val2014/; split test (5k); "
                      "i2t/t2i R@1/5/10",
    "flickr30k": "DATA/dataset_flickr30k.json (Karpathy) + DATA/flickr30k-images/; split test "
                 "(1k)",
    "coco_boxes": "DATA/annotations/instances_val2017.json + DATA/val2017/; GT boxes among the "
                  "80 names; top1 / mean class acc, all / small (<32^2) / large (>96^2)",
    "ade150": "ADEChallengeData2016/{images,annotations}/validation; label 0 ignored; mIoU, "
              "pixel acc",
    "voc20": "VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/val.txt};"
             " background excluded, 255 ignored",
    "context59": "VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext,ImageSets/"
                 "SegmentationContext/val.txt} (mmsegmentation's .png labels)",
    "folder_seg": "DATA[/<split>]/{images,labels}/ (labels/<stem>.png, value i = class i, "
                  "255 ignored) with --classes",
    "coco_panoptic": "DATA[/annotations]/panoptic_val2017{.json,/} + DATA/val2017/; predicted "
                     "segments (the run's head, else training-free); PQ/SQ/RQ all/things/stuff",
    "ade_panoptic": "ADEChallengeData2016/ade20k_panoptic_val{.json,/} + images/validation/ "
                    "(Mask2Former's conversion); predicted segments; PQ/SQ/RQ",
}
# The number(s) each task shows in the --suite table (all of its metrics when absent).
HEADLINE = {
    "imagenet": ("top1", "top5"), "cifar10": ("top1",), "cifar100": ("top1",),
    "folder": ("top1",), "coco_retrieval": ("i2t_r1", "t2i_r1"),
    "flickr30k": ("i2t_r1", "t2i_r1"), "coco_boxes": ("top1", "mean_class_acc"),
    "ade150": ("miou",), "voc20": ("miou",), "context59": ("miou",), "folder_seg": ("miou",),
    "coco_panoptic": ("pq",), "ade_panoptic": ("pq",),
}
_OPTION_FIELDS = {f.name for f in dataclasses.fields(Options)}
LOCAL_HINT = ("the benchmark reads data sets through local paths: copy it to local disk or mount "
              "the bucket with Cloud Storage FUSE (gcsfuse) and pass the mount")


def default_split(task: str) -> str:
    """The task module's ``DEFAULT_SPLITS[task]``, else ``val``."""
    module = importlib.import_module(f"umg_jax.downstream.{common.TASKS[task]}")
    return getattr(module, "DEFAULT_SPLITS", {}).get(task, "val")


def make_options(task: str, values: dict[str, Any], base: storage.PathLike | None = None
                 ) -> Options:
    """``Options`` from a dict of option values (``None`` = the default); paths relative to
    ``base`` when given. Checks the task name and that ``data`` exists (before any loading);
    ``data`` / ``classes`` on a bucket are refused (``storage.StorageError``)."""
    common.get_task(task)  # unknown task -> BenchmarkInputError
    unknown = sorted(set(values) - _OPTION_FIELDS)
    if unknown:
        raise BenchmarkInputError(f"{task}: unknown option(s) {unknown}; known: "
                                  f"{sorted(_OPTION_FIELDS)}")
    v = {k: x for k, x in values.items() if x is not None}
    if "data" not in v:
        raise BenchmarkInputError(f"{task}: no data folder given (--data)")
    for key in ("data", "classes"):
        if key in v:
            p = os.path.expanduser(os.fspath(v[key]))
            if base is not None and not storage.is_remote(p) and not os.path.isabs(p):
                p = str(storage.path(base) / p)
            v[key] = storage.require_local(p, f"{task}: {key}", LOCAL_HINT)
    if not v["data"].exists():
        raise BenchmarkInputError(f"{task}: data {str(v['data'])!r} does not exist")
    v.setdefault("split", default_split(task))
    if "num_examples" in v and int(v["num_examples"]) < 1:
        raise BenchmarkInputError(f"{task}: num_examples must be >= 1")
    if "batch_size" in v and int(v["batch_size"]) < 1:
        raise BenchmarkInputError(f"{task}: batch_size must be >= 1")
    return Options(**v)


def load_model(workdir: storage.PathLike, step: int | None = None) -> BenchModel:
    """The backbone of any run or import dir ``umg_jax.load`` accepts (local or on a bucket),
    plus the segmentation head for a seg-head run. ``inference.InputError`` for an unloadable
    directory."""
    from umg_jax import checkpoint, inference

    try:
        ckpt, cfg_file = checkpoint.locate(workdir, step)
        seg = (cfg_file is not None and cfg_file.name == "config.json"
               and checkpoint.read_seg_config(cfg_file) is not None)
    except (FileNotFoundError, ValueError) as e:
        raise inference.InputError(str(e)) from None
    if seg:
        segmenter = inference.load_segmenter(workdir, step)
        backbone = segmenter.backbone
    else:
        segmenter, backbone = None, inference.load(workdir, step)
    return BenchModel(backbone=backbone, segmenter=segmenter,
                      step=int(ckpt.name) if ckpt.name.isdigit() else None,
                      source=os.fspath(workdir))


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def out_dir(model: BenchModel):
    """``RUN/benchmark/<step>`` (``import`` for an import directory), an ``epath.Path``
    (local or on the run's bucket)."""
    return storage.path(model.source) / "benchmark" / (
        str(model.step) if model.step is not None else "import")


def write_result(model: BenchModel, result: TaskResult):
    """``RUN/benchmark/<step>/<task>.json``: the result plus model, step and UTC date; returns
    its path."""
    d = out_dir(model)  # storage.write_text creates a local parent; a bucket prefix needs none
    record = {**dataclasses.asdict(result), "model": model.source, "step": model.step,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    path = d / f"{result.task}.json"
    storage.write_text(path, json.dumps(record, indent=1, default=_jsonable))
    return path


def metric_lines(result: TaskResult) -> list[str]:
    """``task/metric  value`` per metric, plus images/s."""
    items = {**result.metrics, "images_per_s": result.images_per_s}
    width = max(len(f"{result.task}/{k}") for k in items)
    return [f"{result.task + '/' + k:<{width}}  {float(v):10.4f}" for k, v in items.items()]


def markdown_table(model: BenchModel, results: list[TaskResult]) -> str:
    """One row for the model, the tasks' headline metrics as columns in ``COLUMN_ORDER``."""
    by_task = {r.task: r for r in results}
    header, row = ["model", "step"], [model.source, "import" if model.step is None
                                      else str(model.step)]
    for task in [t for t in common.COLUMN_ORDER if t in by_task]:
        m = by_task[task].metrics
        keys = [k for k in HEADLINE.get(task, ()) if k in m] or list(m)
        for k in keys:
            header.append(f"{task} {k}")
            row.append(f"{float(m[k]):.2f}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| " + " | ".join(row) + " |"]
    return "\n".join(lines) + "\n"


def read_suite(path: str) -> list[tuple[str, Options]]:
    """``[(task, Options)]`` of a suite file (local or on a bucket), every entry checked before
    anything runs."""
    p = storage.path(path)
    try:
        entries = json.loads(storage.read_text(p))
    except (OSError, ValueError) as e:
        raise BenchmarkInputError(f"cannot read suite {path!r}: {e}") from None
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and "task" in e for e in entries):
        raise BenchmarkInputError(f"suite {path!r} must be a non-empty JSON list of "
                                  '{"task": ..., "data": ..., ...} objects')
    tasks = [e["task"] for e in entries]
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise BenchmarkInputError(f"suite {path!r} lists task {dup[0]!r} twice (one JSON per "
                                  "task: use two suites)")
    return [(e["task"], make_options(e["task"], {k: v for k, v in e.items() if k != "task"},
                                     p.parent)) for e in entries]


def check_run_dir(workdir: storage.PathLike, step: int | None = None) -> None:
    """Before any loading: the run holds a model (``inference.InputError``) and its
    ``benchmark/`` results can be written there (``storage.StorageError``: a missing bucket, no
    credentials, an unwritable directory)."""
    from umg_jax import checkpoint, inference

    storage.check_bucket_source(workdir)
    try:
        checkpoint.locate(workdir, step)
    except (FileNotFoundError, ValueError) as e:
        raise inference.InputError(str(e)) from None
    storage.check_writable_dir(workdir)


def run_task(model: BenchModel, task: str, opts: Options) -> TaskResult:
    result = common.get_task(task)(model, opts)
    write_result(model, result)
    return result


def _parser() -> argparse.ArgumentParser:
    tasks = "\n".join(f"  {t:<15} {h}" for t, h in TASK_HELP.items())
    ap = argparse.ArgumentParser(
        prog="python -m umg_jax.downstream",
        description=__doc__.split("\n")[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tasks (layout under --data as distributed; protocol in each JSON):\n" + tasks
        + "\n\nprotocol: zero-shot prompt ensembling with each task's templates; images "
          "shorter side -> model size + centre crop (classification, retrieval), whole image "
          "resized (boxes); dense tasks: the run's seg head if any, else sliding windows over "
          "the training-free dense map (shorter side 448 for patch-14 models, else 2x the input; "
          "stride 2/3); a head's panoptic thresholds: the run's seg_calibration.json (chosen on "
          "its validation split), else its config's (Mask2Former's 0.8 / 0.8); metrics in "
          "percent.\n\n"
        + "\n".join(__doc__.split("\n")[2:5]))
    ap.add_argument("--workdir", required=True, help="training workdir or import directory "
                    "(local, gs:// or s3://)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="one of: " + ", ".join(common.TASKS))
    what.add_argument("--suite", help="JSON list of {task, data, ...options}: runs each, "
                      "prints and writes table.md")
    ap.add_argument("--data", help="the data set's root folder, as distributed")
    ap.add_argument("--classes", help="class-name file, one per line (folder layouts)")
    ap.add_argument("--split", help="split (default per task: val; test for cifar and "
                    "retrieval; val2017 for coco_boxes)")
    ap.add_argument("--num_examples", type=int, help="evaluate the first N examples only")
    ap.add_argument("--batch_size", type=int, help="images per model call (default 32)")
    ap.add_argument("--short_side", type=int, help="dense tasks: shorter side in px "
                    "(default 448 for patch-14 models, else 2x the input size)")
    ap.add_argument("--window_stride", type=float, help="dense tasks: sliding-window stride "
                    "as a fraction of the window (default 2/3)")
    ap.add_argument("--resize_pos", action="store_true", default=None,
                    help="dense tasks: interpolate position embeddings instead of windows")
    ap.add_argument("--templates", help="'task' (default: each task's own), 'default' (3), "
                    "or a file with one template holding {} per line")
    ap.add_argument("--workers", type=int, help="image-decoding threads (default 4)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from umg_jax import host_platforms

    host_platforms.pin()  # the platforms this host has, before JAX's backends start
    from umg_jax.inference import InputError

    args = _parser().parse_args(argv)
    try:
        if args.suite:
            runs = read_suite(args.suite)
        else:
            values = {k: getattr(args, k) for k in _OPTION_FIELDS}
            runs = [(args.task, make_options(args.task, values))]
        check_run_dir(args.workdir, args.step)
        model = load_model(args.workdir, args.step)
        results = []
        for task, opts in runs:
            results.append(run_task(model, task, opts))
            print("\n".join(metric_lines(results[-1])), flush=True)
        if args.suite:
            table = markdown_table(model, results)
            storage.write_text(out_dir(model) / "table.md", table)
            print(table, end="")
    except (BenchmarkInputError, InputError, storage.StorageError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0
