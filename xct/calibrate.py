"""A clinical radiograph brought into a model's geometry and units through the projector.

A radiograph is not a DRR: its values went through a detector response and processing (a
log-like curve, gamma, edge enhancement), and the patient's pose, position and the image
scale are only partly known. ``calibrate`` registers DRRs of a template CT (another patient,
or the model's own prediction) to the radiograph and estimates, jointly, by Optax's Adam:

* the template's pose: rotation (``rotvec``) and translation about the isocentre, in the
  warp convention of ``recon.template`` (the template is resampled at ``R p + t``);
* the image scale: radiograph pixels per model detector pixel (from the tags when the pixel
  size and distances are known, else estimated, starting from the ratio of the body's
  widths in the radiograph and in the template's DRR);
* a monotone map from radiograph values to line integrals: piecewise linear on ``knots``
  equal intervals of the radiograph's robust range (1st to 99.5th percentile), increments
  kept positive by a softplus.

The mismatch is a Huber loss (robust to markers and text) over the model detector pixels the
radiograph covers, collimation borders excluded (``collimation_mask``: rows and columns at
the image's edges that are flat and at an extreme value). ``Calibration.line_integrals`` is
the radiograph resampled onto the model's detector and mapped to line integrals: what a
model trained on DRRs, or ``xct.reconstruct``, takes.

One view cannot tell a shift along the beam from a change of magnification: with an
unknown pixel size the depth shift is held at 0 and the image scale absorbs it.

Several views of one patient are fitted jointly (``calibrate_views``; ``--mode=predict``
does): one pose for all (so a shift along one beam is seen across another), one image scale
when they come from one device at one distance, a value map and unsharp masking per view.
On a lateral view alone the image scale can settle in a second optimum that the PA view
rules out (tests/test_calibrate.py, PA + lateral of a phantom through a known processing
chain: TV from the calibrated views within 0.06-0.18 dB of TV from the clean DRRs, against
0.5-2.2 dB view by view).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xct import projector
from xct.geometry import Acquisition, Geometry, VolumeGrid
from xct.recon import template as _template


class Calibration(NamedTuple):
    """What ``calibrate`` returns (numbers as Python floats / NumPy arrays)."""

    line_integrals: np.ndarray  # [r, r] the radiograph on the model's detector, calibrated
    valid: np.ndarray  # [r, r] bool: covered by the radiograph, not collimated
    rotation_deg: np.ndarray  # [3] (z, y, x) rotation vector of the template's pose, degrees
    translation_mm: np.ndarray  # [3] (z, y, x) of the template's pose, mm
    image_scale: float  # radiograph pixels (as given) per model detector pixel
    pixel_mm: float | None  # the radiograph's pixel at its detector, if distances are known
    pixel_iso_mm: float  # the radiograph's pixel at the isocentre, if the patient is the
    # template's size: needs no tags, so it is the estimate when the pixel size is 0 or absent
    map_values: np.ndarray  # [knots + 1] line integral at each knot of the value map
    unsharp: tuple[float, float]  # the edge enhancement undone: amount, sigma (model pixels)
    map_range: tuple[float, float]  # radiograph values of the first and last knot
    mismatch: float  # relative DRR mismatch over the valid pixels
    loss: np.ndarray  # per Adam step


def collimation_mask(image: np.ndarray, flat_std: float = 0.01) -> np.ndarray:
    """``[H, W]`` bool, False on collimation borders: whole rows / columns from each edge
    inwards whose values barely vary (std below ``flat_std`` of the image's range) and sit
    near the image's maximum: unexposed, in the attenuation-like polarity. Flat lines at the
    minimum are direct exposure (air), which is kept: it anchors the value map at zero."""
    img = np.asarray(image, np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5])
    span = max(hi - lo, 1e-12)
    mask = np.ones(img.shape, bool)

    def flat(line):
        m = float(np.mean(line))
        return np.std(line) < flat_std * span and m >= hi - 0.05 * span

    for _ in range(4):  # rows judged on the columns left, columns on the rows left
        before = mask.sum()
        for axis in (0, 1):
            n = img.shape[axis]
            keep = mask.any(axis=axis)  # the other axis's lines still valid
            for order in (range(n), range(n - 1, -1, -1)):
                for i in order:
                    line = img[i, keep] if axis == 0 else img[keep, i]
                    if line.size == 0 or not flat(line):
                        break
                    if axis == 0:
                        mask[i] = False
                    else:
                        mask[:, i] = False
        if mask.sum() == before:
            break
    return mask


def _width(profile: np.ndarray) -> float:
    """Width (samples) of the part of a 1-D profile above 20 % of its range."""
    p = np.asarray(profile, np.float64)
    t = p.min() + 0.2 * (p.max() - p.min())
    idx = np.flatnonzero(p > t)
    return float(idx[-1] - idx[0] + 1) if idx.size else float(p.size)


class _View(NamedTuple):
    """One radiograph as ``calibrate_views`` prepares it."""

    norm: np.ndarray  # [h, w] the working copy, robust range mapped to [0, 1]
    valid: np.ndarray  # [h, w] bool: not collimated
    factor: int  # radiograph pixels per working-copy pixel
    lo: float  # radiograph values mapped to 0 and 1
    hi: float
    scale0: float  # initial image scale: working-copy pixels per model detector pixel
    tagged: bool  # pixel size and distances known


class _Params(NamedTuple):
    rotvec: jax.Array  # [3] units of 0.1 rad (shared by the views)
    shift: jax.Array  # [3] units of 20 mm (shared by the views)
    log_scale: jax.Array  # [1] shared or [V]: image scale, log, relative to the initial one
    map_raw: jax.Array  # [V, knots] softplus^-1 of the increments
    map_offset: jax.Array  # [V]
    sharpen_raw: jax.Array  # [V] softplus^-1 of the unsharp-masking amount
    log_sigma: jax.Array  # [V] log of its Gaussian's sigma, model detector pixels


def calibrate(
    image: np.ndarray,
    template_mu: jax.typing.ArrayLike,
    acq: Acquisition,
    angle_deg: float,
    *,
    pixel_mm: float | None = None,
    sdd_mm: float | None = None,
    sod_mm: float | None = None,
    knots: int = 8,
    steps: int = 300,
    learning_rate: float = 0.03,
    huber: float = 0.1,
    pose_weight: float = 1e-2,
) -> Calibration:
    """Fit pose, image scale and value map of one radiograph (see the module docstring).

    Args:
      image: ``[H, W]`` the radiograph, attenuation-like (``xct.radiograph.read_radiograph``:
        higher = more attenuation), oriented as xct's detector at ``angle_deg``.
      template_mu: ``[r, r, r]`` attenuation per mm of a template CT on ``acq.grid()``.
      acq: the model's acquisition (grid, detector, distances).
      angle_deg: the view's nominal gantry angle.
      pixel_mm, sdd_mm, sod_mm: the radiograph's pixel (at its detector) and distances; with
        all three the image scale starts from them, else from the body widths.
      steps: Adam steps: the first half fits image scale, translation and value map with
        the pose's rotation held at 0, the second half everything.
      pose_weight: weight of the squared excess of each rotation component over 0.05 rad
        (about 3 degrees) and of each translation over 50 mm: the pose stays near the
        nominal view unless the image insists (a radiograph is taken square on).
    """
    return calibrate_views(
        [image],
        template_mu,
        acq,
        [angle_deg],
        pixel_mm=[pixel_mm],
        sdd_mm=[sdd_mm],
        sod_mm=[sod_mm],
        knots=knots,
        steps=steps,
        learning_rate=learning_rate,
        huber=huber,
        pose_weight=pose_weight,
    )[0]


def calibrate_views(
    images,
    template_mu: jax.typing.ArrayLike,
    acq: Acquisition,
    angles_deg,
    *,
    pixel_mm=None,
    sdd_mm=None,
    sod_mm=None,
    share_scale: bool | None = None,
    knots: int = 8,
    steps: int = 300,
    learning_rate: float = 0.03,
    huber: float = 0.1,
    pose_weight: float = 1e-2,
) -> list[Calibration]:
    """Fit several radiographs of one patient at once (one :class:`Calibration` per view).

    The views share the patient's pose (rotation and translation, in 3D: with two views at
    different angles a shift along one beam is seen across the other, so no depth is held
    at 0) and, with ``share_scale`` (default: when the views have the same size and the
    same tags, i.e. one device at one distance), the image scale: on a lateral view alone
    the scale can settle in a second optimum that the PA view rules out. Each view keeps
    its own value map and unsharp masking (exposure and processing differ per view).

    ``images``, ``angles_deg`` and the tags (``pixel_mm``, ``sdd_mm``, ``sod_mm``: one per
    view, or one value for all, or None) as for :func:`calibrate`.
    """
    images, angles, tags = _checked_views(images, angles_deg, pixel_mm, sdd_mm, sod_mm)
    n = len(images)
    r = acq.resolution
    t_mu = jnp.asarray(template_mu, jnp.float32)
    if t_mu.shape != (r, r, r):
        raise ValueError(f"template_mu: expected shape {(r, r, r)}, got {tuple(t_mu.shape)}")
    drr0 = np.asarray(projector.forward_project(t_mu, acq.grid(), acq.orbit(np.float32(angles))))
    views = [_prepare_view(img, drr0[i], acq, *tags[i]) for i, img in enumerate(images)]
    if share_scale is None:
        share_scale = n > 1 and len({im.shape for im in images}) == 1 and len(set(tags)) == 1
    if share_scale:  # one scale: the views' own starts, averaged in log
        s0 = float(np.exp(np.mean([np.log(v.scale0 / v.factor) for v in views])))
        views = [v._replace(scale0=s0 * v.factor) for v in views]
    distinct = n > 1 and np.ptp(np.mod(np.asarray(angles), 180.0)) > 10.0
    fix_depth = not distinct and not all(v.tagged for v in views)
    step_drr = tuple(float(np.percentile(d, 99.5)) / knots for d in drr0)
    fitted = _fit(
        tuple(jnp.asarray(v.norm) for v in views),
        tuple(jnp.asarray(v.valid.astype(np.float32)) for v in views),
        t_mu,
        jnp.asarray(angles, jnp.float32),
        jnp.asarray([v.scale0 for v in views], jnp.float32),
        jnp.asarray(step_drr, jnp.float32),
        acq=acq,
        knots=int(knots),
        steps=int(steps),
        learning_rate=float(learning_rate),
        huber=float(huber),
        pose_weight=float(pose_weight),
        fix_depth=bool(fix_depth),
        share_scale=bool(share_scale),
    )
    return _calibrations(views, tags, fitted, acq, knots, share_scale)


def _checked_views(images, angles_deg, pixel_mm, sdd_mm, sod_mm):
    """The inputs of ``calibrate_views`` checked and one per view.

    Returns:
      ``(images, angles, tags)``: V float32 ``[H, W]`` arrays, V angles in degrees (floats)
      and V ``(pixel_mm, sdd_mm, sod_mm)`` tuples (mm, each None when unknown).
    """
    images = [np.asarray(im, np.float32) for im in images]
    n = len(images)
    if n == 0:
        raise ValueError("images: expected at least one radiograph")
    angles = [float(a) for a in np.atleast_1d(np.asarray(angles_deg, np.float64))]
    if len(angles) != n:
        raise ValueError(f"angles_deg: {len(angles)} angles for {n} radiographs")

    def per_view(v, name):
        vals = list(v) if isinstance(v, (list, tuple)) else [v] * n
        if len(vals) != n:
            raise ValueError(f"{name}: {len(vals)} values for {n} radiographs")
        return vals

    tags = list(
        zip(
            per_view(pixel_mm, "pixel_mm"),
            per_view(sdd_mm, "sdd_mm"),
            per_view(sod_mm, "sod_mm"),
            strict=True,
        )
    )
    for i, img in enumerate(images):
        if img.ndim != 2:
            raise ValueError(f"images[{i}]: expected a 2-D radiograph, got shape {img.shape}")
    return images, angles, tags


def _prepare_view(
    img: np.ndarray,
    drr0: np.ndarray,
    acq: Acquisition,
    pixel_mm: float | None,
    sdd_mm: float | None,
    sod_mm: float | None,
) -> _View:
    """One radiograph ``img`` (``[H, W]``) made ready for ``_fit``: a block-averaged
    working copy about 4 samples per model detector pixel across, its collimation mask,
    its robust range mapped to [0, 1], and the initial image scale: from the tags (pixel
    and distances in mm) when all are known, else the ratio of the body's widths in the
    radiograph and in ``drr0`` (``[r, r]``, the template's DRR at the nominal view)."""
    r = acq.resolution
    factor = max(1, int(min(img.shape) // (4 * r)))
    work = np.asarray(_template.block_mean(jnp.asarray(img), factor, 2))
    mask = jnp.asarray(collimation_mask(img), jnp.float32)
    valid_src = np.asarray(_template.block_mean(mask, factor, 2)) > 0.99
    lo, hi = (float(v) for v in np.percentile(work[valid_src], [1.0, 99.5]))
    norm = np.clip((work - lo) / max(hi - lo, 1e-12), 0.0, 1.0).astype(np.float32)
    tagged = bool(pixel_mm and sdd_mm and sod_mm)
    if tagged:
        m_model = acq.sdd_mm / acq.sod_mm
        det_m = sdd_mm / sod_mm
        scale0 = (acq.detector_pixel_mm / m_model) / (pixel_mm * factor / det_m)
    else:
        cols = np.where(valid_src, norm, 0.0).mean(axis=0)
        scale0 = _width(cols) / max(_width(drr0.mean(axis=0)), 1.0)
    return _View(norm, valid_src, factor, lo, hi, float(scale0), tagged)


def _calibrations(views, tags, fitted, acq: Acquisition, knots: int, share_scale: bool):
    """One ``Calibration`` per view from ``_fit``'s outputs ``fitted`` (parameters, losses,
    calibrated views, DRRs, valid masks, shift); ``tags`` as from ``_checked_views``."""
    p, losses, li, drr, valid, shift = fitted
    m_model = acq.sdd_mm / acq.sod_mm
    out = []
    rot_deg = np.rad2deg(np.asarray(p.rotvec) * _template._ROT_RAD)
    trans_mm = np.asarray(shift) * _template._SHIFT_MM
    for i, (_, _, factor, lo, hi, scale0, _) in enumerate(views):  # _View fields
        pixel, sdd, sod = tags[i]
        li_i, drr_i = np.asarray(li[i]), np.asarray(drr[i])
        v = np.asarray(valid[i]) > 0.5
        err = np.sum((li_i - drr_i)[v] ** 2) / max(np.sum(drr_i[v] ** 2), 1e-12)
        k = float(scale0 * np.exp(float(p.log_scale[0 if share_scale else i])))
        pixel_est = None
        if pixel is None and sdd and sod:  # the pixel the fitted scale implies
            pixel_est = (acq.detector_pixel_mm / m_model) * (sdd / sod) / (k * factor)
        inc = np.asarray(jax.nn.softplus(p.map_raw[i]))
        values = float(p.map_offset[i]) + np.concatenate([[0.0], np.cumsum(inc / knots)])
        out.append(
            Calibration(
                line_integrals=np.where(v, li_i, 0.0).astype(np.float32),
                valid=v,
                rotation_deg=rot_deg,
                translation_mm=trans_mm,
                image_scale=k * factor,
                pixel_mm=pixel if pixel else pixel_est,
                pixel_iso_mm=float(acq.detector_pixel_mm / m_model / (k * factor)),
                map_values=values,
                unsharp=(
                    float(jax.nn.softplus(p.sharpen_raw[i])),
                    float(np.exp(float(p.log_sigma[i]))),
                ),
                map_range=(lo, hi),
                mismatch=float(np.sqrt(err)),
                loss=np.asarray(losses),
            )
        )
    return out


class _Problem(NamedTuple):
    """The registration ``_fit`` solves: its data (traced) and its settings (static)."""

    norms: tuple  # V x [h, w] working copies, in [0, 1]
    valid_srcs: tuple  # V x [h, w] float, 1 where not collimated
    t_mu: jax.Array  # [r, r, r] the template, attenuation per mm
    scale0: jax.Array  # [V] initial image scales, working-copy pixels per model pixel
    grid: VolumeGrid
    geom: Geometry  # the V nominal views
    base: _template.WarpParams  # the identity warp, to which rotvec and shift are set
    uv: jax.Array  # [2, r, r] (row, col) of each model detector pixel from the centre
    beam: jax.Array  # [3] (z, y, x) beam direction of the first view, unit length
    f2: jax.Array  # [r + 2 pad, r + 2 pad] squared frequency, (cycles per pixel)^2
    knots: int
    huber: float
    pose_weight: float
    fix_depth: bool
    share_scale: bool


@functools.partial(
    jax.jit,
    static_argnames=(
        "acq",
        "knots",
        "steps",
        "learning_rate",
        "huber",
        "pose_weight",
        "fix_depth",
        "share_scale",
    ),
)
def _fit(
    norms,
    valid_srcs,
    t_mu,
    angles_deg,
    scale0,
    step_drr,
    *,
    acq,
    knots,
    steps,
    learning_rate,
    huber,
    pose_weight,
    fix_depth,
    share_scale,
):
    """The registration of ``calibrate_views``: one program per acquisition, number and
    shapes of radiographs and settings, compiled once and reused for every view and call
    (angles, template and radiograph values are arguments, not constants).

    Args:
      norms, valid_srcs: V ``[h, w]`` working copies and masks (``_View.norm``, ``.valid``).
      t_mu: ``[r, r, r]`` template, attenuation per mm. angles_deg: ``[V]`` degrees.
      scale0: ``[V]`` initial image scales. step_drr: ``[V]`` initial value-map increment
        per knot, in line-integral units.

    Returns:
      ``(params, losses [steps], calibrated [V, r, r], drrs [V, r, r], valid [V, r, r],
      shift [3])``: the fitted ``_Params``, the loss per Adam step, the radiographs on the
      model's detector in line integrals, the template's DRRs at the fitted pose, the
      covered pixels (float) and the fitted shift (units of 20 mm, depth removed when held).
    """
    r = acq.resolution
    n = len(norms)
    uv = jnp.asarray(
        np.stack(np.meshgrid(np.arange(r), np.arange(r), indexing="ij")) - (r - 1) / 2.0,
        jnp.float32,
    )
    # the beam direction of the first view, in (z, y, x) of the volume: a one-view fit
    # without tags holds the shift along it (it cannot tell it from magnification)
    a = jnp.deg2rad(angles_deg[0])
    f = jnp.fft.fftfreq(r + 2 * (r // 2))
    prob = _Problem(
        norms=norms,
        valid_srcs=valid_srcs,
        t_mu=t_mu,
        scale0=scale0,
        grid=acq.grid(),
        geom=acq.orbit(angles_deg),
        base=_template.Schedule().init(),
        uv=uv,
        beam=jnp.stack([jnp.cos(a), jnp.zeros_like(a), jnp.sin(a)]),
        f2=f.reshape(-1, 1) ** 2 + f.reshape(1, -1) ** 2,
        knots=knots,
        huber=huber,
        pose_weight=pose_weight,
        fix_depth=fix_depth,
        share_scale=share_scale,
    )
    init = _Params(
        rotvec=jnp.zeros(3),
        shift=jnp.zeros(3),
        log_scale=jnp.zeros((1 if share_scale else n,)),
        map_raw=jnp.ones((n, knots), jnp.float32) * jnp.log(jnp.expm1(step_drr * knots))[:, None],
        map_offset=jnp.zeros((n,)),
        sharpen_raw=jnp.full((n,), np.log(np.expm1(1e-2)), jnp.float32),
        log_sigma=jnp.zeros((n,)),
    )
    p, first = _adam_stage(prob, init, 0.0, steps // 2, learning_rate)
    p, second = _adam_stage(prob, p, 1.0, steps - steps // 2, learning_rate)
    out = [_calibrated(prob, p, i) for i in range(n)]
    li = jnp.stack([o[0] for o in out])
    valid = jnp.stack([o[1] for o in out])
    return p, jnp.concatenate([first, second]), li, _drrs_of(prob, p), valid, _shift_of(prob, p)


def _adam_stage(prob: _Problem, p: _Params, rotate: float, steps: int, learning_rate: float):
    """``steps`` Adam steps on ``_objective`` from ``p`` (a fresh optimiser state), the
    rotation's gradient multiplied by ``rotate`` (0 holds it). Returns ``(p, losses
    [steps])``."""
    opt = optax.adam(learning_rate)

    def step(carry, _):
        p, s = carry
        loss, g = jax.value_and_grad(functools.partial(_objective, prob))(p)
        g = g._replace(rotvec=g.rotvec * rotate)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), length=steps)
    return p, losses


def _objective(prob: _Problem, p: _Params) -> jax.Array:
    """Scalar: the mean over views of the Huber mismatch between each calibrated view and
    the template's DRR over the covered pixels, plus the pose penalty."""
    n = len(prob.norms)
    drrs = _drrs_of(prob, p)
    loss = 0.0
    for i in range(n):
        pred, valid = _calibrated(prob, p, i)
        resid = pred - drrs[i]
        h = jnp.sum(valid * optax.huber_loss(resid, delta=prob.huber))
        loss = loss + h / jnp.maximum(valid.sum(), 1) / n
    # free within about 3 degrees and 50 mm of the nominal view, penalised beyond
    excess_rot = jax.nn.relu(jnp.abs(p.rotvec) - 0.5)
    excess_shift = jax.nn.relu(jnp.abs(p.shift) - 2.5)
    pose = jnp.sum(excess_rot * excess_rot) + jnp.sum(excess_shift * excess_shift)
    return loss + prob.pose_weight * pose


def _shift_of(prob: _Problem, p: _Params) -> jax.Array:
    """``[3]`` the pose's shift (units of 20 mm), its depth along the beam removed when held."""
    s = p.shift
    return s - jnp.dot(s, prob.beam) * prob.beam if prob.fix_depth else s


def _drrs_of(prob: _Problem, p: _Params) -> jax.Array:
    """``[V, r, r]`` line integrals of the template warped to the pose ``p``."""
    wp = prob.base._replace(rotvec=p.rotvec, shift=_shift_of(prob, p))
    return projector.forward_project(_template.warp(prob.t_mu, wp, prob.grid), prob.grid, prob.geom)


def _calibrated(prob: _Problem, p: _Params, i: int) -> tuple[jax.Array, jax.Array]:
    """View ``i`` on the model's detector in line integrals, ``[r, r]``, and the pixels it
    covers (``[r, r]`` float, 1 inside the radiograph and not collimated)."""
    vals, valid = _sample(prob, p, i)
    return _value_map(prob, p, _unsharpen(prob, p, vals, i), i), valid


def _sample(prob: _Problem, p: _Params, i: int) -> tuple[jax.Array, jax.Array]:
    """View ``i``'s working copy resampled (bilinear) at the model's ``[r, r]`` detector
    pixels, scaled about the image centre, and the covered pixels (float)."""
    norm, valid_src = prob.norms[i], prob.valid_srcs[i]
    h, w = norm.shape
    centre_src = jnp.asarray([(h - 1) / 2.0, (w - 1) / 2.0], jnp.float32)
    k = prob.scale0[i] * jnp.exp(p.log_scale[0 if prob.share_scale else i])
    coords = centre_src.reshape(2, 1, 1) + k * prob.uv
    vals = jax.scipy.ndimage.map_coordinates(norm, list(coords), order=1, mode="nearest")
    cover = jax.scipy.ndimage.map_coordinates(valid_src, list(coords), order=0, mode="constant")
    inside = (coords[0] >= 0) & (coords[0] <= h - 1) & (coords[1] >= 0) & (coords[1] <= w - 1)
    return vals, cover * inside


def _unsharpen(prob: _Problem, p: _Params, vals: jax.Array, i: int) -> jax.Array:
    """Undo unsharp masking ``v + a (v - G_sigma v)`` of ``[r, r]`` values: divide by its
    transfer function ``1 + a (1 - exp(-2 pi^2 sigma^2 |f|^2))`` (reflected borders against
    wrap-around; sigma in model detector pixels)."""
    r = vals.shape[0]
    pad = r // 2
    a = jax.nn.softplus(p.sharpen_raw[i])
    sigma = jnp.exp(p.log_sigma[i])
    h = 1.0 + a * (1.0 - jnp.exp(-2.0 * jnp.pi**2 * sigma**2 * prob.f2))
    v = jnp.pad(vals, pad, mode="reflect")
    u = jnp.real(jnp.fft.ifft2(jnp.fft.fft2(v) / h))
    return u[pad : pad + r, pad : pad + r]


def _value_map(prob: _Problem, p: _Params, t: jax.Array, i: int) -> jax.Array:
    """View ``i``'s monotone piecewise-linear map from values ``t`` in [0, 1] (``[r, r]``)
    to line integrals (``[r, r]``), on ``knots`` equal intervals."""
    knots = prob.knots
    inc = jax.nn.softplus(p.map_raw[i])
    edges = (jnp.arange(knots, dtype=jnp.float32) / knots).reshape(1, 1, knots)
    ramps = jnp.clip(t[..., None] - edges, 0.0, 1.0 / knots)
    return p.map_offset[i] + jnp.sum(inc.reshape(1, 1, knots) * ramps, -1)
