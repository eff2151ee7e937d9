"""``--engine ray``: the annotation loop as one streaming Ray Data pipeline.

::

    units (one batch of one input shard) -> decode (CPU tasks)
        -> one actor pool per model step (its model built once per actor; the recipe entry's
           num_gpus / num_cpus / concurrency) -> the filter (CPU tasks) -> the driver's writer

The output is the local engine's (``run.py``): the same shards of the sorted input list, the
same batches inside a shard (a unit is one of them), the same per-image states and records, so
the files are byte-equal to a local run's (``stats-*.json`` aside). The driver keeps the units of
each unfinished shard and commits a shard (records, then its ``.jsonl`` done marker, atomically)
as soon as its last unit arrives, so a killed job rerun with the same arguments skips every
finished shard and redoes only the others (from their start: the ray engine keeps no
``.partial``). Ray restarts an actor that dies and retries its batch (``max_restarts``,
``max_task_retries``); a stage that raises stops the run. The whole run's per-stage summary goes
to ``stats-ray.json`` (the ``stats-worker-I.json`` of the local engine).

Workers read the inputs at the paths the driver listed: on a cluster of several nodes,
``--images`` must be on a file system that every node mounts (a bucket ``--images`` is copied
to the driver's disk first, which only a one-node cluster sees); ``--out`` is written by the
driver only.

Payloads between stages are pickled ``(states, images, input bytes, stage timings)`` of one unit:
``images`` are the ``[H, W, 3] uint8`` arrays of the states that the next step sees.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import time
import warnings
from typing import Any

import numpy as np

from umg_jax import storage
from umg_jax.concurrency import map_threaded
from umg_jax.labeling.annotate.backend import AnnotateError
from umg_jax.labeling.annotate.recipe import Recipe, Step, build_step
from umg_jax.labeling.annotate.run import (
    Progress,
    apply_step,
    load_or_error,
    plan_shards,
    shard_name,
    start_batch,
    write_meta_if_complete,
    write_shard,
)
from umg_jax.labeling.annotate.stage import Context

MAX_TASK_RETRIES = 3  # a batch whose actor died this many times fails the run
UNIT_BLOCK_BYTES = 1024
MAX_BLOCKS = 1000  # input blocks (units per decode task: units / MAX_BLOCKS, at least 1)


def _key(step: Step) -> str:
    return f"{step.stage}:{step.name}"


@functools.lru_cache(maxsize=8)
def _record_source(paths: tuple[str, ...]):
    from umg_jax.data import records

    return records.RecordSource(list(paths))


def _portable(item: tuple) -> tuple:
    """An input item that pickles cheaply: a record item names its shard files, not a reader."""
    if item[0] == "record":
        return ("record", item[1], tuple(item[2].paths))
    return item


def _load(item: tuple):
    if item[0] == "record" and isinstance(item[2], tuple):
        item = ("record", item[1], _record_source(item[2]))
    return load_or_error(item)


def _pack(payloads: list[bytes], batch: dict[str, Any]) -> dict[str, Any]:
    return {"shard": batch["shard"], "batch": batch["batch"],
            "payload": np.array(payloads, dtype=object)}


def _decode(batch: dict[str, Any], decode_threads: int) -> dict[str, Any]:
    """Units of ``(id, item)`` -> payloads with every readable input decoded."""
    out = []
    for blob in batch["unit"]:
        items = pickle.loads(blob)
        loaded = map_threaded(_load, [it for _, it in items], decode_threads)
        states, images, encoded = start_batch(items, loaded)
        out.append(pickle.dumps((states, images, encoded, {}), protocol=5))
    return _pack(out, batch)


def _apply(batch: dict[str, Any], step: Step, ctx: Context) -> dict[str, Any]:
    """One step over each unit of ``batch`` (the filter's task, or a stage actor's call)."""
    out = []
    for blob in batch["payload"]:
        states, images, encoded, timing = pickle.loads(blob)
        images, dt, n = apply_step(step, images, states, ctx)
        s, k = timing.get(_key(step), (0.0, 0))
        timing[_key(step)] = (s + dt, k + n)
        out.append(pickle.dumps((states, images, encoded, timing), protocol=5))
    return _pack(out, batch)


class StageActor:
    """One actor of a model step's pool: builds the step's backend once, then runs it."""

    def __init__(self, step: Step, ctx: Context, device: str):
        self.step, self.ctx = build_step(step, device, log=lambda s: None), ctx

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return _apply(batch, self.step, self.ctx)


def connect(address: str | None) -> bool:
    """Joins ``address`` (``auto``: the running cluster) or starts a local cluster, unless this
    process is connected already; returns whether this call connected (then the caller
    disconnects)."""
    import ray

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address and os.environ.get("PYTHONPATH"):  # a user's backend module, on the workers
        kw["runtime_env"] = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    ray.init(address=address or None, **kw)
    return True


def _cause(e: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (``RayTaskError``, ``UserCodeException``;
    an ``ActorDiedError`` of a failed constructor keeps only its text)."""
    seen, chain = set(), []
    while id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        if isinstance(e, AnnotateError):
            return e
        nxt = getattr(e, "cause", None) or e.__cause__
        if not isinstance(nxt, BaseException):
            break
        e = nxt
    for x in chain:
        found = re.findall(r"AnnotateError: (.+)", str(x))
        if found:
            return AnnotateError(found[-1].strip())
    return e


