r"""Pseudo-annotation: images with at most a caption -> multi-granularity records, with a teacher.

    python -m umg_jax.labeling.pseudo_label --images DIR_OR_SHARDS --teacher WORKDIR \
        --vocab tags.txt --out DIR [--threshold 0.3] [--top_k 6]

UMG-CLIP's training data (UMG-41M) has no human region or pixel labels: every tag, box and mask
is a model's pseudo-label. This tool does the same with weights you already have:

1. Proposals without extra weights: class-agnostic masks from scikit-image's Felzenszwalb
   segmentation merged hierarchically (adjacent segments by colour similarity, selective-search
   style: every merge is a proposal), their boxes, and multi-scale sliding windows.
2. The teacher (a umg_jax training workdir or an imported CLIP) encodes each image batch once
   (jitted); boxes are pooled by RoIAlign and masks by mask pooling from its dense embeddings and
   scored against the prompt-ensembled vocabulary.
   ``--score crop`` instead encodes each proposal's crop with the teacher's image embedding
   (better for an image-level-only teacher). ``--caption_vocab`` (default on) restricts each
   image's labels to the vocabulary words its captions mention. ``--assign concept`` (default)
   lets each concept pick its most likely proposals instead of each proposal its top class.
3. Kept: proposals whose top probability reaches ``--threshold``; class-wise NMS on boxes
   (``--nms_iou``), duplicate masks removed (``--mask_iou``), at most ``--top_k`` of each per image.
   Image tags: vocabulary entries whose image-level probability reaches the threshold, plus the
   kept region labels. Captions: existing ones (shard input) kept when the teacher's image-text
   cosine reaches ``--caption_threshold``; otherwise one from a template of the kept tags.
   Each record's ``confidence`` is the mean probability of what was kept.
4. Output: ArrayRecord shards + ``meta.json`` (categories = the vocabulary), written shard by
   shard (``--shard_size`` images each, atomic files); re-running skips finished shards.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from umg_jax import storage
from umg_jax.data import records
from umg_jax.ops.mask_pool import mask_pool
from umg_jax.ops.roi_align import roi_pool_embed

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")


class PseudoLabelError(ValueError):
    """Bad request (one line; exit status 2)."""


# ------------------------------------------------------------------------------ proposals ---


def mask_proposals(image: np.ndarray, scale: float = 64.0, min_frac: float = 0.01,
                   max_masks: int = 24, max_segments: int = 64) -> np.ndarray:
    """``[K, H, W] bool`` class-agnostic masks, selective-search style: Felzenszwalb segments,
    then adjacent segments merged greedily by mean-colour similarity until one remains; every
    segment and every merge is a proposal. Kept: between ``min_frac`` and 90 % of the image,
    duplicates (IoU > 0.9) dropped, largest first."""
    from skimage.segmentation import felzenszwalb

    h, w = image.shape[:2]
    lab = felzenszwalb(image, scale=scale, sigma=0.8, min_size=max(8, int(min_frac * h * w)))
    while lab.max() + 1 > max_segments:  # too fine for the O(K^2) merging: coarser segments
        scale *= 2
        lab = felzenszwalb(image, scale=scale, sigma=0.8, min_size=max(8, int(min_frac * h * w)))
    k = int(lab.max()) + 1
    img = image.reshape(-1, image.shape[-1]).astype(np.float64)
    flat = lab.reshape(-1)
    size = np.bincount(flat, minlength=k).astype(np.float64)
    colour = np.stack([np.bincount(flat, weights=img[:, c], minlength=k) for c in
                       range(img.shape[1])], -1) / np.maximum(size, 1)[:, None]
    masks = {i: lab == i for i in range(k)}
    cols = {i: colour[i] for i in range(k)}
    sizes = {i: size[i] for i in range(k)}
    nbrs: dict[int, set[int]] = {i: set() for i in range(k)}
    for a_, b_ in ((lab[:, :-1], lab[:, 1:]), (lab[:-1], lab[1:])):
        diff = a_ != b_
        for i, j in set(zip(a_[diff].tolist(), b_[diff].tolist(), strict=True)):
            nbrs[i].add(j)
            nbrs[j].add(i)
    props = list(masks.values())
    nxt = k
    while len(masks) > 1:
        pairs = [(float(np.sum((cols[i] - cols[j]) ** 2)), i, j)
                 for i in masks for j in nbrs[i] if i < j and j in masks]
        if not pairs:
            break
        _, i, j = min(pairs)
        m = masks.pop(i) | masks.pop(j)
        cols[nxt] = (cols[i] * sizes[i] + cols[j] * sizes[j]) / (sizes[i] + sizes[j])
        sizes[nxt] = sizes[i] + sizes[j]
        nbrs[nxt] = (nbrs[i] | nbrs[j]) - {i, j}
        for n in nbrs[nxt]:
            nbrs[n] = (nbrs[n] - {i, j}) | {nxt}
        masks[nxt] = m
        props.append(m)
        nxt += 1
    out: list[np.ndarray] = []
    for m in sorted(props, key=lambda m: -int(m.sum())):
        if min_frac <= m.mean() <= 0.9 and not any(mask_iou(m, o) > 0.9 for o in out):
            out.append(m)
    return np.stack(out[:max_masks]) if out else np.zeros((0, h, w), bool)


def window_proposals(h: int, w: int, grids=(1, 2, 3)) -> np.ndarray:
    """``[K, 4]`` sliding windows (x0, y0, x1, y1): for each ``g``, the ``g x g`` grid of cells
    and the cells shifted by half a cell."""
    boxes = []
    for g in grids:
        cw, ch = w / g, h / g
        for off in (0.0, 0.5) if g > 1 else (0.0,):
            for i in range(g):
                for j in range(g):
                    x0, y0 = (j + off) * cw, (i + off) * ch
                    if x0 + cw <= w + 1e-6 and y0 + ch <= h + 1e-6:
                        boxes.append([x0, y0, x0 + cw, y0 + ch])
    return np.asarray(boxes, np.float32)


def mask_box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return float(inter / union) if union else 0.0


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, 4]`` x ``[M, 4]`` -> ``[N, M]`` IoU."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by class-wise greedy NMS, best first."""
    keep: list[int] = []
    for i in np.argsort(-scores):
        same = [k for k in keep if labels[k] == labels[i]]
        if not same or box_iou(boxes[i:i + 1], boxes[same]).max() <= iou:
            keep.append(int(i))
    return np.asarray(keep, np.int64)


