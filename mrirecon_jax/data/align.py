"""Aligned preprocessing (``--preprocess=brain``): N4 bias correction, affine registration to the MNI152 T1
template that nilearn ships (2 mm), skull stripping by the template's brain mask, and intensity normalisation
inside the brain. Registration and N4 are SimpleITK's; nothing here is hand-written registration.

Every job reaches this through ``prepare.prepare_volume``, so training, evaluation and detection see the same
template-space slices for the same file. Each alignment is cached on disk by content (:func:`align_cached`: the
volume's bytes, its voxel sizes, ALIGNMENT_VERSION), so a file is registered once whatever slices, split or job
later use it; the slice cache (``data.dataset``) keeps the slices of a whole dataset. Results on the template grid
go back to the input's own grid through the inverse registration (:meth:`Aligned.to_input`).

A volume that is already skull-stripped (its border is (almost) one value, ``brain.masked_background``: BraTS,
ATLAS, the shared glioma) is detected: N4 then only sees its non-background voxels, registration uses it as it is,
and its brain is the template mask restricted to the registered non-background voxels. A volume with skull gets a
rough heuristic mask (``brain.brain_mask``) for N4 and registration only; its brain is the template mask.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import skimage.filters

from mrirecon_jax.config import UserError
from mrirecon_jax.data import brain as brain_lib
from mrirecon_jax.data import cache
from mrirecon_jax.data.volumes import BadVolume

TEMPLATE_RESOLUTION_MM = 2
BRAIN_PERCENTILES = (1.0, 99.0)  # of the brain voxels, mapped to 0 and 1 (then clipped to [0, 1])
MIN_SLICE_BRAIN_FRACTION = 0.2  # an axial template slice is used when its brain area is this much of the largest
N4_VOXEL_MM = 4.0  # N4 fits the bias field on a copy shrunk to about this voxel size
N4_ITERATIONS = (25, 25, 25)
REGISTRATION_SAMPLING = 0.1  # fraction of the template voxels the metric samples (fixed seed)
REGISTRATION_SEED = 1  # fixed (0 would be SimpleITK's wall-clock seed)
# Bump whenever align_volume can give another result for the same input (any parameter or step above or below),
# so the aligned cache is not read for it.
ALIGNMENT_VERSION = 1
ALIGNED_CACHE_FOLDER = "aligned"  # under the cache root (data.cache)


def _sitk():
    try:
        import SimpleITK
    except ImportError:  # pragma: no cover - pinned in requirements.txt
        raise UserError("--preprocess=brain needs SimpleITK (pip install SimpleITK==2.5.7).") from None
    # One thread: the metric's sums then run in one order, so the same file always gives the same slices.
    SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    return SimpleITK


@dataclasses.dataclass(frozen=True, eq=False)
class Template:
    volume: np.ndarray  # canonical RAS, float32 in [0, 1]
    brain: np.ndarray  # bool
    zooms: tuple[float, float, float]
    affine: np.ndarray  # canonical voxel -> MNI mm


@functools.lru_cache(maxsize=1)
def template() -> Template:
    """nilearn's MNI152 2009 T1 template and brain mask at TEMPLATE_RESOLUTION_MM (files inside nilearn)."""
    import nibabel as nib
    from nilearn import datasets

    image = nib.as_closest_canonical(datasets.load_mni152_template(resolution=TEMPLATE_RESOLUTION_MM))
    mask = nib.as_closest_canonical(datasets.load_mni152_brain_mask(resolution=TEMPLATE_RESOLUTION_MM))
    return Template(volume=np.asarray(image.dataobj, np.float32), brain=np.asarray(mask.dataobj) > 0,
                    zooms=tuple(float(z) for z in image.header.get_zooms()[:3]), affine=image.affine)


