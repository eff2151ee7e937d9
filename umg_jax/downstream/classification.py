"""Zero-shot classification tasks: ``imagenet``, ``cifar10``, ``cifar100``, ``folder``.

Protocol (open_clip / CLIP_benchmark conventions): every image -> shorter side resized to the
model's input size (bicubic) and centre-cropped; its embedding against the prompt-ensembled
class embeddings (mean of the normalised template embeddings, renormalised); metrics top-1,
top-5 and mean per-class recall (balanced accuracy over the classes present), in percent.

Layouts, as distributed:
- ``imagenet``: ``DATA/<split>/<wnid>/*.JPEG`` (ILSVRC2012 ImageFolder, split ``val``); label i =
  the i-th of the 1000 sorted wnids (package data), names from OpenAI's list or ``--classes``
  (1000 lines in that order). Or a TFDS data_dir holding ``imagenet2012/<version>/`` prepared
  in its default ``tfrecord`` or in ``array_record`` format, both read without TensorFlow (split
  ``val`` -> ``validation``; its ClassLabel names must be the same sorted wnids).
- ``cifar10`` / ``cifar100``: the python-pickle batches, ``DATA`` being either the extracted
  ``cifar-10-batches-py`` / ``cifar-100-python`` folder or its parent; split ``test`` (default)
  or ``train``. Pickles are read with an unpickler that only rebuilds numpy arrays.
- ``folder``: ``DATA/[<split>/]<class>/<image>``; class names from ``--classes`` (one per sorted
  folder) or the folder names (``_`` read as a space).
"""

from __future__ import annotations

import pathlib
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from umg_jax.downstream import common, tfrecord
from umg_jax.downstream.common import BenchmarkInputError, BenchModel, Options, TaskResult
from umg_jax.evaluators import metrics

DEFAULT_SPLITS = {"cifar10": "test", "cifar100": "test", "imagenet": "val", "folder": "val"}


# ------------------------------------------------------------------------------ metrics ---
def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``logits [N, C]``, ``labels [N]`` int -> top-1, top-5 and mean per-class recall (over the
    classes with at least one example), in percent."""
    acc = metrics.topk_accuracy(logits, labels, (1, 5))
    pred = np.argmax(logits, 1)
    recall = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    return {"top1": common.percent(acc[1]), "top5": common.percent(acc[5]),
            "mean_per_class_recall": common.percent(np.mean(recall))}


def zero_shot(model: BenchModel, opts: Options, task: str, sources: Sequence, labels: np.ndarray,
              names: Sequence[str], task_templates: Sequence[str], protocol: dict,
              load: Callable[[object], np.ndarray] = common.load_image) -> TaskResult:
    """The shared loop: embed ``sources`` in batches (``load(source) -> uint8 [H, W, 3]``,
    default: a path or an array), score against the class embeddings of ``names``, return the
    task's result. ``labels [N]`` int64 is read after the pass (``load`` may fill it)."""
    if len(sources) == 0:
        raise BenchmarkInputError(f"{task}: no image found under {str(opts.data)!r}")
    if opts.num_examples is not None:
        sources, labels = sources[:opts.num_examples], labels[:opts.num_examples]
    bb = model.backbone
    templates = common.resolve_templates(opts, task_templates)
    text = common.class_embeddings(bb, names, templates)
    size, mean, std = bb.image_size, bb.pixel_mean, bb.pixel_std

    def transform(src):
        return common.clip_preprocess(load(src), size, mean, std)

    t0 = time.perf_counter()
    logits = np.zeros((len(sources), len(names)), np.float32)
    for start, img, _ in common.embed_images(bb, sources, transform, opts.batch_size,
                                             opts.workers, task):
        logits[start:start + len(img)] = img @ text.T
    seconds = time.perf_counter() - t0
    return TaskResult(
        task=task, metrics=classification_metrics(logits, np.asarray(labels, np.int64)),
        protocol={"preprocess": f"shorter side -> {size} (bicubic), centre crop {size}",
                  "templates": opts.templates, "num_templates": len(templates),
                  "num_classes": len(names), "split": opts.split,
                  "metrics": "top-1 / top-5 accuracy, mean per-class recall over the classes "
                             "present, percent", **protocol},
        num_examples=len(sources), images_per_s=len(sources) / max(seconds, 1e-9))


# ------------------------------------------------------------------------------ layouts ---
def _images_in(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in common.IMAGE_EXTENSIONS)


def _split_dir(opts: Options, task: str) -> pathlib.Path:
    root = pathlib.Path(opts.data)
    if not root.is_dir():
        raise BenchmarkInputError(f"{task}: --data {str(root)!r} is not a directory")
    d = root / opts.split
    if not d.is_dir():
        raise BenchmarkInputError(f"{task}: split folder {str(d)!r} does not exist")
    return d


