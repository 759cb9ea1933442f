"""The U-Net (Ronneberger et al. 2015) in Flax NNX, with the thesis's network as a preset.

Each level is two 3x3 convolutions with ReLU; the encoder halves the grid with 2x2 max pooling, the decoder
doubles it with a 2x2 transposed convolution ("up-conv") and concatenates the skip connection. The head is a
1x1 convolution to one channel followed by the output activation. With ``residual=True`` the head predicts a
correction that is added to the input before the activation, so an untrained network starts near identity.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mrirecon_jax.config import UserError
from mrirecon_jax.models.conv import CONV_IMPLS, conv_function, max_pool_2x2, upconv_matmul


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """Architecture of one preset: channels per level (shallow to deep), output activation, residual head."""

    features: tuple[int, ...]
    output_activation: str = "relu"
    residual: bool = False
    norm: str = "none"  # a name in NORMS: what follows each convolution before its ReLU
    # > 1: the U-Net runs on blocks of pixel_shuffle x pixel_shuffle pixels stacked as channels (space-to-depth) and
    # its head predicts each block's pixels (depth-to-space, Shi et al. 2016's pixel shuffle): no full-size level.
    pixel_shuffle: int = 1
    # 1: the outermost level's blocks (the first encoder and the last decoder block) have one convolution, not two.
    outer_convs: int = 2


PRESETS: dict[str, UNetSpec] = {
    # A few thousand parameters: for unit tests.
    "tiny": UNetSpec(features=(4, 8, 16), output_activation="linear", residual=True),
    # About 0.47 M parameters: trains usefully on a 2-core CPU in minutes.
    "small": UNetSpec(features=(16, 32, 64, 128), output_activation="linear", residual=True),
    # Wider (about 1.9 M parameters) and deeper (five levels, about 1.9 M) variants of small.
    "medium": UNetSpec(features=(32, 64, 128, 256), output_activation="linear", residual=True),
    "small_deep": UNetSpec(features=(16, 32, 64, 128, 256), output_activation="linear", residual=True),
    # small with one convolution per full-size block, where 16-channel convolutions use the cores worst.
    "small_lite": UNetSpec(features=(16, 32, 64, 128), output_activation="linear", residual=True, outer_convs=1),
    # small without its full-size level: the other three on 2 x 2 pixel blocks; and the same 1.5 times as wide.
    "small_shuffle": UNetSpec(features=(32, 64, 128), output_activation="linear", residual=True, pixel_shuffle=2),
    "small_shuffle_wide": UNetSpec(features=(48, 96, 192), output_activation="linear", residual=True,
                                   pixel_shuffle=2),
    # The thesis's network: 64-128-256-512-1024, about 31 M parameters, ReLU output (REFERENCE.md).
    "thesis": UNetSpec(features=(64, 128, 256, 512, 1024), output_activation="relu", residual=False),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # compute dtypes
NORMS = ("none", "group")  # group: GroupNorm with up to 8 groups
OUTPUT_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "clip": lambda y: jnp.clip(y, 0.0, 1.0),
    "linear": lambda y: y,
}


def resolve_spec(preset: str, output_activation: Optional[str] = None, norm: Optional[str] = None) -> UNetSpec:
    """The spec of a named preset, optionally with another output activation or normalisation."""
    if preset not in PRESETS:
        raise UserError(f"Unknown --model={preset!r}; choose one of {', '.join(PRESETS)}.")
    spec = PRESETS[preset]
    if output_activation is not None:
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise UserError(f"Unknown --output_activation={output_activation!r}; choose one of "
                            f"{', '.join(OUTPUT_ACTIVATIONS)}.")
        spec = dataclasses.replace(spec, output_activation=output_activation)
    if norm is not None:
        if norm not in NORMS:
            raise UserError(f"Unknown --norm={norm!r}; choose one of {', '.join(NORMS)}.")
        spec = dataclasses.replace(spec, norm=norm)
    return spec


def min_image_size(spec: UNetSpec) -> int:
    """Image sides must be multiples of this (one halving per pooling step, and the pixel blocks)."""
    return 2 ** (len(spec.features) - 1) * spec.pixel_shuffle


def checked_spec(preset: str, output_activation: Optional[str], norm: Optional[str], image_size: int, dtype: str,
                 conv_impl: str) -> UNetSpec:
    """The spec of a preset, after checking that the image size, dtype and back end suit it (UserError if not)."""
    spec = resolve_spec(preset, output_activation, norm)
    if image_size % min_image_size(spec):
        blocks = f" of {spec.pixel_shuffle} x {spec.pixel_shuffle} pixel blocks" if spec.pixel_shuffle > 1 else ""
        raise UserError(f"--image_size={image_size} must be a multiple of {min_image_size(spec)} for the {preset!r} "
                        f"U-Net ({len(spec.features) - 1} poolings{blocks}).")
    if dtype not in DTYPES:
        raise UserError(f"Unknown --dtype={dtype!r}; choose one of {', '.join(DTYPES)}.")
    if conv_impl not in CONV_IMPLS:
        raise UserError(f"Unknown --conv_impl={conv_impl!r}; choose one of {', '.join(CONV_IMPLS)}.")
    return spec


def _norm_layer(norm: str, features: int, dtype, rngs: nnx.Rngs):
    if norm == "group":
        return nnx.GroupNorm(features, num_groups=min(8, features), dtype=dtype, rngs=rngs)
    return lambda x: x


class ConvBlock(nnx.Module):
    """Two 3x3 convolutions (or one, with ``convs=1``), each followed by the spec's normalisation and ReLU."""

    def __init__(self, in_features: int, out_features: int, *, dtype, conv, norm: str = "none", convs: int = 2,
                 rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_features, out_features, (3, 3), dtype=dtype, conv_general_dilated=conv, rngs=rngs)
        self.norm1 = _norm_layer(norm, out_features, dtype, rngs)
        second = convs == 2
        self.conv2 = nnx.Conv(out_features, out_features, (3, 3), dtype=dtype, conv_general_dilated=conv,
                              rngs=rngs) if second else None
        self.norm2 = _norm_layer(norm, out_features, dtype, rngs) if second else None

    def __call__(self, x):
        x = nnx.relu(self.norm1(self.conv1(x)))
        return x if self.conv2 is None else nnx.relu(self.norm2(self.conv2(x)))


