"""Lesion detection on real T1 scans (no thesis row): aligned preprocessing, a coarse-noise denoiser (Kascenas 2022).

Volumes are N4-corrected, registered to the MNI152 template at 2 mm and skull-stripped by its mask, normalised
inside the brain, and sliced over the whole brain (``--preprocess=brain``), so healthy IXI training slices and a
skull-stripped atlas-space lesion scan look alike. The small U-Net learns to remove coarse noise (16x16 Gaussian
noise upsampled to 64 px); what it removes from a real scan is the anomaly map. 24 IXI subjects, 15 CPU-minutes.
Train with --mode=train, then score real lesions with --mode=detect_eval --lesion_dir=...; the inpainting
variant is --corruptions=inpaint_grid.
"""

from mrirecon_jax.config import Config


def get_config() -> Config:
    return Config(
        data_dir=None, preprocess="brain", plane="axial", image_size=64, max_subjects=24, corruptions="coarse_noise",
        model="small", loss="l1", learning_rate=1e-3, lr_schedule="cosine", warmup_steps=100, batch_size=16,
        epochs=30, max_train_minutes=15.0, eval_batch_size=64,
    )