# -------------------------------------------------------------------------------- teacher ---


class Scorer:
    """Teacher probabilities over the vocabulary for an image batch and its proposals.

    ``teacher``: ``umg_jax.inference.UMGModel`` (or an object with its ``preprocess``,
    ``encode_image``, ``encode_text``, ``tokenize``, ``encode_text_labels``, ``logit_scale``,
    ``pixel_mean`` / ``pixel_std``).
    """

    def __init__(self, teacher, vocab: list[str], max_boxes: int = 64, max_masks: int = 24):
        self.t, self.vocab = teacher, vocab
        self.text = np.asarray(teacher.encode_text_labels(vocab), np.float32)  # [C, E]
        self.max_boxes, self.max_masks = max_boxes, max_masks
        self._pool = jax.jit(self._pool_fn)

    @staticmethod
    def _pool_fn(dense, boxes, areas):
        return roi_pool_embed(dense, boxes, 2, 2), mask_pool(dense, areas)

    def _probs(self, emb: np.ndarray) -> np.ndarray:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-8)
        logits = self.t.logit_scale * emb @ self.text.T
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)

    def score(self, images: list[np.ndarray], boxes: list[np.ndarray], masks: list[np.ndarray]):
        """Per image ``(image probs [C], box probs [K, C], mask probs [M, C], img emb [E])``."""
        x = np.stack([self.t.preprocess(im) for im in images])
        img, dense = self.t.encode_image(x)
        g = dense.shape[1]
        b = len(images)
        bx = np.zeros((b, self.max_boxes, 4), np.float32)
        ar = np.zeros((b, self.max_masks, g, dense.shape[2]), np.float32)
        for i, (im, bb, mm) in enumerate(zip(images, boxes, masks, strict=True)):
            h, w = im.shape[:2]
            bx[i, :len(bb)] = bb[: self.max_boxes] / np.array([w, h, w, h], np.float32)
            for k, m in enumerate(mm[: self.max_masks]):
                ar[i, k] = _cell_fraction(m, g, dense.shape[2])
        bx[..., 2:] = np.maximum(bx[..., 2:], bx[..., :2] + 1e-3)  # padded rows: tiny valid box
        be, me = self._pool(jnp.asarray(dense), jnp.asarray(bx), jnp.asarray(ar))
        be, me = np.asarray(be), np.asarray(me)
        out = []
        for i in range(b):
            nb, nm = min(len(boxes[i]), self.max_boxes), min(len(masks[i]), self.max_masks)
            out.append((self._probs(np.asarray(img[i:i + 1]))[0], self._probs(be[i, :nb]),
                        self._probs(me[i, :nm]), np.asarray(img[i])))
        return out

    def score_crops(self, images: list[np.ndarray], boxes: list[np.ndarray],
                    masks: list[np.ndarray], batch: int = 256):
        """Per image ``(box probs [K, C], mask probs [M, C])`` from the teacher's *global*
        embedding of each proposal's crop (masks: their box, pixels outside the mask set to the
        image's mean colour). One image-tower pass per proposal: slower than pooling the dense
        map, but it asks the question an image-level teacher was trained to answer."""
        from PIL import Image

        size = self.t.image_size
        crops, counts = [], []
        for im, bb, mm in zip(images, boxes, masks, strict=True):
            bb, mm = bb[: self.max_boxes], mm[: self.max_masks]
            fill = im.reshape(-1, 3).mean(0).astype(np.uint8)
            for x0, y0, x1, y1 in bb:
                crops.append(_crop(im, x0, y0, x1, y1, size, Image))
            for m in mm:
                x0, y0, x1, y1 = mask_box(m)
                crops.append(_crop(np.where(m[..., None], im, fill), x0, y0, x1, y1, size, Image))
            counts.append((len(bb), len(mm)))
        mean, std = self.t.pixel_mean, self.t.pixel_std
        x = (np.stack(crops).astype(np.float32) / 255.0 - mean) / std if crops else None
        emb = [np.asarray(self.t.encode_image(x[i:i + batch])[0], np.float32)
               for i in range(0, len(crops), batch)]
        probs = self._probs(np.concatenate(emb)) if emb else np.zeros((0, len(self.vocab)))
        out, k = [], 0
        for nb, nm in counts:
            out.append((probs[k:k + nb], probs[k + nb:k + nb + nm]))
            k += nb + nm
        return out

    def caption_score(self, img_emb: np.ndarray, captions: list[str]) -> np.ndarray:
        t = np.asarray(self.t.encode_text(self.t.tokenize(captions)), np.float32)
        t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-8)
        e = img_emb / max(np.linalg.norm(img_emb), 1e-8)
        return t @ e


