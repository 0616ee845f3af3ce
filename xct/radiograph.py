"""Reading real radiographs: CR/DX DICOM, PNG, TIFF and ``.npy``, with what their tags say.

``read_radiograph`` returns a ``Radiograph``: the image in one polarity and the acquisition
metadata xct needs to place it (pixel size, source distances, view angle), with a list of
what was assumed. It does not calibrate intensities to line integrals nor estimate the pose
or a missing pixel size; those come later, from registration against DRRs.

Polarity. ``Radiograph.image`` is *attenuation-like*: higher value = more attenuation
(bone and mediastinum high, lungs and direct exposure low), like a line integral and like
a radiograph as it is displayed (bone white). Only the ordering is meaningful: the values
went through the detector's response and the vendor's image processing and are monotone,
not linear, in the line integral. DICOM: the DICOM rescale (modality LUT) is applied;
MONOCHROME1 (low values display white) and a Presentation LUT Shape ``INVERSE`` are turned
into this polarity; the display window / VOI LUT is *not* applied (a monotone display
transform that only clips; recorded in the notes).

SimpleITK (GDCM) and MONOCHROME1: SimpleITK already inverts MONOCHROME1 pixel data while
reading, returning ``rescale((2**BitsStored - 1) - stored)`` for unsigned data
(``rescale(-stored - 1)`` for signed), i.e. values where bone is high. Checked on
``chest_pa_cr.dcm`` with SimpleITK 2.5.7 (ITK 5.4): SimpleITK's array equals
``32767 - pydicom.pixel_array`` (BitsStored 15). Older ITK releases returned the stored
values; rather than trust a version number, ``_sitk_inverts_monochrome1`` finds out once per
process by reading a two-pixel MONOCHROME1 file, so the result is the same with either.
(GDCM refuses signed 12-bit MONOCHROME1 data outright; that is reported as undecodable.)

Orientation. The image is returned as xct's detector sees it at ``angle_deg`` (see
``xct.geometry``): row 0 towards the patient's head, columns along the detector's ``u``
axis, which in the projector frame (``xct.io.to_projector_frame``: x = patient's left,
y = feet, z = posterior) is ``(cos a, 0, -sin a)``: the patient's left at 0 degrees (PA),
the right at 180 degrees (AP), anterior at +90 degrees and posterior at -90 degrees. A DICOM
image is flipped to that frame using its PatientOrientation (0020,0020) (or the
``patient_orientation`` argument); without it a frontal view is assumed to be displayed
the radiological way, ``L\\F`` (patient's right on the viewer's left), and a lateral is
kept as stored. PNG/TIFF/``.npy`` are kept as stored unless ``patient_orientation`` is
given.

View angles (gantry degrees, xct's convention: 0 = PA, source behind the patient):
PA -> 0, AP -> 180, RL (right side against the detector, source on the patient's left)
-> +90, LL (left side against the detector, the usual lateral) -> -90.

Pixel size. ``Radiograph.pixel_mm`` is the pixel pitch *at the detector* (what
``xct.geometry`` calls ``pixel_mm`` together with ``sdd_mm``): ImagerPixelSpacing
(0018,1164), not divided by the magnification. ``Radiograph.iso_pixel_mm`` is the size at
the patient (isocentre) plane, ``pixel_mm / magnification``. Without ImagerPixelSpacing,
PixelSpacing (0028,0030) is used (multiplied by the magnification when a calibration type
or a magnification factor says it was measured at the patient). A missing, zero or negative
spacing leaves ``pixel_mm`` None and says so in the notes: it must be estimated, never
guessed.

Only NumPy, SimpleITK and the standard library are used (and JAX's image resize in
``load_xray``); SimpleITK is imported inside the functions, as in ``xct.io``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import struct
import tempfile

import numpy as np

#: The one polarity of ``Radiograph.image`` (see the module docstring).
POLARITY = "attenuation-like"

#: DICOM modalities read as projection radiographs (computed / digital radiography, and
#: "RG", radiographic imaging with film/screen). Fluoroscopy (RF) and angiography (XA)
#: are refused: image intensifiers distort and their geometry tags mean other things.
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG")

#: Substrings of BodyPartExamined (0018,0015) accepted as a chest (free text in practice).
CHEST_BODY_PARTS = ("CHEST", "THORA", "TORAX", "LUNG")

#: ViewPosition (0018,5101) -> gantry angle in degrees.
VIEW_ANGLES_DEG = {"PA": 0.0, "AP": 180.0, "RL": 90.0, "LL": -90.0}

POLARITIES = ("bone_bright", "bone_dark")

_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


class RadiographError(ValueError):
    """Bad radiograph input; the message names the file and the tag or field at fault."""


@dataclasses.dataclass(frozen=True)
class Radiograph:
    """One radiograph, read and oriented, not yet calibrated.

    Attributes:
      image: float32 ``[rows, cols]``, attenuation-like (``POLARITY``), in xct's detector
        frame at ``angle_deg`` (row 0 towards the head).
      pixel_mm: ``(row, col)`` pixel pitch at the detector in mm, or None when unknown (then
        ``needs_pixel_estimate`` and a note say it must be estimated).
      angle_deg: gantry angle of the view in xct's convention (0 = PA, 90 = lateral).
      sdd_mm: source-to-detector distance (DistanceSourceToDetector), or None.
      sod_mm: source-to-isocentre distance (DistanceSourceToPatient), or None.
      magnification: EstimatedRadiographicMagnificationFactor, else ``sdd_mm / sod_mm``
        when both are known, else None.
      view_position: ViewPosition as stored (upper case, "" when absent).
      body_part: BodyPartExamined as stored (upper case, "" when absent).
      modality: Modality ("CR", "DX", ...; "" for files without tags).
      photometric: PhotometricInterpretation ("MONOCHROME1", "MONOCHROME2"; for files
        without tags the ``polarity`` they were read with).
      path: the file read.
      notes: human-readable sentences saying what was assumed or left to estimate.
    """

    image: np.ndarray
    pixel_mm: tuple[float, float] | None
    angle_deg: float
    sdd_mm: float | None
    sod_mm: float | None
    magnification: float | None
    view_position: str
    body_part: str
    modality: str
    photometric: str
    path: pathlib.Path
    notes: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image.shape)

    @property
    def needs_pixel_estimate(self) -> bool:
        """True when the pixel size is unknown and must be estimated (e.g. by registration)."""
        return self.pixel_mm is None

    @property
    def detector_size_mm(self) -> tuple[float, float] | None:
        """``(height, width)`` of the image at the detector in mm, or None."""
        if self.pixel_mm is None:
            return None
        return (self.shape[0] * self.pixel_mm[0], self.shape[1] * self.pixel_mm[1])

    @property
    def iso_pixel_mm(self) -> tuple[float, float] | None:
        """``(row, col)`` pixel size at the patient (isocentre) plane: ``pixel_mm`` divided
        by the magnification; None when either is unknown."""
        if self.pixel_mm is None or self.magnification is None:
            return None
        return (self.pixel_mm[0] / self.magnification, self.pixel_mm[1] / self.magnification)


def read_radiograph(
    path: str | pathlib.Path,
    *,
    angle_deg: float | None = None,
    pixel_mm: float | tuple[float, float] | None = None,
    sdd_mm: float | None = None,
    sod_mm: float | None = None,
    polarity: str | None = None,
    patient_orientation: str | None = None,
    force: bool = False,
) -> Radiograph:
    """Read a radiograph as an attenuation-like ``Radiograph`` with its metadata.

    Args:
      path: a CR/DX DICOM file (any name; Part-10 files are recognised by content), or a
        ``.png``, ``.tif``/``.tiff`` or ``.npy`` image.
      angle_deg: the view's gantry angle; overrides ViewPosition. Default: from ViewPosition
        (PA 0, AP 180, RL +90, LL -90), PA (0) with a note when there is none.
      pixel_mm: detector pixel pitch in mm (one number or ``(row, col)``); overrides the
        tags. Default for PNG/TIFF/``.npy``: unknown (None, with a note).
      sdd_mm, sod_mm: source-to-detector and source-to-isocentre distances in mm; override
        DistanceSourceToDetector / DistanceSourceToPatient.
      polarity: ``"bone_bright"`` (stored values are high where attenuation is high) or
        ``"bone_dark"``. Required for PNG/TIFF; for DICOM it overrides the photometric
        interpretation (for mislabelled files); ``.npy`` is taken as line integrals
        (``"bone_bright"``) by default.
      patient_orientation: DICOM PatientOrientation, e.g. ``"L\\\\F"`` or ``"L,F"``: the
        patient directions of increasing column and of increasing row; overrides the tag.
      force: accept a BodyPartExamined that is not a chest.

    Returns:
      A ``Radiograph`` (see its attributes and the module docstring for polarity,
      orientation and pixel-size conventions).

    Raises:
      RadiographError: (a ``ValueError``) for a missing or unreadable file, an unknown file
        type, a non-radiograph Modality, a colour (RGB, palette) or multi-frame image, a
        non-chest BodyPartExamined (unless ``force``), a ViewPosition with no angle in
        xct's convention (unless ``angle_deg``), a PNG/TIFF without ``polarity``, an
        invalid ``polarity`` or argument, or an image with NaN/inf or no contrast.
    """
    path = pathlib.Path(path)
    fields = _read_fields(path, polarity, force)
    notes = fields.pop("notes")
    image = fields.pop("image")
    is_dicom = fields.pop("dicom")
    stored_orientation = fields.pop("orientation")
    _apply_caller_geometry(path, fields, notes, pixel_mm, sdd_mm, sod_mm)
    angle = _view_angle(path, fields["view_position"], angle_deg, notes)
    orientation = patient_orientation or stored_orientation
    image = _orient(path, image, angle, orientation, is_dicom and not orientation, notes)
    return Radiograph(
        image=np.ascontiguousarray(image, np.float32),
        angle_deg=angle,
        path=path,
        notes=tuple(notes),
        **fields,
    )


def _read_fields(path: pathlib.Path, polarity: str | None, force: bool) -> dict:
    """Read ``path`` by its type (see ``read_radiograph``).

    Returns:
      The ``Radiograph`` fields the file gives (``_empty_fields`` keys; distances in mm),
      with ``image`` (``[rows, cols]`` float, attenuation-like, as stored: not yet
      oriented), ``notes`` (a list of sentences), ``dicom`` (bool) and ``orientation``
      (PatientOrientation as stored, "" when absent).
    """
    if not path.is_file():
        raise RadiographError(
            f"{path}: file not found; expected a radiograph (DICOM, PNG, TIFF, .npy)"
        )
    if polarity is not None and polarity not in POLARITIES:
        raise RadiographError(f"{path}: polarity={polarity!r}; expected one of {POLARITIES}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path, polarity)
    if suffix in _IMAGE_SUFFIXES:
        return _read_image(path, polarity)
    if suffix in _DICOM_SUFFIXES or _is_dicom_file(path):
        return _read_dicom(path, polarity, force)
    raise RadiographError(
        f"{path}: unknown file type {suffix!r}; expected DICOM, .png, .tif/.tiff or .npy"
    )


def _apply_caller_geometry(
    path: pathlib.Path,
    fields: dict,
    notes: list[str],
    pixel_mm: float | tuple[float, float] | None,
    sdd_mm: float | None,
    sod_mm: float | None,
) -> None:
    """Override ``fields``' ``pixel_mm`` (``(row, col)`` mm at the detector), ``sdd_mm`` and
    ``sod_mm`` (mm) with the caller's values where given, check the distances, derive the
    magnification ``sdd_mm / sod_mm`` when no tag gave it, and note what stays unknown.
    Updates ``fields`` and ``notes`` in place."""
    if pixel_mm is not None:
        pixel_mm = _pixel_pair(path, "pixel_mm", pixel_mm)
        notes.append(f"pixel size {pixel_mm} mm given by the caller")
        fields["pixel_mm"] = pixel_mm
    elif fields["pixel_mm"] is None and not any("pixel size" in n for n in notes):
        notes.append("pixel size unknown (no tag): must be estimated, e.g. by registration")
    for name, value in (("sdd_mm", sdd_mm), ("sod_mm", sod_mm)):
        if value is not None:
            if not (math.isfinite(value) and value > 0):
                raise RadiographError(f"{path}: {name}={value!r}; expected a positive distance")
            fields[name] = float(value)
    if fields["sdd_mm"] is None:
        notes.append("source-to-detector distance unknown: must be estimated or given")
    if fields["sod_mm"] is None:
        notes.append("source-to-patient distance unknown: must be estimated or given")
    if fields["sdd_mm"] and fields["sod_mm"] and fields["sod_mm"] >= fields["sdd_mm"]:
        raise RadiographError(
            f"{path}: source-to-patient {fields['sod_mm']} mm >= source-to-detector "
            f"{fields['sdd_mm']} mm; expected the patient between source and detector"
        )
    if fields["magnification"] is None and fields["sdd_mm"] and fields["sod_mm"]:
        fields["magnification"] = fields["sdd_mm"] / fields["sod_mm"]


def _view_angle(path: pathlib.Path, view: str, angle_deg: float | None, notes: list[str]) -> float:
    """The view's gantry angle in degrees (xct's convention, ``VIEW_ANGLES_DEG``): the
    caller's ``angle_deg`` if given, else from the ViewPosition ``view`` (upper case, ""
    when absent: PA, with a note). Appends to ``notes`` what was assumed."""
    if angle_deg is not None:
        if not math.isfinite(angle_deg):
            raise RadiographError(f"{path}: angle_deg={angle_deg!r}; expected a finite angle")
        angle = float(angle_deg)
        if view in VIEW_ANGLES_DEG and not _same_angle(angle, VIEW_ANGLES_DEG[view]):
            notes.append(
                f"angle {angle:g} deg given by the caller; ViewPosition {view} says "
                f"{VIEW_ANGLES_DEG[view]:g} deg"
            )
    elif view in VIEW_ANGLES_DEG:
        angle = VIEW_ANGLES_DEG[view]
    elif view in ("LAT", "LATERAL", "LATERAL VIEW"):
        angle = VIEW_ANGLES_DEG["LL"]
        notes.append(f"ViewPosition {view!r} taken as a left lateral (LL, -90 deg)")
    elif not view:
        angle = 0.0
        notes.append("no ViewPosition: assumed PA (0 deg); pass angle_deg otherwise")
    else:
        raise RadiographError(
            f"{path}: ViewPosition (0018|5101) is {view!r}, which has no angle in xct's "
            f"convention (known: {', '.join(VIEW_ANGLES_DEG)}); pass angle_deg"
        )
    return angle


def check_covers(
    radiograph: Radiograph,
    fov_mm: float,
    sod_mm: float | None = None,
    sdd_mm: float | None = None,
) -> str | None:
    """Check that the radiograph holds a field of view of ``fov_mm`` (side, at the isocentre).

    The field of view is magnified onto the detector by ``sdd_mm / sod_mm`` (default: the
    radiograph's own distances); the detector's physical size is ``pixel_mm * shape``.

    Returns:
      None when checked; a note (a sentence) when it could not be checked because the pixel
      size or a distance is unknown.

    Raises:
      RadiographError: when the detector is smaller than the magnified field of view along
        either axis.
    """
    sod = radiograph.sod_mm if sod_mm is None else sod_mm
    sdd = radiograph.sdd_mm if sdd_mm is None else sdd_mm
    size = radiograph.detector_size_mm
    if size is None:
        return (
            f"{radiograph.path}: pixel size unknown: coverage of a {fov_mm:g} mm field of "
            "view not checked"
        )
    if sod is None or sdd is None:
        return (
            f"{radiograph.path}: source distances unknown: coverage of a {fov_mm:g} mm "
            "field of view not checked"
        )
    need = fov_mm * sdd / sod
    if min(size) < need:
        raise RadiographError(
            f"{radiograph.path}: the radiograph covers {size[0]:.0f} x {size[1]:.0f} mm at the "
            f"detector ({radiograph.shape[0]} x {radiograph.shape[1]} pixels of "
            f"{radiograph.pixel_mm[0]:g} x {radiograph.pixel_mm[1]:g} mm); a {fov_mm:g} mm "
            f"field of view magnified by {sdd:g}/{sod:g} needs {need:.0f} mm along both axes"
        )
    return None


def load_xray(path, size: int) -> np.ndarray:
    """One X-ray as line integrals ``[size, size]`` (uncalibrated for .png / .dcm).

    ``.npy``: already line integrals. ``.png``: detector intensities, so it must be
    *bone-dark* (bright = more photons: lungs and air bright, bone dark); it is converted
    with ``-log(I / I_air)``, ``I_air`` the 99.9th percentile. A radiograph exported the
    way it is displayed (bone white) comes out inverted: convert it first. ``.dcm``:
    read with ``read_radiograph`` (MONOCHROME1/2, rescale and the
    modality/body-part checks), whose attenuation-like image is reflected into bone-dark
    intensities and converted like a PNG, so the polarity is right either way; the
    intensity calibration to line integrals is not done here.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"--xrays: {p} not found")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        img = np.load(p).astype(np.float32)
    elif suffix in (".png", ".dcm", ".dicom"):
        import SimpleITK as sitk

        if suffix == ".png":
            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float32)
        else:  # SimpleITK alone inverts MONOCHROME1: bone bright, read as many photons
            att = read_radiograph(p).image
            arr = att.max() + max(float(att.min()), 1.0) - att  # positive, air brightest
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 and arr.shape[0] == 1 else arr
        if arr.ndim == 3:  # RGB(A) PNG
            arr = arr[..., :3].mean(-1)
        air = np.percentile(arr, 99.9)
        img = -np.log(np.clip(arr, 1e-3 * air, None) / air)
    else:
        raise ValueError(f"--xrays: {p}: expected .npy (line integrals), .png or .dcm")
    if img.ndim != 2:
        raise ValueError(f"--xrays: {p}: expected a 2-D image, got shape {img.shape}")
    if img.shape != (size, size):
        import jax.image

        img = np.asarray(jax.image.resize(img, (size, size), "linear"))
    return img


