"""Checkpoint-based evaluation and prediction from X-ray images.

``evaluate(exp, workdir)`` restores the best (or last, or a given step) checkpoint's EMA
parameters, reconstructs every volume of ``config.eval.split`` -- or, with ``ct_dir``, of
any folder of real CT volumes -- with the experiment's evaluator (the one that validates
during training, ``xct.evaluator``) and writes, under ``out_dir`` (default
``WORKDIR/eval``, or ``WORKDIR/eval_<folder name>`` for a CT folder):

* ``metrics.json``: the means (and, for a split, also ``WORKDIR/metrics.json``);
* ``per_volume.csv``: one row per volume (id, psnr, ssim, mae_hu, rmse_hu, drr_psnr, ...);
* ``volumes/<id>_pred.nii.gz`` and ``<id>_gt.nii.gz`` for the first
  ``config.eval.save_volumes`` volumes (HU, float32, with their spacing);
* ``report.html`` (``xct.report``).

CT folders are read and preprocessed exactly as the ``ct_folder`` dataset builder does
(``xct.data.ct_dir_examples``); unreadable inputs are skipped and listed. Their NIfTI
outputs are written back in the preprocessed volume's own (LPS) frame, so they overlay
the source scan; a dataset split's volumes (stored in the projector frame) are turned
back into the patient (LPS) frame too, so 3D Slicer's axial view shows axial slices.

Ensembles: ``which`` (``--checkpoint``) is a comma-separated list; each item is ``best``,
``last`` or a step of ``workdir``, or ``DIR[:best|last|STEP]`` for another workdir trained
with the same config. The prediction is the plain mean of the members' HU volumes.

``predict(exp, workdir, xray_paths, angles_deg, output)`` reconstructs a NIfTI volume
from X-ray images.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np

from xct import checkpoint, data, evaluator, experiment, io, physics, radiograph, report, sharding

# ---------------------------------------------------------------------------------------
# Checkpoints and ensembles


@dataclasses.dataclass(frozen=True)
class Member:
    """One restored checkpoint of an ensemble."""

    workdir: pathlib.Path
    which: str  # "best", "last" or a step, as asked
    step: int
    params: Any = dataclasses.field(repr=False)

    def describe(self) -> str:
        return f"{self.workdir}:{self.which}@{self.step}"


def _is_which(s: str) -> bool:
    return s in ("best", "last") or s.isdigit()


def parse_checkpoints(spec: str, workdir) -> list[tuple[pathlib.Path, str]]:
    """``--checkpoint`` -> ``[(workdir, which)]``.

    Comma-separated items: ``best``, ``last`` or a step (of ``workdir``), or ``DIR``,
    ``DIR:best``, ``DIR:last``, ``DIR:STEP`` (another workdir; ``DIR`` alone means its best).
    """
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise ValueError(
            f"--checkpoint: expected 'best', 'last', a step or a comma list, got {spec!r}"
        )
    out = []
    for item in items:
        if _is_which(item):
            out.append((pathlib.Path(workdir).expanduser(), item))
            continue
        path, sep, which = item.rpartition(":")
        if sep and path and _is_which(which):
            out.append((pathlib.Path(path).expanduser(), which))
        else:
            out.append((pathlib.Path(item).expanduser(), "best"))
    return out


def _restore_from(ckpt: checkpoint.Checkpointer, abstract, workdir: pathlib.Path, which: str):
    if which in ("best", "last"):
        restored = ckpt.restore(abstract, which=which)
        if restored is None and which == "best":
            restored = ckpt.restore(abstract, which="last")
        return restored
    steps = sorted(ckpt.last.all_steps())
    if steps and int(which) not in steps:
        raise ValueError(
            f"--checkpoint: no step {which} in {workdir / 'checkpoints'} (has {steps})"
        )
    return ckpt.restore(abstract, step=int(which)) if steps else None


def restore_state(exp: experiment.Experiment, workdir: pathlib.Path, which: str):
    """``(state, step)`` of ``workdir``'s ``which`` checkpoint ("best" falls back to last).

    A checkpoint whose shapes do not fit the experiment is a ``ValueError`` that lists the
    fields in which the config differs from the workdir's ``config.json``
    (``restore_members`` compares the shapes first: Orbax's failed restores leave threads
    that print at exit).
    """
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        restored = _restore_from(ckpt, exp.abstract_state, workdir, which)
    except ValueError as e:
        if "--checkpoint" in str(e):
            raise
        raise ValueError(_mismatch(exp, workdir, e)) from e
    finally:
        ckpt.close()
    if restored is None:
        raise ValueError(f"--workdir: no checkpoint in {workdir / 'checkpoints'}")
    state, _, step = restored
    return state, step


def _check_fits(exp: experiment.Experiment, workdir: pathlib.Path) -> None:
    """Raise the ``_mismatch`` error when the state shapes of the workdir's ``config.json``
    differ from the experiment's (nothing to compare without a readable ``config.json``)."""
    stored = workdir / "config.json"
    if not stored.is_file():
        return
    try:
        import ml_collections

        other = ml_collections.ConfigDict(json.loads(stored.read_text()))
        with other.unlocked():
            other.mesh = exp.config.mesh  # where it runs is not part of the checkpoint
            other.distributed = False
        theirs = experiment.Experiment.from_config(other).abstract_state
    except Exception:  # noqa: BLE001 - an old or foreign config.json: let Orbax decide
        return
    shapes = lambda t: [(a.shape, str(a.dtype)) for a in jax.tree.leaves(t)]  # noqa: E731
    if shapes(theirs) != shapes(exp.abstract_state):
        raise ValueError(_mismatch(exp, workdir, ValueError("state shapes differ")))


