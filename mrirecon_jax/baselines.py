"""Classical baselines the model is compared with, host side (numpy, scikit-image, dipy).

Each baseline sees the very corrupted slices the model saw (same keys) and the known patch masks:

* ``input``: the corrupted input itself (doing nothing);
* ``biharmonic``: biharmonic inpainting of the patch (``skimage.restoration.inpaint_biharmonic``);
* ``classical``: the patch inpainted as above, then the slice's corruption undone by its classical method where
  one exists: bicubic interpolation from the reduced grid (recovered by least squares from the corruption's
  linear upsampling) for resolution reduction by area (``downsample`` kinds), local sub-voxel-shift unringing
  (Kellner et al. 2016, ``dipy.denoise.gibbs.gibbs_removal``, per 2-D slice) for k-space truncation
  (``gibbs`` kinds). Other kinds have no classical restoration here, so there ``classical`` equals
  ``biharmonic``. The patch goes first because the corruption applied it last.

Slices are (N, H, W, 1) float32 in [0, 1]; outputs are clipped to [0, 1].
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import skimage.restoration
import skimage.transform
from dipy.denoise.gibbs import gibbs_removal

from mrirecon_jax import corruptions


def inpaint_patch(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) slice with the pixels of `mask` filled by biharmonic inpainting."""
    if not mask.any():
        return image
    return skimage.restoration.inpaint_biharmonic(image, mask > 0)


@functools.lru_cache(maxsize=16)
def _to_reduced_grid(size: int, factor: float) -> np.ndarray:
    """(reduced, size) least-squares inverse of the corruption's linear upsampling from the reduced grid."""
    reduced = max(1, round(size / factor))
    upsample = jax.vmap(lambda e: jax.image.resize(e, (size,), method="linear"))(jnp.eye(reduced))
    return np.linalg.pinv(np.asarray(upsample, np.float64).T)


def bicubic_upsample(image: np.ndarray, factor: float = 2) -> np.ndarray:
    """(H, W) slice taken back to the grid reduced by `factor` it was linearly upsampled from, then up again by
    bicubic interpolation."""
    rows, cols = _to_reduced_grid(image.shape[0], factor), _to_reduced_grid(image.shape[1], factor)
    small = rows @ image @ cols.T
    return skimage.transform.resize(small, image.shape, order=3, mode="edge", anti_aliasing=False)


def gibbs_unring(image: np.ndarray) -> np.ndarray:
    """(H, W) slice with Gibbs ringing suppressed by Kellner et al.'s local sub-voxel shifts (dipy)."""
    return gibbs_removal(np.asarray(image, np.float64), inplace=False)


def _restoration(corruption) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The classical restoration of a catalogue corruption, read from the function and parameters it is made of."""
    func, params = getattr(corruption, "func", None), getattr(corruption, "keywords", {})
    if func is corruptions.downsample and params.get("method", "area") == "area":
        return functools.partial(bicubic_upsample, factor=params.get("factor", 2))
    if func is corruptions.gibbs:
        return gibbs_unring
    return None


# corruption kind -> its classical restoration of one (H, W) slice
RESTORATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    kind: restore for kind, corruption in corruptions.CORRUPTIONS.items()
    if (restore := _restoration(corruption)) is not None}

DESCRIPTIONS = {
    "input": "the corrupted input itself",
    "biharmonic": "biharmonic inpainting of the known patch (scikit-image)",
    "classical": ("biharmonic inpainting of the patch, then bicubic interpolation from the reduced grid for "
                  "resolution reduction by area ("
                  + ", ".join(k for k, r in RESTORATIONS.items() if r is not gibbs_unring)
                  + "), or local sub-voxel-shift Gibbs unringing (Kellner et al. 2016, dipy) for k-space "
                  "truncation (" + ", ".join(k for k, r in RESTORATIONS.items() if r is gibbs_unring)
                  + "); equal to biharmonic for other kinds"),
}


def baseline_outputs(corrupted: np.ndarray, masks: np.ndarray, kinds: Sequence[str]) -> dict[str, np.ndarray]:
    """Every baseline's reconstruction of `corrupted` (N, H, W, 1), given each slice's patch mask and kind name."""
    inpainted = np.stack([inpaint_patch(x[..., 0], m[..., 0]) for x, m in zip(corrupted, masks)])
    restored = np.stack([RESTORATIONS[kind](x) if kind in RESTORATIONS else x for x, kind in zip(inpainted, kinds)])
    outputs = {"input": corrupted, "biharmonic": inpainted[..., None], "classical": restored[..., None]}
    return {name: np.clip(out, 0.0, 1.0).astype(np.float32) for name, out in outputs.items()}
