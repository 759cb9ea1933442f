"""One frozen dataclass that describes a run; experiments return one, flags override it."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file); reported as one sentence."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that shapes a run. Fields are plain values so the config is hashable and JSON-able."""

    # Data.
    data_dir: Optional[str] = None  # None: the demo source (MNI152 template or synthetic phantom).
    plane: str = "axial"  # axial | sagittal | coronal
    slices: Optional[int] = 24  # central slices per volume; exclusive with slab_mm
    slab_mm: Optional[float] = None  # central slab thickness in mm; exclusive with slices
    image_size: int = 64
    val_fraction: float = 0.2
    max_subjects: Optional[int] = None
    cache_dir: Optional[str] = None  # None: ~/.cache/mrirecon_jax
    # Train on skull-stripped slices (each volume masked by data.brain_mask), for detection on skull-stripped scans.
    skull_strip: bool = False
    # Corruptions (a policy name or spec string understood by corruptions.parse_policy).
    corruptions: str = "original"
    # Model.
    model: str = "small"  # preset name in models.unet.PRESETS
    output_activation: Optional[str] = None  # None: the preset's own
    # Optimisation.
    loss: str = "ssim"  # ssim | l1 | mse | ssim_l1
    learning_rate: float = 1e-4
    batch_size: int = 8
    epochs: int = 10
    max_steps: Optional[int] = None
    max_train_minutes: Optional[float] = None
    seed: int = 0
    # Bookkeeping.
    checkpoint_every_steps: Optional[int] = None
    keep_checkpoints: int = 3
    eval_batch_size: int = 64
    dtype: str = "float32"  # compute dtype of the model: float32 | bfloat16
    conv_impl: str = "auto"  # convolution back end (models/conv.py): auto | xla | im2col | winograd | winograd_f2

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Fields that may change when a run is resumed in the same workdir (they bound or log the run,
# they do not change what is being trained).
RESUMABLE_FIELDS = frozenset(
    {"epochs", "max_steps", "max_train_minutes", "checkpoint_every_steps", "keep_checkpoints",
     "eval_batch_size", "cache_dir", "conv_impl"}
)
