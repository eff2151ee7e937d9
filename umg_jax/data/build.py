r"""Turns annotations in public formats into multi-granularity ArrayRecord shards.

    python -m umg_jax.data.build coco --images train2017/ --captions captions_train2017.json \
        --instances instances_train2017.json --panoptic panoptic_train2017.json \
        --panoptic_dir panoptic_train2017/ --out /data/coco_umg --num_shards 64
    python -m umg_jax.data.build vg --images VG_100K/ --regions region_descriptions.json --out DIR
    python -m umg_jax.data.build perimage --src shards_or_folder/ --out DIR
    python -m umg_jax.data.build tfds --dir ~/tensorflow_datasets/coco/2017/1.1.0 --spec spec.json \
        --tfds_split validation --out DIR
    python -m umg_jax.data.build cutouts --stamps /usr/share/tuxpaint/stamps --num 5000 --out DIR

Writes ``<split>-*.array_record`` + ``meta.json`` (categories) + ``build_report.json`` (every
dropped input with its source id and why) into ``--out``, atomically (a temporary directory renamed
at the end: an interrupted build leaves the previous output untouched). Bad inputs are dropped and
reported; ``--strict`` stops at the first with one line and exit status 2. Output is deterministic
(images in id / name order). Train with ``--config.data.path=OUT``.

``--out`` may be a bucket (``gs://``, ``s3://``): the shards are built locally and uploaded,
``meta.json`` last; a bucket folder that already holds a data set is refused (objects cannot be
swapped in atomically). The inputs are read from local disk.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

from umg_jax import storage
from umg_jax.data import records
from umg_jax.data.sources.common import BuildError, Report


def _progress(it: Iterator[dict], report: Report) -> Iterator[dict]:
    """Counts, rate, drops and ETA on stderr every 100 examples."""
    t0 = time.perf_counter()
    for i, rec in enumerate(it, 1):
        yield rec
        total = report.total
        if i % 100 == 0:
            rate = i / max(time.perf_counter() - t0, 1e-9)
            eta = f", ETA {(total - i) / rate:.0f}s" if total else ""
            print(f"\r{i}{'/' + str(total) if total else ''} examples, {rate:.0f}/s, dropped "
                  f"{sum(report.kinds.values())}{eta}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def build(kind: str, args: argparse.Namespace) -> Report:
    report = Report(strict=args.strict)
    if kind == "coco":
        from umg_jax.data.sources.coco import coco_records

        it, cats = coco_records(args.images, captions=args.captions, instances=args.instances,
                                panoptic=args.panoptic, panoptic_dir=args.panoptic_dir,
                                report=report)
    elif kind == "vg":
        from umg_jax.data.sources.vg import vg_records

        it, cats = vg_records(args.images, args.regions, report=report,
                              image_pattern=args.image_pattern)
    elif kind == "perimage":
        from umg_jax.data.sources.perimage import perimage_records

        it, cats = perimage_records(args.src, report=report)
    elif kind == "tfds":
        from umg_jax.data.sources.tfds_source import tfds_records

        it, cats = tfds_records(args.dir, args.tfds_split, args.spec, report=report)
    elif kind == "cutouts":
        from umg_jax.data.sources.cutouts import cutout_records

        it, cats = cutout_records(args.stamps, num=args.num, report=report, seed=args.seed,
                                  size=args.size, max_objects=args.max_objects,
                                  backgrounds_dir=args.backgrounds)
    else:
        raise BuildError(f"unknown source kind {kind!r}")
    out = storage.path(args.out)
    meta = {"name": f"{kind}-{args.split}", "categories": cats, "source_kind": kind}
    records.write_shards(_progress(it, report), args.out, num_shards=args.num_shards,
                         prefix=args.split, meta=meta)
    report.save(out / "build_report.json")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m umg_jax.data.build",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    sub = ap.add_subparsers(dest="kind", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output directory (replaced atomically); "
                       "local, gs:// or s3://")
        p.add_argument("--num_shards", type=int, default=8, help="ArrayRecord shards")
        p.add_argument("--split", default="train", help="shard name prefix / split name")
        p.add_argument("--strict", action="store_true", help="stop at the first bad input")

    p = sub.add_parser("coco", help="COCO captions / instances / panoptic (any subset)")
    p.add_argument("--images", required=True, help="folder of the images (file_name in the JSON)")
    p.add_argument("--captions", help="captions_*.json")
    p.add_argument("--instances", help="instances_*.json (boxes, polygon / RLE masks)")
    p.add_argument("--panoptic", help="panoptic_*.json")
    p.add_argument("--panoptic_dir", help="folder of the panoptic PNGs")
    common(p)
    p = sub.add_parser("vg", help="Visual Genome region_descriptions*.json")
    p.add_argument("--images", required=True, help="folder of the images")
    p.add_argument("--regions", required=True, help="region_descriptions.json")
    p.add_argument("--image_pattern", default="{id}.jpg", help="image file name from its id")
    common(p)
    p = sub.add_parser("perimage", help="image + JSON side by side, folders or .tar shards")
    p.add_argument("--src", required=True, help="folder (recursive) or .tar file / folder of .tar")
    common(p)
    p = sub.add_parser("tfds", help="a TFDS data set prepared in array_record format + a spec")
    p.add_argument("--dir", required=True,
                   help="prepared builder directory (.../<name>/<version>, with dataset_info.json)")
    p.add_argument("--tfds_split", default="train", help="TFDS split to read")
    p.add_argument("--spec", required=True,
                   help="JSON feature mapping (see umg_jax/data/sources/tfds_source.py)")
    common(p)
    p = sub.add_parser("cutouts", help="RGBA object photos + captions pasted onto backgrounds")
    p.add_argument("--stamps", default="/usr/share/tuxpaint/stamps",
                   help="folder of RGBA PNGs with a .txt caption beside each (tuxpaint layout)")
    p.add_argument("--backgrounds", default=None,
                   help="folder of background images (default: procedural stuff textures)")
    p.add_argument("--num", type=int, default=1000, help="composites to write")
    p.add_argument("--size", type=int, default=224, help="composite side in pixels")
    p.add_argument("--max_objects", type=int, default=3, help="cut-outs per composite (1..N)")
    p.add_argument("--seed", type=int, default=0, help="composition seed")
    common(p)
    args = ap.parse_args(argv)
    if args.num_shards < 1:
        print("error: --num_shards must be >= 1", file=sys.stderr)
        return 2
    try:
        # before reading any input (a local --out itself is replaced by a rename at the end)
        storage.check_writable_dir(args.out if storage.is_remote(args.out)
                                   else storage.path(args.out).parent)
        records.check_bucket_target(args.out)
        report = build(args.kind, args)
    except (BuildError, ValueError, FileNotFoundError, FileExistsError,
            storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"-> {args.out} (report: {args.out}/build_report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
