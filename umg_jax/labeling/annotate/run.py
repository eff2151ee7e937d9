"""The annotation loop: input -> batches -> stages -> per-shard records, resumable.

Output directory (``--out``)::

    annot-SSSSS-of-NNNNN.array_record   records (``schema.py`` form 1) of the kept images
    annot-SSSSS-of-NNNNN.jsonl          one line per input image: its full state (what every
                                        stage produced, what the filter dropped, or its error)
    meta.json                           categories (the vocabulary, typed thing / stuff), counts,
                                        the recipe; written once every shard is done
    stats-worker-I.json                 images/s per stage of the last run of worker I

Shard ``s`` holds inputs ``[s * shard_size, (s + 1) * shard_size)`` of the sorted input list and
belongs to worker ``s % num_workers``, so a job array of K workers splits the input the same
way on every run. A shard is done when its ``.jsonl`` exists (written last, atomically). Inside a
shard, each finished batch of states is appended to ``.annot-SSSSS.partial`` and flushed; a killed
run resumes at the first unfinished batch. Batches keep their composition across resumes, so a
resumed run writes the same bytes as an uninterrupted one (``stats-*.json`` aside).

``--out`` may be a bucket (``gs://``, ``s3://``): each file is one object, written whole (a shard
is built locally and uploaded); the partial file of the running shard is rewritten at each batch
(objects cannot be appended to), so a killed job resumes there too.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import numpy as np

from umg_jax import storage
from umg_jax.concurrency import map_threaded
from umg_jax.data import records
from umg_jax.labeling.annotate.recipe import Recipe
from umg_jax.labeling.annotate.stage import new_state
from umg_jax.labeling.pseudo_label import INPUT_ERRORS, load_input, template_caption

PREFIX = "annot"


def shard_name(s: int, n: int) -> str:
    return f"{PREFIX}-{s:05d}-of-{n:05d}"


def worker_shards(num_shards: int, num_workers: int, worker_id: int) -> list[int]:
    """Shards of one worker of a job array (round robin: workers finish together)."""
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"--worker_id {worker_id} outside [0, {num_workers})")
    return list(range(worker_id, num_shards, num_workers))


def to_record(state: dict[str, Any], image: bytes, vocab: tuple[str, ...]) -> dict[str, Any]:
    """A kept image's state -> the record form of ``data/schema.py``."""
    cat = {v: i for i, v in enumerate(vocab)}
    tags = [t["name"] for t in state["tags"]]
    regions, segments, scores = [], [], [t["score"] for t in state["tags"]]
    for r in state["regions"]:
        regions.append({"box": r["box"], "caption": r["phrase"], "tags": [r["label"]],
                        "category": cat.get(r["label"], -1)})
        scores.append(r["score"])
        if r["mask"] is not None:
            segments.append({"rle": r["mask"], "caption": r["phrase"], "tags": [r["label"]],
                             "category": cat.get(r["label"], -1), "isthing": r["isthing"],
                             "region": len(regions) - 1})
            scores.append(r["mask_score"])
    for x in state["concepts"]:
        segments.append({"rle": x["mask"], "caption": None, "tags": [x["label"]],
                         "category": cat.get(x["label"], -1), "isthing": x["isthing"],
                         "region": -1})
        scores.append(x["score"])
    captions = [c["text"] for c in state["captions"]] or [template_caption(tags)]
    return {"source": state["source"], "image": image, "height": state["height"],
            "width": state["width"], "captions": captions, "tags": tags, "regions": regions,
            "segments": segments,
            "confidence": float(np.mean(scores)) if scores else 1.0}


def _short(key: str) -> str:
    """A stage key for the progress line: "tag:clip" -> "tag clip", "filter:filter" -> "filter",
    "detect:my.module:Det" -> "detect Det"."""
    stage, name = key.split(":", 1)[0], key.rsplit(":", 1)[-1]
    return stage if stage == name else f"{stage} {name}"


