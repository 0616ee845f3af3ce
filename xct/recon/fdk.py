"""Filtered backprojection: FDK for circular cone beam, FBP for circular parallel beam.

``fdk(drr, geom, grid)`` reconstructs attenuation per mm from line integrals taken on a
circular orbit about the world y axis through the isocentre (the world origin), the orbit
of ``geometry.circular_cone_beam`` / ``circular_parallel_beam`` and of RTK's
``ThreeDCircularProjectionGeometry``. The steps, per view (Feldkamp, Davis & Kress 1984;
Kak & Slaney ch. 3):

1. Cosine pre-weight ``sdd / sqrt(sdd^2 + u^2 + v^2)`` (cone beam only), ``u, v`` the
   pixel's position on the detector (mm).
2. Redundancy weight: ``1/2`` for a full scan (every ray is measured twice), Parker's
   short-scan weights (which sum to one over the two measurements of a ray) when the
   views leave a gap of 20 degrees or more (RTK's rule). Parallel beam: angles are taken
   modulo 180 degrees and every ray counts once.
3. Ramp filter along the detector rows: the spatial-domain discrete ramp of Kak & Slaney
   (eq. 61: ``h(0) = 1/(4 tau^2)``, ``h(n odd) = -1/(n pi tau)^2``, 0 for even ``n``),
   applied by FFT after zero-padding each row to a power of two >= 2 * cols so the
   convolution is linear, not circular; optional apodisation ("hann", "cosine") and
   cut-off as a fraction of the Nyquist frequency.
4. Voxel-driven backprojection with bilinear interpolation on the detector (zero outside
   it), weighted by ``dbeta * sdd * sod / d^2``: ``dbeta`` the view's share of the orbit
   (half the distance between its neighbours' angles, as RTK), ``d`` the voxel's depth
   from the source along the central ray, and ``sdd/sod`` rescales the ramp from the
   detector to the isocentre (for cone beam ``(sod/d)^2`` is FDK's distance weight).

The result is quantitative: a full-scan reconstruction of ``mu`` in 1/mm comes back in
1/mm. Views are processed one at a time in a ``lax.scan`` (filter and backproject), so
memory is a few volume-sized buffers whatever the number of views. Everything is traceable:
``jax.jit(fdk, static_argnames=("window", "cutoff", "short_scan", "fov_mask"))`` works
with the geometry as an ordinary (traced) argument.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from xct.geometry import Geometry, VolumeGrid

WINDOWS = ("ramp", "hann", "cosine")
# RTK's test for a short scan: the largest angular gap between consecutive views.
_SHORT_SCAN_GAP_RAD = math.pi / 9.0
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------
# Input checks


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_drr(drr, geom: Geometry) -> jax.Array:
    """``drr`` as a float array of shape ``[views, rows, cols]`` matching ``geom``."""
    if not isinstance(geom, Geometry):
        raise ValueError(f"geom: expected a geometry.Geometry, got {type(geom).__name__}")
    arr = jnp.asarray(drr)
    expected = (geom.num_views, *geom.det_shape)
    if arr.shape != expected:
        raise ValueError(
            f"drr: expected line integrals of shape [views, rows, cols] = {expected} "
            f"(from geom), got {tuple(arr.shape)}"
        )
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.float32)
    return arr


def check_grid(grid) -> VolumeGrid:
    if not isinstance(grid, VolumeGrid):
        raise ValueError(f"grid: expected a geometry.VolumeGrid, got {type(grid).__name__}")
    return grid


def _check_circular_orbit(geom: Geometry) -> None:
    """Raise unless every view lies on a circular orbit about world y through the origin.

    Skipped when the geometry is traced (its numbers are unknown until run time).
    """
    if not isinstance(geom, Geometry):
        raise ValueError(f"geom: expected a geometry.Geometry, got {type(geom).__name__}")
    if geom.kind not in ("cone", "parallel"):
        raise ValueError(f"geom.kind: expected 'cone' or 'parallel', got {geom.kind!r}")
    leaves = (geom.source_xyz_mm, geom.det_center_xyz_mm, geom.det_u_xyz_mm, geom.det_v_xyz_mm)
    if any(_is_traced(a) for a in leaves):
        return
    src, ctr, u, v = (np.asarray(a, np.float64) for a in leaves)
    axis = ctr - src
    sdd = np.linalg.norm(axis, axis=-1)
    w = axis / sdd[:, None]
    u_hat = u / np.linalg.norm(u, axis=-1, keepdims=True)
    v_hat = v / np.linalg.norm(v, axis=-1, keepdims=True)
    # distance from the world origin to each view's central ray
    off_axis = np.linalg.norm(src - np.sum(src * w, -1, keepdims=True) * w, axis=-1)
    bad = (
        (np.abs(w[:, 1]) > 1e-4)
        | (np.abs(u_hat[:, 1]) > 1e-4)
        | (np.abs(np.abs(v_hat[:, 1]) - 1.0) > 1e-4)
        | (off_axis > 1e-4 * np.maximum(sdd, 1.0))
        | (np.sum(src * w, -1) >= 0.0)
    )
    if np.any(bad):
        k = int(np.argmax(bad))
        raise ValueError(
            "geom: filtered backprojection needs a circular orbit about the world y axis "
            "whose central rays pass through the origin (geometry.circular_cone_beam or "
            f"circular_parallel_beam); view {k} is not on one"
        )


def _check_filter(window: str, cutoff: float) -> None:
    if window not in WINDOWS:
        raise ValueError(f"window: expected one of {WINDOWS}, got {window!r}")
    if not (
        isinstance(cutoff, int | float | np.integer | np.floating) and 0.0 < float(cutoff) <= 1.0
    ):
        raise ValueError(
            f"cutoff: expected a fraction of the Nyquist frequency in (0, 1], got {cutoff!r}"
        )


# --------------------------------------------------------------------------------------
# Ramp filter


def _fft_length(num_cols: int) -> int:
    return max(64, 1 << int(math.ceil(math.log2(2 * num_cols))))


def ramp_response(num_cols: int, window: str = "ramp", cutoff: float = 1.0) -> np.ndarray:
    """Frequency response ``[L // 2 + 1]`` of the windowed discrete ramp for unit pixels.

    ``L`` is the zero-padded row length (a power of two >= ``2 * num_cols``). The kernel is
    Kak & Slaney's spatial-domain ramp times the pixel pitch (so that a row filtered with
    it and divided by the pitch in mm approximates ``|w|``-filtering in 1/mm); its DFT is
    real because the kernel is even. ``window`` apodises it: ``"ramp"`` (none),
    ``"hann"`` ``0.5 (1 + cos(pi f / cutoff))``, ``"cosine"`` ``cos(pi f / (2 cutoff))``,
    with ``f`` the frequency as a fraction of Nyquist; everything above ``cutoff`` is zero.
    """
    _check_filter(window, cutoff)
    n_fft = _fft_length(int(num_cols))
    n = np.arange(n_fft)
    n = np.where(n <= n_fft // 2, n, n - n_fft)  # signed offsets, wrapped
    kernel = np.zeros(n_fft)
    kernel[0] = 0.25
    odd = n % 2 != 0
    kernel[odd] = -1.0 / (np.pi * n[odd]) ** 2
    response = np.fft.rfft(kernel).real
    f = np.arange(n_fft // 2 + 1) / (n_fft / 2.0)
    c = float(cutoff)
    if window == "hann":
        win = 0.5 * (1.0 + np.cos(np.pi * np.minimum(f / c, 1.0)))
    elif window == "cosine":
        win = np.cos(0.5 * np.pi * np.minimum(f / c, 1.0))
    else:
        win = np.ones_like(f)
    return response * np.where(f <= c, win, 0.0)


def ramp_filter(
    rows: jax.typing.ArrayLike,
    pixel_mm: jax.typing.ArrayLike,
    *,
    window: str = "ramp",
    cutoff: float = 1.0,
) -> jax.Array:
    """Ramp-filter detector rows along their last axis: ``[..., cols]`` -> ``[..., cols]``.

    ``pixel_mm`` is the column pitch (a scalar, or anything broadcastable against ``rows``
    with the same rank); the output is per mm of the input's unit (line integrals give
    1/mm). Linear convolution with the discrete ramp (zero-padded FFT).
    """
    rows = jnp.asarray(rows)
    cols = rows.shape[-1]
    response = ramp_response(cols, window, cutoff)
    n_fft = _fft_length(cols)
    spec = jnp.fft.rfft(rows, n=n_fft, axis=-1)
    h = jnp.asarray(response, rows.dtype).reshape((1,) * (rows.ndim - 1) + (-1,))
    out = jnp.fft.irfft(spec * h, n=n_fft, axis=-1)[..., :cols]
    return (out / jnp.asarray(pixel_mm, rows.dtype)).astype(rows.dtype)


# --------------------------------------------------------------------------------------
# Per-view geometry: angles, angular weights, Parker weights, projection coefficients


class _Views:
    """Per-view quantities derived from a circular ``Geometry`` (all ``[V]`` or ``[V, k]``)."""

    def __init__(self, geom: Geometry, dtype):
        src = geom.source_xyz_mm.astype(dtype)
        ctr = geom.det_center_xyz_mm.astype(dtype)
        u = geom.det_u_xyz_mm.astype(dtype)
        v = geom.det_v_xyz_mm.astype(dtype)
        axis = ctr - src
        self.sdd_mm = jnp.linalg.norm(axis, axis=-1)
        self.w = axis / self.sdd_mm[:, None]
        self.pu_mm = jnp.linalg.norm(u, axis=-1)
        self.pv_mm = jnp.linalg.norm(v, axis=-1)
        self.u_hat = u / self.pu_mm[:, None]
        self.v_hat = v / self.pv_mm[:, None]
        self.sod_mm = -jnp.sum(src * self.w, axis=-1)  # depth of the isocentre
        self.src = src
        self.cone = geom.kind == "cone"
        # Gantry angle: the central ray points along -(sin theta, 0, cos theta).
        self.theta = jnp.arctan2(-self.w[:, 0], -self.w[:, 2])


def _angular_gaps(theta: jax.Array, period: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each view's share of the orbit and the largest gap.

    Returns ``(gap, first, largest)``: ``gap[k]`` is half the angle between view ``k``'s
    neighbours on the circle of ``period`` radians (RTK's angular weights; they sum to the
    period); ``first`` the angle that follows the largest gap between consecutive views
    (the start of a short scan) and ``largest`` that gap.
    """
    t = jnp.mod(theta, period)
    order = jnp.argsort(t)
    ts = t[order]
    prev = jnp.concatenate([ts[-1:] - period, ts[:-1]])
    nxt = jnp.concatenate([ts[1:], ts[:1] + period])
    gap = jnp.zeros_like(ts).at[order].set(0.5 * (nxt - prev))
    with_next = nxt - ts
    m = jnp.argmax(with_next)
    first = jnp.take(ts, (m + 1) % ts.shape[0])
    return gap, first, with_next[m]


