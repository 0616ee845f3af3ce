"""Tests for xct.clinical: clinical X-rays of a whole scan, voxel-averaged truth, binning."""

import jax
import numpy as np
import pytest

from xct import clinical, geometry, io, physics


def _water_box(n: int = 16, box: int = 8, spacing_mm: float = 4.0):
    """A water box (0 HU) of ``box^3`` voxels in the middle of ``n^3`` voxels of air."""
    hu = np.full((n, n, n), -1000.0, np.float32)
    lo = (n - box) // 2
    hu[lo : lo + box, lo : lo + box, lo : lo + box] = 0.0
    return hu, geometry.VolumeGrid.centered((n, n, n), spacing_mm)


def test_water_box_centre_pixel_is_the_chord_times_mu_water():
    hu, grid = _water_box()
    scan = clinical.scan_from_array(hu, grid)
    assert scan.side_mm == pytest.approx(32.0)
    drr, geom = clinical.clinical_xrays(
        scan, [0.0, 90.0], det_shape=(5, 7), pixel_mm=1.0, photons=None
    )
    assert drr.shape == (2, 5, 7) and geom.det_shape == (5, 7)
    # the central ray runs through the box's centre along a face normal: chord 32 mm
    np.testing.assert_allclose(np.asarray(drr[:, 2, 3]), 32.0 * physics.MU_WATER_PER_MM, rtol=1e-5)


def test_covering_detector_sees_the_body():
    hu, grid = _water_box()
    scan = clinical.scan_from_array(hu, grid)
    rows, cols = clinical.covering_detector(scan, 2.0, margin_px=0)
    # axial half-diagonal 16*sqrt(2) mm magnified from the near side: 1500 / (1000 - 22.6)
    r = 16.0 * np.sqrt(2.0)
    assert cols == 2 * int(np.ceil(r * 1500.0 / (1000.0 - r) / 2.0))
    assert rows == 2 * int(np.ceil(16.0 * 1500.0 / (1000.0 - r) / 2.0))


def test_poisson_noise_variance_and_seed():
    hu, grid = _water_box()
    scan = clinical.scan_from_array(hu, grid)
    kw = dict(det_shape=(24, 24), pixel_mm=1.0)
    clean, _ = clinical.clinical_xrays(scan, [0.0, 90.0], photons=None, **kw)
    photons = 1e3
    noisy, _ = clinical.clinical_xrays(scan, [0.0, 90.0], jax.random.key(3), photons=photons, **kw)
    again, _ = clinical.clinical_xrays(scan, [0.0, 90.0], jax.random.key(3), photons=photons, **kw)
    other, _ = clinical.clinical_xrays(scan, [0.0, 90.0], jax.random.key(4), photons=photons, **kw)
    np.testing.assert_array_equal(np.asarray(noisy), np.asarray(again))
    assert not np.array_equal(np.asarray(noisy), np.asarray(other))
    err = np.asarray(noisy - clean, np.float64)
    var = 1.0 / (photons * np.exp(-np.asarray(clean, np.float64)))  # delta method
    n = err.size
    assert abs(np.mean(err**2 / var) - 1.0) < 5.0 * np.sqrt(2.0 / n) + 0.02


def test_poly_mode_hardens_the_beam_through_water():
    hu, grid = _water_box()
    scan = clinical.scan_from_array(hu, grid)
    kw = dict(det_shape=(3, 3), pixel_mm=1.0, photons=None)
    mono, _ = clinical.clinical_xrays(scan, [0.0], **kw)
    poly, _ = clinical.clinical_xrays(scan, [0.0], mode="poly", **kw)
    # 32 mm of water: beam hardening lowers the value, by a few percent at most
    assert 0.95 * float(mono[0, 1, 1]) < float(poly[0, 1, 1]) < float(mono[0, 1, 1])


def test_scan_frame_matches_preprocess_body_cube():
    # an off-centre body with an asymmetric bright block; at the scan's own voxel size the
    # truth cube, couch removed (outside its body mask: air), is exactly
    # io.preprocess_body_cube's cube in the projector frame
    hu = np.full((20, 22, 24), -1000.0, np.float32)
    hu[3:13, 5:15, 6:16] = 40.0
    hu[4:6, 6:8, 12:15] = 900.0
    grid = geometry.VolumeGrid((20, 22, 24), (4.0, 4.0, 4.0), (5.0, -7.0, 11.0))
    scan = clinical.scan_from_array(hu, grid)
    cube, _, side = io.preprocess_body_cube(hu, grid, 10)
    assert scan.side_mm == pytest.approx(side)
    truth, body = clinical.truth_cube(scan, 10)
    expected = io.to_projector_frame(cube)
    np.testing.assert_allclose(np.where(body, truth, -1000.0), expected, atol=1e-3)
    assert 0 < body.sum() < body.size and np.all(expected[body] > -500.0)
    assert np.sum(truth == 900.0) == 12  # the block is whole, and off-centre
    assert np.all(truth[~body] <= 40.0)  # the box's corners opened out of the mask


