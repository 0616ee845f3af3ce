"""Analytic phantoms: ellipsoids and the 3D Shepp-Logan, voxelised and with exact line integrals.

An ellipsoid is ``(value, centre_xyz_mm, semi_axes_mm, phi_deg, profile)``: ``value`` is
added inside (attenuation per mm, or any quantity per mm), the ellipsoid is rotated by
``phi_deg`` about the world z axis, and ``profile`` is ``"uniform"`` (constant inside) or
``"smooth"`` (``value * (1 - q^2)`` with ``q`` the normalised radius, which is continuous
at the surface, so voxelising it loses little). Both have closed-form line integrals,
which is what the projector is tested against.

Seeded procedural chest phantoms: ``chest_phantom`` is ``draw_chest_params`` (every random
draw, into a ``ChestParams``) followed by ``paint_chest`` (voxelisation, no randomness). This
module imports nothing else from xct.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Ellipsoid:
    value: float
    center_xyz_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    phi_deg: float = 0.0
    profile: str = "uniform"

    def __post_init__(self):
        if self.profile not in ("uniform", "smooth"):
            raise ValueError(f"profile: expected 'uniform' or 'smooth', got {self.profile!r}")
        if not all(a > 0 for a in self.semi_axes_mm):
            raise ValueError(f"semi_axes_mm: expected positive lengths, got {self.semi_axes_mm!r}")

    def rotation(self) -> np.ndarray:
        """Ellipsoid frame to world (rotation about z by ``phi_deg``)."""
        p = np.deg2rad(self.phi_deg)
        c, s = np.cos(p), np.sin(p)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# Kak & Slaney's ellipsoids in the "modified" (higher contrast) intensities used by
# MATLAB's phantom3d and most 3D reconstruction toolkits; coordinates are fractions of the
# half field of view. Rotations are about z only (the tilt of the two small ellipsoids
# some versions carry is dropped).
_SHEPP_LOGAN = (
    # value, (x0, y0, z0), (a, b, c), phi
    (1.0, (0.0, 0.0, 0.0), (0.69, 0.92, 0.81), 0.0),
    (-0.8, (0.0, -0.0184, 0.0), (0.6624, 0.874, 0.78), 0.0),
    (-0.2, (0.22, 0.0, 0.0), (0.11, 0.31, 0.22), -18.0),
    (-0.2, (-0.22, 0.0, 0.0), (0.16, 0.41, 0.28), 18.0),
    (0.1, (0.0, 0.35, -0.15), (0.21, 0.25, 0.41), 0.0),
    (0.1, (0.0, 0.1, 0.25), (0.046, 0.046, 0.05), 0.0),
    (0.1, (0.0, -0.1, 0.25), (0.046, 0.046, 0.05), 0.0),
    (0.1, (-0.08, -0.605, 0.0), (0.046, 0.023, 0.05), 0.0),
    (0.1, (0.0, -0.606, 0.0), (0.023, 0.023, 0.02), 0.0),
    (0.1, (0.06, -0.605, 0.0), (0.023, 0.046, 0.02), 0.0),
)


def shepp_logan_3d(
    half_fov_mm: float, scale: float = 1.0, profile: str = "uniform"
) -> list[Ellipsoid]:
    """The 3D Shepp-Logan phantom filling a cube of half-width ``half_fov_mm``.

    ``scale`` multiplies all values (e.g. 0.02 /mm to look like water-ish attenuation).
    """
    return [
        Ellipsoid(
            value=v * scale,
            center_xyz_mm=tuple(float(c) * half_fov_mm for c in ctr),
            semi_axes_mm=tuple(float(a) * half_fov_mm for a in axes),
            phi_deg=phi,
            profile=profile,
        )
        for v, ctr, axes, phi in _SHEPP_LOGAN
    ]


def _vec(v, like):
    """A 3-vector shaped to broadcast against ``like`` ``[..., 3]`` without rank promotion."""
    return jnp.asarray(v, like.dtype).reshape((1,) * (like.ndim - 1) + (3,))


def _normalised(e: Ellipsoid, points_xyz):
    """Points in the ellipsoid's unit-sphere frame, ``[..., 3]``."""
    rel = points_xyz - _vec(e.center_xyz_mm, points_xyz)
    rot = jnp.asarray(e.rotation(), points_xyz.dtype)
    return jnp.matmul(rel, rot, precision=jax.lax.Precision.HIGHEST) / _vec(
        e.semi_axes_mm, points_xyz
    )


def evaluate(ellipsoids: Sequence[Ellipsoid], points_xyz_mm) -> jax.Array:
    """Phantom value at world points ``[..., 3]`` (mm)."""
    p = jnp.asarray(points_xyz_mm, jnp.float32)
    out = jnp.zeros(p.shape[:-1], jnp.float32)
    for e in ellipsoids:
        q2 = jnp.sum(_normalised(e, p) ** 2, axis=-1)
        inside = q2 <= 1.0
        if e.profile == "uniform":
            out = out + jnp.where(inside, e.value, 0.0)
        else:
            out = out + jnp.where(inside, e.value * (1.0 - q2), 0.0)
    return out


def voxelize(ellipsoids: Sequence[Ellipsoid], grid, supersample: int = 3) -> jax.Array:
    """Mean of the phantom over each voxel of ``grid`` (``supersample^3`` points per voxel).

    Returns ``[nz, ny, nx]`` float32. ``grid`` is an ``xct.geometry.VolumeGrid`` (any object
    with ``voxel_centers_xyz_mm()``, ``spacing_xyz_mm`` and ``direction_matrix()``).
    """
    centres = jnp.asarray(grid.voxel_centers_xyz_mm(), jnp.float32)
    s = int(supersample)
    offs = (np.arange(s) + 0.5) / s - 0.5
    step = np.asarray(grid.direction_matrix()) * np.asarray(grid.spacing_xyz_mm)[None, :]

    @jax.jit
    def one(offset_xyz):
        return evaluate(ellipsoids, centres + _vec(offset_xyz, centres))

    acc = jnp.zeros(centres.shape[:-1], jnp.float32)
    for oz in offs:
        for oy in offs:
            for ox in offs:
                acc = acc + one(jnp.asarray(step @ np.array([ox, oy, oz]), jnp.float32))
    return acc / float(s**3)


