"""Measured quality of few-view reconstruction: classical methods, X-ray priors, a registered
real template (and a network) vs views, on phantoms and real CTs.

    python -m scripts.quality_table --ct_dir=../shared/data/ct --include 'chest_*_2mm.nii.gz' \\
        --resolution=64 --views 2 4 8 --methods fdk tv tv_support template template_tv atlas \\
        atlas_tv --template ../shared/data/ct/chest_*_2mm.nii.gz --tv_iters=200 \\
        --tv_weight 0.03 0.1 0.3 --prior_weight 0.3 1 --out=docs/quality_clinical  # headline
    python -m scripts.quality_table --ct_dir=../shared/data/ct --include 'chest_*_2mm.nii.gz' \\
        --resolution=64 --grid_factor=2 --views 4 8 --methods tv_support --tv_iters=200 \\
        --tv_weight 0.01 0.03 0.1 --out=docs/quality_clinical_grid2   # on 128^3, scored at 64^3
    python -m scripts.quality_table --realism ideal --resolution=32 --phantoms=4 --iters=50 \\
        --checkpoint_workdir=quickstart_out/train --config=configs/quickstart.py \\
        --network_views 2 4 8 --real_fov=400 --out=docs/quality   # with a network (400 mm cubes)
    python -m scripts.quality_table --realism ideal --resolution=16 --phantoms=1 --views 2 8 \\
        --iters=3 --no_real --out=/tmp/qt                         # the smoke test's run

Flags -> ``xct.scoring.Settings`` -> ``xct.scoring.run_table`` -> files. What is measured
(volumes, X-rays, methods, weights chosen leave one out, network rows, scores whole and
inside the body) is described in ``xct/scoring.py``'s docstring. By default
(``--realism clinical``) each real CT's whole scan is X-rayed as a clinic would (couch, 2 mm
detector pixels, 1e5 photons; ``xct.clinical``) and the result is scored against the scan
averaged over each output voxel; ``--realism ideal`` (labelled idealised wherever it
appears) renders DRRs of the scored cube itself, without couch or noise unless
``--photons``, and is the only mode for phantoms and networks trained on the datasets' r^2
views.

Outputs in ``--out``: ``quality_{r}.md`` (the tables, also printed to stdout),
``per_volume_{r}.csv`` (every volume's numbers), ``sweep_{r}.csv`` (every candidate
weight), ``results_{r}.json`` (set-up, machine, command, means) and ``psnr_vs_views_{r}.png``.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

from xct import scoring
from xct.experiment import load_config as _load_config  # noqa: F401  (scripts import it)
from xct.scoring import (  # noqa: F401  (the table's vocabulary, as tests and scripts use it)
    CLASSICAL,
    METHOD_LABELS,
    METHODS,
    NETWORK,
    PRIOR,
    SCORE_COLUMNS,
    SWEPT,
    TABLES,
    TEMPLATE,
    X2CT_CELLS,
    markdown_table,
    read_cube,
    summarise,
    trained_on,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CT_DIR = ROOT.parent / "shared" / "data" / "ct"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=64, help="voxels per side (and pixels)")
    p.add_argument(
        "--phantoms", type=int, default=0, help="synthetic test phantoms (--realism ideal only)"
    )
    p.add_argument("--views", type=int, nargs="+", default=[2, 4, 8, 16, 64])
    p.add_argument("--methods", nargs="+", default=list(CLASSICAL), choices=METHODS)
    p.add_argument(
        "--realism",
        default="clinical",
        choices=sorted(scoring.REALISM),
        help="how the X-rays are made: ideal = DRRs of the scored cube itself (idealised); "
        "clinical = the whole scan, couch and noise (xct.clinical; real CTs only)",
    )
    p.add_argument("--detector_pixel_mm", type=float, default=2.0, help="clinical: pixel, mm")
    p.add_argument(
        "--detector_sampling",
        default="footprint",
        choices=scoring.DETECTOR_SAMPLINGS,
        help="clinical: fine X-rays binned to the voxel's footprint, or resized to r^2",
    )
    p.add_argument("--spectrum", default="mono", choices=scoring.SPECTRA, help="clinical")
    p.add_argument(
        "--mu_water",
        dest="mu_water_per_mm",
        type=float,
        default=None,
        help="clinical: water's attenuation per mm the reconstructions assume (HU = 1000 (mu / "
        "mu_water - 1)); default xct.physics.MU_WATER_PER_MM, 0.01929 (70 keV)",
    )
    p.add_argument(
        "--grid_factor",
        type=int,
        default=1,
        help="clinical: reconstruct on a grid this many times finer than --resolution (same "
        "cube, X-rays brought to its voxels), box-averaged to --resolution before scoring; "
        "classical and prior methods only",
    )
    p.add_argument("--iters", type=int, default=50, help="iterations of every iterative method")
    p.add_argument("--sirt_iters", type=int, default=None, help="default: --iters")
    p.add_argument("--cgls_iters", type=int, default=None, help="default: --iters")
    p.add_argument("--tv_iters", type=int, default=None, help="default: --iters")
    p.add_argument(
        "--tv_weight",
        type=float,
        nargs="+",
        default=[0.1],
        help="TV weight(s), mm^2; with several, each volume gets the one best on the others",
    )
    p.add_argument(
        "--prior_weight",
        type=float,
        nargs="+",
        default=[1.0],
        help="template_tv: weight(s) of the pull towards the registered template, mm",
    )
    p.add_argument(
        "--template",
        nargs="+",
        default=[],
        help="template CT file(s) for template / template_tv (never the CT being scored)",
    )
    p.add_argument(
        "--atlas_net",
        nargs="+",
        default=[],
        metavar="DIR",
        help="atlas_net model folder(s) (xct.atlas_net.save); each CT is scored by one that "
        "did not train on it (e.g. the folds of scripts/train_atlas_net.py)",
    )
    p.add_argument(
        "--real_fov",
        default="body",
        help="real CTs' cube: 'body' (the side the body fills, per CT) or a side in mm",
    )
    p.add_argument("--air_tol", type=float, default=None, help="priors: air line integral")
    p.add_argument("--include", default="*", help="glob: only the --ct_dir names matching it")
    p.add_argument(
        "--chests",
        default="*chest*",
        help="glob of the --ct_dir names that are chests (their own table; the others: "
        "'other real CTs')",
    )
    p.add_argument("--arc_deg", type=float, default=None, help="default: the datasets' arc")
    p.add_argument(
        "--photons", type=float, default=None, help="Poisson noise; default none (clinical: 1e5)"
    )
    p.add_argument("--seed", type=int, default=0, help="noise key")
    p.add_argument("--ct_dir", default=str(DEFAULT_CT_DIR), help="real CTs (ct_folder rules)")
    p.add_argument("--no_real", action="store_true", help="synthetic phantoms only")
    p.add_argument("--checkpoint_workdir", default=None, help="a trained network's workdir")
    p.add_argument("--config", default=None, help="its config file, configs/NAME.py[:arg]")
    p.add_argument("--checkpoint", default="best", help="'best' or 'last'")
    p.add_argument("--network_views", type=int, nargs="+", default=None)
    p.add_argument(
        "--network_tv_weight",
        type=float,
        nargs="+",
        default=None,
        help="network+tv: TV weight(s), mm^2 (default: --tv_weight)",
    )
    p.add_argument(
        "--network_prior_weight",
        type=float,
        nargs="+",
        default=None,
        help="network+tv: weight(s) of the pull towards the prediction, mm (default: "
        "--prior_weight)",
    )
    p.add_argument("--refine_iters", type=int, default=100)
    p.add_argument("--out", required=True, help="output folder")
    return _checked(p, p.parse_args(argv))


def _checked(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with defaults filled in; ``p.error`` (exit 2) on a bad combination."""
    if args.resolution < 16:
        p.error("--resolution: at least 16 (SSIM's 11-voxel window)")
    if any(v < 1 for v in args.views):
        p.error("--views: positive numbers of views")
    if (args.checkpoint_workdir is None) != (args.config is None):
        p.error("--checkpoint_workdir and --config go together")
    for name in ("sirt", "cgls", "tv"):
        if getattr(args, f"{name}_iters") is None:
            setattr(args, f"{name}_iters", args.iters)
    if any(w < 0 for w in args.tv_weight + args.prior_weight):
        p.error("--tv_weight, --prior_weight: non-negative weights")
    if args.real_fov != "body":
        try:
            args.real_fov = float(args.real_fov)
        except ValueError:
            p.error(f"--real_fov: 'body' or a length in mm, got {args.real_fov!r}")
        if not args.real_fov > 0:
            p.error("--real_fov: a positive length in mm")
    if set(args.methods) & set(TEMPLATE) and not args.template:
        p.error("--methods template / template_tv need --template FILE [FILE ...]")
    for f in args.template:
        if not pathlib.Path(f).exists():
            p.error(f"--template: {f} does not exist")
    args.views = sorted(set(args.views))
    return args


def settings(args: argparse.Namespace) -> scoring.Settings:
    """The library's settings of parsed flags."""
    fields = {f.name for f in scoring.Settings.__dataclass_fields__.values()}
    kw = {k: v for k, v in vars(args).items() if k in fields}
    for k in ("views", "methods", "tv_weight", "prior_weight", "template", "atlas_net"):
        kw[k] = tuple(kw[k])
    for k in ("network_views", "network_tv_weight", "network_prior_weight"):
        kw[k] = None if kw[k] is None else tuple(kw[k])
    kw["ct_dir"] = None if args.no_real else str(args.ct_dir)
    return scoring.Settings(**kw)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = "python -m scripts.quality_table " + shlex.join(argv)
    try:
        result = scoring.run_table(settings(args), command)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    markdown = scoring.write_outputs(args.out, result, ROOT)
    if hasattr(sys.stdout, "reconfigure"):  # "³" on a terminal without UTF-8 (CI)
        sys.stdout.reconfigure(errors="replace")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
