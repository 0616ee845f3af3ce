"""3D PatchGAN discriminator with spectral normalisation (registry name ``"patchgan"``).

Every convolution is wrapped in ``flax.linen.SpectralNorm``, which keeps its power
iteration vector ``u`` and the last ``sigma`` in the ``"batch_stats"`` collection:

    variables = model.init(key, ct)                       # {"params", "batch_stats"}
    # training step: advance the power iteration and keep the new state
    (logits, feats), updates = model.apply(variables, ct, train=True,
                                           mutable=["batch_stats"])
    variables = {**variables, **updates}                  # or state.replace(batch_stats=...)
    # evaluation: the stored u is used but not changed, so nothing is mutable
    logits, feats = model.apply(variables, ct, train=False)

``train`` is passed to ``SpectralNorm(update_stats=train)``; calling with ``train=True``
without ``mutable=["batch_stats"]`` raises flax's ``ModifyScopeVariableError``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xct.models.conv import Conv
from xct.models.layers import Dtype


class PatchGAN3D(nn.Module):
    """Patch logits of a CT volume (optionally with condition channels).

    ``num_layers`` stride-2 4^3 convolutions (``base * 2^i`` channels, capped at
    ``8 * base``), one stride-1 4^3 convolution, then a 4^3 convolution to one logit per
    patch; LeakyReLU(0.2) in between, no normalisation other than spectral.

    Attributes:
      base_features: channels of the first convolution.
      num_layers: stride-2 layers; the patch grid is ``D / 2^num_layers`` per side.
      n_power_steps: power-iteration steps per call.
      dtype: compute dtype; parameters, state and outputs are float32.
    """

    base_features: int = 16
    num_layers: int = 3
    n_power_steps: int = 1
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        for f in ("base_features", "num_layers", "n_power_steps"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"PatchGAN3D.{f}: expected >= 1, got {getattr(self, f)!r}")
        super().__post_init__()

    def _conv(self, features: int, strides: int, name: str) -> nn.SpectralNorm:
        conv = Conv(features, (4, 4, 4), strides=strides, dtype=self.dtype, name=name)
        return nn.SpectralNorm(conv, n_steps=self.n_power_steps, name=f"{name}_sn")

    @nn.compact
    def __call__(self, ct: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
        """``ct [B, D, D, D]`` or ``[B, D, D, D, C]`` ->
        ``(logits [B, d, d, d], features)`` with ``d = D / 2^num_layers`` and ``features``
        the activations after each hidden layer (``[B, d_i, d_i, d_i, C_i]``, float32),
        for feature matching."""
        if ct.ndim == 4:
            ct = ct[..., None]
        if ct.ndim != 5:
            raise ValueError(
                f"ct: expected [B, D, D, D] or [B, D, D, D, C], got shape {tuple(ct.shape)}"
            )
        h = ct.astype(self.dtype)
        features = []
        for i in range(self.num_layers + 1):
            c = self.base_features * 2 ** min(i, 3)
            strides = 2 if i < self.num_layers else 1
            h = self._conv(c, strides, f"conv{i}")(h, update_stats=train)
            h = nn.leaky_relu(h, 0.2)
            features.append(h.astype(jnp.float32))
        logits = self._conv(1, 1, "logits")(h, update_stats=train)
        return logits[..., 0].astype(jnp.float32), features
