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


# ------------------------------------------------------------------------------------------
# Body-mask variants of the primary definition


def test_ssim3d_masked_matches_skimage_map(skm):
    pred, target = _random_pair(9, (1, 16, 16, 16), noise=0.05)
    mask = np.zeros(pred.shape, bool)
    mask[:, 3:12, 4:14, 2:9] = True
    ours = float(jax.jit(metrics.ssim3d_masked)(pred, target, mask)[0])
    _, full_map = _sk_ssim(skm, pred[0], target[0], full=True)
    r = 5
    crop = (slice(r, -r),) * 3
    ref = full_map[crop][mask[0][crop]].mean()
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    # All-true mask: plain ssim3d. Mask outside the valid region only: nan (empty).
    full = np.ones_like(mask)
    np.testing.assert_allclose(
        metrics.ssim3d_masked(pred, target, full), metrics.ssim3d(pred, target), rtol=1e-6
    )
    edge = np.zeros_like(mask)
    edge[:, :2] = True
    assert np.isnan(np.asarray(metrics.ssim3d_masked(pred, target, edge))).all()


def test_volume_metrics_with_mask(skm):
    rng = np.random.default_rng(10)
    target_hu = rng.uniform(-1000.0, 1000.0, (2, 16, 16, 16)).astype(np.float32)
    pred_hu = (target_hu + rng.normal(0.0, 50.0, target_hu.shape)).astype(np.float32)
    mask = np.zeros(target_hu.shape, bool)
    mask[:, 2:14, 3:13, 4:12] = True
    pred_hu[~mask] += 300.0  # large errors outside the body do not reach the *_mask metrics
    out = jax.jit(metrics.volume_metrics)(pred_hu, target_hu, mask)
    assert set(out) == {
        "psnr",
        "ssim",
        "mae_hu",
        "rmse_hu",
        "psnr_mask",
        "ssim_mask",
        "mae_hu_mask",
        "rmse_hu_mask",
    }
    win = lambda h: (np.clip(h.astype(np.float64), -1000, 1024) + 1000) / 2024  # noqa: E731
    wp, wt = win(pred_hu), win(target_hu)
    for b in range(2):
        e = (wp[b] - wt[b])[mask[b]]
        np.testing.assert_allclose(out["mae_hu_mask"][b], 2024 * np.abs(e).mean(), rtol=1e-4)
        np.testing.assert_allclose(out["rmse_hu_mask"][b], 2024 * np.sqrt((e**2).mean()), rtol=1e-4)
        np.testing.assert_allclose(out["psnr_mask"][b], -10 * np.log10((e**2).mean()), rtol=1e-5)
        _, smap = _sk_ssim(skm, wp[b], wt[b], full=True)
        crop = (slice(5, -5),) * 3
        np.testing.assert_allclose(out["ssim_mask"][b], smap[crop][mask[b][crop]].mean(), rtol=1e-4)
    assert np.all(np.asarray(out["psnr_mask"]) > np.asarray(out["psnr"]))
    # Without a mask the primary keys are unchanged.
    assert set(metrics.volume_metrics(pred_hu, target_hu)) == {"psnr", "ssim", "mae_hu", "rmse_hu"}


# ------------------------------------------------------------------------------------------
# X2CT-GAN compatibility: an independent NumPy/scikit-image transcription of
# kylekma/X2CT 3DGAN/test.py + lib/utils/metrics_np.py (written from its description).


