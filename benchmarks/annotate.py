"""Images/s of each annotation stage with the tiny random teachers, on this machine.

    python benchmarks/annotate.py [--num 64] [--batch_size 8] [--device cpu]

Writes the tiny teachers (``--write_tiny_teachers``), renders ``--num`` scenes of the synthetic
world at 80 px, and runs ``recipe.json`` (Florence-2, CLIP + noun phrases, OWLv2, SAM, SAM 3
stuff) and ``recipe_alt.json`` (BLIP-2, SigLIP, Grounding DINO, BLIP-2 crops, SAM 2) over them
with ``umg_jax.labeling.annotate``. Per stage: images/s counting only the time inside that stage
(``stats-worker-0.json``), and the whole run's images/s. Tiny models measure the tool's
overhead (decoding, batching, pre/post-processing, RLE, filter), not a real teacher's speed: the
real-size stages need a GPU. Prints a markdown table, writes
``benchmarks/results/annotate.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=64, help="synthetic images")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/annotate.json"))
    args = ap.parse_args(argv)
    from umg_jax.data.synthetic import write_synthetic
    from umg_jax.labeling.annotate.__main__ import main as annotate_main
    from umg_jax.labeling.annotate.tiny import write_tiny_teachers

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = pathlib.Path(tmp)
        took = write_tiny_teachers(str(t / "teachers"), log=lambda s: None)
        write_synthetic(str(t / "images"), args.num, split="eval", num_shards=1)
        for recipe in ("recipe.json", "recipe_alt.json"):
            out = t / recipe.replace(".json", "")
            t0 = time.perf_counter()
            rc = annotate_main(["--images", str(t / "images"), "--out", str(out), "--recipe",
                                str(t / "teachers" / recipe), "--device", args.device,
                                "--batch_size", str(args.batch_size), "--shard_size", "1000"])
            wall = time.perf_counter() - t0
            if rc:
                return rc
            stats = json.loads((out / "stats-worker-0.json").read_text())
            meta = json.loads((out / "meta.json").read_text())
            for stage, rate in stats["stage_images_per_s"].items():
                rows.append({"recipe": recipe, "stage": stage, "images_per_s": rate})
            rows.append({"recipe": recipe, "stage": "whole run (incl. model loading)",
                         "images_per_s": args.num / wall,
                         "examples": meta["num_examples"], "counts": stats["counts"]})
    md = ["| recipe | stage:backend | images/s |", "|---|---|---|"]
    md += [f"| {r['recipe']} | {r['stage']} | {r['images_per_s']:.1f} |" for r in rows]
    print("\n".join(md))
    res = {"date": time.strftime("%Y-%m-%d"), "num_images": args.num, "image_size": 80,
           "batch_size": args.batch_size, "device": args.device, "machine": "2-core CPU",
           "write_tiny_seconds": took, "rows": rows, "table": "\n".join(md)}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
