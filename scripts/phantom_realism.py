"""How far are the procedural chest phantoms from real chests? HU and DRR histogram distances.

    python -m scripts.phantom_realism --phantoms=8 --resolution=64 --out=docs/realism

Every volume, real or phantom, goes through the same preprocessing as the real-chest
benchmark (``scripts/quality_table.read_cube``: couch removed, a cube the body fills, centred
on the body, ``--resolution``³). Phantoms are painted on a 500 mm cube of 4 mm voxels (so the
arms of version 2 fit) in the projector frame, turned into LPS and preprocessed the same
way. Measured per phantom version (``xct.phantoms.chest_phantom(seed, version=V)``, seeds
0..N-1) against each real chest (``--ct_dir`` names matching ``--chests``):

* ``hu_w1``: Wasserstein-1 distance (HU) between the HU distributions inside the body mask
  (HU clipped to [-1024, 1500]);
* ``drr_w1``: Wasserstein-1 distance between the line-integral distributions of the PA and
  lateral DRRs (cone beam 1000/1500 mm, the detector of the benchmark) inside the body's
  silhouette (line integral > 0.05);
* tissue fractions inside the body (lung < -500 HU, fat -200..-30, soft tissue -30..200,
  bone and contrast > 200) and the cube's side (the body's larger axial extent).

Lower distances are more realistic. Writes ``realism.md`` and ``realism.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TISSUES = (("lung", -1100, -500), ("fat", -200, -30), ("soft", -30, 200), ("bone", 200, 4000))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct_dir", default=str(ROOT.parent / "shared" / "data" / "ct"))
    p.add_argument("--chests", default="*chest*", help="glob of the real chests in --ct_dir")
    p.add_argument("--phantoms", type=int, default=8, help="phantoms per version")
    p.add_argument("--versions", type=int, nargs="+", default=[1, 2])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def w1(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance between two 1-D samples (through their quantile functions)."""
    q = np.linspace(0.0, 1.0, 1001)[1:-1]
    return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))


def describe(hu: np.ndarray, side_mm: float, r: int) -> dict:
    """HU inside the body, DRR values inside the silhouette, tissue fractions."""
    import jax.numpy as jnp

    from xct import geometry, io, physics

    grid = geometry.VolumeGrid.centered(hu.shape, side_mm / r)
    body = io.body_mask(hu, grid)
    inside = np.clip(hu[body], -1024.0, 1500.0)
    acq = geometry.Acquisition(resolution=r, fov_mm=side_mm)
    drr = np.asarray(physics.render_drrs(jnp.asarray(hu), acq.grid(), acq.orbit([0.0, 90.0])))
    out = {
        "hu": inside,
        "drr": drr[drr > 0.05],
        "side_mm": side_mm,
        "body_fraction": float(body.mean()),
    }
    for name, lo, hi in TISSUES:
        out[name] = float(np.mean((inside >= lo) & (inside < hi)))
    return out


def phantom_cube(seed: int, version: int, r: int) -> tuple[np.ndarray, float]:
    from xct import geometry, io, phantoms

    grid = geometry.VolumeGrid.centered((125, 125, 125), 4.0)
    hu, _ = phantoms.chest_phantom(seed, grid, version=version, nodules=True)
    lps = io.from_projector_frame(hu)
    cube, _, side = io.preprocess_body_cube(lps, geometry.VolumeGrid.centered(lps.shape, 4.0), r)
    return io.to_projector_frame(cube), side


def main(argv=None) -> int:
    import fnmatch

    from scripts import quality_table
    from xct import console, io

    console.quiet()
    args = parse_args(argv)
    t0 = time.perf_counter()
    r = args.resolution
    root = pathlib.Path(args.ct_dir)
    reals = {}
    for path in io.find_ct_sources(root) if root.is_dir() else []:
        name = path.relative_to(root).as_posix()
        if fnmatch.fnmatch(name, args.chests):
            try:
                hu, side = quality_table.read_cube(path, r, "body")
            except ValueError as e:
                print(f"skipped {name}: {str(e).splitlines()[0][:160]}", file=sys.stderr)
                continue
            reals[name] = describe(hu, side, r)
    if not reals:
        print(f"error: no real chest matching {args.chests!r} in {root}", file=sys.stderr)
        return 1
    rows = []
    for v in args.versions:
        for seed in range(args.phantoms):
            hu, side = phantom_cube(seed, v, r)
            d = describe(hu, side, r)
            row = {"version": v, "seed": seed, "side_mm": side, "body_fraction": d["body_fraction"]}
            row.update({name: d[name] for name, _, _ in TISSUES})
            row["hu_w1"] = float(np.mean([w1(d["hu"], x["hu"]) for x in reals.values()]))
            row["drr_w1"] = float(np.mean([w1(d["drr"], x["drr"]) for x in reals.values()]))
            rows.append(row)
            print(f"version {v} seed {seed}: HU W1 {row['hu_w1']:.1f}, DRR W1 {row['drr_w1']:.3f}")
    cols = ("side_mm", "body_fraction", "lung", "fat", "soft", "bone", "hu_w1", "drr_w1")
    lines = [
        f"## Phantom realism, {r}³ (`scripts/phantom_realism.py`) — {datetime.date.today()}",
        "",
        "Command: `python -m scripts.phantom_realism " + shlex.join(argv or sys.argv[1:]) + "`",
        "",
        "| volume | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, x in reals.items():
        cells = [f"{x['side_mm']:.0f}", f"{x['body_fraction']:.3f}"]
        cells += [f"{x[t]:.3f}" for t, _, _ in TISSUES] + ["–", "–"]
        lines.append(f"| real `{name}` | " + " | ".join(cells) + " |")
    for v in args.versions:
        rs = [x for x in rows if x["version"] == v]
        mean = {c: float(np.mean([x[c] for x in rs])) for c in cols}
        cells = [f"{mean['side_mm']:.0f}", f"{mean['body_fraction']:.3f}"]
        cells += [f"{mean[t]:.3f}" for t, _, _ in TISSUES]
        cells += [f"**{mean['hu_w1']:.1f}**", f"**{mean['drr_w1']:.3f}**"]
        lines.append(f"| phantoms v{v} (mean of {len(rs)}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "hu_w1: Wasserstein-1 distance (HU) of the HU inside the body to each real chest's, "
        "averaged; drr_w1: the same for PA + lateral line integrals inside the silhouette. "
        f"Wall {time.perf_counter() - t0:.0f} s.",
    ]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (out / "realism.md").write_text(text, encoding="utf-8")
    (out / "realism.json").write_text(json.dumps({"rows": rows}, indent=1), encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
