"""Convolution (and pooling) back ends for the U-Net, chosen for speed on XLA's CPU path (numerics equal;
tests/test_conv.py).

Measured on the 2-core Xeon (jax 0.10.2; thesis U-Net train step, 64 px, batch 8, f32: 2.2 s with XLA's defaults,
~0.57 s with all the choices below; PyTorch 2.13 on the same machine: 0.78 s, or ~0.62-0.65 s with its fused Adam):

- 2x2 stride-2 transposed convolutions ("up-convs"): XLA runs them as a convolution over a zero-dilated input
  (~1 s of the 2.2 s step). Each is one matmul followed by a depth-to-space reshape (``upconv_matmul``), which
  is also the natural form on GPUs and TPUs, so the U-Net uses it on every backend unless ``conv_impl=xla``.
- XLA's CPU convolutions go to YNNPACK by default; its weight gradients on large grids run at ~37 GFLOP/s
  (64x64, 64->64 channels: 65 ms against 17 ms forward). Eigen's convolutions, selected with the XLA flag
  ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` (``mrirecon_jax.cpu``, applied when the
  package is imported), make the whole step 0.84 -> 0.75 s. Kept YNNPACK for matmuls (Eigen's were slower).
- Small grids with many channels (the deep levels): XLA's convolution is pathological with either library
  (2x2x1024: ~1 s forward, 2.3 s input gradient) where one im2col matmul takes 12 / 18 ms, so ``auto`` uses
  im2col on CPU for grids of at most 8x8 (where Winograd below does not apply). On larger grids the im2col
  patch matrix (9x the input) costs more than it saves.
- Winograd's F(2x2, 3x3) (``winograd_conv``, with its own VJP): 16 batched matmuls over all 2x2 output tiles
  do the work of the 36 multiplies per tile and channel pair of a direct 3x3 convolution, for the forward pass,
  the input gradient and the weight gradient alike; the tile transforms are sums and differences, fused into
  single passes. It pays where the matmuls dominate the transforms: many channels, grids not too large. Forward +
  both gradients, batch 8 (``auto`` before -> Winograd): 8x8 1024->512 52 -> 34 ms, 16x16 256->256 26 -> 21 ms,
  32x32 128->128 25 -> 25 ms; slower at 64x64 x 64 channels (35 -> 51 ms), on 4x4 grids (im2col is faster) and
  below 128 channels (the small U-Net's 16x16 128->64: 3.9 -> 4.9 ms). ``auto`` uses it on CPU for float32 on
  8x8 to 32x32 grids with at least 128 input and output channels: thesis step 0.64 -> 0.57 s. Numerics: max error
  ~1e-6 of the output scale in float32; in bfloat16 2-3x XLA's own bfloat16 error, hence float32 only in auto.
- 2x2 max pooling: ``nnx.max_pool`` is a reduce-window whose gradient XLA's CPU path computes with an
  index-tracking reduce-window over four iota arrays and a scatter (~25 ms of the step). ``max_pool_2x2`` takes
  the maximum over a reshaped (2, 2) axis pair instead, so forward and gradient are plain elementwise passes
  (step 0.72 -> 0.70 s). Its gradient splits evenly between tied maxima where XLA's picks one; after a ReLU the
  only ties are at zero, where the ReLU's gradient is zero anyway.

Also tried, slower than the above in the full step: im2col everywhere, a custom VJP whose weight gradient loops
over cache-sized bands of rows (2x faster than YNNPACK's, slower than Eigen's), nine shifted matmuls,
``lax.conv_general_dilated_patches``, channels-first layouts, XNNPACK fusions, ``--xla_cpu_enable_fast_math``;
Winograd's F(4x4, 3x3) (36 matmuls over 4x4 tiles: 10-25 % faster than F(2x2, 3x3) per convolution on 16x16 and
32x32 grids, slower on 8x8, no clear gain in the step, ~10x the rounding error) and, for its weight gradient, the
tile matmuls split along the tiles (YNNPACK runs the batched, tile-contracting matmul at ~60-75 % of its peak).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ("auto", "xla", "im2col", "winograd")
# auto on CPU: Winograd for float32 3x3 convolutions on grids of 8x8 to 32x32 pixels with at least 128 input and
# output channels; else im2col on grids of at most 8x8; else XLA's (Eigen) convolution.
WINOGRAD_PIXELS = (64, 1024)
WINOGRAD_MIN_CHANNELS = 128
IM2COL_MAX_PIXELS = 64
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


def _supports_matmul_forms(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                           feature_group_count) -> bool:
    """Whether a convolution is one that im2col_conv and winograd_conv compute: NHWC x HWIO, stride 1, SAME."""
    unit = lambda v: v is None or all(s == 1 for s in v)  # noqa: E731
    nhwc = lhs.ndim == 4 and (dimension_numbers is None or (  # flax passes a ConvDimensionNumbers
        jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSIONS)))
    return (nhwc and padding == "SAME" and unit(window_strides) and unit(lhs_dilation) and unit(rhs_dilation)
            and feature_group_count == 1)


def _auto_choice(lhs, rhs) -> str:
    """The back end ``auto`` picks for an NHWC x HWIO convolution (see the module docstring)."""
    if jax.default_backend() != "cpu":
        return "xla"
    pixels = lhs.shape[1] * lhs.shape[2]
    if (WINOGRAD_PIXELS[0] <= pixels <= WINOGRAD_PIXELS[1] and rhs.shape[:2] == (3, 3)
            and min(rhs.shape[2:]) >= WINOGRAD_MIN_CHANNELS and lhs.dtype == jnp.float32):
        return "winograd"
    return "im2col" if pixels <= IM2COL_MAX_PIXELS else "xla"


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, *, impl: str = "auto",
                         **kwargs):
    """Drop-in for ``lax.conv_general_dilated`` (as flax's ``nnx.Conv`` calls it) that picks the back end per shape."""
    if _supports_matmul_forms(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                              feature_group_count):
        choice = _auto_choice(lhs, rhs) if impl == "auto" else impl
        if choice == "im2col":
            return im2col_conv(lhs, rhs, window_strides, padding, precision=precision, **kwargs)
        if choice == "winograd" and rhs.shape[:2] == (3, 3) and kwargs.get("preferred_element_type") is None:
            return winograd_conv(lhs, rhs, window_strides, padding, precision=precision)
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


# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): every 2x2
# output tile is A^T [(G w G^T) * (B^T d B)] A for its 4x4 input tile d, so the 9 taps x 4 outputs = 36 multiplies
# per channel pair become 16 (2.25x fewer FLOPs), in 16 batched matmuls over all tiles. The transforms are sums and
# differences, written out as adds so that XLA fuses each one into a single pass.
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
_WINOGRAD_A = tuple(zip(*_WINOGRAD_AT))
# A flipped kernel transforms as G J w J G^T = P (G w G^T) P, with P this permutation of G's rows; so the input
# gradient (a convolution of the output gradient with the flipped kernel) reuses the forward's kernel transform,
# with P moved onto B^T's rows and A^T's columns.
_FLIP = (3, 1, 2, 0)
_WINOGRAD_BT_FLIPPED = tuple(_WINOGRAD_BT[i] for i in _FLIP)
_WINOGRAD_AT_FLIPPED = tuple(tuple(row[i] for i in _FLIP) for row in _WINOGRAD_AT)
_WINOGRAD_GG = np.kron(np.array(_WINOGRAD_G), np.array(_WINOGRAD_G))  # (16, 9): vec(G w G^T) = GG vec(w)
_TILE_BATCHED = (((2,), (1,)), ((0,), (0,)))  # (16, tiles, cin) x (16, cin, cout) -> (16, tiles, cout)


def _combine(matrix, parts):
    """[sum_j matrix[i][j] * parts[j] for every row i], unrolled (the transform matrices are small and sparse)."""
    return [functools.reduce(jnp.add, [p if c == 1 else -p if c == -1 else c * p
                                       for c, p in zip(row, parts) if c != 0]) for row in matrix]


def _tiles(height: int, width: int) -> tuple[int, int]:
    return -(-height // 2), -(-width // 2)


def _winograd_input(x, bt):
    """(N, H, W, C) -> (16, N*th*tw, C): B^T d B for every 4x4 tile d (stride 2) of the SAME-padded input; rows
    first, then columns, each on even/odd planes so that no strided slice is needed."""
    n, height, width, c = x.shape
    th, tw = _tiles(height, width)
    padded = jnp.pad(x, ((0, 0), (1, 2 * th - height + 1), (1, 2 * tw - width + 1), (0, 0)))
    planes = padded.reshape(n, th + 1, 2, 2 * tw + 2, c)
    rows = jnp.stack(_combine(bt, [planes[:, r // 2:r // 2 + th, r % 2] for r in range(4)]))
    rows = rows.reshape(4 * n * th, tw + 1, 2, c)
    tiles = jnp.stack(_combine(bt, [rows[:, s // 2:s // 2 + tw, s % 2] for s in range(4)]), axis=1)
    return tiles.reshape(4, n, th, 4, tw, c).transpose(0, 3, 1, 2, 4, 5).reshape(16, n * th * tw, c)


def _winograd_output(m, shape, at):
    """(16, N*th*tw, C) -> (N, H, W, C) of `shape`: A^T M A for every tile, written back in place."""
    n, height, width, c = shape
    th, tw = _tiles(height, width)
    m = m.reshape(4, 4, n, th, tw, c)
    rows = _combine(at, [m[r] for r in range(4)])  # 2 x (4, n, th, tw, c)
    tiles = [jnp.stack(_combine(at, [row[s] for s in range(4)]), axis=3) for row in rows]  # 2 x (n, th, tw, 2, c)
    return jnp.stack(tiles, axis=2).reshape(n, 2 * th, 2 * tw, c)[:, :height, :width]


def _winograd_output_transposed(g):
    """The transpose of ``_winograd_output`` (A g A^T per 2x2 tile): (N, H, W, C) -> (16, N*th*tw, C)."""
    n, height, width, c = g.shape
    th, tw = _tiles(height, width)
    g = jnp.pad(g, ((0, 0), (0, 2 * th - height), (0, 2 * tw - width), (0, 0))).reshape(n, th, 2, tw, 2, c)
    rows = _combine(_WINOGRAD_A, [g[:, :, p] for p in range(2)])  # 4 x (n, th, tw, 2, c)
    return jnp.stack([t for row in rows for t in _combine(_WINOGRAD_A, [row[..., q, :] for q in range(2)])]
                     ).reshape(16, n * th * tw, c)


def _winograd_kernel(w):
    """(3, 3, cin, cout) -> (16, cin, cout): G w G^T, as one small matmul."""
    return (jnp.asarray(_WINOGRAD_GG, w.dtype) @ w.reshape(9, -1)).reshape(16, *w.shape[2:])


def _winograd_kernel_transposed(u):
    """The transpose of ``_winograd_kernel``: (16, cin, cout) -> (3, 3, cin, cout)."""
    return (jnp.asarray(_WINOGRAD_GG.T, u.dtype) @ u.reshape(16, -1)).reshape(3, 3, *u.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _winograd(x, w, precision):
    return _winograd_forward(x, w, precision)[0]


def _winograd_forward(x, w, precision):
    u = _winograd_kernel(w)
    v = _winograd_input(x, _WINOGRAD_BT)
    m = jax.lax.dot_general(v, u, _TILE_BATCHED, precision=precision)
    return _winograd_output(m, x.shape[:3] + w.shape[3:], _WINOGRAD_AT), (v, u)


def _winograd_backward(precision, residuals, g):
    v, u = residuals
    # Input gradient: a SAME convolution of g with the flipped kernel, whose transform is P U P (channels swapped).
    m = jax.lax.dot_general(_winograd_input(g, _WINOGRAD_BT_FLIPPED), u, (((2,), (2,)), ((0,), (0,))),
                            precision=precision)
    dx = _winograd_output(m, g.shape[:3] + u.shape[1:2], _WINOGRAD_AT_FLIPPED)
    du = jax.lax.dot_general(v, _winograd_output_transposed(g), (((1,), (1,)), ((0,), (0,))), precision=precision)
    return dx, _winograd_kernel_transposed(du)


_winograd.defvjp(_winograd_forward, _winograd_backward)


def winograd_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` for NHWC x HWIO with a 3x3 kernel, stride 1, SAME padding, by Winograd's
    F(2x2, 3x3) with its own VJP (input gradient the same way, weight gradient in the transformed domain)."""
    if rhs.shape[:2] != (3, 3):
        raise ValueError(f"winograd_conv needs a 3x3 kernel, got {rhs.shape[:2]}.")
    return _winograd(lhs, rhs, precision)


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
