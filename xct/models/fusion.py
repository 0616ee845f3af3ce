"""Fusion of lifted per-view 3D features into one volume, for any number of views."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xct.models.layers import Dtype

FUSIONS = ("mean", "attention")


class ViewFusion(nn.Module):
    """``[B, V, d, h, w, C] -> [B, d, h, w, C]``, the same parameters for every ``V``.

    * ``"mean"``: the average over views (no parameters).
    * ``"attention"``: per-voxel softmax weights over views. A small pointwise network
      scores each view's feature together with the mean over views (the context, so a
      view is judged against the others) and the softmax runs over the view axis. The last
      layer starts at zero, so a fresh module is the mean.
    """

    mode: str = "mean"
    hidden: int = 16
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mode not in FUSIONS:
            raise ValueError(f"fusion: expected one of {FUSIONS}, got {self.mode!r}")
        if self.mode == "mean":
            return jnp.mean(x, axis=1)
        ctx = jnp.broadcast_to(jnp.mean(x, axis=1, keepdims=True), x.shape)
        s = nn.Dense(self.hidden, dtype=self.dtype, name="score_hidden")(
            jnp.concatenate([x, ctx], axis=-1)
        )
        s = nn.Dense(1, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="score")(
            nn.silu(s)
        )
        weights = jax.nn.softmax(s.astype(jnp.float32), axis=1)  # [B, V, d, h, w, 1]
        return jnp.sum(weights.astype(x.dtype) * x, axis=1)