def line_integrals(ellipsoids: Sequence[Ellipsoid], origins_xyz_mm, directions_xyz) -> np.ndarray:
    """Exact line integrals along full lines ``origin + t * direction`` (float64, NumPy).

    Args:
      origins_xyz_mm: ``[..., 3]`` points on the rays.
      directions_xyz: ``[..., 3]`` ray directions (normalised here).
    """
    o = np.asarray(origins_xyz_mm, np.float64)
    u = np.asarray(directions_xyz, np.float64)
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    total = np.zeros(o.shape[:-1])
    for e in ellipsoids:
        r = e.rotation()
        axes = np.asarray(e.semi_axes_mm, np.float64)
        a = ((o - np.asarray(e.center_xyz_mm)) @ r) / axes
        b = (u @ r) / axes
        bb = np.sum(b * b, -1)
        ab = np.sum(a * b, -1)
        disc = ab * ab - bb * (np.sum(a * a, -1) - 1.0)
        chord = 2.0 * np.sqrt(np.maximum(disc, 0.0)) / bb  # length in mm (u is a unit vector)
        if e.profile == "uniform":
            total += e.value * chord
        else:  # integral of 1 - q(t)^2 between the roots of the quadratic q(t)^2 = 1
            total += e.value * bb * chord**3 / 6.0
    return total


def near_surface(
    ellipsoids: Sequence[Ellipsoid], origins_xyz_mm, directions_xyz, margin_mm: float
) -> np.ndarray:
    """True for lines passing within about ``margin_mm`` of any ellipsoid surface.

    A line is flagged when growing or shrinking the ellipsoid's axes by ``margin_mm``
    changes whether it hits; there a voxelised uniform phantom cannot match the analytic
    integral to within a voxel's worth of chord, whatever the projector.
    """
    o = np.asarray(origins_xyz_mm, np.float64)
    u = np.asarray(directions_xyz, np.float64)
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    flag = np.zeros(o.shape[:-1], bool)
    for e in ellipsoids:
        hits = []
        for delta in (-margin_mm, margin_mm):
            axes = np.maximum(np.asarray(e.semi_axes_mm, np.float64) + delta, 1e-6)
            r = e.rotation()
            a = ((o - np.asarray(e.center_xyz_mm)) @ r) / axes
            b = (u @ r) / axes
            disc = np.sum(a * b, -1) ** 2 - np.sum(b * b, -1) * (np.sum(a * a, -1) - 1.0)
            hits.append(disc > 0)
        flag |= hits[0] != hits[1]
    return flag


# ==========================================================================================
# Procedural chest phantom
#
# Coordinates are the projector frame, in mm, centred on the grid centre: x is the patient's
# right-left axis (+x = patient's left, as LPS), y the head-foot axis (head at -y, so at
# detector row 0), z the anterior-posterior axis (+z = posterior, so gantry 0 deg is a PA
# view). Every structure is an analytic shape with an approximate signed distance; a voxel
# takes the fraction ``clip(0.5 - d / h, 0, 1)`` of it (``h`` the voxel size), a cheap
# partial-volume model that keeps thin structures (vessels, rib cortex) from aliasing and
# makes the phantom resolution-independent. Labels go to voxels whose centre is inside.

CHEST_LABELS = {
    "background": 0,
    "fat": 1,
    "muscle": 2,
    "lung": 3,
    "vessel": 4,
    "heart": 5,
    "aorta": 6,
    "vertebra": 7,
    "rib": 8,
    "sternum": 9,
    "nodule": 10,
    "couch": 11,
    # version 2 anatomy
    "arm": 12,
    "humerus": 13,
    "scapula": 14,
    "clavicle": 15,
    "breast": 16,
}

_HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 40.0,
    "lung": -850.0,
    "vessel": 40.0,
    "heart": 40.0,
    "aorta": 40.0,
    "cancellous": 400.0,
    "cortical": 1000.0,
    "rib": 700.0,
    "sternum": 500.0,
    "disc": 80.0,
    "couch": 200.0,
    "scapula": 700.0,
    "clavicle": 800.0,
    "breast": -60.0,
}


