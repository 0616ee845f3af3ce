"""Template registration (xct.recon.template): a known pose, scale, smooth deformation and
gain of a phantom are recovered through the projector, to within a voxel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry, phantoms, physics, projector
from xct.recon import template as T


@pytest.fixture(scope="module")
def case():
    acq = geometry.Acquisition(resolution=32, fov_mm=400.0)
    grid = acq.grid()
    hu, _ = phantoms.chest_phantom(5, grid)
    mu = jnp.maximum(physics.hu_to_mu(jnp.asarray(hu)), 0.0)
    schedule = T.Schedule()
    truth = schedule.init()._replace(
        rotvec=jnp.array([0.3, 0.5, -0.2]),  # about 3, 5 and 1 degrees
        shift=jnp.array([0.2, -0.3, 0.4]),  # 4, -6, 8 mm
        log_scale=jnp.array([0.5, -0.4, 0.3]),  # +5 %, -4 %, +3 %
        coarse=0.5 * jax.random.normal(jax.random.key(0), (3, 5, 5, 5)),  # ~5 mm
        log_gain=0.3 * jax.random.normal(jax.random.key(1), (4, 4, 4)),
    )
    target = T.warp(mu, truth, grid)
    return acq, grid, mu, truth, target, schedule


def test_registration_recovers_a_known_warp(case):
    acq, grid, mu, truth, target, schedule = case
    geom = acq.orbit(acq.view_angles(4))
    drr = projector.forward_project(target, grid, geom)
    reg = jax.jit(lambda t, d, g: T.register(t, d, g, grid, schedule))(mu, drr, geom)
    body = np.asarray(target) > 0.3 * physics.MU_WATER_PER_MM
    err = np.linalg.norm(
        np.asarray(T.coordinates(reg.params, grid) - T.coordinates(truth, grid)), axis=0
    )[body]  # voxels
    assert err.mean() < 0.5 and np.percentile(err, 95) < 1.0, (err.mean(), err.max())
    before = float(jnp.sqrt(jnp.mean((mu - target) ** 2)))
    after = float(jnp.sqrt(jnp.mean((reg.volume - target) ** 2)))
    assert after < 0.35 * before, (before, after)
    assert float(reg.mismatch) < 0.05
    assert float(reg.loss[-1]) < 0.1 * float(reg.loss[0])


def test_best_template_picks_the_matching_one(case):
    acq, grid, mu, truth, target, _ = case
    geom = acq.orbit(acq.view_angles(2))
    drr = projector.forward_project(target, grid, geom)
    quick = T.Schedule(stages=((2, ("rotvec", "shift", "log_scale"), 40),))
    best, reg, mismatch = T.best_template([jnp.zeros_like(mu), mu], drr, geom, grid, quick)
    assert best == 1 and mismatch[1] < mismatch[0]
    assert reg.volume.shape == tuple(grid.shape)


def test_bad_inputs(case):
    acq, grid, mu, _, target, _ = case
    geom = acq.orbit(acq.view_angles(2))
    drr = projector.forward_project(target, grid, geom)
    with pytest.raises(ValueError, match="template: shape"):
        T.register(mu[:16], drr, geom, grid)
    with pytest.raises(ValueError, match="drr: shape"):
        T.register(mu, drr[:1], geom, grid)
    with pytest.raises(ValueError, match="at least one template"):
        T.best_template([], drr, geom, grid)
    odd = geometry.Acquisition(resolution=15, fov_mm=400.0)
    g15 = odd.orbit(odd.view_angles(2))
    with pytest.raises(ValueError, match="not divisible by pyramid level 2"):
        T.register(jnp.zeros((15,) * 3), jnp.zeros((2, 15, 15)), g15, odd.grid())


def test_template_of_another_region_or_size_is_refused():
    """A template whose body is far smaller or larger than the field of view is refused,
    naming the file."""
    check = T.check_template_size
    check("chest.nii.gz", 400.0, 420.0)
    with pytest.raises(ValueError, match="head.nii.gz.*190 mm.*400 mm"):
        check("head.nii.gz", 190.0, 400.0)
    with pytest.raises(ValueError, match="relative DRR mismatch 0.45"):
        T.check_match("pelvis.nii.gz", 0.45)
    T.check_match("chest.nii.gz", 0.1)
