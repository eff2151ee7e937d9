"""PyTorch serving after export equals umg_jax: max abs differences per output, float32.

    python benchmarks/torch_parity.py [--models tiny,tiny_adapter,seg_tiny,vit_b16]

For each model: a random init of the config's shapes (``clip.init_params``, the mask decoder's
``init_params``; adapters get a random ``up`` projection, since their init is the identity),
exported with ``umg_jax.interop.export_torch.export_params(..., "hf")`` to a temporary
directory, loaded with ``UMGTorch.from_export`` (``UMGTorchSegmenter`` for the head), and the
same calls compared with ``umg_jax.inference.UMGModel`` / ``Segmenter`` on one non-square image:
global image and text embeddings, the dense map, box and mask embeddings, segmentation logits
and label maps; for the head: mask logits, class logits, mask probabilities, ensemble
probabilities, semantic and panoptic maps (thresholds lowered to 0 / 0.2 so that the random head
keeps segments). Prints a markdown table, writes ``benchmarks/results/torch_parity.json``.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np
import peers
from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {"tiny": "configs/tiny.py", "tiny_adapter": "configs/tiny_adapter.py",
          "seg_tiny": "configs/seg_tiny.py", "vit_b16": "configs/vit_b16.py"}
LABELS = ["circle", "star", "grass", "sky", "water"]
ISTHING = [True, True, False, False, False]
SEEN = ["circle", "grass", "sky"]  # the random head's "training vocabulary"
TOL = 1e-4
BOXES = [[0, 0, 260, 240], [13.5, 27, 120, 181.25], [200, 150, 260, 240], [40, 10, 44, 14]]


def scene() -> np.ndarray:
    """``uint8 [240, 260, 3]``: flat regions and noise, neither square nor a model size."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)
    img[:90] = [90, 150, 230]
    img[150:, :170] = [60, 170, 60]
    img[20:70, 25:75] = [220, 40, 40]
    return img


def masks() -> np.ndarray:
    m = np.zeros((3, 240, 260), bool)
    m[0, 20:70, 25:75] = m[1, 150:] = True
    m[2] = scene()[..., 0] > 128  # ragged
    return m


