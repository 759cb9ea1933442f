"""The entry point end to end: a tiny model trained on the shared IXI data, and every user error as one sentence."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("step", "epoch", "wall_time_s", "train_loss", "ssim_slice", "ssim_patch", "psnr_slice", "psnr_patch",
            "mse_slice", "mse_patch")


def run(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def test_end_to_end_on_real_ixi(ixi_dir, tmp_path):
    workdir = tmp_path / "run"
    args = (f"--data_dir={ixi_dir}", f"--workdir={workdir}", f"--cache_dir={tmp_path / 'cache'}", "--model=tiny",
            "--image_size=32", "--slices=6", "--max_subjects=12", "--batch_size=8", "--epochs=2",
            "--corruptions=augmented", "--learning_rate=3e-3")
    result = run(*args)
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
    assert json.loads((workdir / "config.json").read_text())["model"] == "tiny"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["14", "7"]
    # Rerunning the same command finds the run complete: no new training, no new records.
    again = run(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2


def _error_line(result):
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    return lines[0]


def test_missing_data_dir(tmp_path):
    assert "not a directory" in _error_line(run(f"--data_dir={tmp_path / 'nowhere'}", f"--workdir={tmp_path}/w"))


def test_slices_and_slab_together(tmp_path):
    assert "--slab_mm" in _error_line(run("--slices=10", "--slab_mm=20", f"--workdir={tmp_path}/w"))


def test_unknown_experiment(tmp_path):
    assert "thesis_64_augmented" in _error_line(run("--experiment=nope", f"--workdir={tmp_path}/w"))


def test_unavailable_backend(tmp_path):
    assert "not available" in _error_line(run("--backend=tpu", f"--workdir={tmp_path}/w"))


def test_image_size_that_does_not_fit_the_model(tmp_path):
    assert "multiple of 16" in _error_line(run("--model=thesis", "--image_size=40", f"--workdir={tmp_path}/w"))


def test_corrupt_nifti(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("IXI001-Guys-0001-T1.nii.gz", "IXI002-Guys-0002-T1.nii.gz"):
        (data / name).write_bytes(b"this is not a NIfTI file")
    line = _error_line(run(f"--data_dir={data}", f"--workdir={tmp_path}/w", f"--cache_dir={tmp_path}/c"))
    assert "-T1.nii.gz" in line
    assert (data / "IXI001-Guys-0001-T1.nii.gz").read_bytes() == b"this is not a NIfTI file"


def test_bad_corruption_spec(tmp_path):
    assert "--corruptions" in _error_line(run("--corruptions=patch+blur", f"--workdir={tmp_path}/w"))
