"""Checkpoint-based evaluation, reports, and prediction from X-ray images.

``evaluate(config, workdir)`` restores the best (or last, or a given step) checkpoint's EMA
parameters, reconstructs every volume of ``config.eval.split`` -- or, with ``ct_dir``, of
any folder of real CT volumes -- scores each one and writes, under ``out_dir`` (default
``WORKDIR/eval``, or ``WORKDIR/eval_<folder name>`` for a CT folder):

* ``metrics.json``: the means (and, for a split, also ``WORKDIR/metrics.json`` as before);
* ``per_volume.csv``: one row per volume (id, psnr, ssim, mae_hu, rmse_hu, drr_psnr, ...);
* ``volumes/<id>_pred.nii.gz`` and ``<id>_gt.nii.gz`` for the first
  ``config.eval.save_volumes`` volumes (HU, float32, with their spacing);
* ``report.html``: one self-contained page (PNG figures inlined as base64): the metric
  summary with its exact definition, per-volume table, GT | prediction | |error| montages,
  input DRRs beside DRRs re-projected from the prediction, and the PSNR distribution.

Metrics (``volume_scores``) are the primary definition of ``xct.metrics`` (HU clipped to
[-1000, 1024] scaled to [0, 1]; PSNR over the 3D volume with peak 1; 3D SSIM with a
Gaussian window of sigma 1.5 voxels; MAE/RMSE of the clipped HU) plus ``drr_psnr``: the
input views re-projected from the prediction compared with the input DRRs. When
``xct.metrics`` provides ``x2ct_metrics`` its values are added with an ``x2ct_`` prefix.

CT folders are read and preprocessed exactly as the ``ct_folder`` dataset builder does
(``io.read_ct`` -> ``io.preprocess`` to ``config.data.resolution`` voxels over
``config.data.fov_mm`` -> ``io.to_projector_frame`` -> ``physics.render_drrs`` at the
config's views); unreadable inputs are skipped and listed. Their NIfTI outputs are written
back in the preprocessed volume's own (LPS) frame, so they overlay the source scan; a
dataset split's volumes are written in the projector frame the datasets store.

Ensembles: ``which`` (``--checkpoint``) is a comma-separated list; each item is ``best``,
``last`` or a step of ``workdir``, or ``DIR[:best|last|STEP]`` for another workdir trained
with the same config. The prediction is the plain mean of the members' HU volumes.

``predict(config, workdir, xray_paths, angles_deg, output)`` reconstructs a NIfTI volume
from X-ray images.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime
import functools
import html
import io as _io
import json
import pathlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xct import checkpoint, geometry, input_pipeline, io, metrics, physics, sharding, train

METRIC_DEFINITION = (
    "HU clipped to [-1000, 1024] scaled to [0, 1]; PSNR over the 3D volume, peak 1; "
    "SSIM 3D Gaussian window sigma 1.5 voxels, data range 1; MAE/RMSE in HU"
)
DRR_DEFINITION = (
    "drr_psnr: DRRs of the predicted volume at the input angles (physics.render_drrs, "
    "monochromatic) against the input DRRs, in normalize_drr units (line integral / 10), "
    "peak 1, over all views and pixels"
)
#: Views every dataset builder stores (names end in ``_views8``), in nested order; a model
#: trained on ``k <= 8`` of them saw their first ``k`` angles.
DATASET_VIEWS = 8
#: Inputs smaller than this are scouts or slabs, not volumes (as in the ct_folder builder).
CT_SUFFIXES = io.CT_SUFFIXES
ERROR_MAP_MAX_HU = 500.0  # colour-scale top of the |error| maps (fixed, so maps compare)


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


def _restore(abstract, workdir: pathlib.Path, which: str):
    """``(state, step)`` of ``workdir``'s ``which`` checkpoint ("best" falls back to last)."""
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        if which in ("best", "last"):
            restored = ckpt.restore(abstract, which=which)
            if restored is None and which == "best":
                restored = ckpt.restore(abstract, which="last")
        else:
            steps = sorted(ckpt.last.all_steps())
            if steps and int(which) not in steps:
                raise ValueError(
                    f"--checkpoint: no step {which} in {workdir / 'checkpoints'} (has {steps})"
                )
            restored = ckpt.restore(abstract, step=int(which)) if steps else None
    finally:
        ckpt.close()
    if restored is None:
        raise ValueError(f"--workdir: no checkpoint in {workdir / 'checkpoints'}")
    state, _, step = restored
    return state, step