class _Frame(NamedTuple):
    """A grid seen from the phantom's centred frame: maps centred-mm boxes to voxel slices."""

    grid: Any  # xct.geometry.VolumeGrid
    centre_xyz_mm: np.ndarray  # [3] float64, world (x, y, z) of the grid centre
    h_mm: float  # mean voxel size

    @classmethod
    def of(cls, grid, points_xyz_mm: np.ndarray | None = None) -> _Frame:
        """The frame of ``grid``; ``points_xyz_mm`` are its voxel centres if already known."""
        if points_xyz_mm is None:
            points_xyz_mm = np.asarray(grid.voxel_centers_xyz_mm(), np.float64)
        centre = points_xyz_mm.reshape(-1, 3)[[0, -1]].mean(axis=0)
        return cls(grid, centre, float(np.mean(grid.spacing_mm)))

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices ``[z, y, x]`` covering the world box ``lo..hi`` (centred mm)."""
        m, o = self.grid.world_to_index()
        lo = np.asarray(lo, np.float64) - self.h_mm
        hi = np.asarray(hi, np.float64) + self.h_mm
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
        )
        idx = (corners + self.centre_xyz_mm - o) @ m.T  # [8, (ix, iy, iz)]
        i0 = np.floor(idx.min(axis=0)).astype(int)
        i1 = np.ceil(idx.max(axis=0)).astype(int) + 1
        shape_xyz = self.grid.shape[::-1]
        i0 = np.clip(i0, 0, shape_xyz)
        i1 = np.clip(i1, 0, shape_xyz)
        if np.any(i1 <= i0):
            return None
        return (slice(i0[2], i1[2]), slice(i0[1], i1[1]), slice(i0[0], i1[0]))


class _Canvas:
    """HU and label volumes painted back to front, with per-structure bounding boxes."""

    def __init__(self, grid):
        pts = np.asarray(grid.voxel_centers_xyz_mm(), np.float64)
        self.frame = _Frame.of(grid, pts)
        centre = self.frame.centre_xyz_mm
        self.x = (pts[..., 0] - centre[0]).astype(np.float32)
        self.y = (pts[..., 1] - centre[1]).astype(np.float32)
        self.z = (pts[..., 2] - centre[2]).astype(np.float32)
        self.h = self.frame.h_mm
        self.hu = np.full(grid.shape, _HU["air"], np.float32)
        self.labels = np.zeros(grid.shape, np.uint8)

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        return self.frame.box(lo, hi)

    def coords(self, sl):
        return self.x[sl], self.y[sl], self.z[sl]

    def occupancy(self, dist_mm):
        return np.clip(0.5 - dist_mm / self.h, 0.0, 1.0).astype(np.float32)

    def paint(self, sl, dist_mm, value, label: int, weight=None):
        """Blend ``value`` (scalar or array) where the signed distance is negative."""
        if sl is None:
            return
        a = self.occupancy(dist_mm)
        if weight is not None:
            a = a * weight
        hu = self.hu[sl]
        self.hu[sl] = hu + a * (value - hu)
        lab = self.labels[sl]
        self.labels[sl] = np.where(a >= 0.5, np.uint8(label), lab)


def _ellipsoid_dist(x, y, z, c, axes):
    """Approximate signed distance (mm) to an axis-aligned ellipsoid."""
    q = np.sqrt(
        ((x - c[0]) / axes[0]) ** 2 + ((y - c[1]) / axes[1]) ** 2 + ((z - c[2]) / axes[2]) ** 2
    )
    return (q - 1.0) * min(axes)


def _segment_dist(x, y, z, a, b):
    """Distance (mm) from points to the segment ``a -> b`` and the parameter ``t`` there."""
    d = b - a
    dd = float(d @ d) + 1e-9
    t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / dd, 0.0, 1.0)
    r2 = (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
    return np.sqrt(r2), t


def _tube(canvas: _Canvas, points, radii, value, label: int, weight=None) -> None:
    """Paint a tube along a polyline ``points [n, 3]`` (mm), radius ``radii [n]`` (mm).

    Each segment is painted inside its own bounding box (cheap for long thin tubes); the
    radius varies linearly along a segment. ``weight`` is an optional full-volume
    ``[z, y, x]`` multiplier of the occupancy (e.g. "only inside the lungs").
    """
    points = np.asarray(points, np.float64)
    radii = np.broadcast_to(np.asarray(radii, np.float64), (len(points),))
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:], strict=True):
        r = max(ra, rb)
        sl = canvas.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
        if sl is None:
            continue
        x, y, z = canvas.coords(sl)
        d, t = _segment_dist(x, y, z, a, b)
        dist = d - (ra + t * (rb - ra))
        canvas.paint(sl, dist, value, label, None if weight is None else weight[sl])


def _smooth_noise(rng, x, y, z, cell_mm: float, amplitude: float):
    """Resolution-independent smooth noise: a random lattice (``cell_mm``) interpolated with
    a cubic-ish (smoothstep) kernel at the given points; values in about +-amplitude."""
    n = 512.0 / cell_mm
    size = int(np.ceil(n)) + 4
    lattice = rng.uniform(-1.0, 1.0, (size, size, size)).astype(np.float32)
    u = [(c + 256.0) / cell_mm + 1.0 for c in (x, y, z)]
    out = np.zeros(x.shape, np.float32)
    fl = [np.clip(np.floor(v).astype(np.int32), 0, size - 2) for v in u]
    fr = [np.clip(v - f, 0.0, 1.0) for v, f in zip(u, fl, strict=True)]
    fr = [f * f * (3 - 2 * f) for f in fr]
    for dx in (0, 1):
        wx = fr[0] if dx else 1 - fr[0]
        for dy in (0, 1):
            wy = fr[1] if dy else 1 - fr[1]
            for dz in (0, 1):
                wz = fr[2] if dz else 1 - fr[2]
                out += wx * wy * wz * lattice[fl[0] + dx, fl[1] + dy, fl[2] + dz]
    return amplitude * out


def _rng(key_or_seed) -> np.random.Generator:
    """A NumPy generator from an int seed or a JAX PRNG key (raw or typed)."""
    if isinstance(key_or_seed, (int, np.integer)):
        return np.random.default_rng(int(key_or_seed))
    key = key_or_seed
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = np.asarray(key).astype(np.uint32).reshape(-1).tolist()
    return np.random.default_rng([int(w) for w in words])


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _rotate_towards(rng, direction, angle_deg: float) -> np.ndarray:
    """``direction`` turned by ``angle_deg`` about a random perpendicular axis (unit)."""
    d = direction / np.linalg.norm(direction)
    perp = np.cross(d, rng.normal(size=3))
    perp /= np.linalg.norm(perp) + 1e-12
    a = np.deg2rad(angle_deg)
    return np.cos(a) * d + np.sin(a) * perp


def _vessel_tree(rng, start, direction, length, radius, depth, out) -> None:
    """Recursive branching: append ``VesselSegment``s to ``out`` (mm)."""
    end = start + length * direction / np.linalg.norm(direction)
    r_end = radius * 0.93
    out.append(VesselSegment(start, end, radius, r_end))
    if depth <= 0 or r_end < 0.9:
        return
    spread = rng.uniform(18.0, 38.0)
    for sign in (1.0, -1.0):
        child = _rotate_towards(rng, direction, sign * spread)
        _vessel_tree(
            rng,
            end,
            child,
            length * rng.uniform(0.68, 0.82),
            r_end * rng.uniform(0.76, 0.88),
            depth - 1,
            out,
        )


# ---- chest parameters: every random draw, grid-free except for the nodules ----------------
# Lengths are mm in the centred projector frame above. Fields keep the exact values (and
# Python or NumPy scalar types, which decide float32 vs float64 arithmetic in the painting)
# of the original single-function phantom, so painting them reproduces it bit for bit.


class ChestBody(NamedTuple):
    """Overall size of a chest phantom (mm)."""

    scale: float  # overall size factor, 0.88..1.12
    scale_x: float  # per-axis size factors: ``scale`` times 0.94..1.06
    scale_y: float
    scale_z: float
    half_width_mm: float  # body half-width (x)
    half_depth_mm: float  # body half-depth (z)
    fat_mm: float  # subcutaneous fat thickness
    y_top_mm: float  # scan range, head end (negative)
    y_bottom_mm: float  # scan range, foot end
    y_shoulder_mm: float  # where the neck widens into the thorax
    z_spine_mm: float  # centre of the vertebral bodies


class ChestLungs(NamedTuple):
    """Chest cavity and lungs (mm); each lung is a tapered elliptic cylinder with a dome."""

    scale: float  # lung size factor, 0.9..1.1
    y_apex_mm: float
    y_dome_right_mm: float  # top of the right hemidiaphragm
    y_dome_left_mm: float  # top of the left hemidiaphragm (lower: larger y)
    cavity_half_width_mm: float  # inner chest wall (x)
    cavity_half_depth_mm: float  # inner chest wall (z)
    half_width_mm: float  # lung semi-axis in x
    half_depth_mm: float  # lung semi-axis in z
    z_centre_mm: float
    y_bottom_mm: float  # below the lowest point of the diaphragm
    texture_seed: int  # seeds the parenchymal texture lattice


class VesselSegment(NamedTuple):
    """One segment of a pulmonary vessel tree, a tube whose radius varies linearly."""

    start_xyz_mm: np.ndarray  # [3] float64
    end_xyz_mm: np.ndarray  # [3] float64
    start_radius_mm: float
    end_radius_mm: float


class ChestHeart(NamedTuple):
    """The heart: an ellipsoid tilted in the x-y plane (long axis towards left and feet)."""

    scale: float  # heart size factor, 0.88..1.15
    centre_xyz_mm: np.ndarray  # [3] float64
    semi_axes_mm: np.ndarray  # [3] float64, in the tilted frame
    tilt_rad: float


class ChestAorta(NamedTuple):
    """Ascending aorta, arch over the heart and descending aorta left of the spine."""

    radius_mm: float
    y_arch_mm: float  # head end of the arch's centre line


class Nodule(NamedTuple):
    """A solid lung nodule: a sphere of constant HU."""

    centre_xyz_mm: np.ndarray  # [3] float64
    radius_mm: float
    hu: float


class ChestExtras(NamedTuple):
    """Version 2 anatomy (``chest_phantom(..., version=2)``), drawn after everything else."""

    arms_down: bool  # arms beside the body (else raised out of the field of view)
    arm_radius_mm: float
    arm_gap_mm: float  # skin-to-skin gap between the body and an arm
    scapula_half_mm: np.ndarray  # [2] half width (x) and half height (y) of each scapula
    clavicle_radius_mm: float
    breast_axes_mm: np.ndarray | None  # [3] semi-axes of each breast, or None
    contrast_hu: float | None  # blood pool HU with IV contrast (heart, aorta), or None
    texture_amplitude: float  # extra fine lung texture (HU), a 1/f-like second octave
    extra_fat_mm: float = 0.0  # added to the subcutaneous fat (real chests hold more fat)
    pericardial_fat_mm: float = 0.0  # fat around the heart


class ChestParams(NamedTuple):
    """Everything that varies between chest phantoms; ``paint_chest`` turns it into volumes."""

    body: ChestBody
    lungs: ChestLungs
    vessels: tuple[VesselSegment, ...]  # both trees, all segments (whatever the complexity)
    heart: ChestHeart
    aorta: ChestAorta
    nodules: tuple[Nodule, ...]  # empty without nodules or below complexity 0.5
    couch: bool  # paint the patient couch
    complexity: float  # in [0, 1]; see ``chest_phantom``
    extras: ChestExtras | None = None  # version 2 anatomy, None for version 1


def _draw_body(rng: np.random.Generator) -> ChestBody:
    s = rng.uniform(0.88, 1.12)
    sx, sy, sz = s * rng.uniform(0.94, 1.06, size=3)
    body_ax, body_az = 170.0 * sx, 112.0 * sz
    fat = rng.uniform(7.0, 20.0) * s
    y_top = -rng.uniform(190.0, 220.0) * sy
    y_bot = rng.uniform(160.0, 200.0) * sy
    return ChestBody(
        scale=s,
        scale_x=sx,
        scale_y=sy,
        scale_z=sz,
        half_width_mm=body_ax,
        half_depth_mm=body_az,
        fat_mm=fat,
        y_top_mm=y_top,
        y_bottom_mm=y_bot,
        y_shoulder_mm=-170.0 * sy,
        z_spine_mm=body_az - 62.0 * sz,
    )


def _draw_lungs(rng: np.random.Generator, b: ChestBody) -> ChestLungs:
    s, sy = b.scale, b.scale_y
    lung_s = rng.uniform(0.9, 1.1)
    y_dome_r = rng.uniform(35.0, 55.0) * sy
    y_dome_l = y_dome_r + rng.uniform(8.0, 22.0) * sy
    cav_ax = b.half_width_mm - b.fat_mm - 14.0 * s
    cav_az = b.half_depth_mm - b.fat_mm - 12.0 * s
    lung_ax = 0.56 * cav_ax * lung_s * rng.uniform(0.95, 1.05)
    texture_seed = rng.integers(2**31)
    return ChestLungs(
        scale=lung_s,
        y_apex_mm=-165.0 * sy * lung_s**0.5,
        y_dome_right_mm=y_dome_r,
        y_dome_left_mm=y_dome_l,
        cavity_half_width_mm=cav_ax,
        cavity_half_depth_mm=cav_az,
        half_width_mm=lung_ax,
        half_depth_mm=0.95 * cav_az * lung_s,
        z_centre_mm=0.1 * cav_az,
        y_bottom_mm=max(y_dome_r, y_dome_l) + 75.0 * sy,
        texture_seed=texture_seed,
    )


def _draw_vessels(rng: np.random.Generator, b: ChestBody) -> tuple[VesselSegment, ...]:
    """Recursive vessel trees from both hila (4-6 roots a side)."""
    s, sy = b.scale, b.scale_y
    y_hilum = -15.0 * sy + rng.uniform(-8.0, 8.0)
    segments = []
    for side in (-1.0, 1.0):
        hilum = np.array([side * 30.0 * s, y_hilum, 5.0])
        n_roots = int(rng.integers(4, 7))
        for j in range(n_roots):
            # fan the roots from upward-lateral through lateral to downward-posterior
            ang = np.deg2rad(-70.0 + 150.0 * (j + rng.uniform(0.2, 0.8)) / n_roots)
            direction = np.array([side * np.cos(ang) * 0.9, np.sin(ang), rng.uniform(-0.4, 0.5)])
            _vessel_tree(
                rng,
                hilum,
                direction,
                rng.uniform(30.0, 40.0) * s,
                rng.uniform(5.0, 7.0) * s,
                int(rng.integers(6, 9)),
                segments,
            )
    return tuple(segments)


def _draw_heart(rng: np.random.Generator, b: ChestBody, lungs: ChestLungs) -> ChestHeart:
    s, sy, sz = b.scale, b.scale_y, b.scale_z
    hs = rng.uniform(0.88, 1.15)
    centre = np.array(
        [
            rng.uniform(12.0, 32.0) * s,
            lungs.y_dome_left_mm - 40.0 * sy * hs,
            -rng.uniform(15.0, 30.0) * sz,
        ]
    )
    semi_axes = np.array([62.0, 52.0, 50.0]) * hs * s
    tilt = np.deg2rad(rng.uniform(20.0, 40.0))
    return ChestHeart(scale=hs, centre_xyz_mm=centre, semi_axes_mm=semi_axes, tilt_rad=tilt)


def _draw_aorta(rng: np.random.Generator, b: ChestBody, heart: ChestHeart) -> ChestAorta:
    r_ao = rng.uniform(11.0, 14.0) * b.scale
    y_arch = heart.centre_xyz_mm[1] - heart.semi_axes_mm[1] - rng.uniform(25.0, 40.0) * b.scale_y
    return ChestAorta(radius_mm=r_ao, y_arch_mm=y_arch)


def _draw_nodules(
    rng: np.random.Generator, b: ChestBody, lungs: ChestLungs, frame: _Frame
) -> tuple[Nodule, ...]:
    """1-4 nodules by rejection: a candidate must lie 3 mm inside a lung and touch the grid.

    The grid test makes these (and only these) draws depend on the field of view: a
    nodule that would fall outside a cropped grid is redrawn rather than lost.
    """
    count = int(rng.integers(1, 5))
    placed: list[Nodule] = []
    tries = 0
    while len(placed) < count and tries < 200:
        tries += 1
        r = rng.uniform(2.0, 7.5)
        side = rng.choice([-1.0, 1.0])
        p = np.array(
            [
                side * rng.uniform(30.0, lungs.cavity_half_width_mm),
                rng.uniform(lungs.y_apex_mm, lungs.y_bottom_mm),
                rng.uniform(-lungs.half_depth_mm, lungs.half_depth_mm) + lungs.z_centre_mm,
            ]
        )
        if float(_lung_dist(b, lungs, p[0], p[1], p[2], side)) > -(r + 3.0):
            continue
        if frame.box(p - r, p + r) is None:
            continue
        placed.append(Nodule(centre_xyz_mm=p, radius_mm=r, hu=rng.uniform(20.0, 100.0)))
    return tuple(placed)


def _draw_extras(rng: np.random.Generator, b: ChestBody) -> ChestExtras:
    s = b.scale
    breast = None
    if rng.uniform() < 0.4:
        breast = np.array([rng.uniform(45, 65), rng.uniform(45, 60), rng.uniform(30, 55)]) * s
    return ChestExtras(
        arms_down=bool(rng.uniform() < 0.5),
        arm_radius_mm=rng.uniform(40.0, 55.0) * s,
        arm_gap_mm=rng.uniform(5.0, 30.0),
        scapula_half_mm=np.array([rng.uniform(45.0, 60.0), rng.uniform(65.0, 85.0)]) * s,
        clavicle_radius_mm=rng.uniform(5.5, 7.5) * s,
        breast_axes_mm=breast,
        contrast_hu=float(rng.uniform(150.0, 350.0)) if rng.uniform() < 0.4 else None,
        texture_amplitude=float(rng.uniform(15.0, 40.0)),
        extra_fat_mm=float(rng.uniform(5.0, 25.0) * s),
        pericardial_fat_mm=float(rng.uniform(4.0, 12.0) * s),
    )


def _check_complexity(complexity) -> float:
    if not 0.0 <= float(complexity) <= 1.0:
        raise ValueError(f"complexity: expected a value in [0, 1], got {complexity!r}")
    return float(complexity)


def _draw_chest_params(
    rng: np.random.Generator,
    frame: _Frame,
    nodules: bool,
    couch: bool,
    complexity: float,
    version: int = 1,
) -> ChestParams:
    body = _draw_body(rng)
    lungs = _draw_lungs(rng, body)
    vessels = _draw_vessels(rng, body)
    heart = _draw_heart(rng, body, lungs)
    aorta = _draw_aorta(rng, body, heart)
    # the nodules are the last draws: skipping them changes nothing above
    drawn = _draw_nodules(rng, body, lungs, frame) if nodules and complexity >= 0.5 else ()
    # version 2's draws come after all of version 1's: its anatomy is version 1's plus more
    extras = _draw_extras(rng, body) if version == 2 else None
    return ChestParams(body, lungs, vessels, heart, aorta, drawn, bool(couch), complexity, extras)


def _check_version(version) -> int:
    if version not in (1, 2):
        raise ValueError(f"version: expected 1 or 2, got {version!r}")
    return int(version)


def draw_chest_params(
    key_or_seed: int | jax.Array,
    grid,
    *,
    nodules: bool = True,
    couch: bool = False,
    complexity: float = 1.0,
    version: int = 1,
) -> ChestParams:
    """The random draws of ``chest_phantom(key_or_seed, grid, ...)``, in the same order.

    Args are those of ``chest_phantom``. Only the nodules depend on ``grid`` (a candidate
    nodule outside the grid is redrawn); everything else is the same on any grid.
    ``paint_chest(draw_chest_params(k, grid, ...), grid)`` equals ``chest_phantom(k, grid,
    ...)`` bit for bit.
    """
    complexity = _check_complexity(complexity)
    version = _check_version(version)
    return _draw_chest_params(
        _rng(key_or_seed), _Frame.of(grid), nodules, couch, complexity, version
    )


# ---- painting: each function paints one structure from the parameters ---------------------
# Order matters (later structures overwrite earlier ones): body, lungs, vessels, heart,
# aorta, spine, ribs, sternum, nodules, couch.


def _body_dist(b: ChestBody, x, y, z, inset):
    """Signed distance (mm) to the body surface moved ``inset`` mm inwards."""
    s, sy, sz = b.scale, b.scale_y, b.scale_z
    grow = _smoothstep((y - (b.y_shoulder_mm - 30.0 * sy)) / (60.0 * sy))  # neck -> thorax
    ax = 55.0 * s + grow * (b.half_width_mm - 55.0 * s) - inset
    az = 55.0 * s + grow * (b.half_depth_mm - 55.0 * s) - inset
    zc = (1.0 - grow) * 25.0 * sz
    # slightly flattened back: a super-ellipse (exponent 2.4) in x-z
    q = (np.abs(x / ax) ** 2.4 + np.abs((z - zc) / az) ** 2.4) ** (1.0 / 2.4)
    d = (q - 1.0) * np.minimum(ax, az)
    return np.maximum(d, np.maximum(b.y_top_mm - y, y - b.y_bottom_mm))


def _lung_dist(b: ChestBody, lungs: ChestLungs, x, y, z, side):
    """Signed distance (mm) to the right (side=-1) or left (side=+1) lung."""
    s, sy = b.scale, b.scale_y
    lung_ax, lung_az, lung_cz = lungs.half_width_mm, lungs.half_depth_mm, lungs.z_centre_mm
    y_apex = lungs.y_apex_mm
    cx = side * (lungs.cavity_half_width_mm - lung_ax * 1.02)
    span = (y - y_apex) / (lungs.y_bottom_mm - y_apex)
    k = np.sqrt(np.clip((y - y_apex) / (95.0 * sy), 1e-4, 1.0))  # rounded apex
    ax = lung_ax * (0.88 + 0.2 * np.clip(span, 0.0, 1.0)) * k
    az = lung_az * (0.9 + 0.12 * np.clip(span, 0.0, 1.0)) * k
    q = np.sqrt(((x - cx) / ax) ** 2 + ((z - lung_cz) / az) ** 2)
    d = (q - 1.0) * np.minimum(ax, az)
    # mediastinum: wider posteriorly (spine) than anteriorly
    med = 22.0 * s + 18.0 * s * _smoothstep((z + 20.0) / 80.0)
    d = np.maximum(d, med - side * x)
    dome = lungs.y_dome_right_mm if side < 0 else lungs.y_dome_left_mm
    y_dia = dome + 55.0 * sy * np.clip(q, 0.0, 1.2) ** 2 + 18.0 * sy * np.clip(z / az, 0, 1)
    d = np.maximum(d, y - y_dia)
    return np.maximum(d, y_apex - y)


def _paint_body(cv: _Canvas, b: ChestBody, extra_fat_mm: float = 0.0) -> None:
    """Fat out to the skin, muscle inside it (``extra_fat_mm`` more fat, version 2)."""
    lo = (-b.half_width_mm, b.y_top_mm, -b.half_depth_mm)
    sl = cv.box(lo, (b.half_width_mm, b.y_bottom_mm, b.half_depth_mm + 5.0))
    x, y, z = cv.coords(sl)
    cv.paint(sl, _body_dist(b, x, y, z, 0.0), _HU["fat"], CHEST_LABELS["fat"])
    inset = b.fat_mm + extra_fat_mm
    cv.paint(sl, _body_dist(b, x, y, z, inset), _HU["muscle"], CHEST_LABELS["muscle"])


def _paint_lungs(cv: _Canvas, b: ChestBody, lungs: ChestLungs, complexity: float) -> np.ndarray:
    """Both lungs with texture; returns their occupancy ``[z, y, x]`` in [0, 1]."""
    cav_ax, cav_az = lungs.cavity_half_width_mm, lungs.cavity_half_depth_mm
    lung_occ = np.zeros(cv.hu.shape, np.float32)
    box = cv.box((-cav_ax, lungs.y_apex_mm, -cav_az), (cav_ax, lungs.y_bottom_mm + 30.0, cav_az))
    if box is None:
        return lung_occ
    x, y, z = cv.coords(box)
    d = np.minimum(_lung_dist(b, lungs, x, y, z, -1.0), _lung_dist(b, lungs, x, y, z, 1.0))
    noise_rng = np.random.default_rng(lungs.texture_seed)
    texture = complexity * _smooth_noise(noise_rng, x, y, z, 9.0, 30.0)
    # dependent (posterior) lung is slightly denser
    gravity = 40.0 * np.clip((z - lungs.z_centre_mm) / lungs.half_depth_mm, -1.0, 1.0)
    cv.paint(box, d, _HU["lung"] + texture + gravity, CHEST_LABELS["lung"])
    lung_occ[box] = cv.occupancy(d)
    return lung_occ


def _paint_vessels(
    cv: _Canvas, vessels: Sequence[VesselSegment], lung_occ: np.ndarray, complexity: float
) -> None:
    """Vessel segments, only inside the lungs, dropping those thinner than the complexity."""
    min_radius = 3.0 * (1.0 - complexity)  # mm; the tree is grown whole (same draws)
    for seg in vessels:
        if seg.start_radius_mm < min_radius:
            continue
        _tube(
            cv,
            np.stack([seg.start_xyz_mm, seg.end_xyz_mm]),
            (seg.start_radius_mm, seg.end_radius_mm),
            _HU["vessel"],
            CHEST_LABELS["vessel"],
            weight=lung_occ,
        )


def _paint_heart(
    cv: _Canvas, heart: ChestHeart, hu: float = _HU["heart"], label: int = CHEST_LABELS["heart"]
) -> None:
    c, axes, tilt = heart.centre_xyz_mm, heart.semi_axes_mm, heart.tilt_rad
    sl = cv.box(c - axes.max(), c + axes.max())
    if sl is None:
        return
    x, y, z = cv.coords(sl)
    u = np.cos(tilt) * (x - c[0]) + np.sin(tilt) * (y - c[1])
    v = -np.sin(tilt) * (x - c[0]) + np.cos(tilt) * (y - c[1])
    d = _ellipsoid_dist(u, v, z, (0.0, 0.0, c[2]), axes)
    cv.paint(sl, d, hu, label)


def _paint_aorta(
    cv: _Canvas, b: ChestBody, heart: ChestHeart, aorta: ChestAorta, hu: float = _HU["aorta"]
) -> None:
    """A tube up from the heart, over it in a half-circle arch, and down left of the spine."""
    s, sy = b.scale, b.scale_y
    heart_c, heart_axes = heart.centre_xyz_mm, heart.semi_axes_mm
    y_arch = aorta.y_arch_mm
    z_asc, z_desc = heart_c[2] + 10.0, b.z_spine_mm - 28.0 * s
    x_asc, x_desc = 8.0 * s, 22.0 * s
    phi = np.linspace(0.0, np.pi, 13)
    zc, rz = 0.5 * (z_asc + z_desc), 0.5 * (z_desc - z_asc)
    arch = np.stack(
        [
            x_asc + (x_desc - x_asc) * (1.0 - np.cos(phi)) / 2.0,
            y_arch - 28.0 * sy * np.sin(phi),
            zc - rz * np.cos(phi),
        ],
        axis=-1,
    )
    path = np.concatenate(
        [
            [[x_asc, heart_c[1] - 0.4 * heart_axes[1], z_asc]],
            arch,
            [
                [x_desc, y_arch + 60.0 * sy, z_desc],
                [x_desc * 0.5, b.y_bottom_mm - aorta.radius_mm, z_desc],
            ],
        ]
    )
    _tube(cv, path, aorta.radius_mm, hu, CHEST_LABELS["aorta"])


def _paint_vertebra(cv: _Canvas, b: ChestBody, yk: float) -> float | None:
    """The vertebra centred at height ``yk`` (mm): body, arch, spinous and transverse processes.

    Returns the z of the spinal canal (mm), or None where the vertebra misses the grid.
    """
    s, sy, z_spine, label = b.scale, b.scale_y, b.z_spine_mm, CHEST_LABELS["vertebra"]
    size = 0.8 + 0.2 * _smoothstep((yk - b.y_shoulder_mm) / 120.0)  # cervical ones smaller
    ax, az, half = 21.0 * s * size, 16.0 * s * size, 10.0 * sy
    c = np.array([0.0, yk, z_spine])
    sl = cv.box(c - [ax + 45.0, half + 20.0, az], c + [ax + 45.0, half + 20.0, az + 75.0])
    if sl is None:
        return None
    x, y, z = cv.coords(sl)
    q = np.sqrt((x / ax) ** 2 + ((z - z_spine) / az) ** 2)
    d = np.maximum((q - 1.0) * az, np.abs(y - yk) - half)
    cv.paint(sl, d, _HU["cortical"], label)
    cv.paint(sl, d + 2.5, _HU["cancellous"], label)
    # posterior arch around the canal
    zc_can = z_spine + az + 9.0 * size
    r = np.sqrt(x**2 + (z - zc_can) ** 2)
    d_arch = np.maximum(np.maximum(r - 16.0 * size, 8.0 * size - r), z_spine + az - z)
    d_arch = np.maximum(d_arch, np.abs(y - yk + 3.0) - 0.8 * half)
    cv.paint(sl, d_arch, _HU["rib"], label)
    tip = np.array([0.0, yk + 12.0 * sy, zc_can + 42.0 * size])
    spinous = [[0.0, yk - 2.0, zc_can + 12.0], tip]
    _tube(cv, spinous, (5.0 * size, 3.5 * size), _HU["rib"], label)
    for side in (-1.0, 1.0):
        transverse = [[side * 10.0, yk - 3.0, zc_can], [side * 38.0 * size, yk - 5.0, zc_can + 8.0]]
        _tube(cv, transverse, 5.0 * size, _HU["rib"], label)
    return zc_can


def _paint_spine(cv: _Canvas, b: ChestBody) -> list[tuple[float, float]]:
    """Vertebrae every ``25 scale_y`` mm inside the scan range.

    Returns ``(y, z_canal)`` (mm) of the painted thoracic levels, which carry the ribs.
    """
    sy, y_shoulder = b.scale_y, b.y_shoulder_mm
    pitch, half = 25.0 * sy, 10.0 * sy
    rib_levels = []
    first = int(np.floor((b.y_top_mm - y_shoulder) / pitch)) - 1
    for k in range(first, int(np.ceil((b.y_bottom_mm + pitch) / pitch)) + 20):
        yk = y_shoulder + 12.0 * sy + k * pitch
        if yk - half < b.y_top_mm or yk + half > b.y_bottom_mm:
            continue
        zc_can = _paint_vertebra(cv, b, yk)
        if zc_can is not None and y_shoulder - 5.0 < yk < y_shoulder + 12.5 * pitch:
            rib_levels.append((yk, zc_can))
    return rib_levels


def _paint_ribs(
    cv: _Canvas, b: ChestBody, lungs: ChestLungs, rib_levels: Sequence[tuple[float, float]]
) -> None:
    """A pair of ribs per level, following the chest wall and sloping down anteriorly."""
    s, sy = b.scale, b.scale_y
    for i, (yk, zc_can) in enumerate(rib_levels):
        # rib cage: narrow at the top, widest at ribs 7-9
        width = 0.55 + 0.45 * _smoothstep((i + 0.5) / 6.0)
        rx = (lungs.cavity_half_width_mm + 8.0 * s) * width
        rz = lungs.cavity_half_depth_mm + 8.0 * s
        floating = i >= 10
        theta_end = np.deg2rad(95.0 if floating else 145.0 - 3.0 * i)
        drop = (45.0 + 8.0 * min(i, 7)) * sy * (0.6 if floating else 1.0)
        for side in (-1.0, 1.0):
            theta0 = np.arcsin(np.clip(38.0 / rx, 0.0, 0.9))
            theta = np.linspace(theta0, theta_end, 14)
            f = (theta - theta0) / (theta_end - theta0)
            pts = np.stack(
                [
                    side * rx * np.sin(theta),
                    yk - 5.0 - 8.0 * sy * np.sin(np.pi * f) + drop * f**1.6,
                    np.minimum(rz * np.cos(theta), zc_can + 5.0),
                ],
                axis=-1,
            )
            pts = np.concatenate([[[side * 30.0, yk - 5.0, zc_can + 6.0]], pts])
            _tube(cv, pts, 3.5 * s, _HU["rib"], CHEST_LABELS["rib"])


def _paint_sternum(cv: _Canvas, b: ChestBody, lungs: ChestLungs) -> None:
    """A flat bar behind the front chest wall, wider at the top (manubrium)."""
    s, sy = b.scale, b.scale_y
    st_z = -(b.half_depth_mm - b.fat_mm - 10.0 * s)
    st_top, st_bot = b.y_shoulder_mm + 25.0 * sy, lungs.y_dome_left_mm + 5.0 * sy
    sl = cv.box((-30.0, st_top, st_z - 12.0), (30.0, st_bot, st_z + 12.0))
    if sl is None:
        return
    x, y, z = cv.coords(sl)
    wx = 14.0 * s + 10.0 * s * _smoothstep((st_top + 45.0 * sy - y) / (40.0 * sy))
    q = np.sqrt((x / wx) ** 2 + ((z - st_z) / (6.5 * s)) ** 2)
    d = np.maximum((q - 1.0) * 6.5 * s, np.maximum(st_top - y, y - st_bot))
    cv.paint(sl, d, _HU["sternum"], CHEST_LABELS["sternum"])


def _paint_nodule(cv: _Canvas, nodule: Nodule) -> None:
    p, r = nodule.centre_xyz_mm, nodule.radius_mm
    sl = cv.box(p - r, p + r)
    if sl is None:  # only when painted on another grid than it was drawn for
        return
    x, y, z = cv.coords(sl)
    d = np.sqrt((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) - r
    cv.paint(sl, d, nodule.hu, CHEST_LABELS["nodule"])


def _paint_couch(cv: _Canvas, b: ChestBody) -> None:
    """A curved +200 HU slab, 20 mm thick, just below the back."""
    z0 = b.half_depth_mm + 4.0
    sl = cv.box((-240.0, b.y_top_mm - 40.0, z0 - 40.0), (240.0, b.y_bottom_mm + 40.0, z0 + 22.0))
    if sl is None:
        return
    x, y, z = cv.coords(sl)
    top = z0 - x**2 / (2.0 * 1100.0)
    d = np.maximum(np.maximum(top - z, z - top - 20.0), np.abs(x) - 230.0)
    cv.paint(sl, d, _HU["couch"], CHEST_LABELS["couch"])


def _paint_arms(cv: _Canvas, b: ChestBody, e: ChestExtras) -> None:
    """Arms hanging beside the body: fat, muscle and the humerus, shoulder to below."""
    s = b.scale
    r = e.arm_radius_mm
    for side in (-1.0, 1.0):
        cx = side * (b.half_width_mm + e.arm_gap_mm + r)
        top = b.y_shoulder_mm + 15.0 * b.scale_y
        path = np.array([[cx * 0.92, top, 10.0], [cx, top + 60.0, 12.0], [cx, b.y_bottom_mm, 18.0]])
        _tube(cv, path, r, _HU["fat"], CHEST_LABELS["arm"])
        _tube(cv, path, r - 8.0 * s, _HU["muscle"], CHEST_LABELS["arm"])
        _tube(cv, path, 11.0 * s, _HU["cortical"], CHEST_LABELS["humerus"])
        _tube(cv, path, 6.5 * s, _HU["cancellous"], CHEST_LABELS["humerus"])


def _paint_shoulder_girdle(cv: _Canvas, b: ChestBody, lungs: ChestLungs, e: ChestExtras) -> None:
    """Scapulae (thin plates on the back of the rib cage) and clavicles (S-shaped tubes
    from the top of the sternum to the shoulders)."""
    s, sy = b.scale, b.scale_y
    hw, hh = e.scapula_half_mm
    z_back = lungs.cavity_half_depth_mm + 22.0 * s
    for side in (-1.0, 1.0):
        c = np.array([side * 0.5 * b.half_width_mm, b.y_shoulder_mm + 20.0 * sy + hh, z_back])
        sl = cv.box(c - [hw, hh, 20.0], c + [hw, hh, 20.0])
        if sl is not None:
            x, y, z = cv.coords(sl)
            u, v = (x - c[0]) / hw, (y - c[1]) / hh
            # a triangle-ish blade: narrower towards the tip (large y)
            q = np.sqrt(u**2 / np.clip(1.05 - 0.5 * (v + 1.0) / 2.0, 0.3, 1.0) + v**2)
            surface = c[2] - 12.0 * s * (1.0 - u**2)  # follows the curve of the back
            d = np.maximum((q - 1.0) * min(hw, hh), np.abs(z - surface) - 3.0 * s)
            cv.paint(sl, d, _HU["scapula"], CHEST_LABELS["scapula"])
        z_front = -(b.half_depth_mm - b.fat_mm - 8.0 * s)
        y0 = b.y_shoulder_mm + 22.0 * sy
        clavicle = np.array(
            [
                [side * 22.0 * s, y0, z_front],
                [side * 0.35 * b.half_width_mm, y0 - 6.0 * sy, z_front - 4.0 * s],
                [side * 0.65 * b.half_width_mm, y0 - 10.0 * sy, z_front + 10.0 * s],
                [side * 0.85 * b.half_width_mm, y0 - 4.0 * sy, 0.3 * z_front],
            ]
        )
        _tube(cv, clavicle, e.clavicle_radius_mm, _HU["clavicle"], CHEST_LABELS["clavicle"])


def _paint_breasts(cv: _Canvas, b: ChestBody, lungs: ChestLungs, e: ChestExtras) -> None:
    """Two ellipsoids of fatty and glandular tissue on the front of the chest."""
    ax = e.breast_axes_mm
    y = lungs.y_dome_right_mm - 40.0 * b.scale_y
    for side in (-1.0, 1.0):
        c = np.array([side * 0.45 * b.half_width_mm, y, -b.half_depth_mm + 0.3 * ax[2]])
        sl = cv.box(c - ax, c + ax)
        if sl is None:
            continue
        x, yy, z = cv.coords(sl)
        d = _ellipsoid_dist(x, yy, z, c, ax)
        glandular = _smoothstep(-d / (0.5 * ax.min()))  # denser towards the centre
        cv.paint(sl, d, _HU["breast"] + 80.0 * glandular, CHEST_LABELS["breast"])


def _paint_chest(cv: _Canvas, p: ChestParams) -> tuple[np.ndarray, np.ndarray]:
    e = p.extras
    _paint_body(cv, p.body, 0.0 if e is None else e.extra_fat_mm)
    if e is not None and e.breast_axes_mm is not None:
        _paint_breasts(cv, p.body, p.lungs, e)
    if e is not None and e.arms_down:
        _paint_arms(cv, p.body, e)
    lung_occ = _paint_lungs(cv, p.body, p.lungs, p.complexity)
    if e is not None:  # a second, finer octave of parenchymal texture
        lung_rng = np.random.default_rng(p.lungs.texture_seed + 1)
        fine = _smooth_noise(lung_rng, cv.x, cv.y, cv.z, 6.0, e.texture_amplitude * p.complexity)
        cv.hu += lung_occ * fine
    _paint_vessels(cv, p.vessels, lung_occ, p.complexity)
    if e is not None:  # pericardial fat: the heart grown by a fat layer, painted first
        grown = p.heart._replace(semi_axes_mm=p.heart.semi_axes_mm + e.pericardial_fat_mm)
        _paint_heart(cv, grown, _HU["fat"], CHEST_LABELS["fat"])
    blood = e.contrast_hu if e is not None and e.contrast_hu is not None else None
    _paint_heart(cv, p.heart, *(() if blood is None else (blood,)))
    _paint_aorta(cv, p.body, p.heart, p.aorta, *(() if blood is None else (blood,)))
    rib_levels = _paint_spine(cv, p.body)
    _paint_ribs(cv, p.body, p.lungs, rib_levels)
    _paint_sternum(cv, p.body, p.lungs)
    if e is not None:
        _paint_shoulder_girdle(cv, p.body, p.lungs, e)
    for nodule in p.nodules:
        _paint_nodule(cv, nodule)
    if p.couch:
        _paint_couch(cv, p.body)
    hu = np.clip(cv.hu, -1024.0, 3071.0).astype(np.float32)
    return hu, cv.labels


def paint_chest(params: ChestParams, grid) -> tuple[np.ndarray, np.ndarray]:
    """Voxelise chest parameters on ``grid`` (an ``xct.geometry.VolumeGrid``).

    Returns ``(hu, labels)`` as ``chest_phantom`` does: ``[nz, ny, nx]`` float32 HU and
    uint8 labels (ids in ``CHEST_LABELS``). No random draws happen here.
    """
    return _paint_chest(_Canvas(grid), params)


def chest_phantom(
    key_or_seed,
    grid,
    *,
    nodules: bool = True,
    couch: bool = False,
    complexity: float = 1.0,
    version: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, procedural chest CT in HU with an anatomical label map.

    Args:
      key_or_seed: an int seed or a JAX PRNG key; the same seed gives the same phantom on
        any grid.
      grid: ``xct.geometry.VolumeGrid``; the phantom is centred on the grid centre and laid
        out in the projector frame (x patient right->left, y head->foot, z
        anterior->posterior, mm), so it is independent of the grid's resolution.
      nodules: add 1-4 solid lung nodules (4-15 mm, +20..+100 HU).
      couch: add a curved +200 HU patient couch below the back.
      complexity: in [0, 1], for curricula (easy to hard). 1 is the full phantom; lower
        values keep the same anatomy (same random draws) but drop vessels thinner than
        ``3 (1 - complexity)`` mm, scale the lung texture by ``complexity`` and omit
        nodules below 0.5. At 0: body, lungs, heart, aorta, bones and the main vessels.
      version: 1 (the anatomy below) or 2: the same draws and anatomy plus arms beside the
        body (half the phantoms; the others have them raised out of the field), humeri,
        scapulae, clavicles, breasts (40 %), IV contrast in heart and aorta (40 %,
        +150..+350 HU) and a second, finer octave of lung texture (``ChestExtras``).

    Returns:
      ``(hu, labels)``: ``[nz, ny, nx]`` float32 HU in about ``[-1000, 1000]`` and uint8
      labels (ids in ``CHEST_LABELS``).

    Anatomy: elliptical body with subcutaneous fat and muscle, two lungs (-850 HU with
    smooth +-30 HU parenchymal texture, a domed diaphragm and recursive vessel trees from
    the hila), heart (left-anterior, on the diaphragm), aortic arch and descending aorta,
    vertebrae every ~25 mm (cancellous body with a cortical shell, posterior arch,
    spinous and transverse processes), one pair of ribs per thoracic vertebra following the
    chest wall and sloping down anteriorly, sternum, optional nodules and couch. Sizes and
    positions vary by seed (overall scale +-12 %, lung, heart, fat, vessel count).

    Same as ``paint_chest(draw_chest_params(key_or_seed, grid, ...), grid)``.
    """
    complexity = _check_complexity(complexity)
    version = _check_version(version)
    cv = _Canvas(grid)  # built once: its frame also serves the nodule draws
    params = _draw_chest_params(_rng(key_or_seed), cv.frame, nodules, couch, complexity, version)
    return _paint_chest(cv, params)
