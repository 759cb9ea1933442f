import functools
import itertools
import json
import os
import signal
import struct
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from mrirecon_jax import summaries, train
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import dataset as dataset_lib
from mrirecon_jax.workdir import Workdir

SMALL_RUN = dict(model="tiny", image_size=32, slices=4, slab_mm=None, batch_size=8, epochs=3,
                 learning_rate=3e-3, eval_batch_size=16, corruptions="augmented")


def _brain_like(n, size=32, seed=0, radius=0.4):
    """Smooth blobs inside a disc (`radius` of the side): a stand-in for brain slices, normalised to [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    disc = (yy ** 2 + xx ** 2) < (radius * size) ** 2
    images = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 2, 2)) * disc
    images = (images - images.min(axis=(1, 2), keepdims=True))
    images /= images.max(axis=(1, 2), keepdims=True)
    return images[..., None].astype(np.float32)


def _steps(cfg):
    """(train step, eval step, state, mesh) of a config."""
    mesh = train.make_mesh()
    graphdef, tx, state = train.init_train_state(cfg, mesh)
    policy = train.parse_policy(cfg.corruptions)
    return (train.make_train_step(cfg, graphdef, tx, policy),
            train.make_eval_step(graphdef, policy, cfg.seed, cfg.nonnegative), state, mesh)


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    cfg = Config(**{**SMALL_RUN, "corruptions": "original"})
    train_step, _, state, _ = _steps(cfg)
    batch = jnp.asarray(_brain_like(8))
    losses = []
    for _ in range(40):
        state, loss = train_step(state, batch)
        losses.append(float(loss))
    assert int(state["step"]) == 40
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_patch_and_head_weights_each_reach_the_training_loss():
    """The same first step (same initialisation, batch and draws) scores differently with each extra weight."""
    batch = jnp.asarray(_brain_like(8, radius=0.25))  # a head with air around it inside the loss's valid window
    first_losses = {}
    for patch_weight, foreground_weight in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]:
        cfg = Config(**SMALL_RUN, patch_weight=patch_weight, foreground_weight=foreground_weight)
        train_step, _, state, _ = _steps(cfg)
        _, loss = train_step(state, batch)
        first_losses[patch_weight, foreground_weight] = float(loss)
    assert all(np.isfinite(list(first_losses.values())))
    assert len({round(v, 4) for v in first_losses.values()}) == 4, first_losses


def test_a_training_window_is_normalised_as_its_whole_slice():
    rng = np.random.default_rng(0)
    corrupted = jnp.asarray(rng.uniform(0.2, 0.4, (3, 32, 32, 1)).astype(np.float32))
    corrupted = corrupted.at[:, :4].set(5.0)  # the slices' maxima, outside every window below
    window = lambda x: x[:, 8:24, 8:24]
    def pointwise(params, x, masks):
        return 2.0 * x + 0.1

    whole = train.reconstruct_corrupted(pointwise, None, corrupted, False)
    cropped = train.reconstruct_corrupted(pointwise, None, corrupted, False, window)
    np.testing.assert_allclose(np.asarray(cropped), np.asarray(window(whole)), rtol=1e-6)
    alone = train.reconstruct_corrupted(pointwise, None, window(corrupted), False)  # normalised by the window
    assert np.abs(np.asarray(alone) - np.asarray(cropped)).max() > 1e-2


def test_training_window_reaches_the_step_and_a_whole_slice_window_changes_nothing():
    batch = jnp.asarray(_brain_like(8))
    losses = {}
    for crop in (None, 32, 16):  # the same initialisation, batch and draws
        train_step, _, state, _ = _steps(Config(**SMALL_RUN, patch_weight=1.0, foreground_weight=1.0,
                                                train_crop=crop))
        losses[crop] = float(train_step(state, batch)[1])
    assert losses[32] == pytest.approx(losses[None], rel=1e-6)
    assert np.isfinite(losses[16]) and abs(losses[16] - losses[None]) > 1e-4


def test_training_window_must_fit_the_slice_and_the_u_net():
    with pytest.raises(UserError, match="--train_crop"):
        Config(**{**SMALL_RUN, "train_crop": 40})
    with pytest.raises(UserError, match="--train_crop=20 must be a multiple of 8"):
        train.build_model(Config(**{**SMALL_RUN, "model": "small", "train_crop": 20}))


def test_a_mask_channel_sees_the_patch_mask_on_the_asked_fraction_of_training_slices():
    """--mask_input=1 tells every slice its patch mask: the first convolution's mask-channel weights learn from the
    first step; with a vanishing fraction that channel holds zeros and they get no update (Adam moves nothing
    whose gradient is zero); grown masks (--mask_slack_px) change what the model is told."""
    batch = jnp.asarray(_brain_like(8))
    moved, losses = {}, {}
    for fraction, slack in ((1.0, 0), (1e-9, 0), (1.0, 2)):
        cfg = Config(**SMALL_RUN, mask_input=fraction, mask_slack_px=slack)
        graphdef, tx, state = train.init_train_state(cfg, train.make_mesh())
        first_conv = lambda params: np.array(nnx.merge(graphdef, params).down[0].conv1.kernel[...])
        before = first_conv(state["params"])
        assert before.shape[2] == 2  # image and mask channels
        state, loss = train.make_train_step(cfg, graphdef, tx, train.parse_policy(cfg.corruptions))(state, batch)
        change = np.abs(first_conv(state["params"]) - before)
        moved[fraction, slack] = (change[..., 0, :].max(), change[..., 1, :].max())
        losses[fraction, slack] = float(loss)
    assert moved[1.0, 0][0] > 0 and moved[1.0, 0][1] > 0
    assert moved[1e-9, 0][0] > 0 and moved[1e-9, 0][1] == 0
    assert abs(losses[1.0, 2] - losses[1.0, 0]) > 1e-6  # the same draws, a grown mask told


def test_an_evaluation_tells_the_mask_only_when_asked_and_a_model_without_a_mask_channel_ignores_it():
    images = jnp.asarray(_brain_like(4, seed=3))
    policy = train.parse_policy("patch")
    outputs = {}
    for fraction in (0.0, 0.5):
        cfg = Config(**SMALL_RUN, mask_input=fraction)
        graphdef, _, state = train.init_train_state(cfg, train.make_mesh())
        for told in (False, True):
            step = train.make_eval_step(graphdef, policy, cfg.seed, cfg.nonnegative, mask_input=bool(fraction),
                                        give_mask=told)
            _, (corrupted, pred, masks) = step(state["params"], images, jnp.arange(4))
            outputs[fraction, told] = np.asarray(pred)
        assert float(masks.sum()) > 0
    np.testing.assert_array_equal(outputs[0.0, True], outputs[0.0, False])
    assert np.abs(outputs[0.5, True] - outputs[0.5, False]).max() > 1e-4
    assert not train.always_told_mask(Config(mask_input=0.5)) and train.always_told_mask(Config(mask_input=1.0))


def test_evaluation_is_deterministic_and_independent_of_batch_size():
    cfg = Config(**SMALL_RUN)
    _, eval_step, state, mesh = _steps(cfg)
    images = _brain_like(20, seed=1)
    kinds = train.parse_policy(cfg.corruptions).kinds
    first, _ = train.evaluate_slices(eval_step, state["params"], images, 16, mesh, kinds)
    again, _ = train.evaluate_slices(eval_step, state["params"], images, 16, mesh, kinds)
    other_batching, _ = train.evaluate_slices(eval_step, state["params"], images, 6, mesh, kinds)
    assert first == again
    for name in ("ssim_slice", "ssim_patch", "psnr_slice", "mse_patch", "input_ssim_slice"):
        assert other_batching[name] == pytest.approx(first[name], rel=1e-5)
    assert first["n_val_slices"] == 20 and 0 < first["ssim_slice"] < 1


def test_flip_average_is_the_mean_over_the_mirror_image_and_reaches_evaluation():
    cfg = Config(**{**SMALL_RUN, "corruptions": "gibbs"})
    graphdef, _, state = train.init_train_state(cfg, train.make_mesh())
    images = jnp.asarray(_brain_like(4, seed=2))
    plain = train.model_apply(graphdef)(state["params"], images)
    averaged = train.model_apply(graphdef, flip_average=True)(state["params"], images)
    mirrored = train.model_apply(graphdef)(state["params"], images[:, :, ::-1])[:, :, ::-1]
    np.testing.assert_allclose(averaged, 0.5 * (plain + mirrored), atol=1e-6)
    assert float(jnp.max(jnp.abs(plain - mirrored))) > 1e-4  # an untrained U-Net is not mirror-symmetric
    # Evaluation applies it: a left-right symmetric slice with a symmetric corruption comes out symmetric.
    symmetric = 0.5 * (images + images[:, :, ::-1])
    eval_step = train.make_eval_step(graphdef, train.parse_policy("gibbs"), cfg.seed, cfg.nonnegative, True)
    _, (corrupted, pred, _) = eval_step(state["params"], symmetric, jnp.arange(4))
    np.testing.assert_allclose(corrupted, corrupted[:, :, ::-1], atol=1e-5)
    np.testing.assert_allclose(pred, pred[:, :, ::-1], atol=1e-5)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # metrics undefined on every slice are NaN, without a warning
def test_collapsed_output_is_detected():
    cfg = Config(**{**SMALL_RUN, "output_activation": "relu"})
    _, eval_step, state, mesh = _steps(cfg)
    dead = jax.tree.map(jnp.zeros_like, state["params"])
    dead["head"]["bias"].value = jnp.full((1,), -10.0)  # relu(input - 10) == 0: a constant output
    summary, _ = train.evaluate_slices(eval_step, dead, _brain_like(8), 8, mesh)
    assert summary["output_std"] < train.COLLAPSE_STD and summary["collapsed"]
    alive, _ = train.evaluate_slices(eval_step, state["params"], _brain_like(8), 8, mesh)
    assert not alive["collapsed"]


def test_bad_corruption_spec_is_a_user_error():
    with pytest.raises(UserError, match="--corruptions"):
        train.parse_policy("patch+blur")


def test_a_loss_that_cannot_score_the_image_size_is_refused_before_the_data_is_read(tmp_path):
    cfg = Config(**{**SMALL_RUN, "image_size": 16, "loss": "ms_ssim7", "data_dir": str(tmp_path / "no_such_dir")})
    with pytest.raises(UserError, match="at least 28 px"):  # not the missing data directory
        train.train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def _run(tmp_path, workdir, **changes):
    cfg = Config(**{**SMALL_RUN, "cache_dir": str(tmp_path / "cache"), **changes})
    return train.train_and_evaluate(cfg, tmp_path / workdir)


def _records(tmp_path, workdir):
    return [json.loads(line) for line in (tmp_path / workdir / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_continues_exactly_like_an_uninterrupted_one(tmp_path):
    """Stop at step 3, rerun to step 7: same metrics as one run of 7 steps (data order, keys and state)."""
    _run(tmp_path, "interrupted", max_steps=3, checkpoint_every_steps=2)
    saved = sorted(int(p.name) for p in (tmp_path / "interrupted" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2, 3]  # every 2 steps, and at the stop
    resumed = _run(tmp_path, "interrupted", max_steps=7)
    straight = _run(tmp_path, "straight", max_steps=7)
    assert resumed["step"] == straight["step"] == 7
    for name in ("ssim_slice", "ssim_patch", "psnr_slice", "mse_slice"):
        assert resumed[name] == pytest.approx(straight[name], rel=1e-6, abs=1e-7)
    records = _records(tmp_path, "interrupted")
    steps_logged = [r["step"] for r in records]
    assert steps_logged[0] == 3 and steps_logged[-1] == 7 and steps_logged == sorted(steps_logged)
    # Each session's last record marks its planned end (max_steps); the epoch records in between do not.
    complete = [(r["step"], r["stopped_by"]) for r in records if r["complete"]]
    assert complete == [(3, "planned_end"), (7, "planned_end")]
    assert all(r["stopped_by"] is None for r in records if not r["complete"])
    assert all(r["learning_rate"] == pytest.approx(SMALL_RUN["learning_rate"]) for r in records)  # constant
    assert (tmp_path / "interrupted" / "samples.png").stat().st_size > 10_000
    split = json.loads((tmp_path / "interrupted" / "split.json").read_text())
    assert not set(split["train_subjects"]) & set(split["val_subjects"])
    assert split["source"].startswith("DEMO")


def test_parameter_average_follows_each_update_and_is_what_validation_and_checkpoints_serve(tmp_path):
    """--ema_decay: the step moves the average towards the new parameters; a resumed run continues it exactly;
    validation measures it and restore_model (every job that uses a model) reads it."""
    cfg = Config(**SMALL_RUN, ema_decay=0.75)
    train_step, _, state, _ = _steps(cfg)
    batch = jnp.asarray(_brain_like(8))
    leaves = lambda name: jax.tree.leaves(jax.tree.map(np.asarray, state[name]))  # noqa: E731
    state, _ = train_step(state, batch)
    first = leaves("params")
    for after, mean in zip(first, leaves("ema")):  # debiased: the initialisation weighs nothing
        np.testing.assert_allclose(mean, after, rtol=1e-6)
    state, _ = train_step(state, batch)
    # The debiased average of two updates: weights 0.75 / 1.75 and 1 / 1.75.
    for before, after, mean in zip(first, leaves("params"), leaves("ema")):
        np.testing.assert_allclose(mean, (0.75 * before + after) / 1.75, rtol=1e-5, atol=1e-7)
    assert not all(np.allclose(mean, after) for mean, after in zip(leaves("ema"), leaves("params")))

    _run(tmp_path, "averaged", ema_decay=0.9, max_steps=3, checkpoint_every_steps=2)
    resumed = _run(tmp_path, "averaged", ema_decay=0.9, max_steps=6)
    straight = _run(tmp_path, "straight", ema_decay=0.9, max_steps=6)
    assert resumed["ssim_slice"] == pytest.approx(straight["ssim_slice"], rel=1e-6)
    def served(run, checkpoint):
        """(step, validation slice SSIM) of the parameters restore_model serves from a checkpoint of a run."""
        model = train.restore_model(tmp_path / run, checkpoint)
        eval_step = train.make_eval_step(model.graphdef, train.parse_policy(model.cfg.corruptions), model.cfg.seed,
                                         model.cfg.nonnegative)
        summary, _ = train.evaluate_slices(eval_step, model.params, dataset_lib.load_dataset(model.cfg).val, 16,
                                           train.make_mesh())
        return model.step, summary["ssim_slice"]

    step, ssim = served("averaged", "last")
    assert step == 6 and ssim == pytest.approx(resumed["ssim_slice"], rel=1e-6)
    plain = _run(tmp_path, "plain", max_steps=6)
    assert plain["ssim_slice"] != pytest.approx(straight["ssim_slice"], rel=1e-4)
    # Turned on for a run trained without it (an explicit config change): the average starts at the resume, and
    # the checkpoints from before it (the best may be one of them) still serve their parameters.
    late = Config(**{**SMALL_RUN, "cache_dir": str(tmp_path / "cache"), "ema_decay": 0.9, "max_steps": 8})
    assert train.train_and_evaluate(late, tmp_path / "plain", allow_config_change=True)["step"] == 8
    assert train.restore_model(tmp_path / "plain", "last").step == 8
    step, ssim = served("plain", "6")
    assert step == 6 and ssim == pytest.approx(plain["ssim_slice"], rel=1e-6)


def test_timed_learning_rate_decays_over_the_larger_share_of_steps_and_time_budget():
    cfg = Config(learning_rate=1e-3, lr_schedule="cosine_time", warmup_steps=10, max_train_minutes=10.0)
    rate = functools.partial(train.timed_learning_rate, cfg, 100)
    assert rate(0, 0.0) == 0.0 and rate(5, 0.0) == pytest.approx(0.5e-3 * 0.5 * (1 + np.cos(np.pi * 0.05)))
    assert rate(20, 300.0) == pytest.approx(0.5e-3)  # half the budget spent: half the peak
    assert rate(50, 30.0) == pytest.approx(0.5e-3)  # half the steps: the same, whatever the time
    assert rate(20, 450.0) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 0.75)))
    assert rate(20, 600.0) == rate(20, 900.0) == rate(100, 0.0) == 0.0
    assert train.learning_rate_schedule(cfg, 100)(0) == 0.0  # the optimizer's rate before the loop sets one
    unlimited = cfg.replace(max_train_minutes=None)  # no budget: the planned steps alone
    assert train.timed_learning_rate(unlimited, 100, 50, 1e6) == pytest.approx(0.5e-3)


def test_timed_schedule_reads_the_training_time_including_that_of_earlier_sessions(tmp_path, monkeypatch):
    """A first session on a clock that runs fast spends a share of the budget; resumed on a stopped clock, every
    update's rate (logged with each validation) is the timed schedule's at that step and that training time. The
    optimizer state of a timed schedule cannot continue under a step schedule."""
    ticks = itertools.count(0.0, 1000.0)
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    budget = dict(lr_schedule="cosine_time", max_train_minutes=200.0, warmup_steps=2, epochs=8)
    _run(tmp_path, "timed", max_steps=3, **budget)
    spent = _records(tmp_path, "timed")[-1]["wall_time_s"]
    assert 3000.0 <= spent < 12000.0  # a quarter of the budget or more: at least 1000 s a step
    monkeypatch.setattr(time, "perf_counter", lambda: 0.0)
    record = _run(tmp_path, "timed", max_steps=40, **budget)
    assert record["step"] == 40 and record["stopped_by"] == "planned_end"
    cfg = Config(**{**SMALL_RUN, **budget})
    later = _records(tmp_path, "timed")[1:]
    assert len(later) >= 2 and all(r["wall_time_s"] == spent for r in later)
    for r in later:
        assert r["learning_rate"] == pytest.approx(train.timed_learning_rate(cfg, 40, r["step"] - 1, spent),
                                                   rel=1e-5, abs=1e-9)
    first = later[0]  # the time spent, not the steps, set its rate
    assert first["learning_rate"] < 0.9 * train.timed_learning_rate(cfg, 40, first["step"] - 1, 0.0)
    assert later[-1]["learning_rate"] < 1e-5
    stepped = Config(**{**SMALL_RUN, **budget, "lr_schedule": "cosine", "cache_dir": str(tmp_path / "cache"),
                        "max_steps": 44})
    with pytest.raises(UserError, match="--lr_schedule=cosine_time, whose optimizer state"):
        train.train_and_evaluate(stepped, tmp_path / "timed", allow_config_change=True)
    assert len(_records(tmp_path, "timed")) == len(later) + 1


def test_time_budget_stops_with_a_final_validation_and_checkpoint(tmp_path):
    record = _run(tmp_path, "budget", max_train_minutes=1e-6)
    assert record["stopped_early"] and record["step"] == 1
    last = _records(tmp_path, "budget")[-1]
    assert last["step"] == 1 and last["complete"] and last["stopped_by"] == "time_budget"
    assert last["device"] == train.device_description() and last["device"].startswith(f"{jax.device_count()} x ")
    assert (tmp_path / "budget" / "checkpoints" / "1").is_dir()


def test_workdir_of_another_run_is_refused(tmp_path):
    cfg = Config(**SMALL_RUN)
    work = Workdir(tmp_path)
    work.record_config(cfg)
    original = (tmp_path / "config.json").read_text()
    with pytest.raises(UserError, match="model"):
        work.record_config(cfg.replace(model="small"))
    assert (tmp_path / "config.json").read_text() == original
    work.record_config(cfg.replace(epochs=9))  # a longer run of the same thing is a resume
    assert work.read_config().epochs == 9


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_with_a_checkpoint_and_a_final_record_and_restores_the_handler(tmp_path, signum):
    """SIGTERM or SIGINT during training: the loop finishes its step, validates and checkpoints there, and
    returns; the handler that was installed before training is back afterwards."""
    def previous(signum, frame):
        raise AssertionError("the training loop's handler should have caught this signal")

    workdir = tmp_path / "term"

    def send_when_training():
        deadline = time.monotonic() + 300
        while not (workdir / "checkpoints" / "2").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    old = signal.signal(signum, previous)
    try:
        sender = threading.Thread(target=send_when_training, daemon=True)
        sender.start()
        record = _run(tmp_path, "term", max_steps=10_000, epochs=10_000, checkpoint_every_steps=2)
        sender.join()
        assert signal.getsignal(signum) is previous
    finally:
        signal.signal(signum, old)
    assert record["stopped_early"] and 2 <= record["step"] < 10_000
    last = _records(tmp_path, "term")[-1]
    assert last["step"] == record["step"]
    assert last["stopped_by"] == "signal" and not last["complete"]  # stopped before its plan: not complete
    assert str(record["step"]) in {p.name for p in (workdir / "checkpoints").iterdir()}


def _events(workdir):
    """Every Event in the workdir's TensorBoard files (TFRecord framing: length, its CRC, data, its CRC)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
            at += 12 + length + 4
    return events


