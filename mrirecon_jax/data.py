"""NIfTI volumes -> clean, normalised, subject-split 2-D slices (host side, numpy only).

Geometry, in one place:

* Every volume is reoriented to canonical RAS (``nibabel.as_closest_canonical``): array axis 0 runs
  towards the patient's Right, axis 1 towards Anterior, axis 2 towards Superior.
* A plane fixes one axis: sagittal = axis 0, coronal = axis 1, axial = axis 2. A central contiguous slab
  of slices is taken along that axis (``slab_indices``).
* Each slice is shown the radiological way (``to_display``): axial has anterior up, sagittal and coronal
  have superior up; axial and coronal have the patient's right on the image's left, sagittal has anterior
  on the left. For every plane this is ``slice[::-1, ::-1].T`` of the two remaining axes taken in
  increasing order, an involution (applying it twice gives the input back).
* The slice is padded symmetrically with its minimum so its field of view is square in millimetres, then
  resized to ``image_size x image_size`` (bilinear, anti-aliased), so anisotropic voxels keep the
  anatomy's true aspect ratio. Finally each slice is min-max normalised to [0, 1] (constant -> zeros).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
import scipy.ndimage
import skimage.filters
import skimage.transform
from absl import logging

from mrirecon_jax.config import Config, UserError

PLANE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
# Bump whenever the arrays produced for the same inputs change, so stale caches are not read.
CACHE_FORMAT_VERSION = 1
CACHE_DIR_ENV = "MRIRECON_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/mrirecon_jax"
DEMO_SUBJECTS = 12
DEMO_SEED = 0
DEMO_VOXEL_MM = 2.0
MNI_TEMPLATE_FILE = ("datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
_READ_ERRORS = (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError, EOFError, ValueError,
                zlib.error)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and validation slices, (N, H, W, 1) float32 in [0, 1], split by subject."""

    train: np.ndarray
    val: np.ndarray
    train_subjects: tuple[str, ...]
    val_subjects: tuple[str, ...]
    train_slice_subject: np.ndarray  # (N,) index into train_subjects for each training slice
    val_slice_subject: np.ndarray  # (M,) index into val_subjects for each validation slice
    source: str  # one human sentence saying where the slices came from
    cache_path: Optional[str]  # the cache file read or written; None when caching was not possible
    cache_hit: bool


# ---------------------------------------------------------------------------------------------------
# Files and volumes.


