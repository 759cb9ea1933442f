"""Convolution (and pooling) back ends for the U-Net, chosen for speed on XLA's CPU path (numerics equal;
tests/test_conv.py).

Measured on the 2-core Xeon (jax 0.10.2; thesis U-Net train step, 64 px, batch 8, f32: 2.2 s with XLA's defaults,
~0.70 s with all the choices below; PyTorch 2.13 on the same machine: 0.78 s, or ~0.65 s with its fused Adam):

- 2x2 stride-2 transposed convolutions ("up-convs"): XLA runs them as a convolution over a zero-dilated input
  (~1 s of the 2.2 s step). Each is one matmul followed by a depth-to-space reshape (``upconv_matmul``), which
  is also the natural form on GPUs and TPUs, so the U-Net uses it on every backend unless ``conv_impl=xla``.
- XLA's CPU convolutions go to YNNPACK by default; its weight gradients on large grids run at ~37 GFLOP/s
  (64x64, 64->64 channels: 65 ms against 17 ms forward). Eigen's convolutions, selected with the XLA flag
  ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` (``mrirecon_jax.cpu``, applied when the
  package is imported), make the whole step 0.84 -> 0.75 s. Kept YNNPACK for matmuls (Eigen's were slower).
- Small grids with many channels (the deep levels): XLA's convolution is pathological with either library
  (2x2x1024: ~1 s forward, 2.3 s input gradient) where one im2col matmul takes 12 / 18 ms, so ``auto`` uses
  im2col on CPU for grids of at most 8x8. On larger grids the im2col patch matrix (9x the input) costs more
  than it saves.
- 2x2 max pooling: ``nnx.max_pool`` is a reduce-window whose gradient XLA's CPU path computes with an
  index-tracking reduce-window over four iota arrays and a scatter (~25 ms of the step). ``max_pool_2x2`` takes
  the maximum over a reshaped (2, 2) axis pair instead, so forward and gradient are plain elementwise passes
  (step 0.72 -> 0.70 s). Its gradient splits evenly between tied maxima where XLA's picks one; after a ReLU the
  only ties are at zero, where the ReLU's gradient is zero anyway.

Also tried, slower than the above in the full step: im2col everywhere, a custom VJP whose weight gradient loops
over cache-sized bands of rows (2x faster than YNNPACK's, slower than Eigen's), nine shifted matmuls,
``lax.conv_general_dilated_patches``, channels-first layouts, XNNPACK fusions, ``--xla_cpu_enable_fast_math``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "xla", "im2col")
IM2COL_MAX_PIXELS = 64  # auto: im2col on grids of at most 8 x 8 pixels (CPU)
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def im2col_patches(x, kh: int, kw: int):
    """(N, H, W, C) -> (N, H, W, kh*kw*C): the SAME-padded kh x kw neighbourhood of every pixel, HWI-ordered."""
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    return jnp.concatenate([padded[:, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)], axis=-1)


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` for NHWC x HWIO, stride 1, SAME padding, as one matmul over the patches."""
    kh, kw, cin, cout = rhs.shape
    return jax.lax.dot_general(im2col_patches(lhs, kh, kw), rhs.reshape(kh * kw * cin, cout),
                               (((3,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=kwargs.get("preferred_element_type"))


def _supports_im2col(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count) -> bool:
    unit = lambda v: v is None or all(s == 1 for s in v)  # noqa: E731
    nhwc = lhs.ndim == 4 and (dimension_numbers is None or (  # flax passes a ConvDimensionNumbers
        jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSIONS)))
    return (nhwc and padding == "SAME" and unit(window_strides) and unit(lhs_dilation) and unit(rhs_dilation)
            and feature_group_count == 1)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, *, impl: str = "auto",
                         **kwargs):
    """Drop-in for ``lax.conv_general_dilated`` (as flax's ``nnx.Conv`` calls it) that picks the back end per shape."""
    use_im2col = impl == "im2col" or (
        impl == "auto" and jax.default_backend() == "cpu" and lhs.shape[1] * lhs.shape[2] <= IM2COL_MAX_PIXELS)
    if use_im2col and _supports_im2col(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                       dimension_numbers, feature_group_count):
        return im2col_conv(lhs, rhs, window_strides, padding, precision=precision, **kwargs)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)


def conv_function(impl: str):
    """The convolution function for ``nnx.Conv(conv_general_dilated=...)`` of one back-end choice."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"Unknown convolution implementation {impl!r}; choose one of {', '.join(CONV_IMPLS)}.")
    if impl == "xla":
        return jax.lax.conv_general_dilated
    return functools.partial(conv_general_dilated, impl=impl)


def max_pool_2x2(x):
    """2x2 max pooling with stride 2 (VALID: an odd last row or column is dropped) over (N, H, W, C), as a
    maximum over a reshaped axis pair; equal to ``nnx.max_pool(x, (2, 2), strides=(2, 2))``."""
    n, height, width, c = x.shape
    x = x[:, :height - height % 2, :width - width % 2]
    return x.reshape(n, height // 2, 2, width // 2, 2, c).max(axis=(2, 4))


def upconv_matmul(x, kernel):
    """``lax.conv_transpose`` (SAME or VALID padding, no kernel transpose) for kernel size == strides, as one
    matmul per input pixel whose (kh, kw) block of outputs is written depth-to-space. That transposed
    convolution maps output offset (a, b) within a block to kernel[kh-1-a, kw-1-b], hence the flip. The kernel
    is laid out as (cin, kh*kw*cout) first so that the product is a plain 2-D matmul (3 % faster in the thesis
    step at 64 px than letting einsum place the transposes)."""
    n, height, width, cin = x.shape
    kh, kw, _, cout = kernel.shape
    matrix = jnp.flip(kernel, (0, 1)).transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)
    y = (x.reshape(-1, cin) @ matrix).reshape(n, height, width, kh, kw, cout)
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, height * kh, width * kw, cout)