def _crop(im: np.ndarray, x0: float, y0: float, x1: float, y1: float, size: int, image_mod
          ) -> np.ndarray:
    """``[size, size, 3] uint8``: the box (pixels, at least 1 px) resized to the model's input."""
    h, w = im.shape[:2]
    x0, y0 = int(np.clip(np.floor(x0), 0, w - 1)), int(np.clip(np.floor(y0), 0, h - 1))
    x1, y1 = int(np.clip(np.ceil(x1), x0 + 1, w)), int(np.clip(np.ceil(y1), y0 + 1, h))
    crop = image_mod.fromarray(np.ascontiguousarray(im[y0:y1, x0:x1]).astype(np.uint8))
    return np.asarray(crop.resize((size, size), image_mod.BILINEAR))


def caption_candidates(captions: list[str], vocab: list[str]) -> np.ndarray | None:
    """``[C] bool``: vocabulary entries the captions mention (whole words, plural s / es
    allowed), or ``None`` when there are no captions or they mention none. Restricting an
    image's labels to its caption's concepts is how caption-only data gets reliable region
    labels (RegionCLIP-style concept parsing; UMG-41M tags come from captions plus a tagger)."""
    import re

    if not captions:
        return None
    text = " ".join(captions).lower()
    hit = np.array([re.search(rf"\b{re.escape(v.lower())}(e?s)?\b", text) is not None
                    for v in vocab])
    return hit if hit.any() else None


