"""What every benchmark task shares: the options, the loaded model, the result record, the task
registry and the input-error type that the CLI turns into a one-line message and exit 2.

A task is a function ``run(model: BenchModel, opts: Options) -> TaskResult`` named in
:data:`TASKS`; its module is imported only when the task runs (``get_task``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from umg_jax.concurrency import map_threaded


class BenchmarkInputError(ValueError):
    """Bad input (missing folder, unreadable label, empty class list...): the CLI prints the
    message on one line and exits 2. Never raise it for a bug."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a task may read from the command line."""

    data: pathlib.Path  # the data set's root folder (or TFDS data_dir), as distributed
    split: str = "val"  # split name where the layout has several
    classes: pathlib.Path | None = None  # class-name file (one per line) for folder layouts
    num_examples: int | None = None  # evaluate the first N examples (sorted order); None = all
    batch_size: int = 32  # images per jitted call (split over the local devices)
    short_side: int | None = None  # dense tasks: resize the shorter side to this; None = 448 for
    #   patch-14 models, else 2x the model's input size
    window_stride: float = 2 / 3  # sliding window stride as a fraction of the window (overlap 1/3)
    resize_pos: bool = False  # dense tasks: interpolate position embeddings to the image instead
    #   of sliding windows
    templates: str = "task"  # "task" (each task's templates), "default" (3), or a file of
    #   templates with one "{}" each
    workers: int = 4  # image-decoding threads


@dataclasses.dataclass
class BenchModel:
    """The model under test. ``backbone`` is a :class:`umg_jax.inference.UMGModel`;
    ``segmenter`` a :class:`umg_jax.inference.Segmenter` when the run has a segmentation head."""

    backbone: Any
    segmenter: Any | None
    step: int | None  # checkpoint step (None for an import directory)
    source: str  # the --workdir as given


@dataclasses.dataclass
class TaskResult:
    """One task's output, written to ``RUN/benchmark/<step>/<task>.json``.

    ``metrics``: flat ``{"top1": 71.2, ...}`` in percent where the paper reports percent.
    ``protocol``: every choice that changes the number (resolution, templates, window, thresholds
    and where they came from, ignore handling, deviations from the paper). ``skipped``: counts
    of inputs left out, by reason (e.g. ``{"no label file": 3}``)."""

    task: str
    metrics: dict[str, float]
    protocol: dict[str, Any]
    num_examples: int
    images_per_s: float
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


# task name -> module under umg_jax.downstream holding ``TASKS[name]`` (imported on use).
TASKS: dict[str, str] = {
    "imagenet": "classification", "cifar10": "classification", "cifar100": "classification",
    "folder": "classification",
    "coco_retrieval": "retrieval", "flickr30k": "retrieval",
    "coco_boxes": "regions",
    "ade150": "semantic", "voc20": "semantic", "context59": "semantic", "folder_seg": "semantic",
    "coco_panoptic": "panoptic", "ade_panoptic": "panoptic",
}
# The paper's column order for ``--suite`` tables.
COLUMN_ORDER = ("imagenet", "cifar10", "cifar100", "folder", "coco_retrieval", "flickr30k",
                "coco_boxes", "ade150", "voc20", "context59", "folder_seg", "coco_panoptic",
                "ade_panoptic")


def split_tasks(evaluate: Callable[[BenchModel, Options, str, Any], TaskResult],
                splits: dict[str, Callable[[Options], Any]]
                ) -> dict[str, Callable[[BenchModel, Options], TaskResult]]:
    """A module's ``TASKS``: for each name, ``evaluate(model, opts, name, splits[name](opts))``."""
    def task(name: str) -> Callable[[BenchModel, Options], TaskResult]:
        def run(model: BenchModel, opts: Options) -> TaskResult:
            return evaluate(model, opts, name, splits[name](opts))

        run.__name__ = f"run_{name}"
        return run

    return {name: task(name) for name in splits}


def get_task(name: str) -> Callable[[BenchModel, Options], TaskResult]:
    """The task function; ``BenchmarkInputError`` for an unknown name."""
    if name not in TASKS:
        raise BenchmarkInputError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    module = importlib.import_module(f"umg_jax.downstream.{TASKS[name]}")
    return module.TASKS[name]