_BUILT: dict[str, tuple] = {}


def _built(config):
    """``(setup, mesh, abstract state)`` of ``config``, kept per config: tracing the model's
    init takes seconds, and notebooks and tests evaluate one config repeatedly."""
    key = config.to_json_best_effort(sort_keys=True)
    if key not in _BUILT:
        if len(_BUILT) >= 4:
            _BUILT.clear()
        setup, mesh, _, _, abstract, _ = train.build(config)
        _BUILT[key] = (setup, mesh, abstract)
    return _BUILT[key]


def restore_members(config, workdir, which: str = "best"):
    """``(setup, mesh, members)``: the model set-up and every checkpoint ``which`` names."""
    wanted = parse_checkpoints(which, workdir)
    for wd, _ in wanted:
        if not wd.is_dir():
            raise ValueError(f"--workdir: {wd} is not a directory")
    setup, mesh, abstract = _built(config)
    members = []
    for wd, w in wanted:
        state, step = _restore(abstract, wd, w)
        members.append(Member(wd, w, step, state.ema_params))
    return setup, mesh, members


def restore_params(config, workdir, which: str = "best"):
    """``(setup, mesh, ema_params, step)`` of one checkpoint of ``workdir``."""
    setup, mesh, members = restore_members(config, workdir, which)
    if len(members) != 1:
        raise ValueError(f"--checkpoint: expected one checkpoint, got {len(members)}")
    return setup, mesh, members[0].params, members[0].step


# ---------------------------------------------------------------------------------------
# Reconstruction, re-projection, scores


def make_predictor(setup: train.Setup):
    """Jitted ``(params, drr [B, V, r, r], angles_deg [B, V]) -> HU [B, r, r, r]``
    (``train.predict_ct``: patch models tile the volume with sliding windows).

    Compiled once per predictor (and per input shape), not once per call.
    """

    @jax.jit
    def predict_hu(params, drr, angles_deg):
        batch = {"drr": drr, "angles_deg": angles_deg}
        return physics.denormalize_ct(train.predict_ct(setup, params, batch))

    return predict_hu


def reconstruct(predict_hu, members: list[Member], drr, angles_deg, mesh) -> np.ndarray:
    """The ensemble's prediction: the mean of the members' HU volumes, ``[B, r, r, r]``.

    ``drr`` ``[B, V, r, r]`` (``normalize_drr`` units) and ``angles_deg`` ``[B, V]`` are host
    arrays; with a ``mesh`` the batch is split over its data axis (and must divide).
    """
    batch = {"drr": drr, "angles_deg": angles_deg}
    if mesh is not None:
        batch = sharding.shard_batch(batch, mesh)
    total = None
    for m in members:
        hu = np.asarray(jax.device_get(predict_hu(m.params, batch["drr"], batch["angles_deg"])))
        total = hu.astype(np.float64) if total is None else total + hu
    return (total / len(members)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("fov_mm", "sod_mm", "sdd_mm", "pixel_mm"))
def _render(hu, angles_deg, *, fov_mm: float, sod_mm: float, sdd_mm: float, pixel_mm: float):
    r = hu.shape[0]
    grid = geometry.VolumeGrid.centered((r, r, r), fov_mm / r)
    geom = geometry.from_poses(
        geometry.rotation_y(jnp.deg2rad(angles_deg.astype(jnp.float32))),
        jnp.zeros((angles_deg.shape[0], 3), jnp.float32),
        sod_mm=sod_mm,
        sdd_mm=sdd_mm,
        det_shape=(r, r),
        pixel_mm=pixel_mm,
    )
    return physics.normalize_drr(physics.render_drrs(hu, grid, geom))