def _mismatch(exp, workdir: pathlib.Path, error: Exception) -> str:
    stored = workdir / "config.json"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not stored.is_file():
        return f"--workdir: the checkpoint in {workdir} does not fit this config ({first})"
    diffs = experiment.config_differences(exp.config, stored.read_text())
    listed = "; ".join(diffs[:6]) + (f"; ... {len(diffs) - 6} more" if len(diffs) > 6 else "")
    return (
        f"--config: the checkpoint in {workdir} was trained with another config "
        f"(differences: {listed or 'none found in config.json'}); evaluate with the config "
        f"file that trained it, or set those fields (its values are in {stored})"
    )


def restore_members(exp: experiment.Experiment, workdir, which: str = "best") -> list[Member]:
    """Every checkpoint ``which`` names (``parse_checkpoints``), EMA parameters."""
    wanted = parse_checkpoints(which, workdir)
    for wd, _ in wanted:
        if not wd.is_dir():
            raise ValueError(f"--workdir: {wd} is not a directory")
    for wd in dict.fromkeys(wd for wd, _ in wanted):  # once per workdir, not per checkpoint
        _check_fits(exp, wd)
    members = []
    for wd, w in wanted:
        state, step = restore_state(exp, wd, w)
        members.append(Member(wd, w, step, state.ema_params))
    return members


def _experiment(exp_or_config) -> experiment.Experiment:
    if isinstance(exp_or_config, experiment.Experiment):
        return exp_or_config
    return experiment.Experiment.from_config(exp_or_config)