def restrict(probs: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Probabilities ``[..., C]`` renormalised over the ``allowed`` classes (``None``: as is)."""
    if allowed is None or not len(probs):
        return probs
    p = probs * allowed
    return p / np.maximum(p.sum(-1, keepdims=True), 1e-12)


def _cell_fraction(mask: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """``[H, W]`` bool -> ``[gh, gw]`` covered fraction of each feature cell (box filter)."""
    from PIL import Image

    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((gw, gh), Image.BOX)
    return np.asarray(im, np.float32) / 255.0


# ---------------------------------------------------------------------------------- labels ---


def assign_concepts(probs: np.ndarray, allowed: np.ndarray | None, rel: float = 0.5
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Concept -> proposal assignment: ``probs [K, C]`` (p(class | proposal)) -> per proposal
    ``(label [K], score [K])``.

    Each concept ``c`` of the image (``allowed``; ``None`` = every class) ranks the proposals by
    ``r(k, c) = p(c | k) / max_k' p(c | k')``; a proposal takes the concept for which it is
    relatively best, if that ratio reaches ``rel``; its score is that ratio (1 for the best
    proposal of each concept, 0 when no concept picks it). Why: background classes (sky, grass,
    a wall) score high in every crop, so the per-proposal argmax labels everything as
    background; asking "which proposal is the circle?" for each concept the image is known to
    contain finds the objects.
    """
    k, c = probs.shape
    if not k:
        return np.zeros((0,), int), np.zeros((0,))
    on = np.ones(c, bool) if allowed is None else np.asarray(allowed, bool)
    ratio = probs / np.maximum(probs.max(0, keepdims=True), 1e-12)
    ratio = np.where(on[None] & (ratio >= rel), ratio, -1.0)
    return ratio.argmax(-1), np.maximum(ratio.max(-1), 0.0)


def label_image(image, probs, box_props, box_probs, masks, mask_probs, vocab, *, threshold,
                top_k, nms_iou, dup_mask_iou, allowed: np.ndarray | None = None,
                assign: str = "proposal") -> dict:
    """Kept tags / regions / segments for one image (record fields, no image / captions).

    ``assign``: ``"proposal"`` labels each proposal with its most probable class (kept if
    ``>= threshold``); ``"concept"`` lets each concept of the image (``allowed``, e.g. its
    caption's, else all) pick its most likely proposals (:func:`assign_concepts`; ``threshold``
    then applies to the concept's relative score, the best proposal of each concept scoring 1,
    so every concept gets at least its best proposal)."""
    def labels_of(p):
        if assign == "concept":
            return assign_concepts(p, allowed)
        return p.argmax(-1), p.max(-1)

    kept_p = []
    regions = []
    if len(box_props):
        lab, sc = labels_of(box_probs)
        ok = np.nonzero(sc >= threshold)[0]
        order = ok[nms(box_props[ok], sc[ok], lab[ok], nms_iou)][:top_k]
        for i in order:
            regions.append({"box": [float(v) for v in box_props[i]], "caption": None,
                            "tags": [vocab[lab[i]]], "category": int(lab[i])})
            kept_p.append(float(sc[i]))
    segments, kept_masks = [], []
    if len(masks):
        lab, sc = labels_of(mask_probs)
        for i in np.argsort(-sc, kind="stable"):
            if sc[i] < threshold or len(segments) >= top_k:
                break
            if any(mask_iou(masks[i], m) > dup_mask_iou for m in kept_masks):
                continue
            kept_masks.append(masks[i])
            segments.append({"rle": records.mask_to_rle(masks[i]), "caption": None,
                             "tags": [vocab[lab[i]]], "category": int(lab[i]), "isthing": True,
                             "region": -1})
            kept_p.append(float(sc[i]))
    # a segment outlines a kept region when they agree on the label and the boxes overlap
    for seg, m in zip(segments, kept_masks, strict=True):
        for j, r in enumerate(regions):
            if r["category"] == seg["category"] and box_iou(
                    np.asarray([mask_box(m)]), np.asarray([r["box"]]))[0, 0] >= 0.7:
                seg["region"] = j
                break
    tags = [vocab[c] for c in np.nonzero(probs >= threshold)[0]]
    for r in regions + segments:
        if r["tags"][0] not in tags:
            tags.append(r["tags"][0])
    conf = float(np.mean(kept_p)) if kept_p else float(probs.max())
    return {"tags": tags, "regions": regions, "segments": segments, "confidence": conf}


def template_caption(tags: list[str]) -> str:
    """``["circle", "star"]`` -> ``"a photo of a circle and a star."``."""
    if not tags:
        return "a photo."
    items = [f"{'an' if t[0].lower() in 'aeiou' else 'a'} {t}" for t in tags]
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"a photo of {listing}."


# ----------------------------------------------------------------------------------- input ---


def list_inputs(src: str) -> list[tuple[str, object]]:
    """``(source id, loader)`` pairs: records of ArrayRecord shards, WebDataset tar shards or
    Parquet files (``inputs_web.py``), else image files (recursive)."""
    from umg_jax.labeling import inputs_web

    p = pathlib.Path(src)
    if not p.exists():
        raise FileNotFoundError(f"--images {src} does not exist")
    shards = records.shard_paths(str(p)) if p.is_dir() else []
    web = None if shards else inputs_web.web_files(p)
    if web:
        return inputs_web.list_web_inputs(p, *web)
    if shards:
        rs = records.RecordSource(shards)
        return [(f"shard:{i}", ("record", i, rs)) for i in range(len(rs))]
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXT) if p.is_dir() \
        else [p]
    return [(str(f.relative_to(p) if p.is_dir() else f.name), ("file", f, None)) for f in files]


