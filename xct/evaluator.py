"""One evaluator: reconstruct examples with a compiled predictor and score them.

The same object validates during training (``validate``: mean scores of a split, which
pick the best checkpoint) and produces the reported numbers of ``--mode=evaluate``
(``run``: per-volume rows, NIfTI volumes, figure data), so the two can never disagree.
Its predictor is compiled once per input shape (the Experiment's ``predict_hu``), and the
scores are one jitted function. Where no volume is kept (validation, or an evaluation that
writes and shows none), ``score`` runs the whole of it -- prediction, the members' mean,
re-projection and per-example scores -- as one jitted step on the mesh that returns the
scores only, so no volume comes to the host.

Scores (``volume_scores``) are the primary definition of ``xct.metrics`` (HU clipped to
[-1000, 1024] scaled to [0, 1]; PSNR over the 3D volume with peak 1; 3D SSIM with a
Gaussian window of sigma 1.5 voxels; MAE/RMSE of the clipped HU), the X2CT-compatible
variants with an ``x2ct_`` prefix, and ``drr_psnr``: the input views re-projected from the
prediction compared with the input DRRs.
"""

from __future__ import annotations

import functools
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np

from xct import data, geometry, io, metrics, physics, sharding

METRIC_DEFINITION = (
    "HU clipped to [-1000, 1024] scaled to [0, 1]; PSNR over the 3D volume, peak 1; "
    "SSIM 3D Gaussian window sigma 1.5 voxels, data range 1; MAE/RMSE in HU"
)
DRR_DEFINITION = (
    "drr_psnr: DRRs of the predicted volume at the input angles (physics.render_drrs, "
    "monochromatic) against the input DRRs, in normalize_drr units (line integral / 10), "
    "peak 1, over all views and pixels"
)
PRIMARY = ("psnr", "ssim", "mae_hu", "rmse_hu", "drr_psnr")


def _scores_of(pred_hu, true_hu, pred_drr, input_drr, body) -> dict[str, jax.Array]:
    out = dict(metrics.volume_metrics(pred_hu, true_hu, body))
    for k, v in metrics.x2ct_metrics(pred_hu, true_hu).items():
        out[k if k.startswith("x2ct") else f"x2ct_{k}"] = v
    if pred_drr is not None:
        out["drr_psnr"] = metrics.drr_psnr(pred_drr, input_drr, 1.0)
    return out


_scores = jax.jit(_scores_of)
_x2ct = jax.jit(metrics.x2ct_metrics)


def _score_step(predict, acquisition, params_list, drr, angles_deg, true_hu) -> dict:
    """Per-example scores ``[B]`` of the members' mean prediction from ``drr [B, V, r, r]``
    and ``angles_deg [B, V]`` against ``true_hu [B, r, r, r]`` (pure: jit it on the mesh)."""
    hu = sum(predict(p, drr, angles_deg) for p in params_list) / len(params_list)
    pred_drr = jax.vmap(functools.partial(data._render_views, acquisition))(hu, angles_deg)
    return _scores_of(hu, true_hu, pred_drr, drr, None)


