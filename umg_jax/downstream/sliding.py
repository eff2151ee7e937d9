"""Dense inference at benchmark resolution: per-pixel class logits of images of any size.

Sliding window (default): the image is resized so that its shorter side is ``short_side``, cut
into windows of the model's input size at ``window_stride`` x window (the last window of each row
and column flush with the border), the windows of many images batched through
:func:`common.encode_images`, each window's patch logits (dense embeddings x prompt-ensembled
label embeddings x the model's mask logit scale) upsampled bilinearly to window pixels,
overlapping logits averaged, and the map resized to the original image (mmsegmentation's
``slide`` inference).

The segmentation head on the same windows: semantic scores averaged like logits
(:func:`sliding_head_scores`); panoptic segments from one Mask2Former merge over every window's
queries, cross-window duplicates fused first (:func:`sliding_head_panoptic`).

Whole image (``opts.resize_pos``): the resized image (sides rounded to whole patches) in one
pass with the position embeddings bicubically interpolated to its patch grid (the maths of the
import's ``--allow_resize``, on a rectangular grid); one compile per image shape.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umg_jax.downstream import common
from umg_jax.downstream.common import BenchmarkInputError, Options
from umg_jax.models import pos_embed


def default_short_side(backbone: Any) -> int:
    """448 for patch-14 models (the ViT-L/14 protocol), else twice the model's input size."""
    if backbone.config.vision.patch_size == 14:
        return 448
    return 2 * backbone.image_size


def short_side(backbone: Any, opts: Options) -> int:
    """The shorter side images are resized to (``opts.short_side`` or the default)."""
    s = opts.short_side if opts.short_side is not None else default_short_side(backbone)
    if s < backbone.image_size:
        raise BenchmarkInputError(f"--short_side {s} is smaller than the model's input size "
                                  f"{backbone.image_size}")
    return int(s)


def window_stride(backbone: Any, opts: Options) -> int:
    """Stride in pixels: ``opts.window_stride`` x window, at least 1 px."""
    if not 0 < opts.window_stride <= 1:
        raise BenchmarkInputError(f"--window_stride must be in (0, 1], got {opts.window_stride}")
    return max(1, round(opts.window_stride * backbone.image_size))


def resized_size(hw: tuple[int, int], short: int) -> tuple[int, int]:
    """``(H, W)`` scaled so that the shorter side is ``short`` (aspect ratio kept, rounded)."""
    h, w = hw
    f = short / min(h, w)
    return max(short, round(h * f)), max(short, round(w * f))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis covering ``[0, length)``: every ``stride``, the last one
    flush with the end (``length >= window``)."""
    if length < window:
        raise ValueError(f"length {length} is shorter than the window {window}")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def prepare(image: np.ndarray, size: tuple[int, int], backbone: Any) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``float32 [h, w, 3]`` resized (bilinear, antialiased like
    ``UMGModel.preprocess``) and normalised with the model's pixel mean / std."""
    x = jax.image.resize(jnp.asarray(image, jnp.float32) / 255.0, (*size, 3), "bilinear",
                         antialias=True)
    return (np.asarray(x) - backbone.pixel_mean) / backbone.pixel_std


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-tap linear interpolation along one axis, half-pixel centres, edges clamped:
    ``(i0 [n_out], i1 [n_out], w1 [n_out] float32)``, output = (1 - w1) x[i0] + w1 x[i1]."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``[h, w, C]`` -> ``[H, W, C]`` two-tap bilinear, half-pixel centres (traceable)."""
    y0, y1, wy = _taps(x.shape[0], size[0])
    rows = x[y0] * (1 - wy)[:, None, None] + x[y1] * wy[:, None, None]
    x0, x1, wx = _taps(x.shape[1], size[1])
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


