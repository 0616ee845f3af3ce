"""Building blocks shared by the generators: residual blocks, attention, resampling.

All blocks are channels-last (``[N, *spatial, C]``) and work in 2D or 3D alike (the kernel
rank follows the input). Parameters are float32; ``dtype`` is the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xct.models.conv import Conv

Dtype = Any

# ------------------------------------------------------------------------------------------
# Activation sharding: models name the axes of their 3D activations (``VOLUME_AXES``: batch
# and z) and call ``constrain``. Outside Flax logical axis rules that is a no-op; inside
# ``xct.sharding.activation_context(mesh, rules)`` (which the Experiment enters for every
# jitted function) it becomes ``with_sharding_constraint`` on the mesh through the rules
# (by default batch -> data, z -> spatial), so XLA splits volumes along z and inserts the
# halo exchanges of the convolutions and the reductions of GroupNorm itself.

VOLUME_AXES = ("batch", "z", None, None, None)  # [B, z, y, x, C]


def constrain(x: jax.Array, axes: tuple = VOLUME_AXES) -> jax.Array:
    """Constrain ``x``'s sharding to the logical ``axes`` (one name or None per axis;
    ``VOLUME_AXES`` truncated to ``x.ndim`` by default) under the current axis rules."""
    if not nn.get_logical_axis_rules():
        return x
    axes = tuple(axes)[: x.ndim] + (None,) * max(0, x.ndim - len(axes))
    return nn.with_logical_constraint(x, axes)


def num_groups(channels: int, max_groups: int = 8) -> int:
    """The largest group count ``<= max_groups`` that divides ``channels`` (GroupNorm)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(dtype: Dtype, channels: int, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm with statistics in float32 whatever the compute dtype."""
    return nn.GroupNorm(num_groups=num_groups(channels), dtype=dtype, name=name)


class ResBlock(nn.Module):
    """Pre-activation residual block: ``(GN, SiLU, Conv3) x 2`` plus a (1x1) shortcut.

    ``[N, *spatial, C_in] -> [N, *spatial, features]`` for 2 or 3 spatial dimensions. The
    second convolution starts at zero, so a fresh block is the identity (or the shortcut).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ndim = x.ndim - 2
        k = (3,) * ndim
        h = nn.silu(group_norm(self.dtype, x.shape[-1])(x))
        h = Conv(self.features, k, dtype=self.dtype)(h)
        h = nn.silu(group_norm(self.dtype, self.features)(h))
        h = Conv(self.features, k, dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.features:
            x = Conv(self.features, (1,) * ndim, dtype=self.dtype, name="shortcut")(x)
        out = x.astype(h.dtype) + h
        return constrain(out) if ndim == 3 else out


class BottleneckAttention(nn.Module):
    """Multi-head self-attention over all voxels of a (coarse) 3D feature map.

    ``[B, d, h, w, C] -> [B, d, h, w, C]``: pre-GroupNorm, ``num_heads`` heads over the
    ``d*h*w`` flattened voxels, residual. Memory grows as ``(d*h*w)^2``, so use it at the
    coarsest level only (8^3 = 512 tokens at 64^3 with 4 levels). Positions come from the
    zero-padded convolutions before it (no explicit position embedding).
    """

    num_heads: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, *spatial, c = x.shape
        h = group_norm(self.dtype, c)(x).reshape(b, -1, c)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            out_kernel_init=nn.initializers.zeros,
        )(h, h)
        return x + h.reshape(b, *spatial, c).astype(x.dtype)


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al., Attention U-Net).

    ``skip [B, d, h, w, Cs]`` is scaled per voxel by ``sigmoid(psi(SiLU(Wx skip + Wg g)))``
    with ``gate [B, d, h, w, Cg]`` the decoder features already upsampled to the skip's
    resolution. Returns ``[B, d, h, w, Cs]``. The gate starts at 0.5 everywhere.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, skip: jax.Array, gate: jax.Array) -> jax.Array:
        inter = max(skip.shape[-1] // 2, 1)
        q = Conv(inter, (1, 1, 1), dtype=self.dtype, name="theta_x")(skip)
        q = q + Conv(inter, (1, 1, 1), use_bias=False, dtype=self.dtype, name="phi_g")(gate)
        psi = Conv(1, (1, 1, 1), dtype=self.dtype, kernel_init=nn.initializers.zeros)
        alpha = nn.sigmoid(psi(nn.silu(q)))  # [B, d, h, w, 1]
        return skip * alpha.astype(skip.dtype)


def upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour upsampling by 2 of every spatial axis: ``[N, *s, C] -> [N, *2s, C]``.

    Coarse voxel ``j`` covers fine voxels ``2j`` and ``2j + 1``, which keeps centred grids
    aligned (a coarse centre is the midpoint of its two fine centres).
    """
    for axis in range(1, x.ndim - 1):
        x = jnp.repeat(x, 2, axis=axis)
    return x
