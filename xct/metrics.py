"""Image-quality metrics for reconstructed CT volumes and their projections.

Every function takes a batch and returns one value per example, shape ``[B]``; the caller
reduces (mean over a test set, etc.). All are pure and jit-able; arguments documented as
static (``sigma``, ``truncate``) must be Python numbers.

The primary definition (the one ``volume_metrics`` reports):

* HU are clipped to ``[HU_WINDOW_MIN, HU_WINDOW_MAX] = [-1000, 1024]`` and scaled to
  ``[0, 1]`` by ``hu_window``: ``(clip(hu, -1000, 1024) + 1000) / 2024``.
* ``psnr`` and ``ssim3d`` are computed on those windowed volumes with ``data_range = 1``;
  ``mae_hu`` and ``rmse_hu`` on the clipped HU (i.e. ``2024`` times the error of the
  windowed volumes).

Arrays: volumes are ``[B, Z, Y, X]`` (``[z, y, x]`` per example, as everywhere in xct);
DRRs are ``[B, views, rows, cols]``. Inputs that are not floating point are cast to
float32; nothing else is cast, so float64 inputs (under ``jax_enable_x64``) stay float64.

Only jax and numpy are imported here (see STYLE.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HU_WINDOW_MIN = -1000.0
HU_WINDOW_MAX = 1024.0

SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _float(x: jax.typing.ArrayLike) -> jax.Array:
    arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.float32)
    return arr


def _pair(name: str, pred, target, min_ndim: int = 2) -> tuple[jax.Array, jax.Array]:
    p, t = _float(pred), _float(target)
    if p.shape != t.shape:
        raise ValueError(f"{name}: pred shape {p.shape} does not match target shape {t.shape}")
    if p.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected a batch [B, ...] with at least {min_ndim} axes, got shape {p.shape}"
        )
    return p, t


def _batch_mean(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: ``[B, ...] -> [B]``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _batch_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _psnr_from_mse(mse: jax.Array, data_range) -> jax.Array:
    # log10(R^2 / mse) written as a difference of logs: mse = 0 gives +inf, not nan.
    r = jnp.asarray(data_range, mse.dtype)
    return 20.0 * jnp.log10(r) - 10.0 * jnp.log10(mse)


def _mask(name: str, mask, shape) -> jax.Array:
    m = jnp.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{name}: mask shape {m.shape} does not match the volumes' {shape}")
    return m


# ------------------------------------------------------------------------------------------
# HU window


def hu_window(hu: jax.typing.ArrayLike) -> jax.Array:
    """The primary metric window: ``(clip(hu, -1000, 1024) + 1000) / 2024``, in ``[0, 1]``.

    Any shape; HU in, unitless out (air 0, water about 0.494, 1024 HU and above 1).
    """
    h = jnp.clip(_float(hu), HU_WINDOW_MIN, HU_WINDOW_MAX)
    return (h - HU_WINDOW_MIN) / (HU_WINDOW_MAX - HU_WINDOW_MIN)


# ------------------------------------------------------------------------------------------
# PSNR


def psnr(
    pred: jax.typing.ArrayLike, target: jax.typing.ArrayLike, data_range: float = 1.0
) -> jax.Array:
    """Peak signal-to-noise ratio per example, dB, ``[B]``.

    ``PSNR_b = 10 log10(data_range^2 / MSE_b)`` with ``MSE_b = mean((pred_b - target_b)^2)``
    over all of example ``b``'s voxels (the whole 3D volume, no window or crop). Identical
    inputs give ``+inf`` (no cap; as ``skimage.metrics.peak_signal_noise_ratio``).

    Args:
      pred, target: ``[B, ...]`` (volumes ``[B, Z, Y, X]``), same shape and units.
      data_range: peak-to-peak range of the data in those units (1 for ``hu_window``).
    """
    p, t = _pair("psnr", pred, target)
    return _psnr_from_mse(_batch_mean(jnp.square(p - t)), data_range)


def psnr_masked(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    data_range: float = 1.0,
) -> jax.Array:
    """PSNR (dB) inside a mask, ``[B]``.

    ``10 log10(data_range^2 / MSE_b)`` with ``MSE_b = sum(m_b (pred_b - target_b)^2) /
    sum(m_b)``; ``mask`` is boolean (e.g. a body mask) or non-negative weights, the shape of
    ``pred``. An empty mask gives ``nan``; identical volumes ``+inf``.
    """
    p, t = _pair("psnr_masked", pred, target)
    m = _mask("psnr_masked", mask, p.shape).astype(p.dtype)
    mse = _batch_sum(m * jnp.square(p - t)) / _batch_sum(m)
    return _psnr_from_mse(mse, data_range)


def drr_psnr(
    pred_drr: jax.typing.ArrayLike, target_drr: jax.typing.ArrayLike, data_range: float
) -> jax.Array:
    """Projection-consistency PSNR (dB) per example, ``[B]``.

    ``10 log10(data_range^2 / mean((pred - target)^2))`` over all views and pixels of
    ``[B, views, rows, cols]`` DRRs. ``data_range`` has no default because DRRs have no
    natural one: pass e.g. the peak of the target DRRs (``physics.normalize_drr`` units: 1
    for a line integral of 10), and use the same value whenever results are compared.
    """
    p, t = _pair("drr_psnr", pred_drr, target_drr)
    if p.ndim != 4:
        raise ValueError(f"drr_psnr: expected [B, views, rows, cols] DRRs, got shape {p.shape}")
    return psnr(p, t, data_range)


# ------------------------------------------------------------------------------------------
# SSIM


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """Normalised 1D Gaussian taps on ``[-r, r]``, ``r = int(truncate * sigma + 0.5)``.

    The same taps as ``scipy.ndimage.gaussian_filter`` (hence scikit-image's SSIM).
    """
    if not (np.isfinite(sigma) and sigma > 0 and np.isfinite(truncate) and truncate > 0):
        raise ValueError(f"ssim3d: sigma and truncate must be positive, got {sigma}, {truncate}")
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _valid_filter(x: jax.Array, kernel: np.ndarray) -> jax.Array:
    """Separable 'valid' correlation over the last three axes: ``[B, Z, Y, X] -> [B, Z-2r, ...]``.

    Each axis is a product with a banded ``[n - 2r, n]`` matrix at full float32 precision
    (GPUs would otherwise use TF32); it compiles faster than shifted sums and runs as GEMMs.
    """
    k = kernel.size
    for axis, spec in ((1, "oi,bijk->bojk"), (2, "oj,bijk->biok"), (3, "ok,bijk->bijo")):
        n = x.shape[axis]
        band = np.zeros((n - k + 1, n), np.float64)
        for i in range(n - k + 1):
            band[i, i : i + k] = kernel
        x = jnp.einsum(spec, jnp.asarray(band, x.dtype), x, precision=jax.lax.Precision.HIGHEST)
    return x


def ssim3d_map(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    data_range: float = 1.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
) -> jax.Array:
    """The local SSIM map of ``ssim3d``, ``[B, Z - 2r, Y - 2r, X - 2r]`` (valid voxels only).

    See ``ssim3d`` for the definition; ``r = int(truncate * sigma + 0.5)``.
    """
    p, t = _pair("ssim3d", pred, target)
    if p.ndim != 4:
        raise ValueError(f"ssim3d: expected [B, Z, Y, X] volumes, got shape {p.shape}")
    kernel = _gaussian_kernel(float(sigma), float(truncate))
    if min(p.shape[1:]) < kernel.size:
        raise ValueError(
            f"ssim3d: volume {p.shape[1:]} is smaller than the {kernel.size}-voxel Gaussian "
            f"window (sigma={sigma}, truncate={truncate})"
        )
    # Moments of inputs centred on a per-example constant: SSIM's variances are shift
    # invariant and this avoids float32 cancellation in E[x^2] - E[x]^2 for flat regions.
    c = 0.5 * (_batch_mean(p) + _batch_mean(t))
    c = jax.lax.stop_gradient(c).reshape((-1, 1, 1, 1))
    x, y = p - c, t - c
    mx = _valid_filter(x, kernel)
    my = _valid_filter(y, kernel)
    vx = _valid_filter(x * x, kernel) - mx * mx
    vy = _valid_filter(y * y, kernel) - my * my
    cxy = _valid_filter(x * y, kernel) - mx * my
    ux, uy = mx + c, my + c
    r = jnp.asarray(data_range, p.dtype)
    c1 = jnp.square(SSIM_K1 * r)
    c2 = jnp.square(SSIM_K2 * r)
    num = (2.0 * ux * uy + c1) * (2.0 * cxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return num / den


def ssim3d(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    data_range: float = 1.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
) -> jax.Array:
    """Structural similarity of 3D volumes with a Gaussian window, ``[B]``.

    Definition (Wang et al. 2004, in 3D): with ``G`` the separable 3D Gaussian of standard
    deviation ``sigma`` voxels, truncated at radius ``r = int(truncate * sigma + 0.5)``
    (``r = 5``, an 11^3 window, by default) and normalised to sum 1, applied as a *valid*
    correlation (no padding; only voxels whose whole window lies inside the volume)::

        mu_x = G*x,  mu_y = G*y,
        s_x2 = G*(x^2) - mu_x^2,  s_y2 = G*(y^2) - mu_y^2,  s_xy = G*(x y) - mu_x mu_y,
        C1 = (0.01 data_range)^2,  C2 = (0.03 data_range)^2,
        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x2 + s_y2 + C2)),

    and the result is the mean of the SSIM map over those valid voxels. This equals
    ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=sigma,
    use_sample_covariance=False, data_range=data_range)``, which filters with reflective
    padding and then crops ``r`` voxels on every side before averaging.

    Args:
      pred, target: ``[B, Z, Y, X]``, every spatial side at least ``2r + 1`` voxels.
      data_range: peak-to-peak range of the data (1 for ``hu_window``).
      sigma, truncate: static Python floats.

    Returns:
      ``[B]``, 1 for identical volumes.
    """
    return _batch_mean(ssim3d_map(pred, target, data_range, sigma, truncate))


# ------------------------------------------------------------------------------------------
# Errors in HU


def mae_hu(pred_hu: jax.typing.ArrayLike, target_hu: jax.typing.ArrayLike) -> jax.Array:
    """Mean absolute error in HU, ``mean(|pred - target|)`` over each example, ``[B]``.

    No clipping here; ``volume_metrics`` clips both to ``[-1000, 1024]`` first.
    """
    p, t = _pair("mae_hu", pred_hu, target_hu)
    return _batch_mean(jnp.abs(p - t))


def rmse_hu(pred_hu: jax.typing.ArrayLike, target_hu: jax.typing.ArrayLike) -> jax.Array:
    """Root-mean-square error in HU, ``sqrt(mean((pred - target)^2))`` per example, ``[B]``.

    No clipping here; ``volume_metrics`` clips both to ``[-1000, 1024]`` first.
    """
    p, t = _pair("rmse_hu", pred_hu, target_hu)
    return jnp.sqrt(_batch_mean(jnp.square(p - t)))


def mae_hu_masked(
    pred_hu: jax.typing.ArrayLike, target_hu: jax.typing.ArrayLike, mask: jax.typing.ArrayLike
) -> jax.Array:
    """Mean absolute error in HU inside a mask, ``[B]``.

    ``sum(m |pred - target|) / sum(m)`` per example; ``mask`` is boolean (e.g. a body mask)
    or non-negative weights, the shape of ``pred_hu``. An empty mask gives ``nan``.
    """
    p, t = _pair("mae_hu_masked", pred_hu, target_hu)
    m = _mask("mae_hu_masked", mask, p.shape).astype(p.dtype)
    return _batch_sum(m * jnp.abs(p - t)) / _batch_sum(m)


# ------------------------------------------------------------------------------------------
# Convenience


def volume_metrics(
    pred_hu: jax.typing.ArrayLike, target_hu: jax.typing.ArrayLike
) -> dict[str, jax.Array]:
    """The primary metrics of HU volumes ``[B, Z, Y, X]``: a dict of ``[B]`` arrays.

    * ``psnr``: ``psnr(hu_window(pred), hu_window(target), 1.0)`` (dB, ``+inf`` if equal);
    * ``ssim``: ``ssim3d(hu_window(pred), hu_window(target), 1.0)`` (sigma 1.5 voxels);
    * ``mae_hu``, ``rmse_hu``: errors of the HU clipped to ``[-1000, 1024]``.

    A network's output in ``physics.normalize_ct`` units goes through
    ``physics.denormalize_ct`` first.
    """
    p, t = _pair("volume_metrics", pred_hu, target_hu)
    wp, wt = hu_window(p), hu_window(t)
    cp = jnp.clip(p, HU_WINDOW_MIN, HU_WINDOW_MAX)
    ct = jnp.clip(t, HU_WINDOW_MIN, HU_WINDOW_MAX)
    return {
        "psnr": psnr(wp, wt, 1.0),
        "ssim": ssim3d(wp, wt, 1.0),
        "mae_hu": mae_hu(cp, ct),
        "rmse_hu": rmse_hu(cp, ct),
    }
