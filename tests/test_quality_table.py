"""Smoke test of scripts/quality_table.py: a 16^3 run writes finite tables, CSV, JSON, PNG."""

import csv
import json
import math

from scripts import quality_table


def test_quality_table_smoke(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["--realism=ideal", "--resolution=16", "--phantoms=1", "--views", "2", "8", "--iters=3"]
    argv += ["--no_real"]
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


def test_quality_table_priors_and_templates_leave_one_out(tmp_path):
    """Two 'chests' (phantoms written as NIfTI) in --ct_dir, both given as --template: each
    is reconstructed with the other as template, never itself; weights are chosen on the
    other chest; the body-filled cube and the inside-body columns are reported."""
    import numpy as np

    from xct import geometry, io, phantoms

    ct_dir = tmp_path / "cts"
    ct_dir.mkdir()
    grid = geometry.VolumeGrid.centered((40, 48, 48), 8.0)
    files = []
    for seed in (1, 2):
        hu, _ = phantoms.chest_phantom(seed, grid)
        files.append(str(io.write_ct(ct_dir / f"chest_{seed}.nii.gz", np.asarray(hu), grid)))
    out = tmp_path / "q"
    argv = [
        "--realism=ideal",
        "--resolution=16",
        "--phantoms=0",
        "--views",
        "2",
        "--iters=3",
        f"--ct_dir={ct_dir}",
        "--methods",
        "tv",
        "tv_support",
        "template",
        "template_tv",
        "--tv_weight",
        "0.01",
        "0.1",
        "--prior_weight",
        "1",
        "--template",
        *files,
        f"--out={out}",
    ]
    assert quality_table.main(argv) == 0
    with open(out / "per_volume_16.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["volume"]) for r in rows} == {
        (m, f"chest_{s}.nii.gz")
        for m in ("tv", "tv_support", "template", "template_tv")
        for s in (1, 2)
    }
    for r in rows:
        assert r["kind"] == "chest"
        assert math.isfinite(float(r["psnr_body"])) and math.isfinite(float(r["x2ct_psnr_body"]))
        assert 0.0 < float(r["body_fraction"]) < 1.0
        assert float(r["fov_mm"]) < 400.0  # the body fills the cube, not a 400 mm default
    with open(out / "sweep_16.csv", encoding="utf-8") as f:
        sweep = list(csv.DictReader(f))
    assert len(sweep) == 2 * (2 + 2 + 1 + 2)  # two weights for the swept methods
    summary = json.loads((out / "results_16.json").read_text(encoding="utf-8"))
    used = {t["volume"]: t["template"] for t in summary["templates_used"]}
    assert used == {"chest_1.nii.gz": "chest_2.nii.gz", "chest_2.nii.gz": "chest_1.nii.gz"}
    # leave one out: each chest's TV weight is the one best on the other chest
    by = {(r["volume"], r["params"]): float(r["psnr"]) for r in sweep if r["method"] == "tv"}
    for r in rows:
        if r["method"] == "tv":
            other = "chest_2.nii.gz" if r["volume"] == "chest_1.nii.gz" else "chest_1.nii.gz"
            best = max(("tv_weight=0.01", "tv_weight=0.1"), key=lambda p: by[(other, p)])
            assert r["params"] == best


def test_atlas_rows_register_once_and_leave_each_chest_out(tmp_path):
    """Three 'chests' as --ct_dir and --template: atlas and atlas_tv rows for each, fused
    from the other two only; template / template_tv use the atlas's best registered
    template (one registration per chest and number of views); atlas_net rows scored by a
    model that did not train on the chest, and left out where every model did."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xct import atlas_net, geometry, io, phantoms
    from xct.models.refiner import Refiner

    ct_dir = tmp_path / "cts"
    ct_dir.mkdir()
    grid = geometry.VolumeGrid.centered((40, 48, 48), 8.0)
    files = []
    for seed in (1, 2, 3):
        hu, _ = phantoms.chest_phantom(seed, grid)
        files.append(str(io.write_ct(ct_dir / f"chest_{seed}.nii.gz", np.asarray(hu), grid)))
    params = Refiner(width=4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 3)))
    atlas_net.save(tmp_path / "net12", params, width=4, info={"trained_on": ["chest_1", "chest_2"]})
    atlas_net.save(tmp_path / "net3", params, width=4, info={"trained_on": ["chest_2", "chest_3"]})
    out = tmp_path / "q"
    argv = ["--realism=ideal", "--resolution=16", "--phantoms=0", "--views", "2", "--iters=3"]
    argv += [f"--ct_dir={ct_dir}"]
    argv += ["--methods", "tv_support", "template", "template_tv", "atlas", "atlas_tv", "atlas_net"]
    argv += ["--tv_weight", "0.01", "--prior_weight", "1", "--template", *files, f"--out={out}"]
    argv += ["--atlas_net", str(tmp_path / "net12"), str(tmp_path / "net3")]
    assert quality_table.main(argv) == 0
    with open(out / "per_volume_16.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = [f"chest_{s}.nii.gz" for s in (1, 2, 3)]
    methods = ("tv_support", "template", "template_tv", "atlas", "atlas_tv")
    want = {(m, n) for m in methods for n in names}
    want |= {("atlas_net", "chest_1.nii.gz"), ("atlas_net", "chest_3.nii.gz")}
    assert {(r["method"], r["volume"]) for r in rows} == want  # both models trained on 2
    assert all(math.isfinite(float(r["psnr_body"])) for r in rows)
    summary = json.loads((out / "results_16.json").read_text(encoding="utf-8"))
    assert summary["atlas_net"]["used"] == {
        "chest_1.nii.gz": str(tmp_path / "net3"),
        "chest_3.nii.gz": str(tmp_path / "net12"),
    }
    assert [t["volume"] for t in summary["atlas_net"]["skipped"]] == ["chest_2.nii.gz"]
    assert len(summary["templates_used"]) == 3  # one registration per chest
    for used in summary["templates_used"]:
        assert sorted(used["atlas"]) == sorted(set(names) - {used["volume"]})
        assert used["template"] in used["atlas"]
        assert used["mismatch"][used["template"]] == min(used["mismatch"].values())


def test_quality_table_bad_inputs(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--resolution=16", "--phantoms=0", f"--ct_dir={empty}", f"--out={tmp_path / 'q'}"]
    assert quality_table.main(argv) == 1
    assert "no CT volumes or DICOM series found" in capsys.readouterr().err
    try:
        quality_table.parse_args(["--methods", "template", f"--out={tmp_path}"])
        raise AssertionError("--methods template without --template was accepted")
    except SystemExit as e:
        assert e.code == 2
    try:
        quality_table.parse_args(["--template", str(tmp_path / "none.nii.gz"), f"--out={tmp_path}"])
        raise AssertionError("a missing --template was accepted")
    except SystemExit as e:
        assert e.code == 2


def test_a_mean_over_fewer_volumes_is_marked():
    """A method scored on fewer volumes than the others at that view count (a network left
    out the CT it trained on) gets its count in the cell, not a silent mixed mean."""
    rows = [
        {"method": m, "views": 2, "kind": "chest", "volume": vol, "psnr": p, "ssim": 0.5}
        for m, vol, p in [
            ("tv", "a", 20.0),
            ("tv", "b", 18.0),
            ("network", "a", 21.0),
        ]
    ]
    table = quality_table.markdown_table(
        quality_table.summarise(rows, "chest", ("psnr", "ssim")), ["tv", "network"], [2]
    )
    assert "| 19.00 / 0.500 |" in table
    assert "| 21.00 / 0.500 (1 of 2) |" in table
