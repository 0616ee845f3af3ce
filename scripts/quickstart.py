"""Projector demo: DRRs of the shared real chest CT (or a Shepp-Logan phantom) at 2 and 8 views.

    python -m scripts.quickstart --out quickstart_out

Writes ``volume_mu.nii.gz`` (attenuation per mm, opens in 3D Slicer / ITK-SNAP at the
scan's position), ``drr_2views.png``, ``drr_8views.png`` and ``drrs.npz``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHEST = ROOT.parent / "shared" / "data" / "ct" / "chest_4dct_phase00_2mm.nii.gz"


def load_volume(n: int, fov_mm: float):
    """(mu [n]^3, grid, description): the shared chest CT if present, else a phantom."""
    from xct import geometry, io, phantoms, physics

    if CHEST.exists():
        # The scan as it is (couch kept), on the orbit's frame: long axis on y, head at row 0.
        cube = io.load_cube(CHEST, resolution=n, fov_mm=fov_mm, crop="scan")
        return np.asarray(physics.hu_to_mu(cube.hu)), cube.grid, f"real chest CT ({CHEST.name})"
    grid = geometry.VolumeGrid.centered((n, n, n), fov_mm / n)
    ells = phantoms.shepp_logan_3d(0.45 * fov_mm, scale=physics.MU_WATER_PER_MM)
    return np.asarray(phantoms.voxelize(ells, grid, supersample=2)), grid, "3D Shepp-Logan phantom"


def save_montage(path, drrs, angles, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(drrs), 4)
    rows = -(-len(drrs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    vmax = float(np.percentile(drrs, 99.8))
    for ax, img, a in zip(axes.ravel(), drrs, angles, strict=False):
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=vmax)  # line integral: bright = attenuating
        ax.set_title(f"{a:.0f} deg", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="quickstart_out", help="output folder")
    p.add_argument("--size", type=int, default=128, help="volume side in voxels")
    p.add_argument("--fov_mm", type=float, default=512.0, help="cube side in mm")
    p.add_argument("--det", type=int, default=256, help="detector side in pixels")
    args = p.parse_args(argv)

    import jax
    from tqdm import tqdm

    from xct import geometry, io, projector

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mu, grid, what = load_volume(args.size, args.fov_mm)
    io.write_ct(out / "volume_mu.nii.gz", mu, grid)
    print(
        f"volume: {what}, {mu.shape} voxels of {grid.spacing_mm[0]:.2f} mm"
        f" -> {out / 'volume_mu.nii.gz'}"
    )
    sod, sdd = 1000.0, 1500.0
    pixel = 1.5 * args.fov_mm * 1.1 / args.det  # the whole cube fits on the detector
    saved = {}
    for views in tqdm((2, 8), desc="rendering DRRs", unit="set"):
        angles = geometry.evenly_spaced_angles(views, 180.0 if views == 2 else 360.0)
        geom = geometry.circular_cone_beam(
            angles, sod_mm=sod, sdd_mm=sdd, det_shape=(args.det, args.det), pixel_mm=pixel
        )
        drr = np.asarray(jax.block_until_ready(projector.forward_project(mu, grid, geom)))
        save_montage(
            out / f"drr_{views}views.png",
            drr,
            angles,
            f"{what}: {views} cone-beam DRRs (line integrals)",
        )
        saved[f"drr_{views}views"] = drr
        saved[f"angles_{views}views_deg"] = angles
    np.savez_compressed(out / "drrs.npz", **saved)
    print(f"wrote {sorted(x.name for x in out.iterdir())} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
