"""Spatial sharding: volumes and 3D activations split along z over the ``spatial`` mesh axis
give the loss and gradients of one device (4 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry, models, sharding
from xct.models import layers

MESHES = [{"data": 1, "spatial": 1}, {"data": 2, "spatial": 2}, {"data": 1, "spatial": 4}]


def _problem():
    # X2CT-style lifting compiles 3x faster; the back-projection lifting on these meshes is
    # covered by the slow full-step test in test_train.py.
    # Two levels (the bottleneck, 8^3, is still split over 4 devices; its attention spans
    # them): compiles in ~60% of the time of three.
    model = models.get_model(
        "unet",
        acquisition=geometry.Acquisition(16),
        base_features=4,
        num_levels=2,
        lifting="expand",
    )
    rng = np.random.default_rng(0)
    batch = {
        "drr": rng.uniform(0, 1, (4, 2, 16, 16)).astype(np.float32),
        "angles_deg": np.tile(np.float32([[0.0, 90.0]]), (4, 1)),
        "ct": rng.uniform(0, 1, (4, 16, 16, 16)).astype(np.float32),
    }
    params = model.init(jax.random.key(0), batch["drr"], batch["angles_deg"])["params"]
    # Non-zero residual branches and attention, so every layer shapes the result.
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params
    )
    return model, params, batch


def _loss_and_grads(model, params, batch, mesh):
    def loss(p, b):
        ct = model.apply({"params": p}, b["drr"], b["angles_deg"])["ct"]
        return jnp.mean(jnp.abs(ct - b["ct"])) + jnp.mean(jnp.square(ct))

    b = sharding.shard_batch(batch, mesh)
    rep = sharding.replicated(mesh)
    f = jax.jit(
        jax.value_and_grad(loss),
        in_shardings=(rep, sharding.batch_shardings(mesh, batch)),
        out_shardings=rep,
    )
    with sharding.activation_context(mesh):
        value, grads = f(params, b)
    return float(value), jax.device_get(grads), b


@pytest.mark.slow  # about 170 s on 2 cores; data parallelism: tests/test_train.py
def test_spatial_sharding_gives_the_loss_and_gradients_of_one_device():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    model, params, batch = _problem()
    results = []
    for axes in MESHES:
        mesh = sharding.make_mesh(axes)
        value, grads, b = _loss_and_grads(model, params, batch, mesh)
        z_shards = {s.index[1].indices(16) for s in b["ct"].addressable_shards}
        assert len(z_shards) == axes["spatial"], (axes, z_shards)  # the volume is split in z
        results.append((value, grads))
    ref_value, ref_grads = results[0]
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
    for axes, (value, grads) in zip(MESHES[1:], results[1:], strict=True):
        assert value == pytest.approx(ref_value, rel=1e-5), axes
        for g1, g2 in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(g2, g1, atol=2e-5 * scale, rtol=1e-4, err_msg=str(axes))


def test_batch_shardings_split_volumes_over_spatial():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    mesh = sharding.make_mesh({"data": 2, "spatial": 2})
    s = sharding.batch_shardings(
        mesh,
        {
            "ct": np.zeros((2, 4, 4, 4)),
            "labels": np.zeros((2, 4, 4, 4)),
            "drr": np.zeros((2, 1, 4, 4)),
        },
    )
    assert tuple(s["ct"].spec) == ("data", "spatial", None, None)
    assert tuple(s["labels"].spec) == ("data", "spatial", None, None)
    assert tuple(s["drr"].spec) == ("data", None, None, None)
    with pytest.raises(ValueError, match="mesh"):
        sharding.make_mesh({"data": 3, "spatial": 2})


def test_constrain_is_a_no_op_without_axis_rules():
    x = jnp.ones((2, 4, 4, 4, 3))
    assert layers.constrain(x) is x


@pytest.mark.parametrize("method", ["expand", "backproject"])
def test_lifting_runs_as_z_slabs_on_a_spatial_mesh_and_equals_the_whole(method):
    """On a mesh with spatial > 1 each device lifts only its z-slab (shard_map)."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    from xct.models import lifting

    rng = np.random.default_rng(5)
    feats = jnp.asarray(rng.random((2, 2, 8, 8, 3), np.float32))
    angles = jnp.asarray([[0.0, 90.0], [30.0, 120.0]], jnp.float32)
    center = jnp.asarray([[0.0, 0.0, 0.0], [4.0, -2.0, 6.0]], jnp.float32)
    acq = geometry.Acquisition(8, 64.0, 500.0, 800.0, pixel_mm=110.0 / 8)
    kw = dict(method=method, size=8, acquisition=acq)
    ref = lifting.lift(feats, angles, center_mm=center, **kw)
    mesh = sharding.make_mesh({"data": 1, "spatial": 4})

    @jax.jit
    def sharded(f, a, c):
        assert lifting.slab_axes(f.shape[0], 8) == ("data", "spatial", 4)
        return lifting.lift(f, a, center_mm=c, **kw)

    with sharding.activation_context(mesh):
        out = sharded(feats, angles, center)
    z_shards = {s.index[2].indices(8) for s in out.addressable_shards}
    assert len(z_shards) == 4  # [B, V, z, y, x, C] split along z
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