# ---------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    exp: experiment.Experiment | Any,
    workdir,
    which: str = "best",
    *,
    ct_dir=None,
    out_dir=None,
    series_uids=None,
) -> dict:
    """Score ``config.eval.split`` (or every CT in ``ct_dir``); writes the outputs listed in
    the module docstring and returns the summary (also in ``metrics.json``).

    ``exp``: an Experiment or the config to build one from. ``series_uids``: ``{input
    name: SeriesInstanceUID}`` for DICOM folders of ``ct_dir`` with several CT series.
    """
    workdir = pathlib.Path(workdir).expanduser()
    skipped: list[tuple[str, str]] = []
    if ct_dir:
        ct_dir = pathlib.Path(ct_dir).expanduser()
        data.find_ct_sources(ct_dir)  # a missing folder fails before the model is built
    exp = _experiment(exp)
    views = exp.eval.num_views
    if not ct_dir:
        exp.data.prepare()
    members = restore_members(exp, workdir, which)
    if ct_dir:
        out_dir = pathlib.Path(out_dir or workdir / f"eval_{ct_dir.resolve().name}")
        examples = data.ct_dir_examples(
            ct_dir, exp.acquisition, views, skipped, series_uids=series_uids
        )
    else:
        out_dir = pathlib.Path(out_dir or workdir / "eval")
        examples = exp.data.examples(exp.eval.split, views)
        if examples is None:
            raise ValueError(
                f"config.data.source: {exp.config.data.source!r} has no {exp.eval.split!r} "
                "split to evaluate; pass --eval_ct_dir"
            )
    out_dir = out_dir.expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, shown = exp.evaluator.run(
        [m.params for m in members],
        examples,
        out_dir=out_dir,
        save_volumes=exp.eval.save_volumes,
        report_volumes=exp.eval.report_volumes,
        report_ids=exp.eval.report_ids,
    )
    if not rows:
        raise ValueError(
            f"--eval_ct_dir: none of the {len(skipped)} inputs in {ct_dir} could be read"
            if ct_dir
            else f"config.eval.split: {exp.eval.split!r} has no examples"
        )
    out = _summary(exp, members, rows, skipped, ct_dir, views, out_dir)
    text = json.dumps(out, indent=1)
    (out_dir / "metrics.json").write_text(text)
    if not ct_dir:
        (workdir / "metrics.json").write_text(text)
    _write_csv(out_dir / "per_volume.csv", rows)
    report.write_report(out_dir / "report.html", exp.acquisition, out, rows, shown, skipped)
    return out


def _summary(exp, members, rows, skipped, ct_dir, views, out_dir) -> dict:
    keys = [k for k in rows[0] if k not in ("id", "source", "pred_nifti", "gt_nifti")]
    steps = [m.step for m in members]
    return {
        "checkpoint_step": steps[0] if len(steps) == 1 else steps,
        "checkpoints": [m.describe() for m in members],
        "split": None if ct_dir else exp.eval.split,
        "ct_dir": str(ct_dir) if ct_dir else None,
        "num_views": views,
        "dataset": None if ct_dir else exp.config.data.get("dataset"),
        **evaluator.definitions(),
        **{k: float(np.mean([r[k] for r in rows])) for k in keys},
        "num_volumes": len(rows),
        "skipped": [{"input": n, "reason": why} for n, why in skipped],
        "eval_dir": str(out_dir),
    }


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# ---------------------------------------------------------------------------------------
# Prediction from X-ray images


def predict(
    exp: experiment.Experiment | Any,
    workdir,
    xray_paths,
    angles_deg,
    output,
    which: str = "best",
    *,
    template=None,
    calibrate: bool = True,
) -> pathlib.Path:
    """Reconstruct one volume from X-rays (an ensemble's mean when ``which`` lists several).

    ``exp``: an Experiment or the config to build one from. Prediction runs on the
    experiment's mesh (a ``spatial`` mesh splits the volume along z); the batch of one is
    repeated to fill the batch axis.

    Radiographs (DICOM ``.dcm``) are calibrated first (``calibrate=True``,
    ``predict_radiographs``): read with ``xct.radiograph`` (angles from ViewPosition unless
    ``angles_deg`` is given), registered to DRRs of ``template`` (a CT file) or, without
    one, of the model's own prediction (twice), and mapped to line integrals; a JSON sidecar
    and an HTML report are written beside ``output``.
    """
    exp = _experiment(exp)
    paths = [pathlib.Path(x) for x in xray_paths]
    if calibrate and paths and all(x.suffix.lower() in (".dcm", ".dicom") for x in paths):
        return predict_radiographs(exp, workdir, paths, angles_deg, output, which, template)
    if len(xray_paths) != len(angles_deg):
        raise ValueError(f"--angles_deg: {len(angles_deg)} angles for {len(xray_paths)} X-rays")
    members = restore_members(exp, workdir, which)
    r = exp.acquisition.resolution
    drr = np.stack([radiograph.load_xray(p, r) for p in xray_paths])[None]
    drr = np.asarray(physics.normalize_drr(drr), np.float32)
    angles = np.asarray(angles_deg, np.float32)[None]
    n = sharding.batch_axis_size(exp.mesh, exp.rules)
    hu = exp.evaluator.reconstruct(
        [m.params for m in members], np.repeat(drr, n, 0), np.repeat(angles, n, 0)
    )[0]
    hu = np.clip(hu, physics.HU_MIN, physics.HU_MAX)  # the range the model was trained on
    # In the patient (LPS) frame, so 3D Slicer's axial view is axial.
    return io.write_ct(output, io.from_projector_frame(hu), exp.acquisition.grid())


