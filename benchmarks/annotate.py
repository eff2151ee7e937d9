"""Images/s of each annotation stage with the tiny random teachers, on this machine.

    python benchmarks/annotate.py [--num 64] [--image_size 80] [--batch_size 8] [--device cpu] \
        [--engine local|ray] [--slow_caption 0.05] [--ray_cpus N]

Writes the tiny teachers (``--write_tiny_teachers``), renders ``--num`` scenes of the synthetic
world at ``--image_size`` px, and runs ``recipe.json`` (Florence-2, CLIP + noun phrases, OWLv2,
SAM, SAM 3 stuff) and ``recipe_alt.json`` (BLIP-2, SigLIP, Grounding DINO, BLIP-2 crops, SAM 2)
over them with ``umg_jax.labeling.annotate --engine ENGINE``. Per stage: images/s counting only
the time inside that stage (``stats-worker-0.json`` / ``stats-ray.json``; under ray, per actor),
and the whole run's images/s (model loading included).

The bottleneck experiment (``--engine ray``, ``--slow_caption S`` > 0): ``recipe_alt.json``
with its captioner replaced by :class:`SlowCaptioner` (``S`` seconds per image, a stand-in for a
big captioner; the default 2 s makes it the slowest stage: the tiny models' CPU stages take
about 1 s per image together), once with 1 captioner actor and once with 2 (``"concurrency"``).
The pipeline's pace after its first batch (``steady_images_per_s`` of ``stats-ray.json``)
should double, up to what the CPU stages allow.

Tiny models measure the tool's overhead (decoding, batching, pre/post-processing, RLE, filter),
not a real teacher's speed: the real-size stages need a GPU. Prints a markdown table, writes
``benchmarks/results/annotate.json`` (``provenance.write_result``: command line, commit, date,
machine).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import peers
from provenance import write_result

from umg_jax.labeling.annotate import backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent


class SlowCaptioner(backend.Captioner):
    """A captioner that takes ``delay`` seconds per image (sleeping: it holds no CPU, as a model
    waiting on its GPU) and answers "a photo"."""

    family = "slow"

    def __init__(self, model, device="cpu", delay: float = 0.05):
        super().__init__(model, device)
        self.delay = float(delay)

    def caption(self, images):
        time.sleep(self.delay * len(images))
        return [["a photo"] for _ in images]


def worker_setup() -> None:
    """Ray workers' setup hook: the torchvision shim before any model family imports torch."""
    peers.torch()


def _start_ray(num_cpus: int) -> None:
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])},
                          "worker_process_setup_hook": "annotate.worker_setup"})


def _run(annotate_main, argv: list[str], out: pathlib.Path, engine: str, num: int) -> dict:
    """One annotate run; its per-stage rates, whole-run rate and counts."""
    t0 = time.perf_counter()
    rc = annotate_main(argv + ["--out", str(out), "--engine", engine])
    wall = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"annotate exited {rc}")
    stats = json.loads((out / ("stats-ray.json" if engine == "ray" else
                               "stats-worker-0.json")).read_text())
    meta = json.loads((out / "meta.json").read_text())
    return {"stages": stats["stage_images_per_s"], "whole": num / wall, "wall_s": wall,
            "steady": stats.get("steady_images_per_s"), "examples": meta["num_examples"],
            "counts": stats["counts"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=64, help="synthetic images")
    ap.add_argument("--image_size", type=int, default=80, help="synthetic scenes' side, px")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engine", default="local", choices=("local", "ray"))
    ap.add_argument("--slow_caption", type=float, default=2.0,
                    help="--engine ray: seconds per image of the bottleneck experiment's "
                    "captioner (0: skip the experiment)")
    ap.add_argument("--ray_cpus", type=int, default=os.cpu_count(),
                    help="--engine ray: CPUs of the local cluster")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/annotate.json"))
    args = ap.parse_args(argv)
    peers.torch()  # this environment's torchvision shim, before the families import it
    from umg_jax.data.synthetic import write_synthetic
    from umg_jax.labeling.annotate.__main__ import main as annotate_main
    from umg_jax.labeling.annotate.tiny import write_tiny_teachers

    if args.engine == "ray":
        _start_ray(args.ray_cpus)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = pathlib.Path(tmp)
        took = write_tiny_teachers(str(t / "teachers"), log=lambda s: None)
        write_synthetic(str(t / "images"), args.num, split="eval", num_shards=1,
                        image_size=args.image_size)
        image_size = json.loads((t / "images" / "meta.json").read_text())["image_size"]
        base = ["--images", str(t / "images"), "--device", args.device,
                "--batch_size", str(args.batch_size), "--shard_size", "1000"]
        runs = [(r, r, str(t / "teachers" / r)) for r in ("recipe.json", "recipe_alt.json")]
        if args.engine == "ray" and args.slow_caption > 0:
            src = json.loads((t / "teachers" / "recipe_alt.json").read_text())
            for n in (1, 2):
                stages = [dict(e) for e in src["stages"]]
                stages[0] = {"stage": "caption", "backend": "annotate:SlowCaptioner",
                             "when": "always", "options": {"delay": args.slow_caption},
                             "concurrency": n}
                p = t / "teachers" / f"slow_caption_x{n}.json"
                p.write_text(json.dumps({**src, "stages": stages}))
                runs.append((f"recipe_alt.json, slow captioner x{n} actor{'s' * (n > 1)}",
                             p.stem, str(p)))
        for label, name, recipe in runs:
            r = _run(annotate_main, base + ["--recipe", recipe], t / name.replace(".json", ""),
                     args.engine, args.num)
            for stage, rate in r["stages"].items():
                rows.append({"recipe": label, "stage": stage, "images_per_s": rate})
            rows.append({"recipe": label, "stage": "whole run (incl. model loading)",
                         "images_per_s": r["whole"], "examples": r["examples"],
                         "counts": r["counts"]})
            if r["steady"] is not None:  # ray: the pace after start-up
                rows.append({"recipe": label, "stage": "pipeline after its first batch",
                             "images_per_s": r["steady"]})
    if args.engine == "ray":
        import ray

        ray.shutdown()
    md = [f"engine: {args.engine}", "", "| recipe | stage:backend | images/s |", "|---|---|---|"]
    md += [f"| {r['recipe']} | {r['stage']} | {r['images_per_s']:.1f} |" for r in rows]
    print("\n".join(md))
    res = {"engine": args.engine, "num_images": args.num, "image_size": image_size,
           "batch_size": args.batch_size, "device": args.device,
           "slow_caption_s": args.slow_caption if args.engine == "ray" else None,
           "write_tiny_seconds": took, "rows": rows, "table": "\n".join(md)}
    print(f"wrote {write_result(args.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