# Keyed by the backbone object itself (weakly): an id() could be re-used by a later model.
_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_images(backbone: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ``images [B, S, S, 3] float32`` -> ``(img [B, E], dense [B, gh, gw, E])``,
    both L2-normalised float32, the batch split over every local device (padded to a multiple
    of the device count; one jitted function per backbone, so keep ``B`` fixed across calls)."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from umg_jax.evaluators.common import normalize
    from umg_jax.models import clip

    fn = _ENCODERS.get(backbone)
    if fn is None:
        mesh = Mesh(np.array(jax.local_devices()), ("data",))
        apply = jax.jit(lambda p, x: backbone.model.apply({"params": p}, x,
                                                          method=clip.CLIP.encode_image),
                        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
        fn = _ENCODERS[backbone] = (apply, len(mesh.devices))
    apply, n = fn
    b = len(images)
    pad = -b % n
    x = np.asarray(images, np.float32)
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    out = apply(backbone.params, x)
    return (normalize(np.asarray(out["img"][:b], np.float32)),
            normalize(np.asarray(out["dense"][:b], np.float32)))


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped); ``BenchmarkInputError``
    for a missing or empty file."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise BenchmarkInputError(f"class list {str(p)!r} does not exist")
    names = [ln.strip() for ln in p.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise BenchmarkInputError(f"class list {str(p)!r} is empty")
    return names


def read_images(paths: Sequence[str | os.PathLike], workers: int = 4
                ) -> Iterator[np.ndarray]:
    """``uint8 [H, W, 3]`` for each path, in order, decoded by ``workers`` threads (PIL releases
    the GIL while decoding). ``BenchmarkInputError`` naming the file for an unreadable image."""
    return map_threaded(load_image, list(paths), workers)


def progress(items: Iterable, total: int, desc: str, every_s: float = 5.0,
             count: Callable[[Any], int] = lambda _: 1) -> Iterator:
    """Yields ``items`` and prints ``desc: 120/5000 (2%) | 41.3 img/s | ETA 1m58s`` to stderr at
    most every ``every_s`` seconds and at the end; ``count(item)`` images per item (e.g. the
    batch size). Tasks time their whole loop themselves for ``TaskResult.images_per_s``."""
    from umg_jax.metrics import format_duration

    t0 = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += count(item)
        now = time.perf_counter()
        if now - last >= every_s or done >= total:
            rate = done / max(now - t0, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            print(f"{desc}: {done}/{total} ({100 * done / max(total, 1):.0f}%) | "
                  f"{rate:.1f} img/s | ETA {format_duration(eta)}", file=sys.stderr, flush=True)
            last = now


# ------------------------------------------------------------------ shared by the image tasks
DATA_DIR = pathlib.Path(__file__).parent / "data"  # package data (class names, templates)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def package_list(name: str) -> list[str]:
    """The lines of ``umg_jax/downstream/data/<name>`` without ``#`` header lines."""
    lines = (DATA_DIR / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def resolve_templates(opts: Options, task_templates: Sequence[str]) -> tuple[str, ...]:
    """The prompt templates of ``--templates``: ``task`` -> ``task_templates``, ``default`` ->
    the three of ``umg_jax.load``, else a file with one template (holding ``{}``) per line."""
    from umg_jax.inference import DEFAULT_TEMPLATES

    if opts.templates == "task":
        return tuple(task_templates)
    if opts.templates == "default":
        return DEFAULT_TEMPLATES
    p = pathlib.Path(opts.templates)
    if not p.is_file():
        raise BenchmarkInputError(f"--templates {opts.templates!r}: neither 'task', 'default' "
                                  "nor a file")
    out = [ln.strip() for ln in p.read_text().splitlines()
           if ln.strip() and not ln.startswith("#")]
    bad = [t for t in out if t.count("{}") != 1]
    if not out or bad:
        raise BenchmarkInputError(f"templates file {str(p)!r}: " + (
            f"template {bad[0]!r} must hold exactly one {{}}" if bad else "no template"))
    return tuple(out)


# backbone -> (jitted text tower, device count). Weak keys: an entry dies with its backbone, and
# a later backbone at the same address cannot pick up a stale compiled model.
_TEXT_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_texts(backbone: Any, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """``texts`` -> ``[N, E]`` L2-normalised float32 text embeddings, in fixed-size batches
    (one compiled shape) split over every local device."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from umg_jax.evaluators.common import normalize
    from umg_jax.models import clip

    fn = _TEXT_ENCODERS.get(backbone)
    if fn is None:
        mesh = Mesh(np.array(jax.local_devices()), ("data",))
        model = backbone.model  # not the backbone: the cached value must not keep its key alive
        apply = jax.jit(lambda p, t: model.apply({"params": p}, t, method=clip.CLIP.encode_text),
                        in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
        fn = _TEXT_ENCODERS[backbone] = (apply, len(mesh.devices))
    apply, n = fn
    b = -(-max(1, min(batch_size, len(texts))) // n) * n  # a multiple of the device count
    out = []
    for i in range(0, len(texts), b):
        tok = backbone.tokenize(list(texts[i:i + b]))
        k = len(tok)
        if k < b:
            tok = np.concatenate([tok, np.repeat(tok[-1:], b - k, 0)])
        out.append(np.asarray(apply(backbone.params, tok), np.float32)[:k])
    if not out:
        return np.zeros((0, 0), np.float32)
    return normalize(np.concatenate(out))


def class_embeddings(backbone: Any, names: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256) -> np.ndarray:
    """Prompt-ensembled class embeddings ``[C, E]`` float32: the mean of the L2-normalised
    embeddings of every template filled with the name, L2-normalised (CLIP's ensembling)."""
    from umg_jax.evaluators.common import normalize

    if not names:
        raise BenchmarkInputError("the class list is empty")
    if any(not n.strip() for n in names):
        raise BenchmarkInputError("the class list holds an empty name")
    emb = encode_texts(backbone, [t.format(n) for n in names for t in templates], batch_size)
    return normalize(emb.reshape(len(names), len(templates), -1).mean(1))


def load_image(source: Any) -> np.ndarray:
    """A path or an array -> ``uint8 [H, W, 3]``; ``BenchmarkInputError`` naming an unreadable
    file (the task stops: a benchmark number over a silently smaller set would be wrong)."""
    from umg_jax import inference

    try:
        return inference.read_image(source)
    except inference.InputError as e:
        raise BenchmarkInputError(str(e)) from None


def clip_preprocess(image: np.ndarray, size: int, mean: np.ndarray, std: np.ndarray
                    ) -> np.ndarray:
    """CLIP's evaluation transform: ``uint8 [H, W, 3]`` -> shorter side resized to ``size``
    (bicubic, PIL) -> centre crop ``size x size`` -> ``(x / 255 - mean) / std``,
    ``float32 [size, size, 3]`` (open_clip / torchvision rounding)."""
    from PIL import Image

    h, w = image.shape[:2]
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    im = Image.fromarray(image)
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return (x - mean) / std


def embed_images(backbone: Any, sources: Sequence[Any], transform: Callable[[Any], np.ndarray],
                 batch_size: int, workers: int, desc: str
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(start, img [b, E], dense [b, gh, gw, E])`` per batch of ``sources`` (L2-normalised
    float32). ``transform(source) -> float32 [S, S, 3]`` runs in ``workers`` threads; every
    call to the model has ``batch_size`` images (the last batch is padded), one compiled shape."""
    prepared = map_threaded(transform, sources, workers)
    batches = range(0, len(sources), batch_size)
    for start in progress(batches, len(sources), desc,
                          count=lambda s: min(batch_size, len(sources) - s)):
        k = min(batch_size, len(sources) - start)
        x = np.stack([next(prepared) for _ in range(k)])
        if k < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - k, *x.shape[1:]), x.dtype)])
        img, dense = encode_images(backbone, x)
        yield start, img[:k], dense[:k]


def percent(x: float) -> float:
    """A fraction as a percentage rounded to 1e-4 (the JSON's and table's unit)."""
    return round(100.0 * float(x), 4)
