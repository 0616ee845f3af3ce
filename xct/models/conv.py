"""3D convolutions that run fast on CPUs: a ``[k_d, k_h, k_w]`` kernel as ``k_d`` 2D ones.

XLA:CPU sends 2D convolutions (and their gradients) to Eigen's tuned spatial convolution
but runs 3D ones, and above all their gradients, several times slower (BENCHMARKS.md,
"CPU: training step"; 4 x 32^3 x 8 -> 8 channels, 3^3 kernel: value and gradient 145 ms
as one 3D convolution, 42 ms as three 2D ones). So on CPUs a 3D convolution in the
channels-last layout Flax uses (``NDHWC`` input, ``DHWIO`` kernel) is computed as

    out[n, d] = sum_k conv2d(x_padded[n, d * s_d + k], kernel[k])

with the depth slices folded into the batch: the same sum, in another order (results
agree to float rounding). Gradients follow by JAX's rules for slices and 2D convolutions,
all of which XLA:CPU runs through Eigen as well.

On other backends (cuDNN is fast in 3D) and for anything else (dilations, feature groups,
other layouts) this is ``lax.conv_general_dilated`` itself. ``XCT_CONV3D=xla`` turns the
decomposition off everywhere (to compare, or if a future XLA makes it unnecessary).

:data:`Conv` is ``flax.linen.Conv`` using it: same parameters, same names, same
checkpoints.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

MODE_ENV = "XCT_CONV3D"  # "auto" (default: planes on CPU), "planes" (always) or "xla"
_MODES = ("auto", "planes", "xla")
_CHANNELS_LAST_3D = lax.ConvDimensionNumbers((0, 4, 1, 2, 3), (4, 3, 0, 1, 2), (0, 4, 1, 2, 3))


def _mode() -> str:
    mode = os.environ.get(MODE_ENV, "auto")
    if mode not in _MODES:
        raise ValueError(f"{MODE_ENV}: expected one of {_MODES}, got {mode!r}")
    return mode


def _ones(x) -> bool:
    return x is None or all(int(v) == 1 for v in x)


def _as_planes(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation, groups) -> bool:
    mode = _mode()
    if mode == "xla" or lhs.ndim != 5 or rhs.ndim != 5:
        return False
    if mode == "auto" and jax.default_backend() != "cpu":
        return False
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return dn == _CHANNELS_LAST_3D and _ones(lhs_dilation) and _ones(rhs_dilation) and groups == 1


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """``lax.conv_general_dilated``, computed plane by plane for channels-last 3D on CPUs."""
    if batch_group_count != 1 or not _as_planes(
        lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count
    ):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    n, _, h, w, c = lhs.shape
    kd = rhs.shape[0]
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], strides, padding)
    else:
        pads = [tuple(int(v) for v in p) for p in padding]
    zero = jnp.zeros((), lhs.dtype)
    x = lax.pad(lhs, zero, [(0, 0, 0), (*pads[0], 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)])
    sd = strides[0]
    d_out = (x.shape[1] - kd) // sd + 1
    out = None
    for k in range(kd):
        xs = lax.slice_in_dim(x, k, k + (d_out - 1) * sd + 1, stride=sd, axis=1)
        y = lax.conv_general_dilated(
            xs.reshape(n * d_out, h, w, c),
            rhs[k],
            strides[1:],
            pads[1:],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        out = y if out is None else out + y
    return out.reshape(n, d_out, *out.shape[1:])


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
