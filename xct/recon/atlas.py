"""Atlas reconstruction: several real CTs screened, registered and fused.

With several templates (other patients' CTs on the reconstruction grid, attenuation per
mm), betting on the single best DRR match chooses among near-ties; fusing several
registered templates, each weighted where it explains the views, gives a steadier prior:

1. ``screen``: every template gets the cheap leading stages of ``template.register`` (on
   the 2x-binned problem: pose and per-axis scale, then the coarse field and gain), all
   templates in one ``jax.vmap``-ed call (one compilation serves them all); they are
   ranked by the relative DRR mismatch ``||A x - b|| / ||b||`` at full resolution.
2. ``register_best``: the best ``k`` continue with the remaining stage (the fine field at
   full resolution, the costly one), started from their screened parameters. Screening
   plus continuation is exactly ``template.register``'s schedule.
3. ``fuse``: ``x = sum_i w_i x_i`` with ``w = softmax_i(-e_i / temperature)`` per voxel,
   ``e_i`` the local mismatch of template ``i`` (``local_mismatch``: the relative RMS
   residual of the rays through each voxel, back-projected), or with ``local=False`` its
   global mismatch.

``atlas`` chains the three (one registration per run: its ``Atlas`` also holds the best
single template, for ``template`` / ``template_tv``); ``atlas_tv`` is TV with the X-ray
priors started from and pulled towards the fused prior (``recon.tv`` with ``x_prior``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xct import projector
from xct.geometry import Geometry, VolumeGrid
from xct.recon import iterative, priors
from xct.recon import template as tmpl

#: Default softmax temperature of the fusion weights, in units of relative RMS mismatch.
#: Seven real chests, leave one out, clinical X-rays, 64^3, k = 3 (scripts/atlas_probe.py):
#: local weights at 0.1 gave 19.26 / 20.83 dB inside the body at 2 / 8 views (0.03: 19.00 /
#: 21.14; the plain mean 18.94 / 20.08; global weights at best 18.94 / 20.16).
TEMPERATURE = 0.1
#: How many of the screened templates are registered and fused by default: None, all of
#: them. Seven real chests, leave one out (six templates each), clinical X-rays, 2 views,
#: 64^3 (scripts/atlas_probe.py, the same X-rays): all six gave atlas 19.85 / atlas_tv
#: 20.27 dB inside the body against 19.26 / 19.73 for the best 3, for about 7 s more.
K = None
#: ``template.register``'s default stages, screening included.
SCHEDULE = tmpl.Schedule()


class Screening(NamedTuple):
    """What ``screen`` returns, for ``T`` templates."""

    mismatch: np.ndarray  # [T] relative DRR mismatch after the pose-and-scale fit
    params: tmpl.WarpParams  # the fitted parameters, each field stacked [T, ...]
    order: np.ndarray  # [T] template indices, smallest mismatch first


class Atlas(NamedTuple):
    """What ``atlas`` returns: the fused prior and what it was made of."""

    volume: jax.Array  # [nz, ny, nx] fused prior, attenuation per mm
    weights: jax.Array  # [k, nz, ny, nx] fusion weights (sum 1 over k)
    indices: tuple[int, ...]  # [k] the registered templates' indices, best screened first
    volumes: jax.Array  # [k, nz, ny, nx] the registered templates
    mismatch: np.ndarray  # [k] their relative DRR mismatch after registration
    screening: Screening
    seconds: dict  # wall seconds of "screen", "register" and "fuse"

    @property
    def best(self) -> int:
        """Position (in ``indices``/``volumes``) of the registered template with the
        smallest DRR mismatch: the single-template method's prior."""
        return int(np.argmin(self.mismatch))


def split_schedule(
    schedule: tmpl.Schedule, screen_stages: int | None = None
) -> tuple[tmpl.Schedule, tmpl.Schedule]:
    """``schedule`` cut into ``(screening, continuation)`` after ``screen_stages`` stages;
    by default after its leading stages on binned problems (level > 1: pose and scale,
    then the coarse field and gain), so only the full-resolution stage is left to the best
    few. The pose alone ranks poorly: after it a held-out chest's later best template
    (mismatch 0.084 once registered) was fifth of six (0.395)."""
    if screen_stages is None:
        screen_stages = 0
        while screen_stages < len(schedule.stages) and schedule.stages[screen_stages][0] > 1:
            screen_stages += 1
        screen_stages = max(screen_stages, 1)
    if not 1 <= screen_stages <= len(schedule.stages):
        raise ValueError(
            f"screen_stages: expected 1 to {len(schedule.stages)} stages of the schedule, "
            f"got {screen_stages}"
        )
    first = dataclasses.replace(schedule, stages=schedule.stages[:screen_stages])
    return first, dataclasses.replace(schedule, stages=schedule.stages[screen_stages:])


