"""Host-side reading, checking, writing and preprocessing of CT volumes (SimpleITK).

Reading: ``read_ct`` takes a DICOM series folder, a single DICOM file, NIfTI, MHA/MHD or
NRRD and returns Hounsfield units as a ``[z, y, x]`` float32 array with its ``VolumeGrid``
(spacing, origin and direction kept). Bad input raises ``CTReadError`` (a ``ValueError``)
whose message names the file and says what was expected. Two SimpleITK behaviours make
some checks ours rather than the library's: it reads a truncated NIfTI (``.nii`` or
``.nii.gz``) without error, zero-filling the missing voxels, and its DICOM series reader
only warns about missing slices or non-uniform slice spacing.

``load_cube`` is the one path from a file to a model's cube: read, check, preprocess, then
the projector frame (``to_projector_frame`` and its inverse ``from_projector_frame``); every
reader of CTs for datasets, evaluation, templates and demos goes through it.

Preprocessing (pure NumPy/SimpleITK, for dataset builders): ``canonical_orientation``,
``resample_isotropic``, ``body_mask``, ``remove_couch``, ``crop_or_pad_cube``, ``resize``
and ``preprocess``, which chains them. Every transform takes and returns ``(hu, grid)``
with ``hu`` a ``[z, y, x]`` array in HU and ``grid`` its ``VolumeGrid``.

SimpleITK is imported inside the functions so that ``import xct.io`` works without it.
Besides NumPy and SimpleITK only the standard library is used (``zlib`` to measure the
decompressed length of a ``.nii.gz``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import zlib
from collections.abc import Iterator

import numpy as np

from xct.geometry import VolumeGrid

#: Orientation code that ``canonical_orientation`` produces (ITK/DICOM convention: the
#: letters name where increasing x, y and z indices point). ``"LPS"``: array ``[z, y, x]``
#: runs inferior->superior along z, anterior->posterior along y, and the patient's
#: right->left along x; the direction matrix of an axis-aligned scan is the identity. With
#: the patient supine, the couch lies at large y (the last rows of every axial slice).
CANONICAL_ORIENTATION = "LPS"

#: HU window that ``preprocess`` clips to (air and 12-bit scanner range; the -3024 or
#: -2048 that scanners store outside the reconstruction circle becomes air).
HU_CLIP = (-1024.0, 3071.0)

_VOLUME_KINDS = "a DICOM series folder or a CT volume file (DICOM, NIfTI, MHA/MHD, NRRD)"
_CT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
)


class CTReadError(ValueError):
    """Bad CT input; the message names the file and says what was expected."""


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


CT_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")  # single-file volume formats


def is_dicom_file(path: pathlib.Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble (names often lack .dcm)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


MIN_SLICES = 8  # fewer slices than this is a scout or single slice, not a volume
MIN_EXTENT_MM = 30.0  # nor is a slab thinner than this


def check_ct_volume(path, grid) -> None:
    """``ValueError`` naming ``path`` unless the image is a volume: at least ``MIN_SLICES``
    voxels and ``MIN_EXTENT_MM`` along every axis (``grid`` from ``read_ct``)."""
    extent_mm = np.asarray(grid.shape) * np.asarray(grid.spacing_mm)
    if min(grid.shape) < MIN_SLICES or extent_mm.min() < MIN_EXTENT_MM:
        raise ValueError(
            f"{path}: a {grid.shape[::-1]} (x, y, z) image of {np.round(extent_mm[::-1], 1)} mm "
            f"is not a CT volume; expected at least {MIN_SLICES} slices and {MIN_EXTENT_MM} mm "
            "along every axis"
        )


def find_ct_sources(root, what: str = "source_dir") -> list[pathlib.Path]:
    """Volume files (NIfTI, MHA/MHD, NRRD) and DICOM series folders under ``root``, sorted.
    ``what`` names the argument in the error when ``root`` is not a directory."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"{what}: {root} is not a directory")
    found = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name.lower().endswith(CT_SUFFIXES):
            found.append(p)
        elif p.is_dir():
            files = sorted(q for q in p.iterdir() if q.is_file())[:8]
            if any(q.suffix.lower() == ".dcm" or is_dicom_file(q) for q in files):
                found.append(p)
    return found


def read_ct(
    path: str | pathlib.Path,
    *,
    series_uid: str | None = None,
    hu_offset: float = 0.0,
    check_hu: bool = True,
) -> tuple[np.ndarray, VolumeGrid]:
    """Read a CT scan: HU as a ``[z, y, x]`` float32 array and its ``VolumeGrid``.

    Args:
      path: a folder of DICOM slices, a single DICOM file, or a NIfTI (``.nii``,
        ``.nii.gz``), MHA/MHD or NRRD volume.
      series_uid: for a folder, the SeriesInstanceUID to read; by default its one CT
        series (localizers and, beside a longer CT series, scouts of fewer than
        ``MIN_SLICES`` slices are passed over; several CT series are refused with a list).
        Slices are ordered by their position along the slice normal and the DICOM rescale
        slope/intercept is applied; a gantry tilt or a damaged slice is refused.
      hu_offset: added to every value after reading, in HU; ``-1024`` reads files stored
        as HU+1024 (air at 0).
      check_hu: reject values that do not look like HU (see below). Turn off only for
        volumes known to be HU yet containing no air or fat.

    Returns:
      ``(hu, grid)``: ``hu`` float32 ``[nz, ny, nx]`` in HU; ``grid`` with spacing (mm),
      origin (mm, ITK's LPS world) and direction as stored in the file.

    Raises:
      CTReadError: (a ``ValueError``) for a missing, unreadable or truncated file; a DICOM
        modality other than CT; missing or duplicated slices or non-uniform slice spacing
        in a series; NaN or infinite values; an empty or constant volume; zero or negative
        spacing; NIfTI-2; a DICOM RescaleType other than HU; or values that are not HU (no
        voxel below -50, or, for files without DICOM tags vouching for HU, a histogram
        unlike a CT's: see ``_hu_model_problems``; HU+1024 storage is named as such).
    """
    import SimpleITK as sitk

    path = pathlib.Path(path)
    if not path.exists():
        raise CTReadError(f"{path}: file not found; expected {_VOLUME_KINDS}")
    if path.is_dir():
        img, tagged_ct = _read_dicom_series(path, series_uid)
    else:
        if series_uid is not None:
            raise CTReadError(
                f"{path}: series_uid={series_uid!r} needs a DICOM series folder, got a file"
            )
        img, tagged_ct = _read_volume_file(path)
    hu = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
    try:
        grid = VolumeGrid.from_sitk(img)
    except ValueError as e:
        raise CTReadError(f"{path}: unusable geometry ({e})") from e
    return _checked_hu(path, hu, hu_offset, check_hu, histogram=not tagged_ct), grid


