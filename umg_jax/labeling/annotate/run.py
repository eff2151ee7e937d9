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
    # Rounded: a teacher's float32 score can differ by an ulp with the thread count (this
    # process against a Ray actor), and the records of both engines must be byte-equal.
    return {"source": state["source"], "image": image, "height": state["height"],
            "width": state["width"], "captions": captions, "tags": tags, "regions": regions,
            "segments": segments,
            "confidence": round(float(np.mean(scores)), 4) if scores else 1.0}


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

    def add(self, key: str, seconds: float, n: int) -> None:
        """``n`` images went through stage ``key`` in ``seconds``."""
        self.stage_s[key] = self.stage_s.get(key, 0.0) + seconds
        self.stage_n[key] = self.stage_n.get(key, 0) + n

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: images, seconds inside it, images/s (of ``stats-*.json``)."""
        return {k: {"images": self.stage_n[k], "seconds": v,
                    "images_per_s": self.stage_n[k] / v if v > 0 else None}
                for k, v in self.stage_s.items()}

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


def load_or_error(item) -> tuple | Exception:
    """``pseudo_label.load_input(item)``, or the exception of an unreadable input (skipped and
    counted); any other exception is a bug and propagates."""
    try:
        return load_input(item)
    except INPUT_ERRORS as e:
        return e


def start_batch(batch: list, loaded) -> tuple[list[dict], list[np.ndarray], dict[str, bytes]]:
    """The states, images (of the readable inputs, aligned with them) and input bytes of one
    batch of ``(id, input)`` items; ``loaded`` yields :func:`load_or_error` of each, in order."""
    states, images, encoded = [], [], {}
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
    return states, images, encoded


def live(states: list[dict]) -> list[dict]:
    """The states that the next stage sees: readable, not dropped by a filter."""
    return [s for s in states if "error" not in s and s.get("kept", True)]


def apply_step(step, images: list[np.ndarray], states: list[dict],
               ctx) -> tuple[list[np.ndarray], float, int]:
    """Runs one recipe step over a batch (``images`` aligned with ``live(states)``; states are
    updated in place); returns the images the next step sees, the seconds taken and how many
    images the step ran on."""
    ok = live(states)
    if not ok:
        return images, 0.0, 0
    t = time.perf_counter()
    step.run(images, ok, ctx)
    dt = time.perf_counter() - t
    if step.stage == "filter":  # later stages see only kept images
        images = [im for im, s in zip(images, ok, strict=True) if s["kept"]]
    return images, dt, len(ok)


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

    todo = [it[1] for b in batches[len(done):] for it in b]
    loaded = map_threaded(load_or_error, todo, decode_threads)
    states_all = [s for b in done for s in b]
    encoded: dict[str, bytes] = {}  # the record stores the input's own bytes, not a re-encode
    # A bucket object cannot be appended to: AppendLog rewrites it at each flush.
    with storage.AppendLog(partial, durable=True) as f:
        for batch in batches[len(done):]:
            states, images, enc = start_batch(batch, loaded)
            encoded.update(enc)
            for step in recipe.steps:
                images, dt, n = apply_step(step, images, states, recipe.ctx)
                progress.add(f"{step.stage}:{step.name}", dt, n)
            f.write(json.dumps(states) + "\n")
            f.flush()
            states_all += states
            progress.step(len(batch), name)
    write_shard(items, states_all, encoded, recipe, out, name, counts)


def write_shard(items: list, states_all: list[dict], encoded: dict[str, bytes], recipe: Recipe,
                out, name: str, counts: dict[str, int]) -> None:
    """Commits one shard: its records (the kept images; an input missing from ``encoded`` is
    read again) then its ``.jsonl`` done marker, last and atomically; adds to ``counts``."""
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
    partial = out / f".{name}.partial"
    if partial.exists():
        partial.unlink()


def plan_shards(items: list, out: str, shard_size: int, num_workers: int, worker_id: int
                ) -> tuple[Any, int, dict[int, list], dict[str, int]]:
    """Both engines' plan: ``(out`` checked writable, the number of shards, ``{shard: its
    items}`` of this worker's unfinished shards (no ``.jsonl`` yet), zeroed counts with
    ``skipped_shards`` set)."""
    outp = storage.check_writable_dir(out)
    n_shards = max(1, -(-len(items) // shard_size))
    mine = worker_shards(n_shards, num_workers, worker_id)
    counts = dict.fromkeys(("examples", "caption_only", "regions", "masks", "unreadable",
                            "dropped_images", "skipped_shards"), 0)
    todo = {s: items[s * shard_size:(s + 1) * shard_size] for s in mine
            if not (outp / f"{shard_name(s, n_shards)}.jsonl").exists()}
    counts["skipped_shards"] = len(mine) - len(todo)
    return outp, n_shards, todo, counts


def annotate(items: list, recipe: Recipe, out: str, *, batch_size: int = 8,
             shard_size: int = 256, num_workers: int = 1, worker_id: int = 0,
             decode_threads: int = 4, log=print) -> dict[str, Any]:
    """Annotates this worker's shards of ``items`` (``(id, input)`` pairs of
    ``pseudo_label.list_inputs``) into ``out`` (local or ``gs://`` / ``s3://``); returns counts
    (``meta_written`` tells whether every worker's shards were done, so ``meta.json`` could be
    written)."""
    outp, n_shards, todo, counts = plan_shards(items, out, shard_size, num_workers, worker_id)
    progress = Progress(sum(len(v) for v in todo.values()), recipe.steps, log)
    for k, (s, shard_items) in enumerate(todo.items()):
        name = shard_name(s, n_shards)
        annotate_shard(shard_items, recipe, outp, name,
                       batch_size=batch_size, decode_threads=decode_threads,
                       progress=progress, counts=counts)
        progress.step(0, f"shard {k + 1}/{len(todo)} ({name}) done:", force=True)
    storage.write_text(outp / f"stats-worker-{worker_id}.json", json.dumps(
        {"images": progress.done, "seconds": time.perf_counter() - progress.t0,
         "stage_images_per_s": progress.rates(), "stages": progress.summary(),
         "counts": counts}, indent=1))
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
