"""Tests for xct.physics: HU <-> mu, Beer-Lambert, Poisson noise, beam hardening, DRRs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xct import geometry, physics


def test_hu_to_mu_values():
    hu = jnp.array([0.0, -1000.0, -1024.0, 1000.0, -3000.0])
    mu = np.asarray(jax.jit(physics.hu_to_mu)(hu))
    w = physics.MU_WATER_PER_MM
    np.testing.assert_allclose(mu, [w, 0.0, 0.0, 2.0 * w, 0.0], atol=1e-7)
    assert mu.dtype == np.float32
    assert np.all(mu >= 0.0)


def test_mu_to_hu_round_trip():
    hu = jnp.linspace(-1000.0, 3000.0, 41)
    back = physics.mu_to_hu(physics.hu_to_mu(hu))
    np.testing.assert_allclose(np.asarray(back), np.asarray(hu), atol=1e-2)
    np.testing.assert_allclose(
        float(physics.mu_to_hu(0.03, mu_water_per_mm=0.02)), 500.0, rtol=1e-5
    )


@pytest.mark.parametrize("i0", [1.0, 1e4])
def test_beer_lambert_log_round_trip(i0):
    p = jnp.linspace(0.0, 8.0, 33)
    intensity = jax.jit(physics.beer_lambert, static_argnums=1)(p, i0)
    np.testing.assert_allclose(np.asarray(intensity), i0 * np.exp(-np.asarray(p)), rtol=1e-5)
    back = physics.intensity_to_line_integrals(intensity, i0)
    np.testing.assert_allclose(np.asarray(back), np.asarray(p), atol=1e-4)


def test_poisson_noise_statistics():
    photons = 1e4
    p = jnp.full((200, 200), 2.0)
    noisy = np.asarray(jax.jit(physics.add_poisson_noise)(jax.random.key(0), p, photons))
    counts = photons * np.exp(-2.0)  # ~1353 expected counts
    n = noisy.size
    var = 1.0 / counts
    # mean: bias of -log is ~ var / 2 (second order), far below the tolerance used here
    assert abs(noisy.mean() - 2.0) < 5.0 * np.sqrt(var / n) + var
    # sample variance: relative standard error sqrt(2 / n)
    assert abs(noisy.var() / var - 1.0) < 5.0 * np.sqrt(2.0 / n) + 0.01
    assert noisy.dtype == np.float32


def test_poisson_noise_clamps_starved_pixels():
    noisy = physics.add_poisson_noise(jax.random.key(1), jnp.full((4, 4), 50.0), 100.0)
    np.testing.assert_allclose(np.asarray(noisy), np.log(100.0), rtol=1e-6)


def test_normalisations_round_trip():
    hu = jnp.array([-2000.0, -1024.0, 0.0, 3071.0, 5000.0])
    n = np.asarray(physics.normalize_ct(hu))
    np.testing.assert_allclose(n, [0.0, 0.0, 1024.0 / 4095.0, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(physics.denormalize_ct(n[1:4])), [-1024.0, 0.0, 3071.0], atol=1e-3
    )
    p = jnp.array([0.0, 3.0, 10.0])
    np.testing.assert_allclose(np.asarray(physics.normalize_drr(p)), [0.0, 0.3, 1.0])
    np.testing.assert_allclose(np.asarray(physics.denormalize_drr(physics.normalize_drr(p))), p)


def test_spectrum_and_tables():
    assert len(physics.SPECTRUM_120KVP_KEV) == len(physics.SPECTRUM_120KVP_WEIGHTS)
    assert abs(sum(physics.SPECTRUM_120KVP_WEIGHTS) - 1.0) < 1e-6
    table = np.asarray(physics.MASS_ATTENUATION_CM2_G)
    assert table.shape == (len(physics.MATERIALS), len(physics.SPECTRUM_120KVP_KEV))
    assert np.all(np.diff(table, axis=1) < 0)  # attenuation falls with energy
    # the 70 keV interpolation agrees with MU_WATER_PER_MM (XCOM water at 70 keV)
    water70 = physics._mass_attenuation_at(70.0)[1]
    assert abs(water70 / 10.0 - physics.MU_WATER_PER_MM) / physics.MU_WATER_PER_MM < 0.01


def _slab_projections(water_mm, bone_mm):
    """Mono and poly line integrals through ``water_mm`` of water and ``bone_mm`` of 1000 HU."""
    hu = jnp.array([0.0, 1000.0])
    dens = physics.material_densities(hu)  # [3, 2] g/cm^3
    lm = (dens[:, 0] * water_mm + dens[:, 1] * bone_mm) / 10.0  # g/cm^2
    mu = physics.hu_to_mu(hu)
    mono = mu[0] * water_mm + mu[1] * bone_mm
    return float(mono), float(physics.polychromatic_line_integrals(lm[:, None])[0])


def test_polychromatic_matches_mono_for_thin_water():
    mono, poly = _slab_projections(1.0, 0.0)
    assert abs(poly / mono - 1.0) < 1e-3


def test_beam_hardening():
    ratios = []
    for scale in (1.0, 2.0, 4.0):
        mono, poly = _slab_projections(150.0 * scale, 25.0 * scale)
        assert poly < mono
        ratios.append(poly / mono)
    assert ratios[0] > ratios[1] > ratios[2]


def _tiny_setup():
    grid = geometry.VolumeGrid.centered((24, 24, 24), 4.0)
    zz, yy, xx = np.meshgrid(*[np.arange(24) - 11.5] * 3, indexing="ij")
    r = np.sqrt(xx**2 + yy**2 + zz**2)
    hu = np.where(r < 10, 0.0, -1000.0) + np.where(r < 4, 1000.0, 0.0)
    geom = geometry.circular_cone_beam(
        [0.0, 90.0], sod_mm=400.0, sdd_mm=600.0, det_shape=(12, 16), pixel_mm=12.0
    )
    return jnp.asarray(hu, jnp.float32), grid, geom


@pytest.mark.parametrize("mode", ["mono", "poly"])
def test_render_drrs_shape_dtype_determinism(mode):
    hu, grid, geom = _tiny_setup()
    render = jax.jit(lambda h, k: physics.render_drrs(h, grid, geom, k, mode=mode, photons=1e5))
    a = np.asarray(render(hu, jax.random.key(3)))
    b = np.asarray(render(hu, jax.random.key(3)))
    c = np.asarray(render(hu, jax.random.key(4)))
    assert a.shape == (2, 12, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    clean = np.asarray(physics.render_drrs(hu, grid, geom, mode=mode))
    assert np.abs(a - clean).max() < 0.2
    assert clean.max() > 1.0  # the ball is seen (about 80 mm of water plus bone)


def test_render_drrs_poly_below_mono_on_thick_paths():
    hu, grid, geom = _tiny_setup()
    mono = np.asarray(physics.render_drrs(hu, grid, geom, mode="mono"))
    poly = np.asarray(physics.render_drrs(hu, grid, geom, mode="poly"))
    centre = (slice(None), slice(5, 7), slice(7, 9))
    assert np.all(poly[centre] < mono[centre])


def test_render_drrs_errors():
    hu, grid, geom = _tiny_setup()
    with pytest.raises(ValueError, match="mode"):
        physics.render_drrs(hu, grid, geom, mode="spectral")
    with pytest.raises(ValueError, match="key"):
        physics.render_drrs(hu, grid, geom, photons=1e4)
