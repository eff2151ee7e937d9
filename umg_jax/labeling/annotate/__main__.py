r"""Pseudo-annotation with teacher models: images -> multi-granularity training records.

    python -m umg_jax.labeling.annotate --images DIR_OR_SHARDS --out DIR --recipe recipe.json \
        [--device cpu|cuda|auto] [--batch_size 8] [--shard_size 256] \
        [--num_workers K --worker_id I] [--engine local|ray [--ray_address auto|HOST:PORT]]
    python -m umg_jax.labeling.annotate --write_tiny_teachers DIR  # tiny models + DIR/recipe.json

UMG-CLIP's UMG-41M stacks off-the-shelf models on image-text pairs; the recipe names one
backend per stage (Hugging Face model directories, loaded offline):
  caption         blip2, florence2                 image captions (when missing, or always)
  tag             clip, siglip, noun_phrases       tags over the recipe's vocabulary
  detect          owlv2, grounding_dino, proposals boxes for the thing tags, class-aware NMS
  region_caption  florence2, blip2                 a phrase per box
  segment         sam, sam2 (boxes), sam3 (stuff concepts), proposals (superpixels)
  filter          small / duplicate boxes and masks, phrase-tag disagreement; drops an image
                  only when nothing is left (no region, mask, caption or tag)
Output: ArrayRecord shards + meta.json that ``--config.data.path`` trains on, and one JSON line
per image of what each stage produced (``annot-*.jsonl``). Resumable per batch; a job array
splits the input deterministically with --num_workers / --worker_id; --engine ray streams it
through a Ray cluster, one actor pool per model stage (``run_ray.py``, ``ray[data]`` from
requirements-annotate.txt: same output). Inputs: image folders, record shards, WebDataset tars
or Parquet (``labeling/inputs_web.py``). torch and transformers come
from requirements-annotate.txt. See ``recipe.py`` for the recipe format and ``run.py`` for the
output layout.

Exit status: 0 done; 1 nothing annotated (every input unreadable or left with nothing), or a
stage failed with an error that is not about its input (a traceback); 2 a bad request.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile

from umg_jax import storage
from umg_jax.labeling.annotate.backend import AnnotateError


@contextlib.contextmanager
def local_inputs(images: str):
    """A local folder with the inputs of ``--images``: the folder itself, or for a bucket
    (``gs://``, ``s3://``) a temporary copy of it (images or record shards: Grain and PIL read
    local files), removed afterwards. The input ids are relative to the folder, so they do not
    depend on where the copy lives."""
    if not storage.is_remote(images):
        yield images
        return
    src = storage.check_readable(images, "--images")
    with tempfile.TemporaryDirectory(prefix="umg-annotate-in-") as tmp:
        storage.copy_tree(src, tmp)
        yield tmp


def main(argv: list[str] | None = None) -> int:
    from umg_jax import host_platforms

    host_platforms.pin()  # the platforms this host has, before JAX's backends start
    ap = argparse.ArgumentParser(prog="python -m umg_jax.labeling.annotate",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--images", help="image folder (recursive), a directory of record shards, "
                    "WebDataset .tar shards or .parquet files; "
                    "local, gs:// or s3:// (copied to a local temp dir first)")
    ap.add_argument("--out", help="output directory (resumable); local, gs:// or s3://")
    ap.add_argument("--recipe", help="recipe.json (see recipe.py)")
    ap.add_argument("--device", default="auto",
                    help="torch device for every model: cpu, cuda, cuda:N, auto (cuda if present)")
    ap.add_argument("--batch_size", type=int, default=8, help="images per model call")
    ap.add_argument("--shard_size", type=int, default=256, help="images per output shard")
    ap.add_argument("--num_workers", type=int, default=1, help="job-array size")
    ap.add_argument("--worker_id", type=int, default=0, help="this job's index in the array")
    ap.add_argument("--decode_threads", type=int, default=4, help="parallel image decoding")
    ap.add_argument("--limit", type=int, default=0, help="annotate only the first N inputs")
    ap.add_argument("--engine", default="local", choices=("local", "ray"),
                    help="local: every stage in turn in this process; ray: one streaming Ray "
                    "Data pipeline, an actor pool per model stage (run_ray.py)")
    ap.add_argument("--ray_address", default=None,
                    help="--engine ray: a cluster to join (auto: the running one); default: "
                    "start a local cluster")
    ap.add_argument("--write_tiny_teachers", metavar="DIR", default=None,
                    help="write tiny random models of every family + DIR/recipe.json, and exit")
    args = ap.parse_args(argv)

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    try:
        if args.write_tiny_teachers:
            from umg_jax.labeling.annotate.tiny import write_tiny_teachers

            write_tiny_teachers(args.write_tiny_teachers, log=log)
            print(f"tiny teachers + recipe.json, recipe_alt.json -> {args.write_tiny_teachers}")
            return 0
        missing = [f"--{k}" for k in ("images", "out", "recipe") if not getattr(args, k)]
        if missing:
            raise AnnotateError(f"{', '.join(missing)} required (or --write_tiny_teachers DIR)")
        for k in ("batch_size", "shard_size", "num_workers", "decode_threads"):
            if getattr(args, k) < 1:
                raise AnnotateError(f"--{k} must be >= 1")
        if not 0 <= args.worker_id < args.num_workers:
            raise AnnotateError(f"--worker_id {args.worker_id} outside [0, {args.num_workers})")
        from umg_jax.labeling.annotate.recipe import build, load_recipe
        from umg_jax.labeling.annotate.run import annotate
        from umg_jax.labeling.pseudo_label import list_inputs

        recipe = load_recipe(args.recipe)
        # a missing bucket / no credentials / an unwritable folder: stop before any model loads
        # (a local --out itself is only created once annotation starts)
        storage.check_writable_dir(args.out if storage.is_remote(args.out)
                                   else storage.path(args.out).parent)
        with local_inputs(args.images) as images:
            try:
                items = list_inputs(images)
            except ValueError as e:  # a layout it cannot read (Parquet without image column...)
                raise AnnotateError(str(e)) from None
            if args.limit:
                items = items[: args.limit]
            if not items:
                raise AnnotateError(f"no images found in {args.images}")
            if args.ray_address and args.engine != "ray":
                raise AnnotateError("--ray_address needs --engine ray")
            # a missing GPU fails now, not at first use (under ray, the actors ask Ray for GPUs)
            if args.device not in ("cpu", "auto") and args.engine == "local":
                from umg_jax.labeling.annotate.families.hf import device

                device(args.device)
            if args.engine == "ray":  # each actor builds its own stage
                from umg_jax.labeling.annotate.run_ray import annotate_ray

                if args.device not in ("cpu", "auto"):
                    log(f"--device {args.device}: under --engine ray a stage runs on a GPU "
                        "when its recipe entry gives \"num_gpus\"")
                c = annotate_ray(items, recipe, args.out, batch_size=args.batch_size,
                                 shard_size=args.shard_size, num_workers=args.num_workers,
                                 worker_id=args.worker_id, decode_threads=args.decode_threads,
                                 address=args.ray_address, log=log)
            else:
                build(recipe, args.device, log=log)
                c = annotate(items, recipe, args.out, batch_size=args.batch_size,
                             shard_size=args.shard_size, num_workers=args.num_workers,
                             worker_id=args.worker_id, decode_threads=args.decode_threads,
                             log=log)
    except (AnnotateError, FileNotFoundError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"annotated {c['examples']} images ({c['caption_only']} with captions or tags only): "
          f"{c['regions']} regions, {c['masks']} masks; {c['dropped_images']} left with nothing, "
          f"{c['unreadable']} unreadable, {c['skipped_shards']} finished shards skipped -> "
          f"{args.out}" + ("" if c["meta_written"] else " (meta.json waits for the other workers)"))
    if c["examples"] == 0 and c["unreadable"] + c["dropped_images"] > 0:
        print(f"error: nothing annotated: {c['unreadable']} inputs unreadable, "
              f"{c['dropped_images']} left with nothing to train on", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