# --------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------


def _empty_fields() -> dict:
    return dict(
        pixel_mm=None,
        sdd_mm=None,
        sod_mm=None,
        magnification=None,
        view_position="",
        body_part="",
        modality="",
        photometric="",
        orientation="",
        dicom=False,
        notes=[],
    )


def _read_npy(path: pathlib.Path, polarity: str | None) -> dict:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RadiographError(f"{path}: cannot read as .npy ({e})") from e
    arr = _checked_2d(path, np.asarray(arr, np.float32))
    f = _empty_fields()
    f["photometric"] = polarity or "bone_bright"
    f["image"] = -arr if polarity == "bone_dark" else arr
    f["notes"].append(
        ".npy taken as line integrals / attenuation-like as stored"
        if polarity != "bone_dark"
        else ".npy negated (polarity='bone_dark')"
    )
    return f


def _read_image(path: pathlib.Path, polarity: str | None) -> dict:
    import SimpleITK as sitk

    if polarity is None:
        raise RadiographError(
            f"{path}: a {path.suffix} file does not say its polarity; pass polarity='bone_bright' "
            "(bone white, as displayed) or polarity='bone_dark' (bone black, like detector "
            "intensities)"
        )
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise RadiographError(f"{path}: cannot read the image ({_reason(e)})") from e
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise RadiographError(
            f"{path}: a colour image ({img.GetNumberOfComponentsPerPixel()} channels); "
            "expected a single-channel grayscale radiograph"
        )
    arr = sitk.GetArrayFromImage(img)
    dtype = arr.dtype
    arr = _checked_2d(path, arr.astype(np.float32))
    f = _empty_fields()
    f["photometric"] = polarity
    if polarity == "bone_dark":
        top = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 0.0
        arr = top - arr
    f["image"] = arr
    f["notes"].append(f"{path.suffix} read with polarity={polarity!r}")
    return f


