"""Tests for the procedural chest phantom in xct.phantoms."""

import jax
import numpy as np
import pytest

from xct import geometry, phantoms

L = phantoms.CHEST_LABELS


@pytest.fixture(scope="module")
def grid64():
    return geometry.VolumeGrid.centered((64, 64, 64), 7.0)


@pytest.fixture(scope="module")
def chest64(grid64):
    return phantoms.chest_phantom(0, grid64, nodules=True, couch=True)


def test_labels_dict():
    assert L["background"] == 0
    assert len(set(L.values())) == len(L) == 17
    for name in ("fat", "muscle", "lung", "vessel", "heart", "aorta", "vertebra", "rib"):
        assert name in L
    assert {"sternum", "nodule", "couch"} <= set(L)


def test_shapes_dtypes_range(chest64, grid64):
    hu, labels = chest64
    assert hu.shape == labels.shape == grid64.shape
    assert hu.dtype == np.float32 and labels.dtype == np.uint8
    assert hu.min() >= -1024.0 and hu.max() <= 1500.0
    assert set(np.unique(labels).tolist()) <= set(L.values())


def test_deterministic_per_seed_and_key(grid64, chest64):
    hu, labels = phantoms.chest_phantom(0, grid64, nodules=True, couch=True)
    np.testing.assert_array_equal(hu, chest64[0])
    np.testing.assert_array_equal(labels, chest64[1])
    other, _ = phantoms.chest_phantom(1, grid64, nodules=True, couch=True)
    assert np.abs(other - hu).mean() > 10.0
    a, _ = phantoms.chest_phantom(jax.random.key(5), grid64)
    b, _ = phantoms.chest_phantom(jax.random.key(5), grid64)
    np.testing.assert_array_equal(a, b)


def test_hu_per_label(chest64):
    hu, labels = chest64
    for name in ("fat", "muscle", "lung", "heart", "vertebra", "rib", "couch"):
        assert (labels == L[name]).sum() > 0, name
    assert hu[labels == L["lung"]].mean() < -700.0
    assert hu[labels == L["background"]].mean() < -950.0
    bone = np.isin(labels, [L["vertebra"], L["rib"], L["sternum"]])
    assert np.median(hu[bone]) > 300.0
    assert abs(np.median(hu[labels == L["heart"]]) - 40.0) < 15.0
    assert abs(np.median(hu[labels == L["muscle"]]) - 40.0) < 15.0
    assert abs(np.median(hu[labels == L["fat"]]) + 100.0) < 30.0
    assert abs(np.median(hu[labels == L["couch"]]) - 200.0) < 60.0


def test_labels_consistent_with_hu(chest64):
    hu, labels = chest64
    # where a voxel is labelled, its HU lies on the labelled side of the mixture midpoint
    assert np.mean(hu[labels == L["background"]] < -450.0) > 0.99
    assert np.mean(hu[labels == L["lung"]] < -300.0) > 0.95
    soft = np.isin(labels, [L["muscle"], L["heart"], L["aorta"]])
    assert np.mean(hu[soft] > -450.0) > 0.97


def test_options_change_labels(grid64):
    hu, labels = phantoms.chest_phantom(3, grid64, nodules=False, couch=False)
    assert not np.any(labels == L["couch"]) and not np.any(labels == L["nodule"])


def test_nodules_in_lungs():
    grid = geometry.VolumeGrid.centered((48, 48, 48), 8.0)
    found = 0
    for seed in range(4):
        hu, labels = phantoms.chest_phantom(seed, grid, nodules=True)
        nod = labels == L["nodule"]
        found += int(nod.any())
        if nod.any():
            assert hu[nod].max() > -600.0  # small nodules are partial volume at 8 mm
    assert found >= 1


def test_resolution_independence():
    fine = geometry.VolumeGrid.centered((64, 64, 64), 6.0)
    coarse = geometry.VolumeGrid.centered((32, 32, 32), 12.0)
    hu_f, lab_f = phantoms.chest_phantom(7, fine, nodules=False)
    hu_c, lab_c = phantoms.chest_phantom(7, coarse, nodules=False)
    down = hu_f.reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    assert abs(down.mean() - hu_c.mean()) < 15.0
    assert np.mean(np.abs(down - hu_c)) < 60.0
    # large structures keep their HU and volume; thin ones (fat layer, ribs) are partial
    # volume at 12 mm and are covered by the block-mean comparison above
    for name in ("lung", "muscle", "heart"):
        mf = np.median(hu_f[lab_f == L[name]])
        mc = np.median(hu_c[lab_c == L[name]])
        assert abs(mf - mc) < 40.0, (name, mf, mc)
        vf = (lab_f == L[name]).sum() * 6.0**3
        vc = (lab_c == L[name]).sum() * 12.0**3
        assert abs(vf - vc) / vf < 0.2, (name, vf, vc)
    body_f = (lab_f > 0).sum() * 6.0**3
    body_c = (lab_c > 0).sum() * 12.0**3
    assert abs(body_f - body_c) / body_f < 0.05


