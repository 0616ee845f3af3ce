"""Reconstruct a CT from your own X-rays without a trained model: classical solvers (FDK,
SIRT, CGLS, TV), priors from the X-rays themselves (support, value bounds) and registered
real template CTs. Nothing about the acquisition is guessed: the detector pixel, the
distances and the isocentre come from the DICOM tags or from you.

Example (two line-integral images of 2 mm detector pixels, PA and lateral; other
patients' chest CTs as templates, so --method auto runs atlas_net, the shipped network
that corrects atlas_tv, or atlas_tv where that network is absent):

    python -m xct.reconstruct --xrays pa.npy lat.npy --angles_deg 0 90 \\
        --detector_pixel_mm 2 --fov_mm 360 \\
        --template ../shared/data/ct/chest_*_2mm.nii.gz --out recon_out

Inputs, one per --angles_deg (gantry angle in degrees on a circular cone-beam orbit about
the patient's long axis, RTK's convention; 0 = PA: source behind the patient, 90 = source
on the patient's left):
  .npy  line integrals -log(I / I0) (unitless; water is about 0.019 per mm of path at
        70 keV), any rows x cols, float; or detector intensities with
        --npy_kind intensity --flat_field I0. Needs --detector_pixel_mm.
  .png  detector intensities, bright = more photons (bone dark); I0 is --flat_field or the
        99.9th percentile. Needs --detector_pixel_mm.
  .dcm  CR/DX radiographs: read by xct.radiograph (rescale, MONOCHROME1/2, orientation,
        ImagerPixelSpacing, DistanceSourceToDetector/-Patient, ViewPosition for missing
        angles) and calibrated to line integrals against DRRs of --template (the first) or
        of a first reconstruction (xct.calibrate, as --mode=predict does).
Detector convention (xct.geometry, RTK): row 0 is towards the patient's head and rows run
towards the feet; the detector centre is on the central ray. Columns run, at 0 degrees
(PA), from the patient's right to the left (column 0 = patient's right, as a PA film is
viewed); at 90 degrees from posterior to anterior (column 0 = the patient's back); at
180 (AP) from left to right; at -90 from anterior to posterior. The detector is
rows * pixel by cols * pixel mm, never stretched: non-square X-rays keep their aspect.
Each X-ray is area-averaged to pixels of a voxel's footprint at the detector
(--detector_sampling footprint, xct.clinical.xrays_for_grid: measured in clinical mode on
two real chests at 64^3, scripts/clinical_probe.py, +0.7 dB inside the body at 8 views over
resizing to resolution^2 pixels, the same at 2). X-rays whose border is air are extended
with air to cover the cube; a body that reaches the X-rays' edge is flagged.

Units: millimetres, degrees, HU out; --mu_water (per mm) turns attenuation into HU.
Outputs in --out: reconstruction.nii.gz (HU, patient LPS, its centre at --isocenter_lps:
opens right in 3D Slicer), report.html (slices, each X-ray beside the DRR of the result,
the registration's loss curve, warnings), summary.json (everything chosen and measured:
geometry, DRR mismatch, template mismatches, timings, plausibility warnings).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time
from typing import Any, NamedTuple

import numpy as np

from xct import physics, scoring
from xct.geometry import DEFAULT_SDD_MM, DEFAULT_SOD_MM
from xct.scoring import METHODS, TEMPLATE  # the one registry, shared with quality_table

DEFAULT_TV_WEIGHT = 0.03  # mm^2, a named method's TV weight when --tv_weight is not given
DEFAULT_PRIOR_WEIGHT = 0.3  # mm, template_tv / atlas_tv's pull when --prior_weight is not given
CT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")  # CT files of a --template folder

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".npy", ".png")
SAMPLINGS = ("footprint", "resize")  # xct.clinical.DETECTOR_SAMPLINGS
#: A patient's axial extent (the larger of left-right and front-back), mm: outside this the
#: reconstruction is flagged (an infant's chest is about 120 mm, a large adult's 500).
BODY_AXIAL_MM = (100.0, 600.0)
#: Fraction of a side face of the cube inside the body above which the body is "cut": a
#: body that just fits (a cube of the body's own extent) touches a face along a strip, 3-8%
#: of it in 64^3 reconstructions of a real chest from 2 and 8 clinical views.
CUT_FACE_FRACTION = 0.15


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows every default that is not None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            action.option_strings
            and action.default not in (None, False, argparse.SUPPRESS)
            and "%(default)" not in text
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Errors in one line (``prog: error: ...``), exit status 2, without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _method_arguments(p: argparse.ArgumentParser) -> None:
    """``--method`` and the template CTs it may use."""
    p.add_argument(
        "--method",
        default="auto",
        choices=("auto", *METHODS),
        help="reconstruction; auto: what the clinical-mode benchmark measured best for the "
        "number of X-rays, with --template (atlas_tv) or without (xct.scoring.AUTO)",
    )
    p.add_argument(
        "--template",
        nargs="+",
        default=[],
        metavar="CT",
        help="template CT file(s) or folder(s) of them (other patients; all are screened, "
        "registered and fused by atlas / atlas_tv / atlas_net)",
    )
    p.add_argument(
        "--atlas_net",
        default=None,
        metavar="DIR",
        help="atlas_net's trained model (xct.atlas_net.save; default: the shipped "
        "checkpoints/atlas_net64)",
    )
    p.add_argument(
        "--template_hu_offset",
        type=float,
        default=0.0,
        help="HU added to every template voxel as read (-1024 for files stored as HU+1024)",
    )


def _solver_arguments(p: argparse.ArgumentParser) -> None:
    """Iterations, weights and the priors' air tolerance."""
    p.add_argument("--iters", type=int, default=200, help="iterations of SIRT / CGLS / TV")
    p.add_argument(
        "--tv_weight",
        type=float,
        default=None,
        help="TV weight, mm^2 (default: the clinical-mode benchmark's for the method and "
        "number of views, xct.scoring.AUTO; else 0.03)",
    )
    p.add_argument(
        "--prior_weight",
        type=float,
        default=None,
        help="template_tv / atlas_tv pull, mm (default: the benchmark's, as --tv_weight)",
    )
    p.add_argument(
        "--air_tol", type=float, default=None, help="priors: air line integral (default: priors')"
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m xct.reconstruct", description=__doc__, formatter_class=_HelpFormatter
    )
    p.add_argument("--xrays", nargs="+", required=True, metavar="FILE", help=".npy, .png or .dcm")
    p.add_argument(
        "--angles_deg",
        type=float,
        nargs="+",
        default=None,
        help="gantry angle of each X-ray (0 PA, 90 source on the patient's left); required "
        "for .npy/.png, from ViewPosition for DICOM when left out",
    )
    p.add_argument(
        "--detector_pixel_mm",
        type=float,
        nargs="+",
        default=None,
        metavar="MM",
        help="the X-rays' own pixel at the detector, mm: ROW_MM [COL_MM]; required for "
        ".npy/.png; DICOM: ImagerPixelSpacing unless given",
    )
    p.add_argument(
        "--sod_mm",
        type=float,
        default=None,
        help=f"source to isocentre, mm (DICOM: DistanceSourceToPatient; else {DEFAULT_SOD_MM:g})",
    )
    p.add_argument(
        "--sdd_mm",
        type=float,
        default=None,
        help=f"source to detector, mm (DICOM: DistanceSourceToDetector; else {DEFAULT_SDD_MM:g})",
    )
    p.add_argument(
        "--npy_kind",
        default="line_integrals",
        choices=("line_integrals", "intensity"),
        help="what a .npy holds: line integrals -log(I/I0), or intensities I (then --flat_field)",
    )
    p.add_argument(
        "--flat_field",
        type=float,
        default=None,
        metavar="I0",
        help="unattenuated intensity I0 of --npy_kind intensity and .png (.png: else the "
        "99.9th percentile)",
    )
    _method_arguments(p)
    p.add_argument("--resolution", type=int, default=64, help="voxels per side of the cube")
    p.add_argument("--fov_mm", type=float, default=400.0, help="side of the cube, mm")
    p.add_argument(
        "--isocenter_lps",
        type=float,
        nargs=3,
        default=[0.0, 0.0, 0.0],
        metavar=("X", "Y", "Z"),
        help="where the orbit's isocentre (the cube's centre) is in patient LPS, mm",
    )
    p.add_argument(
        "--detector_sampling",
        default="footprint",
        choices=SAMPLINGS,
        help="X-rays to the grid: area-averaged to the voxel footprint, or resized to "
        "resolution^2 pixels (.npy/.png; DICOM is calibrated onto resolution^2)",
    )
    p.add_argument(
        "--mu_water",
        type=float,
        default=physics.MU_WATER_PER_MM,
        help="water's attenuation per mm at the X-rays' effective energy (HU = 1000 (mu / "
        "mu_water - 1); default: 70 keV)",
    )
    p.add_argument(
        "--grid_factor",
        type=int,
        default=None,
        help="reconstruct on a grid this many times finer than --resolution (same cube, "
        ".npy/.png X-rays brought to its voxels), then average each block down to "
        "--resolution; classical and prior methods only (default: --method auto's choice, "
        "else 1)",
    )
    _solver_arguments(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pixel_mm", default=None, help=argparse.SUPPRESS)  # removed: see below
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.pixel_mm is not None:
        p.error(
            "--pixel_mm was removed (it meant the pixel after resizing); give "
            "--detector_pixel_mm, the X-rays' own pixel at the detector in mm"
        )
    suffixes = {pathlib.Path(x).suffix.lower() for x in args.xrays}
    dicom = suffixes <= set(DICOM_SUFFIXES)
    if not dicom and not suffixes <= set(IMAGE_SUFFIXES):
        bad = sorted(suffixes - set(IMAGE_SUFFIXES) - set(DICOM_SUFFIXES))
        if bad:
            p.error(f"--xrays: expected .npy, .png or .dcm files, got {', '.join(bad)}")
        p.error("--xrays: all DICOM radiographs or none (a .dcm is calibrated, a .npy is not)")
    if args.angles_deg is None and not dicom:
        p.error("--angles_deg: one gantry angle per X-ray is required for .npy/.png")
    if args.angles_deg is not None and len(args.angles_deg) != len(args.xrays):
        p.error(f"--angles_deg: {len(args.angles_deg)} angles for {len(args.xrays)} X-rays")
    if args.detector_pixel_mm is None and not dicom:
        p.error(
            "--detector_pixel_mm is required for .npy/.png: the X-rays' own pixel at the "
            "detector in mm (ROW_MM [COL_MM])"
        )
    if args.detector_pixel_mm is not None and (
        len(args.detector_pixel_mm) > 2 or min(args.detector_pixel_mm) <= 0
    ):
        p.error("--detector_pixel_mm: one or two positive sizes in mm (ROW_MM [COL_MM])")
    if args.npy_kind == "intensity" and not args.flat_field:
        p.error("--npy_kind intensity needs --flat_field I0 (the unattenuated intensity)")
    if args.flat_field is not None and args.flat_field <= 0:
        p.error("--flat_field: a positive intensity")
    if args.method in TEMPLATE and not args.template:
        p.error(f"--method {args.method} needs --template FILE [FILE ...]")
    if args.resolution < 8 or args.resolution % 2:
        p.error("--resolution: an even number of voxels, at least 8")
    if args.grid_factor is not None and args.grid_factor < 1:
        p.error(f"--grid_factor: a whole number >= 1, got {args.grid_factor}")
    auto = args.method == "auto" and (args.grid_factor or 1) > 1
    if auto and scoring.auto_method(len(args.xrays), bool(args.template))[0] in TEMPLATE:
        p.error(
            f"--grid_factor {args.grid_factor}: --method auto chooses a template method "
            f"(atlas_tv or atlas_net) for {len(args.xrays)} X-rays with templates, which "
            "registers them on the output grid only; leave --grid_factor out"
        )
    if (args.grid_factor or 1) > 1 and args.method in TEMPLATE:
        p.error(
            f"--grid_factor {args.grid_factor}: --method {args.method} registers templates on "
            "the output grid only; give --grid_factor 1 or a method without templates"
        )
    if (args.grid_factor or 1) > 1 and dicom:
        p.error(
            "--grid_factor: .npy/.png X-rays only (DICOM radiographs are calibrated onto the "
            "resolution^2 detector)"
        )
    if args.method == "atlas_net" and (args.tv_weight is not None or args.prior_weight is not None):
        p.error(
            "--method atlas_net runs atlas_tv at the weights its network trained with (the "
            "clinical benchmark's); leave --tv_weight and --prior_weight out"
        )
    if args.iters < 1 or (args.tv_weight or 0) < 0 or (args.prior_weight or 0) < 0:
        p.error("--iters >= 1, --tv_weight >= 0, --prior_weight >= 0")
    if not args.mu_water > 0 or not args.fov_mm > 0:
        p.error("--mu_water and --fov_mm: positive numbers")
    for name in ("sod_mm", "sdd_mm"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name}: a positive distance in mm")
    return args


# ------------------------------------------------------------------------------------------
# Reading


def read_line_integrals(path, npy_kind: str = "line_integrals", flat_field=None) -> np.ndarray:
    """One ``.npy`` / ``.png`` X-ray as line integrals ``[rows, cols]`` float32, at its own
    size (never resampled here).

    ``.npy``: line integrals as stored, or ``-log(I / flat_field)`` for ``npy_kind
    "intensity"``. ``.png``: detector intensities (bright = more photons), ``-log(I / I0)``
    with ``I0`` the ``flat_field`` or the 99.9th percentile.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"--xrays: {p} not found")
    if p.suffix.lower() == ".npy":
        img = np.load(p).astype(np.float32)
        if npy_kind == "intensity":
            img = -np.log(np.clip(img, 1e-6 * flat_field, None) / np.float32(flat_field))
    else:
        import SimpleITK as sitk

        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float32)
        if arr.ndim == 3:  # RGB(A)
            arr = arr[..., :3].mean(-1)
        air = float(flat_field or np.percentile(arr, 99.9))
        img = -np.log(np.clip(arr, 1e-3 * air, None) / air)
    if img.ndim != 2 or min(img.shape) < 2:
        raise ValueError(f"--xrays: {p}: expected a 2-D image, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise ValueError(f"--xrays: {p}: NaN or infinite values")
    return img.astype(np.float32)


def _pixel_pair(values) -> tuple[float, float]:
    return (float(values[0]), float(values[-1]))


def _fine_xrays(args) -> tuple[np.ndarray, tuple[float, float]]:
    """``([V, rows, cols] line integrals, (row_mm, col_mm))`` of .npy/.png X-rays."""
    imgs = [read_line_integrals(x, args.npy_kind, args.flat_field) for x in args.xrays]
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        listed = ", ".join(
            f"{x} {im.shape[0]}x{im.shape[1]}" for x, im in zip(args.xrays, imgs, strict=True)
        )
        raise ValueError(f"--xrays: every X-ray must have the same rows x cols ({listed})")
    return np.stack(imgs), _pixel_pair(args.detector_pixel_mm)


def pad_with_air(
    drr: np.ndarray, pixel_mm: tuple[float, float], extent_mm: float, air_tol: float
) -> tuple[np.ndarray, dict, list[str]]:
    """Fine X-rays ``[V, rows, cols]`` extended with air (line integral 0) to cover
    ``extent_mm`` at the detector (the cube's shadow), on the axes whose border is air in
    every view (99th percentile of the outer two lines at most ``air_tol``): the body is
    inside the views, so what lies beyond them is taken as air; without that, the cube's
    parts outside a view are constrained by the other views alone (on two views, 400 x 300
    X-rays of a body inside them lost 4.9 dB to the same X-rays uncropped at 16^3).

    Returns ``(images, {"rows": pad, "cols": pad} per side, truncated axes)``: an axis
    whose border holds body is left as it is and named in the list.
    """
    pads, truncated = {"rows": 0, "cols": 0}, []
    for axis, name in ((1, "rows"), (2, "cols")):
        n, p = drr.shape[axis], float(pixel_mm[axis - 1])
        if n * p >= extent_mm:
            continue
        edge = np.concatenate(
            [
                np.take(drr, [0, 1], axis=axis).ravel(),
                np.take(drr, [n - 2, n - 1], axis=axis).ravel(),
            ]
        )
        if np.percentile(edge, 99.0) > air_tol:
            truncated.append(name)
            continue
        pads[name] = int(np.ceil((extent_mm - n * p) / (2.0 * p)))
    if any(pads.values()):
        width = ((0, 0), (pads["rows"],) * 2, (pads["cols"],) * 2)
        drr = np.pad(drr, width, constant_values=0.0)
    return drr, pads, truncated


def _check_distances(sod_mm: float, sdd_mm: float, fov_mm: float) -> None:
    if sdd_mm <= sod_mm:
        raise ValueError(f"--sdd_mm {sdd_mm:g} must exceed --sod_mm {sod_mm:g}")
    if sod_mm <= fov_mm * np.sqrt(2.0) / 2.0:
        raise ValueError(
            f"--sod_mm {sod_mm:g}: the source lies inside the --fov_mm {fov_mm:g} cube"
        )


# ------------------------------------------------------------------------------------------
# Templates and registration


def _load_templates(args, r: int, mu_water: float):
    """``(attenuation cubes, names, skipped)`` of the ``--template`` CTs: a file that is not
    a CT or whose body is far from the cube's size is left out with a one-line note (and
    listed in the summary); none usable is an error."""
    import jax.numpy as jnp

    from xct import io
    from xct.recon import template

    vols, names, skipped = [], [], []
    for f in template_files(args.template):
        try:
            cube = io.load_cube(f, resolution=r, fov_mm="body", hu_offset=args.template_hu_offset)
            template.check_template_size(pathlib.Path(f).name, cube.fov_mm, args.fov_mm)
        except ValueError as e:
            skipped.append({"template": f, "reason": str(e)})
            print(f"note: --template {f} left out: {e}", file=sys.stderr)
            continue
        vols.append(jnp.maximum(physics.hu_to_mu(jnp.asarray(cube.hu), mu_water), 0.0))
        names.append(str(f))
    if not vols:
        raise ValueError(f"--template: none of {len(skipped)} file(s) is usable (reasons above)")
    return vols, names, skipped


def _calibration_template(args, r: int, mu_water: float):
    """The first ``--template`` as attenuation per mm on the ``--fov_mm`` cube (the DRRs
    that DICOM radiographs are calibrated against, as ``xct.predict`` reads it)."""
    import jax.numpy as jnp

    from xct import io

    f = template_files(args.template)[0]
    try:
        cube = io.load_cube(f, resolution=r, fov_mm=args.fov_mm, hu_offset=args.template_hu_offset)
    except ValueError as e:
        raise ValueError(f"--template {f}: {e}") from None
    return jnp.maximum(physics.hu_to_mu(jnp.asarray(cube.hu), mu_water), 0.0)


def register_templates(vols, names, drr, geom, grid) -> tuple[int, object, list[float], float]:
    """Register each template once (``recon.template.best_template``, whose jitted
    function is kept between calls), with a progress bar and ETA on stderr.

    Returns ``(best index, its Registration, every mismatch, seconds)``.
    """
    import jax
    from tqdm import tqdm

    from xct.recon import template

    print(
        f"registering {len(vols)} template(s) to {drr.shape[0]} X-ray(s) on a "
        f"{grid.shape[0]}^3 grid (the first includes compiling)",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    best, best_reg, mism = -1, None, []
    for i, vol in enumerate(tqdm(vols, desc="registration", unit="template", file=sys.stderr)):
        _, reg, m = template.best_template([vol], drr, geom, grid)
        jax.block_until_ready(reg.volume)
        mism.append(float(m[0]))
        if best < 0 or mism[-1] < mism[best]:
            best, best_reg = i, reg
    return best, best_reg, mism, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
# DICOM radiographs


def _calibrated_radiographs(args, rads, acq, solvers, template_mu):
    """DICOM radiographs read (``xct.radiograph``) and calibrated to line integrals
    (``xct.calibrate.calibrate_views``) on ``acq``'s ``r x r`` detector, against
    ``template_mu`` or, without one, a first TV reconstruction from an uncalibrated
    conversion (two rounds, as ``--mode=predict`` bootstraps). Returns ``(drr [V, r, r],
    angles, per-view records)``."""
    import jax.numpy as jnp

    from xct import calibrate, radiograph

    angles = np.asarray([g.angle_deg for g in rads], np.float32)
    geom = acq.orbit(angles)
    if template_mu is not None:
        tmpl, rounds = template_mu, 1
    else:
        crude = jnp.asarray(np.stack([radiograph.load_xray(g.path, acq.resolution) for g in rads]))
        support = solvers.support(crude, geom)
        tmpl = jnp.maximum(solvers.run("tv_support", crude, geom, _params(args), support), 0.0)
        rounds = 2
    for k in range(rounds):
        print("calibrating the radiographs against DRRs...", file=sys.stderr, flush=True)
        fits = calibrate.calibrate_views(
            [g.image for g in rads],
            tmpl,
            acq,
            angles,
            pixel_mm=[None if g.pixel_mm is None else float(np.mean(g.pixel_mm)) for g in rads],
            sdd_mm=[g.sdd_mm for g in rads],
            sod_mm=[g.sod_mm for g in rads],
        )
        drr = jnp.asarray(np.stack([f.line_integrals for f in fits]), jnp.float32)
        if k < rounds - 1:
            support = solvers.support(drr, geom)
            tmpl = jnp.maximum(solvers.run("tv_support", drr, geom, _params(args), support), 0.0)
    records = [
        {
            "file": str(g.path),
            "angle_deg": float(g.angle_deg),
            "pixel_mm": None if g.pixel_mm is None else list(g.pixel_mm),
            "image_scale": round(f.image_scale, 4),
            "pixel_at_isocentre_mm": round(f.pixel_iso_mm, 4),
            "calibration_mismatch": round(f.mismatch, 4),
            "notes": list(g.notes),
        }
        for g, f in zip(rads, fits, strict=True)
    ]
    return drr, angles, records


def _read_radiographs(args):
    from xct import radiograph

    pixel = None if args.detector_pixel_mm is None else _pixel_pair(args.detector_pixel_mm)
    return [
        radiograph.read_radiograph(
            p,
            angle_deg=None if args.angles_deg is None else args.angles_deg[i],
            pixel_mm=pixel,
            sdd_mm=args.sdd_mm,
            sod_mm=args.sod_mm,
        )
        for i, p in enumerate(args.xrays)
    ]


def _params(args) -> dict:
    tv = DEFAULT_TV_WEIGHT if args.tv_weight is None else args.tv_weight
    prior = DEFAULT_PRIOR_WEIGHT if args.prior_weight is None else args.prior_weight
    return {"tv_weight": tv, "prior_weight": prior}


def resolve_method(args) -> dict:
    """``--method auto`` -> the benchmark's method (and grid) for the number of X-rays and
    whether templates were given; for it and for a named method with weights, the clinical
    benchmark's leave-one-out weights where none were given. ``args`` is updated; returns
    what the summary records of the choice."""
    views = len(args.xrays)
    dicom = pathlib.Path(args.xrays[0]).suffix.lower() in DICOM_SUFFIXES
    chosen: dict = {}
    if args.method == "auto":
        from xct import atlas_net

        learned = atlas_net.shipped_meta(args.atlas_net) if args.template else None
        method, auto, why = scoring.auto_method(views, bool(args.template), learned)
        if args.grid_factor is None:
            args.grid_factor = 1 if dicom else auto["grid_factor"]
            if dicom and auto["grid_factor"] > 1:
                why += " (DICOM radiographs: on the output grid)"
        if args.grid_factor > 1 and method in TEMPLATE:
            raise ValueError(
                f"--grid_factor {args.grid_factor}: --method auto chose {method} at {views} "
                "view(s), which registers templates on the output grid only; leave "
                "--grid_factor out"
            )
        args.method = method
        chosen = {"method_requested": "auto", "method_why": why}
    if args.grid_factor is None:
        args.grid_factor = 1
    # atlas_net runs its inputs at the weights its model was trained with (its metadata)
    weights = None
    if args.method != "atlas_net":
        weights = scoring.benchmark_weights(args.method, views, args.grid_factor)
    if weights and args.tv_weight is None:
        args.tv_weight = weights["tv_weight"]
        chosen["tv_weight_source"] = f"clinical-mode benchmark at {views} view(s)"
    if weights and args.prior_weight is None and args.method in ("template_tv", "atlas_tv"):
        args.prior_weight = weights["prior_weight"]
    return chosen


def template_files(specs) -> list[str]:
    """``--template`` files, and the CT files of folders (sorted; NIfTI, MHA/MHD, NRRD)."""
    out = []
    for spec in specs:
        path = pathlib.Path(spec)
        if path.is_dir():
            found = sorted(
                str(f)
                for f in path.iterdir()
                if f.is_file() and f.name.lower().endswith(CT_SUFFIXES)
            )
            if not found:
                raise ValueError(
                    f"--template {spec}: a folder without CT files ({', '.join(CT_SUFFIXES)})"
                )
            out += found
        elif path.is_file():
            out.append(str(path))
        else:
            raise ValueError(f"--template {spec}: no such file or folder")
    return out


# ------------------------------------------------------------------------------------------
# Plausibility


def plausibility(hu_lps: np.ndarray, grid) -> tuple[dict, list[str]]:
    """The body in a reconstruction (``io.body_mask``) measured against a patient.

    Returns ``({extents, face fractions}, warnings)``: a warning when the body's axial
    extent is outside ``BODY_AXIAL_MM``, when no body is found, or when it covers more than
    ``CUT_FACE_FRACTION`` of a side face of the cube (left, right, anterior, posterior: the
    body is cut by the cube). ``hu_lps``: ``[z, y, x]`` HU in LPS on ``grid``.
    """
    from xct import io

    mask = io.body_mask(np.asarray(hu_lps, np.float32), grid)
    if not mask.any():
        return {"body_found": False}, [
            "no body in the reconstruction (nothing above -500 HU): check the X-rays' "
            "units (--npy_kind, --mu_water) and geometry (--detector_pixel_mm, --sod_mm, --sdd_mm)"
        ]
    sz, sy, sx = grid.spacing_mm
    ext = [
        float(np.ptp(np.flatnonzero(mask.any(axis=tuple({0, 1, 2} - {k})))) + 1) * s
        for k, s in enumerate((sz, sy, sx))
    ]
    faces = {
        "right": mask[:, :, 0],
        "left": mask[:, :, -1],
        "anterior": mask[:, 0, :],
        "posterior": mask[:, -1, :],
    }
    frac = {k: round(float(v.mean()), 4) for k, v in faces.items()}
    info = {
        "body_found": True,
        "body_extent_mm": {"left_right": ext[2], "anterior_posterior": ext[1], "head_feet": ext[0]},
        "body_on_cube_faces": frac,
    }
    warnings = []
    axial = max(ext[1], ext[2])
    if not BODY_AXIAL_MM[0] <= axial <= BODY_AXIAL_MM[1]:
        size = "smaller" if axial < BODY_AXIAL_MM[0] else "larger"
        warnings.append(
            f"implausible body: {ext[2]:.0f} mm left-right by {ext[1]:.0f} mm front-back, far "
            f"{size} than a patient ({BODY_AXIAL_MM[0]:g}-{BODY_AXIAL_MM[1]:g} mm): check "
            "--detector_pixel_mm, --sod_mm and --sdd_mm"
        )
    cut = [k for k, v in frac.items() if v > CUT_FACE_FRACTION]
    if cut:
        warnings.append(
            f"the body is cut by the cube's {', '.join(cut)} face(s) ("
            + ", ".join(f"{100 * frac[k]:.0f}%" for k in cut)
            + " of it): a larger --fov_mm, or --isocenter_lps, would hold it"
        )
    return info, warnings


# ------------------------------------------------------------------------------------------
# Report and driver


def _report(out: pathlib.Path, hu_lps: np.ndarray, drr, reproj, summary: dict, loss) -> None:
    from matplotlib.figure import Figure

    from xct import report

    figs = []
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    n = hu_lps.shape[0]
    planes = (
        ("axial", hu_lps[n // 2]),
        ("coronal", np.flipud(hu_lps[:, n // 2])),
        ("sagittal", np.flipud(hu_lps[:, :, n // 2])),
    )
    for ax, (name, img) in zip(axes, planes, strict=True):
        im = ax.imshow(img, cmap="gray", vmin=-1000, vmax=1000)
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(im, ax=axes, fraction=0.02, label="HU")
    figs.append(("Reconstruction (central slices)", report.image(fig, "central slices")))
    v = drr.shape[0]
    fig = Figure(figsize=(9, 3 * v), layout="constrained")
    axes = fig.subplots(v, 3, squeeze=False)
    top = float(np.percentile(drr, 99.5)) or 1.0
    for i in range(v):
        for c, (title, img, cmap, lo, hi) in enumerate(
            (
                ("X-ray (line integrals)", drr[i], "gray", 0, top),
                ("DRR of the reconstruction", reproj[i], "gray", 0, top),
                ("difference", reproj[i] - drr[i], "RdBu_r", -0.2 * top, 0.2 * top),
            )
        ):
            ax = axes[i, c]
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(f"{summary['angles_deg'][i]:g}°: {title}", fontsize=9)
            ax.axis("off")
    figs.append(("Each X-ray beside the DRR of the result", report.image(fig, "X-rays, DRRs")))
    if loss is not None and len(loss):
        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.subplots()
        ax.semilogy(np.asarray(loss))
        ax.set_xlabel("Adam step (all stages)")
        ax.set_ylabel("registration objective")
        figs.append(("Template registration", report.image(fig, "registration loss")))
    iso = summary["isocenter_lps_mm"]
    where = report.paragraph(
        f"The cube's centre (the orbit's isocentre) is at LPS ({iso[0]:g}, {iso[1]:g}, "
        f"{iso[2]:g}) mm ({summary['isocenter_source']})."
    )
    warn = [report.paragraph(f"Warning: {w}") for w in summary["warnings"]]
    table = report.table(None, [[k, json.dumps(v)] for k, v in summary.items()])
    report.write_page(
        out / "report.html",
        "xct reconstruction",
        [("", "".join([*warn, where, table])), *figs],
        heading=f"xct reconstruction: {summary['method']}",
        dated=False,  # the summary has the date
    )


class _Inputs(NamedTuple):
    """The X-rays brought to the reconstruction grid, and what the summary says of them."""

    drr: Any  # [views, rows, cols] line integrals on the grid's detector
    geom: Any  # their Geometry
    angles: np.ndarray  # [views] degrees
    sod_mm: float
    sdd_mm: float
    fine_shape: list  # the X-rays' own rows, cols
    fine_pixel_mm: Any  # their own pixel (row, col) at the detector, or None
    fields: dict  # summary fields of the input path
    warnings: list


def _dicom_inputs(args, solvers, mu_water: float) -> _Inputs:
    """DICOM radiographs read and calibrated as ``--mode=predict`` does, on the inscribed
    ``resolution^2`` detector."""
    from xct import geometry

    r = args.resolution
    rads = _read_radiographs(args)
    sod = args.sod_mm or rads[0].sod_mm or DEFAULT_SOD_MM
    sdd = args.sdd_mm or rads[0].sdd_mm or DEFAULT_SDD_MM
    _check_distances(sod, sdd, args.fov_mm)
    acq = geometry.Acquisition(resolution=r, fov_mm=args.fov_mm, sod_mm=sod, sdd_mm=sdd)
    tc = time.perf_counter()
    tmpl = _calibration_template(args, r, mu_water) if args.template else None
    drr, angles, records = _calibrated_radiographs(args, rads, acq, solvers, tmpl)
    fields = {
        "calibration": records,
        "calibrated_against": template_files(args.template)[0]
        if args.template
        else "a first tv_support reconstruction (2 rounds)",
        "calibration_seconds": round(time.perf_counter() - tc, 2),
        "detector": {"rows": r, "cols": r, "pixel_mm": [acq.detector_pixel_mm] * 2},
        "detector_sampling": "calibrated onto the inscribed resolution^2 detector (xct.calibrate)",
        "xray_pixel_source": "DICOM tags"
        if rads[0].pixel_mm or args.detector_pixel_mm
        else "estimated",
    }
    fine = (list(rads[0].shape), rads[0].pixel_mm)
    return _Inputs(drr, acq.orbit(angles), angles, sod, sdd, *fine, fields, [])


def _image_inputs(args, grid) -> _Inputs:
    """``.npy`` / ``.png`` X-rays on their own detector, extended with air where their
    border is air, brought to the grid (``clinical.xrays_for_grid``)."""
    import jax.numpy as jnp

    from xct import clinical, geometry
    from xct.recon import priors

    r = args.resolution
    sod = args.sod_mm or DEFAULT_SOD_MM
    sdd = args.sdd_mm or DEFAULT_SDD_MM
    _check_distances(sod, sdd, args.fov_mm)
    fine, fine_pixel = _fine_xrays(args)
    fine_shape = list(fine.shape[1:])
    angles = np.asarray(args.angles_deg, np.float32)
    shadow = geometry.inscribed_pixel_mm(r, args.fov_mm, sod, sdd) * r
    tol = priors.DEFAULT_AIR_TOL if args.air_tol is None else args.air_tol
    fine, pads, truncated = pad_with_air(fine, fine_pixel, shadow, tol)
    warnings = []
    if truncated:
        warnings.append(
            f"the body reaches the X-rays' edge ({' and '.join(truncated)}) and they do "
            f"not cover the --fov_mm {args.fov_mm:g} cube: truncated views; the parts of "
            "the cube outside them are constrained by the other views alone"
        )
    drr, geom = clinical.xrays_for_grid(
        fine, fine_pixel, angles, grid, sampling=args.detector_sampling, sod_mm=sod, sdd_mm=sdd
    )
    drr = jnp.asarray(drr, jnp.float32)
    pixel = [
        float(jnp.linalg.norm(geom.det_v_xyz_mm[0])),
        float(jnp.linalg.norm(geom.det_u_xyz_mm[0])),
    ]
    fields = {
        "padded_with_air_px": pads,
        "detector": {"rows": int(drr.shape[1]), "cols": int(drr.shape[2]), "pixel_mm": pixel},
        "detector_sampling": args.detector_sampling,
        "xray_pixel_source": "--detector_pixel_mm",
    }
    return _Inputs(drr, geom, angles, sod, sdd, fine_shape, fine_pixel, fields, warnings)


def _geometry_summary(args, x: _Inputs) -> dict:
    """What the run's geometry was, for ``summary.json`` and the report."""
    fine_shape, fine_pixel, sod, sdd = x.fine_shape, x.fine_pixel_mm, x.sod_mm, x.sdd_mm
    iso = [float(c) for c in args.isocenter_lps]
    mag = sdd / sod
    return {
        **x.fields,
        "angles_deg": [float(a) for a in x.angles],
        "resolution": args.resolution,
        "fov_mm": float(args.fov_mm),
        "voxel_mm": float(args.fov_mm) / args.resolution,
        "isocenter_lps_mm": iso,
        "isocenter_source": "--isocenter_lps" if any(iso) else "default: the origin",
        "sod_mm": float(sod),
        "sdd_mm": float(sdd),
        "xray_shape": fine_shape,
        "xray_pixel_mm": None if fine_pixel is None else [float(x) for x in fine_pixel],
        "xray_field_at_isocentre_mm": None
        if fine_pixel is None
        else [round(fine_shape[k] * float(fine_pixel[k]) / mag, 1) for k in (0, 1)],
        "mu_water_per_mm": float(args.mu_water),
    }


def _solve(args, solvers, vols, names, drr, geom, grid, summary: dict) -> tuple:
    """``(mu, registration loss or None)`` of ``--method``; what it chose goes into
    ``summary``."""
    import jax.numpy as jnp

    method = args.method
    support = prior = loss = None
    net = None
    if method == "atlas_net":
        from xct import atlas_net

        net = atlas_net.load(args.atlas_net or atlas_net.DEFAULT_DIR)
        summary["atlas_net"] = {
            "model": str(args.atlas_net or atlas_net.DEFAULT_DIR),
            "trained_on": net[2].get("trained_on", []),
        }
    if (method.endswith(("_support", "_tv")) and method != "tv") or method == "atlas_net":
        support = solvers.support(drr, geom)
        summary["support_fraction"] = float(jnp.mean(support))
    if method in ("atlas", "atlas_tv", "atlas_net"):
        prior = _atlas_prior(vols, names, drr, geom, grid, summary)
    elif method in TEMPLATE:
        from xct.recon import template

        best, reg, mismatch, seconds = register_templates(vols, names, drr, geom, grid)
        template.check_match(names[best], mismatch[best])
        prior, loss = reg.volume, reg.loss
        summary["template"] = names[best]
        summary["template_mismatch"] = dict(zip(names, mismatch, strict=True))
        summary["registration_seconds"] = round(seconds, 2)
        if args.template_hu_offset:
            summary["template_hu_offset"] = args.template_hu_offset
    params = _params(args)
    mu = solvers.run(method, drr, geom, params, support=support, prior=prior, net=net)
    if method in ("tv", "tv_support", "template_tv", "atlas_tv"):
        summary["tv_weight"] = params["tv_weight"]
    if method in ("template_tv", "atlas_tv"):
        summary["prior_weight"] = params["prior_weight"]
    if method == "atlas_net":  # its atlas_tv and tv_support run at the benchmark's weights
        summary["atlas_net"]["atlas_tv"] = scoring.benchmark_weights(
            "atlas_net", drr.shape[0], net_meta=net[2]
        )
    return jnp.maximum(mu, 0.0), loss


def _atlas_prior(vols, names, drr, geom, grid, summary: dict):
    """The fused atlas of the templates (``recon.atlas``: all screened, ``atlas.K`` of
    them (all) registered with a progress bar, fused by local fit); what it chose goes
    into ``summary``."""
    from xct.recon import atlas, template

    k = len(vols) if atlas.K is None else min(atlas.K, len(vols))

    print(
        f"atlas: screening {len(vols)} template(s), registering {k} of them "
        f"on a {grid.shape[0]}^3 grid (the first run includes compiling)",
        file=sys.stderr,
        flush=True,
    )
    at = atlas.atlas(vols, drr, geom, grid, k=k, progress=True)
    used = [names[i] for i in at.indices]
    template.check_match(used[at.best], float(at.mismatch[at.best]))
    summary["atlas"] = {
        "templates": used,
        "mismatch": [float(m) for m in at.mismatch],
        "screening_mismatch": dict(
            zip(names, (float(m) for m in at.screening.mismatch), strict=True)
        ),
    }
    summary["registration_seconds"] = round(sum(at.seconds.values()), 2)
    return at.volume


def reconstruct(args: argparse.Namespace) -> dict:
    """X-rays in (``args`` as ``parse_args`` returns them), ``reconstruction.nii.gz``,
    ``report.html`` and ``summary.json`` out in ``args.out``; returns the summary."""
    import jax
    import jax.numpy as jnp

    from xct import geometry, io, projector, scoring

    t0 = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = resolve_method(args)
    r, method, mu_water = args.resolution, args.method, float(args.mu_water)
    grid = geometry.VolumeGrid.centered((r,) * 3, args.fov_mm / r)
    n = args.iters
    solvers = scoring.Solvers(
        grid,
        sirt_iters=n,
        cgls_iters=n,
        tv_iters=n,
        air_tol=args.air_tol,
        mu_water_per_mm=mu_water,
        grid_factor=args.grid_factor,
    )
    dicom = pathlib.Path(args.xrays[0]).suffix.lower() in DICOM_SUFFIXES
    vols, names, skipped = (
        _load_templates(args, r, mu_water) if method in TEMPLATE else ([], [], [])
    )
    x = _dicom_inputs(args, solvers, mu_water) if dicom else _image_inputs(args, solvers.recon_grid)
    drr, geom = x.drr, x.geom
    summary: dict = {"method": method, **chosen, "xrays": [str(p) for p in args.xrays]}
    summary["grid_factor"] = args.grid_factor  # reconstructed on (resolution x grid_factor)^3
    if skipped:
        summary["templates_skipped"] = skipped
    summary.update(_geometry_summary(args, x))
    mu, loss = _solve(args, solvers, vols, names, drr, geom, grid, summary)
    reproj = projector.forward_project(mu, grid, geom)
    summary["drr_mismatch"] = float(
        jnp.sqrt(jnp.sum((reproj - drr) ** 2) / jnp.maximum(jnp.sum(drr * drr), 1e-24))
    )
    hu_lps = io.from_projector_frame(np.asarray(physics.mu_to_hu(mu, mu_water)))
    s, iso = float(args.fov_mm) / r, summary["isocenter_lps_mm"]
    out_grid = geometry.VolumeGrid((r,) * 3, (s,) * 3, tuple(c - (r - 1) * s / 2.0 for c in iso))
    summary["plausibility"], late = plausibility(hu_lps, out_grid)
    summary["warnings"] = x.warnings + late
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    path = io.write_ct(out / "reconstruction.nii.gz", hu_lps, out_grid)
    summary["output"] = str(path)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    _report(out, hu_lps, np.asarray(drr), np.asarray(reproj), summary, loss)
    with io.atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    jax.block_until_ready(mu)
    return summary


def main(argv=None) -> int:
    from xct import console

    console.quiet()
    args = parse_args(argv)
    console.enable_compilation_cache()  # as xct.main: a second run skips most compiling
    try:
        s = reconstruct(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{s['method']}: relative DRR mismatch {s['drr_mismatch']:.4f}; wrote {s['output']} "
        f"and {pathlib.Path(args.out) / 'report.html'} ({s['seconds']:.0f} s)"
        + (f"; {len(s['warnings'])} warning(s)" if s["warnings"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
