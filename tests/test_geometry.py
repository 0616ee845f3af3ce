import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry


def test_centered_grid_matches_rtk_origin():
    grid = geometry.VolumeGrid.centered((4, 6, 8), (1.0, 2.0, 3.0))
    # RTK / ITK: origin = -(n - 1) * s / 2 per axis, in x, y, z order.
    assert grid.origin_xyz_mm == (-10.5, -5.0, -1.5)
    centres = grid.voxel_centers_xyz_mm()
    np.testing.assert_allclose(centres.mean(axis=(0, 1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(centres[0, 0, 1] - centres[0, 0, 0], [3.0, 0, 0])
    np.testing.assert_allclose(centres[1, 0, 0] - centres[0, 0, 0], [0, 0, 1.0])


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 211.0])
def test_circular_cone_beam_follows_rtk_convention(angle):
    sod, sdd = 1000.0, 1500.0
    g = geometry.circular_cone_beam(
        [angle], sod_mm=sod, sdd_mm=sdd, det_shape=(3, 5), pixel_mm=(2.0, 4.0)
    )
    t = np.deg2rad(angle)
    np.testing.assert_allclose(g.source_xyz_mm[0], [sod * np.sin(t), 0, sod * np.cos(t)], atol=1e-3)
    np.testing.assert_allclose(
        g.det_center_xyz_mm[0], [-(sdd - sod) * np.sin(t), 0, -(sdd - sod) * np.cos(t)], atol=1e-3
    )
    np.testing.assert_allclose(
        g.det_u_xyz_mm[0], 4.0 * np.array([np.cos(t), 0, -np.sin(t)]), atol=1e-5
    )
    np.testing.assert_allclose(g.det_v_xyz_mm[0], [0, 2.0, 0], atol=1e-6)
    pix = np.asarray(g.pixel_centers_xyz_mm())
    # pixel [row 0, col 0] sits at (-(cols-1)/2 * pu, -(rows-1)/2 * pv) in detector coordinates
    expected = g.det_center_xyz_mm[0] - 2 * g.det_u_xyz_mm[0] - 1 * g.det_v_xyz_mm[0]
    np.testing.assert_allclose(pix[0, 0, 0], expected, atol=1e-3)


def test_rotvec_matches_rotation_y_and_is_differentiable_at_zero():
    angles = jnp.asarray([0.0, 0.3, -1.2])
    rv = jnp.stack([jnp.zeros(3), angles, jnp.zeros(3)], axis=-1)
    np.testing.assert_allclose(
        geometry.rotation_from_rotvec(rv), geometry.rotation_y(angles), atol=1e-6
    )
    g = jax.jit(jax.grad(lambda w: jnp.sum(geometry.rotation_from_rotvec(w) ** 3)))(jnp.zeros(3))
    assert np.all(np.isfinite(g))


def test_pose_constructor_equals_circular():
    angles = [0.0, 45.0, 100.0]
    a = geometry.circular_cone_beam(
        angles, sod_mm=500.0, sdd_mm=800.0, det_shape=(4, 4), pixel_mm=1.0
    )
    rv = jnp.asarray([[0.0, np.deg2rad(x), 0.0] for x in angles], jnp.float32)
    b = geometry.from_pose_params(
        rv, jnp.zeros((3, 3)), sod_mm=500.0, sdd_mm=800.0, det_shape=(4, 4), pixel_mm=1.0
    )
    for f in ("source_xyz_mm", "det_center_xyz_mm", "det_u_xyz_mm", "det_v_xyz_mm"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), atol=1e-3)


def test_grid_from_sitk_keeps_geometry():
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.Image(5, 6, 7, sitk.sitkFloat32)
    img.SetSpacing((0.5, 0.75, 2.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    d = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    img.SetDirection(d)
    grid = geometry.VolumeGrid.from_sitk(img)
    assert grid.shape == (7, 6, 5)
    assert grid.spacing_mm == (2.0, 0.75, 0.5)
    for idx in [(0, 0, 0), (4, 5, 6), (1, 2, 3)]:
        np.testing.assert_allclose(
            grid.index_to_world(idx), img.TransformIndexToPhysicalPoint(idx), atol=1e-9
        )


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: geometry.VolumeGrid.centered((8, 8), 1.0), "shape"),
        (lambda: geometry.VolumeGrid.centered((8, 8, 0), 1.0), "shape"),
        (lambda: geometry.VolumeGrid.centered((8, 8, 8), (1.0, 0.0, 1.0)), "spacing_mm"),
        (lambda: geometry.VolumeGrid.centered((8, 8, 8), -1.0), "spacing_mm"),
        (lambda: geometry.circular_cone_beam([], det_shape=(4, 4)), "angles_deg"),
        (lambda: geometry.circular_cone_beam([0.0], sod_mm=0.0, det_shape=(4, 4)), "sod_mm"),
        (
            lambda: geometry.circular_cone_beam([0.0], sod_mm=100.0, sdd_mm=-5.0, det_shape=(4, 4)),
            "sdd_mm",
        ),
        (
            lambda: geometry.circular_cone_beam([0.0], sod_mm=100.0, sdd_mm=50.0, det_shape=(4, 4)),
            "sdd_mm",
        ),
        (lambda: geometry.circular_cone_beam([0.0], det_shape=(4, 0)), "det_shape"),
        (
            lambda: geometry.circular_parallel_beam([0.0], det_shape=(4, 4), pixel_mm=0.0),
            "pixel_mm",
        ),
    ],
)
def test_bad_geometry_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