def make_drr_renderer(config):
    """Jitted ``(hu [r, r, r], angles_deg [V]) -> DRRs [V, r, r]`` in ``normalize_drr`` units.

    The datasets' rendering (``physics.render_drrs``, monochromatic, noise-free) on the
    config's cone-beam orbit (``train.data_geometry``): the model's input geometry.
    """
    g = train.data_geometry(config)
    return functools.partial(
        _render, fov_mm=g["fov_mm"], sod_mm=g["sod_mm"], sdd_mm=g["sdd_mm"], pixel_mm=g["pixel_mm"]
    )


def volume_scores(pred_hu, true_hu, pred_drr, input_drr) -> dict[str, jax.Array]:
    """Per-volume scores, each ``[B]``: ``metrics.volume_metrics`` (and ``x2ct_metrics``
    when ``xct.metrics`` has it, keys prefixed ``x2ct_``) plus ``drr_psnr``.

    Args:
      pred_hu, true_hu: ``[B, Z, Y, X]`` HU.
      pred_drr, input_drr: ``[B, V, rows, cols]`` in ``normalize_drr`` units.
    """
    out = dict(metrics.volume_metrics(pred_hu, true_hu))
    if hasattr(metrics, "x2ct_metrics"):
        for k, v in metrics.x2ct_metrics(pred_hu, true_hu).items():
            out[k if k.startswith("x2ct") else f"x2ct_{k}"] = v
    out["drr_psnr"] = metrics.drr_psnr(pred_drr, input_drr, 1.0)
    return out


_scores = jax.jit(volume_scores)


def definitions() -> dict[str, str]:
    """The exact definition of every reported metric, as stored in metrics.json: the
    primary one (``definition``, unchanged), ``drr_psnr``'s and, when present, x2ct's."""
    out = {"definition": METRIC_DEFINITION, "definition_drr_psnr": DRR_DEFINITION}
    if hasattr(metrics, "x2ct_metrics"):
        doc = (metrics.x2ct_metrics.__doc__ or "xct.metrics.x2ct_metrics").strip().splitlines()
        x2ct = getattr(metrics, "DEFINITIONS", {}).get("x2ct", doc[0])
        out["definition_x2ct"] = f"x2ct_*: {x2ct}"
    return out


_PRIMARY = ("psnr", "ssim", "mae_hu", "rmse_hu", "drr_psnr")


def _ordered(keys) -> list[str]:
    """Score names in report order: the primary ones, then the rest sorted."""
    return [k for k in _PRIMARY if k in keys] + sorted(k for k in keys if k not in _PRIMARY)


# ---------------------------------------------------------------------------------------
# Examples: a dataset split or a folder of CT volumes


@dataclasses.dataclass
class Example:
    """One volume to reconstruct, in the projector frame the model works in."""

    id: str
    drr: np.ndarray  # [V, r, r] normalize_drr units
    angles_deg: np.ndarray  # [V]
    ct: np.ndarray  # [r, r, r] normalize_ct units
    grid: geometry.VolumeGrid  # where its NIfTI outputs are placed
    lps: bool  # outputs go back to the source's LPS frame (CT folders)
    source: str


def split_examples(config, split: str, num_views: int) -> Iterator[Example]:
    """The examples of a TFDS split, transformed as for evaluation (first ``num_views``)."""
    d = config.data
    src = input_pipeline.data_source(d.dataset, pathlib.Path(d.data_dir).expanduser(), split)
    t = input_pipeline.ExampleTransform(num_views=num_views)
    for i in range(len(src)):
        raw = src[i]
        ex = t(raw)
        name = raw.get("id", f"{split}-{i:05d}")
        name = name.decode() if isinstance(name, bytes) else str(name)
        r = ex["ct"].shape[0]
        grid = geometry.VolumeGrid.centered((r, r, r), tuple(float(s) for s in ex["spacing_mm"]))
        yield Example(name, ex["drr"], ex["angles_deg"], ex["ct"], grid, False, f"{split}[{i}]")


