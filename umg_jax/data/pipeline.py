"""The Grain input pipeline: ArrayRecord shards -> batches of the contract in ``schema.py``.

    source (records.RecordSource, random access, bytes)
      -> tag each record with its global index (for error reports)
      -> this process's part: records[process_index::process_count]
      -> train: shuffle(seed) + repeat forever (each epoch reshuffled)
      -> random_map(decode + augment + tokenise + pad)   per-example RNG = f(seed, index), so the
                                                         stream does not depend on the workers
      -> to_iter_dataset -> mp_prefetch(num_workers)     heavy work in worker processes
      -> drop bad records (counting filter)              runs in THIS process
      -> batch(batch_size, drop_remainder=True)

Bad input. The map returns a sentinel ``{"_bad": kind, "_source", "_detail"}`` instead of raising
(unless ``strict``); the filter after ``mp_prefetch`` drops sentinels, logs the source id and
counts them by kind. Because the filter sits after the worker processes, its counters live in
the main process, are exact with any number of workers, and are part of the iterator state (a
restored iterator continues the counts). Element-level drops (a bad box, mask or caption; see
``transforms.py``) travel inside the example as ``drop_counts`` and are added by the same filter,
which removes that key. Read the totals with :func:`drop_counts`. Putting ``mp_prefetch`` before
the filter and batch is also what Grain recommends for a stream that must not depend on
``num_workers``: batches are identical for 0, 1 or N workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from umg_jax.data import transforms

log = logging.getLogger("umg_jax.data")

_BAD = "_bad"  # sentinel key of a record that was dropped


# ----------------------------------------------------------------------------- data dirs ---


def _cache_root() -> pathlib.Path:
    root = os.environ.get("UMG_JAX_CACHE")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "umg_jax"


def _synthetic_settings(data_cfg, split: str) -> dict[str, Any]:
    """Every ``synthetic_*`` knob of the data config (they define the generated world)."""
    s = {k: data_cfg[k] for k in sorted(data_cfg.keys()) if k.startswith("synthetic_")}
    s = {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}
    s["split"] = split
    return s


def ensure_data(data_cfg, split: str) -> str:
    """Directory of ArrayRecord shards for ``split`` ("train", "eval" or "val").

    ``data_cfg.path`` / ``eval_path`` / ``val_path`` when set (checked: it must hold shards, else
    ``FileNotFoundError``; a run on real training data with no ``val_path`` has no validation
    split: ``FileNotFoundError``). When empty, the embedded synthetic world is generated on first
    use into ``$UMG_JAX_CACHE/synthetic/<hash of the synthetic_* settings>/<split>`` (default root
    ``~/.cache/umg_jax``) and reused afterwards. Generation writes to a temporary directory and
    renames it, so concurrent processes never see a half-written data set.
    """
    from umg_jax.data import records

    if split not in ("train", "eval", "val"):
        raise ValueError(f"split must be 'train', 'eval' or 'val', got {split!r}")
    path = {"train": data_cfg.path, "eval": data_cfg.eval_path,
            "val": data_cfg.get("val_path", "")}[split]
    if split == "val" and not path and data_cfg.path:
        raise FileNotFoundError("no validation split for this data set: set data.val_path "
                                "(shards disjoint from data.eval_path)")
    if path:
        p = pathlib.Path(path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"data path {str(p)!r} ({split}) does not exist")
        if not records.shard_paths(str(p)):
            raise FileNotFoundError(f"data path {str(p)!r} ({split}) holds no ArrayRecord shards")
        return str(p)

    from umg_jax.data import synthetic

    settings = _synthetic_settings(data_cfg, split)
    settings["generator_version"] = getattr(synthetic, "VERSION", 0)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = _cache_root() / "synthetic" / key / split
    if out.is_dir() and records.shard_paths(str(out)):
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    num = data_cfg.synthetic_num_train if split == "train" else data_cfg.synthetic_num_eval
    kwargs = {}
    for knob, arg in (("synthetic_seed", "seed"), ("synthetic_num_shards", "num_shards"),
                      ("synthetic_image_size", "image_size")):
        if knob in data_cfg:
            kwargs[arg] = data_cfg[knob]
    log.info("generating %d synthetic %s examples into %s", num, split, out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{split}-", dir=out.parent))
    try:
        synthetic.write_synthetic(str(tmp), int(num), split=split, **kwargs)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out.is_dir() and records.shard_paths(str(out))):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


# ------------------------------------------------------------------------- grain pieces ---


class _WithIndex(grain.transforms.MapWithIndex):
    """raw -> (global record index, raw): lets a record that does not parse still be named."""

    def map_with_index(self, index: int, element: bytes) -> tuple[int, bytes]:
        return index, element


class _DecodeAugment(grain.transforms.RandomMap):
    """(index, raw) -> example, or a bad-record sentinel (strict: raises)."""

    def __init__(self, transform: transforms.ExampleTransform, name: str):
        self.transform, self.name = transform, name

    def random_map(self, element: tuple[int, bytes], rng: np.random.Generator):
        index, raw = element
        try:
            return self.transform(raw, rng)
        except transforms.BadRecordError as e:
            where = f"{self.name}#{index}"
            source = where if e.source == "<unknown>" else f"{e.source} ({where})"
            if self.transform.cfg.strict:
                raise transforms.BadRecordError(e.kind, source, e.detail) from e
            return {
                _BAD: np.int32(transforms.KIND_INDEX[e.kind]),
                "_source": source,
                "_detail": e.detail,
            }


class _DropBadIterDataset(grain.IterDataset):
    """Filter that drops bad-record sentinels and counts every drop by kind (see module doc)."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> _DropBadIterator:
        return _DropBadIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "DropBadIterDataset"


