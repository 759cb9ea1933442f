"""The one way a volume becomes model-grid slices: training, evaluation, reconstruct, detect and detect_eval all
call :func:`prepare_volume`, so they see the same slices (aligned preprocessing, plane, slab, geometry) for the
same file.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from mrirecon_jax.config import Config
from mrirecon_jax.data import align
from mrirecon_jax.data import brain as brain_lib
from mrirecon_jax.data import cache
from mrirecon_jax.data import geometry as geometry_lib
from mrirecon_jax.data import normalise
from mrirecon_jax.data.volumes import BadVolume

MASK_LEVEL = 0.5  # a mask resampled to the model grid keeps the pixels that are at least this much inside
MIN_INPLANE_VOXELS = 8  # a slice with fewer voxels along an in-plane axis holds too little to resize to the grid


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedVolume:
    """A volume's slices on the model grid, and what is needed to put results back into the volume's space."""

    slices: np.ndarray  # (n, S, S) float32 in the volume's own intensity units (brain: normalised, [0, 1])
    geometry: geometry_lib.SliceGeometry
    brain: Optional[np.ndarray]  # (n, S, S) bool brain mask on the model grid, when one was made or given
    zooms: tuple = (1.0, 1.0, 1.0)  # voxel size of the volume that was sliced
    aligned: Optional[align.Aligned] = None  # with --preprocess=brain: the volume in template space

    def clean(self) -> np.ndarray:
        """The slices as clean training targets: (n, S, S, 1) float32 in [0, 1]; min-max normalised per slice,
        except aligned slices, already normalised over the whole brain."""
        return (self.slices if self.aligned is not None else normalise.minmax(self.slices))[..., None]

    def on_grid(self, mask, level: float = MASK_LEVEL) -> np.ndarray:
        """A bool mask on the input volume's canonical grid, on the model grid (through the registration when
        aligned): (n, S, S) bool, a pixel in when at least `level` of it is (default: most of it)."""
        mask = np.asarray(mask, np.float32)
        if self.aligned is not None:
            mask = self.aligned.to_template(mask)
        return grid_mask(mask, self.zooms, self.geometry, level)

    def to_input(self, slices, linear: bool = True) -> np.ndarray:
        """(n, S, S) model-grid slices of an aligned volume on the input volume's canonical grid: the model grid
        placed in template space (geometry.model_grid_affine), then through the inverse registration."""
        return self.aligned.to_input(geometry_lib.slices_to_volume(slices, self.geometry),
                                     geometry_lib.model_grid_affine(self.geometry, self.aligned.affine), linear)


def grid_mask(mask: np.ndarray, zooms, geometry: geometry_lib.SliceGeometry, level: float = MASK_LEVEL
              ) -> np.ndarray:
    """A canonical bool volume sliced like the volume it belongs to: (n, S, S) bool, a pixel in when at least
    `level` of it is (default: most of it)."""
    sliced, _ = geometry_lib.volume_slices(np.asarray(mask, np.float32), zooms, geometry.plane, geometry.image_size,
                                           geometry.indices)
    return sliced >= level


def prepare_volume(volume, zooms, cfg: Config, *, whole_volume: bool = False, brain: Optional[np.ndarray] = None,
                   with_brain: bool = False, name: str = "The volume") -> PreparedVolume:
    """Model-grid slices of a canonical volume as `cfg`'s training prepares them.

    The slices are the central slab that `cfg` selects (``slices`` or ``slab_mm``), or every slice along the plane
    with `whole_volume`. `brain` is a canonical bool mask on the volume's grid; without one, a mask is computed
    (``brain.brain_mask``) when `with_brain` asks for it. With --preprocess=brain the volume is first aligned to the
    template (:func:`_prepare_aligned`). A volume too small for that (fewer slices than the slab, or fewer than
    MIN_INPLANE_VOXELS voxels along an in-plane axis) raises BadVolume, the sentence starting with `name`.
    """
    volume = np.asarray(volume, np.float32)
    if cfg.preprocess == "brain":
        return _prepare_aligned(volume, zooms, cfg, brain, name)
    axis = geometry_lib.plane_axis(cfg.plane)
    inplane = [volume.shape[a] for a in range(3) if a != axis]
    if min(inplane) < MIN_INPLANE_VOXELS:
        raise BadVolume(f"{name} has {'x'.join(map(str, inplane))} voxels in the {cfg.plane} plane, fewer than "
                        f"the {MIN_INPLANE_VOXELS} per side a slice needs.")
    indices = None
    if not whole_volume:
        indices = geometry_lib.slab_indices(volume.shape[axis], float(zooms[axis]), cfg.slices, cfg.slab_mm)
        wanted = cfg.slices if cfg.slices is not None else max(1, round(cfg.slab_mm / float(zooms[axis])))
        if len(indices) < wanted:
            asked = f"--slices={cfg.slices}" if cfg.slices is not None else f"--slab_mm={cfg.slab_mm:g}"
            raise BadVolume(f"{name} has {volume.shape[axis]} {cfg.plane} slices, fewer than the {wanted} that "
                            f"{asked} takes.")
    if brain is None and with_brain:
        brain = brain_lib.brain_mask(volume, zooms)
    slices, geometry = geometry_lib.volume_slices(volume, zooms, cfg.plane, cfg.image_size, indices)
    return PreparedVolume(slices=slices, geometry=geometry, zooms=tuple(zooms),
                          brain=None if brain is None else grid_mask(brain, zooms, geometry))


def _prepare_aligned(volume, zooms, cfg: Config, brain: Optional[np.ndarray], name: str) -> PreparedVolume:
    """--preprocess=brain: the volume in template space (data.align, through its aligned cache), sliced along the
    template slices that hold enough brain (the same for every file, whole volume or not; --slices and --slab_mm do
    not apply). A given brain mask (input grid) is brought to the template and intersected with the template's."""
    if min(volume.shape) < MIN_INPLANE_VOXELS:
        raise BadVolume(f"{name} has {'x'.join(map(str, volume.shape))} voxels, fewer than the "
                        f"{MIN_INPLANE_VOXELS} per side registration needs.")
    aligned = align.align_cached(volume, zooms, cache.cache_root(cfg))
    mask = aligned.brain
    if brain is not None:
        mask = mask & (aligned.to_template(brain) >= MASK_LEVEL)
    slices, geometry = geometry_lib.volume_slices(np.where(mask, aligned.volume, 0.0), aligned.zooms, cfg.plane,
                                                  cfg.image_size,
                                                  align.brain_slices(geometry_lib.plane_axis(cfg.plane)))
    return PreparedVolume(slices=np.clip(slices, 0.0, 1.0), geometry=geometry, zooms=aligned.zooms,
                          brain=grid_mask(mask, aligned.zooms, geometry), aligned=aligned)


def template_brain(cfg: Config) -> np.ndarray:
    """(n, S, S) bool: the template's brain mask on the model grid, sliced as --preprocess=brain slices volumes
    (the brain of every skull-on volume it prepares)."""
    atlas = align.template()
    _, geometry = geometry_lib.volume_slices(atlas.brain.astype(np.float32), atlas.zooms, cfg.plane, cfg.image_size,
                                             align.brain_slices(geometry_lib.plane_axis(cfg.plane)))
    return grid_mask(atlas.brain, atlas.zooms, geometry)