class Progress:
    """One stderr line per batch (at most every ``every`` s): images, img/s, ETA, and the
    images/s of each stage (time inside that stage only)."""

    def __init__(self, total: int, steps, log, every: float = 2.0):
        self.total, self.done, self.t0, self.last = total, 0, time.perf_counter(), 0.0
        self.stage_s = {f"{s.stage}:{s.name}": 0.0 for s in steps}
        self.stage_n = dict.fromkeys(self.stage_s, 0)
        self.log, self.every = log, every

    def rates(self) -> dict[str, float]:
        return {k: self.stage_n[k] / v for k, v in self.stage_s.items() if v > 0}

    def step(self, n: int, label: str, force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        per = ", ".join(f"{_short(k)} {v:.1f}/s" for k, v in self.rates().items())
        self.log(f"{label} {self.done}/{self.total} images, {rate:.2f} img/s, "
                 f"ETA {eta / 60:.1f} min | {per}")


def _read_partial(path, ids: list[list[str]]) -> list[list[dict]]:
    """Complete batches of a partial file whose ids match the planned batches; a torn last
    line (killed mid-write) or anything after a mismatch is discarded."""
    out: list[list[dict]] = []
    if not path.exists():
        return out
    for line in storage.read_text(path).splitlines():
        try:
            batch = json.loads(line)
        except json.JSONDecodeError:
            break
        if len(out) >= len(ids) or [s["id"] for s in batch] != ids[len(out)]:
            break
        out.append(batch)
    return out


def annotate_shard(items: list, recipe: Recipe, out, name: str, *,
                   batch_size: int, decode_threads: int, progress: Progress,
                   counts: dict[str, int]) -> None:
    """Runs every stage over one shard's ``(id, input)`` items and writes its files into
    ``out`` (an ``epath.Path``, local or on a bucket)."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    ids = [[sid for sid, _ in b] for b in batches]
    partial = out / f".{name}.partial"
    done = _read_partial(partial, ids)
    # rewrite what was kept: a torn tail must not stay
    storage.write_text(partial, "".join(json.dumps(b) + "\n" for b in done))
    if done:
        progress.log(f"{name}: resuming after {len(done)} of {len(batches)} batches")
        progress.step(sum(len(b) for b in done), name)

    def load(item):
        try:
            return load_input(item[1])
        except INPUT_ERRORS as e:  # an unreadable input is skipped and counted; a bug raises
            return e

    todo = [it for b in batches[len(done):] for it in b]
    loaded = map_threaded(load, todo, decode_threads)
    states_all = [s for b in done for s in b]
    encoded: dict[str, bytes] = {}  # the record stores the input's own bytes, not a re-encode
    # A bucket object cannot be appended to: AppendLog rewrites it at each flush.
    with storage.AppendLog(partial, durable=True) as f:
        for batch in batches[len(done):]:
            states, images = [], []
            for sid, _ in batch:
                x = next(loaded)
                if isinstance(x, Exception):
                    # object addresses would make two runs' outputs differ
                    msg = re.sub(r" at 0x[0-9a-f]+", "", f"{type(x).__name__}: {x}")
                    msg = msg.splitlines()[0]
                    print(f"skipping {sid}: {msg}", file=sys.stderr)
                    states.append({"id": sid, "error": msg})
                    continue
                img, encoded[sid], caps, src = x
                if not img.flags.writeable:  # torch warns on read-only arrays (PIL's)
                    img = img.copy()
                states.append(new_state(sid, src or sid, *img.shape[:2], caps))
                images.append(img)
            ok = [s for s in states if "error" not in s]
            for step in recipe.steps:
                if not ok:
                    break
                t = time.perf_counter()
                step.run(images, ok, recipe.ctx)
                key = f"{step.stage}:{step.name}"
                progress.stage_s[key] += time.perf_counter() - t
                progress.stage_n[key] += len(ok)
                if step.stage == "filter":  # later stages see only kept images
                    images = [im for im, s in zip(images, ok, strict=True) if s["kept"]]
                    ok = [s for s in ok if s["kept"]]
            f.write(json.dumps(states) + "\n")
            f.flush()
            states_all += states
            progress.step(len(batch), name)
    recs = []
    for (sid, item), s in zip(items, states_all, strict=True):
        if "error" in s:
            counts["unreadable"] += 1
        elif s.get("kept", True):  # batches restored from .partial are read again here
            data = encoded.pop(sid, None) or load_input(item)[1]
            recs.append(to_record(s, data, recipe.ctx.vocab))
        else:
            counts["dropped_images"] += 1
    counts["examples"] += len(recs)
    counts["caption_only"] += sum(not r["regions"] and not r["segments"] for r in recs)
    counts["regions"] += sum(len(r["regions"]) for r in recs)
    counts["masks"] += sum(len(r["segments"]) for r in recs)
    if recs:
        records.write_shard_file(recs, str(out / f"{name}{records.SHARD_SUFFIX}"))
    # the shard's done marker, written last (atomically: a rename locally, one object remotely)
    storage.write_text(out / f"{name}.jsonl", "".join(json.dumps(s) + "\n" for s in states_all))
    partial.unlink()


def annotate(items: list, recipe: Recipe, out: str, *, batch_size: int = 8,
             shard_size: int = 256, num_workers: int = 1, worker_id: int = 0,
             decode_threads: int = 4, log=print) -> dict[str, Any]:
    """Annotates this worker's shards of ``items`` (``(id, input)`` pairs of
    ``pseudo_label.list_inputs``) into ``out`` (local or ``gs://`` / ``s3://``); returns counts
    (``meta_written`` tells whether every worker's shards were done, so ``meta.json`` could be
    written)."""
    outp = storage.check_writable_dir(out)
    n_shards = max(1, -(-len(items) // shard_size))
    mine = worker_shards(n_shards, num_workers, worker_id)
    counts = dict.fromkeys(("examples", "caption_only", "regions", "masks", "unreadable",
                            "dropped_images", "skipped_shards"), 0)
    todo = [s for s in mine if not (outp / f"{shard_name(s, n_shards)}.jsonl").exists()]
    counts["skipped_shards"] = len(mine) - len(todo)
    total = sum(len(items[s * shard_size:(s + 1) * shard_size]) for s in todo)
    progress = Progress(total, recipe.steps, log)
    for k, s in enumerate(todo):
        name = shard_name(s, n_shards)
        annotate_shard(items[s * shard_size:(s + 1) * shard_size], recipe, outp, name,
                       batch_size=batch_size, decode_threads=decode_threads,
                       progress=progress, counts=counts)
        progress.step(0, f"shard {k + 1}/{len(todo)} ({name}) done:", force=True)
    storage.write_text(outp / f"stats-worker-{worker_id}.json", json.dumps(
        {"images": progress.done, "seconds": time.perf_counter() - progress.t0,
         "stage_images_per_s": progress.rates(), "counts": counts}, indent=1))
    counts["meta_written"] = write_meta_if_complete(outp, n_shards, recipe)
    return counts


def write_meta_if_complete(out, n_shards: int, recipe: Recipe) -> bool:
    """``meta.json`` from every shard's ``.jsonl``, once all exist (whichever worker finishes
    last writes it; re-running any worker rewrites it identically)."""
    names = [shard_name(s, n_shards) for s in range(n_shards)]
    if not all((out / f"{n}.jsonl").exists() for n in names):
        return False
    totals = {"images": 0, "examples": 0, "caption_only": 0, "unreadable": 0,
              "dropped_images": 0}
    dropped: dict[str, int] = {}
    unreadable: list[str] = []
    for n in names:
        for line in storage.read_text(out / f"{n}.jsonl").splitlines():
            s = json.loads(line)
            totals["images"] += 1
            if "error" in s:
                totals["unreadable"] += 1
                unreadable.append(f"{s['id']}: {s['error']}")
                continue
            for k, v in s["dropped"].items():
                dropped[k] = dropped.get(k, 0) + v
            if s.get("kept", True):
                totals["examples"] += 1
                masked = any(r["mask"] is not None for r in s["regions"])
                totals["caption_only"] += not s["regions"] and not s["concepts"] and not masked
            else:
                totals["dropped_images"] += 1
    ctx = recipe.ctx
    written = records.shard_paths(str(out))
    records.write_meta(str(out), {
        "name": "annotated", "categories": [{"id": i, "name": v, "isthing": ctx.is_thing(v)}
                                            for i, v in enumerate(ctx.vocab)],
        "num_shards": len(written), "num_examples": totals["examples"], "counts": totals,
        "dropped": dict(sorted(dropped.items())), "unreadable": unreadable[:100],
        "recipe": recipe.source})
    return True
