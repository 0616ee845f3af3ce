"""Template reconstruction: deform a real CT until its DRRs match the measured views.

A template CT (another patient, on the same grid as the volume to reconstruct) is
registered to the measured line integrals through the differentiable projector:

    x(p) = g(p) * T(c + S R (p - c) + t + u(p))

* ``R`` (rotation vector ``rotvec``, radians), ``S`` (per-axis scale ``exp(log_scale)``) and
  ``t`` (``shift_mm``) are the global pose and size, about the grid's centre ``c``;
* ``u`` is a smooth displacement field (mm), the sum of coarse control grids (``coarse``
  control points per side, then ``fine``) upsampled trilinearly to the volume;
* ``g = exp(log_gain)`` is a smooth intensity correction (a coarse grid, upsampled), for
  contrast, density and calibration differences between patients;
* ``T`` is sampled trilinearly (air outside).

The objective is ``1/2 mean((A x - b)^2) / mean(b^2)`` plus ``smooth_weight`` times the mean
squared gradient of ``u`` (per voxel, unitless) and ``gain_smooth_weight`` times that of
``log_gain``: a smoothness-regularised (not diffeomorphic) deformation. It is minimised with
Optax's Adam in stages, coarse to fine: the pose on a 2x-downsampled problem (volume, DRR
and detector binned 2x2), then the pose with the coarse field and gain there, then the
fine field at full resolution (``Schedule``). Parameters are in scaled units, so one Adam
learning rate suits all of them.

``register`` returns the warped template (attenuation per mm) with its parameters and the
per-step loss; ``best_template`` registers several templates and keeps the one whose DRRs
match best. Everything but ``best_template``'s choice is traceable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xct import projector
from xct.geometry import Geometry, VolumeGrid

# Scales of the optimised parameters: parameter 1.0 is this much.
_ROT_RAD = 0.1  # about 5.7 degrees
_SHIFT_MM = 20.0
_LOG_SCALE = 0.1
_DISP_MM = 10.0
_LOG_GAIN = 0.2


class WarpParams(NamedTuple):
    """Scaled registration parameters (see the module docstring for their meaning)."""

    rotvec: jax.Array  # [3] (z, y, x) axes, in units of _ROT_RAD
    shift: jax.Array  # [3] (z, y, x), units of _SHIFT_MM
    log_scale: jax.Array  # [3] (z, y, x), units of _LOG_SCALE
    coarse: jax.Array  # [3, c, c, c] displacement (z, y, x) control grid, units of _DISP_MM
    fine: jax.Array  # [3, f, f, f]
    log_gain: jax.Array  # [g, g, g], units of _LOG_GAIN


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Stages of the registration: ``(level, parts, steps)``; level 2 is the 2x-binned
    problem, level 1 full resolution; parts name ``WarpParams`` fields to optimise."""

    stages: tuple[tuple[int, tuple[str, ...], int], ...] = (
        (2, ("rotvec", "shift", "log_scale"), 80),
        (2, ("rotvec", "shift", "log_scale", "coarse", "log_gain"), 120),
        (1, ("rotvec", "shift", "log_scale", "coarse", "fine", "log_gain"), 100),
    )
    learning_rate: float = 0.03
    coarse_points: int = 5
    fine_points: int = 9
    gain_points: int = 4
    smooth_weight: float = 0.02
    gain_smooth_weight: float = 0.05

    def init(self, dtype=jnp.float32) -> WarpParams:
        c, f, g = self.coarse_points, self.fine_points, self.gain_points
        z = lambda *s: jnp.zeros(s, dtype)  # noqa: E731
        return WarpParams(z(3), z(3), z(3), z(3, c, c, c), z(3, f, f, f), z(g, g, g))


class Registration(NamedTuple):
    """What ``register`` returns."""

    volume: jax.Array  # [nz, ny, nx] the warped template, attenuation per mm
    params: WarpParams
    loss: jax.Array  # [total steps] objective per step
    mismatch: jax.Array  # scalar: final relative DRR mismatch ||A x - b|| / ||b||


