"""Patch-based reconstruction: a patch's lifting is the crop of the whole lifting, sliding
windows blend back exactly, and a patch model whose patch is the whole volume is the
whole-volume model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry, models
from xct.models import lifting, patches


@pytest.mark.parametrize("method", ["backproject", "expand"])
def test_lifting_a_patch_equals_the_crop_of_the_whole_lifting(method):
    d, p, fov = 16, 8, 320.0
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.uniform(0, 1, (2, 3, 12, 12, 2)).astype(np.float32))
    angles = jnp.asarray([[0.0, 70.0, 200.0], [15.0, 90.0, 300.0]])
    acq = geometry.Acquisition(12, fov, 1000.0, 1500.0, pixel_mm=500.0 / 12)
    kw = dict(method=method, acquisition=acq)
    whole = lifting.lift(feats, angles, size=d, fov_mm=fov, **kw)  # [B, V, d, d, d, C]
    offsets = np.array([[0, 3, 8], [5, 8, 1]])
    voxel = fov / d
    centre_xyz = ((offsets + (p - d) / 2.0) * voxel)[:, ::-1]
    part = lifting.lift(feats, angles, size=p, fov_mm=p * voxel, center_mm=centre_xyz, **kw)
    for b, (z, y, x) in enumerate(offsets):
        ref = whole[b, :, z : z + p, y : y + p, x : x + p]
        np.testing.assert_allclose(part[b], ref, atol=2e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("overlap", [0, 2, 5])
def test_sliding_window_blends_back_the_volume(overlap):
    d, p = 20, 8
    vol = jnp.asarray(np.random.default_rng(1).normal(size=(2, d, d, d)).astype(np.float32))
    out = jax.jit(
        lambda v: patches.sliding_window(lambda o: patches.crop(v, o, p), 2, d, p, overlap)
    )(vol)
    np.testing.assert_allclose(out, vol, atol=1e-5)
    starts = patches.window_starts(d, p, overlap)
    assert starts[0] == 0 and starts[-1] == d - p
    assert all(b - a <= p - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="overlap"):
        patches.window_starts(16, 8, 8)
    with pytest.raises(ValueError, match="patch"):
        patches.window_starts(16, 32, 0)
    with pytest.raises(ValueError, match="patch_size"):
        models.get_model("unet", acquisition=geometry.Acquisition(16), num_levels=3, patch_size=6)


def test_random_offsets_and_crop():
    offs = patches.random_offsets(jax.random.key(0), 64, 16, 8)
    assert offs.shape == (64, 3) and int(offs.min()) >= 0 and int(offs.max()) <= 8
    vol = jnp.arange(2 * 16**3, dtype=jnp.float32).reshape(2, 16, 16, 16)
    c = patches.crop(vol, jnp.asarray([[1, 2, 3], [8, 8, 8]]), 8)
    np.testing.assert_array_equal(c[0], vol[0, 1:9, 2:10, 3:11])
    np.testing.assert_array_equal(c[1], vol[1, 8:, 8:, 8:])


@pytest.mark.slow  # three U-Net compiles (minutes on 2 cores)
def test_patch_model_with_the_whole_volume_as_patch_is_the_whole_model():
    kw = dict(acquisition=geometry.Acquisition(16), base_features=4, num_levels=3)
    whole = models.get_model("unet", **kw)
    patch = models.get_model("unet", patch_size=16, **kw)
    drr = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (1, 2, 16, 16)), jnp.float32)
    angles = jnp.asarray([[0.0, 90.0]])
    params = whole.init(jax.random.key(0), drr, angles)["params"]
    a = whole.apply({"params": params}, drr, angles)["ct"]
    b = patch.apply({"params": params}, drr, angles, patch_offset=jnp.zeros((1, 3)))["ct"]
    np.testing.assert_allclose(b, a, atol=1e-5)
    half = models.get_model("unet", patch_size=8, **kw)
    c = half.apply({"params": params}, drr, angles, patch_offset=jnp.asarray([[4, 0, 8]]))["ct"]
    assert c.shape == (1, 8, 8, 8)