def _reason(err: Exception) -> str:
    """The informative last line of a SimpleITK exception (GDCM's internal assertions,
    "An invalid logic behavior occurred...", become a sentence)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if any("invalid logic behavior" in ln for ln in lines):
        return "GDCM cannot parse its data elements (malformed or unsupported DICOM encoding)"
    return lines[-1] if lines else type(err).__name__


def _meta(reader, key: str) -> str:
    return reader.GetMetaData(key).strip(" \0") if reader.HasMetaDataKey(key) else ""


def _check_modality(path: pathlib.Path, reader) -> bool:
    """Reject DICOM whose Modality (0008|0060), or SOP class when it is absent, is not CT,
    or whose RescaleType (0028|1054) names units other than HU.

    Returns whether the tags vouch for HU: False for RescaleType 'US' ("unspecified"),
    which SimpleITK's own DICOM writer puts on every CT it writes, so such values are
    checked like those of a file without tags (``_hu_model_problems``)."""
    rescale_type = _meta(reader, "0028|1054")
    modality = _meta(reader, "0008|0060")
    if modality:
        if modality.upper() != "CT":
            raise CTReadError(f"{path}: DICOM Modality (0008|0060) is {modality!r}; expected 'CT'")
    if rescale_type and rescale_type.upper() not in ("HU", "US"):
        raise CTReadError(
            f"{path}: DICOM RescaleType (0028|1054) is {rescale_type!r}: the rescaled values "
            "are not Hounsfield units; expected 'HU' (or no RescaleType) for a CT"
        )
    sop_class = _meta(reader, "0008|0016")
    if not modality and sop_class and sop_class not in _CT_SOP_CLASSES:
        raise CTReadError(
            f"{path}: DICOM SOP class (0008|0016) {sop_class} is not a CT image; expected CT"
        )
    return rescale_type.upper() != "US"


def _check_shape(path: pathlib.Path, reader) -> None:
    dim, size = reader.GetDimension(), tuple(reader.GetSize())
    if dim != 3:
        raise CTReadError(f"{path}: a {dim}-D image of size {size}; expected a 3-D CT volume")
    if reader.GetNumberOfComponents() != 1:
        raise CTReadError(
            f"{path}: {reader.GetNumberOfComponents()} values per voxel; expected one (HU)"
        )
    if 0 in size:
        raise CTReadError(f"{path}: empty volume of size {size} (x, y, z); expected voxels")


def _read_volume_file(path: pathlib.Path):
    """A single file through SimpleITK, checked before and after its voxels are read.

    Returns ``(image, tagged_ct)``: ``tagged_ct`` when DICOM tags say the file is CT in HU."""
    import SimpleITK as sitk

    _check_header_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        if is_dicom_file(path):
            modality = _sniff_dicom_modality(path)
            if modality and modality.upper() != "CT":
                raise CTReadError(
                    f"{path}: DICOM Modality (0008|0060) is {modality!r}; expected 'CT'"
                ) from e
            raise CTReadError(
                f"{path}: a DICOM file that cannot be read ({_reason(e)}); expected a CT image"
            ) from e
        raise CTReadError(
            f"{path}: not a readable image ({_reason(e)}); expected {_VOLUME_KINDS}"
        ) from e
    _check_shape(path, reader)
    # ImageFileReader.GetImageIO() is empty unless set, so recognise DICOM by its tags and
    # NIfTI by its header bytes.
    tagged_ct = reader.HasMetaDataKey("0008|0060") or reader.HasMetaDataKey("0008|0016")
    if tagged_ct:
        tagged_ct = _check_modality(path, reader)
    _check_nifti(path)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute(), tagged_ct
    except RuntimeError as e:
        raise CTReadError(
            f"{path}: the header is readable but the voxel data is not ({_reason(e)}); "
            "the file looks truncated or corrupt, expected a complete volume"
        ) from e


def _sniff_dicom_modality(path: pathlib.Path) -> str:
    """Modality (0008,0060) from the raw bytes of a DICOM file GDCM cannot parse, or ""."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 18)
    except OSError:
        return ""
    for tag, order in ((b"\x08\x00\x60\x00", "little"), (b"\x00\x08\x00\x60", "big")):
        i = data.find(tag, 132)
        if i < 0:
            continue
        if data[i + 4 : i + 6] == b"CS":  # explicit VR: 2-byte length
            n, start = int.from_bytes(data[i + 6 : i + 8], order), i + 8
        else:  # implicit VR: 4-byte length
            n, start = int.from_bytes(data[i + 4 : i + 8], order), i + 8
        if 0 < n <= 16:
            return data[start : start + n].decode("ascii", "replace").strip(" \0")
    return ""