def _read_dicom(path: pathlib.Path, polarity: str | None, force: bool) -> dict:
    """Read a CR/DX DICOM file: the fields of ``_read_fields``, from its tags."""
    import SimpleITK as sitk

    reader, meta = _open_dicom(path)
    f = _empty_fields()
    notes = f["notes"]
    modality, pi, body = _check_dicom_header(path, reader, meta, force, notes)
    try:
        arr = sitk.GetArrayFromImage(reader.Execute()).astype(np.float64)
    except RuntimeError as e:
        raise RadiographError(f"{path}: cannot decode the pixel data ({_reason(e)})") from e
    arr = _checked_2d(path, arr.reshape(arr.shape[-2:]) if arr.ndim == 3 else arr)
    image = _dicom_attenuation_like(arr, meta, pi, polarity, notes)
    window = (meta("0028|1050"), meta("0028|1051"))
    if any(window) or reader.HasMetaDataKey("0028|3010"):
        notes.append(
            "display window / VOI LUT not applied (monotone display transform; "
            f"WindowCenter {window[0] or '-'}, WindowWidth {window[1] or '-'})"
        )
    intent = meta("0008|0068").upper()
    if intent:
        notes.append(f"PresentationIntentType {intent}")

    f.update(
        image=image,
        modality=modality,
        photometric=pi,
        body_part=body,
        view_position=meta("0018|5101").upper(),
        orientation=meta("0020|0020"),
        sdd_mm=_positive(meta("0018|1110")),
        sod_mm=_positive(meta("0018|1111")),
        magnification=_positive(meta("0018|1114")),
        dicom=True,
    )
    f["pixel_mm"] = _dicom_pixel_mm(path, meta, f, notes)
    return f