def _template_mu(path, acq) -> np.ndarray:
    """A template CT file as attenuation per mm on the model's cube (``ct_folder``'s
    preprocessing)."""
    try:
        hu = io.load_cube(path, resolution=acq.resolution, fov_mm=acq.fov_mm).hu
    except ValueError as e:
        raise ValueError(f"--template {path}: {e}") from None
    return np.maximum(np.asarray(physics.hu_to_mu(hu)), 0.0)


def predict_radiographs(
    exp: experiment.Experiment, workdir, paths, angles_deg, output, which="best", template=None
) -> pathlib.Path:
    """``predict`` for clinical radiographs: read, calibrate (``xct.calibrate``), predict.

    Writes the NIfTI ``output``, ``output`` with ``.json`` (everything estimated: per view
    the pose, image scale, pixel size, distances, value map and residual mismatch) and
    ``.html`` (each calibrated radiograph beside the DRR of the result and their difference).
    """
    from xct import calibrate as cal
    from xct import radiograph

    if angles_deg and len(angles_deg) != len(paths):
        raise ValueError(f"--angles_deg: {len(angles_deg)} angles for {len(paths)} X-rays")
    acq = exp.acquisition
    r = acq.resolution
    rads = [
        radiograph.read_radiograph(p, angle_deg=angles_deg[i] if angles_deg else None)
        for i, p in enumerate(paths)
    ]
    angles = np.asarray([g.angle_deg for g in rads], np.float32)
    members = restore_members(exp, workdir, which)
    n = sharding.batch_axis_size(exp.mesh, exp.rules)

    def predict_mu(li):
        drr = np.asarray(physics.normalize_drr(np.stack(li)[None]), np.float32)
        hu = exp.evaluator.reconstruct(
            [m.params for m in members], np.repeat(drr, n, 0), np.repeat(angles[None], n, 0)
        )[0]
        hu = np.clip(hu, physics.HU_MIN, physics.HU_MAX)  # the model's training range
        return hu, np.maximum(np.asarray(physics.hu_to_mu(hu)), 0.0)

    if template is not None:
        tmpl, rounds, source = _template_mu(template, acq), 1, str(template)
    else:  # bootstrap: the prediction from an uncalibrated conversion is the first template
        crude = [radiograph.load_xray(p, r) for p in paths]
        _, tmpl = predict_mu(crude)
        rounds, source = 2, "the model's own prediction (2 rounds)"
    for _ in range(rounds):
        fits = cal.calibrate_views(  # jointly: one patient, one pose
            [g.image for g in rads],
            tmpl,
            acq,
            angles,
            pixel_mm=[_mean_pixel(g) for g in rads],
            sdd_mm=[g.sdd_mm for g in rads],
            sod_mm=[g.sod_mm for g in rads],
        )
        hu, tmpl = predict_mu([f.line_integrals for f in fits])
    out = io.write_ct(output, io.from_projector_frame(hu), acq.grid())
    reproj = np.asarray(exp.evaluator.render(hu, angles))
    reproj = np.asarray(physics.denormalize_drr(reproj))
    views = []
    for g, f, a, rp in zip(rads, fits, angles, reproj, strict=True):
        v = f.valid
        li = f.line_integrals
        resid = float(np.sqrt(np.sum((rp - li)[v] ** 2) / max(np.sum(li[v] ** 2), 1e-12)))
        views.append(
            {
                "file": str(g.path),
                "angle_deg": float(a),
                "view_position": g.view_position,
                "rotation_deg": [round(float(x), 3) for x in f.rotation_deg],
                "translation_mm": [round(float(x), 2) for x in f.translation_mm],
                "image_scale_px_per_model_px": round(f.image_scale, 4),
                "pixel_mm": f.pixel_mm,
                "pixel_mm_source": "tags"
                if _mean_pixel(g)
                else (
                    "estimated: the fitted image scale and the tagged distances"
                    if f.pixel_mm
                    else "unknown (needs DistanceSourceToDetector and DistanceSourceToPatient)"
                ),
                "pixel_at_isocentre_mm": round(f.pixel_iso_mm, 4),
                "pixel_at_isocentre_source": "estimated: the fitted image scale, assuming the "
                "patient is the template's size",
                "sdd_mm": g.sdd_mm,
                "sod_mm": g.sod_mm,
                "value_map": {"range": list(f.map_range), "line_integrals": f.map_values.tolist()},
                "unsharp_masking_undone": {
                    "amount": round(f.unsharp[0], 4),
                    "sigma_model_px": round(f.unsharp[1], 4),
                },
                "calibration_mismatch": round(f.mismatch, 4),
                "prediction_drr_mismatch": round(resid, 4),
                "notes": list(g.notes),
            }
        )
    sidecar = {
        "output": str(out),
        "template": source,
        "model_geometry": {
            "resolution": r,
            "fov_mm": acq.fov_mm,
            "sod_mm": acq.sod_mm,
            "sdd_mm": acq.sdd_mm,
            "detector_pixel_mm": acq.detector_pixel_mm,
        },
        "views": views,
    }
    stem = str(output).removesuffix(".gz").removesuffix(".nii")
    pathlib.Path(stem + ".json").write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
    _radiograph_report(pathlib.Path(stem + ".html"), fits, reproj, views)
    return out