def to_image(array, zooms):
    """A canonical (x, y, z) array as a SimpleITK image with these voxel sizes (origin 0, identity directions:
    both sides of a registration are built alike, so only their relative pose matters)."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0)))
    image.SetSpacing([float(z) for z in zooms])
    return image


def from_image(image) -> np.ndarray:
    return _sitk().GetArrayFromImage(image).transpose(2, 1, 0)


def n4(volume, zooms, mask) -> np.ndarray:
    """`volume` divided by the N4 bias field (Tustison et al. 2010) fitted inside `mask` on a shrunk copy."""
    sitk = _sitk()
    image = to_image(volume, zooms)
    mask_image = sitk.Cast(to_image(mask, zooms) > 0.5, sitk.sitkUInt8)
    shrink = [max(1, int(round(N4_VOXEL_MM / z))) for z in zooms]
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    corrector.Execute(sitk.Shrink(image, shrink), sitk.Shrink(mask_image, shrink))
    log_field = from_image(corrector.GetLogBiasFieldAsImage(image))
    return (np.asarray(volume, np.float32) / np.exp(log_field)).astype(np.float32)


def register(fixed, fixed_zooms, moving, moving_zooms):
    """The affine SimpleITK transform (fixed physical point -> moving physical point) that best aligns `moving` to
    `fixed` by Mattes mutual information: moments-centred start, then similarity and affine, each coarse to fine."""
    sitk = _sitk()
    fixed_image, moving_image = to_image(fixed, fixed_zooms), to_image(moving, moving_zooms)
    transform = sitk.CenteredTransformInitializer(fixed_image, moving_image, sitk.Similarity3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
    for stage, shrink in ((sitk.Similarity3DTransform, (4, 2)), (sitk.AffineTransform, (2, 1))):
        if stage is sitk.AffineTransform:
            affine = sitk.AffineTransform(3)
            affine.SetMatrix(transform.GetMatrix())
            affine.SetTranslation(transform.GetTranslation())
            affine.SetCenter(transform.GetCenter())
            transform = affine
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(REGISTRATION_SAMPLING, REGISTRATION_SEED)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100,
                                                        relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(list(shrink))
        method.SetSmoothingSigmasPerLevel([s / 2 for s in shrink])
        method.SetInitialTransform(transform, inPlace=True)
        method.Execute(fixed_image, moving_image)
    return transform


def resample(array, zooms, transform, shape, reference_zooms, linear: bool = True) -> np.ndarray:
    """`array` (on a grid of `zooms`) sampled on the reference grid (`shape`, `reference_zooms`) through
    `transform` (reference point -> array point); 0 outside."""
    sitk = _sitk()
    reference = to_image(np.zeros(shape, np.float32), reference_zooms)
    out = sitk.Resample(to_image(array, zooms), reference, transform,
                        sitk.sitkLinear if linear else sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    return from_image(out).astype(np.float32)


def normalise_brain(volume, brain) -> np.ndarray:
    """BRAIN_PERCENTILES of the brain voxels -> 0 and 1, clipped to [0, 1], 0 outside the brain."""
    low, high = np.percentile(volume[brain], BRAIN_PERCENTILES)
    scaled = (volume - low) / max(high - low, 1e-6)
    return np.where(brain, np.clip(scaled, 0.0, 1.0), 0.0).astype(np.float32)


def affine_transform(matrix: np.ndarray):
    """A 4x4 matrix acting on physical points as a SimpleITK affine transform (centre 0)."""
    transform = _sitk().AffineTransform(3)
    transform.SetMatrix(np.asarray(matrix, np.float64)[:3, :3].ravel().tolist())
    transform.SetTranslation(np.asarray(matrix, np.float64)[:3, 3].tolist())
    return transform


def transform_matrix(transform) -> np.ndarray:
    """A SimpleITK affine transform (p -> M (p - c) + c + t) as a 4x4 matrix acting on physical points."""
    linear = np.asarray(transform.GetMatrix(), np.float64).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.asarray(transform.GetTranslation(), np.float64) + centre - linear @ centre
    return matrix


@dataclasses.dataclass(frozen=True, eq=False)
class Aligned:
    """A volume in template space, with what is needed to bring the input's masks there and results back."""

    volume: np.ndarray  # template grid, normalised inside the brain, 0 outside
    brain: np.ndarray  # template grid, bool
    zooms: tuple[float, float, float]
    affine: np.ndarray  # template grid voxel -> MNI mm
    input_shape: tuple[int, int, int]  # the input's canonical grid
    input_zooms: tuple[float, float, float]
    transform: object  # SimpleITK affine transform, template point -> input point
    stripped: bool  # the input was detected as already skull-stripped

    def to_template(self, mask) -> np.ndarray:
        """A mask on the input's canonical grid, as a float fraction on the template grid (linear)."""
        return resample(np.asarray(mask, np.float32), self.input_zooms, self.transform, self.volume.shape,
                        self.zooms)

    def to_input(self, array, affine: Optional[np.ndarray] = None, linear: bool = True) -> np.ndarray:
        """An array on the template grid, or on any grid that `affine` (voxel -> MNI mm) places in template space
        (the model grid, say), sampled on the input's canonical grid through the inverse registration; 0 outside.
        One interpolation, whatever the grid."""
        template_point_to_mm = self.affine @ np.diag([*(1.0 / np.asarray(self.zooms)), 1.0])
        input_to_array = (np.linalg.inv(self.affine if affine is None else np.asarray(affine, np.float64))
                          @ template_point_to_mm @ np.linalg.inv(transform_matrix(self.transform)))
        return resample(np.asarray(array, np.float32), (1.0, 1.0, 1.0), affine_transform(input_to_array),
                        self.input_shape, self.input_zooms, linear)

    def input_brain(self, volume) -> np.ndarray:
        """The brain on the input's canonical grid (`volume` is the input): the template's brain mask brought back,
        and for a skull-stripped input only its non-background voxels."""
        brain = self.to_input(template().brain.astype(np.float32)) >= 0.5
        background = brain_lib.masked_background(volume) if self.stripped else None
        return brain if background is None else brain & (np.asarray(volume) != background)

    def to_arrays(self) -> dict:
        """Everything it holds as named arrays (the transform as its matrix, translation and centre)."""
        return {"volume": self.volume, "brain": self.brain, "zooms": np.asarray(self.zooms), "affine": self.affine,
                "input_shape": np.asarray(self.input_shape), "input_zooms": np.asarray(self.input_zooms),
                "transform_matrix": np.asarray(self.transform.GetMatrix()),
                "transform_translation": np.asarray(self.transform.GetTranslation()),
                "transform_center": np.asarray(self.transform.GetCenter()), "stripped": np.asarray(self.stripped)}

    @classmethod
    def from_arrays(cls, arrays) -> "Aligned":
        """The inverse of :meth:`to_arrays`: the same arrays and a transform that maps every point alike."""
        transform = _sitk().AffineTransform(3)
        transform.SetMatrix(arrays["transform_matrix"].tolist())
        transform.SetTranslation(arrays["transform_translation"].tolist())
        transform.SetCenter(arrays["transform_center"].tolist())
        return cls(volume=arrays["volume"], brain=arrays["brain"], zooms=_floats(arrays["zooms"]),
                   affine=arrays["affine"], input_shape=tuple(int(n) for n in arrays["input_shape"]),
                   input_zooms=_floats(arrays["input_zooms"]), transform=transform,
                   stripped=bool(arrays["stripped"]))


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def align_volume(volume, zooms) -> Aligned:
    """N4, affine registration to the template, skull stripping by its mask, normalisation inside the brain."""
    volume = np.asarray(volume, np.float32)
    zooms = tuple(float(z) for z in zooms)
    atlas = template()
    background = brain_lib.masked_background(volume)
    stripped = background is not None
    if stripped:
        foreground = volume != background
        volume = np.where(foreground, volume - background, 0.0).astype(np.float32)
        n4_mask, rough = foreground, foreground
    else:
        volume = volume - volume.min()
        n4_mask = volume > skimage.filters.threshold_otsu(volume)
        rough = brain_lib.brain_mask(volume, zooms)
    corrected = n4(volume, zooms, n4_mask)
    transform = register(atlas.volume, atlas.zooms, np.where(rough, corrected, 0.0), zooms)
    moved = resample(corrected, zooms, transform, atlas.volume.shape, atlas.zooms)
    brain = atlas.brain.copy()
    if stripped:
        brain &= resample(foreground.astype(np.float32), zooms, transform, atlas.volume.shape, atlas.zooms) >= 0.5
    if not brain.any():
        raise BadVolume("The volume does not overlap the template's brain after registration.")
    return Aligned(volume=normalise_brain(moved, brain), brain=brain, zooms=atlas.zooms, affine=atlas.affine,
                   input_shape=tuple(volume.shape), input_zooms=zooms, transform=transform, stripped=stripped)


