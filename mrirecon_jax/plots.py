"""Figures written into a workdir (matplotlib, no screen needed), each saved atomically."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np

from mrirecon_jax.corruptions import patch_box
from mrirecon_jax.workdir import write_atomically


def save_figure(fig, path) -> None:
    """Write a matplotlib figure to `path` (its format from the name) atomically, and close it."""
    try:
        write_atomically(path, lambda temp: fig.savefig(temp, dpi=100))
    finally:
        plt.close(fig)


def _image_grid(path, rows, titles, heat_column: int, row_labels=None, decorate=None) -> None:
    """A grid of grey images with one 'inferno' heat-map column; decorate(i, first_axis) draws on row i."""
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(2.5 * len(titles), 2.6 * len(rows)), squeeze=False)
    for i, images in enumerate(rows):
        for j, (ax, image) in enumerate(zip(axes[i], images)):
            if j == heat_column:
                shown = ax.imshow(image, cmap="inferno", vmin=0.0, vmax=max(float(np.max(image)), 1e-3))
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
            else:
                ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j])
        if decorate is not None:
            decorate(i, axes[i][0])
        if row_labels is not None:
            axes[i][0].set_ylabel(row_labels[i])
    fig.tight_layout()
    save_figure(fig, path)


def save_sample_grid(path, corrupted, reconstructed, clean, patch_masks, row_labels=None) -> None:
    """One row per slice: input (patch rectangle drawn), output, ground truth, |output - truth| heat map."""

    def draw_box(i, ax):
        if np.any(patch_masks[i] > 0):
            r0, r1, c0, c1 = np.asarray(patch_box(patch_masks[i]))
            ax.add_patch(matplotlib.patches.Rectangle(
                (c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="cyan", linewidth=1.2))

    rows = [(corrupted[i, ..., 0], reconstructed[i, ..., 0], clean[i, ..., 0],
             np.abs(reconstructed[i, ..., 0] - clean[i, ..., 0])) for i in range(len(clean))]
    _image_grid(path, rows, ("input", "reconstruction", "ground truth", "|difference|"), 3, row_labels, draw_box)


def save_detection_grid(path, inputs, reconstructions, anomaly_maps, truths, row_labels=None) -> None:
    """One row per case: input with the true anomaly outlined, reconstruction, anomaly map, ground truth."""

    def outline(i, ax):
        if np.any(truths[i] > 0):
            ax.contour(truths[i] > 0, levels=[0.5], colors="cyan", linewidths=0.8)

    rows = list(zip(inputs, reconstructions, anomaly_maps, truths))
    _image_grid(path, rows, ("input (truth outlined)", "reconstruction", "anomaly map", "ground truth"), 2,
                row_labels, outline)


# Training curves from a run's metrics.jsonl records (the thesis's per-epoch SSIM figures).

SSIM_CURVES = (("ssim_slice", "slices", "C0"), ("ssim_patch", "patches", "C1"))


def _save_ssim_curves(path, x, xlabel: str, records: list[dict]) -> None:
    """Model SSIM (solid) and corrupted-input SSIM (dashed) of slices and patches against `x`."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, label, colour in SSIM_CURVES:
        ax.plot(x, [r[name] for r in records], marker="o", markersize=3, color=colour, label=f"model, {label}")
        ax.plot(x, [r[f"input_{name}"] for r in records], linestyle="--", color=colour, label=f"input, {label}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation SSIM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_ssim_per_epoch(path, records: list[dict]) -> None:
    """Validation SSIM of slices and patches per epoch, beside the corrupted input's."""
    _save_ssim_curves(path, [r["epoch"] for r in records], "epoch", records)


def save_ssim_vs_time(path, records: list[dict]) -> None:
    """Validation SSIM of slices and patches against training wall-clock time (minutes)."""
    _save_ssim_curves(path, [r["wall_time_s"] / 60.0 for r in records], "training time (min)", records)


def save_ssim_change(path, records: list[dict]) -> None:
    """Change of validation SSIM (slices and patches) from each validation to the next: epoch over epoch-1."""
    epochs = np.array([r["epoch"] for r in records[1:]])
    fig, ax = plt.subplots(figsize=(6.4, 4))
    width = 0.4 * (float(np.min(np.diff([r["epoch"] for r in records]))) if len(records) > 1 else 1.0)
    for offset, (name, label, colour) in zip((-0.5, 0.5), SSIM_CURVES):
        change = np.diff([r[name] for r in records])
        ax.bar(epochs + offset * width, change, width=width, color=colour, label=label)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("SSIM change over the previous epoch")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_runs_vs_time(path, runs: list[tuple[str, list[dict]]], references: list[tuple[str, float, float]]) -> None:
    """Validation SSIM of several runs against training minutes: standard 2-D SSIM (left) and the thesis's own
    metric (right), slices solid and patches dashed; each reference (label, slice, patch) as dotted lines."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, prefix, title in zip(axes, ("", "thesis_"), ("standard 2-D SSIM", "thesis-compatible SSIM")):
        for index, (label, records) in enumerate(runs):
            minutes = [r["wall_time_s"] / 60.0 for r in records]
            for part, parts, style in (("slice", "slices", "-"), ("patch", "patches", "--")):
                values = [r.get(f"{prefix}ssim_{part}") for r in records]
                if any(v is not None for v in values):
                    ax.plot(minutes, values, style, marker="o", markersize=2.5, color=f"C{index}",
                            label=f"{label}, {parts}")
        if prefix:
            for index, (label, ssim_slice, ssim_patch) in enumerate(references):
                for value, part in ((ssim_slice, "slices"), (ssim_patch, "patches")):
                    ax.axhline(value, linestyle=":", color=f"C{len(runs) + index}", label=f"{label}, {part}")
        ax.set_title(title)
        ax.set_xlabel("training time (min)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation SSIM")
    fig.tight_layout()
    save_figure(fig, path)
