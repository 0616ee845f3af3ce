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

With a body mask, ``volume_metrics(..., mask=m)`` adds the same metrics restricted to it
(``psnr_masked``, ``ssim3d_masked``, ``mae_hu_masked``, ``rmse_hu_masked``). ``drr_psnr``
scores re-projected DRRs against the input DRRs (the caller projects; see
``xct.projector``).

A second definition, ``x2ct_metrics``, reproduces X2CT-GAN's published evaluation (slice-
wise 2D PSNR with peak 4095 and 2D SSIM, averaged over three orientations) so numbers can be
compared with papers that use it; ``metrics_by_definition`` picks one by name and
``DEFINITIONS`` describes each in one line for reports.

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


def _valid_filter(x: jax.Array, kernel: np.ndarray, axes=(1, 2, 3)) -> jax.Array:
    """Separable 'valid' correlation along ``axes``: each shrinks by ``kernel.size - 1``.

    Each axis is a product with a banded ``[n - k + 1, n]`` matrix at full float32 precision
    (GPUs would otherwise use TF32); it compiles faster than shifted sums and runs as GEMMs.
    """
    k = kernel.size
    letters = "abcdefgh"[: x.ndim]
    for axis in axes:
        n = x.shape[axis]
        band = np.zeros((n - k + 1, n), np.float64)
        for i in range(n - k + 1):
            band[i, i : i + k] = kernel
        out = letters[:axis] + "z" + letters[axis + 1 :]
        spec = f"z{letters[axis]},{letters}->{out}"
        x = jnp.einsum(spec, jnp.asarray(band, x.dtype), x, precision=jax.lax.Precision.HIGHEST)
    return x


def _ssim_from_moments(x, y, c, filt, data_range, cov_norm: float = 1.0) -> jax.Array:
    """The SSIM map from inputs centred on ``c`` and a linear local-mean filter ``filt``."""
    mx = filt(x)
    my = filt(y)
    vx = cov_norm * (filt(x * x) - mx * mx)
    vy = cov_norm * (filt(y * y) - my * my)
    cxy = cov_norm * (filt(x * y) - mx * my)
    ux, uy = mx + c, my + c
    r = jnp.asarray(data_range, x.dtype)
    c1 = jnp.square(SSIM_K1 * r)
    c2 = jnp.square(SSIM_K2 * r)
    num = (2.0 * ux * uy + c1) * (2.0 * cxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return num / den


def _centred(p: jax.Array, t: jax.Array):
    """Inputs centred on a per-example constant ``c`` ``[B, 1, 1, 1]`` (under stop_gradient).

    SSIM's variances are shift invariant; centring avoids float32 cancellation in
    ``E[x^2] - E[x]^2`` for flat regions.
    """
    c = 0.5 * (_batch_mean(p) + _batch_mean(t))
    c = jax.lax.stop_gradient(c).reshape((-1,) + (1,) * (p.ndim - 1))
    return p - c, t - c, c


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
    x, y, c = _centred(p, t)
    return _ssim_from_moments(x, y, c, lambda v: _valid_filter(v, kernel), data_range)


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


def ssim3d_masked(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    data_range: float = 1.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
) -> jax.Array:
    """``ssim3d`` averaged over a mask, ``[B]``.

    The SSIM map of ``ssim3d_map`` (valid voxels, windows computed over the whole volume,
    unmasked) is averaged with the weights ``mask`` cropped by ``r`` voxels on every side:
    ``sum(m S) / sum(m)``. ``mask`` is boolean (e.g. a body mask) or non-negative weights,
    the shape of ``pred``; an all-true mask gives ``ssim3d``, an empty one (inside the
    valid region) ``nan``.
    """
    p, t = _pair("ssim3d_masked", pred, target)
    m = _mask("ssim3d_masked", mask, p.shape).astype(p.dtype)
    s = ssim3d_map(p, t, data_range, sigma, truncate)
    r = (p.shape[1] - s.shape[1]) // 2
    m = m[:, r : p.shape[1] - r, r : p.shape[2] - r, r : p.shape[3] - r]
    return _batch_sum(m * s) / _batch_sum(m)


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


def rmse_hu_masked(
    pred_hu: jax.typing.ArrayLike, target_hu: jax.typing.ArrayLike, mask: jax.typing.ArrayLike
) -> jax.Array:
    """Root-mean-square error in HU inside a mask, ``sqrt(sum(m e^2) / sum(m))``, ``[B]``."""
    p, t = _pair("rmse_hu_masked", pred_hu, target_hu)
    m = _mask("rmse_hu_masked", mask, p.shape).astype(p.dtype)
    return jnp.sqrt(_batch_sum(m * jnp.square(p - t)) / _batch_sum(m))


# ------------------------------------------------------------------------------------------
# Slice-wise 2D metrics (used by the X2CT-GAN definition)


def _spatial_axis(name: str, slice_axis: int) -> int:
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"{name}: slice_axis must be 0 (z), 1 (y) or 2 (x), got {slice_axis!r}")
    return int(slice_axis) + 1


