"""Lifting 2D view features into the 3D volume, one view at a time.

Two ways, both pure functions of one view (batch them with ``jax.vmap``) and both
independent of how many views there are:

* ``expand_view`` (X2CT-style): the feature map is broadcast along the view's ray
  direction. For gantry angle 0 the source sits at +z, so the map is copied along z; for
  90 degrees along x; for any angle the rotated voxel grid samples the map bilinearly
  (the same as "expand along z, then rotate the volume about y" with one resampling
  instead of two). Rays are taken parallel and the map is scaled by the magnification at
  the isocentre (``sdd / sod``), so the scale matches the data's cone-beam detector.
* ``backproject_view`` (geometry-aware): each feature channel is back-projected with the
  exact adjoint of the DRR projector (``xct.projector.back_project``) for the true
  cone-beam view, then divided by the back-projection of ones, so a voxel holds the
  ray-weighted mean of the detector features that see it, whatever the resolution.

Exception to the import rule of STYLE.md (``models`` imports only jax/flax): this module
needs ``xct.geometry`` and ``xct.projector`` to build the cone-beam view and to
back-project with the same operator that renders the DRRs. Nothing else in
``xct.models`` imports them.

Conventions (``xct.geometry``): volumes are ``[z, y, x]`` on a centred cube of side
``fov_mm``; a view at gantry angle ``theta`` has its detector columns along
``(cos theta, 0, -sin theta)`` and rows along ``+y``; features are channels-last.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xct import geometry, projector

LIFTINGS = ("expand", "backproject")


def _linear_taps(pos: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Indices and weights of linear interpolation at continuous ``pos`` into ``n`` samples,
    zero outside (the value fades to 0 over the half-sample beyond each edge)."""
    f = jnp.floor(pos)
    w1 = pos - f
    i0 = f.astype(jnp.int32)
    i1 = i0 + 1
    w0 = jnp.where((i0 >= 0) & (i0 < n), 1.0 - w1, 0.0)
    w1 = jnp.where((i1 >= 0) & (i1 < n), w1, 0.0)
    return jnp.clip(i0, 0, n - 1), jnp.clip(i1, 0, n - 1), w0, w1


def expand_view(
    features: jax.Array,
    angle_deg: jax.Array,
    *,
    acquisition: geometry.Acquisition,
    size: int,
    fov_mm: float,
    center_mm: jax.Array | None = None,
    size_z: int | None = None,
) -> jax.Array:
    """Broadcast one view's features along its (parallel) rays.

    Args:
      features: ``[h, w, C]`` feature map of the view (rows along +y, columns along u).
      angle_deg: scalar gantry angle in degrees (may be traced).
      acquisition: the orbit and detector (``sod_mm``, ``sdd_mm``, detector width); the
        feature map covers the whole detector at its own pitch.
      size: voxels per side ``d`` of the output cube (side ``fov_mm``, centred).
      fov_mm: side of this cube in mm (the acquisition's cube, or a patch of it).
      center_mm: ``[3]`` world ``(x, y, z)`` of the cube's centre (a patch of a larger
        volume); default the isocentre.
      size_z: voxels along z if the block is a slab of the cube (``d_z x d x d`` with the
        cube's voxel size, centred at ``center_mm``); default ``size``.

    Returns:
      ``[d_z, d, d, C]`` (``[z, y, x, C]``), the dtype of ``features``.
    """
    h, w, _ = features.shape
    theta = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
    t = (jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0) * (fov_mm / size)  # mm
    nz = size if size_z is None else int(size_z)
    t_z = (jnp.arange(nz, dtype=jnp.float32) - (nz - 1) / 2.0) * (fov_mm / size)
    c = jnp.zeros(3, jnp.float32) if center_mm is None else jnp.asarray(center_mm, jnp.float32)
    tx, ty, tz = t + c[0], t + c[1], t_z + c[2]
    mag = acquisition.sdd_mm / acquisition.sod_mm
    det_width_mm = acquisition.detector_width_mm
    # World (x, z) -> detector column coordinate u = x cos(theta) - z sin(theta) (mm at the
    # isocentre), then to pixel indices at this level's pitch.
    u_mm = jnp.cos(theta) * tx[None, :] - jnp.sin(theta) * tz[:, None]  # [z, x]
    col = u_mm * (mag * w / det_width_mm) + (w - 1) / 2.0
    row = ty * (mag * h / det_width_mm) + (h - 1) / 2.0  # [y]
    r0, r1, wr0, wr1 = _linear_taps(row, h)
    dt = features.dtype
    rows = (
        features[r0] * wr0.astype(dt)[:, None, None] + features[r1] * wr1.astype(dt)[:, None, None]
    )
    c0, c1, wc0, wc1 = _linear_taps(col, w)  # [z, x]
    vol = (
        rows[:, c0] * wc0.astype(dt)[None, :, :, None]
        + rows[:, c1] * wc1.astype(dt)[None, :, :, None]
    )  # [y, z, x, C]
    return jnp.transpose(vol, (1, 0, 2, 3))


