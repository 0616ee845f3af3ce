"""The plain encoder-decoder baseline (registry name ``"baseline"``).

No skip connections, no residual blocks, no attention: a strided 2D encoder per view,
X2CT-style expansion of the coarsest map only, mean over views, and a 3D decoder of
upsampling convolutions. It is the reference against which each piece of
``UNetGenerator`` (multi-scale skips, back-projection lifting, attention fusion,
attention) is measured. Same call signature and outputs as the U-Net.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xct.geometry import Acquisition
from xct.models.conv import Conv
from xct.models.layers import Dtype, constrain, group_norm, upsample2
from xct.models.lifting import check_inputs, lift


class Baseline(nn.Module):
    """Plain few-view encoder-decoder.

    Attributes:
      acquisition: as in ``UNetGenerator``.
      base_features: channels of the first layer; layer ``i`` has ``base * 2^i``.
      num_layers: stride-2 layers in the encoder and upsampling layers in the decoder
        (3 or 4 is typical; ``D`` must be divisible by ``2^num_layers``).
      seg_classes: > 0 adds a segmentation head, as in the U-Net.
      dtype: compute dtype; parameters and outputs are float32.
    """

    acquisition: Acquisition = Acquisition()
    base_features: int = 16
    num_layers: int = 3
    seg_classes: int = 0
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if not isinstance(self.acquisition, Acquisition):
            raise ValueError(
                f"Baseline.acquisition: expected an xct.geometry.Acquisition, got "
                f"{self.acquisition!r}"
            )
        if int(self.base_features) < 1 or int(self.num_layers) < 1:
            raise ValueError(
                f"Baseline: expected base_features >= 1 and num_layers >= 1, got "
                f"{self.base_features!r} and {self.num_layers!r}"
            )
        if self.resolution % (2**self.num_layers) != 0:
            raise ValueError(
                f"Baseline.resolution: {self.resolution} is not divisible by "
                f"2^num_layers = {2**self.num_layers}"
            )
        if int(self.seg_classes) < 0:
            raise ValueError(f"Baseline.seg_classes: expected >= 0, got {self.seg_classes!r}")
        super().__post_init__()

    @property
    def resolution(self) -> int:
        return self.acquisition.resolution

    @nn.compact
    def __call__(
        self, drr: jax.Array, angles_deg: jax.Array, train: bool = False
    ) -> dict[str, jax.Array]:
        """``drr [B, V, D, D]``, ``angles_deg [B, V]`` -> ``{"ct": [B, D, D, D]}`` (and
        ``"seg_logits": [B, D, D, D, K]`` with ``seg_classes = K > 0``)."""
        del train
        check_inputs(drr, angles_deg, self.resolution)
        b, v, hh, ww = drr.shape
        h = drr.reshape(b * v, hh, ww, 1).astype(self.dtype)
        for i in range(self.num_layers):
            c = self.base_features * 2**i
            h = Conv(c, (4, 4), strides=(2, 2), dtype=self.dtype, name=f"enc{i}")(h)
            h = nn.silu(group_norm(self.dtype, c, name=f"enc{i}_norm")(h))
        h = lift(
            h.reshape(b, v, *h.shape[1:]),
            jnp.asarray(angles_deg, jnp.float32),
            method="expand",
            acquisition=self.acquisition,
            size=self.resolution // 2**self.num_layers,
        )
        h = constrain(jnp.mean(h, axis=1))  # [B, d, d, d, C]
        for i in range(self.num_layers - 1, -1, -1):
            c = self.base_features * 2**i
            h = Conv(c, (3, 3, 3), dtype=self.dtype, name=f"dec{i}")(upsample2(h))
            h = constrain(nn.silu(group_norm(self.dtype, c, name=f"dec{i}_norm")(h)))
        ct = Conv(1, (3, 3, 3), dtype=self.dtype, name="ct_head")(h)[..., 0]
        out = {"ct": constrain(ct.astype(jnp.float32))}
        if self.seg_classes > 0:
            seg = Conv(self.seg_classes, (1, 1, 1), dtype=self.dtype, name="seg_head")(h)
            out["seg_logits"] = constrain(seg.astype(jnp.float32))
        return out
