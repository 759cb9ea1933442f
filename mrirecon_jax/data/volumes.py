"""Reading NIfTI volumes: finding them in a folder, naming their subjects, loading them in canonical RAS, and
refusing the files that cannot be used, each with one sentence that names the file.

Two faults are repaired rather than refused, each with a warning that names the file: a 4-D file gives its first
volume, and NaN or infinite voxels are set to the minimum of the finite ones. A constant volume (all zero, say)
holds no image and is refused.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from absl import logging

from mrirecon_jax.config import UserError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_READ_ERRORS = (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError, EOFError, ValueError,
                zlib.error)


class BadVolume(UserError):
    """A NIfTI file that exists but cannot be used (unreadable, wrong shape, invalid values)."""


def find_volumes(data_dir) -> list[Path]:
    """All .nii and .nii.gz files under data_dir (recursively, hidden files skipped), sorted."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"Data directory {root} does not exist or is not a directory.")
    paths = sorted(p for p in root.rglob("*")
                   if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".") and p.is_file())
    if not paths:
        raise UserError(f"Data directory {root} holds no .nii or .nii.gz files.")
    return paths


def subject_id(path) -> str:
    """Subject of a file: "IXI002" for IXI names (both the download's and the 2 mm copy's), else the file name
    without .nii/.nii.gz."""
    name = Path(path).name
    match = re.match(r"(IXI\d+)-", name)
    if match:
        return match.group(1)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_volume(path, repairs: Optional[list] = None, *, mask: bool = False
                ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume as float32 in canonical RAS orientation, and its voxel sizes in mm (same axis order).

    Raises BadVolume for a file that cannot be used (a constant image too, unless it is a `mask`). The repairs
    made (4-D to its first volume, non-finite voxels to the finite minimum) are logged as warnings and, when
    `repairs` is a list, appended to it as sentences.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"NIfTI file {path} does not exist.")
    made = []
    try:
        image = nib.load(str(path))
        if image.ndim == 4:
            if image.shape[3] > 1:
                made.append(f"NIfTI file {path} is 4-D {image.shape}; using its first volume.")
            image = image.slicer[..., 0]
        if image.ndim != 3:
            raise BadVolume(f"NIfTI file {path} has shape {image.shape}; a 3-D volume is needed.")
        image = nib.as_closest_canonical(image)
        data = image.get_fdata(dtype=np.float32)
    except _READ_ERRORS as error:
        reason = " ".join(str(error).split())
        raise BadVolume(f"NIfTI file {path} cannot be read ({type(error).__name__}: {reason}).") from None
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise BadVolume(f"NIfTI file {path} has invalid voxel sizes {zooms}.")
    finite = np.isfinite(data)
    if not finite.all():
        if not finite.any():
            raise BadVolume(f"NIfTI file {path} holds no finite value (every voxel is NaN or infinite).")
        made.append(f"NIfTI file {path} has {int((~finite).sum())} NaN or infinite voxels; setting them to the "
                    "volume's minimum.")
        data = np.where(finite, data, data[finite].min())
    if not mask and data.max() == data.min():
        raise BadVolume(f"NIfTI file {path} is constant (every voxel is {data.flat[0]:g}); it holds no image.")
    for sentence in made:
        logging.warning("%s", sentence)
    if repairs is not None:
        repairs.extend(made)
    return np.ascontiguousarray(data, np.float32), zooms


def canonical_affine(path) -> np.ndarray:
    """Voxel-to-world affine of the canonical (RAS) array that load_volume returns for this (readable) file."""
    image = nib.load(str(path))
    orientation = nib.orientations.io_orientation(image.affine)
    return image.affine @ nib.orientations.inv_ornt_aff(orientation, image.shape[:3])


def fingerprint(path) -> list:
    """What identifies a file's contents for the cache: absolute path, size, modification time."""
    stat = Path(path).stat()
    return [str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns]
