"""scripts/phantom_realism.py: its distance and a tiny run on the shared chests."""

import json
import pathlib

import numpy as np
import pytest

from scripts import phantom_realism

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"


def test_w1_of_a_shift_is_the_shift():
    a = np.random.default_rng(0).normal(size=5000)
    assert phantom_realism.w1(a, a + 3.0) == pytest.approx(3.0, abs=1e-6)
    assert phantom_realism.w1(a, a) == 0.0


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/ct")
def test_tiny_run(tmp_path):
    argv = ["--phantoms=1", "--resolution=16", "--versions", "1", "2", f"--out={tmp_path}"]
    assert phantom_realism.main(argv) == 0
    rows = json.loads((tmp_path / "realism.json").read_text(encoding="utf-8"))["rows"]
    assert {r["version"] for r in rows} == {1, 2}
    assert all(r["hu_w1"] > 0 and r["drr_w1"] > 0 for r in rows)
    assert "phantoms v2" in (tmp_path / "realism.md").read_text(encoding="utf-8")


def test_no_chest_is_an_error(tmp_path, capsys):
    assert phantom_realism.main([f"--ct_dir={tmp_path}", f"--out={tmp_path}"]) == 1
    assert "no real chest" in capsys.readouterr().err
