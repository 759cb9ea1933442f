"""mrirecon-jax entry point: flags -> config -> one job.

    python run.py                                   # the `default` experiment on the demo source
    python run.py --experiment=thesis_64_augmented --data_dir=../shared/data/ixi-t1-2mm --workdir=runs/t64a

Flags left unset keep the experiment's values. Errors a user can fix end with one sentence and exit code 1.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging as std_logging
import os
import sys
from pathlib import Path

from absl import app, flags, logging

from mrirecon_jax import cpu
from mrirecon_jax.config import Config, UserError

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"

FLAGS = flags.FLAGS
MODES = ["train", "evaluate", "report", "benchmark", "gallery", "reconstruct", "detect", "detect_eval"]
flags.DEFINE_enum("mode", "train", MODES, "Which job to run.")
flags.DEFINE_string("experiment", "default", "Name of a file in experiments/ (without .py) giving the config.")
flags.DEFINE_string("workdir", None, "Run directory (config, checkpoints, metrics, figures). "
                    "Default: runs/<experiment>. Rerunning with the same workdir resumes.")
flags.DEFINE_enum("backend", None, ["cpu", "gpu", "tpu"], "JAX backend; default: JAX's choice.")

# Flags that override Config fields; None means "keep the experiment's value".
flags.DEFINE_string("data_dir", None, "Folder of NIfTI volumes (.nii / .nii.gz); default: the demo source.")
flags.DEFINE_enum("plane", None, ["axial", "sagittal", "coronal"], "Slicing plane.")
flags.DEFINE_integer("slices", None, "Number of central slices per volume (exclusive with --slab_mm).")
flags.DEFINE_float("slab_mm", None, "Thickness of the central slab in mm (exclusive with --slices).")
flags.DEFINE_integer("image_size", None, "Slices are resized to image_size x image_size.")
flags.DEFINE_float("val_fraction", None, "Fraction of subjects held out for validation.")
flags.DEFINE_integer("max_subjects", None, "Use at most this many subjects (the thesis's reduced set: 100).")
flags.DEFINE_bool("skull_strip", None, "Train on skull-stripped slices (computed brain mask), for detection on "
                  "skull-stripped scans.")
flags.DEFINE_string("cache_dir", None, "Where preprocessed slices are cached (default ~/.cache/mrirecon_jax).")
flags.DEFINE_string("corruptions", None, "Corruption policy: original, augmented, none, or a spec like "
                    "'patch+oneof(downsample,gibbs,ghost)'.")
flags.DEFINE_string("model", None, "U-Net preset: tiny, small or thesis.")
flags.DEFINE_string("output_activation", None, "Override the preset's output activation: relu, sigmoid, clip, linear.")
flags.DEFINE_string("loss", None, "Training loss: ssim, l1, mse or ssim_l1.")
flags.DEFINE_float("learning_rate", None, "Adam learning rate.")
flags.DEFINE_integer("batch_size", None, "Global training batch size.")
flags.DEFINE_integer("epochs", None, "Number of epochs.")
flags.DEFINE_integer("max_steps", None, "Stop after this many training steps in total.")
flags.DEFINE_float("max_train_minutes", None, "Stop (with a final validation and checkpoint) after this much "
                   "training wall-clock time.")
flags.DEFINE_integer("seed", None, "Seed for the split, initialisation, corruptions and batch order.")
flags.DEFINE_integer("checkpoint_every_steps", None, "Also checkpoint every N steps (besides every epoch).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype of the model.")
flags.DEFINE_enum("conv_impl", None, ["auto", "xla", "im2col", "winograd", "winograd_f2"], "Convolution back end "
                  "(models/conv.py): auto (up-convs as matmuls; on CPU, float32 3x3 convolutions with >= 64/128 "
                  "channels by Winograd, F(2x2, 3x3) on 8x8 grids and F(4x4, 3x3) from 16x16; others as im2col on "
                  "grids up to 8x8; XLA's elsewhere), xla (XLA's convolutions throughout, the reference), im2col, "
                  "winograd (F(4x4, 3x3)) or winograd_f2 (F(2x2, 3x3), more accurate): 3x3 that way everywhere.")

# Flags of the jobs other than training (each job reads only its own).
flags.DEFINE_string("checkpoint", "best", "evaluate/reconstruct/detect: which checkpoint: best, last or a step.")
flags.DEFINE_list("workdirs", None, "report: run directories to put in one table.")
flags.DEFINE_string("output", None, "report/benchmark/gallery/reconstruct/detect: the file to write.")
flags.DEFINE_string("input", None, "reconstruct/detect: the NIfTI volume to read.")
flags.DEFINE_bool("resample_to_input", False, "reconstruct/detect: write on the input's grid, not the model's.")
flags.DEFINE_string("corrupt", None, "reconstruct: corrupt the input first with this corruption kind.")
flags.DEFINE_string("brain_mask", None, "detect: brain mask NIfTI (computed when not given).")
flags.DEFINE_string("lesion_mask", None, "detect: ground-truth lesion mask NIfTI, to score the anomaly map.")
flags.DEFINE_enum("residual", "abs", ["abs", "pos", "neg"], "detect: which residual makes the anomaly map.")
flags.DEFINE_list("image_sizes", None, "benchmark: image sizes, e.g. 32,64,128.")
flags.DEFINE_list("batch_sizes", None, "benchmark: batch sizes, e.g. 8,32.")
flags.DEFINE_list("dtypes", None, "benchmark: compute dtypes, e.g. float32,bfloat16.")
flags.DEFINE_enum("peer", "none", ["none", "torch"], "benchmark: also time the same U-Net in PyTorch "
                  "(experiments/peer_torch.py; needs torch installed) and report our speed relative to it.")
flags.DEFINE_string("trace_dir", None, "benchmark: write a JAX profiler trace of a few train steps per row here "
                    "(open in ui.perfetto.dev or TensorBoard).")

CONFIG_FLAGS = [f.name for f in dataclasses.fields(Config) if f.name in FLAGS]


def load_experiment(name: str) -> Config:
    """The Config returned by experiments/<name>.py:get_config()."""
    path = EXPERIMENTS_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py") if not p.stem.startswith(("_", "peer_")))
        raise UserError(f"Unknown experiment {name!r}; choose one of {', '.join(known)}.")
    return importlib.import_module(f"experiments.{name}").get_config()


def config_from_flags() -> Config:
    """The experiment's config with every flag the user set applied on top."""
    cfg = load_experiment(FLAGS.experiment)
    changes = {name: FLAGS[name].value for name in CONFIG_FLAGS if FLAGS[name].present}
    if "slices" in changes and "slab_mm" in changes:
        raise UserError("Give either --slices or --slab_mm, not both.")
    if "slab_mm" in changes:
        changes["slices"] = None
    elif "slices" in changes:
        changes["slab_mm"] = None
    if "data_dir" in changes:
        if not Path(changes["data_dir"]).is_dir():
            raise UserError(f"--data_dir={changes['data_dir']} is not a directory.")
        changes["data_dir"] = str(Path(changes["data_dir"]).resolve())  # the run's record works from anywhere
    return cfg.replace(**changes)