_bilinear_jit = jax.jit(_bilinear, static_argnames=("size",))


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``float32 [h, w, C]`` -> ``[H, W, C]``: PyTorch's ``interpolate(mode="bilinear",
    align_corners=False)`` (mmsegmentation's logit resize) as two separable two-tap passes,
    fused by XLA: O(H W C), where ``jax.image.resize``'s dense weight matrices cost ~50 GFLOP
    for an ADE image's 150 class maps (4x slower on the CPU). One compile per shape pair."""
    if x.shape[:2] == tuple(size):
        return np.asarray(x)
    return np.asarray(_bilinear_jit(jnp.asarray(x, jnp.float32), tuple(size)))


@functools.partial(jax.jit, static_argnames=("window",))
def _window_logits(dense: jax.Array, text: jax.Array, scale: jax.Array, window: int
                   ) -> jax.Array:
    """``dense [B, gh, gw, E]`` x ``text [C, E]`` -> ``[B, window, window, C]`` logits
    upsampled bilinearly to window pixels."""
    logits = scale * jnp.einsum("bhwe,ce->bhwc", dense, text)
    return jax.vmap(lambda lg: _bilinear(lg, (window, window)))(logits)


@dataclasses.dataclass
class _Pending:
    """One image's running sums while its windows are in flight."""

    acc: np.ndarray  # [h, w, C] float32 summed window outputs
    count: np.ndarray  # [h, w] float32 windows covering each output cell
    remaining: int  # windows not yet encoded
    finish: Callable[[np.ndarray], np.ndarray]  # the averaged [h, w, C] -> what is yielded

    def add(self, y: int, x: int, out: np.ndarray) -> None:
        """Adds one window's ``[o, o, C]`` output at ``(y, x)``."""
        self.acc[y:y + out.shape[0], x:x + out.shape[1]] += out
        self.count[y:y + out.shape[0], x:x + out.shape[1]] += 1

    def result(self) -> Any:
        return self.finish(self.acc / self.count[..., None])


def _slide(backbone: Any, jobs: Iterable[tuple[Any, list[tuple[int, int, np.ndarray]]]],
           bsz: int, window_out: Callable[[np.ndarray, jax.Array], Any]) -> Iterator[Any]:
    """The sliding-window engine: ``jobs`` gives per image its accumulator (:class:`_Pending`,
    or any object with its ``remaining`` / ``add`` / ``result``) and its windows ``(out_y,
    out_x, crop [S, S, 3])``; crops of consecutive images share batches of ``bsz`` (padded at
    the end: one compiled encoder for every image size); ``window_out(crops [bsz, S, S, 3],
    dense [bsz, gh, gw, E])`` gives one output per window (``[bsz, o, o, C]`` for
    :class:`_Pending`), handed to the accumulator's ``add(out_y, out_x, out)``; each image's
    ``result()`` is yielded in order once its windows are done."""
    pending: collections.deque[Any] = collections.deque()
    queue: list[tuple[Any, int, int, np.ndarray]] = []

    def run_batch(items):
        crops = np.stack([c for *_, c in items])
        if len(crops) < bsz:
            crops = np.concatenate([crops, np.zeros((bsz - len(crops), *crops.shape[1:]),
                                                    crops.dtype)])
        _, dense = common.encode_images(backbone, crops)
        out = window_out(crops, jnp.asarray(dense))
        for (st, y, x, _), o in zip(items, out, strict=False):
            st.add(y, x, o)
            st.remaining -= 1

    def finished():
        while pending and pending[0].remaining == 0:
            yield pending.popleft().result()

    for st, windows in jobs:
        pending.append(st)
        queue.extend((st, y, x, crop) for y, x, crop in windows)
        while len(queue) >= bsz:
            run_batch(queue[:bsz])
            del queue[:bsz]
        yield from finished()
    if queue:
        run_batch(queue)
    yield from finished()


def sliding_logits(backbone: Any, images: Iterable[np.ndarray], text: np.ndarray,
                   opts: Options, scale: float) -> Iterator[np.ndarray]:
    """``float32 [H, W, C]`` class logits for each ``uint8 [H, W, 3]`` image, in order.

    ``text [C, E]``: L2-normalised label embeddings; ``scale``: the logit scale. Windows of
    consecutive images share batches of ``opts.batch_size`` (padded at the end), so one
    compiled encoder serves every image size."""
    if opts.resize_pos:
        yield from whole_image_logits(backbone, images, text, opts, scale)
        return
    win = backbone.image_size
    text_j, scale_j = jnp.asarray(text, jnp.float32), jnp.float32(scale)
    yield from _slide(backbone, _pixel_windows(backbone, images, opts, len(text)),
                      max(1, opts.batch_size),
                      lambda _, d: np.asarray(_window_logits(d, text_j, scale_j, win)))


def _window_grid(backbone: Any, images: Iterable[np.ndarray], opts: Options
                 ) -> Iterator[tuple[tuple[int, int], tuple[int, int],
                                     list[tuple[int, int, np.ndarray]]]]:
    """Per image ``(image (H, W), resized (h, w), windows)``: the image resized to the shorter
    side, windows ``(y, x, crop [S, S, 3] float32)`` of the input size every
    ``window_stride``, row-major (the last row / column flush with the border)."""
    win = backbone.image_size
    short, stride = short_side(backbone, opts), window_stride(backbone, opts)
    for image in images:
        size = resized_size(image.shape[:2], short)
        x = prepare(image, size, backbone)
        ys, xs = window_starts(size[0], win, stride), window_starts(size[1], win, stride)
        yield image.shape[:2], size, [(y, xx, x[y:y + win, xx:xx + win]) for y in ys
                                      for xx in xs]


def _pixel_windows(backbone: Any, images: Iterable[np.ndarray], opts: Options, channels: int
                   ) -> Iterator[tuple[_Pending, list[tuple[int, int, np.ndarray]]]]:
    """Jobs of :func:`_slide` with outputs in pixels (:func:`_window_grid`), the mean resized
    back to the image."""
    for hw, size, windows in _window_grid(backbone, images, opts):
        st = _Pending(np.zeros((*size, channels), np.float32), np.zeros(size, np.float32),
                      len(windows), functools.partial(resize_bilinear, size=hw))
        yield st, windows


def patch_size_of(hw: tuple[int, int], short: int, patch: int, window: int) -> tuple[int, int]:
    """:func:`resized_size` with both sides rounded to whole patches (at least ``window``)."""
    h, w = resized_size(hw, short)
    return (max(window, round(h / patch) * patch), max(window, round(w / patch) * patch))


def sliding_dense(backbone: Any, images: Iterable[np.ndarray], opts: Options
                  ) -> Iterator[np.ndarray]:
    """``float32 [gh, gw, E]`` L2-normalised dense embedding map of each ``uint8 [H, W, 3]``
    image at the benchmark resolution (for box pooling): the image resized to shorter side
    ``short_side``, sides rounded to whole patches; windows of the model's input size at a
    stride rounded to whole patches, so window cells land on image cells; each cell the
    normalised mean of its windows' embeddings. ``opts.resize_pos``: one whole-image pass with
    interpolated position embeddings instead (CLIPSelf's protocol)."""
    if opts.resize_pos:
        yield from whole_image_dense(backbone, images, opts)
        return
    from umg_jax.evaluators.common import normalize

    win, p = backbone.image_size, backbone.config.vision.patch_size
    short = short_side(backbone, opts)
    stride = max(1, round(window_stride(backbone, opts) / p))  # in patches
    g, e = win // p, int(backbone.config.embed_dim)

    def jobs():
        for image in images:
            size = patch_size_of(image.shape[:2], short, p, win)
            x = prepare(image, size, backbone)
            grid = (size[0] // p, size[1] // p)
            ys, xs = window_starts(grid[0], g, stride), window_starts(grid[1], g, stride)
            st = _Pending(np.zeros((*grid, e), np.float32), np.zeros(grid, np.float32),
                          len(ys) * len(xs), normalize)
            yield st, [(y, xx, x[y * p:y * p + win, xx * p:xx * p + win]) for y in ys
                       for xx in xs]

    yield from _slide(backbone, jobs(), max(1, opts.batch_size),
                      lambda _, d: np.asarray(d, np.float32))


def sliding_head_scores(segmenter: Any, images: Iterable[np.ndarray], text: np.ndarray,
                        seen: np.ndarray, opts: Options, ensemble: bool
                        ) -> Iterator[np.ndarray]:
    """``float32 [H, W, C]`` semantic scores of the segmentation head for each image: per
    window, Mask2Former's semantic inference ``sum_q p(q, c) mask_q`` (FC-CLIP ensemble
    probabilities when ``ensemble``, fused with the frozen per-pixel log-probabilities at the
    run's ``seg.pixel_weight``: ``segmentation.fuse_pixels``; ``seen [C]``: labels of the head's
    training vocabulary), averaged over the windows covering each pixel and resized to the image
    (mmsegmentation's ``slide`` mode for Mask2Former). Windows, stride and resolution as
    :func:`sliding_logits`."""
    from umg_jax.evaluators import segmentation as se

    if opts.resize_pos:
        raise BenchmarkInputError("--resize_pos: the segmentation head runs on windows of its "
                                  "input size only")
    bb = segmenter.backbone
    win = bb.image_size
    scale = se.mask_logit_scale(bb)
    text = np.asarray(text, np.float32)
    weight = se.pixel_weight(segmenter.config.seg, ensemble)

    def window_out(crops, dense):
        mask_prob, probs = se.head_predictions(
            lambda *a: segmenter.decode(segmenter.seg_params, *a), crops, np.asarray(dense),
            text, (win, win), seen, segmenter.config.seg, scale, ensemble=ensemble)
        p = probs["ensemble" if ensemble else "head"]
        logp = se.pixel_log_probs(np.asarray(dense), text, scale, (win, win)) if weight else None
        return se.fuse_pixels(se.semantic_scores(p, mask_prob), logp, weight)

    yield from _slide(bb, _pixel_windows(bb, images, opts, len(text)), max(1, opts.batch_size),
                      window_out)


# ------------------------------------------------- the head's panoptic inference over windows
FUSE_IOU = 0.5  # two windows' candidates of one class are one object when their masks (>= 0.5)
#   overlap at IoU >= this inside the area the two windows share


@dataclasses.dataclass
class Candidate:
    """A query of one window that passed Mask2Former's object test, in the resized image."""

    sid: int  # its segment id: window index x queries per window + query index
    window: int  # index of its window in the image (row-major)
    y: int  # the window's offset in the resized image
    x: int
    mask: np.ndarray  # [S, S] float32 sigmoid mask probability over its window
    score: np.float32  # best non-void class probability
    label: int  # that class


def window_candidates(probs: np.ndarray, mask_prob: np.ndarray, window: int, y: int, x: int,
                      object_threshold: float) -> list[Candidate]:
    """One window's queries ``probs [N, C + 1]`` (last = void), ``mask_prob [N, S, S]`` ->
    the candidates that ``segmentation.panoptic_inference`` would let compete: best class not
    void and its probability > ``object_threshold``."""
    from umg_jax.evaluators.segmentation import keep_queries

    keep, score, label = keep_queries(probs, object_threshold)
    n = probs.shape[0]
    return [Candidate(window * n + int(q), window, y, x, mask_prob[q].copy(), score[q],
                      int(label[q])) for q in np.nonzero(keep)[0]]


def _fuse(cands: list[Candidate], fuse_iou: float) -> list[list[int]]:
    """Groups of candidate indices that are one object seen by several windows: pairs of one
    class from two windows whose masks (>= 0.5) reach IoU >= ``fuse_iou`` inside the windows'
    shared area, joined best IoU first, never two candidates of one window in a group (a
    window's own queries are Mask2Former's distinct objects). Groups ordered by first
    member; single candidates are groups of one."""
    own = [c.mask >= 0.5 for c in cands]
    pairs = []
    for i, a in enumerate(cands):
        sa = a.mask.shape[0]
        for j in range(i + 1, len(cands)):
            b = cands[j]
            if b.window == a.window or b.label != a.label:
                continue
            y0, y1 = max(a.y, b.y), min(a.y, b.y) + sa
            x0, x1 = max(a.x, b.x), min(a.x, b.x) + sa
            if y0 >= y1 or x0 >= x1:
                continue
            ma = own[i][y0 - a.y:y1 - a.y, x0 - a.x:x1 - a.x]
            mb = own[j][y0 - b.y:y1 - b.y, x0 - b.x:x1 - b.x]
            union = np.count_nonzero(ma | mb)
            iou = np.count_nonzero(ma & mb) / union if union else 0.0
            if iou >= fuse_iou:
                pairs.append((-iou, i, j))
    root = list(range(len(cands)))
    windows = [{c.window} for c in cands]

    def find(i):
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for _, i, j in sorted(pairs):
        ri, rj = find(i), find(j)
        if ri != rj and not windows[ri] & windows[rj]:
            ri, rj = min(ri, rj), max(ri, rj)
            root[rj] = ri
            windows[ri] |= windows[rj]
    groups: dict[int, list[int]] = {}
    for i in range(len(cands)):
        groups.setdefault(find(i), []).append(i)
    return [groups[r] for r in sorted(groups)]


def merge_candidates(cands: list[Candidate], size: tuple[int, int], isthing: np.ndarray,
                     overlap_threshold: float, fuse_iou: float | None = None
                     ) -> tuple[np.ndarray, dict[int, int]]:
    """One Mask2Former panoptic merge over all windows' candidates of an image of ``size``
    ``(h, w)``: cross-window duplicates fused first (:func:`_fuse`; mask = mean of the members'
    masks where they overlap, score = mean of theirs), then per pixel the fused candidate with
    the highest ``score x mask`` wins (first one on ties), a candidate keeps the pixels it wins
    that are in its own mask (>= 0.5) if they are at least ``overlap_threshold`` of that mask,
    stuff of one class is one segment. Returns ``(seg [h, w] int32`` ids, -1 = none, ``{id:
    class})``; on one window it is ``segmentation.panoptic_inference``. ``fuse_iou``: default
    :data:`FUSE_IOU`; above 1, no fusion."""
    fuse_iou = FUSE_IOU if fuse_iou is None else fuse_iou
    seg = np.full(size, -1, np.int32)
    classes: dict[int, int] = {}
    fused = []
    for members in _fuse(cands, fuse_iou):
        ms = [cands[i] for i in members]
        y0, x0 = min(c.y for c in ms), min(c.x for c in ms)
        y1 = max(c.y + c.mask.shape[0] for c in ms)
        x1 = max(c.x + c.mask.shape[1] for c in ms)
        if len(ms) == 1:  # the window's own mask, bit for bit
            mask = ms[0].mask
        else:
            acc = np.zeros((y1 - y0, x1 - x0), np.float32)
            cnt = np.zeros_like(acc)
            for c in ms:
                acc[c.y - y0:c.y - y0 + c.mask.shape[0], c.x - x0:c.x - x0 + c.mask.shape[1]] += \
                    c.mask
                cnt[c.y - y0:c.y - y0 + c.mask.shape[0], c.x - x0:c.x - x0 + c.mask.shape[1]] += 1
            mask = np.divide(acc, cnt, out=np.zeros_like(acc), where=cnt > 0)
        score = np.float32(np.mean(np.array([c.score for c in ms], np.float32), dtype=np.float32))
        fused.append((ms[0].sid, ms[0].label, (y0, y1, x0, x1), mask, score))
    # the per-pixel competition, as a running first-argmax over the candidates in order
    best = np.full(size, -1.0, np.float32)
    winner = np.full(size, -1, np.int64)
    for g, (_, _, (y0, y1, x0, x1), mask, score) in enumerate(fused):
        v = score * mask
        sub = best[y0:y1, x0:x1]
        upd = v > sub
        sub[upd] = v[upd]
        winner[y0:y1, x0:x1][upd] = g
    stuff_id: dict[int, int] = {}
    for g, (sid, c, (y0, y1, x0, x1), mask, _) in enumerate(fused):
        own = mask >= 0.5
        region = (winner[y0:y1, x0:x1] == g) & own
        n_own, n_region = np.count_nonzero(own), np.count_nonzero(region)
        if not n_own or not n_region or n_region / n_own < overlap_threshold:
            continue
        sid = sid if isthing[c] else stuff_id.setdefault(c, sid)
        seg[y0:y1, x0:x1][region] = sid
        classes[sid] = c
    return seg, classes


def resize_nearest(seg: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[h, w]`` -> ``[H, W]`` nearest neighbour, half-pixel centres (PIL's ``NEAREST``,
    PyTorch's ``nearest-exact``)."""
    if seg.shape == tuple(size):
        return seg
    rows = np.minimum(((np.arange(size[0]) + 0.5) * (seg.shape[0] / size[0])).astype(np.int64),
                      seg.shape[0] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * (seg.shape[1] / size[1])).astype(np.int64),
                      seg.shape[1] - 1)
    return seg[rows[:, None], cols[None, :]]


@dataclasses.dataclass
class _Candidates:
    """One image's candidates while its windows are in flight (a :func:`_slide` accumulator)."""

    remaining: int
    windows: dict[tuple[int, int], int]  # window offset -> its index in the image
    finish: Callable[[list[Candidate]], Any]
    object_threshold: float
    cands: list[Candidate] = dataclasses.field(default_factory=list)

    def add(self, y: int, x: int, out: tuple[np.ndarray, np.ndarray]) -> None:
        probs, mask_prob = out
        self.cands += window_candidates(probs, mask_prob, self.windows[(y, x)], y, x,
                                        self.object_threshold)

    def result(self) -> Any:
        return self.finish(self.cands)


def sliding_head_panoptic(segmenter: Any, images: Iterable[np.ndarray], text: np.ndarray,
                          isthing: np.ndarray, seen: np.ndarray, opts: Options, ensemble: bool
                          ) -> Iterator[tuple[np.ndarray, dict[int, int]]]:
    """Panoptic segments of the segmentation head for each ``uint8 [H, W, 3]`` image: ``(seg
    [H, W] int32`` segment id, -1 = none, ``{segment id: class index})``.

    Windows and resolution as :func:`sliding_head_scores`. Per window, the head's queries (class
    probabilities, FC-CLIP ensemble when ``ensemble``; ``seen [C]``: the head's training
    vocabulary) that pass the object threshold become candidates with their window's masks;
    after the image's last window, one merge over them all (:func:`merge_candidates`, the run's
    ``config.seg`` object / overlap thresholds, ``isthing [C]``) at the resized resolution, the
    segment map resized to the image (nearest). Candidate masks stay window-sized: memory is
    O(kept candidates x S^2), never O(queries x image)."""
    from umg_jax.evaluators import segmentation as se

    if opts.resize_pos:
        raise BenchmarkInputError("--resize_pos: the segmentation head runs on windows of its "
                                  "input size only")
    text = np.asarray(text, np.float32)
    isthing = np.asarray(isthing, bool)
    if isthing.shape != (len(text),) or np.shape(seen) != (len(text),):
        raise ValueError(f"isthing {isthing.shape} and seen {np.shape(seen)} must have one entry "
                         f"per class ({len(text)})")
    bb = segmenter.backbone
    win = bb.image_size
    cfg = segmenter.config.seg
    scale = se.mask_logit_scale(bb)

    def window_out(crops, dense):
        mask_prob, probs = se.head_predictions(
            lambda *a: segmenter.decode(segmenter.seg_params, *a), crops, np.asarray(dense),
            text, (win, win), seen, cfg, scale, ensemble=ensemble)
        return list(zip(probs["ensemble" if ensemble else "head"], mask_prob, strict=True))

    def finish(cands, size, hw):
        seg, classes = merge_candidates(cands, size, isthing, float(cfg.overlap_threshold))
        seg = resize_nearest(seg, hw)
        if seg.shape != size:  # a segment may vanish when the map shrinks
            present = set(np.unique(seg).tolist())
            classes = {k: v for k, v in classes.items() if k in present}
        return seg, classes

    def jobs():
        for hw, size, windows in _window_grid(bb, images, opts):
            st = _Candidates(len(windows), {(y, x): i for i, (y, x, _) in enumerate(windows)},
                             functools.partial(finish, size=size, hw=hw),
                             float(cfg.object_threshold))
            yield st, windows

    yield from _slide(bb, jobs(), max(1, opts.batch_size), window_out)


def sliding_labels(backbone: Any, images: Iterable[np.ndarray], text: np.ndarray,
                   opts: Options, scale: float) -> Iterator[np.ndarray]:
    """``int32 [H, W]`` argmax label map per image (:func:`sliding_logits`)."""
    for logits in sliding_logits(backbone, images, text, opts, scale):
        yield logits.argmax(-1).astype(np.int32)


# ------------------------------------------------------------------ whole image, resized pos
def whole_image_dense(backbone: Any, images: Iterable[np.ndarray], opts: Options
                      ) -> Iterator[np.ndarray]:
    """``float32 [gh, gw, E]`` L2-normalised dense map of each image encoded whole: sides
    rounded to whole patches, position embeddings interpolated to the grid
    (``opts.resize_pos``); one compile per image shape."""
    from umg_jax.models import clip

    params = backbone.params
    visual = params.get("visual", {}) if isinstance(params, dict) else {}
    if "positional_embedding" not in visual:
        raise BenchmarkInputError("--resize_pos: this model has no learned position embedding "
                                  "to interpolate")
    p = backbone.config.vision.patch_size
    prefix = int(backbone.config.vision.get("class_token", True))
    pos = np.asarray(visual["positional_embedding"])
    short = short_side(backbone, opts)
    fn = jax.jit(lambda prm, x: backbone.model.apply({"params": prm}, x,
                                                     method=clip.CLIP.encode_image)["dense"])
    for image in images:
        h, w = resized_size(image.shape[:2], short)
        grid = (max(1, round(h / p)), max(1, round(w / p)))
        x = prepare(image, (grid[0] * p, grid[1] * p), backbone)
        prm = dict(params, visual=dict(visual, positional_embedding=jnp.asarray(
            pos_embed.resize(pos, grid, prefix))))
        dense = np.asarray(fn(prm, jnp.asarray(x[None])), np.float32)[0]
        yield dense / np.maximum(np.linalg.norm(dense, axis=-1, keepdims=True), 1e-8)


def whole_image_logits(backbone: Any, images: Iterable[np.ndarray], text: np.ndarray,
                       opts: Options, scale: float) -> Iterator[np.ndarray]:
    """``float32 [H, W, C]`` logits of each image encoded whole (:func:`whole_image_dense`),
    upsampled to the encoded size, then to the image."""
    p = backbone.config.vision.patch_size
    seen: collections.deque[np.ndarray] = collections.deque()

    def feed():  # images stay a stream: one in flight
        for im in images:
            seen.append(im)
            yield im

    for dense in whole_image_dense(backbone, feed(), opts):
        image = seen.popleft()
        logits = scale * np.einsum("hwe,ce->hwc", dense, text)
        size = (dense.shape[0] * p, dense.shape[1] * p)
        yield resize_bilinear(resize_bilinear(logits, size), image.shape[:2])


def protocol(backbone: Any, opts: Options) -> dict[str, Any]:
    """The resolution / window choices to record in a task's JSON."""
    out = {"short_side": short_side(backbone, opts),
           "short_side_source": "option" if opts.short_side is not None else
           "default (448 for patch-14 models, else 2x the input size)",
           "model_input": backbone.image_size}
    if opts.resize_pos:
        out["inference"] = ("whole image, sides rounded to whole patches, position embeddings "
                            "bicubically interpolated to the patch grid")
    else:
        out.update(inference="sliding window, logits averaged over overlaps, bilinear "
                   "(align_corners=False) to the original size", window=backbone.image_size,
                   window_stride_px=window_stride(backbone, opts))
    return out
