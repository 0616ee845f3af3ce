"""Figure: PA and lateral DRRs of three procedural chest phantoms next to the real chest CT.

    python -m scripts.figure_phantom_vs_real --out docs/figures/phantom_vs_real.png

Gantry 0 deg (PA) and 90 deg (lateral), SOD 1000 mm, SDD 1500 mm, 256^2 detector, volumes
on a 128^3 cube of 512 mm; the real CT (``../shared/data/ct/chest_4dct_phase00_2mm.nii.gz``)
is loaded and reoriented into the projector frame by ``scripts.quickstart.load_volume``.
Grayscale, bright = high line integral, one shared window per row.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "figures" / "phantom_vs_real.png"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="phantom seeds")
    p.add_argument("--size", type=int, default=128, help="volume side in voxels")
    p.add_argument("--fov_mm", type=float, default=512.0, help="cube side in mm")
    p.add_argument("--det", type=int, default=256, help="detector side in pixels")
    args = p.parse_args(argv)

    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scripts.quickstart import CHEST, load_volume
    from xct import geometry, phantoms, physics

    t0 = time.perf_counter()
    if not CHEST.exists():
        print(f"error: real chest CT not found at {CHEST}", file=sys.stderr)
        return 1
    mu, grid, what = load_volume(args.size, args.fov_mm)
    volumes = [(f"real: {CHEST.name.split('.')[0]}", np.asarray(physics.mu_to_hu(mu)))]
    for seed in args.seeds:
        hu, _ = phantoms.chest_phantom(seed, grid, nodules=True, couch=False)
        volumes.append((f"chest_phantom(seed={seed})", hu))

    pixel_mm = 1.5 * args.fov_mm * 1.1 / args.det  # the whole cube fits on the detector
    geom = geometry.circular_cone_beam(
        [0.0, 90.0], sod_mm=1000.0, sdd_mm=1500.0, det_shape=(args.det,) * 2, pixel_mm=pixel_mm
    )
    render = jax.jit(lambda h: physics.render_drrs(h, grid, geom))
    drrs = [np.asarray(render(hu)) for _, hu in volumes]

    fig, axes = plt.subplots(2, len(volumes), figsize=(3.3 * len(volumes), 6.8), squeeze=False)
    for row, view in enumerate(("PA (0 deg)", "lateral (90 deg)")):
        vmax = float(np.percentile(np.stack([d[row] for d in drrs]), 99.8))
        for col, ((name, _), d) in enumerate(zip(volumes, drrs, strict=True)):
            ax = axes[row, col]
            ax.imshow(d[row], cmap="gray", vmin=0.0, vmax=vmax)
            ax.set_title(f"{name}\n{view}", fontsize=8)
            ax.axis("off")
    fig.suptitle(
        "Mono DRRs (line integrals, bright = attenuating): real CT vs phantoms", fontsize=10
    )
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
