"""TensorBoard event files of a training run, written through tensorboardX into the workdir.

``metrics.jsonl`` stays the record of truth; these events only make runs browsable side by side
(``tensorboard --logdir runs/``). Scalars: ``train/loss`` and ``train/images_per_second`` every few steps, and
every number of a validation record (``val/ssim_slice``, ``val/input_psnr_patch``, ``val/ssim_slice/gibbs``, ...;
``train/loss_epoch``, ``train/epoch``, ``train/wall_time_s`` for its training fields); images: a few validation
slices as input | reconstruction | truth | |difference| rows. Only the process that writes files (process 0)
passes ``enabled=True``; the event file is created at the first write. tensorboardX is imported then too: it
imports PyTorch when that is installed (about 3 s and 200 MB), which no other job needs.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE_SLICES = 4  # validation slices shown per image
TRAINING_FIELDS = {"train_loss": "train/loss_epoch", "epoch": "train/epoch", "wall_time_s": "train/wall_time_s",
                   "learning_rate": "train/learning_rate"}


def sample_grid(samples: dict, count: int = SAMPLE_SLICES) -> np.ndarray:
    """(rows*H, 4*W) image in [0, 1]: one row per slice, columns input, reconstruction, truth, |difference|."""
    shown = slice(0, min(count, len(samples["clean"])))
    columns = [samples[name][shown, ..., 0] for name in ("corrupted", "reconstructed", "clean")]
    columns.append(np.abs(columns[1] - columns[2]))
    return np.clip(np.concatenate([np.concatenate(list(column), axis=0) for column in columns], axis=1), 0.0, 1.0)


class TrainingSummaries:
    """Writes one run's TensorBoard scalars and sample images; a no-op when not `enabled`."""

    def __init__(self, logdir, enabled: bool = True, start_step: int = 0):
        self._logdir, self._enabled, self._start_step = str(logdir), enabled, start_step
        self._writer = None

    def _write(self):
        """The tensorboardX SummaryWriter, created at the first write; None when not enabled."""
        if self._enabled and self._writer is None:
            from tensorboardX import SummaryWriter

            # A resumed run drops what an earlier session logged past its checkpoint (TensorBoard's purge step).
            self._writer = SummaryWriter(logdir=self._logdir, purge_step=self._start_step or None)
        return self._writer

    def training(self, step: int, loss: float, images_per_second: float) -> None:
        writer = self._write()
        if writer is not None:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/images_per_second", images_per_second, step)

    def validation(self, record: dict, samples: dict) -> None:
        """Every finite number of a metrics record (booleans, text and the patch metrics of a run without patches
        left out), and the sample grid."""
        writer = self._write()
        if writer is None:
            return
        for name, value in record.items():
            if (name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value)):
                writer.add_scalar(TRAINING_FIELDS.get(name, f"val/{name}"), value, record["step"])
        writer.add_image("val/samples", sample_grid(samples), record["step"], dataformats="HW")
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "TrainingSummaries":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
