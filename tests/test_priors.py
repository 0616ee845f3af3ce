"""X-ray priors (xct.recon.priors) and the constrained solvers: the support never removes
attenuation that is there, and every solver keeps to it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry, phantoms, physics, projector, recon
from xct.recon import priors
from xct.recon.refine import refine


@pytest.fixture(scope="module")
def setup():
    acq = geometry.Acquisition(resolution=24, fov_mm=400.0)
    grid = acq.grid()
    hu, _ = phantoms.chest_phantom(3, grid)
    return acq, grid, np.asarray(hu, np.float32)


@pytest.mark.parametrize("views", [1, 2, 5])
@pytest.mark.parametrize("photons", [None, 1e5])
def test_support_keeps_every_attenuating_voxel(setup, views, photons):
    acq, grid, hu = setup
    geom = acq.orbit(acq.view_angles(views))
    drr = physics.render_drrs(hu, grid, geom, jax.random.key(views), photons=photons)
    hull = np.asarray(recon.visual_hull(drr, geom, grid))
    solid = np.asarray(physics.hu_to_mu(hu)) > 1e-6
    assert not (solid & ~hull).any(), f"{int((solid & ~hull).sum())} attenuating voxels removed"
    if views > 1:  # ... and it does remove air: the bound is not vacuous
        assert hull.mean() < 0.9, hull.mean()


def test_support_shrinks_with_more_views(setup):
    acq, grid, hu = setup
    fractions = []
    for v in (1, 2, 8):
        geom = acq.orbit(acq.view_angles(v))
        drr = physics.render_drrs(hu, grid, geom)
        fractions.append(float(np.mean(recon.visual_hull(drr, geom, grid))))
    assert fractions[0] > fractions[1] > fractions[2], fractions


def test_visual_hull_refuses_traced_input_and_bad_shapes(setup):
    acq, grid, hu = setup
    geom = acq.orbit(acq.view_angles(2))
    drr = physics.render_drrs(hu, grid, geom)
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(lambda d: recon.visual_hull(d, geom, grid))(drr)
    with pytest.raises(ValueError, match="drr: shape"):
        recon.visual_hull(drr[:1], geom, grid)
    with pytest.raises(ValueError, match="constraints.support: shape"):
        recon.sirt(drr, geom, grid, 1, constraints=priors.Constraints(jnp.ones((3, 3, 3), bool)))


@pytest.mark.parametrize("solver", ["sirt", "cgls", "tv", "refine"])
def test_solvers_keep_to_the_constraints(setup, solver):
    acq, grid, hu = setup
    geom = acq.orbit(acq.view_angles(4))
    mu = np.asarray(physics.hu_to_mu(hu))
    drr = projector.forward_project(jnp.asarray(mu), grid, geom)
    cons = priors.from_views(drr, geom, grid)
    # A tighter upper bound than the data wants, so the bound is active.
    cons = cons._replace(upper=0.6 * float(mu.max()))
    if solver == "refine":
        start = 1.5 * mu + 0.005  # above the bound, and non-zero outside the support
        x = refine(start, drr, geom, grid, units="mu_per_mm", num_iters=20, constraints=cons).volume
    else:
        x, res = getattr(recon, solver)(drr, geom, grid, 20, constraints=cons)
        assert float(res[-1]) < float(res[0])
    x = np.asarray(x)
    outside = ~np.asarray(cons.support)
    assert np.all(x[outside] == 0.0)
    assert x.min() >= 0.0 and x.max() <= cons.upper * (1 + 1e-6)
    assert x.max() > 0.5 * cons.upper  # it did reconstruct something


def test_tv_prior_pull(setup):
    acq, grid, hu = setup
    geom = acq.orbit(acq.view_angles(2))
    mu = jnp.asarray(physics.hu_to_mu(hu))
    drr = projector.forward_project(mu, grid, geom)
    prior = jnp.maximum(mu, 0.0) * 0.9
    plain, _ = recon.tv(drr, geom, grid, 10, tv_weight=0.01)
    zero, _ = recon.tv(drr, geom, grid, 10, tv_weight=0.01, x_prior=prior, prior_weight=0.0)
    np.testing.assert_allclose(np.asarray(zero), np.asarray(plain), atol=1e-7)
    strong, _ = recon.tv(
        drr, geom, grid, 10, x0=prior, tv_weight=0.0, x_prior=prior, prior_weight=1e6
    )
    np.testing.assert_allclose(np.asarray(strong), np.asarray(prior), atol=1e-5)
    with pytest.raises(ValueError, match="x_prior: shape"):
        recon.tv(drr, geom, grid, 1, x_prior=prior[:2], prior_weight=1.0)
