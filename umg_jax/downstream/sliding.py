"""Dense inference at benchmark resolution: per-pixel class logits of images of any size.

Sliding window (default): the image is resized so that its shorter side is ``short_side``, cut
into windows of the model's input size at ``window_stride`` x window (the last window of each row
and column flush with the border), the windows of many images batched through
:func:`common.encode_images`, each window's patch logits (dense embeddings x prompt-ensembled
label embeddings x the model's mask logit scale) upsampled bilinearly to window pixels,
overlapping logits averaged, and the map resized to the original image (mmsegmentation's
``slide`` inference).

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


def _slide(backbone: Any, jobs: Iterable[tuple[_Pending, list[tuple[int, int, np.ndarray]]]],
           bsz: int, window_out: Callable[[np.ndarray, jax.Array], np.ndarray]
           ) -> Iterator[np.ndarray]:
    """The sliding-window engine: ``jobs`` gives per image its accumulator and its windows
    ``(out_y, out_x, crop [S, S, 3])``; crops of consecutive images share batches of ``bsz``
    (padded at the end: one compiled encoder for every image size); ``window_out(crops [bsz, S,
    S, 3], dense [bsz, gh, gw, E]) -> [bsz, o, o, C]`` is added to the accumulator at ``(out_y,
    out_x)``; each image's ``finish(mean)`` is yielded in order once its windows are done."""
    pending: collections.deque[_Pending] = collections.deque()
    queue: list[tuple[_Pending, int, int, np.ndarray]] = []

    def run_batch(items):
        crops = np.stack([c for *_, c in items])
        if len(crops) < bsz:
            crops = np.concatenate([crops, np.zeros((bsz - len(crops), *crops.shape[1:]),
                                                    crops.dtype)])
        _, dense = common.encode_images(backbone, crops)
        out = window_out(crops, jnp.asarray(dense))
        for (st, y, x, _), o in zip(items, out, strict=False):
            st.acc[y:y + o.shape[0], x:x + o.shape[1]] += o
            st.count[y:y + o.shape[0], x:x + o.shape[1]] += 1
            st.remaining -= 1

    def finished():
        while pending and pending[0].remaining == 0:
            st = pending.popleft()
            yield st.finish(st.acc / st.count[..., None])

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


def _pixel_windows(backbone: Any, images: Iterable[np.ndarray], opts: Options, channels: int
                   ) -> Iterator[tuple[_Pending, list[tuple[int, int, np.ndarray]]]]:
    """Jobs of :func:`_slide` with outputs in pixels: each image resized to the shorter side,
    windows of the input size every ``window_stride``, the mean resized back to the image."""
    win = backbone.image_size
    short, stride = short_side(backbone, opts), window_stride(backbone, opts)
    for image in images:
        size = resized_size(image.shape[:2], short)
        x = prepare(image, size, backbone)
        ys, xs = window_starts(size[0], win, stride), window_starts(size[1], win, stride)
        st = _Pending(np.zeros((*size, channels), np.float32), np.zeros(size, np.float32),
                      len(ys) * len(xs), functools.partial(resize_bilinear, size=image.shape[:2]))
        yield st, [(y, xx, x[y:y + win, xx:xx + win]) for y in ys for xx in xs]


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
    probabilities when ``ensemble``; ``seen [C]``: labels of the head's training vocabulary),
    averaged over the windows covering each pixel and resized to the image (mmsegmentation's
    ``slide`` mode for Mask2Former). Windows, stride and resolution as :func:`sliding_logits`."""
    from umg_jax.evaluators import segmentation as se

    if opts.resize_pos:
        raise BenchmarkInputError("--resize_pos: the segmentation head runs on windows of its "
                                  "input size only")
    bb = segmenter.backbone
    win = bb.image_size
    scale = se.mask_logit_scale(bb)
    text = np.asarray(text, np.float32)

    def window_out(crops, dense):
        mask_prob, probs = se.head_predictions(
            lambda *a: segmenter.decode(segmenter.seg_params, *a), crops, np.asarray(dense),
            text, (win, win), seen, segmenter.config.seg, scale, ensemble=ensemble)
        p = probs["ensemble" if ensemble else "head"]
        return np.einsum("bnc,bnhw->bhwc", p[..., :-1], mask_prob)

    yield from _slide(bb, _pixel_windows(bb, images, opts, len(text)), max(1, opts.batch_size),
                      window_out)


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
