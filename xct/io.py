"""Host-side reading, checking, writing and preprocessing of CT volumes (SimpleITK).

Reading: ``read_ct`` takes a DICOM series folder, a single DICOM file, NIfTI, MHA/MHD or
NRRD and returns Hounsfield units as a ``[z, y, x]`` float32 array with its ``VolumeGrid``
(spacing, origin and direction kept). Bad input raises ``CTReadError`` (a ``ValueError``)
whose message names the file and says what was expected. Two SimpleITK behaviours make
some checks ours rather than the library's: it reads a truncated NIfTI (``.nii`` or
``.nii.gz``) without error, zero-filling the missing voxels, and its DICOM series reader
only warns about missing slices or non-uniform slice spacing.

Preprocessing (pure NumPy/SimpleITK, for dataset builders): ``canonical_orientation``,
``resample_isotropic``, ``body_mask``, ``remove_couch``, ``crop_or_pad_cube``, ``resize``
and ``preprocess``, which chains them. Every transform takes and returns ``(hu, grid)``
with ``hu`` a ``[z, y, x]`` array in HU and ``grid`` its ``VolumeGrid``.

SimpleITK is imported inside the functions so that ``import xct.io`` works without it.
Besides NumPy and SimpleITK only the standard library is used (``zlib`` to measure the
decompressed length of a ``.nii.gz``).
"""

from __future__ import annotations

import pathlib
import zlib

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
      series_uid: for a folder, the SeriesInstanceUID to read; by default the series with
        the most slices. Slices are ordered by their position along the slice normal and
        the DICOM rescale slope/intercept is applied.
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
        in a series; NaN or infinite values; an empty or constant volume; or values that
        are not HU (no voxel below -50: HU+1024 storage when the maximum exceeds 1500,
        otherwise a label map or normalised intensities).
    """
    import SimpleITK as sitk

    path = pathlib.Path(path)
    if not path.exists():
        raise CTReadError(f"{path}: file not found; expected {_VOLUME_KINDS}")
    if path.is_dir():
        img = _read_dicom_series(path, series_uid)
    else:
        if series_uid is not None:
            raise CTReadError(
                f"{path}: series_uid={series_uid!r} needs a DICOM series folder, got a file"
            )
        img = _read_volume_file(path)
    hu = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
    try:
        grid = VolumeGrid.from_sitk(img)
    except ValueError as e:
        raise CTReadError(f"{path}: unusable geometry ({e})") from e
    return _checked_hu(path, hu, hu_offset, check_hu), grid


def _reason(err: Exception) -> str:
    """The informative last line of a SimpleITK exception."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def _meta(reader, key: str) -> str:
    return reader.GetMetaData(key).strip(" \0") if reader.HasMetaDataKey(key) else ""