def parker_weights(
    beta_rad: jax.typing.ArrayLike, gamma_rad: jax.typing.ArrayLike, delta_rad: jax.typing.ArrayLike
) -> jax.Array:
    """Parker's short-scan weights (Parker 1982) in RTK's orbit convention.

    ``beta_rad``: angle of the view from the start of the scan (``[0, pi + 2 delta]``);
    ``gamma_rad = atan(u / sdd)``: fan angle of the detector column (``u`` in mm along the
    detector's column direction); ``delta_rad``: half the overscan,
    ``(scan range - pi) / 2``. On this orbit the ray ``(beta, gamma)`` is measured again at
    ``(beta + pi - 2 gamma, -gamma)``, and the two weights sum to one. Broadcasts its
    arguments (same rank).
    """
    beta = jnp.asarray(beta_rad)
    gamma = jnp.asarray(gamma_rad)
    delta = jnp.asarray(delta_rad)
    lo = delta + gamma  # rise over [0, 2 (delta + gamma)]
    hi = delta - gamma  # fall over [pi + 2 gamma, pi + 2 delta]
    safe = lambda x: jnp.where(x > 1e-9, x, 1.0)  # noqa: E731
    rise = jnp.sin(0.25 * jnp.pi * beta / safe(lo)) ** 2
    fall = jnp.sin(0.25 * jnp.pi * (jnp.pi + 2.0 * delta - beta) / safe(hi)) ** 2
    return jnp.where(
        beta < 2.0 * lo,
        rise,
        jnp.where(
            beta <= jnp.pi + 2.0 * gamma, 1.0, jnp.where(beta <= jnp.pi + 2.0 * delta, fall, 0.0)
        ),
    )


