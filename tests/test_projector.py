"""Projector checks against closed-form answers and against RTK (never against itself)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from xct import _native, geometry, peers, phantoms, projector

METHODS = projector.METHODS
# (method, kernel): every method in XLA, and Joseph also in the native CPU kernels (what
# kernel="auto" runs on CPUs; skipped where they cannot be built).
METHOD_KERNELS = [(m, "xla") for m in METHODS] + [("joseph", "native")]


def _kernel(kernel: str) -> str:
    if kernel == "native" and (jax.default_backend() != "cpu" or not _native.available()):
        pytest.skip("native CPU kernels unavailable (not on CPU, or no C++ compiler)")
    return kernel


N, SPACING = 64, 4.0  # the 64^3 analytic setting: 256 mm field of view


def _geometry(kind, angles=(0.0, 33.0, 90.0, 137.0), det=(64, 64)):
    if kind == "cone":  # magnification 2: 8 mm pixels are 4 mm at the isocentre
        return geometry.circular_cone_beam(
            angles, sod_mm=600.0, sdd_mm=1200.0, det_shape=det, pixel_mm=8.0
        )
    return geometry.circular_parallel_beam(
        angles, sod_mm=600.0, sdd_mm=1200.0, det_shape=det, pixel_mm=4.0
    )


@pytest.fixture(scope="module")
def grid64():
    return geometry.VolumeGrid.centered((N, N, N), SPACING)


def _analytic(ells, geom):
    o, d = geom.rays()
    o, d = np.asarray(o), np.asarray(d)
    return phantoms.line_integrals(ells, o, d), phantoms.near_surface(ells, o, d, 2 * SPACING)


@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("method, kernel", METHOD_KERNELS)
def test_smooth_ellipsoid_matches_analytic_line_integrals(grid64, kind, method, kernel):
    ells = [phantoms.Ellipsoid(0.02, (10.0, -15.0, 5.0), (80.0, 60.0, 100.0), 30.0, "smooth")]
    vol = phantoms.voxelize(ells, grid64, supersample=4)
    geom = _geometry(kind)
    ref, _ = _analytic(ells, geom)
    out = projector.forward_project(vol, grid64, geom, method=method, kernel=_kernel(kernel))
    out = np.asarray(out, np.float64)
    assert np.abs(out - ref).max() <= 0.01 * ref.max()


@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("method", ["joseph", "trilinear"])
def test_uniform_ellipsoid_matches_analytic_away_from_its_silhouette(grid64, kind, method):
    """A uniform (discontinuous) ellipsoid: at the silhouette the chord grows like a square
    root, so any voxel model is off by a voxel's worth of chord there (about 8% of the peak
    at 64^3); 2 voxels away from the surface the error is bounded like everywhere else."""
    ells = [phantoms.Ellipsoid(0.02, (10.0, -15.0, 5.0), (80.0, 60.0, 100.0), 30.0, "uniform")]
    vol = phantoms.voxelize(ells, grid64, supersample=4)
    geom = _geometry(kind)
    ref, edge = _analytic(ells, geom)
    out = np.asarray(projector.forward_project(vol, grid64, geom, method=method), np.float64)
    assert np.abs(out - ref)[~edge].max() <= 0.02 * ref.max()
    assert np.linalg.norm(out - ref) <= 0.03 * np.linalg.norm(ref)


@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("method", METHODS)
def test_shepp_logan_matches_analytic_line_integrals(grid64, kind, method):
    ells = phantoms.shepp_logan_3d(0.95 * N * SPACING / 2, scale=0.02, profile="smooth")
    vol = phantoms.voxelize(ells, grid64, supersample=3)
    geom = _geometry(kind)
    ref, edge = _analytic(ells, geom)
    out = np.asarray(projector.forward_project(vol, grid64, geom, method=method), np.float64)
    assert np.linalg.norm(out - ref) <= 0.01 * np.linalg.norm(ref)
    if method != "siddon":  # Siddon integrates the piecewise-constant volume: O(h) not O(h^2)
        assert np.abs(out - ref)[~edge].max() <= 0.01 * ref.max()


def _box_chord(o, d, lo, hi):
    """Length of the line o + t d (|d| = 1, t >= 0) inside the box [lo, hi] (slab method)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - o) / d, (hi - o) / d
    tn = np.nanmax(np.where(np.isfinite(np.minimum(t1, t2)), np.minimum(t1, t2), -np.inf), -1)
    tf = np.nanmin(np.where(np.isfinite(np.maximum(t1, t2)), np.maximum(t1, t2), np.inf), -1)
    return np.maximum(tf - np.maximum(tn, 0.0), 0.0)


