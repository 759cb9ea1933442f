"""The layout and I/O of a run directory; only this module knows its file names.

    WORKDIR/config.json     the run's Config            WORKDIR/checkpoints/   orbax: params, opt_state, meta (+ ema)
    WORKDIR/split.json      data source and subjects    WORKDIR/eval/          the evaluate job's metrics and figures
    WORKDIR/metrics.jsonl   one record per validation   WORKDIR/detect/        the detect_eval job's metrics and figures
    WORKDIR/samples.png     validation samples          WORKDIR/events.out.tfevents.*   TensorBoard (tensorboardX)
    WORKDIR/run.lock        held by the live training   WORKDIR/config_changes.jsonl    --allow_config_change's record

JSON is written atomically (a temporary file, then a rename) with non-finite numbers as ``null``. A checkpoint is
orbax's: written into a temporary folder and renamed when complete, so a half-written one is never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from mrirecon_jax.config import RESUMABLE_FIELDS, Config, UserError

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "run.lock"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
SAMPLES_FILE = "samples.png"
CHECKPOINT_DIR = "checkpoints"
EVAL_DIR = "eval"
DETECT_DIR = "detect"
METRICS_JSON = "metrics.json"  # inside eval/ and detect/
LESIONS_JSON = "lesions.json"  # inside detect/: scores on real lesion cases
RUN_POLICY = "run_policy"  # the key of eval/metrics.json's "kinds" under which the run's own policy is evaluated
TOLD_MASK = "model_told_mask"  # eval/metrics.json: a --mask_input run told the patch's mask, as by reconstruct --mask
BEST_METRIC = "ssim_slice"  # the validation metric that picks the best checkpoint (higher is better)
CHECKPOINTS = ("best", "last")  # besides a step number
TRAINING_TREES = ("params", "opt_state", "ema")  # a checkpoint's array items (ema only with --ema_decay)


def finite(tree):
    """A JSON-able copy of `tree` with NaN and inf (Python or numpy floats) as None."""
    if isinstance(tree, dict):
        return {k: finite(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite(v) for v in tree]
    if isinstance(tree, (float, np.floating)):
        return float(tree) if math.isfinite(tree) else None
    if isinstance(tree, np.integer):
        return int(tree)
    if isinstance(tree, np.bool_):
        return bool(tree)
    return tree


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomically(path, write) -> Path:
    """Call write(temporary path), then rename it onto `path`; on failure nothing is left behind."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix="".join(path.suffixes))
    os.close(fd)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return path


def write_json(path, obj) -> Path:
    """`obj` as indented JSON at `path`, atomically, with non-finite numbers as null."""
    text = json.dumps(finite(obj), indent=2, allow_nan=False)
    return write_atomically(path, lambda temp: Path(temp).write_text(text + "\n"))