class _DropBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.counts = np.zeros(len(transforms.KINDS), np.int64)

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            ex = next(self._parent)
            if _BAD in ex:
                kind = transforms.KINDS[int(ex[_BAD])]
                self.counts[int(ex[_BAD])] += 1
                log.warning("dropped record %s: bad %s: %s", ex["_source"], kind, ex["_detail"])
                continue
            self.counts += ex.pop("drop_counts")
            return ex

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "drop_counts": [int(c) for c in self.counts]}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.counts = np.asarray(state["drop_counts"], np.int64)

    def __str__(self) -> str:
        return "DropBadIterator"


def drop_counts(iterator: grain.DatasetIterator) -> dict[str, int]:
    """Bad inputs dropped so far by an iterator of :func:`make_dataset`, ``{kind: count}``.

    Counts of this process (each process counts its own shard), restored with the state.
    """
    todo = [iterator]
    while todo:
        it = todo.pop()
        if isinstance(it, _DropBadIterator):
            return {k: int(c) for k, c in zip(transforms.KINDS, it.counts, strict=True)}
        todo.extend(getattr(it, "_parents", ()))
    raise ValueError("not an iterator of umg_jax.data.pipeline.make_dataset")


# -------------------------------------------------------------------------------- build ---


def make_dataset(
    data_cfg,
    model_cfg,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    path: str | None = None,
) -> grain.IterDataset:
    """The input pipeline of this process (see module doc) as a Grain ``IterDataset``.

    Args:
      data_cfg / model_cfg: ``config.data`` / ``config.model``.
      batch_size: examples per batch of THIS process (global batch / process count).
      train: shuffle + repeat forever + random augmentation; else one pass, in order, resize only,
        the first caption.
      seed: shuffle and augmentation seed (plus ``data_cfg.shuffle_seed``).
      process_index / process_count: this process's part; default ``jax.process_index()`` /
        ``jax.process_count()``.
      path: data directory; default :func:`ensure_data` for the train / eval split.

    Yields dicts with the keys of ``schema.BATCH_KEYS`` (shapes there, B = ``batch_size``,
    numpy) plus ``label [B] int32``.
    """
    from umg_jax.data import records

    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = path or ensure_data(data_cfg, "train" if train else "eval")
    seed = (int(seed) + int(data_cfg.get("shuffle_seed", 0))) % 2**32

    cfg = transforms.TransformConfig.from_configs(data_cfg, model_cfg, train=train,
                                                  text_vocab=text_vocabulary(path))
    source = records.RecordSource(records.shard_paths(path))
    if len(source) < process_count:
        raise ValueError(f"{path} has {len(source)} records, fewer than {process_count} processes")
    ds = grain.MapDataset.source(source).map_with_index(_WithIndex())
    ds = ds[process_index::process_count]
    if train:
        ds = ds.shuffle(seed=seed).repeat(None)
    name = pathlib.Path(path).name
    ds = ds.random_map(_DecodeAugment(transforms.ExampleTransform(cfg), name), seed=seed)
    it = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=int(data_cfg.get("read_threads", 2)),
            prefetch_buffer_size=int(data_cfg.get("prefetch_buffer", 16)),
        )
    )
    workers = int(data_cfg.num_workers)
    if workers > 0:
        # Arrays under this size are pickled through the queue instead of one shared-memory
        # segment each (an example holds ~20 small arrays; a segment per array costs more).
        it = grain.experimental.WithOptionsIterDataset(
            it, grain.experimental.DatasetOptions(
                min_shm_size=int(data_cfg.get("shm_min_bytes", 1 << 20)))
        )
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers,
                per_worker_buffer_size=int(data_cfg.get("worker_buffer", 2)),
            )
        )
    it = _DropBadIterDataset(it)
    return it.batch(batch_size, drop_remainder=True)


def text_vocabulary(path: str) -> list[str]:
    """The tag names of the data set in ``path`` whose prompts travel as ids: ``meta.json``'s
    ``text_vocab``, else its category names; duplicates dropped (first kept)."""
    from umg_jax.data import records

    meta = records.read_meta(path)
    names = meta.get("text_vocab") or [c["name"] for c in meta.get("categories") or []]
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{path}/meta.json: text_vocab / category names must be non-empty "
                         "strings")
    return list(dict.fromkeys(names))


def text_vocab_tokens(data_cfg, model_cfg, names: list[str]) -> np.ndarray:
    """``int32 [V, Le]``: the tokens of each vocabulary id's text (its name in the prompt
    template), exactly as the examples tokenise it; the train step encodes these rows."""
    cfg = transforms.TransformConfig.from_configs(data_cfg, model_cfg, train=False,
                                                  text_vocab=names)
    if not names:
        return np.zeros((0, cfg.element_length), np.int32)
    tokens = transforms.ExampleTransform(cfg).tokenize(cfg.vocab_texts(), cfg.element_length)
    return np.asarray(tokens, np.int32)


def make_iterator(data_cfg, model_cfg, **kwargs) -> grain.DatasetIterator:
    """``iter(make_dataset(...))``: a checkpointable iterator of numpy batches.

    ``get_state()`` returns a JSON-serialisable dict (Grain's orbax ``CheckpointHandler`` stores
    it as is); ``set_state(state)`` on a fresh iterator built with the same arguments resumes
    the exact same stream. Close it (``.close()``) when done if it uses worker processes.
    """
    return iter(make_dataset(data_cfg, model_cfg, **kwargs))


def global_batches(iterator: Iterator[dict[str, np.ndarray]], mesh) -> Iterator[dict[str, Any]]:
    """Yields each process-local numpy batch as global ``jax.Array``s on ``mesh``'s data axis."""
    from umg_jax import sharding

    for batch in iterator:
        yield sharding.put_batch(batch, mesh)
