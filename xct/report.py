"""The HTML evaluation report and its figures.

``write_report`` writes one self-contained page (PNG figures inlined as base64): the
metric summary with its exact definitions, the per-volume table, GT | prediction | |error|
montages of the chosen volumes, their input DRRs beside DRRs re-projected from the
prediction, and the PSNR distribution.
"""

from __future__ import annotations

import base64
import datetime
import html
import io as _io
import pathlib

import numpy as np

from xct import data, geometry, metrics

ERROR_MAP_MAX_HU = 500.0  # colour-scale top of the |error| maps (fixed, so maps compare)


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


def write_report(
    path, acquisition: geometry.Acquisition, summary: dict, rows, shown, skipped
) -> pathlib.Path:
    """The self-contained HTML report (figures inlined as base64 PNG)."""
    path = pathlib.Path(path)
    keys = [k for k in rows[0] if k not in ("id", "source", "pred_nifti", "gt_nifti")]
    stats = []
    for k in keys:
        x = np.asarray([r[k] for r in rows], np.float64)
        stats.append([k, *(float(f(x)) for f in (np.mean, np.std, np.median, np.min, np.max))])
    source = (
        f"CT folder {summary['ct_dir']}"
        if summary["ct_dir"]
        else f"split {summary['split']!r} of {summary['dataset']}"
    )
    angles = (
        shown[0]["angles"] if shown else data.eval_view_angles(acquisition, summary["num_views"])
    )
    members = summary["checkpoints"]
    info = [
        ["data", source],
        ["volumes", f"{len(rows)} scored, {len(skipped)} skipped"],
        ["checkpoints", ", ".join(members)],
        ["prediction", "mean of the members' HU volumes" if len(members) > 1 else "one model"],
        ["views", f"{summary['num_views']} at {', '.join(f'{a:g}' for a in angles)} degrees"],
        ["volume", f"{acquisition.resolution}^3 voxels over {acquisition.fov_mm:g} mm"],
        [
            "orbit",
            f"cone beam, source to isocentre {acquisition.sod_mm:g} mm, to detector "
            f"{acquisition.sdd_mm:g} mm, {acquisition.detector_pixel_mm:.3g} mm pixels",
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
