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
