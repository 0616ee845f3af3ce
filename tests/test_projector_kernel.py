"""The fused Joseph kernels against the portable XLA projector: the native C++ CPU kernels
(xct/_native) and the Pallas GPU kernels (xct/_joseph_kernel.py).

The native kernels are built on first use (skipped, with the reason, where no C++ compiler
is present). On CPU the Pallas kernels run in interpret mode (small sizes: it is slow); the
``gpu`` tests compile them with Triton and run at realistic sizes (``pytest -m gpu``). Every
other float32 Joseph test in tests/test_projector.py also goes through the fused kernels,
since ``kernel="auto"`` selects them (native on CPU, Pallas on GPU).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import _joseph_kernel, _native, geometry, projector


def _case(kind: str, n: int, det: tuple[int, int], pixel_mm: float = 3.4):
    # Non-cubic grid with anisotropic voxels, detector not a multiple of the tile, oblique
    # views (rays switch dominant axis inside one view).
    grid = geometry.VolumeGrid.centered((n, n + 2, n - 2), (1.5, 1.4, 1.6))
    if kind == "cone":
        geom = geometry.circular_cone_beam(
            [0.0, 41.0, 133.0], sod_mm=6 * n, sdd_mm=12 * n, det_shape=det, pixel_mm=pixel_mm
        )
    else:
        geom = geometry.circular_parallel_beam([10.0, 45.0, 100.0], det_shape=det, pixel_mm=1.9)
    return grid, geom


def _needs_native():
    if not _native.available():
        pytest.skip("native CPU kernels unavailable (no C++ compiler, or the build failed)")


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _check_against_xla(kind, n, det, kernel, seed, pixel_mm=3.4):
    """The kernels' forward and adjoint equal XLA's, and are exact transposes."""
    grid, geom = _case(kind, n, det, pixel_mm)
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


@pytest.mark.parametrize(
    "kind, n, det, pixel_mm",
    [
        ("cone", 10, (9, 18), 3.4),
        ("parallel", 10, (9, 18), 3.4),
        ("cone", 19, (13, 22), 3.4),
        # rays much denser than voxels: neighbouring lanes share voxels in the adjoint
        ("cone", 8, (21, 26), 0.7),
    ],
)
def test_native_kernels_match_xla_and_are_exact_transposes(kind, n, det, pixel_mm):
    _needs_native()
    _check_against_xla(kind, n, det, "native", seed=5, pixel_mm=pixel_mm)


def test_native_kernels_under_vmap_and_grad():
    """Batched volumes, projections and geometries (vmap) give the unbatched results, and
    the volume gradient is the adjoint (each unbatched call is checked against XLA above)."""
    _needs_native()
    grid, geom = _case("cone", 8, (7, 10))
    rng = np.random.default_rng(6)
    vols = jnp.asarray(rng.random((2, *grid.shape), np.float32))
    drrs = jnp.asarray(rng.random((2, geom.num_views, *geom.det_shape), np.float32))

    def fp(v, g=geom):
        return projector.forward_project(v, grid, g, kernel="native")

    def bp(y):
        return projector.back_project(y, grid, geom, kernel="native")

    for f, x in ((fp, vols), (bp, drrs)):
        batched = jax.jit(jax.vmap(f))(x)
        assert _rel(batched, jnp.stack([f(x[0]), f(x[1])])) < 1e-6
    # one volume seen through a batch of geometries (e.g. per-example poses)
    geoms = jax.vmap(
        lambda w: geometry.from_pose_params(
            w, jnp.zeros((3, 3)), sod_mm=48.0, sdd_mm=96.0, det_shape=(7, 10), pixel_mm=3.4
        )
    )(jnp.asarray(rng.normal(0.0, 1.0, (2, 3, 3)), jnp.float32))
    per_geom = jax.vmap(lambda g: fp(vols[0], g))(geoms)
    one = jax.tree.map(lambda a: a[1], geoms)
    assert _rel(per_geom[1], fp(vols[0], one)) < 1e-6
    # d/dv sum(A v)^2 = 2 A^T A v: the custom VJP runs the native adjoint
    g = jax.jit(jax.grad(lambda v: jnp.sum(fp(v) ** 2)))(vols[0])
    assert _rel(g, 2.0 * bp(fp(vols[0]))) < 1e-6


_OTHER_BUILD = """
import sys
sys.path.insert(0, {tests!r})
from test_projector_kernel import _check_against_xla
from xct import _native
assert _native.simd_width() == {width}, _native.simd_width()
for kind, n, det, pixel_mm in [
    ("cone", 10, (9, 18), 3.4), ("parallel", 10, (9, 18), 3.4), ("cone", 8, (21, 26), 0.7)
]:
    _check_against_xla(kind, n, det, "native", seed=5, pixel_mm=pixel_mm)
