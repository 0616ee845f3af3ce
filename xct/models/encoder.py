"""2D view encoder, shared by all views (the same weights see every projection)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from xct.models.conv import Conv
from xct.models.layers import Dtype, ResBlock


class ViewEncoder(nn.Module):
    """Multi-scale 2D features of single projections.

    Level 0 keeps the input resolution; each further level halves it with a 2x2 stride-2
    convolution (its outputs are centred on the coarse pixel centres, so lifted grids stay
    aligned) and runs ``num_res_blocks`` residual blocks (GroupNorm, SiLU).

    Attributes:
      features: channels per level, ``(C_0, ..., C_{L-1})``.
      num_res_blocks: residual blocks per level.
      dtype: compute dtype.
    """

    features: Sequence[int]
    num_res_blocks: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> list[jax.Array]:
        """``images [N, H, W, C_in]`` -> ``[[N, H / 2^l, W / 2^l, C_l] for l in levels]``."""
        h = Conv(self.features[0], (3, 3), dtype=self.dtype, name="stem")(images.astype(self.dtype))
        outs = []
        for level, c in enumerate(self.features):
            if level > 0:
                h = Conv(
                    c,
                    (2, 2),
                    strides=(2, 2),
                    padding="VALID",
                    dtype=self.dtype,
                    name=f"down{level}",
                )(h)
            for i in range(self.num_res_blocks):
                h = ResBlock(c, dtype=self.dtype, name=f"level{level}_res{i}")(h)
            outs.append(h)
        return outs
