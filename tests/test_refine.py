"""Tests for xct.recon.refine: test-time projection-consistency refinement.

One 32^3 procedural chest phantom seen in 4 cone-beam views; the "prediction" is the truth
blurred, with noise and a +60 HU bias on muscle, as a network's output might be. One
jitted ``refine`` (weights traced, so every call below reuses the same compilation).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from xct import geometry, metrics, phantoms, physics
from xct.recon import refine as rf

NUM_ITERS = 60

_refine = jax.jit(
    rf.refine,
    static_argnames=("units", "num_iters", "tv_eps", "optimizer", "mu_water_per_mm", "method"),
)


@pytest.fixture(scope="module")
def case():
    grid = geometry.VolumeGrid.centered((32, 32, 32), 12.5)
    hu, labels = phantoms.chest_phantom(0, grid)
    geom = geometry.circular_cone_beam(
        [0.0, 90.0, 45.0, 135.0], sod_mm=1000.0, sdd_mm=1500.0, det_shape=(32, 32), pixel_mm=19.0
    )
    drr = physics.render_drrs(hu, grid, geom)
    rng = np.random.default_rng(0)
    pred = ndi.gaussian_filter(hu, 1.0) + rng.normal(0.0, 40.0, hu.shape) + 60.0 * (labels == 2)
    return {
        "grid": grid,
        "geom": geom,
        "hu": hu,
        "body": labels > 0,
        "drr": drr,
        "pred": pred.astype(np.float32),
    }


def _psnr(vol_hu, case, mask=None):
    m = None if mask is None else mask[None]
    out = metrics.volume_metrics(np.asarray(vol_hu)[None], case["hu"][None], m)
    return float(out["psnr" if mask is None else "psnr_mask"][0])


def test_refine_matches_drrs_and_improves_volume(case):
    res = _refine(
        case["pred"],
        case["drr"],
        case["geom"],
        case["grid"],
        num_iters=NUM_ITERS,
        learning_rate=0.01,
        tv_weight=0.01,
        prior_weight=0.1,
    )
    assert res.volume.shape == case["hu"].shape
    assert res.loss.shape == res.data_loss.shape == (NUM_ITERS,)
    data, loss = np.asarray(res.data_loss), np.asarray(res.loss)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(res.volume))
    # The DRR residual falls by two orders of magnitude, almost every step.
    assert data[-1] < 0.01 * data[0]
    assert np.mean(np.diff(data) <= 0) >= 0.9
    assert np.mean(np.diff(loss) <= 0) >= 0.9
    # And the volume gets closer to the truth, inside the body as well.
    before, after = _psnr(case["pred"], case), _psnr(res.volume, case)
    assert after > before + 2.0, (before, after)
    assert _psnr(res.volume, case, case["body"]) > _psnr(case["pred"], case, case["body"]) + 1.5
    # Non-negative attenuation: nothing below -1000 HU.
    assert float(jnp.min(res.volume)) >= -1000.0 - 1e-3


def test_large_prior_weight_keeps_prediction(case):
    pred = np.maximum(case["pred"], -1000.0)  # to_relative clips air at mu = 0
    res = _refine(
        pred,
        case["drr"],
        case["geom"],
        case["grid"],
        num_iters=NUM_ITERS,
        learning_rate=0.01,
        tv_weight=0.0,
        prior_weight=1e5,
    )
    # Adam moves each voxel by ~learning_rate (10 HU) at the first step; the stiff prior
    # pulls it straight back.
    assert float(jnp.max(jnp.abs(res.volume - pred))) < 5.0
    assert float(res.data_loss[-1]) > 0.5 * float(res.data_loss[0])  # data term ignored


def test_objective_gradient_finite_and_correct(case):
    x_pred = rf.to_relative(case["pred"])
    fn = functools.partial(
        rf.refine_objective,
        x_pred=x_pred,
        drr=case["drr"],
        geom=case["geom"],
        grid=case["grid"],
        tv_weight=0.01,
        prior_weight=0.1,
    )
    value = jax.jit(lambda x: fn(x)[0])
    grad = jax.jit(jax.grad(value))
    # At the prediction, which has air voxels at x = 0 and flat regions (TV's kink).
    x0 = jnp.asarray(np.maximum(np.asarray(x_pred) + 0.05, 0.0))
    g = grad(x0)
    assert g.shape == x0.shape and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.max(jnp.abs(g))) > 0.0
    # Central difference along a random direction (the objective is nearly quadratic).
    v = jnp.asarray(np.random.default_rng(1).standard_normal(x0.shape).astype(np.float32))
    h = 1e-2
    fd = (float(value(x0 + h * v)) - float(value(x0 - h * v))) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g, v)), fd, rtol=2e-2)


def test_units_round_trip_and_errors(case):
    hu = jnp.array([-1500.0, -1000.0, 0.0, 1000.0])
    x = rf.to_relative(hu, "hu")
    np.testing.assert_allclose(x, [0.0, 0.0, 1.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(rf.from_relative(x, "hu"), [-1000.0, -1000.0, 0.0, 1000.0])
    mu = physics.hu_to_mu(hu)
    np.testing.assert_allclose(rf.to_relative(mu, "mu_per_mm"), x, rtol=1e-6)
    np.testing.assert_allclose(rf.from_relative(x, "mu_per_mm"), mu, rtol=1e-6)
    # A constant volume has zero TV.
    assert float(rf.smoothed_tv(jnp.ones((4, 5, 6)), 1e-2)) == 0.0
    args = (case["pred"], case["drr"], case["geom"], case["grid"])
    with pytest.raises(ValueError, match="units"):
        rf.refine(*args, units="HU")
    with pytest.raises(ValueError, match="does not match the grid"):
        rf.refine(case["pred"][:-1], *args[1:])
    with pytest.raises(ValueError, match="views, rows, cols"):
        rf.refine(case["pred"], case["drr"][:2], *args[2:])