@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_siddon_is_exact_for_voxel_boxes(kind):
    """Siddon integrates the piecewise-constant volume exactly: compare with box chords."""
    grid = geometry.VolumeGrid.centered((6, 7, 8), (3.0, 2.0, 2.5))
    rng = np.random.default_rng(0)
    vol = np.zeros(grid.shape, np.float32)
    picks = [tuple(rng.integers(0, n) for n in grid.shape) for _ in range(6)]
    for p in picks:
        vol[p] = rng.uniform(0.5, 2.0)
    geom = geometry.from_pose_params(
        rng.normal(size=(3, 3)) * 0.7,
        rng.normal(size=(3, 3)) * 2.0,
        sod_mm=60.0,
        sdd_mm=100.0,
        det_shape=(9, 11),
        pixel_mm=(1.9, 1.7),
        kind=kind,
    )
    o, d = (np.asarray(a, np.float64) for a in geom.rays())
    ref = np.zeros(o.shape[:-1])
    half = np.asarray(grid.spacing_xyz_mm) / 2
    for p in picks:
        c = grid.index_to_world(np.asarray(p[::-1], np.float64))
        ref += vol[p] * _box_chord(o, d, c - half, c + half)
    out = np.asarray(projector.forward_project(vol, grid, geom, method="siddon"), np.float64)
    np.testing.assert_allclose(out, ref, atol=1e-4 * ref.max())


@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("method, kernel", METHOD_KERNELS)
def test_adjoint_dot_product(kind, method, kernel):
    grid = geometry.VolumeGrid.centered((12, 14, 16), (2.0, 1.5, 1.8))
    geom = geometry.from_pose_params(
        jnp.asarray([[0.0, 0.3, 0.0], [0.2, 1.7, -0.1], [1.0, 0.0, 0.5]]),
        jnp.asarray([[0.0, 0.0, 0.0], [3.0, -2.0, 1.0], [-1.0, 1.0, 0.0]]),
        sod_mm=80.0,
        sdd_mm=140.0,
        det_shape=(10, 13),
        pixel_mm=(3.0, 2.5),
        kind=kind,
    )
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.uniform(kx, grid.shape)
    y = jax.random.uniform(ky, (3, 10, 13))
    kw = dict(method=method, chunk_rays=97, kernel=_kernel(kernel))
    ax = projector.forward_project(x, grid, geom, **kw)
    aty = projector.back_project(y, grid, geom, **kw)
    lhs = np.vdot(np.asarray(ax, np.float64), np.asarray(y, np.float64))
    rhs = np.vdot(np.asarray(x, np.float64), np.asarray(aty, np.float64))
    assert lhs > 0
    assert abs(lhs - rhs) / abs(lhs) <= 1e-5


SMALL_GRID = geometry.VolumeGrid.centered((8, 8, 8), 2.0)
SMALL_KW = dict(sod_mm=60.0, sdd_mm=100.0, det_shape=(6, 7), pixel_mm=3.0)


@pytest.mark.parametrize("method, kernel", METHOD_KERNELS)
def test_check_grads_volume_and_adjoint(method, kernel):
    geom = geometry.circular_cone_beam([10.0, 100.0], **SMALL_KW)
    x = jax.random.uniform(jax.random.key(0), SMALL_GRID.shape)
    y = jax.random.uniform(jax.random.key(1), (2, 6, 7))
    kw = dict(method=method, kernel=_kernel(kernel))
    # jitted: check_grads calls them many times, and eager op-by-op dispatch compiles each
    # primitive (and every loop body) on its own, which costs more than one jit here.
    fp = jax.jit(lambda v: projector.forward_project(v, SMALL_GRID, geom, **kw))
    bp = jax.jit(lambda d: projector.back_project(d, SMALL_GRID, geom, **kw))
    check_grads(fp, (x,), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)
    check_grads(bp, (y,), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)
    # and the custom VJPs are exactly the matched operators
    g = jax.random.normal(jax.random.key(2), (2, 6, 7))
    np.testing.assert_allclose(
        jax.vjp(fp, x)[1](g)[0],
        projector.back_project(g, SMALL_GRID, geom, **kw),
        rtol=1e-5,
        atol=1e-5,
    )


