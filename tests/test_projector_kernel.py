"""The fused Joseph kernels (xct/_joseph_kernel.py) against the portable XLA projector.

On CPU the Pallas kernels run in interpret mode (small sizes: it is slow); the ``gpu``
tests compile them with Triton and run at realistic sizes (``pytest -m gpu``). Every other
float32 Joseph test in tests/test_projector.py also goes through the kernels on a GPU,
since ``kernel="auto"`` selects them there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import _joseph_kernel, geometry, projector


def _case(kind: str, n: int, det: tuple[int, int]):
    # Non-cubic grid with anisotropic voxels, detector not a multiple of the tile, oblique
    # views (rays switch dominant axis inside one view).
    grid = geometry.VolumeGrid.centered((n, n + 2, n - 2), (1.5, 1.4, 1.6))
    if kind == "cone":
        geom = geometry.circular_cone_beam(
            [0.0, 41.0, 133.0], sod_mm=6 * n, sdd_mm=12 * n, det_shape=det, pixel_mm=3.4
        )
    else:
        geom = geometry.circular_parallel_beam([10.0, 45.0, 100.0], det_shape=det, pixel_mm=1.9)
    return grid, geom


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _check_against_xla(kind, n, det, kernel, seed):
    """The kernels' forward and adjoint equal XLA's, and are exact transposes."""
    grid, geom = _case(kind, n, det)
    rng = np.random.default_rng(seed)
    vol = jnp.asarray(rng.random(grid.shape, np.float32))
    y = jnp.asarray(rng.random((geom.num_views, *geom.det_shape), np.float32))
    fwd = jax.jit(lambda v: projector.forward_project(v, grid, geom, kernel=kernel))(vol)
    adjoint = jax.jit(lambda g: projector.back_project(g, grid, geom, kernel=kernel))
    adj = adjoint(y)
    assert _rel(fwd, projector.forward_project(vol, grid, geom, kernel="xla")) < 1e-5
    assert _rel(adj, projector.back_project(y, grid, geom, kernel="xla")) < 1e-5
    lhs, rhs = float(jnp.vdot(fwd, y)), float(jnp.vdot(vol, adj))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)
    assert float(jnp.abs(fwd).max()) > 0  # the rays do hit the volume
    return adjoint, y, adj


@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_interpreted_kernels_match_xla_and_are_exact_transposes(kind):
    _check_against_xla(kind, 10, (9, 18), "interpret", seed=1)


def test_interpreted_kernel_under_vmap_and_grad():
    grid, geom = _case("cone", 8, (8, 16))
    rng = np.random.default_rng(2)
    vols = jnp.asarray(rng.random((2, *grid.shape), np.float32))

    def loss(v, kernel):
        return jnp.sum(projector.forward_project(v, grid, geom, kernel=kernel) ** 2)

    batched = jax.jit(
        jax.vmap(lambda v: projector.forward_project(v, grid, geom, kernel="interpret"))
    )
    ref = jax.vmap(lambda v: projector.forward_project(v, grid, geom, kernel="xla"))(vols)
    assert _rel(batched(vols), ref) < 1e-5
    g = jax.jit(jax.grad(lambda v: loss(v, "interpret")))(vols[0])
    assert _rel(g, jax.grad(lambda v: loss(v, "xla"))(vols[0])) < 1e-5


def test_kernel_selection_and_errors():
    grid, geom = _case("cone", 8, (8, 16))
    vol = jnp.ones(grid.shape, jnp.float32)
    expected = "pallas" if jax.default_backend() == "gpu" else "xla"
    assert projector._resolve_kernel("auto", "joseph", grid, jnp.float32) == expected
    assert projector._resolve_kernel("auto", "siddon", grid, jnp.float32) == "xla"
    assert projector._resolve_kernel("auto", "joseph", grid, jnp.float64) == "xla"
    with pytest.raises(ValueError, match="kernel"):
        projector.forward_project(vol, grid, geom, kernel="cuda")
    with pytest.raises(ValueError, match="method='trilinear'"):
        projector.forward_project(vol, grid, geom, method="trilinear", kernel="pallas")
    assert _joseph_kernel.fits((512, 512, 512)) and not _joseph_kernel.fits((1024,) * 3)


def test_layouts_round_trip_is_the_transpose():
    rng = np.random.default_rng(3)
    vol = jnp.asarray(rng.random((5, 6, 7), np.float32))
    flat = jnp.asarray(rng.random(_joseph_kernel.layouts(vol).shape, np.float32))
    lhs = float(jnp.vdot(_joseph_kernel.layouts(vol), flat))
    rhs = float(jnp.vdot(vol, _joseph_kernel.from_layouts(flat, vol.shape)))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_gpu_kernels_match_xla_and_are_exact_transposes(kind):
    assert jax.default_backend() == "gpu"
    adjoint, y, adj = _check_against_xla(kind, 64, (70, 90), "pallas", seed=4)
    # Atomics accumulate in a different order each run: the result moves by rounding only.
    assert _rel(adjoint(y), adj) < 1e-6
