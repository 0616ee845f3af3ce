"""A small residual 3D U-Net that corrects a reconstruction from its inputs (``atlas_net``).

``Refiner(width, depth)``: ``[B, D, D, D, C]`` input volumes (any ``C``; ``D`` divisible by
``2 ** (depth - 1)``) -> ``[B, D, D, D]`` residual. ``depth`` 3: three scales (``width``,
``2 width``, ``4 width`` channels); ``depth`` 4 adds a fourth (``8 width`` channels at an
eighth of the side, two convolutions), about doubling the field of view for little compute
(it lost on the clinical folds: BENCHMARKS.md). SiLU, skip connections by concatenation,
trilinear upsampling. The last layer starts at zero, so an untrained refiner returns no
correction (the caller adds the residual to its base volume).
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
    """Residual 3D U-Net of three or four scales."""

    width: int = 12
    depth: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = self.width
        if self.depth not in (3, 4):
            raise ValueError(f"Refiner: depth must be 3 or 4, got {self.depth}")
        k = 2 ** (self.depth - 1)
        if x.ndim != 5 or any(n % k for n in x.shape[1:4]):
            raise ValueError(
                f"Refiner: expected [B, D, H, W, C] with sides divisible by {k}, got {x.shape}"
            )
        h1 = nn.silu(Conv(f, (3, 3, 3), name="e1a")(x))
        h1 = nn.silu(Conv(f, (3, 3, 3), name="e1b")(h1))
        h2 = nn.silu(Conv(2 * f, (3, 3, 3), strides=(2, 2, 2), name="d1")(h1))
        h2 = nn.silu(Conv(2 * f, (3, 3, 3), name="e2")(h2))
        h3 = nn.silu(Conv(4 * f, (3, 3, 3), strides=(2, 2, 2), name="d2")(h2))
        h3 = nn.silu(Conv(4 * f, (3, 3, 3), name="e3")(h3))
        if self.depth == 4:
            h4 = nn.silu(Conv(8 * f, (3, 3, 3), strides=(2, 2, 2), name="d3")(h3))
            h4 = nn.silu(Conv(8 * f, (3, 3, 3), name="e4a")(h4))
            h4 = nn.silu(Conv(8 * f, (3, 3, 3), name="e4b")(h4))
            h3 = nn.silu(Conv(4 * f, (3, 3, 3), name="u3")(jnp.concatenate([h3, _up(h4, h3)], -1)))
        u2 = nn.silu(Conv(2 * f, (3, 3, 3), name="u2")(jnp.concatenate([h2, _up(h3, h2)], -1)))
        u1 = nn.silu(Conv(f, (3, 3, 3), name="u1")(jnp.concatenate([h1, _up(u2, h1)], -1)))
        out = Conv(1, (1, 1, 1), kernel_init=nn.initializers.zeros, name="head")(u1)
        return out[..., 0]