def _projection_coefficients(views: _Views, grid: VolumeGrid, rows: int, cols: int):
    """Per view, affine maps from voxel index ``(ix, iy, iz, 1)`` to ``[3, 4]`` numbers
    ``(a, b, d)`` such that ``col = a / d``, ``row = b / d`` (detector pixel coordinates)
    and ``d`` is the voxel's depth from the source along the central ray (cone beam; 1 for
    parallel beam). Returns ``[V, 3, 4]``."""
    dtype = views.w.dtype
    # world = origin + step_xyz[:, j] * index_j  (direction matrix times spacing)
    step = grid.direction_matrix() * np.asarray(grid.spacing_xyz_mm)[None, :]
    step = jnp.asarray(step, dtype)  # [3 (x, y, z world), 3 (ix, iy, iz)]
    rel0 = jnp.asarray(grid.origin_xyz_mm, dtype)[None, :] - views.src  # [V, 3]

    def affine(direction):  # [V, 3] -> [V, 4]: direction . (world - source)
        lin = jnp.matmul(direction, step, precision=_HIGHEST)
        return jnp.concatenate([lin, jnp.sum(direction * rel0, -1, keepdims=True)], -1)

    a_u = affine(views.u_hat)
    a_v = affine(views.v_hat)
    if views.cone:
        depth = affine(views.w)
        su = views.sdd_mm / views.pu_mm
        sv = views.sdd_mm / views.pv_mm
    else:
        depth = jnp.zeros_like(a_u).at[:, 3].set(1.0)
        su = 1.0 / views.pu_mm
        sv = 1.0 / views.pv_mm
    # col = su * (u . r) / d + (cols - 1) / 2, folded into the affine numerator
    a_col = su[:, None] * a_u + 0.5 * (cols - 1) * depth
    a_row = sv[:, None] * a_v + 0.5 * (rows - 1) * depth
    return jnp.stack([a_col, a_row, depth], axis=1)


