"""Shared settings of the thesis's scenarios (REFERENCE.md): thesis U-Net, Adam 1e-4, batch 6, 80/20 split.

The thesis selected the 51 or 151 central axial slices of 0.94 mm IXI volumes, a ~48 or ~142 mm slab; `slab_mm`
selects the same anatomy at any voxel size (24 or 71 slices on the shared 2 mm data). Its reduced set held 100
subjects. It trained with MSE because its stack could not run SSIM; we train with the SSIM loss by default
(`--loss=mse` reproduces theirs).
"""

from mrirecon_jax.config import Config

SLAB_51_MM = 48.0  # the thesis's 51 central slices of 0.94 mm
SLAB_151_MM = 142.0  # its 151 central slices
REDUCED_SUBJECTS = 100  # its reduced data set


def thesis_config(**changes) -> Config:
    base = Config(
        data_dir=None, plane="axial", slices=None, slab_mm=SLAB_51_MM, image_size=64, val_fraction=0.2,
        corruptions="original", model="thesis", loss="ssim", learning_rate=1e-4, batch_size=6, epochs=50,
        eval_batch_size=32,
    )
    return base.replace(**changes)