def _text_header(path: pathlib.Path, stop: bytes) -> list[tuple[str, str]]:
    """``(key, value)`` lines of a MetaImage/NRRD text header (up to ``stop`` or 64 KiB)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    out = []
    for raw in head.split(b"\n"):
        if stop and raw.strip().startswith(stop) or (not stop and not raw.strip()):
            break
        line = raw.decode("latin-1").strip()
        for sep in ("=", ":"):
            if sep in line:
                key, value = line.split(sep, 1)
                out.append((key.strip().lower(), value.strip()))
                break
    return out


def _bad_spacing(path: pathlib.Path, spacing, where: str) -> None:
    spacing = [float(v) for v in spacing]
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise CTReadError(
            f"{path}: {where} gives voxel spacing {tuple(spacing)} mm; expected positive "
            "spacing on every axis (a zero or negative spacing is not a usable geometry)"
        )


def _check_header_file(path: pathlib.Path) -> None:
    """Checks of a volume file's header before SimpleITK reads it.

    SimpleITK turns a NIfTI pixdim of 0 into an invented 1 mm and a negative one (also a
    negative MetaImage ElementSpacing) into its absolute value; it cannot read NIfTI-2, and
    says only "nifti_image_load failed" for a ``.hdr`` whose ``.img`` is missing.
    """
    name = path.name.lower()
    if name.endswith((".hdr", ".hdr.gz")):
        stem = path.name[: -len(".hdr.gz")] if name.endswith(".gz") else path.stem
        images = [path.with_name(stem + s) for s in (".img", ".img.gz", ".IMG")]
        if not any(q.exists() for q in images):
            raise CTReadError(
                f"{path}: the voxel file {stem}.img is missing; a .hdr/.img pair (NIfTI or "
                "Analyze) needs both files side by side"
            )
    elif name.endswith((".img", ".img.gz")):
        stem = path.name[: -len(".img.gz")] if name.endswith(".gz") else path.stem
        if not path.with_name(stem + ".hdr").exists():
            raise CTReadError(
                f"{path}: the header file {stem}.hdr is missing; a .hdr/.img pair (NIfTI or "
                "Analyze) needs both files side by side"
            )
        path = path.with_name(stem + ".hdr")
    if name.endswith((".mha", ".mhd")):
        for key, value in _text_header(path, b"ElementDataFile"):
            if key == "elementspacing":
                try:
                    _bad_spacing(path, value.split(), "ElementSpacing")
                except ValueError as e:
                    if isinstance(e, CTReadError):
                        raise
                    raise CTReadError(f"{path}: unreadable ElementSpacing {value!r}") from e
        return
    if name.endswith((".nrrd", ".nhdr")):
        for key, value in _text_header(path, b""):
            if key == "space directions":
                vectors = [v.strip("() ") for v in value.split(")") if v.strip()]
                try:
                    norms = [
                        float(np.linalg.norm([float(x) for x in v.split(",")]))
                        for v in vectors
                        if v.lower() != "none"
                    ]
                except ValueError:
                    continue
                _bad_spacing(path, norms, "NRRD space directions")
            elif key == "spacings":
                try:
                    values = [float(v) for v in value.split() if v.lower() != "nan"]
                except ValueError:
                    continue
                _bad_spacing(path, values, "NRRD spacings")
        return
    info = _nifti_header(_nifti_head(path))
    if info is None:
        return
    if info["version"] == 2:
        raise CTReadError(
            f"{path}: NIfTI-2 is not supported (SimpleITK reads NIfTI-1 only); expected a "
            "NIfTI-1 file: convert it, e.g. with nibabel, nib.save(nib.Nifti1Image("
            "img.get_fdata(), img.affine), 'ct.nii.gz')"
        )
    ndim = min(int(info["dims"][0]), 3)
    _bad_spacing(path, info["pixdim"][1 : ndim + 1], "the NIfTI header's pixdim")


def _nifti_head(path: pathlib.Path) -> bytes:
    """The first 544 (decompressed) bytes of a file, for ``_nifti_header``."""
    try:
        with open(path, "rb") as f:
            first = f.read(1 << 16)
    except OSError:
        return b""
    if first[:2] == b"\x1f\x8b":
        try:
            return zlib.decompressobj(wbits=31).decompress(first, 544)
        except zlib.error:
            return b""
    return first[:544]


def _nifti_stream(path: pathlib.Path, gzipped: bool, keep: bool) -> tuple[int, bytes, bool]:
    """``(data length, the data if keep else b"", whether every gzip member ended)``.

    For a ``.gz`` the length is that of the decompressed stream, read in bounded chunks.
    """
    if not gzipped:
        data = path.read_bytes() if keep else b""
        return path.stat().st_size, data, True
    total, parts, complete = 0, [], True
    d = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while raw := f.read(1 << 22):
            while raw:
                if d.eof:  # another gzip member may follow; trailing zero padding is legal
                    raw = raw.lstrip(b"\0")
                    if not raw:
                        break
                    d = zlib.decompressobj(wbits=31)
                try:
                    out = d.decompress(raw, 1 << 26)  # bounded output per call
                except zlib.error as e:
                    raise CTReadError(
                        f"{path}: corrupt gzip stream ({e}); expected a valid .nii.gz"
                    ) from e
                total += len(out)
                if keep:
                    parts.append(out)
                raw = d.unused_data if d.eof else d.unconsumed_tail
        complete = d.eof
    return total, b"".join(parts), complete


def _nifti_header(head: bytes) -> dict | None:
    """Fields of a NIfTI-1/2 (single file or ``.hdr``) or Analyze 7.5 header, or None.

    ``single`` is True for a single-file NIfTI (``n+1``/``n+2``), whose voxels follow the
    header at ``vox_offset``; ``expected`` is then the least file length.
    """
    if len(head) < 348:
        return None
    for order in ("<", ">"):
        sizeof_hdr = int(np.frombuffer(head[:4], f"{order}i4")[0])
        if sizeof_hdr == 348 and head[344:347] in (b"n+1", b"ni1", b"\0\0\0"):
            version, single = 1, head[344:347] == b"n+1"
            dims = np.frombuffer(head[40:56], f"{order}i2").astype(np.int64)
            datatype = int(np.frombuffer(head[70:72], f"{order}i2")[0])
            bitpix = int(np.frombuffer(head[72:74], f"{order}i2")[0])
            pixdim = np.frombuffer(head[76:108], f"{order}f4").astype(np.float64)
            vox_offset = int(np.frombuffer(head[108:112], f"{order}f4")[0])
            break
        if sizeof_hdr == 540 and len(head) >= 540 and head[4:7] in (b"n+2", b"ni2"):
            version, single = 2, head[4:7] == b"n+2"
            datatype = int(np.frombuffer(head[12:14], f"{order}i2")[0])
            bitpix = int(np.frombuffer(head[14:16], f"{order}i2")[0])
            dims = np.frombuffer(head[16:80], f"{order}i8").astype(np.int64)
            pixdim = np.frombuffer(head[104:168], f"{order}f8").astype(np.float64)
            vox_offset = int(np.frombuffer(head[168:176], f"{order}i8")[0])
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod(np.maximum(dims[1 : ndim + 1], 1)))
    float_dtype = {16: f"{order}f4", 64: f"{order}f8"}.get(datatype)
    return {
        "version": version,
        "single": single,
        "dims": dims,
        "pixdim": pixdim,
        "vox_offset": vox_offset,
        "voxels": voxels,
        "expected": vox_offset + voxels * bitpix // 8,
        "float_dtype": float_dtype,
    }


def _check_nifti(path: pathlib.Path) -> None:
    """Checks on the raw bytes of a single-file NIfTI that SimpleITK's reader hides.

    SimpleITK zero-fills the missing part of a truncated ``.nii``/``.nii.gz`` without an
    error, and turns NaN voxels of a float NIfTI into 0; so compare the (decompressed) data
    length with the header's voxel count, and count non-finite float voxels ourselves.
    Files that are not NIfTI pass unchecked (other readers fail on truncation themselves).
    """
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    info = _nifti_header(_nifti_head(path))
    if info is None or not info["single"]:
        return
    keep = info["float_dtype"] is not None
    length, data, complete = _nifti_stream(path, gzipped, keep)
    what = "decompressed data" if gzipped else "file"
    if length < info["expected"]:
        raise CTReadError(
            f"{path}: truncated file: the NIfTI header promises {info['expected']} bytes of "
            f"header and voxels but the {what} holds only {length}; expected a complete file"
        )
    if not complete:
        raise CTReadError(
            f"{path}: truncated file: the gzip stream ends early; expected a complete .gz"
        )
    if keep:
        voxels = np.frombuffer(
            data, info["float_dtype"], count=info["voxels"], offset=info["vox_offset"]
        )
        bad = int(np.count_nonzero(~np.isfinite(voxels)))
        if bad:
            raise CTReadError(
                f"{path}: {bad} of {voxels.size} voxels are NaN or infinite; expected finite HU"
            )


def _series_summary(uid: str, files: list[str]) -> tuple[str, int, bool]:
    """``(modality, slice count, is a localizer)`` of a series, from its first file."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(files[0])
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return "?", len(files), False
    modality = _meta(r, "0008|0060").upper() or (
        "CT" if _meta(r, "0008|0016") in _CT_SOP_CLASSES else "?"
    )
    return modality, len(files), "LOCALIZER" in _meta(r, "0008|0008").upper()


def _choose_series(folder: pathlib.Path, series: dict[str, list[str]]) -> str:
    """The SeriesInstanceUID to read when none is given: the one CT series that is not a
    localizer (scouts of fewer than ``MIN_SLICES`` slices are passed over when a longer CT
    series is there). Several CT series are refused with a list; without any CT series
    the largest is chosen (and refused by its modality)."""
    if len(series) == 1:
        return next(iter(series))
    info = {uid: _series_summary(uid, files) for uid, files in series.items()}
    ct = [u for u, (m, _, localizer) in info.items() if m == "CT" and not localizer]
    if len(ct) > 1 and any(info[u][1] >= MIN_SLICES for u in ct):
        ct = [u for u in ct if info[u][1] >= MIN_SLICES]
    if len(ct) == 1:
        return ct[0]
    if not ct:
        return max(series, key=lambda u: len(series[u]))
    listing = "; ".join(f"{u} ({info[u][0]}, {info[u][1]} slices)" for u in ct)
    raise CTReadError(
        f"{folder}: {len(ct)} CT series in one folder: {listing}; expected one, or choose "
        "one: read_ct(folder, series_uid=UID), --series_uids=ID=UID (data_pipelines.build "
        "ct_folder) or --eval_series_uids=NAME=UID (xct.main --mode=evaluate)"
    )