def _index_axes(grid: VolumeGrid, dtype):
    nz, ny, nx = grid.shape
    return (
        jnp.arange(nx, dtype=dtype).reshape(1, 1, nx),
        jnp.arange(ny, dtype=dtype).reshape(1, ny, 1),
        jnp.arange(nz, dtype=dtype).reshape(nz, 1, 1),
    )


def _affine_field(c, axes):
    ix, iy, iz = axes
    return c[0] * ix + c[1] * iy + c[2] * iz + c[3]


def _backproject_view(acc, q, coef, scale, axes):
    """``acc += scale * q(col, row) / d^2`` for every voxel, ``q`` ``[rows, cols]``."""
    rows, cols = q.shape
    qp = jnp.pad(q, 1).reshape(-1)  # a zero border: bilinear weights fade to zero outside
    stride = cols + 2
    inv = 1.0 / _affine_field(coef[2], axes)
    # padded coordinates, clamped into [0, n + 1]; the base index stays <= n so that the
    # +1 neighbour exists, and the fraction then reaches the zero border
    pc = jnp.clip(_affine_field(coef[0], axes) * inv + 1.0, 0.0, cols + 1.0)
    pr = jnp.clip(_affine_field(coef[1], axes) * inv + 1.0, 0.0, rows + 1.0)
    c0 = jnp.minimum(jnp.floor(pc), cols)
    r0 = jnp.minimum(jnp.floor(pr), rows)
    fc = pc - c0
    fr = pr - r0
    base = r0.astype(jnp.int32) * stride + c0.astype(jnp.int32)
    g = lambda i: qp.at[i].get(mode="promise_in_bounds")  # noqa: E731
    val = (1.0 - fr) * ((1.0 - fc) * g(base) + fc * g(base + 1)) + fr * (
        (1.0 - fc) * g(base + stride) + fc * g(base + stride + 1)
    )
    return acc + (scale * inv * inv) * val


# --------------------------------------------------------------------------------------
# Public API


def field_of_view_mask(geom: Geometry, grid: VolumeGrid) -> jax.Array:
    """``[nz, ny, nx]`` bool: voxels whose centre projects onto the detector in every view
    (and lies in front of the source), like RTK's ``FieldOfViewImageFilter``."""
    check_grid(grid)
    _check_circular_orbit(geom)
    views = _Views(geom, jnp.float32)
    rows, cols = geom.det_shape
    coefs = _projection_coefficients(views, grid, rows, cols)
    axes = _index_axes(grid, jnp.float32)

    def body(inside, coef):
        d = _affine_field(coef[2], axes)
        col = _affine_field(coef[0], axes) / d
        row = _affine_field(coef[1], axes) / d
        ok = (d > 0) & (col >= -0.5) & (col <= cols - 0.5) & (row >= -0.5) & (row <= rows - 0.5)
        return inside & ok, None

    inside, _ = jax.lax.scan(body, jnp.ones(grid.shape, bool), coefs)
    return inside


