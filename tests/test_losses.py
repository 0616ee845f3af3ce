"""Tests for xct.losses: values at identity, hand-computed values, projection consistency."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry, losses, physics

RES = 16
FOV_MM = 160.0
SOD_MM = 1000.0
SDD_MM = 1500.0
# The whole cube's inscribed cylinder on the detector (as data_pipelines.common.ViewSpec).
PIXEL_MM = 2.0 * (FOV_MM / 2) * SDD_MM / (SOD_MM - FOV_MM / 2) / RES


def _volumes(seed: int, shape=(2, 12, 12, 12)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.random(shape).astype(np.float32)
    pred = np.clip(target + 0.1 * rng.standard_normal(shape), 0.0, 1.0).astype(np.float32)
    return pred, target


# ------------------------------------------------------------------------------------------
# Voxel losses


@pytest.mark.parametrize(
    "loss", [losses.l1, losses.mse, losses.ssim_loss, losses.gradient_loss, losses.frequency_loss]
)
def test_voxel_losses_zero_at_identity_positive_otherwise(loss):
    pred, target = _volumes(0)
    fn = jax.jit(loss)
    same = np.asarray(fn(target, target))
    assert same.shape == (2,)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    diff = np.asarray(fn(pred, target))
    assert diff.shape == (2,) and np.all(diff > 1e-4)
    grad_fn = jax.jit(jax.grad(lambda p, t: jnp.sum(loss(p, t))))
    assert np.all(np.isfinite(np.asarray(grad_fn(pred, target))))
    # Also at identity and on a constant volume (zero Fourier magnitudes, zero variances).
    assert np.all(np.isfinite(np.asarray(grad_fn(target, target))))
    flat = np.full_like(target, 0.25)
    assert np.all(np.isfinite(np.asarray(grad_fn(flat, flat))))


def test_l1_mse_numpy():
    pred, target = _volumes(1, (3, 4, 5, 6))
    np.testing.assert_allclose(
        jax.jit(losses.l1)(pred, target), np.abs(pred - target).mean(axis=(1, 2, 3)), rtol=1e-6
    )
    np.testing.assert_allclose(
        jax.jit(losses.mse)(pred, target), ((pred - target) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5
    )


def test_gradient_loss_numpy_and_offset_invariance():
    pred, target = _volumes(2, (2, 5, 6, 7))
    e = pred.astype(np.float64) - target
    expected = sum(np.abs(np.diff(e, axis=a)).mean(axis=(1, 2, 3)) for a in (1, 2, 3)) / 3
    np.testing.assert_allclose(jax.jit(losses.gradient_loss)(pred, target), expected, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(losses.gradient_loss)(target + 0.3, target), 0.0, atol=1e-6)


def test_frequency_loss_numpy():
    pred, target = _volumes(3, (2, 6, 6, 6))
    fp = np.abs(np.fft.fftn(pred.astype(np.float64), axes=(1, 2, 3), norm="ortho"))
    ft = np.abs(np.fft.fftn(target.astype(np.float64), axes=(1, 2, 3), norm="ortho"))
    expected = np.abs(fp - ft).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(jax.jit(losses.frequency_loss)(pred, target), expected, rtol=1e-4)
    # Phase-blind: a circular shift costs nothing.
    shifted = np.roll(target, 2, axis=2)
    np.testing.assert_allclose(jax.jit(losses.frequency_loss)(shifted, target), 0.0, atol=1e-5)


def test_ssim_loss_is_one_minus_ssim():
    from xct import metrics

    pred, target = _volumes(4)
    np.testing.assert_allclose(
        jax.jit(losses.ssim_loss)(pred, target),
        1.0 - np.asarray(metrics.ssim3d(pred, target)),
        atol=1e-6,
    )


# ------------------------------------------------------------------------------------------
# Projection consistency


ANGLES = np.array([[0.0, 90.0], [30.0, 145.0]], np.float32)
GRID = geometry.VolumeGrid.centered((RES,) * 3, FOV_MM / RES)


@jax.jit
def _render(ct: jax.Array, geom: geometry.Geometry) -> jax.Array:
    """Normalised DRRs of one normalised CT, the way datasets make them (render_drrs)."""
    return physics.normalize_drr(physics.render_drrs(physics.denormalize_ct(ct), GRID, geom))


def _geom(angles) -> geometry.Geometry:
    return geometry.circular_cone_beam(
        angles, sod_mm=SOD_MM, sdd_mm=SDD_MM, det_shape=(RES, RES), pixel_mm=PIXEL_MM
    )


@pytest.fixture(scope="module")
def ct_and_drrs() -> tuple[np.ndarray, np.ndarray]:
    """Normalised CTs ``[2, R, R, R]`` (a water ball with a bone insert, in air) and their
    normalised DRRs ``[2, 2, R, R]`` at ``ANGLES``, rendered with ``physics.render_drrs``."""
    c = GRID.voxel_centers_xyz_mm()
    r = np.linalg.norm(c, axis=-1)
    cts, drrs = [], []
    for b in range(ANGLES.shape[0]):
        hu = np.where(r < 55.0 - 10.0 * b, 0.0, -1024.0)
        hu = np.where(np.linalg.norm(c - np.array([15.0, 0.0, 10.0]), axis=-1) < 15.0, 900.0, hu)
        ct = np.asarray(physics.normalize_ct(hu))
        cts.append(ct)
        drrs.append(np.asarray(_render(ct, _geom(ANGLES[b]))))
    return np.stack(cts), np.stack(drrs)


_PC = functools.partial(
    losses.projection_consistency,
    acquisition=geometry.Acquisition(RES, FOV_MM, SOD_MM, SDD_MM, PIXEL_MM),
)


def test_projection_consistency_zero_for_own_rendering_positive_otherwise(ct_and_drrs):
    ct, drr = ct_and_drrs
    assert drr.max() > 0.1  # the DRRs see the object (line integrals > 1)
    fn = jax.jit(_PC)
    exact = np.asarray(fn(ct, drr, ANGLES))
    assert exact.shape == (2,)
    np.testing.assert_allclose(exact, 0.0, atol=1e-5)

    perturbed = ct.copy()
    perturbed[:, 6:10, 6:10, 6:10] += 0.05  # +205 HU in a small cube
    bad = np.asarray(fn(perturbed, drr, ANGLES))
    assert np.all(bad > 1e-4)
    # Wrong angles are inconsistent too.
    assert np.all(np.asarray(fn(ct, drr, ANGLES + 20.0)) > 1e-3)

    grad = jax.jit(jax.grad(lambda x: jnp.sum(_PC(x, drr, ANGLES))))(jnp.asarray(perturbed))
    g = np.asarray(grad)
    assert g.shape == perturbed.shape and np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # The rendering is affine in the CT (the cube lies in water: no clipping of mu at 0), so
    # L(ct + t delta) = t L(ct + delta) and d/dt at t = 1 is <g, delta> = L(perturbed).
    delta = (perturbed - ct).reshape(2, -1)
    np.testing.assert_allclose(np.sum(g.reshape(2, -1) * delta, axis=1), bad, rtol=1e-3)


def test_projection_consistency_extra_views(ct_and_drrs):
    ct, drr = ct_and_drrs
    key = jax.random.key(0)
    fn = jax.jit(functools.partial(_PC, extra_views=3))
    np.testing.assert_allclose(fn(ct, drr, ANGLES, target_ct=ct, key=key), 0.0, atol=1e-5)

    # A prediction that explains the input views exactly but differs from the true CT
    # elsewhere is caught only by the extra views.
    other = ct.copy()
    other[:, 6:10, 6:10, 6:10] += 0.05
    extra = np.asarray(fn(ct, drr, ANGLES, target_ct=other, key=key))
    assert np.all(extra > 1e-4)
    # Every view weighs the same: 2 input views with zero error and 3 extra views at the
    # documented angles, uniform(key, [B, 3], 0, 360) degrees.
    extra_angles = np.asarray(jax.random.uniform(key, (2, 3), jnp.float32, 0.0, 360.0))
    per_view = [
        np.abs(np.asarray(_render(ct[b], g) - _render(other[b], g))).mean()
        for b, g in enumerate(_geom(a) for a in extra_angles)
    ]
    np.testing.assert_allclose(extra, 3.0 / 5.0 * np.array(per_view), rtol=1e-3, atol=1e-7)

    # Gradient flows to the prediction only, never into the true CT.
    g_pred, g_tgt = jax.jit(
        jax.grad(lambda p, t: jnp.sum(fn(p, drr, ANGLES, target_ct=t, key=key)), argnums=(0, 1))
    )(jnp.asarray(ct), jnp.asarray(other))
    assert np.all(np.isfinite(np.asarray(g_pred))) and np.abs(np.asarray(g_pred)).max() > 0
    assert np.all(np.asarray(g_tgt) == 0.0)

    with pytest.raises(ValueError, match="target_ct"):
        _PC(ct, drr, ANGLES, extra_views=2, key=key)
    with pytest.raises(ValueError, match="key"):
        _PC(ct, drr, ANGLES, extra_views=2, target_ct=ct)


def test_projection_consistency_bad_shapes():
    ct = np.zeros((1, RES, RES, RES), np.float32)
    drr = np.zeros((1, 2, RES, RES), np.float32)
    with pytest.raises(ValueError, match="angles_deg"):
        _PC(ct, drr, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="pred_ct"):
        _PC(ct[:, :4], drr, np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="pred_ct"):  # not the acquisition's cube
        _PC(ct[:, :8, :8, :8], drr, np.zeros((1, 2), np.float32))


# ------------------------------------------------------------------------------------------
# GAN losses


def test_gan_losses_known_logits():
    # Two examples of 2x2 patch logits (a PatchGAN map with a channel axis).
    real = jnp.array([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 2.0], [-1.0, 3.0]]])[..., None]
    fake = jnp.array([[[0.0, 0.0], [0.0, 0.0]], [[1.0, -1.0], [-2.0, 0.5]]])[..., None]

    np.testing.assert_allclose(jax.jit(losses.lsgan_generator)(fake), [1.0, (0 + 4 + 9 + 0.25) / 4])
    np.testing.assert_allclose(
        jax.jit(losses.lsgan_discriminator)(real, fake),
        [0.5 * (0.0 + 0.0), 0.5 * ((1 + 1 + 4 + 4) / 4 + (1 + 1 + 4 + 0.25) / 4)],
    )
    np.testing.assert_allclose(jax.jit(losses.hinge_generator)(fake), [0.0, -(1 - 1 - 2 + 0.5) / 4])
    # relu(1 - real): [0,0,0,0], [1,0,2,0]; relu(1 + fake): [1,1,1,1], [2,0,0,1.5].
    np.testing.assert_allclose(
        jax.jit(losses.hinge_discriminator)(real, fake), [0.0 + 1.0, 3 / 4 + 3.5 / 4]
    )


def test_feature_matching():
    real = [jnp.ones((2, 4, 4, 3)), jnp.zeros((2, 2, 2, 2, 5))]
    fake = [jnp.ones((2, 4, 4, 3)).at[1].set(3.0), jnp.zeros((2, 2, 2, 2, 5)).at[0].set(-1.0)]
    out = jax.jit(losses.feature_matching)(real, fake)
    np.testing.assert_allclose(out, [(0.0 + 1.0) / 2, (2.0 + 0.0) / 2])
    np.testing.assert_allclose(jax.jit(losses.feature_matching)(real, real), [0.0, 0.0])
    # Real features are targets: no gradient flows into them.
    g_real = jax.jit(jax.grad(lambda r: jnp.sum(losses.feature_matching(r, fake))))(real)
    assert all(np.all(np.asarray(g) == 0.0) for g in g_real)
    with pytest.raises(ValueError, match="equally many"):
        losses.feature_matching(real, fake[:1])


# ------------------------------------------------------------------------------------------
# Combination


def test_total_generator_loss_weighting():
    terms = {"l1": jnp.array([1.0, 3.0]), "ssim": jnp.array([0.5, 0.5]), "adv": jnp.array([9.0])}
    weights = {"l1": 10.0, "ssim": 2.0, "adv": 0.0, "projection": 0.0}
    total, logs = losses.total_generator_loss(terms, weights)
    np.testing.assert_allclose(total, 10.0 * 2.0 + 2.0 * 0.5)
    assert set(logs) == {"l1", "ssim"}
    np.testing.assert_allclose(logs["l1"], 2.0)
    np.testing.assert_allclose(logs["ssim"], 0.5)

    jitted = jax.jit(lambda t: losses.total_generator_loss(t, weights))
    total_j, logs_j = jitted(terms)
    np.testing.assert_allclose(total_j, 21.0)
    np.testing.assert_allclose(logs_j["l1"], 2.0)


def test_total_generator_loss_unknown_names():
    terms = {"l1": jnp.ones((2,))}
    with pytest.raises(ValueError, match="unknown terms \\['ssmi'\\]"):
        losses.total_generator_loss(terms, {"l1": 1.0, "ssmi": 0.5})
    with pytest.raises(ValueError, match="without a weight \\['l1'\\]"):
        losses.total_generator_loss(terms, {"ssim": 0.0})
    with pytest.raises(ValueError, match="per-example"):
        losses.total_generator_loss({"l1": jnp.ones((2, 3))}, {"l1": 1.0})