def _rotation(rotvec: jax.Array) -> jax.Array:
    """Rodrigues' rotation matrix of a rotation vector ``[3]`` (in the vector's own axes)."""
    theta = jnp.sqrt(jnp.sum(rotvec * rotvec) + 1e-20)
    k = rotvec / theta
    kx = jnp.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], rotvec.dtype)
    eye = jnp.eye(3, dtype=rotvec.dtype)
    return eye + jnp.sin(theta) * kx + (1.0 - jnp.cos(theta)) * (kx @ kx)


def _interp_matrix(c: int, n: int, dtype) -> jax.Array:
    """``[n, c]``: linear interpolation from ``c`` control points to ``n`` samples, corners
    aligned (sample ``i`` sits at control coordinate ``i (c - 1) / (n - 1)``)."""
    pos = np.linspace(0.0, c - 1.0, n)
    lo = np.clip(np.floor(pos).astype(int), 0, max(c - 2, 0))
    frac = pos - lo
    m = np.zeros((n, c), np.float64)
    m[np.arange(n), lo] += 1.0 - frac
    if c > 1:
        m[np.arange(n), lo + 1] += frac
    return jnp.asarray(m, dtype)


def _upsample(field: jax.Array, shape) -> jax.Array:
    """A coarse control grid ``[..., c, c, c]`` resampled (trilinear, corners aligned) to
    ``[..., *shape]``.

    Trilinear interpolation on a grid is separable: three small matrix products. Unlike
    ``map_coordinates`` its gradient with respect to the control grid is a matrix product
    too, not a scatter-add of every voxel into a few control points (0.7 s of a 64^3
    registration step on a 2-core CPU)."""
    mz, my, mx = (
        _interp_matrix(c, n, field.dtype) for c, n in zip(field.shape[-3:], shape, strict=True)
    )
    return jnp.einsum("...abc,za,yb,xc->...zyx", field, mz, my, mx)


def _sq_grad(field: jax.Array) -> jax.Array:
    """Mean squared forward difference over the last three axes (per grid step)."""
    total = 0.0
    for ax in (-3, -2, -1):
        d = jnp.diff(field, axis=ax)
        total = total + jnp.mean(d * d)
    return total


def coordinates(params: WarpParams, grid: VolumeGrid, dtype=jnp.float32) -> jax.Array:
    """``[3, nz, ny, nx]``: for every voxel of ``grid``, the continuous (z, y, x) index of
    the template point it takes its value from."""
    shape = tuple(grid.shape)
    h = jnp.asarray(grid.spacing_mm, dtype)[:, None, None, None]  # (z, y, x) mm
    centre = ((jnp.asarray(shape, dtype) - 1.0) / 2.0)[:, None, None, None]
    idx = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=dtype) for n in shape], indexing="ij"))
    p_mm = (idx - centre) * h
    rot = _rotation(params.rotvec * _ROT_RAD)
    scale = jnp.exp(params.log_scale * _LOG_SCALE)
    q_mm = jnp.einsum("ij,jzyx->izyx", rot * scale[:, None], p_mm)
    q_mm = q_mm + (params.shift * _SHIFT_MM)[:, None, None, None]
    q_mm = q_mm + _upsample(params.coarse * _DISP_MM, shape)
    q_mm = q_mm + _upsample(params.fine * _DISP_MM, shape)
    return q_mm / h + centre


def warp(template: jax.Array, params: WarpParams, grid: VolumeGrid) -> jax.Array:
    """The template ``[nz, ny, nx]`` warped by ``params`` onto ``grid`` (same shape)."""
    q = coordinates(params, grid, template.dtype)
    sampled = jax.scipy.ndimage.map_coordinates(
        template, list(q), order=1, mode="constant", cval=0.0
    )
    gain = jnp.exp(_upsample(params.log_gain * _LOG_GAIN, tuple(grid.shape)))
    return gain * sampled


