"""Resizing a ViT's learned position embeddings to another patch grid (numpy, host side): the
import's ``--allow_resize`` and the benchmarks' whole-image evaluation (``--resize_pos``) use it."""

from __future__ import annotations

import math

import numpy as np


def cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """``float64 [n_out, n_in]`` weights of PyTorch's ``interpolate(mode="bicubic",
    align_corners=False)`` (Keys cubic, a=-0.75, edge-clamped taps, no antialias); HF's
    ``interpolate_pos_encoding`` uses exactly this."""
    def k1(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def k2(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for j in range(n_out):
        src = (j + 0.5) * scale - 0.5
        i0 = math.floor(src)
        t = src - i0
        for off, w in zip((-1, 0, 1, 2), (k2(t + 1), k1(t), k1(1 - t), k2(2 - t)), strict=True):
            m[j, min(max(i0 + off, 0), n_in - 1)] += w
    return m


def resize(pos: np.ndarray, grid: tuple[int, int], prefix: int = 1) -> np.ndarray:
    """``pos [prefix + g*g, D]`` -> ``[prefix + gh*gw, D]`` (same dtype): bicubic on the patch
    grid, the ``prefix`` leading rows (CLIP's class slot; none in SigLIP) kept. ``ValueError``
    when the rows past ``prefix`` are not a square grid."""
    g = math.isqrt(max(pos.shape[0] - prefix, 0))
    if g * g != pos.shape[0] - prefix or g == 0:
        raise ValueError(f"positional embedding with {pos.shape[0]} rows is not a square grid "
                         f"after {prefix} leading rows")
    mh, mw = cubic_matrix(g, grid[0]), cubic_matrix(g, grid[1])
    x = pos[prefix:].reshape(g, g, -1).astype(np.float64)
    x = np.einsum("ij,jkd,lk->ild", mh, x, mw).reshape(grid[0] * grid[1], -1)
    return np.concatenate([pos[:prefix], x.astype(pos.dtype)], axis=0)