def _x2ct_reference(skm, pred_hu: np.ndarray, target_hu: np.ndarray) -> dict:
    # test.py: CT in [0, 1] = clip(HU + 1024, 0, 2500) / 2500 (float32 tensors); the
    # generated CT is clipped to [0, 1].
    real = (np.clip(target_hu.astype(np.float32) + 1024, 0, 2500) / np.float32(2500)).astype(
        np.float32
    )
    fake = np.clip(
        (np.clip(pred_hu.astype(np.float32) + 1024, 0, 2500) / np.float32(2500)).astype(np.float32),
        0,
        1,
    )

    # SSIM on [0, 1]: compare_ssim(data_range=1, multichannel=True) = per-slice 2D SSIM
    # with the default 7x7 uniform window and sample covariance, mean over the last axis.
    def ssim_axis(axes):
        return np.array(
            [
                skm.structural_similarity(
                    np.transpose(real[b], axes).astype(np.float64),
                    np.transpose(fake[b], axes).astype(np.float64),
                    data_range=1.0,
                    channel_axis=-1,
                )
                for b in range(real.shape[0])
            ]
        )

    # [B, D, H, W]: "depth" transposes to (H, W, D), "height" to (D, W, H), "width" none.
    ssim_d, ssim_h, ssim_w = ssim_axis((1, 2, 0)), ssim_axis((0, 2, 1)), ssim_axis((0, 1, 2))
    # PSNR on trunc(x * 2500) with peak 4095; zero-MSE slices count 100 dB.
    qr = (real * np.float32(2500)).astype(np.int32).astype(np.float64)
    qf = (fake * np.float32(2500)).astype(np.int32).astype(np.float64)
    se = (qr - qf) ** 2

    def slice_psnr(axes):
        mse = se.mean(axis=axes)
        out = np.full(mse.shape, 100.0)
        nz = mse != 0
        out[nz] = 20 * np.log10(4095 / np.sqrt(mse[nz]))
        return out.mean(axis=1)

    psnr_d, psnr_h, psnr_w = slice_psnr((2, 3)), slice_psnr((1, 3)), slice_psnr((1, 2))
    mse3 = se.reshape(se.shape[0], -1).mean(axis=1)
    cos = (real * fake).reshape(len(real), -1).sum(1) / (
        np.linalg.norm(real.reshape(len(real), -1), axis=1)
        * np.linalg.norm(fake.reshape(len(fake), -1), axis=1)
    )
    return {
        "psnr_z": psnr_d,
        "psnr_y": psnr_h,
        "psnr_x": psnr_w,
        "psnr": (psnr_d + psnr_h + psnr_w) / 3,
        "psnr_3d": np.where(mse3 == 0, 100.0, 20 * np.log10(4095 / np.sqrt(mse3))),
        "ssim_z": ssim_d,
        "ssim_y": ssim_h,
        "ssim_x": ssim_w,
        "ssim": (ssim_d + ssim_h + ssim_w) / 3,
        "mae_hu": np.abs(qr - qf).reshape(len(qr), -1).mean(1),
        "cosine_similarity": cos,
    }


def test_x2ct_metrics_match_reference(skm):
    rng = np.random.default_rng(11)
    shape = (2, 12, 14, 16)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[1:]], indexing="ij")
    body = 1100.0 * (x**2 + y**2 + z**2 < 0.8) - 1050.0  # values below -1024 and above 1476
    target_hu = (body[None] + 300.0 * rng.standard_normal(shape)).astype(np.float32)
    pred_hu = (target_hu + rng.normal(0.0, 60.0, shape)).astype(np.float32)
    pred_hu[0, 3] = target_hu[0, 3]  # one exact z-slice: 100 dB in the slice average
    out = jax.jit(metrics.x2ct_metrics)(pred_hu, target_hu)
    ref = _x2ct_reference(skm, pred_hu, target_hu)
    assert set(out) == set(ref)
    for k in ref:
        assert out[k].shape == (2,), k
        np.testing.assert_allclose(np.asarray(out[k]), ref[k], rtol=1e-4, err_msg=k)


