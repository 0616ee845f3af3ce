"""Smoke test of scripts/quality_table.py: a 16^3 run writes finite tables, CSV, JSON, PNG."""

import csv
import json
import math

import numpy as np
import pytest

from scripts import quality_table
from xct import geometry


@pytest.mark.parametrize("views", [2, 4, 8, 64])
def test_fdk_view_weights_make_a_half_scan(views):
    angles = geometry.nested_view_angles(views)  # over 180 degrees
    w = quality_table.fdk_view_weights(angles, 180.0)
    # recon.fdk(short_scan=False) gives view k 0.5 * (its gap on the full circle: step, or
    # step + pi / 2 at the two ends of the arc); times w that is its gap on the 180-degree
    # circle, and those add up to pi.
    step = np.pi / views
    ends = np.isin(angles, [angles.min(), angles.max()])
    full_gap = np.where(ends, step + np.pi / 2, step)
    np.testing.assert_allclose(np.sum(0.5 * w * full_gap), np.pi, rtol=1e-6)
    np.testing.assert_allclose(w[~ends], 2.0)  # redundancy 1 instead of a full orbit's 1/2
    np.testing.assert_array_equal(quality_table.fdk_view_weights(angles, 360.0), 1.0)


def test_quality_table_smoke(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["--resolution=16", "--phantoms=1", "--views", "2", "8", "--iters=3", "--no_real"]
    assert quality_table.main([*argv, f"--out={out}"]) == 0

    for name in ("quality_16.md", "per_volume_16.csv", "results_16.json", "psnr_vs_views_16.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "psnr_vs_views_16.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out / "per_volume_16.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    expected = {(m, v) for m in quality_table.CLASSICAL for v in (2, 8)}
    assert {(r["method"], int(r["views"])) for r in rows} == expected
    assert {r["volume"] for r in rows} == {"chest-2000000"}
    for r in rows:
        for col, _, _ in quality_table.SCORE_COLUMNS:
            assert math.isfinite(float(r[col])), (r["method"], r["views"], col)
        assert 0.0 < float(r["ssim"]) <= 1.0
        assert float(r["psnr"]) > 5.0

    summary = json.loads((out / "results_16.json").read_text(encoding="utf-8"))
    assert summary["setup"]["views"] == [2, 8]
    assert summary["means"]["synthetic"]["tv"]["8"]["count"] == 1

    md = capsys.readouterr().out
    assert md == (out / "quality_16.md").read_text(encoding="utf-8") + "\n"
    assert "| SIRT |" in md and "— x2ct" in md and "Command: `python -m scripts.quality_table" in md
