"""Training: the model, the pure jitted train step and (built separately) eval step, the loop, the device mesh.

The hot loop uses the functional NNX form: the model is split once into (graphdef, params); the jitted steps
take params and the optax state as plain pytrees (donated) and merge the model inside. Corruptions are drawn
inside the step from a key derived from the step number, so every epoch sees fresh corruptions and a resumed
run continues with exactly the keys it would have used. Each corrupted slice is normalised by
``data.normalise.normalise_input``, the model's output mapped back by the same affine and compared with the clean
slice, so the model learns exactly what ``reconstruct`` asks of it. Runs that only use a model
(:func:`restore_model`) read its parameters alone: no optimizer, no loss, no corruption policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import platform
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mrirecon_jax import corruptions, distributed, losses, metrics, plots
from mrirecon_jax import summaries as summaries_lib
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import dataset as dataset_lib
from mrirecon_jax.data import stream
from mrirecon_jax.data.normalise import denormalise, normalise_input
from mrirecon_jax.models import unet
from mrirecon_jax.workdir import TRAINING_TREES, Workdir

TRAIN_KEY, EVAL_KEY, INIT_KEY = 0, 1, 2  # fold_in tags that separate the uses of the run's seed
COLLAPSE_STD = 1e-3  # validation outputs with a smaller standard deviation are a collapsed (constant) model
THESIS_SUMMARY = ("thesis_ssim_slice", "thesis_ssim_patch")  # the thesis's own SSIM, logged beside the standard


# ----------------------------------------------------------------------------------------------- the model

def build_model(cfg: Config) -> unet.UNet:
    """The U-Net that `cfg` describes, initialised from the run's seed."""
    spec = unet.checked_spec(cfg.model, cfg.output_activation, cfg.norm, cfg.image_size, cfg.dtype, cfg.conv_impl)
    if cfg.train_crop and cfg.train_crop % unet.min_image_size(spec):
        raise UserError(f"--train_crop={cfg.train_crop} must be a multiple of {unet.min_image_size(spec)} for the "
                        f"{cfg.model!r} U-Net.")
    return _initialised_unet(spec, cfg.dtype, cfg.conv_impl, 2 if cfg.mask_input else 1,
                             jax.random.fold_in(jax.random.key(cfg.seed), INIT_KEY))


@functools.partial(nnx.jit, static_argnums=(0, 1, 2, 3))
def _initialised_unet(spec: unet.UNetSpec, dtype: str, conv_impl: str, in_features: int, key) -> unet.UNet:
    """The U-Net initialised in one compiled program (eagerly, each kernel's initialiser compiles on its own: about
    10 s of a new process on 2 cores); the same parameters either way."""
    return unet.UNet(spec, in_features=in_features, dtype=unet.DTYPES[dtype], conv_impl=conv_impl,
                     rngs=nnx.Rngs(params=key))


def model_apply(graphdef: nnx.GraphDef, flip_average: bool = False, mask_input: bool = False) -> Callable:
    """(params, normalised NHWC batch, hidden-pixel masks or None) -> the model's output, in the frame of its input.

    With `mask_input` the masks (zeros when None: nothing known to be hidden) are the model's second input
    channel; without, they are ignored. With `flip_average` the mean of its outputs on the batch and on the
    batch's left-right mirror image (test-time augmentation).
    """
    def apply(params, images, masks=None):
        model = nnx.merge(graphdef, params)
        if mask_input:
            masks = jnp.zeros_like(images) if masks is None else masks.astype(images.dtype)
            images = jnp.concatenate([images, masks], axis=-1)
        if not flip_average:
            return model(images)
        both = model(jnp.concatenate([images, images[:, :, ::-1]]))
        return 0.5 * (both[:len(images)] + both[len(images):, :, ::-1])
    return apply


def parse_policy(spec: str, flag: str = "--corruptions") -> corruptions.Policy:
    """The corruption policy of a spec given as `flag`, with a bad spec reported as a UserError."""
    try:
        return corruptions.parse_policy(spec)
    except ValueError as err:
        raise UserError(f"{flag}={spec!r}: {err}") from None


