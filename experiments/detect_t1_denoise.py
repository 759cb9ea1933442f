"""Lesion detection on real T1 scans (no thesis row): the coarse-noise denoiser of Kascenas et al. 2022.

The aligned slices of ``detect_t1``; the small U-Net learns to remove Gaussian noise drawn at 16 x 16 and upsampled
(``coarse_noise``), so what it changes in an unchanged scan is what does not look healthy to it: the score is that
residual where the scan is darker than the model expects, median-filtered over 5 px, not calibrated against healthy
subjects (``tools/normative_check.py`` found that calibration lowers this score's AUPRC on synthetic lesions).
30 CPU-minutes.
"""

from experiments.detect_t1 import get_config as detect_t1_config


def get_config():
    return detect_t1_config().replace(corruptions="coarse_noise", patch_weight=0.0, scores="residual",
                                      normative=False)