def fdk(
    drr: jax.typing.ArrayLike,
    geom: Geometry,
    grid: VolumeGrid,
    *,
    window: str = "ramp",
    cutoff: float = 1.0,
    short_scan: bool | None = None,
    fov_mask: bool = False,
) -> jax.Array:
    """FDK (cone beam) or FBP (parallel beam) reconstruction on ``grid``.

    Args:
      drr: ``[views, rows, cols]`` line integrals (unitless, e.g. ``forward_project`` of a
        volume in attenuation per mm).
      geom: a circular orbit about world y through the origin (``kind`` "cone" or
        "parallel"); any number and order of views.
      grid: the output volume's grid.
      window: ramp apodisation, ``"ramp"``, ``"hann"`` or ``"cosine"``.
      cutoff: frequency above which the filter is zero, as a fraction of Nyquist (0, 1].
      short_scan: Parker weighting; ``None`` decides from the views (a gap of 20 degrees
        or more between consecutive angles, as RTK), ``True`` forces it, ``False`` never.
        Cone beam only. With ``None``, views that all lie within 180 degrees (sparse
        few-view arcs, shorter than a short scan) get half-scan weights instead: each view
        counts half the angle to its neighbours on the circle of period 180 degrees.
      fov_mask: zero the voxels outside ``field_of_view_mask(geom, grid)``.

    Returns:
      ``[nz, ny, nx]`` volume in the unit of ``drr`` per mm (attenuation per mm).
    """
    grid = check_grid(grid)
    _check_filter(window, cutoff)
    if short_scan not in (None, True, False):
        raise ValueError(f"short_scan: expected None, True or False, got {short_scan!r}")
    _check_circular_orbit(geom)
    drr = check_drr(drr, geom)
    dtype = jnp.result_type(drr.dtype, jnp.float32)
    drr = drr.astype(dtype)
    rows, cols = geom.det_shape
    views = _Views(geom, dtype)

    if views.cone:
        gap, first, largest = _angular_gaps(views.theta, 2.0 * math.pi)
        # Views within half a circle (a sparse 180-degree arc: less than a short scan, so
        # Parker's overscan would be negative): each ray is measured about once, so every
        # view counts half the angle between its neighbours on the circle of period pi, with
        # redundancy 1 (exact in the parallel-beam limit). Automatic only.
        half_arc = (largest >= math.pi - 1e-6) if short_scan is None else jnp.asarray(False)
        if short_scan is None:
            parker_on = (largest >= _SHORT_SCAN_GAP_RAD) & ~half_arc
        else:
            parker_on = jnp.asarray(bool(short_scan))
        delta = 0.5 * (2.0 * math.pi - largest - math.pi)
        beta = jnp.mod(views.theta - first, 2.0 * math.pi)
        gap_half, _, _ = _angular_gaps(views.theta, math.pi)
        gap = jnp.where(half_arc, 2.0 * gap_half, gap)  # x2: redundancy 1 instead of 1/2
        # every view's share of the orbit, times sdd/sod (the ramp rescaled from the
        # detector to the isocentre) times sod^2 (FDK's (sod/d)^2 without the 1/d^2)
        scale = gap * views.sdd_mm * views.sod_mm
    else:
        gap, _, _ = _angular_gaps(views.theta, math.pi)
        parker_on = jnp.asarray(False)
        delta = jnp.zeros((), dtype)
        beta = jnp.zeros_like(views.theta)
        scale = gap

    u_mm = (jnp.arange(cols, dtype=dtype) - 0.5 * (cols - 1)).reshape(1, cols)
    v_mm = (jnp.arange(rows, dtype=dtype) - 0.5 * (rows - 1)).reshape(rows, 1)
    coefs = _projection_coefficients(views, grid, rows, cols)
    axes = _index_axes(grid, dtype)
    response = jnp.asarray(ramp_response(cols, window, cutoff), dtype).reshape(1, -1)
    n_fft = _fft_length(cols)

    def body(acc, xs):
        p, coef, scale_k, sdd, pu, pv, beta_k = xs
        u = u_mm * pu
        v = v_mm * pv
        if views.cone:
            cosine = sdd / jnp.sqrt(sdd * sdd + u * u + v * v)
            parker = parker_weights(beta_k, jnp.arctan(u / sdd), delta)
            redundancy = jnp.where(parker_on, parker, 0.5)
            p = p * cosine * redundancy
        spec = jnp.fft.rfft(p, n=n_fft, axis=-1) * response
        q = jnp.fft.irfft(spec, n=n_fft, axis=-1)[:, :cols] / pu
        return _backproject_view(acc, q, coef, scale_k, axes), None

    xs = (drr, coefs, scale, views.sdd_mm, views.pu_mm, views.pv_mm, beta)
    vol, _ = jax.lax.scan(body, jnp.zeros(grid.shape, dtype), xs)
    if fov_mask:
        vol = jnp.where(field_of_view_mask(geom, grid), vol, 0.0)
    return vol
