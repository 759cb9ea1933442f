"""Convolution and pooling back ends for the U-Net, chosen for speed on XLA's CPU path; their numerics equal XLA's
own (tests/test_conv.py). Why each exists, with the measurements: docs/cpu-performance.md.

- ``upconv_matmul``: the decoder's 2x2 stride-2 transposed convolutions as one matmul and a depth-to-space
  reshape (XLA runs them as a convolution over a zero-dilated input); used on every backend unless ``xla``.
- ``im2col_conv``: a 3x3 convolution as one matmul over the patch matrix, for the small grids where XLA's CPU
  convolution is slow.
- ``winograd_conv``: Winograd's F(2x2, 3x3) and F(4x4, 3x3) with their own VJP, for float32 convolutions with many
  channels on grids from 8x8.
- ``max_pool_2x2``: a maximum over a reshaped axis pair, whose gradient is elementwise (no index-tracking
  reduce-window and scatter).

``auto`` picks per shape on CPU (see ``_auto_choice``) and XLA's convolution on other backends.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ("auto", "xla", "im2col", "winograd", "winograd_f2")
WINOGRAD_TILES = {"winograd": 4, "winograd_f2": 2}  # F(4x4, 3x3) and the more accurate F(2x2, 3x3)
# auto on CPU: Winograd for float32 3x3 convolutions with at least 64 channels on one side and 128 on the other, on
# grids of at least 8x8 pixels (F(2x2, 3x3) below 16x16, F(4x4, 3x3) from there); else im2col on grids of at most
# 8x8; else XLA's (Eigen) convolution.
WINOGRAD_MIN_PIXELS = {"winograd_f2": 64, "winograd": 256}
WINOGRAD_MIN_CHANNELS = (64, 128)
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
    channels = sorted(rhs.shape[2:])
    if (pixels >= WINOGRAD_MIN_PIXELS["winograd_f2"] and rhs.shape[:2] == (3, 3) and lhs.dtype == jnp.float32
            and all(have >= need for have, need in zip(channels, WINOGRAD_MIN_CHANNELS))):
        return "winograd" if pixels >= WINOGRAD_MIN_PIXELS["winograd"] else "winograd_f2"
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
        if choice in WINOGRAD_TILES and rhs.shape[:2] == (3, 3) and kwargs.get("preferred_element_type") is None:
            return winograd_conv(lhs, rhs, window_strides, padding, precision=precision, tile=WINOGRAD_TILES[choice])
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


# Winograd's F(m x m, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): every m x m
# output tile is A^T [(G w G^T) * (B^T d B)] A for its (m+2) x (m+2) input tile d, so the 9 taps x m^2 outputs per
# channel pair take (m+2)^2 multiplies (F(2x2): 16 for 36, F(4x4): 36 for 144), in (m+2)^2 batched matmuls over all
# tiles. The transforms are small sums with constant weights, written out as adds so that XLA fuses each stage into
# a single pass. F(4x4)'s larger weights cost accuracy: ~1e-5 of the output scale in float32 against F(2x2)'s ~1e-6.
@dataclasses.dataclass(frozen=True)
class WinogradTransform:
    """The matrices of F(m x m, 3x3): input transform B^T ((m+2) x (m+2)), kernel transform G ((m+2) x 3) and
    output transform A^T (m x (m+2)), as nested tuples."""

    bt: tuple
    g: tuple
    at: tuple

    @property
    def tile(self) -> int:
        """m, the side of an output tile."""
        return len(self.at)


def _transposed(matrix: tuple) -> tuple:
    return tuple(zip(*matrix))


WINOGRAD_TRANSFORMS = {
    2: WinogradTransform(bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
                         g=((1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1)),
                         at=((1, 1, 1, 0), (0, 1, -1, -1))),
    4: WinogradTransform(bt=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
                             (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
                         g=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
                            (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
                         at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}


def _combine(matrix, parts):
    """[sum_j matrix[i][j] * parts[j] for every row i], unrolled (the transform matrices are small and sparse)."""
    return [functools.reduce(jnp.add, [p if c == 1 else -p if c == -1 else c * p
                                       for c, p in zip(row, parts) if c != 0]) for row in matrix]


def _tiles(height: int, width: int, m: int) -> tuple[int, int]:
    return -(-height // m), -(-width // m)


def _winograd_input(x, transform: WinogradTransform):
    """(N, H, W, C) -> ((m+2)^2, N*th*tw, C): B^T d B for every (m+2) x (m+2) tile d (stride m) of the SAME-padded
    input; rows first, then columns, each on planes of every m-th row or column so that no strided slice is needed."""
    n, height, width, c = x.shape
    m, t = transform.tile, transform.tile + 2
    th, tw = _tiles(height, width, m)
    padded = jnp.pad(x, ((0, 0), (1, m * th - height + m - 1), (1, m * tw - width + m - 1), (0, 0)))
    planes = padded.reshape(n, th + 1, m, m * tw + m, c)
    rows = jnp.stack(_combine(transform.bt, [planes[:, r // m:r // m + th, r % m] for r in range(t)]))
    rows = rows.reshape(t * n * th, tw + 1, m, c)
    tiles = jnp.stack(_combine(transform.bt, [rows[:, s // m:s // m + tw, s % m] for s in range(t)]), axis=1)
    return tiles.reshape(t, n, th, t, tw, c).transpose(0, 3, 1, 2, 4, 5).reshape(t * t, n * th * tw, c)


def _overlap_add(parts, m: int, axis: int):
    """The transpose of taking m+2 tiles at stride m along `axis`: parts[r] (tile i at position i on `axis`) is
    added to plane r % m at position i + r // m; returns the planes stacked after `axis` (count + 1 positions)."""
    def shifted(part, before):
        widths = [(0, 0)] * part.ndim
        widths[axis] = (before, 1 - before)
        return jnp.pad(part, widths)
    planes = [shifted(parts[q], 0) + shifted(parts[q + m], 1) if q + m < len(parts) else shifted(parts[q], 0)
              for q in range(m)]
    return jnp.stack(planes, axis=axis + 1)