def psnr_slices(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    data_range: float = 1.0,
    slice_axis: int = 0,
    zero_mse_db: float | None = None,
) -> jax.Array:
    """PSNR (dB) of each 2D slice, averaged over the slices, ``[B]``.

    Slices are perpendicular to spatial ``slice_axis`` of ``[B, Z, Y, X]`` (0: the ``Z``
    slices ``[Y, X]``, 1: ``[Z, X]``, 2: ``[Z, Y]``). Slice ``s`` has
    ``PSNR_s = 10 log10(data_range^2 / mean_slice((pred - target)^2))``; a slice with zero
    error gets ``zero_mse_db`` (``None``: ``+inf``, as ``psnr``).
    """
    p, t = _pair("psnr_slices", pred, target)
    if p.ndim != 4:
        raise ValueError(f"psnr_slices: expected [B, Z, Y, X] volumes, got shape {p.shape}")
    a = _spatial_axis("psnr_slices", slice_axis)
    other = tuple(i for i in (1, 2, 3) if i != a)
    mse = jnp.mean(jnp.square(p - t), axis=other)  # [B, slices]
    db = _psnr_from_mse(mse, data_range)
    if zero_mse_db is not None:
        db = jnp.where(mse == 0, jnp.asarray(zero_mse_db, db.dtype), db)
    return jnp.mean(db, axis=1)


def ssim_slices(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    data_range: float = 1.0,
    slice_axis: int = 0,
    win_size: int = 7,
    use_sample_covariance: bool = True,
) -> jax.Array:
    """2D SSIM of each slice with a uniform ``win_size^2`` window, averaged, ``[B]``.

    Slices as in ``psnr_slices``. Per slice, the local means and (co)variances are
    ``win_size x win_size`` box averages applied as a *valid* correlation; the variances and
    the covariance are multiplied by ``N / (N - 1)``, ``N = win_size^2``, when
    ``use_sample_covariance``; ``C1, C2`` as in ``ssim3d``. The slice's SSIM is the mean of
    its valid map, and the result the mean over slices. This is scikit-image's default
    ``structural_similarity(a, b, data_range=data_range)`` per 2D slice (window 7, uniform,
    sample covariance, reflective padding cropped away), i.e. ``channel_axis=slice_axis``.

    Args:
      pred, target: ``[B, Z, Y, X]``; the two in-slice sides at least ``win_size``.
      data_range: peak-to-peak range of the data.
      slice_axis: 0 (z), 1 (y) or 2 (x); static.
      win_size: odd window side (static), 7 by default.
      use_sample_covariance: static bool.
    """
    p, t = _pair("ssim_slices", pred, target)
    if p.ndim != 4:
        raise ValueError(f"ssim_slices: expected [B, Z, Y, X] volumes, got shape {p.shape}")
    a = _spatial_axis("ssim_slices", slice_axis)
    win_size = int(win_size)
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"ssim_slices: win_size must be a positive odd number, got {win_size}")
    other = tuple(i for i in (1, 2, 3) if i != a)
    if min(p.shape[i] for i in other) < win_size:
        raise ValueError(
            f"ssim_slices: slices {tuple(p.shape[i] for i in other)} are smaller than the "
            f"{win_size}x{win_size} window"
        )
    n = win_size * win_size
    cov_norm = n / (n - 1.0) if use_sample_covariance else 1.0
    box = np.full((win_size,), 1.0 / win_size)
    x, y, c = _centred(p, t)
    s = _ssim_from_moments(x, y, c, lambda v: _valid_filter(v, box, other), data_range, cov_norm)
    return _batch_mean(s)  # every slice has the same number of valid pixels


def cosine_similarity(pred: jax.typing.ArrayLike, target: jax.typing.ArrayLike) -> jax.Array:
    """``<pred, target> / (|pred| |target|)`` over each example's voxels, ``[B]``."""
    p, t = _pair("cosine_similarity", pred, target)
    return _batch_sum(p * t) / jnp.sqrt(_batch_sum(p * p) * _batch_sum(t * t))


