import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrirecon_jax.models import conv, unet


def _xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _winograd(x, w, tile=4):
    return conv.winograd_conv(x, w, (1, 1), "SAME", tile=tile)


def _winograd_f2(x, w):
    return _winograd(x, w, tile=2)


def _im2col(x, w):
    return conv.im2col_conv(x, w, (1, 1), "SAME")


def _assert_close_at_scale(actual, desired, tolerance=2e-5):
    """Max |actual - desired| within `tolerance` of max |desired| (the error measure of conv.py's docstring)."""
    error = float(jnp.abs(actual - desired).max())
    assert error <= tolerance * float(jnp.abs(desired).max()), (error, float(jnp.abs(desired).max()))


@pytest.mark.parametrize("fn", [_im2col, _winograd, _winograd_f2])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3, 5), (2, 2, 2, 16, 16), (1, 6, 4, 4, 2), (2, 7, 5, 3, 4),
                                   (1, 1, 1, 2, 3), (1, 13, 10, 24, 8)])
def test_matmul_forms_match_xla_forward_and_gradients(fn, shape):
    n, h, w, cin, cout = shape
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, h, w, cin))
    kernel = jax.random.normal(kw, (3, 3, cin, cout))
    tolerance = 5e-5 if fn is _winograd else 2e-5  # F(4x4)'s transforms weigh by up to 8 and 1/24
    _assert_close_at_scale(fn(x, kernel), _xla(x, kernel), tolerance)

    def loss(conv_fn):
        return lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k)))

    g_ours = jax.grad(loss(fn), argnums=(0, 1))(x, kernel)
    g_xla = jax.grad(loss(_xla), argnums=(0, 1))(x, kernel)
    for a, b in zip(g_ours, g_xla):
        _assert_close_at_scale(a, b, tolerance)


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_keeps_bfloat16_and_rejects_other_kernel_sizes_and_tiles(tile):
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 16))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 16, 16)) / 12
    out, grad = jax.value_and_grad(lambda x, k: jnp.sum(_winograd(x, k, tile) ** 2), argnums=1)(
        x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert out.dtype == grad.dtype == jnp.bfloat16
    reference = jax.grad(lambda k: jnp.sum(_xla(x, k) ** 2))(kernel)
    np.testing.assert_allclose(grad.astype(jnp.float32), reference, rtol=0.05,
                               atol=0.05 * float(jnp.abs(reference).max()))
    with pytest.raises(ValueError, match="3x3"):
        _winograd(x, jnp.ones((5, 5, 16, 16)), tile)
    with pytest.raises(ValueError, match="tiles"):
        _winograd(x, kernel, tile + 1)


def _auto_choice(x, kernel):
    """Which form ``auto`` ran, read from the jaxpr (xla, im2col or Winograd), and for Winograd its tile count."""
    auto = conv.conv_function("auto")
    jaxpr = str(jax.make_jaxpr(lambda x, k: auto(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(
        x, kernel))
    if "conv_general_dilated" in jaxpr:
        return "xla"
    if "custom_vjp_call" not in jaxpr:
        return "im2col"
    return "winograd" if "f32[36," in jaxpr else "winograd_f2" if "f32[16," in jaxpr else "unknown Winograd"


def test_auto_picks_winograd_im2col_or_xla_by_grid_channels_and_dtype_on_cpu():
    wide, mixed, narrow = jnp.ones((3, 3, 128, 128)), jnp.ones((3, 3, 128, 64)), jnp.ones((3, 3, 64, 64))
    assert _auto_choice(jnp.ones((1, 4, 4, 128)), wide) == "im2col"  # 16 pixels: im2col
    assert _auto_choice(jnp.ones((1, 8, 8, 128)), wide) == "winograd_f2"  # F(2x2) on 8x8 grids
    assert _auto_choice(jnp.ones((1, 16, 16, 128)), mixed) == "winograd"  # F(4x4) from 16x16
    assert _auto_choice(jnp.ones((1, 64, 64, 128)), mixed) == "winograd"
    assert _auto_choice(jnp.ones((1, 8, 8, 64)), narrow) == "im2col"  # too few channels for Winograd
    assert _auto_choice(jnp.ones((1, 16, 16, 64)), narrow) == "xla"
    assert _auto_choice(jnp.ones((1, 16, 16, 128), jnp.bfloat16), wide.astype(jnp.bfloat16)) == "xla"
    assert conv.conv_function("xla") is jax.lax.conv_general_dilated
    with pytest.raises(ValueError, match="auto"):
        conv.conv_function("fft")


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_upconv_matmul_equals_flax_conv_transpose_with_gradients(padding):
    kx, kk, kb = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (2, 3, 5, 4))
    reference = nnx.ConvTranspose(4, 6, (2, 2), strides=(2, 2), padding=padding, rngs=nnx.Rngs(0))
    reference.kernel[...] = jax.random.normal(kk, reference.kernel.shape)
    reference.bias[...] = jax.random.normal(kb, reference.bias.shape)
    ours = unet.UpConv(4, 6, padding=padding, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(reference, nnx.Param))
    np.testing.assert_allclose(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    assert ours(x).shape == (2, 6, 10, 6)

    def grads(module):
        return nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x))))(module, x)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(reference))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_auto_backend_avoids_dilated_convolutions_and_reduce_window():
    x = jnp.ones((1, 32, 32, 1))
    jaxprs = {impl: str(jax.make_jaxpr(unet.UNet(unet.PRESETS["tiny"], conv_impl=impl, rngs=nnx.Rngs(0)))(x))
              for impl in ("auto", "xla")}
    assert "lhs_dilation=(2, 2)" in jaxprs["xla"]  # flax's ConvTranspose: a convolution over a dilated input
    assert "lhs_dilation=(2, 2)" not in jaxprs["auto"]
    assert "reduce_window_max" in jaxprs["xla"]  # flax's max_pool
    assert "reduce_window" not in jaxprs["auto"]


def test_unet_outputs_and_gradients_agree_across_conv_backends():
    x = jax.random.uniform(jax.random.key(4), (2, 32, 32, 1))

    def output_and_grads(impl):
        graphdef, params = nnx.split(unet.UNet(unet.PRESETS["tiny"], conv_impl=impl, rngs=nnx.Rngs(0)))

        def loss(p):  # jitted: one compilation per back end instead of one per operation
            y = nnx.merge(graphdef, p)(x)
            return jnp.mean((y - x) ** 2), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return y, jax.tree.leaves(grads)

    reference_output, reference_grads = output_and_grads("xla")
    for impl in (impl for impl in conv.CONV_IMPLS if impl != "xla"):
        output, grads = output_and_grads(impl)
        np.testing.assert_allclose(output, reference_output, rtol=1e-4, atol=1e-5)
        for a, b in zip(grads, reference_grads):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 5, 7, 2)])
def test_max_pool_2x2_equals_flax_max_pool_with_gradients(shape):
    x = jax.random.normal(jax.random.key(6), shape)  # continuous values: no ties
    reference = lambda x: nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))  # noqa: E731
    np.testing.assert_array_equal(conv.max_pool_2x2(x), reference(x))
    assert conv.max_pool_2x2(x).shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    grad = lambda fn: jax.grad(lambda x: jnp.sum(jnp.sin(3 * fn(x))))(x)  # noqa: E731
    np.testing.assert_allclose(grad(conv.max_pool_2x2), grad(reference), rtol=1e-6, atol=1e-7)