def _winograd_input_transposed(v, shape, transform: WinogradTransform):
    """The transpose of ``_winograd_input``: ((m+2)^2, N*th*tw, C) -> (N, H, W, C) of `shape`, B v B^T per tile,
    overlapping tiles summed."""
    n, height, width, c = shape
    m, t = transform.tile, transform.tile + 2
    th, tw = _tiles(height, width, m)
    b = _transposed(transform.bt)
    v = v.reshape(t, t, n * th, tw, c)
    cols = _overlap_add(_combine(b, [v[:, s] for s in range(t)]), m, axis=2)  # (t, n*th, tw+1, m, c)
    cols = cols.reshape(t, n, th, m * tw + m, c)
    rows = _overlap_add(_combine(b, [cols[r] for r in range(t)]), m, axis=1)  # (n, th+1, m, W, c)
    return rows.reshape(n, m * th + m, m * tw + m, c)[:, 1:1 + height, 1:1 + width]


def _winograd_output(product, shape, transform: WinogradTransform):
    """((m+2)^2, N*th*tw, C) -> (N, H, W, C) of `shape`: A^T M A for every tile, written back in place."""
    n, height, width, c = shape
    m, t = transform.tile, transform.tile + 2
    th, tw = _tiles(height, width, m)
    product = product.reshape(t, t, n, th, tw, c)
    rows = _combine(transform.at, [product[r] for r in range(t)])  # m x (t, n, th, tw, c)
    tiles = [jnp.stack(_combine(transform.at, [row[s] for s in range(t)]), axis=3) for row in rows]
    return jnp.stack(tiles, axis=2).reshape(n, m * th, m * tw, c)[:, :height, :width]


def _winograd_output_transposed(g, transform: WinogradTransform):
    """The transpose of ``_winograd_output`` (A g A^T per m x m tile): (N, H, W, C) -> ((m+2)^2, N*th*tw, C)."""
    n, height, width, c = g.shape
    m, t = transform.tile, transform.tile + 2
    th, tw = _tiles(height, width, m)
    a = _transposed(transform.at)
    g = jnp.pad(g, ((0, 0), (0, m * th - height), (0, m * tw - width), (0, 0))).reshape(n, th, m, tw, m, c)
    rows = _combine(a, [g[:, :, p] for p in range(m)])  # t x (n, th, tw, m, c)
    return jnp.stack([x for row in rows for x in _combine(a, [row[..., q, :] for q in range(m)])]
                     ).reshape(t * t, n * th * tw, c)


