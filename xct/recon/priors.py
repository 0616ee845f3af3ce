"""Priors taken from the X-rays themselves: support (visual hull), value bounds, body outline.

No training data: everything here is read off the measured line integrals ``drr`` and
their geometry.

* **Support** (``visual_hull``): a ray whose line integral is (within ``air_tol``) zero
  crossed only air, so every voxel it crosses is air. A voxel stays in the support only if,
  in *every* view, some non-air pixel lies within its footprint on the detector (its
  projected half-diagonal times the magnification, plus ``margin_px``). Voxels that project
  off a detector are kept (that view says nothing about them). This is the cone-beam
  visual hull of the views' silhouettes, grown by a voxel's footprint so that it never
  removes a voxel with attenuation in it (tested on phantoms whose ground truth is known).
* **Value bounds**: attenuation between ``lower`` (0: nothing is less attenuating than
  vacuum) and ``upper`` (the datasets' largest HU, 3071, in ``mu``).
* **Body outline**: the support's boundary. Outside it the volume is air; inside it the
  solvers are free. ``Constraints.project`` applies support and bounds in one step.

``Constraints`` is what ``recon.sirt``, ``recon.cgls`` (as a restriction of the unknowns
to the support: ``A S``), ``recon.tv`` and ``recon.refine.refine`` take as
``constraints=``; ``from_views`` builds it from ``(drr, geom, grid)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xct import physics
from xct.geometry import Geometry, VolumeGrid

# Line integrals at or below this count as air. Noise-free DRRs are exactly 0 in air;
# Poisson noise of 1e5 photons per pixel gives a standard deviation of about 0.003 there.
# One millimetre of water is about 0.02.
DEFAULT_AIR_TOL = 0.02


class Constraints(NamedTuple):
    """Where the volume may be non-zero and between which values (attenuation per mm).

    Attributes:
      support: ``[nz, ny, nx]`` bool (or 0/1) mask, or ``None`` (everywhere).
      lower: lowest value (``mu``, per mm), ``0`` for "no negative attenuation".
      upper: highest value (``mu``, per mm), or ``None`` (unbounded).
    """

    support: jax.Array | None = None
    lower: float | None = 0.0
    upper: float | None = None

    def project(self, x: jax.Array) -> jax.Array:
        """``x`` clipped to the bounds and zeroed outside the support."""
        if self.lower is not None or self.upper is not None:
            x = jnp.clip(x, self.lower, self.upper)
        if self.support is not None:
            x = jnp.where(self.support, x, jnp.zeros_like(x))
        return x

    def mask(self, x: jax.Array) -> jax.Array:
        """``x`` zeroed outside the support (the restriction ``S`` of CGLS)."""
        if self.support is None:
            return x
        return jnp.where(self.support, x, jnp.zeros_like(x))


def check(constraints, grid: VolumeGrid) -> Constraints | None:
    """``constraints`` validated against ``grid`` (``None`` passes through)."""
    if constraints is None:
        return None
    if not isinstance(constraints, Constraints):
        raise ValueError(
            f"constraints: expected a recon.priors.Constraints or None, got "
            f"{type(constraints).__name__}"
        )
    if constraints.support is not None and tuple(np.shape(constraints.support)) != tuple(
        grid.shape
    ):
        raise ValueError(
            f"constraints.support: shape {tuple(np.shape(constraints.support))} does not match "
            f"the grid's [z, y, x] {tuple(grid.shape)}"
        )
    lo, hi = constraints.lower, constraints.upper
    for name, v in (("lower", lo), ("upper", hi)):
        if v is not None and not isinstance(v, jax.core.Tracer) and not math.isfinite(float(v)):
            raise ValueError(f"constraints.{name}: expected a finite number or None, got {v!r}")
    if (
        lo is not None
        and hi is not None
        and not isinstance(lo, jax.core.Tracer)
        and not isinstance(hi, jax.core.Tracer)
        and float(lo) > float(hi)
    ):
        raise ValueError(f"constraints: lower {lo} is above upper {hi}")
    return constraints


def _detector_coords(geom: Geometry, points: jax.Array):
    """``(row, col, magnification)`` of world points ``[P, 3]`` in every view, ``[V, P]``.

    The pinhole projection of ``Geometry.project_points``, traceable; ``magnification`` is
    the ratio of the source-detector to the source-point distance along the central ray
    (parallel beam: 1).
    """
    src = geom.source_xyz_mm[:, None, :]
    ctr = geom.det_center_xyz_mm[:, None, :]
    u = geom.det_u_xyz_mm[:, None, :]
    v = geom.det_v_xyz_mm[:, None, :]
    normal = jnp.cross(u, v)
    p = points[None]
    if geom.kind == "cone":
        d = p - src
        s = jnp.sum((ctr - src) * normal, -1, keepdims=True) / jnp.sum(
            d * normal, -1, keepdims=True
        )
        hit = src + s * d
        mag = s[..., 0]
    else:
        axis = ctr - src
        axis = axis / jnp.linalg.norm(axis, axis=-1, keepdims=True)
        s = jnp.sum((ctr - p) * normal, -1, keepdims=True) / jnp.sum(
            axis * normal, -1, keepdims=True
        )
        hit = p + s * axis
        mag = jnp.ones(hit.shape[:-1], hit.dtype)
    rel = hit - ctr
    rows, cols = geom.det_shape
    col = jnp.sum(rel * u, -1) / jnp.sum(u * u, -1) + (cols - 1) / 2.0
    row = jnp.sum(rel * v, -1) / jnp.sum(v * v, -1) + (rows - 1) / 2.0
    return row, col, mag


def _dilate(mask: jax.Array, radius: int) -> jax.Array:
    """Per-view max filter of a ``[V, rows, cols]`` 0/1 array over a square of ``radius``."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return jax.lax.reduce_window(
        mask,
        -jnp.inf,
        jax.lax.max,
        (1, k, k),
        (1, 1, 1),
        ((0, 0), (radius, radius), (radius, radius)),
    )


