"""The unrolled (learned gradient descent) model: SIRT when untrained, gradients through
the projector, any number of views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry, phantoms, physics, projector
from xct.models import get_model


@pytest.fixture(scope="module")
def setup():
    acq = geometry.Acquisition(resolution=16, fov_mm=400.0)
    grid = acq.grid()
    hu = jnp.asarray(phantoms.chest_phantom(3, grid)[0])
    angles = jnp.asarray([[0.0, 90.0]])
    drr = projector.forward_project(physics.hu_to_mu(hu), grid, acq.orbit(angles[0]))
    model = get_model("unrolled", acquisition=acq, num_iters=3, features=4, depth=2, memory=2)
    x = physics.normalize_drr(drr)[None]
    params = model.init(jax.random.key(0), x, angles)
    return acq, grid, hu, angles, x, model, params


def _residual(acq, grid, ct, x, angles):
    mu = physics.hu_to_mu(physics.denormalize_ct(ct))
    li = projector.forward_project(mu, grid, acq.orbit(angles))
    return float(jnp.linalg.norm(li - physics.denormalize_drr(x)))


def test_untrained_model_is_sirt_from_air_and_fits_the_views(setup):
    acq, grid, hu, angles, x, model, params = setup
    ct = model.apply(params, x, angles)["ct"]
    assert ct.shape == (1, 16, 16, 16) and ct.dtype == jnp.float32
    air = jnp.zeros_like(ct[0])
    before = _residual(acq, grid, air, x[0], angles[0])
    after = _residual(acq, grid, ct[0], x[0], angles[0])
    assert after < 0.5 * before, (before, after)


def test_gradients_flow_through_the_projector(setup):
    acq, grid, hu, angles, x, model, params = setup
    target = physics.normalize_ct(hu)[None]

    def loss(p, x):
        return jnp.mean(jnp.abs(model.apply(p, x, angles)["ct"] - target))

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    # the first iteration's CNN only reaches the output through later projections
    first = gp["params"]["iter0"]
    assert float(jnp.abs(first["out"]["kernel"]).max()) > 0
    assert float(jnp.abs(gp["params"]["step0"])) > 0
    assert float(jnp.abs(gx).max()) > 0  # the views enter through the projector only
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(gp))


def test_one_set_of_parameters_serves_any_view_count(setup):
    acq, grid, hu, _, _, model, params = setup
    for angles in ([0.0], [0.0, 45.0, 90.0, 135.0]):
        a = jnp.asarray([angles])
        drr = projector.forward_project(physics.hu_to_mu(hu), grid, acq.orbit(a[0]))
        ct = model.apply(params, physics.normalize_drr(drr)[None], a)["ct"]
        assert ct.shape == (1, 16, 16, 16) and bool(jnp.all(jnp.isfinite(ct)))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="num_iters"):
        get_model("unrolled", num_iters=0)
    with pytest.raises(ValueError, match="unknown keyword"):
        get_model("unrolled", base_features=8)
    np.testing.assert_equal(get_model("unrolled").num_iters, 6)
