"""Training: the model state, the pure jitted train and eval steps, the loop, orbax checkpoints, metrics logging.

The hot loop uses the functional NNX form: the model is split once into (graphdef, params); the jitted steps
take params and the optax state as plain pytrees (donated) and merge the model inside. Corruptions are drawn
inside the step from a key derived from the step number, so every epoch sees fresh corruptions and a resumed
run continues with exactly the keys it would have used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mrirecon_jax import corruptions, data, losses, metrics, plots
from mrirecon_jax.config import RESUMABLE_FIELDS, Config, UserError
from mrirecon_jax.models import conv, unet

TRAIN_KEY, EVAL_KEY, INIT_KEY = 0, 1, 2  # fold_in tags that separate the uses of the run's seed
COLLAPSE_STD = 1e-3  # validation outputs with a smaller standard deviation are a collapsed (constant) model
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------------- model state

def build_model(cfg: Config, seed: Optional[int] = None) -> unet.UNet:
    """The U-Net that `cfg` describes, initialised from the run's seed."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"Unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}.")
    spec = unet.resolve_spec(cfg.model, cfg.output_activation)
    if cfg.image_size % unet.min_image_size(spec):
        raise UserError(f"--image_size={cfg.image_size} must be a multiple of {unet.min_image_size(spec)} "
                        f"for the {cfg.model!r} U-Net ({len(spec.features) - 1} poolings).")
    key = jax.random.fold_in(jax.random.key(cfg.seed if seed is None else seed), INIT_KEY)
    if cfg.conv_impl not in conv.CONV_IMPLS:
        raise UserError(f"Unknown --conv_impl={cfg.conv_impl!r}; choose one of {', '.join(conv.CONV_IMPLS)}.")
    return unet.UNet(spec, dtype=DTYPES[cfg.dtype], conv_impl=cfg.conv_impl, rngs=nnx.Rngs(params=key))


def parse_policy(spec: str, flag: str = "--corruptions") -> corruptions.Policy:
    """The corruption policy of a spec given as `flag`, with a bad spec reported as a UserError."""
    try:
        return corruptions.parse_policy(spec)
    except ValueError as err:
        raise UserError(f"{flag}={spec!r}: {err}") from None


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Adam with the run's learning rate (the thesis: 1e-4)."""
    if not cfg.learning_rate > 0:
        raise UserError(f"--learning_rate must be positive, got {cfg.learning_rate}.")
    return optax.adam(cfg.learning_rate)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted functions of one run, built once from its static parts."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    train_step: Callable  # (state, clean_batch) -> (state, loss)
    reconstruct: Callable  # (params, corrupted_batch) -> reconstruction
    eval_step: Callable  # (params, clean_batch, slice_indices) -> dict of per-slice arrays


