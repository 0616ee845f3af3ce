"""xct.models: shapes for any view count, geometry of the liftings, gradients, PatchGAN state.

Sizes are tiny (16^3, 4 base channels). Parameters for shape checks come from
``jax.eval_shape(model.init)`` filled with seeded normals: compiling ``init`` costs more
than every other check here, and shapes and finiteness do not depend on the initialiser.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry, models
from xct.models.lifting import backproject_view, expand_view

D = 16
FOV, SOD, SDD = 400.0, 1000.0, 1500.0
ACQ = geometry.Acquisition(D, FOV, SOD, SDD)
TINY = dict(acquisition=ACQ, base_features=4, num_levels=2, num_res_blocks=1)


def _inputs(b: int, v: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    drr = rng.uniform(0.0, 1.0, size=(b, v, D, D)).astype(np.float32)
    angles = rng.uniform(0.0, 180.0, size=(b, v)).astype(np.float32)
    return jnp.asarray(drr), jnp.asarray(angles)


def _fake_params(model, *args):
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.mark.parametrize("fusion", ["mean", "attention"])
@pytest.mark.parametrize("lifting", ["expand", "backproject"])
def test_unet_shapes_for_any_view_count_with_the_same_parameters(lifting, fusion):
    model = models.get_model("unet", lifting=lifting, fusion=fusion, **TINY)
    variables = _fake_params(model, *_inputs(1, 2))
    assert set(variables) == {"params"}  # no mutable state in the generators
    for v in (1, 2, 4, 8):
        out = jax.eval_shape(model.apply, variables, *_inputs(2, v))
        assert set(out) == {"ct"}
        assert out["ct"].shape == (2, D, D, D) and out["ct"].dtype == jnp.float32


@pytest.mark.parametrize("lifting", ["expand", "backproject"])
def test_unet_runs_for_one_and_several_views(lifting):
    model = models.get_model("unet", lifting=lifting, fusion="attention", attention="gates", **TINY)
    variables = _fake_params(model, *_inputs(1, 2))
    apply = jax.jit(model.apply)
    one = apply(variables, *_inputs(1, 1))["ct"]
    four = apply(variables, *_inputs(1, 4))["ct"]
    for ct in (one, four):
        assert ct.shape == (1, D, D, D)
        assert np.all(np.isfinite(ct)) and float(jnp.std(ct)) > 0


@pytest.mark.parametrize("attention", ["bottleneck", "gates", "none"])
def test_unet_attention_variants_and_segmentation_head(attention):
    model = models.get_model(
        "unet", attention=attention, seg_classes=5, **{**TINY, "num_levels": 3}
    )
    drr, angles = _inputs(2, 3)
    out = jax.eval_shape(model.apply, _fake_params(model, drr, angles), drr, angles)
    assert out["ct"].shape == (2, D, D, D)
    assert out["seg_logits"].shape == (2, D, D, D, 5)


def test_baseline_shapes_and_runs():
    model = models.get_model("baseline", acquisition=ACQ, base_features=4, num_layers=3)
    drr, angles = _inputs(2, 2)
    variables = _fake_params(model, drr, angles)
    out = jax.jit(model.apply, static_argnames="train")(variables, drr, angles, train=True)
    assert set(out) == {"ct"} and out["ct"].shape == (2, D, D, D)
    assert np.all(np.isfinite(out["ct"]))
    for v in (1, 4, 8):
        assert jax.eval_shape(model.apply, variables, *_inputs(2, v))["ct"].shape == (2, D, D, D)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = models.get_model("unet", dtype="bfloat16", seg_classes=2, **TINY)
    drr, angles = _inputs(1, 2)
    shapes = jax.eval_shape(model.init, jax.random.key(0), drr, angles)
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(model.apply, _fake_params(model, drr, angles), drr, angles)
    assert out["ct"].dtype == jnp.float32 and out["seg_logits"].dtype == jnp.float32


def test_jitted_gradient_through_backproject_lifting_is_finite():
    model = models.get_model("unet", lifting="backproject", attention="none", **TINY)
    drr, angles = _inputs(1, 2)
    variables = _fake_params(model, drr, angles)
    target = jnp.zeros((1, D, D, D))

    @jax.jit
    def grad_fn(params):
        loss = lambda p: jnp.mean((model.apply({"params": p}, drr, angles)["ct"] - target) ** 2)  # noqa: E731
        return jax.grad(loss)(params)

    grads = grad_fn(variables["params"])
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    # The encoder sits before the lifting: its gradient must get through back_project.
    enc = jax.tree.leaves(grads["encoder"])
    assert sum(float(jnp.sum(jnp.abs(g))) for g in enc) > 0


@pytest.mark.parametrize("angle_deg", [0.0, 30.0, 90.0])
def test_liftings_place_features_where_the_view_sees_them(angle_deg):
    """Lift the detector coordinates themselves (channel 0 = column, 1 = row): each voxel
    must then hold the detector position it projects to (``Geometry.project_points``)."""
    pixel = ACQ.detector_pixel_mm
    rows, cols = np.meshgrid(np.arange(D), np.arange(D), indexing="ij")
    coords = jnp.asarray(np.stack([cols, rows], axis=-1).astype(np.float32))
    grid = geometry.VolumeGrid.centered((D, D, D), FOV / D)
    geom = geometry.circular_cone_beam(
        [angle_deg], sod_mm=SOD, sdd_mm=SDD, det_shape=(D, D), pixel_mm=pixel
    )
    rc = geom.project_points(grid.voxel_centers_xyz_mm().reshape(-1, 3))[0].reshape(D, D, D, 2)
    kw = dict(acquisition=ACQ, size=D, fov_mm=FOV)
    bp = np.asarray(jax.jit(lambda f: backproject_view(f, angle_deg, **kw))(coords))
    inner = (slice(2, -2),) * 3
    assert np.abs(bp[..., 0] - rc[..., 1])[inner].max() < 0.5  # detector pixels
    assert np.abs(bp[..., 1] - rc[..., 0])[inner].max() < 0.5
    ex = np.asarray(jax.jit(lambda f: expand_view(f, angle_deg, **kw))(coords))
    # Parallel rays at the isocentre's magnification: exact at the centre of the volume.
    centre = (slice(D // 2 - 1, D // 2 + 1),) * 3
    assert np.abs(ex[..., 0] - rc[..., 1])[centre].max() < 0.05
    if angle_deg == 0.0:  # source at +z: copied along z
        np.testing.assert_array_equal(ex, np.broadcast_to(ex[:1], ex.shape))
    if angle_deg == 90.0:  # source at +x: copied along x
        np.testing.assert_allclose(ex, np.broadcast_to(ex[:, :, :1], ex.shape), atol=1e-4)


def test_attention_fusion_is_view_count_agnostic_and_starts_as_the_mean():
    fusion = models.ViewFusion("attention")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 3, 4, 4, 4, 6)), jnp.float32)
    variables = jax.jit(fusion.init)(jax.random.key(1, impl="rbg"), x)
    apply = jax.jit(fusion.apply)
    np.testing.assert_allclose(apply(variables, x), jnp.mean(x, axis=1), atol=1e-5)
    x5 = jnp.asarray(rng.standard_normal((1, 5, 4, 4, 4, 6)), jnp.float32)
    assert jax.eval_shape(fusion.apply, variables, x5).shape == (1, 4, 4, 4, 6)


def test_patchgan_shapes_and_spectral_norm_state():
    model = models.get_model("patchgan", base_features=4, num_layers=2)
    ct = jnp.asarray(np.random.default_rng(0).uniform(size=(2, D, D, D)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), ct)
    assert set(variables) == {"params", "batch_stats"}
    train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    (logits, feats), updates = train_apply(variables, ct)
    assert logits.shape == (2, D // 4, D // 4, D // 4)
    assert [f.shape[1] for f in feats] == [D // 2, D // 4, D // 4]
    assert all(np.all(np.isfinite(f)) for f in [logits, *feats])
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    # Evaluation leaves the state alone and needs no mutable collection.
    logits_eval, _ = jax.eval_shape(
        lambda v: model.apply(v, ct, train=False), {**variables, **updates}
    )
    assert logits_eval.shape == logits.shape
    # Conditioning channels are accepted as a trailing channel axis.
    cond = jnp.stack([ct, ct], axis=-1)
    shapes = jax.eval_shape(model.init, jax.random.key(1), cond)
    out = jax.eval_shape(lambda v: model.apply(v, cond, train=False), shapes)
    assert out[0].shape == logits.shape


def test_get_model_errors_name_the_problem():
    with pytest.raises(ValueError, match="'transformer'"):
        models.get_model("transformer")
    with pytest.raises(ValueError, match="'depth'"):
        models.get_model("unet", depth=3)
    with pytest.raises(ValueError, match="lifting"):
        models.get_model("unet", lifting="project")
    with pytest.raises(ValueError, match="fusion"):
        models.get_model("unet", fusion="max")
    with pytest.raises(ValueError, match="attention"):
        models.get_model("unet", attention="both")
    with pytest.raises(ValueError, match="divisible"):
        models.get_model("unet", acquisition=geometry.Acquisition(20, FOV), num_levels=4)
    with pytest.raises(ValueError, match="dtype"):
        models.get_model("unet", dtype="float8")
    with pytest.raises(ValueError, match="num_layers"):
        models.get_model("patchgan", num_layers=0)
    with pytest.raises(ValueError, match="acquisition"):
        models.get_model("unet", acquisition={"resolution": 16})
    model = models.get_model("unet", **TINY)
    with pytest.raises(ValueError, match="drr"):
        model.init(jax.random.key(0), jnp.zeros((1, 2, D + 1, D)), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="angles_deg"):
        model.init(jax.random.key(0), jnp.zeros((1, 2, D, D)), jnp.zeros((1, 3)))
