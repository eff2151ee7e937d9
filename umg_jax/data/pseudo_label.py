"""Pseudo-annotation: images (with at most a caption) -> multi-granularity records, by a teacher.

    python -m umg_jax.data.pseudo_label --images DIR_OR_SHARDS --teacher WORKDIR \\
        --vocab tags.txt --out DIR

The chain for one image (no weights besides the teacher):

1. Proposals (:func:`propose`): scikit-image superpixels (felzenszwalb and / or SLIC) merged
   greedily by adjacency + mean-colour distance (every merge is a mask proposal), plus the boxes of
   those masks and multi-scale sliding windows.
2. Teacher scoring (:func:`score_batch`, jitted): one image-tower pass per batch of images, then
   RoIAlign box embeddings and mask-pooled embeddings against the prompt-ensembled vocabulary;
   softmax at the teacher's temperature.
3. Selection (:func:`select`): probability thresholds, class-wise box NMS, mask dedup by IoU,
   top-k; image tags from the image-level scores and the kept regions / masks; existing captions
   filtered by image-text cosine, else a template caption from the kept tags.

Output layout (readable by ``umg_jax.data.pipeline``): ``DIR/pseudo-<i>-of-<n>.array_record``
(input image ``j`` goes to shard ``j // shard_size``), ``DIR/meta.json`` (categories = the vocab)
written when every shard is done, and ``DIR/.pseudo_label_job.json`` (the job's inputs and
settings). Each shard is written atomically, so a rerun of the same job skips finished shards; a
shard whose images were all unreadable leaves a ``.pseudo-<i>.empty`` marker.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umg_jax.data import records

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
JOB_FILE = ".pseudo_label_job.json"
PREFIX = "pseudo"


class PseudoLabelError(ValueError):
    """Bad input to the pseudo-labeller (the CLI prints it as one line and exits with 2)."""


# ------------------------------------------------------------------------------ settings ---


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of proposals and selection (the CLI flags of the same names)."""

    superpixels: str = "felzenszwalb"  # felzenszwalb | slic | both
    fz_scale: float = 100.0  # felzenszwalb: higher -> larger segments
    fz_sigma: float = 0.8  # felzenszwalb: Gaussian pre-smoothing
    fz_min_size: int = 20  # felzenszwalb: minimum segment size in pixels
    slic_segments: int = 64  # SLIC: approximate number of superpixels
    slic_compactness: float = 10.0  # SLIC: colour vs. space trade-off
    merge_max_dist: float = 60.0  # stop merging when adjacent mean colours differ more (0-441)
    max_merges: int = 64  # at most this many hierarchical merges per image
    min_mask_frac: float = 0.005  # drop mask proposals smaller than this image fraction
    max_mask_frac: float = 0.95  # drop mask proposals larger than this image fraction
    max_mask_proposals: int = 48  # M: mask proposals scored per image (largest kept)
    window_scales: tuple[float, ...] = (0.25, 0.5, 1.0)  # window side / image side
    window_stride: float = 0.5  # window step / window side
    max_box_proposals: int = 96  # R: box proposals scored per image
    box_threshold: float = 0.5  # keep a region whose top class probability is >= this
    mask_threshold: float = 0.5  # keep a mask whose top class probability is >= this
    tag_threshold: float = 0.3  # image tag when its image-level probability is >= this
    nms_iou: float = 0.5  # class-wise box NMS IoU
    mask_iou: float = 0.7  # masks overlapping a better kept mask more than this are dropped
    link_iou: float = 0.5  # a segment links to the same-class region whose box IoU >= this
    max_regions: int = 8  # top-k kept regions per image
    max_segments: int = 8  # top-k kept masks per image
    max_tags: int = 6  # top-k image tags
    caption_threshold: float = 0.2  # keep an existing caption whose image-text cosine >= this
    caption_template: str = "a photo of {}."  # template caption; {} = "a circle and a star"

    def __post_init__(self):
        if self.superpixels not in ("felzenszwalb", "slic", "both"):
            raise PseudoLabelError(f"--superpixels must be felzenszwalb, slic or both, got "
                                   f"{self.superpixels!r}")
        if not self.window_scales or any(not 0 < s <= 1 for s in self.window_scales):
            raise PseudoLabelError(f"--window_scales must be in (0, 1], got {self.window_scales}")
        if not 0 < self.window_stride <= 1:
            raise PseudoLabelError(f"--window_stride must be in (0, 1], got {self.window_stride}")
        if self.max_mask_proposals < 1 or self.max_box_proposals < 1:
            raise PseudoLabelError("--max_mask_proposals and --max_box_proposals must be >= 1")
        if "{}" not in self.caption_template:
            raise PseudoLabelError(f"--caption_template {self.caption_template!r} has no '{{}}'")