def make_steps(cfg: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> Steps:
    """Build the pure train and eval steps for one configuration."""
    policy = parse_policy(cfg.corruptions)
    loss_fn = losses.get_loss(cfg.loss)
    base_key = jax.random.key(cfg.seed)
    train_key = jax.random.fold_in(base_key, TRAIN_KEY)
    eval_key = jax.random.fold_in(base_key, EVAL_KEY)

    def apply(params, images):
        return nnx.merge(graphdef, params)(images)

    def train_step(state, clean):
        key = jax.random.fold_in(train_key, state["step"])
        corrupted, _, _ = corruptions.corrupt_batch(key, clean, policy)

        def objective(params):
            return loss_fn(apply(params, corrupted), clean)

        loss, grads = jax.value_and_grad(objective)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

    def eval_step(params, clean, slice_indices):
        # One fixed key per validation slice: results do not depend on batch size or on the step.
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(eval_key, slice_indices)
        corrupted, masks, kinds = jax.vmap(corruptions.corrupt_image, in_axes=(0, 0, None))(keys, clean, policy)
        pred = apply(params, corrupted)
        out = metrics.slice_metrics(pred, clean, masks)
        out.update({f"input_{k}": v for k, v in metrics.slice_metrics(corrupted, clean, masks).items()})
        out.update(kind=kinds, pred_mean=jnp.mean(pred, axis=(1, 2, 3)),
                   pred_sq_mean=jnp.mean(jnp.square(pred.astype(jnp.float32)), axis=(1, 2, 3)))
        return out, (corrupted, pred, masks)

    return Steps(graphdef=graphdef, tx=tx,
                 train_step=jax.jit(train_step, donate_argnums=0),
                 reconstruct=jax.jit(apply),
                 eval_step=jax.jit(eval_step))


def init_state(cfg: Config, mesh: jax.sharding.Mesh):
    """(graphdef, tx, state) with the state replicated over the mesh."""
    model = build_model(cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(cfg)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    return graphdef, tx, jax.device_put(state, NamedSharding(mesh, P()))


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of the default backend; the batch is sharded along its `data` axis."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate_slices(steps: Steps, params, images: np.ndarray, batch_size: int, mesh: jax.sharding.Mesh,
                    policy_kinds: tuple[str, ...] = (), keep_all: bool = False) -> tuple[dict, dict]:
    """Corrupt every slice with its fixed key, reconstruct, and average the metrics over all slices.

    Returns (summary, samples): summary holds the means of metrics.SLICE_METRICS (patch values averaged over the
    slices that have a patch), the same for the corrupted input under "input_*", per-kind SSIM, and the output
    standard deviation; samples holds the first batch's corrupted inputs, outputs and masks (numpy), or with
    `keep_all` those of every slice in order (and "clean"), with each slice's metrics under "per_slice".
    """
    n_dev = mesh.devices.size
    batch_size = max(n_dev, math.ceil(min(batch_size, len(images)) / n_dev) * n_dev)
    sharding = NamedSharding(mesh, P("data"))
    per_slice: dict[str, list] = {}
    kept: dict[str, list] = {}  # with keep_all: every slice's images
    samples = None
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        count = len(batch)
        indices = np.arange(start, start + batch_size, dtype=np.int32)
        if count < batch_size:  # pad with copies; padded rows are dropped below
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
        out, (corrupted, pred, masks) = steps.eval_step(
            params, jax.device_put(batch, sharding), jax.device_put(indices, sharding))
        for name, values in out.items():
            per_slice.setdefault(name, []).append(np.asarray(values)[:count])
        if keep_all:
            for name, array in (("corrupted", corrupted), ("reconstructed", pred), ("masks", masks), ("clean", batch)):
                kept.setdefault(name, []).append(np.asarray(array)[:count])
        elif samples is None:
            samples = {"corrupted": np.asarray(corrupted), "reconstructed": np.asarray(pred),
                       "masks": np.asarray(masks), "clean": batch}
    values = {name: np.concatenate(parts) for name, parts in per_slice.items()}
    if keep_all:
        samples = {name: np.concatenate(parts) for name, parts in kept.items()} | {"per_slice": values}
    summary = {name: float(np.nanmean(values[name])) for name in metrics.SLICE_METRICS}
    summary.update({f"input_{name}": float(np.nanmean(values[f"input_{name}"])) for name in metrics.SLICE_METRICS})
    output_std = float(np.sqrt(max(np.mean(values["pred_sq_mean"]) - np.mean(values["pred_mean"]) ** 2, 0.0)))
    summary.update(output_std=output_std, collapsed=output_std < COLLAPSE_STD, n_val_slices=int(len(images)))
    for index, kind in enumerate(policy_kinds):
        chosen = values["kind"] == index
        if chosen.any() and len(policy_kinds) > 1:
            summary[f"ssim_slice/{kind}"] = float(np.nanmean(values["ssim_slice"][chosen]))
            summary[f"ssim_patch/{kind}"] = float(np.nanmean(values["ssim_patch"][chosen]))
    return summary, samples


# ----------------------------------------------------------------------------------------------- workdir

def prepare_workdir(cfg: Config, workdir: Path) -> None:
    """Create the workdir and record the config; refuse a workdir that holds a different run."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.json"
    if config_path.exists():
        try:
            previous = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{config_path} is unreadable ({err}); use another --workdir.") from None
        current = dataclasses.asdict(cfg)
        changed = sorted(k for k in current if k not in RESUMABLE_FIELDS and previous.get(k) != current[k])
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {current[k]!r}" for k in changed)
            raise UserError(f"{workdir} holds a run with another configuration ({detail}); "
                            "use another --workdir or the same settings to resume it.")
    config_path.write_text(cfg.to_json())


def checkpoint_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    """Orbax manager in WORKDIR/checkpoints keeping the last `keep` checkpoints and the best by ssim_slice."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["ssim_slice"], reverse=False, n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=lambda m: m["ssim_slice"], best_mode="max", create=True)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state, meta: dict, summary: Optional[dict] = None) -> None:
    """Save state and bookkeeping at the state's step (metrics make it a candidate for 'best')."""
    step = int(state["step"])
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 metrics=None if summary is None else {"ssim_slice": summary["ssim_slice"]})
    manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, state, step: int):
    """(state, meta) restored at `step` onto the shardings and shapes of `state`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A trained model read back from a workdir: its config, the model's graph and parameters, and the step."""

    cfg: Config
    graphdef: nnx.GraphDef
    params: nnx.State
    step: int

    def model(self) -> unet.UNet:
        return nnx.merge(self.graphdef, self.params)


