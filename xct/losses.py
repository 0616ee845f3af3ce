"""Per-example training losses for few-view CT reconstruction.

Like optax, every loss returns one value per example, shape ``[B]``, and lets the caller
reduce (``total_generator_loss`` does the weighted batch mean). Conventions:

* CT tensors are network-side ``[B, D, D, D]`` (``physics.normalize_ct``: HU clipped to
  ``[-1024, 3071]`` mapped to ``[0, 1]``), ``[z, y, x]`` per example.
* DRRs are ``[B, views, rows, cols]`` in ``physics.normalize_drr`` units (line integral
  / 10); view angles ``[B, views]`` in degrees on the circular orbit about +y.
* GAN losses take discriminator logits ``[B, ...]`` (PatchGAN maps) and average over the
  patches of each example. For a multi-scale discriminator, call them once per scale and
  add the ``[B]`` results.

``perceptual`` compares features of a frozen network; the only one xct offers is its own
organ segmenter (``xct.models.segmenter``, trained on its phantoms by
``scripts/train_segmenter.py``): no downloaded weights. BENCHMARKS.md reports whether it
helps on the real chests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from xct import geometry, metrics, physics, projector


def _float(x: jax.typing.ArrayLike) -> jax.Array:
    arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.float32)
    return arr


def _pair(name: str, pred, target) -> tuple[jax.Array, jax.Array]:
    p, t = _float(pred), _float(target)
    if p.shape != t.shape:
        raise ValueError(f"{name}: pred shape {p.shape} does not match target shape {t.shape}")
    if p.ndim < 2:
        raise ValueError(f"{name}: expected a batch [B, ...], got shape {p.shape}")
    return p, t


def _batch_mean(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: ``[B, ...] -> [B]``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _volumes(name: str, pred, target) -> tuple[jax.Array, jax.Array]:
    p, t = _pair(name, pred, target)
    if p.ndim != 4:
        raise ValueError(f"{name}: expected [B, Z, Y, X] volumes, got shape {p.shape}")
    return p, t


# ------------------------------------------------------------------------------------------
# Voxel losses


def l1(pred: jax.typing.ArrayLike, target: jax.typing.ArrayLike) -> jax.Array:
    """``mean(|pred - target|)`` over each example, ``[B]`` (units of the inputs)."""
    p, t = _pair("l1", pred, target)
    return _batch_mean(jnp.abs(p - t))


def mse(pred: jax.typing.ArrayLike, target: jax.typing.ArrayLike) -> jax.Array:
    """``mean((pred - target)^2)`` over each example, ``[B]`` (units of the inputs squared)."""
    p, t = _pair("mse", pred, target)
    return _batch_mean(jnp.square(p - t))


def ssim_loss(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    data_range: float = 1.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
) -> jax.Array:
    """``1 - metrics.ssim3d(pred, target, data_range, sigma, truncate)``, ``[B]``.

    Volumes ``[B, Z, Y, X]``, each side at least ``2 int(truncate sigma + 0.5) + 1`` voxels
    (11 by default); ``data_range`` 1 for ``physics.normalize_ct`` volumes. In ``[0, 2]``,
    0 for identical volumes.
    """
    return 1.0 - metrics.ssim3d(pred, target, data_range, sigma, truncate)


def gradient_loss(pred: jax.typing.ArrayLike, target: jax.typing.ArrayLike) -> jax.Array:
    """L1 of finite-difference gradients, ``[B]``.

    With forward differences ``d_a x[i] = x[i + 1] - x[i]`` along each spatial axis ``a`` of
    ``[B, Z, Y, X]`` (no padding, so ``d_z`` has ``Z - 1`` planes, etc.)::

        loss_b = (1/3) sum_{a in z, y, x} mean(|d_a pred_b - d_a target_b|)

    Units of the inputs per voxel; 0 when the volumes differ by a constant.
    """
    p, t = _volumes("gradient_loss", pred, target)
    e = p - t
    terms = [_batch_mean(jnp.abs(jnp.diff(e, axis=axis))) for axis in (1, 2, 3)]
    return (terms[0] + terms[1] + terms[2]) / 3.0


def frequency_loss(pred: jax.typing.ArrayLike, target: jax.typing.ArrayLike) -> jax.Array:
    """L1 of Fourier magnitude differences, ``[B]``.

    ``loss_b = mean_k | |F pred_b|(k) - |F target_b|(k) |`` over all ``Z Y X`` frequencies
    ``k``, with ``F`` the 3D DFT over ``[Z, Y, X]`` normalised by ``1 / sqrt(Z Y X)``
    (``norm="ortho"``, so Parseval holds). Phase is ignored: a circular shift costs nothing.
    Optional; its gradient is finite everywhere (zero where a magnitude is zero).
    """
    p, t = _volumes("frequency_loss", pred, target)
    fp = jnp.abs(jnp.fft.fftn(p, axes=(1, 2, 3), norm="ortho"))
    ft = jnp.abs(jnp.fft.fftn(t, axes=(1, 2, 3), norm="ortho"))
    return _batch_mean(jnp.abs(fp - ft))


# ------------------------------------------------------------------------------------------
# Projection consistency


def _render(ct: jax.Array, angles_deg: jax.Array, acquisition, det_shape):
    """Normalised DRRs ``[V, rows, cols]`` of one normalised CT ``[D, D, D]``."""
    mu = physics.hu_to_mu(physics.denormalize_ct(ct))
    geom = acquisition.orbit(angles_deg, det_shape=det_shape)
    return physics.normalize_drr(projector.forward_project(mu, acquisition.grid(), geom))


def projection_consistency(
    pred_ct: jax.typing.ArrayLike,
    drr: jax.typing.ArrayLike,
    angles_deg: jax.typing.ArrayLike,
    *,
    acquisition: geometry.Acquisition,
    target_ct: jax.typing.ArrayLike | None = None,
    extra_views: int = 0,
    key: jax.Array | None = None,
) -> jax.Array:
    """L1 between DRRs rendered from the predicted CT and the DRRs it should explain, ``[B]``.

    Each predicted CT is mapped back to HU (``physics.denormalize_ct``), to attenuation
    (``physics.hu_to_mu``: ``mu_water (1 + HU/1000)`` clipped at 0, so voxels below
    -1000 HU give no gradient) on the grid ``acquisition.grid()``, and projected with
    ``projector.forward_project`` (Joseph) on the cone-beam orbit
    ``acquisition.orbit(angles, det_shape=(rows, cols))`` -- the chain of
    ``physics.render_drrs(mode="mono")`` and ``input_pipeline``. Then::

        loss_b = mean over views v, rows, cols of |normalize_drr(P_v mu(pred_b)) - drr_b,v|

    where the views are the ``V`` input views (compared with ``drr``) followed, when
    ``extra_views = E > 0``, by ``E`` random views at angles uniform in ``[0, 360)``
    degrees (``jax.random.uniform(key, (B, E), minval=0, maxval=360)``), compared with the
    same rendering of ``target_ct`` (under ``stop_gradient``). Every view weighs the same,
    so ``E = 0`` gives the plain input-view consistency. Zero when ``drr`` are noise-free
    monochromatic renderings of ``pred_ct`` (and ``pred_ct`` equals ``target_ct``).

    Args:
      pred_ct: ``[B, D, D, D]`` predicted CT, ``physics.normalize_ct`` units.
      drr: ``[B, V, rows, cols]`` input DRRs, ``physics.normalize_drr`` units.
      angles_deg: ``[B, V]`` gantry angles of the input views, degrees.
      acquisition: the orbit, detector and cube (``D = acquisition.resolution``).
      target_ct: ``[B, D, D, D]`` true CT (normalised); needed only for extra views.
      extra_views: number of random extra views per example (static int).
      key: PRNG key for the extra angles; needed only for extra views.

    Returns:
      ``[B]`` mean absolute difference in normalised DRR units.
    """
    ct = _float(pred_ct)
    d = _float(drr)
    ang = _float(angles_deg)
    if ct.ndim != 4 or not (ct.shape[1] == ct.shape[2] == ct.shape[3]):
        raise ValueError(f"pred_ct: expected [B, D, D, D] normalised CT, got shape {ct.shape}")
    b, res = ct.shape[0], ct.shape[1]
    if res != acquisition.resolution:
        raise ValueError(
            f"pred_ct: {res}^3 voxels but the acquisition's cube has {acquisition.resolution}^3"
        )
    if d.ndim != 4 or d.shape[0] != b:
        raise ValueError(f"drr: expected [B={b}, views, rows, cols] DRRs, got shape {d.shape}")
    if ang.shape != d.shape[:2]:
        raise ValueError(f"angles_deg: expected shape {d.shape[:2]} (B, views), got {ang.shape}")
    extra_views = int(extra_views)
    if extra_views < 0:
        raise ValueError(f"extra_views: expected >= 0, got {extra_views}")
    render = lambda c, a: _render(c, a, acquisition, d.shape[2:])  # noqa: E731

    if extra_views == 0:
        pred_drr = jax.vmap(render)(ct, ang)
        return _batch_mean(jnp.abs(pred_drr - d))

    if target_ct is None:
        raise ValueError("target_ct: the true CT is needed to compare extra_views > 0 views")
    if key is None:
        raise ValueError("key: a PRNG key is needed to draw extra_views > 0 random angles")
    tgt = _float(target_ct)
    if tgt.shape != ct.shape:
        raise ValueError(f"target_ct: shape {tgt.shape} does not match pred_ct {ct.shape}")
    extra = jax.random.uniform(key, (b, extra_views), ang.dtype, 0.0, 360.0)
    pred_drr = jax.vmap(render)(ct, jnp.concatenate([ang, extra], axis=1))
    ref_drr = jnp.concatenate([d, jax.lax.stop_gradient(jax.vmap(render)(tgt, extra))], axis=1)
    return _batch_mean(jnp.abs(pred_drr - ref_drr))


# ------------------------------------------------------------------------------------------
# Adversarial losses (logits [B, ...], mean over patches)


def lsgan_generator(fake_logits: jax.typing.ArrayLike) -> jax.Array:
    """Least-squares GAN generator loss ``mean((D(fake) - 1)^2)`` per example, ``[B]``."""
    f = _float(fake_logits)
    return _batch_mean(jnp.square(f - 1.0))


def lsgan_discriminator(
    real_logits: jax.typing.ArrayLike, fake_logits: jax.typing.ArrayLike
) -> jax.Array:
    """LSGAN discriminator loss ``0.5 (mean((D(real) - 1)^2) + mean(D(fake)^2))``, ``[B]``.

    As in pix2pix / X2CT-GAN (targets 1 for real, 0 for fake, halved). ``real_logits`` and
    ``fake_logits`` are ``[B, ...]``, possibly of different patch shapes.
    """
    r, f = _float(real_logits), _float(fake_logits)
    return 0.5 * (_batch_mean(jnp.square(r - 1.0)) + _batch_mean(jnp.square(f)))


def hinge_generator(fake_logits: jax.typing.ArrayLike) -> jax.Array:
    """Hinge GAN generator loss ``-mean(D(fake))`` per example, ``[B]``."""
    return -_batch_mean(_float(fake_logits))


def hinge_discriminator(
    real_logits: jax.typing.ArrayLike, fake_logits: jax.typing.ArrayLike
) -> jax.Array:
    """Hinge discriminator loss ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``, ``[B]``."""
    r, f = _float(real_logits), _float(fake_logits)
    return _batch_mean(jax.nn.relu(1.0 - r)) + _batch_mean(jax.nn.relu(1.0 + f))


def feature_matching(
    real_feats: Sequence[jax.typing.ArrayLike], fake_feats: Sequence[jax.typing.ArrayLike]
) -> jax.Array:
    """Discriminator feature matching (pix2pixHD), ``[B]``.

    ``loss_b = (1/L) sum_l mean(|real_l,b - fake_l,b|)`` over the ``L`` intermediate feature
    maps ``[B, ...]`` (layer by layer, same shapes); the real features are targets, under
    ``stop_gradient``.
    """
    real_feats, fake_feats = list(real_feats), list(fake_feats)
    if len(real_feats) != len(fake_feats) or not real_feats:
        raise ValueError(
            f"feature_matching: expected equally many (>0) real and fake feature maps, got "
            f"{len(real_feats)} and {len(fake_feats)}"
        )
    total = None
    for i, (r, f) in enumerate(zip(real_feats, fake_feats, strict=True)):
        fr, ff = _pair(f"feature_matching[{i}]", r, f)
        term = _batch_mean(jnp.abs(ff - jax.lax.stop_gradient(fr)))
        total = term if total is None else total + term
    return total / len(real_feats)


# ------------------------------------------------------------------------------------------
# Combination


def total_generator_loss(
    terms: Mapping[str, jax.Array], weights: Mapping[str, float]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of batch-mean losses: ``(sum_n w_n mean_b terms[n][b], {n: mean})``.

    Args:
      terms: name -> per-example loss ``[B]``.
      weights: name -> Python float. Names with weight 0 are skipped (their term may be
        absent from ``terms``, and is neither added nor reported).

    Returns:
      The scalar total and a dict of the (unweighted) batch means of the terms used.

    Raises:
      ValueError: a non-zero weight names no term, or a term has no weight (a typo on
        either side would otherwise silently drop a loss), or a term is not ``[B]``.
    """
    active = {n: float(w) for n, w in weights.items() if float(w) != 0.0}
    unknown = sorted(set(active) - set(terms))
    unweighted = sorted(set(terms) - set(weights))
    if unknown or unweighted:
        raise ValueError(
            f"total_generator_loss: weights name unknown terms {unknown}, terms without a "
            f"weight {unweighted}; terms are {sorted(terms)}, weights {sorted(weights)}"
        )
    means = {}
    total = jnp.zeros((), jnp.float32)
    for name, w in active.items():
        v = jnp.asarray(terms[name])
        if v.ndim != 1:
            raise ValueError(f"terms[{name!r}]: expected a per-example [B] loss, got {v.shape}")
        means[name] = jnp.mean(v)
        total = total + w * means[name]
    return total, means


def perceptual(pred, target, features) -> jax.Array:
    """Feature L1 ``[B]``: ``features(ct) -> sequence of [B, ...]`` activations of a frozen
    network (``xct.models.segmenter``), the mean absolute difference per layer, averaged
    over layers; the target's side carries no gradient."""
    p, t = _pair("perceptual", pred, target)
    fp = features(p)
    ft = [jax.lax.stop_gradient(f) for f in features(t)]
    per_layer = [
        jnp.mean(jnp.abs(a - b).reshape(a.shape[0], -1), axis=-1)
        for a, b in zip(fp, ft, strict=True)
    ]
    return sum(per_layer) / len(per_layer)
