"""Differentiable training losses on NHWC batches in [0, 1]: SSIM (dm-pix), multi-scale SSIM, L1, MSE and mixes.

Every loss returns one scalar; lower is better. An optional weight map (N, H, W, 1), for example a brain mask,
restricts the pixel losses to where it is non-zero and weights the SSIM map the same way.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import dm_pix as pix
import jax
import jax.numpy as jnp
from flax import nnx

from mrirecon_jax.config import UserError

FOREGROUND_LEVEL = 0.1  # of the slice's range: above it is head, below it the air around it
FOREGROUND_DILATION = 2  # pixels added around the thresholded head, closing small dark holes at its edge
SSIM_L1_ALPHA = 0.84  # Zhao et al. 2017, "Loss Functions for Image Restoration with Neural Networks".
UNIFORM_WINDOW = 7  # scikit-image's SSIM window, the one metrics.ssim scores with
# Wang, Simoncelli & Bovik 2003, "Multi-scale structural similarity": the weights of their three finest scales,
# renormalised to sum to one (at 64 px a fourth scale would leave an 8 px image for a 7 px window).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)
_halve = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))  # between MS-SSIM's scales


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
    return 1.0 - _weighted_mean(ssim_map, _cropped_like(weights, ssim_map))


def _cropped_like(weights, ssim_map):
    """The weight map cropped centrally to a 'valid'-windowed map's size (None stays None)."""
    if weights is None:
        return None
    cut_h = (weights.shape[1] - ssim_map.shape[1]) // 2
    cut_w = (weights.shape[2] - ssim_map.shape[2]) // 2
    return weights[:, cut_h:cut_h + ssim_map.shape[1], cut_w:cut_w + ssim_map.shape[2]]


def _ssim_terms(pred, target, filter_fn):
    """(SSIM map, contrast-structure map) of two NHWC batches, data range 1, the statistics taken by `filter_fn`;
    the variances and covariance clipped as dm-pix clips them (dm-pix returns only the product)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_p, mu_t = filter_fn(pred), filter_fn(target)
    var_p = jnp.maximum(filter_fn(pred * pred) - mu_p * mu_p, 1e-12)
    var_t = jnp.maximum(filter_fn(target * target) - mu_t * mu_t, 1e-12)
    cov = filter_fn(pred * target) - mu_p * mu_t
    cov = jnp.sign(cov) * jnp.minimum(jnp.sqrt(var_p * var_t), jnp.abs(cov))
    contrast_structure = (2.0 * cov + c2) / (var_p + var_t + c2)
    luminance = (2.0 * mu_p * mu_t + c1) / (mu_p * mu_p + mu_t * mu_t + c1)
    return luminance * contrast_structure, contrast_structure


def _per_image_mean(ssim_map, weights):
    """(N,) means of a 'valid'-windowed NHWC map over each image, weighted by the (cropped) weight map."""
    if weights is None:
        return jnp.mean(ssim_map, axis=(1, 2, 3))
    weights = jnp.broadcast_to(_cropped_like(weights, ssim_map), ssim_map.shape)
    return jnp.sum(ssim_map * weights, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(weights, axis=(1, 2, 3)), 1e-6)


def ms_ssim_loss(pred, target, weights: Optional[jnp.ndarray] = None):
    """1 - multi-scale SSIM (Wang et al. 2003) over len(MS_SSIM_WEIGHTS) scales with the metric's uniform 7x7
    window: the contrast-structure term at each finer scale and the full SSIM at the coarsest, each image's means
    raised to the renormalised weights and multiplied; the weight map is averaged down with the images."""
    halvings = len(MS_SSIM_WEIGHTS) - 1
    if min(pred.shape[1:3]) >> halvings < UNIFORM_WINDOW:
        raise UserError(f"The multi-scale SSIM loss needs images of at least {UNIFORM_WINDOW << halvings} px; "
                        f"these are {pred.shape[1]} x {pred.shape[2]}.")
    exponents = jnp.asarray(MS_SSIM_WEIGHTS) / sum(MS_SSIM_WEIGHTS)
    score = 1.0
    for scale, exponent in enumerate(exponents):
        ssim_map, contrast_structure = _ssim_terms(pred, target, _uniform_window_mean)
        term = contrast_structure if scale < halvings else ssim_map
        # A negative mean (an output anticorrelated with the target) would make the power undefined: floor it.
        score = score * jnp.maximum(_per_image_mean(term, weights), 1e-6) ** exponent
        if scale < halvings:
            pred, target = _halve(pred), _halve(target)  # 2x2 average pooling, odd edges dropped
            weights = None if weights is None else _halve(weights)
    return 1.0 - jnp.mean(score)


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
    "ms_ssim7": ms_ssim_loss,
}


def get_loss(name: str) -> Callable:
    """The loss function registered under `name`."""
    if name not in LOSSES:
        raise UserError(f"Unknown loss {name!r}; choose one of {', '.join(LOSSES)}.")
    return LOSSES[name]


def checked_loss(name: str, image_size: int) -> Callable:
    """get_loss(name), traced once (no computation) on image_size slices, so that a loss that cannot score them
    says so before any data is read."""
    loss = get_loss(name)
    batch = jax.ShapeDtypeStruct((1, image_size, image_size, 1), jnp.float32)
    jax.eval_shape(loss, batch, batch)
    return loss
