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

Where the native C++ kernels of :mod:`xct._native` are built (``make`` builds them; a C++
compiler and AVX2 or AVX-512), float32 convolutions go further: the convolution, its input
gradient (stride 1: the convolution of the padded output gradient with the flipped kernel)
and above all its kernel gradient, which XLA:CPU computes 5-8x slower than the convolution
itself, run as register-blocked SIMD loops (``conv3d.cc``), in a ``jax.custom_vjp`` (so:
reverse-mode derivatives only). 2 x 64^3 x 16 -> 16 channels, 3^3 kernel, value and
gradients: planes 425 ms, native 96 ms; the ``unet64`` training step 6.3 -> 3.1 s.
Output channels are zero-padded to a multiple of 8 for the kernels' SIMD; the input
gradient of strided convolutions uses the planes.

On other backends (cuDNN is fast in 3D) and for anything else (dilations, feature groups,
other layouts) this is ``lax.conv_general_dilated`` itself. ``XCT_CONV3D`` chooses:
``auto`` (default: on CPUs the native kernels where built, else planes), ``planes`` (2D
planes with XLA's gradients, on any backend) or ``xla`` (XLA's 3D convolution everywhere,
to compare, or if a future XLA makes all this unnecessary).

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

MODE_ENV = "XCT_CONV3D"  # "auto" (default: native / planes on CPU), "planes" (always) or "xla"
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
    strides = tuple(int(v) for v in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], strides, padding)
    else:
        pads = [tuple(int(v) for v in p) for p in padding]
    pads = tuple(tuple(int(v) for v in p) for p in pads)
    if _use_native(lhs, rhs, pads, preferred_element_type):
        return _native_conv(lhs, rhs, strides, pads, precision)
    return _planes(lhs, rhs, strides, pads, precision, preferred_element_type)


def _planes(lhs, rhs, strides, pads, precision, preferred_element_type):
    """The 3D convolution as ``k_d`` 2D ones over depth slices folded into the batch."""
    n, _, h, w, c = lhs.shape
    kd = rhs.shape[0]
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


def _use_native(lhs, rhs, pads, preferred_element_type) -> bool:
    """Whether the native C++ kernels (``xct._native``) run the convolution: mode ``auto``,
    float32, no negative padding, and the library built for this machine."""
    if _mode() != "auto" or preferred_element_type is not None:
        return False
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    if any(v < 0 for p in pads for v in p):
        return False
    from xct import _native  # noqa: PLC0415 - builds the library on first use

    return _native.preferred()


def _pad(x, pads):
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])


def _native_forward(x_padded, rhs, strides):
    """The native convolution of an already padded input; output channels are zero-padded
    to a multiple of 8 (the kernel's SIMD runs over them) and sliced off again."""
    from xct import _native  # noqa: PLC0415

    co = rhs.shape[-1]
    extra = -co % 8
    if extra:
        rhs = jnp.pad(rhs, [(0, 0)] * 4 + [(0, extra)])
    out = _native.conv3d(x_padded, rhs, strides)
    return out[..., :co] if extra else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _native_conv(lhs, rhs, strides, pads, precision):
    """The convolution by the native kernels, and its gradients (the input gradient of a
    strided convolution by :func:`_planes`'s; reverse mode only)."""
    return _native_forward(_pad(lhs, pads), rhs, strides)


def _native_conv_fwd(lhs, rhs, strides, pads, precision):
    return _native_forward(_pad(lhs, pads), rhs, strides), (lhs, rhs)


def _native_conv_bwd(strides, pads, precision, res, g):
    from xct import _native  # noqa: PLC0415

    lhs, rhs = res
    k = rhs.shape[:3]
    if all(s == 1 for s in strides):
        # Stride 1: the input gradient is the convolution of the padded output gradient
        # with the flipped kernel, input and output channels swapped.
        back = tuple((kk - 1 - lo, kk - 1 - hi) for kk, (lo, hi) in zip(k, pads, strict=True))
        dx = _native_forward(_pad(g, back), jnp.flip(rhs, (0, 1, 2)).swapaxes(3, 4), strides)
    else:
        _, input_vjp = jax.vjp(lambda x: _planes(x, rhs, strides, pads, precision, None), lhs)
        (dx,) = input_vjp(g)
    dw = _native.conv3d_weight_grad(_pad(lhs, pads), g, k, strides)
    return dx.astype(lhs.dtype), dw.astype(rhs.dtype)


_native_conv.defvjp(_native_conv_fwd, _native_conv_bwd)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
