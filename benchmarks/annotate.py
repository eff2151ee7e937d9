"""Images/s of each annotation stage with the tiny random teachers, on this machine.

    python benchmarks/annotate.py [--num 64] [--image_size 80] [--batch_size 8] [--device cpu]

Writes the tiny teachers (``--write_tiny_teachers``), renders ``--num`` scenes of the synthetic
world at ``--image_size`` px, and runs ``recipe.json`` (Florence-2, CLIP + noun phrases, OWLv2,
SAM, SAM 3 stuff) and ``recipe_alt.json`` (BLIP-2, SigLIP, Grounding DINO, BLIP-2 crops, SAM 2)
over them with ``umg_jax.labeling.annotate``. Per stage: images/s counting only the time inside
that stage (``stats-worker-0.json``), and the whole run's images/s. Tiny models measure the tool's
overhead (decoding, batching, pre/post-processing, RLE, filter), not a real teacher's speed: the
real-size stages need a GPU. Prints a markdown table, writes
``benchmarks/results/annotate.json`` (``provenance.write_result``: command line, commit, date,
machine).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import peers
from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=64, help="synthetic images")
    ap.add_argument("--image_size", type=int, default=80, help="synthetic scenes' side, px")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/annotate.json"))
    args = ap.parse_args(argv)
    peers.torch()  # this environment's torchvision shim, before the families import it
    from umg_jax.data.synthetic import write_synthetic
    from umg_jax.labeling.annotate.__main__ import main as annotate_main
    from umg_jax.labeling.annotate.tiny import write_tiny_teachers

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = pathlib.Path(tmp)
        took = write_tiny_teachers(str(t / "teachers"), log=lambda s: None)
        write_synthetic(str(t / "images"), args.num, split="eval", num_shards=1,
                        image_size=args.image_size)
        image_size = json.loads((t / "images" / "meta.json").read_text())["image_size"]
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
    res = {"num_images": args.num, "image_size": image_size, "batch_size": args.batch_size,
           "device": args.device, "write_tiny_seconds": took, "rows": rows,
           "table": "\n".join(md)}
    print(f"wrote {write_result(args.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
