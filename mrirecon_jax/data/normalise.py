"""Intensity normalisation, in its two places.

* Clean slices (training targets, evaluation truth) are min-max normalised per slice to [0, 1] on the host, the
  thesis's protocol; metrics use data range 1 in that frame.
* A model input is normalised by :func:`normalise_input`, a pure array function that the jitted train and eval
  steps call on each corrupted slice and that ``reconstruct`` and ``detect`` call on a user's (already corrupted)
  slice: the model sees the same normalisation in training and in use. It maps each slice's robust percentiles
  (INPUT_PERCENTILES) to 0 and 1, so ringing overshoot, a bright patch, a spike or another scanner's units
  barely move it, and :func:`denormalise` maps the model's output back with the same affine (training maps its
  target by it too: the model predicts the clean slice in the frame of its own input).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INPUT_PERCENTILES = (1.0, 99.0)
_MIN_SCALE = 1e-6  # relative to the slice's full range: below this a slice counts as constant


def minmax_affine(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, span) per slice of (n, H, W[, C]) slices, shaped to broadcast against them (span 1 if constant)."""
    slices = np.asarray(slices, np.float32)
    axes = tuple(range(1, slices.ndim))
    low = slices.min(axis=axes, keepdims=True)
    span = slices.max(axis=axes, keepdims=True) - low
    return low, np.where(span > 0, span, 1.0).astype(np.float32)


def minmax(slices: np.ndarray) -> np.ndarray:
    """Per-slice min-max of (n, H, W[, C]) slices to [0, 1] float32; a constant slice becomes zeros."""
    low, span = minmax_affine(slices)
    return np.clip((np.asarray(slices, np.float32) - low) / span, 0.0, 1.0).astype(np.float32)


def input_affine(x):
    """(offset, scale) per slice of an NHWC batch, each (N, 1, 1, 1) float32: the INPUT_PERCENTILES values of the
    slice (falling back to its min and max range when those coincide; scale 1 for a constant slice)."""
    flat = jax.lax.stop_gradient(x).astype(jnp.float32).reshape(x.shape[0], -1)
    low, high = jnp.percentile(flat, jnp.asarray(INPUT_PERCENTILES), axis=1)
    full = jnp.max(flat, axis=1) - jnp.min(flat, axis=1)
    scale = high - low
    scale = jnp.where(scale > _MIN_SCALE * full, scale, jnp.where(full > 0, full, 1.0))
    low = jnp.where(high - low > _MIN_SCALE * full, low, jnp.min(flat, axis=1))
    return low.reshape(-1, 1, 1, 1), scale.reshape(-1, 1, 1, 1)


def normalise_input(x):
    """(normalised batch, offset, scale): the model input for an NHWC batch in any intensity units."""
    offset, scale = input_affine(x)
    return ((x.astype(jnp.float32) - offset) / scale).astype(x.dtype), offset, scale


def denormalise(y, offset, scale, nonnegative: bool = False):
    """The inverse of normalise_input's affine, applied to a model output; with `nonnegative`, clamped at zero in
    the input's units (MRI magnitudes are not negative, and an exact zero background is what a clean slice has)."""
    out = y.astype(jnp.float32) * scale + offset
    return jnp.maximum(out, 0.0) if nonnegative else out
