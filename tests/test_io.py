"""Tests for xct.io: readers on the shared real CTs, one test per kind of bad input, the
NIfTI round trip, and the preprocessing (orientation, resampling, couch removal, cubes).

Shared scans are read from ``../shared/data/ct`` (fixture ``shared_ct_dir``, which skips
when absent); corrupted copies and synthetic DICOM series are made in ``tmp_path``.
"""

import pathlib
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import xct
from xct import io
from xct.geometry import VolumeGrid

SERIES = "dicom/totalseg_abdomen_series"
FIRST30 = "abdomen_pelvis_3mm_first30.nii.gz"


def _write_dicom_slices(
    folder: pathlib.Path,
    z_mm,
    *,
    modality: str = "CT",
    series_uid: str = "1.2.826.0.1.3680043.2.1125.7.1",
    prefix: str = "s",
) -> list[pathlib.Path]:
    """Write one 8x8 int16 DICOM slice per position ``z_mm`` (HU: air, soft tissue, bone)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    sop_class = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    paths = []
    for i, z in enumerate(z_mm):
        arr = np.full((1, 8, 8), -1000, np.int16)
        arr[0, 2:6, 2:6] = 40 + i
        arr[0, 4, 4] = 1000
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.0, 1.0))
        img.SetOrigin((0.0, 0.0, float(z)))
        tags = {
            "0008|0060": modality,
            "0008|0016": sop_class,
            "0008|0018": f"{series_uid}.{i + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
            "0020|000e": series_uid,
            "0020|0013": str(i + 1),
            "0020|0032": f"0\\0\\{z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
        }
        for key, value in tags.items():
            img.SetMetaData(key, value)
        path = folder / f"{prefix}{i:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(img)
        paths.append(path)
    return paths


def _copy_series(shared_ct_dir: pathlib.Path, dst: pathlib.Path) -> list[pathlib.Path]:
    shutil.copytree(shared_ct_dir / SERIES, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return sorted(dst.iterdir())


def _grids_close(a: VolumeGrid, b: VolumeGrid) -> bool:
    return (
        a.shape == b.shape
        and np.allclose(a.spacing_mm, b.spacing_mm, atol=1e-5)
        and np.allclose(a.origin_xyz_mm, b.origin_xyz_mm, atol=1e-4)
        and np.allclose(a.direction, b.direction, atol=1e-6)
    )


@pytest.fixture(scope="module")
def chest_4mm(shared_ct_dir):
    """The shared chest CT (couch under the patient) at 4 mm: ``[70, 125, 125]``, LPS."""
    hu, grid = io.read_ct(shared_ct_dir / "chest_4dct_phase00_2mm.nii.gz")
    return io.resample_isotropic(hu, grid, 4.0)


# ----------------------------------------------------------------------------- readers


def test_import_without_simpleitk(monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    monkeypatch.delitem(sys.modules, "xct.io")
    monkeypatch.setattr(xct, "io", io)
    import importlib

    fresh = importlib.import_module("xct.io")
    assert fresh is not io and hasattr(fresh, "read_ct")


def test_read_dicom_series(shared_ct_dir):
    hu, grid = io.read_ct(shared_ct_dir / SERIES)
    assert hu.shape == (20, 512, 512) and hu.dtype == np.float32
    assert grid.shape == hu.shape
    np.testing.assert_allclose(grid.spacing_mm, (2.0, 0.9765625, 0.9765625))
    np.testing.assert_allclose(grid.origin_xyz_mm, (-249.51171875, -437.51171875, -804.5))
    # RescaleIntercept -1024 applied: air is -1024 HU, not 0.
    assert hu.min() == -1024.0 and hu.max() == 1839.0


def test_read_dicom_series_by_uid_several_ct_series_refused(tmp_path):
    _write_dicom_slices(tmp_path, [0, 1, 2], series_uid="1.2.3.100", prefix="a")
    _write_dicom_slices(tmp_path, [0, 2, 4, 6, 8], series_uid="1.2.3.200", prefix="b")
    with pytest.raises(
        io.CTReadError,
        match=r"2 CT series in one folder: 1\.2\.3\.100 \(CT, 3 slices\); "
        r"1\.2\.3\.200 \(CT, 5 slices\).*series_uid=",
    ):
        io.read_ct(tmp_path)
    hu, grid = io.read_ct(tmp_path, series_uid="1.2.3.200")
    assert hu.shape == (5, 8, 8) and grid.spacing_mm[0] == pytest.approx(2.0)
    hu, grid = io.read_ct(tmp_path, series_uid="1.2.3.100")
    assert hu.shape == (3, 8, 8) and grid.spacing_mm[0] == pytest.approx(1.0)
    # Ordered by position, not by file name: slice i holds 40 + i at its centre.
    np.testing.assert_array_equal(hu[:, 3, 3], [40, 41, 42])


def test_read_dicom_series_orders_by_position(tmp_path):
    paths = _write_dicom_slices(tmp_path, [6, 0, 4, 2])
    hu, grid = io.read_ct(tmp_path)
    assert len(paths) == 4
    np.testing.assert_array_equal(hu[:, 3, 3], [41, 43, 42, 40])
    assert grid.origin_xyz_mm[2] == pytest.approx(0.0)


def test_read_single_dicom_file(shared_ct_dir):
    hu, grid = io.read_ct(shared_ct_dir / "dicom/lidc_single_slice.dcm")
    assert hu.shape == (1, 512, 512) and hu.dtype == np.float32
    assert grid.spacing_mm[1:] == (0.625, 0.625)


def test_read_nifti_keeps_direction(shared_ct_dir):
    hu, grid = io.read_ct(shared_ct_dir / FIRST30)
    assert hu.shape == (30, 101, 122) and hu.dtype == np.float32
    assert grid.spacing_mm == (3.0, 3.0, 3.0)
    np.testing.assert_allclose(grid.direction_matrix(), np.diag([-1.0, -1.0, 1.0]))
    assert hu.min() == -1100.0 and hu.max() == 1207.0


def test_read_mha_with_hu_offset(shared_ct_dir):
    hu, grid = io.read_ct(shared_ct_dir / "head_headsq_hu_plus_1024.mha", hu_offset=-1024)
    assert hu.shape == (93, 64, 64)
    assert hu.min() == -1024.0 and hu.max() == 3926.0 - 1024.0
    np.testing.assert_allclose(grid.spacing_mm, (1.5, 3.2, 3.2), rtol=1e-6)


def test_read_abdomen_padding_is_not_an_error(shared_ct_dir):
    hu, _ = io.read_ct(shared_ct_dir / "abdomen_crlm_ct_1004_2mm.nii.gz")
    assert hu.min() == -3024.0


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"])
def test_write_read_formats(tmp_path, suffix):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 2000, (5, 6, 7)).astype(np.float32)
    c, s = np.cos(0.3), np.sin(0.3)
    grid = VolumeGrid(
        (5, 6, 7), (2.5, 0.75, 1.25), (10.0, -20.0, 30.5), (c, -s, 0, s, c, 0, 0, 0, 1)
    )
    path = io.write_ct(tmp_path / f"vol{suffix}", hu, grid)
    back, back_grid = io.read_ct(path, check_hu=False)  # uniform noise: no CT histogram
    np.testing.assert_array_equal(back, hu)
    assert _grids_close(back_grid, grid)


def test_round_trip_real_nifti(shared_ct_dir, tmp_path):
    hu, grid = io.read_ct(shared_ct_dir / FIRST30)
    path = io.write_ct(tmp_path / "out" / "ct.nii.gz", hu, grid)
    back, back_grid = io.read_ct(path)
    np.testing.assert_array_equal(back, hu)
    assert _grids_close(back_grid, grid)


def test_to_sitk_rejects_mismatched_grid():
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\) does not match"):
        io.to_sitk(np.zeros((2, 3, 4)), VolumeGrid.centered((4, 3, 2), 1.0))


# ------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(io.CTReadError, match=r"nope\.nii\.gz: file not found; expected"):
        io.read_ct(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("name", ["garbage.nii.gz", "garbage.mha", "garbage.dcm", "garbage"])
def test_garbage_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a CT scan\n" * 50)
    with pytest.raises(ValueError, match=rf"{name}: .*expected .*NIfTI"):
        io.read_ct(path)


def test_corrupt_gzip(shared_ct_dir, tmp_path):
    data = bytearray((shared_ct_dir / FIRST30).read_bytes())
    data[2000:2100] = b"\xff" * 100
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt\.nii\.gz: .*(corrupt|truncated)"):
        io.read_ct(path)


@pytest.mark.parametrize("fraction", [0.5, 0.99])
def test_truncated_shared_nii_gz(shared_ct_dir, tmp_path, fraction):
    data = (shared_ct_dir / FIRST30).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: int(len(data) * fraction)])
    # SimpleITK alone reads this without error, zero-filling the missing voxels.
    assert sitk.ReadImage(str(path)).GetSize() == (122, 101, 30)
    with pytest.raises(io.CTReadError, match=r"cut\.nii\.gz: truncated file"):
        io.read_ct(path)


@pytest.mark.parametrize("suffix", [".nii", ".mha", ".nrrd"])
def test_truncated_uncompressed(tmp_path, suffix):
    hu = np.linspace(-1000, 1000, 16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    full = tmp_path / f"full{suffix}"
    sitk.WriteImage(io.to_sitk(hu, VolumeGrid.centered(hu.shape, 1.0)), str(full))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[:-1000])
    with pytest.raises(io.CTReadError, match=rf"cut\{suffix}: .*truncated"):
        io.read_ct(cut)


def test_non_ct_modality_file(tmp_path):
    (path,) = _write_dicom_slices(tmp_path, [0.0], modality="MR")
    with pytest.raises(io.CTReadError, match=r"s000\.dcm: DICOM Modality \(0008\|0060\) is 'MR'"):
        io.read_ct(path)


def test_non_ct_modality_series(tmp_path):
    _write_dicom_slices(tmp_path, [0, 1, 2], modality="MR")
    with pytest.raises(io.CTReadError, match=r"is 'MR'; expected 'CT'"):
        io.read_ct(tmp_path)


def test_missing_slice(shared_ct_dir, tmp_path):
    files = _copy_series(shared_ct_dir, tmp_path / "series")
    files[9].unlink()
    with pytest.raises(io.CTReadError, match=r"series: missing slice\(s\): a gap of 4\.000 mm"):
        io.read_ct(tmp_path / "series")


def test_duplicated_slice(shared_ct_dir, tmp_path):
    files = _copy_series(shared_ct_dir, tmp_path / "series")
    shutil.copy(files[5], tmp_path / "series" / "copy_of_slice")
    with pytest.raises(io.CTReadError, match=r"series: duplicated slice: .*copy_of_slice"):
        io.read_ct(tmp_path / "series")


def test_non_uniform_slice_spacing(tmp_path):
    _write_dicom_slices(tmp_path, [0.0, 2.0, 4.0, 7.0, 9.0, 11.0])
    with pytest.raises(io.CTReadError, match=r"non-uniform slice spacing: 3\.000 mm .*2\.000"):
        io.read_ct(tmp_path)


def test_unknown_series_uid(tmp_path):
    _write_dicom_slices(tmp_path, [0, 1], series_uid="1.2.3.4")
    with pytest.raises(io.CTReadError, match=r"no series with SeriesInstanceUID '9\.9'"):
        io.read_ct(tmp_path, series_uid="9.9")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("no slices here")
    with pytest.raises(io.CTReadError, match=r"no DICOM series found"):
        io.read_ct(tmp_path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf(tmp_path, bad, suffix):
    # SimpleITK's NIfTI reader turns NaN into 0 silently; read_ct checks the raw bytes.
    hu = np.full((4, 5, 6), -1000.0, np.float32)
    hu[1, 2, 3] = 500.0
    hu[2, 2, 2] = bad
    path = io.write_ct(tmp_path / f"bad{suffix}", hu, VolumeGrid.centered(hu.shape, 1.0))
    with pytest.raises(io.CTReadError, match=rf"bad\{suffix}: 1 of 120 voxels are NaN or inf"):
        io.read_ct(path)


def test_empty_volume(tmp_path):
    path = tmp_path / "empty.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 0\nElementType = MET_SHORT\n"
        "ElementDataFile = LOCAL\n"
    )
    with pytest.raises(io.CTReadError, match=r"empty\.mha: empty volume of size \(4, 4, 0\)"):
        io.read_ct(path)


def test_constant_volume(tmp_path):
    hu = np.full((4, 5, 6), -1000.0, np.float32)
    path = io.write_ct(tmp_path / "flat.nii.gz", hu, VolumeGrid.centered(hu.shape, 1.0))
    with pytest.raises(io.CTReadError, match=r"flat\.nii\.gz: every voxel is -1000.*empty"):
        io.read_ct(path)


def test_not_3d(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.int16)), str(path))
    with pytest.raises(io.CTReadError, match=r"slice\.nrrd: a 2-D image .*expected a 3-D"):
        io.read_ct(path)


def test_hu_plus_1024_detected(shared_ct_dir):
    with pytest.raises(
        io.CTReadError, match=r"head_headsq_hu_plus_1024\.mha: .*HU\+1024.*hu_offset=-1024"
    ):
        io.read_ct(shared_ct_dir / "head_headsq_hu_plus_1024.mha")


def test_label_map_is_not_hu(shared_ct_dir):
    with pytest.raises(io.CTReadError, match=r"organs\.nii\.gz: values span \[0, 117\].*not HU"):
        io.read_ct(shared_ct_dir / "abdomen_pelvis_3mm_first30_organs.nii.gz")
    labels, _ = io.read_ct(
        shared_ct_dir / "abdomen_pelvis_3mm_first30_organs.nii.gz", check_hu=False
    )
    assert labels.max() == 117.0


# ----------------------------------------------------------------------- preprocessing


def test_canonical_orientation_flips_ras_to_lps(shared_ct_dir):
    hu, grid = io.read_ct(shared_ct_dir / FIRST30)
    out, out_grid = io.canonical_orientation(hu, grid)
    assert io.CANONICAL_ORIENTATION == "LPS"
    np.testing.assert_allclose(out_grid.direction_matrix(), np.eye(3))
    np.testing.assert_array_equal(out, hu[:, ::-1, ::-1])
    # Same voxels at the same world positions.
    np.testing.assert_allclose(
        out_grid.index_to_world([0, 0, 0]), grid.index_to_world([121, 100, 0]), atol=1e-4
    )


def test_canonical_orientation_permuted_axes():
    hu = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    # Index x runs along world z, index y along -x, index z along y.
    grid = VolumeGrid(hu.shape, (1.0, 2.0, 3.0), (0.0, 0.0, 0.0), (0, -1, 0, 0, 0, 1, 1, 0, 0))
    out, out_grid = io.canonical_orientation(hu, grid)
    np.testing.assert_allclose(out_grid.direction_matrix(), np.eye(3))
    assert out_grid.shape == (4, 2, 3)
    i_max = np.unravel_index(np.argmax(out), out.shape)[::-1]
    np.testing.assert_allclose(out_grid.index_to_world(i_max), grid.index_to_world([3, 2, 1]))


def test_resample_isotropic_keeps_centre_and_ramp():
    shape, spacing = (10, 20, 30), (3.0, 1.0, 0.5)
    grid = VolumeGrid(shape, spacing, (5.0, -7.0, 2.0))
    x_mm = grid.voxel_centers_xyz_mm()[..., 0]
    hu = (10.0 * x_mm).astype(np.float32)  # linear in world x: reproduced by linear interp
    out, out_grid = io.resample_isotropic(hu, grid, 1.5, antialias=False)
    assert out_grid.shape == (20, 13, 10) and out_grid.spacing_mm == (1.5, 1.5, 1.5)
    centre = lambda g: g.index_to_world((np.asarray(g.shape_xyz) - 1) / 2)  # noqa: E731
    np.testing.assert_allclose(centre(out_grid), centre(grid), atol=1e-9)
    inner = out[2:-2, 2:-2, 2:-2]
    expect = 10.0 * out_grid.voxel_centers_xyz_mm()[2:-2, 2:-2, 2:-2, 0]
    np.testing.assert_allclose(inner, expect, atol=1e-2)


def test_resize_to_cube():
    hu = np.random.default_rng(1).normal(0, 100, (12, 24, 24)).astype(np.float32)
    grid = VolumeGrid(hu.shape, (2.0, 1.0, 1.0), (1.0, 2.0, 3.0))
    out, out_grid = io.resize(hu, grid, 8)
    assert out.shape == (8, 8, 8) and out_grid.spacing_mm == (3.0, 3.0, 3.0)
    assert abs(out.mean() - hu.mean()) < 10.0


def _phantom_with_couch():
    """A 2 mm ``[12, 40, 40]`` body (0 HU) with lungs (-900 HU) on a thin couch (200 HU)."""
    hu = np.full((12, 40, 40), -1000.0, np.float32)
    yy, xx = np.mgrid[:40, :40]
    body = ((yy - 16) / 12.0) ** 2 + ((xx - 20) / 16.0) ** 2 <= 1
    lung = ((yy - 16) / 6.0) ** 2 + ((xx - 20) / 8.0) ** 2 <= 1
    hu[:, body] = 0.0
    hu[:, lung] = -900.0
    hu[:, 31, 2:38] = 200.0  # couch plate, one row below a one-row air gap
    hu[:, 30, 18:22] = 200.0  # a thin contact joining couch and body
    return hu, VolumeGrid(hu.shape, (2.0, 2.0, 2.0)), body


def test_body_mask_drops_couch_and_fills_lungs():
    hu, grid, body = _phantom_with_couch()
    mask = io.body_mask(hu, grid)
    assert mask.dtype == bool and mask.shape == hu.shape
    assert not mask[:, 31].any()  # couch gone
    assert mask[:, 16, 20].all()  # lungs inside the body
    assert np.count_nonzero(mask[6] != body) < 0.05 * body.sum()


def test_body_mask_all_air():
    hu = np.full((4, 4, 4), -1000.0, np.float32)
    assert not io.body_mask(hu, VolumeGrid.centered(hu.shape, 1.0)).any()


def test_remove_couch_on_shared_chest(chest_4mm):
    hu, grid = chest_4mm
    out, out_grid = io.remove_couch(hu, grid)
    assert out_grid == grid and out.dtype == np.float32
    ny = hu.shape[1]
    posterior = slice(ny * 4 // 5, ny)  # LPS: the last rows are posterior, under the back
    assert np.count_nonzero(hu[:, posterior] > -500) > 1000  # the couch is there
    assert np.count_nonzero(out[:, posterior] > -500) == 0
    body_before = np.count_nonzero(hu[:, : ny * 4 // 5] > -500)
    body_after = np.count_nonzero(out[:, : ny * 4 // 5] > -500)
    assert abs(body_after - body_before) < 0.1 * body_before
    assert np.all(out[out != hu] == -1000.0)


def test_crop_or_pad_cube_centres_body():
    hu = np.full((10, 30, 40), -1000.0, np.float32)
    hu[2:8, 5:15, 4:16] = 50.0  # off-centre body, bounding-box centre (4.5, 9.5, 9.5)
    grid = VolumeGrid(hu.shape, (3.0, 1.0, 1.0), (-5.0, 4.0, 7.0))
    out, out_grid = io.crop_or_pad_cube(hu, grid, 24.0, fill_hu=-1024.0)
    assert out.shape == (8, 24, 24) and out_grid.spacing_mm == grid.spacing_mm
    assert out_grid.direction == grid.direction
    # Every kept voxel sits at its old world position; padding is fill_hu.
    w = out_grid.index_to_world([0, 0, 0])
    ix = np.round(grid.world_to_index()[0] @ (w - grid.index_to_world([0, 0, 0]))).astype(int)
    assert tuple(ix) == (-2, -2, 1)  # start (x, y, z) in the old index space
    np.testing.assert_array_equal(out[:, 2:, 2:], hu[1:9, 0:22, 0:22])
    assert np.all(out[:, :2] == -1024.0)
    body = np.argwhere(out > 0)
    np.testing.assert_allclose((body.min(0) + body.max(0)) / 2, [3.5, 11.5, 11.5])


def test_preprocess_shared_chest(chest_4mm):
    hu, grid = chest_4mm
    out, out_grid = io.preprocess(hu, grid, 24, 480.0)
    assert out.shape == (24, 24, 24) and out.dtype == np.float32
    assert out_grid.spacing_mm == (20.0, 20.0, 20.0)
    np.testing.assert_allclose(out_grid.direction_matrix(), np.eye(3))
    assert out.min() >= -1024.0 and out.max() <= 3071.0
    assert np.count_nonzero(out[:, -2:] > -500) == 0  # no couch in the last posterior rows
    assert np.count_nonzero(out > -500) > 0.1 * out.size  # the body is there


def test_preprocess_clips_padding(shared_ct_dir):
    hu, grid = io.read_ct(shared_ct_dir / "abdomen_crlm_ct_1004_2mm.nii.gz")
    hu, grid = io.resample_isotropic(hu, grid, 8.0, antialias=False)
    out, _ = io.preprocess(hu, grid, 16, 400.0)
    assert out.shape == (16, 16, 16)
    assert out.min() >= -1024.0 and out.max() <= 3071.0


# --------------------------------------------------------------------------------------
# load_cube: the one read path gives what each former copy of it gave


@pytest.fixture(scope="module")
def phantom_nifti(tmp_path_factory):
    """A chest phantom on a couch written as a scan: anisotropic voxels, off-centre, x flipped."""
    from xct import phantoms

    proj_grid = VolumeGrid.centered((40, 24, 40), (10.0, 12.0, 10.0))  # projector frame
    hu, _ = phantoms.chest_phantom(3, proj_grid, couch=True)
    grid = VolumeGrid(
        (24, 40, 40), (12.0, 10.0, 10.0), (190.0, 30.0, -120.0), (-1, 0, 0) + (0, 1, 0, 0, 0, 1)
    )
    lps = io.from_projector_frame(hu)[:, :, ::-1]  # x flipped: the direction above undoes it
    return io.write_ct(tmp_path_factory.mktemp("cube") / "chest.nii.gz", lps, grid)


@pytest.mark.parametrize("fov", [400.0, "body"])
def test_load_cube_is_the_dataset_preprocessing(phantom_nifti, fov):
    hu, grid = io.read_ct(phantom_nifti)
    io.check_ct_volume(phantom_nifti, grid)
    if fov == "body":
        want, want_grid, side = io.preprocess_body_cube(hu, grid, 16)
    else:
        (want, want_grid), side = io.preprocess(hu, grid, 16, fov), fov
    want = io.to_projector_frame(want)
    cube = io.load_cube(phantom_nifti, resolution=16, fov_mm=fov)
    np.testing.assert_array_equal(cube.hu, want)
    assert cube.hu.dtype == np.float32 and cube.hu.shape == (16, 16, 16)
    assert cube.lps_grid == want_grid and cube.fov_mm == side and cube.body is None
    assert cube.grid == VolumeGrid.centered((16, 16, 16), side / 16)
    assert cube.source_grid == grid and cube.source_spacing_mm == (12.0, 10.0, 10.0)
    np.testing.assert_array_equal(cube.lps(), io.from_projector_frame(want))
    assert np.count_nonzero(cube.hu > -500) > 0.05 * cube.hu.size  # the body is there


def test_load_cube_stored_with_body_is_the_quality_table_cube(phantom_nifti):
    hu, grid = io.read_ct(phantom_nifti)
    want, _, side = io.preprocess_body_cube(hu, grid, 16)
    want = io.to_projector_frame(want)
    want = np.clip(np.round(want), -1024, 3071).astype(np.int16).astype(np.float32)
    want_body = io.body_mask(want, VolumeGrid.centered(want.shape, side / 16))
    cube = io.load_cube(phantom_nifti, resolution=16, fov_mm="body", stored=True, body=True)
    np.testing.assert_array_equal(cube.hu, want)
    np.testing.assert_array_equal(cube.body, want_body)
    assert cube.body.dtype == bool and 0.05 < cube.body.mean() < 0.95


def test_load_cube_scan_crop_is_the_quickstart_cube(phantom_nifti):
    hu, grid = io.read_ct(phantom_nifti)
    hu, grid = io.canonical_orientation(hu, grid)
    want, want_grid = io.resample_to_cube(hu, grid, 16, 512.0)
    cube = io.load_cube(phantom_nifti, resolution=16, fov_mm=512.0, crop="scan")
    np.testing.assert_array_equal(cube.hu, io.to_projector_frame(want))
    assert cube.grid == VolumeGrid.centered((16, 16, 16), want_grid.spacing_mm)
    assert cube.hu.max() > 150.0  # the couch is kept


def test_load_cube_errors_name_the_file(tmp_path, phantom_nifti):
    thin = tmp_path / "slab.nii.gz"
    slab = np.full((4, 40, 40), -1000.0, np.float32)
    slab[:, 10:30, 10:30] = 40.0
    io.write_ct(thin, slab, VolumeGrid(slab.shape, (2.0, 2.0, 2.0)))
    with pytest.raises(ValueError, match="slab.nii.gz.*not a CT volume"):
        io.load_cube(thin, resolution=8, fov_mm=400.0)
    with pytest.raises(ValueError, match="crop"):
        io.load_cube(phantom_nifti, resolution=8, fov_mm=400.0, crop="middle")
    with pytest.raises(ValueError, match="fov_mm='body'"):
        io.load_cube(phantom_nifti, resolution=8, fov_mm="body", crop="scan")


def test_projector_frame_round_trip():
    hu = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(io.from_projector_frame(io.to_projector_frame(hu)), hu)
    assert io.to_projector_frame(hu).shape == (3, 2, 4)


# --------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_path_writes_whole_files_or_nothing(tmp_path):
    path = tmp_path / "new" / "metrics.json"
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp.name.endswith("metrics.json")
            tmp.write_text('{"half": ')
            raise KeyboardInterrupt  # killed in the middle of writing
    assert list(path.parent.iterdir()) == []  # no partial file, no temporary left
    with io.atomic_path(path) as tmp:
        tmp.write_text('{"psnr": 30}')
    with pytest.raises(ValueError):
        with io.atomic_path(path) as tmp:
            tmp.write_text("{")
            raise ValueError("disk full")
    assert path.read_text() == '{"psnr": 30}'  # the previous complete file stays
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_write_ct_interrupted_leaves_no_partial_volume(tmp_path, monkeypatch):
    import SimpleITK as sitk

    hu = np.arange(512, dtype=np.float32).reshape(8, 8, 8)
    grid = VolumeGrid.centered(hu.shape, 2.0)
    path = tmp_path / "pred.nii.gz"
    write = sitk.WriteImage

    def dies_halfway(img, name, *args, **kwargs):
        write(img, name, *args, **kwargs)
        data = pathlib.Path(name).read_bytes()
        pathlib.Path(name).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.write_ct(path, hu, grid)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(sitk, "WriteImage", write)
    io.write_ct(path, hu + 5.0, grid)
    again = tmp_path / "again.nii.gz"
    io.write_ct(again, hu + 5.0, grid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.nii.gz", "pred.nii.gz"]
    np.testing.assert_array_equal(io.read_ct(path, check_hu=False)[0], hu + 5.0)
    assert path.read_bytes() == again.read_bytes()
