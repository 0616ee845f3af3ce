"""Fused Joseph projector kernels (Pallas, Triton backend) for GPUs.

Private to :mod:`xct.projector`, which selects these kernels on GPU for ``method="joseph"``
in float32 (``kernel="auto"``) and keeps the portable XLA version on CPU. The discretisation
is the one of ``projector._joseph_samples`` (same planes, taps, bilinear weights and
validity rules), so the two implementations agree to float rounding.

What makes them fast:

* Fused: one program marches a tile of ``TR x TC`` neighbouring rays of one view through
  the volume and keeps the line integrals in registers; nothing per sample reaches memory.
  The XLA version materialises per-sample index and weight arrays.
* Three layouts of the (zero-padded) volume, one per dominant axis ``a``: layout ``a`` is
  stored ``[a][c][b]`` with ``b`` (the lower-numbered minor axis) contiguous, so each
  Joseph sample reads two pairs of neighbouring floats from one plane, and the rays of a
  tile read one compact patch of that plane. With the single ``[z, y, x]`` layout, rays
  marching along x read one float per 32-byte sector.
* Per-ray plane ranges ``[klo, khi)`` computed once; a tile loops only over the union of
  its rays' ranges, so rays that miss the volume cost nothing.

The adjoint is the same loop with ``atomic_add`` of the transposed taps into the three
layouts, which are then transposed back and summed: it is the exact transpose of the
forward kernel (dot-product test to float rounding).

Flat offsets are int32: the three padded layouts must hold fewer than 2**31 voxels
(volumes up to about 890^3); ``projector`` falls back to XLA beyond that.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Rays per program (detector rows x columns) and warps per program, from the sweep on an
# H200 (BENCHMARKS.md, 256^3 -> 64 x 256^2): forward 16x16/4 warps 4.71 ms (8x16/4: 9.02),
# adjoint 8x16/4 warps 29.4 ms (16x16/4: 36.6).
TILE = (16, 16)
NUM_WARPS = 4
ADJOINT_TILE = (8, 16)
ADJOINT_NUM_WARPS = 4
MAX_VOXELS = 2**31 - 1


def fits(grid_shape) -> bool:
    """Whether the three padded layouts of a ``[z, y, x]`` volume fit int32 offsets."""
    return 3 * math.prod(n + 2 for n in grid_shape) < MAX_VOXELS


def layouts(volume):
    """Flat ``[3 * S]``: the zero-padded ``[z, y, x]`` volume stored as ``[x][z][y]``,
    ``[y][z][x]`` and ``[z][y][x]`` (dominant axis slowest, lower minor axis fastest)."""
    p = jnp.pad(volume, 1)
    return jnp.concatenate(
        [p.transpose(2, 0, 1).reshape(-1), p.transpose(1, 0, 2).reshape(-1), p.reshape(-1)]
    )


def from_layouts(flat, grid_shape):
    """The transpose of :func:`layouts`: sum the three layouts back into ``[z, y, x]``."""
    nz, ny, nx = (n + 2 for n in grid_shape)
    s = nz * ny * nx
    vx = flat[:s].reshape(nx, nz, ny).transpose(1, 2, 0)
    vy = flat[s : 2 * s].reshape(ny, nz, nx).transpose(1, 0, 2)
    vz = flat[2 * s : 3 * s].reshape(nz, ny, nx)
    return (vx + vy + vz)[1:-1, 1:-1, 1:-1]


def _interval(p0, step, lo, hi):
    """Real ``k`` with ``lo <= p0 + k * step <= hi`` as ``(kmin, kmax)`` (may be empty)."""
    flat = jnp.abs(step) < 1e-12
    safe = jnp.where(flat, 1.0, step)
    k1 = (lo - p0) / safe
    k2 = (hi - p0) / safe
    inside = (p0 >= lo) & (p0 <= hi)
    kmin = jnp.where(flat, jnp.where(inside, -jnp.inf, jnp.inf), jnp.minimum(k1, k2))
    kmax = jnp.where(flat, jnp.where(inside, jnp.inf, -jnp.inf), jnp.maximum(k1, k2))
    return kmin, kmax


def ray_params(o, d, t_max, grid_shape_xyz, det_shape, num_views, tile=None):
    """Per-ray kernel parameters, each ``[V, rows_p, cols_p]`` padded to whole ``tile``s.

    ``o, d, t_max`` are the rays of ``projector._rays`` (index space, ``d`` per mm).
    Returns ``(floats, ints)``: tuples of float32 and int32 arrays in kernel order.
    """
    nx, ny, nz = grid_shape_xyz
    n = jnp.asarray([nx, ny, nz], jnp.int32)
    size = (nx + 2) * (ny + 2) * (nz + 2)
    a = jnp.argmax(jnp.abs(d), axis=-1).astype(jnp.int32)
    b = jnp.where(a == 0, 1, 0)
    c = jnp.where(a == 2, 1, 2)

    def pick(arr, idx):
        return jnp.take_along_axis(arr, idx[:, None], axis=-1)[:, 0]

    d_a, d_b, d_c = pick(d, a), pick(d, b), pick(d, c)
    o_a, o_b, o_c = pick(o, a), pick(o, b), pick(o, c)
    n_a, n_b, n_c = n[a], n[b], n[c]
    inv_a = 1.0 / d_a  # |d_a| >= |d| / sqrt(3) > 0
    step_b, step_c = d_b * inv_a, d_c * inv_a
    pb0 = o_b - o_a * step_b + 1.0  # padded coordinates at plane k = 0
    pc0 = o_c - o_a * step_c + 1.0
    t0 = -o_a * inv_a  # t (mm) = k * inv_a + t0
    nb1 = (n_b + 1).astype(d.dtype)
    nc1 = (n_c + 1).astype(d.dtype)
    # Planes that can hold a valid sample (widened by one; the kernel tests each sample).
    ranges = [
        _interval(pb0, step_b, 0.0, nb1),
        _interval(pc0, step_c, 0.0, nc1),
        _interval(t0, inv_a, 0.0, t_max),
    ]
    kmin = functools.reduce(jnp.maximum, [r[0] for r in ranges])
    kmax = functools.reduce(jnp.minimum, [r[1] for r in ranges])
    na_f = n_a.astype(d.dtype)
    klo = jnp.clip(jnp.ceil(jnp.clip(kmin, -1.0, na_f + 1.0)) - 1.0, 0.0, na_f)
    khi = jnp.clip(jnp.floor(jnp.clip(kmax, -2.0, na_f + 1.0)) + 2.0, 0.0, na_f)
    klo = klo.astype(jnp.int32)
    khi = jnp.maximum(khi.astype(jnp.int32), klo)
    sb_plane = n_b + 2  # stride of c in layout a; b is contiguous
    sa = (n_b + 2) * (n_c + 2)
    off = a * size
    floats = (pb0, step_b, pc0, step_c, t0, inv_a, t_max.astype(d.dtype), nb1, nc1)
    ints = (off, sa, sb_plane, klo, khi)
    rows, cols = det_shape
    tr, tc = tile or TILE
    rp, cp = -(-rows // tr) * tr, -(-cols // tc) * tc

    def tiles(x, fill):
        x = x.reshape(num_views, rows, cols)
        return jnp.pad(x, ((0, 0), (0, rp - rows), (0, cp - cols)), constant_values=fill)

    floats = tuple(tiles(x.astype(jnp.float32), 0.0) for x in floats)
    ints = tuple(tiles(x.astype(jnp.int32), 0) for x in ints)
    return floats, ints


def _sample(k, f, i):
    """Joseph sample at plane ``k`` for a tile: ``(valid, base, sc, wb, wc)``."""
    pb0, db, pc0, dc, t0, inva, tmax, nb1, nc1 = f
    off, sa, sc, klo, khi = i
    kf = k.astype(jnp.float32)
    pb = pb0 + kf * db
    pc = pc0 + kf * dc
    t = kf * inva + t0
    valid = (
        (k >= klo)
        & (k < khi)
        & (t >= 0.0)
        & (t <= tmax)
        & (pb >= 0.0)
        & (pb < nb1)
        & (pc >= 0.0)
        & (pc < nc1)
    )
    fb = jnp.floor(pb)
    fc = jnp.floor(pc)
    base = off + (k + 1) * sa + fc.astype(jnp.int32) * sc + fb.astype(jnp.int32)
    base = jnp.where(valid, base, 0)
    return valid, base, sc, pb - fb, pc - fc


def _loop_bounds(i):
    return jnp.min(i[3]), jnp.max(i[4])


def _forward_kernel(vol_ref, *refs):
    from jax.experimental.pallas import triton as plgpu

    *param_refs, out_ref = refs
    f = tuple(r[...] for r in param_refs[:9])
    i = tuple(r[...] for r in param_refs[9:])
    lo, hi = _loop_bounds(i)

    def body(k, acc):
        valid, base, sc, wb, wc = _sample(k, f, i)

        def load(idx):
            return plgpu.load(vol_ref.at[idx], mask=valid, other=0.0)

        v00, v10, v01, v11 = load(base), load(base + 1), load(base + sc), load(base + sc + 1)
        val = (1.0 - wc) * ((1.0 - wb) * v00 + wb * v10) + wc * ((1.0 - wb) * v01 + wb * v11)
        return acc + jnp.where(valid, val, 0.0)

    acc = jax.lax.fori_loop(lo, hi, body, jnp.zeros(f[0].shape, jnp.float32))
    out_ref[...] = acc * jnp.abs(f[5])


def _adjoint_kernel(g_ref, *refs, masked_atomics: bool):
    from jax.experimental.pallas import triton as plgpu

    *param_refs, _, out_ref = refs  # the zero-initialised accumulator aliases the output
    f = tuple(r[...] for r in param_refs[:9])
    i = tuple(r[...] for r in param_refs[9:])
    g = g_ref[...] * jnp.abs(f[5])
    lo, hi = _loop_bounds(i)
    dump = out_ref.shape[0] - 1  # interpret mode only: a spare slot instead of masks

    def body(k, carry):
        valid, base, sc, wb, wc = _sample(k, f, i)
        gv = jnp.where(valid, g, 0.0)
        taps = (
            (base, (1.0 - wb) * (1.0 - wc)),
            (base + 1, wb * (1.0 - wc)),
            (base + sc, (1.0 - wb) * wc),
            (base + sc + 1, wb * wc),
        )
        if masked_atomics:
            for idx, w in taps:
                plgpu.atomic_add(out_ref, (idx,), w * gv, mask=valid)
        else:
            # Interpret mode discharges a vector atomic as gather + set, which loses repeated
            # indices; a whole-buffer scatter-add (fine at test sizes) keeps them all.
            idx = jnp.concatenate([jnp.where(valid, t[0], dump).reshape(-1) for t in taps])
            val = jnp.concatenate([(t[1] * gv).reshape(-1) for t in taps])
            out_ref[...] = out_ref[...].at[idx].add(val)
        return carry

    jax.lax.fori_loop(lo, hi, body, 0)


def _specs(tile, num_views, rp, cp):
    from jax.experimental import pallas as pl

    tr, tc = tile
    tile = pl.BlockSpec((None, tr, tc), lambda v, r, c: (v, r, c))
    grid = (num_views, rp // tr, cp // tc)
    return grid, tile


def forward(flat, params, det_shape, interpret=False):
    """Line integrals ``[V, rows, cols]`` from :func:`layouts` and :func:`ray_params`
    (computed with ``tile=TILE``)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    floats, ints = params
    num_views, rp, cp = floats[0].shape
    grid, tile = _specs(TILE, num_views, rp, cp)
    whole = pl.BlockSpec()
    out = pl.pallas_call(
        _forward_kernel,
        out_shape=jax.ShapeDtypeStruct((num_views, rp, cp), jnp.float32),
        grid=grid,
        in_specs=[whole] + [tile] * (len(floats) + len(ints)),
        out_specs=tile,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        name="xct_joseph_forward",
    )(flat, *floats, *ints)
    rows, cols = det_shape
    return out[:, :rows, :cols]


