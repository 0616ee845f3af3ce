"""Dataset builders: tiny datasets built into a temporary folder and read back."""

import numpy as np
import pytest

from data_pipelines import build, common, ct_folder
from xct import geometry


def test_nested_angles_prefixes_are_spread():
    a = geometry.nested_view_angles(8)
    assert list(a[:2]) == [0.0, 90.0]
    assert sorted(a[:4]) == [0.0, 45.0, 90.0, 135.0]
    assert sorted(a) == list(np.arange(8) * 22.5)


def test_stable_split_is_deterministic_and_covers_all_splits():
    ids = [f"patient-{i}" for i in range(200)]
    splits = [ct_folder.split_of(i) for i in ids]
    assert splits == [ct_folder.split_of(i) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "validation", "test")}
    assert 0.7 < frac["train"] < 0.9 and frac["validation"] > 0.03 and frac["test"] > 0.03


def _read_all(name, data_dir, split):
    import tensorflow_datasets as tfds

    src = tfds.data_source(name, data_dir=str(data_dir), split=split)
    out = [dict(src[i]) for i in range(len(src))]
    for ex in out:  # Text features come back as bytes
        ex["id"] = ex["id"].decode()
    return out


def test_synthetic_chest_builds_reads_back_and_resumes(tmp_path, monkeypatch):
    from data_pipelines import synthetic_chest

    sizes = {"train": 3, "validation": 1, "test": 1}
    # An interrupted build: the third train example fails; nothing is written as complete.
    real = synthetic_chest.make_phantom_example
    calls = []

    def flaky(seed, *a):
        calls.append(seed)
        if seed == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(seed, *a)

    monkeypatch.setattr(synthetic_chest, "make_phantom_example", flaky)
    with pytest.raises(KeyboardInterrupt):
        build.build("synthetic_chest/tiny_res32_views8", tmp_path, split_sizes=sizes)
    assert not list((tmp_path / "synthetic_chest" / "tiny_res32_views8").glob("1.0.0"))
    done_before = set(calls) - {2}
    # Rerun: finishes, renders only what was not cached, and writes each example once.
    calls.clear()
    monkeypatch.setattr(
        synthetic_chest,
        "make_phantom_example",
        lambda seed, *a: (calls.append(seed), real(seed, *a))[1],
    )
    _, summary = build.build("synthetic_chest/tiny_res32_views8", tmp_path, split_sizes=sizes)
    assert not (set(calls) & done_before)
    assert summary["examples"] == sizes
    train = _read_all("synthetic_chest/tiny_res32_views8", tmp_path, "train")
    assert sorted(ex["id"] for ex in train) == ["chest-0000000", "chest-0000001", "chest-0000002"]
    ex = train[0]
    assert ex["ct_hu"].shape == (32, 32, 32) and ex["ct_hu"].dtype == np.int16
    assert ex["drr"].shape == (8, 32, 32) and ex["labels"].shape == (32, 32, 32)
    np.testing.assert_allclose(ex["angles_deg"], geometry.nested_view_angles(8))
    assert ex["drr"].max() > 1.0  # a chest: line integrals of several units
    test = _read_all("synthetic_chest/tiny_res32_views8", tmp_path, "test")
    assert test[0]["id"] == "chest-2000000"  # disjoint seed ranges per split


def test_ct_folder_builds_shared_cts_and_skips_bad_files(tmp_path, shared_ct_dir):
    src = tmp_path / "src"
    src.mkdir()
    for name in (
        "chest_4dct_phase00_2mm.nii.gz",
        "abdomen_pelvis_3mm.nii.gz",
        "head_headsq_hu_plus_1024.mha",
    ):
        (src / name).symlink_to(shared_ct_dir / name)
    (src / "broken.nii.gz").write_bytes(b"not a volume")
    _, summary = build.build("ct_folder/res32_views8", tmp_path / "data", source_dir=src)
    assert sum(summary["examples"].values()) == 2
    skipped = dict(summary["skipped"])
    assert set(skipped) == {"broken.nii.gz", "head_headsq_hu_plus_1024.mha"}
    assert "1024" in skipped["head_headsq_hu_plus_1024.mha"]
    found = []
    for split, n in summary["examples"].items():
        if n:
            found += _read_all("ct_folder/res32_views8", tmp_path / "data", split)
    assert {ex["id"] for ex in found} == {
        "chest_4dct_phase00_2mm.nii.gz",
        "abdomen_pelvis_3mm.nii.gz",
    }
    for ex in found:
        assert ex["drr"].shape == (8, 32, 32) and ex["ct_hu"].min() >= -1024


def test_unknown_dataset_and_config_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown name"):
        build.build("lidc/res64", tmp_path)
    with pytest.raises(ValueError, match="unknown config"):
        build.build("synthetic_chest/res65_views3", tmp_path)
    with pytest.raises(ValueError, match="source_dir"):
        build.build("ct_folder/res32_views8", tmp_path)


def test_view_spec_detector_sees_the_inscribed_cylinder():
    spec = common.ViewSpec(32, 8, 400.0)
    geom = spec.geometry()
    phi = np.linspace(0, 2 * np.pi, 73)
    rim = [[200 * np.cos(p), y, 200 * np.sin(p)] for p in phi for y in (-200.0, 200.0)]
    rc = geom.project_points(np.asarray(rim))
    assert rc.min() >= -0.5 - 1e-4 and rc.max() <= 31.5 + 1e-4
