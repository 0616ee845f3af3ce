"""Atlas reconstruction (xct.recon.atlas): screening ranks the right template first, fusion
of one or of identical templates is that template, and TV pulled towards an atlas of other
'patients' (chest phantoms of other seeds) beats TV from two views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry, phantoms, physics, projector
from xct.recon import atlas as A
from xct.recon import priors
from xct.recon import template as T

# A short schedule for 16^3: pose and scale, then the coarse field and gain on the binned
# problem (the screening), then the fine field at full resolution.
QUICK = T.Schedule(
    stages=(
        (2, ("rotvec", "shift", "log_scale"), 40),
        (2, ("rotvec", "shift", "log_scale", "coarse", "log_gain"), 30),
        (1, ("rotvec", "shift", "log_scale", "coarse", "fine", "log_gain"), 20),
    )
)


def _mu(seed, grid):
    hu, _ = phantoms.chest_phantom(seed, grid)
    return jnp.maximum(physics.hu_to_mu(jnp.asarray(hu)), 0.0)


@pytest.fixture(scope="module")
def case():
    acq = geometry.Acquisition(resolution=16, fov_mm=400.0)
    grid = acq.grid()
    geom = acq.orbit(acq.view_angles(2))
    truth = _mu(11, grid)
    drr = projector.forward_project(truth, grid, geom)
    others = [_mu(s, grid) for s in (12, 13, 14)]
    return grid, geom, truth, drr, others


def test_split_schedule_screens_the_binned_stages():
    first, rest = A.split_schedule(T.Schedule())
    assert [s[0] for s in first.stages] == [2, 2] and [s[0] for s in rest.stages] == [1]
    first, rest = A.split_schedule(T.Schedule(), screen_stages=1)
    assert len(first.stages) == 1 and len(rest.stages) == 2
    with pytest.raises(ValueError, match="screen_stages"):
        A.split_schedule(T.Schedule(), screen_stages=4)


def test_screening_ranks_the_truth_first(case):
    grid, geom, truth, drr, others = case
    shifted = jnp.roll(truth, 1, axis=2)  # the patient, one voxel (25 mm) to the side
    templates = [others[0], jnp.zeros_like(truth), shifted, others[1]]
    scr = A.screen(templates, drr, geom, grid, QUICK)
    assert int(scr.order[0]) == 2, scr.mismatch
    assert scr.mismatch.shape == (4,) and np.all(np.isfinite(scr.mismatch))
    assert scr.mismatch[2] < 0.75 * min(scr.mismatch[0], scr.mismatch[3])
    assert scr.params.shift.shape == (4, 3)


@pytest.mark.parametrize("local", [True, False])
def test_fusion_of_one_or_identical_templates_is_that_template(case, local):
    grid, geom, _, drr, others = case
    x = others[0]
    one, w1 = A.fuse(x[None], drr, geom, grid, local=local)
    np.testing.assert_allclose(np.asarray(one), np.asarray(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(w1), 1.0)
    same, w3 = A.fuse(jnp.stack([x, x, x]), drr, geom, grid, local=local, temperature=0.01)
    np.testing.assert_allclose(np.asarray(same), np.asarray(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w3), 1.0 / 3.0, rtol=1e-5)


def test_fusion_weights_favour_the_template_that_explains_the_views(case):
    grid, geom, truth, drr, others = case
    vols = jnp.stack([others[0], truth])
    err = A.local_mismatch(vols, drr, geom, grid)
    assert err.shape == (2, *grid.shape)
    assert float(jnp.max(err[1])) < 1e-3 < float(jnp.mean(err[0]))
    fused, w = A.fuse(vols, drr, geom, grid, temperature=0.01)
    assert float(jnp.mean(w[1])) > 0.9
    np.testing.assert_allclose(np.asarray(jnp.sum(w, axis=0)), 1.0, rtol=1e-5)
    w_mean = A.fusion_weights(jnp.asarray([0.1, 0.5]), np.inf)
    np.testing.assert_allclose(np.asarray(w_mean), 0.5)
    with pytest.raises(ValueError, match="temperature"):
        A.fusion_weights(jnp.asarray([0.1, 0.5]), 0.0)


def test_atlas_tv_beats_tv_from_two_views(case):
    grid, geom, truth, drr, others = case
    at = A.atlas(others, drr, geom, grid, k=2, schedule=QUICK)
    assert len(at.indices) == 2 and at.indices == tuple(int(i) for i in at.screening.order[:2])
    assert at.volumes.shape == (2, *grid.shape) and at.mismatch.shape == (2,)
    assert set(at.seconds) == {"screen", "register", "fuse"}
    assert 0 <= at.best < 2
    support = priors.visual_hull(drr, geom, grid)
    cons = priors.Constraints(support, 0.0, float(physics.hu_to_mu(physics.HU_MAX)))
    kw = dict(tv_weight=0.03, constraints=cons)
    x_tv = A.iterative.tv(drr, geom, grid, 60, **kw)[0]
    x_at = A.atlas_tv(drr, geom, grid, at.volume, 60, prior_weight=0.3, **kw)[0]
    assert bool(jnp.all(jnp.isfinite(x_at))) and float(jnp.min(x_at)) >= 0.0

    def err(x):
        return float(jnp.sqrt(jnp.mean((x - truth) ** 2)))

    assert err(x_at) < 0.9 * err(x_tv), (err(x_at), err(x_tv))


def test_bad_inputs(case):
    grid, geom, truth, drr, others = case
    with pytest.raises(ValueError, match="at least one template"):
        A.screen([], drr, geom, grid, QUICK)
    with pytest.raises(ValueError, match="templates: shape"):
        A.screen([truth[:8]], drr, geom, grid, QUICK)
    scr = A.Screening(np.zeros(1), T.Schedule().init(), np.zeros(1, int))
    with pytest.raises(ValueError, match="k: expected at least 1"):
        A.register_best([truth], scr, drr, geom, grid, QUICK, k=0)
    with pytest.raises(ValueError, match="volumes: expected"):
        A.fuse(truth, drr, geom, grid)
    jax.block_until_ready(truth)