def _binned(grid: VolumeGrid, geom: Geometry, level: int) -> tuple[VolumeGrid, Geometry]:
    """The grid and geometry of pyramid level ``level`` (1: as given; 2: half the voxels and
    pixels per side, each twice as large; the same field of view and detector, less a
    remainder row or column of an odd detector)."""
    if level == 1:
        return grid, geom
    shape = tuple(n // level for n in grid.shape)
    spacing = tuple(s * level for s in grid.spacing_mm)
    centre = grid.index_to_world((np.asarray(grid.shape[::-1], np.float64) - 1) / 2.0)
    half = (np.asarray(shape[::-1], np.float64) - 1) / 2.0 * np.asarray(spacing[::-1])
    origin = centre - half @ grid.direction_matrix().T
    small = VolumeGrid(shape, spacing, tuple(origin), grid.direction)
    rows, cols = geom.det_shape
    # ``block_mean`` drops a remainder row or column at the end: the binned detector's
    # centre moves by half the dropped pixels (a quarter binned pixel for an odd count).
    drop_r, drop_c = rows - level * (rows // level), cols - level * (cols // level)
    det_centre = geom.det_center_xyz_mm - 0.5 * (
        drop_r * geom.det_v_xyz_mm + drop_c * geom.det_u_xyz_mm
    )
    g = Geometry(
        geom.source_xyz_mm,
        det_centre,
        geom.det_u_xyz_mm * level,
        geom.det_v_xyz_mm * level,
        geom.kind,
        (rows // level, cols // level),
    )
    return small, g


def block_mean(x: jax.Array, level: int, axes: int) -> jax.Array:
    """Mean over ``level``-sized blocks of the last ``axes`` axes (a remainder is dropped)."""
    if level == 1:
        return x
    lead = x.shape[: x.ndim - axes]
    shape = list(lead)
    for n in x.shape[x.ndim - axes :]:
        shape += [n // level, level]
    y = x[
        tuple(slice(None) for _ in lead)
        + tuple(slice(0, (n // level) * level) for n in x.shape[x.ndim - axes :])
    ]
    y = y.reshape(shape)
    return y.mean(axis=tuple(len(lead) + 2 * i + 1 for i in range(axes)))


def _check(template, drr, geom, grid):
    if not isinstance(grid, VolumeGrid):
        raise ValueError(f"grid: expected a geometry.VolumeGrid, got {type(grid).__name__}")
    if not isinstance(geom, Geometry):
        raise ValueError(f"geom: expected a geometry.Geometry, got {type(geom).__name__}")
    template = jnp.asarray(template, jnp.float32)
    if template.shape != tuple(grid.shape):
        raise ValueError(
            f"template: shape {tuple(template.shape)} does not match the grid's [z, y, x] "
            f"{tuple(grid.shape)} (resample it onto the grid first)"
        )
    drr = jnp.asarray(drr, jnp.float32)
    expected = (geom.num_views, *geom.det_shape)
    if drr.shape != expected:
        raise ValueError(
            f"drr: shape {tuple(drr.shape)} does not match [views, rows, cols] {expected}"
        )
    return template, drr


def register(
    template: jax.typing.ArrayLike,
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    schedule: Schedule = Schedule(),
    *,
    method: str = "joseph",
    params: WarpParams | None = None,
) -> Registration:
    """Register ``template`` (attenuation per mm on ``grid``) to the views ``drr``.

    Args:
      template: ``[nz, ny, nx]`` a real CT as attenuation per mm on ``grid`` (e.g. another
        patient preprocessed to the same cube).
      drr: ``[views, rows, cols]`` measured line integrals taken with ``geom``.
      geom, grid: the views' geometry and the volume's grid (static).
      schedule: the stages, learning rate and regularisation (``Schedule``).
      method: projector discretisation.
      params: where to start (e.g. a screening's pose, ``atlas.screen``); default
        ``schedule.init()``, the identity.

    Returns:
      ``Registration(volume, params, loss, mismatch)``.
    """
    template, drr = _check(template, drr, geom, grid)
    if params is None:
        params = schedule.init(template.dtype)
    opt = optax.adam(schedule.learning_rate)
    losses = []
    for level, parts, steps in schedule.stages:
        for n in grid.shape:
            if n % level:
                raise ValueError(f"grid: {grid.shape} is not divisible by pyramid level {level}")
        g_l, geom_l = _binned(grid, geom, level)
        t_l = block_mean(template, level, 3)
        b_l = block_mean(drr, level, 2)
        norm = jnp.maximum(jnp.mean(b_l * b_l), 1e-12)
        active = WarpParams(*[jnp.asarray(1.0 if f in parts else 0.0) for f in WarpParams._fields])

        def objective(p, t_l=t_l, b_l=b_l, g_l=g_l, geom_l=geom_l, norm=norm):
            x = warp(t_l, p, g_l)
            r = projector.forward_project(x, g_l, geom_l, method=method) - b_l
            loss = 0.5 * jnp.mean(r * r) / norm
            loss = (
                loss
                + schedule.smooth_weight * (_sq_grad(p.coarse) + _sq_grad(p.fine))
                + schedule.gain_smooth_weight * _sq_grad(p.log_gain)
            )
            return loss

        grad_fn = jax.value_and_grad(objective)

        def step(carry, _, grad_fn=grad_fn, active=active):
            p, state = carry
            loss, g = grad_fn(p)
            g = jax.tree_util.tree_map(lambda a, m: a * m, g, active)
            updates, state = opt.update(g, state, p)
            return (optax.apply_updates(p, updates), state), loss

        (params, _), stage_loss = jax.lax.scan(step, (params, opt.init(params)), length=steps)
        losses.append(stage_loss)
    volume = warp(template, params, grid)
    resid = projector.forward_project(volume, grid, geom, method=method) - drr
    mismatch = jnp.sqrt(jnp.sum(resid * resid) / jnp.maximum(jnp.sum(drr * drr), 1e-24))
    loss = jnp.concatenate(losses) if losses else jnp.zeros((0,), template.dtype)
    return Registration(volume, params, loss, mismatch)


# A template whose body is more than this factor smaller or larger than the field of view it
# is registered into is another body region (or a crop) and is refused.
MAX_SIZE_RATIO = 1.6
# A registration that leaves more than this relative DRR mismatch did not find the anatomy.
MAX_MISMATCH = 0.3


def check_template_size(name: str, template_fov_mm: float, fov_mm: float) -> None:
    """Refuse a template whose body (``template_fov_mm`` across, ``io.body_fov_mm``) cannot
    be the anatomy of a ``fov_mm`` field of view: a ratio beyond ``MAX_SIZE_RATIO``."""
    ratio = float(template_fov_mm) / float(fov_mm)
    if not 1.0 / MAX_SIZE_RATIO <= ratio <= MAX_SIZE_RATIO:
        raise ValueError(
            f"template {name}: its body is {template_fov_mm:.0f} mm across, the field of view "
            f"{fov_mm:.0f} mm (ratio {ratio:.2f}; expected within a factor {MAX_SIZE_RATIO}): "
            "a CT of another body region, or a cropped scan?"
        )


def check_match(name: str, mismatch: float, limit: float = MAX_MISMATCH) -> None:
    """Refuse a registration that left a relative DRR mismatch above ``limit``."""
    if not float(mismatch) <= limit:
        raise ValueError(
            f"template {name}: relative DRR mismatch {float(mismatch):.2f} after registration "
            f"(expected below {limit:g}): the template does not match the views (another body "
            "region, a cropped scan, or views in another geometry?)"
        )


@functools.lru_cache(maxsize=16)
def _registrar(grid: VolumeGrid, schedule: Schedule, method: str):
    """``register`` jitted for one grid and schedule, kept between calls (one compilation
    per grid, schedule and detector shape in a process)."""
    return jax.jit(lambda t, d, g: register(t, d, g, grid, schedule, method=method))


def best_template(
    templates,
    drr,
    geom: Geometry,
    grid: VolumeGrid,
    schedule: Schedule = Schedule(),
    *,
    method: str = "joseph",
) -> tuple[int, Registration, list[float]]:
    """Register every template of ``templates`` (a sequence of volumes on ``grid``); the
    index of the one with the smallest DRR mismatch, its ``Registration``, and every
    template's mismatch."""
    if len(templates) == 0:
        raise ValueError("templates: expected at least one template volume, got none")
    fn = _registrar(grid, schedule, method)
    results = [fn(t, drr, geom) for t in templates]
    mism = [float(r.mismatch) for r in results]
    best = int(np.argmin(mism))
    return best, results[best], mism
