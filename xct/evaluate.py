"""Checkpoint-based evaluation: restoring checkpoints and ensembles, ``--mode=evaluate``.

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

Prediction from X-ray images (``--mode=predict``) is ``xct.predict``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from xct import checkpoint, data, evaluator, experiment, io, report

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
    fields in which the config differs from the workdir's ``config.json``: the
    ``Checkpointer`` compares the stored shapes (Orbax's item metadata) with
    ``exp.abstract_state`` before it reads any array.
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
    members = []
    for wd, w in wanted:
        state, step = restore_state(exp, wd, w)
        members.append(Member(wd, w, step, state.ema_params))
    return members


def as_experiment(exp_or_config) -> experiment.Experiment:
    """``exp_or_config`` if it is an Experiment, else the Experiment built from that config."""
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
    exp = as_experiment(exp)
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
                f"config.data.source: {exp.data.source!r} has no {exp.eval.split!r} "
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
    # Each file written whole or not at all (io.atomic_path); metrics.json last, so that it
    # exists only beside complete outputs (an interrupted run leaves none, a rerun all).
    _write_csv(out_dir / "per_volume.csv", rows)
    report.write_report(out_dir / "report.html", exp.acquisition, out, rows, shown, skipped)
    text = json.dumps(out, indent=1)
    for path in [out_dir / "metrics.json"] + ([] if ct_dir else [workdir / "metrics.json"]):
        with io.atomic_path(path) as tmp:
            tmp.write_text(text)
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
        "dataset": None if ct_dir else getattr(exp.data, "dataset", None),
        **evaluator.definitions(),
        **{k: float(np.mean([r[k] for r in rows])) for k in keys},
        "num_volumes": len(rows),
        "skipped": [{"input": n, "reason": why} for n, why in skipped],
        "eval_dir": str(out_dir),
    }


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