def test_tensorboard_events_hold_every_validation_number_and_sample_images(tiny_run):
    """Beside metrics.jsonl, the event files hold its every number per validation step, the training loss and
    images per second, and a sample image; a run that is already complete adds no event file."""
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    scalars, images = {}, {}
    for event in _events(tiny_run):
        for value in event.summary.value:
            if value.HasField("image"):
                images[value.tag, event.step] = value.image
            else:
                scalars[value.tag, event.step] = value.simple_value
    for record in records:
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = summaries.TRAINING_FIELDS.get(name, f"val/{name}")
                assert scalars[tag, record["step"]] == pytest.approx(value, rel=1e-6), tag
        image = images["val/samples", record["step"]]
        assert (image.height, image.width) == (4 * 32, 4 * 32)  # 4 slices x (input, output, truth, difference)
    last = records[-1]["step"]
    assert "val/ssim_slice" in {tag for tag, _ in scalars} and "val/input_ssim_patch" in {tag for tag, _ in scalars}
    assert scalars["train/images_per_second", last] > 0 and scalars["train/loss", last] > 0
    files = sorted(tiny_run.glob("events.out.tfevents.*"))
    train.train_and_evaluate(Workdir(tiny_run).read_config(), tiny_run)  # complete: nothing trained, nothing logged
    assert sorted(tiny_run.glob("events.out.tfevents.*")) == files


def test_only_an_enabled_writer_writes(tmp_path):
    quiet = summaries.TrainingSummaries(tmp_path, enabled=False)
    quiet.training(10, 0.5, 100.0)
    quiet.close()
    assert not list(tmp_path.iterdir())


def test_a_run_without_patches_logs_no_patch_scalars(tmp_path):
    """A corruption without a patch has no patch metrics (NaN): TensorBoard gets the finite numbers only."""
    samples = {name: np.full((2, 8, 8, 1), 0.5, np.float32) for name in ("corrupted", "reconstructed", "clean")}
    with summaries.TrainingSummaries(tmp_path) as writer:
        writer.validation({"step": 3, "ssim_slice": 0.9, "ssim_patch": float("nan"), "complete": True}, samples)
    tags = {value.tag for event in _events(tmp_path) for value in event.summary.value}
    assert "val/ssim_slice" in tags and "val/ssim_patch" not in tags and "val/complete" not in tags
