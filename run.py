"""mrirecon-jax entry point: flags -> config -> one job.

    python run.py                                   # the `default` experiment on the demo source
    python run.py --experiment=thesis_64_augmented --data_dir=../shared/data/ixi-t1-2mm --workdir=runs/t64a

Every field of ``mrirecon_jax.config.Config`` is a flag of the same name; flags left unset keep the experiment's
values. Errors a user can fix end with one sentence and exit code 1.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging as std_logging
import os
import sys
import traceback
import typing
from pathlib import Path

from absl import app, flags, logging

from mrirecon_jax import benchmark, cpu, distributed, infer, losses, train
from mrirecon_jax.config import RESIDUALS, Config, UserError
from mrirecon_jax.data import geometry, stream
from mrirecon_jax.models import conv, unet

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
BACKENDS = {"cpu": "cpu", "gpu": "cuda,rocm", "tpu": "tpu"}  # --backend -> jax_platforms

FLAGS = flags.FLAGS
MODES = ["train", "evaluate", "report", "benchmark", "gallery", "reconstruct", "detect", "detect_eval", "list",
         "config"]
flags.DEFINE_enum("mode", "train", MODES, "Which job to run (list: the experiments, one line "
                  "each; config: print the config that --experiment and the flags give).")
flags.DEFINE_string("experiment", "default", "Name of a file in experiments/ (without .py) giving the config.")
flags.DEFINE_string("workdir", None, "Run directory (config, checkpoints, metrics, figures). "
                    "Default: runs/<experiment>. Rerunning with the same workdir resumes.")
flags.DEFINE_enum("backend", None, list(BACKENDS), "JAX backend; default: JAX's choice.")

# How this process was launched (not part of the run's config: a run may resume under another launch).
DISTRIBUTED_MODES = ("train", "evaluate", "benchmark")
flags.DEFINE_string("coordinator_address", None, "Several processes: host:port of process 0, where JAX's "
                    "distributed runtime meets (with --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Several processes: how many take part.")
flags.DEFINE_integer("process_id", None, "Several processes: this one's index, 0 to --num_processes-1.")
flags.DEFINE_bool("distributed", None, "Start JAX's distributed runtime, finding the processes itself (SLURM, "
                  "Open MPI, Cloud TPU). Default: when srun or mpirun started several tasks, or the three flags "
                  "above are given; --nodistributed never.")
flags.DEFINE_integer("distributed_timeout_s", 300, "Seconds to wait for the other processes, at the start and at "
                     "the end.")

# Config fields whose values a room owns: the flag offers exactly that room's names.
CHOICES = {"plane": geometry.PLANE_AXES, "model": unet.PRESETS, "output_activation": unet.OUTPUT_ACTIVATIONS,
           "norm": unet.NORMS, "dtype": unet.DTYPES, "conv_impl": conv.CONV_IMPLS, "loss": losses.LOSSES,
           "lr_schedule": train.LR_SCHEDULES, "data_loader": stream.LOADERS, "residual": RESIDUALS}
_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}


def _define_config_flags() -> list[str]:
    """One flag per Config field (default None: keep the experiment's value), typed and documented from the field."""
    hints = typing.get_type_hints(Config)
    names = []
    for field in dataclasses.fields(Config):
        kind = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None))
        text = f"{field.metadata['help']} (Config.{field.name}; default: the experiment's, {field.default!r} in Config.)"
        if field.name in CHOICES:
            flags.DEFINE_enum(field.name, None, list(CHOICES[field.name]), text)
        else:
            _DEFINE[kind](field.name, None, text)
        names.append(field.name)
    return names


CONFIG_FLAGS = _define_config_flags()

flags.DEFINE_bool("allow_config_change", False, "train: resume the run in --workdir although settings outside the "
                  "resumable ones changed; what changed is recorded in config_changes.jsonl there.")

# Flags of the jobs other than training (each job reads only its own).
flags.DEFINE_string("checkpoint", "best", "evaluate/reconstruct/detect: which checkpoint: best, last or a step.")
flags.DEFINE_list("kinds", None, "evaluate: the catalogue's corruption kinds to evaluate (default: all of them).")
flags.DEFINE_list("workdirs", None, "report: run directories to put in one table.")
flags.DEFINE_string("output", None, "report/benchmark/gallery/reconstruct/detect: the file to write.")
flags.DEFINE_string("input", None, "reconstruct/detect: the NIfTI volume to read.")
flags.DEFINE_bool("resample_to_input", False, "reconstruct/detect: write on the input's grid, not the model's.")
flags.DEFINE_string("corrupt", None, "reconstruct: corrupt the input first with this corruption policy.")
flags.DEFINE_string("mask", None, "reconstruct: NIfTI on the input's grid, non-zero where the image was blanked or "
                    "painted over, told to a run trained with --mask_input.")