def _check_left_out(folder: pathlib.Path, series: dict[str, list[str]], uid: str) -> None:
    """Name DICOM files of the folder that GDCM left out of every series because it could
    not parse them (it drops them silently, so a damaged first or last slice would make a
    shorter volume without an error)."""
    import SimpleITK as sitk

    listed = {pathlib.Path(f).name for files in series.values() for f in files}
    for q in sorted(folder.iterdir()):
        if not q.is_file() or q.name in listed or q.name.upper() == "DICOMDIR":
            continue
        if not (q.suffix.lower() == ".dcm" or is_dicom_file(q)):
            continue
        r = sitk.ImageFileReader()
        r.SetFileName(str(q))
        try:
            r.ReadImageInformation()
            if _meta(r, "0020|000e") != uid:
                continue  # a readable DICOM of another kind (structure set, report, ...)
            r.Execute()
            reason = "GDCM did not list it with its series"
        except RuntimeError as e:
            reason = _reason(e)
        raise CTReadError(
            f"{folder}: slice {q.name} is damaged or unreadable ({reason}); expected every "
            "DICOM file of the folder to be a readable slice"
        )


def _read_dicom_series(folder: pathlib.Path, series_uid: str | None):
    """The chosen series of a DICOM folder after checking modality and slice positions.

    Returns ``(image, hu_tagged)``: ``hu_tagged`` unless a slice's RescaleType says the
    units are unspecified ('US', as SimpleITK's own DICOM writer puts it).
    """
    import SimpleITK as sitk

    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        _check_left_out(folder, {}, "")
        raise CTReadError(
            f"{folder}: no DICOM series found in this folder; expected DICOM slice files"
        )
    series = {
        uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids
    }
    if series_uid is not None:
        if series_uid not in ids:
            raise CTReadError(
                f"{folder}: no series with SeriesInstanceUID {series_uid!r}; found {ids}"
            )
    else:
        series_uid = _choose_series(folder, series)
    _check_left_out(folder, series, series_uid)
    files, hu_tagged = _ordered_slices(folder, series[series_uid])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        for f in files:  # name the slice that fails on its own
            try:
                sitk.ReadImage(f, sitk.sitkFloat32)
            except RuntimeError as e1:
                raise CTReadError(
                    f"{folder}: slice {pathlib.Path(f).name} is damaged or unreadable "
                    f"({_reason(e1)}); expected readable CT slices"
                ) from e
        raise CTReadError(
            f"{folder}: the DICOM series could not be read ({_reason(e)}); "
            "expected readable CT slices"
        ) from e
    if 0 in img.GetSize():
        raise CTReadError(f"{folder}: empty volume of size {img.GetSize()}; expected voxels")
    return img, hu_tagged


#: Largest in-plane drift of slice positions, in pixels over the whole stack, that is
#: taken as rounding in ImagePositionPatient rather than a gantry tilt or a shear.
_MAX_INPLANE_DRIFT_PX = 0.5


def _ordered_slices(folder: pathlib.Path, files: list[str]) -> tuple[list[str], bool]:
    """Slice files sorted by position along the slice normal; raises on gaps or duplicates,
    on a gantry tilt (positions not along the normal) and on non-CT slices.

    The position of a slice is its ImagePositionPatient (0020|0032) projected on the
    normal of its ImageOrientationPatient (0020|0037). Returns ``(files, hu_tagged)``
    (see ``_check_modality``).
    """
    import SimpleITK as sitk

    positions, orientations, hu_tagged, pixel_mm = [], [], True, 0.5
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        try:
            r.ReadImageInformation()
        except RuntimeError as e:
            raise CTReadError(
                f"{folder}: slice {pathlib.Path(f).name} is damaged or unreadable "
                f"({_reason(e)}); expected readable CT slices"
            ) from e
        hu_tagged &= _check_modality(pathlib.Path(f), r)
        try:
            ipp = [float(v) for v in _meta(r, "0020|0032").split("\\")]
            iop = [float(v) for v in _meta(r, "0020|0037").split("\\")]
        except ValueError:
            ipp, iop = [], []
        if len(ipp) != 3 or len(iop) != 6:
            if len(files) == 1:
                return files, hu_tagged
            raise CTReadError(
                f"{folder}: slice {pathlib.Path(f).name} lacks ImagePositionPatient "
                "(0020|0032) or ImageOrientationPatient (0020|0037); expected both on every "
                "slice of a series"
            )
        positions.append(ipp)
        orientations.append(iop)
        if len(positions) == 1:
            try:
                pixel_mm = min(float(v) for v in _meta(r, "0028|0030").split("\\")) or 0.5
            except ValueError:
                pass
    iop = np.asarray(orientations)
    if not np.allclose(iop, iop[0], atol=1e-4):
        raise CTReadError(
            f"{folder}: slices have different orientations (0020|0037); expected one stack"
        )
    normal = np.cross(iop[0, :3], iop[0, 3:])
    z = np.asarray(positions) @ normal
    order = np.argsort(z, kind="stable")
    z, files = z[order], [files[i] for i in order]
    if len(files) < 2:
        return files, hu_tagged
    gaps = np.diff(z)
    names = [pathlib.Path(f).name for f in files]
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise CTReadError(
            f"{folder}: duplicated slice: {names[i]} and {names[i + 1]} are both at "
            f"{z[i]:.3f} mm along the slice normal; expected one slice per position"
        )
    _check_no_tilt(folder, np.asarray(positions)[order], iop[0], z, pixel_mm)
    step = float(np.median(gaps))
    tol = max(0.01, 0.01 * step)
    bad = np.flatnonzero(np.abs(gaps - step) > tol)
    if bad.size:
        i = int(bad[0])
        g = float(gaps[i])
        multiple = round(g / step)
        if multiple >= 2 and abs(g - multiple * step) <= tol * multiple:
            raise CTReadError(
                f"{folder}: missing slice(s): a gap of {g:.3f} mm between {names[i]} "
                f"({z[i]:.3f} mm) and {names[i + 1]} ({z[i + 1]:.3f} mm), about "
                f"{multiple - 1} slice(s) absent; expected uniform spacing of {step:.3f} mm"
            )
        raise CTReadError(
            f"{folder}: non-uniform slice spacing: {g:.3f} mm between {names[i]} and "
            f"{names[i + 1]}, elsewhere {step:.3f} mm; expected uniform slice spacing"
        )
    return files, hu_tagged


