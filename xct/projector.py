"""Differentiable DRR projection (line integrals) and its exact adjoint.

``forward_project(volume, grid, geom)`` maps a ``[z, y, x]`` volume in attenuation per mm
to line integrals ``[views, rows, cols]`` (unitless); ``back_project(drr, grid, geom)`` is
its exact adjoint (the transpose of the same discrete operator, so the dot-product test
holds to float rounding). Three discretisations:

* ``"joseph"`` (default): Joseph's method. Each ray steps one voxel plane at a time along
  its dominant index axis and interpolates bilinearly inside each plane; the weight is the
  ray length per plane. ``n`` samples and 4 gathers per sample for an ``n``-voxel axis.
  Matches RTK's ``JosephForwardProjectionImageFilter``.
* ``"trilinear"``: uniform ray marching with trilinear interpolation, ``step_mm`` apart
  (default half the smallest voxel side): 8 gathers per sample, ~2x more samples.
* ``"siddon"``: exact intersection lengths of the ray with each voxel (a piecewise
  constant volume); all plane crossings are kept, sorted, and those outside the volume get
  zero length, so shapes are static.

The interpolating methods are differentiable with respect to the geometry (poses), which
enables 2D/3D registration; Siddon's pose derivative is piecewise and not meaningful.

Kernels: float32 Joseph runs as fused kernels that compute the same operator as the XLA
version, picked by ``kernel="auto"``:

* on CPUs, native C++ kernels called through ``jax.ffi`` (``xct/_native``: built with the
  machine's C++ compiler on first use or by ``make``; tiles of 4 x 4 rays march plane by
  plane in AVX-512 / AVX2 lanes, the adjoint adds slab by slab without atomics). Relative
  difference to XLA ~1e-6; on a 2-core CPU 5x XLA's forward, 13-26x its adjoint and 4-5x
  RTK's Joseph (BENCHMARKS.md). Without a C++ compiler or AVX2, ``"auto"`` means XLA;
* on GPUs, fused Pallas (Triton) kernels (``xct/_joseph_kernel.py``: one program per tile
  of rays, per-sample work in registers, an axis-major copy of the volume per dominant
  axis; the adjoint scatters with atomics); relative difference ~3e-7 on an H200.

``kernel="xla"`` (or ``XCT_PROJECTOR_KERNEL=xla``) forces the portable version. The fused
kernels sit under the same ``custom_vjp`` (the volume gradient of the forward is the fused
adjoint and vice versa); pose gradients always go through XLA.

Memory: rays are processed in chunks of ``chunk_rays`` with ``lax.map``; the VJP with
respect to the volume is the matched back-projection (a ``custom_vjp``), so nothing per
sample is stored for the backward pass. Everything is jit/vmap/grad-safe with static
shapes; rays that miss the volume give zero and finite gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xct.geometry import Geometry, VolumeGrid

METHODS = ("joseph", "trilinear", "siddon")
KERNELS = ("auto", "xla", "native", "pallas", "interpret")
# Overrides ``kernel="auto"`` (e.g. XCT_PROJECTOR_KERNEL=xla to compare on a GPU).
KERNEL_ENV = "XCT_PROJECTOR_KERNEL"
# Samples held in flight per chunk when ``chunk_rays`` is not given: about 16 MB per
# float32 [chunk, samples] array on CPU (larger chunks gave no speed-up there), more on
# accelerators where each chunk must fill the device (scripts/bench_projector.py --chunks).
_DEFAULT_SAMPLES_PER_CHUNK = {"cpu": 1 << 22}
_DEFAULT_SAMPLES_PER_CHUNK_ACCELERATOR = 1 << 25


@dataclasses.dataclass(frozen=True)
class _Config:
    grid: VolumeGrid
    method: str
    chunk_rays: int
    step_mm: float
    kernel: str = "xla"  # "xla", or the fused Joseph kernels: "native", "pallas", "interpret"


def _num_samples(cfg: _Config) -> int:
    """Static number of samples per ray for ``cfg.method``."""
    n = cfg.grid.shape
    if cfg.method == "joseph":
        return max(n)
    if cfg.method == "trilinear":
        ext = np.asarray(cfg.grid.spacing_mm) * (np.asarray(n) + 1)
        return int(math.ceil(float(np.linalg.norm(ext)) / cfg.step_mm)) + 1
    return sum(n) + 3 + 2  # siddon: plane crossings plus entry and exit


@functools.cache
def _has_triton() -> bool:
    """Pallas's Triton backend (deprecated in JAX 0.11; without it "auto" means XLA)."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_kernel(kernel, method: str, grid: VolumeGrid, dtype) -> str:
    """``"auto"`` picks the fused kernels for float32 Joseph: Pallas on GPUs, the native C++
    ones on CPUs (when they could be built), else XLA."""
    if kernel is None or kernel == "auto":
        kernel = os.environ.get(KERNEL_ENV, "auto")
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if kernel == "xla":
        return kernel
    from xct import _joseph_kernel, _native

    joseph32 = method == "joseph" and dtype == jnp.float32
    if kernel == "auto":
        backend = jax.default_backend()
        if joseph32 and backend == "gpu" and _joseph_kernel.fits(grid.shape) and _has_triton():
            return "pallas"
        if joseph32 and backend == "cpu" and _native.fits(grid.shape) and _native.preferred():
            return "native"
        return "xla"
    fits = _native.fits if kernel == "native" else _joseph_kernel.fits
    if not (joseph32 and fits(grid.shape)):
        limit = "2^31 voxels" if kernel == "native" else "~890^3"
        raise ValueError(
            f"kernel={kernel!r}: the fused kernels do Joseph in float32 on volumes under "
            f"{limit}; got method={method!r}, dtype={jnp.dtype(dtype).name}, shape {grid.shape}"
        )
    if kernel == "native" and not _native.available():
        raise ValueError(
            "kernel='native': the native CPU kernels could not be built here (no C++ compiler "
            "or a failed build; `python -m xct._native build` says why); use 'auto' or 'xla'"
        )
    return kernel