"""


@pytest.mark.parametrize(
    "flags, width",
    [
        ("-mno-avx512f", 8),  # the AVX2 code, e.g. AMD Zen 2/3
        pytest.param("-mno-avx512f -mno-avx2", 1, marks=pytest.mark.slow),  # portable code
    ],
)
def test_native_kernels_built_for_other_instruction_sets(tmp_path, flags, width):
    """The AVX2 and portable builds (what other CPUs run) pass the same checks; each is
    built into a fresh cache and checked in its own process (targets register once)."""
    _needs_native()
    if width >= _native.simd_width():
        pytest.skip(f"this machine's build is already {_native.simd_width()} lanes wide")
    env = dict(os.environ, XCT_NATIVE_FLAGS=flags, XCT_CACHE_DIR=str(tmp_path))
    script = _OTHER_BUILD.format(tests=str(pathlib.Path(__file__).parent), width=width)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_without_a_compiler_auto_falls_back_to_xla(monkeypatch, tmp_path):
    monkeypatch.setenv("XCT_CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("XCT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(projector.KERNEL_ENV, raising=False)
    grid, geom = _case("cone", 8, (8, 16))
    vol = jnp.ones(grid.shape, jnp.float32)
    assert not _native.available()
    assert projector._resolve_kernel("auto", "joseph", grid, jnp.float32) == "xla"
    assert float(projector.forward_project(vol, grid, geom).max()) > 0
    with pytest.raises(ValueError, match="could not be built"):
        projector.forward_project(vol, grid, geom, kernel="native")
    with pytest.raises(_native.BuildError, match="not found"):
        _native.build()


def test_kernel_selection_and_errors(monkeypatch):
    monkeypatch.delenv(projector.KERNEL_ENV, raising=False)
    grid, geom = _case("cone", 8, (8, 16))
    vol = jnp.ones(grid.shape, jnp.float32)
    if jax.default_backend() == "gpu":
        expected = "pallas"
    else:
        expected = "native" if _native.preferred() else "xla"
    assert projector._resolve_kernel("auto", "joseph", grid, jnp.float32) == expected
    assert projector._resolve_kernel("auto", "siddon", grid, jnp.float32) == "xla"
    assert projector._resolve_kernel("auto", "joseph", grid, jnp.float64) == "xla"
    with pytest.raises(ValueError, match="kernel"):
        projector.forward_project(vol, grid, geom, kernel="cuda")
    with pytest.raises(ValueError, match="method='trilinear'"):
        projector.forward_project(vol, grid, geom, method="trilinear", kernel="pallas")
    with pytest.raises(ValueError, match="method='siddon'"):
        projector.forward_project(vol, grid, geom, method="siddon", kernel="native")
    monkeypatch.setenv(projector.KERNEL_ENV, "xla")  # the override forces XLA
    assert projector._resolve_kernel("auto", "joseph", grid, jnp.float32) == "xla"
    assert _joseph_kernel.fits((512, 512, 512)) and not _joseph_kernel.fits((1024,) * 3)
    assert _native.fits((1024, 1024, 1024)) and not _native.fits((1024, 1024, 2048))


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
