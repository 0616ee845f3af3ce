"""Patches of a volume: random crops for patch-based training, sliding-window inference.

A generator built with ``patch_size = P`` reconstructs the ``P^3`` patch of the ``D^3``
volume whose first voxel is ``patch_offset`` (``(z, y, x)``), from the whole views (see
``UNetGenerator``). Training compares it with the same crop of the target
(``random_offsets`` + ``crop``); inference tiles the volume with overlapping patches and
blends them (``sliding_window``), so 256^3 and 512^3 outputs fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def random_offsets(key: jax.Array, batch: int, size: int, patch: int) -> jax.Array:
    """``[batch, 3]`` int32 offsets, uniform over the ``(size - patch + 1)^3`` positions."""
    return jax.random.randint(key, (batch, 3), 0, size - patch + 1, dtype=jnp.int32)


def crop(volume: jax.Array, offsets: jax.Array, patch: int) -> jax.Array:
    """Patches ``[B, P, P, P, ...]`` of ``volume [B, D, D, D, ...]`` at ``offsets [B, 3]``."""

    def one(v, o):
        start = (*o, *([0] * (v.ndim - 3)))
        return jax.lax.dynamic_slice(v, start, (patch, patch, patch, *v.shape[3:]))

    return jax.vmap(one)(volume, jnp.asarray(offsets, jnp.int32))


def window_starts(size: int, patch: int, overlap: int) -> list[int]:
    """Patch starts along one axis: stride ``patch - overlap``, the last flush with the end."""
    if not 0 < patch <= size:
        raise ValueError(f"patch: expected 0 < patch <= {size}, got {patch}")
    if not 0 <= overlap < patch:
        raise ValueError(f"overlap: expected 0 <= overlap < patch = {patch}, got {overlap}")
    starts = list(range(0, size - patch + 1, patch - overlap))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def blend_weights(patch: int, overlap: int) -> np.ndarray:
    """``[P, P, P]`` weights: 1 in the middle, a linear ramp over the ``overlap`` voxels at
    each face (never 0), so overlapping patches fade into each other."""
    ramp = np.ones(patch, np.float32)
    if overlap:
        edge = (np.arange(overlap, dtype=np.float32) + 1.0) / (overlap + 1.0)
        ramp[:overlap] = edge
        ramp[-overlap:] = np.minimum(ramp[-overlap:], edge[::-1])
    return ramp[:, None, None] * ramp[None, :, None] * ramp[None, None, :]


def sliding_window(
    predict_patch: Callable[[jax.Array], jax.Array],
    batch: int,
    size: int,
    patch: int,
    overlap: int,
) -> jax.Array:
    """Whole ``[B, D, D, D]`` volumes from overlapping patches.

    ``predict_patch(offsets [B, 3]) -> [B, P, P, P]`` is called once per window position
    (inside ``lax.scan``, so compiled once); the patches are weighted by ``blend_weights``
    and normalised by the summed weights (a partition of unity: patches that agree on their
    overlaps give back exactly the volume they are crops of).
    """
    starts = window_starts(size, patch, overlap)
    grid = np.stack(np.meshgrid(starts, starts, starts, indexing="ij"), -1).reshape(-1, 3)
    w = jnp.asarray(blend_weights(patch, overlap))

    def body(carry, offset):
        acc, norm = carry
        pred = predict_patch(jnp.broadcast_to(offset, (batch, 3))).astype(jnp.float32)
        start = (0, *[offset[i] for i in range(3)])
        cur = jax.lax.dynamic_slice(acc, start, (batch, patch, patch, patch))
        acc = jax.lax.dynamic_update_slice(acc, cur + pred * w[None], start)
        cur_n = jax.lax.dynamic_slice(norm, start[1:], (patch, patch, patch))
        norm = jax.lax.dynamic_update_slice(norm, cur_n + w, start[1:])
        return (acc, norm), None

    init = (jnp.zeros((batch, size, size, size), jnp.float32), jnp.zeros((size,) * 3))
    (acc, norm), _ = jax.lax.scan(body, init, jnp.asarray(grid, jnp.int32))
    return acc / norm[None]