# ------------------------------------------------------------------------------------------
# X2CT-GAN compatibility
#
# Reproduces the evaluation of X2CT-GAN (Ying et al., CVPR 2019; github.com/kylekma/X2CT,
# 3DGAN/test.py with 3DGAN/lib/utils/metrics_np.py). The CT is stored as HU + 1024,
# clipped to CT_MIN_MAX = [0, 2500] and divided by 2500; the prediction is clipped to
# [0, 1]. Cosine similarity and SSIM use those [0, 1] volumes; MAE and PSNR use them mapped
# back with ``x * 2500`` and cast to int32 (truncation), PSNR with a peak of 4095 (the
# 12-bit range, not 2500). SSIM is scikit-image's ``compare_ssim(a, b, data_range=1,
# multichannel=True)`` on each of three transposes of the volume, i.e. 2D SSIM (7x7
# uniform window, sample covariance) of every slice, averaged over the slices; then the
# three orientations are averaged. PSNR likewise: per slice, a zero-error slice counts
# 100 dB, averaged over slices and then orientations ("PSNR-avg"; "psnr-3d" is the whole
# volume).

X2CT_HU_OFFSET = 1024.0
X2CT_CT_MAX = 2500.0
X2CT_PSNR_PEAK = 4095.0
X2CT_ZERO_MSE_DB = 100.0
X2CT_SSIM_WIN = 7


def x2ct_window(hu: jax.typing.ArrayLike) -> jax.Array:
    """X2CT-GAN's CT normalisation: ``clip(hu + 1024, 0, 2500) / 2500``, in ``[0, 1]``.

    Any shape; air (-1024 HU) 0, water 0.4096, 1476 HU and above 1.
    """
    v = jnp.clip(_float(hu) + X2CT_HU_OFFSET, 0.0, X2CT_CT_MAX)
    return v / X2CT_CT_MAX


def x2ct_metrics(
    pred_hu: jax.typing.ArrayLike, target_hu: jax.typing.ArrayLike, quantize: bool = True
) -> dict[str, jax.Array]:
    """X2CT-GAN's test metrics of HU volumes ``[B, Z, Y, X]``: a dict of ``[B]`` arrays.

    With ``w = x2ct_window(hu)`` in ``[0, 1]`` and ``q = trunc(w * 2500)`` (X2CT-GAN's
    ``astype(np.int32)``; ``quantize=False`` keeps ``w * 2500`` unrounded):

    * ``psnr``: mean over the three orientations of ``psnr_slices(q_pred, q_target, 4095,
      axis, zero_mse_db=100)`` (their "PSNR-avg"); ``psnr_z``, ``psnr_y``, ``psnr_x``: the
      three terms (slices perpendicular to that array axis);
    * ``psnr_3d``: PSNR of the whole volume, peak 4095, 100 dB if identical ("psnr-3d");
    * ``ssim``: mean over orientations of ``ssim_slices(w_pred, w_target, 1.0, axis)``
      (7x7 uniform window, sample covariance; "SSIM-avg"), and ``ssim_z/y/x``;
    * ``mae_hu``: ``mean(|q_pred - q_target|)`` (HU within ``[-1024, 1476]``; "MAE");
    * ``cosine_similarity``: of ``w_pred`` and ``w_target`` ("CosineSimilarity").

    Each in-slice side must be at least 7 voxels. The peak 4095 over a range of 2500 gives
    ``20 log10(4095 / 2024) = 6.12`` dB more than the primary ``psnr`` for the same errors
    inside both windows (more still slice-averaged: the mean of per-slice PSNRs is at least
    the PSNR of the mean error).
    """
    p, t = _pair("x2ct_metrics", pred_hu, target_hu)
    if p.ndim != 4:
        raise ValueError(f"x2ct_metrics: expected [B, Z, Y, X] volumes, got shape {p.shape}")
    wp, wt = x2ct_window(p), x2ct_window(t)
    # X2CT-GAN maps its [0, 1] tensors back with x * 2500 and truncates; the round trip
    # through /2500 is kept on purpose (it moves some integers down by one, as theirs does).
    qp, qt = wp * X2CT_CT_MAX, wt * X2CT_CT_MAX
    if quantize:
        qp, qt = jnp.trunc(qp), jnp.trunc(qt)
    out = {}
    for name, axis in (("z", 0), ("y", 1), ("x", 2)):
        out[f"psnr_{name}"] = psnr_slices(qp, qt, X2CT_PSNR_PEAK, axis, X2CT_ZERO_MSE_DB)
        out[f"ssim_{name}"] = ssim_slices(wp, wt, 1.0, axis, X2CT_SSIM_WIN, True)
    out["psnr"] = (out["psnr_z"] + out["psnr_y"] + out["psnr_x"]) / 3.0
    out["ssim"] = (out["ssim_z"] + out["ssim_y"] + out["ssim_x"]) / 3.0
    mse = _batch_mean(jnp.square(qp - qt))
    out["psnr_3d"] = jnp.where(
        mse == 0, jnp.asarray(X2CT_ZERO_MSE_DB, mse.dtype), _psnr_from_mse(mse, X2CT_PSNR_PEAK)
    )
    out["mae_hu"] = _batch_mean(jnp.abs(qp - qt))
    out["cosine_similarity"] = cosine_similarity(wp, wt)
    return out