def _resolve_config(grid, method, chunk_rays, step_mm) -> _Config:
    if not isinstance(grid, VolumeGrid):
        raise ValueError(f"grid: expected a geometry.VolumeGrid, got {type(grid).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if step_mm is None:
        step_mm = 0.5 * min(grid.spacing_mm)
    if not (np.isfinite(step_mm) and step_mm > 0):
        raise ValueError(f"step_mm: expected a positive step in mm, got {step_mm!r}")
    cfg = _Config(grid, method, 1, float(step_mm))
    if chunk_rays is None:
        chunk_rays = default_chunk_rays(grid, method=method, step_mm=step_mm)
    if int(chunk_rays) < 1:
        raise ValueError(f"chunk_rays: expected a positive number of rays, got {chunk_rays!r}")
    return dataclasses.replace(cfg, chunk_rays=int(chunk_rays))


def _check_inputs(name: str, array, expected_shape, what: str):
    arr = jnp.asarray(array)
    if arr.ndim != len(expected_shape):
        raise ValueError(
            f"{name}: expected a {len(expected_shape)}-D {what} of shape {tuple(expected_shape)}, "
            f"got shape {tuple(arr.shape)} (use jax.vmap for batches)"
        )
    if tuple(arr.shape) != tuple(expected_shape):
        raise ValueError(
            f"{name}: shape {tuple(arr.shape)} does not match the expected {what} shape "
            f"{tuple(expected_shape)} (from grid / geometry)"
        )
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.float32)
    return arr


