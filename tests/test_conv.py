"""The CPU plane-by-plane 3D convolution equals XLA's, in value and gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from xct.models import conv

DN = ("NDHWC", "DHWIO", "NDHWC")


def _xla(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _planes(x, w, strides, padding):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)


@pytest.mark.parametrize(
    "kernel,strides,padding",
    [
        ((3, 3, 3), (1, 1, 1), "SAME"),
        ((1, 1, 1), (1, 1, 1), "SAME"),
        ((4, 4, 4), (2, 2, 2), "SAME"),
        ((3, 2, 3), (2, 1, 1), "VALID"),
        ((3, 3, 3), (1, 1, 1), [(2, 0), (1, 1), (0, 2)]),
    ],
)
def test_planes_match_xla_value_and_gradient(monkeypatch, kernel, strides, padding):
    monkeypatch.setenv(conv.MODE_ENV, "planes")
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 7, 6, 5, 3))
    w = jax.random.normal(kw, (*kernel, 3, 4))
    ref = _xla(x, w, strides, padding)
    out = _planes(x, w, strides, padding)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, ref.shape)

    def grads(f):
        loss = lambda x, w: jnp.sum(f(x, w, strides, padding) * g)  # noqa: E731
        return jax.jit(jax.grad(loss, (0, 1)))(x, w)  # eager: each plane compiles alone

    for a, b in zip(grads(_planes), grads(_xla), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _native_ready() -> bool:
    from xct import _native

    return _native.preferred()


@pytest.mark.parametrize(
    "kernel,strides,padding,ci,co",
    [
        ((3, 3, 3), (1, 1, 1), "SAME", 8, 16),  # native forward, input and kernel gradients
        ((3, 3, 3), (1, 1, 1), [(2, 0), (1, 1), (0, 2)], 16, 8),  # asymmetric padding
        ((4, 4, 4), (2, 2, 2), "SAME", 8, 32),  # strided: input gradient by the planes
        ((3, 2, 3), (2, 1, 1), "VALID", 3, 24),  # strided: input gradient by the planes
        ((1, 1, 1), (1, 1, 1), "SAME", 16, 1),  # channels padded to 8 and sliced off
        ((3, 3, 3), (1, 1, 1), "SAME", 6, 5),  # both: the unrolled model's blocks
    ],
)
def test_native_kernels_match_xla_value_and_gradient(monkeypatch, kernel, strides, padding, ci, co):
    """Mode "auto" on this CPU: the native C++ convolution and gradients (xct._native)."""
    if not _native_ready():
        pytest.skip("native kernels not built here (no C++ compiler or no AVX2)")
    monkeypatch.setenv(conv.MODE_ENV, "auto")
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 7, 6, 9, ci))
    w = jax.random.normal(kw, (*kernel, ci, co))
    ref = _xla(x, w, strides, padding)
    out = jax.jit(lambda x, w: _planes(x, w, strides, padding))(x, w)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    g = jax.random.normal(kg, ref.shape)

    def grads(f):
        loss = lambda x, w: jnp.sum(f(x, w, strides, padding) * g)  # noqa: E731
        return jax.jit(jax.grad(loss, (0, 1)))(x, w)

    for a, b in zip(grads(_planes), grads(_xla), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)


def test_native_kernels_are_used_in_auto_mode_only(monkeypatch):
    if not _native_ready():
        pytest.skip("native kernels not built here")
    x, w = jnp.ones((1, 4, 4, 4, 8)), jnp.ones((3, 3, 3, 8, 8))

    def has_ffi(mode):
        monkeypatch.setenv(conv.MODE_ENV, mode)
        f = jax.grad(lambda x, w: jnp.sum(_planes(x, w, (1, 1, 1), "SAME")), (0, 1))
        return "xct_conv3d" in str(jax.make_jaxpr(f)(x, w))

    assert has_ffi("auto")
    assert not has_ffi("planes")


def test_mode_switch_and_fallbacks(monkeypatch):
    x = jnp.ones((1, 4, 4, 4, 2))
    w = jnp.ones((3, 3, 3, 2, 2))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    monkeypatch.setenv(conv.MODE_ENV, "planes")
    assert conv._as_planes(x, w, dn, None, None, 1)
    assert not conv._as_planes(x, w, dn, None, (2, 2, 2), 1)  # dilation: XLA's own
    assert not conv._as_planes(x, w, dn, None, None, 2)  # feature groups: XLA's own
    monkeypatch.setenv(conv.MODE_ENV, "xla")
    assert not conv._as_planes(x, w, dn, None, None, 1)
    monkeypatch.setenv(conv.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="XCT_CONV3D"):
        conv._as_planes(x, w, dn, None, None, 1)


def test_flax_conv_keeps_parameter_names_and_values():
    x = jax.random.normal(jax.random.key(1), (1, 5, 5, 5, 2))

    class Net(nn.Module):
        conv_cls: type

        @nn.compact
        def __call__(self, x):
            return self.conv_cls(3, (3, 3, 3))(x)

    ref, fast = Net(nn.Conv), Net(conv.Conv)
    params = ref.init(jax.random.key(0), x)
    assert jax.tree.structure(fast.init(jax.random.key(0), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(fast.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