def find_ct_sources(ct_dir) -> list[pathlib.Path]:
    """Volume files (NIfTI, MHA/MHD, NRRD) and DICOM series folders under ``ct_dir``."""
    return io.find_ct_sources(ct_dir, what="--eval_ct_dir")


def eval_view_angles(num_views: int) -> np.ndarray:
    """The angles (degrees) of ``num_views`` views: the datasets' nested order's prefix."""
    return geometry.nested_view_angles(max(num_views, DATASET_VIEWS))[:num_views].astype(np.float32)


def ct_example(path, example_id: str, config, render, num_views: int) -> Example:
    """One CT file or DICOM folder, preprocessed and rendered as ``ct_folder`` does."""
    r, fov = int(config.data.resolution), float(config.data.fov_mm)
    hu, grid = io.read_ct(path)
    io.check_ct_volume(path, grid)
    hu, lps_grid = io.preprocess(hu, grid, r, fov)
    hu = io.to_projector_frame(hu)
    angles = eval_view_angles(num_views)
    drr = np.asarray(render(hu, angles), np.float32)
    # As stored by the dataset builder (int16 HU), then normalised as ExampleTransform does.
    ct = physics.normalize_ct(np.clip(np.round(hu), physics.HU_MIN, physics.HU_MAX))
    return Example(example_id, drr, angles, np.asarray(ct, np.float32), lps_grid, True, str(path))


def ct_dir_examples(config, ct_dir, render, num_views: int, skipped: list) -> Iterator[Example]:
    """Examples of every readable CT under ``ct_dir``; unreadable ones are printed and
    appended to ``skipped`` as ``(name, reason)``."""
    root = pathlib.Path(ct_dir).expanduser()
    sources = find_ct_sources(root)
    if not sources:
        raise ValueError(f"--eval_ct_dir: no CT volumes or DICOM series found in {root}")
    for p in sources:
        name = str(p.relative_to(root))
        try:
            yield ct_example(p, name, config, render, num_views)
        except ValueError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"skipped {name}: {reason}", flush=True)
            skipped.append((name, reason))


def from_projector_frame(vol: np.ndarray) -> np.ndarray:
    """Inverse of ``io.to_projector_frame``: a projector-frame volume back to LPS ``[z, y, x]``."""
    return np.ascontiguousarray(np.transpose(np.flip(np.asarray(vol), axis=1), (1, 0, 2)))


# ---------------------------------------------------------------------------------------
# Evaluation


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    chunk = []
    for x in items:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _safe_name(name: str, taken: set) -> str:
    for suffix in (".nii.gz",) + CT_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "volume"
    out, i = base, 1
    while out in taken:
        i += 1
        out = f"{base}_{i}"
    taken.add(out)
    return out