def cache_path(cache_root: Path, volume, zooms) -> Path:
    """The aligned-cache file of a volume: named by a hash of its bytes, shape and voxel sizes, ALIGNMENT_VERSION
    and the SimpleITK version (another one may register differently)."""
    volume = np.ascontiguousarray(volume, np.float32)
    key = {"version": ALIGNMENT_VERSION, "simpleitk": _sitk().Version.VersionString(), "shape": volume.shape,
           "zooms": [float(z) for z in zooms]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    digest.update(memoryview(volume).cast("B"))
    return cache_root / ALIGNED_CACHE_FOLDER / f"{digest.hexdigest()}.npz"


def align_cached(volume, zooms, cache_root: Optional[Path]) -> Aligned:
    """:func:`align_volume` through the aligned cache under `cache_root` (data.cache; no cache when None): a hit
    gives the same arrays and transform as a fresh alignment; an unreadable file is rebuilt with a warning."""
    volume = np.asarray(volume, np.float32)
    if cache_root is None:
        return align_volume(volume, zooms)
    path = cache_path(cache_root, volume, zooms)
    aligned = cache.read_npz(path, Aligned.from_arrays) if path.is_file() else None
    if aligned is None:
        aligned = align_volume(volume, zooms)
        cache.write_npz(path, aligned.to_arrays(), compressed=True, what="aligned-volume cache")
    return aligned


def brain_slices(axis: int = 2) -> np.ndarray:
    """The contiguous template slices along `axis` whose brain area is at least MIN_SLICE_BRAIN_FRACTION of the
    largest: the same full-brain coverage for every subject."""
    area = template().brain.sum(axis=tuple(a for a in range(3) if a != axis))
    kept = np.flatnonzero(area >= MIN_SLICE_BRAIN_FRACTION * area.max())
    return np.arange(kept[0], kept[-1] + 1)
