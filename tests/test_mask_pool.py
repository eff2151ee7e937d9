"""Mask pooling on hand-made masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umg_jax.ops.mask_pool import mask_pool


def test_hand_made_masks():
    # 2x2 grid, E=2: cell (h, w) holds [h, w] + [10, 20] * (h * 2 + w).
    feats = np.zeros((1, 2, 2, 2), np.float32)
    for h in range(2):
        for w in range(2):
            feats[0, h, w] = [h + 10 * (2 * h + w), w + 20 * (2 * h + w)]
    area = np.zeros((1, 4, 2, 2), np.float32)
    area[0, 0, 0, 0] = 1.0  # one full cell -> that cell
    area[0, 1, 0, :] = [1.0, 0.5]  # cell (0,0) fully, (0,1) half -> (f00 + .5 f01) / 1.5
    area[0, 2] = 0.25  # a quarter of every cell -> plain mean of the cells
    # mask 3 is empty -> zeros
    got = np.asarray(mask_pool(jnp.asarray(feats), jnp.asarray(area)))[0]
    # cells: (0,0)=[0,0], (0,1)=[10,21], (1,0)=[21,40], (1,1)=[31,61]
    np.testing.assert_allclose(got[0], [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(got[1], [5.0 / 1.5, 10.5 / 1.5], atol=1e-5)
    np.testing.assert_allclose(got[2], [62 / 4, 122 / 4], atol=1e-5)
    np.testing.assert_array_equal(got[3], [0.0, 0.0])


def test_empty_mask_gradients_are_finite():
    feats = jnp.ones((1, 2, 2, 3))
    area = jnp.zeros((1, 2, 2, 2)).at[0, 0, 1, 1].set(0.3)
    g = jax.grad(lambda f, a: mask_pool(f, a).sum(), argnums=(0, 1))(feats, area)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)
    # only the one covered cell receives gradient, through the non-empty mask
    np.testing.assert_allclose(np.asarray(g[0])[0, :, :, 0], [[0, 0], [0, 1]], atol=1e-6)


def test_shape_errors():
    with pytest.raises(ValueError, match="does not match"):
        mask_pool(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 4, 3, 2)))
