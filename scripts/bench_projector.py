"""Projector throughput, forward and forward+VJP, against RTK's Joseph CPU projector in one run.

    python -m scripts.bench_projector --out bench_out            # full matrix (make bench)
    python -m scripts.bench_projector --sizes 128 --views 2 8 --dets 128   # a quick look

For each volume size n^3 (2 mm voxels), view count and detector size (cone beam, sod/sdd
1000/1500 mm, the whole volume on the detector) and each projector kernel (``--kernels``;
on CPU by default the XLA version then the native C++ kernels, on GPU ``auto``) it
reports: wall time of the jitted forward projection, of the adjoint alone and of
forward+VJP (value_and_grad of a weighted sum), throughput in samples/s (rays x samples per
ray; Joseph takes n samples per ray) and DRRs/s, compile time, the compiled program's
temporary memory, RTK's time for the same projection (timed once per case) with the ratio
RTK time / kernel time (> 1 means xct is faster) and the relative L2 difference to RTK; and
for every kernel after the first, its speed-up over the first (first time / its time: with
the CPU default, XLA / native) and its relative L2 difference to the first. Where RTK is
absent (GPU images) the in-run peer is xct's own trilinear ray-marcher (the naive method).
On GPU it also measures copy bandwidth and reports forward throughput as bytes touched (4
gathers x 4 B per sample) against it. Writes ``bench_projector.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np


def _time(fn, *args, min_reps=3, budget_s=2.0):
    """Best wall time (s) of fn(*args) over repetitions, after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    best, total, reps = float("inf"), 0.0, 0
    while reps < min_reps or (total < budget_s and reps < 20):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t
        best, total, reps = min(best, dt), total + dt, reps + 1
        if dt > budget_s:
            break
    return best


def copy_bandwidth_gbs(nbytes=2 << 30):
    """Measured device copy bandwidth (read + write bytes / s) of x -> x + 1, GB/s."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    return 2 * nbytes / _time(f, x) / 1e9


def phantom(n):
    import jax

    from xct import geometry, phantoms

    grid = geometry.VolumeGrid.centered((n, n, n), 2.0)
    ells = phantoms.shepp_logan_3d(0.45 * n * 2.0, scale=0.02)
    vol = np.asarray(phantoms.voxelize(ells, grid, supersample=1))
    return vol + 0.001 * np.asarray(jax.random.uniform(jax.random.key(0), vol.shape)), grid


def _geometry_kw(n, det):
    return dict(
        sod_mm=1000.0,
        sdd_mm=1500.0,
        det_shape=(det, det),
        pixel_mm=(1.5 * 2.0 * n * 1.05 / det,) * 2,
    )


def rtk_case(vol, n, views, det):
    """RTK's best time (s) and its projections for the case, or None without RTK."""
    from xct import peers

    if not peers.rtk_available():
        return None
    angles = np.arange(views) * 360.0 / views
    r = peers.RTKJoseph(vol, 2.0, angles, **_geometry_kw(n, det))
    ref = r.run()
    return _time(r.run, min_reps=2), ref


