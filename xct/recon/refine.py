"""Test-time refinement: make a predicted volume consistent with its X-rays.

``refine(pred, drr, geom, grid, ...)`` starts from a network's prediction and minimises,
over the relative attenuation ``x = mu / mu_water`` (0 for air, 1 for water; ``x - 1`` is
HU / 1000)::

    L(x) = 0.5 * mean_rays (mu_water * A x - drr)^2                      data
         + tv_weight * mean_voxels (sqrt(|grad x|^2 + eps^2) - eps)       smoothed TV
         + 0.5 * prior_weight * mean_voxels (x - x_pred)^2                proximity

subject to ``x >= 0``. ``A`` is ``projector.forward_project`` (line integrals of mu per mm,
so the data term is in squared line-integral units) and ``grad`` forward differences over
``[z, y, x]`` voxel neighbours (zero across the far faces; voxel units, not mm). Means make
the weights independent of the volume, detector and number of views. Working in ``x``
makes the step size read as HU: an Adam learning rate of ``0.01`` moves a voxel by about
10 HU per iteration.

The optimiser is any optax ``GradientTransformation`` (Adam by default); each step is
followed by the projection onto ``x >= 0`` (projected Adam, or projected gradient descent
with ``optax.sgd``). The iterations run in a ``lax.scan``: the function is pure and
``jax.jit(functools.partial(refine, num_iters=..., units=...))`` compiles it once, with
the volume, DRRs, geometry and float weights traced. For a batch, ``jax.vmap`` it.

Few-view data constrain only a few directions per voxel, so the data term alone spreads
residuals along the rays (streaks); the proximity term keeps what the network got right
and TV removes noise. A large ``prior_weight`` keeps the prediction; ``prior_weight = 0``
and ``tv_weight = 0`` is plain least squares started from the prediction (with few views
its minimiser is far from unique, so the start and the number of steps matter). The
defaults (Adam 0.01, ``tv_weight`` 0.01, ``prior_weight`` 0.1) gained about 3 dB PSNR
over a blurred, noisy, biased prediction of a 32^3 chest phantom from 4 views in 60-100
steps (tests/test_refine.py); tune them on real predictions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from xct import physics
from xct.geometry import Geometry, VolumeGrid
from xct.projector import forward_project
from xct.recon import priors

UNITS = ("hu", "mu_per_mm")


class RefineResult(NamedTuple):
    """The output of ``refine``.

    Attributes:
      volume: ``[nz, ny, nx]`` refined volume, in the units of the input (``units``).
      loss: ``[num_iters]`` objective ``L`` at each iterate before its update.
      data_loss: ``[num_iters]`` its data term ``0.5 mean (A mu - drr)^2`` (line-integral
        units squared; ``sqrt(2 data_loss)`` is the DRR RMSE).
    """

    volume: jax.Array
    loss: jax.Array
    data_loss: jax.Array


def _check_units(units: str) -> None:
    if units not in UNITS:
        raise ValueError(f"units: expected one of {UNITS}, got {units!r}")


def to_relative(
    volume: jax.typing.ArrayLike,
    units: str = "hu",
    mu_water_per_mm: float = physics.MU_WATER_PER_MM,
) -> jax.Array:
    """Relative attenuation ``mu / mu_water`` of a volume in HU or mu per mm (clipped at 0)."""
    _check_units(units)
    v = jnp.asarray(volume)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        v = v.astype(jnp.float32)
    if units == "hu":
        return jnp.maximum(1.0 + v / 1000.0, 0.0)
    return jnp.maximum(v / mu_water_per_mm, 0.0)


def from_relative(
    x: jax.typing.ArrayLike,
    units: str = "hu",
    mu_water_per_mm: float = physics.MU_WATER_PER_MM,
) -> jax.Array:
    """The inverse of ``to_relative`` (on ``x >= 0``): HU or mu per mm."""
    _check_units(units)
    x = jnp.asarray(x)
    return 1000.0 * (x - 1.0) if units == "hu" else x * mu_water_per_mm


def smoothed_tv(x: jax.Array, eps: float) -> jax.Array:
    """Mean smoothed isotropic total variation of ``[nz, ny, nx]``: a scalar.

    ``mean(sqrt(dz^2 + dy^2 + dx^2 + eps^2) - eps)`` with forward differences (zero across
    the far faces); 0 for a constant volume, differentiable everywhere for ``eps > 0``.
    """
    pad = lambda d, axis: jnp.concatenate(  # noqa: E731
        [d, jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))], axis=axis
    )
    dz = pad(jnp.diff(x, axis=0), 0)
    dy = pad(jnp.diff(x, axis=1), 1)
    dx = pad(jnp.diff(x, axis=2), 2)
    return jnp.mean(jnp.sqrt(dz * dz + dy * dy + dx * dx + eps * eps) - eps)


def refine_objective(
    x: jax.Array,
    x_pred: jax.Array,
    drr: jax.Array,
    geom: Geometry,
    grid: VolumeGrid,
    *,
    tv_weight: float | jax.Array = 0.0,
    prior_weight: float | jax.Array = 0.0,
    tv_eps: float = 1e-2,
    mu_water_per_mm: float = physics.MU_WATER_PER_MM,
    method: str = "joseph",
) -> tuple[jax.Array, jax.Array]:
    """``(L(x), data term)`` of the module docstring, both scalars.

    Args:
      x: ``[nz, ny, nx]`` relative attenuation (``mu / mu_water``).
      x_pred: ``[nz, ny, nx]`` the prediction in the same units (proximity target).
      drr: ``[views, rows, cols]`` measured line integrals (unitless).
      geom, grid: projection geometry and the volume's grid.
    """
    mu = x * mu_water_per_mm
    resid = forward_project(mu, grid, geom, method=method) - drr
    data = 0.5 * jnp.mean(resid * resid)
    loss = data
    loss = loss + tv_weight * smoothed_tv(x, tv_eps)
    loss = loss + 0.5 * prior_weight * jnp.mean(jnp.square(x - x_pred))
    return loss, data


def refine(
    pred: jax.typing.ArrayLike,
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    *,
    units: str = "hu",
    num_iters: int = 100,
    learning_rate: float | jax.Array = 0.01,
    tv_weight: float | jax.Array = 0.01,
    prior_weight: float | jax.Array = 0.1,
    tv_eps: float = 1e-2,
    optimizer: optax.GradientTransformation | None = None,
    mu_water_per_mm: float = physics.MU_WATER_PER_MM,
    constraints: priors.Constraints | None = None,
    method: str = "joseph",
) -> RefineResult:
    """Refine a predicted volume so that its DRRs match the measured ones.

    Minimises the objective of the module docstring from ``x_pred = to_relative(pred)``
    with ``num_iters`` optimiser steps, each followed by ``x = max(x, 0)``.

    Args:
      pred: ``[nz, ny, nx]`` predicted volume on ``grid``, in ``units``: ``"hu"`` (HU;
        below -1000 counts as air) or ``"mu_per_mm"`` (attenuation per mm). A network
        output in ``physics.normalize_ct`` units goes through ``denormalize_ct`` first.
      drr: ``[views, rows, cols]`` measured line integrals (unitless, ``-log(I / I0)``;
        ``physics.denormalize_drr`` of network-side DRRs), taken with ``geom``.
      geom: the views' geometry (``geometry.Geometry``).
      grid: where the volume sits (``geometry.VolumeGrid``).
      units: ``"hu"`` or ``"mu_per_mm"``; the output has the same (static).
      num_iters: number of steps (static int, ``>= 0``).
      learning_rate: Adam step in relative attenuation (``0.01`` is about 10 HU per
        step); ignored when ``optimizer`` is given.
      tv_weight: weight of the smoothed TV term (``>= 0``).
      prior_weight: weight of the proximity term ``0.5 mean (x - x_pred)^2`` (``>= 0``).
      tv_eps: TV smoothing in relative attenuation (``0.01``: edges under ~10 HU are
        smoothed quadratically). Static.
      optimizer: an optax transformation to use instead of ``optax.adam(learning_rate)``,
        e.g. ``optax.sgd(step)`` for projected gradient descent.
      mu_water_per_mm: water attenuation used for ``units="hu"`` and for ``x``.
      constraints: ``recon.priors.Constraints`` (support and bounds, in ``mu`` per mm)
        projected onto after every step instead of ``x >= 0`` alone (and applied to the
        start).
      method: projector discretisation (``projector.METHODS``), static.

    Returns:
      ``RefineResult(volume, loss, data_loss)``: the refined volume in ``units`` and the
      per-iteration objective and data term.
    """
    x_pred, d = _checked_inputs(pred, drr, geom, grid, units, num_iters, tv_eps, mu_water_per_mm)
    num_iters = int(num_iters)
    opt = optax.adam(learning_rate) if optimizer is None else optimizer
    constraints = priors.check(constraints, grid)

    def project(x):
        return _feasible(x, constraints, mu_water_per_mm)

    def objective(x):
        return refine_objective(
            x,
            x_pred,
            d,
            geom,
            grid,
            tv_weight=tv_weight,
            prior_weight=prior_weight,
            tv_eps=tv_eps,
            mu_water_per_mm=mu_water_per_mm,
            method=method,
        )

    value_and_grad = jax.value_and_grad(objective, has_aux=True)
    x_start = x_pred if constraints is None else project(x_pred)

    def step(carry, _):
        x, state = carry
        (loss, data), g = value_and_grad(x)
        updates, state = opt.update(g, state, x)
        x = project(optax.apply_updates(x, updates))
        return (x, state), (loss, data)

    (x, _), (loss, data) = jax.lax.scan(step, (x_start, opt.init(x_start)), length=num_iters)
    return RefineResult(from_relative(x, units, mu_water_per_mm), loss, data)


def _checked_inputs(
    pred: jax.typing.ArrayLike,
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    units: str,
    num_iters: int,
    tv_eps: float,
    mu_water_per_mm: float,
) -> tuple[jax.Array, jax.Array]:
    """``refine``'s arguments checked (a ``ValueError`` naming the argument otherwise).

    Returns:
      ``(x_pred, drr)``: the prediction as relative attenuation ``[nz, ny, nx]`` (on
      ``grid``) and the measured line integrals ``[views, rows, cols]`` in its dtype.
    """
    _check_units(units)
    num_iters = int(num_iters)
    if num_iters < 0:
        raise ValueError(f"num_iters: expected >= 0, got {num_iters}")
    if not (float(tv_eps) > 0.0):
        raise ValueError(f"tv_eps: expected a positive smoothing, got {tv_eps!r}")
    if not isinstance(grid, VolumeGrid):
        raise ValueError(f"grid: expected a geometry.VolumeGrid, got {type(grid).__name__}")
    if not isinstance(geom, Geometry):
        raise ValueError(f"geom: expected a geometry.Geometry, got {type(geom).__name__}")
    x_pred = to_relative(pred, units, mu_water_per_mm)
    if x_pred.shape != tuple(grid.shape):
        raise ValueError(
            f"pred: shape {x_pred.shape} does not match the grid's [z, y, x] {grid.shape} "
            "(use jax.vmap for batches)"
        )
    d = jnp.asarray(drr, x_pred.dtype)
    expected = (geom.num_views, *geom.det_shape)
    if d.shape != expected:
        raise ValueError(f"drr: shape {d.shape} does not match [views, rows, cols] {expected}")
    return x_pred, d


def _feasible(
    x: jax.Array, constraints: priors.Constraints | None, mu_water_per_mm: float
) -> jax.Array:
    """``[nz, ny, nx]`` relative attenuation projected onto ``x >= 0`` and, when given, onto
    ``constraints`` (support and bounds in mu per mm)."""
    x = jnp.maximum(x, 0.0)
    if constraints is None:
        return x
    return constraints.project(x * mu_water_per_mm) / mu_water_per_mm
