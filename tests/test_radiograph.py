"""Tests for xct.radiograph: polarity, tags, orientation and refusals of real-radiograph input."""

import pathlib

import numpy as np
import pytest
import SimpleITK as sitk

from xct import radiograph
from xct.radiograph import RadiographError, check_covers, read_radiograph

REAL_CR = pathlib.Path(__file__).resolve().parents[2] / "shared/data/xray/chest_pa_cr.dcm"


def _chest(rows=24, cols=20, bits=12) -> np.ndarray:
    """A toy chest in attenuation-like values: dark lungs either side of a bright spine."""
    img = np.full((rows, cols), 0.3)
    img[:, cols // 2 - 2 : cols // 2 + 2] = 0.9  # mediastinum / spine
    img[4:-4, 2:7] = 0.1  # right lung (viewer's left)
    img[4:-4, -7:-2] = 0.15  # left lung
    img[0, 0] = 0.5  # an asymmetric marker to detect flips
    return np.round(img * (2**bits - 1)).astype(np.uint16)


def _write_dicom(path, stored, *, pi="MONOCHROME2", bits=12, **tags) -> pathlib.Path:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = pi
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    for key, value in tags.items():
        if value is None:
            delattr(ds, key) if key in ds else None
        else:
            setattr(ds, key, value)
    ds.PixelData = np.asarray(stored, np.uint16).tobytes()
    path = pathlib.Path(path)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_monochrome1_and_monochrome2_give_the_same_attenuation_like_image(tmp_path):
    att = _chest()
    m2 = read_radiograph(_write_dicom(tmp_path / "m2.dcm", att))
    m1 = read_radiograph(_write_dicom(tmp_path / "m1.dcm", 4095 - att, pi="MONOCHROME1"))
    np.testing.assert_array_equal(m1.image, m2.image)
    np.testing.assert_array_equal(m2.image, att.astype(np.float32))  # bone high
    assert m1.image.dtype == np.float32 and m1.photometric == "MONOCHROME1"


def test_rescale_is_applied_and_the_polarity_follows_the_modality_values(tmp_path):
    att = _chest()
    r = read_radiograph(
        _write_dicom(tmp_path / "r.dcm", att, RescaleSlope=2, RescaleIntercept=5, RescaleType="US")
    )
    np.testing.assert_allclose(r.image, 2.0 * att + 5)
    # MONOCHROME1 with slope -1: the modality values -stored are lowest (display white) where
    # the stored values are highest, so the spine stored high is bone, and comes out high.
    r = read_radiograph(
        _write_dicom(tmp_path / "n.dcm", att, pi="MONOCHROME1", RescaleSlope=-1, RescaleIntercept=0)
    )
    spine, lung = r.image[12, 10], r.image[12, 4]
    assert spine > lung


def test_zero_pixel_spacing_is_unknown_with_a_note(tmp_path):
    r = read_radiograph(_write_dicom(tmp_path / "z.dcm", _chest(), PixelSpacing=[0, 0]))
    assert r.pixel_mm is None and r.needs_pixel_estimate and r.detector_size_mm is None
    assert any("pixel size unknown" in n and "estimated" in n for n in r.notes)
    assert check_covers(r, 400.0, 1000.0, 1500.0) is not None  # a note, not an error


def test_imager_pixel_spacing_is_the_detector_pitch(tmp_path):
    p = _write_dicom(
        tmp_path / "ips.dcm",
        _chest(),
        ImagerPixelSpacing=[0.2, 0.25],
        PixelSpacing=[0.16, 0.2],
        EstimatedRadiographicMagnificationFactor=1.25,
        DistanceSourceToDetector=1800,
        DistanceSourceToPatient=1440,
    )
    r = read_radiograph(p)
    assert r.pixel_mm == (0.2, 0.25)  # at the detector, not divided by the magnification
    np.testing.assert_allclose(r.iso_pixel_mm, (0.16, 0.2))
    assert (r.sdd_mm, r.sod_mm, r.magnification) == (1800.0, 1440.0, 1.25)
    # PixelSpacing alone with a magnification factor is taken at the patient plane.
    r = read_radiograph(
        _write_dicom(
            tmp_path / "ps.dcm",
            _chest(),
            PixelSpacing=[0.16, 0.2],
            EstimatedRadiographicMagnificationFactor=1.25,
        )
    )
    np.testing.assert_allclose(r.pixel_mm, (0.2, 0.25))


@pytest.mark.parametrize(
    "view, angle, flipped", [("PA", 0.0, False), ("AP", 180.0, True), ("LL", -90.0, False)]
)
def test_view_position_gives_the_angle_and_the_detector_frame(tmp_path, view, angle, flipped):
    att = _chest()
    orientation = ["P", "F"] if view == "LL" else ["L", "F"]
    p = _write_dicom(tmp_path / "v.dcm", att, ViewPosition=view, PatientOrientation=orientation)
    r = read_radiograph(p)
    assert r.angle_deg == angle and r.view_position == view
    np.testing.assert_array_equal(r.image, att[:, ::-1] if flipped else att)
    assert read_radiograph(p, angle_deg=30.0).angle_deg == 30.0


def test_rl_is_plus_90_and_head_down_is_flipped(tmp_path):
    att = _chest()
    p = _write_dicom(tmp_path / "rl.dcm", att, ViewPosition="RL", PatientOrientation=["A", "H"])
    r = read_radiograph(p)
    assert r.angle_deg == 90.0
    np.testing.assert_array_equal(r.image, att[::-1])


def test_unknown_view_position_needs_an_angle(tmp_path):
    p = _write_dicom(tmp_path / "o.dcm", _chest(), ViewPosition="LLO")
    with pytest.raises(RadiographError, match=r"o\.dcm.*ViewPosition.*angle_deg"):
        read_radiograph(p)
    assert read_radiograph(p, angle_deg=45.0).angle_deg == 45.0


def test_non_chest_body_part_is_refused_unless_forced(tmp_path):
    p = _write_dicom(tmp_path / "abd.dcm", _chest(), BodyPartExamined="ABDOMEN")
    with pytest.raises(RadiographError, match=r"abd\.dcm.*BodyPartExamined.*ABDOMEN.*force"):
        read_radiograph(p)
    r = read_radiograph(p, force=True)
    assert r.body_part == "ABDOMEN" and any("force" in n for n in r.notes)
    r = read_radiograph(_write_dicom(tmp_path / "nb.dcm", _chest(), BodyPartExamined=None))
    assert any("BodyPartExamined" in n for n in r.notes)


def test_ct_modality_is_refused(tmp_path):
    p = _write_dicom(tmp_path / "ct.dcm", _chest(), Modality="CT")
    with pytest.raises(RadiographError, match=r"ct\.dcm.*Modality.*'CT'"):
        read_radiograph(p, force=True)


def test_png_needs_a_polarity_and_one_channel(tmp_path):
    att = (_chest(bits=8)).astype(np.uint8)
    p = tmp_path / "x.png"
    sitk.WriteImage(sitk.GetImageFromArray(att), str(p))
    with pytest.raises(RadiographError, match=r"x\.png.*polarity"):
        read_radiograph(p)
    bright = read_radiograph(p, polarity="bone_bright", pixel_mm=0.5, sdd_mm=1500.0)
    np.testing.assert_array_equal(bright.image, att)
    assert bright.pixel_mm == (0.5, 0.5) and bright.sdd_mm == 1500.0
    dark = read_radiograph(p, polarity="bone_dark")
    np.testing.assert_array_equal(dark.image, 255.0 - att)
    rgb = tmp_path / "rgb.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([att] * 3, -1), isVector=True), str(rgb))
    with pytest.raises(RadiographError, match=r"rgb\.png.*3 channels"):
        read_radiograph(rgb, polarity="bone_bright")


def test_npy_is_taken_as_is(tmp_path):
    p = tmp_path / "li.npy"
    att = _chest().astype(np.float32) / 1000
    np.save(p, att)
    r = read_radiograph(p, angle_deg=90.0)
    np.testing.assert_array_equal(r.image, att)
    assert r.angle_deg == 90.0 and r.pixel_mm is None


def test_check_covers_compares_the_magnified_field_of_view(tmp_path):
    p = tmp_path / "li.npy"
    np.save(p, _chest(rows=100, cols=100).astype(np.float32))
    r = read_radiograph(p, pixel_mm=4.0, sdd_mm=1500.0, sod_mm=1000.0)  # 400 mm detector
    assert check_covers(r, 260.0) is None  # 390 mm on the detector
    with pytest.raises(RadiographError, match=r"li\.npy.*needs 420 mm"):
        check_covers(r, 280.0)


def test_multi_frame_and_missing_files_are_refused(tmp_path):
    with pytest.raises(RadiographError, match="not found"):
        read_radiograph(tmp_path / "missing.dcm")
    p = tmp_path / "stack.tif"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([_chest()] * 3)), str(p))
    with pytest.raises(RadiographError, match=r"stack\.tif.*2-D"):
        read_radiograph(p, polarity="bone_bright")


