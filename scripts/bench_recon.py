"""FDK wall time, xct against RTK's CPU FDK, on the rtkfdktest setting (one line per size).

    python -m scripts.bench_recon                      # 128^3, 180 views (RTK's test)
    python -m scripts.bench_recon --sizes 64 128 --views 180 --reps 3

The case is RTK's FDK test: an n^3 volume over a 256 mm cube, ``views`` projections over 360
degrees, sod/sdd 600/1200 mm, an n^2 detector over 512 mm, of a Shepp-Logan phantom
(densities in [0, 2]) projected with xct's Joseph projector. It reports the best wall time
of the jitted ``xct.recon.fdk`` (after compilation, which is reported separately) and of
``xct.peers.RTKFDK.run()`` (geometry and images set up once), the ratio RTK time / xct time
(> 1 means xct is faster), the relative L2 difference of the two volumes inside the field of
view and each one's PSNR (peak 2) against the voxelised phantom. Prints one JSON line per
size, then a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np

SL_DENSITIES = (2.0, -0.98, -0.02, -0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01)


def _best_time(fn, reps: int) -> tuple[float, object]:
    """Best wall time (s) of ``fn()`` over ``reps`` calls and the last result."""
    import jax

    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_case(n: int, views: int, reps: int, use_rtk: bool) -> dict:
    import jax

    from xct import geometry, peers, phantoms, projector, recon

    grid = geometry.VolumeGrid.centered((n, n, n), 256.0 / n)
    ells = [
        dataclasses.replace(e, value=v)
        for e, v in zip(phantoms.shepp_logan_3d(116.0), SL_DENSITIES, strict=True)
    ]
    ref = np.asarray(phantoms.voxelize(ells, grid, supersample=1))
    angles = np.arange(views) * 360.0 / views
    kw = dict(sod_mm=600.0, sdd_mm=1200.0, pixel_mm=512.0 / n)
    geom = geometry.circular_cone_beam(angles, det_shape=(n, n), **kw)
    drr = np.asarray(projector.forward_project(ref, grid, geom))
    mask = np.asarray(recon.field_of_view_mask(geom, grid))

    fdk = jax.jit(recon.fdk)
    t = time.perf_counter()
    compiled = fdk.lower(drr, geom, grid).compile()
    compile_s = time.perf_counter() - t
    xct_s, vol = _best_time(lambda: compiled(drr, geom, grid), reps)
    vol = np.asarray(vol)

    def psnr(v):
        return 20 * np.log10(2.0) - 10 * np.log10(np.mean((np.where(mask, v, 0.0) - ref) ** 2))

    row = dict(
        n=n,
        views=views,
        xct_s=round(xct_s, 3),
        compile_s=round(compile_s, 2),
        psnr_xct=round(float(psnr(vol)), 2),
    )
    if use_rtk:
        rtk = peers.RTKFDK(drr, angles, volume_shape=grid.shape, spacing_mm=256.0 / n, **kw)
        rtk.run()  # the first call loads RTK's filters
        rtk_s, vol_rtk = _best_time(rtk.run, reps)
        row.update(
            rtk_s=round(rtk_s, 3),
            ratio_rtk_over_xct=round(rtk_s / xct_s, 3),
            rel_l2_vs_rtk=float(
                f"{np.linalg.norm((vol - vol_rtk)[mask]) / np.linalg.norm(vol_rtk[mask]):.2e}"
            ),
            psnr_rtk=round(float(psnr(vol_rtk)), 2),
        )
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128])
    p.add_argument("--views", type=int, default=180)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if any(n < 8 for n in args.sizes) or args.views < 1 or args.reps < 1:
        print("bench_recon: --sizes must be >= 8, --views and --reps >= 1", file=sys.stderr)
        return 2

    import jax

    from xct import peers

    use_rtk = peers.rtk_available()
    dev = jax.devices()[0]
    meta = dict(
        jax=jax.__version__,
        backend=dev.platform,
        device=dev.device_kind,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        command="python -m scripts.bench_recon "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        peer="RTK FDKConeBeamReconstructionFilter (CPU)" if use_rtk else "none (RTK absent)",
    )
    print(json.dumps(meta), flush=True)
    rows = []
    for n in args.sizes:
        rows.append(bench_case(n, args.views, args.reps, use_rtk))
        print(json.dumps(rows[-1]), flush=True)
    cols = [c for c in rows[0]]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