def _check_no_tilt(folder, positions, iop, z, pixel_mm: float) -> None:
    """Refuse slices whose positions move in-plane from slice to slice (a gantry tilt, or a
    sheared stack): SimpleITK would stack them as if they did not, shifting the anatomy."""
    inplane = (positions - positions[0]) @ np.stack([iop[:3], iop[3:]], axis=1)  # [n, 2] mm
    drift = float(np.abs(inplane).max())
    if drift <= _MAX_INPLANE_DRIFT_PX * pixel_mm:
        return
    dz = z - z[0]
    slope = np.linalg.lstsq(dz[:, None], inplane, rcond=None)[0][0]  # in-plane mm per mm
    residual = float(np.abs(inplane - dz[:, None] * slope[None]).max())
    if residual <= _MAX_INPLANE_DRIFT_PX * pixel_mm:
        angle = float(np.degrees(np.arctan(np.hypot(*slope))))
        raise CTReadError(
            f"{folder}: gantry tilt of {angle:.2f} degrees is not supported: slice positions "
            f"(0020|0032) move {drift:.2f} mm in-plane over the stack; expected slices "
            "stacked along their normal (resample the series to an untilted grid first)"
        )
    raise CTReadError(
        f"{folder}: slice positions (0020|0032) wander {drift:.2f} mm in-plane across the "
        "stack; expected slices stacked along their normal"
    )


#: Histogram model of a CT in HU, for files without a modality tag (NIfTI, MHA, NRRD).
#: Voxels below ``_PAD_BELOW_HU`` are the scanner's "no data" outside the reconstruction
#: circle (-1024, -2048, -3024) and are left out; of the rest, those above ``_AIR_BELOW_HU``
#: are tissue (lung parenchyma, fat, soft tissue, bone, contrast, metal).
_PAD_BELOW_HU = -1200.0
_AIR_BELOW_HU = -850.0
_SOFT_HU = (-200.0, 300.0)  # fat, water, soft tissue, contrast-enhanced blood
_MIN_SOFT_FRACTION = 0.2  # of tissue voxels; every shared real CT has more than 0.5
_TISSUE_MEDIAN_HU = (-300.0, 500.0)  # the shared real CTs: -103..49
_MAX_ABOVE_3100_FRACTION = 0.02  # beyond the 12-bit scanner range: metal only, a few voxels
# Air outside the body or lung parenchyma, and the valley between it and fat: a CT has a
# peak of air/lung that holds more voxels than the valley; a smooth unimodal intensity
# distribution (MR, PET, an MR shifted by an offset) has its tail there instead.
_AIR_LUNG_HU = (-1100.0, -750.0)
_VALLEY_HU = (-650.0, -250.0)
_MIN_AIR_LUNG_FRACTION = 0.01
_OFFSET_ADVICE = (
    "read it with xct.io.read_ct(path, hu_offset=-1024) (python -m xct.reconstruct: "
    "--template_hu_offset=-1024) to shift it to HU (or convert the file to HU)"
)
_CHECK_HU_ADVICE = "or read it with xct.io.read_ct(path, check_hu=False) if it is known to be HU"


def _hu_model_problems(hu: np.ndarray) -> list[str]:
    """What in the histogram of ``hu`` does not look like a CT in HU (empty when it does).

    Air near -1000 is not required (a heart crop holds lung parenchyma at -900..-700 HU but
    no voxel near -1000), but some air or lung is (``_AIR_LUNG_HU``, at least 1% of the
    scanned voxels) and it must outnumber the valley between lung and fat
    (``_VALLEY_HU``): a CT's histogram has an air/lung peak, a unimodal one (an MR, also
    one shifted by ``hu_offset=-1024``) only a tail. The tissue must be mostly fat/soft
    tissue (``_SOFT_HU``) with its median in ``_TISSUE_MEDIAN_HU``, and almost nothing
    above 3100 HU. A crop with no air and no lung (a spine, a liver) is refused: read it
    with ``check_hu=False``.
    """
    v = hu.ravel()
    if v.size > 4_000_000:  # a regular subsample is enough for fractions and medians
        v = v[:: v.size // 2_000_000]
    scanned = v[v >= _PAD_BELOW_HU]
    if scanned.size < max(1, 0.01 * v.size):
        return [f"{100 - 100 * scanned.size / v.size:.1f}% of voxels are below -1200 HU"]
    problems = []
    tissue = scanned[scanned > _AIR_BELOW_HU]
    if tissue.size < 0.01 * scanned.size:
        problems.append("no tissue: almost every voxel is air")
        return problems
    soft = float(np.mean((tissue >= _SOFT_HU[0]) & (tissue <= _SOFT_HU[1])))
    median = float(np.median(tissue))
    high = float(np.mean(scanned > 3100.0))
    if soft < _MIN_SOFT_FRACTION:
        problems.append(
            f"{100 * soft:.1f}% of non-air voxels in the fat/soft-tissue range "
            f"[{_SOFT_HU[0]:g}, {_SOFT_HU[1]:g}] (expected at least {100 * _MIN_SOFT_FRACTION:g}%)"
        )
    if not _TISSUE_MEDIAN_HU[0] <= median <= _TISSUE_MEDIAN_HU[1]:
        problems.append(
            f"median of non-air voxels {median:.0f} (expected {_TISSUE_MEDIAN_HU[0]:g} to "
            f"{_TISSUE_MEDIAN_HU[1]:g})"
        )
    if high > _MAX_ABOVE_3100_FRACTION:
        problems.append(f"{100 * high:.1f}% of voxels above 3100 (expected almost none)")
    air = float(np.mean((scanned >= _AIR_LUNG_HU[0]) & (scanned <= _AIR_LUNG_HU[1])))
    valley = float(np.mean((scanned > _VALLEY_HU[0]) & (scanned < _VALLEY_HU[1])))
    if air < _MIN_AIR_LUNG_FRACTION or air < valley:
        problems.append(
            f"no air or lung peak: {100 * air:.1f}% of voxels in [{_AIR_LUNG_HU[0]:g}, "
            f"{_AIR_LUNG_HU[1]:g}] HU against {100 * valley:.1f}% in the valley "
            f"({_VALLEY_HU[0]:g}, {_VALLEY_HU[1]:g}) (expected at least "
            f"{100 * _MIN_AIR_LUNG_FRACTION:g}% and more than the valley)"
        )
    return problems


def _looks_like_hu_plus_1024(hu: np.ndarray) -> bool:
    """``hu - 1024`` passes the histogram model and has air: at least 2% of its voxels in
    [-1100, -900] HU (so an MR whose values happen to centre near 1000 is not taken for
    HU+1024)."""
    shifted = hu - np.float32(1024.0)
    if _hu_model_problems(shifted):
        return False
    return bool(np.mean((shifted >= -1100.0) & (shifted <= -900.0)) >= 0.02)


def _checked_hu(
    path: pathlib.Path,
    hu: np.ndarray,
    hu_offset: float,
    check_hu: bool,
    histogram: bool = True,
):
    """``hu + hu_offset`` after checking it is non-empty, finite and plausibly HU.

    ``histogram``: also apply the histogram model (``_hu_model_problems``) to the shifted
    values; off for DICOM whose Modality tag already says CT.
    """
    if hu.size == 0:
        raise CTReadError(f"{path}: empty volume of shape {hu.shape} (z, y, x); expected voxels")
    bad = int(np.count_nonzero(~np.isfinite(hu)))
    if bad:
        raise CTReadError(
            f"{path}: {bad} of {hu.size} voxels are NaN or infinite; expected finite HU"
        )
    if hu_offset:
        hu = hu + np.float32(hu_offset)
    lo, hi = float(hu.min()), float(hu.max())
    if lo == hi:
        raise CTReadError(
            f"{path}: every voxel is {lo:g}: an empty (constant) volume; expected a CT scan"
        )
    if not check_hu:
        return hu
    shifted = f" after hu_offset={hu_offset:g}" if hu_offset else ""
    if lo >= -50.0 and hi > 1500.0 and (not histogram or _looks_like_hu_plus_1024(hu)):
        raise CTReadError(
            f"{path}: values span [{lo:g}, {hi:g}]{shifted}; minimum {lo:g} with no air "
            f"(about -1000 HU) looks like HU+1024 storage, not HU; {_OFFSET_ADVICE}"
        )
    if lo >= -50.0:
        raise CTReadError(
            f"{path}: values span [{lo:g}, {hi:g}]{shifted}, none below -50: no air or fat, "
            "so not HU (a label map, mask, MR or normalised intensities?); expected HU, "
            + _CHECK_HU_ADVICE
        )
    if histogram:
        problems = _hu_model_problems(hu)
        if problems:
            if _looks_like_hu_plus_1024(hu):
                guess = f"looks like HU+1024 storage; {_OFFSET_ADVICE}"
            else:
                guess = f"an MR, PET or other non-CT image? expected CT in HU, {_CHECK_HU_ADVICE}"
            raise CTReadError(
                f"{path}: values span [{lo:g}, {hi:g}]{shifted} but do not look like CT in "
                f"HU: {'; '.join(problems)}; {guess}"
            )
    return hu


# --------------------------------------------------------------------------------------
# Writing and SimpleITK conversion
# --------------------------------------------------------------------------------------


def to_sitk(volume_zyx: np.ndarray, grid: VolumeGrid):
    """A float32 SimpleITK image of a ``[z, y, x]`` array placed on ``grid``."""
    import SimpleITK as sitk

    arr = np.asarray(volume_zyx, np.float32)
    if arr.shape != tuple(grid.shape):
        raise ValueError(
            f"volume_zyx: shape {arr.shape} does not match grid.shape {tuple(grid.shape)}"
        )
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(grid.spacing_xyz_mm)
    img.SetOrigin(grid.origin_xyz_mm)
    img.SetDirection(grid.direction)
    return img


def _from_sitk(img) -> tuple[np.ndarray, VolumeGrid]:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).astype(np.float32, copy=False), VolumeGrid.from_sitk(img)