def _blob(grid, centre_xyz, sigma_mm):
    p = grid.voxel_centers_xyz_mm()
    return jnp.asarray(
        np.exp(-np.sum((p - np.asarray(centre_xyz)) ** 2, -1) / (2 * sigma_mm**2)), jnp.float32
    )


@pytest.mark.parametrize("method", ["joseph", "trilinear"])
def test_pose_gradients(method):
    """Derivatives in the pose (rotation vector and translation) on the interpolating path.

    Run in float64 so that finite differences with a small step (well inside one linear
    piece of the interpolant) are accurate; float32 gradients are checked for finiteness.
    """
    grid = geometry.VolumeGrid.centered((16, 16, 16), 2.0)
    kw = dict(sod_mm=100.0, sdd_mm=160.0, det_shape=(8, 8), pixel_mm=5.0)
    rv0 = np.asarray([[0.05, 0.2, -0.03], [0.0, 1.4, 0.1]])
    tr0 = np.asarray([[1.0, -0.5, 0.3], [-0.7, 0.2, 0.0]])
    target0 = np.random.default_rng(0).uniform(0, 5, (2, 8, 8))
    with jax.enable_x64(True):
        vol = jnp.asarray(_blob(grid, (3.0, -2.0, 1.0), 5.0), jnp.float64)
        target = jnp.asarray(target0, jnp.float64)

        @jax.jit
        def loss(rotvec, trans):
            geom = geometry.from_pose_params(rotvec, trans, **kw)
            return jnp.sum(
                (projector.forward_project(vol, grid, geom, method=method) - target) ** 2
            )

        check_grads(
            loss,
            (jnp.asarray(rv0), jnp.asarray(tr0)),
            order=1,
            modes=("rev",),
            eps=1e-5,
            atol=1e-3,
            rtol=1e-3,
        )
    vol32 = _blob(grid, (3.0, -2.0, 1.0), 5.0)

    def loss32(rotvec, trans):
        geom = geometry.from_pose_params(rotvec, trans, **kw)
        return jnp.sum((projector.forward_project(vol32, grid, geom, method=method) - target0) ** 2)

    g_rv, g_tr = jax.jit(jax.grad(loss32, argnums=(0, 1)))(
        jnp.asarray(rv0, jnp.float32), jnp.asarray(tr0, jnp.float32)
    )
    assert g_rv.dtype == jnp.float32
    assert np.all(np.isfinite(g_rv)) and np.all(np.isfinite(g_tr))
    assert np.abs(g_tr).max() > 0


@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("angle", [0.0, 27.0, 90.0, 143.0, 251.0])
def test_point_lands_where_projection_formula_says(kind, method, angle):
    grid = geometry.VolumeGrid.centered((24, 24, 24), 2.0)
    vox = (17, 6, 9)  # [z, y, x]
    vol = np.zeros(grid.shape, np.float32)
    vol[vox] = 1.0
    kw = dict(sod_mm=300.0, sdd_mm=450.0, det_shape=(40, 48), pixel_mm=(1.5, 1.5))
    make = geometry.circular_cone_beam if kind == "cone" else geometry.circular_parallel_beam
    geom = make([angle], **kw)
    world = grid.index_to_world(np.asarray(vox[::-1], np.float64))
    row, col = geom.project_points(world)[0, 0]
    img = np.asarray(projector.forward_project(vol, grid, geom, method=method))[0]
    rr, cc = np.meshgrid(np.arange(40), np.arange(48), indexing="ij")
    assert img.sum() > 0
    centroid = (np.sum(rr * img) / img.sum(), np.sum(cc * img) / img.sum())
    assert abs(centroid[0] - row) < 0.5 and abs(centroid[1] - col) < 0.5, (centroid, (row, col))


