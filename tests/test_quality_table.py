"""Smoke test of scripts/quality_table.py: a 16^3 run writes finite tables, CSV, JSON, PNG."""

import csv
import json
import math

from scripts import quality_table


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
