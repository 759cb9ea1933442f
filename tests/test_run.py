"""The entry point: the README's main job on the demo source, a tiny model on the shared IXI data, flags that
come from the config, and every user error as one sentence with exit code 1."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from absl import flags

import run
from conftest import IXI_DIR, ROOT, cli, error_line, needs_ixi, symlink_subset
from mrirecon_jax.config import Config

REQUIRED = ("step", "epoch", "wall_time_s", "train_loss", "ssim_slice", "ssim_patch", "psnr_slice", "psnr_patch",
            "mse_slice", "mse_patch")


def run_process(*args, cwd=ROOT):
    """run.py in its own process, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ})


def test_every_config_field_is_a_flag_that_overrides_the_experiment():
    assert set(run.CONFIG_FLAGS) == {f.name for f in dataclasses.fields(Config)}
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["run.py", "--experiment=thesis_64_augmented", "--keep_checkpoints=1", "--eval_batch_size=7",
                 "--slices=5", "--preprocess=brain", "--loss=l1", "--max_train_minutes=2.5"])
    try:
        cfg = run.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    base = run.load_experiment("thesis_64_augmented")
    assert (cfg.keep_checkpoints, cfg.eval_batch_size, cfg.slices, cfg.slab_mm) == (1, 7, 5, None)
    assert cfg.preprocess == "brain" and cfg.loss == "l1" and cfg.max_train_minutes == 2.5
    assert (cfg.model, cfg.corruptions, cfg.image_size) == (base.model, base.corruptions, base.image_size)


def test_main_job_path_on_the_demo_source(tmp_path):
    """The README's first command (the default experiment on the demo source), cut to a few steps, then evaluate,
    report and reconstruct on what it wrote."""
    workdir, cache = tmp_path / "default", tmp_path / "cache"
    trained = run_process(f"--workdir={workdir}", f"--cache_dir={cache}", "--max_steps=3", "--eval_batch_size=48",
                          "--keep_checkpoints=1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["model"] == "small" and cfg["corruptions"] == "augmented" and cfg["keep_checkpoints"] == 1
    assert json.loads((workdir / "split.json").read_text())["source"].startswith("DEMO")
    summary = json.loads(trained.stdout.strip().splitlines()[-2])
    assert summary["step"] == 3 and 0 < summary["ssim_slice"] <= 1

    code, out, err = cli("--mode=evaluate", f"--workdir={workdir}", "--kinds=gibbs")
    assert code == 0, err[-3000:]
    assert [json.loads(line)["kind"] for line in out.splitlines() if line.startswith("{")] == [
        "run_policy", "gibbs", "overall"]
    code, out, err = cli("--mode=report", f"--workdirs={workdir}", f"--output={tmp_path / 'REPORT.md'}")
    assert code == 0 and "Report written" in out, err[-3000:]
    assert "| **" in (tmp_path / "REPORT.md").read_text()
    volume = ROOT / "tests" / "data_that_does_not_exist.nii.gz"
    code, _, err = cli("--mode=reconstruct", f"--workdir={workdir}", f"--input={volume}", "--output=x.nii.gz")
    assert "does not exist" in error_line(code, err) and not (ROOT / "x.nii.gz").exists()


@needs_ixi
def test_end_to_end_on_real_ixi(tmp_path):
    workdir = tmp_path / "run"
    subset = symlink_subset(IXI_DIR, tmp_path / "ixi", 12)
    args = (f"--data_dir={subset}", f"--workdir={workdir}", f"--cache_dir={tmp_path / 'cache'}", "--model=tiny",
            "--image_size=32", "--slices=6", "--batch_size=8", "--epochs=2", "--corruptions=augmented",
            "--learning_rate=3e-3")
    result = run_process(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and [r["epoch"] for r in records] == [1.0, 2.0]
    for record in records:
        assert all(record[k] is not None for k in REQUIRED)
        assert 0 < record["ssim_patch"] < record["ssim_slice"] <= 1
        assert record["psnr_slice"] > 10 and 0 < record["mse_slice"] < record["mse_patch"]
    split = json.loads((workdir / "split.json").read_text())
    assert len(split["val_subjects"]) == 2 and len(split["train_subjects"]) == 10
    assert split["n_train_slices"] == 60 and split["n_val_slices"] == 12
    assert (workdir / "samples.png").stat().st_size > 10_000
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["14", "7"]
    # Rerunning the same command finds the run complete: no new training, no new records.
    code, _, err = cli(*args)
    assert code == 0, err[-3000:]
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args, expected", [
    (("--slices=10", "--slab_mm=20"), "exactly one of --slices and --slab_mm"),
    (("--experiment=nope",), "thesis_64_augmented"),
    (("--model=thesis", "--image_size=40"), "multiple of 16"),
    (("--corruptions=patch+blur",), "--corruptions"),
    (("--val_fraction=1.5",), "--val_fraction"),
    (("--learning_rate=0",), "--learning_rate must be positive"),
    (("--model=huge",), "--model"),
    (("--mode=report",), "needs --workdirs"),
])
def test_user_errors_are_one_sentence(tmp_path, args, expected):
    code, _, err = cli(*args, f"--workdir={tmp_path / 'w'}", f"--cache_dir={tmp_path / 'c'}")
    assert expected in error_line(code, err)
    assert not (tmp_path / "w").exists()


def test_missing_data_dir_and_folder_of_broken_files(tmp_path):
    code, _, err = cli(f"--data_dir={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'w'}")
    assert "does not exist" in error_line(code, err)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("IXI001-Guys-0001-T1.nii.gz", "IXI002-Guys-0002-T1.nii.gz"):
        (data / name).write_bytes(b"this is not a NIfTI file")
    code, _, err = cli(f"--data_dir={data}", f"--workdir={tmp_path / 'w'}", f"--cache_dir={tmp_path / 'c'}")
    assert "-T1.nii.gz" in error_line(code, err)
    assert (data / "IXI001-Guys-0001-T1.nii.gz").read_bytes() == b"this is not a NIfTI file"


def test_unavailable_backend_and_bad_flag_value_in_a_process(tmp_path):
    assert "not available" in error_line(*_code_err(run_process("--backend=tpu", f"--workdir={tmp_path}/w")))
    assert "--model" in error_line(*_code_err(run_process("--model=huge", f"--workdir={tmp_path}/w")))


def _code_err(result):
    return result.returncode, result.stderr