def device_description() -> str:
    """The devices a run trains on, as its metrics record them: "1 x NVIDIA H200", "1 x cpu (AMD EPYC, 2 cores)",
    "16 x NVIDIA H200 in 2 processes"."""
    devices = jax.devices()
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        kind = f"{kind} ({_processor_name()}, {cores} cores)"
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{len(devices)} x {kind}{processes}"


def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over `devices` (default: every device of every process); the batch is sharded along its `data`
    axis, parameters and optimizer state are replicated."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, flag: str = "--batch_size") -> None:
    """Refuse a global batch that the mesh's devices cannot share equally."""
    if batch_size % mesh.devices.size:
        raise UserError(f"{flag}={batch_size} must be a multiple of the {mesh.devices.size} devices.")


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global batch of which this process holds the rows `local` (each process feeds its own part)."""
    return jax.make_array_from_process_local_data(sharding, local)


def shared_batch(full: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global batch that every process holds whole (the same rows on each), sharded as `sharding` says."""
    return jax.make_array_from_process_local_data(sharding, full, full.shape)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained run's model read back from its workdir: config, graph, parameters, step, and where it came from."""

    cfg: Config
    graphdef: nnx.GraphDef
    params: nnx.State
    step: int
    source: str  # "<workdir> step <step>", recorded in outputs

    @functools.cached_property
    def apply(self) -> Callable:
        """Jitted: (normalised NHWC batch, hidden-pixel masks or None) -> the model's output, in the frame of its
        input."""
        apply = model_apply(self.graphdef, self.cfg.flip_average, bool(self.cfg.mask_input))
        return functools.partial(jax.jit(apply), self.params)


def restore_model(workdir, checkpoint: str = "best") -> TrainedModel:
    """The model of the run in `workdir` at `checkpoint` (best, last or a step): its parameters only."""
    work = Workdir(workdir)
    cfg = work.read_config()
    model = nnx.eval_shape(lambda: build_model(cfg))  # shapes only: nothing is initialised
    graphdef, abstract = nnx.split(model, nnx.Param)
    replicated = NamedSharding(make_mesh(), P())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    params, step = work.restore_params(checkpoint, abstract)
    return TrainedModel(cfg=cfg, graphdef=graphdef, params=params, step=step, source=f"{work} step {step}")


# ----------------------------------------------------------------------------------------------- the steps

LR_SCHEDULES = ("constant", "cosine", "cosine_time")
TIMED_SCHEDULES = ("cosine_time",)  # set by the loop before each step, from the training time spent


def learning_rate_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
    """The run's learning rate per step: a linear warm-up over cfg.warmup_steps, then constant or a cosine decay
    to zero at `total_steps` (the run's planned end). For a timed schedule, the rate at the start of training (the
    loop sets it before each step: :func:`timed_learning_rate`)."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"Unknown --lr_schedule={cfg.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}.")
    if cfg.lr_schedule in TIMED_SCHEDULES:
        return optax.constant_schedule(timed_learning_rate(cfg, total_steps, 0, 0.0))
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.lr_schedule == "cosine":
        if not warmup:
            return optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps, 1))
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1))
    if not warmup:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                 optax.constant_schedule(cfg.learning_rate)], [warmup])


def timed_learning_rate(cfg: Config, total_steps: int, step: int, train_time_s: float) -> float:
    """--lr_schedule=cosine_time: the rate of update `step` (0-based) after `train_time_s` of training: a linear
    warm-up over cfg.warmup_steps times a cosine decay over the run's progress, the larger of its share of the
    planned steps and of the time budget (cfg.max_train_minutes, if any), so that the rate reaches zero when either
    runs out, on a fast machine (more steps) or a busy one (fewer), instead of being cut by the budget half-way down
    its decay."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    ramp = min(1.0, step / warmup) if warmup else 1.0
    progress = step / max(total_steps, 1)
    if cfg.max_train_minutes is not None:
        progress = max(progress, train_time_s / (60.0 * cfg.max_train_minutes))
    progress = min(1.0, progress)
    return cfg.learning_rate * ramp * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    """Adam with the run's learning rate and schedule (the thesis: constant 1e-4); a timed schedule's rate is a
    hyperparameter in the optimizer state (optax.inject_hyperparams), for the loop to set."""
    schedule = learning_rate_schedule(cfg, total_steps)
    if cfg.lr_schedule in TIMED_SCHEDULES:
        return optax.inject_hyperparams(optax.adam)(learning_rate=float(schedule(0)))
    return optax.adam(schedule)