def write_ct(path: str | pathlib.Path, volume_zyx: np.ndarray, grid: VolumeGrid) -> pathlib.Path:
    """Write a ``[z, y, x]`` volume as float32 with its geometry; returns the path.

    The format follows the suffix: ``.nii.gz``/``.nii`` (NIfTI, the intended one), or any
    other SimpleITK writes (``.mha``, ``.nrrd``). Spacing, origin and direction are kept
    (NIfTI stores them in float32). Single-file formats are written atomically
    (``atomic_path``).
    """
    import SimpleITK as sitk

    path = pathlib.Path(path)
    img = to_sitk(volume_zyx, grid)
    try:
        if path.suffix.lower() in (".mhd", ".hdr"):  # a header naming its data file: no rename
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(path), useCompression=True)
        else:
            with atomic_path(path) as tmp:
                sitk.WriteImage(img, str(tmp), useCompression=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: cannot write ({_reason(e)}); expected a .nii.gz, .nii, .mha or .nrrd path"
        ) from e
    return path


@contextlib.contextmanager
def atomic_path(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary name beside ``path`` to write the whole file to, renamed over ``path`` on
    success.

    ``os.replace`` in the same folder is atomic: a reader (or a rerun after a crash) finds
    the old file or the complete new one, never part of it. On an exception the temporary
    file is removed and ``path`` is left as it was. The temporary name is hidden
    (``.NAME.tmp-PID``-like) and keeps ``path``'s suffixes, so writers that choose the
    format by suffix (SimpleITK: ``.nii.gz``) still do. The folder is created if missing.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def _resample(
    hu: np.ndarray,
    grid: VolumeGrid,
    shape_zyx: tuple[int, int, int],
    spacing_zyx_mm: tuple[float, float, float],
    fill_hu: float,
    antialias: bool,
) -> tuple[np.ndarray, VolumeGrid]:
    """Linear resampling onto a grid with the same centre and direction as ``grid``."""
    import SimpleITK as sitk

    img = to_sitk(hu, grid)
    old = np.asarray(grid.spacing_xyz_mm)
    new = np.asarray(spacing_zyx_mm[::-1], np.float64)
    if antialias and np.any(new > old * 1.01):
        # Gaussian prefilter for downsampling, sigma = (factor - 1) / 2 input voxels.
        sigma_mm = np.maximum(new - old, 0.0) / 2.0
        img = sitk.DiscreteGaussian(img, (sigma_mm**2).tolist(), 32, 0.01, True)
    size_xyz = np.asarray(shape_zyx[::-1], np.int64)
    centre = grid.index_to_world((np.asarray(grid.shape_xyz) - 1) / 2.0)
    origin = centre - grid.direction_matrix() @ ((size_xyz - 1) / 2.0 * new)
    ref = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    ref.SetSpacing(new.tolist())
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(grid.direction)
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, float(fill_hu))
    return _from_sitk(out)


def resample_isotropic(
    hu: np.ndarray,
    grid: VolumeGrid,
    spacing_mm: float,
    *,
    fill_hu: float = -1000.0,
    antialias: bool = True,
) -> tuple[np.ndarray, VolumeGrid]:
    """Linear resampling to cubic voxels of ``spacing_mm``, same centre and direction.

    Each axis gets ``max(1, round(extent_mm / spacing_mm))`` voxels, ``extent_mm`` being
    ``shape * spacing`` of the input. Downsampling is Gaussian-prefiltered unless
    ``antialias=False``. Returns ``(hu [nz', ny', nx'] float32, grid)``.
    """
    s = float(spacing_mm)
    if not s > 0:
        raise ValueError(f"spacing_mm: expected a positive number, got {spacing_mm!r}")
    extent = np.asarray(grid.shape) * np.asarray(grid.spacing_mm)
    shape = tuple(int(max(1, round(e / s))) for e in extent)
    return _resample(hu, grid, shape, (s, s, s), fill_hu, antialias)