def _slices(vol: np.ndarray) -> dict[str, np.ndarray]:
    """Middle axial / coronal / sagittal slices of a projector-frame volume (z' posterior,
    y' head->foot, x' right->left), oriented for display (anterior and head up)."""
    z, y, x = (n // 2 for n in vol.shape)
    return {"axial": vol[:, y, :], "coronal": vol[z, :, :], "sagittal": vol[:, :, x].T}


def run_evaluation(
    config, setup, mesh, members, examples: Iterable[Example], out_dir: pathlib.Path
) -> tuple[list[dict], list[dict]]:
    """Reconstruct and score ``examples``; writes NIfTI volumes. Returns ``(rows, shown)``:
    per-volume rows and the figure data of the first ``config.eval.report_volumes``."""
    b = int(config.eval.batch_size)
    save = int(config.eval.get("save_volumes", 8))
    show = int(config.eval.get("report_volumes", 3))
    predict_hu = make_predictor(setup)
    render = make_drr_renderer(config)
    rows, shown, taken = [], [], set()
    for exs in _chunks(examples, b):
        n = len(exs)
        padded = exs + [exs[-1]] * (b - n)
        drr = np.stack([e.drr for e in padded])
        angles = np.stack([e.angles_deg for e in padded]).astype(np.float32)
        true_hu = np.asarray(physics.denormalize_ct(np.stack([e.ct for e in padded])))
        pred_hu = reconstruct(predict_hu, members, drr, angles, mesh)
        pred_drr = np.stack([np.asarray(render(pred_hu[i], angles[i])) for i in range(n)])
        pred_drr = np.concatenate([pred_drr, np.repeat(pred_drr[-1:], b - n, 0)])
        scores = jax.device_get(_scores(pred_hu, true_hu, pred_drr, drr))
        for i, e in enumerate(exs):
            row = {"id": e.id, **{k: float(scores[k][i]) for k in _ordered(scores)}}
            row.update(source=e.source, pred_nifti="", gt_nifti="")
            if save < 0 or len(rows) < save:
                stem = _safe_name(e.id, taken)
                to_file = from_projector_frame if e.lps else np.asarray
                for kind, vol in (("pred", pred_hu[i]), ("gt", true_hu[i])):
                    rel = f"volumes/{stem}_{kind}.nii.gz"
                    io.write_ct(out_dir / rel, to_file(vol), e.grid)
                    row[f"{kind}_nifti"] = rel
            if len(shown) < show:
                shown.append(
                    dict(
                        id=e.id,
                        psnr=row["psnr"],
                        gt=_slices(true_hu[i]),
                        pred=_slices(pred_hu[i]),
                        drr=physics.denormalize_drr(e.drr),
                        pred_drr=physics.denormalize_drr(pred_drr[i]),
                        angles=e.angles_deg,
                    )
                )
            rows.append(row)
    return rows, shown


def evaluate(
    config,
    workdir,
    which: str = "best",
    *,
    ct_dir=None,
    out_dir=None,
) -> dict:
    """Score ``config.eval.split`` (or every CT in ``ct_dir``); writes the outputs listed in
    the module docstring and returns the summary (also in ``metrics.json``)."""
    workdir = pathlib.Path(workdir).expanduser()
    views = int(config.eval.num_views) or int(config.data.num_views)
    skipped: list[tuple[str, str]] = []
    if ct_dir:
        ct_dir = pathlib.Path(ct_dir).expanduser()
        find_ct_sources(ct_dir)  # a missing folder fails before the model is built
    elif config.data.source == "tfds":
        train.ensure_dataset(config)
    setup, mesh, members = restore_members(config, workdir, which)
    if ct_dir:
        out_dir = pathlib.Path(out_dir or workdir / f"eval_{ct_dir.resolve().name}")
        examples = ct_dir_examples(config, ct_dir, make_drr_renderer(config), views, skipped)
    else:
        out_dir = pathlib.Path(out_dir or workdir / "eval")
        examples = split_examples(config, config.eval.split, views)
    out_dir = out_dir.expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, shown = run_evaluation(config, setup, mesh, members, examples, out_dir)
    if not rows:
        raise ValueError(
            f"--eval_ct_dir: none of the {len(skipped)} inputs in {ct_dir} could be read"
            if ct_dir
            else f"config.eval.split: {config.eval.split!r} has no examples"
        )
    keys = [k for k in rows[0] if k not in ("id", "source", "pred_nifti", "gt_nifti")]
    steps = [m.step for m in members]
    out = {
        "checkpoint_step": steps[0] if len(steps) == 1 else steps,
        "checkpoints": [m.describe() for m in members],
        "split": None if ct_dir else config.eval.split,
        "ct_dir": str(ct_dir) if ct_dir else None,
        "num_views": views,
        "dataset": None if ct_dir else config.data.dataset,
        **definitions(),
        **{k: float(np.mean([r[k] for r in rows])) for k in keys},
        "num_volumes": len(rows),
        "skipped": [{"input": n, "reason": why} for n, why in skipped],
        "eval_dir": str(out_dir),
    }
    text = json.dumps(out, indent=1)
    (out_dir / "metrics.json").write_text(text)
    if not ct_dir:
        (workdir / "metrics.json").write_text(text)
    _write_csv(out_dir / "per_volume.csv", rows)
    write_report(out_dir / "report.html", config, out, rows, shown, skipped)
    return out


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# ---------------------------------------------------------------------------------------
# Report


def _png(fig) -> str:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _montage_figure(item: dict):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 9.6), layout="constrained")
    axes = fig.subplots(3, 3)
    lo, hi = metrics.HU_WINDOW_MIN, metrics.HU_WINDOW_MAX
    for r, plane in enumerate(("axial", "coronal", "sagittal")):
        gt, pred = item["gt"][plane], item["pred"][plane]
        panels = (
            ("ground truth", gt, "gray", lo, hi, "HU"),
            ("prediction", pred, "gray", lo, hi, "HU"),
            ("|error|", np.abs(pred - gt), "magma", 0.0, ERROR_MAP_MAX_HU, "|error| HU"),
        )
        for c, (title, img, cmap, vmin, vmax, label) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{plane}: {title}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cb.set_label(label, fontsize=8)
            cb.ax.tick_params(labelsize=7)
    fig.suptitle(f"{item['id']}  (PSNR {item['psnr']:.2f} dB)", fontsize=11)
    return fig