# ------------------------------------------------------------------------------------------
# Convenience


def volume_metrics(
    pred_hu: jax.typing.ArrayLike,
    target_hu: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike | None = None,
) -> dict[str, jax.Array]:
    """The primary metrics of HU volumes ``[B, Z, Y, X]``: a dict of ``[B]`` arrays.

    * ``psnr``: ``psnr(hu_window(pred), hu_window(target), 1.0)`` (dB, ``+inf`` if equal);
    * ``ssim``: ``ssim3d(hu_window(pred), hu_window(target), 1.0)`` (sigma 1.5 voxels);
    * ``mae_hu``, ``rmse_hu``: errors of the HU clipped to ``[-1000, 1024]``;
    * with a ``mask`` (``[B, Z, Y, X]``, boolean body mask or non-negative weights), also
      ``psnr_mask``, ``ssim_mask``, ``mae_hu_mask``, ``rmse_hu_mask``: the same restricted
      to the mask (``psnr_masked``, ``ssim3d_masked``, ``mae_hu_masked``,
      ``rmse_hu_masked``; SSIM windows still see the whole volume).

    A network's output in ``physics.normalize_ct`` units goes through
    ``physics.denormalize_ct`` first.
    """
    p, t = _pair("volume_metrics", pred_hu, target_hu)
    wp, wt = hu_window(p), hu_window(t)
    cp = jnp.clip(p, HU_WINDOW_MIN, HU_WINDOW_MAX)
    ct = jnp.clip(t, HU_WINDOW_MIN, HU_WINDOW_MAX)
    out = {
        "psnr": psnr(wp, wt, 1.0),
        "ssim": ssim3d(wp, wt, 1.0),
        "mae_hu": mae_hu(cp, ct),
        "rmse_hu": rmse_hu(cp, ct),
    }
    if mask is not None:
        m = _mask("volume_metrics", mask, p.shape)
        out["psnr_mask"] = psnr_masked(wp, wt, m, 1.0)
        out["ssim_mask"] = ssim3d_masked(wp, wt, m, 1.0)
        out["mae_hu_mask"] = mae_hu_masked(cp, ct, m)
        out["rmse_hu_mask"] = rmse_hu_masked(cp, ct, m)
    return out


DEFINITIONS = {
    "primary": (
        "HU clipped to [-1000, 1024] and scaled to [0, 1]; PSNR over the whole 3D volume, "
        "peak 1; SSIM 3D, Gaussian window sigma 1.5 voxels (11^3), data range 1, valid "
        "voxels only; MAE/RMSE in HU on the clipped HU; *_mask: the same restricted to a "
        "body mask (SSIM map averaged over the mask)"
    ),
    "x2ct": (
        "X2CT-GAN (CVPR 2019) test.py: CT as HU+1024 clipped to [0, 2500]; PSNR per 2D "
        "slice on trunc(HU+1024) with peak 4095 (zero-error slices 100 dB), averaged over "
        "slices, then over the three orientations (psnr_3d: whole volume); SSIM per 2D slice "
        "on (HU+1024)/2500 in [0, 1], data range 1, 7x7 uniform window, sample covariance, "
        "averaged likewise; MAE in HU on trunc(HU+1024); cosine similarity on [0, 1]"
    ),
}


def metrics_by_definition(
    pred_hu: jax.typing.ArrayLike,
    target_hu: jax.typing.ArrayLike,
    definition: str = "primary",
    mask: jax.typing.ArrayLike | None = None,
) -> dict[str, jax.Array]:
    """Metrics of HU volumes ``[B, Z, Y, X]`` in a named definition (see ``DEFINITIONS``).

    ``"primary"``: ``volume_metrics(pred_hu, target_hu, mask)``; ``"x2ct"``:
    ``x2ct_metrics(pred_hu, target_hu)`` (takes no mask). ``definition`` is static.
    """
    if definition == "primary":
        return volume_metrics(pred_hu, target_hu, mask)
    if definition == "x2ct":
        if mask is not None:
            raise ValueError("metrics_by_definition: the 'x2ct' definition takes no mask")
        return x2ct_metrics(pred_hu, target_hu)
    raise ValueError(
        f"metrics_by_definition: definition must be one of {sorted(DEFINITIONS)}, "
        f"got {definition!r}"
    )