def _input_errors() -> tuple[type[BaseException], ...]:
    """What an unreadable input raises (a missing or truncated file, bytes that are no image, a
    record that does not decode): such an input is skipped and counted. Anything else is a bug
    and stops the run."""
    from PIL import Image

    return (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)


def load_input(item) -> tuple[np.ndarray, bytes, list[str], str | None]:
    """``(image [H, W, 3] uint8, encoded bytes, captions, source)``; raises one of
    :data:`INPUT_ERRORS` for an unreadable input."""
    kind, ref, rs = item[:3]
    if kind in ("tar", "parquet", "error"):
        from umg_jax.labeling.inputs_web import load_web

        return load_web(item)
    if kind == "record":
        rec = records.decode_record(rs[ref])
        data = rec["image"]
        return records.decode_image(data), data, list(rec.get("captions") or []), rec.get("source")
    data = pathlib.Path(ref).read_bytes()
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")), data, [], None


INPUT_ERRORS = _input_errors()


# ------------------------------------------------------------------------------------- run ---


def run(items: list, scorer: Scorer, vocab: list[str], out: str, args, log=print) -> dict:
    """Labels ``items`` into shards of ``out`` (local, ``gs://`` or ``s3://``; finished shards
    are skipped); returns counts. ``storage.StorageError`` for an unusable ``out``."""
    outp = storage.check_writable_dir(out)
    n_shards = (len(items) + args.shard_size - 1) // args.shard_size
    counts = {"examples": 0, "regions": 0, "masks": 0, "skipped_shards": 0, "unreadable": 0}
    t0, done = time.perf_counter(), 0
    for s in range(n_shards):
        path = outp / f"pseudo-{s:05d}-of-{n_shards:05d}{records.SHARD_SUFFIX}"
        chunk = items[s * args.shard_size:(s + 1) * args.shard_size]
        if path.exists():
            counts["skipped_shards"] += 1
            done += len(chunk)
            continue
        recs = list(_label_chunk(chunk, scorer, vocab, args, counts))
        records.write_shard_file(recs, str(path))
        done += len(chunk)
        rate = done / max(time.perf_counter() - t0, 1e-9)
        log(f"shard {s + 1}/{n_shards}: {done}/{len(items)} images, {rate:.1f}/s, "
            f"ETA {(len(items) - done) / max(rate, 1e-9):.0f}s")
    categories = [{"id": i, "name": v, "isthing": True} for i, v in enumerate(vocab)]
    written = records.shard_paths(str(outp))
    total = _count_records(written)
    records.write_meta(str(outp), {"name": "pseudo-labelled", "categories": categories,
                                   "num_shards": len(written), "num_examples": total,
                                   "teacher": str(args.teacher)})
    return counts