def test_truth_of_a_constant_is_the_constant():
    grid = geometry.VolumeGrid.centered((16, 16, 16), 2.0)
    scan = clinical.ClinicalScan(
        np.full((16, 16, 16), 40.0, np.float32), grid, np.ones((16, 16, 16), bool), 32.0
    )
    hu, body = clinical.truth_cube(scan, 5)  # 6.4 mm voxels: fractional overlaps
    np.testing.assert_allclose(hu, 40.0, atol=1e-4)
    assert hu.shape == (5, 5, 5) and body.all()
    # a cube larger than the scan: air fills the part the scan does not reach
    hu, _ = clinical.truth_cube(scan, 4, side_mm=48.0)
    np.testing.assert_allclose(hu[1:3, 1:3, 1:3], 40.0, atol=1e-4)
    corner = (40.0 * 4.0 + clinical.FILL_HU * 8.0) / 12.0  # 4 of 12 mm covered per axis
    assert hu[0, 1, 1] == pytest.approx(corner, abs=1e-3)


def test_truth_of_a_fine_checkerboard_is_its_mean():
    idx = np.indices((16, 16, 16)).sum(0)
    checker = np.where(idx % 2 == 0, 1000.0, -1000.0).astype(np.float32)
    grid = geometry.VolumeGrid.centered((16, 16, 16), 1.0)
    scan = clinical.ClinicalScan(checker, grid, np.ones((16, 16, 16), bool), 16.0)
    hu, _ = clinical.truth_cube(scan, 8)
    np.testing.assert_allclose(hu, 0.0, atol=1e-3)
    point = checker[::2, ::2, ::2]  # point sampling would see one colour only
    assert np.all(np.abs(point) == 1000.0)


def test_bin_xrays_keeps_means_and_non_square_shapes():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 30, 50)).astype(np.float32)
    out, pix = clinical.bin_xrays(img, 1.0, 2.0)
    assert out.shape == (2, 15, 25) and pix == (2.0, 2.0)
    np.testing.assert_allclose(out, img.reshape(2, 15, 2, 25, 2).mean((2, 4)), atol=1e-5)
    out, _ = clinical.bin_xrays(img, 1.0, 2.5)  # fractional overlaps, same extent
    assert out.shape == (2, 12, 20)
    np.testing.assert_allclose(out.mean((1, 2)), img.mean((1, 2)), atol=1e-5)
    # a linear ramp averaged over a pixel is its value at the pixel's centre
    cols = (np.arange(50) - 24.5) * 1.0
    ramp = np.broadcast_to(3.0 + 0.1 * cols, (1, 30, 50)).astype(np.float32)
    out, _ = clinical.bin_xrays(ramp, 1.0, (3.0, 3.0))  # 48 of 50 mm kept, centred
    assert out.shape == (1, 10, 16)
    np.testing.assert_allclose(out[0, 0], 3.0 + 0.1 * (np.arange(16) - 7.5) * 3.0, atol=1e-5)


def test_resize_xrays_stretches_to_size_squared():
    img = np.ones((1, 30, 50), np.float32)
    out, pix = clinical.resize_xrays(img, 2.0, 10)
    assert out.shape == (1, 10, 10) and pix == pytest.approx((6.0, 10.0))
    np.testing.assert_allclose(out, 1.0, atol=1e-5)
    assert clinical.footprint_pixel_mm(4.0) == pytest.approx(6.0)


@pytest.mark.parametrize("sampling", ["footprint", "resize"])
def test_xrays_for_grid_keeps_the_detector_extent(sampling):
    img = np.ones((2, 30, 48), np.float32)
    grid = geometry.VolumeGrid.centered((8, 8, 8), 4.0)  # footprint 6 mm at the detector
    out, geom = clinical.xrays_for_grid(img, 2.0, [0.0, 90.0], grid, sampling=sampling)
    assert out.shape == ((2, 10, 16) if sampling == "footprint" else (2, 8, 8))
    assert geom.det_shape == out.shape[1:] and geom.num_views == 2
    extent = np.asarray(out.shape[1:]) * np.linalg.norm(
        [np.asarray(geom.det_v_xyz_mm[0]), np.asarray(geom.det_u_xyz_mm[0])], axis=1
    )
    np.testing.assert_allclose(extent, [60.0, 96.0], rtol=1e-5)
    with pytest.raises(ValueError, match="sampling"):
        clinical.xrays_for_grid(img, 2.0, [0.0, 90.0], grid, sampling="stretch")


def test_average_down_is_the_truth_of_the_finer_grid():
    rng = np.random.default_rng(1)
    fine = rng.normal(size=(12, 12, 12)).astype(np.float32)
    grid = geometry.VolumeGrid.centered((12, 12, 12), 2.0)
    scan = clinical.ClinicalScan(fine, grid, np.ones((12, 12, 12), bool), 24.0)
    truth, _ = clinical.truth_cube(scan, 4)
    np.testing.assert_allclose(clinical.average_down(fine, 3), truth, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        clinical.average_down(fine, 5)