def _open_dicom(path: pathlib.Path):
    """A SimpleITK GDCM reader with the header of ``path`` read (pixels not yet decoded),
    and ``meta(tag)``: the value of a ``"gggg|eeee"`` tag, stripped, "" when absent."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise RadiographError(f"{path}: cannot read as DICOM ({_reason(e)})") from e

    def meta(key):
        return reader.GetMetaData(key).strip(" \0") if reader.HasMetaDataKey(key) else ""

    return reader, meta


def _check_dicom_header(path: pathlib.Path, reader, meta, force: bool, notes: list[str]):
    """Refuse what is not one grayscale chest radiograph (Modality, photometric
    interpretation, samples per pixel, frames, BodyPartExamined unless ``force``).

    Returns:
      ``(modality, photometric, body_part)``, upper case ("" for an absent photometric
      interpretation or body part; a note says a chest was assumed).
    """
    modality = meta("0008|0060").upper()
    if not modality:
        raise RadiographError(
            f"{path}: no DICOM Modality (0008|0060); expected one of {RADIOGRAPH_MODALITIES}"
        )
    if modality not in RADIOGRAPH_MODALITIES:
        raise RadiographError(
            f"{path}: DICOM Modality (0008|0060) is {modality!r}; expected a projection "
            f"radiograph ({', '.join(RADIOGRAPH_MODALITIES)})"
        )
    pi = meta("0028|0004").upper()
    size = tuple(reader.GetSize())
    if reader.GetNumberOfComponents() != 1 or pi not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise RadiographError(
            f"{path}: PhotometricInterpretation (0028|0004) is {pi!r} with "
            f"{reader.GetNumberOfComponents()} samples per pixel; expected a grayscale "
            "MONOCHROME1 or MONOCHROME2 radiograph"
        )
    frames = meta("0028|0008")
    if (len(size) > 2 and size[2] > 1) or (_float(frames) or 1) > 1:
        raise RadiographError(
            f"{path}: a multi-frame image (NumberOfFrames (0028|0008) "
            f"{frames or size[2]}); expected a single radiograph"
        )
    body = meta("0018|0015").upper()
    if not body:
        notes.append("no BodyPartExamined (0018|0015): assumed a chest")
    elif not any(s in body for s in CHEST_BODY_PARTS):
        if not force:
            raise RadiographError(
                f"{path}: BodyPartExamined (0018|0015) is {body!r}; expected a chest "
                "radiograph (CHEST, THORAX, LUNG); pass force=True (--force) to read it anyway"
            )
        notes.append(f"BodyPartExamined {body!r} is not a chest; read because force=True")
    return modality, pi, body


def _dicom_attenuation_like(
    arr: np.ndarray, meta, pi: str, polarity: str | None, notes: list[str]
) -> np.ndarray:
    """``[rows, cols]`` float64 attenuation-like values (bone high) from SimpleITK's pixel
    array ``arr`` (the modality values, MONOCHROME1 maybe inverted; see the module
    docstring), following the photometric interpretation ``pi``, a Presentation LUT Shape
    INVERSE and the caller's ``polarity``. Appends to ``notes`` what was applied."""
    # The modality values M = rescale(stored) and the constant c for which SimpleITK's
    # MONOCHROME1 output is c - M (it inverts the stored values, then rescales).
    slope = _float(meta("0028|1053")) or 1.0
    intercept = _float(meta("0028|1052")) or 0.0
    bits = int(_float(meta("0028|0101")) or 16)
    signed = meta("0028|0103") == "1"
    c = slope * (-1.0 if signed else 2.0**bits - 1.0) + 2.0 * intercept
    mono1 = pi == "MONOCHROME1"
    modality_values = c - arr if (mono1 and _sitk_inverts_monochrome1()) else arr
    bone_bright = not mono1
    if meta("2050|0020").upper() == "INVERSE":
        bone_bright = not bone_bright
        notes.append("Presentation LUT Shape INVERSE: display polarity reversed")
    if polarity is not None:
        if polarity != ("bone_bright" if bone_bright else "bone_dark"):
            notes.append(f"polarity={polarity!r} given by the caller overrides {pi or 'no PI'}")
        bone_bright = polarity == "bone_bright"
    # Attenuation-like: the modality values when bone is bright, else c - M (which is what
    # SimpleITK returns for MONOCHROME1, so both SimpleITK behaviours agree).
    image = modality_values if bone_bright else c - modality_values
    if slope != 1.0 or intercept != 0.0:
        notes.append(f"rescale slope {slope:g}, intercept {intercept:g} applied")
    return image


