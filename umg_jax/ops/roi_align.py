"""RoIAlign on a channels-last feature map, with torchvision's ``aligned=True`` semantics.

Bilinear sampling is separable: the value at ``(y, x)`` is ``sum_hw wy[h] wx[w] F[h, w]``. Each box
therefore becomes two small interpolation matrices (samples x grid rows, samples x grid columns)
and the whole op is two einsums: static shapes, no gathers, exact gradients w.r.t. the features.

Sampling rules (torchvision ``roi_align_kernel.cpp``, aligned=True): box corners are scaled to
feature-grid units and shifted by -0.5 (pixel centres); each of the ``output_size^2`` bins averages
``sampling_ratio^2`` regularly spaced samples; a sample with ``y < -1 or y > H`` (or likewise in x)
contributes 0 but still counts in the average; coordinates below 0 clamp to 0 and those at or past
the last row/column clamp to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _axis_weights(lo: jax.Array, hi: jax.Array, size: int, output_size: int,
                  sampling_ratio: int) -> jax.Array:
    """Interpolation weights along one axis.

    ``lo, hi [B, R]`` float32 box edges in grid units (already shifted by -0.5) ->
    ``[B, R, output_size * sampling_ratio, size]`` float32; row ``s`` holds the two bilinear
    weights of sample ``s`` (zeros for a sample outside ``[-1, size]``).
    """
    bin_len = (hi - lo) / output_size
    frac = (jnp.arange(output_size, dtype=jnp.float32)[:, None]
            + (jnp.arange(sampling_ratio, dtype=jnp.float32)[None, :] + 0.5) / sampling_ratio)
    c = lo[..., None] + bin_len[..., None] * frac.reshape(-1)  # [B, R, S]
    inside = (c >= -1.0) & (c <= size)
    c = jnp.maximum(c, 0.0)
    low = jnp.floor(c).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    high = jnp.where(at_end, size - 1, low + 1)
    c = jnp.where(at_end, low.astype(c.dtype), c)
    w_high = c - low
    w = (jax.nn.one_hot(low, size, dtype=c.dtype) * (1.0 - w_high)[..., None]
         + jax.nn.one_hot(high, size, dtype=c.dtype) * w_high[..., None])
    return w * inside[..., None].astype(c.dtype)


def _check(features: jax.Array, boxes: jax.Array, output_size: int, sampling_ratio: int) -> None:
    if features.ndim != 4:
        raise ValueError(f"features must be [B, gh, gw, E], got shape {features.shape}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"boxes must be [B, R, 4] with B={features.shape[0]}, got {boxes.shape}")
    if output_size < 1 or sampling_ratio < 1:
        raise ValueError(f"output_size ({output_size}) and sampling_ratio ({sampling_ratio}) must "
                         "be >= 1 (adaptive sampling would need dynamic shapes)")


def _weights(features: jax.Array, boxes: jax.Array, output_size: int,
             sampling_ratio: int) -> tuple[jax.Array, jax.Array]:
    _, gh, gw, _ = features.shape
    boxes = boxes.astype(jnp.float32)
    wy = _axis_weights(boxes[..., 1] * gh - 0.5, boxes[..., 3] * gh - 0.5, gh, output_size,
                       sampling_ratio)
    wx = _axis_weights(boxes[..., 0] * gw - 0.5, boxes[..., 2] * gw - 0.5, gw, output_size,
                       sampling_ratio)
    return wy.astype(features.dtype), wx.astype(features.dtype)


def roi_align(features: jax.Array, boxes: jax.Array, output_size: int,
              sampling_ratio: int) -> jax.Array:
    """RoIAlign (bilinear, aligned=True) of every box.

    Args:
      features: ``[B, gh, gw, E]`` feature map.
      boxes: ``[B, R, 4]`` float32 normalised ``(x0, y0, x1, y1)`` in ``[0, 1]`` of the image
        (``x * gw`` is the feature-grid coordinate, i.e. torchvision ``spatial_scale``).
      output_size: bins per side.
      sampling_ratio: samples per bin per side (fixed, ``>= 1``).

    Returns:
      ``[B, R, output_size, output_size, E]`` in the features' dtype.
    """
    _check(features, boxes, output_size, sampling_ratio)
    wy, wx = _weights(features, boxes, output_size, sampling_ratio)
    rows = jnp.einsum("brsh,bhwe->brswe", wy, features)
    samples = jnp.einsum("brtw,brswe->brste", wx, rows)  # [B, R, S, S, E]
    b, r, s, _, e = samples.shape
    samples = samples.reshape(b, r, output_size, sampling_ratio, output_size, sampling_ratio, e)
    return samples.mean(axis=(3, 5))


def roi_pool_embed(features: jax.Array, boxes: jax.Array, output_size: int,
                   sampling_ratio: int) -> jax.Array:
    """Mean over the ``output_size^2`` bins of :func:`roi_align`: ``[B, R, E]``.

    The mean over a full grid of separable samples is the product of the per-axis mean weights,
    so this never materialises the bins.
    """
    _check(features, boxes, output_size, sampling_ratio)
    wy, wx = _weights(features, boxes, output_size, sampling_ratio)
    rows = jnp.einsum("brh,bhwe->brwe", wy.mean(axis=2), features)
    return jnp.einsum("brw,brwe->bre", wx.mean(axis=2), rows)