def _count_records(paths: list[str]) -> int:
    """Records in ArrayRecord shards, local or on a bucket (read through a local copy)."""
    total = 0
    for p in paths:
        with storage.local_file(p) as local:
            total += len(records.RecordSource([str(local)]))
    return total


def _label_chunk(chunk, scorer, vocab, args, counts) -> Iterator[dict]:
    for start in range(0, len(chunk), args.batch):
        batch = []
        for sid, item in chunk[start:start + args.batch]:
            try:
                img, data, caps, src = load_input(item)
            except INPUT_ERRORS as e:
                print(f"skipping {sid}: {type(e).__name__}: {e}", file=sys.stderr)
                counts["unreadable"] += 1
                continue
            masks = mask_proposals(img, min_frac=args.min_area, max_masks=scorer.max_masks)
            boxes = np.concatenate([np.asarray([mask_box(m) for m in masks], np.float32)
                                    .reshape(-1, 4), window_proposals(*img.shape[:2])])
            batch.append((sid, img, data, caps, src, boxes[: scorer.max_boxes], masks))
        if not batch:
            continue
        imgs, bxs, mks = [b[1] for b in batch], [b[5] for b in batch], [b[6] for b in batch]
        scored = scorer.score(imgs, bxs, mks)
        if args.score == "crop":
            crop = scorer.score_crops(imgs, bxs, mks)
            scored = [(p, cb, cm, e) for (p, _, _, e), (cb, cm) in zip(scored, crop, strict=True)]
        for (sid, img, data, caps, src, boxes, masks), (p, bp, mp, emb) in zip(
                batch, scored, strict=True):
            allowed = caption_candidates(caps, vocab) if args.caption_vocab else None
            p, bp, mp = restrict(p, allowed), restrict(bp, allowed), restrict(mp, allowed)
            lab = label_image(img, p, boxes, bp, masks[: scorer.max_masks], mp, vocab,
                              threshold=args.threshold, top_k=args.top_k, nms_iou=args.nms_iou,
                              dup_mask_iou=args.mask_iou, allowed=allowed,
                              assign=getattr(args, "assign", "proposal"))
            if caps:
                keep = scorer.caption_score(emb, caps) >= args.caption_threshold
                caps = [c for c, k in zip(caps, keep, strict=True) if k]
            captions = caps or [template_caption(lab["tags"])]
            h, w = img.shape[:2]
            rec = {"source": src or f"pseudo/{sid}", "image": data, "height": h, "width": w,
                   "captions": captions, **lab}
            counts["examples"] += 1
            counts["regions"] += len(lab["regions"])
            counts["masks"] += len(lab["segments"])
            yield rec


