"""Checkpoint-based evaluation and prediction (the evaluation issue adds reports).

``evaluate(config, workdir)`` restores the best (or last, or a given step) checkpoint's EMA
parameters, scores a split in the primary metric definition (``xct.metrics``: HU clipped to
[-1000, 1024] scaled to [0, 1]; PSNR over the 3D volume with peak 1; 3D SSIM with a
Gaussian window of sigma 1.5 voxels) and writes ``metrics.json``.
``predict(config, workdir, xray_paths, angles_deg, output)`` reconstructs a NIfTI volume
from X-ray images.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from xct import checkpoint, geometry, io, physics, train


def restore_params(config, workdir, which: str = "best"):
    """``(setup, mesh, ema_params, step)`` from ``workdir``'s checkpoints."""
    setup, mesh, _, _, abstract, _ = train.build(config)
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        if which in ("best", "last"):
            restored = ckpt.restore(abstract, which=which)
            if restored is None and which == "best":
                restored = ckpt.restore(abstract, which="last")
        else:
            restored = ckpt.restore(abstract, step=int(which))
    finally:
        ckpt.close()
    if restored is None:
        raise ValueError(f"--workdir: no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}")
    state, _, step = restored
    return setup, mesh, state.ema_params, step


def evaluate(config, workdir, which: str = "best") -> dict:
    workdir = pathlib.Path(workdir).expanduser()
    if config.data.source == "tfds":
        train.ensure_dataset(config)
    setup, mesh, params, step = restore_params(config, workdir, which)
    views = int(config.eval.num_views) or int(config.data.num_views)
    split = config.eval.split
    result = train.evaluate_split(config, setup, params, mesh, split, views)
    out = {
        "checkpoint_step": step,
        "split": split,
        "num_views": views,
        "dataset": config.data.dataset,
        "definition": "HU clipped to [-1000, 1024] scaled to [0, 1]; PSNR over the 3D volume, "
        "peak 1; SSIM 3D Gaussian window sigma 1.5 voxels, data range 1; MAE/RMSE in HU",
        **result,
    }
    (workdir / "metrics.json").write_text(json.dumps(out, indent=1))
    return out


def load_xray(path, size: int) -> np.ndarray:
    """One X-ray as line integrals ``[size, size]``.

    ``.npy``: already line integrals. ``.png`` / ``.dcm``: detector intensities (bright =
    more photons), converted with ``-log(I / I_air)``, ``I_air`` the 99.9th percentile.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"--xrays: {p} not found")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        img = np.load(p).astype(np.float32)
    elif suffix in (".png", ".dcm", ".dicom"):
        import SimpleITK as sitk

        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float32)
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 and arr.shape[0] == 1 else arr
        if arr.ndim == 3:  # RGB(A) PNG
            arr = arr[..., :3].mean(-1)
        air = np.percentile(arr, 99.9)
        img = -np.log(np.clip(arr, 1e-3 * air, None) / air)
    else:
        raise ValueError(f"--xrays: {p}: expected .npy (line integrals), .png or .dcm")
    if img.ndim != 2:
        raise ValueError(f"--xrays: {p}: expected a 2-D image, got shape {img.shape}")
    if img.shape != (size, size):
        import jax.image

        img = np.asarray(jax.image.resize(img, (size, size), "linear"))
    return img


def predict(config, workdir, xray_paths, angles_deg, output, which: str = "best") -> pathlib.Path:
    if len(xray_paths) != len(angles_deg):
        raise ValueError(f"--angles_deg: {len(angles_deg)} angles for {len(xray_paths)} X-rays")
    setup, mesh, params, _ = restore_params(config, workdir, which)
    g = train.data_geometry(config)
    r = g["resolution"]
    drr = np.stack([load_xray(p, r) for p in xray_paths])[None]
    batch = {
        "drr": np.asarray(physics.normalize_drr(drr), np.float32),
        "angles_deg": np.asarray(angles_deg, np.float32)[None],
    }
    out = jax.jit(
        lambda p, b: setup.model.apply({"params": p}, b["drr"], b["angles_deg"], train=False)
    )(params, batch)
    hu = np.asarray(physics.denormalize_ct(out["ct"][0]))
    grid = geometry.VolumeGrid.centered((r, r, r), g["fov_mm"] / r)
    return io.write_ct(output, hu, grid)