def _dicom_pixel_mm(path, meta, f, notes) -> tuple[float, float] | None:
    """Detector-plane pixel pitch from ImagerPixelSpacing, else PixelSpacing (see module)."""
    imager = _spacing(meta("0018|1164"))
    pixel = _spacing(meta("0028|0030"))
    mag = f["magnification"]
    if imager is not None:
        if pixel is not None and mag and not np.allclose(pixel, np.divide(imager, mag), 0.02):
            notes.append(
                f"PixelSpacing {pixel} differs from ImagerPixelSpacing {imager} / "
                f"magnification {mag:g}; ImagerPixelSpacing used"
            )
        return imager
    if pixel is None:
        raw = meta("0018|1164") or meta("0028|0030")
        notes.append(
            "pixel size unknown: ImagerPixelSpacing (0018|1164) and PixelSpacing (0028|0030) "
            + (f"are absent or unusable ({raw!r})" if raw else "are absent")
            + "; must be estimated, e.g. by registration"
        )
        return None
    calibrated = meta("0028|0a02")
    if calibrated or mag:
        if mag:
            notes.append(
                f"PixelSpacing {pixel} taken at the patient plane, times the "
                f"magnification {mag:g} for the detector"
            )
            return (pixel[0] * mag, pixel[1] * mag)
        sdd, sod = f["sdd_mm"], f["sod_mm"]
        if sdd and sod:
            notes.append(
                f"PixelSpacing {pixel} calibrated ({calibrated}) at the patient plane, "
                f"times sdd/sod {sdd:g}/{sod:g} for the detector"
            )
            return (pixel[0] * sdd / sod, pixel[1] * sdd / sod)
        notes.append(
            f"PixelSpacing {pixel} is calibrated ({calibrated}) at the patient but the "
            "magnification is unknown: taken as the detector pitch, to be checked"
        )
        return pixel
    notes.append(f"no ImagerPixelSpacing: PixelSpacing {pixel} taken as the detector pitch")
    return pixel


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _checked_2d(path: pathlib.Path, arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise RadiographError(f"{path}: an image of shape {arr.shape}; expected one 2-D radiograph")
    if min(arr.shape) < 2:
        raise RadiographError(f"{path}: an image of shape {arr.shape}; expected a 2-D radiograph")
    if not np.all(np.isfinite(arr)):
        raise RadiographError(f"{path}: NaN or infinite pixel values")
    if float(arr.max()) == float(arr.min()):
        raise RadiographError(f"{path}: constant image ({arr.min():g}); expected a radiograph")
    return arr


def _orient(path, image, angle, orientation: str, assume_display: bool, notes) -> np.ndarray:
    """Flip ``image`` into xct's detector frame at ``angle`` (see the module docstring)."""
    u = np.array([math.cos(math.radians(angle)), 0.0, -math.sin(math.radians(angle))])
    frontal = abs(u[0]) >= math.sqrt(0.5)
    codes = [c.strip().upper() for c in orientation.replace(",", "\\").split("\\") if c.strip()]
    if len(codes) != 2:
        if orientation:
            notes.append(f"PatientOrientation {orientation!r} not understood: kept as stored")
            return image
        if assume_display and frontal:
            codes = ["L", "F"]
            notes.append("no PatientOrientation: assumed L\\F (patient's right on the left)")
        else:
            if abs(angle) > 1e-6:
                notes.append(
                    "no PatientOrientation: image kept as stored (assumed to be in "
                    f"xct's detector frame at {angle:g} deg)"
                )
            return image
    try:
        col_dir, row_dir = (_direction(c) for c in codes)
    except KeyError:
        notes.append(f"PatientOrientation {orientation!r} not understood: kept as stored")
        return image
    if float(col_dir @ u) < -1e-6:
        image = image[:, ::-1]
        notes.append(f"columns flipped: PatientOrientation {'/'.join(codes)} at {angle:g} deg")
    elif abs(float(col_dir @ u)) <= 1e-6:
        notes.append(
            f"PatientOrientation {'/'.join(codes)} does not fit a view at "
            f"{angle:g} deg: columns kept as stored"
        )
    if row_dir[1] < -1e-6:
        image = image[::-1, :]
        notes.append("rows flipped: head at the bottom (PatientOrientation)")
    elif abs(row_dir[1]) <= 1e-6:
        raise RadiographError(
            f"{path}: PatientOrientation (0020|0020) {orientation!r}: rows do not run head to "
            "foot; expected an upright chest radiograph (second value H or F)"
        )
    return image


_LETTERS = {
    "L": (1, 0, 0),
    "R": (-1, 0, 0),
    "F": (0, 1, 0),
    "H": (0, -1, 0),
    "P": (0, 0, 1),
    "A": (0, 0, -1),
}


def _direction(code: str) -> np.ndarray:
    """Projector-frame direction (x = left, y = feet, z = posterior) of a DICOM code ("LP")."""
    return np.sum([_LETTERS[ch] for ch in code], axis=0).astype(np.float64)


def _same_angle(a: float, b: float) -> bool:
    return abs((a - b + 180.0) % 360.0 - 180.0) < 1e-6


def _float(s: str) -> float | None:
    try:
        v = float(s.split("\\")[0])
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _positive(s: str) -> float | None:
    v = _float(s) if s else None
    return v if v is not None and v > 0 else None


def _spacing(s: str) -> tuple[float, float] | None:
    """``(row, col)`` mm from a DICOM ``row\\col`` string; None when absent, zero or bad."""
    parts = [p.strip() for p in s.split("\\") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        return None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or not all(math.isfinite(v) and v > 0 for v in vals):
        return None
    return (vals[0], vals[1])


def _pixel_pair(path, name, value) -> tuple[float, float]:
    vals = np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (2,))
    if not np.all(np.isfinite(vals) & (vals > 0)):
        raise RadiographError(f"{path}: {name}={value!r}; expected positive millimetres")
    return (float(vals[0]), float(vals[1]))


def _reason(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if any("invalid logic behavior" in ln for ln in lines):
        return "GDCM cannot decode it (malformed or unsupported DICOM encoding)"
    return lines[-1] if lines else type(err).__name__


def _is_dicom_file(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


@functools.cache
def _sitk_inverts_monochrome1() -> bool:
    """Whether this SimpleITK build inverts MONOCHROME1 pixel data when reading: reads a
    two-pixel MONOCHROME1 CR file with stored values ``[0, 1000]``."""
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as tmp:
        p = pathlib.Path(tmp) / "mono1.dcm"
        p.write_bytes(_tiny_monochrome1_dicom())
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p), imageIO="GDCMImageIO")).ravel()
    return bool(arr[0] > arr[1])


