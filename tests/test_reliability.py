"""Reliability: bad files (refused, repaired or skipped), one run per workdir, kill -9 at named moments, a full
disk while checkpointing, non-finite updates, reproducibility and recorded config changes."""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, TINY_RUN, cli, error_line, write_nifti
from mrirecon_jax import losses, train
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.data import dataset, volumes
from mrirecon_jax.workdir import Workdir, write_atomically

SHAPE = (20, 24, 16)  # a small good volume: 16 axial slices of 20 x 24 voxels


def good_volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    head = (x ** 2 + y ** 2 + z ** 2 < 0.8).astype(np.float32)
    return (100.0 * head + rng.normal(0, 2, SHAPE)).astype(np.float32)


def _truncated(path):
    write_nifti(path, good_volume())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _short_data(path):  # an uncompressed .nii with a valid header whose data ends early
    plain = path.with_name(path.name[: -len(".gz")])
    write_nifti(plain, good_volume())
    data = plain.read_bytes()
    plain.unlink()
    path.write_bytes(gzip.compress(data[: len(data) - 4000]))


def _with_nan(path):
    volume = good_volume()
    volume[3, 4, 5], volume[6, 7, 8] = np.nan, np.inf
    write_nifti(path, volume)


# Files refused wherever they are given: (how to write one, words of the sentence).
REFUSED = {
    "not_gzip": (lambda p: p.write_bytes(b"a text file, not gzip " * 20), "cannot be read"),
    "truncated_gzip": (_truncated, "cannot be read"),
    "short_data": (_short_data, "cannot be read"),
    "2d": (lambda p: write_nifti(p, np.ones((24, 24), np.float32)), "3-D volume is needed"),
    "all_nan": (lambda p: write_nifti(p, np.full(SHAPE, np.nan, np.float32)), "no finite value"),
    "all_zero": (lambda p: write_nifti(p, np.zeros(SHAPE, np.float32)), "is constant"),
    "constant": (lambda p: write_nifti(p, np.full(SHAPE, 7.0, np.float32)), "is constant"),
    "tiny_inplane": (lambda p: write_nifti(p, good_volume()[:4, :5]), "fewer than the 8 per side"),
}
# Files repaired with a warning: (how to write one, words of the warning).
REPAIRED = {
    "4d": (lambda p: write_nifti(p, np.stack([good_volume(), good_volume(1)], axis=-1)), "using its first volume"),
    "nan_voxels": (_with_nan, "2 NaN or infinite voxels"),
}


def test_repairs_are_what_the_documentation_says(tmp_path):
    first, second = good_volume(), good_volume(1)
    loaded, _ = volumes.load_volume(write_nifti(tmp_path / "4d.nii.gz", np.stack([first, second], axis=-1)))
    np.testing.assert_allclose(loaded, first, rtol=1e-6)
    repairs: list = []
    _with_nan(tmp_path / "nan.nii.gz")
    loaded, _ = volumes.load_volume(tmp_path / "nan.nii.gz", repairs)
    assert np.isfinite(loaded).all() and loaded[3, 4, 5] == loaded[6, 7, 8] == loaded.min() < 0
    assert len(repairs) == 1 and "nan.nii.gz" in repairs[0]


def _folder_with_bad_files(root: Path, n_good: int = 4) -> Path:
    """IXI-named good subjects and one file of every refused and repaired kind, each its own subject."""
    root.mkdir()
    for i in range(n_good):
        write_nifti(root / f"IXI{100 + i:03d}-Guys-0001-T1.nii.gz", good_volume(i))
    for i, (name, (make, _)) in enumerate({**REFUSED, **REPAIRED}.items()):
        make(root / f"IXI{200 + i:03d}-{name}-T1.nii.gz")
    return root


