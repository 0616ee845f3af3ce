"""Host-side reading and writing of CT volumes with SimpleITK (DICOM, NIfTI, MHA, NRRD).

This first version reads single files and writes NIfTI; the data issue adds DICOM series,
validation of bad input and the preprocessing used by datasets. SimpleITK is imported
inside the functions so that the rest of xct imports without it.
"""

from __future__ import annotations

import pathlib

import numpy as np

from xct.geometry import VolumeGrid


def read_ct(path) -> tuple[np.ndarray, VolumeGrid]:
    """Read a CT volume file: HU as ``[z, y, x]`` float32 and its ``VolumeGrid``."""
    import SimpleITK as sitk

    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    try:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: not a readable CT volume ({str(e).strip().splitlines()[-1]})"
        ) from e
    if img.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got {img.GetDimension()}-D")
    return sitk.GetArrayFromImage(img), VolumeGrid.from_sitk(img)


def to_sitk(volume_zyx, grid: VolumeGrid):
    """A SimpleITK image of a ``[z, y, x]`` array placed on ``grid``."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.asarray(volume_zyx, np.float32))
    img.SetSpacing(grid.spacing_xyz_mm)
    img.SetOrigin(grid.origin_xyz_mm)
    img.SetDirection(grid.direction)
    return img


def write_ct(path, volume_zyx, grid: VolumeGrid) -> pathlib.Path:
    """Write a ``[z, y, x]`` volume as NIfTI (or any SimpleITK format by suffix), geometry kept."""
    import SimpleITK as sitk

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_sitk(volume_zyx, grid), str(path), useCompression=True)
    return path


def resample_to_cube(hu_zyx, grid: VolumeGrid, n: int, fov_mm: float, fill_hu: float = -1000.0):
    """Linear resampling onto an ``n^3`` cube of side ``fov_mm`` centred on the volume centre.

    Returns ``(hu [n, n, n] float32, cube_grid)``; the cube keeps the world position (its
    origin is the source's centre) and has identity direction.
    """
    import SimpleITK as sitk

    img = to_sitk(hu_zyx, grid)
    spacing = float(fov_mm) / int(n)
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in img.GetSize()])
    ref = sitk.Image(int(n), int(n), int(n), sitk.sitkFloat32)
    ref.SetSpacing((spacing,) * 3)
    ref.SetOrigin(tuple(c - (n - 1) * spacing / 2.0 for c in centre))
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, float(fill_hu))
    return sitk.GetArrayFromImage(out), VolumeGrid.from_sitk(out)