def read_json(path, what: str):
    """The JSON at `path`; a UserError naming `what` when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: {what}.")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}): {what}.") from None


class Workdir:
    """One run directory."""

    def __init__(self, path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def samples_file(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def tensorboard_dir(self) -> Path:
        """Where training's TensorBoard event files go: the workdir itself, beside metrics.jsonl."""
        return self.path

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    @property
    def detect_dir(self) -> Path:
        return self.path / DETECT_DIR

    # ------------------------------------------------------------------------------------- config and split

    def holds_run(self) -> bool:
        return self.file(CONFIG_FILE).is_file()

    def require_run(self) -> None:
        """The one error for a folder that holds no run."""
        if not self.holds_run():
            raise UserError(f"--workdir={self.path} holds no run (no {CONFIG_FILE}); train one there first.")

    def read_config(self) -> Config:
        self.require_run()
        path = self.file(CONFIG_FILE)
        try:
            return Config.from_json(path.read_text())
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise UserError(f"{path} is unreadable ({err}); use another --workdir.") from None

    @contextlib.contextmanager
    def lock(self, enabled: bool = True) -> Iterator[None]:
        """Hold the workdir for one live run (an advisory lock on WORKDIR/run.lock, released when the process
        ends, however it ends); a second run on it is refused. Creates the workdir, and removes it again if it
        was created here and holds nothing else when the block fails. `enabled=False` (a process other than the
        writer of a multi-process run) does nothing."""
        if not enabled:
            yield
            return
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK_FILE, "a+")
        except OSError as err:
            raise UserError(f"--workdir={self.path} cannot be created or written ({err.strerror}).") from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UserError(f"--workdir={self.path} is in use by a live run ({holder}); wait for it to end or "
                                "use another --workdir.") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {os.uname().nodename}\n")
            handle.flush()
            ok = False
            try:
                yield
                ok = True
            finally:
                if not ok and created and {p.name for p in self.path.iterdir()} <= {LOCK_FILE}:
                    os.remove(self.path / LOCK_FILE)
                    self.path.rmdir()
        finally:
            handle.close()

    def config_changes(self, cfg: Config) -> dict:
        """{field: [recorded, given]} for the fields outside RESUMABLE_FIELDS where `cfg` differs from the run
        recorded here (empty when the workdir holds no run)."""
        if not self.holds_run():
            return {}
        previous = dataclasses.asdict(self.read_config())
        current = dataclasses.asdict(cfg)
        return {k: [previous.get(k), current[k]] for k in sorted(current)
                if k not in RESUMABLE_FIELDS and previous.get(k) != current[k]}

    def check_resumable(self, cfg: Config, allow_change: bool = False) -> None:
        """Refuse a workdir that holds a run with other settings (fields outside RESUMABLE_FIELDS), unless
        `allow_change`."""
        changed = self.config_changes(cfg)
        if changed and not allow_change:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise UserError(f"{self.path} holds a run with another configuration ({detail}); use another "
                            "--workdir, the same settings to resume it, or --allow_config_change.")

    def record_config(self, cfg: Config, allow_change: bool = False, step: int = 0) -> None:
        """Create the workdir and record the config (after check_resumable); with `allow_change`, what changed
        from the recorded config is appended to WORKDIR/config_changes.jsonl with the step it applies from."""
        self.check_resumable(cfg, allow_change)
        changed = self.config_changes(cfg)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--workdir={self.path} cannot be created ({err.strerror}).") from None
        if changed:
            with self.file(CONFIG_CHANGES_FILE).open("a") as f:
                f.write(json.dumps({"from_step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "changed": changed}, sort_keys=True) + "\n")
        write_json(self.file(CONFIG_FILE), dataclasses.asdict(cfg))

    def read_config_changes(self) -> list[dict]:
        path = self.file(CONFIG_CHANGES_FILE)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def write_split(self, split: dict) -> None:
        write_json(self.file(SPLIT_FILE), split)

    def read_split(self) -> dict:
        self.require_run()
        return read_json(self.file(SPLIT_FILE), "the run's data split, written when it trained")

    # ------------------------------------------------------------------------------------- metrics lines

    def append_metrics(self, record: dict) -> None:
        with self.file(METRICS_FILE).open("a") as f:
            f.write(json.dumps(finite(record), sort_keys=True, allow_nan=False) + "\n")

    def keep_metrics_through(self, step: int) -> int:
        """Drop the metrics lines of steps after `step` (the checkpoint a run resumes from), and any line cut
        short by a kill, so a resumed run does not log a step twice; returns how many lines were dropped."""
        path = self.file(METRICS_FILE)
        if not path.is_file():
            return 0
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
        if len(kept) < len(lines):
            write_atomically(path, lambda temp: Path(temp).write_text("".join(f"{line}\n" for line in kept)))
        return len(lines) - len(kept)

    def read_metrics(self) -> list[dict]:
        """The run's metrics.jsonl records (one per validation), in step order."""
        self.require_run()
        path = self.file(METRICS_FILE)
        if not path.is_file():
            raise UserError(f"{self.path} has no {METRICS_FILE} yet; train the run there first.")
        try:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON lines ({err}).") from None
        return sorted(records, key=lambda r: r["step"])

    # ------------------------------------------------------------------------------------- checkpoints

    def checkpoint_manager(self, keep: int = 3) -> ocp.CheckpointManager:
        """Orbax manager of WORKDIR/checkpoints keeping the last `keep` checkpoints and the best by BEST_METRIC;
        each checkpoint holds the items params, opt_state, meta (JSON) and, in a run with --ema_decay, ema."""
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=lambda m: m[BEST_METRIC],
                                               best_mode="max", create=True, cleanup_tmp_directories=True)
        handlers = {**{name: ocp.StandardCheckpointHandler() for name in TRAINING_TREES},
                    "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager((self.path / CHECKPOINT_DIR).absolute(), options=options,
                                     item_handlers=handlers)

    @staticmethod
    def save_checkpoint(manager: ocp.CheckpointManager, step: int, trees: dict, meta: dict,
                        metrics: Optional[dict] = None) -> None:
        """Save the training state at `step`: `trees` holds params, opt_state and, with --ema_decay, ema (with
        validation metrics it is a candidate for 'best'). A save that fails (a full disk, say) is a UserError
        naming the last complete checkpoint, which is kept."""
        if step in manager.all_steps():
            return
        try:
            manager.save(step, args=ocp.args.Composite(**{name: ocp.args.StandardSave(tree)
                                                          for name, tree in trees.items()},
                                                       meta=ocp.args.JsonSave(meta)),
                         metrics=None if metrics is None else {BEST_METRIC: metrics[BEST_METRIC]})
            manager.wait_until_finished()
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            last = manager.latest_step()
            kept = f"the last complete checkpoint, step {last}, is kept" if last is not None else "none was complete"
            hint = " Free some space and" if err.errno == errno.ENOSPC else ""
            raise UserError(f"Saving the checkpoint of step {step} in {manager.directory} failed ({reason}); "
                            f"{kept}.{hint} Rerun the same command to resume.") from None

    @staticmethod
    def restore_training(manager: ocp.CheckpointManager, step: int, trees: dict) -> tuple[dict, dict]:
        """(trees, meta) at `step`: those of the items named in `trees` that the checkpoint holds (a run may have
        turned --ema_decay on since), onto the shapes, dtypes and shardings of theirs."""
        held = [name for name in trees if name in manager.item_metadata(step).keys()]
        restored = manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, trees[name]))
               for name in held}, meta=ocp.args.JsonRestore()))
        return {name: restored[name] for name in held}, dict(restored["meta"])

    def restore_params(self, checkpoint: str, abstract_params):
        """(params, step) of checkpoint `best` (by validation SSIM), `last` or a step number: the parameters that
        inference uses alone (the ema item in a run with --ema_decay, else params, as is a checkpoint from before
        the flag was turned on; no optimizer state is read), onto `abstract_params` (jax.ShapeDtypeStruct leaves)."""
        cfg = self.read_config()
        manager = self.checkpoint_manager(cfg.keep_checkpoints)
        try:
            available = manager.all_steps()
            if not available:
                raise UserError(f"{self.path} holds no checkpoint yet.")
            if checkpoint == "best":
                step = manager.best_step()
            elif checkpoint == "last":
                step = manager.latest_step()
            elif str(checkpoint).isdigit() and int(checkpoint) in available:
                step = int(checkpoint)
            else:
                raise UserError(f"--checkpoint={checkpoint} is not one of {', '.join(CHECKPOINTS)} or a saved step "
                                f"({', '.join(map(str, sorted(available)))}).")
            item = "ema" if cfg.ema_decay and "ema" in manager.item_metadata(step).keys() else "params"
            restored = manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore(abstract_params)}))
        finally:
            manager.close()
        return restored[item], int(step)

    # ------------------------------------------------------------------------------------- job outputs

    def output_dir(self, name: str) -> Path:
        """WORKDIR/<name>/ (EVAL_DIR or DETECT_DIR), created."""
        folder = self.path / name
        folder.mkdir(exist_ok=True)
        return folder

    def figure(self, folder: str, name: str) -> Path:
        """Where figure `name` of the job output `folder` (EVAL_DIR or DETECT_DIR) goes."""
        return self.output_dir(folder) / f"{name}.png"

    def figures(self, folder: str) -> list[Path]:
        """The figures a job wrote into `folder`, sorted by name."""
        return sorted((self.path / folder).glob("*.png"))

    def write_evaluation(self, report: dict) -> Path:
        return write_json(self.output_dir(EVAL_DIR) / METRICS_JSON, report)

    def read_evaluation(self) -> dict:
        self.require_run()
        return read_json(self.eval_dir / METRICS_JSON, f"run --mode=evaluate --workdir={self.path} first")

    def evaluation_is_current(self) -> bool:
        """Whether the evaluate job's metrics exist and are newer than the last training record (a run trained on
        after its evaluation has a stale one)."""
        evaluation, records = self.eval_dir / METRICS_JSON, self.file(METRICS_FILE)
        return evaluation.is_file() and records.is_file() and evaluation.stat().st_mtime >= records.stat().st_mtime

    def write_detection(self, results: dict) -> Path:
        return write_json(self.output_dir(DETECT_DIR) / METRICS_JSON, results)

    def write_lesion_detection(self, results: dict) -> Path:
        """detect_eval's scores on real lesion cases (--lesion_dir)."""
        return write_json(self.output_dir(DETECT_DIR) / LESIONS_JSON, results)

    def read_detection(self) -> Optional[dict]:
        """The detect_eval job's metrics, or None when it has not run."""
        path = self.detect_dir / METRICS_JSON
        return read_json(path, "the detect_eval job's metrics") if path.is_file() else None