def main(argv: list[str] | None = None) -> int:
    from umg_jax import host_platforms

    host_platforms.pin()  # the platforms this host has, before JAX's backends start
    ap = argparse.ArgumentParser(prog="python -m umg_jax.labeling.pseudo_label",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 3)[3])
    ap.add_argument("--images", required=True, help="image folder (recursive) or shard dir")
    ap.add_argument("--teacher", required=True, help="umg_jax workdir or import directory")
    ap.add_argument("--vocab", required=True, help="text file, one tag per line")
    ap.add_argument("--out", required=True, help="output directory (resumable)")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="min score kept: teacher probability (--assign proposal) or relative "
                         "score, 1 = the concept's best proposal (--assign concept)")
    ap.add_argument("--top_k", type=int, default=6, help="max regions and max masks per image")
    ap.add_argument("--nms_iou", type=float, default=0.5, help="class-wise box NMS IoU")
    ap.add_argument("--mask_iou", type=float, default=0.7, help="duplicate-mask IoU")
    ap.add_argument("--caption_threshold", type=float, default=0.2,
                    help="min teacher image-text cosine for an existing caption to stay")
    ap.add_argument("--min_area", type=float, default=0.01, help="min mask area (fraction)")
    ap.add_argument("--score", choices=("dense", "crop"), default="dense",
                    help="label proposals by pooling the teacher's dense map (fast) or by "
                         "encoding each proposal's crop (one image pass each; better for "
                         "teachers trained on image-level data only)")
    ap.add_argument("--assign", choices=("proposal", "concept"), default="concept",
                    help="'proposal': each proposal takes its most probable label; 'concept': "
                         "each concept of the image (its caption's, else the vocabulary) picks "
                         "its most likely proposals (background classes cannot take over)")
    ap.add_argument("--caption_vocab", action=argparse.BooleanOptionalAction, default=True,
                    help="restrict an image's labels to vocabulary words its captions mention "
                         "(images without captions, or mentioning none, use the whole vocab)")
    ap.add_argument("--batch", type=int, default=16, help="images per teacher call")
    ap.add_argument("--shard_size", type=int, default=256, help="images per output shard")
    args = ap.parse_args(argv)
    try:
        vocab_path = pathlib.Path(args.vocab)
        if not vocab_path.is_file():
            raise PseudoLabelError(f"--vocab {args.vocab} does not exist")
        vocab = [v.strip() for v in vocab_path.read_text().splitlines() if v.strip()]
        if not vocab:
            raise PseudoLabelError(f"--vocab {args.vocab} is empty")
        items = list_inputs(args.images)
        if not items:
            raise PseudoLabelError(f"no images found in {args.images}")
        storage.check_writable_dir(args.out)  # before the teacher loads
        from umg_jax.inference import InputError, load

        try:
            teacher = load(args.teacher)
        except InputError as e:
            raise PseudoLabelError(f"--teacher: {e}") from None
        scorer = Scorer(teacher, vocab)
        counts = run(items, scorer, vocab, args.out, args,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    except (PseudoLabelError, FileNotFoundError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"labelled {counts['examples']} images: {counts['regions']} regions, "
          f"{counts['masks']} masks; {counts['skipped_shards']} finished shards skipped, "
          f"{counts['unreadable']} unreadable -> {args.out}")
    if counts["examples"] == 0 and counts["unreadable"] > 0:
        print(f"error: nothing labelled: all {counts['unreadable']} inputs were unreadable",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