def bench_case(
    vol, grid, views, det, *, method, rtk=None, backward=True, chunk_rays=None, kernel=None
):
    """One row of timings; ``rtk`` is :func:`rtk_case`'s (time, projections) for the case."""
    import jax
    import jax.numpy as jnp

    from xct import geometry, projector

    n = grid.shape[0]
    angles = np.arange(views) * 360.0 / views
    kw = _geometry_kw(n, det)
    geom = geometry.circular_cone_beam(angles, **kw)
    v = jnp.asarray(vol, jnp.float32)
    opts = dict(method=method, chunk_rays=chunk_rays, kernel=kernel)
    fwd = jax.jit(lambda x: projector.forward_project(x, grid, geom, **opts))
    t = time.perf_counter()
    compiled = fwd.lower(v).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    temp_bytes = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else None
    out = np.asarray(compiled(v))
    fwd_s = _time(compiled, v)
    rays = views * det * det
    samples = rays * projector.samples_per_ray(grid, method=method)
    row = dict(
        n=n,
        views=views,
        det=det,
        method=method,
        kernel=projector._resolve_kernel(kernel, method, grid, jnp.float32),
        chunk_rays=chunk_rays,
        rays=rays,
        samples=samples,
        compile_s=round(compile_s, 3),
        fwd_ms=round(fwd_s * 1e3, 2),
        fwd_gsamples_s=round(samples / fwd_s / 1e9, 3),
        fwd_drrs_s=round(views / fwd_s, 1),
        temp_mb=None if temp_bytes is None else round(temp_bytes / 2**20, 1),
    )
    if backward:  # the adjoint alone, then forward + VJP
        adj = jax.jit(lambda y: projector.back_project(y, grid, geom, **opts))
        y = jnp.asarray(np.random.default_rng(1).random(out.shape), jnp.float32)
        adj_c = adj.lower(y).compile()
        adj_s = _time(adj_c, y)
        row["adj_ms"] = round(adj_s * 1e3, 2)
        row["adj_over_fwd"] = round(adj_s / fwd_s, 2)
        w = jnp.asarray(np.random.default_rng(0).random(out.shape), jnp.float32)
        vg = jax.jit(
            jax.value_and_grad(
                lambda x: jnp.sum(projector.forward_project(x, grid, geom, **opts) * w)
            )
        )
        t = time.perf_counter()
        vg_c = vg.lower(v).compile()
        row["vjp_compile_s"] = round(time.perf_counter() - t, 3)
        vjp_s = _time(vg_c, v)
        row["fwd_vjp_ms"] = round(vjp_s * 1e3, 2)
        row["fwd_vjp_gsamples_s"] = round(samples / vjp_s / 1e9, 3)
        vmem = vg_c.memory_analysis()
        row["vjp_temp_mb"] = None if vmem is None else round(vmem.temp_size_in_bytes / 2**20, 1)
    if rtk is not None:
        rtk_s, ref = rtk
        row["rtk_ms"] = round(rtk_s * 1e3, 2)
        row["ratio_rtk_over_xct"] = round(rtk_s / fwd_s, 3)
        row["rel_l2_vs_rtk"] = float(f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.2e}")
    return row, out


def default_kernels() -> list[str]:
    """On CPU the XLA version, then the native kernels where they build; else ``auto``."""
    import jax

    from xct import _native

    if jax.default_backend() != "cpu":
        return ["auto"]
    return ["xla", "native"] if _native.available() else ["xla"]


def _kernel_variants(args):
    """(kernel, tile, warps) triples: each kernel, and for "pallas" each tile x warps."""
    from xct import _joseph_kernel

    out = []
    for kernel in args.kernels:
        if kernel == "pallas" and (args.tiles or args.warps):
            for tile in args.tiles or ["x".join(map(str, _joseph_kernel.TILE))]:
                for warps in args.warps or [_joseph_kernel.NUM_WARPS]:
                    out.append((kernel, tile, warps))
        else:
            out.append((kernel, None, None))
    return out


def _last(args):
    return (*_kernel_variants(args)[-1], (args.chunks or [None])[-1])


