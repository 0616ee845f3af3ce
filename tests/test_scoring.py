"""xct.scoring: the methods registry, the cubes, leave-one-out selection, the network path
through Experiment.with_acquisition, and the config loader."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import experiment, geometry, io, phantoms, physics, reconstruct, scoring


def test_one_registry_for_the_table_and_the_cli():
    assert reconstruct.METHODS == scoring.METHODS
    assert set(scoring.METHODS) | set(scoring.NETWORK) == set(scoring.REGISTRY)
    assert set(scoring.METHOD_LABELS) == set(scoring.REGISTRY)
    assert scoring.SWEPT == ("tv", "tv_support", "template_tv", "atlas_tv", "network+tv")
    assert scoring.CLASSICAL == ("fdk", "sirt", "cgls", "tv")
    for name in scoring.SWEPT:
        s = scoring.Settings(tv_weight=(0.01, 0.1), prior_weight=(1.0,))
        assert len(scoring.candidates(s, name)) == 2, name
    assert scoring.candidates(scoring.Settings(), "fdk") == [{}]


def test_phantoms_are_the_datasets_test_split():
    """The table's phantoms are synthetic_chest's test split (seeds and options)."""
    from data_pipelines import synthetic_chest

    assert scoring.TEST_SEED_OFFSET == synthetic_chest._SEED_OFFSETS["test"]
    config = synthetic_chest.SyntheticChestConfig(name="x")
    assert (scoring.PHANTOM_NODULES, scoring.PHANTOM_COUCH) == (config.nodules, config.couch)
    (vol,) = scoring.synthetic_volumes(1, 16)
    grid = geometry.Acquisition(resolution=16).grid()
    hu, _ = phantoms.chest_phantom(2_000_000, grid, nodules=True, couch=False)
    np.testing.assert_array_equal(vol.hu, np.clip(np.round(hu), -1024, 3071))
    assert vol.id == "chest-2000000" and 0.05 < vol.body_fraction < 0.95


def test_settings_refuse_unknown_methods_and_realism():
    with pytest.raises(ValueError, match="realism"):
        scoring.Settings(realism="photoreal")
    with pytest.raises(ValueError, match="methods"):
        scoring.Settings(methods=("fdk", "magic"))


def test_select_chooses_each_weight_on_the_other_volumes():
    rows = [
        {"method": "tv", "views": 2, "kind": "chest", "volume": v, "params": p, "psnr": x}
        for v, p, x in [
            ("a", "w=1", 20.0),
            ("a", "w=2", 10.0),
            ("b", "w=1", 5.0),
            ("b", "w=2", 30.0),
        ]
    ]
    chosen = {r["volume"]: r["params"] for r in scoring.select(rows)}
    assert chosen == {"a": "w=2", "b": "w=1"}  # each chosen on the other, never itself


def test_score_volume_inside_the_body():
    """Identical inside the body, wrong outside: the body columns are perfect, the whole
    volume's are not."""
    grid = geometry.VolumeGrid.centered((16, 16, 16), 25.0)
    hu = np.asarray(phantoms.chest_phantom(3, grid)[0], np.float32)
    body = io.body_mask(hu, grid)
    pred = np.where(body, hu, 500.0).astype(np.float32)
    s = scoring.score_volume(jnp.asarray(pred), hu, body)
    assert set(s) == {c for c, _, _ in scoring.SCORE_COLUMNS}
    assert s["mae_hu_body"] == 0.0 and s["mae_hu"] > 100.0
    assert s["psnr_body"] > 60.0 and s["psnr"] < 20.0


def test_solvers_run_every_method():
    acq = geometry.Acquisition(resolution=16, fov_mm=400.0)
    grid = acq.grid()
    hu, _ = phantoms.chest_phantom(1, grid)
    mu = jnp.maximum(physics.hu_to_mu(jnp.asarray(hu)), 0.0)
    geom = acq.orbit(np.float32([0.0, 90.0]))
    drr = physics.render_drrs(jnp.asarray(hu), grid, geom)
    solvers = scoring.Solvers(grid, sirt_iters=5, cgls_iters=5, tv_iters=5, arc_deg=180.0)
    support = solvers.support(drr, geom)
    params = {"tv_weight": 0.1, "prior_weight": 1.0}
    from xct.models.refiner import Refiner

    refiner = Refiner(width=4)
    net = (refiner, refiner.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 3))), {})
    for method in scoring.METHODS:
        x = solvers.run(method, drr, geom, params, support=support, prior=mu, net=net)
        assert x.shape == (16, 16, 16) and bool(jnp.all(jnp.isfinite(x))), method
        assert solvers.mismatch(jnp.maximum(x, 0.0), drr, geom) < 1.0, method
    assert solvers.mismatch(mu, drr, geom) < 0.05  # the truth explains its own views
    with pytest.raises(ValueError, match="unknown method"):
        solvers.run("magic", drr, geom, params)


