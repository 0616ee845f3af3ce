"""Train ``atlas_net`` on the seven shared chests in clinical mode, score it by folds, ship it.

    nice -n 5 .venv/bin/python -m scripts.train_atlas_net cases --out /tmp/atlas_net
    nice -n 5 .venv/bin/python -m scripts.train_atlas_net train --out /tmp/atlas_net \\
        --ship checkpoints/atlas_net64 --report docs/atlas_net

``cases``: for every chest ``../shared/data/ct/chest_*_2mm.nii.gz`` (not the label map), at
each ``--views``, ``--variants`` clinical cases (``xct.atlas_net.make_case``): variant 0 is
the quality table's (the whole scan with its couch, nested angles, 1e5 photons, seeded);
the others deform the scan (smooth random field up to ``--deform_mm``) and jitter the
angles (up to ``--jitter_deg``). The other chests are the templates. One ``.npz`` per case
in ``OUT/cases``; a rerun skips the cases already there (a killed run resumes), only
recomputing their TV inputs when ``xct.atlas_net.INPUT_WEIGHTS`` changed since they were
made (no registration again: ``atlas_net.refresh_case``).

``--phantoms N`` adds chest phantoms v2 (with couch and arms) X-rayed the same way, the real
chests their templates: training cases only (every fold's atlas leaves its chest out of
them too).

``train``: one network per held-out chest (fold): trained on the other chests' cases, with
the held-out chest removed from their atlases too, then scored on the held-out chest's
variant-0 cases against TV, tv_support, atlas and atlas_tv of the same X-rays
(``scoring.score_volume``: whole cube and inside the body, both definitions). Then one
network on every chest, written to ``--ship``. ``--report`` gets ``README.md``,
``rows.csv`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys
import time

import numpy as np

CT_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("cases", "train"))
    p.add_argument("--ct_dir", default=str(CT_DIR))
    p.add_argument("--out", default="/tmp/atlas_net")
    p.add_argument("--chests", nargs="+", default=None, help="names (default: all chest_*_2mm)")
    p.add_argument("--views", type=int, nargs="+", default=[2, 4])
    p.add_argument("--variants", type=int, default=3, help="cases per chest and views")
    p.add_argument("--deform_mm", type=float, default=10.0)
    p.add_argument("--jitter_deg", type=float, default=10.0)
    p.add_argument(
        "--phantoms",
        type=int,
        default=0,
        help="also this many chest phantoms v2 (couch, arms; seeds 100, 101, ...) as training "
        "cases at each --views, the real chests their templates (never scored)",
    )
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--width", type=int, default=12)
    p.add_argument("--depth", type=int, default=3, choices=(3, 4), help="the Refiner's scales")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", nargs="+", default=None, help="held-out chests (default: all)")
    p.add_argument("--with_phantoms", action="store_true", help="train on the phantom cases too")
    p.add_argument("--body_weight", type=float, default=3.0, help="loss weight inside the body")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--patch", type=int, default=32, help="cubic training patches (64: whole)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ship", default=None, help="write the all-chest model here")
    p.add_argument("--report", default=None, help="write the fold table here")
    return p.parse_args(argv)


def chest_paths(ct_dir) -> list[pathlib.Path]:
    root = pathlib.Path(ct_dir)
    paths = sorted(p for p in root.glob("chest_*_2mm.nii.gz") if "organs" not in p.name)
    if len(paths) < 3:
        raise ValueError(f"{root}: need at least three chests (folds), found {len(paths)}")
    return paths


def chest_name(path: pathlib.Path) -> str:
    return path.name.removesuffix(".nii.gz")


def build_cases(args) -> None:
    import jax.numpy as jnp
    from tqdm import tqdm

    from xct import atlas_net, clinical, io, physics
    from xct.recon import template

    paths = chest_paths(args.ct_dir)
    todo = [p for p in paths if not args.chests or chest_name(p) in args.chests]
    out = pathlib.Path(args.out) / "cases"
    out.mkdir(parents=True, exist_ok=True)
    cubes = {}
    for p in paths:
        cube = io.load_cube(p, resolution=args.resolution, fov_mm="body", stored=True)
        mu = np.asarray(jnp.maximum(physics.hu_to_mu(cube.hu), 0.0), np.float32)
        cubes[chest_name(p)] = (cube.fov_mm, mu)
    jobs = [(p, v, m) for p in todo for v in args.views for m in range(args.variants)]
    jobs += [(100 + i, v, 0) for i in range(args.phantoms) for v in args.views]
    bar = tqdm(jobs, desc="cases", unit="case", file=sys.stderr)
    solvers: dict = {}
    scans: dict = {}  # the jobs come chest by chest: keep only the current one's scan
    for p, v, m in bar:
        name = f"phantom_s{p}" if isinstance(p, int) else chest_name(p)
        f = out / f"{name}_v{v}_m{m}.npz"
        bar.set_postfix_str(f"{name} {v}v #{m}")
        if f.exists():  # kept; its TV inputs brought to atlas_net.INPUT_WEIGHTS if need be
            case = atlas_net.load_case(f)
            if atlas_net.refresh_case(case, solvers):
                atlas_net.save_case(f, case)
                print(f"  {f.name}: TV inputs recomputed at the current weights", file=sys.stderr)
            continue
        if name not in scans:
            scans.clear()
            scans[name] = atlas_net.phantom_scan(p) if isinstance(p, int) else clinical.load_scan(p)
        scan = scans[name]
        templates = {}
        for n, (fov, mu) in cubes.items():
            if n == name:
                continue
            try:
                template.check_template_size(n, fov, scan.side_mm)
            except ValueError as e:
                print(f"  {name}: template refused: {e}", file=sys.stderr)
                continue
            templates[n] = mu
        spec = atlas_net.CaseSpec(
            chest=name,
            views=v,
            variant=m,
            deform_mm=args.deform_mm if m else 0.0,
            angle_jitter_deg=args.jitter_deg if m else 0.0,
            seed=args.seed + 1000 * m + v,
            resolution=args.resolution,
        )
        case = atlas_net.make_case(spec, scan, templates, solvers)
        atlas_net.save_case(f, case)
        print(
            f"  {f.name}: {case['meta']['seconds']:.0f} s, fused {case['meta']['fused']}",
            file=sys.stderr,
            flush=True,
        )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = "python -m scripts.train_atlas_net " + shlex.join(argv)
    t = time.perf_counter()
    if args.stage == "cases":
        build_cases(args)
    else:
        from scripts import _atlas_net_train  # noqa: PLC0415

        _atlas_net_train.run(args)
    print(f"done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
