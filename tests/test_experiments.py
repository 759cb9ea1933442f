"""The named scenarios: every experiment builds a valid config and trains two steps with a tiny model, every row
of the thesis's Tables 5.1-5.3 has its scenario, and `--mode=list` shows each one in one line."""

import json

import pytest

import run
from mrirecon_jax import report, train
from mrirecon_jax.config import Config
from mrirecon_jax.data import align
from mrirecon_jax.models import unet
from test_run import cli

EXPERIMENTS = run.experiment_names()
THESIS_EXPERIMENTS = [name for name in EXPERIMENTS if name.startswith("thesis_")]
# The cheap stand-in each experiment trains as: the demo source at 32 px, a tiny U-Net, two steps, with the batch
# and learning rate of the other tiny runs (conftest.TINY_RUN), whose compiled steps it then shares. Plane, slab,
# subjects and corruptions stay the experiment's; scenarios that differ only in what this replaces share one run.
TINY_OVERRIDE = dict(data_dir=None, model="tiny", image_size=32, batch_size=8, learning_rate=3e-3, max_steps=2,
                     eval_batch_size=16, max_train_minutes=None, keep_checkpoints=1)


def test_every_thesis_row_has_exactly_one_scenario():
    rows = [report.thesis_row_for(run.load_experiment(name)) for name in THESIS_EXPERIMENTS]
    assert None not in rows
    assert sorted(rows, key=report.THESIS_ROWS.index) == list(report.THESIS_ROWS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_config_is_valid_and_described(name):
    cfg = run.load_experiment(name)
    assert isinstance(cfg, Config) and Config.from_json(cfg.to_json()) == cfg
    # Its real model, as training would build it.
    unet.checked_spec(cfg.model, cfg.output_activation, cfg.norm, cfg.image_size, cfg.dtype, cfg.conv_impl)
    train.parse_policy(cfg.corruptions)
    description = run.experiment_description(name)
    assert description != "(no description)" and len(description) <= 116
    row = report.thesis_row_for(cfg)
    if name in THESIS_EXPERIMENTS:
        assert description.startswith(f"Thesis {row.table}: ")
        assert f"{row.image_size} x {row.image_size} px" in description and row.data in description
        assert (cfg.plane, cfg.image_size, cfg.model) == (row.plane, row.image_size, "thesis")
        assert (cfg.max_subjects == 100) == (row.subjects == 100)
        assert abs(cfg.slab_mm - 0.94 * row.slices) < 1.0  # the thesis's slices of 0.94 mm, as a slab


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, cache_dir):
    """Config -> (workdir, summary) of its two-step run, each distinct config trained once."""
    root, runs = tmp_path_factory.mktemp("experiments"), {}

    def run_of(cfg: Config):
        if cfg not in runs:
            workdir = root / f"run{len(runs)}"
            runs[cfg] = workdir, train.train_and_evaluate(cfg, workdir)
        return runs[cfg]

    return run_of


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains_two_steps_with_a_tiny_model(name, tiny_runs, cache_dir):
    full = run.load_experiment(name)
    # An aligned run registers every subject it reads: two are enough to check it trains.
    fewer = {"max_subjects": 2} if full.preprocess == "brain" else {}
    cfg = full.replace(**TINY_OVERRIDE, **fewer, cache_dir=str(cache_dir))
    workdir, summary = tiny_runs(cfg)
    assert summary["step"] == 2 and 0 < summary["ssim_slice"] <= 1 and not summary["stopped_early"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["complete"] and records[-1]["stopped_by"] == "planned_end"
    recorded = json.loads((workdir / "config.json").read_text())
    assert (recorded["plane"], recorded["slab_mm"], recorded["corruptions"], recorded["max_subjects"]) == (
        full.plane, full.slab_mm, full.corruptions, cfg.max_subjects)
    split = json.loads((workdir / "split.json").read_text())
    # The demo source has 2 mm voxels; aligned runs take the template slices that hold brain instead of a slab.
    expected_slices = len(align.brain_slices()) if full.preprocess == "brain" else round(full.slab_mm / 2.0)
    assert split["n_val_slices"] == expected_slices * len(split["val_subjects"])


def test_list_mode_prints_every_experiment_in_one_line():
    code, out, err = cli("--mode=list")
    assert code == 0, err[-2000:]
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == EXPERIMENTS
    for name, line in zip(EXPERIMENTS, lines):
        assert line.split(None, 1)[1] == run.experiment_description(name)
    assert any("Thesis Table 5.1: 64 x 64 px, 151 central axial slices" in line for line in lines)


def test_config_mode_prints_the_config_the_flags_give():
    code, out, err = cli("--mode=config", "--experiment=thesis_64_augmented_151", "--model=tiny", "--slices=5")
    assert code == 0, err[-2000:]
    cfg = Config.from_json(out)
    assert cfg == run.load_experiment("thesis_64_augmented_151").replace(model="tiny", slices=5, slab_mm=None)