def test_load_config_by_name_and_file(tmp_path):
    c = experiment.load_config("quickstart")
    assert c.geometry.resolution > 0
    file = tmp_path / "mine.py"
    file.write_text(
        "from xct.configs import quickstart\n\n\ndef get_config(arg=None):\n"
        "    c = quickstart.get_config()\n    c.seed = 7 if arg is None else int(arg)\n"
        "    return c\n"
    )
    assert experiment.load_config(str(file)).seed == 7
    assert experiment.load_config(f"{file}:11").seed == 11
    with pytest.raises(ValueError, match="not a file"):
        experiment.load_config(str(tmp_path / "none.py"))


def test_with_acquisition_predicts_on_another_cube():
    """The model on another cube: the same parameters, the model's acquisition replaced
    (what the table runs on a body-filled cube), equal to cloning the model by hand."""
    from xct import steps

    c = experiment.load_config("quickstart:smoke")
    c.geometry.resolution = 16
    c.mesh.data, c.mesh.spatial = 1, 1
    exp = experiment.Experiment.from_config(c)
    cube = dataclasses.replace(exp.acquisition, fov_mm=300.0)
    other = exp.with_acquisition(cube)
    assert other.acquisition == cube and other.model.acquisition == cube
    assert other.evaluator.acquisition == cube and exp.acquisition.fov_mm == c.geometry.fov_mm
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: rng.normal(0.0, 0.1, a.shape).astype(a.dtype), exp.abstract_state.params
    )
    drr = rng.uniform(0, 1, (1, exp.num_views, 16, 16)).astype(np.float32)
    angles = exp.acquisition.view_angles(exp.num_views)[None].astype(np.float32)
    got = np.asarray(other.predict_hu(params, drr, angles))
    setup = dataclasses.replace(
        exp.setup, model=exp.setup.model.clone(acquisition=cube), acquisition=cube
    )
    want = physics.denormalize_ct(
        steps.predict_ct(setup, params, {"drr": drr, "angles_deg": angles})
    )
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-2)
    with pytest.raises(ValueError, match="resolution"):
        exp.with_acquisition(dataclasses.replace(cube, resolution=8))


def test_clinical_mode_xrays_the_whole_scan(tmp_path):
    """--realism clinical (the default): real CTs only, their whole scan (couch kept)
    X-rayed with noise, scored against the scan averaged over each voxel; labelled clinical;
    phantoms refused in one line naming the mode they need."""
    ct_dir = tmp_path / "cts"
    ct_dir.mkdir()
    grid = geometry.VolumeGrid.centered((24, 40, 40), 10.0)
    hu, _ = phantoms.chest_phantom(4, grid, couch=True)
    io.write_ct(ct_dir / "chest_4.nii.gz", np.asarray(hu), grid)
    kw = dict(resolution=16, views=(2,), methods=("fdk", "tv"), tv_iters=3, ct_dir=str(ct_dir))
    with pytest.raises(ValueError, match="phantoms: 1 asked.*--realism ideal"):
        scoring.Settings(phantoms=1, detector_pixel_mm=6.0, **kw)
    assert scoring.Settings().realism == "clinical"
    clinical = scoring.run_table(scoring.Settings(detector_pixel_mm=6.0, **kw))
    ideal = scoring.run_table(scoring.Settings(realism="ideal", phantoms=0, **kw))
    assert {(r["method"], r["volume"]) for r in clinical["rows"]} == {
        ("fdk", "chest_4.nii.gz"),
        ("tv", "chest_4.nii.gz"),
    }
    assert clinical["setup"]["realism_label"] == "clinical"
    assert ideal["setup"]["realism_label"] == "idealised"
    by = {r["method"]: r for r in ideal["rows"]}
    for r in clinical["rows"]:
        assert np.isfinite(r["psnr"]) and np.isfinite(r["psnr_body"])
        assert r["psnr"] != by[r["method"]]["psnr"]  # other X-rays, another truth
    assert "clinical X-rays" in scoring.report_markdown(clinical)
    assert "idealised X-rays" in scoring.report_markdown(ideal)


