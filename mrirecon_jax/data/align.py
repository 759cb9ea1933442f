"""Aligned preprocessing (``--preprocess=brain``): N4 bias correction, affine registration to the MNI152 T1
template that nilearn ships (2 mm), skull stripping by the template's brain mask, and intensity normalisation
inside the brain. Registration and N4 are SimpleITK's; nothing here is hand-written registration.

Every job reaches this through ``prepare.prepare_volume``, so training, evaluation and detection see the same
template-space slices for the same file. The slice cache (``data.dataset``) keeps the result of training data.

A volume that is already skull-stripped (its border is (almost) one value, ``brain.masked_background``: BraTS,
ATLAS, the shared glioma) is detected: N4 then only sees its non-background voxels, registration uses it as it is,
and its brain is the template mask restricted to the registered non-background voxels. A volume with skull gets a
rough heuristic mask (``brain.brain_mask``) for N4 and registration only; its brain is the template mask.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import skimage.filters

from mrirecon_jax.config import UserError
from mrirecon_jax.data import brain as brain_lib
from mrirecon_jax.data.volumes import BadVolume

TEMPLATE_RESOLUTION_MM = 2
BRAIN_PERCENTILES = (1.0, 99.0)  # of the brain voxels, mapped to 0 and 1 (then clipped to [0, 1])
MIN_SLICE_BRAIN_FRACTION = 0.2  # an axial template slice is used when its brain area is this much of the largest
N4_VOXEL_MM = 4.0  # N4 fits the bias field on a copy shrunk to about this voxel size
N4_ITERATIONS = (25, 25, 25)
REGISTRATION_SAMPLING = 0.1  # fraction of the template voxels the metric samples (fixed seed)
REGISTRATION_SEED = 1  # fixed (0 would be SimpleITK's wall-clock seed)


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


@dataclasses.dataclass(frozen=True, eq=False)
class Aligned:
    """A volume in template space, with what is needed to bring the input's masks there too."""

    volume: np.ndarray  # template grid, normalised inside the brain, 0 outside
    brain: np.ndarray  # template grid, bool
    zooms: tuple[float, float, float]
    affine: np.ndarray  # template grid voxel -> MNI mm
    input_zooms: tuple[float, float, float]
    transform: object  # SimpleITK transform, template point -> input point
    stripped: bool  # the input was detected as already skull-stripped

    def to_template(self, mask) -> np.ndarray:
        """A mask on the input's canonical grid, as a float fraction on the template grid (linear)."""
        return resample(np.asarray(mask, np.float32), self.input_zooms, self.transform, self.volume.shape,
                        self.zooms)


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
                   input_zooms=zooms, transform=transform, stripped=stripped)


def brain_slices(axis: int = 2) -> np.ndarray:
    """The contiguous template slices along `axis` whose brain area is at least MIN_SLICE_BRAIN_FRACTION of the
    largest: the same full-brain coverage for every subject."""
    area = template().brain.sum(axis=tuple(a for a in range(3) if a != axis))
    kept = np.flatnonzero(area >= MIN_SLICE_BRAIN_FRACTION * area.max())
    return np.arange(kept[0], kept[-1] + 1)
