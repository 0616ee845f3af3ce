"""HTML pages and their figures: the one page builder, and the evaluation report.

The page builder: ``page(title, sections)`` returns one self-contained HTML page (one
style sheet, figures inlined as base64 PNG) from ``(heading, body)`` sections whose bodies
are made with ``table``, ``image`` (a matplotlib figure, ``png``) and ``paragraph``;
``write_page`` writes it atomically (``xct.io.atomic_path``). The evaluation report, the
reconstruction page (``xct.reconstruct``) and the prediction page (``xct.predict``) are
built with it.

``write_report`` writes the evaluation report: the metric summary with its exact
definitions, the per-volume table, GT | prediction | |error| montages of the chosen
volumes, their input DRRs beside DRRs re-projected from the prediction, and the PSNR
distribution.
"""

from __future__ import annotations

import base64
import datetime
import html
import io as _io
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

from xct import data, geometry, io, metrics

ERROR_MAP_MAX_HU = 500.0  # colour-scale top of the |error| maps (fixed, so maps compare)

STYLE = (
    "body{font-family:sans-serif;margin:2em auto;max-width:1200px;padding:0 1em}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;"
    "padding:2px 8px;font-size:13px;text-align:right;vertical-align:top}th{background:#eee}"
    "td:first-child{text-align:left}img{max-width:100%}.def{background:#f6f6f6;"
    "padding:0.5em;font-family:monospace;font-size:13px}"
)

# --------------------------------------------------------------------------------------
# The page builder


def png(fig, *, dpi: int = 90) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (to inline in a page)."""
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image(fig, alt: str) -> str:
    """An ``<img>`` of a matplotlib figure, inlined (``png``)."""
    return f"<img alt='{html.escape(alt, quote=True)}' src='{png(fig)}'>"


def paragraph(text: str, *, css_class: str | None = None) -> str:
    """A ``<p>`` of plain ``text`` (escaped)."""
    cls = f" class='{css_class}'" if css_class else ""
    return f"<p{cls}>{html.escape(text)}</p>"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def table(header: Sequence[str] | None, rows: Iterable[Sequence]) -> str:
    """A ``<table>``: an optional header row, then one row per item of ``rows``; floats are
    shown with 4 significant digits, everything else as escaped text."""
    head = ""
    if header is not None:
        head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def page(
    title: str,
    sections: Iterable[tuple[str, str]],
    *,
    heading: str | None = None,
    dated: bool = True,
) -> str:
    """One self-contained HTML page.

    ``title``: the ``<title>`` and, unless ``heading`` is given, the ``<h1>``. ``sections``:
    ``(heading, body)`` pairs, ``body`` HTML (``table``, ``image``, ``paragraph``); an
    empty heading adds no ``<h2>``. ``dated``: the time it was made under the heading.
    """
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title if heading is None else heading)}</h1>",
    ]
    if dated:
        parts.append(f"<p>{datetime.datetime.now().isoformat(timespec='seconds')}</p>")
    for h, body in sections:
        if h:
            parts.append(f"<h2>{html.escape(h)}</h2>")
        parts.append(body)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(path, title: str, sections: Iterable[tuple[str, str]], **kw) -> pathlib.Path:
    """``page(title, sections, **kw)`` written to ``path`` (UTF-8) atomically: an
    interrupted write leaves no partial page. Returns the path."""
    path = pathlib.Path(path)
    text = page(title, sections, **kw)
    with io.atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# The evaluation report


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
    definitions = [v for k, v in summary.items() if k.startswith("definition")]
    sections = [
        ("", table(["", ""], info)),
        ("Summary", table(["metric", "mean", "std", "median", "min", "max"], stats)),
        (
            "",
            paragraph("Metric definitions:")
            + "".join(paragraph(v, css_class="def") for v in definitions),
        ),
        ("PSNR per volume", image(_psnr_figure(rows), "PSNR distribution")),
    ]
    for item in shown:
        body = [
            paragraph(
                "Middle slices; HU shown in the metric window [-1000, 1024]; |error| maps "
                f"capped at {ERROR_MAP_MAX_HU:g} HU."
            ),
            image(_montage_figure(item), "montage"),
            paragraph("Input DRRs and DRRs re-projected from the prediction (line integrals)."),
            image(_drr_figure(item), "DRRs"),
        ]
        sections.append((item["id"], "".join(body)))
    sections.append(
        (
            "Per-volume metrics",
            table(
                ["id", *keys, "NIfTI (prediction)"],
                [[r["id"], *(r[k] for k in keys), r["pred_nifti"]] for r in rows],
            ),
        )
    )
    if skipped:
        sections.append(("Skipped inputs", table(["input", "reason"], [list(x) for x in skipped])))
    return write_page(path, "xct evaluation", sections, heading="xct evaluation report")