def find_volumes(data_dir: str) -> list[Path]:
    """All .nii and .nii.gz files under data_dir (recursively, hidden files skipped), sorted."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"Data directory {root} does not exist or is not a directory.")
    paths = sorted(
        p for p in root.rglob("*")
        if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".") and p.is_file()
    )
    if not paths:
        raise UserError(f"Data directory {root} holds no .nii or .nii.gz files.")
    return paths


def subject_id(path) -> str:
    """Subject of a file: "IXI002" for IXI names, else the file name without .nii/.nii.gz."""
    name = Path(path).name
    match = re.match(r"(IXI\d+)-", name)
    if match:
        return match.group(1)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_volume(path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume as float32 in canonical RAS orientation, and its voxel sizes in mm (same axis order)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"NIfTI file {path} does not exist.")
    try:
        image = nib.load(str(path))
        if image.ndim == 4 and image.shape[3] == 1:
            image = image.slicer[..., 0]
        if image.ndim != 3:
            raise UserError(f"NIfTI file {path} has shape {image.shape}; a 3-D volume is needed.")
        image = nib.as_closest_canonical(image)
        data = image.get_fdata(dtype=np.float32)
    except _READ_ERRORS as error:
        reason = " ".join(str(error).split())
        raise UserError(f"NIfTI file {path} cannot be read ({type(error).__name__}: {reason}).") from None
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise UserError(f"NIfTI file {path} has invalid voxel sizes {zooms}.")
    if not np.isfinite(data).all():
        raise UserError(f"NIfTI file {path} contains non-finite values (NaN or inf).")
    return np.ascontiguousarray(data), zooms


# ---------------------------------------------------------------------------------------------------
# Slices.


def _plane_axis(plane: str) -> int:
    if plane not in PLANE_AXES:
        raise UserError(f"Unknown plane {plane!r}; choose one of {', '.join(sorted(PLANE_AXES))}.")
    return PLANE_AXES[plane]


def slab_indices(n: int, spacing_mm: float, slices: Optional[int], slab_mm: Optional[float]) -> np.ndarray:
    """Indices of the central contiguous slab of `slices` slices or of about `slab_mm` mm, clipped to n."""
    if (slices is None) == (slab_mm is None):
        raise UserError("Give exactly one of --slices and --slab_mm.")
    if slices is not None:
        if slices < 1:
            raise UserError(f"--slices must be at least 1, got {slices}.")
        count = int(slices)
    else:
        if not slab_mm > 0:
            raise UserError(f"--slab_mm must be positive, got {slab_mm}.")
        count = max(1, round(slab_mm / spacing_mm))
    count = min(count, n)
    start = (n - count) // 2
    return np.arange(start, start + count)


def to_display(slices: np.ndarray) -> np.ndarray:
    """(n, a, b) slices in RAS axis order -> radiological display orientation (n, b, a); an involution."""
    return slices[:, ::-1, ::-1].transpose(0, 2, 1)


def _pad_to_square_fov(slices: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
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


def _normalise(slices: np.ndarray) -> np.ndarray:
    """Per-slice min-max to [0, 1]; a constant slice becomes zeros."""
    low = slices.min(axis=(1, 2), keepdims=True)
    span = slices.max(axis=(1, 2), keepdims=True) - low
    scaled = (slices - low) / np.where(span > 0, span, 1.0)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def extract_slices(volume, zooms, plane, image_size, slices=None, slab_mm=None) -> np.ndarray:
    """Central slab of a canonical volume as (n, image_size, image_size) float32 slices in [0, 1]."""
    axis = _plane_axis(plane)
    if image_size < 8:
        raise UserError(f"--image_size must be at least 8, got {image_size}.")
    indices = slab_indices(np.shape(volume)[axis], float(zooms[axis]), slices, slab_mm)
    return volume_slices(volume, zooms, plane, image_size, indices=indices)[0]


# ---------------------------------------------------------------------------------------------------
# Subjects.


def split_subjects(
    ids: Sequence[str], val_fraction: float, seed: int, max_subjects: Optional[int] = None
) -> tuple[list[str], list[str]]:
    """Disjoint (train, val) subject lists, each sorted; deterministic for a seed."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    if max_subjects is not None and max_subjects < 2:
        raise UserError(f"--max_subjects must be at least 2 (one train, one validation), got {max_subjects}.")
    unique = sorted(set(ids))
    if len(unique) < 2:
        raise UserError(f"A train/validation split needs at least 2 subjects, found {len(unique)}.")
    order = np.random.default_rng(seed).permutation(len(unique))
    chosen = [unique[i] for i in order][:max_subjects]
    n_val = min(max(1, round(val_fraction * len(chosen))), len(chosen) - 1)
    return sorted(chosen[n_val:]), sorted(chosen[:n_val])


# ---------------------------------------------------------------------------------------------------
# Demo source: pseudo-subjects made from the MNI152 template (or a phantom) by small random warps.


def _mni_template_path() -> Optional[Path]:
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
    template_path = _mni_template_path()
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


# ---------------------------------------------------------------------------------------------------
# The dataset and its cache.


def _validate(cfg: Config) -> None:
    _plane_axis(cfg.plane)
    if cfg.image_size < 8:
        raise UserError(f"--image_size must be at least 8, got {cfg.image_size}.")
    if (cfg.slices is None) == (cfg.slab_mm is None):
        raise UserError("Give exactly one of --slices and --slab_mm, not both and not neither.")


def _fingerprint(path: Path) -> list:
    stat = path.stat()
    return [str(path.absolute()), stat.st_size, stat.st_mtime_ns]


