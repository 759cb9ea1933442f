"""Figures written into a workdir (matplotlib, no screen needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np


def _box(mask: np.ndarray):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def save_sample_grid(path, corrupted, reconstructed, clean, patch_masks, row_labels=None) -> None:
    """One row per slice: input (patch rectangle drawn), output, ground truth, |output - truth| heat map."""
    n = len(clean)
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    titles = ("input", "reconstruction", "ground truth", "|difference|")
    for i in range(n):
        diff = np.abs(reconstructed[i, ..., 0] - clean[i, ..., 0])
        images = (corrupted[i, ..., 0], reconstructed[i, ..., 0], clean[i, ..., 0], diff)
        for j, (ax, image) in enumerate(zip(axes[i], images)):
            if j == 3:
                shown = ax.imshow(image, cmap="inferno", vmin=0.0, vmax=max(float(diff.max()), 1e-3))
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
            else:
                ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j])
        box = _box(patch_masks[i, ..., 0] > 0)
        if box is not None:
            r0, r1, c0, c1 = box
            axes[i][0].add_patch(matplotlib.patches.Rectangle(
                (c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="cyan", linewidth=1.2))
        if row_labels is not None:
            axes[i][0].set_ylabel(row_labels[i])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