def random_model(name: str, seed: int = 0):
    """``(config, CLIP params, decoder params | None)`` of a random init of ``MODELS[name]``."""
    import jax

    from umg_jax import config_lib
    from umg_jax.models import clip, mask_decoder

    c = config_lib.load_config(str(ROOT / MODELS[name]))
    c.model.update(dtype="float32", scan=False, remat=False)
    params = clip.init_params(c.model, jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def up(path, x):  # adapters start as the identity: give them something to do
        if "adapter" in jax.tree_util.keystr(path) and "up" in jax.tree_util.keystr(path):
            return rng.normal(0, 0.05, x.shape).astype(np.float32)
        return np.asarray(x)

    params = jax.tree_util.tree_map_with_path(up, params)
    seg = None
    if c.seg.enabled:
        c.seg.update(object_threshold=0.0, overlap_threshold=0.2)
        seg = jax.tree.map(np.asarray, mask_decoder.init_params(c, jax.random.key(seed + 1)))
    return c, params, seg


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def backbone_diffs(jm, tm) -> dict:
    """Max abs differences of the backbone outputs, and the label-map comparison."""
    img = scene()
    pv = jm.preprocess(img)[None]
    j_img, j_dense = jm.encode_image(pv)
    t_pv = tm.preprocess(img)[None]
    t_img, t_dense = tm.encode_image(t_pv, normalize=False), tm.dense(t_pv, normalize=False)
    toks = jm.tokenize(["a photo of a circle.", "two stars and a sky", "grass"])
    t = jm.encode_text_labels(LABELS)
    import jax
    import jax.numpy as jnp

    logits = np.einsum("hwe,ce->hwc", jm.encode_dense(img), t)
    up = np.asarray(jax.image.resize(jnp.asarray(logits), (*img.shape[:2], len(LABELS)),
                                     "bilinear"))
    sem_j, sem_t = jm.segment(img, LABELS), tm.segment(img, LABELS).numpy()
    return {
        "pixel_values": _diff(t_pv.permute(0, 2, 3, 1), pv),
        "image_embedding": _diff(t_img, j_img),
        "text_embedding": _diff(tm.encode_text(toks, normalize=False), jm.encode_text(toks)),
        "dense_map": _diff(t_dense, j_dense),
        "box_embeddings": _diff(tm.encode_boxes(img, BOXES), jm.encode_boxes(img, BOXES)),
        "mask_embeddings": _diff(tm.encode_masks(img, masks()), jm.encode_masks(img, masks())),
        "segmentation_logits": _diff(tm.segment_logits(img, LABELS), up),
        "semantic_pixels_differ": int((sem_j != sem_t).sum()),
        "semantic_classes": int(len(np.unique(sem_j))),
    }


def seg_diffs(js, ts) -> dict:
    """Max abs differences of the segmentation head's outputs and the label-map comparison."""
    from umg_jax import inference
    from umg_jax.evaluators import segmentation as se

    img = scene()
    bb = js.backbone
    text = bb.encode_text_labels(LABELS)
    pv = bb.preprocess(img)[None]
    dense = inference._normalize(bb.encode_image(pv)[1])
    mask_logits, cls_logits = map(np.asarray, js.decode(js.seg_params, pv, dense, text))
    seen = np.array([lab in js.train_labels for lab in LABELS])
    mask_prob, probs = se.head_predictions(
        lambda *a: js.decode(js.seg_params, *a), pv, dense, text, img.shape[:2], seen,
        js.config.seg, se.mask_logit_scale(bb))
    got = ts.head_outputs(img, LABELS)
    want = js.predict(img, LABELS, isthing=ISTHING)
    out = ts.predict(img, LABELS, isthing=ISTHING)
    return {
        "seg_mask_logits": _diff(got["mask_logits"], mask_logits[0]),
        "seg_class_logits": _diff(got["class_logits"], cls_logits[0]),
        "seg_mask_prob": _diff(got["mask_prob"], mask_prob[0]),
        "seg_ensemble_probs": _diff(got["ensemble"], probs["ensemble"][0]),
        "seg_semantic_pixels_differ": int((out["semantic"].numpy() != want["semantic"]).sum()),
        "seg_panoptic_pixels_differ": int((out["panoptic"].numpy() != want["panoptic"]).sum()),
        "seg_segments": [len(want["segments"]), len(out["segments"])],
        "seg_semantic_classes": int(len(np.unique(want["semantic"]))),
    }


def run_model(name: str) -> dict:
    from umg_jax import inference
    from umg_jax.interop import export_torch, mapping, torch_model, torch_seg

    t0 = time.perf_counter()
    c, params, seg = random_model(name)
    jm = inference.UMGModel(params, c.model)
    with tempfile.TemporaryDirectory() as tmp:
        head = None if seg is None else export_torch.SegHead(seg, c.seg, SEEN)
        export_torch.export_params(params, c.model, "hf", tmp, seg=head)
        tm = torch_model.UMGTorch.from_export(tmp)
        out = backbone_diffs(jm, tm)
        if seg is not None:
            out.update(seg_diffs(inference.Segmenter(jm, seg, c, SEEN),
                                 torch_seg.UMGTorchSegmenter.from_export(tmp)))
    n = sum(int(np.prod(np.shape(x))) for x in mapping.flatten(params).values())
    return {"config": MODELS[name], "params": n, "seconds": round(time.perf_counter() - t0, 1),
            **out}


ROWS = ("pixel_values", "image_embedding", "text_embedding", "dense_map", "box_embeddings",
        "mask_embeddings", "segmentation_logits", "seg_mask_logits", "seg_class_logits",
        "seg_mask_prob", "seg_ensemble_probs")
MAP_ROWS = ("semantic_pixels_differ", "seg_semantic_pixels_differ", "seg_panoptic_pixels_differ")


def table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = ["| output | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in ROWS + MAP_ROWS:
        cells = []
        for n in names:
            v = results[n].get(row)
            if v is None:
                cells.append("–")
            elif row in MAP_ROWS:
                cells.append("identical" if v == 0 else f"{v} px differ")
            else:
                cells.append(f"{v:.1e}")
        lines.append(f"| {row.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/torch_parity.json"))
    args = ap.parse_args(argv)
    torch = peers.torch()  # this environment's torchvision shim first
    # torchvision without its C++ ops runs roi_align's Python reference through torch.compile
    # (~20 s of compiling); eager gives the same numbers.
    torch._dynamo.config.disable = True
    results = {}
    for name in args.models.split(","):
        results[name] = run_model(name)
        print(f"{name}: {results[name]['seconds']} s", flush=True)
    worst = max(v for r in results.values() for k, v in r.items() if k in ROWS)
    print(table(results))
    print(f"worst max abs difference {worst:.1e} (tolerance {TOL:.0e})")
    print("wrote", write_result(args.out, {"tolerance": TOL, "image": list(scene().shape),
                                           "labels": LABELS, "worst": worst,
                                           "models": results}))


if __name__ == "__main__":
    main()