flags.DEFINE_string("brain_mask", None, "detect: brain mask NIfTI (computed when not given).")
flags.DEFINE_string("lesion_mask", None, "detect: ground-truth lesion mask NIfTI, to score the anomaly map.")
flags.DEFINE_string("lesion_dir", None, "detect_eval: also score real lesion cases: a folder of case folders, each "
                    "with a T1 (t1.nii.gz or *t1*) and a lesion mask (lesion_mask.nii.gz or *seg* / *mask*).")
flags.DEFINE_list("models", None, "benchmark: U-Net presets, e.g. thesis,small (default: --model).")
flags.DEFINE_list("image_sizes", None, "benchmark: image sizes, e.g. 32,64,128.")
flags.DEFINE_list("batch_sizes", None, "benchmark: batch sizes, e.g. 8,32.")
flags.DEFINE_list("dtypes", None, "benchmark: compute dtypes, e.g. float32,bfloat16.")
flags.DEFINE_enum("peer", "none", list(benchmark.PEERS), "benchmark: also time the same U-Net in PyTorch "
                  "(python -m tools.peer_torch; needs torch installed) and report our speed relative to it.")
flags.DEFINE_string("trace_dir", None, "benchmark: write a JAX profiler trace of a few train steps per row here "
                    "(open in ui.perfetto.dev or TensorBoard).")


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py") if not p.stem.startswith("_"))


def experiment_description(name: str) -> str:
    """The first line of experiments/<name>.py's docstring: what the scenario is and which thesis row it is."""
    lines = (importlib.import_module(f"experiments.{name}").__doc__ or "").strip().splitlines()
    return lines[0] if lines else "(no description)"


def load_experiment(name: str) -> Config:
    """The Config returned by experiments/<name>.py:get_config()."""
    if name not in experiment_names():
        raise UserError(f"Unknown --experiment={name!r}; choose one of {', '.join(experiment_names())}.")
    return importlib.import_module(f"experiments.{name}").get_config()


def config_from_flags() -> Config:
    """The experiment's config with every flag the user set applied on top."""
    cfg = load_experiment(FLAGS.experiment)
    changes = {name: FLAGS[name].value for name in CONFIG_FLAGS if FLAGS[name].present}
    for given, other in (("slices", "slab_mm"), ("slab_mm", "slices")):
        if given in changes and other not in changes:  # one of the two replaces the experiment's choice
            changes[other] = None
    if changes.get("data_dir"):
        changes["data_dir"] = str(Path(changes["data_dir"]).expanduser().absolute())  # the record works from anywhere
    return cfg.replace(**changes)


def launch_from_flags() -> distributed.Launch:
    """How this process was launched, from the distributed flags."""
    return distributed.Launch(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed,
                              FLAGS.distributed_timeout_s)


def select_backend(backend, launch: distributed.Launch = distributed.Launch(detect=False)) -> None:
    """Make JAX use `backend` (joining the other processes when `launch` says so), or raise UserError if this
    machine does not have it; on CPU, keep freed memory in the heap (mrirecon_jax.cpu)."""
    import jax

    if backend is not None:
        jax.config.update("jax_platforms", BACKENDS[backend])
    if launch.starts_runtime() and FLAGS.mode not in DISTRIBUTED_MODES:
        raise UserError(f"--mode={FLAGS.mode} runs in one process; several processes run "
                        f"{', '.join(DISTRIBUTED_MODES)}.")
    if distributed.initialize(launch) and not distributed.is_writer():
        logging.set_verbosity(logging.WARNING)  # process 0 logs the run
    try:
        devices = jax.devices()
    except RuntimeError:
        raise UserError(f"Backend {backend or 'default'!r} is not available on this machine "
                        "(check the jax installation for it, or use --backend=cpu).") from None
    if jax.default_backend() == "cpu":
        cpu.keep_freed_memory()
    logging.info("Backend %s: %d device(s), %s; XLA_FLAGS=%r.", jax.default_backend(), len(devices),
                 devices[0].device_kind, os.environ.get("XLA_FLAGS", ""))


def workdir_flag() -> Path:
    """--workdir, defaulting to runs/<experiment>."""
    return Path(FLAGS.workdir or Path("runs") / FLAGS.experiment)


def required_flag(name: str):
    """The value of a flag this job cannot do without."""
    if FLAGS[name].value in (None, []):
        raise UserError(f"--mode={FLAGS.mode} needs --{name}.")
    return FLAGS[name].value


# ---------------------------------------------------------------------------------------------------- jobs
# Each job reads its flags here and calls one function of the package; the package never reads flags.

def train_job():
    workdir = workdir_flag()
    summary = train.train_and_evaluate(config_from_flags(), workdir, FLAGS.allow_config_change)
    print(json.dumps({k: summary[k] for k in ("step", "epoch", "ssim_slice", "ssim_patch", "psnr_slice",
                                              "psnr_patch", "input_ssim_slice", "stopped_early")}))
    print(f"Run written to {workdir}: config.json, metrics.jsonl, checkpoints/, samples.png")