def test_complexity_keeps_the_anatomy_and_removes_detail(grid64):
    full_hu, full_lab = phantoms.chest_phantom(7, grid64)
    same_hu, _ = phantoms.chest_phantom(7, grid64, complexity=1.0)
    np.testing.assert_array_equal(full_hu, same_hu)
    easy_hu, easy_lab = phantoms.chest_phantom(7, grid64, complexity=0.0)
    # Same random draws: the large structures sit in the same voxels.
    for name in ("heart", "aorta", "vertebra"):
        a, b = full_lab == L[name], easy_lab == L[name]
        assert (a & b).sum() >= 0.9 * a.sum(), name
    # Fewer vessel voxels, no nodules, smoother lungs.
    assert (easy_lab == L["vessel"]).sum() < (full_lab == L["vessel"]).sum()
    assert (easy_lab == L["nodule"]).sum() == 0
    lung = (easy_lab == L["lung"]) & (full_lab == L["lung"])
    assert easy_hu[lung].std() < full_hu[lung].std()
    with pytest.raises(ValueError, match="complexity"):
        phantoms.chest_phantom(7, grid64, complexity=1.5)


@pytest.fixture(scope="module")
def grid_small():
    return geometry.VolumeGrid.centered((24, 32, 28), 9.0)


@pytest.mark.parametrize("seed, couch, complexity", [(0, True, 1.0), (5, False, 0.3)])
def test_draw_then_paint_is_chest_phantom(grid_small, seed, couch, complexity):
    params = phantoms.draw_chest_params(seed, grid_small, couch=couch, complexity=complexity)
    assert isinstance(params, phantoms.ChestParams)
    assert params.couch == couch and params.complexity == complexity
    hu, labels = phantoms.paint_chest(params, grid_small)
    ref_hu, ref_labels = phantoms.chest_phantom(
        seed, grid_small, couch=couch, complexity=complexity
    )
    np.testing.assert_array_equal(hu, ref_hu)
    np.testing.assert_array_equal(labels, ref_labels)
    # painting draws nothing: the same parameters give the same volumes again
    np.testing.assert_array_equal(phantoms.paint_chest(params, grid_small)[0], hu)
    # and edited parameters are painted as edited
    _, no_couch = phantoms.paint_chest(params._replace(couch=False), grid_small)
    assert not np.any(no_couch == L["couch"])


def test_params_anatomy_independent_of_grid_and_complexity(grid_small, grid64):
    full = phantoms.draw_chest_params(3, grid64)
    for other in (
        phantoms.draw_chest_params(3, grid_small),
        phantoms.draw_chest_params(3, grid64, complexity=0.3),
    ):
        leaves = jax.tree.leaves(other._replace(nodules=(), complexity=1.0))
        expected = jax.tree.leaves(full._replace(nodules=()))
        assert len(leaves) == len(expected)
        for a, b in zip(leaves, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    assert 1 <= len(full.nodules) <= 4
    for nodule in full.nodules:
        assert 2.0 <= nodule.radius_mm <= 7.5 and 20.0 <= nodule.hu <= 100.0
    assert phantoms.draw_chest_params(3, grid64, complexity=0.3).nodules == ()
    assert phantoms.draw_chest_params(3, grid64, nodules=False).nodules == ()
    assert len(full.vessels) > 8  # several roots a side, each a branching tree
    with pytest.raises(ValueError, match="complexity"):
        phantoms.draw_chest_params(3, grid64, complexity=-0.1)


def test_version_2_adds_anatomy_to_the_same_draws():
    """Version 2 keeps every draw of version 1 and adds arms, shoulder girdle, breasts,
    contrast and finer lung texture; version 1 is unchanged."""
    grid = geometry.VolumeGrid.centered((48, 48, 48), 10.0)
    for seed in range(6):
        v1 = phantoms.draw_chest_params(seed, grid)
        v2 = phantoms.draw_chest_params(seed, grid, version=2)
        assert v1.extras is None and v2.extras is not None
        assert repr(v1._replace(extras=None)) == repr(v2._replace(extras=None))
    seen = set()
    for seed in range(6):
        extras = phantoms.draw_chest_params(seed, grid, version=2).extras
        hu, labels = phantoms.chest_phantom(seed, grid, version=2)
        present = set(np.unique(labels).tolist())
        assert {L["scapula"], L["clavicle"]} <= present
        assert (L["arm"] in present) == extras.arms_down
        assert (L["breast"] in present) == (extras.breast_axes_mm is not None)
        if extras.contrast_hu is not None:
            assert np.median(hu[labels == L["heart"]]) > 140.0
        seen |= {extras.arms_down, extras.contrast_hu is not None}
    assert seen == {True, False}
    with pytest.raises(ValueError, match="version"):
        phantoms.chest_phantom(0, grid, version=3)