def _class_tree(root: pathlib.Path) -> tuple[list[str], list[pathlib.Path], np.ndarray]:
    """``(sorted class folder names, image paths, label index per image)``."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for i, f in enumerate(folders):
        imgs = _images_in(f)
        paths += imgs
        labels += [i] * len(imgs)
    return [f.name for f in folders], paths, np.asarray(labels, np.int64)


class _TFRecordSplit:
    """Random access to one split of a TFDS data set in its default ``tfrecord`` format, without
    TensorFlow (:mod:`umg_jax.downstream.tfrecord`): ``source[i] -> {"image": uint8 [H, W, 3],
    "label": int}``. Images are TFDS ``Image`` features (encoded bytes) or uint8 ``Tensor``
    features (the values)."""

    def __init__(self, version_dir: pathlib.Path, builder: Any, split: str):
        files = sorted(version_dir.glob(f"{builder.name}-{split}.tfrecord-*"))
        if not files:
            raise BenchmarkInputError(f"imagenet: no {builder.name}-{split}.tfrecord-* files in "
                                      f"{str(version_dir)!r}")
        try:
            self.index = [(f, off, n) for f in files for off, n in tfrecord.index(f)]
        except tfrecord.TFRecordError as e:
            raise BenchmarkInputError(f"imagenet: {e}") from None
        self.feature = builder.info.features["image"]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from umg_jax.data.records import decode_image

        path, off, n = self.index[i]
        try:
            ex = tfrecord.parse_example(tfrecord.read(path, off, n))
            raw, label = ex["image"], ex["label"][0]
        except (tfrecord.TFRecordError, KeyError, IndexError) as e:
            raise BenchmarkInputError(f"imagenet: record at byte {off} of {str(path)!r} is not "
                                      f"an image / label example ({e})") from None
        if raw and isinstance(raw[0], bytes):  # an Image feature: the encoded file
            return {"image": decode_image(raw[0]), "label": label}
        f = self.feature
        return {"image": np.asarray(raw, f.np_dtype).reshape(f.shape), "label": label}


def _tfds_imagenet(model: BenchModel, opts: Options, names: list[str], wnids: list[str]
                   ) -> TaskResult:
    """``DATA/imagenet2012/<version>/`` (TFDS): ``array_record`` through ``as_data_source``,
    the default ``tfrecord`` through :class:`_TFRecordSplit`."""
    import tensorflow_datasets as tfds

    base = pathlib.Path(opts.data) / "imagenet2012"
    versions = sorted((d for d in base.iterdir() if (d / "dataset_info.json").is_file()),
                      key=lambda d: [int(x) if x.isdigit() else -1 for x in d.name.split(".")])
    if not versions:
        raise BenchmarkInputError(f"imagenet: {str(base)!r} holds no prepared TFDS version "
                                  "(<version>/dataset_info.json)")
    split = "validation" if opts.split == "val" else opts.split
    try:
        builder = tfds.builder_from_directory(str(versions[-1]))  # dataset_info.json only
        tfrecord_files = builder.info.file_format == tfds.core.FileFormat.TFRECORD
        sources = None if tfrecord_files else builder.as_data_source()
    except Exception as e:  # noqa: BLE001  (TFDS raises many types for an unreadable format)
        raise BenchmarkInputError(
            f"imagenet: cannot read the TFDS data set {str(versions[-1])!r} ({type(e).__name__}:"
            f" {str(e).splitlines()[0] if str(e) else ''}); pass the ImageFolder tree instead"
        ) from None
    label_names = list(getattr(builder.info.features["label"], "names", []) or [])
    if label_names != wnids:
        raise BenchmarkInputError(f"imagenet: {str(versions[-1])!r}'s label names are not the "
                                  "1000 sorted ImageNet-1k wnids")
    if tfrecord_files:
        source = _TFRecordSplit(versions[-1], builder, split)
    else:
        if split not in sources:
            raise BenchmarkInputError(f"imagenet: split {split!r} not in {sorted(sources)}")
        source = sources[split]
    n = len(source) if opts.num_examples is None else min(len(source), opts.num_examples)
    labels = np.full(n, -1, np.int64)

    def load(i: int) -> np.ndarray:
        ex = source[i]
        labels[i] = int(ex["label"])  # read while the image is decoded (one pass)
        return common.load_image(np.asarray(ex["image"]))

    return zero_shot(model, opts, "imagenet", list(range(n)), labels, names,
                     common.package_list("imagenet_templates.txt"),
                     {"layout": f"TFDS {versions[-1]} ({split})", "split": split,
                      "labels": "the TFDS label (index among the 1000 sorted wnids)"}, load)


def run_imagenet(model: BenchModel, opts: Options) -> TaskResult:
    root = pathlib.Path(opts.data)
    wnids = common.package_list("imagenet_wnids.txt")
    names = (common.read_classes(opts.classes) if opts.classes
             else common.package_list("imagenet_classes.txt"))
    if len(names) != len(wnids):
        raise BenchmarkInputError(f"imagenet: the class list has {len(names)} names, expected "
                                  f"{len(wnids)} (one per sorted wnid)")
    if (root / "imagenet2012").is_dir():
        return _tfds_imagenet(model, opts, names, wnids)
    d = _split_dir(opts, "imagenet")
    folders, paths, local = _class_tree(d)
    index = {w: i for i, w in enumerate(wnids)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise BenchmarkInputError(f"imagenet: folder {unknown[0]!r} in {str(d)!r} is not an "
                                  "ImageNet-1k wnid")
    labels = np.asarray([index[f] for f in folders], np.int64)[local]
    return zero_shot(model, opts, "imagenet", paths, labels, names,
                     common.package_list("imagenet_templates.txt"),
                     {"layout": f"{d}/<wnid>/*", "class_folders": len(folders),
                      "labels": "index of the wnid among the 1000 sorted ILSVRC2012 wnids"})


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds the numpy arrays, lists and dicts of the CIFAR batches and nothing else (a
    pickle can run any callable it names)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                          "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _read_cifar_batch(path: pathlib.Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> ``(uint8 [N, 32, 32, 3], int64 [N])``."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], np.uint8)
        labels = np.asarray(d[label_key], np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise BenchmarkInputError(f"cannot read CIFAR batch {str(path)!r}: {e}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise BenchmarkInputError(f"CIFAR batch {str(path)!r}: data {data.shape}, "
                                  f"{len(labels)} labels (expected [N, 3072] and N labels)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _run_cifar(model: BenchModel, opts: Options, task: str) -> TaskResult:
    ten = task == "cifar10"
    sub, key = ("cifar-10-batches-py", b"labels") if ten else ("cifar-100-python", b"fine_labels")
    files = {"test": ["test_batch"] if ten else ["test"],
             "train": [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]}
    split = "test" if opts.split in ("test", "val") else opts.split
    if split not in files:
        raise BenchmarkInputError(f"{task}: unknown split {opts.split!r} (test or train)")
    root = pathlib.Path(opts.data)
    if (root / sub).is_dir():
        root = root / sub
    missing = [n for n in files[split] if not (root / n).is_file()]
    if missing:
        raise BenchmarkInputError(f"{task}: {str(root / missing[0])!r} does not exist (expected "
                                  f"the python-pickle batches of {sub}/)")
    parts = [_read_cifar_batch(root / n, key) for n in files[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    names = (common.read_classes(opts.classes) if opts.classes
             else common.package_list(f"{task}_classes.txt"))
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise BenchmarkInputError(f"{task}: label {int(labels.max())} outside the "
                                  f"{len(names)}-name class list")
    return zero_shot(model, opts, task, list(images), labels, names,
                     common.package_list("cifar_templates.txt"),
                     {"layout": f"{root}/{'+'.join(files[split])}", "split": split})


def run_folder(model: BenchModel, opts: Options) -> TaskResult:
    root = pathlib.Path(opts.data)
    if not root.is_dir():
        raise BenchmarkInputError(f"folder: --data {str(root)!r} is not a directory")
    if (root / opts.split).is_dir():
        root = root / opts.split
    folders, paths, labels = _class_tree(root)
    if not folders:
        raise BenchmarkInputError(f"folder: no class folder in {str(root)!r}")
    if opts.classes:
        names = common.read_classes(opts.classes)
        if len(names) != len(folders):
            raise BenchmarkInputError(f"folder: --classes has {len(names)} names for "
                                      f"{len(folders)} class folders in {str(root)!r}")
    else:
        names = [f.replace("_", " ") for f in folders]
    return zero_shot(model, opts, "folder", paths, labels, names,
                     common.package_list("imagenet_templates.txt"),
                     {"layout": f"{root}/<class>/*", "class_names": "--classes (sorted folder "
                      "order)" if opts.classes else "folder names, '_' -> ' '"})


TASKS = {"imagenet": run_imagenet, "folder": run_folder,
         "cifar10": lambda m, o: _run_cifar(m, o, "cifar10"),
         "cifar100": lambda m, o: _run_cifar(m, o, "cifar100")}
