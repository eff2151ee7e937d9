"""Open-vocabulary segmentation + region labels of one image, as a picture.

    python -m umg_jax.demo --workdir /tmp/umg_tiny --image scene.png --labels "circle,grass,sky"
    python -m umg_jax.demo --workdir /tmp/umg_tiny --synthetic 3   # held-out synthetic scene 3

``--workdir`` and ``--out`` may be local or on a bucket (``gs://``, ``s3://``).
Writes ``--out`` (default ``demo.png``): the image, the label map over it with a legend, and for
each label present its largest connected area boxed and re-classified by its RoIAlign region
embedding (the region-level head of the model). Prints the image-level zero-shot probabilities
and the region labels. Exit status 2 on bad input (unreadable image, empty label list, ...).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from umg_jax.inference import InputError, UMGModel, load, read_image


def _largest_component_box(mask: np.ndarray) -> tuple[list[float], int] | None:
    """Box ``[x0, y0, x1, y1]`` and pixel count of the largest 4-connected area of ``mask``."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    k = int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(lab == k)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)], \
        int(sizes[k - 1])


def analyse(model: UMGModel, image: np.ndarray, labels: list[str]) -> dict:
    """``{"probs": {label: p}, "label_map": [H, W] int32, "regions": [{label, box, score,
    region_label}]}`` for one image."""
    probs = model.classify(image, labels)
    label_map = model.segment(image, labels)
    text = model.encode_text_labels(labels)
    regions = []
    for c, name in enumerate(labels):
        found = _largest_component_box(label_map == c)
        if found is None or found[1] < 0.005 * label_map.size:
            continue
        box, _ = found
        emb = model.encode_boxes(image, [box])[0]
        logits = model.logit_scale * (text @ emb)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        j = int(np.argmax(p))
        regions.append({"label": name, "box": box, "region_label": labels[j],
                        "score": float(p[j])})
    regions.sort(key=lambda r: -r["score"])
    return {"probs": probs, "label_map": label_map, "regions": regions}


def render(image: np.ndarray, labels: list[str], result: dict, path: str) -> None:
    """Writes the picture (image | overlay with boxes | legend) to ``path``, local or on a
    bucket; the format follows the suffix (PNG without one)."""
    import io
    import os

    import matplotlib

    from umg_jax import storage

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    colours = np.array([cmap(i % 20)[:3] for i in range(len(labels))])
    overlay = 0.45 * image / 255.0 + 0.55 * colours[result["label_map"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(overlay)
    axes[1].set_title("open-vocabulary segmentation + region labels")
    for r in result["regions"]:
        x0, y0, x1, y1 = r["box"]
        axes[1].add_patch(mpatches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                             lw=1.5, ec="white"))
        axes[1].text(x0, y0 - 1, f"{r['region_label']} {r['score']:.2f}", color="white",
                     fontsize=8, va="bottom", bbox={"fc": "black", "alpha": 0.5, "pad": 1})
    for ax in axes:
        ax.axis("off")
    present = sorted(set(np.unique(result["label_map"]).tolist()))
    handles = [mpatches.Patch(color=colours[i], label=labels[i]) for i in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    top = sorted(result["probs"].items(), key=lambda kv: -kv[1])[:3]
    fig.suptitle("zero-shot: " + ", ".join(f"{k} {v:.2f}" for k, v in top), fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(os.fspath(path))[1][1:].lower() or "png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    from umg_jax import host_platforms

    host_platforms.pin()  # the platforms this host has, before JAX's backends start
    ap = argparse.ArgumentParser(prog="python -m umg_jax.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True,
                    help="training workdir or import directory (umg_jax.load)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file (PNG / JPEG; local, gs:// or s3://)")
    src.add_argument("--synthetic", type=int, metavar="I",
                     help="use scene I of the held-out synthetic world instead of a file")
    ap.add_argument("--labels", default="",
                    help="comma-separated vocabulary; default with --synthetic: its categories")
    ap.add_argument("--out", default="demo.png", help="output PNG (local or gs:// / s3://)")
    args = ap.parse_args(argv)
    from umg_jax import storage

    try:
        storage.check_writable_dir(storage.path(args.out).parent)  # before loading anything
        model = load(args.workdir)
        if args.synthetic is not None:
            from umg_jax.data import records, synthetic

            rec = synthetic.generate_record(args.synthetic, split="eval")
            image = records.decode_image(rec["image"])
            default = [c["name"] for c in synthetic.CATEGORIES]
        else:
            image, default = read_image(args.image), []
        labels = [s.strip() for s in args.labels.split(",") if s.strip()] or default
        if not labels:
            raise InputError("--labels is empty: give a comma-separated vocabulary")
        result = analyse(model, image, labels)
        render(image, labels, result, args.out)
    except (InputError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    top = sorted(result["probs"].items(), key=lambda kv: -kv[1])[:5]
    print("image:", ", ".join(f"{k} {v:.3f}" for k, v in top))
    for r in result["regions"]:
        b = ", ".join(f"{v:.0f}" for v in r["box"])
        print(f"region [{b}] ({r['label']} area): {r['region_label']} {r['score']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
