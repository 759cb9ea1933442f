"""Slicing and its geometry: plane, central slab, display orientation, square field of view, resizing to the
model's grid, and the affine that puts model-grid slices back into scanner space.

* Volumes are canonical RAS (``volumes.load_volume``): array axis 0 runs towards the patient's Right, axis 1
  towards Anterior, axis 2 towards Superior. A plane fixes one axis: sagittal = 0, coronal = 1, axial = 2.
* Each slice is shown the radiological way (``to_display``): axial has anterior up, sagittal and coronal have
  superior up; axial and coronal have the patient's right on the image's left, sagittal has anterior on the
  left. For every plane this is ``slice[::-1, ::-1].T`` of the two remaining axes, an involution.
* A slice is padded symmetrically with its minimum so its field of view is square in millimetres, then resized to
  ``image_size x image_size`` (bilinear, anti-aliased), so anisotropic voxels keep the anatomy's true aspect
  ratio. A slice that is already ``image_size x image_size`` passes through untouched (a scan written on the
  model's grid keeps every pixel, whatever its voxel size).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import skimage.transform

from mrirecon_jax.config import UserError

PLANE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def plane_axis(plane: str) -> int:
    """The canonical array axis that a plane's slices are taken along."""
    if plane not in PLANE_AXES:
        raise UserError(f"Unknown plane {plane!r}; choose one of {', '.join(PLANE_AXES)}.")
    return PLANE_AXES[plane]


def slab_indices(n: int, spacing_mm: float, slices: Optional[int], slab_mm: Optional[float]) -> np.ndarray:
    """Indices of the central contiguous slab of `slices` slices or of about `slab_mm` mm, clipped to n."""
    count = int(slices) if slices is not None else max(1, round(slab_mm / spacing_mm))
    count = min(count, n)
    start = (n - count) // 2
    return np.arange(start, start + count)


def to_display(slices: np.ndarray) -> np.ndarray:
    """(n, a, b) slices in RAS axis order -> radiological display orientation (n, b, a); an involution."""
    return slices[:, ::-1, ::-1].transpose(0, 2, 1)


def pad_to_square_fov(slices: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Pads (n, rows, cols) symmetrically with each slice's minimum so rows*row_mm ~= cols*col_mm."""
    n, rows, cols = slices.shape
    height_mm, width_mm = rows * row_mm, cols * col_mm
    extra_rows = round((width_mm - height_mm) / row_mm) if width_mm > height_mm else 0
    extra_cols = round((height_mm - width_mm) / col_mm) if height_mm > width_mm else 0
    if extra_rows == 0 and extra_cols == 0:
        return slices
    padded = np.empty((n, rows + extra_rows, cols + extra_cols), np.float32)
    padded[...] = slices.min(axis=(1, 2))[:, None, None]
    top, left = extra_rows // 2, extra_cols // 2
    padded[:, top:top + rows, left:left + cols] = slices
    return padded


@dataclasses.dataclass(frozen=True, eq=False)
class SliceGeometry:
    """Where the model-grid slices of a canonical volume came from."""

    plane: str
    volume_shape: tuple[int, int, int]  # shape of the canonical (RAS) volume that was sliced
    indices: np.ndarray  # (n,) contiguous slice indices along the plane's axis
    padded_shape: tuple[int, int]  # (rows, cols) of a display slice after square-FOV padding, before resizing
    pad_before: tuple[int, int]  # rows added above and columns added on the left of each display slice
    image_size: int


def volume_slices(volume, zooms, plane: str, image_size: int, indices=None) -> tuple[np.ndarray, SliceGeometry]:
    """Slices of a canonical volume on the model's grid, (n, image_size, image_size) float32 in the volume's own
    intensity units, and their geometry. `indices` are contiguous slice indices along the plane's axis (default:
    every slice)."""
    axis = plane_axis(plane)
    volume = np.asarray(volume, np.float32)
    indices = np.arange(volume.shape[axis]) if indices is None else np.asarray(indices)
    if indices.size == 0 or np.any(np.diff(indices) != 1):
        raise ValueError("volume_slices needs a non-empty run of contiguous slice indices.")
    first, second = (a for a in range(3) if a != axis)
    stack = to_display(np.moveaxis(np.take(volume, indices, axis=axis), axis, 0))
    if stack.shape[1:] == (image_size, image_size):
        padded = stack
    else:
        padded = pad_to_square_fov(stack, row_mm=float(zooms[second]), col_mm=float(zooms[first]))
    # pad_to_square_fov puts half the padding (rounded down) before the slice.
    pad_before = ((padded.shape[1] - stack.shape[1]) // 2, (padded.shape[2] - stack.shape[2]) // 2)
    resized = padded
    if padded.shape[1:] != (image_size, image_size):
        resized = skimage.transform.resize(padded, (len(padded), image_size, image_size), order=1,
                                           anti_aliasing=True, preserve_range=True)
    geometry = SliceGeometry(plane=plane, volume_shape=tuple(volume.shape), indices=indices,
                             padded_shape=tuple(padded.shape[1:]), pad_before=pad_before, image_size=image_size)
    return np.ascontiguousarray(resized, np.float32), geometry


def slices_to_volume(slices: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """(n, S, S) display slices -> the model-grid volume, in canonical axis order (see model_grid_affine)."""
    return np.ascontiguousarray(np.moveaxis(to_display(np.asarray(slices)), 0, plane_axis(geometry.plane)))


def model_grid_affine(geometry: SliceGeometry, canonical_affine: np.ndarray) -> np.ndarray:
    """Voxel-to-world affine of the slices_to_volume volume, given the affine of the canonical volume.

    In each in-plane direction a model voxel spans padded / image_size input voxels; its index u maps to the
    input index (u + 0.5) * scale - 0.5 - p (resizing aligns pixel edges), where p is the padding on the side
    that to_display turned away (display reverses both in-plane axes). Along the plane's axis slice k is input
    slice indices[k].
    """
    axis = plane_axis(geometry.plane)
    first, second = (a for a in range(3) if a != axis)
    voxel_map = np.eye(4)
    voxel_map[axis, 3] = geometry.indices[0]
    rows, cols = geometry.padded_shape
    for array_axis, padded, before in ((second, rows, geometry.pad_before[0]), (first, cols, geometry.pad_before[1])):
        scale = padded / geometry.image_size
        after = padded - geometry.volume_shape[array_axis] - before
        voxel_map[array_axis, array_axis] = scale
        voxel_map[array_axis, 3] = 0.5 * scale - 0.5 - after
    return np.asarray(canonical_affine, np.float64) @ voxel_map