def test_mu_water_is_clinical_only_and_scales_the_solvers():
    """--mu_water: refused in the idealised mode (its X-rays are made at 70 keV); in Solvers
    the value bound follows it (HU_MAX at that water)."""
    with pytest.raises(ValueError, match="mu_water_per_mm"):
        scoring.Settings(realism="ideal", mu_water_per_mm=0.02)
    assert scoring.Settings(realism="clinical", mu_water_per_mm=0.02).mu_water_per_mm == 0.02
    grid = geometry.VolumeGrid.centered((8, 8, 8), 50.0)
    kw = {"sirt_iters": 1, "cgls_iters": 1, "tv_iters": 1}
    base = scoring.Solvers(grid, **kw)
    doubled = scoring.Solvers(grid, mu_water_per_mm=2 * physics.MU_WATER_PER_MM, **kw)
    assert base.mu_water == physics.MU_WATER_PER_MM
    assert doubled.upper == pytest.approx(2 * base.upper)


def test_finer_grid_keeps_the_field_of_view():
    """grid_factor's grid: each voxel split f times, the same voxel edges outside."""
    grid = geometry.VolumeGrid.centered((8, 8, 8), 50.0)
    assert scoring.finer_grid(grid, 1) is grid
    assert scoring.finer_grid(grid, 2) == geometry.VolumeGrid.centered((16, 16, 16), 25.0)
    off = geometry.VolumeGrid((4, 6, 8), (3.0, 2.0, 1.0), (10.0, -5.0, 7.0))
    fine = scoring.finer_grid(off, 3)
    assert fine.shape == (12, 18, 24) and np.allclose(fine.spacing_mm, (1.0, 2 / 3, 1 / 3))
    # the first voxel's low edge is where it was: origin - spacing / 2, per axis (x, y, z)
    np.testing.assert_allclose(
        np.asarray(fine.origin_xyz_mm) - np.asarray(fine.spacing_mm)[::-1] / 2,
        np.asarray(off.origin_xyz_mm) - np.asarray(off.spacing_mm)[::-1] / 2,
    )


def _blocky_xrays(n=8, fov_mm=200.0, views=24, pixel_mm=3.0):
    """A piecewise-constant object aligned to the ``n^3`` voxels of a ``fov_mm`` cube and its
    fine X-rays (rendered from the object repeated 2 x 2 x 2, a detector of ``pixel_mm``
    covering the cube, a full orbit): ``(grid, mu [n]^3, drr, angles, pixel_mm)``."""
    grid = geometry.VolumeGrid.centered((n,) * 3, fov_mm / n)
    hu = np.full((n,) * 3, -1000.0, np.float32)
    m = n // 4
    hu[m:-m, m:-m, m:-m] = np.random.default_rng(0).choice([-800.0, 0.0, 40.0, 400.0], (2 * m,) * 3)
    fine_hu = hu.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine_grid = geometry.VolumeGrid.centered((2 * n,) * 3, fov_mm / n / 2)
    angles = np.linspace(0.0, 360.0, views, endpoint=False)
    det = int(2.4 * fov_mm / pixel_mm)
    geom = geometry.circular_cone_beam(angles, det_shape=(det, det), pixel_mm=pixel_mm)
    drr = np.asarray(physics.render_drrs(jnp.asarray(fine_hu), fine_grid, geom))
    return grid, np.asarray(physics.hu_to_mu(hu)), drr, angles, pixel_mm