def _kron_g(transform: WinogradTransform):
    """kron(G, G), ((m+2)^2, 9): vec(G w G^T) = kron(G, G) vec(w), in float32 (G's 1/6 is not a bfloat16)."""
    return jnp.asarray(np.kron(np.array(transform.g), np.array(transform.g)), jnp.float32)


def _winograd_kernel(w, transform: WinogradTransform):
    """(3, 3, cin, cout) -> ((m+2)^2, cin, cout): G w G^T, as one small matmul."""
    gg = _kron_g(transform)
    return (gg @ w.reshape(9, -1).astype(jnp.float32)).astype(w.dtype).reshape(gg.shape[0], *w.shape[2:])


def _winograd_kernel_transposed(u, transform: WinogradTransform):
    """The transpose of ``_winograd_kernel``: ((m+2)^2, cin, cout) -> (3, 3, cin, cout)."""
    gg = _kron_g(transform)
    return (gg.T @ u.reshape(gg.shape[0], -1).astype(jnp.float32)).astype(u.dtype).reshape(3, 3, *u.shape[1:])


_TILE_BATCHED = (((2,), (1,)), ((0,), (0,)))  # (t^2, tiles, cin) x (t^2, cin, cout) -> (t^2, tiles, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd(x, w, tile, precision):
    return _winograd_forward(x, w, tile, precision)[0]


def _winograd_forward(x, w, tile, precision):
    transform = WINOGRAD_TRANSFORMS[tile]
    u = _winograd_kernel(w, transform)
    v = _winograd_input(x, transform)
    product = jax.lax.dot_general(v, u, _TILE_BATCHED, precision=precision)
    return _winograd_output(product, x.shape[:3] + w.shape[3:], transform), (v, u)


def _winograd_backward(tile, precision, residuals, g):
    """Both gradients from the transformed output gradient A g A^T: the input gradient is the transpose of the
    forward (the forward's U, then the transposed input transform, overlapping tiles summed), the weight gradient
    a tile-contracting matmul with the saved input transform V."""
    v, u = residuals
    transform = WINOGRAD_TRANSFORMS[tile]
    g_tiles = _winograd_output_transposed(g, transform)
    dv = jax.lax.dot_general(g_tiles, u, (((2,), (2,)), ((0,), (0,))), precision=precision)
    dx = _winograd_input_transposed(dv, g.shape[:3] + u.shape[1:2], transform)
    du = jax.lax.dot_general(v, g_tiles, (((1,), (1,)), ((0,), (0,))), precision=precision)
    return dx, _winograd_kernel_transposed(du, transform)


_winograd.defvjp(_winograd_forward, _winograd_backward)


def winograd_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, precision=None, *, tile: int = 4, **kwargs):
    """``lax.conv_general_dilated`` for NHWC x HWIO with a 3x3 kernel, stride 1, SAME padding, by Winograd's
    F(tile x tile, 3x3) (tile 2 or 4) with its own VJP: both gradients from the transformed output gradient."""
    if rhs.shape[:2] != (3, 3):
        raise ValueError(f"winograd_conv needs a 3x3 kernel, got {rhs.shape[:2]}.")
    if tile not in WINOGRAD_TRANSFORMS:
        raise ValueError(f"winograd_conv has tiles {sorted(WINOGRAD_TRANSFORMS)}, got {tile}.")
    return _winograd(lhs, rhs, tile, precision)


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
    is laid out as (cin, kh*kw*cout) first so that the product is a plain 2-D matmul."""
    n, height, width, cin = x.shape
    kh, kw, _, cout = kernel.shape
    matrix = jnp.flip(kernel, (0, 1)).transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)
    y = (x.reshape(-1, cin) @ matrix).reshape(n, height, width, kh, kw, cout)
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, height * kh, width * kw, cout)
