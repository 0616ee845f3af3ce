"""Atlas probe (issue 26 item 3): seven real chests as an atlas, leave one out.

    nice -n 10 .venv/bin/python scripts/atlas_probe.py --views 2 8 \\
        --out /tmp/atlas_probe > /tmp/atlas_probe.log 2>&1

For every chest ``../shared/data/ct/chest_*_2mm.nii.gz`` (the label map ``*_organs`` is not
a CT) and number of views, the held-out chest is X-rayed as a clinic does
(``--realism clinical``, the default: ``xct.clinical.clinical_xrays``, the whole 2 mm scan
with its couch, cone beam 1000/1500 mm, a 2 mm detector covering the body, 1e5 photons per
pixel, seeded; the detector area-averaged to the voxel's footprint, ``xrays_for_grid``) and
scored against ``clinical.truth_cube`` (the scan averaged over each 64^3 voxel, couch kept),
or with ``--realism ideal`` as the idealised quality table does (DRRs of the 64^3 body cube
itself, no couch, no noise; labelled "idealised"). The other six chests are the templates
(``io.load_cube(..., fov_mm="body")``, never the held-out chest). Methods:

* ``tv``: ``recon.tv`` with the X-ray priors (visual-hull support, bounds);
* ``template`` / ``template_tv``: the best single template by DRR mismatch among those
  registered, and TV started from and pulled towards it;
* ``atlas`` / ``atlas_tv``: ``recon.atlas.atlas`` (screen all, register the best ``--k``,
  fuse with local weights at ``--temperature``), and ``atlas.atlas_tv``;
* ``atlas[...]`` rows: other fusions of the same registered templates (global weights,
  other temperatures, the plain mean), scored without TV (they cost no registration).

Weights (TV, prior) are chosen leave one out: for each chest, those with the best mean
inside-body PSNR on the other chests. Scores: ``evaluator.volume_scores`` (primary
definition) whole and inside the body. Seconds per method include compilation (each chest
has its own cube side, so its own programs) and registration (``template_tv``: the
screening and registrations that found its template; ``atlas_tv``: the atlas's). Rows are
appended to ``OUT/rows.jsonl`` as they come; the summary is printed and written to
``OUT/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

CT_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct_dir", default=str(CT_DIR))
    p.add_argument("--chests", nargs="+", default=None, help="names (default: all chest_*_2mm)")
    p.add_argument("--views", type=int, nargs="+", default=[2, 8])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--realism", choices=("clinical", "ideal"), default="clinical")
    p.add_argument("--photons", type=float, default=1e5)
    p.add_argument("--pixel_mm", type=float, default=2.0, help="clinical detector pitch, mm")
    p.add_argument("--iters", type=int, default=200, help="TV iterations")
    p.add_argument("--tv_weight", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    p.add_argument("--prior_weight", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--k", type=int, default=3, help="templates registered and fused")
    p.add_argument("--temperature", type=float, default=None, help="default: atlas's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/atlas_probe")
    p.add_argument("--summary_only", action="store_true", help="summarise OUT/rows.jsonl")
    p.add_argument(
        "--timing",
        action="store_true",
        help="only time registering all seven chests as templates to the first --chests "
        "chest's views (cold then warm; timing only, the patient's own CT is among them)",
    )
    return p.parse_args(argv)


def chest_paths(args) -> list[pathlib.Path]:
    root = pathlib.Path(args.ct_dir)
    paths = sorted(p for p in root.glob("chest_*_2mm.nii.gz") if "organs" not in p.name)
    if len(paths) < 2:
        raise ValueError(f"{root}: need at least two chests (one held out), found {paths}")
    return paths


def held_out(args, paths) -> list[pathlib.Path]:
    """The chests to hold out in turn (``--chests``, default all)."""
    if not args.chests:
        return paths
    return [p for p in paths if p.name.removesuffix(".nii.gz") in args.chests]


class Case:
    """One held-out chest at one number of views: views, grid, truth, templates."""

    def __init__(self, args, path, views: int, templates: dict, key):
        import jax.numpy as jnp

        from xct import clinical, geometry, io, physics, projector, recon

        r = args.resolution
        angles = geometry.nested_view_angles(max(args.views))[:views]
        if args.realism == "clinical":
            scan = clinical.load_scan(path)
            self.grid = clinical.cube_grid(scan, r)
            self.truth, self.body = clinical.truth_cube(scan, r)
            fine, _ = clinical.clinical_xrays(
                scan, angles, key, pixel_mm=args.pixel_mm, photons=args.photons
            )
            self.drr, self.geom = clinical.xrays_for_grid(
                np.asarray(fine), args.pixel_mm, angles, self.grid
            )
            side = scan.side_mm
        else:
            cube = io.load_cube(path, resolution=r, fov_mm="body", stored=True, body=True)
            acq = geometry.Acquisition(resolution=r, fov_mm=cube.fov_mm)
            self.grid, self.geom = acq.grid(), acq.orbit(angles)
            self.truth, self.body = cube.hu, cube.body
            mu = jnp.maximum(physics.hu_to_mu(jnp.asarray(cube.hu)), 0.0)
            self.drr = np.asarray(projector.forward_project(mu, self.grid, self.geom))
            side = cube.fov_mm
        self.drr = jnp.asarray(self.drr, jnp.float32)
        self.support = recon.visual_hull(self.drr, self.geom, self.grid)
        self.names, self.templates = [], []
        for name, (fov_mm, mu) in templates.items():
            if name == path.name:
                continue  # leave one out: a chest is never its own template
            from xct.recon import template

            try:
                template.check_template_size(name, fov_mm, side)
            except ValueError as e:
                print(f"  refused: {e}", flush=True)
                continue
            self.names.append(name)
            self.templates.append(mu)


def load_templates(args, paths) -> dict:
    """``{file name: (body side mm, mu [r]^3)}`` of every chest as a template cube."""
    import jax.numpy as jnp

    from xct import io, physics

    out = {}
    for p in paths:
        cube = io.load_cube(p, resolution=args.resolution, fov_mm="body", stored=True)
        out[p.name] = (cube.fov_mm, np.asarray(jnp.maximum(physics.hu_to_mu(cube.hu), 0.0)))
    return out


class Runner:
    """Jitted TV per grid and detector (weights traced) and the scores."""

    def __init__(self, args):
        self.args, self._tv = args, {}

    def tv(self, case, tv_weight, prior=None, prior_weight=0.0):
        import jax
        import jax.numpy as jnp

        from xct import physics
        from xct.recon import atlas, priors

        key = (case.grid, tuple(case.drr.shape))
        if key not in self._tv:
            upper = float(physics.hu_to_mu(physics.HU_MAX))

            def run(drr, geom, w, x_prior, pw, support, grid=case.grid):
                cons = priors.Constraints(support, 0.0, upper)
                return atlas.atlas_tv(
                    drr,
                    geom,
                    grid,
                    x_prior,
                    self.args.iters,
                    tv_weight=w,
                    prior_weight=pw,
                    constraints=cons,
                )[0]

            self._tv[key] = jax.jit(run)
        x0 = jnp.zeros(case.grid.shape, jnp.float32) if prior is None else prior
        w, pw = jnp.float32(tv_weight), jnp.float32(prior_weight if prior is not None else 0.0)
        # Plain TV: started from zero with no pull (prior weight 0), as recon.tv does.
        out = self._tv[key](case.drr, case.geom, w, x0, pw, case.support)
        return jax.block_until_ready(out)

    @staticmethod
    def score(mu, case) -> dict:
        from xct import evaluator, physics

        hu = np.asarray(physics.mu_to_hu(np.maximum(np.asarray(mu), 0.0)))
        s = evaluator.volume_scores(hu[None], case.truth[None], body=case.body[None])
        return {"psnr": float(s["psnr"][0]), "psnr_body": float(s["psnr_body"][0])}


def run_case(args, runner, case, chest: str, views: int, out_file) -> None:
    """Every method on one case; rows appended to ``out_file``."""
    import jax.numpy as jnp

    from xct.recon import atlas

    temp = atlas.TEMPERATURE if args.temperature is None else args.temperature

    def emit(method, mu, seconds, **params):
        row = {"chest": chest, "views": views, "method": method, **params}
        row.update(runner.score(mu, case), seconds=round(seconds, 2))
        print(
            f"    {method:28s} {json.dumps(params):40s} psnr={row['psnr']:.2f} "
            f"body={row['psnr_body']:.2f} ({seconds:.1f} s)",
            flush=True,
        )
        out_file.write(json.dumps(row) + "\n")
        out_file.flush()

    for w in args.tv_weight:
        t = time.perf_counter()
        emit("tv", runner.tv(case, w), time.perf_counter() - t, tv_weight=w)
    c0, t0 = time.process_time(), time.perf_counter()
    at = atlas.atlas(
        case.templates,
        case.drr,
        case.geom,
        case.grid,
        k=args.k,
        temperature=temp,
        progress=True,
    )
    reg_s, reg_cpu = time.perf_counter() - t0, time.process_time() - c0
    info = {
        "chest": chest,
        "views": views,
        "method": "_registration",
        "wall_s": reg_s,
        "cpu_s": reg_cpu,
        "parts_s": at.seconds,
        "templates": case.names,
        "screen_mismatch": at.screening.mismatch.tolist(),
        "registered": [case.names[i] for i in at.indices],
        "mismatch": at.mismatch.tolist(),
    }
    out_file.write(json.dumps(info) + "\n")
    print(f"    atlas: {json.dumps(info)}", flush=True)
    best = at.volumes[at.best]
    emit("template", best, reg_s, template=case.names[at.indices[at.best]])
    emit("atlas", at.volume, reg_s, temperature=temp)
    for local in (True, False):
        for tt in (0.01, 0.03, 0.1, 0.3, np.inf):
            f, _ = atlas.fuse(
                at.volumes,
                case.drr,
                case.geom,
                case.grid,
                temperature=tt,
                local=local,
                mismatch=at.mismatch,
            )
            emit(f"atlas[{'local' if local else 'global'} T={tt:g}]", f, 0.0)
    for name, prior in (("template_tv", best), ("atlas_tv", at.volume)):
        for w in args.tv_weight:
            for pw in args.prior_weight:
                t = time.perf_counter()
                mu = runner.tv(case, w, jnp.asarray(prior), pw)
                emit(name, mu, reg_s + time.perf_counter() - t, tv_weight=w, prior_weight=pw)


def timing(args, paths, templates) -> None:
    """Wall and CPU seconds of ``atlas`` (screen all, register ``--k``) and of registering
    every template fully (``template.best_template``), cold (compiling) then warm."""
    import jax

    from xct.recon import atlas, template

    p = held_out(args, paths)[0]
    case = Case(args, p, max(args.views), {}, jax.random.key(args.seed))
    mus = [mu for _, mu in templates.values()]
    print(f"timing: {len(mus)} templates, {p.name} {max(args.views)} views", flush=True)
    for run in ("cold", "warm"):
        c, t = time.process_time(), time.perf_counter()
        at = atlas.atlas(mus, case.drr, case.geom, case.grid, k=args.k, progress=True)
        print(
            f"  atlas k={args.k} {run}: wall {time.perf_counter() - t:.1f} s, CPU "
            f"{time.process_time() - c:.1f} s, parts "
            + ", ".join(f"{k} {v:.1f} s" for k, v in at.seconds.items()),
            flush=True,
        )
    for run in ("cold", "warm"):
        c, t = time.process_time(), time.perf_counter()
        _, reg, _ = template.best_template(mus, case.drr, case.geom, case.grid)
        jax.block_until_ready(reg.volume)
        print(
            f"  all {len(mus)} registered fully {run}: wall {time.perf_counter() - t:.1f} s, "
            f"CPU {time.process_time() - c:.1f} s",
            flush=True,
        )


def summarise(rows: list[dict], label: str) -> str:
    """Leave-one-out weight choice per method and views; mean and per-chest table."""
    rows = [r for r in rows if not r["method"].startswith("_")]
    keys = ("tv_weight", "prior_weight")
    chosen: dict = {}
    for r in rows:
        chosen.setdefault((r["method"], r["views"]), []).append(r)
    table: dict = {}  # (method, views) -> {chest: row}
    for (method, views), rs in chosen.items():
        chests = sorted({r["chest"] for r in rs})
        for c in chests:
            others = [r for r in rs if r["chest"] != c]
            cand = {tuple(r.get(k) for k in keys) for r in rs}
            if len(cand) > 1 and others:
                pick = max(
                    cand,
                    key=lambda p: np.mean(
                        [r["psnr_body"] for r in others if tuple(r.get(k) for k in keys) == p]
                    ),
                )
            else:
                pick = next(iter(cand))
            mine = [r for r in rs if r["chest"] == c and tuple(r.get(k) for k in keys) == pick]
            if mine:
                table.setdefault((method, views), {})[c] = mine[0]
    lines = [f"## {label}: PSNR (dB) inside the body / whole cube, primary definition", ""]
    views_all = sorted({v for _, v in table})
    methods = sorted({m for m, _ in table}, key=_method_order)
    lines.append(
        "| method | " + " | ".join(f"{v} views: body / whole / s" for v in views_all) + " |"
    )
    lines.append("|---" * (1 + len(views_all)) + "|")
    for m in methods:
        cells = []
        for v in views_all:
            d = table.get((m, v), {})
            if not d:
                cells.append("")
                continue
            b = np.mean([r["psnr_body"] for r in d.values()])
            w = np.mean([r["psnr"] for r in d.values()])
            s = np.mean([r["seconds"] for r in d.values()])
            cells.append(f"{b:.2f} / {w:.2f} / {s:.0f} ({len(d)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Differences inside the body (same chests, same views), mean [min, max]:", ""]
    for a, b in (
        ("atlas_tv", "tv"),
        ("atlas_tv", "template_tv"),
        ("template_tv", "tv"),
        ("atlas", "template"),
    ):
        for v in views_all:
            da, db = table.get((a, v), {}), table.get((b, v), {})
            common = sorted(set(da) & set(db))
            if common:
                d = [da[c]["psnr_body"] - db[c]["psnr_body"] for c in common]
                lines.append(
                    f"- {a} - {b}, {v} views: {np.mean(d):+.2f} dB [{min(d):+.2f}, "
                    f"{max(d):+.2f}] over {len(common)} chests"
                )
    lines += ["", "Per chest, inside the body (weights chosen on the other chests):", ""]
    chests = sorted({c for d in table.values() for c in d})
    main = [m for m in ("tv", "template", "template_tv", "atlas", "atlas_tv") if m in methods]
    for v in views_all:
        lines.append(f"| {v} views | " + " | ".join(main) + " |")
        lines.append("|---" * (1 + len(main)) + "|")
        for c in chests:
            cells = [
                f"{table[(m, v)][c]['psnr_body']:.2f}" if c in table.get((m, v), {}) else ""
                for m in main
            ]
            lines.append(f"| {c.removesuffix('.nii.gz')} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _method_order(m: str) -> tuple:
    order = ["tv", "template", "template_tv", "atlas", "atlas_tv"]
    return (order.index(m) if m in order else len(order), m)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    label = "clinical X-rays" if args.realism == "clinical" else "idealised DRRs"
    if not args.summary_only:
        import jax

        from xct import console

        console.quiet()
        paths = chest_paths(args)
        print(" ".join(sys.argv), flush=True)
        t0 = time.perf_counter()
        templates = load_templates(args, paths)
        print(f"{len(templates)} template cubes read in {time.perf_counter() - t0:.0f} s")
        if args.timing:
            timing(args, paths, templates)
            return 0
        runner = Runner(args)
        key = jax.random.key(args.seed)
        with rows_path.open("a", encoding="utf-8") as f:
            for v in sorted(args.views):
                for p in held_out(args, paths):
                    t = time.perf_counter()
                    case = Case(args, p, v, templates, jax.random.fold_in(key, paths.index(p)))
                    print(
                        f"{p.name} {v} views ({label}): detector {tuple(case.drr.shape[1:])},"
                        f" {len(case.templates)} templates, set up in "
                        f"{time.perf_counter() - t:.0f} s",
                        flush=True,
                    )
                    run_case(args, runner, case, p.name, v, f)
        print(f"wall {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    text = summarise(rows, label)
    (out / "summary.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
