"""The scenario runner: trains, evaluates and tables a set of scenarios, skips what is finished, trains on what
a longer budget asks for, and never skips, trains or tables a folder that holds another run."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from mrirecon_jax.config import UserError
from mrirecon_jax.workdir import Workdir
from tools import run_scenarios

# A tiny model on the demo source: the scenario keeps its plane, slab and corruptions (and its thesis row).
TINY_FLAGS = ("--model=tiny", "--batch_size=8", "--learning_rate=3e-3", "--eval_batch_size=16",
              "--keep_checkpoints=1")


def _runner(*args):
    return subprocess.run([sys.executable, "-m", "tools.run_scenarios", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ})


def test_runner_trains_evaluates_tables_and_then_skips_the_finished_run(tmp_path, cache_dir):
    runs, output = tmp_path / "runs", tmp_path / "REPORT.md"
    args = ("--experiments=thesis_32_original", "--max_train_minutes=0.002", f"--runs_dir={runs}",
            f"--output={output}", "--", *TINY_FLAGS, f"--cache_dir={cache_dir}")
    first = _runner(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    work = Workdir(runs / "thesis_32_original")
    records = work.read_metrics()
    assert records[-1]["complete"] and records[-1]["stopped_by"] == "time_budget"
    assert work.evaluation_is_current() and "thesis_32_original: trained and evaluated" in first.stdout
    table = output.read_text()
    assert f"| **{runs / 'thesis_32_original'}** step " in table
    assert "| thesis Table 5.2 (32 px, axial) | original; 581 subjects | 51 | 0.660 | 0.400 |" in table
    assert records[-1]["device"] in table

    metrics_before = (work.path / "metrics.jsonl").read_bytes()
    evaluation_before = (work.eval_dir / "metrics.json").stat().st_mtime_ns
    output.unlink()
    second = _runner(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "thesis_32_original: skipped: already finished" in second.stdout
    assert "--mode=train" not in second.stdout and "--mode=evaluate" not in second.stdout
    assert (work.path / "metrics.jsonl").read_bytes() == metrics_before
    assert (work.eval_dir / "metrics.json").stat().st_mtime_ns == evaluation_before
    assert output.read_text() == table

    # The same folder asked for another run (here: another model) is neither skipped nor trained.
    asked = work.read_config().replace(model="small")
    with run_scenarios.Jobs(backend=None) as jobs, pytest.raises(UserError, match="another configuration"):
        run_scenarios.run_scenario("thesis_32_original", asked, run_scenarios.parse_args(args), jobs)
    assert (work.path / "metrics.jsonl").read_bytes() == metrics_before


def _record(work: Workdir, **record):
    work.path.mkdir(parents=True, exist_ok=True)
    (work.path / "config.json").write_text("{}")
    work.append_metrics({"step": 10, "epoch": 1.0, **record})


@pytest.mark.parametrize("record, budget, enough", [
    (dict(wall_time_s=600.0, complete=True, stopped_by="time_budget"), 10.0, True),
    (dict(wall_time_s=600.0, complete=True, stopped_by="time_budget"), 5.0, True),
    (dict(wall_time_s=600.0, complete=True, stopped_by="time_budget"), 20.0, False),  # a longer budget trains on
    (dict(wall_time_s=30.0, complete=True, stopped_by="planned_end"), 20.0, True),
    (dict(wall_time_s=900.0, complete=False, stopped_by="signal"), 10.0, False),
    (dict(wall_time_s=900.0), 10.0, False),  # a record from before the marker existed
])
def test_a_run_is_trained_enough_when_its_last_record_says_so(tmp_path, record, budget, enough):
    work = Workdir(tmp_path / "run")
    _record(work, **record)
    assert run_scenarios.trained_enough(work, budget) is enough
    assert not run_scenarios.trained_enough(Workdir(tmp_path / "nothing"), budget)


@pytest.mark.parametrize("argv, message", [
    (["--max_train_minutes=1", "--", "--workdir=elsewhere"], "sets --mode, --experiment, --workdir"),
    (["--max_train_minutes=1", "--", "model=tiny"], "not a training flag"),
    (["--max_train_minutes=0"], "must be positive"),
])
def test_runner_refuses_flags_it_owns_or_cannot_pass_on(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_scenarios.parse_args(["--experiments=thesis_32_original", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