def test_grid_factor_reconstructs_finer_and_averages_down():
    """Solvers(grid_factor=2): the methods run on the 16^3 grid of the same cube, the result
    comes back on the 8^3 output grid, finite; with a piecewise-constant object aligned to the
    output voxels and 24 views it is closer to the truth than on the 8^3 grid (measured: TV
    0.04 vs 0.15, CGLS 0.10 vs 0.20 mean relative error); template methods are refused."""
    from xct import clinical

    grid, mu_true, fine, angles, pixel = _blocky_xrays()
    err = {}
    for f in (1, 2):
        solvers = scoring.Solvers(
            grid, sirt_iters=5, cgls_iters=50, tv_iters=100, arc_deg=360.0, grid_factor=f
        )
        assert solvers.recon_grid == scoring.finer_grid(grid, f)
        drr, geom = clinical.xrays_for_grid(fine, pixel, angles, solvers.recon_grid)
        drr = jnp.asarray(drr)
        support = solvers.support(drr, geom)
        assert support.shape == (8 * f,) * 3
        for method in ("fdk", "sirt_support", "cgls", "tv"):
            x = solvers.run(method, drr, geom, {"tv_weight": 0.01}, support=support)
            assert x.shape == (8, 8, 8) and bool(jnp.all(jnp.isfinite(x))), (method, f)
            x = np.maximum(np.asarray(x), 0.0)
            err[method, f] = np.abs(x - mu_true).mean() / mu_true.mean()
    assert err["tv", 2] < 0.7 * err["tv", 1], err
    assert err["cgls", 2] < 0.8 * err["cgls", 1], err
    with pytest.raises(ValueError, match="grid_factor 2: template_tv run on the output grid"):
        solvers.run("template_tv", drr, geom, {"tv_weight": 0.1, "prior_weight": 1.0})
    with pytest.raises(ValueError, match="whole number"):
        scoring.Solvers(grid, sirt_iters=1, cgls_iters=1, tv_iters=1, grid_factor=0)


def test_solvers_average_down_as_clinical_does():
    """What ``run`` returns at grid_factor 2 is ``clinical.average_down`` of the clipped fine
    result: FDK of the same X-rays on the fine grid, by hand, agrees."""
    from xct import clinical

    grid, _, fine, angles, pixel = _blocky_xrays(views=8)
    kw = {"sirt_iters": 1, "cgls_iters": 1, "tv_iters": 1, "arc_deg": 360.0}
    coarse = scoring.Solvers(grid, grid_factor=2, **kw)
    drr, geom = clinical.xrays_for_grid(fine, pixel, angles, coarse.recon_grid)
    on_fine = scoring.Solvers(coarse.recon_grid, **kw)
    want = clinical.average_down(np.maximum(on_fine.run("fdk", jnp.asarray(drr), geom, {}), 0.0), 2)
    got = coarse.run("fdk", jnp.asarray(drr), geom, {})
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    flat = np.full((16, 16, 16), 0.02, np.float32)  # averaging down a constant keeps it
    np.testing.assert_allclose(clinical.average_down(flat, 2), 0.02, rtol=1e-6)


def test_grid_factor_is_clinical_only_and_recorded(tmp_path, capsys):
    """--grid_factor: in the table's JSON, set-up text and rows (clinical mode); refused in one
    line in the idealised mode, with template methods, and below 1."""
    from scripts import quality_table

    with pytest.raises(ValueError, match="needs --realism clinical"):
        scoring.Settings(realism="ideal", grid_factor=2)
    with pytest.raises(ValueError, match="grid_factor 2: template, template_tv run on the"):
        scoring.Settings(grid_factor=2, methods=("tv", "template", "template_tv"))
    with pytest.raises(ValueError, match="whole number >= 1"):
        scoring.Settings(grid_factor=0)
    ct_dir = tmp_path / "cts"
    ct_dir.mkdir()
    grid = geometry.VolumeGrid.centered((24, 40, 40), 10.0)
    hu, _ = phantoms.chest_phantom(4, grid, couch=True)
    io.write_ct(ct_dir / "chest_4.nii.gz", np.asarray(hu), grid)
    argv = ["--resolution=16", "--views", "2", "--methods", "tv_support", "--iters=3"]
    argv += [f"--ct_dir={ct_dir}", "--detector_pixel_mm=6", "--grid_factor=2"]
    assert quality_table.main([*argv, f"--out={tmp_path / 'out'}"]) == 0
    result = json.loads((tmp_path / "out" / "results_16.json").read_text(encoding="utf-8"))
    assert result["setup"]["grid_factor"] == 2 and "--grid_factor=2" in result["command"]
    md = (tmp_path / "out" / "quality_16.md").read_text(encoding="utf-8")
    assert "grid_factor 2: reconstructed on a 32³ grid" in md
    capsys.readouterr()
    assert quality_table.main([*argv, "--realism=ideal", f"--out={tmp_path / 'x'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: grid_factor: 2 asked"), err