def backproject_view(
    features: jax.Array,
    angle_deg: jax.Array,
    *,
    acquisition: geometry.Acquisition,
    size: int,
    fov_mm: float,
    center_mm: jax.Array | None = None,
    eps_fraction: float = 0.05,
    size_z: int | None = None,
) -> jax.Array:
    """Normalised back-projection of one cone-beam view's feature channels.

    The view's geometry at this scale: ``acquisition.orbit`` with the detector sampled at
    ``[h, w]`` pixels (the same detector as the data, coarser), volume the centred ``d^3``
    cube of side ``fov_mm``. Each channel is back-projected (Joseph, exact adjoint of the
    projector) and divided by ``max(back_project(ones), eps)`` with
    ``eps = eps_fraction * voxel_mm``, so voxels no ray reaches are 0 and the scale does
    not depend on ``d`` or the view count.
    Computed in float32 (scatter-adds in bfloat16 lose too much), returned in the input
    dtype. Differentiable in ``features`` (the VJP is the forward projection).

    Args:
      features: ``[h, w, C]`` feature map of the view.
      angle_deg: scalar gantry angle in degrees (may be traced).
      acquisition, size, fov_mm, center_mm: as in ``expand_view``
        (``fov_mm`` is the side of this cube: a patch of ``size`` voxels of the full
        volume's voxel size has ``fov_mm = size * voxel_mm``).
      eps_fraction: floor of the normaliser, in voxel sizes.
      size_z: as in ``expand_view`` (a slab of the cube).

    Returns:
      ``[d_z, d, d, C]`` (``[z, y, x, C]``).
    """
    h, w, _ = features.shape
    voxel_mm = fov_mm / size
    grid = geometry.VolumeGrid.centered((size if size_z is None else size_z, size, size), voxel_mm)
    # A cube centred at c in the world is the centred cube seen with the isocentre at -c.
    c = jnp.zeros(3, jnp.float32) if center_mm is None else jnp.asarray(center_mm, jnp.float32)
    geom = acquisition.orbit(
        jnp.asarray(angle_deg, jnp.float32).reshape(1), det_shape=(h, w), isocenter_xyz_mm=-c
    )

    # Bound the scatter's per-sample arrays of all channels together (XLA version): one
    # chunk of the default size per channel replicated the lifting on spatial meshes.
    chunk = projector.default_chunk_rays(grid, batch=features.shape[-1] + 1)

    def bp(image: jax.Array) -> jax.Array:  # [h, w] -> [d, d, d]
        return projector.back_project(image[None], grid, geom, chunk_rays=chunk)

    # The normaliser rides along as one more channel: one batched back-projection instead
    # of two (the second compiles as long as the first).
    ones = jnp.ones((h, w, 1), jnp.float32)
    vol = jax.vmap(bp, in_axes=-1, out_axes=-1)(
        jnp.concatenate([features.astype(jnp.float32), ones], axis=-1)
    )
    norm = jax.lax.stop_gradient(vol[..., -1:])
    vol = vol[..., :-1] / jnp.maximum(norm, eps_fraction * voxel_mm)
    return vol.astype(features.dtype)


