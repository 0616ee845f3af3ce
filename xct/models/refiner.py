"""A small residual 3D U-Net that corrects a reconstruction from its inputs (``atlas_net``).

``Refiner(width)``: ``[B, D, D, D, C]`` input volumes (any ``C``; ``D`` divisible by 4) ->
``[B, D, D, D]`` residual. Three scales (``width``, ``2 width``, ``4 width`` channels),
SiLU, skip connections by concatenation, trilinear upsampling. The last layer starts at
zero, so an untrained refiner returns no correction (the caller adds the residual to its
base volume).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xct.models.conv import Conv


def _up(x: jax.Array, like: jax.Array) -> jax.Array:
    b, _, _, _, c = x.shape
    return jax.image.resize(x, (b, *like.shape[1:4], c), "trilinear")


class Refiner(nn.Module):
    """Residual 3D U-Net of three scales."""

    width: int = 12

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = self.width
        if x.ndim != 5 or any(n % 4 for n in x.shape[1:4]):
            raise ValueError(
                f"Refiner: expected [B, D, H, W, C] with sides divisible by 4, got {x.shape}"
            )
        h1 = nn.silu(Conv(f, (3, 3, 3), name="e1a")(x))
        h1 = nn.silu(Conv(f, (3, 3, 3), name="e1b")(h1))
        h2 = nn.silu(Conv(2 * f, (3, 3, 3), strides=(2, 2, 2), name="d1")(h1))
        h2 = nn.silu(Conv(2 * f, (3, 3, 3), name="e2")(h2))
        h3 = nn.silu(Conv(4 * f, (3, 3, 3), strides=(2, 2, 2), name="d2")(h2))
        h3 = nn.silu(Conv(4 * f, (3, 3, 3), name="e3")(h3))
        u2 = nn.silu(Conv(2 * f, (3, 3, 3), name="u2")(jnp.concatenate([h2, _up(h3, h2)], -1)))
        u1 = nn.silu(Conv(f, (3, 3, 3), name="u1")(jnp.concatenate([h1, _up(u2, h1)], -1)))
        out = Conv(1, (1, 1, 1), kernel_init=nn.initializers.zeros, name="head")(u1)
        return out[..., 0]