class UpConv(nnx.ConvTranspose):
    """The decoder's 2x2 stride-2 transposed convolution, computed as a matmul plus depth-to-space
    (models.conv.upconv_matmul) unless ``matmul=False``; same parameters as ``nnx.ConvTranspose``."""

    def __init__(self, in_features: int, out_features: int, *, matmul: bool = True, **kwargs):
        super().__init__(in_features, out_features, (2, 2), strides=(2, 2), **kwargs)
        self.matmul = matmul

    def __call__(self, x):
        if not self.matmul:
            return super().__call__(x)
        x, kernel, bias = self.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return upconv_matmul(x, kernel) + bias


def _xla_max_pool(x):
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class UNet(nnx.Module):
    """U-Net mapping (N, H, W, C) images to (N, H, W, 1) reconstructions."""

    def __init__(self, spec: UNetSpec, *, in_features: int = 1, dtype=jnp.float32, conv_impl: str = "auto",
                 rngs: nnx.Rngs):
        """`conv_impl` picks the convolution back end (models.conv.CONV_IMPLS): auto, xla, im2col, winograd or
        winograd_f2; ``xla`` also keeps flax's own transposed convolutions and max pooling."""
        self.spec = spec
        feats = spec.features
        conv = conv_function(conv_impl)
        block = functools.partial(ConvBlock, dtype=dtype, conv=conv, norm=spec.norm, rngs=rngs)
        blocks_in = in_features * spec.pixel_shuffle ** 2
        convs = lambda level: spec.outer_convs if level == 0 else 2  # noqa: E731 (level 0: the outermost)
        levels = range(len(feats) - 1)
        self.down = nnx.List([block(c_in, feats[level], convs=convs(level))
                              for level, c_in in zip(levels, (blocks_in,) + feats[:-2])])
        self.bottleneck = block(feats[-2], feats[-1])
        self.up = nnx.List([UpConv(c_deep, c, matmul=conv_impl != "xla", dtype=dtype, rngs=rngs)
                            for c_deep, c in zip(feats[:0:-1], feats[-2::-1])])
        self.up_blocks = nnx.List([block(2 * feats[level], feats[level], convs=convs(level))
                                   for level in reversed(levels)])
        self.head = nnx.Conv(feats[0], spec.pixel_shuffle ** 2, (1, 1), dtype=dtype, rngs=rngs)
        self.pool = _xla_max_pool if conv_impl == "xla" else max_pool_2x2

    def __call__(self, x):
        inputs = x
        if self.spec.pixel_shuffle > 1:
            x = space_to_depth(x, self.spec.pixel_shuffle)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.up_blocks, reversed(skips)):
            x = block(jnp.concatenate([nnx.relu(up(x)), skip], axis=-1))
        y = self.head(x).astype(jnp.float32)
        if self.spec.pixel_shuffle > 1:
            y = depth_to_space(y, self.spec.pixel_shuffle)
        if self.spec.residual:
            y = y + inputs[..., :1].astype(jnp.float32)
        return OUTPUT_ACTIVATIONS[self.spec.output_activation](y)


def space_to_depth(x, block: int):
    """(N, H, W, C) -> (N, H/block, W/block, block*block*C): each block x block patch of pixels as channels."""
    n, height, width, c = x.shape
    x = x.reshape(n, height // block, block, width // block, block, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, height // block, width // block, block * block * c)


def depth_to_space(x, block: int):
    """The inverse of :func:`space_to_depth`."""
    n, height, width, channels = x.shape
    c = channels // (block * block)
    x = x.reshape(n, height, width, block, block, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, height * block, width * block, c)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
