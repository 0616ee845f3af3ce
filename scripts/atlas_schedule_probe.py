"""How the registration schedule changes the atlas, on stored clinical cases.

    nice -n 10 .venv/bin/python -m scripts.atlas_schedule_probe --cases /tmp/atlas_net/cases \\
        --views 2 --fine_points 13 --smooth_weight 0.005

For each chest's variant-0 case at ``--views`` (``scripts/train_atlas_net.py cases``: the
quality table's clinical X-rays, with their geometry), every template (the other chests'
body cubes, ``io.load_cube(..., fov_mm="body")``) is registered again with
``recon.template.Schedule`` changed by the flags, fused (``recon.atlas``, every template,
local weights), and ``atlas_tv`` is run from it at the benchmark's weights. Printed per
chest and as the mean of the chests, inside the body (primary definition): the atlas and
atlas_tv with the changed schedule, and the case's stored atlas (the default schedule's).
Leave one out holds: a case's templates never include its own chest.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import numpy as np

CT_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", required=True, help="OUT/cases of scripts/train_atlas_net.py")
    p.add_argument("--ct_dir", default=str(CT_DIR))
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--fine_points", type=int, default=None)
    p.add_argument("--smooth_weight", type=float, default=None)
    p.add_argument("--fine_steps", type=int, default=None, help="steps of the last stage")
    return p.parse_args(argv)


def schedule_of(args):
    from xct.recon import template

    s = template.Schedule()
    if args.fine_points is not None:
        s = dataclasses.replace(s, fine_points=args.fine_points)
    if args.smooth_weight is not None:
        s = dataclasses.replace(s, smooth_weight=args.smooth_weight)
    if args.fine_steps is not None:
        level, parts, _ = s.stages[-1]
        s = dataclasses.replace(s, stages=(*s.stages[:-1], (level, parts, args.fine_steps)))
    return s


def main(argv=None) -> int:
    import jax.numpy as jnp

    from xct import atlas_net, io, physics, scoring
    from xct.recon import atlas

    args = parse_args(argv)
    schedule = schedule_of(args)
    files = sorted(pathlib.Path(args.cases).glob(f"chest_*_v{args.views}_m0.npz"))
    if not files:
        raise SystemExit(f"{args.cases}: no variant-0 cases at {args.views} views")
    cubes = {}
    for p in sorted(pathlib.Path(args.ct_dir).glob("chest_*_2mm.nii.gz")):
        cube = io.load_cube(p, resolution=64, fov_mm="body", stored=True)
        mu = jnp.maximum(physics.hu_to_mu(cube.hu), 0.0)
        cubes[p.name.removesuffix(".nii.gz")] = np.asarray(mu, np.float32)
    rows, solvers = [], {}
    for f in files:
        c = atlas_net.load_case(f)
        meta = c["meta"]
        grid, geom = atlas_net.case_grid(c), atlas_net.case_geometry(c)
        drr = jnp.asarray(c["drr"], jnp.float32)
        t = time.perf_counter()
        at = atlas.atlas([cubes[n] for n in meta["templates"]], drr, geom, grid, schedule=schedule)
        seconds = time.perf_counter() - t
        if grid not in solvers:
            solvers[grid] = scoring.Solvers(grid, sirt_iters=1, cgls_iters=1, tv_iters=200)
        s = solvers[grid]
        w = scoring.benchmark_weights("atlas_tv", args.views)
        tv = s.run("atlas_tv", drr, geom, w, s.support(drr, geom), at.volume)

        def score(mu, c=c, meta=meta):
            hu = np.asarray(physics.mu_to_hu(jnp.asarray(mu), meta["mu_water"]), np.float32)
            return scoring.score_volume(hu, c["truth_hu"], c["body"])["psnr_body"]

        row = {
            "atlas": score(at.volume),
            "atlas_tv": score(tv),
            "stored atlas": score(c["atlas"]),
            "mismatch": float(np.mean(at.mismatch)),
            "seconds": seconds,
        }
        rows.append(row)
        print(meta["chest"], {k: round(v, 3) for k, v in row.items()}, flush=True)
    mean = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]}
    print(f"mean of {len(rows)} ({schedule}): {mean}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