def _drr_figure(item: dict):
    from matplotlib.figure import Figure

    drr, pred = np.asarray(item["drr"]), np.asarray(item["pred_drr"])
    v = drr.shape[0]
    fig = Figure(figsize=(2.4 * v + 1.0, 7.0), layout="constrained")
    axes = np.asarray(fig.subplots(3, v, squeeze=False))
    vmax = float(max(drr.max(), pred.max(), 1e-6))
    dmax = float(max(np.abs(pred - drr).max(), 1e-6))
    for j in range(v):
        for r, (title, img, cmap, top) in enumerate(
            (
                ("input", drr[j], "gray", vmax),
                ("re-projected", pred[j], "gray", vmax),
                ("|difference|", np.abs(pred[j] - drr[j]), "magma", dmax),
            )
        ):
            ax = axes[r, j]
            im = ax.imshow(img, cmap=cmap, vmin=0.0, vmax=top, interpolation="nearest")
            ax.set_title(f"{title} {float(item['angles'][j]):g} deg", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == v - 1:
                cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
                cb.set_label("line integral", fontsize=8)
                cb.ax.tick_params(labelsize=7)
    return fig


def _psnr_figure(rows: list[dict]):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    psnr = np.asarray([r["psnr"] for r in rows], np.float64)
    finite = psnr[np.isfinite(psnr)]
    fig = Figure(figsize=(7.0, 3.6), layout="constrained")
    ax_h, ax_s = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    if finite.size:
        ax_h.hist(finite, bins=max(1, min(20, finite.size)), color="tab:blue", alpha=0.8)
        mean = float(finite.mean())
        for ax in (ax_h, ax_s):
            ax.axvline(mean, color="k", ls="--", lw=1)
        ax_h.text(mean, ax_h.get_ylim()[1] * 0.95, f" mean {mean:.2f} dB", va="top", fontsize=8)
        jitter = np.random.default_rng(0).uniform(-0.3, 0.3, finite.size)
        ax_s.scatter(finite, jitter, s=14, color="tab:blue")
    ax_h.set_ylabel("volumes")
    ax_h.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_s.set_yticks([])
    ax_s.set_ylim(-1, 1)
    ax_s.set_xlabel("PSNR (dB) per volume")
    return fig


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _table(header: list[str], body: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def write_report(path, config, summary: dict, rows, shown, skipped) -> pathlib.Path:
    """The self-contained HTML report (figures inlined as base64 PNG)."""
    path = pathlib.Path(path)
    keys = [k for k in rows[0] if k not in ("id", "source", "pred_nifti", "gt_nifti")]
    stats = []
    for k in keys:
        x = np.asarray([r[k] for r in rows], np.float64)
        stats.append([k, *(float(f(x)) for f in (np.mean, np.std, np.median, np.min, np.max))])
    g = train.data_geometry(config)
    data = (
        f"CT folder {summary['ct_dir']}"
        if summary["ct_dir"]
        else f"split {summary['split']!r} of {summary['dataset']}"
    )
    angles = shown[0]["angles"] if shown else eval_view_angles(summary["num_views"])
    members = summary["checkpoints"]
    info = [
        ["data", data],
        ["volumes", f"{len(rows)} scored, {len(skipped)} skipped"],
        ["checkpoints", ", ".join(members)],
        ["prediction", "mean of the members' HU volumes" if len(members) > 1 else "one model"],
        ["views", f"{summary['num_views']} at {', '.join(f'{a:g}' for a in angles)} degrees"],
        ["volume", f"{g['resolution']}^3 voxels over {g['fov_mm']:g} mm"],
        [
            "orbit",
            f"cone beam, source to isocentre {g['sod_mm']:g} mm, to detector {g['sdd_mm']:g} mm",
        ],
    ]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>xct evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;"
        "padding:2px 8px;font-size:13px;text-align:right}th{background:#eee}"
        "td:first-child{text-align:left}img{max-width:100%}.def{background:#f6f6f6;"
        "padding:0.5em;font-family:monospace;font-size:13px}</style></head><body>",
        "<h1>xct evaluation report</h1>",
        f"<p>{datetime.datetime.now().isoformat(timespec='seconds')}</p>",
        _table(["", ""], info),
        "<h2>Summary</h2>",
        _table(["metric", "mean", "std", "median", "min", "max"], stats),
        "<p>Metric definitions:</p>",
        *(
            f"<p class='def'>{html.escape(v)}</p>"
            for k, v in summary.items()
            if k.startswith("definition")
        ),
        "<h2>PSNR per volume</h2>",
        f"<img alt='PSNR distribution' src='{_png(_psnr_figure(rows))}'>",
    ]
    for item in shown:
        parts += [
            f"<h2>{html.escape(item['id'])}</h2>",
            "<p>Middle slices; HU shown in the metric window [-1000, 1024]; |error| maps "
            f"capped at {ERROR_MAP_MAX_HU:g} HU.</p>",
            f"<img alt='montage' src='{_png(_montage_figure(item))}'>",
            "<p>Input DRRs and DRRs re-projected from the prediction (line integrals).</p>",
            f"<img alt='DRRs' src='{_png(_drr_figure(item))}'>",
        ]
    parts += [
        "<h2>Per-volume metrics</h2>",
        _table(
            ["id", *keys, "NIfTI (prediction)"],
            [[r["id"], *(r[k] for k in keys), r["pred_nifti"]] for r in rows],
        ),
    ]
    if skipped:
        parts += [
            "<h2>Skipped inputs</h2>",
            _table(["input", "reason"], [list(s) for s in skipped]),
        ]
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path


# ---------------------------------------------------------------------------------------
# Prediction from X-ray images


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
    """Reconstruct one volume from X-rays (an ensemble's mean when ``which`` lists several)."""
    if len(xray_paths) != len(angles_deg):
        raise ValueError(f"--angles_deg: {len(angles_deg)} angles for {len(xray_paths)} X-rays")
    setup, _, members = restore_members(config, workdir, which)
    g = train.data_geometry(config)
    r = g["resolution"]
    drr = np.stack([load_xray(p, r) for p in xray_paths])[None]
    drr = np.asarray(physics.normalize_drr(drr), np.float32)
    angles = np.asarray(angles_deg, np.float32)[None]
    hu = reconstruct(make_predictor(setup), members, drr, angles, None)[0]
    grid = geometry.VolumeGrid.centered((r, r, r), g["fov_mm"] / r)
    return io.write_ct(output, hu, grid)