@functools.lru_cache(maxsize=16)
def _screen_fn(grid: VolumeGrid, schedule: tmpl.Schedule, method: str):
    def one(t, drr, geom):
        return tmpl.register(t, drr, geom, grid, schedule, method=method)

    return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


@functools.lru_cache(maxsize=16)
def _register_fn(grid: VolumeGrid, schedule: tmpl.Schedule, method: str):
    def one(t, drr, geom, params):
        return tmpl.register(t, drr, geom, grid, schedule, method=method, params=params)

    return jax.jit(one)


def _stack(templates, grid: VolumeGrid) -> jax.Array:
    if len(templates) == 0:
        raise ValueError("templates: expected at least one template volume, got none")
    stack = jnp.stack([jnp.asarray(t, jnp.float32) for t in templates])
    if stack.shape[1:] != tuple(grid.shape):
        raise ValueError(
            f"templates: shape {tuple(stack.shape[1:])} does not match the grid's [z, y, x] "
            f"{tuple(grid.shape)} (resample them onto the grid first)"
        )
    return stack


def screen(
    templates,
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    schedule: tmpl.Schedule = SCHEDULE,
    *,
    screen_stages: int | None = None,
    method: str = "joseph",
) -> Screening:
    """Rank ``templates`` (a sequence of ``[nz, ny, nx]`` volumes on ``grid``, attenuation
    per mm) by how well each explains the views ``drr`` ``[views, rows, cols]`` after the
    screening stages of ``schedule`` (``split_schedule``). All templates are fitted in one
    vmapped, jitted call (compiled once per grid, schedule and number of templates)."""
    stack = _stack(templates, grid)
    first, _ = split_schedule(schedule, screen_stages)
    reg = _screen_fn(grid, first, method)(stack, jnp.asarray(drr, jnp.float32), geom)
    mismatch = np.asarray(reg.mismatch, np.float64)
    return Screening(mismatch, reg.params, np.argsort(mismatch, kind="stable"))