def test_x2ct_psnr_offset_vs_primary():
    # Integer HU inside both windows and the same error energy in every slice of every
    # orientation (+-40 HU, random sign): slice averaging changes nothing and the X2CT PSNR
    # exceeds the primary one by exactly 20 log10(4095 / 2024) = 6.121 dB (peak 4095 over HU
    # vs peak 1 over a 2024 HU range).
    rng = np.random.default_rng(12)
    target_hu = rng.integers(-900, 900, (2, 12, 12, 12)).astype(np.float32)
    pred_hu = target_hu + 40.0 * rng.choice([-1.0, 1.0], target_hu.shape).astype(np.float32)
    by_def = jax.jit(metrics.metrics_by_definition, static_argnames="definition")
    prim = by_def(pred_hu, target_hu, definition="primary")
    x2 = by_def(pred_hu, target_hu, definition="x2ct")
    expected = 20 * np.log10(4095 / 2024)
    np.testing.assert_allclose(expected, 6.1209, atol=1e-4)
    np.testing.assert_allclose(np.asarray(prim["psnr"]), 20 * np.log10(2024 / 40), rtol=1e-5)
    exact_fn = jax.jit(functools.partial(metrics.x2ct_metrics, quantize=False))
    exact = exact_fn(pred_hu, target_hu)
    for k in ("psnr", "psnr_3d", "psnr_z", "psnr_y", "psnr_x"):
        np.testing.assert_allclose(exact[k] - prim["psnr"], expected, atol=1e-4, err_msg=k)
    # With X2CT-GAN's truncation some integers move down by one: off by a few hundredths.
    np.testing.assert_allclose(x2["psnr"] - prim["psnr"], expected, atol=0.05)
    np.testing.assert_allclose(x2["mae_hu"], 40.0, atol=1.0)
    # Uneven errors across slices: the slice average beats the whole-volume PSNR (Jensen).
    pred2 = target_hu.copy()
    pred2[:, :6] += 40.0
    pred2[:, 6:] += 4.0
    out = exact_fn(pred2, target_hu)
    assert np.all(np.asarray(out["psnr_z"]) > np.asarray(out["psnr_3d"]) + 5.0)
    np.testing.assert_allclose(
        out["psnr_z"], 20 * np.log10(4095) - 0.5 * 10 * np.log10(1600.0 * 16.0), rtol=1e-5
    )


def test_x2ct_window_and_hand_cases():
    hu = jnp.array([[-2000.0, -1024.0, 0.0, 1476.0, 3000.0]])
    np.testing.assert_allclose(
        jax.jit(metrics.x2ct_window)(hu), [[0.0, 0.0, 1024 / 2500, 1.0, 1.0]], rtol=1e-6
    )
    # Identical volumes: every slice capped at 100 dB, SSIM 1, no error.
    v = np.random.default_rng(13).uniform(-1000, 1000, (1, 8, 9, 10)).astype(np.float32)
    out = jax.jit(metrics.x2ct_metrics)(v, v)
    for k in ("psnr", "psnr_3d", "psnr_z", "psnr_y", "psnr_x"):
        np.testing.assert_allclose(out[k], 100.0, err_msg=k)
    np.testing.assert_allclose(out["ssim"], 1.0, atol=1e-6)
    np.testing.assert_allclose(out["mae_hu"], 0.0)
    np.testing.assert_allclose(out["cosine_similarity"], 1.0, rtol=1e-6)
    # Constant offset c on a constant slice stack: only SSIM's luminance term moves, the
    # covariance normalisation does not matter (zero variances).
    mu, c = 0.4, 0.1
    t = np.full((1, 7, 8, 9), mu, np.float32)
    s = jax.jit(metrics.ssim_slices, static_argnames="slice_axis")(t + c, t, 1.0, slice_axis=1)
    c1 = 0.01**2
    np.testing.assert_allclose(s, (2 * mu * (mu + c) + c1) / (mu**2 + (mu + c) ** 2 + c1), 1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_ssim_slices_matches_skimage(skm, axis):
    pred, target = _random_pair(14, (1, 9, 10, 11))
    ours = float(jax.jit(metrics.ssim_slices, static_argnums=(2, 3))(pred, target, 1.0, axis)[0])
    ref = skm.structural_similarity(
        pred[0].astype(np.float64), target[0].astype(np.float64), data_range=1.0, channel_axis=axis
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_metrics_by_definition_dispatch():
    a = np.zeros((1, 12, 12, 12), np.float32)
    assert set(metrics.DEFINITIONS) == {"primary", "x2ct"}
    assert all(isinstance(v, str) and v for v in metrics.DEFINITIONS.values())
    assert "4095" in metrics.DEFINITIONS["x2ct"] and "sigma 1.5" in metrics.DEFINITIONS["primary"]
    with pytest.raises(ValueError, match="definition must be one of"):
        metrics.metrics_by_definition(a, a, "x2ct-gan")
    with pytest.raises(ValueError, match="takes no mask"):
        metrics.metrics_by_definition(a, a, "x2ct", mask=np.ones(a.shape, bool))
    with pytest.raises(ValueError, match="smaller than the 7x7"):
        metrics.x2ct_metrics(a[:, :6, :6, :6], a[:, :6, :6, :6])
    with pytest.raises(ValueError, match="slice_axis"):
        metrics.psnr_slices(a, a, 1.0, slice_axis=3)