def _check_modality(path: pathlib.Path, reader) -> None:
    """Reject DICOM whose Modality (0008|0060), or SOP class when it is absent, is not CT."""
    modality = _meta(reader, "0008|0060")
    if modality:
        if modality.upper() != "CT":
            raise CTReadError(f"{path}: DICOM Modality (0008|0060) is {modality!r}; expected 'CT'")
        return
    sop_class = _meta(reader, "0008|0016")
    if sop_class and sop_class not in _CT_SOP_CLASSES:
        raise CTReadError(
            f"{path}: DICOM SOP class (0008|0016) {sop_class} is not a CT image; expected CT"
        )


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
    """A single file through SimpleITK, checked before and after its voxels are read."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CTReadError(
            f"{path}: not a readable image ({_reason(e)}); expected {_VOLUME_KINDS}"
        ) from e
    _check_shape(path, reader)
    # ImageFileReader.GetImageIO() is empty unless set, so recognise DICOM by its tags and
    # NIfTI by its header bytes.
    if reader.HasMetaDataKey("0008|0060") or reader.HasMetaDataKey("0008|0016"):
        _check_modality(path, reader)
    _check_nifti(path)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise CTReadError(
            f"{path}: the header is readable but the voxel data is not ({_reason(e)}); "
            "the file looks truncated or corrupt, expected a complete volume"
        ) from e


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
    """Size fields of a single-file NIfTI-1/2 header, or None if ``head`` is not one."""
    if len(head) < 348:
        return None
    for order in ("<", ">"):
        sizeof_hdr = int(np.frombuffer(head[:4], f"{order}i4")[0])
        if sizeof_hdr == 348 and head[344:347] == b"n+1":
            dims = np.frombuffer(head[40:56], f"{order}i2").astype(np.int64)
            datatype = int(np.frombuffer(head[70:72], f"{order}i2")[0])
            bitpix = int(np.frombuffer(head[72:74], f"{order}i2")[0])
            vox_offset = int(np.frombuffer(head[108:112], f"{order}f4")[0])
            break
        if sizeof_hdr == 540 and len(head) >= 540 and head[4:7] == b"n+2":
            datatype = int(np.frombuffer(head[12:14], f"{order}i2")[0])
            bitpix = int(np.frombuffer(head[14:16], f"{order}i2")[0])
            dims = np.frombuffer(head[16:80], f"{order}i8").astype(np.int64)
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
        first = f.read(1 << 16)
    gzipped = first[:2] == b"\x1f\x8b"
    if gzipped:
        try:
            head = zlib.decompressobj(wbits=31).decompress(first, 544)
        except zlib.error:
            return  # not a gzip SimpleITK could read either; it reports the error
    else:
        head = first[:544]
    info = _nifti_header(head)
    if info is None:
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


def _read_dicom_series(folder: pathlib.Path, series_uid: str | None):
    """The chosen series of a DICOM folder after checking modality and slice positions."""
    import SimpleITK as sitk

    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        raise CTReadError(
            f"{folder}: no DICOM series found in this folder; expected DICOM slice files"
        )
    if series_uid is not None:
        if series_uid not in ids:
            raise CTReadError(
                f"{folder}: no series with SeriesInstanceUID {series_uid!r}; found {ids}"
            )
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))
    else:
        candidates = [
            list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids
        ]
        files = max(candidates, key=len)
    files = _ordered_slices(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise CTReadError(
            f"{folder}: the DICOM series could not be read ({_reason(e)}); "
            "expected readable CT slices"
        ) from e
    if 0 in img.GetSize():
        raise CTReadError(f"{folder}: empty volume of size {img.GetSize()}; expected voxels")
    return img


def _ordered_slices(folder: pathlib.Path, files: list[str]) -> list[str]:
    """Slice files sorted by position along the slice normal; raises on gaps or duplicates.

    The position of a slice is its ImagePositionPatient (0020|0032) projected on the
    normal of its ImageOrientationPatient (0020|0037).
    """
    import SimpleITK as sitk

    positions, orientations = [], []
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        try:
            r.ReadImageInformation()
        except RuntimeError as e:
            raise CTReadError(
                f"{folder}: slice {pathlib.Path(f).name} unreadable ({_reason(e)})"
            ) from e
        _check_modality(pathlib.Path(f), r)
        try:
            ipp = [float(v) for v in _meta(r, "0020|0032").split("\\")]
            iop = [float(v) for v in _meta(r, "0020|0037").split("\\")]
        except ValueError:
            ipp, iop = [], []
        if len(ipp) != 3 or len(iop) != 6:
            if len(files) == 1:
                return files
            raise CTReadError(
                f"{folder}: slice {pathlib.Path(f).name} lacks ImagePositionPatient "
                "(0020|0032) or ImageOrientationPatient (0020|0037); expected both on every "
                "slice of a series"
            )
        positions.append(ipp)
        orientations.append(iop)
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
        return files
    gaps = np.diff(z)
    names = [pathlib.Path(f).name for f in files]
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise CTReadError(
            f"{folder}: duplicated slice: {names[i]} and {names[i + 1]} are both at "
            f"{z[i]:.3f} mm along the slice normal; expected one slice per position"
        )
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
    return files


def _checked_hu(path: pathlib.Path, hu: np.ndarray, hu_offset: float, check_hu: bool):
    """``hu + hu_offset`` after checking it is non-empty, finite and plausibly HU."""
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
    if lo >= -50.0 and hi > 1500.0:
        raise CTReadError(
            f"{path}: values span [{lo:g}, {hi:g}]{shifted}; minimum {lo:g} with no air "
            "(about -1000 HU) looks like HU+1024 storage, not HU; read it with "
            "hu_offset=-1024 to shift it to HU"
        )
    if lo >= -50.0:
        raise CTReadError(
            f"{path}: values span [{lo:g}, {hi:g}]{shifted}, none below -50: no air or fat, "
            "so not HU (a label map, mask or normalised intensities?); expected HU, or pass "
            "check_hu=False for a scan known to be HU"
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
    (NIfTI stores them in float32).
    """
    import SimpleITK as sitk

    path = pathlib.Path(path)
    img = to_sitk(volume_zyx, grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(img, str(path), useCompression=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: cannot write ({_reason(e)}); expected a .nii.gz, .nii, .mha or .nrrd path"
        ) from e
    return path


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
