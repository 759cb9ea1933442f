"""Shared settings of the thesis's scenarios (REFERENCE.md): thesis U-Net, Adam 1e-4, batch 6, 80/20 split.

The thesis selected the 51 central axial slices of 0.94 mm IXI volumes, a ~48 mm slab; `slab_mm=48` selects the
same anatomy at any voxel size (24 slices on the shared 2 mm data). It trained with MSE because its stack could
not run SSIM; we train with the SSIM loss by default (`--loss=mse` reproduces theirs).
"""

from mrirecon_jax.config import Config


def thesis_config(**changes) -> Config:
    base = Config(
        data_dir=None, plane="axial", slices=None, slab_mm=48.0, image_size=64, val_fraction=0.2,
        corruptions="original", model="thesis", loss="ssim", learning_rate=1e-4, batch_size=6, epochs=50,
        eval_batch_size=32,
    )
    return base.replace(**changes)