def resize(
    hu: np.ndarray, grid: VolumeGrid, n: int, *, fill_hu: float = -1000.0, antialias: bool = True
) -> tuple[np.ndarray, VolumeGrid]:
    """Linear resampling to ``n^3`` voxels covering the same physical extent.

    Spacing becomes ``shape * spacing / n`` per axis (cubic voxels when the input extent is
    a cube). Returns ``(hu [n, n, n] float32, grid)``.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"n: expected a positive voxel count, got {n}")
    extent = np.asarray(grid.shape) * np.asarray(grid.spacing_mm)
    return _resample(hu, grid, (n, n, n), tuple(extent / n), fill_hu, antialias)


def resample_to_cube(
    hu_zyx: np.ndarray, grid: VolumeGrid, n: int, fov_mm: float, fill_hu: float = -1000.0
) -> tuple[np.ndarray, VolumeGrid]:
    """Linear resampling onto an ``n^3`` cube of side ``fov_mm`` centred on the volume centre.

    Returns ``(hu [n, n, n] float32, cube_grid)``; the cube keeps the world position (its
    centre is the source's centre) and has identity direction. No body-centring, couch
    removal or reorientation: see ``preprocess`` for that.
    """
    import SimpleITK as sitk

    img = to_sitk(hu_zyx, grid)
    spacing = float(fov_mm) / int(n)
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in img.GetSize()])
    ref = sitk.Image(int(n), int(n), int(n), sitk.sitkFloat32)
    ref.SetSpacing((spacing,) * 3)
    ref.SetOrigin(tuple(c - (n - 1) * spacing / 2.0 for c in centre))
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, float(fill_hu))
    return _from_sitk(out)


def canonical_orientation(
    hu: np.ndarray, grid: VolumeGrid, orientation: str = CANONICAL_ORIENTATION
) -> tuple[np.ndarray, VolumeGrid]:
    """Permute/flip the array axes so that they point the same way in every volume.

    With the default ``"LPS"`` (see ``CANONICAL_ORIENTATION``) array ``[z, y, x]`` runs
    inferior->superior, anterior->posterior and right->left; no interpolation, the world
    position of every voxel is kept. Returns ``(hu [z, y, x] float32, grid)``.
    """
    import SimpleITK as sitk

    out = sitk.DICOMOrient(to_sitk(hu, grid), orientation)
    return _from_sitk(out)


def _axial_axis(grid: VolumeGrid) -> int:
    """The array axis (0, 1 or 2 of ``[z, y, x]``) closest to the world z (foot-head) axis."""
    j = int(np.argmax(np.abs(grid.direction_matrix()[2])))  # index axis in (x, y, z) order
    return 2 - j


def body_mask(
    hu: np.ndarray,
    grid: VolumeGrid,
    *,
    threshold_hu: float = -500.0,
    opening_mm: float = 4.0,
) -> np.ndarray:
    """Boolean ``[z, y, x]`` mask of the patient's body, couch/bed and clutter excluded.

    Voxels above ``threshold_hu`` are opened with a ball of radius ``opening_mm`` (which
    cuts thin structures such as the couch shell and its contact with the body), the
    largest 6-connected component is kept, and holes (lungs, airways, bowel gas) are
    filled slice by slice in the axial plane. An all-air volume gives an all-False mask.
    """
    import SimpleITK as sitk

    hu = np.asarray(hu)
    if hu.shape != tuple(grid.shape):
        raise ValueError(f"hu: shape {hu.shape} does not match grid.shape {tuple(grid.shape)}")
    above = hu > threshold_hu
    if not above.any():
        return np.zeros(hu.shape, bool)
    img = sitk.GetImageFromArray(above.astype(np.uint8))
    radius = [int(round(opening_mm / s)) for s in grid.spacing_xyz_mm]
    if any(radius):
        img = sitk.BinaryMorphologicalOpening(img, radius, sitk.sitkBall)
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(img), sortByObjectSize=True)
    mask = sitk.GetArrayFromImage(labels) == 1
    axis = _axial_axis(grid)
    mask = np.moveaxis(mask, axis, 0)
    for k in range(mask.shape[0]):
        if mask[k].any():
            filled = sitk.BinaryFillhole(sitk.GetImageFromArray(mask[k].astype(np.uint8)))
            mask[k] = sitk.GetArrayViewFromImage(filled) > 0
    return np.moveaxis(mask, 0, axis)


def remove_couch(
    hu: np.ndarray,
    grid: VolumeGrid,
    fill_hu: float = -1000.0,
    *,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, VolumeGrid]:
    """Set every voxel outside the body (``body_mask``, or ``mask`` if given) to ``fill_hu``.

    Removes the couch, blankets and other clutter. Returns ``(hu [z, y, x] float32, grid)``
    with ``grid`` unchanged.
    """
    if mask is None:
        mask = body_mask(hu, grid)
    return np.where(mask, np.asarray(hu, np.float32), np.float32(fill_hu)), grid


def crop_or_pad_cube(
    hu: np.ndarray,
    grid: VolumeGrid,
    fov_mm: float,
    fill_hu: float = -1000.0,
    *,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, VolumeGrid]:
    """Crop and/or pad to a cube of side ``fov_mm`` centred on the body's bounding box.

    The centre is that of the bounding box of ``body_mask`` (or of ``mask``; the volume
    centre when the mask is empty). Each axis gets ``round(fov_mm / spacing)`` voxels at
    the input spacing, so there is no interpolation; padding uses ``fill_hu``. Returns
    ``(hu [mz, my, mx] float32, grid)`` with the direction kept and the origin moved.
    """
    fov = float(fov_mm)
    if not fov > 0:
        raise ValueError(f"fov_mm: expected a positive length, got {fov_mm!r}")
    hu = np.asarray(hu, np.float32)
    if mask is None:
        mask = body_mask(hu, grid)
    if mask.any():
        spans = [np.flatnonzero(mask.any(axis=tuple({0, 1, 2} - {k}))) for k in range(3)]
        centre = np.asarray([(i[0] + i[-1]) / 2.0 for i in spans])
    else:
        centre = (np.asarray(hu.shape) - 1) / 2.0
    size = np.maximum(1, np.round(fov / np.asarray(grid.spacing_mm))).astype(np.int64)
    start = np.round(centre - (size - 1) / 2.0).astype(np.int64)
    out = np.full(tuple(size), np.float32(fill_hu), np.float32)
    src = tuple(
        slice(max(0, s), min(n, s + m)) for s, m, n in zip(start, size, hu.shape, strict=True)
    )
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start, strict=True))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = hu[src]
    origin = grid.index_to_world(start[::-1].astype(np.float64))
    new_grid = VolumeGrid(tuple(size), grid.spacing_mm, tuple(origin), grid.direction)
    return out, new_grid


def preprocess(
    hu: np.ndarray,
    grid: VolumeGrid,
    n: int,
    fov_mm: float,
    *,
    fill_hu: float = -1000.0,
) -> tuple[np.ndarray, VolumeGrid]:
    """The dataset preprocessing of one CT: HU in, ``[n, n, n]`` HU cube out.

    ``canonical_orientation`` (LPS) -> clip to ``HU_CLIP`` ([-1024, 3071] HU) ->
    ``remove_couch`` (outside the body becomes ``fill_hu``) -> ``crop_or_pad_cube`` to a
    ``fov_mm`` cube centred on the body -> ``resize`` to ``n^3`` (voxels of
    ``fov_mm / n`` mm). Returns ``(hu [n, n, n] float32, grid)``.
    """
    hu, grid = canonical_orientation(hu, grid)
    hu = np.clip(hu, *HU_CLIP)
    mask = body_mask(hu, grid)
    hu, grid = remove_couch(hu, grid, fill_hu, mask=mask)
    hu, grid = crop_or_pad_cube(hu, grid, fov_mm, fill_hu, mask=mask)
    return resize(hu, grid, n, fill_hu=fill_hu)


def to_projector_frame(hu_lps: np.ndarray) -> np.ndarray:
    """A canonical-LPS ``[z, y, x]`` volume (``canonical_orientation``) in the projector frame.

    xct's circular orbits turn about world +y (RTK's convention), so datasets store volumes
    with the patient's long axis on y, head at low y (detector row 0), and posterior at +z:
    gantry 0 degrees is then a PA view and 90 degrees a lateral one. Returns a new array
    ``[z', y', x']`` with ``z' = posterior``, ``y' = head to foot``, ``x' = right to left``;
    place it on a centred grid of the same spacing (the axes permute, the spacing must be
    isotropic, as after ``preprocess``).
    """
    return np.ascontiguousarray(np.flip(np.transpose(np.asarray(hu_lps), (1, 0, 2)), axis=1))


def from_projector_frame(vol: np.ndarray) -> np.ndarray:
    """Inverse of ``to_projector_frame``: a projector-frame volume back to LPS ``[z, y, x]``."""
    return np.ascontiguousarray(np.transpose(np.flip(np.asarray(vol), axis=1), (1, 0, 2)))


def body_fov_mm(mask: np.ndarray, grid: VolumeGrid, margin_mm: float = 0.0) -> float:
    """The side (mm) of the smallest axial square that holds the body mask: the larger of
    the body's left-right and front-back extents, plus ``2 * margin_mm``.

    ``mask`` is a ``body_mask`` on ``grid`` in canonical LPS orientation (axis 0 is z). An
    empty mask is an error.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError(
            "body mask is empty: no voxel above the body threshold (an all-air volume?)"
        )
    sz, sy, sx = grid.spacing_mm
    ys = np.flatnonzero(mask.any(axis=(0, 2)))
    xs = np.flatnonzero(mask.any(axis=(0, 1)))
    return float(max((ys[-1] - ys[0] + 1) * sy, (xs[-1] - xs[0] + 1) * sx) + 2.0 * margin_mm)


def preprocess_body_cube(
    hu: np.ndarray,
    grid: VolumeGrid,
    n: int,
    *,
    margin_mm: float = 0.0,
    fill_hu: float = -1000.0,
) -> tuple[np.ndarray, VolumeGrid, float]:
    """``preprocess`` with the field of view the body fills: ``(hu [n]^3, grid, fov_mm)``.

    As ``preprocess`` (LPS, clip, couch removed, cube centred on the body's bounding box,
    resized to ``n^3``), with the cube's side ``body_fov_mm`` of the body mask: the body
    spans the cube from side to side in the axial plane (left-right or front-back,
    whichever is larger); along the patient's long axis the cube holds as much of the scan
    as fits, with air beyond the scan's ends.
    """
    hu, grid = canonical_orientation(hu, grid)
    hu = np.clip(hu, *HU_CLIP)
    mask = body_mask(hu, grid)
    fov = body_fov_mm(mask, grid, margin_mm)
    hu, grid = remove_couch(hu, grid, fill_hu, mask=mask)
    hu, grid = crop_or_pad_cube(hu, grid, fov, fill_hu, mask=mask)
    hu, grid = resize(hu, grid, n, fill_hu=fill_hu)
    return hu, grid, float(n * grid.spacing_mm[0])  # the cube's side: whole voxels of the scan


# --------------------------------------------------------------------------------------
# The one read path: file -> checked -> cube -> projector frame
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Cube:
    """One CT as a model's cube (``load_cube``)."""

    hu: np.ndarray  # [r, r, r] float32 HU in the projector frame (``to_projector_frame``)
    grid: VolumeGrid  # ``hu``'s grid: centred on the isocentre, voxels of fov_mm / r
    lps_grid: VolumeGrid  # the cube in the patient's LPS frame, at the scan's world position
    fov_mm: float  # the cube's side
    body: np.ndarray | None  # [r, r, r] bool, ``body_mask(hu, grid)`` (``body=True``)
    path: pathlib.Path  # the file or DICOM folder read
    source_grid: VolumeGrid  # the scan as read: its shape, spacing, origin and direction

    @property
    def source_spacing_mm(self) -> tuple[float, float, float]:
        """The scan's voxel spacing ``(z, y, x)`` in mm, as read."""
        return self.source_grid.spacing_mm

    def lps(self) -> np.ndarray:
        """``hu`` back in the patient's LPS frame (``[z, y, x]`` on ``lps_grid``)."""
        return from_projector_frame(self.hu)


def load_cube(
    path: str | pathlib.Path,
    *,
    resolution: int,
    fov_mm: float | str,
    series_uid: str | None = None,
    crop: str = "body",
    body: bool = False,
    stored: bool = False,
    hu_offset: float = 0.0,
) -> Cube:
    """Read a CT and make it a model's ``[r, r, r]`` cube in the projector frame.

    ``read_ct`` -> ``check_ct_volume`` -> the cube -> ``to_projector_frame``. The cube
    (``crop``):

    * ``"body"``: the datasets' preprocessing (``ct_folder``): LPS, HU clipped to
      ``HU_CLIP``, couch and clutter removed, centred on the body, resized to ``r^3``
      (``preprocess``); ``fov_mm="body"`` takes the side the body fills
      (``preprocess_body_cube``), a number that side in mm.
    * ``"scan"``: the scan as it is (couch kept, values unclipped) in LPS, resampled onto a
      ``fov_mm`` cube centred on the scan's centre (``resample_to_cube``).

    Args:
      resolution: ``r``, voxels per side.
      series_uid: for a DICOM folder with several CT series, the one to read.
      body: also compute ``body_mask`` of the returned cube (on its projector-frame grid).
      stored: round and clip to ``HU_CLIP`` as the datasets store a CT (int16 values).
      hu_offset: ``read_ct``'s (``-1024`` for files stored as HU+1024).

    Raises:
      ValueError: naming ``path``, for input ``read_ct`` or ``check_ct_volume`` refuses, or
        a scan without a body when the cube is centred on it.
    """
    path = pathlib.Path(path)
    r = int(resolution)
    if crop not in ("body", "scan"):
        raise ValueError(f"crop: expected 'body' or 'scan', got {crop!r}")
    if fov_mm == "body" and crop == "scan":
        raise ValueError("fov_mm='body' needs crop='body' (the body's extent)")
    raw, source_grid = read_ct(path, series_uid=series_uid or None, hu_offset=hu_offset)
    check_ct_volume(path, source_grid)
    try:
        if crop == "scan":
            hu, grid = canonical_orientation(raw, source_grid)
            hu, lps_grid = resample_to_cube(hu, grid, r, float(fov_mm))
            side = float(fov_mm)
        elif fov_mm == "body":
            hu, lps_grid, side = preprocess_body_cube(raw, source_grid, r)
        else:
            hu, lps_grid = preprocess(raw, source_grid, r, float(fov_mm))
            side = float(fov_mm)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    hu = to_projector_frame(hu)
    if stored:
        hu = np.clip(np.round(hu), *HU_CLIP).astype(np.int16)
    hu = hu.astype(np.float32)
    grid = VolumeGrid.centered(hu.shape, side / r)
    mask = body_mask(hu, grid) if body else None
    return Cube(hu, grid, lps_grid, side, mask, path, source_grid)