def visual_hull(
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    *,
    air_tol: float = DEFAULT_AIR_TOL,
    margin_px: float = 1.0,
) -> jax.Array:
    """``[nz, ny, nx]`` bool: the voxels that no air ray crosses (see the module docstring).

    Args:
      drr: ``[views, rows, cols]`` line integrals (unitless), taken with ``geom``.
      geom: the views (``geometry.Geometry``; cone or parallel beam).
      grid: the volume's grid (static).
      air_tol: line integrals ``<= air_tol`` are air (``DEFAULT_AIR_TOL``; raise it for
        noisy or scatter-free-corrected radiographs).
      margin_px: pixels added to each voxel's footprint (default 1).
    """
    drr = jnp.asarray(drr)
    expected = (geom.num_views, *geom.det_shape)
    if drr.shape != expected:
        raise ValueError(f"drr: shape {drr.shape} does not match [views, rows, cols] {expected}")
    if not float(air_tol) >= 0:
        raise ValueError(f"air_tol: expected a line integral >= 0, got {air_tol!r}")
    if isinstance(drr, jax.core.Tracer) or any(
        isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(geom)
    ):
        raise ValueError(
            "visual_hull: needs concrete drr and geom (its filter size depends on them); "
            "call it outside jax.jit and pass the mask in"
        )
    centres = jnp.asarray(grid.voxel_centers_xyz_mm().reshape(-1, 3), drr.dtype)
    row, col, mag = _detector_coords(geom, centres)
    half_diag = 0.5 * float(np.linalg.norm(grid.spacing_mm))
    pixel = float(
        np.min(
            np.linalg.norm(
                np.concatenate([np.asarray(geom.det_u_xyz_mm), np.asarray(geom.det_v_xyz_mm)]),
                axis=-1,
            )
        )
    )
    # The largest footprint over the volume: one filter for every voxel (conservative).
    radius = int(math.ceil(float(jnp.max(mag)) * half_diag / pixel + float(margin_px)))
    solid = _dilate((drr > air_tol).astype(drr.dtype), radius) > 0
    rows, cols = geom.det_shape
    ri = jnp.round(row).astype(jnp.int32)
    ci = jnp.round(col).astype(jnp.int32)
    inside = (ri >= 0) & (ri < rows) & (ci >= 0) & (ci < cols)
    flat = solid.reshape(geom.num_views, -1)
    idx = jnp.clip(ri, 0, rows - 1) * cols + jnp.clip(ci, 0, cols - 1)
    seen_solid = jnp.take_along_axis(flat, idx, axis=1)
    keep = jnp.all(seen_solid | ~inside, axis=0)
    return keep.reshape(grid.shape)


def from_views(
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    *,
    air_tol: float = DEFAULT_AIR_TOL,
    margin_px: float = 1.0,
    max_hu: float = physics.HU_MAX,
    support: bool = True,
) -> Constraints:
    """The priors of ``drr``: its visual hull (``support=False``: none) and ``[0, mu(max_hu)]``."""
    hull = visual_hull(drr, geom, grid, air_tol=air_tol, margin_px=margin_px) if support else None
    return Constraints(support=hull, lower=0.0, upper=float(physics.hu_to_mu(max_hu)))