# ----------------------------------------------------------------------------- proposals ---


def superpixels(image: np.ndarray, method: str, s: Settings) -> np.ndarray:
    """``[H, W, 3] uint8`` -> ``[H, W] int32`` labels ``0..n-1`` (a partition of the image)."""
    from skimage import segmentation

    if method == "felzenszwalb":
        lab = segmentation.felzenszwalb(image, scale=s.fz_scale, sigma=s.fz_sigma,
                                        min_size=s.fz_min_size, channel_axis=-1)
    elif method == "slic":
        lab = segmentation.slic(image, n_segments=s.slic_segments, compactness=s.slic_compactness,
                                start_label=0, channel_axis=-1)
    else:
        raise PseudoLabelError(f"unknown superpixel method {method!r}")
    _, lab = np.unique(lab, return_inverse=True)
    return lab.reshape(image.shape[:2]).astype(np.int32)


def merge_hierarchy(image: np.ndarray, labels: np.ndarray, max_dist: float,
                    max_merges: int) -> list[frozenset[int]]:
    """Greedy agglomeration of adjacent superpixels by mean-colour distance.

    Returns the member sets (superpixel ids of ``labels``) of every merged region, in merge
    order; the base superpixels themselves are not included.
    """
    n = int(labels.max()) + 1
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n).astype(np.float64)
    csum = np.stack([np.bincount(flat, image[..., c].ravel().astype(np.float64), minlength=n)
                     for c in range(3)], -1)
    pairs = np.concatenate([
        np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], -1),
        np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], -1)])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = np.unique(np.sort(pairs, 1), axis=0)
    nbr: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in pairs.tolist():
        nbr[a].add(b)
        nbr[b].add(a)
    members: dict[int, frozenset[int]] = {i: frozenset([i]) for i in range(n)}
    sums = {i: csum[i] for i in range(n)}
    counts = {i: count[i] for i in range(n)}
    out: list[frozenset[int]] = []
    next_id = n
    while len(members) > 1 and len(out) < max_merges:
        best, pair = np.inf, None
        for a, bs in nbr.items():
            ma = sums[a] / counts[a]
            for b in bs:
                if b > a:
                    d = float(np.linalg.norm(ma - sums[b] / counts[b]))
                    if d < best:
                        best, pair = d, (a, b)
        if pair is None or best > max_dist:
            break
        a, b = pair
        k, next_id = next_id, next_id + 1
        members[k] = members.pop(a) | members.pop(b)
        sums[k], counts[k] = sums.pop(a) + sums.pop(b), counts.pop(a) + counts.pop(b)
        nbr[k] = (nbr.pop(a) | nbr.pop(b)) - {a, b}
        for c in nbr[k]:
            nbr[c] -= {a, b}
            nbr[c].add(k)
        out.append(members[k])
    return out