@pytest.mark.skipif(not REAL_CR.exists(), reason="needs ../shared/data/xray")
def test_real_pa_chest_cr_has_dark_lungs_and_unknown_pixel_size():
    r = read_radiograph(REAL_CR)
    assert r.image.shape == (1955, 1841) and r.image.dtype == np.float32
    assert (r.modality, r.photometric, r.view_position, r.angle_deg) == (
        "CR",
        "MONOCHROME1",
        "PA",
        0.0,
    )
    assert r.pixel_mm is None and r.sdd_mm == 1996.0
    assert any("pixel size unknown" in n for n in r.notes)
    h, w = r.image.shape
    spine = r.image[h // 4 : 3 * h // 4, w // 2 - w // 20 : w // 2 + w // 20].mean()
    right_lung = r.image[h // 4 : h // 2, w // 5 : w // 3].mean()
    left_lung = r.image[h // 4 : h // 2, 2 * w // 3 : 4 * w // 5].mean()
    assert right_lung < spine and left_lung < spine


def test_monochrome1_check_agrees_with_pydicom(tmp_path):
    """The reader's probe of SimpleITK's MONOCHROME1 handling agrees with raw pixel data."""
    pydicom = pytest.importorskip("pydicom")
    p = _write_dicom(tmp_path / "m1.dcm", _chest(), pi="MONOCHROME1")
    raw = pydicom.dcmread(p).pixel_array.astype(np.float64)
    via_sitk = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))[0].astype(np.float64)
    assert radiograph._sitk_inverts_monochrome1() == (not np.array_equal(raw, via_sitk))


@pytest.mark.parametrize("pi", ["MONOCHROME1", "MONOCHROME2"])
def test_load_xray_gives_bone_high_line_integrals_for_dicom(tmp_path, pi):
    att = _chest(rows=20, cols=20)
    stored = 4095 - att if pi == "MONOCHROME1" else att
    li = radiograph.load_xray(_write_dicom(tmp_path / "x.dcm", stored, pi=pi), 20)
    assert li[10, 10] > li[10, 4] and li[10, 10] > li[10, 15]  # spine above both lungs
