"""Learned gradient descent (registry name ``"unrolled"``): a reconstruction network that
calls the matched projector and its adjoint at every step.

Adler & Öktem's learned gradient scheme, in xct's units. From ``x_0 = 0`` (air), each of the
``num_iters`` iterations computes the data term's preconditioned gradient step, the one of
SIRT (``xct.recon.sirt``: ``C A^T R (b - A mu(x))`` with ``R = 1 / A 1`` and ``C = 1 / A^T
1``, converted from attenuation per mm to normalised CT units), and a small 3D CNN maps the
current volume, that step and ``memory`` extra channels to an update::

    s_k  = SIRT step at x_k                                   # physics: projector + adjoint
    dx, m_{k+1} = CNN_k([x_k, s_k, m_k])                       # learned, per iteration
    x_{k+1} = x_k + step_k * s_k + dx

``step_k`` starts at 1 and each CNN's last convolution at zero, so an untrained model is
``num_iters`` SIRT iterations from air; training learns what the data cannot say. The
views enter only through the projector, so one set of parameters serves any number of
views at any angles. Each iteration is rematerialised (``nn.remat``): training memory is
that of one iteration plus the ``num_iters`` carried volumes.

Inputs and outputs follow the other generators: ``drr [B, V, D, D]`` normalised line
integrals (``physics.normalize_drr``) at ``angles_deg [B, V]`` on ``acquisition``'s orbit ->
``{"ct": [B, D, D, D]}`` normalised CT (``physics.normalize_ct``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xct import physics, projector
from xct.geometry import Acquisition
from xct.models.conv import Conv
from xct.models.layers import Dtype, constrain
from xct.models.lifting import check_inputs
from xct.recon.iterative import sirt_weights

# d(normalised CT) per d(mu per mm): HU = 1000 (mu / mu_w - 1), x = (HU + 1024) / 4095.
_NORM_PER_MU = 1000.0 / physics.MU_WATER_PER_MM / (physics.HU_MAX - physics.HU_MIN)


class _Block(nn.Module):
    """One iteration's CNN: ``[B, D, D, D, 2 + memory] -> (dx [B, D, D, D], memory)``."""

    features: int
    depth: int
    memory: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        for i in range(self.depth - 1):
            h = nn.silu(Conv(self.features, (3, 3, 3), dtype=self.dtype, name=f"conv{i}")(h))
        out = Conv(
            1 + self.memory,
            (3, 3, 3),
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros,
            name="out",
        )(h)
        return out[..., 0].astype(jnp.float32), out[..., 1:]


class LearnedGradientDescent(nn.Module):
    """See the module docstring.

    Attributes:
      acquisition: the orbit, detector and cube (``xct.geometry.Acquisition``).
      num_iters: unrolled iterations, each one projection and one back-projection.
      features: channels of each iteration's CNN.
      depth: convolutions per iteration (3^3 kernels, SiLU between).
      memory: extra channels carried from one iteration to the next.
      dtype: compute dtype of the CNNs (the physics runs in float32).
    """

    acquisition: Acquisition = Acquisition()
    num_iters: int = 6
    features: int = 16
    depth: int = 3
    memory: int = 4
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if not isinstance(self.acquisition, Acquisition):
            raise ValueError(
                f"LearnedGradientDescent.acquisition: expected an xct.geometry.Acquisition, "
                f"got {self.acquisition!r}"
            )
        for f in ("num_iters", "features", "depth"):
            if int(getattr(self, f)) < 1:
                raise ValueError(
                    f"LearnedGradientDescent.{f}: expected >= 1, got {getattr(self, f)!r}"
                )
        if int(self.memory) < 0:
            raise ValueError(f"LearnedGradientDescent.memory: expected >= 0, got {self.memory!r}")
        super().__post_init__()

    @property
    def resolution(self) -> int:
        return self.acquisition.resolution

    @nn.compact
    def __call__(
        self, drr: jax.Array, angles_deg: jax.Array, train: bool = False
    ) -> dict[str, jax.Array]:
        del train  # no dropout or batch statistics
        check_inputs(drr, angles_deg, self.resolution)
        b, _, rows, cols = drr.shape
        d = self.resolution
        acq, grid = self.acquisition, self.acquisition.grid()
        line_integrals = physics.denormalize_drr(drr)
        angles = jnp.asarray(angles_deg, jnp.float32)

        def geom(a):
            return acq.orbit(a, det_shape=(rows, cols))

        row_inv, col_inv = jax.vmap(lambda a: sirt_weights(geom(a), grid))(angles)

        def sirt_step(x, li, a, r, c):
            mu = physics.hu_to_mu(physics.denormalize_ct(x))
            resid = li - projector.forward_project(mu, grid, geom(a))
            return c * projector.back_project(r * resid, grid, geom(a)) * _NORM_PER_MU

        def sirt_steps(x):
            return jax.vmap(sirt_step)(x, line_integrals, angles, row_inv, col_inv)

        x = jnp.zeros((b, d, d, d), jnp.float32)
        mem = jnp.zeros((b, d, d, d, self.memory), self.dtype)
        block = nn.remat(_Block)
        for k in range(self.num_iters):
            s = sirt_steps(x)
            step = self.param(f"step{k}", nn.initializers.ones, ())
            h = jnp.concatenate([x[..., None], s[..., None]], -1).astype(self.dtype)
            h = constrain(jnp.concatenate([h, mem], -1))
            dx, mem = block(self.features, self.depth, self.memory, self.dtype, name=f"iter{k}")(h)
            x = constrain(x + step * s + dx)
        return {"ct": x}
