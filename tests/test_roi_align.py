"""RoIAlign vs torchvision, an independent loop of torchvision's C++ kernel, and hand-computed
values at the borders.

torchvision's compiled ops cannot load here, so ``torchvision.ops.roi_align`` runs its pure-PyTorch
fallback ``_roi_align``. That fallback clamps samples lying beyond the map (``y < -1`` or
``y > H``) instead of zeroing them as the C++/CUDA kernel does, so it is used only for boxes
inside the image (which still exercises the clamping at the borders); boxes hanging out of the
image are checked against ``_loop_roi_align`` below (a transcription of ``roi_align_kernel.cpp``)
and hand-computed cases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umg_jax.ops.roi_align import roi_align, roi_pool_embed


def _tv_roi_align(torch, feats, boxes, out, sr):
    """torchvision.ops.roi_align on our layout: NHWC features, normalised per-image boxes."""
    from torchvision.ops import roi_align as tv_roi_align

    b, gh, gw, _ = feats.shape
    x = torch.tensor(np.transpose(feats, (0, 3, 1, 2)), requires_grad=True)
    scale = np.array([gw, gh, gw, gh], np.float32)
    rois = np.concatenate([np.repeat(np.arange(b), boxes.shape[1])[:, None].astype(np.float32),
                           boxes.reshape(-1, 4) * scale], axis=1)
    y = tv_roi_align(x, torch.tensor(rois), output_size=out, spatial_scale=1.0,
                     sampling_ratio=sr, aligned=True)  # [B*R, E, out, out]
    return x, y


def _loop_roi_align(feats, boxes, out, sr):
    """torchvision ``roi_align_forward_kernel_impl`` (aligned=True) as plain loops; NHWC."""
    b, gh, gw, e = feats.shape
    res = np.zeros((b, boxes.shape[1], out, out, e), np.float64)

    def bilinear(f, y, x):
        if y < -1.0 or y > gh or x < -1.0 or x > gw:
            return np.zeros(e)
        y, x = max(y, 0.0), max(x, 0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= gh - 1:
            y_high = y_low = gh - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= gw - 1:
            x_high = x_low = gw - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1.0 - ly, 1.0 - lx
        return (hy * hx * f[y_low, x_low] + hy * lx * f[y_low, x_high]
                + ly * hx * f[y_high, x_low] + ly * lx * f[y_high, x_high])

    for i in range(b):
        for j in range(boxes.shape[1]):
            x0, y0, x1, y1 = boxes[i, j] * [gw, gh, gw, gh] - 0.5
            bh, bw = (y1 - y0) / out, (x1 - x0) / out
            for ph in range(out):
                for pw in range(out):
                    acc = np.zeros(e)
                    for iy in range(sr):
                        y = y0 + ph * bh + (iy + 0.5) * bh / sr
                        for ix in range(sr):
                            x = x0 + pw * bw + (ix + 0.5) * bw / sr
                            acc += bilinear(feats[i].astype(np.float64), y, x)
                    res[i, j, ph, pw] = acc / (sr * sr)
    return res


@pytest.mark.parametrize("out,sr", [(1, 1), (2, 2), (3, 3)])
def test_matches_kernel_loop_incl_outside_boxes(out, sr):
    rng = np.random.default_rng(out)
    feats = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    boxes = _boxes(rng, 2, 6)
    got = np.asarray(roi_align(jnp.asarray(feats), jnp.asarray(boxes), out, sr))
    np.testing.assert_allclose(got, _loop_roi_align(feats, boxes, out, sr), atol=1e-5)


def _boxes(rng, b, r):
    xy = rng.uniform(-0.3, 1.1, size=(b, r, 2))
    wh = rng.uniform(0.05, 0.8, size=(b, r, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    boxes[0, 0] = [0, 0, 1, 1]  # whole image
    boxes[0, 1] = [0.9, 0.9, 1.0, 1.0]  # bottom-right corner
    boxes[1, 0] = [-0.5, -0.5, 0.1, 0.1]  # hanging out top-left
    boxes[1, 1] = [1.05, 0.2, 1.4, 0.6]  # entirely outside on the right
    return boxes


@pytest.mark.parametrize("out,sr", [(1, 1), (2, 2), (3, 2)])
def test_matches_torchvision_values_and_grads(torch_mod, out, sr):
    torch = torch_mod
    rng = np.random.default_rng(out * 10 + sr)
    b, gh, gw, e, r = 2, 5, 7, 3, 6
    feats = rng.normal(size=(b, gh, gw, e)).astype(np.float32)
    boxes = np.clip(_boxes(rng, b, r), 0.0, 1.0)  # inside the image (see module docstring)
    boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 0.01)
    x, y = _tv_roi_align(torch, feats, boxes, out, sr)
    ours = np.asarray(roi_align(jnp.asarray(feats), jnp.asarray(boxes), out, sr))
    ref = y.detach().numpy().reshape(b, r, e, out, out).transpose(0, 1, 3, 4, 2)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)

    cot = rng.normal(size=ref.shape).astype(np.float32)
    tcot = torch.tensor(cot.transpose(0, 1, 4, 2, 3).reshape(b * r, e, out, out))
    (y * tcot).sum().backward()
    g_ref = x.grad.numpy().transpose(0, 2, 3, 1)
    g = jax.grad(lambda f: jnp.sum(roi_align(f, jnp.asarray(boxes), out, sr) * cot))(
        jnp.asarray(feats))
    np.testing.assert_allclose(np.asarray(g), g_ref, atol=1e-5, rtol=1e-5)


def test_hand_computed_border_cases():
    # F[h, w] = 10 h + w is linear, so bilinear samples are exact wherever they are clamped-in.
    gh = gw = 4
    f = (10 * np.arange(gh)[:, None] + np.arange(gw)[None, :]).astype(np.float32)
    feats = jnp.asarray(f[None, :, :, None])
    boxes = jnp.asarray([[
        [0.0, 0.0, 1.0, 1.0],  # x, y samples at 0.5, 2.5 -> mean 1.5 -> 16.5
        [0.0, 0.0, 0.25, 0.25],  # samples -0.25 (clamped to 0), 0.25 -> mean .125 -> 1.375
        [0.75, 0.75, 1.0, 1.0],  # samples 2.75, 3.25 (clamped to 3) -> 2.875 -> 31.625
        [1.2, 1.2, 1.5, 1.5],  # every sample beyond the map -> 0
    ]], jnp.float32)
    got = np.asarray(roi_align(feats, boxes, 1, 2))[0, :, 0, 0, 0]
    np.testing.assert_allclose(got, [16.5, 1.375, 31.625, 0.0], atol=1e-6)
    # sr=4, x in grid units -1.5..0.5: samples -1.25 (outside -> 0 but counted), -0.75, -0.25
    # (clamped to 0), 0.25; y -0.5..0.5: samples clamp to 0, 0, .125, .375.
    # sum over the 12 in-range samples of (10 y + x) / 16 = (3 * 10 * 0.5 + 4 * 0.25) / 16 = 1.
    got = np.asarray(roi_align(feats, jnp.asarray([[[-0.25, 0.0, 0.25, 0.25]]]), 1, 4))
    np.testing.assert_allclose(got.reshape(()), 1.0, atol=1e-6)


def test_pool_embed_is_mean_of_bins():
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(2, 6, 6, 4)).astype(np.float32))
    boxes = jnp.asarray(_boxes(rng, 2, 5))
    full = roi_align(feats, boxes, 3, 2).mean(axis=(2, 3))
    np.testing.assert_allclose(np.asarray(roi_pool_embed(feats, boxes, 3, 2)), np.asarray(full),
                               atol=1e-6)


def test_bad_input():
    f = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match="boxes must be"):
        roi_align(f, jnp.zeros((2, 5, 3)), 2, 2)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_pool_embed(f, jnp.zeros((2, 5, 4)), 2, 0)
