"""What `python run.py` runs (no thesis row): the small U-Net on the demo source, a few minutes on 2 CPU cores."""

from mrirecon_jax.config import Config


def get_config() -> Config:
    return Config(
        data_dir=None, plane="axial", slices=None, slab_mm=48.0, image_size=64, corruptions="augmented",
        model="small", loss="ssim", learning_rate=1e-3, batch_size=16, epochs=20, max_train_minutes=3.0,
    )