def _set_tile(tile, warps):
    from xct import _joseph_kernel

    if tile is not None:  # the same tile for the forward and the adjoint kernel
        _joseph_kernel.TILE = _joseph_kernel.ADJOINT_TILE = tuple(int(t) for t in tile.split("x"))
        _joseph_kernel.NUM_WARPS = _joseph_kernel.ADJOINT_NUM_WARPS = int(warps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--views", type=int, nargs="+", default=[2, 8, 64])
    p.add_argument("--dets", type=int, nargs="+", default=[128, 256])
    p.add_argument("--no-backward", action="store_true", help="skip forward+VJP timing")
    p.add_argument("--chunks", type=int, nargs="+", default=None, help="chunk_rays values to sweep")
    p.add_argument("--naive-peer", action="store_true", help="also time the trilinear ray-marcher")
    p.add_argument(
        "--kernels",
        nargs="+",
        default=None,
        help="projector kernels to time: auto, xla, native (CPU), pallas (GPU); the first is "
        "the baseline (default: xla native on CPU, auto elsewhere)",
    )
    p.add_argument(
        "--tiles", nargs="+", default=None, help="Pallas ray tiles to sweep, e.g. 8x16 16x16"
    )
    p.add_argument("--warps", type=int, nargs="+", default=None, help="Pallas num_warps sweep")
    args = p.parse_args(argv)

    import jax

    from xct import _native, peers

    if args.kernels is None:
        args.kernels = default_kernels()

    dev = jax.devices()[0]
    use_rtk = peers.rtk_available()
    meta = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax=jax.__version__,
        backend=dev.platform,
        device=dev.device_kind,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        python=platform.python_version(),
        command="python -m scripts.bench_projector "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        peer="RTK JosephForwardProjectionImageFilter (CPU)" if use_rtk else "xct trilinear (naive)",
        kernels=args.kernels,
        native_simd_width=_native.simd_width() if "native" in args.kernels else None,
    )
    if dev.platform == "gpu":
        meta["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(), 1)
    print(json.dumps(meta))
    rows = []
    naive_peer = args.naive_peer or not use_rtk
    for n in args.sizes:
        vol, grid = phantom(n)
        for det in args.dets:
            for views in args.views:
                base = None
                rtk = rtk_case(vol, n, views, det) if use_rtk else None
                for kernel, tile, warps in _kernel_variants(args):
                    for chunk in args.chunks or [None]:
                        _set_tile(tile, warps)
                        row, out_k = bench_case(
                            vol,
                            grid,
                            views,
                            det,
                            method="joseph",
                            rtk=rtk,
                            backward=not args.no_backward,
                            chunk_rays=chunk,
                            kernel=kernel,
                        )
                        if tile is not None:
                            row["tile"], row["warps"] = tile, warps
                        if base is None:
                            base = (row, out_k)
                        else:  # against the first kernel, measured in this run
                            ref_row, ref = base
                            row["rel_l2_vs_first"] = float(
                                f"{np.linalg.norm(out_k - ref) / np.linalg.norm(ref):.2e}"
                            )
                            row["speedup_vs_first"] = round(ref_row["fwd_ms"] / row["fwd_ms"], 3)
                            if "adj_ms" in row:
                                row["adj_speedup_vs_first"] = round(
                                    ref_row["adj_ms"] / row["adj_ms"], 3
                                )
                        if (kernel, tile, warps, chunk) != _last(args):
                            rows.append(row)
                            print(json.dumps(row), flush=True)
                if naive_peer:
                    naive, _ = bench_case(
                        vol, grid, views, det, method="trilinear", rtk=None, backward=False
                    )
                    row["naive_trilinear_ms"] = naive["fwd_ms"]
                    row["ratio_naive_over_xct"] = round(naive["fwd_ms"] / row["fwd_ms"], 3)
                if "copy_bandwidth_gbs" in meta:  # 4 gathers of 4 bytes per sample
                    row["fwd_gather_gbs"] = round(
                        row["samples"] * 16 / (row["fwd_ms"] / 1e3) / 1e9, 1
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_projector.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    cols = [
        "n",
        "views",
        "det",
        "kernel",
        "tile",
        "warps",
        "chunk_rays",
        "fwd_ms",
        "fwd_gsamples_s",
        "fwd_drrs_s",
        "adj_ms",
        "adj_over_fwd",
        "fwd_vjp_ms",
        "fwd_vjp_gsamples_s",
        "speedup_vs_first",
        "adj_speedup_vs_first",
        "rel_l2_vs_first",
        "compile_s",
        "temp_mb",
        "rtk_ms",
        "ratio_rtk_over_xct",
        "rel_l2_vs_rtk",
        "naive_trilinear_ms",
        "ratio_naive_over_xct",
        "fwd_gather_gbs",
    ]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    for line in native_summary(rows):
        print(line)
    return 0


def native_summary(rows) -> list[str]:
    """One line per case that timed both the native and the XLA kernel: the ratios
    RTK / native and XLA / native (forward, and adjoint where timed), and native's relative
    L2 difference to RTK and to XLA."""
    lines = []
    by_case = {}
    for r in rows:
        by_case.setdefault((r["n"], r["views"], r["det"]), {})[r["kernel"]] = r
    for (n, views, det), k in by_case.items():
        if "native" not in k or "xla" not in k:
            continue
        nat, xla = k["native"], k["xla"]
        parts = [f"n={n} views={views} det={det}: native fwd {nat['fwd_ms']} ms"]
        if "rtk_ms" in nat:
            parts.append(f"RTK/native {nat['rtk_ms'] / nat['fwd_ms']:.2f}x")
        parts.append(f"XLA/native {xla['fwd_ms'] / nat['fwd_ms']:.2f}x")
        if "adj_ms" in nat and "adj_ms" in xla:
            parts.append(
                f"adjoint {nat['adj_ms']} ms, XLA/native {xla['adj_ms'] / nat['adj_ms']:.2f}x"
            )
        if "fwd_vjp_ms" in nat and "fwd_vjp_ms" in xla:
            parts.append(f"fwd+VJP XLA/native {xla['fwd_vjp_ms'] / nat['fwd_vjp_ms']:.2f}x")
        if "rel_l2_vs_rtk" in nat:
            parts.append(f"rel L2 vs RTK {nat['rel_l2_vs_rtk']:.2%}")
        if "rel_l2_vs_first" in nat:
            parts.append(f"vs XLA {nat['rel_l2_vs_first']:.1e}")
        lines.append("; ".join(parts))
    return lines


if __name__ == "__main__":
    sys.exit(main())