def test_a_folder_with_bad_files_skips_each_by_name_and_strict_refuses(tmp_path, caplog):
    data = _folder_with_bad_files(tmp_path / "data")
    cfg = Config(data_dir=str(data), slices=4, image_size=16, cache_dir=str(tmp_path / "cache"))
    built = dataset.load_dataset(cfg)
    assert len(built.skipped) == len(REFUSED) and len(built.skipped_subjects) == len(REFUSED)
    for name, (_, words) in REFUSED.items():
        (sentence,) = [s for s in built.skipped if f"-{name}-T1" in s]
        assert words in sentence
        assert any(f"-{name}-T1" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert sorted(re.search(r"IXI\d+-(\w+)-T1", r).group(1) for r in built.repaired) == sorted(REPAIRED)
    used = set(built.train_subjects) | set(built.val_subjects)
    assert len(used) == 4 + len(REPAIRED) and built.val_subjects
    assert len(built.train) == 4 * len(built.train_subjects)
    report = built.report()
    assert report["n_subjects_used"] == len(used) and report["skipped_files"] == list(built.skipped)
    assert report["n_subjects_skipped"] == len(REFUSED)
    assert set(report["skipped_subjects"]) == {f"IXI{200 + i}" for i in range(len(REFUSED))}
    again = dataset.load_dataset(cfg)  # from the cache: the same record of what was skipped
    assert again.cache_hit and again.skipped == built.skipped and again.skipped_subjects == built.skipped_subjects
    with pytest.raises(UserError, match="--strict refuses") as refused:
        dataset.load_dataset(cfg.replace(strict=True))
    assert "IXI2" in str(refused.value)
    assert sorted(p.name for p in data.iterdir()) == sorted(
        [f"IXI{100 + i:03d}-Guys-0001-T1.nii.gz" for i in range(4)]
        + [f"IXI{200 + i:03d}-{n}-T1.nii.gz" for i, n in enumerate({**REFUSED, **REPAIRED})])


def test_too_few_slices_for_the_slab_is_skipped_in_training(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        write_nifti(data / f"s{i}.nii.gz", good_volume(i))
    write_nifti(data / "thin.nii.gz", good_volume()[:, :, :3])
    built = dataset.load_dataset(Config(data_dir=str(data), slices=4, image_size=16, cache_dir=str(tmp_path / "c")))
    (sentence,) = built.skipped
    assert "thin.nii.gz has 3 axial slices, fewer than the 4 that --slices=4 takes" in sentence
    assert "thin" not in built.train_subjects + built.val_subjects


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_reconstruct_refuses_a_bad_input_in_one_sentence(tiny_run, tmp_path, case):
    path = tmp_path / f"{case}.nii.gz"
    REFUSED[case][0](path)
    before = path.read_bytes()
    code, _, err = cli("--mode=reconstruct", f"--workdir={tiny_run}", f"--input={path}",
                       f"--output={tmp_path / 'out.nii.gz'}")
    line = error_line(code, err)
    assert str(path) in line and REFUSED[case][1] in line
    assert path.read_bytes() == before and not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("case", sorted(REPAIRED))
def test_reconstruct_repairs_a_4d_or_nan_input_and_says_so(tiny_run, tmp_path, case, caplog):
    path = tmp_path / f"{case}.nii.gz"
    REPAIRED[case][0](path)
    code, _, err = cli("--mode=reconstruct", f"--workdir={tiny_run}", f"--input={path}",
                       f"--output={tmp_path / 'out.nii.gz'}")
    assert code == 0, err
    assert (tmp_path / "out.nii.gz").is_file()
    assert any(REPAIRED[case][1] in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_unwritable_workdir_and_output_folder_are_one_sentence(tiny_run, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = cli(f"--workdir={blocker / 'run'}", "--model=tiny", "--image_size=32", "--slices=4",
                       "--max_steps=1", f"--cache_dir={tmp_path / 'c'}")
    assert "cannot be created" in error_line(code, err) and blocker.read_text() == "not a folder"
    code, _, err = cli("--mode=reconstruct", f"--workdir={tiny_run}", f"--input={tmp_path / 'nope.nii.gz'}",
                       f"--output={tmp_path / 'o.nii.gz'}")
    assert "does not exist" in error_line(code, err)


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(temp):
        Path(temp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


# ------------------------------------------------------------------------------------------- training faults

RUN = dict(TINY_RUN, max_steps=6, epochs=2, checkpoint_every_steps=2)  # 5 steps an epoch on the demo source


def _config(cache_dir, **changes) -> Config:
    return Config(**{**RUN, **changes}, cache_dir=str(cache_dir))


def _records(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


TIMING = ("wall_time_s",)


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _last_params(workdir):
    return jax.tree.leaves(jax.tree.map(np.asarray, train.restore_model(workdir, "last").params))


def test_finite_guard_skips_a_non_finite_update_inside_the_step():
    cfg = Config(model="tiny", image_size=16, slices=4, batch_size=4)
    mesh = train.make_mesh()
    graphdef, tx, state = train.init_train_state(cfg, mesh, 10)
    step = train.make_train_step(cfg, graphdef, tx, train.parse_policy("patch"))
    before = jax.tree.map(np.asarray, state["params"])
    bad = np.full((4, 16, 16, 1), 0.5, np.float32)
    bad[0, 3, 3, 0] = np.nan
    state, loss = step(state, jnp.asarray(bad))
    assert not np.isfinite(float(loss)) and int(state["nonfinite"]) == 1 and int(state["first_nonfinite"]) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["params"]), before)
    for clean in (np.zeros((4, 16, 16, 1), np.float32), np.full((4, 16, 16, 1), 0.7, np.float32)):
        state, loss = step(state, jnp.asarray(clean))  # all background, constant: finite
        assert np.isfinite(float(loss)) and int(state["nonfinite"]) == 1
    textured = np.random.default_rng(0).random((4, 16, 16, 1), np.float32)
    state, loss = step(state, jnp.asarray(textured))  # a finite update is applied again
    assert np.isfinite(float(loss)) and int(state["step"]) == 4
    assert int(state["nonfinite"]) == 1 and int(state["first_nonfinite"]) == 0
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), state["params"], before))
    assert any(changed)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_losses_have_finite_gradients_on_background_and_constant_images(name):
    loss = losses.get_loss(name)
    for target in (jnp.zeros((2, 32, 32, 1)), jnp.full((2, 32, 32, 1), 0.3)):  # 32 px: ms_ssim7's least is 28
        for pred in (target, jnp.full_like(target, 0.5)):
            grad = jax.grad(loss)(pred, target)
            assert bool(jnp.all(jnp.isfinite(grad))) and np.isfinite(float(loss(pred, target))), name


def test_non_finite_loss_stops_the_run_or_is_skipped_and_counted(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setitem(losses.LOSSES, "nan", lambda pred, target, weights=None: jnp.nan * jnp.mean(pred))
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step 1 .*no checkpoint was written yet"):
        train.train_and_evaluate(_config(cache_dir, loss="nan"), tmp_path / "stop")
    assert not (tmp_path / "stop" / "metrics.jsonl").exists()
    record = train.train_and_evaluate(_config(cache_dir, loss="nan", skip_nonfinite=True), tmp_path / "skip")
    assert record["step"] == 6 and record["nonfinite_updates"] == 6
    initial = jax.tree.leaves(jax.tree.map(np.asarray, train.init_train_state(
        _config(cache_dir), train.make_mesh())[2]["params"]))
    for got, want in zip(_last_params(tmp_path / "skip"), initial):
        np.testing.assert_array_equal(got, want)


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, cache_dir, monkeypatch):
    workdir = tmp_path / "full"
    saves = {"count": 0}
    original = ocp.StandardCheckpointHandler.async_save

    async def full_on_second(self, *args, **kwargs):
        saves["count"] += 1
        if saves["count"] == 3:  # params and opt_state of the first checkpoint, then params of the second
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full_on_second)
    with pytest.raises(UserError, match=r"step 4 .*No space left on device.*step 2, is kept"):
        train.train_and_evaluate(_config(cache_dir), workdir)
    monkeypatch.undo()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    record = train.train_and_evaluate(_config(cache_dir), workdir)  # space again: resumes from step 2
    assert record["step"] == 6


