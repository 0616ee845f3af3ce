"""Analytic phantoms: ellipsoids and the 3D Shepp-Logan, voxelised and with exact line integrals.

An ellipsoid is ``(value, centre_xyz_mm, semi_axes_mm, phi_deg, profile)``: ``value`` is
added inside (attenuation per mm, or any quantity per mm), the ellipsoid is rotated by
``phi_deg`` about the world z axis, and ``profile`` is ``"uniform"`` (constant inside) or
``"smooth"`` (``value * (1 - q^2)`` with ``q`` the normalised radius, which is continuous
at the surface, so voxelising it loses little). Both have closed-form line integrals,
which is what the projector is tested against.

Seeded procedural chest phantoms belong here too (the data issue adds them). This module
imports nothing else from xct.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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


def random_ellipsoids(
    key: jax.Array, num: int, half_fov_mm: float, *, profile: str = "uniform"
) -> list[Ellipsoid]:
    """``num`` random ellipsoids inside a sphere of radius ``half_fov_mm`` (seeded by ``key``)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    axes = np.asarray(jax.random.uniform(k1, (num, 3), minval=0.1, maxval=0.4)) * half_fov_mm
    centres = np.asarray(jax.random.uniform(k2, (num, 3), minval=-0.45, maxval=0.45)) * half_fov_mm
    values = np.asarray(jax.random.uniform(k3, (num,), minval=0.1, maxval=1.0))
    phis = np.asarray(jax.random.uniform(k4, (num,), minval=0.0, maxval=180.0))
    return [
        Ellipsoid(float(v), tuple(map(float, c)), tuple(map(float, a)), float(p), profile)
        for v, c, a, p in zip(values, centres, axes, phis, strict=True)
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
}