def restore_run(workdir, checkpoint: str = "best") -> TrainedRun:
    """Load the run in `workdir` at checkpoint `best` (by validation SSIM), `last`, or a step number."""
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{workdir} holds no run (no config.json).")
    cfg = Config.from_json(config_path.read_text())
    graphdef, _, state = init_state(cfg, make_mesh())
    manager = checkpoint_manager(workdir, cfg.keep_checkpoints)
    try:
        available = manager.all_steps()
        if not available:
            raise UserError(f"{workdir} holds no checkpoint yet.")
        if checkpoint == "best":
            step = manager.best_step()
        elif checkpoint == "last":
            step = manager.latest_step()
        elif checkpoint.isdigit() and int(checkpoint) in available:
            step = int(checkpoint)
        else:
            raise UserError(f"--checkpoint={checkpoint} is not one of best, last or a saved step "
                            f"({', '.join(map(str, sorted(available)))}).")
        state, _ = restore_checkpoint(manager, state, step)
    finally:
        manager.close()
    return TrainedRun(cfg=cfg, graphdef=graphdef, params=state["params"], step=int(step))


def read_metrics(workdir) -> list[dict]:
    """The run's metrics.jsonl records (one per validation), in step order."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{workdir} has no metrics.jsonl; it holds no trained run.")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON lines ({err}).") from None
    return sorted(records, key=lambda r: r["step"])


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------- the loop

class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so training stops with a final validation."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True
        logging.warning("Signal %d received: stopping after this step with a final validation.", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(cfg: Config, workdir) -> dict:
    """Train (or resume) the run in `workdir`, validating every epoch and when stopping; returns the last summary."""
    workdir = Path(workdir)
    if cfg.batch_size < 1 or cfg.epochs < 1:
        raise UserError("--batch_size and --epochs must be at least 1.")
    policy = parse_policy(cfg.corruptions)
    mesh = make_mesh()
    if cfg.batch_size % mesh.devices.size:
        raise UserError(f"--batch_size={cfg.batch_size} must be a multiple of the {mesh.devices.size} devices.")
    graphdef, tx, state = init_state(cfg, mesh)  # validates model flags before the data is read
    prepare_workdir(cfg, workdir)
    dataset = data.load_dataset(cfg)
    (workdir / "split.json").write_text(json.dumps(
        {"source": dataset.source, "train_subjects": list(dataset.train_subjects),
         "val_subjects": list(dataset.val_subjects), "n_train_slices": len(dataset.train),
         "n_val_slices": len(dataset.val)}, indent=2))
    steps_per_epoch = len(dataset.train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size={cfg.batch_size} is larger than the {len(dataset.train)} training slices.")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    logging.info("Data: %s; %d train / %d val slices; %d steps per epoch; model %s with %d parameters.",
                 dataset.source, len(dataset.train), len(dataset.val), steps_per_epoch, cfg.model,
                 sum(x.size for x in jax.tree.leaves(state["params"])))

    steps = make_steps(cfg, graphdef, tx)
    manager = checkpoint_manager(workdir, cfg.keep_checkpoints)
    meta = {"train_time_s": 0.0}
    if manager.latest_step() is not None:
        state, meta = restore_checkpoint(manager, state, manager.latest_step())
        logging.info("Resumed from step %d in %s.", int(state["step"]), workdir)
    step = int(state["step"])
    batch_sharding = NamedSharding(mesh, P("data"))
    metrics_path = workdir / "metrics.jsonl"

    def validate(epoch: float, train_losses: list, log: bool = True) -> dict:
        summary, samples = evaluate_slices(steps, state["params"], dataset.val, cfg.eval_batch_size, mesh,
                                           policy.kinds)
        train_loss = float(np.mean([float(x) for x in train_losses])) if train_losses else None
        record = {"step": step, "epoch": round(epoch, 4), "wall_time_s": round(meta["train_time_s"], 3),
                  "train_loss": train_loss, **summary}
        if log:
            append_jsonl(metrics_path, record)
        logging.info("step %d epoch %.2f: ssim slice %.4f patch %.4f (input %.4f / %.4f), psnr %.2f dB",
                     step, epoch, summary["ssim_slice"], summary["ssim_patch"], summary["input_ssim_slice"],
                     summary["input_ssim_patch"], summary["psnr_slice"])
        if summary["collapsed"]:
            logging.warning("The model's output has collapsed to a constant (std %.2g); try another "
                            "--output_activation or learning rate.", summary["output_std"])
        return record, samples

    record, samples = None, None
    train_losses: list = []
    started = time.perf_counter()
    segment_start, segment_step = started, step
    stopped_early = False
    with _StopRequest() as stop, tqdm(total=total_steps, initial=step, unit="step", disable=None,
                                      dynamic_ncols=True) as bar:
        while step < total_steps:
            epoch, within = divmod(step, steps_per_epoch)
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(dataset.train))
            batch = dataset.train[order[within * cfg.batch_size:(within + 1) * cfg.batch_size]]
            state, loss = steps.train_step(state, jax.device_put(batch, batch_sharding))
            train_losses.append(loss)
            step += 1
            bar.update(1)
            now = time.perf_counter()
            if step % 10 == 0 or step == total_steps:
                loss_value = float(loss)  # waits for the step: the rate below is honest
                now = time.perf_counter()
                rate = (step - segment_step) * cfg.batch_size / max(now - segment_start, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
            meta["train_time_s"] += now - started
            started = now
            out_of_time = (cfg.max_train_minutes is not None
                           and meta["train_time_s"] >= 60.0 * cfg.max_train_minutes)
            epoch_end = step % steps_per_epoch == 0
            if epoch_end or step == total_steps or out_of_time or stop.requested:
                record, samples = validate(step / steps_per_epoch, train_losses)
                train_losses = []
                save_checkpoint(manager, state, meta, record)
                segment_start, segment_step = time.perf_counter(), step
                started = segment_start  # validation time is not training time
            elif cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                save_checkpoint(manager, state, meta)
            if out_of_time or stop.requested:
                stopped_early = True
                logging.info("Stopping at step %d: %s.", step,
                             "time budget spent" if out_of_time else "signal received")
                break
    if record is None:  # nothing left to train: report on what the workdir holds, log nothing new
        logging.info("The run in %s is already complete at step %d.", workdir, step)
        record, samples = validate(step / steps_per_epoch, [], log=False)
    manager.close()
    shown = np.unique(np.linspace(0, len(samples["clean"]) - 1, 5).astype(int))
    plots.save_sample_grid(workdir / "samples.png", samples["corrupted"][shown], samples["reconstructed"][shown],
                           samples["clean"][shown], samples["masks"][shown])
    record["stopped_early"] = stopped_early
    return record
