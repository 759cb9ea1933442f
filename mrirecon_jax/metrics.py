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
import numpy as np
from skimage.metrics import structural_similarity

from mrirecon_jax.corruptions import patch_box

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
    """(N, H, W, 1) float mask of the bounding rectangle (corruptions.patch_box) of each slice's non-zero pixels."""
    boxes = jax.vmap(patch_box)(mask)
    rows, cols = jnp.arange(mask.shape[1]), jnp.arange(mask.shape[2])
    in_rows = (rows[None] >= boxes[:, :1]) & (rows[None] < boxes[:, 1:2])
    in_cols = (cols[None] >= boxes[:, 2:3]) & (cols[None] < boxes[:, 3:4])
    return (in_rows[:, :, None] & in_cols[:, None, :])[..., None].astype(jnp.float32)


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
# Pixel-level scores pooled over every pixel given (in practice all brain-mask pixels of all slices), as in the
# unsupervised anomaly-detection literature (Baur et al. 2021; Kascenas et al. 2022): a higher score means more
# anomalous, a pixel is called anomalous when its score is >= a threshold. Host-side numpy, float64.

DETECTION_SCORES = ("auroc", "auprc", "best_dice", "best_threshold")


def _sorted_pixels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in size.")
    order = np.argsort(scores, kind="stable")
    return scores[order], labels[order]


def auroc(scores, labels) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U, tied scores share their mean rank); NaN without both
    classes."""
    ordered, positive = _sorted_pixels(scores, labels)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    mean_rank = (np.searchsorted(ordered, ordered, "left") + np.searchsorted(ordered, ordered, "right") + 1) / 2
    return float((mean_rank[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _threshold_counts(scores, labels):
    """For every distinct score t (ascending): t, the pixels scoring >= t, the positives among them, all positives."""
    ordered, positive = _sorted_pixels(scores, labels)
    thresholds, first = np.unique(ordered, return_index=True)
    positives_below = np.concatenate([[0], np.cumsum(positive)])[first]
    n_pos = int(positive.sum())
    return thresholds, ordered.size - first, n_pos - positives_below, n_pos


def average_precision(scores, labels) -> float:
    """AUPRC as average precision: sum over thresholds of precision x recall gained (scikit-learn's definition)."""
    _, predicted, true_pos, n_pos = _threshold_counts(scores, labels)
    if n_pos == 0:
        return float("nan")
    recall = true_pos / n_pos  # falls as the threshold rises
    recall_gained = recall - np.append(recall[1:], 0.0)
    return float(np.sum(recall_gained * true_pos / predicted))


def best_dice(scores, labels) -> tuple[float, float]:
    """The best Dice of (score >= t) against the labels over all thresholds t, and that t; NaN without positives."""
    thresholds, predicted, true_pos, n_pos = _threshold_counts(scores, labels)
    if n_pos == 0:
        return float("nan"), float("nan")
    dice = 2 * true_pos / (predicted + n_pos)
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])


def dice_at(scores, labels, threshold: float) -> float:
    """Dice of (score >= threshold) against the labels; NaN when both are empty."""
    predicted = np.asarray(scores).ravel() >= threshold
    truth = np.asarray(labels).ravel() > 0
    total = predicted.sum() + truth.sum()
    return float(2 * np.sum(predicted & truth) / total) if total else float("nan")


def healthy_threshold(scores, fraction: float = 0.01) -> float:
    """The threshold t that flags (score >= t) about `fraction` of healthy pixels' `scores`: calibrated without
    any lesion, so the Dice at it is what a user gets (the best-Dice threshold peeks at the truth)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), not {fraction!r}.")
    return float(np.quantile(np.asarray(scores, np.float64).ravel(), 1.0 - fraction, method="higher"))


def detection_scores(scores, labels) -> dict:
    """AUROC, AUPRC (average precision), best Dice and its threshold, and the pixel counts, as a dict."""
    dice, threshold = best_dice(scores, labels)
    return {"auroc": auroc(scores, labels), "auprc": average_precision(scores, labels), "best_dice": dice,
            "best_threshold": threshold, "n_pixels": int(np.size(scores)),
            "n_positive": int(np.sum(np.asarray(labels) > 0))}


# ---- thesis-compatible variants (issue 4) ----


def _thesis_pair(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """Listing 4.3 of the thesis on two arrays, flattened to 1-D: (SSIM, PSNR, "MSE").

    SSIM is scikit-image's on the 1-D vectors with the prediction's data range (NaN where a vector is shorter
    than the 7-sample window or the prediction is constant); PSNR is 10 log10(1 / mean squared error), what
    OpenCV's ``cv2.PSNR(a, b, 1)`` computes; "MSE" is the square of the mean error.
    """
    i1, i2 = truth.reshape(-1), pred.reshape(-1)
    data_range = float(i2.max() - i2.min())
    usable = i1.size >= SSIM_WINDOW and data_range > 0
    ssim_value = structural_similarity(i1, i2, data_range=data_range) if usable else np.nan
    true_mse = float(np.mean(np.square(i1.astype(np.float64) - i2)))
    psnr_value = 10.0 * np.log10(1.0 / max(true_mse, MIN_MSE))
    return float(ssim_value), psnr_value, float(np.square(np.subtract(i1, i2).mean()))


def thesis_metrics(pred, target, patch_mask) -> dict:
    """The thesis's own definitions (listing 4.3) per slice: dict of (N,) numpy arrays, keys SLICE_METRICS.

    Host-side, for reports. Slice values use the whole slice, patch values the bounding rectangle of the patch
    mask (NaN without a patch), both flattened; the prediction is used as given (not clipped), as the thesis
    did. These are not the standard quantities (see REFERENCE.md): report them beside :func:`slice_metrics`,
    never select a model on them.
    """
    pred = np.asarray(pred, np.float32)
    target = np.asarray(target, np.float32)
    boxes = np.asarray(bounding_box_mask(jnp.asarray(patch_mask))) > 0
    out = {name: np.full(len(pred), np.nan) for name in SLICE_METRICS}
    for i in range(len(pred)):
        out["ssim_slice"][i], out["psnr_slice"][i], out["mse_slice"][i] = _thesis_pair(target[i], pred[i])
        if boxes[i].any():
            out["ssim_patch"][i], out["psnr_patch"][i], out["mse_patch"][i] = _thesis_pair(
                target[i][boxes[i]], pred[i][boxes[i]])
    return out