def select_backend(backend) -> None:
    """Make JAX use `backend`, or raise UserError if this machine does not have it; on CPU, keep freed memory
    in the heap (mrirecon_jax.cpu)."""
    import jax

    if backend is not None:
        jax.config.update("jax_platforms", {"gpu": "cuda,rocm"}.get(backend, backend))
    try:
        devices = jax.devices()
    except RuntimeError:
        raise UserError(f"Backend {backend or 'default'!r} is not available on this machine "
                        "(check the jax installation for it, or use --backend=cpu).") from None
    if jax.default_backend() == "cpu":
        cpu.keep_freed_memory()
    logging.info("Backend %s: %d device(s), %s; XLA_FLAGS=%r.", jax.default_backend(), len(devices),
                 devices[0].device_kind, os.environ.get("XLA_FLAGS", ""))


def workdir_flag(must_exist: bool = False) -> Path:
    """--workdir, defaulting to runs/<experiment>; with must_exist, it must hold a run's config.json."""
    workdir = Path(FLAGS.workdir or Path("runs") / FLAGS.experiment)
    if must_exist and not (workdir / "config.json").is_file():
        raise UserError(f"--workdir={workdir} holds no run (no config.json); train one there first.")
    return workdir


def required_flag(name: str):
    """The value of a flag this job cannot do without."""
    if FLAGS[name].value in (None, []):
        raise UserError(f"--mode={FLAGS.mode} needs --{name}.")
    return FLAGS[name].value


# ---------------------------------------------------------------------------------------------------- jobs
# Each job reads its flags here and calls one function of the package; the package never reads flags.

