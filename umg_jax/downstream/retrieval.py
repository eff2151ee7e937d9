"""Image-text retrieval tasks: ``coco_retrieval`` (Karpathy 5k test) and ``flickr30k`` (1k test).

Layout, as distributed: the Karpathy split file ``dataset_coco.json`` / ``dataset_flickr30k.json``
in ``DATA`` (or ``DATA/annotations``, ``DATA/karpathy``), ``{"images": [{"filepath", "filename",
"split", "sentences": [{"raw"}]}]}``, and the images at ``DATA/<filepath>/<filename>`` (COCO:
``val2014/``) or, without ``filepath`` (Flickr30k), in ``DATA/flickr30k-images/``,
``DATA/images/`` or ``DATA``.

Protocol: the images of ``--split`` (default ``test``) in file order, every caption of each
(``raw`` text, whitespace-stripped; COCO's 5,000 test images carry 25,010 captions,
not exactly 25,000); images as in classification (shorter side resized, centre crop).
i2t R@K: an image is a hit when any of its captions is among its K most similar captions
(identical captions are one gallery item, encoded once); t2i R@K: a caption is a hit
when its image is among its K most similar images; exact ties count their expected hit
(``evaluators.metrics.retrieval_recall``). Percent.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from umg_jax.downstream import common
from umg_jax.downstream.common import BenchmarkInputError, BenchModel, Options, TaskResult
from umg_jax.evaluators import metrics

DEFAULT_SPLITS = {"coco_retrieval": "test", "flickr30k": "test"}
_FILES = {"coco_retrieval": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}


def read_karpathy(root: pathlib.Path, task: str, split: str
                  ) -> tuple[list[pathlib.Path], list[str], np.ndarray, pathlib.Path]:
    """``(image paths, captions, caption -> image index int64 [M], json path)`` of ``split``."""
    name = _FILES[task]
    found = [d / name for d in (root, root / "annotations", root / "karpathy")
             if (d / name).is_file()]
    if not found:
        raise BenchmarkInputError(f"{task}: {name} not found in {str(root)!r} (nor in its "
                                  "annotations/ or karpathy/ folder)")
    try:
        entries = json.loads(found[0].read_text())["images"]
        chosen = [e for e in entries if e["split"] == split]
        caps = [[s["raw"] for s in e["sentences"]] for e in chosen]
    except (ValueError, KeyError, TypeError) as e:
        raise BenchmarkInputError(f"{task}: {str(found[0])!r} is not a Karpathy split file "
                                  f"({type(e).__name__}: {e})") from None
    if not chosen:
        splits = sorted({e.get("split") for e in entries})
        raise BenchmarkInputError(f"{task}: no image of split {split!r} in {str(found[0])!r} "
                                  f"(splits: {splits})")
    paths = []
    for e in chosen:
        if e.get("filepath"):
            paths.append(root / e["filepath"] / e["filename"])
        else:
            dirs = [d for d in (root / "flickr30k-images", root / "images", root)
                    if (d / e["filename"]).is_file()]
            paths.append((dirs[0] if dirs else root / "flickr30k-images") / e["filename"])
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise BenchmarkInputError(f"{task}: {len(missing)} of {len(paths)} {split} images are "
                                  f"missing, e.g. {str(missing[0])!r}")
    empty = [str(p) for p, c in zip(paths, caps, strict=True) if not c]
    if empty:
        raise BenchmarkInputError(f"{task}: image {empty[0]!r} has no caption")
    texts = [t.strip() for c in caps for t in c]
    owner = np.repeat(np.arange(len(caps)), [len(c) for c in caps]).astype(np.int64)
    return paths, texts, owner, found[0]


def run(model: BenchModel, opts: Options, task: str) -> TaskResult:
    root = pathlib.Path(opts.data)
    if not root.is_dir():
        raise BenchmarkInputError(f"{task}: --data {str(root)!r} is not a directory")
    paths, texts, owner, path = read_karpathy(root, task, opts.split)
    if opts.num_examples is not None:
        paths = paths[:opts.num_examples]
        keep = owner < len(paths)
        texts, owner = [t for t, k in zip(texts, keep, strict=True) if k], owner[keep]
    bb = model.backbone
    size, mean, std = bb.image_size, bb.pixel_mean, bb.pixel_std

    def transform(p):
        return common.clip_preprocess(common.load_image(p), size, mean, std)

    t0 = time.perf_counter()
    # Identical captions (COCO repeats some across images) are one text, encoded once: copies
    # encoded at other batch positions could differ by float noise and split their tie.
    distinct, text_id = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    text_id = text_id.reshape(-1)
    txt = common.encode_texts(bb, [str(t) for t in distinct])[text_id]
    img = np.zeros((len(paths), txt.shape[1]), np.float32)
    for start, emb, _ in common.embed_images(bb, paths, transform, opts.batch_size, opts.workers,
                                             task):
        img[start:start + len(emb)] = emb
    seconds = time.perf_counter() - t0
    rec = metrics.retrieval_recall(img, txt, owner, (1, 5, 10), txt_id=text_id)
    return TaskResult(
        task=task, metrics={k: common.percent(v) for k, v in sorted(rec.items())},
        protocol={"annotations": str(path), "split": opts.split, "num_images": len(paths),
                  "num_captions": len(texts),
                  "captions": "every caption of each image ('raw', stripped)",
                  "preprocess": f"shorter side -> {size} (bicubic), centre crop {size}",
                  "metrics": "i2t: any of the image's captions in the top K of the distinct "
                             "captions (identical ones are one); t2i: the caption's image "
                             "in the top K; exact ties: expected hit over their orders; percent"},
        num_examples=len(paths), images_per_s=len(paths) / max(seconds, 1e-9))


TASKS = {"coco_retrieval": lambda m, o: run(m, o, "coco_retrieval"),
         "flickr30k": lambda m, o: run(m, o, "flickr30k")}
