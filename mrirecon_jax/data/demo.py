"""The demo source: pseudo-subjects made from the MNI152 T1 template that nilearn ships as a file (or, without
nilearn, a clearly labelled ellipsoid phantom) by small random affine warps and intensity bias fields. It lets the
pipeline run on a fresh machine; it is not real subjects."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.ndimage

from mrirecon_jax.data.volumes import load_volume

DEMO_SUBJECTS = 12
DEMO_SEED = 0
DEMO_VOXEL_MM = 2.0
MNI_TEMPLATE_FILE = ("datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def mni_template_path() -> Optional[Path]:
    """The MNI152 2009a T1 template file shipped inside the nilearn package, found without importing it."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*MNI_TEMPLATE_FILE)
    return path if path.is_file() else None


def _mni_template(path: Path) -> np.ndarray:
    """The 1 mm template resampled to DEMO_VOXEL_MM voxels, canonical RAS, float32."""
    volume, zooms = load_volume(path)
    factors = [z / DEMO_VOXEL_MM for z in zooms]
    return scipy.ndimage.zoom(volume, factors, order=1).astype(np.float32)


def _ellipsoid(grid, centre, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _phantom() -> np.ndarray:
    """A T1-like head of nested ellipsoids (skin, skull, CSF, grey, white matter, ventricles, deep grey)."""
    shape = (96, 112, 96)
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * DEMO_VOXEL_MM for n in shape], indexing="ij")
    head = np.zeros(shape, np.float32)
    # (intensity, centre in mm (R, A, S), semi-axes in mm); later ones paint over earlier ones.
    parts = [
        (0.55, (0, 0, 0), (72, 92, 78)),  # skin and fat
        (0.08, (0, 0, 2), (66, 86, 72)),  # skull
        (0.20, (0, 0, 4), (61, 81, 66)),  # CSF
        (0.50, (0, 0, 4), (58, 78, 63)),  # grey matter
        (0.85, (0, -2, 8), (48, 66, 48)),  # white matter
        (0.55, (-12, -4, 0), (9, 12, 9)),  # right deep grey
        (0.55, (12, -4, 0), (9, 12, 9)),  # left deep grey
        (0.15, (-6, 4, 10), (4, 20, 8)),  # right lateral ventricle
        (0.15, (6, 4, 10), (4, 20, 8)),  # left lateral ventricle
        (0.60, (0, -50, -30), (30, 18, 14)),  # cerebellum
    ]
    for intensity, centre, radii in parts:
        head[_ellipsoid(grid, centre, radii)] = intensity
    return scipy.ndimage.gaussian_filter(head, 0.7)


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _perturb(volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small random affine warp about the centre, then a smooth multiplicative bias field (+-10 %)."""
    matrix = _rotation(np.deg2rad(rng.uniform(-5, 5, size=3))) @ np.diag(1 / rng.uniform(0.93, 1.07, size=3))
    centre = (np.array(volume.shape) - 1) / 2
    shift = rng.uniform(-3, 3, size=3) / DEMO_VOXEL_MM
    offset = centre - matrix @ centre + shift
    warped = scipy.ndimage.affine_transform(volume, matrix, offset=offset, order=1, mode="constant", cval=0.0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in volume.shape], indexing="ij")
    terms = (x, y, z, x * y, y * z, x * z, x * x, y * y, z * z)
    field = sum(c * t for c, t in zip(rng.normal(size=len(terms)), terms))
    field *= rng.uniform(0.05, 0.10) / np.abs(field).max()
    return (warped * (1 + field)).astype(np.float32)


def demo_volumes(
    n_subjects: int = DEMO_SUBJECTS, seed: int = DEMO_SEED
) -> tuple[list[tuple[str, np.ndarray, tuple[float, float, float]]], str]:
    """Pseudo-subjects [(id, canonical volume, zooms)] and a description saying plainly they are a demo."""
    template_path = mni_template_path()
    if template_path is not None:
        base, prefix = _mni_template(template_path), "DEMO-MNI"
        what = "MNI152 2009a T1 template (nilearn)"
    else:
        base, prefix = _phantom(), "DEMO-PHANTOM"
        what = "synthetic ellipsoid phantom (nilearn not installed)"
    rng = np.random.default_rng(seed)
    zooms = (DEMO_VOXEL_MM,) * 3
    volumes = [(f"{prefix}-{i:02d}", _perturb(base, rng), zooms) for i in range(n_subjects)]
    description = (
        f"DEMO: {what} at {DEMO_VOXEL_MM:g} mm, {n_subjects} randomly warped copies with intensity bias"
        " - not real subjects."
    )
    return volumes, description
