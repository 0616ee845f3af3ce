"""Real CTs in the on-device training pool (``RenderSource.real_*``): held-out CTs are never
read, every step makes new patients, and the stream is a function of the step."""

import jax
import numpy as np
import pytest

from xct import data, geometry, io, phantoms, sharding
from xct.configs import default


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cts")
    grid = geometry.VolumeGrid.centered((40, 48, 48), 8.0)
    for seed in (1, 2):
        hu, _ = phantoms.chest_phantom(seed, grid)
        io.write_ct(root / f"chest_{seed}.nii.gz", np.asarray(hu), grid)
    return root


def _source(ct_dir, **kw):
    acq = geometry.Acquisition(resolution=16, fov_mm=400.0)
    args = dict(default.get_config().data.render)  # config.data.render: its keyword arguments
    args.update(acquisition=acq, batch_size=2, num_views=2, seed=0, pool_size=2)
    args.update(kw)
    return data.RenderSource(**args)


def test_held_out_cts_are_never_read(ct_dir):
    src = _source(ct_dir, real_ct_dir=str(ct_dir), real_fraction=1.0, real_exclude=("chest_2*",))
    assert [n for n, _ in src.real_sources()] == ["chest_1.nii.gz"]
    pool, names = src.real_pool()
    assert names == ["chest_1.nii.gz"] and pool.shape == (1, 16, 16, 16)
    everything = _source(ct_dir, real_ct_dir=str(ct_dir), real_fraction=1.0, real_exclude=("*",))
    with pytest.raises(ValueError, match="no readable CT"):
        everything.real_pool()


def test_bad_real_settings_are_refused(ct_dir):
    with pytest.raises(ValueError, match="real_ct_dir"):
        _source(ct_dir, real_fraction=0.5)
    with pytest.raises(ValueError, match="not a folder"):
        _source(ct_dir, real_ct_dir=str(ct_dir / "missing"), real_fraction=0.5)
    with pytest.raises(ValueError, match="real_fraction"):
        _source(ct_dir, real_ct_dir=str(ct_dir), real_fraction=1.5)


def test_new_patients_every_step(ct_dir):
    src = _source(ct_dir, real_ct_dir=str(ct_dir), real_fraction=1.0, real_exclude=("chest_2*",))
    real, _ = src.real_pool()
    hu = jax.numpy.asarray(real[0])
    same = data.augment_real(jax.random.key(0), hu, src, strength=0.0)
    np.testing.assert_allclose(np.asarray(same), np.asarray(hu), atol=1e-3)
    a = np.asarray(data.augment_real(jax.random.key(1), hu, src))
    b = np.asarray(data.augment_real(jax.random.key(2), hu, src))
    assert np.abs(a - np.asarray(hu)).mean() > 5 and np.abs(a - b).mean() > 5  # HU
    mesh = sharding.make_mesh({"data": 1})
    stream = src.open(mesh, sharding.DEFAULT_RULES, None, 0)
    first, again = stream.batch(3), stream.batch(3)
    np.testing.assert_array_equal(np.asarray(first["ct"]), np.asarray(again["ct"]))
    assert first["ct"].shape == (2, 16, 16, 16) and first["drr"].shape == (2, 2, 16, 16)
    assert not np.array_equal(np.asarray(first["ct"]), np.asarray(stream.batch(4)["ct"]))


def test_body_filled_cubes(tmp_path):
    """``real_fov="body"``: each real CT in the cube its body fills (the quality table's
    real-chest cubes), not padded with air to the acquisition's 400 mm."""
    grid = geometry.VolumeGrid.centered((40, 48, 48), 5.0)  # a 240 mm wide body
    hu, _ = phantoms.chest_phantom(3, grid)
    io.write_ct(tmp_path / "small.nii.gz", np.asarray(hu), grid)

    def extent(**kw):  # voxels the body spans left-right, of 16
        src = _source(tmp_path, real_ct_dir=str(tmp_path), real_fraction=1.0, **kw)
        (vol,), _ = src.real_pool()
        return int(np.count_nonzero((vol > -990).any(axis=(0, 1))))

    fixed, body = extent(), extent(real_fov="body")
    assert body >= 15 and fixed <= body - 3, (fixed, body)
    with pytest.raises(ValueError, match="real_fov"):
        _source(tmp_path, real_ct_dir=str(tmp_path), real_fraction=1.0, real_fov="400")