def adjoint(drr, params, grid_shape, interpret=False):
    """The exact transpose of :func:`forward`, as a ``[z, y, x]`` volume (``params`` from
    :func:`ray_params` with ``tile=ADJOINT_TILE``)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    floats, ints = params
    num_views, rp, cp = floats[0].shape
    grid, tile = _specs(ADJOINT_TILE, num_views, rp, cp)
    rows, cols = drr.shape[1:]
    g = jnp.pad(drr.astype(jnp.float32), ((0, 0), (0, rp - rows), (0, cp - cols)))
    size = 3 * math.prod(n + 2 for n in grid_shape) + 1  # + the interpret-mode dump slot
    acc = jnp.zeros((size,), jnp.float32)
    whole = pl.BlockSpec()
    n_in = 1 + len(floats) + len(ints)
    out = pl.pallas_call(
        functools.partial(_adjoint_kernel, masked_atomics=not interpret),
        out_shape=jax.ShapeDtypeStruct((size,), jnp.float32),
        grid=grid,
        in_specs=[tile] * n_in + [whole],
        out_specs=whole,
        input_output_aliases={n_in: 0},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=ADJOINT_NUM_WARPS, num_stages=1),
        name="xct_joseph_adjoint",
    )(g, *floats, *ints, acc)
    return from_layouts(out[:-1], grid_shape)