def build_dataset(units: list[dict[str, Any]], recipe: Recipe, *, decode_threads: int = 2):
    """The Ray Data pipeline over ``units`` (rows ``{shard, batch, unit: pickled items}``);
    returns ``(dataset, pools)`` (``pools``: the resources given to each step)."""
    import ray

    total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    models = [s for s in recipe.steps if s.stage != "filter"]

    def lo(c) -> int:
        return c[0] if isinstance(c, list) else (c or 1)

    # Without num_cpus, the decode tasks, the filter and every actor share the CPUs evenly, so
    # that each pool's actors fit (a pool waits for CPUs an actor asked for and never got).
    slots = 2 + sum(lo(s.resources.get("concurrency")) for s in models)
    share = min(1.0, total_cpus / slots)
    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), MAX_BLOCKS)))
    ds = ds.map_batches(_decode, batch_size=1, fn_kwargs={"decode_threads": decode_threads},
                        num_cpus=share)
    pools = {}
    for step in recipe.steps:
        r = step.resources
        cpus = r.get("num_cpus", share)
        if step.stage == "filter":
            ds = ds.map_batches(_apply, batch_size=1, fn_kwargs={"step": step, "ctx": recipe.ctx},
                                num_cpus=cpus)
            pools[_key(step)] = {"kind": "tasks", "num_cpus": cpus}
            continue
        gpus = r.get("num_gpus", 0)
        conc = r.get("concurrency", 1)
        pool = (ray.data.ActorPoolStrategy(min_size=conc[0], max_size=conc[1])
                if isinstance(conc, list) else ray.data.ActorPoolStrategy(size=conc))
        device = "cuda" if gpus else "cpu"  # Ray hides the GPUs an actor did not ask for
        with warnings.catch_warnings():
            # Ray 2.60 names no parameter for the actors' retries yet (its default, -1, would
            # retry a batch that kills its actor forever); the keyword form warns of a future
            # rename
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(StageActor, batch_size=1, compute=pool, num_cpus=cpus,
                                num_gpus=gpus or None,
                                fn_constructor_kwargs={"step": step, "ctx": recipe.ctx,
                                                       "device": device},
                                max_restarts=-1, max_task_retries=MAX_TASK_RETRIES)
        pools[_key(step)] = {"kind": "actors", "concurrency": conc, "num_cpus": cpus,
                             "num_gpus": gpus, "device": device}
    return ds, pools


