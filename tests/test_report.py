"""The report job: Table 5.1 layout from evaluated runs, the thesis's rows beside them, hours per epoch."""

import importlib
import re

import pytest

from mrirecon_jax import evaluate, report, train
from mrirecon_jax.config import Config, UserError
from mrirecon_jax.workdir import RUN_POLICY, TOLD_MASK, Workdir

TINY = dict(model="tiny", image_size=32, batch_size=8, epochs=1, max_steps=1, learning_rate=3e-3,
            eval_batch_size=32)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, cache_dir):
    """Two evaluated tiny runs: the thesis's 32 px 'original' setting (48 mm slab) and an augmented 4-slice one
    with a mask channel, told the patch's mask on half of its slices."""
    root = tmp_path_factory.mktemp("report")
    settings = {"thesis32": dict(slices=None, slab_mm=48.0, corruptions="original"),
                "aug4": dict(slices=4, slab_mm=None, corruptions="augmented", mask_input=0.5)}
    for (name, changes), kinds in zip(settings.items(), [("downsample",), ()]):  # each kind costs a compilation
        train.train_and_evaluate(Config(**TINY, **changes, cache_dir=str(cache_dir)), root / name)
        evaluate.evaluate_run(root / name, kinds=kinds)
    return root


def _row(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def test_report_of_two_runs(two_runs, tmp_path):
    output = tmp_path / "out" / "REPORT.md"
    workdirs = [str(two_runs / "thesis32"), str(two_runs / "aug4")]
    assert report.write_report(workdirs, output) == output
    text = output.read_text()
    evaluation = Workdir(two_runs / "thesis32").read_evaluation()
    own = evaluation["kinds"][RUN_POLICY]
    model_row = _row(text, f"| **{workdirs[0]}** step {evaluation['checkpoint_step']}: model |").split(" | ")
    assert model_row[3:9] == [f"{own['ssim_slice']:.3f}", f"{own['ssim_patch']:.3f}", f"{own['psnr_slice']:.2f}",
                              f"{own['psnr_patch']:.2f}", f"{own['mse_slice']:.2g}", f"{own['mse_patch']:.2g}"]
    # h/epoch on this device; one validation only (max_steps=1), so its interval holds compilation
    assert model_row[9].endswith(f" ({train.device_description()}, 23,715 slices; includes compilation) |")
    assert f"on {train.device_description()}" in text  # beside each run's own epochs and training time
    compat = _row(text, f"| **{workdirs[0]}** step {evaluation['checkpoint_step']}: model, thesis-compatible")
    assert f"| {own['thesis_compat']['ssim_slice']:.3f} |" in compat
    # The thesis's Table 5.2 row (32 px, original, 51 slices) sits beside the first run; none for the second.
    assert "| thesis Table 5.2 (32 px, axial) | original; 581 subjects | 51 | 0.660 | 0.400 | 38.80 |" in text
    assert text.count("| thesis: no row for this setting |") == 1
    assert text.count("(best) |") == 2
    told = Workdir(two_runs / "aug4").read_evaluation()["kinds"][RUN_POLICY][TOLD_MASK]  # the mask-channel run only
    assert text.count("model told the patch's mask |") == 1 and f"| {told['ssim_slice']:.3f} |" in _row(
        text, f"| **{workdirs[1]}** step 1: model told the patch's mask |")
    for run in ("thesis32", "aug4"):  # every kind, model against its best baseline
        kinds = Workdir(two_runs / run).read_evaluation()["kinds"]
        for kind, entry in kinds.items():
            best = entry["best_baseline"]
            row = _row(text, f"| {two_runs / run} | {kind} |")
            assert f"| {best} | {entry['baselines'][best]['ssim_slice']:.3f} |" in row
    links = re.findall(r"\]\(([^)]+\.png)\)", text)
    # per run: the three curves and a grid per evaluated policy; then the runs' SSIM against training time
    assert len(links) == (3 + 2) + (3 + 1) + 1
    assert all((output.parent / link).is_file() for link in links)
    assert "REPORT_ssim_vs_time.png" in links
    report.write_report(workdirs, output)  # its own report may be rewritten


def test_report_never_overwrites_another_file(two_runs, tmp_path):
    precious = tmp_path / "notes.md"
    precious.write_text("my notes")
    with pytest.raises(UserError, match="not a report"):
        report.write_report([str(two_runs / "aug4")], precious)
    assert precious.read_text() == "my notes"


def test_report_needs_an_evaluated_run(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    Workdir(workdir).record_config(Config())
    with pytest.raises(UserError, match="--mode=evaluate"):
        report.write_report([str(workdir)], tmp_path / "REPORT.md")
    assert not (tmp_path / "REPORT.md").exists()


def test_seconds_per_slice_leaves_out_the_compiling_first_epoch():
    records = [{"step": 10, "wall_time_s": 50.0}, {"step": 20, "wall_time_s": 60.0},
               {"step": 30, "wall_time_s": 70.0}, {"step": 35, "wall_time_s": 75.0}]
    assert report.seconds_per_training_slice(records, batch_size=4) == pytest.approx(0.25)
    assert report.seconds_per_training_slice(records[:1], batch_size=4) == pytest.approx(1.25)


@pytest.mark.parametrize("experiment, table, data, slices", [
    ("thesis_64_augmented", "Table 5.1", "augmented", 51), ("thesis_32_original", "Table 5.2", "original", 51),
    ("thesis_128_reduced", "Table 5.3", "original", 51), ("thesis_64_reduced_sagittal", "§5.3.3", "original", 51)])
def test_thesis_row_of_each_thesis_experiment(experiment, table, data, slices):
    cfg = importlib.import_module(f"experiments.{experiment}").get_config()
    row = report.thesis_row_for(cfg)
    assert (row.table, row.data, row.slices, row.image_size, row.plane) == (table, data, slices, cfg.image_size,
                                                                            cfg.plane)
    assert report.thesis_row_for(cfg.replace(slab_mm=20.0)) is None
    assert report.thesis_row_for(cfg.replace(corruptions="patch+gibbs")) is None
    if cfg.slab_mm is not None:  # measured on the thesis's slab, trained on another: still the thesis's row
        assert report.thesis_row_for(cfg.replace(slab_mm=20.0, val_slab_mm=cfg.slab_mm)) == row


def test_thesis_epoch_sizes_follow_its_protocol():
    rows = {(r.table, r.image_size, r.data, r.slices): r for r in report.THESIS_ROWS}
    assert rows["Table 5.1", 64, "original", 51].epoch_slices == report.THESIS_SLICES_PER_EPOCH == 465 * 51
    assert rows["Table 5.1", 64, "augmented", 151].epoch_slices == 3 * 465 * 151
    assert rows["Table 5.3", 128, "original", 51].epoch_slices == 80 * 51
