"""Differentiable training losses on NHWC batches in [0, 1]: SSIM (dm-pix), L1, MSE and their mix.

Every loss returns one scalar; lower is better. An optional weight map (N, H, W, 1), for example a brain mask,
restricts the pixel losses to where it is non-zero and weights the SSIM map the same way.
"""

from __future__ import annotations

from typing import Callable, Optional

import dm_pix as pix
import jax
import jax.numpy as jnp

from mrirecon_jax.config import UserError

FOREGROUND_LEVEL = 0.1  # of the slice's range: above it is head, below it the air around it
FOREGROUND_DILATION = 2  # pixels added around the thresholded head, closing small dark holes at its edge
SSIM_L1_ALPHA = 0.84  # Zhao et al. 2017, "Loss Functions for Image Restoration with Neural Networks".
UNIFORM_WINDOW = 7  # scikit-image's SSIM window, the one metrics.ssim scores with


def _weighted_mean(values, weights):
    if weights is None:
        return jnp.mean(values)
    weights = jnp.broadcast_to(weights, values.shape)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _uniform_window_mean(z):
    """Means over UNIFORM_WINDOW x UNIFORM_WINDOW windows of an NHWC batch ('valid')."""
    size = UNIFORM_WINDOW
    return jax.lax.reduce_window(z, 0.0, jax.lax.add, (1, size, size, 1), (1, 1, 1, 1), "VALID") / size ** 2


def foreground_mask(images):
    """(N, H, W, C) float {0, 1}: the head of each clean NHWC slice, its pixels above FOREGROUND_LEVEL of the
    slice's range, dilated by FOREGROUND_DILATION px; jittable, for a loss weighted towards the anatomy."""
    low = jnp.min(images, axis=(1, 2, 3), keepdims=True)
    high = jnp.max(images, axis=(1, 2, 3), keepdims=True)
    inside = (images > low + FOREGROUND_LEVEL * (high - low)).astype(jnp.float32)
    size = 2 * FOREGROUND_DILATION + 1
    return jax.lax.reduce_window(inside, 0.0, jax.lax.max, (1, size, size, 1), (1, 1, 1, 1), "SAME")


def ssim_loss(pred, target, weights: Optional[jnp.ndarray] = None, uniform_window: bool = False):
    """1 - SSIM, data range 1, with dm-pix's Gaussian window (11x11, sigma 1.5) or, with `uniform_window`, the
    uniform 7x7 window of scikit-image and of the SSIM metric."""
    filter_fn = _uniform_window_mean if uniform_window else None
    ssim_map = pix.ssim(pred, target, max_val=1.0, return_map=True, filter_fn=filter_fn)
    if weights is not None:  # the map is 'valid'-cropped: crop the weights the same way
        cut_h = (weights.shape[1] - ssim_map.shape[1]) // 2
        cut_w = (weights.shape[2] - ssim_map.shape[2]) // 2
        weights = weights[:, cut_h:cut_h + ssim_map.shape[1], cut_w:cut_w + ssim_map.shape[2]]
    return 1.0 - _weighted_mean(ssim_map, weights)


def l1_loss(pred, target, weights: Optional[jnp.ndarray] = None):
    """Mean absolute error."""
    return _weighted_mean(jnp.abs(pred - target), weights)


def mse_loss(pred, target, weights: Optional[jnp.ndarray] = None):
    """Mean squared error (the thesis's training loss)."""
    return _weighted_mean(jnp.square(pred - target), weights)


def ssim_l1_loss(pred, target, weights: Optional[jnp.ndarray] = None, alpha: float = SSIM_L1_ALPHA,
                 uniform_window: bool = False):
    """alpha * (1 - SSIM) + (1 - alpha) * L1, the mix of Zhao et al. 2017 (SSIM windowed as in ssim_loss)."""
    return (alpha * ssim_loss(pred, target, weights, uniform_window)
            + (1.0 - alpha) * l1_loss(pred, target, weights))


def ssim_uniform_loss(pred, target, weights: Optional[jnp.ndarray] = None):
    """1 - SSIM with the metric's uniform 7x7 window."""
    return ssim_loss(pred, target, weights, uniform_window=True)


def ssim_uniform_l1_loss(pred, target, weights: Optional[jnp.ndarray] = None):
    """The SSIM + L1 mix with the metric's uniform 7x7 window."""
    return ssim_l1_loss(pred, target, weights, uniform_window=True)


LOSSES: dict[str, Callable] = {
    "ssim": ssim_loss,
    "ssim7": ssim_uniform_loss,
    "l1": l1_loss,
    "mse": mse_loss,
    "ssim_l1": ssim_l1_loss,
    "ssim7_l1": ssim_uniform_l1_loss,
}


def get_loss(name: str) -> Callable:
    """The loss function registered under `name`."""
    if name not in LOSSES:
        raise UserError(f"Unknown loss {name!r}; choose one of {', '.join(LOSSES)}.")
    return LOSSES[name]
