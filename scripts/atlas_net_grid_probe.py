"""What a coarser output grid would score: fold outputs and the truth averaged over blocks.

    nice -n 10 .venv/bin/python -m scripts.atlas_net_grid_probe --cases /tmp/an4/cases \\
        --folds checkpoints/atlas_net64/folds --views 2 --factor 2

For each chest's variant-0 case at ``--views`` (``scripts/train_atlas_net.py cases``: the
quality table's clinical X-rays), the fold model that never saw the chest
(``--folds/<chest>``) refines the case's ``atlas_tv``; that output, the case's ``atlas_tv``
and the truth (already averaged over each 64^3 voxel) are each averaged over ``--factor``^3
blocks, the body mask kept where at least half a block is inside. Printed per chest and as
the mean, inside the body (primary definition), on the case's grid and on the coarser one.

An observation about how much detail the views and the atlas determine, not a method: the
project's aims are stated on the case's own grid.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", required=True, help="OUT/cases of scripts/train_atlas_net.py")
    p.add_argument("--folds", required=True, help="a folder of fold models, one per chest")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--factor", type=int, default=2, help="block side, in voxels")
    return p.parse_args(argv)


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """``a`` averaged over ``k``^3 blocks (``recon.template.block_mean``; each side must be
    divisible by ``k``, where that function would drop a remainder)."""
    from xct.recon import template

    if any(n % k for n in a.shape):
        raise ValueError(f"--factor {k}: does not divide the grid {a.shape}")
    return np.asarray(template.block_mean(np.asarray(a, np.float32), k, 3))


def probe(cases_dir, folds_dir, views: int, factor: int) -> list[dict]:
    from xct import atlas_net, physics, scoring

    files = sorted(pathlib.Path(cases_dir).glob(f"*_v{views}_m0.npz"))
    if not files:
        raise ValueError(f"--cases {cases_dir}: no variant-0 cases at {views} views")
    rows = []
    for f in files:
        case = atlas_net.load_case(f)
        chest = case["meta"]["chest"]
        if chest.startswith("phantom_"):
            continue
        fold = pathlib.Path(folds_dir) / chest
        model, params, _ = atlas_net.load(fold)
        net = atlas_net.predict(model, params, atlas_net.case_inputs(case)) * 1000.0
        mu_water = case["meta"]["mu_water"]
        atv = np.asarray(physics.mu_to_hu(np.asarray(case["atlas_tv"]), mu_water))
        truth, body = case["truth_hu"].astype(np.float32), case["body"]
        coarse_body = block_mean(body.astype(np.float32), factor) >= 0.5
        row = {"chest": chest}
        for name, vol in (("atlas_net", net), ("atlas_tv", atv)):
            vol = np.asarray(vol, np.float32)
            row[name] = scoring.score_volume(vol, truth, body)["psnr_body"]
            row[f"{name}_coarse"] = scoring.score_volume(
                block_mean(vol, factor), block_mean(truth, factor), coarse_body
            )["psnr_body"]
        rows.append(row)
        print(
            f"{chest}: atlas_net {row['atlas_net']:.2f} -> {row['atlas_net_coarse']:.2f} dB, "
            f"atlas_tv {row['atlas_tv']:.2f} -> {row['atlas_tv_coarse']:.2f} dB inside the body",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = probe(args.cases, args.folds, args.views, args.factor)
    keys = ("atlas_net", "atlas_net_coarse", "atlas_tv", "atlas_tv_coarse")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    print(
        f"mean of {len(rows)} at {args.views} views, blocks of {args.factor}^3: atlas_net "
        f"{mean['atlas_net']:.2f} -> {mean['atlas_net_coarse']:.2f} dB, atlas_tv "
        f"{mean['atlas_tv']:.2f} -> {mean['atlas_tv_coarse']:.2f} dB inside the body"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