def _tiny_monochrome1_dicom() -> bytes:
    """A minimal Part-10 file (explicit VR little endian): 1 x 2 uint16, stored [0, 1000]."""

    def el(group, elem, vr, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0" if vr in ("UI", "OB", "OW") else b" "
        head = struct.pack("<HH", group, elem) + vr.encode()
        if vr in ("OB", "OW"):
            return head + b"\0\0" + struct.pack("<I", len(value)) + value
        return head + struct.pack("<H", len(value)) + value

    def us(group, elem, v):
        return el(group, elem, "US", struct.pack("<H", v))

    cr = b"1.2.840.10008.5.1.4.1.1.1"
    uid = b"1.2.826.0.1.3680043.2.1125.1"
    meta = (
        el(2, 1, "OB", b"\0\1")
        + el(2, 2, "UI", cr)
        + el(2, 3, "UI", uid)
        + el(2, 0x10, "UI", b"1.2.840.10008.1.2.1")
    )
    meta = el(2, 0, "UL", struct.pack("<I", len(meta))) + meta
    data = (
        el(8, 0x16, "UI", cr)
        + el(8, 0x18, "UI", uid)
        + el(8, 0x60, "CS", b"CR")
        + us(0x28, 2, 1)
        + el(0x28, 4, "CS", b"MONOCHROME1")
        + us(0x28, 0x10, 1)
        + us(0x28, 0x11, 2)
        + us(0x28, 0x100, 16)
        + us(0x28, 0x101, 16)
        + us(0x28, 0x102, 15)
        + us(0x28, 0x103, 0)
        + el(0x7FE0, 0x10, "OW", struct.pack("<2H", 0, 1000))
    )
    return b"\0" * 128 + b"DICM" + meta + data
