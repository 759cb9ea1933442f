"""One frozen dataclass that describes a run; experiments return one, and every field is a command-line flag.

The checks that involve more than one value, or that no other room owns, live here (``Config.__post_init__``),
each worded once in the terms of the flags a user types. Names that a room owns (presets, losses, planes,
corruption kinds, back ends) are checked by that room when it is asked for one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional


RESIDUALS = ("abs", "pos", "neg")  # which part of input - model output an anomaly map keeps


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file); reported as one sentence."""


def _field(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that shapes a run. Fields are plain values so the config is hashable and JSON-able."""

    # Data.
    data_dir: Optional[str] = _field(None, "Folder of NIfTI volumes (.nii / .nii.gz, searched recursively); "
                                           "default: the demo source.")
    plane: str = _field("axial", "Slicing plane.")
    slices: Optional[int] = _field(24, "Number of central slices per volume (exclusive with --slab_mm).")
    slab_mm: Optional[float] = _field(None, "Thickness of the central slab in mm, the same anatomy at any voxel "
                                            "size (exclusive with --slices).")
    val_slab_mm: Optional[float] = _field(None, "Thickness in mm of the central slab that validation, evaluation "
                                                "and detection measure on held-out subjects (default: the training "
                                                "slab), so a run can train on more anatomy than it is measured on.")
    image_size: int = _field(64, "Slices are resized to image_size x image_size pixels.")
    val_fraction: float = _field(0.2, "Fraction of subjects held out for validation.")
    max_subjects: Optional[int] = _field(None, "Use at most this many subjects (the thesis's reduced set: 100).")
    cache_dir: Optional[str] = _field(None, "Where preprocessed slices are cached (default "
                                            "$MRIRECON_CACHE_DIR or ~/.cache/mrirecon_jax).")
    strict: bool = _field(False, "Refuse the whole run when any file of the chosen subjects cannot be used "
                                 "(by default it is skipped with a warning and listed in split.json).")
    preprocess: str = _field("none", "Volume preprocessing: none, or brain (N4 bias correction, affine "
                                     "registration to the MNI152 template at 2 mm, its brain mask, intensities "
                                     "normalised inside the brain, every axial slice with enough brain).")
    skull_strip: bool = _field(False, "Replaced by --preprocess=brain; refused.")
    data_loader: str = _field("memory", "How training slices reach the step: memory (all in RAM) or grain (streamed "
                                        "from a memory-mapped .npy store through grain; the same batches).")
    data_workers: int = _field(0, "grain loader: worker processes that read batches ahead (0: threads of the "
                                  "training process, the fastest for a local store; more for slow file systems).")
    # Corruptions and augmentation.
    corruptions: str = _field("original", "Corruption policy of training: original, augmented, augmented_wide, "
                                          "realistic, none, or a spec such as 'patch+oneof(downsample,gibbs,ghost)'.")
    val_corruptions: Optional[str] = _field(None, "Corruption policy of validation and evaluation (default: "
                                                  "--corruptions), to train on one policy and measure on another.")
    augment: str = _field("", "Train-time augmentation of the clean slices, target and input alike: site (= "
                              "geometry+contrast+bias+noise), none, or '+'-joined names among geometry, contrast, "
                              "bias, noise, noise_wide.")
    # Model.
    model: str = _field("small", "U-Net preset.")
    output_activation: Optional[str] = _field(None, "Override the preset's output activation.")
    norm: Optional[str] = _field(None, "Override the preset's normalisation after each convolution.")
    nonnegative: bool = _field(True, "Clamp reconstructions at zero in the input's units (MRI magnitudes), so "
                                     "a clean background comes out exactly zero.")
    flip_average: bool = _field(False, "Validation, evaluation and inference average the model's outputs on each "
                                       "slice and on its left-right mirror image (test-time augmentation; the "
                                       "training step is unchanged).")
    mask_input: float = _field(0.0, "Give the model the mask of the pixels a patch hid as a second input channel "
                                    "(reconstruct's --mask), on this fraction of the training slices; zeros on the "
                                    "others, as inference without a mask gives (0: one input channel). Validation "
                                    "tells the model the mask only when every training slice does (1).")
    mask_slack_px: int = _field(2, "With --mask_input, grow each mask the model is told in training by 0 to this "
                                   "many pixels, drawn per slice, so a mask that covers more than the changed "
                                   "pixels (as users draw them) is no surprise.")
    dtype: str = _field("float32", "Compute dtype of the model.")
    conv_impl: str = _field("auto", "Convolution back end (models/conv.py): auto picks per shape; xla is XLA's own "
                                    "throughout (the reference).")
    # Optimisation.
    loss: str = _field("ssim", "Training loss.")
    patch_weight: float = _field(0.0, "Extra loss weight of the pixels a patch covers (weight 1 + patch_weight "
                                      "there, 1 elsewhere).")
    foreground_weight: float = _field(0.0, "Extra loss weight of the head's pixels (the clean slice above a tenth "
                                           "of its range, dilated 2 px): 1 + foreground_weight there, added to "
                                           "the patch's.")
    ema_decay: float = _field(0.0, "Validation, checkpoints and every job that uses the model take an exponential "
                                   "moving average of the trained parameters with this decay per step (0: the "
                                   "parameters themselves).")
    train_crop: Optional[int] = _field(None, "Train on a random train_crop x train_crop window of each corrupted "
                                             "slice (normalised as a whole) and of its target, for a cheaper step; "
                                             "validation and every job see whole slices (None: whole slices).")
    learning_rate: float = _field(1e-4, "Adam learning rate (the peak, with a schedule).")
    lr_schedule: str = _field("constant", "Learning-rate schedule: constant; cosine, a decay to zero over the "
                                          "run's planned steps (epochs, or --max_steps); cosine_time, a decay to zero "
                                          "over the larger share of the planned steps and of --max_train_minutes "
                                          "spent (if set), so a run ends at zero on a fast or a busy machine.")
    warmup_steps: int = _field(0, "Linear learning-rate warm-up over this many first steps.")
    batch_size: int = _field(8, "Global training batch size.")
    epochs: int = _field(10, "Number of epochs.")
    max_steps: Optional[int] = _field(None, "Stop after this many training steps in total.")
    max_train_minutes: Optional[float] = _field(None, "Stop (with a final validation and checkpoint) after this "
                                                      "much training wall-clock time.")
    seed: int = _field(0, "Seed for the split, initialisation, corruptions and batch order.")
    skip_nonfinite: bool = _field(False, "Skip an update whose loss or gradient is not finite (counted in the "
                                         "metrics) instead of stopping the run there.")
    # Detection (detect, detect_eval): how the run's anomaly maps are made; the same flag given to those jobs
    # overrides the run's value.
    scores: str = _field("residual", "Anomaly scores, comma-separated: residual (what the model changes in the "
                                     "unchanged input), inpaint (each pixel's inpainting error when hidden; a run "
                                     "trained on inpaint_grid), combined (their mean, each over its healthy "
                                     "threshold).")
    residual: str = _field("abs", "Which part of input - model output is anomalous: abs, pos (brighter than "
                                  "expected) or neg (darker than expected, as most lesions are in T1).")
    median_px: int = _field(3, "In-plane median filter of the anomaly maps, in model pixels.")
    normative: bool = _field(False, "Express each anomaly map as its excess over the run's healthy validation "
                                    "subjects at the same template pixel, in units of their spread (runs with "
                                    "--preprocess=brain), so places where healthy brains vary are not flagged.")
    # Bookkeeping.
    checkpoint_every_steps: Optional[int] = _field(None, "Also checkpoint every N steps (besides every epoch).")
    keep_checkpoints: int = _field(3, "Keep the last N checkpoints (and the best by validation SSIM).")
    eval_batch_size: int = _field(64, "Batch size of validation, evaluation and inference.")

    def __post_init__(self):
        if (self.slices is None) == (self.slab_mm is None):
            raise UserError("Give exactly one of --slices and --slab_mm.")
        positive = {"slices": self.slices, "slab_mm": self.slab_mm, "val_slab_mm": self.val_slab_mm,
                    "learning_rate": self.learning_rate, "max_train_minutes": self.max_train_minutes}
        at_least = {"image_size": (self.image_size, 8), "batch_size": (self.batch_size, 1),
                    "epochs": (self.epochs, 1), "eval_batch_size": (self.eval_batch_size, 1),
                    "keep_checkpoints": (self.keep_checkpoints, 1), "max_steps": (self.max_steps, 1),
                    "checkpoint_every_steps": (self.checkpoint_every_steps, 1),
                    "max_subjects": (self.max_subjects, 2), "median_px": (self.median_px, 1)}
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise UserError(f"--{name} must be positive, got {value}.")
        for name, (value, least) in at_least.items():
            if value is not None and value < least:
                raise UserError(f"--{name} must be at least {least}, got {value}.")
        for name in ("patch_weight", "foreground_weight", "warmup_steps", "data_workers", "mask_slack_px"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must not be negative, got {getattr(self, name)}.")
        if self.train_crop is not None and not 8 <= self.train_crop <= self.image_size:
            raise UserError(f"--train_crop must be at least 8 and at most --image_size={self.image_size}, "
                            f"got {self.train_crop}.")
        if not 0 <= self.mask_input <= 1:
            raise UserError(f"--mask_input must be a fraction from 0 to 1, got {self.mask_input}.")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema_decay must be at least 0 and below 1, got {self.ema_decay}.")
        if self.skull_strip:
            raise UserError("--skull_strip is replaced by --preprocess=brain (N4, registration to the MNI152 "
                            "template and its brain mask); use that instead.")
        if self.preprocess not in ("none", "brain"):
            raise UserError(f"--preprocess={self.preprocess} is not one of none, brain.")
        if self.residual not in RESIDUALS:
            raise UserError(f"--residual={self.residual} is not one of {', '.join(RESIDUALS)}.")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}.")

    @property
    def eval_policy(self) -> str:
        """The corruption policy that validation and evaluation measure the run on."""
        return self.val_corruptions or self.corruptions

    def for_validation(self) -> "Config":
        """The config that prepares held-out subjects: this one with the validation slab, when it has its own."""
        if self.val_slab_mm is None:
            return self
        return self.replace(slices=None, slab_mm=self.val_slab_mm, val_slab_mm=None)

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        """The config a run recorded; fields it does not know are ignored, fields it lacks take their defaults."""
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Fields that may change when a run is resumed in the same workdir (they bound or log the run, or say how its
# anomaly maps are made; they do not change what is being trained).
RESUMABLE_FIELDS = frozenset(
    {"epochs", "max_steps", "max_train_minutes", "checkpoint_every_steps", "keep_checkpoints",
     "eval_batch_size", "cache_dir", "conv_impl", "strict", "skip_nonfinite", "scores", "residual", "median_px",
     "normative"}
)
# How the training slices reach the step changes nothing trained: both loaders give the same batches.
RESUMABLE_FIELDS |= {"data_loader", "data_workers"}
