"""xct.calibrate: a synthetic radiograph with a known pose, scale and processing chain
(gamma curve, unsharp masking, noise, a collimation border) is brought back to line
integrals on the model's detector."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from xct import calibrate, geometry, phantoms, physics, projector
from xct.recon import template as T


@pytest.fixture(scope="module")
def case():
    acq = geometry.Acquisition(resolution=32, fov_mm=400.0)
    grid = acq.grid()
    mu = jnp.maximum(physics.hu_to_mu(jnp.asarray(phantoms.chest_phantom(5, grid)[0])), 0.0)
    truth = (
        T.Schedule()
        .init()
        ._replace(
            rotvec=jnp.array([0.3, 0.2, -0.3]),  # 1.7, 1.1, -1.7 degrees
            shift=jnp.array([0.0, 0.5, -0.4]),  # 10 mm, -8 mm across the beam
        )
    )
    target = T.warp(mu, truth, grid)
    # the radiograph: a finer detector with another pixel size (3.48 of its pixels per
    # model pixel), a gamma curve, unsharp masking, noise and a collimated top and bottom
    hi = geometry.Acquisition(
        resolution=128, fov_mm=400.0, pixel_mm=acq.detector_pixel_mm / 4 * 1.15
    )
    zero = np.array([0.0], np.float32)
    p = np.asarray(projector.forward_project(target, grid, hi.orbit(zero)))[0]
    v = 1.8 * np.maximum(p, 0) ** 0.7
    v = v + 0.5 * (v - ndimage.gaussian_filter(v, 3))
    v = v + np.random.default_rng(0).normal(0, 0.01, v.shape)
    v[:10] = v[-10:] = v.max() * 1.05
    clean = np.asarray(projector.forward_project(target, grid, acq.orbit(zero)))[0]
    return acq, mu, truth, v.astype(np.float32), clean


def test_pose_scale_and_values_recovered(case):
    acq, mu, truth, image, clean = case
    cal = calibrate.calibrate(image, mu, acq, 0.0)
    true_deg = np.rad2deg(np.asarray(truth.rotvec) * 0.1)
    assert np.abs(cal.rotation_deg - true_deg).max() < 1.0, (cal.rotation_deg, true_deg)
    assert np.abs(cal.translation_mm - np.asarray(truth.shift) * 20.0).max() < 3.0
    assert cal.image_scale == pytest.approx(4 / 1.15, rel=0.03)
    m = cal.valid
    assert m.mean() > 0.8
    rel = np.sqrt(np.sum((cal.line_integrals - clean)[m] ** 2) / np.sum(clean[m] ** 2))
    assert rel < 0.05, rel
    assert np.all(np.diff(cal.map_values) > 0)  # monotone
    assert cal.loss[-1] < 0.2 * cal.loss[0]
    # the radiograph's pixel seen at the isocentre: the model's / the true image scale
    true_iso = acq.detector_pixel_mm / (acq.sdd_mm / acq.sod_mm) / (4 / 1.15)
    assert cal.pixel_iso_mm == pytest.approx(true_iso, rel=0.03)


def test_the_fit_compiles_once_for_every_view(case):
    acq, mu, _, image, _ = case
    calibrate.calibrate(image, mu, acq, 0.0, steps=20)
    before = calibrate._fit._cache_size()
    calibrate.calibrate(np.fliplr(image).copy(), 0.9 * mu, acq, 90.0, steps=20)
    assert calibrate._fit._cache_size() == before


def test_collimation_mask():
    img = np.random.default_rng(1).normal(size=(40, 50))
    img[:5] = 10.0  # unexposed borders (attenuation-like: high), corners included
    img[:, -3:] = 10.0
    img[5:, :4] = -10.0  # direct exposure (air) inside the exposed field: kept
    m = calibrate.collimation_mask(img)
    assert not m[:5].any() and not m[:, -3:].any()
    assert m[5:, :-3].all()


def test_bad_inputs(case):
    acq, mu, _, image, _ = case
    with pytest.raises(ValueError, match="2-D radiograph"):
        calibrate.calibrate(image[None], mu, acq, 0.0)
    with pytest.raises(ValueError, match="template_mu: expected shape"):
        calibrate.calibrate(image, mu[:8], acq, 0.0)


def _radiograph(target, grid, hi, angle, seed):
    """A processed radiograph of ``target`` at ``angle``: finer detector, gamma curve,
    unsharp masking, noise and a collimated top and bottom (the fixture's chain)."""
    p = np.asarray(projector.forward_project(target, grid, hi.orbit(np.float32([angle]))))[0]
    v = 1.8 * np.maximum(p, 0) ** 0.7
    v = v + 0.5 * (v - ndimage.gaussian_filter(v, 3))
    v = v + np.random.default_rng(seed).normal(0, 0.01, v.shape)
    v[:10] = v[-10:] = v.max() * 1.05
    return v.astype(np.float32)


@pytest.mark.parametrize("seed,dicom", [(0, False), (2, False), (0, True)])
def test_reconstruction_from_calibrated_radiographs_is_within_1_db_of_clean_drrs(
    case, seed, dicom, tmp_path
):
    """Issue 15's bar: the value map and pose are good enough that what is reconstructed
    from the processed radiographs is within 1 dB of what the clean DRRs give (TV, 2 views,
    the same detector pixels: those the radiographs expose).

    The two views are calibrated jointly (one pose, one image scale). Measured
    (``/tmp``-script sweep, 2026-12-02, noise seeds 0-3): jointly 0.06-0.07 dB every time;
    view by view 0.62, 0.71, 2.21 and 0.47 dB: alone, the lateral view's image scale can
    settle in a second optimum (3.54 against the true 3.48), which seed 2 hits. Through
    12-bit MONOCHROME1 CR DICOM (``dicom``: written, then read by ``xct.radiograph``),
    seeds 0-3: jointly 0.07-0.18 dB, view by view 0.65-2.00 dB."""
    from xct import metrics, recon

    acq, mu, truth, _, _ = case
    grid = acq.grid()
    target = T.warp(mu, truth, grid)
    hi = geometry.Acquisition(
        resolution=128, fov_mm=400.0, pixel_mm=acq.detector_pixel_mm / 4 * 1.15
    )
    angles = np.float32([0.0, 90.0])
    geom = acq.orbit(angles)
    clean = np.asarray(projector.forward_project(target, grid, geom))
    images = [_radiograph(target, grid, hi, a, 10 * seed + i) for i, a in enumerate(angles)]
    if dicom:
        from test_radiograph import _write_dicom

        from xct import radiograph

        for i, (v, a) in enumerate(zip(images, angles, strict=True)):
            stored = np.round(4095 * (v.max() - v) / (v.max() - v.min())).astype(np.uint16)
            path = _write_dicom(tmp_path / f"{i}.dcm", stored, pi="MONOCHROME1")
            images[i] = radiograph.read_radiograph(path, angle_deg=float(a)).image
    cals = calibrate.calibrate_views(images, mu, acq, angles)
    valid = np.stack([c.valid for c in cals])
    calibrated = np.stack([c.line_integrals for c in cals])
    scale = float(target.max())

    def psnr(drr):
        x, _ = recon.tv(jnp.asarray(np.where(valid, drr, 0.0)), geom, grid, 100, tv_weight=1e-3)
        return float(metrics.psnr(x[None] / scale, target[None] / scale)[0])

    p_clean, p_cal = psnr(clean), psnr(calibrated)
    print(f"TV from clean DRRs {p_clean:.2f} dB, from calibrated radiographs {p_cal:.2f} dB")
    assert p_cal > p_clean - 1.0, (p_cal, p_clean)
    # one pose for both views, and it is the true one (within 1 degree and 3 mm)
    true_deg = np.rad2deg(np.asarray(truth.rotvec) * 0.1)
    for c in cals:
        assert np.abs(c.rotation_deg - true_deg).max() < 1.0, (c.rotation_deg, true_deg)
        assert np.abs(c.translation_mm - np.asarray(truth.shift) * 20.0).max() < 3.0
        assert c.image_scale == pytest.approx(4 / 1.15, rel=0.02)


def test_joint_calibration_checks_its_inputs(case):
    acq, mu, _, image, _ = case
    with pytest.raises(ValueError, match="angles_deg"):
        calibrate.calibrate_views([image, image], mu, acq, [0.0])
    with pytest.raises(ValueError, match="pixel_mm"):
        calibrate.calibrate_views([image, image], mu, acq, [0.0, 90.0], pixel_mm=[0.5])
    with pytest.raises(ValueError, match="at least one"):
        calibrate.calibrate_views([], mu, acq, [])