def _check_geometry(geom):
    if not isinstance(geom, Geometry):
        raise ValueError(f"geom: expected a geometry.Geometry, got {type(geom).__name__}")
    if geom.kind not in ("cone", "parallel"):
        raise ValueError(f"geom.kind: expected 'cone' or 'parallel', got {geom.kind!r}")
    if geom.source_xyz_mm.ndim != 2 or geom.source_xyz_mm.shape[0] == 0:
        raise ValueError(f"geom: expected at least one view, got {geom.source_xyz_mm.shape}")


# --------------------------------------------------------------------------------------
# Rays


def _rays(geom: Geometry, grid: VolumeGrid, ids: jax.Array, dtype):
    """Rays for flat ray ids ``[C]`` in continuous index space.

    Returns ``(o, d, t_max)``: origin ``[C, 3]`` and direction ``[C, 3]`` in (ix, iy, iz)
    index units (``d`` per mm of path), and the path length ``[C]`` in mm to the detector.
    """
    rows, cols = geom.det_shape
    view = ids // (rows * cols)
    rc = ids % (rows * cols)
    r = (rc // cols).astype(dtype) - (rows - 1) / 2.0
    c = (rc % cols).astype(dtype) - (cols - 1) / 2.0
    src = geom.source_xyz_mm.astype(dtype)[view]
    ctr = geom.det_center_xyz_mm.astype(dtype)[view]
    pix = (
        ctr
        + r[:, None] * geom.det_v_xyz_mm.astype(dtype)[view]
        + c[:, None] * geom.det_u_xyz_mm.astype(dtype)[view]
    )
    if geom.kind == "parallel":
        src = pix - (ctr - src)
    vec = pix - src
    length = jnp.sqrt(jnp.sum(vec * vec, axis=-1))
    unit = vec / length[:, None]
    m, origin = grid.world_to_index()
    m = jnp.asarray(m, dtype)
    # Full precision: TF32 (the GPU default for f32 matmuls) would move rays visibly.
    o = jnp.matmul(
        src - jnp.asarray(origin, dtype)[None, :], m.T, precision=jax.lax.Precision.HIGHEST
    )
    d = jnp.matmul(unit, m.T, precision=jax.lax.Precision.HIGHEST)
    return o, d, length


def _safe_inverse(x):
    tiny = 1e-12
    return 1.0 / jnp.where(jnp.abs(x) < tiny, jnp.where(x < 0, -tiny, tiny), x)


def _pick(arr, idx):
    """``arr[i, idx[i]]`` for ``arr`` ``[C, 3]`` and ``idx`` ``[C]``."""
    return jnp.take_along_axis(arr, idx[:, None], axis=-1)[:, 0]


def _gather(flat, idx):
    return flat.at[idx].get(mode="promise_in_bounds")


# --------------------------------------------------------------------------------------
# Per-chunk interpolation taps. Each method turns a chunk of rays into taps: flat voxel
# indices ``idx`` and weights ``w`` (each ``[C, K]``), a validity mask and a per-ray
# scale (mm per sample), so that
#     line_integral[ray] = scale[ray] * sum_{tap, k} w[ray, k] * volume_flat[idx[ray, k]].
# The forward projection gathers with these taps and the adjoint scatters with the very
# same taps, so the two are exact transposes by construction. The flat volume is raveled
# in [z, y, x] order, padded by one zero voxel on every side for the interpolating methods.


@dataclasses.dataclass(frozen=True)
class _Taps:
    idx: list  # [C, K] int32 flat indices, 0 where not valid
    w: list  # [C, K] weights, 0 where not valid
    valid: jax.Array  # [C, K] bool
    scale: jax.Array  # [C] mm per unit weight


def _joseph_samples(cfg: _Config, o, d, t_max) -> _Bilinear:
    nx, ny, nz = cfg.grid.shape_xyz
    dtype = o.dtype
    n_xyz = jnp.asarray([nx, ny, nz], jnp.int32)
    strides = jnp.asarray([1, nx + 2, (nx + 2) * (ny + 2)], jnp.int32)  # padded
    a = jnp.argmax(jnp.abs(d), axis=-1).astype(jnp.int32)  # dominant axis
    b = (a + 1) % 3
    c = (a + 2) % 3
    d_a, d_b, d_c = _pick(d, a), _pick(d, b), _pick(d, c)
    o_a, o_b, o_c = _pick(o, a), _pick(o, b), _pick(o, c)
    n_a, n_b, n_c = n_xyz[a], n_xyz[b], n_xyz[c]
    s_a, s_b, s_c = strides[a], strides[b], strides[c]
    num = _num_samples(cfg)
    k = jnp.arange(num, dtype=jnp.int32)[None, :]
    kf = k.astype(dtype)
    inv_a = 1.0 / d_a  # |d_a| >= |d| / sqrt(3) > 0
    # Along the ray, t (mm) and the minor coordinates are affine in the plane number k.
    step_b, step_c = d_b * inv_a, d_c * inv_a
    t = (kf - o_a[:, None]) * inv_a[:, None]  # [C, K]
    pb = (o_b - o_a * step_b + 1.0)[:, None] + kf * step_b[:, None]  # padded coordinates
    pc = (o_c - o_a * step_c + 1.0)[:, None] + kf * step_c[:, None]
    # The interpolant of the zero-padded volume is zero beyond padded index n + 1, so a
    # sample contributes only for 0 <= p < n + 1; floor(p) + 1 then stays inside the pad.
    valid = (
        (k < n_a[:, None])
        & (t >= 0.0)
        & (t <= t_max[:, None])
        & (pb >= 0.0)
        & (pb < (n_b + 1).astype(dtype)[:, None])
        & (pc >= 0.0)
        & (pc < (n_c + 1).astype(dtype)[:, None])
    )
    fb = jnp.floor(pb)
    fc = jnp.floor(pc)
    base = (
        (k + 1) * s_a[:, None]
        + fb.astype(jnp.int32) * s_b[:, None]
        + fc.astype(jnp.int32) * s_c[:, None]
    )
    base = jnp.where(valid, base, 0)
    return _Bilinear(base, s_b[:, None], s_c[:, None], pb - fb, pc - fc, valid, jnp.abs(inv_a))


class _Bilinear(NamedTuple):
    """Joseph samples: 2x2 neighbourhoods at ``base`` (+ ``sb``, + ``sc``), fractions ``wb, wc``."""

    base: jax.Array
    sb: jax.Array
    sc: jax.Array
    wb: jax.Array
    wc: jax.Array
    valid: jax.Array
    scale: jax.Array


def _joseph_forward(flat, s: _Bilinear):
    # One expression, so that XLA fuses index arithmetic, gathers and the reduction into
    # a single loop (splitting it into taps materialises every [C, K] array: 3x slower).
    v00 = _gather(flat, s.base)
    v10 = _gather(flat, s.base + s.sb)
    v01 = _gather(flat, s.base + s.sc)
    v11 = _gather(flat, s.base + s.sb + s.sc)
    val = (1.0 - s.wc) * ((1.0 - s.wb) * v00 + s.wb * v10) + s.wc * (
        (1.0 - s.wb) * v01 + s.wb * v11
    )
    return jnp.sum(jnp.where(s.valid, val, 0.0), axis=-1) * s.scale


def _joseph_taps_from(s: _Bilinear) -> _Taps:
    wb0, wc0 = 1.0 - s.wb, 1.0 - s.wc
    return _Taps(
        idx=[s.base, s.base + s.sb, s.base + s.sc, s.base + s.sb + s.sc],
        w=[wb0 * wc0, s.wb * wc0, wb0 * s.wc, s.wb * s.wc],
        valid=s.valid,
        scale=s.scale,
    )


def _trilinear_taps(cfg: _Config, o, d, t_max) -> _Taps:
    nx, ny, nz = cfg.grid.shape_xyz
    dtype = o.dtype
    n = jnp.asarray([nx, ny, nz], dtype)
    inv = _safe_inverse(d)
    # Support of the zero-padded trilinear interpolant: index box [-1, n].
    t1 = (-1.0 - o) * inv
    t2 = (n[None, :] - o) * inv
    t_near = jnp.maximum(jnp.max(jnp.minimum(t1, t2), axis=-1), 0.0)
    t_far = jnp.minimum(jnp.min(jnp.maximum(t1, t2), axis=-1), t_max)
    num = _num_samples(cfg)
    step = cfg.step_mm
    t = t_near[:, None] + (jnp.arange(num, dtype=dtype)[None, :] + 0.5) * step  # [C, K]
    valid = t < t_far[:, None]
    p = o[:, None, :] + t[..., None] * d[:, None, :] + 1.0  # padded coords [C, K, 3]
    hi = (n + 1.0)[None, None, :]
    valid = valid & jnp.all((p >= 0.0) & (p < hi), axis=-1)
    f = jnp.floor(p)
    w = p - f
    fi = f.astype(jnp.int32)
    sy, sz = nx + 2, (nx + 2) * (ny + 2)
    base = jnp.where(valid, fi[..., 0] + fi[..., 1] * sy + fi[..., 2] * sz, 0)
    wx, wy, wz = (jnp.where(valid, w[..., i], 0.0) for i in range(3))
    ux, uy, uz = (jnp.where(valid, 1.0 - w[..., i], 0.0) for i in range(3))
    idx, weights = [], []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                idx.append(base + (dx + dy * sy + dz * sz))
                weights.append((wx if dx else ux) * (wy if dy else uy) * (wz if dz else uz))
    return _Taps(idx=idx, w=weights, valid=valid, scale=jnp.full(o.shape[:1], step, dtype))


def _siddon_taps(cfg: _Config, o, d, t_max) -> _Taps:
    nx, ny, nz = cfg.grid.shape_xyz
    dtype = o.dtype
    inv = _safe_inverse(d)
    n = jnp.asarray([nx, ny, nz], dtype)
    # Voxel faces are at index -0.5 ... n - 0.5.
    t1 = (-0.5 - o) * inv
    t2 = (n[None, :] - 0.5 - o) * inv
    t_in = jnp.maximum(jnp.max(jnp.minimum(t1, t2), axis=-1), 0.0)
    t_out = jnp.minimum(jnp.min(jnp.maximum(t1, t2), axis=-1), t_max)
    t_out = jnp.maximum(t_out, t_in)  # a ray that misses gets zero length everywhere
    crossings = [t_in[:, None], t_out[:, None]]
    for axis, count in enumerate((nx, ny, nz)):
        planes = jnp.arange(count + 1, dtype=dtype) - 0.5
        crossings.append((planes[None, :] - o[:, axis : axis + 1]) * inv[:, axis : axis + 1])
    alphas = jnp.sort(
        jnp.clip(jnp.concatenate(crossings, axis=-1), t_in[:, None], t_out[:, None]), axis=-1
    )
    seg = alphas[:, 1:] - alphas[:, :-1]  # mm
    mid = 0.5 * (alphas[:, 1:] + alphas[:, :-1])
    p = o[:, None, :] + mid[..., None] * d[:, None, :]
    vox = jnp.clip(jnp.floor(p + 0.5), 0.0, n[None, None, :] - 1.0).astype(jnp.int32)
    valid = seg > 0
    flat_idx = jnp.where(valid, vox[..., 0] + vox[..., 1] * nx + vox[..., 2] * (nx * ny), 0)
    return _Taps(
        idx=[flat_idx],
        w=[jnp.where(valid, seg, 0.0)],
        valid=valid,
        scale=jnp.ones(o.shape[:1], dtype),
    )


def _taps_forward(flat, taps: _Taps):
    acc = sum(w * _gather(flat, i) for i, w in zip(taps.idx, taps.w, strict=True))
    return jnp.sum(jnp.where(taps.valid, acc, 0.0), axis=-1) * taps.scale


# method -> (samples of a chunk of rays, forward evaluation, taps for the adjoint)
_METHOD_FNS = {
    "joseph": (_joseph_samples, _joseph_forward, _joseph_taps_from),
    "trilinear": (_trilinear_taps, _taps_forward, lambda t: t),
    "siddon": (_siddon_taps, _taps_forward, lambda t: t),
}


def _chunking(geom: Geometry, cfg: _Config):
    num_rays = geom.num_rays
    chunk = min(cfg.chunk_rays, num_rays)
    return num_rays, chunk, -(-num_rays // chunk)


def _chunk_samples(geom: Geometry, cfg: _Config, start, chunk: int, num_rays: int, dtype):
    ids = start + jnp.arange(chunk, dtype=jnp.int32)
    o, d, t_max = _rays(geom, cfg.grid, jnp.minimum(ids, num_rays - 1), dtype)
    return _METHOD_FNS[cfg.method][0](cfg, o, d, t_max)


def _padded(method: str) -> bool:
    return method != "siddon"


def _kernel_params(geom: Geometry, cfg: _Config, tile):
    from xct import _joseph_kernel

    ids = jnp.arange(geom.num_rays, dtype=jnp.int32)
    o, d, t_max = _rays(geom, cfg.grid, ids, jnp.float32)
    return _joseph_kernel.ray_params(
        o, d, t_max, cfg.grid.shape_xyz, geom.det_shape, geom.num_views, tile
    )


# Jitted (the config static) so that eager calls compile the whole operator once per shape
# and config instead of dispatching (and compiling) it primitive by primitive; inside a
# caller's jit it is inlined.
@functools.partial(jax.jit, static_argnums=2)
def _forward_raw(volume: jax.Array, geom: Geometry, cfg: _Config) -> jax.Array:
    volume = jnp.asarray(volume)
    if cfg.kernel == "native":
        from xct import _native

        return _native.forward(volume, geom, cfg.grid)
    if cfg.kernel != "xla":
        from xct import _joseph_kernel

        return _joseph_kernel.forward(
            _joseph_kernel.layouts(volume),
            _kernel_params(geom, cfg, _joseph_kernel.TILE),
            geom.det_shape,
            interpret=cfg.kernel == "interpret",
        )
    dtype = volume.dtype
    flat = (jnp.pad(volume, 1) if _padded(cfg.method) else volume).reshape(-1)
    num_rays, chunk, num_chunks = _chunking(geom, cfg)

    def one_chunk(start):
        samples = _chunk_samples(geom, cfg, start, chunk, num_rays, dtype)
        return _METHOD_FNS[cfg.method][1](flat, samples)

    if num_chunks == 1:
        out = one_chunk(jnp.int32(0))
    else:
        starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
        out = jax.lax.map(one_chunk, starts).reshape(-1)
    rows, cols = geom.det_shape
    return out[:num_rays].reshape(geom.num_views, rows, cols)


@functools.partial(jax.jit, static_argnums=2)
def _backward_raw(drr: jax.Array, geom: Geometry, cfg: _Config) -> jax.Array:
    """The transpose of ``_forward_raw`` in the volume: scatter-add with the same taps.

    Chunks run in a ``fori_loop`` that carries the (padded) volume, so temporaries are
    bounded by one chunk. Invalid taps are sent out of range and dropped, so they neither
    contribute nor pile atomic adds onto one voxel on GPUs.
    """
    drr = jnp.asarray(drr)
    if cfg.kernel == "native":
        from xct import _native

        return _native.adjoint(drr, geom, cfg.grid)
    if cfg.kernel != "xla":
        from xct import _joseph_kernel

        return _joseph_kernel.adjoint(
            drr,
            _kernel_params(geom, cfg, _joseph_kernel.ADJOINT_TILE),
            cfg.grid.shape,
            interpret=cfg.kernel == "interpret",
        )
    dtype = drr.dtype
    num_rays, chunk, num_chunks = _chunking(geom, cfg)
    g = drr.reshape(-1)
    g = jnp.pad(g, (0, num_chunks * chunk - num_rays))
    shape = tuple(n + 2 for n in cfg.grid.shape) if _padded(cfg.method) else cfg.grid.shape
    size = math.prod(shape)

    def body(ci, flat):
        start = ci * chunk
        taps = _METHOD_FNS[cfg.method][2](_chunk_samples(geom, cfg, start, chunk, num_rays, dtype))
        gc = jax.lax.dynamic_slice(g, (start,), (chunk,)) * taps.scale
        for i, w in zip(taps.idx, taps.w, strict=True):
            flat = flat.at[jnp.where(taps.valid, i, size)].add(w * gc[:, None], mode="drop")
        return flat

    flat = jax.lax.fori_loop(0, num_chunks, body, jnp.zeros((size,), dtype))
    vol = flat.reshape(shape)
    if _padded(cfg.method):
        vol = vol[1:-1, 1:-1, 1:-1]
    return vol


# --------------------------------------------------------------------------------------
# Memory-lean derivatives: the volume cotangent of A is A^T g and that of A^T is A g; the
# geometry cotangent is only traced when the geometry is being differentiated.


def _is_zero(ct) -> bool:
    return isinstance(ct, jax.custom_derivatives.SymbolicZero)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(volume, geom, cfg):
    return _forward_raw(volume, geom, cfg)


def _project_fwd(volume, geom, cfg):
    keep_volume = volume.value if _any_perturbed(geom) else None
    return _forward_raw(volume.value, geom_value(geom), cfg), (
        geom_value(geom),
        keep_volume,
        () if volume.perturbed else None,
    )


def _project_bwd(cfg, res, g):
    geom, volume, volume_perturbed = res
    if _is_zero(g):
        return None, None
    vol_ct = _backward_raw(g, geom, cfg) if volume_perturbed is not None else None
    geom_ct = None
    if volume is not None:
        xla = dataclasses.replace(cfg, kernel="xla")  # the kernels are not differentiable
        _, vjp = jax.vjp(lambda gm: _forward_raw(volume, gm, xla), geom)
        (geom_ct,) = vjp(g)
    return vol_ct, geom_ct


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _adjoint(drr, geom, cfg):
    return _backward_raw(drr, geom, cfg)


def _adjoint_fwd(drr, geom, cfg):
    keep_drr = drr.value if _any_perturbed(geom) else None
    return _backward_raw(drr.value, geom_value(geom), cfg), (
        geom_value(geom),
        keep_drr,
        () if drr.perturbed else None,
    )


def _adjoint_bwd(cfg, res, g):
    geom, drr, drr_perturbed = res
    if _is_zero(g):
        return None, None
    drr_ct = _forward_raw(g, geom, cfg) if drr_perturbed is not None else None
    geom_ct = None
    if drr is not None:
        xla = dataclasses.replace(cfg, kernel="xla")
        _, vjp = jax.vjp(lambda gm: _backward_raw(drr, gm, xla), geom)
        (geom_ct,) = vjp(g)
    return drr_ct, geom_ct


def _any_perturbed(tree) -> bool:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "perturbed"))
    return any(getattr(x, "perturbed", False) for x in leaves)


