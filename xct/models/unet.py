"""The few-view CT generator: shared 2D encoder -> lifting -> view fusion -> 3D U-Net decoder.

``UNetGenerator().apply(variables, drr [B, V, D, D], angles_deg [B, V], train=...)``
returns ``{"ct": [B, D, D, D]}`` (plus ``"seg_logits": [B, D, D, D, K]`` when
``seg_classes = K > 0``). The 2D features of every encoder level are lifted into a cube of
the same resolution (``D / 2^l`` voxels per side) and fused over views; the coarsest fused
volume starts the decoder and the finer ones are its skip connections. No BatchNorm, so
there is no mutable state; ``train`` is accepted for a uniform interface (nothing in the
generator depends on it).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xct.geometry import Acquisition
from xct.models.conv import Conv
from xct.models.encoder import ViewEncoder
from xct.models.fusion import FUSIONS, ViewFusion
from xct.models.layers import (
    AttentionGate,
    BottleneckAttention,
    Dtype,
    ResBlock,
    constrain,
    group_norm,
    upsample2,
)
from xct.models.lifting import LIFTINGS, check_inputs, lift

ATTENTIONS = ("bottleneck", "gates", "none")


def patch_frame(module, batch: int, patch_offset) -> tuple[int, float, jax.Array]:
    """``(voxels per side, side in mm, centre [B, 3] world (x, y, z) mm)`` of the cube a
    generator reconstructs: the whole volume, or its ``patch_size`` patch at
    ``patch_offset [B, 3]`` (``(z, y, x)`` index of the patch's first voxel)."""
    d = module.acquisition.resolution
    p = int(getattr(module, "patch_size", 0)) or d
    voxel_mm = module.acquisition.voxel_mm
    if patch_offset is None:
        offset = jnp.full((batch, 3), (d - p) / 2.0, jnp.float32)
    else:
        offset = jnp.asarray(patch_offset, jnp.float32)
        if offset.shape != (batch, 3):
            raise ValueError(
                f"patch_offset: expected shape [B, 3] = {(batch, 3)}, got {offset.shape}"
            )
    centre_zyx = (offset + (p - d) / 2.0) * voxel_mm
    return p, p * voxel_mm, centre_zyx[:, ::-1]


class UNetGenerator(nn.Module):
    """Few-view X-ray to CT generator (registry name ``"unet"``).

    Attributes:
      acquisition: the orbit, detector and cube (``xct.geometry.Acquisition``): ``D =
        acquisition.resolution`` voxels per side of the CT and pixels per side of each DRR.
      base_features: channels at full resolution; level ``l`` has ``base * 2^l``.
      num_levels: resolution levels (``D`` must be divisible by ``2^(num_levels-1)``).
      num_res_blocks: residual blocks per level, in the encoder and the decoder.
      lifting: ``"backproject"`` (cone-beam adjoint) or ``"expand"`` (X2CT broadcast).
      fusion: ``"mean"`` or ``"attention"`` over views.
      attention: ``"bottleneck"`` (self-attention at the coarsest level), ``"gates"``
        (attention gates on the skips) or ``"none"``.
      num_heads: heads of the bottleneck attention (must divide its channels).
      seg_classes: > 0 adds an organ-segmentation head with that many classes.
      patch_size: 0 (the whole ``D^3`` volume) or ``P``: the model reconstructs a ``P^3``
        patch of the volume at ``patch_offset`` (patch-based training and sliding-window
        inference); the views are always whole. Divisible by ``2^(num_levels-1)``.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32 and the outputs
        are float32.
    """

    acquisition: Acquisition = Acquisition()
    base_features: int = 8
    num_levels: int = 4
    num_res_blocks: int = 1
    lifting: str = "backproject"
    fusion: str = "attention"
    attention: str = "bottleneck"
    num_heads: int = 4
    seg_classes: int = 0
    patch_size: int = 0
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if not isinstance(self.acquisition, Acquisition):
            raise ValueError(
                f"UNetGenerator.acquisition: expected an xct.geometry.Acquisition, got "
                f"{self.acquisition!r}"
            )
        p = int(self.patch_size)
        if p < 0 or p > self.resolution or p % (2 ** (self.num_levels - 1)):
            raise ValueError(
                f"UNetGenerator.patch_size: expected 0 or a size <= resolution "
                f"{self.resolution} divisible by 2^(num_levels-1) = "
                f"{2 ** (self.num_levels - 1)}, got {self.patch_size!r}"
            )
        if self.lifting not in LIFTINGS:
            raise ValueError(
                f"UNetGenerator.lifting: expected one of {LIFTINGS}, got {self.lifting!r}"
            )
        if self.fusion not in FUSIONS:
            raise ValueError(
                f"UNetGenerator.fusion: expected one of {FUSIONS}, got {self.fusion!r}"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(
                f"UNetGenerator.attention: expected one of {ATTENTIONS}, got {self.attention!r}"
            )
        for f in ("base_features", "num_levels", "num_res_blocks", "num_heads"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"UNetGenerator.{f}: expected >= 1, got {getattr(self, f)!r}")
        if int(self.seg_classes) < 0:
            raise ValueError(f"UNetGenerator.seg_classes: expected >= 0, got {self.seg_classes!r}")
        if self.resolution % (2 ** (self.num_levels - 1)) != 0:
            raise ValueError(
                f"UNetGenerator.resolution: {self.resolution} is not divisible by "
                f"2^(num_levels-1) = {2 ** (self.num_levels - 1)}"
            )
        top = self.base_features * 2 ** (self.num_levels - 1)
        if self.attention == "bottleneck" and top % self.num_heads != 0:
            raise ValueError(
                f"UNetGenerator.num_heads: {self.num_heads} heads do not divide the "
                f"{top} bottleneck channels"
            )
        super().__post_init__()

    @property
    def resolution(self) -> int:
        return self.acquisition.resolution

    @property
    def level_features(self) -> tuple[int, ...]:
        return tuple(self.base_features * 2**level for level in range(self.num_levels))

    @nn.compact
    def __call__(
        self,
        drr: jax.Array,
        angles_deg: jax.Array,
        train: bool = False,
        patch_offset: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """``drr [B, V, D, D]`` (normalised line integrals), ``angles_deg [B, V]`` ->
        ``{"ct": [B, D, D, D]}`` and, with ``seg_classes = K > 0``,
        ``"seg_logits": [B, D, D, D, K]`` (float32). Any ``V >= 1``.

        With ``patch_size = P > 0`` the outputs are ``P^3`` patches whose first voxel is
        ``patch_offset [B, 3]`` (integer ``(z, y, x)`` voxel indices of the ``D^3`` volume,
        may be traced; default the centred patch)."""
        del train  # no dropout or batch statistics
        check_inputs(drr, angles_deg, self.resolution)
        b, v, hh, ww = drr.shape
        feats = ViewEncoder(
            self.level_features, self.num_res_blocks, dtype=self.dtype, name="encoder"
        )(drr.reshape(b * v, hh, ww, 1))
        angles = jnp.asarray(angles_deg, jnp.float32)
        size, side_mm, center_mm = patch_frame(self, b, patch_offset)
        fused = []
        for level, f in enumerate(feats):
            lifted = lift(
                f.reshape(b, v, *f.shape[1:]),
                angles,
                method=self.lifting,
                acquisition=self.acquisition,
                size=size // 2**level,
                fov_mm=side_mm,
                center_mm=center_mm,
            )  # [B, V, d, d, d, C_l]
            lifted = constrain(lifted, ("batch", None, "z"))
            fused.append(
                constrain(ViewFusion(self.fusion, dtype=self.dtype, name=f"fusion{level}")(lifted))
            )

        top = self.num_levels - 1
        c = self.level_features[top]
        h = constrain(Conv(c, (3, 3, 3), dtype=self.dtype, name="bottleneck_in")(fused[top]))
        for i in range(self.num_res_blocks):
            h = ResBlock(c, dtype=self.dtype, name=f"bottleneck_res{i}")(h)
        if self.attention == "bottleneck":
            h = BottleneckAttention(self.num_heads, dtype=self.dtype, name="bottleneck_attn")(h)
            h = ResBlock(c, dtype=self.dtype, name="bottleneck_post")(h)
        for level in range(top - 1, -1, -1):
            c = self.level_features[level]
            h = constrain(Conv(c, (3, 3, 3), dtype=self.dtype, name=f"up{level}")(upsample2(h)))
            skip = fused[level]
            if self.attention == "gates":
                skip = AttentionGate(dtype=self.dtype, name=f"gate{level}")(skip, h)
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
            for i in range(self.num_res_blocks):
                h = ResBlock(c, dtype=self.dtype, name=f"dec{level}_res{i}")(h)
        h = nn.silu(group_norm(self.dtype, h.shape[-1], name="head_norm")(h))
        ct = Conv(1, (3, 3, 3), dtype=self.dtype, name="ct_head")(h)[..., 0]
        out = {"ct": constrain(ct.astype(jnp.float32))}
        if self.seg_classes > 0:
            seg = Conv(self.seg_classes, (1, 1, 1), dtype=self.dtype, name="seg_head")(h)
            out["seg_logits"] = constrain(seg.astype(jnp.float32))
        return out