def evaluate_job():
    from mrirecon_jax import evaluate

    workdir = workdir_flag()
    result = evaluate.evaluate_run(workdir, FLAGS.checkpoint, data_dir=FLAGS.data_dir, cache_dir=FLAGS.cache_dir,
                                   kinds=FLAGS.kinds)
    for kind, entry in result["kinds"].items():
        best = entry["best_baseline"]
        print(json.dumps({"kind": kind, **{k: entry[k] for k in ("ssim_slice", "ssim_patch", "psnr_slice")},
                          "thesis_ssim_slice": entry["thesis_compat"]["ssim_slice"], "best_baseline": best,
                          "baseline_ssim_slice": entry["baselines"][best]["ssim_slice"],
                          "baseline_ssim_patch": entry["baselines"][best]["ssim_patch"]}))
    print(f"Evaluation of step {result['checkpoint_step']} on {result['n_slices']} slices of "
          f"{result['n_subjects']} subjects written to {workdir}/eval: metrics.json and figures")


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
    cfg = config_from_flags()
    benchmark.run_benchmark(
        cfg, models=FLAGS.models or [cfg.model],
        image_sizes=_int_list("image_sizes", cfg.image_size), batch_sizes=_int_list("batch_sizes", cfg.batch_size),
        dtypes=FLAGS.dtypes or [cfg.dtype], output=Path(FLAGS.output or "runs/benchmark/bench.json"),
        peer=FLAGS.peer, trace_dir=Path(FLAGS.trace_dir) if FLAGS.trace_dir else None)


def gallery_job():
    from mrirecon_jax import gallery

    output = required_flag("output")
    print(f"Gallery written to {gallery.save_gallery(config_from_flags(), output)}")


def reconstruct_job():
    summary = infer.reconstruct(workdir_flag(), required_flag("input"), required_flag("output"),
                                checkpoint=FLAGS.checkpoint, resample_to_input=FLAGS.resample_to_input,
                                corrupt=FLAGS.corrupt, seed=FLAGS.seed, mask_path=FLAGS.mask)
    print(json.dumps(summary))


def detection_flags() -> infer.DetectionSettings:
    """The detection settings given as flags (each overrides the run's own; None keeps it)."""
    names = [field.name for field in dataclasses.fields(infer.DetectionSettings)]
    return infer.DetectionSettings(**{name: FLAGS[name].value if FLAGS[name].present else None for name in names})


def detect_job():
    summary = infer.detect(workdir_flag(), required_flag("input"), required_flag("output"),
                           checkpoint=FLAGS.checkpoint, brain_mask_path=FLAGS.brain_mask,
                           lesion_mask_path=FLAGS.lesion_mask, settings=detection_flags(),
                           resample_to_input=FLAGS.resample_to_input)
    print(json.dumps(summary))


def detect_eval_job():
    workdir = workdir_flag()
    results = infer.detect_eval(workdir, FLAGS.data_dir, checkpoint=FLAGS.checkpoint,
                                max_subjects=FLAGS.max_subjects, settings=detection_flags(), seed=FLAGS.seed)
    print(json.dumps({score: {"kinds": r["kinds"], "overall": r["overall"]} for score, r in results["scores"].items()}))
    print(f"Detection metrics written to {workdir}/detect: metrics.json and cases.png")
    if FLAGS.lesion_dir:
        lesions = infer.lesion_eval(workdir, FLAGS.lesion_dir, checkpoint=FLAGS.checkpoint,
                                    settings=detection_flags(), max_subjects=FLAGS.max_subjects)
        print(json.dumps({"lesions": {"mean": lesions["mean"],
                                      "cases": {n: {s: {k: c[s][k] for k in ("auroc", "auprc", "best_dice",
                                                                           "dice_at_healthy_threshold")}
                                                    for s in lesions["scores"]} for n, c in lesions["cases"].items()}}}))
        print(f"Lesion scores written to {workdir}/detect: lesions.json and lesion_<case>.png")


def config_job():
    print(config_from_flags().to_json())


def list_job():
    names = experiment_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {experiment_description(name)}")


JOBS = {"train": train_job, "evaluate": evaluate_job, "report": report_job, "benchmark": benchmark_job,
        "gallery": gallery_job, "reconstruct": reconstruct_job, "detect": detect_job,
        "detect_eval": detect_eval_job, "list": list_job, "config": config_job}


class _HideLibraryInfo(std_logging.Filter):
    """Keep orbax's per-save INFO lines out of the console; warnings still show."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_HideLibraryInfo())
    try:
        select_backend(FLAGS.backend, launch_from_flags())
        JOBS[FLAGS.mode]()
    except UserError as err:
        if FLAGS.verbosity >= 1:  # --verbosity=1 asks for the traceback too
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    app.run(main)
