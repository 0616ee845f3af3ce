"""xct.atlas_net and xct.models.refiner: an untrained refiner changes nothing, training on
a known correction learns it, a fold's atlas never holds the held-out chest, a case is the
table's X-rays, and a saved model loads (or is refused by name)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import atlas_net, clinical, geometry, phantoms, physics, scoring
from xct.models.refiner import Refiner
from xct.recon import atlas as A


def test_untrained_refiner_returns_its_base():
    model = Refiner(width=4)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 3))
    params = model.init(jax.random.key(1), x)
    r = model.apply(params, x)
    assert r.shape == (2, 8, 8, 8)
    np.testing.assert_array_equal(np.asarray(r), 0.0)  # the head starts at zero
    np.testing.assert_array_equal(np.asarray(atlas_net.apply(model, params, x)), x[..., 0])
    with pytest.raises(ValueError, match="divisible by 4"):
        model.apply(params, jnp.zeros((1, 6, 8, 8, 3)))


def test_training_learns_a_known_correction():
    """The base is off by a smooth, input-dependent error; the refiner learns to remove
    most of it from 40 steps on patches."""
    rng = np.random.default_rng(0)
    xs, ys, bs = [], [], []
    for _ in range(3):
        truth = rng.normal(size=(16, 16, 16)).astype(np.float32)
        prior = truth + 0.1 * rng.normal(size=truth.shape).astype(np.float32)
        base = truth + 0.5 * prior  # the base over-shoots by half the prior
        xs.append(np.stack([base, prior, base], -1))
        ys.append(truth)
        bs.append(np.ones_like(truth, bool))
    s = atlas_net.TrainSettings(steps=60, batch=2, patch=8, width=4, learning_rate=3e-3)
    model, params, losses = atlas_net.train(xs, ys, bs, s)
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-10:])
    pred = np.asarray(atlas_net.apply(model, params, xs[0]))
    assert np.mean((pred - ys[0]) ** 2) < 0.5 * np.mean((xs[0][..., 0] - ys[0]) ** 2)


def test_fuse_subset_is_the_atlas_of_that_subset():
    """What a fold sees (the templates without the held-out chest) is exactly what
    recon.atlas.fuse gives for those templates."""
    acq = geometry.Acquisition(resolution=16, fov_mm=400.0)
    grid, geom = acq.grid(), acq.orbit(acq.view_angles(2))
    vols = jnp.stack(
        [jnp.maximum(physics.hu_to_mu(phantoms.chest_phantom(s, grid)[0]), 0.0) for s in range(4)]
    )
    drr = physics.render_drrs(jnp.asarray(phantoms.chest_phantom(9, grid)[0]), grid, geom)
    err = A.local_mismatch(vols, drr, geom, grid)
    screen = np.asarray([0.3, 0.1, 0.2, 0.4])
    assert atlas_net.atlas_subset(screen, [0, 1, 2, 3], k=3) == [1, 2, 0]
    assert atlas_net.atlas_subset(screen, [0, 1, 2, 3]) == [1, 2, 0, 3]  # default: all
    sub = atlas_net.atlas_subset(screen, [0, 2, 3])  # template 1 held out
    assert sub == [2, 0, 3]
    got = atlas_net.fuse_subset(vols, err, sub)
    want, _ = A.fuse(vols[np.asarray(sub)], drr, geom, grid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_case_inputs_of_a_fold_leave_the_held_out_chest_out():
    z = np.zeros((4, 4, 4), np.float32)
    mw = float(physics.MU_WATER_PER_MM)
    case = {
        "atlas_tv": z + mw,
        "atlas": z + 2 * mw,
        "tv_support": z,
        "atlas_tv|b": z + 3 * mw,
        "atlas|b": z + 4 * mw,
        "truth_hu": z + 500.0,
        "meta": {"mu_water": mw},
    }
    np.testing.assert_allclose(atlas_net.case_inputs(case)[0, 0, 0], [0.0, 1.0, -1.0])
    np.testing.assert_allclose(atlas_net.case_inputs(case, "b")[0, 0, 0], [2.0, 3.0, -1.0])
    # a fold whose chest was not among the fused templates sees the case's own atlas
    np.testing.assert_allclose(atlas_net.case_inputs(case, "c")[0, 0, 0], [0.0, 1.0, -1.0])
    np.testing.assert_allclose(atlas_net.case_target(case), 0.5)


def test_save_and_load(tmp_path):
    model = Refiner(width=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 3)))
    atlas_net.save(tmp_path / "m", params, width=4, info={"trained_on": ["chest_a"]})
    m2, p2, meta = atlas_net.load(tmp_path / "m")
    assert meta["trained_on"] == ["chest_a"] and m2.width == 4
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="atlas_net.json not found"):
        atlas_net.load(tmp_path / "nothing")
    meta_file = tmp_path / "m" / "atlas_net.json"
    meta_file.write_text(json.dumps({**meta, "width": 8}))
    with pytest.raises(ValueError, match="width-8, depth-3 Refiner"):
        atlas_net.load(tmp_path / "m")


def test_depth_four_refiner_sees_the_whole_cube_and_loads(tmp_path):
    """A fourth scale: still no correction untrained; one voxel changed at a corner moves the
    output at the opposite corner of a 16^3 cube (the three-scale refiner's field of view
    does not reach it); saved and loaded with its depth; a model saved without ``depth``
    (before it was recorded) loads as three scales."""
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 16, 3))
    reach = {}
    for depth in (3, 4):
        model = Refiner(width=4, depth=depth)
        params = model.init(jax.random.key(1), x)
        np.testing.assert_array_equal(np.asarray(model.apply(params, x)), 0.0)
        # a non-zero head, to see how far one input voxel reaches
        params = jax.tree_util.tree_map(lambda a: a, params)
        head = params["params"]["head"]
        head["kernel"] = jnp.ones_like(head["kernel"])
        x2 = x.at[0, 0, 0, 0, 0].add(10.0)
        d = np.abs(np.asarray(model.apply(params, x2) - model.apply(params, x)))
        reach[depth] = d[0, -1, -1, -1]
    assert reach[3] == 0.0 and reach[4] > 0.0
    with pytest.raises(ValueError, match="divisible by 8"):
        Refiner(width=4, depth=4).init(jax.random.key(0), jnp.zeros((1, 12, 12, 12, 3)))
    with pytest.raises(ValueError, match="depth must be 3 or 4"):
        Refiner(width=4, depth=5).init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 3)))
    model = Refiner(width=4, depth=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 3)))
    atlas_net.save(tmp_path / "m4", params, width=4, depth=4)
    m2, p2, meta = atlas_net.load(tmp_path / "m4")
    assert meta["depth"] == 4 and m2.depth == 4
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params3 = Refiner(width=4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 3)))
    atlas_net.save(tmp_path / "m3", params3, width=4)
    meta_file = tmp_path / "m3" / "atlas_net.json"
    old = json.loads(meta_file.read_text())
    del old["depth"]
    meta_file.write_text(json.dumps(old))
    assert atlas_net.load(tmp_path / "m3")[0].depth == 3
    meta_file.write_text(json.dumps({**old, "depth": 4}))
    with pytest.raises(ValueError, match="width-4, depth-4 Refiner"):
        atlas_net.load(tmp_path / "m3")


def test_solvers_atlas_net_is_atlas_tv_plus_the_correction():
    """An untrained refiner adds nothing: atlas_net is then atlas_tv at the benchmark's
    weights, through the same Solvers the table and the CLI use."""
    acq = geometry.Acquisition(resolution=16, fov_mm=400.0)
    grid, geom = acq.grid(), acq.orbit(np.float32([0.0, 90.0]))
    hu, _ = phantoms.chest_phantom(1, grid)
    prior = jnp.maximum(physics.hu_to_mu(jnp.asarray(phantoms.chest_phantom(2, grid)[0])), 0.0)
    drr = physics.render_drrs(jnp.asarray(hu), grid, geom)
    solvers = scoring.Solvers(grid, sirt_iters=2, cgls_iters=2, tv_iters=5)
    support = solvers.support(drr, geom)
    model = Refiner(width=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 3)))
    net = (model, params, {})
    got = solvers.run("atlas_net", drr, geom, {}, support=support, prior=prior, net=net)
    # a model saved before the weights were recorded ran atlas_tv at prior 1 (legacy)
    w = atlas_net.input_weights(2, atlas_net.weights_of({}))[1]
    assert w == scoring.benchmark_weights("atlas_net", 2, net_meta={})
    assert w == {"tv_weight": 0.03, "prior_weight": 1.0}
    want = jnp.maximum(solvers.run("atlas_tv", drr, geom, w, support, prior), 0.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
    # a model recording its weights runs at them: now the table's atlas_tv weights
    meta = {"input_weights": atlas_net.INPUT_WEIGHTS}
    for v in (2, 4):
        w = scoring.benchmark_weights("atlas_net", v, net_meta=meta)
        assert (
            w
            == scoring.benchmark_weights("atlas_tv", v)
            == scoring.benchmark_weights("atlas_net", v)
        )
    got = solvers.run(
        "atlas_net", drr, geom, {}, support=support, prior=prior, net=(*net[:2], meta)
    )
    w = atlas_net.input_weights(2)[1]
    want = jnp.maximum(solvers.run("atlas_tv", drr, geom, w, support, prior), 0.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="input_weights"):
        atlas_net.weights_of({"input_weights": {"atlas_tv": []}})
    with pytest.raises(ValueError, match="atlas_net: needs a trained model"):
        solvers.run("atlas_net", drr, geom, {}, support=support, prior=prior)


def test_make_case_is_the_tables_xrays_and_scores(tmp_path):
    """A tiny deformed case: every template fused, a fold's atlas (and atlas_tv) without
    each of them, the angles jittered together, finite inputs, its X-rays explained by
    its geometry, and a saved case reads back."""
    grid = geometry.VolumeGrid.centered((24, 40, 40), 10.0)
    hu, _ = phantoms.chest_phantom(4, grid, couch=True)
    scan = clinical.scan_from_array(np.asarray(hu), grid, "chest_4")
    tgrid = clinical.cube_grid(scan, 16)
    templates = {
        f"t{s}": np.asarray(
            jnp.maximum(physics.hu_to_mu(phantoms.chest_phantom(s, tgrid)[0]), 0.0), np.float32
        )
        for s in (5, 6, 7, 8)
    }
    spec = atlas_net.CaseSpec(
        chest="chest_4",
        views=2,
        variant=1,
        deform_mm=8.0,
        angle_jitter_deg=5.0,
        resolution=16,
        pixel_mm=6.0,
        tv_iters=3,
    )
    case = atlas_net.make_case(spec, scan, templates, {})
    meta = case["meta"]
    assert sorted(meta["fused"]) == meta["templates"] == ["t5", "t6", "t7", "t8"]
    for name in meta["fused"]:
        assert f"atlas|{name}" in case and f"atlas_tv|{name}" in case
    assert case["registered"].shape == case["errors"].shape == (4, 16, 16, 16)
    from xct import projector

    grid, geom = atlas_net.case_grid(case), atlas_net.case_geometry(case)
    mu_truth = jnp.maximum(physics.hu_to_mu(jnp.asarray(case["truth_hu"])), 0.0)
    fp = projector.forward_project(mu_truth, grid, geom)
    rel = float(jnp.linalg.norm(fp - case["drr"]) / jnp.linalg.norm(case["drr"]))
    assert rel < 0.25, rel  # the truth cube explains its X-rays (noise, couch, 16^3 aside)
    assert abs(meta["angles_deg"][1] - meta["angles_deg"][0] - 90.0) < 1e-6
    assert case["truth_hu"].shape == (16, 16, 16) and case["body"].any()
    x = atlas_net.case_inputs(case, meta["fused"][0])
    assert x.shape == (16, 16, 16, 3) and np.all(np.isfinite(x))
    atlas_net.save_case(tmp_path / "c.npz", case)
    back = atlas_net.load_case(tmp_path / "c.npz")
    assert back["meta"]["input_weights"] == json.loads(json.dumps(atlas_net.INPUT_WEIGHTS))
    np.testing.assert_array_equal(back["atlas_tv"], case["atlas_tv"])
    # a case at the current weights is kept; one made at other weights gets its TV inputs
    # recomputed from its stored X-rays and atlases (no registration)
    assert not atlas_net.refresh_case(back, {})
    old = dict(back, meta={k: v for k, v in back["meta"].items() if k != "input_weights"})
    old["atlas_tv"] = np.zeros_like(back["atlas_tv"])
    assert atlas_net.refresh_case(old, {})
    np.testing.assert_allclose(old["atlas_tv"], back["atlas_tv"], rtol=1e-4, atol=1e-6)
    name = meta["fused"][0]
    np.testing.assert_allclose(
        old[f"atlas_tv|{name}"], back[f"atlas_tv|{name}"], rtol=1e-4, atol=1e-6
    )
    assert atlas_net.weights_of(old["meta"]) == atlas_net.weights_of(back["meta"])


def _fake_case(chest: str, views: int, variant: int, rng, side: int = 16) -> dict:
    mw = float(physics.MU_WATER_PER_MM)
    truth = rng.normal(0.0, 300.0, (side, side, side)).astype(np.float32)
    mu = np.maximum(physics.hu_to_mu(truth), 0.0).astype(np.float32)
    noisy = (mu + rng.normal(0.0, 0.002, mu.shape)).astype(np.float32)
    case = {"truth_hu": truth, "body": np.ones_like(truth, bool)}
    for k in ("tv", "tv_support", "atlas", "atlas_tv"):
        case[k] = noisy
    others = {"chest_a", "chest_b", "chest_c"} - {chest}
    for o in others:
        case[f"atlas|{o}"] = case[f"atlas_tv|{o}"] = noisy
    case["meta"] = {"chest": chest, "views": views, "variant": variant, "mu_water": mw}
    return case


def test_train_script_scores_folds_ships_and_resumes(tmp_path, capsys):
    """scripts/train_atlas_net.py train on tiny cases of three 'chests': a model per fold
    (trained without its chest), the fold table, a shipped model trained on all three; a
    rerun keeps the finished folds."""
    from scripts import train_atlas_net

    rng = np.random.default_rng(0)
    for chest in ("chest_a", "chest_b", "chest_c"):
        for m in (0, 1):
            case = _fake_case(chest, 2, m, rng)
            atlas_net.save_case(tmp_path / "cases" / f"{chest}_v2_m{m}.npz", case)
    argv = ["train", "--out", str(tmp_path), "--steps", "3", "--width", "4", "--patch", "8"]
    argv += ["--batch", "1", "--ship", str(tmp_path / "ship"), "--report", str(tmp_path / "rep")]
    assert train_atlas_net.main(argv) == 0
    for chest in ("chest_a", "chest_b", "chest_c"):
        _, _, meta = atlas_net.load(tmp_path / "folds" / chest)
        assert chest not in meta["trained_on"] and len(meta["trained_on"]) == 2
    _, _, meta = atlas_net.load(tmp_path / "ship")
    assert meta["trained_on"] == ["chest_a", "chest_b", "chest_c"] and meta["cases"] == 6
    assert isinstance(meta["auto_views"], list) and meta["train"]["steps"] == 3
    import importlib.util

    spec = importlib.util.spec_from_file_location("shipped_cfg", tmp_path / "ship" / "config.py")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    c = cfg.get_config()
    assert c.width == 4 and c.train.steps == 3 and list(c.trained_on) == meta["trained_on"]
    assert c.depth == 3 == meta["depth"]
    assert (
        "python -m scripts.train_atlas_net train" in (tmp_path / "ship" / "config.py").read_text()
    )
    assert not (tmp_path / "folds" / "chest_a" / "config.py").exists()  # folds are not shipped
    text = (tmp_path / "rep" / "README.md").read_text()
    assert "| atlas_net |" in text and "| atlas_tv |" in text
    capsys.readouterr()
    assert train_atlas_net.main(argv[:-4] + ["--report", str(tmp_path / "rep2")]) == 0
    assert capsys.readouterr().err.count("done before, kept") == 3
    assert (tmp_path / "rep2" / "README.md").read_text().count("| atlas_net |") == 2
    # the grid probe scores each chest by its own fold model, on the grid and on blocks
    from scripts import atlas_net_grid_probe as gp

    for chest in ("chest_a", "chest_b", "chest_c"):  # big enough for SSIM's window on blocks
        case = _fake_case(chest, 2, 0, rng, side=32)
        atlas_net.save_case(tmp_path / "cases32" / f"{chest}_v2_m0.npz", case)
    rows = gp.probe(tmp_path / "cases32", tmp_path / "folds", views=2, factor=2)
    assert [r["chest"] for r in rows] == ["chest_a", "chest_b", "chest_c"]
    assert all(np.isfinite(r[k]) for r in rows for k in ("atlas_net", "atlas_tv_coarse"))
    a = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    np.testing.assert_allclose(gp.block_mean(a, 2)[0, 0, 0], np.mean(a[:2, :2, :2]))
    assert gp.block_mean(a, 4).item() == pytest.approx(a.mean())
    with pytest.raises(ValueError, match="--factor 3: does not divide"):
        gp.block_mean(a, 3)