def _cache_file(cfg: Config, inputs) -> Optional[Path]:
    """Where the arrays for these inputs and settings live; None (with a warning) if it cannot be used."""
    cache_dir = Path(cfg.cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser().absolute()
    if cfg.data_dir is not None and cache_dir.resolve().is_relative_to(Path(cfg.data_dir).expanduser().resolve()):
        warnings.warn(f"Cache directory {cache_dir} is inside the data directory; not caching.", stacklevel=3)
        return None
    key = {
        "format": CACHE_FORMAT_VERSION,
        "inputs": inputs,
        **{name: getattr(cfg, name) for name in
           ("plane", "slices", "slab_mm", "image_size", "val_fraction", "max_subjects", "seed", "skull_strip")},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"{digest}.npz"


def _read_cache(path: Path) -> Optional[Dataset]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return Dataset(
                train=npz["train"],
                val=npz["val"],
                train_subjects=tuple(str(s) for s in npz["train_subjects"]),
                val_subjects=tuple(str(s) for s in npz["val_subjects"]),
                train_slice_subject=npz["train_slice_subject"],
                val_slice_subject=npz["val_slice_subject"],
                source=str(npz["source"]),
                cache_path=str(path),
                cache_hit=True,
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        warnings.warn(f"Cache file {path} is unreadable ({error}); rebuilding it.", stacklevel=3)
        return None


def _write_cache(path: Path, dataset: Dataset) -> bool:
    """Writes the arrays atomically (temp file + rename); warns and returns False if that fails."""
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                train=dataset.train,
                val=dataset.val,
                train_subjects=np.array(dataset.train_subjects, dtype=str),
                val_subjects=np.array(dataset.val_subjects, dtype=str),
                train_slice_subject=dataset.train_slice_subject,
                val_slice_subject=dataset.val_slice_subject,
                source=np.array(dataset.source),
            )
        os.replace(temp, path)
        return True
    except OSError as error:
        if temp is not None and os.path.exists(temp):
            os.remove(temp)
        warnings.warn(f"Cannot write the data cache at {path} ({error}); continuing without it.", stacklevel=3)
        return False


def _stack(per_volume: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """[(subject index, (n, H, W) slices)] -> ((N, H, W, 1) slices, (N,) subject index)."""
    images = np.concatenate([s for _, s in per_volume])[..., None]
    owners = np.concatenate([np.full(len(s), i, np.int32) for i, s in per_volume])
    return images, owners


def load_dataset(cfg: Config) -> Dataset:
    """Subject-split clean slices for a config: from cfg.data_dir, or the demo source when it is None; cached."""
    _validate(cfg)
    if cfg.data_dir is None:
        template = _mni_template_path()
        inputs = {"demo": {"n_subjects": DEMO_SUBJECTS, "seed": DEMO_SEED,
                           "template": _fingerprint(template) if template else "phantom"}}
    else:
        paths = find_volumes(cfg.data_dir)
        inputs = [_fingerprint(p) for p in paths]
    cache_path = _cache_file(cfg, inputs)
    if cache_path is not None and cache_path.is_file():
        cached = _read_cache(cache_path)
        if cached is not None:
            logging.info("Data: %s Read from cache %s.", cached.source, cache_path)
            return cached

    if cfg.data_dir is None:
        volumes, source = demo_volumes()
        readers = [(s, lambda v=v, z=z: (v, z)) for s, v, z in volumes]
    else:
        readers = [(subject_id(p), functools.partial(load_volume, p)) for p in paths]
        n_subjects = len({s for s, _ in readers})
        folder = Path(cfg.data_dir).expanduser().absolute()
        source = f"{len(paths)} NIfTI volumes of {n_subjects} subjects from {folder}."
    train_ids, val_ids = split_subjects([s for s, _ in readers], cfg.val_fraction, cfg.seed, cfg.max_subjects)
    place = {s: (0, i) for i, s in enumerate(train_ids)} | {s: (1, i) for i, s in enumerate(val_ids)}
    chosen = [(place[s], read) for s, read in readers if s in place]

    def slices_of(read):
        volume, zooms = read()
        if cfg.skull_strip:
            volume = skull_strip(volume, brain_mask(volume, zooms))
        return extract_slices(volume, zooms, cfg.plane, cfg.image_size, slices=cfg.slices, slab_mm=cfg.slab_mm)

    sides = ([], [])  # (subject index, slices) per volume, for train and validation
    for (side, subject), read in chosen:
        sides[side].append((subject, slices_of(read)))
    (train, train_owner), (val, val_owner) = (_stack(side) for side in sides)
    dataset = Dataset(
        train=train, val=val, train_subjects=tuple(train_ids), val_subjects=tuple(val_ids),
        train_slice_subject=train_owner, val_slice_subject=val_owner, source=source,
        cache_path=None, cache_hit=False,
    )
    if cache_path is not None and _write_cache(cache_path, dataset):
        dataset = dataclasses.replace(dataset, cache_path=str(cache_path))
    logging.info("Data: %s %d train / %d validation slices.", source, len(train), len(val))
    return dataset


# ---- evaluation on unseen subjects (issue 4) ----


def load_unseen_subjects(cfg: Config, data_dir) -> Dataset:
    """Every subject in `data_dir` as validation slices (no split, `train` empty), prepared exactly as `cfg`
    prepares its own data (plane, slab, size, normalisation); cached like :func:`load_dataset`."""
    _validate(cfg)
    paths = find_volumes(data_dir)
    cfg = cfg.replace(data_dir=str(data_dir), max_subjects=None)
    cache_path = _cache_file(cfg, {"every_subject": [_fingerprint(p) for p in paths]})
    if cache_path is not None and cache_path.is_file():
        cached = _read_cache(cache_path)
        if cached is not None:
            logging.info("Data: %s Read from cache %s.", cached.source, cache_path)
            return cached
    subjects = sorted({subject_id(p) for p in paths})
    index = {s: i for i, s in enumerate(subjects)}
    val, val_owner = _stack([
        (index[subject_id(p)],
         extract_slices(*load_volume(p), cfg.plane, cfg.image_size, slices=cfg.slices, slab_mm=cfg.slab_mm))
        for p in paths])
    folder = Path(data_dir).expanduser().absolute()
    dataset = Dataset(
        train=np.zeros((0,) + val.shape[1:], np.float32), val=val, train_subjects=(), val_subjects=tuple(subjects),
        train_slice_subject=np.zeros(0, np.int32), val_slice_subject=val_owner,
        source=f"{len(paths)} NIfTI volumes of {len(subjects)} subjects from {folder}, every subject (no split).",
        cache_path=None, cache_hit=False,
    )
    if cache_path is not None and _write_cache(cache_path, dataset):
        dataset = dataclasses.replace(dataset, cache_path=str(cache_path))
    logging.info("Data: %s %d slices.", dataset.source, len(val))
    return dataset


# ---- whole volumes for reconstruction and detection (issue 6) ----

# Whole volumes go through the same steps as the training slices (display orientation, square field of view,
# resize, per-slice min-max), but every step's parameters are kept so slices can be put back into a volume
# whose affine places it in scanner space.

# A volume whose border voxels are (almost) all one value is taken as already masked (skull-stripped).
MASKED_BORDER_FRACTION = 0.99
BRAIN_EROSION_MM = 9.0  # erosion that cuts the brain from scalp, eyes and neck in a skull-on T1


@dataclasses.dataclass(frozen=True, eq=False)
class SliceGeometry:
    """Where the model-grid slices of a canonical volume came from, and how they were scaled."""

    plane: str
    volume_shape: tuple[int, int, int]  # shape of the canonical (RAS) volume that was sliced
    indices: np.ndarray  # (n,) contiguous slice indices along the plane's axis
    padded_shape: tuple[int, int]  # (rows, cols) of a display slice after square-FOV padding, before resizing
    pad_before: tuple[int, int]  # rows added above and columns added on the left of each display slice
    image_size: int
    low: np.ndarray  # (n,) per-slice minimum that normalisation subtracted (input units; 0 when not normalised)
    span: np.ndarray  # (n,) per-slice max - min that normalisation divided by (1 when not normalised)


def volume_slices(volume, zooms, plane: str, image_size: int, indices=None,
                  normalise: bool = True) -> tuple[np.ndarray, SliceGeometry]:
    """Slices of a canonical volume prepared as in training, (n, image_size, image_size) float32, and their geometry.

    `indices` are contiguous slice indices along the plane's axis (default: every slice). Slices whose padded
    in-plane size already equals image_size pass through without resizing. normalise=False keeps intensities
    (for masks: threshold the result at 0.5).
    """
    axis = _plane_axis(plane)
    volume = np.asarray(volume, np.float32)
    indices = np.arange(volume.shape[axis]) if indices is None else np.asarray(indices)
    if indices.size == 0 or np.any(np.diff(indices) != 1):
        raise ValueError("volume_slices needs a non-empty run of contiguous slice indices.")
    first, second = (a for a in range(3) if a != axis)
    stack = to_display(np.moveaxis(np.take(volume, indices, axis=axis), axis, 0))
    padded = _pad_to_square_fov(stack, row_mm=float(zooms[second]), col_mm=float(zooms[first]))
    # _pad_to_square_fov puts half the padding (rounded down) before the slice.
    pad_before = ((padded.shape[1] - stack.shape[1]) // 2, (padded.shape[2] - stack.shape[2]) // 2)
    resized = padded
    if padded.shape[1:] != (image_size, image_size):
        resized = skimage.transform.resize(padded, (len(padded), image_size, image_size), order=1,
                                           anti_aliasing=True, preserve_range=True).astype(np.float32)
    n = len(resized)
    low, span = np.zeros(n, np.float32), np.ones(n, np.float32)
    if normalise:
        low = resized.min(axis=(1, 2))
        span = resized.max(axis=(1, 2)) - low
        resized = _normalise(resized)
    geometry = SliceGeometry(plane=plane, volume_shape=tuple(volume.shape), indices=indices,
                             padded_shape=tuple(padded.shape[1:]), pad_before=pad_before, image_size=image_size,
                             low=low, span=span)
    return resized.astype(np.float32), geometry


def to_input_units(slices: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """Normalised (n, H, W) slices back in the input's intensity units (each slice's min-max undone)."""
    return slices * geometry.span[:, None, None] + geometry.low[:, None, None]


def slices_to_volume(slices: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """(n, S, S) display slices -> the model-grid volume, in canonical axis order (see model_grid_affine)."""
    return np.ascontiguousarray(np.moveaxis(to_display(np.asarray(slices)), 0, _plane_axis(geometry.plane)))


def model_grid_affine(geometry: SliceGeometry, canonical_affine: np.ndarray) -> np.ndarray:
    """Voxel-to-world affine of the slices_to_volume volume, given the affine of the canonical volume.

    In each in-plane direction a model voxel spans padded / image_size input voxels; its index u maps to the
    input index (u + 0.5) * scale - 0.5 - p (resizing aligns pixel edges), where p is the padding on the side
    that to_display turned away (display reverses both in-plane axes). Along the plane's axis slice k is input
    slice indices[k].
    """
    axis = _plane_axis(geometry.plane)
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


def canonical_affine(path) -> np.ndarray:
    """Voxel-to-world affine of the canonical (RAS) array that load_volume returns for this (readable) file."""
    image = nib.load(str(path))
    orientation = nib.orientations.io_orientation(image.affine)
    return image.affine @ nib.orientations.inv_ornt_aff(orientation, image.shape[:3])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = scipy.ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def brain_mask(volume, zooms) -> np.ndarray:
    """A boolean brain mask of a canonical T1 volume, by a heuristic (give a real mask when you have one).

    Already-masked (skull-stripped) volumes, whose border is one background value: the non-background region,
    holes filled. Skull on: the Otsu foreground, eroded by BRAIN_EROSION_MM to cut the brain from scalp, eyes
    and neck, its largest component dilated back inside the foreground, holes filled slice by slice and in 3-D.
    Limits: it can keep some dura, sinus and cerebellar tentorium, lose dark CSF at the surface, and fail on
    volumes with strong bias fields or little background.
    """
    volume = np.asarray(volume, np.float32)
    border = np.concatenate([np.take(volume, i, a).ravel() for a in range(3) for i in (0, -1)])
    values, counts = np.unique(border, return_counts=True)
    if counts.max() >= MASKED_BORDER_FRACTION * border.size:
        foreground = volume != values[np.argmax(counts)]
        return scipy.ndimage.binary_fill_holes(_largest_component(foreground))
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


def volume_readers(data_dir: Optional[str]) -> list[tuple[str, object]]:
    """[(subject id, function returning (canonical volume, zooms))] for a data folder, or the demo source if None."""
    if data_dir is None:
        return [(s, lambda v=v, z=z: (v, z)) for s, v, z in demo_volumes()[0]]
    return [(subject_id(p), functools.partial(load_volume, p)) for p in find_volumes(data_dir)]
