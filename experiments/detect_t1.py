"""Lesion detection on real T1 scans (no thesis row): aligned preprocessing, masked inpainting on a square grid.

Volumes are N4-corrected, registered to the MNI152 template at 2 mm and skull-stripped by its mask, normalised
inside the brain, and sliced over the whole brain (``--preprocess=brain``), so healthy IXI training slices and a
skull-stripped atlas-space lesion scan look alike. The small U-Net learns to inpaint one phase of an 8 x 8 grid
of squares (hidden pixels weighted 4x in the L1 loss); at detection every phase is hidden in turn and a pixel's
score is its inpainting error (detect_eval --scores=inpaint --residual=neg --median_px=9 on the glioma). 24 IXI
subjects, 15 CPU-minutes. The coarse-noise denoiser (Kascenas et al. 2022) is --corruptions=coarse_noise
--patch_weight=0 with --scores=residual.
"""

from mrirecon_jax.config import Config


def get_config() -> Config:
    return Config(
        data_dir=None, preprocess="brain", plane="axial", image_size=64, max_subjects=24, corruptions="inpaint_grid",
        patch_weight=3.0,
        model="small", loss="l1", learning_rate=1e-3, lr_schedule="cosine", warmup_steps=100, batch_size=16,
        epochs=30, max_train_minutes=15.0, eval_batch_size=64,
    )