@pytest.mark.parametrize("kernel", ["xla", "native"])
def test_jit_vmap_and_chunking_agree(kernel):
    grid = geometry.VolumeGrid.centered((10, 12, 14), 2.0)
    geom = geometry.circular_cone_beam([0.0, 50.0, 120.0], **SMALL_KW)
    x = jax.random.uniform(jax.random.key(3), (2,) + grid.shape)
    fp = functools.partial(projector.forward_project, kernel=_kernel(kernel))
    eager = fp(x[0], grid, geom)
    jitted = jax.jit(fp, static_argnames=("method", "chunk_rays"))(x[0], grid, geom)
    batched = jax.jit(jax.vmap(lambda v: fp(v, grid, geom, chunk_rays=17)))(x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched[0], eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched[1], fp(x[1], grid, geom), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, kernel", METHOD_KERNELS)
def test_rays_missing_the_volume_give_zero_and_finite_gradients(method, kernel):
    grid = geometry.VolumeGrid.centered((8, 8, 8), 1.0)
    # A translated pose: the whole detector looks past the volume, plus an axis-aligned view.
    geom = geometry.from_pose_params(
        jnp.zeros((2, 3)),
        jnp.asarray([[200.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        sod_mm=50.0,
        sdd_mm=80.0,
        det_shape=(4, 4),
        pixel_mm=1.0,
    )
    x = jnp.ones(grid.shape)
    kw = dict(method=method, kernel=_kernel(kernel))
    out = jax.jit(lambda v: projector.forward_project(v, grid, geom, **kw))(x)
    assert float(jnp.abs(out[0]).max()) == 0.0
    assert float(out[1].min()) > 0

    def loss(v, t):
        g = geometry.from_pose_params(
            jnp.zeros((2, 3)), t, sod_mm=50.0, sdd_mm=80.0, det_shape=(4, 4), pixel_mm=1.0
        )
        return jnp.sum(projector.forward_project(v, grid, g, **kw) ** 2)

    t = jnp.asarray([[200.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    gv, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, t)
    assert np.all(np.isfinite(gv)) and np.all(np.isfinite(gt))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda g, geo: projector.forward_project(jnp.ones((8, 8)), g, geo), "volume"),
        (lambda g, geo: projector.forward_project(jnp.ones((1, 8, 8, 8)), g, geo), "volume"),
        (lambda g, geo: projector.forward_project(jnp.ones((8, 8, 9)), g, geo), "volume"),
        (lambda g, geo: projector.back_project(jnp.ones((2, 6, 6)), g, geo), "drr"),
        (
            lambda g, geo: projector.forward_project(jnp.ones((8, 8, 8)), g, geo, method="spline"),
            "method",
        ),
        (
            lambda g, geo: projector.forward_project(jnp.ones((8, 8, 8)), g, geo, chunk_rays=0),
            "chunk_rays",
        ),
        (lambda g, geo: projector.forward_project(jnp.ones((8, 8, 8)), (8, 8, 8), geo), "grid"),
        (lambda g, geo: projector.forward_project(jnp.ones((8, 8, 8)), g, "geom"), "geom"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    grid = geometry.VolumeGrid.centered((8, 8, 8), 2.0)
    geom = geometry.circular_cone_beam([0.0, 90.0], **SMALL_KW)
    with pytest.raises(ValueError, match=name):
        call(grid, geom)


# ---------------------------------------------------------------------------------------
# RTK, the trusted peer: the same numbers must give the same images.

needs_rtk = pytest.mark.skipif(not peers.rtk_available(), reason="itk-rtk is not installed")


def _chest_mu(shared_ct_dir, n):
    """The shared chest CT resampled to an n^3 cube of 512 mm, as attenuation per mm."""
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.ReadImage(str(shared_ct_dir / "chest_4dct_phase00_2mm.nii.gz"), sitk.sitkFloat32)
    spacing = 512.0 / n
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    ref = sitk.Image(n, n, n, sitk.sitkFloat32)
    ref.SetSpacing((spacing,) * 3)
    ref.SetOrigin(tuple(c - (n - 1) * spacing / 2 for c in centre))
    hu = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1000.0))
    return np.clip(0.02 * (1.0 + hu / 1000.0), 0.0, None).astype(np.float32), spacing


@needs_rtk
@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("views", [2, 8])
def test_agrees_with_rtk_joseph_on_real_chest_ct(shared_ct_dir, n, views):
    mu, spacing = _chest_mu(shared_ct_dir, n)
    angles = np.arange(views) * 360.0 / views + 7.0
    kw = dict(sod_mm=1000.0, sdd_mm=1500.0, det_shape=(n, n), pixel_mm=(1.5 * 560.0 / n,) * 2)
    ref = peers.rtk_forward_project(mu, spacing, angles, **kw)
    grid = geometry.VolumeGrid.centered(mu.shape, spacing)
    out = np.asarray(projector.forward_project(mu, grid, geometry.circular_cone_beam(angles, **kw)))
    assert ref.max() > 1.0  # a real chest: line integrals of several units
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= 0.01, rel
