"""Prediction from X-ray images: ``--mode=predict``.

``predict(exp, workdir, xray_paths, angles_deg, output)`` reconstructs one CT (HU NIfTI in
the patient's LPS frame) from X-rays with a trained model (the mean of an ensemble's
members when ``which`` lists several, ``xct.evaluate.restore_members``). Line integrals
(``.npy``) and detector images (``.png``) are read by ``xct.radiograph.load_xray`` at the
given angles. Clinical radiographs (DICOM) are calibrated first
(``predict_radiographs``): read with ``xct.radiograph``, registered to DRRs of a template
CT or of the model's own prediction (``xct.calibrate``), mapped to line integrals, then
predicted; a JSON sidecar (everything estimated) and an HTML page are written beside the
NIfTI.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from xct import evaluate, experiment, io, physics, radiograph, report, sharding


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
    exp = evaluate.as_experiment(exp)
    paths = [pathlib.Path(x) for x in xray_paths]
    if calibrate and paths and all(x.suffix.lower() in (".dcm", ".dicom") for x in paths):
        return predict_radiographs(exp, workdir, paths, angles_deg, output, which, template)
    if len(xray_paths) != len(angles_deg):
        raise ValueError(f"--angles_deg: {len(angles_deg)} angles for {len(xray_paths)} X-rays")
    members = evaluate.restore_members(exp, workdir, which)
    r = exp.acquisition.resolution
    hu = predict_hu(exp, members, [radiograph.load_xray(p, r) for p in xray_paths], angles_deg)
    # In the patient (LPS) frame, so 3D Slicer's axial view is axial.
    return io.write_ct(output, io.from_projector_frame(hu), exp.acquisition.grid())


def predict_hu(exp: experiment.Experiment, members, line_integrals, angles_deg) -> np.ndarray:
    """The members' mean HU ``[r, r, r]`` (projector frame, clipped to the training range)
    from ``line_integrals`` (``V`` arrays ``[r, r]``) at ``angles_deg`` (``[V]``)."""
    drr = np.asarray(physics.normalize_drr(np.stack(line_integrals)[None]), np.float32)
    angles = np.asarray(angles_deg, np.float32)[None]
    n = sharding.batch_axis_size(exp.mesh, exp.rules)
    hu = exp.evaluator.reconstruct(
        [m.params for m in members], np.repeat(drr, n, 0), np.repeat(angles, n, 0)
    )[0]
    return np.clip(hu, physics.HU_MIN, physics.HU_MAX)  # the range the model was trained on


def _mu(hu: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(physics.hu_to_mu(hu)), 0.0)


def _template_mu(path, acq) -> np.ndarray:
    """A template CT file as attenuation per mm on the model's cube (``ct_folder``'s
    preprocessing)."""
    try:
        hu = io.load_cube(path, resolution=acq.resolution, fov_mm=acq.fov_mm).hu
    except ValueError as e:
        raise ValueError(f"--template {path}: {e}") from None
    return _mu(hu)


def predict_radiographs(
    exp: experiment.Experiment, workdir, paths, angles_deg, output, which="best", template=None
) -> pathlib.Path:
    """``predict`` for clinical radiographs: read, calibrate (``xct.calibrate``), predict.

    Writes the NIfTI ``output``, ``output`` with ``.json`` (everything estimated: per view
    the pose, image scale, pixel size, distances, value map and residual mismatch) and
    ``.html`` (each calibrated radiograph beside the DRR of the result and their difference).
    """
    if angles_deg and len(angles_deg) != len(paths):
        raise ValueError(f"--angles_deg: {len(angles_deg)} angles for {len(paths)} X-rays")
    acq = exp.acquisition
    rads = [
        radiograph.read_radiograph(p, angle_deg=angles_deg[i] if angles_deg else None)
        for i, p in enumerate(paths)
    ]
    angles = np.asarray([g.angle_deg for g in rads], np.float32)
    members = evaluate.restore_members(exp, workdir, which)
    hu, fits, source = _calibrate_and_predict(exp, members, paths, rads, angles, template)
    out = io.write_ct(output, io.from_projector_frame(hu), acq.grid())
    reproj = np.asarray(physics.denormalize_drr(np.asarray(exp.evaluator.render(hu, angles))))
    views = [_view_record(*v) for v in zip(rads, fits, angles, reproj, strict=True)]
    sidecar = {
        "output": str(out),
        "template": source,
        "model_geometry": {
            "resolution": acq.resolution,
            "fov_mm": acq.fov_mm,
            "sod_mm": acq.sod_mm,
            "sdd_mm": acq.sdd_mm,
            "detector_pixel_mm": acq.detector_pixel_mm,
        },
        "views": views,
    }
    stem = str(output).removesuffix(".gz").removesuffix(".nii")
    with io.atomic_path(stem + ".json") as tmp:
        tmp.write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
    _radiograph_report(pathlib.Path(stem + ".html"), fits, reproj, views)
    return out


def _calibrate_and_predict(exp, members, paths, rads, angles, template):
    """``(hu, fits, template source)``: the radiographs calibrated jointly (one patient, one
    pose) against ``template`` (one round) or, without one, the model's prediction from an
    uncalibrated conversion (two rounds), then predicted from their line integrals."""
    from xct import calibrate as cal

    acq = exp.acquisition
    if template is not None:
        tmpl, rounds, source = _template_mu(template, acq), 1, str(template)
    else:  # bootstrap: the prediction from an uncalibrated conversion is the first template
        crude = [radiograph.load_xray(p, acq.resolution) for p in paths]
        tmpl = _mu(predict_hu(exp, members, crude, angles))
        rounds, source = 2, "the model's own prediction (2 rounds)"
    for _ in range(rounds):
        fits = cal.calibrate_views(
            [g.image for g in rads],
            tmpl,
            acq,
            angles,
            pixel_mm=[_mean_pixel(g) for g in rads],
            sdd_mm=[g.sdd_mm for g in rads],
            sod_mm=[g.sod_mm for g in rads],
        )
        hu = predict_hu(exp, members, [f.line_integrals for f in fits], angles)
        tmpl = _mu(hu)
    return hu, fits, source


def _view_record(g, f, angle_deg, reproj) -> dict:
    """The sidecar's entry for one view: radiograph ``g``, its calibration ``f`` and the DRR
    of the prediction ``reproj`` (line integrals)."""
    v, li = f.valid, f.line_integrals
    resid = float(np.sqrt(np.sum((reproj - li)[v] ** 2) / max(np.sum(li[v] ** 2), 1e-12)))
    if _mean_pixel(g):
        pixel_source = "tags"
    elif f.pixel_mm:
        pixel_source = "estimated: the fitted image scale and the tagged distances"
    else:
        pixel_source = "unknown (needs DistanceSourceToDetector and DistanceSourceToPatient)"
    return {
        "file": str(g.path),
        "angle_deg": float(angle_deg),
        "view_position": g.view_position,
        "rotation_deg": [round(float(x), 3) for x in f.rotation_deg],
        "translation_mm": [round(float(x), 2) for x in f.translation_mm],
        "image_scale_px_per_model_px": round(f.image_scale, 4),
        "pixel_mm": f.pixel_mm,
        "pixel_mm_source": pixel_source,
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


def _mean_pixel(g) -> float | None:
    return None if g.pixel_mm is None else float(np.mean(g.pixel_mm))


def _radiograph_report(path: pathlib.Path, fits, reproj, views) -> None:
    """The prediction page: each calibrated radiograph beside the DRR of the predicted CT
    and their difference, then everything estimated per view."""
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
    estimated = report.table(None, [[m["file"], json.dumps(m)] for m in views])
    report.write_page(
        path,
        "xct prediction from radiographs",
        [("", report.image(fig, "radiographs and DRRs")), ("Estimated", estimated)],
        heading="Prediction from radiographs",
    )