class _Canvas:
    """HU and label volumes painted back to front, with per-structure bounding boxes."""

    def __init__(self, grid):
        pts = np.asarray(grid.voxel_centers_xyz_mm(), np.float64)
        centre = pts.reshape(-1, 3)[[0, -1]].mean(axis=0)
        self.x = (pts[..., 0] - centre[0]).astype(np.float32)
        self.y = (pts[..., 1] - centre[1]).astype(np.float32)
        self.z = (pts[..., 2] - centre[2]).astype(np.float32)
        self.centre = centre
        self.grid = grid
        self.h = float(np.mean(grid.spacing_mm))
        self.hu = np.full(grid.shape, _HU["air"], np.float32)
        self.labels = np.zeros(grid.shape, np.uint8)

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices ``[z, y, x]`` covering the world box ``lo..hi`` (centred mm)."""
        m, o = self.grid.world_to_index()
        lo = np.asarray(lo, np.float64) - self.h
        hi = np.asarray(hi, np.float64) + self.h
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
        )
        idx = (corners + self.centre - o) @ m.T  # [8, (ix, iy, iz)]
        i0 = np.floor(idx.min(axis=0)).astype(int)
        i1 = np.ceil(idx.max(axis=0)).astype(int) + 1
        shape_xyz = self.grid.shape[::-1]
        i0 = np.clip(i0, 0, shape_xyz)
        i1 = np.clip(i1, 0, shape_xyz)
        if np.any(i1 <= i0):
            return None
        return (slice(i0[2], i1[2]), slice(i0[1], i1[1]), slice(i0[0], i1[0]))

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
    """Recursive branching: append ``(p0, p1, r0, r1)`` segments to ``out`` (mm)."""
    end = start + length * direction / np.linalg.norm(direction)
    r_end = radius * 0.93
    out.append((start, end, radius, r_end))
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


def chest_phantom(
    key_or_seed, grid, *, nodules: bool = True, couch: bool = False, complexity: float = 1.0
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
    """
    if not 0.0 <= float(complexity) <= 1.0:
        raise ValueError(f"complexity: expected a value in [0, 1], got {complexity!r}")
    complexity = float(complexity)
    rng = _rng(key_or_seed)
    cv = _Canvas(grid)
    L = CHEST_LABELS

    # ---- global size parameters ------------------------------------------------------
    s = rng.uniform(0.88, 1.12)
    sx, sy, sz = s * rng.uniform(0.94, 1.06, size=3)
    body_ax, body_az = 170.0 * sx, 112.0 * sz  # body half-width and half-depth (mm)
    fat = rng.uniform(7.0, 20.0) * s
    y_top = -rng.uniform(190.0, 220.0) * sy  # scan range
    y_bot = rng.uniform(160.0, 200.0) * sy
    y_shoulder = -170.0 * sy
    z_spine = body_az - 62.0 * sz  # centre of the vertebral bodies
    lung_s = rng.uniform(0.9, 1.1)
    y_apex = -165.0 * sy * lung_s**0.5
    y_dome_r = rng.uniform(35.0, 55.0) * sy  # top of the right hemidiaphragm
    y_dome_l = y_dome_r + rng.uniform(8.0, 22.0) * sy

    # ---- body: fat, then muscle --------------------------------------------------------
    sl = cv.box((-body_ax, y_top, -body_az), (body_ax, y_bot, body_az + 5.0))

    def body_dist(x, y, z, inset):
        grow = _smoothstep((y - (y_shoulder - 30.0 * sy)) / (60.0 * sy))
        ax = 55.0 * s + grow * (body_ax - 55.0 * s) - inset
        az = 55.0 * s + grow * (body_az - 55.0 * s) - inset
        zc = (1.0 - grow) * 25.0 * sz
        # slightly flattened back: a super-ellipse (exponent 2.4) in x-z
        q = (np.abs(x / ax) ** 2.4 + np.abs((z - zc) / az) ** 2.4) ** (1.0 / 2.4)
        d = (q - 1.0) * np.minimum(ax, az)
        return np.maximum(d, np.maximum(y_top - y, y - y_bot))

    x, y, z = cv.coords(sl)
    cv.paint(sl, body_dist(x, y, z, 0.0), _HU["fat"], L["fat"])
    cv.paint(sl, body_dist(x, y, z, fat), _HU["muscle"], L["muscle"])

    # ---- lungs -------------------------------------------------------------------------
    cav_ax = body_ax - fat - 14.0 * s  # inner chest wall
    cav_az = body_az - fat - 12.0 * s
    lung_ax = 0.56 * cav_ax * lung_s * rng.uniform(0.95, 1.05)
    lung_az = 0.95 * cav_az * lung_s
    lung_cz = 0.1 * cav_az
    y_lung_bot = max(y_dome_r, y_dome_l) + 75.0 * sy

    def lung_dist(x, y, z, side):
        """Signed distance to the right (side=-1) or left (side=+1) lung."""
        cx = side * (cav_ax - lung_ax * 1.02)
        span = (y - y_apex) / (y_lung_bot - y_apex)
        k = np.sqrt(np.clip((y - y_apex) / (95.0 * sy), 1e-4, 1.0))  # rounded apex
        ax = lung_ax * (0.88 + 0.2 * np.clip(span, 0.0, 1.0)) * k
        az = lung_az * (0.9 + 0.12 * np.clip(span, 0.0, 1.0)) * k
        q = np.sqrt(((x - cx) / ax) ** 2 + ((z - lung_cz) / az) ** 2)
        d = (q - 1.0) * np.minimum(ax, az)
        # mediastinum: wider posteriorly (spine) than anteriorly
        med = 22.0 * s + 18.0 * s * _smoothstep((z + 20.0) / 80.0)
        d = np.maximum(d, med - side * x)
        dome = y_dome_r if side < 0 else y_dome_l
        y_dia = dome + 55.0 * sy * np.clip(q, 0.0, 1.2) ** 2 + 18.0 * sy * np.clip(z / az, 0, 1)
        d = np.maximum(d, y - y_dia)
        return np.maximum(d, y_apex - y)

    lung_occ = np.zeros(grid.shape, np.float32)
    lung_box = cv.box((-cav_ax, y_apex, -cav_az), (cav_ax, y_lung_bot + 30.0, cav_az))
    noise_rng = np.random.default_rng(rng.integers(2**31))
    if lung_box is not None:
        x, y, z = cv.coords(lung_box)
        d = np.minimum(lung_dist(x, y, z, -1.0), lung_dist(x, y, z, 1.0))
        texture = complexity * _smooth_noise(noise_rng, x, y, z, 9.0, 30.0)
        # dependent (posterior) lung is slightly denser
        gravity = 40.0 * np.clip((z - lung_cz) / lung_az, -1.0, 1.0)
        cv.paint(lung_box, d, _HU["lung"] + texture + gravity, L["lung"])
        lung_occ[lung_box] = cv.occupancy(d)

    # ---- pulmonary vessels from the hila -----------------------------------------------
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
    min_radius = 3.0 * (1.0 - complexity)  # mm; the tree is grown whole (same draws)
    for a, b, ra, rb in segments:
        if ra < min_radius:
            continue
        _tube(cv, np.stack([a, b]), (ra, rb), _HU["vessel"], L["vessel"], weight=lung_occ)

    # ---- heart ---------------------------------------------------------------------------
    hs = rng.uniform(0.88, 1.15)
    heart_c = np.array(
        [rng.uniform(12.0, 32.0) * s, y_dome_l - 40.0 * sy * hs, -rng.uniform(15.0, 30.0) * sz]
    )
    heart_axes = np.array([62.0, 52.0, 50.0]) * hs * s
    tilt = np.deg2rad(rng.uniform(20.0, 40.0))  # long axis towards left and feet
    sl = cv.box(heart_c - heart_axes.max(), heart_c + heart_axes.max())
    if sl is not None:
        x, y, z = cv.coords(sl)
        u = np.cos(tilt) * (x - heart_c[0]) + np.sin(tilt) * (y - heart_c[1])
        v = -np.sin(tilt) * (x - heart_c[0]) + np.cos(tilt) * (y - heart_c[1])
        d = _ellipsoid_dist(u, v, z, (0.0, 0.0, heart_c[2]), heart_axes)
        cv.paint(sl, d, _HU["heart"], L["heart"])

    # ---- aorta: ascending, arch over the heart, descending left of the spine -----------
    r_ao = rng.uniform(11.0, 14.0) * s
    y_arch = heart_c[1] - heart_axes[1] - rng.uniform(25.0, 40.0) * sy
    z_asc, z_desc = heart_c[2] + 10.0, z_spine - 28.0 * s
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
            [[x_desc, y_arch + 60.0 * sy, z_desc], [x_desc * 0.5, y_bot - r_ao, z_desc]],
        ]
    )
    _tube(cv, path, r_ao, _HU["aorta"], L["aorta"])

    # ---- spine, ribs and sternum -------------------------------------------------------
    pitch = 25.0 * sy
    vb_ax, vb_az, vb_half = 21.0 * s, 16.0 * s, 10.0 * sy
    rib_levels = []
    first = int(np.floor((y_top - y_shoulder) / pitch)) - 1
    for k in range(first, int(np.ceil((y_bot + pitch) / pitch)) + 20):
        yk = y_shoulder + 12.0 * sy + k * pitch
        if yk - vb_half < y_top or yk + vb_half > y_bot:
            continue
        size = 0.8 + 0.2 * _smoothstep((yk - y_shoulder) / 120.0)  # cervical ones smaller
        ax, az, half = vb_ax * size, vb_az * size, vb_half
        c = np.array([0.0, yk, z_spine])
        sl = cv.box(c - [ax + 45.0, half + 20.0, az], c + [ax + 45.0, half + 20.0, az + 75.0])
        if sl is None:
            continue
        x, y, z = cv.coords(sl)
        q = np.sqrt((x / ax) ** 2 + ((z - z_spine) / az) ** 2)
        d = np.maximum((q - 1.0) * az, np.abs(y - yk) - half)
        cv.paint(sl, d, _HU["cortical"], L["vertebra"])
        cv.paint(sl, d + 2.5, _HU["cancellous"], L["vertebra"])
        # posterior arch around the canal
        zc_can = z_spine + az + 9.0 * size
        r = np.sqrt(x**2 + (z - zc_can) ** 2)
        d_arch = np.maximum(np.maximum(r - 16.0 * size, 8.0 * size - r), z_spine + az - z)
        d_arch = np.maximum(d_arch, np.abs(y - yk + 3.0) - 0.8 * half)
        cv.paint(sl, d_arch, _HU["rib"], L["vertebra"])
        tip = np.array([0.0, yk + 12.0 * sy, zc_can + 42.0 * size])
        _tube(
            cv,
            [[0.0, yk - 2.0, zc_can + 12.0], tip],
            (5.0 * size, 3.5 * size),
            _HU["rib"],
            L["vertebra"],
        )
        for side in (-1.0, 1.0):
            _tube(
                cv,
                [[side * 10.0, yk - 3.0, zc_can], [side * 38.0 * size, yk - 5.0, zc_can + 8.0]],
                5.0 * size,
                _HU["rib"],
                L["vertebra"],
            )
        if y_shoulder - 5.0 < yk < y_shoulder + 12.5 * pitch:
            rib_levels.append((yk, zc_can))

    for i, (yk, zc_can) in enumerate(rib_levels):
        # rib cage: narrow at the top, widest at ribs 7-9
        width = 0.55 + 0.45 * _smoothstep((i + 0.5) / 6.0)
        rx = (cav_ax + 8.0 * s) * width
        rz = cav_az + 8.0 * s
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
            _tube(cv, pts, 3.5 * s, _HU["rib"], L["rib"])

    st_z = -(body_az - fat - 10.0 * s)
    st_top, st_bot = y_shoulder + 25.0 * sy, y_dome_l + 5.0 * sy
    sl = cv.box((-30.0, st_top, st_z - 12.0), (30.0, st_bot, st_z + 12.0))
    if sl is not None:
        x, y, z = cv.coords(sl)
        wx = 14.0 * s + 10.0 * s * _smoothstep((st_top + 45.0 * sy - y) / (40.0 * sy))
        q = np.sqrt((x / wx) ** 2 + ((z - st_z) / (6.5 * s)) ** 2)
        d = np.maximum((q - 1.0) * 6.5 * s, np.maximum(st_top - y, y - st_bot))
        cv.paint(sl, d, _HU["sternum"], L["sternum"])

    # ---- nodules (the last random draws: skipping them changes nothing above) ----------
    if nodules and complexity >= 0.5:
        count = int(rng.integers(1, 5))
        placed, tries = 0, 0
        while placed < count and tries < 200:
            tries += 1
            r = rng.uniform(2.0, 7.5)
            side = rng.choice([-1.0, 1.0])
            p = np.array(
                [
                    side * rng.uniform(30.0, cav_ax),
                    rng.uniform(y_apex, y_lung_bot),
                    rng.uniform(-lung_az, lung_az) + lung_cz,
                ]
            )
            if float(lung_dist(p[0], p[1], p[2], side)) > -(r + 3.0):
                continue
            sl = cv.box(p - r, p + r)
            if sl is None:
                continue
            x, y, z = cv.coords(sl)
            d = np.sqrt((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) - r
            cv.paint(sl, d, rng.uniform(20.0, 100.0), L["nodule"])
            placed += 1

    # ---- couch -------------------------------------------------------------------------
    if couch:
        z0 = body_az + 4.0
        sl = cv.box((-240.0, y_top - 40.0, z0 - 40.0), (240.0, y_bot + 40.0, z0 + 22.0))
        if sl is not None:
            x, y, z = cv.coords(sl)
            top = z0 - x**2 / (2.0 * 1100.0)
            d = np.maximum(np.maximum(top - z, z - top - 20.0), np.abs(x) - 230.0)
            cv.paint(sl, d, _HU["couch"], L["couch"])

    hu = np.clip(cv.hu, -1024.0, 3071.0).astype(np.float32)
    return hu, cv.labels