def annotate_ray(items: list, recipe: Recipe, out: str, *, batch_size: int = 8,
                 shard_size: int = 256, num_workers: int = 1, worker_id: int = 0,
                 decode_threads: int = 2, address: str | None = None,
                 log=print) -> dict[str, Any]:
    """:func:`run.annotate` on a Ray cluster (``address``: None starts a local one, ``auto``
    joins the running one; an already connected process keeps its connection). ``recipe`` is
    loaded, not built: each actor builds its own step. Returns the same counts."""
    import ray

    outp, n_shards, shard_items, counts = plan_shards(items, out, shard_size, num_workers,
                                                      worker_id)
    units, n_units = [], {}
    for s, its in shard_items.items():
        bs = [its[i:i + batch_size] for i in range(0, len(its), batch_size)]
        n_units[s] = len(bs)
        units += [{"shard": s, "batch": b, "unit": pickle.dumps(
            [(sid, _portable(it)) for sid, it in batch])} for b, batch in enumerate(bs)]
    progress = Progress(sum(len(v) for v in shard_items.values()), recipe.steps, log)
    pools: dict[str, Any] = {}
    flow: dict[str, float] = {}
    if units:
        started = connect(address)
        try:
            from ray.data import DataContext

            dctx = DataContext.get_current()
            dctx.enable_progress_bars = False  # ours: Progress
            # a task that got several units passes each on when done with it, not all at its
            # end (a block holds one unit): a unit's payload is far above this size
            dctx.target_max_block_size = UNIT_BLOCK_BYTES
            ds, pools = build_dataset(units, recipe, decode_threads=decode_threads)
            log("ray: " + ", ".join(f"{k} {v}" for k, v in pools.items()))
            _consume(ds, shard_items, n_units, recipe, outp, n_shards, progress, counts, flow)
        except Exception as e:
            c = _cause(e)
            if isinstance(c, AnnotateError):  # a bad model directory, a bad option: status 2
                raise AnnotateError(str(c)) from None
            raise
        finally:
            if started:
                ray.shutdown()
    seconds = time.perf_counter() - progress.t0
    storage.write_text(outp / "stats-ray.json", json.dumps(
        {"engine": "ray", "images": progress.done, "seconds": seconds,
         "images_per_s": progress.done / max(seconds, 1e-9),
         # the pipeline's pace once running (start-up excluded): images after the first unit
         # over the time from the first unit to the last
         "steady_images_per_s": (flow["images_after_first"] / (flow["last_unit_s"] -
                                 flow["first_unit_s"])
                                 if flow.get("last_unit_s", 0) > flow.get("first_unit_s", 0)
                                 else None),
         "first_unit_s": flow.get("first_unit_s"),
         "stage_images_per_s": progress.rates(), "stages": progress.summary(),
         "pools": pools, "counts": counts}, indent=1))
    counts["meta_written"] = write_meta_if_complete(outp, n_shards, recipe)
    return counts


def _consume(ds, shard_items: dict[int, list], n_units: dict[int, int], recipe: Recipe, outp,
             n_shards: int, progress: Progress, counts: dict[str, int],
             flow: dict[str, float]) -> None:
    """Streams the pipeline's units; writes each shard once all its units arrived; ``flow``
    gets when the first and last units arrived and the images in between."""
    got: dict[int, dict[int, tuple]] = {s: {} for s in shard_items}
    rows = (dict(zip(b, vals, strict=True)) for b in
            ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy")
            for vals in zip(*b.values(), strict=True))
    for row in rows:
        s, b = int(row["shard"]), int(row["batch"])
        states, _, encoded, timing = pickle.loads(row["payload"])
        if b in got[s]:  # a retried unit delivered twice: keep one
            continue
        got[s][b] = (states, encoded)
        now = time.perf_counter() - progress.t0
        if not flow:  # start-up (cluster, actors, models) ends with the first unit
            flow.update(first_unit_s=now, images_after_first=0)
        else:
            flow["images_after_first"] += len(states)
        flow["last_unit_s"] = now
        for k, (dt, n) in timing.items():
            progress.add(k, dt, n)
        name = shard_name(s, n_shards)
        progress.step(len(states), name)
        if len(got[s]) == n_units[s]:
            parts = [got[s][i] for i in range(n_units[s])]
            encoded_all = {k: v for _, e in parts for k, v in e.items()}
            write_shard(shard_items[s], [x for st, _ in parts for x in st], encoded_all,
                        recipe, outp, name, counts)
            del got[s]
            progress.step(0, f"{name} done:", force=True)
    left = sorted(got)
    if left:  # never expected: Ray delivers every unit or raises
        raise RuntimeError(f"ray pipeline ended with shards {left} incomplete")
