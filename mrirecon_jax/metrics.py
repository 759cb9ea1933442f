"""Evaluation metrics (never used as gradients): per-slice SSIM, PSNR and MSE over whole slices and patches.

Definitions are the standard ones, so numbers can be checked against scikit-image and fastMRI:
- SSIM follows ``skimage.metrics.structural_similarity(x, y, data_range=1)`` exactly: 7x7 uniform window,
  K1=0.01, K2=0.03, sample covariance, mean of the SSIM map over the pixels whose window fits in the image.
- "Patch" metrics are taken over the bounding rectangle of each slice's patch mask: the SSIM map averaged
  over the rectangle (each window centred in it, so thin patches still get a value), and PSNR / MSE over the
  rectangle's pixels.
- MSE is the mean of squared errors (the thesis's "MSE" is the square of the mean error: see REFERENCE.md);
  PSNR = 10 log10(1 / MSE) with data range 1.
All functions take NHWC batches with one channel and return one value per slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MIN_MSE = 1e-10  # caps PSNR at 100 dB for a perfect reconstruction

SLICE_METRICS = ("ssim_slice", "ssim_patch", "psnr_slice", "psnr_patch", "mse_slice", "mse_patch")


def _window_mean(x):
    window = (1, SSIM_WINDOW, SSIM_WINDOW, 1)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1, 1), "VALID") / SSIM_WINDOW ** 2


def ssim_map(pred, target, data_range: float = 1.0):
    """SSIM map (N, H-6, W-6, 1) as scikit-image computes it (uniform 7x7 window, sample covariance)."""
    x = pred.astype(jnp.float32)
    y = target.astype(jnp.float32)
    n = SSIM_WINDOW ** 2
    cov_norm = n / (n - 1.0)
    ux, uy = _window_mean(x), _window_mean(y)
    vx = cov_norm * (_window_mean(x * x) - ux * ux)
    vy = cov_norm * (_window_mean(y * y) - uy * uy)
    vxy = cov_norm * (_window_mean(x * y) - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim(pred, target, data_range: float = 1.0):
    """Per-slice SSIM (N,), equal to scikit-image's structural_similarity with the same data range."""
    return jnp.mean(ssim_map(pred, target, data_range), axis=(1, 2, 3))


def bounding_box_mask(mask):
    """(N, H, W, 1) float mask of the bounding rectangle of each slice's non-zero pixels (zeros if none)."""
    hit = mask[..., 0] > 0
    rows = jnp.any(hit, axis=2)
    cols = jnp.any(hit, axis=1)

    def span(line):  # True from the first to the last hit, inclusive
        return jax.lax.cummax(line, axis=1) & jax.lax.cummax(line, axis=1, reverse=True)

    box = span(rows.astype(jnp.int32)).astype(bool)[:, :, None] & span(cols.astype(jnp.int32)).astype(bool)[:, None, :]
    return box[..., None].astype(jnp.float32)


def _masked_mean(values, weights):
    total = jnp.sum(weights, axis=(1, 2, 3))
    return jnp.where(total > 0, jnp.sum(values * weights, axis=(1, 2, 3)) / jnp.maximum(total, 1.0), jnp.nan)


def psnr_from_mse(mse):
    """PSNR in dB for data range 1."""
    return -10.0 * jnp.log10(jnp.maximum(mse, MIN_MSE))


def slice_metrics(pred, target, patch_mask) -> dict:
    """Per-slice metrics (dict of (N,) arrays, keys SLICE_METRICS); patch values are NaN for slices without a patch."""
    pred = jnp.clip(pred.astype(jnp.float32), 0.0, 1.0)
    target = target.astype(jnp.float32)
    box = bounding_box_mask(patch_mask)
    sq_err = jnp.square(pred - target)
    mse_slice = jnp.mean(sq_err, axis=(1, 2, 3))
    mse_patch = _masked_mean(sq_err, box)
    smap = ssim_map(pred, target)
    pad = (SSIM_WINDOW - 1) // 2
    box_valid = box[:, pad:box.shape[1] - pad, pad:box.shape[2] - pad]
    return {
        "ssim_slice": jnp.mean(smap, axis=(1, 2, 3)),
        "ssim_patch": _masked_mean(smap, box_valid),
        "psnr_slice": psnr_from_mse(mse_slice),
        "psnr_patch": psnr_from_mse(mse_patch),
        "mse_slice": mse_slice,
        "mse_patch": mse_patch,
    }


# ---- anomaly-detection scores (issue 6) ----


# ---- thesis-compatible variants (issue 4) ----