def register_best(
    templates,
    screening: Screening,
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    schedule: tmpl.Schedule = SCHEDULE,
    *,
    k: int | None = K,
    screen_stages: int | None = None,
    method: str = "joseph",
    progress: bool = False,
) -> tuple[tuple[int, ...], jax.Array, np.ndarray]:
    """Register the ``k`` best screened templates (None: all) fully: the stages of
    ``schedule`` after the screening's (``split_schedule``), started from their screened
    parameters.
    ``(indices, volumes [k, nz, ny, nx], mismatch [k])``; ``progress`` shows a bar with an
    ETA on stderr."""
    from tqdm import tqdm

    k = len(templates) if k is None else k
    if k < 1:
        raise ValueError(f"k: expected at least 1 template to register, got {k}")
    indices = tuple(int(i) for i in screening.order[: min(k, len(templates))])
    _, rest = split_schedule(schedule, screen_stages)
    fn = _register_fn(grid, rest, method)
    drr = jnp.asarray(drr, jnp.float32)
    volumes, mismatch = [], []
    bar = tqdm(
        indices,
        desc="registering",
        unit="template",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    for i in bar:
        p0 = jax.tree_util.tree_map(lambda a, i=i: a[i], screening.params)
        reg = fn(jnp.asarray(templates[i], jnp.float32), drr, geom, p0)
        volumes.append(reg.volume)
        mismatch.append(float(reg.mismatch))
        bar.set_postfix_str(f"template {i}: mismatch {mismatch[-1]:.4f}")
    bar.close()
    return indices, jnp.stack(volumes), np.asarray(mismatch, np.float64)


@functools.partial(jax.jit, static_argnames=("grid", "method"))
def local_mismatch(
    volumes: jax.Array, drr: jax.Array, geom: Geometry, grid: VolumeGrid, method: str = "joseph"
) -> jax.Array:
    """``[k, nz, ny, nx]``: for each volume of ``volumes`` ``[k, nz, ny, nx]``, the relative
    RMS DRR residual of the rays through each voxel,
    ``sqrt(A^T (A x - b)^2 / A^T 1 / mean(b^2))`` (unitless, as the global mismatch); voxels
    no ray crosses get the volume's global mismatch."""
    b = jnp.asarray(drr, jnp.float32)
    scale = jnp.maximum(jnp.mean(b * b), 1e-24)
    hits = projector.back_project(jnp.ones_like(b), grid, geom, method=method)

    def one(x):
        r = projector.forward_project(x, grid, geom, method=method) - b
        whole = jnp.sqrt(jnp.mean(r * r) / scale)
        local = projector.back_project(r * r, grid, geom, method=method)
        local = jnp.sqrt(local / jnp.maximum(hits, 1e-12) / scale)
        return jnp.where(hits > 1e-6 * jnp.max(hits), local, whole)

    return jax.lax.map(one, volumes)


def fusion_weights(errors: jax.typing.ArrayLike, temperature: float = TEMPERATURE) -> jax.Array:
    """``softmax(-errors / temperature)`` over the first axis: ``errors`` ``[k, ...]``
    (local) or ``[k]`` (global mismatch). ``temperature = inf`` gives the plain mean."""
    e = jnp.asarray(errors, jnp.float32)
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    if np.isinf(temperature):
        return jnp.full_like(e, 1.0 / e.shape[0])
    return jax.nn.softmax(-(e - jnp.min(e, axis=0, keepdims=True)) / temperature, axis=0)


def fuse(
    volumes: jax.typing.ArrayLike,
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    *,
    temperature: float = TEMPERATURE,
    local: bool = True,
    mismatch: jax.typing.ArrayLike | None = None,
    method: str = "joseph",
) -> tuple[jax.Array, jax.Array]:
    """Fuse registered templates ``volumes`` ``[k, nz, ny, nx]`` into one prior:
    ``(sum_i w_i x_i [nz, ny, nx], w [k, nz, ny, nx])``, ``w`` from ``fusion_weights`` of
    each template's ``local_mismatch`` (``local=True``) or of its global relative DRR
    mismatch (``local=False``; ``mismatch`` ``[k]`` when known, else computed)."""
    x = jnp.asarray(volumes, jnp.float32)
    if x.ndim != 4 or x.shape[1:] != tuple(grid.shape):
        raise ValueError(
            f"volumes: expected [k, z, y, x] with [z, y, x] {tuple(grid.shape)}, "
            f"got {tuple(x.shape)}"
        )
    b = jnp.asarray(drr, jnp.float32)
    if local:
        errors = local_mismatch(x, b, geom, grid, method)
    else:
        if mismatch is None:
            fp = jax.vmap(lambda v: projector.forward_project(v, grid, geom, method=method))
            r = fp(x) - b[None]
            mismatch = jnp.sqrt(jnp.sum(r * r, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(b * b), 1e-24))
        errors = jnp.asarray(mismatch, jnp.float32).reshape(-1, 1, 1, 1)
    w = jnp.broadcast_to(fusion_weights(errors, temperature), x.shape)
    return jnp.sum(w * x, axis=0), w


def atlas(
    templates,
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    *,
    k: int | None = K,
    schedule: tmpl.Schedule = SCHEDULE,
    temperature: float = TEMPERATURE,
    local: bool = True,
    screen_stages: int | None = None,
    method: str = "joseph",
    progress: bool = False,
) -> Atlas:
    """Screen ``templates`` (``[nz, ny, nx]`` volumes on ``grid``, attenuation per mm),
    register the best ``k`` fully and fuse them (``screen``, ``register_best``, ``fuse``).

    Args:
      templates: a sequence of ``T`` template volumes (never the patient being imaged).
      drr: ``[views, rows, cols]`` measured line integrals taken with ``geom``.
      k: how many of the screened templates to register and fuse (None: all, ``K``).
      schedule, screen_stages: ``template.register``'s stages and how many of them screen
        (``split_schedule``).
      temperature, local: the fusion weights (``fuse``).
      progress: a progress bar with an ETA on stderr.
    """
    drr = jnp.asarray(drr, jnp.float32)
    t0 = time.perf_counter()
    scr = screen(templates, drr, geom, grid, schedule, screen_stages=screen_stages, method=method)
    t1 = time.perf_counter()
    idx, vols, mism = register_best(
        templates,
        scr,
        drr,
        geom,
        grid,
        schedule,
        k=k,
        screen_stages=screen_stages,
        method=method,
        progress=progress,
    )
    t2 = time.perf_counter()
    fused, w = fuse(
        vols, drr, geom, grid, temperature=temperature, local=local, mismatch=mism, method=method
    )
    fused = jax.block_until_ready(fused)
    seconds = {"screen": t1 - t0, "register": t2 - t1, "fuse": time.perf_counter() - t2}
    return Atlas(fused, w, idx, vols, mism, scr, seconds)


def atlas_tv(
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    prior: jax.typing.ArrayLike,
    num_iters: int,
    *,
    tv_weight: float,
    prior_weight: float,
    constraints: priors.Constraints | None = None,
    method: str = "joseph",
) -> tuple[jax.Array, jax.Array]:
    """TV (``recon.tv``) started from the fused prior ``prior`` ``[nz, ny, nx]`` and pulled
    towards it (``prior_weight / 2 ||x - prior||^2``), with the X-ray priors
    ``constraints`` (support and bounds, ``recon.priors``): ``template_tv``'s solver with
    the atlas for the template. Returns ``(volume, residuals)`` as ``recon.tv``."""
    return iterative.tv(
        drr,
        geom,
        grid,
        num_iters,
        x0=prior,
        tv_weight=tv_weight,
        nonnegative=True,
        constraints=constraints,
        x_prior=prior,
        prior_weight=prior_weight,
        method=method,
    )
