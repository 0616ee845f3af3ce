"""Clinical mode: X-rays of a real CT as a clinic makes them, and the truth they are scored on.

The idealised benchmark renders DRRs from the very ``n^3`` cube it scores, after removing
everything outside the body, without noise. Here instead (issue 26):

* ``load_scan``: the whole CT at its own resolution (couch, arms, blankets kept; HU clipped
  to ``io.HU_CLIP``) in the projector frame (``io.to_projector_frame``), on a grid whose
  world origin (the isocentre) is the centre of the body cube that ``io.preprocess_body_cube``
  cuts from the same scan (side: the body's larger axial extent, in whole scan voxels).
* ``clinical_xrays``: cone-beam line integrals of that whole scan onto a detector of
  ``pixel_mm`` pixels (default 2 mm at the detector) that covers the body, with Poisson noise
  (default 1e5 unattenuated photons per pixel, seeded) and optionally the 120 kVp
  polychromatic model of ``xct.physics``.
* ``truth_cube``: the scan's HU averaged over each voxel of the reconstruction cube (box
  average of the fine voxels it covers, fractional overlaps), and the body mask there.
* Detector sampling for a reconstruction grid: ``bin_xrays`` (area-averaging to pixels of a
  given size, e.g. the voxel's footprint at the isocentre magnified onto the detector; rows
  and columns each keep their pixel, never stretched) and ``resize_xrays`` (the approach of
  ``xct.radiograph.load_xray``: resampled to ``size x size`` whatever the extent).

Frames: arrays ``[z, y, x]``; the projector frame turns the patient's long axis to ``y``
(gantry 0 degrees is a PA view, 90 a lateral); all grids here have identity direction.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xct import geometry, io, physics
from xct.geometry import Geometry, VolumeGrid

#: Detector pixel (mm, at the detector) of clinical X-rays by default: a 2 mm pitch, the
#: coarse end of the issue's 1-2 mm (0.1-0.2 mm flat panels binned for a 2 mm CT's detail).
DEFAULT_PIXEL_MM = 2.0
#: Unattenuated photons per detector pixel by default.
DEFAULT_PHOTONS = 1e5
#: HU of space the scan does not cover (outside its field of view or its ends): air.
FILL_HU = -1000.0


@dataclasses.dataclass(frozen=True)
class ClinicalScan:
    """A whole CT in the projector frame, placed so that its body cube is centred.

    Attributes:
      hu: ``[z, y, x]`` float32 HU at the scan's own resolution, clipped to ``io.HU_CLIP``,
        everything kept (couch, arms), projector frame.
      grid: its ``VolumeGrid`` (identity direction) with the body cube's centre at the world
        origin, the isocentre of every orbit.
      body: ``[z, y, x]`` bool, ``io.body_mask`` of the scan (couch excluded).
      side_mm: side of the body cube (``io.preprocess_body_cube``'s).
      source: where it was read from.
    """

    hu: np.ndarray
    grid: VolumeGrid
    body: np.ndarray
    side_mm: float
    source: str = ""


def scan_from_array(hu_zyx: np.ndarray, grid: VolumeGrid, source: str = "") -> ClinicalScan:
    """``ClinicalScan`` of an HU volume on ``grid`` (any orientation, any voxel spacing).

    The cube is the one ``io.preprocess_body_cube`` cuts: canonical LPS orientation, side
    ``io.body_fov_mm`` of the body mask rounded to whole voxels, centred on the body's
    bounding box as ``io.crop_or_pad_cube`` centres it (rounded to a voxel).
    """
    hu, grid = io.canonical_orientation(np.asarray(hu_zyx, np.float32), grid)
    hu = np.clip(hu, *io.HU_CLIP).astype(np.float32)
    mask = io.body_mask(hu, grid)
    fov = io.body_fov_mm(mask, grid)
    spacing = np.asarray(grid.spacing_mm)
    size = np.maximum(1, np.round(fov / spacing)).astype(np.int64)
    spans = [np.flatnonzero(mask.any(axis=tuple({0, 1, 2} - {k}))) for k in range(3)]
    centre = np.asarray([(i[0] + i[-1]) / 2.0 for i in spans])
    start = np.round(centre - (size - 1) / 2.0)
    centre_lps = start + (size - 1) / 2.0  # [z, y, x] index of the cube centre
    # io.to_projector_frame: z' = y (A->P), y' = flipped z (head at low y'), x' = x.
    nz = hu.shape[0]
    centre_p = np.asarray([centre_lps[1], nz - 1 - centre_lps[0], centre_lps[2]])
    spacing_p = np.asarray([spacing[1], spacing[0], spacing[2]])
    origin_xyz = -(centre_p * spacing_p)[::-1]
    hu_p = io.to_projector_frame(hu)
    out_grid = VolumeGrid(hu_p.shape, tuple(spacing_p), tuple(origin_xyz))
    side = float(size[0] * spacing[0])
    return ClinicalScan(hu_p, out_grid, io.to_projector_frame(mask), side, source)


def load_scan(path: str | pathlib.Path) -> ClinicalScan:
    """Read a CT (``io.read_ct``; file or DICOM folder) as a ``ClinicalScan``."""
    hu, grid = io.read_ct(path)
    io.check_ct_volume(path, grid)
    return scan_from_array(hu, grid, str(path))


# ------------------------------------------------------------------------------------------
# Area-weighted resampling of cells (voxels or detector pixels)


def overlap_weights(out_edges_mm: np.ndarray, in_edges_mm: np.ndarray) -> np.ndarray:
    """``[n_out, n_in]``: the fraction of each output cell covered by each input cell.

    Cells are the intervals between consecutive ascending edges (mm). Rows sum to the
    fraction of the output cell that the input cells cover (1 inside, less at the edges).
    """
    lo = np.maximum(out_edges_mm[:-1, None], in_edges_mm[None, :-1])
    hi = np.minimum(out_edges_mm[1:, None], in_edges_mm[None, 1:])
    width = np.diff(out_edges_mm)[:, None]
    return np.clip(hi - lo, 0.0, None) / width


def _voxel_edges(grid: VolumeGrid, axis: int) -> np.ndarray:
    """World edges (mm) of ``grid``'s voxels along array axis ``axis`` (identity direction)."""
    s = grid.spacing_mm[axis]
    o = grid.origin_xyz_mm[2 - axis]
    return o + (np.arange(grid.shape[axis] + 1) - 0.5) * s


def box_average(
    volume: np.ndarray, grid: VolumeGrid, out_grid: VolumeGrid, fill: float = 0.0
) -> np.ndarray:
    """``volume`` on ``grid`` averaged over each voxel of ``out_grid`` (both identity
    direction): every fine voxel counts by the volume it shares with the output voxel;
    where ``grid`` does not reach, ``fill``. Returns ``out_grid.shape`` float32."""
    for g in (grid, out_grid):
        if not np.allclose(g.direction_matrix(), np.eye(3)):
            raise ValueError("box_average: grids with identity direction only")
    w = [
        overlap_weights(_voxel_edges(out_grid, k), _voxel_edges(grid, k)).astype(np.float64)
        for k in range(3)
    ]
    v = np.asarray(volume, np.float64)
    out = np.einsum("az,zyx->ayx", w[0], v)
    out = np.einsum("by,ayx->abx", w[1], out)
    out = np.einsum("cx,abx->abc", w[2], out)
    cover = w[0].sum(1)[:, None, None] * w[1].sum(1)[None, :, None] * w[2].sum(1)[None, None]
    return (out + (1.0 - cover) * fill).astype(np.float32)


def cube_grid(scan: ClinicalScan, resolution: int, side_mm: float | None = None) -> VolumeGrid:
    """The reconstruction cube: ``resolution^3`` voxels of side ``side_mm`` (default the
    scan's body cube) centred on the isocentre."""
    side = scan.side_mm if side_mm is None else float(side_mm)
    return VolumeGrid.centered((int(resolution),) * 3, side / int(resolution))


def average_down(volume: jax.typing.ArrayLike, factor: int) -> np.ndarray:
    """``[n*f, n*f, n*f]`` -> ``[n, n, n]``: the mean of each ``f^3`` block (float32).

    Brings a reconstruction on a finer grid of the same cube (``cube_grid(scan, f * r)``)
    to the ``r^3`` truth: the same box average ``truth_cube`` takes of the scan.
    """
    v = np.asarray(volume, np.float32)
    f = int(factor)
    if f < 1 or v.ndim != 3 or any(s % f for s in v.shape):
        raise ValueError(f"average_down: shape {v.shape} is not a volume divisible by {factor}")
    n0, n1, n2 = (s // f for s in v.shape)
    return v.reshape(n0, f, n1, f, n2, f).mean((1, 3, 5), dtype=np.float64).astype(np.float32)


def truth_cube(
    scan: ClinicalScan, resolution: int, side_mm: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth of a reconstruction on ``cube_grid(scan, resolution, side_mm)``.

    Returns ``(hu, body)``: ``hu [r, r, r]`` float32, the scan's HU averaged over each
    output voxel (``box_average``; couch kept, ``FILL_HU`` where the scan ends) and
    ``body [r, r, r]`` bool, the voxels at least half inside the scan's ``io.body_mask``
    (computed at the scan's resolution, where the couch separates cleanly).
    """
    out = cube_grid(scan, resolution, side_mm)
    hu = box_average(scan.hu, scan.grid, out, FILL_HU)
    body = box_average(scan.body.astype(np.float32), scan.grid, out, 0.0) >= 0.5
    return hu, body


# ------------------------------------------------------------------------------------------
# Rendering


def covering_detector(
    scan: ClinicalScan,
    pixel_mm: float = DEFAULT_PIXEL_MM,
    *,
    sod_mm: float = geometry.DEFAULT_SOD_MM,
    sdd_mm: float = geometry.DEFAULT_SDD_MM,
    margin_px: int = 4,
) -> tuple[int, int]:
    """``(rows, cols)`` of a detector of ``pixel_mm`` pixels that sees the whole body mask
    from every gantry angle (its farthest axial radius magnified from the near side), plus
    ``margin_px`` pixels on each side."""
    mask = scan.body
    if not mask.any():
        raise ValueError(f"{scan.source or 'scan'}: empty body mask, nothing to cover")
    g = scan.grid
    zc = g.origin_xyz_mm[2] + np.arange(g.shape[0]) * g.spacing_mm[0]
    yc = g.origin_xyz_mm[1] + np.arange(g.shape[1]) * g.spacing_mm[1]
    xc = g.origin_xyz_mm[0] + np.arange(g.shape[2]) * g.spacing_mm[2]
    axial = mask.any(axis=1)  # [z, x]
    half = np.asarray(g.spacing_mm) / 2.0
    r = np.hypot(np.abs(zc)[:, None] + half[0], np.abs(xc)[None, :] + half[2])[axial].max()
    y = (np.abs(yc) + half[1])[mask.any(axis=(0, 2))].max()
    if r >= sod_mm:
        raise ValueError(f"sod_mm={sod_mm}: the source would lie inside the body ({r:.0f} mm)")
    mag = sdd_mm / (sod_mm - r)
    cols = 2 * (math.ceil(r * mag / pixel_mm) + margin_px)
    rows = 2 * (math.ceil(y * mag / pixel_mm) + margin_px)
    return rows, cols


def clinical_xrays(
    scan: ClinicalScan,
    angles_deg: Sequence[float],
    key: jax.Array | None = None,
    *,
    pixel_mm: float = DEFAULT_PIXEL_MM,
    det_shape: tuple[int, int] | None = None,
    sod_mm: float = geometry.DEFAULT_SOD_MM,
    sdd_mm: float = geometry.DEFAULT_SDD_MM,
    photons: float | None = DEFAULT_PHOTONS,
    mode: str = "mono",
) -> tuple[jax.Array, Geometry]:
    """Clinical X-rays of the whole scan: ``(line integrals [V, rows, cols], geometry)``.

    Args:
      scan: from ``load_scan`` / ``scan_from_array``.
      angles_deg: gantry angles (degrees), e.g. ``geometry.nested_view_angles(8)``.
      key: PRNG key of the Poisson noise (needed unless ``photons`` is None).
      pixel_mm: detector pitch at the detector (mm), square pixels.
      det_shape: ``(rows, cols)``; default ``covering_detector`` (the body from every angle).
      sod_mm, sdd_mm: source to isocentre / to detector (mm); circular orbit about +y.
      photons: unattenuated photons per pixel (None: noise-free).
      mode: ``"mono"`` or ``"poly"`` (``physics.render_drrs``: 120 kVp, water-calibrated).

    Rendered by Joseph's method at the scan's resolution (``physics.render_drrs``).
    """
    if det_shape is None:
        det_shape = covering_detector(scan, pixel_mm, sod_mm=sod_mm, sdd_mm=sdd_mm)
    geom = geometry.circular_cone_beam(
        np.asarray(angles_deg, np.float64),
        sod_mm=sod_mm,
        sdd_mm=sdd_mm,
        det_shape=det_shape,
        pixel_mm=pixel_mm,
    )
    drr = physics.render_drrs(
        jnp.asarray(scan.hu), scan.grid, geom, key, mode=mode, photons=photons
    )
    return drr, geom


# ------------------------------------------------------------------------------------------
# Detector sampling for a reconstruction grid


def footprint_pixel_mm(
    voxel_mm: float,
    sod_mm: float = geometry.DEFAULT_SOD_MM,
    sdd_mm: float = geometry.DEFAULT_SDD_MM,
) -> float:
    """A voxel's width at the isocentre magnified onto the detector (mm)."""
    return float(voxel_mm) * float(sdd_mm) / float(sod_mm)


def _centred_edges(count: int, pixel_mm: float) -> np.ndarray:
    return (np.arange(count + 1) - count / 2.0) * pixel_mm


def bin_xrays(
    drr: jax.typing.ArrayLike,
    pixel_mm: float | tuple[float, float],
    new_pixel_mm: float | tuple[float, float],
) -> tuple[np.ndarray, tuple[float, float]]:
    """Area-average centred detector images ``[V, rows, cols]`` onto pixels of
    ``new_pixel_mm`` (one number or ``(row, col)``, mm at the detector).

    Each axis keeps the whole pixels of the new size that fit in its extent, centred (the
    partial ones at the edges are cropped); a new pixel is the area-weighted mean of the old
    ones it overlaps (fractional overlaps count by area), so means are kept and a
    non-square image is never stretched. Returns ``(images [V, rows', cols'] float32,
    (row_pixel_mm, col_pixel_mm))``.
    """
    img = np.asarray(drr, np.float32)
    if img.ndim != 3:
        raise ValueError(f"drr: expected [views, rows, cols], got shape {img.shape}")
    old = np.broadcast_to(np.asarray(pixel_mm, np.float64), (2,))
    new = np.broadcast_to(np.asarray(new_pixel_mm, np.float64), (2,))
    if not (np.all(old > 0) and np.all(new > 0)):
        raise ValueError(f"pixel sizes must be positive, got {pixel_mm!r} -> {new_pixel_mm!r}")
    w = []
    for n, p, q in zip(img.shape[1:], old, new, strict=True):
        count = max(1, int(math.floor(n * p / q + 1e-6)))
        w.append(overlap_weights(_centred_edges(count, q), _centred_edges(n, p)))
    out = np.einsum("ri,vij,cj->vrc", w[0], img, w[1], optimize=True)
    out /= np.maximum(w[0].sum(1), 1e-12)[None, :, None] * np.maximum(w[1].sum(1), 1e-12)
    return out.astype(np.float32), (float(new[0]), float(new[1]))


def resize_xrays(
    drr: jax.typing.ArrayLike, pixel_mm: float | tuple[float, float], size: int
) -> tuple[np.ndarray, tuple[float, float]]:
    """What ``xct.radiograph.load_xray`` does today: resample ``[V, rows, cols]`` to
    ``size x size`` (``jax.image.resize``, linear, antialiased) whatever the extent; the
    pixels become ``extent / size`` per axis (stretched for a non-square image). Returns
    ``(images [V, size, size] float32, (row_pixel_mm, col_pixel_mm))``."""
    img = jnp.asarray(drr, jnp.float32)
    p = np.broadcast_to(np.asarray(pixel_mm, np.float64), (2,))
    out = jax.image.resize(img, (img.shape[0], size, size), "linear")
    return np.asarray(out), (float(img.shape[1] * p[0] / size), float(img.shape[2] * p[1] / size))


def orbit(
    angles_deg: Sequence[float],
    det_shape: tuple[int, int],
    pixel_mm: tuple[float, float],
    *,
    sod_mm: float = geometry.DEFAULT_SOD_MM,
    sdd_mm: float = geometry.DEFAULT_SDD_MM,
) -> Geometry:
    """The circular cone-beam views of a (resampled) detector: ``(rows, cols)`` pixels of
    ``(row_mm, col_mm)``, as ``clinical_xrays`` renders them."""
    return geometry.circular_cone_beam(
        np.asarray(angles_deg, np.float64),
        sod_mm=sod_mm,
        sdd_mm=sdd_mm,
        det_shape=det_shape,
        pixel_mm=pixel_mm,
    )


DETECTOR_SAMPLINGS = ("footprint", "resize")


def xrays_for_grid(
    drr: jax.typing.ArrayLike,
    pixel_mm: float | tuple[float, float],
    angles_deg: Sequence[float],
    grid: VolumeGrid,
    *,
    sampling: str = "footprint",
    footprint_factor: float = 1.0,
    sod_mm: float = geometry.DEFAULT_SOD_MM,
    sdd_mm: float = geometry.DEFAULT_SDD_MM,
) -> tuple[np.ndarray, Geometry]:
    """Fine X-rays ``[V, rows, cols]`` (pitch ``pixel_mm`` at the detector) brought to what
    a reconstruction on ``grid`` can explain: ``(images, geometry of the new detector)``.

    ``sampling``: ``"footprint"`` area-averages to square pixels of ``footprint_factor``
    times the voxel's footprint at the detector (``footprint_pixel_mm``; ``bin_xrays``);
    ``"resize"`` is today's ``grid.shape[0]`` x ``grid.shape[0]`` resampling
    (``resize_xrays``).
    """
    if sampling == "footprint":
        new_mm = footprint_factor * footprint_pixel_mm(min(grid.spacing_mm), sod_mm, sdd_mm)
        out, pix = bin_xrays(drr, pixel_mm, new_mm)
    elif sampling == "resize":
        out, pix = resize_xrays(drr, pixel_mm, grid.shape[0])
    else:
        raise ValueError(f"sampling: expected one of {DETECTOR_SAMPLINGS}, got {sampling!r}")
    geom = orbit(angles_deg, out.shape[1:], pix, sod_mm=sod_mm, sdd_mm=sdd_mm)
    return out, geom