def lift(
    features: jax.Array,
    angles_deg: jax.Array,
    *,
    method: str,
    acquisition: geometry.Acquisition,
    size: int,
    fov_mm: float | None = None,
    center_mm: jax.Array | None = None,
) -> jax.Array:
    """Lift a batch of per-view feature maps: ``[B, V, h, w, C]``, angles ``[B, V]`` degrees
    -> ``[B, V, d, d, d, C]`` with ``d = size``. ``method`` is one of ``LIFTINGS``.

    The cube has side ``fov_mm`` (default the acquisition's) and is centred at
    ``center_mm [B, 3]`` (world ``(x, y, z)``, default the isocentre: patches). Under a
    mesh whose logical axis rules map ``z`` to a mesh axis of size ``S > 1``
    (``xct.sharding.activation_context``), each device lifts only its own z-slab.
    """
    if method not in LIFTINGS:
        raise ValueError(f"lifting: expected one of {LIFTINGS}, got {method!r}")
    fn = expand_view if method == "expand" else backproject_view
    fov_mm = acquisition.fov_mm if fov_mm is None else float(fov_mm)
    kw = dict(acquisition=acquisition, size=size, fov_mm=fov_mm)
    if center_mm is None:
        center_mm = jnp.zeros((features.shape[0], 3), jnp.float32)
    slabs = slab_axes(features.shape[0], size)
    if slabs is None:
        one = lambda f, a, c: fn(f, a, center_mm=c, **kw)  # noqa: E731
        return jax.vmap(jax.vmap(one, in_axes=(0, 0, None)))(features, angles_deg, center_mm)
    return _lift_slabs(fn, slabs, features, angles_deg, center_mm, **kw)


def slab_axes(batch: int, size: int) -> tuple[str | None, str, int] | None:
    """``(batch mesh axis, z mesh axis, slabs)`` when lifting should run as z-slabs: inside
    ``xct.sharding.activation_context`` whose rules map the logical ``z`` axis to a mesh
    axis of size > 1 that divides ``size`` (and ``batch`` splits over the batch axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return None
    batch_axis, z_axis = nn.logical_to_mesh_axes(("batch", "z"))
    if not isinstance(z_axis, str) or mesh.shape.get(z_axis, 1) == 1:
        return None
    if batch_axis is not None and not isinstance(batch_axis, str):
        return None
    if size % mesh.shape[z_axis] or (batch_axis and batch % mesh.shape[batch_axis]):
        return None  # uneven split: let XLA partition the whole lifting
    return batch_axis, z_axis, mesh.shape[z_axis]


def _lift_slabs(fn, slabs, features, angles_deg, center_mm, *, size, **kw):
    """Each device of the z mesh axis lifts only its own z-slab of the cube (``shard_map``).

    Left to XLA's partitioner, the lifting's scatter (back-projection) or gathers (expand)
    run whole on every device of the ``spatial`` axis and are sliced afterwards, so they
    held per-device memory at the ``spatial=2`` level however many devices there were.
    Here device ``i`` lifts the slab ``z in [i d / S, (i + 1) d / S)`` (the cube's voxel
    size, the slab's centre shifted along world z), which is exact: every voxel's value
    depends only on its own position.
    """
    from jax.sharding import PartitionSpec as P

    batch_axis, z_axis, n_slabs = slabs
    slab = size // n_slabs
    voxel_mm = kw["fov_mm"] / size

    def local(f, a, c):
        i = jax.lax.axis_index(z_axis).astype(jnp.float32)
        dz = (i + 0.5) * slab * voxel_mm - 0.5 * size * voxel_mm  # slab centre - cube centre
        c = c + jnp.stack([0.0, 0.0, dz]).astype(c.dtype)[None, :]
        one = lambda f1, a1, c1: fn(f1, a1, size=size, center_mm=c1, size_z=slab, **kw)  # noqa: E731
        return jax.vmap(jax.vmap(one, in_axes=(0, 0, None)))(f, a, c)

    return jax.shard_map(
        local,
        in_specs=(P(batch_axis), P(batch_axis), P(batch_axis)),
        out_specs=P(batch_axis, None, z_axis),
        check_vma=False,
    )(features, angles_deg, center_mm)


def check_inputs(drr: jax.Array, angles_deg: jax.Array, resolution: int) -> None:
    """Shape checks shared by the generators (static, so they run at trace time)."""
    if drr.ndim != 4:
        raise ValueError(f"drr: expected [B, V, H, W] projections, got shape {tuple(drr.shape)}")
    b, v, hh, ww = drr.shape
    if (hh, ww) != (resolution, resolution):
        raise ValueError(
            f"drr: expected {resolution}x{resolution} projections (model resolution), got {hh}x{ww}"
        )
    if tuple(np.shape(angles_deg)) != (b, v):
        raise ValueError(
            f"angles_deg: expected shape [B, V] = {(b, v)} matching drr, "
            f"got {tuple(np.shape(angles_deg))}"
        )