def with_learning_rate(state: dict, rate: float) -> dict:
    """The train state of a timed schedule with its learning rate set to `rate` (same dtype and sharding)."""
    opt_state = state["opt_state"]
    current = opt_state.hyperparams["learning_rate"]
    value = jax.device_put(jnp.asarray(rate, current.dtype), current.sharding)
    return {**state, "opt_state": opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": value})}


def init_train_state(cfg: Config, mesh: jax.sharding.Mesh, total_steps: int = 1000):
    """(graphdef, tx, state) with the state (params, optimizer state, with --ema_decay the parameters' moving
    average, step) replicated over the mesh; the learning-rate schedule ends at `total_steps`."""
    graphdef, params = nnx.split(build_model(cfg), nnx.Param)
    tx = make_optimizer(cfg, total_steps)
    state = {"params": params, "opt_state": tx.init(params), **counters(0)}
    if cfg.ema_decay:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return graphdef, tx, jax.device_put(state, NamedSharding(mesh, P()))


def inference_params(state: dict):
    """The parameters that validation and checkpoints' users apply: the moving average when the run keeps one."""
    return state.get("ema", state["params"])


def counters(step: int, nonfinite: int = 0) -> dict:
    """The train state's counters: the step, the updates skipped as non-finite, the first such step (-1: none)."""
    return {"step": jnp.asarray(step, jnp.int32), "nonfinite": jnp.asarray(nonfinite, jnp.int32),
            "first_nonfinite": jnp.asarray(-1, jnp.int32)}


def reconstruct_corrupted(apply: Callable, params, corrupted, nonnegative: bool,
                          window: Optional[Callable] = None, masks=None):
    """The model's reconstruction of corrupted slices in their own units: normalised, applied (told the hidden
    pixels' `masks`, if any), mapped back; with `window` (a crop) of that part of each slice, normalised as the
    whole slice is."""
    x, offset, scale = normalise_input(corrupted)
    if window is not None:
        x = window(x)
        masks = None if masks is None else window(masks)
    return denormalise(apply(params, x, masks), offset, scale, nonnegative)


def parse_augmentation(spec: str) -> tuple[str, ...]:
    """The train-time augmentations of --augment, with a bad spec reported as a UserError."""
    try:
        return corruptions.parse_augmentation(spec)
    except ValueError as err:
        raise UserError(f"--augment={spec!r}: {err}") from None


def make_train_step(cfg: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    policy: corruptions.Policy) -> Callable:
    """Jitted (state, clean batch) -> (state, loss), the state donated.

    Each step augments the clean batch (cfg.augment), corrupts it (`policy`), normalises the corrupted slices,
    and scores the model's output, mapped back, against the (augmented) clean slices; the patched pixels weigh
    cfg.patch_weight more in the loss, the head's pixels cfg.foreground_weight more; with cfg.train_crop the model
    and the loss see one random window of each slice; with cfg.mask_input the model is told the patch's mask on
    that fraction of the slices (zeros on the others), grown by up to cfg.mask_slack_px; with cfg.ema_decay the
    moving average of the parameters follows each update. An update whose loss or gradient is not finite is not applied: the state counts it
    (``nonfinite``) and keeps the first such step (``first_nonfinite``, -1 if none), for the loop to read when it
    next syncs, with no host round trip of its own.
    """
    loss_fn = losses.get_loss(cfg.loss)
    augmentations = parse_augmentation(cfg.augment)
    apply = model_apply(graphdef, mask_input=bool(cfg.mask_input))
    train_key = jax.random.fold_in(jax.random.key(cfg.seed), TRAIN_KEY)

    def train_step(state, clean):
        key = jax.random.fold_in(train_key, state["step"])
        if augmentations:
            clean = corruptions.augment_batch(jax.random.fold_in(key, 1), clean, augmentations)
        corrupted, masks, _ = corruptions.corrupt_batch(key, clean, policy)
        given = None
        if cfg.mask_input:
            told = jax.random.bernoulli(jax.random.fold_in(key, 3), cfg.mask_input, (len(masks), 1, 1, 1))
            given = masks * told
            if cfg.mask_slack_px:
                given = corruptions.grown_masks(jax.random.fold_in(key, 4), given, cfg.mask_slack_px)
        weights = None  # the extra weights, only those asked for (no mask is computed for a zero weight)
        if cfg.patch_weight:
            weights = 1.0 + cfg.patch_weight * masks
        if cfg.foreground_weight:
            weights = (1.0 if weights is None else weights) + cfg.foreground_weight * losses.foreground_mask(clean)
        window = None
        if cfg.train_crop:  # one window per slice, the same for its input, target and weights
            window = functools.partial(corruptions.random_window, jax.random.fold_in(key, 2), size=cfg.train_crop)
            clean = window(clean)
            weights = None if weights is None else window(weights)

        def objective(params):
            pred = reconstruct_corrupted(apply, params, corrupted, cfg.nonnegative, window, given)
            return loss_fn(pred, clean, weights)

        loss, grads = jax.value_and_grad(objective)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.stack([jnp.isfinite(loss)] + [jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]).all()
        keep_if_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        first = jnp.where(~finite & (state["first_nonfinite"] < 0), state["step"], state["first_nonfinite"])
        new = {"params": keep_if_finite(params, state["params"]),
               "opt_state": keep_if_finite(opt_state, state["opt_state"]), "step": state["step"] + 1,
               "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32), "first_nonfinite": first}
        if "ema" in state:  # debiased: the average of the updates so far, the initialisation weighing nothing
            weight = (1.0 - cfg.ema_decay) / (1.0 - cfg.ema_decay ** (state["step"] + 1).astype(jnp.float32))
            new["ema"] = optax.incremental_update(new["params"], state["ema"], weight)
        return new, loss

    return jax.jit(train_step, donate_argnums=0)


def always_told_mask(cfg: Config) -> bool:
    """Whether the run's model is told the patch's mask on every training slice (--mask_input=1): then validation
    tells it too, and inference needs a mask; otherwise validation measures it told nothing, as a user runs it."""
    return cfg.mask_input == 1.0


def make_eval_step(graphdef: nnx.GraphDef, policy: corruptions.Policy, seed: int, nonnegative: bool,
                   flip_average: bool = False, mask_input: bool = False, give_mask: bool = False) -> Callable:
    """Jitted (params, clean batch, slice indices) -> (per-slice metrics, (corrupted, reconstruction, masks)), the
    model applied as inference applies it (`flip_average`, `mask_input`, see :func:`model_apply`); with `give_mask`
    it is told the patch's mask (as reconstruct's --mask tells it), otherwise nothing.

    One fixed key per validation slice (from the seed and the slice's index), so results depend neither on the
    batch size nor on the step, and every evaluation of a checkpoint agrees to the last digit.
    """
    apply = model_apply(graphdef, flip_average, mask_input)
    eval_key = jax.random.fold_in(jax.random.key(seed), EVAL_KEY)

    def eval_step(params, clean, slice_indices):
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(eval_key, slice_indices)
        corrupted, masks, kinds = jax.vmap(corruptions.corrupt_image, in_axes=(0, 0, None))(keys, clean, policy)
        pred = reconstruct_corrupted(apply, params, corrupted, nonnegative, masks=masks if give_mask else None)
        out = metrics.slice_metrics(pred, clean, masks)
        out.update({f"input_{k}": v for k, v in metrics.slice_metrics(corrupted, clean, masks).items()})
        out.update(kind=kinds, pred_mean=jnp.mean(pred, axis=(1, 2, 3)),
                   pred_sq_mean=jnp.mean(jnp.square(pred), axis=(1, 2, 3)))
        return out, (corrupted, pred, masks)

    return jax.jit(eval_step)


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate_slices(eval_step: Callable, params, images: np.ndarray, batch_size: int, mesh: jax.sharding.Mesh,
                    policy_kinds: tuple[str, ...] = (), keep_all: bool = False) -> tuple[dict, dict]:
    """Corrupt every slice with its fixed key, reconstruct, and average the metrics over all slices.

    Returns (summary, samples): summary holds the means of metrics.SLICE_METRICS (patch values averaged over the
    slices that have a patch) and of the thesis's own SSIM (THESIS_SUMMARY), the same standard metrics for the
    corrupted input under "input_*", per-kind SSIM, and the output standard deviation; samples holds the first batch's corrupted inputs, outputs and masks (numpy), or with
    `keep_all` those of every slice in order (and "clean"), with each slice's metrics under "per_slice".
    Every process evaluates every slice (each batch sharded over all devices, the results gathered), so each
    gets the summary one process would; `batch_size` is rounded up to a multiple of the devices, which changes
    no result.
    """
    n_dev = mesh.devices.size
    batch_size = max(n_dev, math.ceil(min(batch_size, len(images)) / n_dev) * n_dev)
    sharding = NamedSharding(mesh, P("data"))
    per_slice: dict[str, list] = {}
    kept: dict[str, list] = {}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        count = len(batch)
        indices = np.arange(start, start + batch_size, dtype=np.int32)
        if count < batch_size:  # pad with copies; padded rows are dropped below
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
        out, (corrupted, pred, masks) = distributed.to_host(eval_step(params, shared_batch(batch, sharding),
                                                                      shared_batch(indices, sharding)))
        out = {name: values[:count] for name, values in out.items()}
        thesis = metrics.thesis_metrics(pred[:count], batch[:count], masks[:count])
        out.update(thesis_ssim_slice=thesis["ssim_slice"], thesis_ssim_patch=thesis["ssim_patch"])
        for name, values in out.items():
            per_slice.setdefault(name, []).append(values)
        if keep_all or not kept:
            for name, array in (("corrupted", corrupted), ("reconstructed", pred), ("masks", masks), ("clean", batch)):
                kept.setdefault(name, []).append(array[:count])
    values = {name: np.concatenate(parts) for name, parts in per_slice.items()}
    samples = {name: np.concatenate(parts) for name, parts in kept.items()}
    if keep_all:
        samples["per_slice"] = values
    summary = {name: _nanmean(values[name]) for name in metrics.SLICE_METRICS + THESIS_SUMMARY}
    summary.update({f"input_{name}": _nanmean(values[f"input_{name}"]) for name in metrics.SLICE_METRICS})
    output_std = float(np.sqrt(max(np.mean(values["pred_sq_mean"]) - np.mean(values["pred_mean"]) ** 2, 0.0)))
    summary.update(output_std=output_std, collapsed=output_std < COLLAPSE_STD, n_val_slices=int(len(images)))
    for index, kind in enumerate(policy_kinds):
        chosen = values["kind"] == index
        if chosen.any() and len(policy_kinds) > 1:
            summary[f"ssim_slice/{kind}"] = _nanmean(values["ssim_slice"][chosen])
            summary[f"ssim_patch/{kind}"] = _nanmean(values["ssim_patch"][chosen])
    return summary, samples


# ----------------------------------------------------------------------------------------------- the loop

def gathered_split(dataset: dataset_lib.Dataset) -> tuple[dict, np.ndarray]:
    """(what split.json records, each process's number of training slices): the dataset's report with what each
    process's share holds alone (training subjects and slices, subjects and files skipped, repairs) gathered;
    the validation side, the same on every process, as it is."""
    def union(strings):
        return sorted({s for share in distributed.gather_strings(strings) for s in share})

    counts = distributed.gather(len(dataset.train))
    split = dataset.report()
    if len(counts) > 1:
        split.update(train_subjects=union(dataset.train_subjects), n_train_slices=int(counts.sum()),
                     train_slices_per_process=[int(c) for c in counts],
                     skipped_subjects=union(dataset.skipped_subjects), skipped_files=union(dataset.skipped),
                     repaired_files=union(dataset.repaired))
        split.update(n_subjects_skipped=len(split["skipped_subjects"]),
                     n_subjects_used=len(split["train_subjects"]) + len(split["val_subjects"]))
    return split, counts


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


PAUSE_ENV = "MRIRECON_TEST_PAUSE"  # tests only: "<point>@<step>:<file>" makes the loop pause there (pause_point)


def pause_point(point: str, step: int) -> None:
    """A test hook: when $MRIRECON_TEST_PAUSE is "<point>@<step>:<file>", write <file> and wait forever here, for
    a test to kill the process at a known moment ("step", "validation" or "metrics")."""
    spec = os.environ.get(PAUSE_ENV)
    if spec and spec.partition(":")[0] == f"{point}@{step}":
        Path(spec.partition(":")[2]).write_text(str(os.getpid()))
        while True:
            time.sleep(3600)


def _nanmean(values: np.ndarray) -> float:
    """The mean of the values that are not NaN; NaN, without numpy's warning, where none is (the patch metrics of a
    policy without a patch)."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _mean_finite(values: list) -> float | None:
    values = np.array([float(x) for x in values], np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def train_and_evaluate(cfg: Config, workdir, allow_config_change: bool = False) -> dict:
    """Train (or resume) the run in `workdir`, validating every epoch and when stopping; returns the last summary.

    The workdir is locked for the run (a second one is refused). A resumed run must have the recorded config,
    except RESUMABLE_FIELDS, unless `allow_config_change` (then the changes are recorded).
    """
    work = Workdir(workdir)
    policy = parse_policy(cfg.corruptions)
    val_policy = parse_policy(cfg.eval_policy, "--val_corruptions")
    mesh = make_mesh()
    check_batch(cfg.batch_size, mesh)
    # Check every name before the data is read: model, schedule, augmentation, loss, loader.
    nnx.eval_shape(lambda: build_model(cfg)), learning_rate_schedule(cfg, 1), parse_augmentation(cfg.augment)
    losses.checked_loss(cfg.loss, cfg.train_crop or cfg.image_size)
    stream.check_loader(cfg.data_loader)
    work.check_resumable(cfg, allow_config_change)
    _check_schedule_resumable(cfg, work)
    writer = distributed.is_writer()
    with work.lock(enabled=writer):  # in a multi-process run, process 0 holds the workdir
        work.check_resumable(cfg, allow_config_change)  # again, now that no other run can change it
        _check_schedule_resumable(cfg, work)
        cache = stream.streamed if cfg.data_loader == "grain" else None  # grain: training slices stay on disk
        dataset = dataset_lib.load_dataset(cfg, distributed.share(), cache)
        return _train(cfg, work, dataset, policy, val_policy, mesh, allow_config_change, writer)


def _check_schedule_resumable(cfg: Config, work: Workdir) -> None:
    """A timed schedule keeps its rate in the optimizer state, a step schedule does not: a run cannot switch."""
    if not work.holds_run():
        return
    recorded = work.read_config().lr_schedule
    if (recorded in TIMED_SCHEDULES) != (cfg.lr_schedule in TIMED_SCHEDULES):
        raise UserError(f"The run in {work} was trained with --lr_schedule={recorded}, whose optimizer state "
                        f"--lr_schedule={cfg.lr_schedule} cannot continue; train it in a new --workdir.")


def _trees(state: dict) -> dict:
    """The arrays of the train state that a checkpoint holds (workdir.TRAINING_TREES); the counters are not."""
    return {name: tree for name, tree in state.items() if name in TRAINING_TREES}


def _train(cfg: Config, work: Workdir, dataset, policy, val_policy, mesh, allow_config_change: bool,
           writer: bool) -> dict:
    """The loop of train_and_evaluate, on a locked workdir and a loaded dataset (this process's share)."""
    # Each process holds its share of the training subjects: steps per epoch follow the smallest share.
    local_batch = cfg.batch_size // jax.process_count()
    split, local_counts = gathered_split(dataset)
    steps_per_epoch = int(local_counts.min()) // local_batch
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size={cfg.batch_size} is larger than the {len(dataset.train)} training slices."
                        if jax.process_count() == 1 else f"--batch_size={cfg.batch_size} needs {local_batch} "
                        f"training slices on each of the {jax.process_count()} processes; one has "
                        f"{int(local_counts.min())}.")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    graphdef, tx, state = init_train_state(cfg, mesh, total_steps)
    train_step = make_train_step(cfg, graphdef, tx, policy)
    eval_step = make_eval_step(graphdef, val_policy, cfg.seed, cfg.nonnegative, cfg.flip_average,
                               bool(cfg.mask_input), always_told_mask(cfg))
    logging.info("Data: %s; %d train / %d val slices; %d steps per epoch; model %s with %d parameters.",
                 dataset.source, split["n_train_slices"], len(dataset.val), steps_per_epoch, cfg.model,
                 sum(x.size for x in jax.tree.leaves(state["params"])))

    manager = work.checkpoint_manager(cfg.keep_checkpoints)
    # Checkpointed with the state: training time, updates skipped, and the losses since the last validation (so a
    # resumed run logs the same train_loss as one never interrupted).
    meta = {"train_time_s": 0.0, "nonfinite_updates": 0, "interval_losses": []}
    replicated = NamedSharding(mesh, P())
    if manager.latest_step() is not None:
        step = manager.latest_step()
        trees, restored = work.restore_training(manager, step, _trees(state))
        if "ema" in state and "ema" not in trees:  # --ema_decay turned on since: the average starts here
            trees["ema"] = jax.tree.map(jnp.copy, trees["params"])
        meta.update(restored)
        state = {**trees, **jax.device_put(counters(step, meta["nonfinite_updates"]), replicated)}
        logging.info("Resumed from step %d in %s.", step, work)
    step = int(state["step"])
    if writer:
        work.record_config(cfg, allow_config_change, step)
        work.write_split(split)
        if work.keep_metrics_through(step):
            logging.info("Dropped the metrics lines after step %d, the checkpoint resumed from.", step)
    batch_sharding = NamedSharding(mesh, P("data"))
    device = device_description()

    def check_finite():
        """Stop the run at a non-finite update unless cfg.skip_nonfinite (then only count it); syncs the step."""
        skipped = int(state["nonfinite"])
        if skipped > meta["nonfinite_updates"] and not cfg.skip_nonfinite:
            last = manager.latest_step()
            kept = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was written yet"
            raise UserError(f"Training hit a non-finite loss or gradient at step {int(state['first_nonfinite']) + 1} "
                            f"in {work}; {kept}. Lower --learning_rate, or rerun with --skip_nonfinite to skip "
                            "such updates.")
        if skipped > meta["nonfinite_updates"]:
            logging.warning("%d update(s) with a non-finite loss or gradient skipped so far.", skipped)
        meta["nonfinite_updates"] = skipped

    def last_learning_rate() -> float:
        """The learning rate of the last update (of the first, before any)."""
        if timed:
            return float(state["opt_state"].hyperparams["learning_rate"].addressable_data(0))
        return float(step_schedule(max(step - 1, 0)))

    def validate(epoch: float, train_losses: list, log: bool = True, stopped_by=None) -> tuple[dict, dict]:
        """Validate; with `stopped_by` (planned_end, time_budget or signal) the record is the run's last, and
        `complete` says whether it reached its planned end or its time budget."""
        summary, samples = evaluate_slices(eval_step, inference_params(state), dataset.val, cfg.eval_batch_size,
                                           mesh, val_policy.kinds)
        pause_point("validation", step)
        record = {"step": step, "epoch": round(epoch, 4), "wall_time_s": round(meta["train_time_s"], 3),
                  "train_loss": _mean_finite(train_losses), "learning_rate": last_learning_rate(), **summary,
                  "device": device,
                  "nonfinite_updates": meta["nonfinite_updates"], "stopped_by": stopped_by,
                  "complete": stopped_by in ("planned_end", "time_budget")}
        if log and writer:
            work.append_metrics(record)
            summaries.validation(record, samples)
            pause_point("metrics", step)
        logging.info("step %d epoch %.2f: ssim slice %.4f patch %.4f (input %.4f / %.4f), psnr %.2f dB",
                     step, epoch, summary["ssim_slice"], summary["ssim_patch"], summary["input_ssim_slice"],
                     summary["input_ssim_patch"], summary["psnr_slice"])
        if summary["collapsed"]:
            logging.warning("The model's output has collapsed to a constant (std %.2g); try another "
                            "--output_activation or learning rate.", summary["output_std"])
        return record, samples

    def checkpoint(summary=None):
        meta["interval_losses"] = [float(x) for x in train_losses]
        work.save_checkpoint(manager, step, _trees(state), meta, summary)

    record, samples = None, None
    train_losses: list = list(meta["interval_losses"])
    started = time.perf_counter()
    segment_start, segment_step = started, step
    stopped_early = False
    batches = stream.training_batches(cfg, dataset.train, steps_per_epoch, local_batch, step, total_steps)
    timed = cfg.lr_schedule in TIMED_SCHEDULES
    step_schedule = None if timed else learning_rate_schedule(cfg, total_steps)
    clock = meta["train_time_s"]  # the training time that the time budget and a timed schedule read
    with contextlib.closing(manager), contextlib.closing(batches), _StopRequest() as stop, \
            tqdm(total=total_steps, initial=step, unit="step", disable=None if writer else True,
                 dynamic_ncols=True) as bar, \
            summaries_lib.TrainingSummaries(work.tensorboard_dir, writer, step) as summaries:
        while step < total_steps:
            if timed:
                state = with_learning_rate(state, timed_learning_rate(cfg, total_steps, step, clock))
            state, loss = train_step(state, global_batch(next(batches), batch_sharding))
            train_losses.append(loss)
            step += 1
            bar.update(1)
            pause_point("step", step)
            now = time.perf_counter()
            if step % 10 == 0 or step == total_steps:
                loss_value = float(loss)  # waits for the step: the rate below is honest
                check_finite()
                now = time.perf_counter()
                rate = (step - segment_step) * cfg.batch_size / max(now - segment_start, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
                summaries.training(step, loss_value, rate)
            meta["train_time_s"] += now - started
            started = now
            if jax.process_count() == 1 or step % 10 == 0:  # processes agree on it every 10 steps
                clock = float(distributed.gather(meta["train_time_s"]).max())
            out_of_time = cfg.max_train_minutes is not None and clock >= 60.0 * cfg.max_train_minutes
            stopping = out_of_time or stop.requested  # read once: a signal may arrive while checkpointing
            if step % steps_per_epoch == 0 or step == total_steps or stopping:
                check_finite()
                stopped_by = ("planned_end" if step == total_steps else "time_budget" if out_of_time
                              else "signal" if stopping else None)
                record, samples = validate(step / steps_per_epoch, train_losses, stopped_by=stopped_by)
                train_losses = []
                checkpoint(record)
                segment_start, segment_step = time.perf_counter(), step
                started = segment_start  # validation time is not training time
            elif cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                check_finite()
                checkpoint()
            if stopping:
                stopped_early = True
                logging.info("Stopping at step %d: %s.", step,
                             "time budget spent" if out_of_time else "signal received")
                break
    if record is None:  # nothing left to train: report on what the workdir holds, log nothing new
        logging.info("The run in %s is already complete at step %d.", work, step)
        record, samples = validate(step / steps_per_epoch, [], log=False)
    if writer:
        shown = np.unique(np.linspace(0, len(samples["clean"]) - 1, 5).astype(int))
        plots.save_sample_grid(work.samples_file, samples["corrupted"][shown], samples["reconstructed"][shown],
                               samples["clean"][shown], samples["masks"][shown])
    record["stopped_early"] = stopped_early
    return record
