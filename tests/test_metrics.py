"""Tests for xct.metrics: scikit-image as the peer, plus hand-computed small cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import metrics


@pytest.fixture(scope="module")
def skm():
    """scikit-image's metrics (a dev/test dependency); only the peer comparisons need it."""
    return pytest.importorskip("skimage.metrics")


def _random_pair(seed: int, shape, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A target in [0, 1] with smooth structure and a noisy, clipped prediction."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in shape[1:]], indexing="ij")
    smooth = 0.5 + 0.3 * np.sin(6.0 * x + 2.0 * y) * np.cos(4.0 * z)
    target = np.clip(smooth[None] + 0.1 * rng.random(shape), 0.0, 1.0)
    pred = np.clip(target + noise * rng.standard_normal(shape), 0.0, 1.0)
    return pred.astype(np.float32), target.astype(np.float32)


def _sk_ssim(skm, pred: np.ndarray, target: np.ndarray, full: bool = False):
    return skm.structural_similarity(
        pred.astype(np.float64),
        target.astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=full,
    )


# ------------------------------------------------------------------------------------------
# Against scikit-image


@pytest.mark.parametrize("shape", [(2, 16, 16, 16), (1, 12, 17, 20)])
def test_ssim3d_matches_skimage(skm, shape):
    pred, target = _random_pair(0, shape)
    ours = np.asarray(jax.jit(metrics.ssim3d)(pred, target))
    assert ours.shape == (shape[0],)
    ref = np.array([_sk_ssim(skm, pred[b], target[b]) for b in range(shape[0])])
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_ssim3d_map_matches_skimage_interior(skm):
    # scikit-image filters with reflective padding over the whole volume and crops
    # r = int(3.5 * 1.5 + 0.5) = 5 voxels per side before averaging. Its cropped map must
    # equal our valid map voxel by voxel (the padding never reaches those voxels).
    pred, target = _random_pair(1, (1, 16, 18, 20), noise=0.05)
    ours = np.asarray(jax.jit(metrics.ssim3d_map)(pred, target))
    _, full_map = _sk_ssim(skm, pred[0], target[0], full=True)
    r = 5
    interior = full_map[r:-r, r:-r, r:-r]
    assert ours.shape == (1, *interior.shape) == (1, 6, 8, 10)
    np.testing.assert_allclose(ours[0], interior, rtol=1e-4, atol=1e-5)
    # And the border voxels, where skimage's reflection enters, are not part of either mean.
    np.testing.assert_allclose(ours.mean(), interior.mean(), rtol=1e-5)


def test_ssim3d_flat_regions_no_cancellation(skm):
    # Nearly flat volumes: tiny variances next to a large mean (float32 cancellation risk).
    rng = np.random.default_rng(2)
    target = (0.7 + 1e-3 * rng.standard_normal((1, 14, 14, 14))).astype(np.float32)
    pred = (target + 5e-4 * rng.standard_normal(target.shape)).astype(np.float32)
    ours = float(jax.jit(metrics.ssim3d)(pred, target)[0])
    ref = _sk_ssim(skm, pred[0], target[0])
    assert 1e-4 < 1.0 - ref < 1e-3
    np.testing.assert_allclose(1.0 - ours, 1.0 - ref, rtol=1e-2)  # the small deficit itself


def test_psnr_matches_skimage(skm):
    pred, target = _random_pair(3, (3, 10, 12, 8))
    ours = np.asarray(jax.jit(metrics.psnr)(pred, target))
    ref = [skm.peak_signal_noise_ratio(target[b], pred[b], data_range=1.0) for b in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_volume_metrics_matches_skimage_in_primary_window(skm):
    rng = np.random.default_rng(4)
    target_hu = rng.uniform(-1200.0, 1500.0, (2, 16, 16, 16)).astype(np.float32)
    pred_hu = (target_hu + rng.normal(0.0, 80.0, target_hu.shape)).astype(np.float32)
    out = jax.jit(metrics.volume_metrics)(pred_hu, target_hu)
    assert set(out) == {"psnr", "ssim", "mae_hu", "rmse_hu"}
    assert all(v.shape == (2,) for v in out.values())
    win = lambda h: (np.clip(h.astype(np.float64), -1000, 1024) + 1000) / 2024  # noqa: E731
    wp, wt = win(pred_hu), win(target_hu)
    for b in range(2):
        np.testing.assert_allclose(
            out["psnr"][b], skm.peak_signal_noise_ratio(wt[b], wp[b], data_range=1.0), rtol=1e-5
        )
        np.testing.assert_allclose(out["ssim"][b], _sk_ssim(skm, wp[b], wt[b]), rtol=1e-4)
        err = (wp[b] - wt[b]) * 2024.0
        np.testing.assert_allclose(out["mae_hu"][b], np.abs(err).mean(), rtol=1e-4)
        np.testing.assert_allclose(out["rmse_hu"][b], np.sqrt((err**2).mean()), rtol=1e-4)


# ------------------------------------------------------------------------------------------
# Hand-computed cases


def test_hu_window_values():
    hu = jnp.array([[-3000.0, -1000.0, 12.0, 1024.0, 3000.0]])
    out = np.asarray(jax.jit(metrics.hu_window)(hu))
    np.testing.assert_allclose(out, [[0.0, 0.0, 1012.0 / 2024.0, 1.0, 1.0]], rtol=1e-6)


def test_identical_volumes():
    pred, _ = _random_pair(5, (2, 12, 12, 12))
    s = np.asarray(jax.jit(metrics.ssim3d)(pred, pred))
    np.testing.assert_allclose(s, 1.0, atol=1e-6)
    p = np.asarray(jax.jit(metrics.psnr)(pred, pred))
    assert np.all(np.isposinf(p))  # documented: no cap, like scikit-image
    assert np.all(np.asarray(jax.jit(metrics.mae_hu)(pred, pred)) == 0.0)
    assert np.all(np.asarray(jax.jit(metrics.rmse_hu)(pred, pred)) == 0.0)


@pytest.mark.parametrize("offset", [0.1, 0.01])
def test_psnr_constant_offset(offset):
    target = np.random.default_rng(6).random((2, 8, 8, 8)).astype(np.float32)
    out = np.asarray(jax.jit(metrics.psnr)(target + offset, target))
    np.testing.assert_allclose(out, -20.0 * np.log10(offset), rtol=1e-4)  # 20 dB, 40 dB
    # data_range scales as 20 log10(R).
    out2 = np.asarray(jax.jit(metrics.psnr)(2.0 * (target + offset), 2.0 * target, 2.0))
    np.testing.assert_allclose(out2, out, rtol=1e-4)


def test_ssim_constant_offset_closed_form():
    # pred = target + c: covariances equal the variances, only the luminance term moves:
    # SSIM = (2 mu (mu + c) + C1) / (mu^2 + (mu + c)^2 + C1) for a constant target mu.
    mu, c = 0.4, 0.2
    target = np.full((1, 11, 11, 11), mu, np.float32)
    out = float(jax.jit(metrics.ssim3d)(target + c, target)[0])
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * mu * (mu + c) + c1) / (mu**2 + (mu + c) ** 2 + c1)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_mae_rmse_hand():
    target = np.zeros((2, 2, 2, 2), np.float32)
    pred = target.copy()
    pred[0, 0, 0, 0] = 80.0  # one voxel of eight off by 80 HU
    pred[1] = -10.0  # all off by 10 HU
    np.testing.assert_allclose(jax.jit(metrics.mae_hu)(pred, target), [10.0, 10.0])
    np.testing.assert_allclose(
        jax.jit(metrics.rmse_hu)(pred, target), [np.sqrt(6400.0 / 8.0), 10.0], rtol=1e-6
    )


def test_masked_variants():
    rng = np.random.default_rng(7)
    target = rng.random((2, 8, 8, 8)).astype(np.float32)
    pred = target.copy()
    mask = np.zeros(target.shape, bool)
    mask[:, 2:6, 2:6, 2:6] = True
    pred[mask] += 0.1  # error inside the body only
    pred[~mask] += 0.5 * rng.standard_normal(int((~mask).sum())).astype(np.float32)
    p = np.asarray(jax.jit(metrics.psnr_masked)(pred, target, mask))
    np.testing.assert_allclose(p, 20.0, rtol=1e-4)
    m = np.asarray(jax.jit(metrics.mae_hu_masked)(pred * 2024, target * 2024, mask))
    np.testing.assert_allclose(m, 0.1 * 2024, rtol=1e-4)
    # An all-true mask reproduces the unmasked metrics.
    full = np.ones_like(mask)
    np.testing.assert_allclose(
        jax.jit(metrics.psnr_masked)(pred, target, full), metrics.psnr(pred, target), rtol=1e-6
    )
    np.testing.assert_allclose(
        jax.jit(metrics.mae_hu_masked)(pred, target, full),
        metrics.mae_hu(pred, target),
        rtol=1e-6,
    )


def test_drr_psnr():
    target = np.random.default_rng(8).random((2, 3, 8, 8)).astype(np.float32) * 0.8
    fn = jax.jit(functools.partial(metrics.drr_psnr, data_range=0.8))
    np.testing.assert_allclose(fn(target + 0.008, target), 40.0, rtol=1e-4)  # 1% of the range
    with pytest.raises(ValueError, match="views, rows, cols"):
        metrics.drr_psnr(target[:, 0], target[:, 0], 1.0)


def test_bad_inputs():
    a = np.zeros((1, 8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="does not match"):
        metrics.psnr(a, a[:, :4])
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim3d(a, a)  # 8 < 11-voxel window
    with pytest.raises(ValueError, match="mask shape"):
        metrics.psnr_masked(a, a, np.ones((8, 8, 8), bool))
