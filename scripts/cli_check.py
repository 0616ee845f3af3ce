"""The table and the command agree: real chests X-rayed by ANOTHER projector (RTK's Joseph),
reconstructed by the user's own command ``python -m xct.reconstruct`` at its defaults, scored
as the quality table scores (issue 26, "Done means").

For each chest (leave one out: the other chests are the templates):

1. The whole scan at its own resolution (couch and all, ``xct.clinical.load_scan``; HU -> mu
   at ``physics.MU_WATER_PER_MM``) is X-rayed by RTK's Joseph forward projector on a cone-beam
   orbit (sod 1000 / sdd 1500 mm, 400 x 400 detector of 2 mm pixels), at the first V angles of
   ``geometry.nested_view_angles``, isocentre at the centre of the body cube that
   ``xct.clinical`` uses for the scan; Poisson noise at ``--photons`` per pixel (seeded); each
   view saved as a ``.npy`` of line integrals. For the first ``--orientation_checks`` chests
   the noise-free RTK views are compared with ``clinical.clinical_xrays`` (xct's own renderer)
   at the same geometry (relative L2 difference).
2. ``python -m xct.reconstruct --xrays ... --angles_deg ... --detector_pixel_mm 2 --fov_mm
   SIDE --isocenter_lps X Y Z --template <other chests> --out DIR`` run as a subprocess
   (``--method auto``, 64^3), and ``--method tv`` / ``--method tv_support`` without templates.
3. ``reconstruction.nii.gz`` (patient LPS, centred on ``--isocenter_lps``) is scored against
   ``clinical.truth_cube`` (the scan averaged over each output voxel, brought to LPS array
   order) with ``evaluator.volume_scores``: psnr (whole cube) and psnr_body. Frames are
   checked physically: the NIfTI's voxel centres must coincide with the truth cube's, and the
   reconstruction's body (HU > -500) must cover > 90% of the truth's body mask (reported).

Outputs in ``--out``: ``cli_check.md``, ``cli_check.csv``, ``cli_check.json`` and the runs.

    nice -n 5 .venv/bin/python -m scripts.cli_check --views 2 8 --out /tmp/cli_check
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

DEFAULT_CHESTS = "/work/shared/data/ct/chest_*_2mm.nii.gz"
METHODS = ("auto", "tv", "tv_support", "atlas_tv", "atlas_net")
DEFAULT_METHODS = ("auto", "tv", "tv_support")
WITH_TEMPLATES = ("auto", "atlas_tv", "atlas_net")
BODY_OVERLAP_MIN = 0.9  # fraction of the truth's body that the reconstruction's must cover


def _log(msg: str) -> None:
    print(f"[cli_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def expand(globs: list[str]) -> list[str]:
    """Files matched by ``globs`` (sorted, label maps ``*_organs*`` left out)."""
    out = []
    for g in globs:
        out += sorted(p for p in glob.glob(g) if "_organs" not in pathlib.Path(p).name)
    return list(dict.fromkeys(out))


def isocenter_lps(path: str) -> np.ndarray:
    """Patient-LPS (x, y, z) mm of the centre of the body cube ``clinical.load_scan`` puts at
    the isocentre (the same computation as ``clinical.scan_from_array``)."""
    from xct import io

    hu, grid = io.read_ct(path)
    hu, grid = io.canonical_orientation(np.asarray(hu, np.float32), grid)
    hu = np.clip(hu, *io.HU_CLIP).astype(np.float32)
    mask = io.body_mask(hu, grid)
    spacing = np.asarray(grid.spacing_mm)  # [z, y, x]
    size = np.maximum(1, np.round(io.body_fov_mm(mask, grid) / spacing)).astype(np.int64)
    spans = [np.flatnonzero(mask.any(axis=tuple({0, 1, 2} - {k}))) for k in range(3)]
    centre = np.asarray([(i[0] + i[-1]) / 2.0 for i in spans])
    centre_idx = np.round(centre - (size - 1) / 2.0) + (size - 1) / 2.0  # [z, y, x]
    if not np.allclose(grid.direction_matrix(), np.eye(3)):
        raise ValueError(f"{path}: canonical orientation without identity direction")
    return np.asarray(grid.origin_xyz_mm) + centre_idx[::-1] * spacing[::-1]


def rtk_xrays(scan, angles_deg, *, sod_mm, sdd_mm, det_shape, pixel_mm) -> np.ndarray:
    """Noise-free RTK Joseph line integrals ``[V, rows, cols]`` of the whole scan (mu at
    ``physics.MU_WATER_PER_MM``), placed on its own grid (world origin = isocentre)."""
    import itk

    from xct import peers, physics

    mu = np.asarray(physics.hu_to_mu(scan.hu), np.float32)
    img = itk.image_from_array(np.ascontiguousarray(mu))
    img.SetSpacing([float(s) for s in scan.grid.spacing_mm[::-1]])
    img.SetOrigin([float(o) for o in scan.grid.origin_xyz_mm])
    _, rtk = peers._rtk()
    image_type = itk.Image[itk.F, 3]
    stack = peers.rtk_projection_stack(len(angles_deg), det_shape, pixel_mm)
    f = rtk.JosephForwardProjectionImageFilter[image_type, image_type].New()
    f.SetInput(0, stack.GetOutput())
    f.SetInput(1, img)
    f.SetGeometry(peers.rtk_geometry(angles_deg, sod_mm, sdd_mm))
    f.Update()
    return np.asarray(itk.array_from_image(f.GetOutput()), np.float32).copy()


def orientation_agreement(scan, angles_deg, clean, *, sod_mm, sdd_mm, det_shape, pixel_mm):
    """Relative L2 difference (per view and all) of RTK's views and xct's own
    (``clinical.clinical_xrays``, noise-free) at the same geometry; also with xct's views
    mirrored left-right, which must be clearly worse if the convention is checked at all."""
    from xct import clinical

    ours, _ = clinical.clinical_xrays(
        scan, angles_deg, None, pixel_mm=pixel_mm, det_shape=tuple(det_shape),
        sod_mm=sod_mm, sdd_mm=sdd_mm, photons=None,
    )  # fmt: skip
    ours = np.asarray(ours, np.float64)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    return {
        "rel_l2": rel(ours, clean),
        "rel_l2_per_view": [rel(ours[i], clean[i]) for i in range(len(ours))],
        "rel_l2_mirrored": rel(ours[:, :, ::-1], clean),
    }


def run_cli(
    xrays, angles, pixel_mm, side_mm, iso, out_dir, method, templates, extra
) -> tuple[dict, float]:
    """``python -m xct.reconstruct`` as a user runs it; ``(summary.json, seconds)``."""
    cmd = [sys.executable, "-m", "xct.reconstruct", "--xrays", *map(str, xrays)]
    cmd += ["--angles_deg", *(f"{a:g}" for a in angles), "--detector_pixel_mm", f"{pixel_mm:g}"]
    cmd += ["--fov_mm", f"{side_mm:g}", "--isocenter_lps", *(f"{c:.3f}" for c in iso)]
    if method != "auto":
        cmd += ["--method", method]
    if templates:
        cmd += ["--template", *templates]
    cmd += [*extra, "--out", str(out_dir)]
    (pathlib.Path(out_dir)).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out_dir) / "command.txt").write_text(" ".join(cmd) + "\n")
    for _attempt in range(2):  # once more after a failure: a module edited mid-run by a peer
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if not proc.returncode:
            break
        _log(f"{out_dir}: exit {proc.returncode} ({proc.stderr.strip().splitlines()[-1:]})")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\nfailed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((pathlib.Path(out_dir) / "summary.json").read_text())
    return summary, seconds


def score(scan, recon_path, side_mm: float, iso) -> dict:
    """psnr / psnr_body of a CLI reconstruction (LPS NIfTI) against the truth averaged over
    each output voxel, after checking that both sit on the same physical voxels."""
    from xct import clinical, evaluator, io

    pred, grid = io.read_ct(recon_path, check_hu=False)
    pred, grid = io.canonical_orientation(pred, grid)
    r = pred.shape[0]
    truth, body = clinical.truth_cube(scan, r, side_mm)
    truth, body = io.from_projector_frame(truth), io.from_projector_frame(body)
    # Physical check 1: the NIfTI's voxel centres are the truth cube's (centred on iso).
    s = side_mm / r
    want_origin = np.asarray(iso) - (r - 1) * s / 2.0
    origin_err = float(np.abs(np.asarray(grid.origin_xyz_mm) - want_origin).max())
    if origin_err > 0.05 * s or not np.allclose(grid.spacing_mm, s, rtol=1e-3):
        raise ValueError(f"{recon_path}: origin off by {origin_err:.2f} mm or spacing wrong")
    # Physical check 2: the reconstruction's tissue lies where the truth's does
    # (tissue, HU > -500, inside the body mask: the mask is filled, lungs included)
    tissue = body & (truth > -500.0)
    overlap = float((tissue & (pred > -500.0)).sum() / max(tissue.sum(), 1))

    # Physical check 3: the truth as it is correlates better with the reconstruction than
    # the truth mirrored along any axis or shifted by one voxel (a transposed, flipped or
    # offset frame fails this).
    def corr_with(t):
        return float(np.corrcoef(pred.ravel(), t.ravel())[0, 1])

    corr = [corr_with(truth)]
    corr += [corr_with(np.flip(truth, k)) for k in range(3)]
    corr += [corr_with(np.roll(truth, d, k)) for k in range(3) for d in (-1, 1)]
    sc = evaluator.volume_scores(pred[None], truth[None], body=body[None])
    return {
        "psnr": float(np.asarray(sc["psnr"])[0]),
        "psnr_body": float(np.asarray(sc["psnr_body"])[0]),
        "body_overlap": overlap,
        "corr": corr[0],
        "frame_ok": bool(corr[0] > max(corr[1:])),
    }


def check_chest(path, pool, args, index: int) -> list[dict]:
    """All rows (views x methods) of one chest."""
    import jax

    from xct import clinical, geometry, physics

    name = pathlib.Path(path).name.replace(".nii.gz", "")
    templates = [p for p in pool if pathlib.Path(p).resolve() != pathlib.Path(path).resolve()]
    scan = clinical.load_scan(path)
    iso = isocenter_lps(path)
    side = scan.side_mm
    _log(f"{name}: body cube {side:g} mm, isocentre LPS {np.round(iso, 1).tolist()}")
    extra = []
    if args.resolution:
        extra += ["--resolution", str(args.resolution)]
    if args.iters:
        extra += ["--iters", str(args.iters)]
    rows = []
    geo = dict(sod_mm=args.sod_mm, sdd_mm=args.sdd_mm, det_shape=args.det, pixel_mm=args.pixel_mm)
    for v in args.views:
        angles = [float(a) for a in geometry.nested_view_angles(max(args.views))[:v]]
        t0 = time.perf_counter()
        clean = rtk_xrays(scan, angles, **geo)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(args.seed), index), v)
        noisy = np.asarray(physics.add_poisson_noise(key, clean, args.photons), np.float32)
        case = pathlib.Path(args.out) / name / f"{v}v"
        case.mkdir(parents=True, exist_ok=True)
        files = []
        for i in range(v):
            files.append(case / f"v{i}.npy")
            np.save(files[-1], noisy[i])
        _log(f"{name} {v}v: RTK X-rays {noisy.shape} in {time.perf_counter() - t0:.1f} s")
        orient = None
        if index < args.orientation_checks:
            orient = orientation_agreement(scan, angles, clean, **geo)
            _log(f"{name} {v}v: RTK vs xct render, relative L2 {orient['rel_l2']:.4f} "
                 f"(mirrored: {orient['rel_l2_mirrored']:.3f})")  # fmt: skip
        for method in args.methods:
            tmpl = templates if method in WITH_TEMPLATES else []
            more = list(extra)
            if args.atlas_net_folds and method in ("auto", "atlas_net"):
                # the fold's model: trained without this chest (leave one out)
                more += ["--atlas_net", str(pathlib.Path(args.atlas_net_folds) / name)]
            try:
                summary, seconds = run_cli(
                    files, angles, args.pixel_mm, side, iso, case / method, method, tmpl, more
                )
            except RuntimeError as e:
                _log(f"FAILED {name} {v}v {method}: {e}")
                continue
            sc = score(scan, case / method / "reconstruction.nii.gz", side, iso)
            row = {
                "chest": name, "views": v, "method": method, "ran": summary["method"],
                **sc, "seconds": round(seconds, 1), "cli_seconds": summary.get("seconds"),
                "tv_weight": summary.get("tv_weight"), "prior_weight": summary.get("prior_weight"),
                "templates": len(tmpl), "rtk_vs_xct_rel_l2": None if orient is None
                else orient["rel_l2"],
            }  # fmt: skip
            if sc["body_overlap"] < BODY_OVERLAP_MIN or not sc["frame_ok"]:
                _log(f"WARNING {name} {v}v {method}: body overlap {sc['body_overlap']:.2f}, "
                     f"frame check {'passed' if sc['frame_ok'] else 'FAILED'}")  # fmt: skip
            _log(f"{name} {v}v {method} ({row['ran']}): psnr {sc['psnr']:.2f} psnr_body "
                 f"{sc['psnr_body']:.2f} body overlap {sc['body_overlap']:.3f} frame "
                 f"{'ok' if sc['frame_ok'] else 'WRONG'} "
                 f"({seconds:.0f} s)")  # fmt: skip
            rows.append(row)
    return rows


def tables(rows: list[dict], methods) -> str:
    """Markdown: per chest and the mean, views x method, psnr / psnr_body, seconds."""
    lines = []
    chests = list(dict.fromkeys(r["chest"] for r in rows))
    views = sorted({r["views"] for r in rows})
    head = "| chest | views | " + " | ".join(
        f"{m} psnr / body (s)" for m in methods
    ) + " | auto ran |"  # fmt: skip
    lines += [head, "|" + "---|" * (3 + len(methods))]
    for c in [*chests, "mean"]:
        for v in views:
            sel = [r for r in rows if r["views"] == v and (c == "mean" or r["chest"] == c)]
            if c == "mean":  # only chests where every method ran, so columns compare
                done = [x for x in chests if all(
                    any(r["chest"] == x and r["method"] == m for r in sel) for m in methods
                )]  # fmt: skip
                sel = [r for r in sel if r["chest"] in done]
            cells = []
            for m in methods:
                ms = [r for r in sel if r["method"] == m]
                if not ms:
                    cells.append("-")
                    continue
                p = np.mean([r["psnr"] for r in ms])
                b = np.mean([r["psnr_body"] for r in ms])
                s = np.mean([r["seconds"] for r in ms])
                cells.append(f"{p:.2f} / {b:.2f} ({s:.0f})")
            ran = sorted({r["ran"] for r in sel if r["method"] == "auto"})
            n = len({r["chest"] for r in sel})
            label = f"**mean of {n}**" if c == "mean" else c
            lines.append(f"| {label} | {v} | " + " | ".join(cells) + f" | {', '.join(ran)} |")
    return "\n".join(lines)


def write(rows, out: pathlib.Path, methods, meta: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = tables(rows, methods)
    (out / "cli_check.md").write_text(
        f"# cli_check\n\n`{meta['command']}`\n\n{md}\n\n"
        f"RTK vs xct render (relative L2): {meta.get('orientation')}\n"
    )
    if rows:
        with open(out / "cli_check.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    (out / "cli_check.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return md


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--chests", nargs="+", default=[DEFAULT_CHESTS], help="globs of CT files")
    p.add_argument(
        "--templates", nargs="+", default=None,
        help="globs of the template pool (default: --chests); a chest is never its own template",
    )  # fmt: skip
    p.add_argument("--views", type=int, nargs="+", default=[2, 8])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument(
        "--atlas_net_folds",
        default=None,
        help="folder of atlas_net fold models, one per chest name (scripts/train_atlas_net.py "
        "writes OUT/folds): --atlas_net for auto / atlas_net runs, a model that never saw it",
    )
    p.add_argument("--photons", type=float, default=1e5, help="unattenuated photons per pixel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--det", type=int, nargs=2, default=[400, 400], metavar=("ROWS", "COLS"))
    p.add_argument("--pixel_mm", type=float, default=2.0, help="detector pixel at the detector")
    p.add_argument("--sod_mm", type=float, default=1000.0)
    p.add_argument("--sdd_mm", type=float, default=1500.0)
    p.add_argument("--resolution", type=int, default=None, help="passed on (default: CLI's)")
    p.add_argument("--iters", type=int, default=None, help="passed on (default: CLI's)")
    p.add_argument("--orientation_checks", type=int, default=1, help="chests compared with xct")
    p.add_argument("--limit", type=int, default=None, help="first N chests only")
    p.add_argument("--out", default="/tmp/cli_check")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    chests = expand(args.chests)
    pool = expand(args.templates) if args.templates else chests
    if args.limit:
        chests = chests[: args.limit]
    if not chests:
        print(f"error: no chest matches {args.chests}", file=sys.stderr)
        return 1
    out = pathlib.Path(args.out)
    meta = {"command": " ".join(["python -m scripts.cli_check", *(argv or sys.argv[1:])]),
            "args": vars(args), "orientation": {}}  # fmt: skip
    rows = []
    t0 = time.perf_counter()
    for i, path in enumerate(chests):
        new = check_chest(path, pool, args, i)
        rows += new
        for r in new:
            if r["rtk_vs_xct_rel_l2"] is not None:
                meta["orientation"][f"{r['chest']} {r['views']}v"] = r["rtk_vs_xct_rel_l2"]
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        write(rows, out, args.methods, meta)  # after each chest: a partial table survives
    print(write(rows, out, args.methods, meta))
    print(f"RTK vs xct render (relative L2): {meta['orientation']}; {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