def train_job():
    from mrirecon_jax import train

    workdir = workdir_flag()
    summary = train.train_and_evaluate(config_from_flags(), workdir)
    print(json.dumps({k: summary[k] for k in ("step", "epoch", "ssim_slice", "ssim_patch", "psnr_slice",
                                              "psnr_patch", "input_ssim_slice", "stopped_early")}))
    print(f"Run written to {workdir}: config.json, metrics.jsonl, checkpoints/, samples.png")


def evaluate_job():
    from mrirecon_jax import evaluate

    workdir = workdir_flag(must_exist=True)
    result = evaluate.evaluate_run(workdir, FLAGS.checkpoint, data_dir=FLAGS.data_dir, cache_dir=FLAGS.cache_dir)
    for kind, entry in result["kinds"].items():
        best = entry["best_baseline"]
        print(json.dumps({"kind": kind, **{k: entry[k] for k in ("ssim_slice", "ssim_patch", "psnr_slice")},
                          "thesis_ssim_slice": entry["thesis_compat"]["ssim_slice"], "best_baseline": best,
                          "baseline_ssim_slice": entry["baselines"][best]["ssim_slice"],
                          "baseline_ssim_patch": entry["baselines"][best]["ssim_patch"]}))
    print(f"Evaluation of step {result['checkpoint_step']} on {result['n_slices']} slices of "
          f"{result['n_subjects']} subjects written to {workdir / evaluate.EVAL_DIR}: metrics.json and figures")


def report_job():
    from mrirecon_jax import report

    path = report.write_report(required_flag("workdirs"), required_flag("output"))
    print(f"Report written to {path}")


def _int_list(name: str, default: int) -> list[int]:
    values = FLAGS[name].value or [default]
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UserError(f"--{name} must be a comma-separated list of integers, got {','.join(values)}.") from None


def benchmark_job():
    from mrirecon_jax import benchmark

    cfg = config_from_flags()
    benchmark.run_benchmark(
        cfg, models=cfg.model.split(","), image_sizes=_int_list("image_sizes", cfg.image_size),
        batch_sizes=_int_list("batch_sizes", cfg.batch_size), dtypes=FLAGS.dtypes or [cfg.dtype],
        output=Path(FLAGS.output or "runs/benchmark/bench.json"), peer=FLAGS.peer,
        trace_dir=Path(FLAGS.trace_dir) if FLAGS.trace_dir else None)


def gallery_job():
    from mrirecon_jax import gallery

    output = required_flag("output")
    print(f"Gallery written to {gallery.save_gallery(config_from_flags(), output)}")


def reconstruct_job():
    from mrirecon_jax import infer

    summary = infer.reconstruct(workdir_flag(must_exist=True), required_flag("input"), required_flag("output"),
                                checkpoint=FLAGS.checkpoint, resample_to_input=FLAGS.resample_to_input,
                                corrupt=FLAGS.corrupt, seed=FLAGS.seed)
    print(json.dumps(summary))


def detect_job():
    from mrirecon_jax import infer

    summary = infer.detect(workdir_flag(must_exist=True), required_flag("input"), required_flag("output"),
                           checkpoint=FLAGS.checkpoint, brain_mask_path=FLAGS.brain_mask,
                           lesion_mask_path=FLAGS.lesion_mask, residual=FLAGS.residual,
                           resample_to_input=FLAGS.resample_to_input)
    print(json.dumps(summary))


def detect_eval_job():
    from mrirecon_jax import infer

    workdir = workdir_flag(must_exist=True)
    results = infer.detect_eval(workdir, FLAGS.data_dir, checkpoint=FLAGS.checkpoint,
                                max_subjects=FLAGS.max_subjects, residual=FLAGS.residual, seed=FLAGS.seed)
    print(json.dumps({"kinds": results["kinds"], "overall": results["overall"]}))
    print(f"Detection metrics written to {workdir / infer.DETECT_DIR / 'metrics.json'} and cases.png")


JOBS = {"train": train_job, "evaluate": evaluate_job, "report": report_job, "benchmark": benchmark_job,
        "gallery": gallery_job, "reconstruct": reconstruct_job, "detect": detect_job,
        "detect_eval": detect_eval_job}


class _HideLibraryInfo(std_logging.Filter):
    """Keep orbax's per-save INFO lines out of the console; warnings still show."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_HideLibraryInfo())
    try:
        select_backend(FLAGS.backend)
        JOBS[FLAGS.mode]()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