def geom_value(tree):
    """Strip ``CustomVJPPrimal`` wrappers from a pytree (used by the custom VJP rules)."""
    return jax.tree.map(
        lambda x: x.value if hasattr(x, "perturbed") else x,
        tree,
        is_leaf=lambda x: hasattr(x, "perturbed"),
    )


_project.defvjp(_project_fwd, _project_bwd, symbolic_zeros=True)
_adjoint.defvjp(_adjoint_fwd, _adjoint_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------------------
# Public API


def forward_project(
    volume: jax.typing.ArrayLike,
    grid: VolumeGrid,
    geom: Geometry,
    *,
    method: str = "joseph",
    chunk_rays: int | None = None,
    step_mm: float | None = None,
    kernel: str | None = None,
) -> jax.Array:
    """Line integrals of ``volume`` along every detector ray.

    Args:
      volume: ``[nz, ny, nx]`` attenuation per mm (any quantity per mm) on ``grid``.
      grid: where the volume sits (``geometry.VolumeGrid``).
      geom: views and detector (``geometry.Geometry``).
      method: ``"joseph"`` (default), ``"trilinear"`` or ``"siddon"``.
      chunk_rays: rays processed at once (bounds memory); default keeps about 4M samples
        in flight.
      step_mm: sample spacing of the ``"trilinear"`` method (default half a voxel).
      kernel: ``"auto"`` (default; or ``$XCT_PROJECTOR_KERNEL``): for float32 Joseph the
        fused kernels, native C++ on CPUs (where they build) and Pallas on GPUs, XLA
        otherwise; ``"xla"``, ``"native"`` (CPU), ``"pallas"`` (GPU) or ``"interpret"`` (the
        Pallas kernels interpreted, slow; for tests on CPU).

    Returns:
      ``[views, rows, cols]`` line integrals (unitless), the dtype of ``volume``.
    """
    cfg = _resolve_config(grid, method, chunk_rays, step_mm)
    _check_geometry(geom)
    volume = _check_inputs("volume", volume, grid.shape, "[z, y, x] volume")
    cfg = dataclasses.replace(cfg, kernel=_resolve_kernel(kernel, method, grid, volume.dtype))
    return _project(volume, geom, cfg)


def back_project(
    drr: jax.typing.ArrayLike,
    grid: VolumeGrid,
    geom: Geometry,
    *,
    method: str = "joseph",
    chunk_rays: int | None = None,
    step_mm: float | None = None,
    kernel: str | None = None,
) -> jax.Array:
    """The exact adjoint of ``forward_project``: ``[views, rows, cols]`` -> ``[nz, ny, nx]``.

    ``<forward_project(x), y> == <x, back_project(y)>`` up to float rounding, for the same
    ``method``, ``grid``, ``geom`` and ``step_mm``. Units: detector values times mm.
    """
    cfg = _resolve_config(grid, method, chunk_rays, step_mm)
    _check_geometry(geom)
    rows, cols = geom.det_shape
    drr = _check_inputs("drr", drr, (geom.num_views, rows, cols), "[views, rows, cols] projection")
    cfg = dataclasses.replace(cfg, kernel=_resolve_kernel(kernel, method, grid, drr.dtype))
    return _adjoint(drr, geom, cfg)


def default_chunk_rays(
    grid: VolumeGrid, *, method: str = "joseph", step_mm: float | None = None, batch: int = 1
) -> int:
    """Rays per chunk that keep about the backend's sample budget in flight (4M samples on
    CPU, 32M on accelerators), divided by ``batch`` for callers that ``vmap`` the projector
    over ``batch`` images (e.g. feature channels): the XLA version materialises per-sample
    arrays for every vmapped image, and XLA keeps them whole on every device of a
    spatially sharded mesh (rays are not split over z)."""
    cfg = _resolve_config(grid, method, 1, step_mm)
    budget = _DEFAULT_SAMPLES_PER_CHUNK.get(
        jax.default_backend(), _DEFAULT_SAMPLES_PER_CHUNK_ACCELERATOR
    )
    return max(256, budget // (_num_samples(cfg) * max(1, int(batch))))


def samples_per_ray(
    grid: VolumeGrid, *, method: str = "joseph", step_mm: float | None = None
) -> int:
    """Static number of volume samples (segments for Siddon) each ray takes; for benchmarks."""
    return _num_samples(_resolve_config(grid, method, 1, step_mm))
