"""Evaluation: metrics.json, per-volume CSV, NIfTI outputs, HTML report, CT folders, ensembles.

The module fixture builds a tiny synthetic dataset and writes two checkpoints (steps 2 and
4, EMA parameters drawn at random in the shapes of the Experiment's state): compiling the smoke
U-Net's train step takes minutes on 2 shared cores, far more than this file's budget, and
evaluation only needs restorable checkpoints. ``test_main_trains_then_evaluates`` (slow)
runs the real smoke training and evaluation through ``xct.main``.
"""

import csv
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from xct import checkpoint, data, evaluate, evaluator, io, metrics, phantoms, physics
from xct.configs import quickstart
from xct.experiment import Experiment
from xct.geometry import VolumeGrid

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPACING_MM = 400.0 / 32  # smoke: 32^3 voxels over 400 mm


def _config(data_dir):
    c = quickstart.get_config("smoke")
    c.data.tfds.data_dir = str(data_dir)
    c.data.tfds.split_sizes = {"train": 1, "validation": 1, "test": 2}  # a padded batch of 4
    c.eval.save_volumes = 1  # fewer than the 2 test volumes: the cap is exercised
    c.eval.report_volumes = 1
    return c


def _random_state(abstract, seed: int):
    """A train state with the shapes of ``abstract`` and random float leaves."""
    rng = np.random.default_rng(seed)

    def leaf(a):
        if jax.dtypes.issubdtype(a.dtype, np.floating):
            return rng.normal(0.0, 0.05, a.shape).astype(a.dtype)
        return np.zeros(a.shape, a.dtype)

    return jax.tree.map(leaf, abstract)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``(experiment, workdir)``: the dataset built, checkpoints at steps 2 and 4 (4 is best)."""
    from data_pipelines import build

    root = tmp_path_factory.mktemp("evaluate")
    c = _config(root / "data")
    t = c.data.tfds
    build.build(t.dataset, t.data_dir, split_sizes=dict(t.split_sizes))
    exp = Experiment.from_config(c)
    abstract = exp.abstract_state
    workdir = root / "run"
    ckpt = checkpoint.Checkpointer(workdir)
    for step in (2, 4):
        state = _random_state(abstract, step).replace(step=np.asarray(step, np.int32))
        ckpt.save(step, state, {}, force=True)
    ckpt.save_best(4, state, {"val_psnr": 10.0})
    ckpt.close()
    return exp, workdir


def _nifti(path):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_split_writes_metrics_csv_volumes_and_report(run, browser_or_none):
    c, workdir = run
    out = evaluate.evaluate(c, workdir)
    assert out["checkpoint_step"] == 4 and out["num_volumes"] == 2
    saved = (workdir / "metrics.json").read_text()
    assert saved == (workdir / "eval" / "metrics.json").read_text()
    for key in ("psnr", "ssim", "mae_hu", "rmse_hu", "drr_psnr", "split", "definition"):
        assert key in saved
    assert np.isfinite(out["psnr"]) and np.isfinite(out["drr_psnr"])
    assert out["definition"] == evaluator.METRIC_DEFINITION  # unchanged; others are added

    rows = _rows(workdir / "eval" / "per_volume.csv")
    assert len({r["id"] for r in rows}) == 2 and all(r["id"].startswith("chest-2") for r in rows)
    assert list(rows[0])[:6] == ["id", "psnr", "ssim", "mae_hu", "rmse_hu", "drr_psnr"]
    np.testing.assert_allclose(np.mean([float(r["psnr"]) for r in rows]), out["psnr"], rtol=1e-5)

    # One of the two volumes is saved (eval.save_volumes = 1), readable, 12.5 mm voxels.
    vols = sorted(p.name for p in (workdir / "eval" / "volumes").iterdir())
    assert len(vols) == 2 and [r["pred_nifti"] != "" for r in rows] == [True, False]
    pred, img = _nifti(workdir / "eval" / rows[0]["pred_nifti"])
    gt, _ = _nifti(workdir / "eval" / rows[0]["gt_nifti"])
    assert pred.shape == gt.shape == (32, 32, 32)
    np.testing.assert_allclose(img.GetSpacing(), (SPACING_MM,) * 3, rtol=1e-6)
    assert gt.min() < -900 and gt.max() > 300  # a chest in HU
    # Written in the patient (LPS) frame, which Slicer shows right: back in the projector
    # frame it is the example's ground truth.
    ex = next(c.data.examples(c.eval.split, c.num_views))
    assert ex.id == rows[0]["id"]
    np.testing.assert_allclose(io.to_projector_frame(gt), physics.denormalize_ct(ex.ct), atol=0.05)
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel())
    # The CSV holds the primary metrics of exactly these volumes.
    m = metrics.volume_metrics(pred[None], gt[None])
    np.testing.assert_allclose(float(m["psnr"][0]), float(rows[0]["psnr"]), rtol=1e-4)
    np.testing.assert_allclose(float(m["mae_hu"][0]), float(rows[0]["mae_hu"]), rtol=1e-4)

    report = (workdir / "eval" / "report.html").read_text()
    if browser_or_none:
        browser_or_none(workdir / "eval" / "report.html", min_images=2)
    assert evaluator.METRIC_DEFINITION in report and evaluator.DRR_DEFINITION in report
    # PSNR distribution, then one montage and one DRR figure (eval.report_volumes = 1).
    assert report.count("src='data:image/png;base64,") == 3
    assert all(r["id"] in report for r in rows)


def test_ensemble_is_the_mean_of_its_members(run, tmp_path):
    c, workdir = run
    out = evaluate.evaluate(c, workdir, "2,last", out_dir=tmp_path)
    assert out["checkpoint_step"] == [2, 4] and len(out["checkpoints"]) == 2
    rows = _rows(tmp_path / "per_volume.csv")
    ens = io.to_projector_frame(_nifti(tmp_path / rows[0]["pred_nifti"])[0])  # LPS on disk

    members = evaluate.restore_members(c, workdir, "2,4")
    ex = next(c.data.examples(c.eval.split, c.num_views))
    assert ex.id == rows[0]["id"]
    drr = np.repeat(ex.drr[None], 4, 0)  # a batch the 4 test devices divide
    angles = np.repeat(ex.angles_deg[None], 4, 0)
    singles = [c.evaluator.reconstruct([m.params], drr, angles)[0] for m in members]
    assert np.abs(singles[0] - singles[1]).max() > 1.0  # the members differ
    np.testing.assert_allclose(ens, (singles[0] + singles[1]) / 2, atol=1e-3)


def _write_synthetic_ct(path, seed):
    """A chest phantom saved as a CT scan would be: LPS, anisotropic voxels, not centred."""
    grid = VolumeGrid((40, 48, 48), (12.0, 10.0, 10.0), origin_xyz_mm=(-200.0, 30.0, -240.0))
    proj_grid = VolumeGrid.centered((48, 40, 48), (10.0, 12.0, 10.0))  # the projector frame
    hu, _ = phantoms.chest_phantom(seed, proj_grid)
    return io.write_ct(path, io.from_projector_frame(hu), grid)


def test_eval_ct_dir_renders_scores_and_skips_unreadable_files(run, tmp_path):
    from data_pipelines import common, ct_folder

    c, workdir = run
    cts = tmp_path / "cts"
    _write_synthetic_ct(cts / "a.nii.gz", 7)
    _write_synthetic_ct(cts / "sub" / "b.mha", 8)
    (cts / "broken.nii.gz").write_bytes(b"\x1f\x8b not a volume" * 10)
    (cts / "notes.txt").write_text("not a CT, not a candidate")
    out = evaluate.evaluate(c, workdir, "last", ct_dir=cts, out_dir=tmp_path / "out")

    assert out["num_volumes"] == 2 and out["ct_dir"] == str(cts)
    assert [s["input"] for s in out["skipped"]] == ["broken.nii.gz"]
    rows = _rows(tmp_path / "out" / "per_volume.csv")
    assert [r["id"] for r in rows] == ["a.nii.gz", "sub/b.mha"]
    report = (tmp_path / "out" / "report.html").read_text()
    assert "broken.nii.gz" in report and "Skipped inputs" in report

    # Ground truth: the ct_folder preprocessing, written back on the preprocessed (LPS) grid.
    gt, img = _nifti(tmp_path / "out" / rows[0]["gt_nifti"])
    hu, grid = io.read_ct(cts / "a.nii.gz")
    want, want_grid = io.preprocess(hu, grid, 32, 400.0)
    np.testing.assert_allclose(gt, np.clip(np.round(want), -1024, 3071), atol=0.01)
    # io.preprocess crops 12 mm slices to round(400 / 12) = 33 of them: 396 mm over 32 voxels.
    np.testing.assert_allclose(img.GetSpacing(), want_grid.spacing_xyz_mm, rtol=1e-6)
    np.testing.assert_allclose(img.GetSpacing(), (SPACING_MM, SPACING_MM, 12.375), rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), want_grid.origin_xyz_mm, atol=1e-3)

    # The inputs are exactly what the ct_folder dataset builder stores (first 2 of 8 views).
    ex = data.ct_example(cts / "a.nii.gz", "a", c.acquisition, 2)
    ref = ct_folder.make_ct_example(str(cts / "a.nii.gz"), "a", common.ViewSpec(32, 8, 400.0))
    np.testing.assert_allclose(ex.angles_deg, ref["angles_deg"][:2])
    np.testing.assert_allclose(ex.drr * 10.0, ref["drr"][:2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ex.ct * 4095.0 - 1024.0, ref["ct_hu"], atol=0.01)


def test_finds_volume_files_and_dicom_series_in_the_shared_cts(shared_ct_dir):
    sources = [str(p.relative_to(shared_ct_dir)) for p in data.find_ct_sources(shared_ct_dir)]
    assert "chest_4dct_phase00_2mm.nii.gz" in sources
    assert "dicom/totalseg_abdomen_series" in sources


def test_projector_frame_round_trip():
    hu = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(io.from_projector_frame(io.to_projector_frame(hu)), hu)


def test_parse_checkpoints(tmp_path):
    wd = tmp_path / "run"
    assert evaluate.parse_checkpoints("best", wd) == [(wd, "best")]
    assert evaluate.parse_checkpoints("best, last,120", wd) == [
        (wd, "best"),
        (wd, "last"),
        (wd, "120"),
    ]
    other = tmp_path / "other"
    assert evaluate.parse_checkpoints(f"{other},{other}:60,{other}:last", wd) == [
        (other, "best"),
        (other, "60"),
        (other, "last"),
    ]
    with pytest.raises(ValueError, match="--checkpoint"):
        evaluate.parse_checkpoints(" , ", wd)


def test_clear_errors(run, tmp_path):
    c, workdir = run
    with pytest.raises(ValueError, match="--eval_ct_dir: .* is not a directory"):
        evaluate.evaluate(c, workdir, ct_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no CT volumes"):
        evaluate.evaluate(c, workdir, ct_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="--workdir: .* is not a directory"):
        evaluate.evaluate(c, tmp_path / "nothing")
    with pytest.raises(ValueError, match="--workdir: no checkpoint in"):
        evaluate.evaluate(c, tmp_path / "empty")
    with pytest.raises(ValueError, match="no step 3 .*has \\[2, 4\\]"):
        evaluate.evaluate(c, workdir, "3")


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections
def test_cli_prints_one_error_line(tmp_path, capsys):
    from absl import flags

    from xct import main

    argv = [
        "xct.main",
        f"--config={ROOT / 'configs' / 'quickstart.py'}:smoke",
        f"--workdir={tmp_path}",
        "--mode=evaluate",
        f"--eval_ct_dir={tmp_path / 'missing'}",
    ]
    try:
        rc = main.main(flags.FLAGS(argv))
    finally:
        flags.FLAGS.unparse_flags()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: --eval_ct_dir:"), err


@pytest.mark.slow  # the smoke train step takes minutes to compile on 2 cores
def test_main_trains_then_evaluates(tmp_path):
    base = [
        sys.executable,
        "-m",
        "xct.main",
        f"--config={ROOT / 'configs' / 'quickstart.py'}:smoke",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.data_dir={tmp_path / 'data'}",
    ]
    p = subprocess.run(
        base + ["--mode=train"], cwd=ROOT, check=True, timeout=1800, capture_output=True, text=True
    )
    assert (tmp_path / "run" / "eval" / "report.html").exists()
    # A quiet terminal: progress and results, no absl/XLA log lines or TFDS banners.
    noise = re.compile(
        r"^[IWEF]\d{4} |slow_operation_alarm|Unable to initialize backend|Downloading"
    )
    lines = (p.stdout + p.stderr).replace("\r", "\n").splitlines()
    assert not [ln for ln in lines if noise.search(ln)], lines
    assert any(ln.startswith("step ") and "ETA" in ln for ln in lines), lines
    p = subprocess.run(
        base + ["--mode=evaluate", "--checkpoint=best,last"],
        cwd=ROOT,
        check=True,
        timeout=1800,
        capture_output=True,
        text=True,
    )
    assert "PSNR" in p.stdout and "report.html" in p.stdout
    rows = _rows(tmp_path / "run" / "eval" / "per_volume.csv")
    assert len(rows) == 2  # the smoke test split


def test_a_stored_dataset_unlike_the_config_is_refused(run):
    """A dataset built with other split sizes (e.g. by a :smoke run in the same data_dir)
    is not silently reused."""
    exp, _ = run
    c = exp.config.copy_and_resolve_references()
    c.data.tfds.split_sizes = {"train": 80, "validation": 8, "test": 8}
    with pytest.raises(ValueError, match="split_sizes: asks test=8, train=80, validation=8"):
        Experiment.from_config(c).data.prepare()
    c = exp.config.copy_and_resolve_references()
    c.data.num_views = 9
    with pytest.raises(ValueError, match="num_views: 9 views"):
        Experiment.from_config(c).data.prepare()


def test_tfds_stream_gives_the_step_exactly_its_fields(run):
    """The stored examples also carry labels, ids and geometry: the step gets its own fields
    in its own shapes, sharded on the mesh."""
    c = run[0].config.copy_and_resolve_references()
    c.data.batch_size, c.mesh.data = 1, 1  # the fixture's train split holds one example
    exp = Experiment.from_config(c)
    want = exp.dummy_batch()
    batch = exp.data.open(exp.mesh, exp.rules, None, 0).batch(0)
    assert set(batch) == set(want)
    for k, v in want.items():
        assert batch[k].shape == v.shape and batch[k].dtype == v.dtype, k


def test_report_volumes_are_spread_over_the_list_or_chosen():
    items = [{"id": f"v{i}"} for i in range(10)]
    assert [x["id"] for x in evaluator._chosen(items, 3, ())] == ["v0", "v4", "v9"]
    assert [x["id"] for x in evaluator._chosen(items, 20, ())] == [f"v{i}" for i in range(10)]
    assert [x["id"] for x in evaluator._chosen(items, 3, ("v7", "v2"))] == ["v7", "v2"]
    with pytest.raises(ValueError, match="report_ids"):
        evaluator._chosen(items, 3, ("chest",))


def test_a_checkpoint_of_another_config_names_the_differing_fields(run, tmp_path):
    exp, workdir = run
    other = tmp_path / "run"
    shutil.copytree(workdir, other)
    (other / "config.json").write_text(exp.config.to_json_best_effort(indent=1))
    c = exp.config.copy_and_resolve_references()
    c.model.base_features = 2
    with pytest.raises(ValueError, match=r"model\.base_features: 2 \(this config\) != 4"):
        evaluate.restore_members(Experiment.from_config(c), other, "last")


@pytest.mark.parametrize("with_template", [True, False])
def test_predict_from_a_cr_radiograph_writes_ct_sidecar_and_report(
    run, tmp_path, with_template, browser_or_none
):
    """A CR DICOM (MONOCHROME1, PixelSpacing 0\\0) through --mode=predict's path: read,
    calibrated against a template CT (or the model's own prediction), predicted; the NIfTI,
    the JSON sidecar and the HTML report are written."""
    import json

    from test_radiograph import _write_dicom

    from xct import predict, projector

    exp, workdir = run
    acq = exp.acquisition
    hu, _ = phantoms.chest_phantom(4, acq.grid())
    drr = np.asarray(projector.forward_project(physics.hu_to_mu(hu), acq.grid(), acq.orbit([0.0])))[
        0
    ]
    shown = np.kron(1.5 * np.maximum(drr, 0) ** 0.8, np.ones((3, 3)))  # a processed, finer image
    stored = np.round(4095 - 4095 * shown / shown.max()).astype(np.uint16)  # MONOCHROME1
    dcm = _write_dicom(tmp_path / "pa.dcm", stored, pi="MONOCHROME1", PixelSpacing=[0, 0])
    template = None
    if with_template:
        template = io.write_ct(tmp_path / "template.nii.gz", np.asarray(hu), acq.grid())
    out = tmp_path / "ct.nii.gz"
    path = predict.predict(exp, workdir, [dcm], [], out, "best", template=template)
    assert path.exists()
    sidecar = json.loads((tmp_path / "ct.json").read_text(encoding="utf-8"))
    (view,) = sidecar["views"]
    assert view["angle_deg"] == 0.0 and view["pixel_mm"] is None
    assert len(view["rotation_deg"]) == 3 and view["image_scale_px_per_model_px"] > 1.0
    assert np.all(np.diff(view["value_map"]["line_integrals"]) > 0)
    assert "data:image/png;base64" in (tmp_path / "ct.html").read_text(encoding="utf-8")
    if browser_or_none:
        browser_or_none(tmp_path / "ct.html")


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_an_interrupted_evaluation_leaves_no_partial_file_and_a_rerun_the_same(
    run, tmp_path, monkeypatch
):
    """Killed while writing the report: no report, no metrics.json, no temporary file; a
    rerun in the same folder gives the files an uninterrupted run gives."""
    import json

    from xct import report

    c, workdir = run
    evaluate.evaluate(c, workdir, "last", out_dir=tmp_path / "whole")
    image = report.image

    def killed(fig, alt):
        if alt == "DRRs":
            raise KeyboardInterrupt
        return image(fig, alt)

    monkeypatch.setattr(report, "image", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(c, workdir, "last", out_dir=tmp_path / "again")
    left = _files(tmp_path / "again")
    assert "metrics.json" not in left and "report.html" not in left
    assert "per_volume.csv" in left and not [n for n in left if "/." in n or n.startswith(".")]
    monkeypatch.undo()
    evaluate.evaluate(c, workdir, "last", out_dir=tmp_path / "again")
    whole, again = _files(tmp_path / "whole"), _files(tmp_path / "again")
    assert sorted(again) == sorted(whole) and len(whole) >= 5  # csv, json, html, 2 volumes
    for name in whole:
        if name == "metrics.json":  # names its own folder
            a, b = (json.loads(d[name]) for d in (whole, again))
            assert a.pop("eval_dir") != b.pop("eval_dir") and a == b
        elif name != "report.html":  # dated
            assert again[name] == whole[name], name
