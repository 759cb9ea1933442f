"""Lesion detection on real T1 scans (no thesis row): aligned preprocessing, masked inpainting on a square grid.

Volumes are N4-corrected, registered to the MNI152 template at 2 mm and skull-stripped by its mask, normalised
inside the brain, and sliced over the whole brain (``--preprocess=brain``) at 96 px (2.3 mm, about the template's
own resolution, as Behrendt et al. slice theirs), so healthy IXI training slices and a skull-stripped atlas-space
lesion scan look alike. The small U-Net learns to inpaint one phase of an 8 x 8 grid of squares (hidden pixels
weighted 4x in the L1 loss); detect_eval hides every phase in turn and a pixel's score is its inpainting error where
the scan is darker than the model expects (``residual=neg``: stroke, MS lesions and tumours are mostly hypointense
in T1), median-filtered over 5 px (about 11 mm, the 5-voxel filter of Behrendt et al.), then expressed against the
healthy validation subjects at the same template pixel (``normative``: cortex and ventricles, where healthy brains
vary most, count less). Every IXI subject the split gives it, 30 CPU-minutes. ``detect_t1_denoise`` is the
coarse-noise denoiser of Kascenas et al. 2022.
"""

from mrirecon_jax.config import Config


def get_config() -> Config:
    return Config(
        data_dir=None, preprocess="brain", plane="axial", image_size=96, corruptions="inpaint_grid", patch_weight=3.0,
        model="small", loss="l1", learning_rate=1e-3, lr_schedule="cosine", warmup_steps=100, batch_size=16,
        epochs=8, max_train_minutes=30.0, eval_batch_size=64,
        scores="inpaint", residual="neg", median_px=5, normative=True,
    )