def body_box(body: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a body mask ``[Z, Y, X]``, at least 7 voxels per side (x2ct's
    SSIM window); the whole volume where the mask is empty."""
    box = []
    for k in range(3):
        idx = np.flatnonzero(body.any(axis=tuple({0, 1, 2} - {k})))
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, body.shape[k])
        while hi - lo < 7:
            lo, hi = max(0, lo - 1), min(body.shape[k], hi + 1)
        box.append(slice(lo, hi))
    return tuple(box)


def volume_scores(pred_hu, true_hu, pred_drr=None, input_drr=None, *, body=None) -> dict:
    """Per-volume scores, each ``[B]``: ``metrics.volume_metrics`` (``psnr``, ``ssim``,
    ``mae_hu``, ``rmse_hu``), ``x2ct_metrics`` (keys prefixed ``x2ct_``), ``drr_psnr`` when
    DRRs are given, and with a ``body`` mask the same inside the body: ``psnr_body``,
    ``ssim_body``, ``mae_hu_body``, ``rmse_hu_body`` (restricted to the mask; SSIM windows
    see the whole volume) and ``x2ct_*_body`` (on the body's bounding box, ``body_box``, as
    X2CT's metrics take no mask). The one scorer of the evaluator and the quality table
    (``xct.scoring``).

    Args:
      pred_hu, true_hu: ``[B, Z, Y, X]`` HU.
      pred_drr, input_drr: ``[B, V, rows, cols]`` in ``normalize_drr`` units, or None.
      body: ``[B, Z, Y, X]`` boolean body mask of ``true_hu``, or None.
    """
    out = dict(_scores(pred_hu, true_hu, pred_drr, input_drr, body))
    if body is None:
        return out
    for k in ("psnr", "ssim", "mae_hu", "rmse_hu"):
        out[f"{k}_body"] = out.pop(f"{k}_mask")
    body = np.asarray(body)
    inside = []
    for i in range(body.shape[0]):
        box = body_box(body[i])
        inside.append(_x2ct(pred_hu[i][box][None], true_hu[i][box][None]))
    for k in inside[0]:
        name = k if k.startswith("x2ct") else f"x2ct_{k}"
        out[f"{name}_body"] = np.concatenate([np.asarray(d[k]) for d in inside])
    return out


def definitions() -> dict[str, str]:
    """The exact definition of every reported metric, as stored in metrics.json."""
    doc = (metrics.x2ct_metrics.__doc__ or "xct.metrics.x2ct_metrics").strip().splitlines()
    x2ct = getattr(metrics, "DEFINITIONS", {}).get("x2ct", doc[0])
    return {
        "definition": METRIC_DEFINITION,
        "definition_drr_psnr": DRR_DEFINITION,
        "definition_x2ct": f"x2ct_*: {x2ct}",
    }


def ordered(keys) -> list[str]:
    """Score names in report order: the primary ones, then the rest sorted."""
    return [k for k in PRIMARY if k in keys] + sorted(k for k in keys if k not in PRIMARY)


def chunks(items: Iterable, n: int) -> Iterator[list]:
    chunk = []
    for x in items:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def safe_name(name: str, taken: set) -> str:
    """A file stem for ``name`` not in ``taken`` (added to it)."""
    for suffix in (".nii.gz",) + io.CT_SUFFIXES:
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


def slices(vol: np.ndarray) -> dict[str, np.ndarray]:
    """Middle axial / coronal / sagittal slices of a projector-frame volume (z' posterior,
    y' head->foot, x' right->left), oriented for display (anterior and head up)."""
    z, y, x = (n // 2 for n in vol.shape)
    return {"axial": vol[:, y, :], "coronal": vol[z, :, :], "sagittal": vol[:, :, x].T}


def _chosen(items: list[dict], count: int, ids: Sequence[str]) -> list[dict]:
    """The figure data of ``ids`` (in that order) or ``count`` items spread evenly."""
    if ids:
        by_id = {item["id"]: item for item in items}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ValueError(
                f"config.eval.report_ids: {unknown} not among the evaluated volumes "
                f"{sorted(by_id)[:12]}"
            )
        return [by_id[i] for i in ids]
    if count <= 0 or not items:
        return []
    picks = np.unique(np.round(np.linspace(0, len(items) - 1, min(count, len(items)))))
    return [items[int(i)] for i in picks]


class Evaluator:
    """Reconstructs and scores ``data.Example``s.

    Args:
      predict_hu: jitted ``(params, drr [B, V, r, r], angles_deg [B, V]) -> HU [B, r, r, r]``.
      acquisition: the model's acquisition (for re-projecting predictions).
      mesh, rules: where batches go (split over the batch axis).
      batch_size: examples per call (a last partial batch is padded).
      num_views: views of each example handed to the model.
    """

    def __init__(
        self,
        predict_hu,
        acquisition: geometry.Acquisition,
        mesh,
        rules,
        batch_size: int,
        num_views: int,
    ):
        self.predict_hu = predict_hu
        self.acquisition = acquisition
        self.mesh, self.rules = mesh, rules
        self.batch_size, self.num_views = int(batch_size), int(num_views)
        self.render = data.drr_renderer(acquisition)
        predict = getattr(predict_hu, "jitted", predict_hu)  # traced inside the step below
        self._score_step = jax.jit(functools.partial(_score_step, predict, acquisition))
        if self.batch_size % sharding.batch_axis_size(mesh, rules):
            raise ValueError(
                f"config.eval.batch_size: {self.batch_size} is not divisible by the "
                f"{sharding.batch_axis_size(mesh, rules)} devices of the batch axis"
            )

    def reconstruct(self, params_list: Sequence, drr, angles_deg) -> np.ndarray:
        """The mean of the members' HU volumes ``[B, r, r, r]`` from host arrays ``drr
        [B, V, r, r]`` (``normalize_drr`` units) and ``angles_deg [B, V]``."""
        drr, angles_deg = np.asarray(drr, np.float32), np.asarray(angles_deg, np.float32)
        n = drr.shape[0]
        split = sharding.batch_axis_size(self.mesh, self.rules) * jax.process_count()
        pad = -n % split  # repeat the last example so the batch splits over the devices
        if pad:
            drr = np.concatenate([drr, np.repeat(drr[-1:], pad, 0)])
            angles_deg = np.concatenate([angles_deg, np.repeat(angles_deg[-1:], pad, 0)])
        # Every process holds the whole batch and hands over its own rows.
        rows = sharding.process_rows({"drr": drr, "angles_deg": angles_deg})
        batch = sharding.shard_batch(rows, self.mesh, self.rules)
        total = None
        for params in params_list:
            hu = sharding.fetch(self.predict_hu(params, batch["drr"], batch["angles_deg"]))
            hu = np.asarray(hu, np.float64)[:n]
            total = hu if total is None else total + hu
        return (total / len(params_list)).astype(np.float32)

    def score(self, params_list: Sequence, drr, angles_deg, true_hu) -> dict[str, np.ndarray]:
        """Per-example scores (``volume_scores``' keys without a body mask, each ``[B]``) of
        the members' mean prediction from host arrays ``drr [B, V, r, r]``, ``angles_deg
        [B, V]`` and ``true_hu [B, r, r, r]``: one jitted step on the mesh; only the scores
        come back to the host."""
        drr, angles_deg = np.asarray(drr, np.float32), np.asarray(angles_deg, np.float32)
        true_hu = np.asarray(true_hu, np.float32)
        n = drr.shape[0]
        split = sharding.batch_axis_size(self.mesh, self.rules) * jax.process_count()
        pad = -n % split  # repeat the last example so the batch splits over the devices
        host = {"drr": drr, "angles_deg": angles_deg, "ct": true_hu}
        if pad:
            host = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in host.items()}
        batch = sharding.shard_batch(sharding.process_rows(host), self.mesh, self.rules)
        with sharding.activation_context(self.mesh, self.rules):
            scores = self._score_step(
                list(params_list), batch["drr"], batch["angles_deg"], batch["ct"]
            )
        return {k: np.asarray(v)[:n] for k, v in sharding.fetch(scores).items()}

    def _scores_only(self, params_list, exs: list[data.Example]) -> dict:
        n, b = len(exs), self.batch_size
        padded = exs + [exs[-1]] * (b - n)
        true_hu = physics.denormalize_ct(np.stack([e.ct for e in padded]))
        return self.score(
            params_list,
            np.stack([e.drr for e in padded]),
            np.stack([e.angles_deg for e in padded]),
            np.asarray(true_hu),
        )

    def _score_chunk(self, params_list, exs: list[data.Example]):
        n, b = len(exs), self.batch_size
        padded = exs + [exs[-1]] * (b - n)
        drr = np.stack([e.drr for e in padded])
        angles = np.stack([e.angles_deg for e in padded]).astype(np.float32)
        true_hu = np.asarray(physics.denormalize_ct(np.stack([e.ct for e in padded])))
        pred_hu = self.reconstruct(params_list, drr, angles)
        pred_drr = np.stack([np.asarray(self.render(pred_hu[i], angles[i])) for i in range(n)])
        pred_drr = np.concatenate([pred_drr, np.repeat(pred_drr[-1:], b - n, 0)])
        scores = jax.device_get(volume_scores(pred_hu, true_hu, pred_drr, drr))
        return true_hu, pred_hu, pred_drr, scores

    def run(
        self,
        params_list: Sequence,
        examples: Iterable[data.Example],
        *,
        out_dir: pathlib.Path | None = None,
        save_volumes: int = 0,
        report_volumes: int = 0,
        report_ids: Sequence[str] = (),
    ) -> tuple[list[dict], list[dict]]:
        """Reconstruct (the mean of ``params_list``'s predictions) and score ``examples``.

        Writes ``out_dir/volumes/<id>_{pred,gt}.nii.gz`` for the first ``save_volumes``
        (-1: all). Returns ``(rows, shown)``: per-volume rows and the figure data of
        ``report_volumes`` volumes spread evenly over the list (first, last and between,
        so a folder of different CTs shows more than its first few names), or of the ids
        in ``report_ids`` when given.
        """
        rows, candidates, taken = [], [], set()
        volumes = out_dir is not None and save_volumes != 0 or report_volumes or report_ids
        for exs in chunks(examples, self.batch_size):
            if not volumes:  # scores only: one jitted step, nothing else comes back
                scores = self._scores_only(params_list, exs)
                rows += [_row(e, scores, i) for i, e in enumerate(exs)]
                continue
            true_hu, pred_hu, pred_drr, scores = self._score_chunk(params_list, exs)
            for i, e in enumerate(exs):
                row = _row(e, scores, i)
                if out_dir is not None and (save_volumes < 0 or len(rows) < save_volumes):
                    stem = safe_name(e.id, taken)
                    for kind, vol in (("pred", pred_hu[i]), ("gt", true_hu[i])):
                        rel = f"volumes/{stem}_{kind}.nii.gz"
                        io.write_ct(out_dir / rel, io.from_projector_frame(vol), e.grid)
                        row[f"{kind}_nifti"] = rel
                if (report_volumes and not report_ids) or e.id in report_ids:
                    candidates.append(
                        dict(
                            id=e.id,
                            psnr=row["psnr"],
                            gt=slices(true_hu[i]),
                            pred=slices(pred_hu[i]),
                            drr=physics.denormalize_drr(e.drr),
                            pred_drr=physics.denormalize_drr(pred_drr[i]),
                            angles=e.angles_deg,
                        )
                    )
                rows.append(row)
                if not report_ids and len(candidates) > 4 * max(report_volumes, 1):
                    candidates = candidates[::2]  # bounded memory, still spread evenly
        return rows, _chosen(candidates, report_volumes, report_ids)

    def validate(self, params, examples: Iterable[data.Example]) -> dict[str, float]:
        """Mean scores of ``examples`` (validation during training)."""
        rows, _ = self.run([params], examples)
        if not rows:
            raise ValueError("validation: the split has no examples")
        keys = [k for k in rows[0] if k not in ("id", "source", "pred_nifti", "gt_nifti")]
        return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def _row(e: data.Example, scores: dict, i: int) -> dict:
    """The per-volume row of example ``e``, the ``i``-th of ``scores``."""
    row = {"id": e.id, **{k: float(scores[k][i]) for k in ordered(scores)}}
    row.update(source=e.source, pred_nifti="", gt_nifti="")
    return row