def mask_box(mask: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool -> ``[4] float32`` tight box ``(x0, y0, x1, y1)`` in pixels."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32)


def windows(height: int, width: int, scales: Sequence[float], stride: float) -> np.ndarray:
    """Multi-scale sliding windows ``[N, 4] float32`` (pixels, inside the image)."""
    out = []
    for s in scales:
        wh, ww = max(1.0, s * height), max(1.0, s * width)
        ys = np.arange(0.0, height - wh + 1e-6, max(1.0, stride * wh))
        xs = np.arange(0.0, width - ww + 1e-6, max(1.0, stride * ww))
        # the last window flush with the far border, so every scale covers the image
        ys = np.unique(np.append(ys, height - wh))
        xs = np.unique(np.append(xs, width - ww))
        for y in ys:
            for x in xs:
                out.append([x, y, x + ww, y + wh])
    return np.asarray(out, np.float32).reshape(-1, 4)


def propose(image: np.ndarray, s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Class-agnostic proposals of one image.

    Returns ``boxes [R, 4] float32`` (pixels, R <= max_box_proposals; mask boxes first, then
    windows) and ``masks [M, H, W] bool`` (M <= max_mask_proposals, largest kept).
    """
    h, w = image.shape[:2]
    methods = ("felzenszwalb", "slic") if s.superpixels == "both" else (s.superpixels,)
    masks, seen = [], set()
    for method in methods:
        lab = superpixels(image, method, s)
        groups = [frozenset([i]) for i in range(int(lab.max()) + 1)]
        groups += merge_hierarchy(image, lab, s.merge_max_dist, s.max_merges)
        for g in groups:
            m = np.isin(lab, list(g)) if len(g) > 1 else lab == next(iter(g))
            frac = m.mean()
            key = hashlib.blake2b(np.packbits(m).tobytes(), digest_size=8).digest()
            if s.min_mask_frac <= frac <= s.max_mask_frac and key not in seen:
                seen.add(key)
                masks.append(m)
    if masks:
        areas = np.array([m.sum() for m in masks])
        keep = np.sort(np.argsort(-areas, kind="stable")[: s.max_mask_proposals])
        masks = [masks[i] for i in keep]
    mask_arr = np.stack(masks) if masks else np.zeros((0, h, w), bool)
    boxes = np.concatenate([np.stack([mask_box(m) for m in masks]).reshape(-1, 4),
                            windows(h, w, s.window_scales, s.window_stride)])
    _, first = np.unique(np.round(boxes, 2), axis=0, return_index=True)
    boxes = boxes[np.sort(first)][: s.max_box_proposals]
    return boxes, mask_arr


def cell_area(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[M, H, W]`` masks -> ``[M, gh, gw] float32`` exact fraction of each feature cell covered
    (the image is stretched onto the grid as the teacher's resize does)."""

    def overlap(n: int, g: int) -> np.ndarray:  # [g, n] share of pixel i inside cell j
        edges = np.arange(n + 1) * (g / n)
        lo, hi = edges[:-1], edges[1:]
        j = np.arange(g)[:, None]
        return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None) * (n / g)

    ay, ax = overlap(masks.shape[1], grid[0]), overlap(masks.shape[2], grid[1])
    return np.einsum("gh,mhw,kw->mgk", ay, masks.astype(np.float32), ax).astype(np.float32) / (
        (masks.shape[1] / grid[0]) * (masks.shape[2] / grid[1]))


# ------------------------------------------------------------------------------- scoring ---


def _l2(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


@jax.jit
def score_batch(img: jax.Array, dense: jax.Array, boxes: jax.Array, mask_area: jax.Array,
                text: jax.Array, scale: jax.Array) -> dict[str, jax.Array]:
    """Class probabilities of images, boxes and masks.

    Args:
      img ``[B, E]``, dense ``[B, gh, gw, E]``: the teacher's (unnormalised) image outputs.
      boxes ``[B, R, 4]`` normalised (x0, y0, x1, y1); mask_area ``[B, M, gh, gw]``.
      text ``[C, E]`` normalised vocabulary embeddings; scale: the teacher's logit scale.
    Returns ``image [B, C]``, ``box [B, R, C]``, ``mask [B, M, C]`` float32 softmax
    probabilities and ``img_emb [B, E]`` (normalised, for caption scores).
    """
    from umg_jax.ops.mask_pool import mask_pool
    from umg_jax.ops.roi_align import roi_pool_embed

    text = text.astype(jnp.float32)
    i = _l2(img.astype(jnp.float32))
    dense = dense.astype(jnp.float32)
    b = _l2(roi_pool_embed(dense, boxes, 2, 2))
    m = _l2(mask_pool(dense, mask_area))

    def probs(x):
        return jax.nn.softmax(scale * (x @ text.T), axis=-1)

    return {"image": probs(i), "box": probs(b), "mask": probs(m), "img_emb": i}


# ----------------------------------------------------------------------------- selection ---


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, 4]`` x ``[K, 4]`` -> ``[N, K]`` IoU of (x0, y0, x1, y1) boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area_a = np.prod(a[:, 2:] - a[:, :2], -1)
    area_b = np.prod(b[:, 2:] - b[:, :2], -1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` x ``[K, H, W]`` bool -> ``[N, K]`` IoU."""
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None] - inter
    return inter / np.maximum(union, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float,
        classes: np.ndarray | None = None) -> np.ndarray:
    """Greedy NMS; with ``classes`` only boxes of the same class suppress each other.
    Returns kept indices, best score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    ious = box_iou(boxes, boxes)
    for i in order:
        same = [k for k in keep if classes is None or classes[k] == classes[i]]
        if not same or ious[i, same].max() <= iou:
            keep.append(int(i))
    return np.asarray(keep, np.int64)


def dedup_masks(masks: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy class-agnostic mask dedup: kept indices, best score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    ious = mask_iou(masks, masks) if len(masks) else np.zeros((0, 0))
    for i in order:
        if not keep or ious[i, keep].max() <= iou:
            keep.append(int(i))
    return np.asarray(keep, np.int64)


def template_caption(tags: Sequence[str], template: str) -> str:
    """``["circle", "star"]`` -> ``"a photo of a circle and a star."``."""
    items = [f"{'an' if t[:1].lower() in 'aeiou' else 'a'} {t}" for t in tags]
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return template.format(listing)


def select(*, vocab: Sequence[str], image_probs: np.ndarray, boxes: np.ndarray,
           box_probs: np.ndarray, masks: np.ndarray, mask_probs: np.ndarray,
           s: Settings) -> dict[str, Any]:
    """Keeps the confident proposals of one image.

    Args: ``image_probs [C]``, ``boxes [R, 4]`` pixels with ``box_probs [R, C]``,
    ``masks [M, H, W]`` bool with ``mask_probs [M, C]`` (unpadded).
    Returns ``regions``, ``segments`` (schema form; RLE encoded), ``tags`` and ``probs`` (the
    kept probabilities, for the confidence).
    """
    kept_probs: list[float] = []
    # regions: threshold -> class-wise NMS -> top-k
    rcat, rp = box_probs.argmax(-1), box_probs.max(-1)
    ok = np.flatnonzero(rp >= s.box_threshold)
    keep = ok[nms(boxes[ok], rp[ok], s.nms_iou, rcat[ok])][: s.max_regions]
    regions = [{"box": [float(v) for v in boxes[i]], "caption": None,
                "tags": [vocab[rcat[i]]], "category": int(rcat[i])} for i in keep]
    kept_probs += rp[keep].tolist()
    # masks: threshold -> dedup -> top-k, each linked to its best same-class region
    mcat, mp = mask_probs.argmax(-1), mask_probs.max(-1)
    ok = np.flatnonzero(mp >= s.mask_threshold)
    mkeep = ok[dedup_masks(masks[ok], mp[ok], s.mask_iou)][: s.max_segments]
    segments = []
    rboxes = np.asarray([r["box"] for r in regions], np.float32).reshape(-1, 4)
    for i in mkeep:
        link = -1
        if len(regions):
            iou = box_iou(mask_box(masks[i])[None], rboxes)[0]
            iou[[r["category"] != mcat[i] for r in regions]] = -1
            if iou.max() >= s.link_iou:
                link = int(iou.argmax())
        segments.append({"rle": records.mask_to_rle(masks[i]), "caption": None,
                         "tags": [vocab[mcat[i]]], "category": int(mcat[i]), "isthing": True,
                         "region": link})
    kept_probs += mp[mkeep].tolist()
    # image tags: confident image-level classes, then the kept elements' classes, best first
    score = {int(c): float(image_probs[c]) for c in np.flatnonzero(image_probs >= s.tag_threshold)}
    kept_probs += list(score.values())
    for c, p in zip(np.concatenate([rcat[keep], mcat[mkeep]]).tolist(),
                    np.concatenate([rp[keep], mp[mkeep]]).tolist(), strict=True):
        score[c] = max(score.get(c, 0.0), p)
    tags = [vocab[c] for c in sorted(score, key=lambda c: -score[c])][: s.max_tags]
    return {"regions": regions, "segments": segments, "tags": tags, "probs": kept_probs}


# ---------------------------------------------------------------------------------- input ---


@dataclasses.dataclass
class Item:
    """One input: where it came from, the encoded image (None = unreadable), its captions."""

    source: str
    load: Any  # () -> (image bytes, captions)


def list_inputs(path: str) -> list[Item]:
    """A directory of ArrayRecord shards (records, captions kept) or of images (recursive)."""
    root = pathlib.Path(path)
    if not root.is_dir():
        raise PseudoLabelError(f"--images {path!r} is not a directory")
    shards = records.shard_paths(path)
    if shards:
        src = records.RecordSource(shards)

        def from_record(i: int):
            rec = records.decode_record(src[i])
            return rec["image"], list(rec.get("captions") or []), str(rec.get("source", i))

        return [Item(f"{root.name}[{i}]", functools.partial(from_record, i))
                for i in range(len(src))]
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file())

    def from_file(p: pathlib.Path):
        return p.read_bytes(), [], str(p.relative_to(root))

    return [Item(str(p.relative_to(root)), functools.partial(from_file, p)) for p in files]


def load_vocab(path: str) -> list[str]:
    """One tag per line; blank lines and ``#`` comments ignored; duplicates are an error."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise PseudoLabelError(f"--vocab {path!r} is not a file")
    vocab = [ln.strip() for ln in p.read_text().splitlines()]
    vocab = [v for v in vocab if v and not v.startswith("#")]
    if not vocab:
        raise PseudoLabelError(f"--vocab {path!r} holds no tags (one tag per line)")
    dup = sorted({v for v in vocab if vocab.count(v) > 1})
    if dup:
        raise PseudoLabelError(f"--vocab {path!r} repeats {dup}")
    return vocab


# ----------------------------------------------------------------------------------- label ---


class Labeller:
    """A teacher + vocabulary + settings: ``label(items) -> records`` in batches.

    ``teacher`` is a :class:`umg_jax.inference.UMGModel` or any object with its ``preprocess``,
    ``encode_image``, ``encode_text_labels``, ``tokenize``, ``encode_text`` and ``logit_scale``.
    """

    def __init__(self, teacher, vocab: Sequence[str], settings: Settings, batch_size: int = 8):
        self.teacher, self.vocab, self.s = teacher, list(vocab), settings
        self.batch_size = batch_size
        self.text = jnp.asarray(teacher.encode_text_labels(self.vocab), jnp.float32)
        self.scale = jnp.float32(teacher.logit_scale)
        self.skipped: list[str] = []

    def _caption_scores(self, img_emb: np.ndarray, captions: list[str]) -> np.ndarray:
        t = np.asarray(self.teacher.encode_text(self.teacher.tokenize(captions)), np.float32)
        t /= np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-8)
        return t @ img_emb

    def label_batch(self, items: Sequence[Item]) -> list[dict[str, Any]]:
        """Records of the readable items (unreadable ones are reported and skipped)."""
        s, B = self.s, self.batch_size
        loaded = []
        for it in items:
            try:
                raw, captions, source = it.load()
                image = records.decode_image(raw)
            except Exception as e:  # noqa: BLE001 - any unreadable input is skipped, not fatal
                print(f"\nskipped {it.source}: unreadable image ({type(e).__name__}: {e})",
                      file=sys.stderr)
                self.skipped.append(it.source)
                continue
            boxes, masks = propose(image, s)
            loaded.append((source, raw, image, captions, boxes, masks))
        if not loaded:
            return []
        x = np.stack([np.asarray(self.teacher.preprocess(e[2]), np.float32) for e in loaded])
        n = len(x)
        x = np.concatenate([x, np.zeros((B - n, *x.shape[1:]), x.dtype)]) if n < B else x
        img, dense = self.teacher.encode_image(x)
        grid = tuple(np.shape(dense)[1:3])
        R, M = s.max_box_proposals, s.max_mask_proposals
        bx = np.zeros((B, R, 4), np.float32)
        bx[:, :, 2:] = 1.0  # padding: the whole image (scored, ignored)
        area = np.zeros((B, M, *grid), np.float32)
        for k, (_, _, image, _, boxes, masks) in enumerate(loaded):
            h, w = image.shape[:2]
            bx[k, : len(boxes)] = boxes / np.array([w, h, w, h], np.float32)
            if len(masks):
                area[k, : len(masks)] = cell_area(masks, grid)
        out = jax.device_get(score_batch(jnp.asarray(img), jnp.asarray(dense), jnp.asarray(bx),
                                         jnp.asarray(area), self.text, self.scale))
        recs = []
        for k, (source, raw, image, captions, boxes, masks) in enumerate(loaded):
            h, w = image.shape[:2]
            sel = select(vocab=self.vocab, image_probs=out["image"][k], boxes=boxes,
                         box_probs=out["box"][k, : len(boxes)], masks=masks,
                         mask_probs=out["mask"][k, : len(masks)], s=s)
            captions = [c for c in captions if isinstance(c, str) and c.strip()]
            if captions:
                sc = self._caption_scores(out["img_emb"][k], captions)
                captions = [c for c, v in zip(captions, sc, strict=True)
                            if v >= s.caption_threshold]
            else:
                thing_tags = list(dict.fromkeys(
                    [r["tags"][0] for r in sel["regions"]]
                    + [g["tags"][0] for g in sel["segments"]])) or sel["tags"][:1]
                if thing_tags:
                    captions = [template_caption(thing_tags, s.caption_template)]
            probs = sel["probs"]
            recs.append({
                "source": source, "image": raw, "height": h, "width": w,
                "captions": captions, "tags": sel["tags"],
                "regions": sel["regions"], "segments": sel["segments"],
                "confidence": float(np.mean(probs)) if probs else 0.0,
            })
        return recs

    def label(self, items: Sequence[Item]) -> Iterator[dict[str, Any]]:
        for i in range(0, len(items), self.batch_size):
            yield from self.label_batch(items[i: i + self.batch_size])


# --------------------------------------------------------------------------------- driver ---


def shard_name(i: int, n: int) -> str:
    return f"{PREFIX}-{i:05d}-of-{n:05d}{records.SHARD_SUFFIX}"


def run(items: Sequence[Item], labeller: Labeller, out: str, *, shard_size: int = 256,
        job: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Labels ``items`` into ``out`` shard by shard (finished shards skipped); writes meta.json.

    ``job`` (inputs + settings) is stored beside the shards; a rerun with a different job
    raises :class:`PseudoLabelError` instead of mixing two jobs. Returns the meta dict.
    """
    from umg_jax.metrics import Progress

    if not items:
        raise PseudoLabelError("no images found")
    if shard_size < 1:
        raise PseudoLabelError(f"--shard_size must be >= 1, got {shard_size}")
    outp = pathlib.Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    job = dict(job or {})
    job.update(num_inputs=len(items), shard_size=shard_size, vocab=labeller.vocab,
               settings=dataclasses.asdict(labeller.s),
               inputs_sha=hashlib.sha256("\n".join(i.source for i in items).encode()).hexdigest())
    job = json.loads(json.dumps(job))  # tuples -> lists, so a reread compares equal
    jf = outp / JOB_FILE
    if jf.exists():
        if json.loads(jf.read_text()) != job:
            raise PseudoLabelError(f"{out} holds a different pseudo-label job (other inputs, vocab "
                                   "or settings); use a new --out or --overwrite")
    else:
        jf.write_text(json.dumps(job, indent=1))
    n = (len(items) + shard_size - 1) // shard_size
    prog = Progress(len(items))
    done_items = 0
    for i in range(n):
        chunk = items[i * shard_size: (i + 1) * shard_size]
        path = outp / shard_name(i, n)
        empty = outp / f".{PREFIX}-{i:05d}.empty"
        if not (path.exists() or empty.exists()):
            def recs(chunk=chunk, base=done_items):
                for j in range(0, len(chunk), labeller.batch_size):
                    yield from labeller.label_batch(chunk[j: j + labeller.batch_size])
                    if progress:
                        k = base + min(j + labeller.batch_size, len(chunk))
                        line = prog.update(k).replace("step ", "image ")
                        print(f"\r{line}", end="", file=sys.stderr, flush=True)

            if records.write_shard_file(recs(), str(path)) == 0:
                empty.write_text("every image of this shard was unreadable\n")
        else:
            prog.reset(done_items + len(chunk))
        done_items += len(chunk)
    if progress:
        print(file=sys.stderr)
    paths = records.shard_paths(out)
    total = len(records.RecordSource(paths)) if paths else 0
    if total == 0:
        raise PseudoLabelError("no readable images: nothing was written")
    meta = {"name": f"pseudo-{outp.name}",
            "categories": [{"id": k, "name": v, "isthing": True}
                           for k, v in enumerate(labeller.vocab)],
            "num_examples": total, "num_shards": len(paths), "pseudo_label": job,
            "skipped": labeller.skipped}
    records.write_meta(out, meta)
    return meta


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    ap = argparse.ArgumentParser(
        prog="python -m umg_jax.data.pseudo_label",
        description="Pseudo-label images with a umg_jax teacher: classical mask / box proposals "
        "scored against a tag vocabulary; writes ArrayRecord shards (image tags, region boxes + "
        "tags, masks + tags, captions, per-example confidence) + meta.json. Resumable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--images", required=True,
                    help="directory of images (png/jpg, recursive) or of ArrayRecord shards")
    ap.add_argument("--teacher", required=True, help="training workdir or import directory")
    ap.add_argument("--step", type=int, default=None, help="teacher checkpoint step (latest)")
    ap.add_argument("--vocab", required=True, help="text file, one tag per line")
    ap.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    ap.add_argument("--overwrite", action="store_true", help="delete --out first")
    ap.add_argument("--batch_size", type=int, default=8, help="images per teacher pass")
    ap.add_argument("--shard_size", type=int, default=256, help="images per output shard")
    help_ = {f.name: f.metadata.get("help") for f in dataclasses.fields(Settings)}
    for f in dataclasses.fields(Settings):
        default = getattr(d, f.name)
        kind = _floats if isinstance(default, tuple) else type(default)
        shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
        ap.add_argument(f"--{f.name}", type=kind, default=default,
                        help=help_[f.name] or _SETTING_HELP.get(f.name, "") + f" ({shown})")
    return ap


# The dataclass comments, repeated for --help (argparse cannot read comments).
_SETTING_HELP = {
    "superpixels": "superpixel method: felzenszwalb, slic or both",
    "fz_scale": "felzenszwalb scale (higher -> larger segments)",
    "fz_sigma": "felzenszwalb Gaussian pre-smoothing",
    "fz_min_size": "felzenszwalb minimum segment size in pixels",
    "slic_segments": "SLIC approximate number of superpixels",
    "slic_compactness": "SLIC colour vs. space trade-off",
    "merge_max_dist": "stop merging superpixels when adjacent mean RGB colours differ more",
    "max_merges": "at most this many hierarchical merges per image",
    "min_mask_frac": "drop mask proposals smaller than this image fraction",
    "max_mask_frac": "drop mask proposals larger than this image fraction",
    "max_mask_proposals": "mask proposals scored per image (largest kept)",
    "window_scales": "sliding-window sides as fractions of the image side, comma-separated",
    "window_stride": "window step as a fraction of the window side",
    "max_box_proposals": "box proposals scored per image (mask boxes first, then windows)",
    "box_threshold": "keep a region whose top class probability is >= this",
    "mask_threshold": "keep a mask whose top class probability is >= this",
    "tag_threshold": "image tag when its image-level probability is >= this",
    "nms_iou": "class-wise box NMS IoU threshold",
    "mask_iou": "drop a mask whose IoU with a better kept mask exceeds this",
    "link_iou": "a segment links to the same-class kept region whose box IoU >= this",
    "max_regions": "top-k kept regions per image",
    "max_segments": "top-k kept masks per image",
    "max_tags": "top-k image tags",
    "caption_threshold": "keep an existing caption whose teacher image-text cosine >= this",
    "caption_template": "template caption for images without one; {} = 'a circle and a star'",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(Settings)})
        if args.batch_size < 1:
            raise PseudoLabelError(f"--batch_size must be >= 1, got {args.batch_size}")
        vocab = load_vocab(args.vocab)
        items = list_inputs(args.images)
        if not items:
            raise PseudoLabelError(f"no images found in {args.images!r} (png/jpg files or "
                                   "ArrayRecord shards)")
        from umg_jax import inference

        try:
            teacher = inference.load(args.teacher, args.step)
        except inference.InputError as e:
            raise PseudoLabelError(f"--teacher: {e}") from None
        if args.overwrite and pathlib.Path(args.out).exists():
            import shutil

            shutil.rmtree(args.out)
        labeller = Labeller(teacher, vocab, settings, batch_size=args.batch_size)
        job = {"images": os.path.abspath(args.images), "teacher": os.path.abspath(args.teacher),
               "step": args.step}
        meta = run(items, labeller, args.out, shard_size=args.shard_size, job=job)
    except PseudoLabelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {meta['num_examples']} examples to {meta['num_shards']} shards in {args.out}"
          + (f" ({len(meta['skipped'])} unreadable images skipped)" if meta["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
