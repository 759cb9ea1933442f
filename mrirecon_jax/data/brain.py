"""Brain masks of canonical T1 volumes, and skull stripping by a mask."""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import skimage.filters

# A volume whose border voxels are (almost) all one value is taken as already masked (skull-stripped).
MASKED_BORDER_FRACTION = 0.99
BRAIN_EROSION_MM = 9.0  # erosion that cuts the brain from scalp, eyes and neck in a skull-on T1


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = scipy.ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def masked_background(volume):
    """The one value that (almost) all border voxels hold in an already masked (skull-stripped) volume, else None."""
    volume = np.asarray(volume)
    border = np.concatenate([np.take(volume, i, a).ravel() for a in range(3) for i in (0, -1)])
    values, counts = np.unique(border, return_counts=True)
    return values[np.argmax(counts)] if counts.max() >= MASKED_BORDER_FRACTION * border.size else None


def brain_mask(volume, zooms) -> np.ndarray:
    """A boolean brain mask of a canonical T1 volume, by a heuristic (give a real mask when you have one).

    Already-masked (skull-stripped) volumes: the non-background region, holes filled. Skull on: the Otsu
    foreground, eroded by BRAIN_EROSION_MM to cut the brain from scalp, eyes and neck, its largest component
    dilated back inside the foreground, holes filled slice by slice and in 3-D. It can keep some dura, sinus and
    tentorium, lose dark CSF at the surface, and fail on strong bias fields or little background.
    """
    volume = np.asarray(volume, np.float32)
    background = masked_background(volume)
    if background is not None:
        return scipy.ndimage.binary_fill_holes(_largest_component(volume != background))
    smooth = scipy.ndimage.gaussian_filter(volume, sigma=[1.0 / z for z in zooms])
    foreground = smooth > skimage.filters.threshold_otsu(smooth)
    # Erosion and dilation by a ball of BRAIN_EROSION_MM, as Euclidean distances in mm (any voxel size).
    core = _largest_component(scipy.ndimage.distance_transform_edt(foreground, sampling=zooms) > BRAIN_EROSION_MM)
    mask = (scipy.ndimage.distance_transform_edt(~core, sampling=zooms) <= BRAIN_EROSION_MM) & foreground
    mask = np.stack([scipy.ndimage.binary_fill_holes(mask[..., k]) for k in range(mask.shape[2])], axis=2)
    return scipy.ndimage.binary_fill_holes(_largest_component(mask))


def skull_strip(volume, mask) -> np.ndarray:
    """The volume with everything outside the mask set to the darkest value inside it (so it normalises to 0)."""
    volume = np.asarray(volume, np.float32)
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros_like(volume)
    return np.where(mask, volume, volume[mask].min()).astype(np.float32)
