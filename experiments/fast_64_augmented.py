"""Time-to-quality recipe (no thesis row): the thesis's 64 px augmented scenario in 30 CPU-minutes (RESULTS.md).

The small residual U-Net (0.5 M parameters), SSIM loss with the metric's uniform 7x7 window and extra weight 1 on the
patched pixels and 1 on the head's (air 1x, head or patch 2x, patch over the head 3x), Adam 1e-3 with a short warm-up
and a cosine decay over the 30 minutes (`cosine_time`: or over 96 epochs, should they end first), batch 16;
validation and inference average the outputs on each slice and its mirror image. Training draws each corruption
from the thesis's kinds and their widely randomised variants, draws the line patch as other programs draw it
(`patch_wide`: pens, edges) and augments the clean slices (geometry, contrast, bias field, noise from none to SNR 30),
so that another implementation's corruptions and another site's scans cost little; validation measures the thesis's
augmented policy. Reconstructions are clamped at zero in the input's units.
"""

from experiments._thesis import thesis_config


def get_config():
    return thesis_config(
        image_size=64, model="small", loss="ssim7", patch_weight=1.0, foreground_weight=1.0, flip_average=True,
        corruptions="patch_wide+oneof(downsample,downsample_wide,gibbs,gibbs_wide,ghost,ghost_wide)",
        val_corruptions="augmented", augment="geometry+contrast+bias+noise_moderate",
        learning_rate=1e-3, lr_schedule="cosine_time", warmup_steps=200, batch_size=16, epochs=96,
        max_train_minutes=30.0, eval_batch_size=64,
    )