_KILLED_RUN = """
import sys
sys.path.insert(0, {root!r})
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity
from mrirecon_jax import train
from mrirecon_jax.config import Config
if {pause_in_save}:  # the second checkpoint's rename never happens: killed with its temporary folder on disk
    original, calls = atomicity.AtomicRenameTemporaryPath.finalize, []
    async def finalize(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            open({marker!r}, "w").write("save")
            import time
            while True:
                time.sleep(3600)
        return await original(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
train.train_and_evaluate(Config(**{config!r}), {workdir!r})
"""

# (test pause point or "save", step): during a step, during validation (epoch end at step 5), after the metrics
# line and before its checkpoint, and inside the second checkpoint's save.
KILL_MOMENTS = {"step": "step@3", "validation": "validation@5", "metrics": "metrics@5", "save": None}


def test_kill_9_at_any_moment_then_the_same_command_resumes_exactly(tmp_path, cache_dir):
    """Four runs killed with SIGKILL at named moments (run at once), each resumed with the same call; each ends
    at the same step with the same parameters and metrics lines (no step twice) as a run never interrupted.
    While a killed-to-be run is paused it holds its workdir, and a second run there is refused."""
    cfg = _config(cache_dir)
    reference = train.train_and_evaluate(cfg, tmp_path / "reference")
    processes = {}
    for moment, point in KILL_MOMENTS.items():
        marker, workdir = tmp_path / f"{moment}.paused", tmp_path / moment
        script = _KILLED_RUN.format(root=str(ROOT), pause_in_save=point is None, marker=str(marker),
                                    config={**RUN, "cache_dir": str(cache_dir)}, workdir=str(workdir))
        env = dict(os.environ, JAX_PLATFORMS="cpu", **({train.PAUSE_ENV: f"{point}:{marker}"} if point else {}))
        processes[moment] = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    for moment, process in processes.items():
        marker = tmp_path / f"{moment}.paused"
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"{moment}: {process.stderr.read() if process.poll() is not None else 'timeout'}"
    with pytest.raises(UserError, match="in use by a live run"):  # the paused run holds its workdir
        train.train_and_evaluate(cfg, tmp_path / "metrics")
    for process in processes.values():
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert list((tmp_path / "save" / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # killed mid-save
    assert any(r["step"] == 5 for r in _records(tmp_path / "metrics"))  # killed after the line, before the save
    want_params = _last_params(tmp_path / "reference")
    for moment in KILL_MOMENTS:
        resumed = train.train_and_evaluate(cfg, tmp_path / moment)
        assert resumed["step"] == reference["step"] == 6, moment
        records = _records(tmp_path / moment)
        assert [r["step"] for r in records] == [r["step"] for r in _records(tmp_path / "reference")], moment
        assert _untimed(records) == _untimed(_records(tmp_path / "reference")), moment
        for got, want in zip(_last_params(tmp_path / moment), want_params):
            np.testing.assert_array_equal(got, want, err_msg=moment)
        assert not list((tmp_path / moment / "checkpoints").glob("*.orbax-checkpoint-tmp*")), moment


def test_same_seed_gives_identical_metrics_and_a_changed_config_needs_allowing(tmp_path, cache_dir):
    cfg = _config(cache_dir, max_steps=5, checkpoint_every_steps=None)
    train.train_and_evaluate(cfg, tmp_path / "a")
    train.train_and_evaluate(cfg, tmp_path / "b")
    assert _untimed(_records(tmp_path / "a")) == _untimed(_records(tmp_path / "b"))
    longer = cfg.replace(max_steps=10, learning_rate=1e-3)
    with pytest.raises(UserError, match=r"learning_rate: 0.003 -> 0.001.*--allow_config_change"):
        train.train_and_evaluate(longer, tmp_path / "a")
    record = train.train_and_evaluate(longer, tmp_path / "a", allow_config_change=True)
    assert record["step"] == 10
    work = Workdir(tmp_path / "a")
    assert work.read_config().learning_rate == 1e-3
    (change,) = work.read_config_changes()
    assert change["from_step"] == 5 and change["changed"] == {"learning_rate": [0.003, 0.001]}


def test_impossible_requests_are_one_sentence(tiny_run, tmp_path, cache_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no volumes here")
    cases = [
        ((f"--data_dir={empty}",), "holds no .nii or .nii.gz files"),
        (("--batch_size=64", "--model=tiny", "--image_size=32", "--slices=4"), "larger than the 40 training slices"),
        (("--mode=evaluate", f"--workdir={tiny_run}", "--checkpoint=nope"), "--checkpoint=nope is not one of"),
    ]
    for args, words in cases:
        workdir = () if any(a.startswith("--workdir") for a in args) else (f"--workdir={tmp_path / 'w'}",)
        code, _, err = cli(*args, *workdir, f"--cache_dir={cache_dir}")
        assert words in error_line(code, err), args
    assert not (tmp_path / "w").exists()  # a refused run leaves no workdir behind