def _mean_pixel(g) -> float | None:
    return None if g.pixel_mm is None else float(np.mean(g.pixel_mm))


def _radiograph_report(path: pathlib.Path, fits, reproj, views) -> None:
    import base64
    import html
    import io as _io

    from matplotlib.figure import Figure

    v = len(fits)
    fig = Figure(figsize=(10, 3.4 * v), layout="constrained")
    axes = fig.subplots(v, 3, squeeze=False)
    for i, (f, rp, meta) in enumerate(zip(fits, reproj, views, strict=True)):
        top = float(np.percentile(f.line_integrals[f.valid], 99.5)) if f.valid.any() else 1.0
        panels = (
            ("radiograph, calibrated to line integrals", np.where(f.valid, f.line_integrals, 0)),
            ("DRR of the predicted CT", rp),
            ("difference (DRR - radiograph)", np.where(f.valid, rp - f.line_integrals, 0)),
        )
        for c, (title, img) in enumerate(panels):
            ax = axes[i, c]
            if c < 2:
                ax.imshow(img, cmap="gray", vmin=0, vmax=top)
            else:
                ax.imshow(img, cmap="RdBu_r", vmin=-0.3 * top, vmax=0.3 * top)
            ax.set_title(f"{meta['angle_deg']:g}°: {title}", fontsize=9)
            ax.axis("off")
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    rows = "".join(
        f"<tr><th>{html.escape(m['file'])}</th><td>{html.escape(json.dumps(m))}</td></tr>"
        for m in views
    )
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>xct prediction from radiographs</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{font-size:12px;"
        "text-align:left;vertical-align:top}</style><h1>Prediction from radiographs</h1>"
        f"<img src='{src}'><h2>Estimated</h2><table>{rows}</table>",
        encoding="utf-8",
    )
